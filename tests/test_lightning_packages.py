"""Our Lightning-facing classes under both distributions: ``pytorch_lightning`` and ``lightning.pytorch``.

Every test here runs once per package (ids ``[pytorch_lightning]`` and ``[lightning.pytorch]``):
the callbacks in a fit with the package's own Trainer and TensorBoardLogger (custom-scalars
layout, ``spa/ratio``), a checkpoint resume, and the LightningCLI digits app from the YAML that
ships, in automatic and dependency-injection mode.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
from test_diagnostics import read_layout_charts, read_scalars

from lightning_spa import SPA, GradualSchedule, MomentumDiagnostics, MomentumOff
from lightning_spa.demos import DigitsCNN, DigitsDataModule

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))







def _trainer(package: ModuleType, tmp_path: Path, callbacks: list, **kwargs):  # type: ignore[no-untyped-def]
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=6, limit_val_batches=1,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    defaults.update(kwargs)
    return package.Trainer(callbacks=callbacks, **defaults)


def test_classes_belong_to_both_packages(package: ModuleType) -> None:
    for cls in (GradualSchedule, MomentumOff, MomentumDiagnostics):
        assert issubclass(cls, package.Callback)
    assert issubclass(DigitsCNN, package.LightningModule)
    assert issubclass(DigitsDataModule, package.LightningDataModule)


def test_callbacks_fit_log_custom_scalars(package: ModuleType, tmp_path: Path) -> None:
    """Schedules and diagnostics in a fit with the package's Trainer and TensorBoardLogger."""
    logger = package.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    schedule = GradualSchedule(milestones=[6], unit="step", mode="lr", factor=0.5, transition_steps=8)
    trainer = _trainer(package, tmp_path, [schedule, MomentumDiagnostics(every_n_steps=1)], logger=logger)
    trainer.fit(DigitsCNN(), DigitsDataModule())
    assert trainer.global_step == 12
    scalars, charts = read_scalars(logger.log_dir), read_layout_charts(logger.log_dir)
    assert "spa/ratio" in scalars and all(v > 0 for v in scalars["spa/ratio"].values())
    assert any(tag.startswith("^spa/ratio") for tags in charts.values() for tag in tags), charts
    # after step 11 the groups hold the coming step 12's values, the 7th of the transition: eta = 0.5 ** (7 / 8)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 ** (7 / 8))


def test_resume_restores_callback_state(package: ModuleType, tmp_path: Path) -> None:
    """A checkpoint of the package's Trainer restores the schedule's clock and starting values."""
    schedule = dict(milestones=[6], unit="step", mode="paper", factor=0.5, transition_steps=12)
    manual = dict(enable_checkpointing=False)  # the checkpoint is saved by hand
    first = _trainer(package, tmp_path, [GradualSchedule(**schedule)], max_epochs=1, logger=False, **manual)
    model = DigitsCNN(optimizer=lambda params: SPA(params, lr=0.8, c=0.2))
    with pytest.warns(UserWarning, match="milestone at optimizer step 6 is beyond this run's 6 steps"):
        first.fit(model, DigitsDataModule())
    ckpt = tmp_path / "mid.ckpt"
    first.save_checkpoint(ckpt)
    # resumed with another starting eta: the checkpoint's (0.8, 0.2) must win
    resumed = _trainer(package, tmp_path, [GradualSchedule(**schedule)], max_epochs=2, logger=False, **manual)
    resumed.fit(DigitsCNN(optimizer=lambda params: SPA(params, lr=3.0, c=0.5)), DigitsDataModule(), ckpt_path=ckpt)
    assert resumed.global_step == 12
    group = resumed.optimizers[0].param_groups[0]
    # the groups hold the coming step 12's values, the 7th of 12 transition steps
    assert group["lr"] == pytest.approx(0.8 * 0.5 ** (7 / 12))
    assert group["c"] == pytest.approx(0.2 / 0.5 ** (7 / 12))


@pytest.mark.parametrize(
    ("config", "optimizer"), [("digits_spa.yaml", "SPA"), ("digits_grouped.yaml", "GroupedSPA")], ids=["auto", "di"]
)
def test_cli_yaml_fits(package: ModuleType, tmp_path: Path, config: str, optimizer: str) -> None:
    """The shipped YAML (our callbacks, lightning_spa optimizers) fits under the package's LightningCLI."""
    import digits_cli

    args = [
        "fit", "--config", str(EXAMPLES / "configs" / config),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="milestone at optimizer step 30 is beyond this run's 3 steps"):
        cli = digits_cli.cli_main(args, package=package.__name__)
    trainer = cli.trainer
    assert isinstance(trainer, package.Trainer) and trainer.global_step == 3
    assert isinstance(trainer.logger, package.loggers.TensorBoardLogger)
    names = {type(cb).__name__ for cb in trainer.callbacks}
    assert {"GradualSchedule", "MomentumDiagnostics"} <= names or {"GradualSchedule"} <= names
    assert type(trainer.optimizers[0]).__name__ == optimizer


def test_cli_package_choice() -> None:
    """The apps' `package=` and leading `--lightning` flag; another package name is refused, named."""
    from lightning_spa._lightning import lightning_cli, main_args

    assert main_args(["--lightning", "fit"]) == (["fit"], "lightning.pytorch")
    assert main_args(["fit", "--lightning"]) == (["fit", "--lightning"], "pytorch_lightning")
    assert lightning_cli("lightning.pytorch") is sys.modules["lightning.pytorch.cli"].LightningCLI
    with pytest.raises(ValueError, match="`package` must be one of"):
        lightning_cli("lightning")
