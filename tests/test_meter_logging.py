"""What the diagnostics log: the Theorem-1 momentum of each step (issue 16 item 5) and the trainer's
step axis for every optimizer's ``spa/*`` series (issue 17 item 3), under both Lightning packages."""

from __future__ import annotations

import functools
import importlib
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from test_diagnostics import read_scalars
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA, MeasuredMomentumOff, MomentumDiagnostics
from lightning_spa.meter import MomentumMeter
from lightning_spa.optim import SPASpikeWarning

DIM = 16


def noise(k: int, which: int = 0) -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(1000 * which + k))


@functools.cache
def modules(package_name: str) -> Any:
    L = importlib.import_module(package_name)

    class Drop(L.LightningModule):
        """SPA(eta 1, c 0.1); eta 10x down at once before step 5 (a LambdaLR stepped per step)."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((DIM,), 3.0))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return (self.w * noise(batch_idx)).sum()

        def configure_optimizers(self) -> Any:
            opt = SPA(self.parameters(), lr=1.0, c=0.1)
            drop = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < 5 else 0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": drop, "interval": "step"}}

    class TwoClocks(L.LightningModule):
        """Manual optimization: optimizer 0 steps every batch, optimizer 1 every second batch."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.g = torch.nn.Parameter(torch.full((DIM,), 3.0))
            self.d = torch.nn.Parameter(torch.full((DIM,), -1.0))

        def training_step(self, batch: Any, batch_idx: int) -> None:
            first, second = self.optimizers()
            loss = (self.g * noise(batch_idx)).sum()
            self.manual_backward(loss)
            first.step()
            first.zero_grad()
            if batch_idx % 2 == 1:
                self.manual_backward((self.d * noise(batch_idx, 1)).sum())
                second.step()
                second.zero_grad()
            self.log("train_loss", loss)

        def configure_optimizers(self) -> Any:
            return [SPA([self.g], lr=1.0, c=0.1), SPA([self.d], lr=2.0, c=0.5)]

    return L, Drop, TwoClocks


def _fit(
    package: ModuleType, tmp_path: Path, model: Any, batches: int, callbacks: list[Any]
) -> dict[str, dict[int, float]]:
    trainer = package.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=callbacks, log_every_n_steps=1,
        logger=package.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(batches, 1)), batch_size=1))
    return read_scalars(tmp_path / "run" / "version_0")


def test_logged_momentum_after_an_instant_drop_is_theorem_1(package: ModuleType, tmp_path: Path) -> None:
    # (1 - c_{k-1}) eta_{k-1} / eta_k: 0.9 while eta is constant, 9 at the drop step, then 0.9 again
    # (not the buffer scale over eta, which decays 9, 8.1, 7.29, ...).
    _, Drop, _ = modules(package.__name__)
    with pytest.warns(SPASpikeWarning, match="eta fell to 0.1"):
        s = _fit(package, tmp_path, Drop(), 10, [MomentumDiagnostics(every_n_steps=1, ema_decay=0.0)])
    momentum = [s["spa/momentum"][k] for k in range(10)]
    assert momentum == pytest.approx([0.9] * 5 + [9.0] + [0.9] * 4, rel=1e-6)
    assert [s["spa/eta"][k] for k in (4, 5)] == pytest.approx([1.0, 0.1], rel=1e-6)
    assert s["spa/lr"][5] == pytest.approx(0.01, rel=1e-6)  # alpha = c eta


def test_meter_momentum_is_theorem_1_through_a_one_cycle_and_a_resume() -> None:
    # OneCycleLR on SPA's eta (no momentum cycling): eta falls ~1e4x in its last phase, faster than
    # 1 - c per step at the end. Every step's momentum is (1 - c) eta_{k-1} / eta_k of the etas the
    # steps used, also for the first step after the meter's state moved to a new meter (a resume).
    w = torch.nn.Parameter(torch.full((DIM,), 3.0, dtype=torch.float64))
    opt = SPA([w], lr=0.1, c=0.1)
    total = 60
    cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, cycle_momentum=False)
    meter = MomentumMeter(opt, every_n_steps=1, ema_decay=0.0, cosine_every_n_steps=None).attach()
    readings = []
    for k in range(total):
        if k == 30:  # a resume: the new meter gets the old one's state, including the last step's (eta, c)
            resumed = MomentumMeter(opt, every_n_steps=1, ema_decay=0.0, cosine_every_n_steps=None)
            resumed.load_state_dict(meter.state_dict())
            meter.detach()
            meter = resumed.attach()
        w.grad = noise(k).double()
        meter.before_step()
        opt.step()
        if k < total - 1:
            cycle.step()
        assert meter.latest is not None and meter.latest.step == k
        readings.append(meter.latest.hypers[0])
    etas = [h.eta for h in readings]
    assert readings[0].momentum == pytest.approx(0.9)  # step 0: 1 - c_0
    for k in range(1, total):
        assert readings[k].momentum == pytest.approx(0.9 * etas[k - 1] / etas[k], rel=1e-12), k
    assert readings[-1].momentum > 10 and etas[-1] < etas[-2] * 0.9 / 10  # the end: far faster than 1 - c


def test_spa_series_of_two_optimizers_are_on_the_trainer_step_axis(package: ModuleType, tmp_path: Path) -> None:
    # Manual optimization, optimizer 1 stepping on odd batches only: each optimizer's spa/* series is
    # logged at the batch it was measured in, the step train_loss gets, not at the optimizer's own count.
    _, _, TwoClocks = modules(package.__name__)
    off = MeasuredMomentumOff(warmup=0, patience=10**6, unit="step", log_ratio=True, transition_steps=4)
    s = _fit(package, tmp_path, TwoClocks(), 12, [MomentumDiagnostics(every_n_steps=1, ema_decay=0.0), off])
    loss_steps = set(s["train_loss"])
    assert loss_steps == set(range(12))
    assert set(s["spa/ratio/opt0"]) == set(range(12))
    odd = {1, 3, 5, 7, 9, 11}
    for tag in ("spa/ratio/opt1", "spa/step_sq/opt1", "spa/eta/opt1", "spa/off_ratio/opt1"):
        assert set(s[tag]) == odd, tag
    assert all(set(s[tag]) <= loss_steps for tag in s if tag.startswith("spa/"))
    # the values are optimizer 1's own: its step j (batch 2j + 1) is its first measurement at j = 0
    assert s["spa/ratio/opt1"][1] == pytest.approx(0.5 * 1.5, rel=1e-6)  # c (2 - c), no momentum yet
    assert all(math.isfinite(v) for tag in s.values() for v in tag.values())
