"""The momentum guard in MomentumOff and MeasuredMomentumOff (issue 15 item 2; issue 17 item 6).

Problem: ``tests/guard_problem.py``: one stiff direction (curvature ``L``) and 32 flat noisy ones,
float64, 20 steps an epoch, momentum removed at step 100. At ``eta = 1, c = 0.1, L = 3``:
``2 < eta L = 3 < 2 (2 - c) / c = 38``, stable with momentum and not without (``THEORY.md``
section 10); at ``L = 0.5`` (``eta L < 2``) stable either way.
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
from guard_problem import X0, Stiff, loader
from multiprocess import run_script

from lightning_spa import SPA, GradualSchedule, MeasuredMomentumOff, MomentumGuard, MomentumOff
from lightning_spa._lightning import Callback

START, T = 100, 10  # the removal's first step and length
C0, ETA = 0.1, 1.0
F0 = 0.5 * 3.0 * X0**2  # the objective at the start (L = 3)
# At c = 1 the stiff coordinate doubles a step (|1 - eta L| = 2), so its part of ||g||^2 grows 4x a step:
# from the noise level it passes the 10 / (1 - 0.9) = 100x the reference that one reading needs within 12
# steps (4^12 > 1e7). Bound on the abort step, from the step where c reached 1:
ABORT_WITHIN = 12


class Record(Callback):
    """``(c, lr, momentum)`` of param group 0 as each optimizer step uses them (read right before it)."""

    def __init__(self) -> None:
        self.values: list[tuple[Any, float, Any]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.values.append((group.get("c"), float(group["lr"]), group.get("momentum")))


def fit(
    package: ModuleType, model: Stiff, callbacks: list[Any], epochs: int = 12, ckpt: str | None = None, **kw: Any
) -> Any:
    trainer = package.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **{"logger": False, **kw},
    )  # fmt: skip
    trainer.fit(model, loader(), ckpt_path=ckpt)
    return trainer


@pytest.fixture
def pl() -> ModuleType:
    import pytorch_lightning

    return pytorch_lightning


def guard_of(callback: Any) -> MomentumGuard:
    return callback._guards.guards[0]


def assert_c0_from(record: Record, step: int, optimizer: str) -> None:
    """From ``step`` on the optimizer uses ``c0`` again (torch SGD: ``lr = c0 eta``, then momentum ``1 - c0``)."""
    used = record.values[step:]
    if optimizer == "spa":
        assert all(c == C0 and lr == ETA for c, lr, _ in used)
    else:
        assert all(lr == pytest.approx(C0 * ETA, rel=1e-15) for _, lr, _ in used)
        assert used[0][2] == 0.0  # (1 - c_a) eta_a / eta at c_a = 1: the buffer is empty, no spike
        assert all(m == pytest.approx(1.0 - C0, rel=1e-15) for _, _, m in used[1:])


# ----- an unstable removal is aborted ----------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["spa", "sgd"])
@pytest.mark.parametrize("transition", [T, 0], ids=["gradual", "instant"])
def test_unstable_removal_is_aborted_and_c_restored(
    pl: ModuleType, optimizer: str, transition: int, caplog: pytest.LogCaptureFixture
) -> None:
    callback, record = MomentumOff(after_epochs=START, unit="step", transition_steps=transition), Record()
    model = Stiff(optimizer=optimizer)
    instant = pytest.warns(UserWarning, match="switches momentum off at once") if transition == 0 else nullcontext()
    with caplog.at_level("INFO"), instant:
        trainer = fit(pl, model, [callback, record])
    guard = guard_of(callback)
    assert len(guard.aborted_steps) == 1
    (aborted,) = guard.aborted_steps
    full = START + max(1, transition) - 1  # the first step at c = 1
    assert START <= aborted <= full + ABORT_WITHIN
    assert_c0_from(record, aborted + 1, optimizer)  # restored one step after the abort
    assert math.isfinite(model.objective()) and model.objective() < F0
    assert float(trainer.callback_metrics["spa/momentum_off_aborted"]) == aborted
    lines = [r.getMessage() for r in caplog.records if "Momentum removal aborted" in r.getMessage()]
    assert len(lines) == 1 and f"optimizer step {aborted}" in lines[0] and f"from step {aborted + 1}" in lines[0]


def test_without_the_guard_the_same_removal_diverges(pl: ModuleType) -> None:
    """The control: guard=False on the problem above ends with the stiff coordinate grown 2x a step."""
    model = Stiff()
    callback = MomentumOff(after_epochs=START, unit="step", transition_steps=T, guard=False)
    trainer = fit(pl, model, [callback])
    assert callback._guards is None and "spa/momentum_off_aborted" not in trainer.callback_metrics
    assert not model.objective() < 1e6 * F0


@pytest.mark.parametrize("optimizer", ["spa", "sgd"])
def test_measured_removal_is_aborted_and_c_restored(pl: ModuleType, optimizer: str) -> None:
    """The flat directions keep the ratio near 1 (idle by the ratio), while the stiff one needs momentum."""
    callback, record = MeasuredMomentumOff(warmup=START, patience=5, unit="step", transition_steps=T), Record()
    model = Stiff(optimizer=optimizer)
    trainer = fit(pl, model, [callback, record])
    decided = callback.decided_steps[0]
    assert decided is not None
    guard = guard_of(callback)
    assert guard.episodes[0][0] == decided + 1
    assert guard.reference is not None and guard.reference > 0  # from the decision window
    (aborted,) = guard.aborted_steps
    assert decided + 1 <= aborted <= decided + T + ABORT_WITHIN
    assert_c0_from(record, aborted + 1, optimizer)
    assert math.isfinite(model.objective()) and model.objective() < F0
    assert float(trainer.callback_metrics["spa/momentum_off_aborted"]) == aborted
    assert float(trainer.callback_metrics["spa/momentum_off_step"]) == decided + 1


class _GradSquares(Callback):
    """``||grad||^2`` of each optimizer step as ``on_before_optimizer_step`` sees it (before Lightning's clipping)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.values.append(sum(float(p.grad.double().square().sum()) for p in pl_module.parameters()))


@pytest.mark.parametrize("setup", ["plain", "clipped", "weight_decay"])
def test_measured_reference_is_the_gradient_before_clipping(pl: ModuleType, setup: str) -> None:
    """MeasuredMomentumOff's reference in the decision window is ``||grad||^2`` before clipping, smoothed over
    every 4th measured step: taken from the meter's reading where that is the same number ("plain"), from a norm
    of its own where the meter's ``g`` differs (clipped after the hook; ``+ wd x``)."""
    warmup, d = 3, MomentumGuard().ema_decay
    callback, squares = MeasuredMomentumOff(warmup=warmup, patience=10**6, unit="step"), _GradSquares()
    model = Stiff(L=0.5, weight_decay=0.1 if setup == "weight_decay" else 0.0)
    fit(pl, model, [callback, squares], epochs=3, gradient_clip_val=0.1 if setup == "clipped" else None)
    value = weight = 0.0
    for k in range(warmup, len(squares.values), 4):
        value, weight = d * value + (1 - d) * squares.values[k], d * weight + (1 - d)
    assert callback.decided_steps[0] is None
    assert guard_of(callback).reference == pytest.approx(value / weight, rel=1e-12)


# ----- a stable problem never aborts -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["MomentumOff", "MeasuredMomentumOff"])
@pytest.mark.parametrize("optimizer", ["spa", "sgd"])
def test_stable_removal_completes(pl: ModuleType, kind: str, optimizer: str) -> None:
    if kind == "MomentumOff":
        callback: Any = MomentumOff(after_epochs=START, unit="step", transition_steps=T)
    else:
        callback = MeasuredMomentumOff(warmup=START, patience=5, unit="step", transition_steps=T)
    record = Record()
    trainer = fit(pl, Stiff(L=0.5, optimizer=optimizer), [callback, record])
    guard = guard_of(callback)
    (start,) = [s for s, _ in guard.episodes]
    assert guard.aborted_steps == [] and guard.watch_end() < len(record.values)  # watched to the end
    done = start + T - 1
    if optimizer == "spa":
        assert all(c == 1.0 for c, _, _ in record.values[done:])
    else:
        # lr = c eta from step `done`, momentum (1 - c_{k-1}) eta_{k-1} / eta_k = 0 from the step after it
        assert all(lr == pytest.approx(ETA, rel=1e-15) for _, lr, _ in record.values[done:])
        assert all(m == 0.0 for _, _, m in record.values[done + 1 :])
    assert "spa/momentum_off_aborted" not in trainer.callback_metrics


class _InfAt(Stiff):
    """The stable problem (L = 0.5) with an inf loss, hence inf gradients, at one optimizer step."""

    def __init__(self, step: int) -> None:
        super().__init__(L=0.5)
        self.inf_step = step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if self.trainer.global_step == self.inf_step else loss


@pytest.mark.parametrize("amp", [True, False], ids=["16-mixed", "32"])
def test_a_non_finite_gradient_aborts_except_an_amp_overflow(pl: ModuleType, amp: bool) -> None:
    """Under 16-mixed the grad scaler skips the overflowing step: not the removal's doing, no abort. Without a
    scaler the inf gradient reaches the weights: the guard aborts at that step."""
    model, callback = _InfAt(START + 5), MomentumOff(after_epochs=START, unit="step", transition_steps=T)
    plugins = [pl.plugins.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if amp else []
    fit(pl, model, [callback], epochs=8, plugins=plugins)
    assert guard_of(callback).aborted_steps == ([] if amp else [START + 5])
    assert math.isfinite(model.objective()) == amp


# ----- retry -----------------------------------------------------------------------------------------


def test_retry_after_eta_has_fallen_by_the_factor(pl: ModuleType) -> None:
    """GradualSchedule('lr') divides eta by 10 over steps 160..184 (eta_{160+j} = 10^(-(j+1)/25)): the first
    step with eta <= 0.5 (retry_factor x eta at the abort, 1) is j = 7 (10^(-8/25) = 0.479 < 0.5 < 10^(-7/25)),
    i.e. step 167; the new removal starts R = 20 steps later, at 187, and completes (eta L = 0.3 < 2).
    The ||g||^2 watch alone (low=None, high=None: no idle check, which would postpone this toy's retry too)."""
    only_grad = MomentumGuard(low=None, high=None)
    callback, record = MomentumOff(after_epochs=START, unit="step", transition_steps=T, guard=only_grad), Record()
    decay = GradualSchedule(milestones=[160], factor=0.1, mode="lr", unit="step", transition_steps=25)
    model = Stiff()
    trainer = fit(pl, model, [callback, decay, record])
    guard = guard_of(callback)
    (aborted,) = guard.aborted_steps
    assert aborted < 160
    assert guard.episodes == [[START, aborted], [187, None]]
    assert all(c == C0 for c, _, _ in record.values[aborted + 1 : 187])
    assert all(c == 1.0 for c, _, _ in record.values[187 + T - 1 :])
    assert math.isfinite(model.objective()) and model.objective() < F0
    assert float(trainer.callback_metrics["spa/momentum_off_step"]) == 187
    assert float(trainer.callback_metrics["spa/momentum_off_aborted"]) == aborted


def test_no_retry_without_a_fall_of_eta(pl: ModuleType) -> None:
    callback = MomentumOff(after_epochs=START, unit="step", transition_steps=T, guard=MomentumGuard(retry_factor=0.05))
    decay = GradualSchedule(milestones=[160], factor=0.1, mode="lr", unit="step", transition_steps=25)
    fit(pl, Stiff(), [callback, decay])
    assert len(guard_of(callback).episodes) == 1  # eta fell 10x, not 20x


# ----- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cut_epochs", "optimizer"),
    [
        ("MomentumOff", 5, "spa"),
        ("MomentumOff", 6, "spa"),
        ("MomentumOff", 6, "sgd"),
        ("MeasuredMomentumOff", 7, "spa"),
    ],
    ids=["off-reference-done", "off-after-abort", "off-after-abort-sgd", "measured-after-abort"],
)
def test_resume_across_an_abort_is_bit_exact(
    package: ModuleType, tmp_path: Path, kind: str, cut_epochs: int, optimizer: str
) -> None:
    """A cut at step 100 (reference measured, watch not begun) or after the abort (115 / 125): the resumed run
    ends on the uninterrupted run's weights bit for bit, with the same c at every step and the same
    callback_metrics."""

    def make() -> tuple[Any, Record]:
        if kind == "MomentumOff":
            return MomentumOff(after_epochs=START, unit="step", transition_steps=T), Record()
        return MeasuredMomentumOff(warmup=START, patience=5, unit="step", transition_steps=T), Record()

    callback, record = make()
    reference = Stiff(optimizer=optimizer)
    full = fit(package, reference, [callback, record])
    aborted = guard_of(callback).aborted_steps
    assert len(aborted) == 1
    first_cb, first_rec = make()
    trainer = fit(package, Stiff(optimizer=optimizer), [first_cb, first_rec], epochs=cut_epochs)
    assert guard_of(first_cb).aborted_steps == (aborted if aborted[0] < 20 * cut_epochs else [])
    path = str(tmp_path / "cut.ckpt")
    trainer.save_checkpoint(path)
    resumed_cb, resumed_rec = make()
    resumed = Stiff(optimizer=optimizer)
    again = fit(package, resumed, [resumed_cb, resumed_rec], ckpt=path)
    assert guard_of(resumed_cb).state_dict() == guard_of(callback).state_dict()
    assert first_rec.values + resumed_rec.values == record.values
    assert torch.equal(resumed.x, reference.x)
    for key in ("spa/momentum_off_aborted", "spa/momentum_off_step"):
        assert (key in again.callback_metrics) == (key in full.callback_metrics), key
        if key in full.callback_metrics:
            assert float(again.callback_metrics[key]) == float(full.callback_metrics[key])


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
def test_callback_metrics_hold_the_decision_after_a_resume(package: ModuleType, tmp_path: Path, guard: bool) -> None:
    """Issue 17 item 6: resumed past the decision, spa/momentum_off_step is in callback_metrics again (and
    spa/momentum_off_aborted when the guard aborted), so a ModelCheckpoint or EarlyStopping monitor finds it."""
    callback = MeasuredMomentumOff(warmup=START, patience=5, unit="step", transition_steps=T, guard=guard)
    trainer = fit(package, Stiff(), [callback], epochs=7)
    decided = callback.decided_steps[0]
    assert decided is not None and float(trainer.callback_metrics["spa/momentum_off_step"]) == decided + 1
    path = str(tmp_path / "cut.ckpt")
    trainer.save_checkpoint(path)
    resumed = MeasuredMomentumOff(warmup=START, patience=5, unit="step", transition_steps=T, guard=guard)
    again = fit(package, Stiff(), [resumed], epochs=8, ckpt=path)
    assert float(again.callback_metrics["spa/momentum_off_step"]) == decided + 1
    if guard:
        assert float(again.callback_metrics["spa/momentum_off_aborted"]) == guard_of(callback).aborted_steps[0]


def test_logged_through_the_loggers(pl: ModuleType, tmp_path: Path) -> None:
    only_grad = MomentumGuard(low=None, high=None)  # the ||g||^2 abort, then the retry
    callback = MomentumOff(after_epochs=START, unit="step", transition_steps=T, guard=only_grad)
    decay = GradualSchedule(milestones=[160], factor=0.1, mode="lr", unit="step", transition_steps=25)
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    fit(pl, Stiff(), [callback, decay], logger=logger, log_every_n_steps=1)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    aborted = [(int(r["step"]), float(r["spa/momentum_off_aborted"])) for r in rows if r["spa/momentum_off_aborted"]]
    retried = [(int(r["step"]), float(r["spa/momentum_off_step"])) for r in rows if r["spa/momentum_off_step"]]
    (a,) = guard_of(callback).aborted_steps
    assert aborted == [(a, float(a))]
    assert retried == [(167, 187.0)]


# ----- arguments, checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MomentumOff, MeasuredMomentumOff])
def test_guard_argument_is_validated(cls: type) -> None:
    with pytest.raises(ValueError, match=r"`guard` must be True .*False .*MomentumGuard"):
        cls(guard="yes")
    assert cls(guard=False)._guards is None
    custom = MomentumGuard(factor=3.0)
    assert cls(guard=custom).guard is custom


def test_guard_state_is_in_the_checkpoint(pl: ModuleType) -> None:
    callback = MomentumOff(after_epochs=START, unit="step", transition_steps=T)
    fit(pl, Stiff(), [callback])
    state = callback.state_dict()
    assert state["guards"]["0"] == guard_of(callback).state_dict()
    json.dumps(state["guards"])  # plain values


# ----- DDP -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_ddp_ranks_abort_at_the_same_step(tmp_path: Path) -> None:
    """Each rank reads its own batch; DDP averages the gradients, so both ranks read the same ||g||^2."""
    script = Path(__file__).with_name("guard_problem.py")
    run_script(
        [str(script), str(tmp_path), "spa"], cwd=tmp_path, what="the DDP run", extra_env={"OMP_NUM_THREADS": "1"}
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["aborted"]) == 1
    assert ranks[0]["episodes"] == ranks[1]["episodes"]
    assert ranks[0]["x"] == ranks[1]["x"]
    assert all(r["metric"] == ranks[0]["aborted"][0] for r in ranks)
    assert math.isfinite(ranks[0]["objective"]) and ranks[0]["objective"] < F0


# ----- LightningCLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guard", "expected"),
    [
        ("false", None),
        ("{class_path: lightning_spa.MomentumGuard, init_args: {factor: 20, retry_factor: null}}", (20.0, None)),
    ],
    ids=["off", "custom"],
)
def test_guard_from_a_lightning_cli_yaml(tmp_path: Path, guard: str, expected: tuple[float, None] | None) -> None:
    from pytorch_lightning.cli import LightningCLI

    from lightning_spa.demos.digits import DigitsCNN, DigitsDataModule

    config = tmp_path / "config.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "model: {channels: 4, optimizer: {class_path: lightning_spa.SPA, init_args: {lr: 0.1, c: 0.5}}}\n"
        "trainer:\n  accelerator: cpu\n  max_steps: 4\n  limit_val_batches: 0\n  num_sanity_val_steps: 0\n"
        "  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n  enable_model_summary: false\n"
        "  callbacks:\n    - class_path: lightning_spa.MomentumOff\n"
        f"      init_args: {{after_epochs: 2, transition_steps: 2, unit: step, guard: {guard}}}\n"
    )
    cli = LightningCLI(
        DigitsCNN,
        DigitsDataModule,
        args=["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)],
        save_config_kwargs={"overwrite": True},
    )
    (off,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MomentumOff)]
    if expected is None:
        assert off.guard is None
    else:
        assert isinstance(off.guard, MomentumGuard) and (off.guard.factor, off.guard.retry_factor) == expected
        assert guard_of(off).episodes == [[2, None]]
    assert cli.trainer.optimizers[0].param_groups[0]["c"] == 1.0


def test_grad_square_norm_fallback_matches_the_dense_sum() -> None:
    """A sparse gradient takes the meter's per-group path; both paths give sum ||g||^2 over the parameters."""
    from lightning_spa.callbacks._guard import grad_square_norm

    dense = torch.nn.Parameter(torch.arange(6, dtype=torch.float64).reshape(2, 3))
    emb = torch.nn.Embedding(5, 2, sparse=True, dtype=torch.float64)
    dense.grad = torch.full_like(dense, 2.0)
    emb(torch.tensor([1, 3, 3])).sum().backward()  # rows 1 (once) and 3 (twice): ||g||^2 = 2 * 1 + 2 * 4
    opt = SPA([{"params": [dense]}, {"params": list(emb.parameters())}], lr=0.1, c=0.5)
    assert float(grad_square_norm(opt, sharded=False)) == pytest.approx(6 * 4.0 + 2 * 1.0 + 2 * 4.0, rel=1e-12)
    emb.weight.grad = None
    assert float(grad_square_norm(opt, sharded=False)) == pytest.approx(24.0, rel=1e-12)  # the foreach path
