"""The callbacks beside more of Lightning's features (issue 17.9's README section states what these show).

- ``precision="bf16-true"``: SPA's default kernel trains bfloat16 parameters (as torch SGD's default does),
  ``MomentumOff`` and ``MomentumDiagnostics`` run on them.
- ``accumulate_grad_batches``: epochs convert with the optimizer steps of an epoch (batches / accumulation).
- ``BackboneFinetuning`` with ``MomentumOff`` on SPA: the finetuning callback owns the lr, ours writes ``c``.

Each Lightning test runs under both packages (conftest's ``package``); tiny models, seconds each.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
import torch
from test_lightning_features import BATCHES, C0, ETA0, StatefulLoader, fit, make_module, removal_c
from torch import nn

from lightning_spa import SPA, MomentumDiagnostics, MomentumGuard, MomentumOff


def _loss(module: nn.Module, loader: StatefulLoader, dtype: torch.dtype) -> float:
    with torch.no_grad():
        pred = module.head(torch.tanh(module.body(loader.x.to(dtype)))).squeeze(-1)  # type: ignore[operator]
        return float(((pred.double() - loader.y) ** 2).mean())


def test_bf16_true_trains_with_momentum_off_and_diagnostics(package: ModuleType) -> None:
    """bf16-true: parameters in bfloat16, SPA's default kernel moves them; c follows MomentumOff's removal."""
    module = make_module(package, lambda p: SPA(p, lr=ETA0, c=C0))
    loader = StatefulLoader()
    before = _loss(module, loader, torch.float64)
    diagnostics = MomentumDiagnostics(every_n_steps=1)
    trainer, rec = fit(
        package, module, [MomentumOff(after_epochs=1), diagnostics], max_epochs=4, precision="bf16-true",
        loader=loader,
    )  # fmt: skip
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert _loss(module, loader, torch.bfloat16) < 0.5 * before  # it trained
    assert rec.key("c") == pytest.approx([removal_c(k, BATCHES, BATCHES) for k in range(4 * BATCHES)], rel=1e-12)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["spa/c"] == 1.0 and math.isfinite(metrics["spa/ratio"])


def test_gradient_accumulation_epochs_count_optimizer_steps(package: ModuleType) -> None:
    """accumulate_grad_batches=2 over 4 batches: 2 optimizer steps an epoch; one epoch of removal is 2 steps."""
    module = make_module(package, lambda p: SPA(p, lr=ETA0, c=C0))
    off = MomentumOff(after_epochs=1, guard=MomentumGuard(low=None, high=None))  # the formula: no idle check
    _, rec = fit(package, module, [off], max_epochs=3, accumulate_grad_batches=2)
    per_epoch = BATCHES // 2
    assert rec.key("c") == pytest.approx([removal_c(k, per_epoch, per_epoch) for k in range(3 * per_epoch)])


def _finetuning_module(package: ModuleType) -> Any:
    class WithBackbone(package.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Linear(4, 4, dtype=torch.float64)
            self.head = nn.Linear(4, 1, dtype=torch.float64)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return ((self.head(torch.tanh(self.backbone(x))).squeeze(-1) - y) ** 2).mean()

        def configure_optimizers(self) -> Any:
            return SPA(self.head.parameters(), lr=ETA0, c=C0)

    return WithBackbone()


def test_backbone_finetuning_owns_the_lr_momentum_off_writes_c_on_spa(package: ModuleType) -> None:
    """On SPA MomentumOff writes c only: BackboneFinetuning's per-epoch lr writes are accepted and kept."""
    finetuning = package.callbacks.BackboneFinetuning

    def run(callbacks: list[Any]) -> Any:
        return fit(package, _finetuning_module(package), [finetuning(unfreeze_backbone_at_epoch=1), *callbacks],
                   max_epochs=4)[1]  # fmt: skip

    # the formula: no idle check (this regression's ratio is not idle at epoch 2, so the removal would wait)
    plain, removed = run([]), run([MomentumOff(after_epochs=2, guard=MomentumGuard(low=None, high=None))])
    assert removed.key("lr") == plain.key("lr")  # the finetuning callback's lr, untouched
    assert removed.key("c") == pytest.approx([removal_c(k, 2 * BATCHES, BATCHES) for k in range(4 * BATCHES)])
