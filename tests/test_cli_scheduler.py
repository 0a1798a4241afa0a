"""LR schedulers in the example LightningCLI apps: each goes with its optimizer's mode, or the app refuses it.

LightningCLI replaces the model's ``configure_optimizers`` only when a top-level ``optimizer`` is given. It
therefore silently dropped a top-level ``--lr_scheduler`` beside an injected ``model.optimizer`` (or with no
optimizer at all), and the injected optimizer beside a top-level one (with a warning naming neither). The apps
now take a dependency-injection scheduler, ``model.lr_scheduler``, and refuse the mixes before building anything.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_spa import SPA, GroupedSPA

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = EXAMPLES / "configs"
sys.path.insert(0, str(EXAMPLES))

import digits_cli  # noqa: E402
import vision_cli  # noqa: E402

STEP_LR = "torch.optim.lr_scheduler.StepLR"


def _tiny(tmp_path: Path, epochs: int = 2) -> list[str]:
    return [
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.max_epochs", str(epochs),
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks=[]",  # the configs' GradualSchedule writes the lr: it refuses any LR scheduler
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip


# SPA's lr is eta; a drop eta -> GAMMA * eta with c = 0.1 is the SGD momentum (1 - c) / GAMMA = 0.947 < 1:
# gentle enough for SPA not to warn of a loss spike (a halving would be momentum 1.8)
GAMMA = 0.95


def _step_lr(key: str) -> list[str]:
    """StepLR multiplying the lr by GAMMA every epoch, given as ``key`` (``lr_scheduler`` or ``model.lr_scheduler``)."""
    return [f"--{key}", STEP_LR, f"--{key}.step_size", "1", f"--{key}.gamma", str(GAMMA)]


GROUPED = ["--config", str(CONFIGS / "digits_grouped.yaml")]


def _digits(package: ModuleType, args: list[str], run: bool = True) -> object:
    return digits_cli.cli_main(["fit", *args] if run else args, run=run, package=package.__name__)


def test_injected_scheduler_applies_to_the_injected_optimizer(package: ModuleType, tmp_path: Path) -> None:
    """digits_grouped.yaml + ``--model.lr_scheduler``: StepLR scales GroupedSPA's eta (its lr) after each epoch."""
    cli = _digits(package, [*GROUPED, *_tiny(tmp_path), *_step_lr("model.lr_scheduler")])
    trainer = cli.trainer  # type: ignore[attr-defined]
    assert trainer.global_step == 4 and all(type(cb).__name__ != "GradualSchedule" for cb in trainer.callbacks)
    (opt,), (config,) = trainer.optimizers, trainer.lr_scheduler_configs
    assert isinstance(opt, GroupedSPA) and type(config.scheduler) is torch.optim.lr_scheduler.StepLR
    assert config.interval == "epoch"  # as LightningCLI's own --lr_scheduler
    # eta 1.0 (lr 0.1, momentum 0.9), the head (net.8) at 2x; two epochs: eta * GAMMA**2; c untouched
    head = {id(p) for p in cli.model.net[8].parameters()}  # type: ignore[attr-defined]
    for group in opt.param_groups:
        base = 2.0 if {id(p) for p in group["params"]} <= head else 1.0
        assert group["lr"] == pytest.approx(base * GAMMA**2) and group["c"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("key", "model"), [("model.lr_scheduler", "DigitsModel"), ("lr_scheduler", "DigitsClassifier")]
)
def test_scheduler_alone_uses_the_default_optimizer(package: ModuleType, tmp_path: Path, key: str, model: str) -> None:
    """Only a scheduler, in either mode: it runs on the app's default optimizer, SPA eta 1.0, c 0.1 (the model's
    own with ``model.lr_scheduler``, automatic mode's with ``lr_scheduler``)."""
    cli = _digits(package, [*_tiny(tmp_path, epochs=3), *_step_lr(key)])
    assert type(cli.model).__name__ == model  # type: ignore[attr-defined]
    (opt,), (config,) = cli.trainer.optimizers, cli.trainer.lr_scheduler_configs  # type: ignore[attr-defined]
    assert type(opt) is SPA and type(config.scheduler) is torch.optim.lr_scheduler.StepLR
    assert opt.param_groups[0]["lr"] == pytest.approx(GAMMA**3) and opt.param_groups[0]["c"] == pytest.approx(0.1)


def test_top_level_scheduler_beside_injected_optimizer_is_refused(package: ModuleType, tmp_path: Path) -> None:
    """LightningCLI ignored it (the model's own configure_optimizers ran): now an error naming the fix."""
    match = (
        r"`lr_scheduler` \(torch\.optim\.lr_scheduler\.StepLR\) .* applies only with a top-level `optimizer`; "
        r"here the optimizer is injected as `model.optimizer` \(lightning_spa\.GroupedSPA\).*silently ignored.*"
        r"`--model\.lr_scheduler torch\.optim\.lr_scheduler\.StepLR`"
    )
    with pytest.raises(ValueError, match=match):
        _digits(package, [*GROUPED, *_tiny(tmp_path), *_step_lr("lr_scheduler")])


def test_injected_scheduler_beside_top_level_optimizer_is_refused(package: ModuleType, tmp_path: Path) -> None:
    """The top-level optimizer replaces the model's configure_optimizers, which holds ``model.lr_scheduler``."""
    args = ["--config", str(CONFIGS / "digits_spa.yaml"), *_tiny(tmp_path), *_step_lr("model.lr_scheduler")]
    match = (
        r"`model\.lr_scheduler` \(torch\.optim\.lr_scheduler\.StepLR\).*top-level `optimizer` \(lightning_spa\.SPA\)"
        r".*silently ignored.*`--lr_scheduler torch\.optim\.lr_scheduler\.StepLR`"
    )
    with pytest.raises(ValueError, match=match):
        _digits(package, args)


def test_top_level_optimizer_beside_injected_optimizer_is_refused(package: ModuleType, tmp_path: Path) -> None:
    """LightningCLI built the top-level one and dropped ``model.optimizer`` (GroupedSPA's parameter groups)."""
    match = (
        r"Both `optimizer` \(torch\.optim\.Adam, .*\) and `model\.optimizer` \(lightning_spa\.GroupedSPA, .*\) "
        r"are given.*`--model\.optimizer torch\.optim\.Adam` in place of `--optimizer`"
    )
    with pytest.raises(ValueError, match=match):
        _digits(package, [*GROUPED, *_tiny(tmp_path), "--optimizer", "torch.optim.Adam"], run=False)


def test_plateau_needs_a_monitor(package: ModuleType, tmp_path: Path) -> None:
    """``model.lr_scheduler`` ReduceLROnPlateau: the CLI's subclass passes its ``monitor`` on; torch's has none."""
    plateau = ["--model.lr_scheduler", f"{package.__name__}.cli.ReduceLROnPlateau"]
    cli = _digits(
        package, [*GROUPED, *_tiny(tmp_path), *plateau, "--model.lr_scheduler.monitor", "val/loss"], run=False
    )
    value = cli.model.configure_optimizers()  # type: ignore[attr-defined]
    assert isinstance(value["optimizer"], GroupedSPA) and value["lr_scheduler"]["monitor"] == "val/loss"
    assert isinstance(value["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    torch_plateau = ["--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"]
    cli = _digits(package, [*GROUPED, *_tiny(tmp_path), *torch_plateau], run=False)
    with pytest.raises(ValueError, match=r"needs a metric to monitor.*--model\.lr_scheduler\.monitor val/loss"):
        cli.model.configure_optimizers()  # type: ignore[attr-defined]


VISION = ["--model.arch", "preact_resnet18", "--trainer.logger", "false", "--trainer.accelerator", "cpu"]


def test_vision_injected_scheduler_and_refusal(package: ModuleType) -> None:
    """vision_cli: ``--model.lr_scheduler`` schedules the model's default GroupedSPA; a top-level
    ``--lr_scheduler`` without a top-level ``--optimizer`` (ignored by LightningCLI) is refused."""
    cli = vision_cli.cli_main([*VISION, *_step_lr("model.lr_scheduler")], run=False, package=package.__name__)
    (opt,), (scheduler,) = cli.model.configure_optimizers()
    assert isinstance(opt, GroupedSPA) and type(scheduler) is torch.optim.lr_scheduler.StepLR
    assert scheduler.optimizer is opt and {g["lr"] for g in opt.param_groups} == {1.0}
    match = r"here no top-level `optimizer` is given \(the model's own optimizer is used\).*`--model\.lr_scheduler "
    with pytest.raises(ValueError, match=match):
        vision_cli.cli_main([*VISION, *_step_lr("lr_scheduler")], run=False, package=package.__name__)
