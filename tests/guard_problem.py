"""The problem of the momentum-guard tests, and a script for the 2-process DDP check.

Usage: python tests/guard_problem.py OUT_DIR {spa,sgd}   (2 ranks, CPU, gloo)

``Stiff`` minimises, over one float64 vector ``x`` of ``1 + flat`` entries,

    f(x; n) = 0.5 * L * (x_0 - s * n_0)^2 + <x_{1:}, n_{1:}>

for a data sample ``n ~ N(0, I)``: one direction of curvature ``L``, and ``flat`` directions of pure
noise (they keep ``||g||^2`` at a positive level, about ``flat``, and the alignment ratio near 1).
Heavy ball with ``alpha = c eta``, ``beta = 1 - c`` is stable in the stiff direction iff
``eta L < 2 (2 - c) / c`` (38 at ``c = 0.1``), plain SGD iff ``eta L < 2`` (``THEORY.md`` section
10): at ``eta = 1, L = 3`` momentum is what keeps the run stable, and once ``c > 4 / (eta L + 2) =
0.8`` the stiff coordinate grows (by ``|1 - eta L| = 2`` a step at ``c = 1``). The expected loss,
up to a constant, is ``0.5 * L * x_0^2`` (:meth:`Stiff.objective`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa._lightning import LightningModule

FLAT = 32
X0 = 5.0


class Stiff(LightningModule):
    def __init__(
        self, L: float = 3.0, eta: float = 1.0, c: float = 0.1, optimizer: str = "spa", weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.L, self.eta, self.c, self.optimizer_name = L, eta, c, optimizer
        self.weight_decay = weight_decay
        start = torch.zeros(1 + FLAT, dtype=torch.float64)
        start[0] = X0
        self.x = torch.nn.Parameter(start)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (n,) = batch
        n = n.mean(0)
        return 0.5 * self.L * (self.x[0] - 0.1 * n[0]).square() + (self.x[1:] * n[1:]).sum()

    def objective(self) -> float:
        return 0.5 * self.L * float(self.x.detach()[0]) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from lightning_spa import SPA

        if self.optimizer_name == "spa":
            return SPA([self.x], lr=self.eta, c=self.c, weight_decay=self.weight_decay)
        return torch.optim.SGD([self.x], lr=self.c * self.eta, momentum=1.0 - self.c, weight_decay=self.weight_decay)


def loader(batches: int = 20, batch_size: int = 1) -> DataLoader:
    """``batches`` batches an epoch, the same every epoch (no shuffling: an epoch-boundary resume is exact)."""
    data = torch.randn(batches * batch_size, 1 + FLAT, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return DataLoader(TensorDataset(data), batch_size=batch_size)


def main() -> None:
    """2-rank DDP: MomentumOff at step 100 on the unstable problem; each rank writes its guard's aborts."""
    import pytorch_lightning as pl

    from lightning_spa import MomentumOff

    out, optimizer = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    callback = MomentumOff(after_epochs=100, unit="step", transition_steps=10)
    model = Stiff(optimizer=optimizer)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=8, callbacks=[callback], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, loader(40))  # 40 samples: 20 batches a rank, one a rank per step
    guard = callback._guards.guards[0]  # type: ignore[union-attr]
    result = {
        "aborted": guard.aborted_steps,
        "episodes": guard.episodes,
        "objective": model.objective(),
        "x": model.x.detach().tolist(),
        "metric": float(trainer.callback_metrics["spa/momentum_off_aborted"]),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from multiprocess import end_ranks

    main()
    end_ranks()
