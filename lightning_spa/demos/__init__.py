"""Small, offline demo data and models (scikit-learn's bundled digits), like ``lightning.pytorch.demos``."""

from lightning_spa.demos.digits import DigitsCNN, DigitsDataModule

__all__ = ["DigitsCNN", "DigitsDataModule"]
