"""Switching a Lightning project from SGD to SPA: a checkpoint of the SGD run, resumed with SPA,
continues the SGD trajectory (the optimizer state converts through Theorem 1 on load)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA

pl = pytest.importorskip("pytorch_lightning")


class _Regression(pl.LightningModule):
    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.form = form

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.form == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        return SPA(self.parameters(), lr=0.5, c=0.1, weight_decay=1e-3)  # values come from the checkpoint


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, dtype=torch.float64, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)


def _fit(form: str, max_steps: int, tmp_path, ckpt_path=None) -> _Regression:
    model = _Regression(form)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    if ckpt_path is None:
        trainer.save_checkpoint(tmp_path / f"{form}-{max_steps}.ckpt")
    return model


def test_sgd_checkpoint_resumed_with_spa_continues_the_sgd_run(tmp_path):
    _fit("sgd", 8, tmp_path)  # one epoch of 8 batches: a checkpoint at the epoch's end resumes cleanly
    ckpt = tmp_path / "sgd-8.ckpt"
    sgd_run = _fit("sgd", 14, tmp_path, ckpt_path=ckpt)
    with pytest.warns(UserWarning, match="converted by Theorem 1"):
        spa_run = _fit("spa", 14, tmp_path, ckpt_path=ckpt)
    for p, q in zip(sgd_run.parameters(), spa_run.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    moved = [not torch.equal(p, q) for p, q in zip(sgd_run.parameters(), _Regression("sgd").parameters(), strict=True)]
    assert all(moved)
