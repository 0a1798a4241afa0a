"""Small, offline demo data and models (scikit-learn's bundled digits), like ``lightning.pytorch.demos``."""

from lightning_spa.demos.digits import DigitsClassifier, DigitsCNN, DigitsDataModule

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule"]
