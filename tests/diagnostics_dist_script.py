"""Trains a data-independent objective with MomentumDiagnostics; run by tests/test_diagnostics_distributed.py.

Usage: python tests/diagnostics_dist_script.py {single,ddp,fsdp} {spa,sgd} OUT_DIR [cheap]

``cheap``: ``MomentumDiagnostics(cosine_every_n_steps=None)``, the cheap measurement on every step.

The objective ``0.5 * ||W - T||^2 + <W, noise_k>`` (noise seeded by the step) gives every rank
the same gradient, so DDP and FSDP2 runs must log the single-process numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa.callbacks.diagnostics import MomentumDiagnostics
from lightning_spa.optim import SPA

STEPS = 30


class Objective(pl.LightningModule):
    def __init__(self, optimizer: str, fsdp: bool) -> None:
        super().__init__()
        self.optimizer_name, self.fsdp = optimizer, fsdp
        gen = torch.Generator().manual_seed(0)
        self.body = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.targets = [torch.randn(p.shape, generator=gen) for p in self.parameters()]

    def configure_model(self) -> None:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.body, mesh=mesh)
            fully_shard(self.head, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + self.global_step)
        loss = torch.zeros(())
        for p, t in zip(self.parameters(), self.targets, strict=True):
            full_shape = p.shape
            noise = torch.randn(full_shape, generator=gen)
            if self.fsdp:  # the module's forward is not used: unshard explicitly through a DTensor op
                from torch.distributed.tensor import distribute_tensor

                t_d = distribute_tensor(t, p.device_mesh, p.placements)
                n_d = distribute_tensor(noise, p.device_mesh, p.placements)
                loss = loss + (0.5 * (p - t_d).square().sum() + (p * n_d).sum()).full_tensor()
            else:
                loss = loss + 0.5 * (p - t).square().sum() + (p * noise).sum()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.body.parameters(), "name": "body"}, {"params": self.head.parameters()}]
        if self.optimizer_name == "spa":
            return SPA(groups, lr=0.05, c=0.2, weight_decay=0.01)
        return torch.optim.SGD(groups, lr=0.01, momentum=0.8, weight_decay=0.01)


def main() -> None:
    mode, optimizer, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cosine_every = None if sys.argv[4:] == ["cheap"] else 1
    strategy: object = "auto"
    devices = 1
    if mode == "ddp":
        strategy, devices = "ddp", 2
    elif mode == "fsdp":
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy, devices = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2
    model = Objective(optimizer, fsdp=mode == "fsdp")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,  # type: ignore[arg-type]
        max_steps=STEPS,
        logger=TensorBoardLogger(out, name="tb", version=0),
        callbacks=[
            diagnostics := MomentumDiagnostics(
                every_n_steps=1, per_group=True, ema_decay=0.9, cosine_every_n_steps=cosine_every
            )
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(4 * STEPS, 1)), batch_size=1))
    shards = [
        {"type": type(p).__name__, "full": list(p.shape), "local": list(getattr(p, "to_local", lambda p=p: p)().shape)}
        for p in model.parameters()
    ]
    (out / f"params_rank{trainer.global_rank}.json").write_text(json.dumps(shards))
    # What each rank holds: its optimizer clock and the monitor EarlyStopping/ModelCheckpoint read.
    rank = {"clock": diagnostics.meters[0].step, "ratio": float(trainer.callback_metrics["spa/ratio"])}
    (out / f"callback_rank{trainer.global_rank}.json").write_text(json.dumps(rank))


if __name__ == "__main__":
    from multiprocess import end_ranks

    main()
    end_ranks()
