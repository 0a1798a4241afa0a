"""A user's ``Trainer`` subclass (defined outside Lightning) under both packages (issue 17, point 4).

The package a demo or example module dispatches to is told by class hierarchy
(:func:`lightning_spa._lightning.package_of`), not by the Trainer class's module name: a
``lightning.pytorch.Trainer`` subclass defined here (``__module__`` is this test module) used to
take the ``pytorch_lightning`` code path and fail in ``trainer.fit`` ("Both
`DigitsCNN.configure_model`, and `DigitsCNN.configure_sharded_model` are overridden").
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lightning_spa._lightning import PACKAGE_NAMES, _package_of, package_of
from lightning_spa.demos import DigitsCNN, DigitsDataModule

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

QUIET = dict(
    accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
)  # fmt: skip


def _user_trainer_class(package: ModuleType) -> type:
    """A Trainer subclass as a user writes one, in their own module (here: this test module)."""

    class UserTrainer(package.Trainer):  # type: ignore[misc, name-defined]
        """Adds nothing; what matters is where it is defined."""

    assert UserTrainer.__module__ == __name__ and "lightning" not in UserTrainer.__module__
    return UserTrainer


def test_package_of_follows_the_class_hierarchy(package: ModuleType) -> None:
    trainer = _user_trainer_class(package)(**QUIET)
    assert package_of(trainer) == package.__name__
    assert package_of(package.Trainer(**QUIET)) == package.__name__
    others = [name for name in PACKAGE_NAMES if name != package.__name__]
    assert all(package_of(importlib.import_module(name).Trainer(**QUIET)) == name for name in others)
    assert package_of(object()) is None


def test_user_trainer_fits_the_demo_module(package: ModuleType) -> None:
    trainer = _user_trainer_class(package)(limit_train_batches=2, **QUIET)
    model, data = DigitsCNN(), DigitsDataModule()
    trainer.fit(model, data)
    assert trainer.global_step == 2
    assert _package_of(model) == _package_of(data) == package.__name__


def test_user_trainer_fits_the_vision_example_without_torchvision(
    package: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The vision example's model path (examples/models.py, vision_cli.ImageClassifier) imports without
    # torchvision: import both afresh with torchvision made unimportable.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    for name in ("vision_cli", "models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    vision_cli = importlib.import_module("vision_cli")
    with pytest.raises(ImportError, match="need torchvision"):
        vision_cli.CIFAR10DataModule(fake_data=False)._real()
    model = vision_cli.ImageClassifier(arch="preact_resnet18")
    data = vision_cli.CIFAR10DataModule(batch_size=2, num_workers=0, fake_data=True, fake_size=2)
    trainer = _user_trainer_class(package)(**QUIET)
    trainer.fit(model, data)
    assert trainer.global_step == 1
    assert _package_of(model) == package.__name__
