"""Switching a Lightning project from SGD to SPA: a checkpoint of the SGD run, resumed with SPA,
continues the SGD trajectory (the optimizer state converts through Theorem 1 on load); with an LR
scheduler on both sides the resume is refused at load, with the ways on (issue 16, item 2).
Every test runs under both Lightning packages (``package`` fixture)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.95**k),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
}


def _module(package: ModuleType, form: str, scheduler: str | None) -> Any:
    class Regression(package.LightningModule):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            if form == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(
                    self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3
                )
            else:
                opt = SPA(self.parameters(), lr=0.5, c=0.1, weight_decay=1e-3)  # values come from the checkpoint
            if scheduler is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": SCHEDULERS[scheduler](opt), "interval": "step"}}

    return Regression()


def _loader() -> DataLoader:  # 8 steps an epoch: checkpoints at step 8 end an epoch (no mid-epoch resume warning)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, dtype=torch.float64, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)


def _trainer(package: ModuleType, max_steps: int, tmp_path: Path):  # type: ignore[no-untyped-def]
    return package.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def _fit(package: ModuleType, form: str, max_steps: int, tmp_path: Path, ckpt_path=None, scheduler=None):  # type: ignore[no-untyped-def]
    model = _module(package, form, scheduler)
    trainer = _trainer(package, max_steps, tmp_path)
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    if ckpt_path is None:
        trainer.save_checkpoint(tmp_path / f"{form}-{max_steps}.ckpt")
    return model


def test_sgd_checkpoint_resumed_with_spa_continues_the_sgd_run(package: ModuleType, tmp_path: Path) -> None:
    _fit(package, "sgd", 8, tmp_path)
    ckpt = tmp_path / "sgd-8.ckpt"
    sgd_run = _fit(package, "sgd", 14, tmp_path, ckpt_path=ckpt)
    with pytest.warns(UserWarning, match="converted by Theorem 1"):
        spa_run = _fit(package, "spa", 14, tmp_path, ckpt_path=ckpt)
    for p, q in zip(sgd_run.parameters(), spa_run.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    fresh = _module(package, "sgd", None).parameters()
    assert all(not torch.equal(p, q) for p, q in zip(sgd_run.parameters(), fresh, strict=True))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sgd_and_scheduler_checkpoint_resumed_with_spa_and_scheduler_is_refused_at_load(
    package: ModuleType, tmp_path: Path, scheduler: str
) -> None:
    """Before: the scheduler's SGD-unit base_lrs set eta 10x low from its next step on, silently."""
    _fit(package, "sgd", 8, tmp_path, scheduler=scheduler)
    ckpt = tmp_path / "sgd-8.ckpt"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    model = _module(package, "spa", scheduler)
    trainer = _trainer(package, 14, tmp_path)
    with pytest.raises(ValueError, match="LR scheduler") as err:
        trainer.fit(model, _loader(), ckpt_path=ckpt)
    message = str(err.value)
    assert "resume it with torch.optim.SGD" in message and "sgdm_optimizer_to_spa" in message
    for name, p in model.state_dict().items():  # refused before any training step
        torch.testing.assert_close(p, saved[name], rtol=0, atol=0)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sgd_and_scheduler_checkpoint_resumed_with_spa_alone_continues_exactly(
    package: ModuleType, tmp_path: Path, scheduler: str
) -> None:
    """The way on that the refusal names: SPA without a scheduler continues SGD without one."""
    _fit(package, "sgd", 8, tmp_path, scheduler=scheduler)
    ckpt = tmp_path / "sgd-8.ckpt"
    sgd_run = _fit(package, "sgd", 14, tmp_path, ckpt_path=ckpt)  # no scheduler: lr stays where it was
    with pytest.warns(UserWarning, match="converted by Theorem 1"):
        spa_run = _fit(package, "spa", 14, tmp_path, ckpt_path=ckpt)
    for p, q in zip(sgd_run.parameters(), spa_run.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
