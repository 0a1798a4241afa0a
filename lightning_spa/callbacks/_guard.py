r"""The Lightning side of :class:`~lightning_spa.guard.MomentumGuard`: feed it, report it, save it.

Layer: a thin adapter between the pure guard (:mod:`lightning_spa.guard`) and the callbacks that
remove momentum (:class:`~lightning_spa.callbacks.MomentumOff`,
:class:`~lightning_spa.callbacks.MeasuredMomentumOff`). One :class:`GuardRunner` per callback holds
one bound guard per optimizer; the callback calls :meth:`GuardRunner.before_step` from
``on_before_optimizer_step``, where the gradients are complete (averaged under DDP, unscaled under
AMP, not yet clipped).

The reading: ``||g||^2`` summed over the optimizer's gradients (:func:`grad_square_norm`), one
host sync per watched step (the reference window, the transition and ``watch_steps`` after it;
nothing otherwise). Under DDP every rank holds the same averaged gradient, so every rank reads
the same number and takes the same decision with no collective; under FSDP2 the shards' squares
are summed by one all-reduce of one number (:mod:`lightning_spa.distributed`) on a watched step (in
MeasuredMomentumOff's decision window, where the meter all-reduces already, the guard reads nothing
under FSDP2 and takes its reference from the first watched step). Under fp16 AMP a
non-finite gradient is the grad scaler's (it skips that step): it is not fed to the guard.

Logged on an abort (rank zero writes, every rank decides): ``spa/momentum_off_aborted`` = the
optimizer step of the abort (``c`` is back at its value before the removal from the next step),
through ``trainer.loggers`` and in ``trainer.callback_metrics``; on a retry
``spa/momentum_off_step`` = the first step of the new removal. ``/opt<i>`` is appended with several
optimizers. A console line (rank zero) for each.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_spa import _lightning as pl
from lightning_spa._lightning import PACKAGES, rank_zero_info
from lightning_spa.callbacks._adapter import OptimizerClock
from lightning_spa.diagnostics import measure_after_step, read_sums
from lightning_spa.distributed import has_sharded_params, local_tensor
from lightning_spa.guard import GuardedRemoval, MomentumGuard

__all__ = ["ABORTED", "GuardRunner", "check_guard", "grad_norms", "grad_square_norm", "square_sum"]

#: The logged name of an abort (``/opt<i>`` appended with several optimizers).
ABORTED = "spa/momentum_off_aborted"
#: The logged name of a removal's first step (also logged by MeasuredMomentumOff at its decision).
OFF_STEP = "spa/momentum_off_step"
#: ``watch_steps=None`` when the dataloader has no length (no epoch to take).
_WATCH_WITHOUT_EPOCHS = 100


def check_guard(guard: Any, owner: str) -> MomentumGuard | None:
    """Validates a callback's ``guard=`` argument: True (the defaults), False (off) or a MomentumGuard."""
    if isinstance(guard, MomentumGuard):
        return guard
    if guard is True:
        return MomentumGuard()
    if guard is False:
        return None
    raise ValueError(
        f"{owner}: `guard` must be True (the default guard), False (no guard) or a lightning_spa.MomentumGuard(...), "
        f"got {guard!r}."
    )


_GRAD, _IS_SPARSE = operator.attrgetter("grad"), operator.attrgetter("is_sparse")


@torch.no_grad()
def grad_norms(optimizer: Optimizer, sharded: bool) -> torch.Tensor:
    """A 1-dim tensor on the optimizer's device whose squares sum to ``||g||^2`` over every parameter of
    ``optimizer`` with a gradient (no host read; :func:`square_sum` reads it).

    The common case (one device, dense, not sharded) is one ``foreach`` norm: the tensors' norms.
    ``sharded``: the optimizer holds DTensor parameters (FSDP2); their local squares are summed
    across ranks with one all-reduce, which every rank must call at the same step.
    """
    grads = [g for group in optimizer.param_groups for g in map(_GRAD, group["params"]) if g is not None]
    if not sharded and grads and not any(map(_IS_SPARSE, grads)):
        device = grads[0].device
        if all(g.device == device for g in grads):  # the common case: one foreach norm
            return torch.stack(torch._foreach_norm(grads, 2))
    # DTensor, sparse or several devices: the meter's per-group sums (sharded parts all-reduced), read on the host
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = local_tensor(params[0]).device if params else torch.device("cpu")
    dtype = torch.float32 if device.type == "mps" else torch.float64
    tables, _ = read_sums([measure_after_step(optimizer, device, dtype)], sharded)
    return torch.tensor([math.sqrt(sum(tables[0]))], dtype=torch.float64)


def square_sum(norms: torch.Tensor) -> float:
    """``sum(norms^2)`` in float64 on the host (one device read)."""
    return sum(v * v for v in norms.tolist())


def grad_square_norm(optimizer: Optimizer, sharded: bool) -> float:
    """``||g||^2`` over every parameter of ``optimizer`` with a gradient, read on the host (:func:`grad_norms`)."""
    return square_sum(grad_norms(optimizer, sharded))


def clips_gradients(trainer: pl.Trainer) -> bool:
    """Whether Lightning may change the gradients after ``on_before_optimizer_step`` (its gradient clipping, in
    automatic optimization: ``gradient_clip_val`` set, or a ``configure_gradient_clipping`` of the module's own)."""
    module = trainer.lightning_module
    if not module.automatic_optimization:
        return False  # manual optimization: the user clips before optimizer.step(), so before the hook
    if trainer.gradient_clip_val:
        return True
    own = type(module).configure_gradient_clipping
    return all(own is not package.LightningModule.configure_gradient_clipping for _, package in PACKAGES)


def _retry_text(guard: MomentumGuard) -> str:
    """The console's word on what happens after an abort or a postponement."""
    if guard.retry_factor is None:
        return "No retry (retry_factor=None)."
    return (
        f"It is retried once eta falls to {guard.retry_factor:g} x its value now "
        f"({guard.retry_factor * (guard.eta_at_abort or 0.0):.4g}), e.g. after an LR milestone."
    )


class GuardRunner:
    """One callback's guards, one per optimizer (module docstring).

    Args:
        owner: the callback's name, for messages.
        template: the guard's parameters (:func:`check_guard`'s result).
    """

    def __init__(self, owner: str, template: MomentumGuard) -> None:
        self.owner, self.template = owner, template
        self.guards: dict[int, MomentumGuard] = {}
        self.removals: dict[int, GuardedRemoval] = {}
        self._loaded: dict[int, dict[str, Any]] = {}
        self._loggers: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._suffix = False
        self._amp_scaler = False
        self._sharded: dict[int, bool] = {}
        self._clipping = False
        self._pending: dict[int, tuple[int, torch.Tensor | None]] = {}  # per optimizer: (step, its norms)

    # ----- setup --------------------------------------------------------------------------
    def bind(self, index: int, transition_steps: int, steps_per_epoch: int, start: int | None) -> GuardedRemoval:
        """A fresh guard (the checkpoint's state if there is one) for optimizer ``index``; its schedule.

        ``start``: the removal's first step when known now (MomentumOff), None (MeasuredMomentumOff).
        """
        watch = steps_per_epoch if steps_per_epoch > 0 else _WATCH_WITHOUT_EPOCHS
        guard = self.template.bind(transition_steps, watch)
        if index in self._loaded:
            guard.load_state_dict(self._loaded.pop(index))
        elif start is not None:
            guard.plan(start)
        self.guards[index] = guard
        self.removals[index] = GuardedRemoval(guard)
        return self.removals[index]

    def rebind(self, index: int, transition_steps: int, steps_per_epoch: int, start: int) -> GuardedRemoval:
        """Optimizer ``index``'s removal re-timed (manual optimization: its own steps per epoch).

        The guard keeps its reference readings; a removal not aborted yet is planned anew at ``start``.
        """
        old = self.guards.get(index)
        removal = self.bind(index, transition_steps, steps_per_epoch, None if old is not None else start)
        if old is not None:
            guard = self.guards[index]
            guard.load_state_dict(old.state_dict())
            if not guard.aborted_steps:
                guard.episodes = []
                guard.plan(start)
        return removal

    def start_fit(self, trainer: pl.Trainer, clocks: dict[int, OptimizerClock]) -> None:
        self._trainer, self._loggers = trainer, list(trainer.loggers)
        self._suffix = len(clocks) > 1
        self._amp_scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        self._sharded = {
            i: has_sharded_params([p for g in c.optimizer.param_groups for p in g["params"]]) for i, c in clocks.items()
        }
        self._clipping = clips_gradients(trainer)
        self._pending = {}

    def end_fit(self) -> None:
        self._trainer, self._loggers, self._pending = None, [], {}

    # ----- reading ------------------------------------------------------------------------
    def _eta(self, clock: OptimizerClock) -> float:
        """``eta`` of the coming step of param group 0 (SPA: as written in the group, whoever wrote it)."""
        if clock.kind == "spa":
            lr = clock.optimizer.param_groups[0]["lr"]
            return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
        return clock.values(0, clock.steps)[0]

    def _read(self, index: int, clock: OptimizerClock) -> float | None:
        value = grad_square_norm(clock.optimizer, self._sharded.get(index, False))  # the host sync
        if self._amp_scaler and not math.isfinite(value):
            return None  # the scaler skips this step; it is not the removal's doing
        return value

    def before_step(self, index: int, clock: OptimizerClock) -> None:
        """From ``on_before_optimizer_step`` of optimizer ``index``: retry check, then the reading if wanted."""
        guard = self.guards.get(index)
        if guard is None or not guard.episodes:
            return  # no removal planned yet (MeasuredMomentumOff before its decision): nothing to retry or watch
        k = clock.steps  # the coming step
        if guard.aborted and guard.retry_due(k, self._eta(clock)):
            self._report_retry(index, k, guard)
        if k == guard.planned_start and guard.check_start(k, self._eta(clock)):  # momentum damps: postponed
            self._report_postponed(index, k, guard)
            return
        if not guard.needs(k):
            return
        value = self._read(index, clock)
        if value is not None and guard.observe(k, value, self._eta(clock)):
            self._report_abort(index, k, guard, value)

    def stash(self, index: int, clock: OptimizerClock) -> None:
        """Marks the coming step's ``||g||^2`` for the reference; :meth:`fold_stashed` folds it in after the step.

        Where the meter's reading of the step is the same number (no weight decay, whose ``wd x`` the
        meter's ``g`` holds, and no gradient clipping between this hook and the step:
        :func:`clips_gradients`), that reading is used and nothing is computed here; otherwise one
        ``foreach`` norm now, read after the meter's sync. Not with sharded parameters: the meter
        already all-reduces once on a measured step, and a second all-reduce is not worth a
        reference; the guard then takes the first reading of its watch (the gradient at the last
        iterate before the removal) as the reference.
        """
        if self._sharded.get(index, False):
            return
        groups = clock.optimizer.param_groups
        if self._clipping or any(group.get("weight_decay", 0.0) for group in groups):
            self._pending[index] = (clock.steps, grad_norms(clock.optimizer, False))
        else:
            self._pending[index] = (clock.steps, None)  # the meter's reading of the step

    def fold_stashed(self, index: int, step: int, eta: float, g_sq: float) -> None:
        """Folds the stashed reading of ``step`` into the guard's reference (MeasuredMomentumOff's decision window);
        ``g_sq`` is the meter's ``||g||^2`` of the step (:attr:`~lightning_spa.meter.Reading.g_sq`). A stash of
        another step (its reading never came: an AMP skip) is dropped."""
        stashed, pending = self._pending.pop(index, (None, None))
        guard = self.guards.get(index)
        if stashed != step or guard is None:
            return
        value = g_sq if pending is None else square_sum(pending)
        if math.isfinite(value):
            guard.observe(step, value, eta)

    # ----- reporting ----------------------------------------------------------------------
    def _log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)
        if self._trainer is not None:
            self._trainer.callback_metrics.update({key: torch.tensor(v) for key, v in metrics.items()})

    def _name(self, base: str, index: int) -> str:
        return f"{base}/opt{index}" if self._suffix else base

    def _report_abort(self, index: int, k: int, guard: MomentumGuard, value: float) -> None:
        self._log({self._name(ABORTED, index): float(k)}, k)
        ref = guard.reference
        why = (
            "is not finite"
            if not math.isfinite(value)
            else (
                f"smoothed to {guard.smoothed:.4g}, above {guard.factor:g} x its level before the removal ({ref:.4g})"
            )
        )
        rank_zero_info(
            f"{self.owner}: optimizer {index}: ||g||^2 at optimizer step {k} {why}: training destabilises without "
            f"momentum at this step size. Momentum removal aborted: c is back at its value before the removal from "
            f"step {k + 1}. {_retry_text(guard)}"
        )

    def _report_postponed(self, index: int, k: int, guard: MomentumGuard) -> None:
        self._log({self._name(ABORTED, index): float(k)}, k)
        ratio = guard.start_ratio if guard.start_ratio is not None else math.nan
        what = (
            f"below {guard.low:g}: momentum damps (the iterates oscillate or the gradients are anti-correlated)"
            if guard.low is not None and ratio < guard.low
            else f"above {guard.high:g}: momentum accelerates (the gradients align with it; early in training)"
        )
        rank_zero_info(
            f"{self.owner}: optimizer {index}: the smoothed alignment ratio before the removal is {ratio:.3g}, "
            f"{what}, and removing it at this eta is unsafe: momentum goes only where it is idle (THEORY.md "
            f"section 10). Momentum removal postponed: c is back at its value before the removal from step {k + 1}. "
            f"{_retry_text(guard)}"
        )

    def _report_retry(self, index: int, k: int, guard: MomentumGuard) -> None:
        start = guard.planned_start
        assert start is not None
        self._log({self._name(OFF_STEP, index): float(start)}, k)
        rank_zero_info(
            f"{self.owner}: optimizer {index}: eta has fallen to {guard.retry_factor:g} x its value at the abort: "
            f"momentum removal retried from optimizer step {start} (reference over steps {k}..{start - 1})."
        )

    def publish(self, trainer: pl.Trainer, off_steps: dict[int, int] | None = None) -> None:
        """Puts the values an uninterrupted run would hold into ``trainer.callback_metrics`` (after a resume).

        ``off_steps``: per optimizer, the ``spa/momentum_off_step`` the callback itself logged (its decision);
        a retry's start replaces it.
        """
        metrics: dict[str, float] = {}
        for index, step in (off_steps or {}).items():
            metrics[self._name(OFF_STEP, index)] = float(step)
        for index, guard in self.guards.items():
            if len(guard.episodes) > 1 or (off_steps and index in off_steps):
                start = guard.planned_start
                if start is not None:
                    metrics[self._name(OFF_STEP, index)] = float(start)
            if guard.aborted_steps:
                metrics[self._name(ABORTED, index)] = float(guard.aborted_steps[-1])
        trainer.callback_metrics.update({key: torch.tensor(v) for key, v in metrics.items()})

    # ----- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {str(i): g.state_dict() for i, g in self.guards.items()}

    def load_state_dict(self, state: dict[str, Any], in_fit: bool) -> None:
        loaded = {int(i): s for i, s in state.items()}
        if not in_fit:
            self._loaded = loaded
            return
        for index, guard_state in loaded.items():  # strategies that restore after setup: apply now
            if index in self.guards:
                self.guards[index].load_state_dict(guard_state)
