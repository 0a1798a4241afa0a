"""Problems for the MeasuredMomentumOff tests, and a script for the 2-process DDP check.

Usage: python tests/measured_off_problem.py {single,ddp,fsdp} OUT_DIR [{measured,off}]

``measured`` (default): ``MeasuredMomentumOff``; ``off``: ``MomentumOff`` at step 40 with its guard.

``Objective`` minimises ``0.5 * h * ||W - T||^2 + noise * <W, xi_k>`` over one float64 vector
``W`` of ``dim`` entries; ``xi_k`` is a standard normal vector seeded by the optimizer step, so
every DDP rank gets the same gradient and a resumed run the same noise. Under FSDP2 (``fsdp=True``:
``fully_shard`` through ``ModelParallelStrategy``) ``W`` is a DTensor sharded over the ranks.

- ``h = 0``: pure noise, the gradient does not depend on ``W``: the ratio is 1 in expectation
  (``THEORY.md`` section 4); with ``dim = 4000`` its sampling noise is a few percent.
- ``noise = 0``: a deterministic quadratic; with ``eta * h`` small the step follows the slowly
  turning gradient, ``||x_{k+1} - x_k|| ~ eta ||g||``, so the ratio tends to ``(2 - c) / c``.
- both: the ratio is high while ``W`` is far from ``T``, then falls to the noise level.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Objective(pl.LightningModule):
    def __init__(
        self, dim: int = 4000, h: float = 0.0, noise: float = 1.0, optimizer: str = "spa", eta: float = 0.1,
        c: float = 0.2, offset: float = 0.0, fsdp: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.fsdp = fsdp
        self.h, self.noise, self.optimizer_name, self.eta, self.c = h, noise, optimizer, eta, c
        gen = torch.Generator().manual_seed(0)
        self.target = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.w = torch.nn.Parameter(self.target + offset + torch.randn(dim, generator=gen, dtype=torch.float64))

    def configure_model(self) -> None:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        xi = torch.randn(self.w.shape, generator=torch.Generator().manual_seed(1000 + self.global_step),
                         dtype=torch.float64)  # fmt: skip
        target = self.target
        if self.fsdp:  # the module's forward is not used: work on the DTensor shards explicitly
            from torch.distributed.tensor import distribute_tensor

            target = distribute_tensor(target, self.w.device_mesh, self.w.placements)
            xi = distribute_tensor(xi, self.w.device_mesh, self.w.placements)
            loss = 0.5 * self.h * (self.w - target).square().sum() + self.noise * (self.w * xi).sum()
            return loss.full_tensor()
        return 0.5 * self.h * (self.w - target).square().sum() + self.noise * (self.w * xi).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from lightning_spa import SPA

        if self.optimizer_name == "spa":
            return SPA([self.w], lr=self.eta, c=self.c)
        return torch.optim.SGD([self.w], lr=self.c * self.eta, momentum=1.0 - self.c)


def loader(steps: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)


MIXED = {"dim": 2000, "h": 1.0, "noise": 0.3, "eta": 0.2, "c": 0.2, "offset": 3.0}


def main() -> None:
    from lightning_spa import MomentumOff
    from lightning_spa.callbacks.measured import MeasuredMomentumOff

    mode, out = sys.argv[1], Path(sys.argv[2])
    which = sys.argv[3] if len(sys.argv) > 3 else "measured"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    callback: Any = (
        MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=8)
        if which == "measured"
        else MomentumOff(after_epochs=40, unit="step", transition_steps=8)
    )
    cs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            cs.append(float(trainer.optimizers[0].param_groups[0]["c"]))

    strategy: Any = {"single": "auto", "ddp": "ddp"}.get(mode)
    if mode == "fsdp":
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1 if mode == "single" else 2, strategy=strategy,
        max_steps=150, logger=False, callbacks=[callback, Record()], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    model = Objective(**MIXED, fsdp=mode == "fsdp")  # type: ignore[arg-type]
    trainer.fit(model, loader(300))
    w = model.w.detach()
    sharded = type(w).__name__ == "DTensor"
    full = w.full_tensor() if sharded else w  # type: ignore[attr-defined]
    guard = callback._guards.guards[0]
    result = {
        "decided": callback.decided_steps[0] if which == "measured" else None, "cs": cs, "w_sum": float(full.sum()),
        "sharded": sharded, "guard": guard.state_dict(), "guard_sharded": callback._guards._sharded[0],
    }  # fmt: skip
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from multiprocess import end_ranks

    main()
    end_ranks()
