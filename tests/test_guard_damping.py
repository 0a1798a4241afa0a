"""The guard's idle check (``lightning_spa.guard`` item 5): MomentumOff postpones a removal where momentum damps.

A noisy quadratic (``tests/measured_off_problem.py``) at ``eta h = 4``, ``c = 0.2``: stable with momentum
(``eta h < 2 (2 - c) / c = 18``), not without (``eta h < 2``); its stationary ratio is
``1 / (1 + (1 - c) eta h / (2 - c)) = 0.36`` (``THEORY.md`` section 10), below ``low = 0.9``. Pure noise
(``h = 0``) reads 1: momentum is idle there and the removal goes ahead.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from measured_off_problem import Objective, loader

from lightning_spa import SPA, MomentumGuard, MomentumOff
from lightning_spa._lightning import LightningModule

START, T, STEPS = 40, 10, 80
DAMPING = {"dim": 200, "h": 1.0, "noise": 1.0, "eta": 4.0, "c": 0.2}
IDLE = {"dim": 2000, "h": 0.0, "noise": 1.0, "eta": 0.5, "c": 0.2}


class Record(pl.Callback):
    """``c`` as each step uses it (torch SGD: ``lr / eta``, since ``lr = c eta`` in Theorem 1)."""

    def __init__(self) -> None:
        self.c: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.c.append(float(group["c"]) if "c" in group else float(group["lr"]) / pl_module.eta)


def fit(model: Objective, callbacks: list[Any], steps: int = STEPS, ckpt: str | None = None) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(model, loader(STEPS), ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("optimizer", ["spa", "sgd"])
def test_damping_postpones_the_removal(optimizer: str, caplog: pytest.LogCaptureFixture) -> None:
    callback, record = MomentumOff(after_epochs=START, unit="step", transition_steps=T), Record()
    model = Objective(**DAMPING, optimizer=optimizer)  # type: ignore[arg-type]
    with caplog.at_level("INFO"):
        trainer = fit(model, [callback, record])
    guard = callback._guards.guards[0]  # type: ignore[union-attr]
    assert guard.start_ratio is not None and guard.start_ratio < 0.9
    assert guard.aborted_steps == [START]  # postponed at the planned start, never retried (eta is constant)
    assert record.c[START + 1 :] == pytest.approx([0.2] * (STEPS - START - 1))  # c back at c0 from START + 1
    assert float(trainer.callback_metrics["spa/momentum_off_aborted"]) == START
    assert any("Momentum removal postponed" in r.getMessage() for r in caplog.records)
    assert math.isfinite(float(model.w.detach().abs().max()))


def test_without_the_check_the_same_removal_goes_ahead() -> None:
    """low=None, high=None: the removal starts (only ||g||^2 is watched), so c leaves c0 after START."""
    only_grad = MomentumGuard(low=None, high=None)
    callback = MomentumOff(after_epochs=START, unit="step", transition_steps=T, guard=only_grad)
    record = Record()
    fit(Objective(**DAMPING), [callback, record], steps=START + 3)  # type: ignore[arg-type]
    assert record.c[START + 1] > 0.2


def test_idle_momentum_is_removed() -> None:
    callback, record = MomentumOff(after_epochs=START, unit="step", transition_steps=T), Record()
    fit(Objective(**IDLE), [callback, record])  # type: ignore[arg-type]
    guard = callback._guards.guards[0]  # type: ignore[union-attr]
    assert guard.start_ratio is not None and 0.9 <= guard.start_ratio
    assert guard.aborted_steps == []
    assert record.c[START + T - 1 :] == [1.0] * (STEPS - START - T + 1)


# Every batch is the same zeros (the noise comes from the step): where the loader restarts does not matter.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_inside_the_reference_window_is_bit_exact(tmp_path: Any) -> None:
    """The ratio meter's EMA is saved: a checkpoint in the middle of the reference window decides the same."""
    straight = Objective(**DAMPING)  # type: ignore[arg-type]
    fit(straight, [MomentumOff(after_epochs=START, unit="step", transition_steps=T)])
    first = Objective(**DAMPING)  # type: ignore[arg-type]
    trainer = fit(first, [MomentumOff(after_epochs=START, unit="step", transition_steps=T)], steps=START - 8)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Objective(**DAMPING)  # type: ignore[arg-type]
    callback = MomentumOff(after_epochs=START, unit="step", transition_steps=T)
    fit(resumed, [callback], ckpt=str(tmp_path / "mid.ckpt"))
    assert callback._guards.guards[0].aborted_steps == [START]  # type: ignore[union-attr]
    assert torch.equal(resumed.w, straight.w)


def test_pure_rule() -> None:
    guard = MomentumGuard().bind(transition_steps=T, watch_steps=5)
    guard.plan(START)
    guard.observe_ratio(START - 21, 0.1)  # before the reference window: ignored
    assert guard.start_ratio is None
    guard.observe_ratio(START - 1, 0.95)
    assert not guard.check_start(START, eta=1.0)  # idle: goes ahead
    damped = MomentumGuard().bind(transition_steps=T, watch_steps=5)
    damped.plan(START)
    damped.observe_ratio(START - 2, 0.5)
    assert not damped.check_start(START - 1, eta=1.0)  # only at the planned start
    assert damped.check_start(START, eta=1.0) and damped.aborted_steps == [START]
    assert damped.retry_due(START + 5, eta=0.5) and damped.start_ratio is None  # a fresh window for the retry
    restored = MomentumGuard().bind(transition_steps=T, watch_steps=5)
    restored.load_state_dict(damped.state_dict())
    assert restored.state_dict() == damped.state_dict()
    with pytest.raises(ValueError, match="`low` must be in"):
        MomentumGuard(low=1.5)
    with pytest.raises(ValueError, match="`high` must be in"):
        MomentumGuard(high=0.5)
    aligned = MomentumGuard().bind(transition_steps=T, watch_steps=5)
    aligned.plan(START)
    aligned.observe_ratio(START - 1, 1.7)  # momentum accelerates: postponed too
    assert aligned.check_start(START, eta=1.0)
    unbounded = MomentumGuard(high=None).bind(transition_steps=T, watch_steps=5)
    unbounded.plan(START)
    unbounded.observe_ratio(START - 1, 1.7)
    assert not unbounded.check_start(START, eta=1.0)


class _TwoObjectives(LightningModule):
    """Manual optimization over two SPA optimizers: the damping quadratic and pure noise, each with its own noise."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.specs = [DAMPING, IDLE]
        gen = torch.Generator().manual_seed(0)
        self.targets = [torch.randn(int(s["dim"]), generator=gen, dtype=torch.float64) for s in self.specs]
        self.ws = torch.nn.ParameterList(
            [torch.nn.Parameter(t + torch.randn(t.shape, generator=gen, dtype=torch.float64)) for t in self.targets]
        )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        for i, (opt, spec) in enumerate(zip(self.optimizers(), self.specs, strict=True)):
            w = self.ws[i]
            xi = torch.randn(
                w.shape, generator=torch.Generator().manual_seed(1000 * i + batch_idx), dtype=torch.float64
            )
            loss = 0.5 * spec["h"] * (w - self.targets[i]).square().sum() + spec["noise"] * (w * xi).sum()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [SPA([w], lr=s["eta"], c=s["c"]) for w, s in zip(self.ws, self.specs, strict=True)]


def test_two_optimizers_each_checked_on_its_own_ratio(package: ModuleType) -> None:
    """One MomentumOff over two optimizers (manual optimization), under either Lightning package: the damping one is
    postponed at its start and keeps c0, the idle one loses its momentum; the abort is logged with its suffix."""
    callback = MomentumOff(after_epochs=START, unit="step", transition_steps=T)
    trainer = package.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = _TwoObjectives()
    trainer.fit(model, loader(STEPS))
    damping, idle = (callback._guards.guards[i] for i in (0, 1))  # type: ignore[union-attr]
    assert damping.start_ratio is not None and damping.start_ratio < 0.9 and damping.aborted_steps == [START]
    assert idle.start_ratio is not None and 0.9 <= idle.start_ratio and idle.aborted_steps == []
    damping_c, idle_c = (float(opt.param_groups[0]["c"]) for opt in trainer.optimizers)
    assert (damping_c, idle_c) == (0.2, 1.0)
    assert float(trainer.callback_metrics["spa/momentum_off_aborted/opt0"]) == START
    assert "spa/momentum_off_aborted/opt1" not in trainer.callback_metrics
    assert all(math.isfinite(float(w.detach().abs().max())) for w in model.ws)
