r"""MeasuredMomentumOff: momentum off once the alignment ratio says it is idle (Figures 2 + 3).

The measurement is :class:`~lightning_spa.meter.MomentumMeter`, the one behind
:class:`~lightning_spa.callbacks.MomentumDiagnostics` (same math, same bias-corrected EMA, the
all-reduced sums under FSDP2); the rule is :class:`~lightning_spa.decision.MomentumOffDecision`;
the switch is the schedule of :class:`~lightning_spa.callbacks.MomentumOff` (a geometric
``c -> 1`` with ``eta`` kept, composed with the other schedule callbacks by the optimizer's clock),
whose start is unknown until the rule decides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any, Literal

import torch

from lightning_spa import _lightning as pl
from lightning_spa._lightning import rank_zero_info, rank_zero_warn
from lightning_spa.callbacks._adapter import OptimizerClock
from lightning_spa.callbacks._guard import GuardRunner, check_guard
from lightning_spa.callbacks._schedule_base import SPAScheduleCallback, check_length, check_unit, to_steps
from lightning_spa.callbacks._select import OptimizerSelection
from lightning_spa.callbacks.diagnostics import log_step
from lightning_spa.decision import (
    DEFAULT_ETA_DROP,
    DEFAULT_HIGH,
    DEFAULT_LOW,
    MomentumOffDecision,
    check_band,
    check_eta_drop,
)
from lightning_spa.guard import GuardedRemoval, MomentumGuard
from lightning_spa.meter import MomentumMeter, Reading
from lightning_spa.schedule import MomentumRemoval

__all__ = ["MeasuredMomentumOff"]

# A decision taken with the smoothed ratio below this (inside a band widened by the user) warns: momentum was
# damping. From examples/reproduce/results/measured_off.md (5 digits seeds at SPA eta 1, one-sided rule: the one
# decided at 0.79 diverged once momentum was off; those decided at 0.89-0.96 did not).
_OSCILLATION = 0.9


# The guard's reference in the decision window: ||g||^2 of every 4th measured step (a level, not a trace: an EMA of
# 0.9 per reading then spans about 40 steps), a quarter of the cost of an extra norm on every measured step.
_REFERENCE_EVERY = 4


class _DecidedRemoval:
    """A :class:`~lightning_spa.schedule.MomentumRemoval` whose ``start`` is set when the rule decides.

    Before the decision it asks for nothing (``eta`` factor 1, ``c = c0``); after it, it is exactly
    ``MomentumRemoval(start, transition_steps)``, a pure function of the optimizer step, so a
    resumed run that restores ``start`` continues bit-exactly.

    With a guard (``guarded``), setting ``start`` plans the guard's removal there (unless its state,
    from a checkpoint, already has one) and the guard's schedule decides every step.
    """

    changes_eta = False  # on SPA only c is written: the lr stays free for an LR scheduler

    def __init__(self, transition_steps: int, guarded: GuardedRemoval | None = None) -> None:
        self.transition_steps = transition_steps
        self.guarded = guarded
        self._start: int | None = None

    @property
    def start(self) -> int | None:
        return self._start

    @start.setter
    def start(self, value: int | None) -> None:
        self._start = value
        if value is not None and self.guarded is not None and self.guarded.guard.planned_start is None:
            self.guarded.guard.plan(value)

    def eta_factor(self, k: int) -> float:
        return 1.0

    def c_value(self, k: int, c0: float, joined: int = 0) -> float:
        if self.guarded is not None:
            return self.guarded.c_value(k, c0, joined)
        if self.start is None:
            return c0
        return MomentumRemoval(self.start, self.transition_steps).c_value(k, c0, joined)

    def critical_steps(self) -> Iterable[int]:
        return ()  # eta never falls: the equivalent momentum stays at most 1 - c

    def __repr__(self) -> str:  # the clock orders schedules by repr; eta factor 1 makes the order irrelevant
        return f"MeasuredMomentumRemoval(transition_steps={self.transition_steps})"


def _check_amount(value: Any, name: str, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (in `unit`, epochs by default), got {value!r}.")
    if unit == "step" and float(value) != int(value):
        raise ValueError(f"`{name}` in optimizer steps (unit='step') must be an integer, got {value!r}.")
    return float(value)


class MeasuredMomentumOff(SPAScheduleCallback):
    r"""Turns momentum off when the measured alignment ratio says it is idle.

    The paper's Insight 1 (``THEORY.md`` sections 4 and 10): the smoothed ratio
    ``EMA(||x_{k+1}-x_k||^2) / EMA((c/(2-c)) eta^2 ||g_k||^2)`` reads

    - **above 1**: the gradients are aligned with the momentum buffer, momentum *accelerates*;
    - **near 1**: the gradients are noise uncorrelated with the past step, momentum is *idle*;
    - **below 1**: consecutive gradients are anti-correlated (oscillation across a valley, or batches
      drawn without replacement), momentum *damps*: removing it at this ``eta`` is unsafe (on a
      quadratic the stable ``eta`` shrinks by ``(2 - c) / c``, 19x at ``c = 0.1``).

    This callback measures it on each selected optimizer from the end of a warm-up, and once it has
    stayed inside the idle band ``[low, high]`` for ``patience`` it starts the gradual switch of
    :class:`MomentumOff` (``c -> 1`` geometrically over ``transition_steps`` with ``eta`` kept;
    SGD+M: ``lr / (1 - momentum)``, momentum 0), then stops measuring. While the ratio is below
    ``low`` momentum is kept (a warning says so once), and once it has damped at a step size
    ``eta_d`` an idle reading counts only after ``eta`` has fallen to ``eta_drop * eta_d`` (e.g. at
    the next cut of the schedule): that step size needed momentum.

    The rule (:class:`~lightning_spa.decision.MomentumOffDecision`), with ``W``, ``P`` the warm-up
    and patience in optimizer steps of that optimizer's own clock (steps actually taken):

    - steps ``k < W`` are not measured (they cost nothing). The EMA starts at step ``W``: the first
      steps, with large and fast-shrinking gradients, would otherwise dominate both averages for
      hundreds of steps and hide the phase after them;
    - from ``W``, every ``every_n_steps``-th step is measured (every step by default: with
      heavy-tailed gradient norms a sparse sample misses the rare large ``||g||^2`` that the
      normaliser needs, and the ratio reads high: ``examples/reproduce/results/measured_off_sampling.md``);
    - a ratio in ``[low, high]`` at step ``s`` (after a damping episode: at ``eta <= eta_drop * eta_d``)
      opens a window, a ratio outside closes it; the decision
      is taken at the first measured step ``k`` with ``k - s >= P``; momentum goes from step ``k + 1``.
      Measured every step, a ratio that stays idle decides at ``W + P`` exactly.

    Works on :class:`~lightning_spa.SPA` and ``torch.optim.SGD(momentum=...)`` (through Theorem 1,
    like :class:`MomentumOff`), composes with :class:`GradualSchedule` and :class:`MomentumOff`
    in any order (``c`` is the largest requested), and with several optimizers decides for each one
    on its own measurement. Under DDP every rank measures the same (averaged) gradients, under FSDP2
    the sums are all-reduced, so every rank takes the same decision at the same step with no extra
    collective. The decision (and, before it, the EMA and the open window) is saved in checkpoints:
    a run resumed before the decision keeps measuring; after it, the transition continues exactly.

    Logged through ``trainer.loggers``: ``spa/momentum_off_step`` (the first optimizer step with
    less momentum, logged at the deciding step; ``/opt<i>`` with several optimizers; also put in
    ``trainer.callback_metrics``) and, with
    ``log_ratio=True``, the smoothed ratio the rule reads as ``spa/off_ratio`` at each measured
    step. One console line (rank zero) per decision, and a warning (once per optimizer) when the
    ratio has stayed below ``low`` for ``patience``: momentum damps there and is kept. With ``low``
    set below 0.9 a decision taken at a ratio under 0.9 warns too: the same step may diverge without
    momentum's averaging.

    The guard (on by default, as in :class:`MomentumOff`; :class:`~lightning_spa.guard.MomentumGuard`,
    ``THEORY.md`` section 11): its reference is ``||g||^2`` smoothed over the measured steps of the
    decision window (read after the meter's own sync: no extra one); from the decision it watches
    the transition and ``watch_steps`` (one epoch) after it, and aborts the removal when the smoothed
    ``||g||^2`` exceeds ``factor`` (10) times that reference or is not finite: ``c`` is back at its
    value before the removal from the next step, ``spa/momentum_off_aborted`` (the step of the abort)
    is logged and put in ``trainer.callback_metrics``, with a console line. The decision stays taken;
    the removal is retried (``spa/momentum_off_step`` logs the new start) once ``eta`` has fallen to
    ``retry_factor`` (0.5) times its value at the abort, never otherwise. ``guard=False`` turns it off.

    Cost: nothing before ``W`` and after the decision (one tiny optimizer post-hook counts steps);
    in between, one cheap measurement per measured step (two squared norms per parameter after the
    step, no cosine: :class:`~lightning_spa.meter.MomentumMeter` with ``cosine_every_n_steps=None``)
    (``benchmarks/measured_off_overhead.py``).

    Args:
        threshold: deprecated name of ``high`` (the one-sided rule "ratio <= threshold" also switched
            where momentum damps); warns and sets ``high``.
        warmup: no measurement before this point (in ``unit``); at least the first epoch, in which
            the paper finds momentum helps most.
        patience: how long the ratio must stay idle, inside ``[low, high]`` (in ``unit``).
        transition_steps: optimizer steps over which ``c`` rises geometrically to 1 once decided;
            None: one epoch; 0 (or 1): instant, with a warning.
        unit: ``"epoch"`` (fractions allowed) or ``"step"`` (optimizer steps) for ``warmup`` and
            ``patience``.
        every_n_steps: measure every this many optimizer steps from the warm-up on.
        ema_decay: per-step decay of the ratio's EMAs, in ``[0, 1)``.
        log_ratio: also log the smoothed ratio the rule reads (``spa/off_ratio``).
        optimizers: which optimizers: None (every SPA / torch SGD+M optimizer; others skipped with a
            warning), or a list of indices and names (an optimizer class name or a param group's
            ``"name"``).
        guard: True (default): the guard above with its defaults; a
            :class:`~lightning_spa.guard.MomentumGuard` to choose its parameters; False: no guard.
        low: lower edge of the idle band, in ``(0, 1]``; below it momentum damps and is kept.
            Default 0.9 (``docs/THEORY.md`` section 10).
        high: upper edge of the idle band, ``>= 1``; above it momentum accelerates. Default 1.25.
        eta_drop: in ``(0, 1]``: after the ratio stayed below ``low`` for ``patience`` at step size
            ``eta_d``, an idle ratio counts only at ``eta <= eta_drop * eta_d``. Default 0.5.

    Raises:
        ValueError: at construction, an invalid argument (the message names it and the valid
            range); at fit start, an unsupported optimizer setting, an LR scheduler on the same torch SGD
            optimizer, or epochs with a dataloader that has no length.
        TypeError: at fit start, an explicitly selected optimizer other than SPA or torch SGD.

    Example::

        from lightning_spa import MeasuredMomentumOff

        trainer = pl.Trainer(max_epochs=90, callbacks=[MeasuredMomentumOff(warmup=1, patience=1)])

        # LightningCLI YAML
        trainer:
          callbacks:
            - class_path: lightning_spa.MeasuredMomentumOff
              init_args: {low: 0.9, high: 1.25, warmup: 1, patience: 1, unit: epoch}
    """

    def __init__(
        self,
        threshold: float | None = None,
        warmup: float = 1,
        patience: float = 1,
        transition_steps: int | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        every_n_steps: int = 1,
        ema_decay: float = 0.95,
        log_ratio: bool = False,
        optimizers: OptimizerSelection = None,
        guard: bool | MomentumGuard = True,
        low: float = DEFAULT_LOW,
        high: float = DEFAULT_HIGH,
        eta_drop: float = DEFAULT_ETA_DROP,
    ) -> None:
        super().__init__(optimizers)
        check_unit(unit)
        template = check_guard(guard, "MeasuredMomentumOff")
        self.guard = template
        self._guards = None if template is None else GuardRunner("MeasuredMomentumOff", template)
        self._per_epoch = 0
        self.low, self.high = check_band(low, high, threshold, "MeasuredMomentumOff")  # names a bad edge
        self.eta_drop = check_eta_drop(eta_drop)
        self.warmup = _check_amount(warmup, "warmup", unit)
        self.patience = _check_amount(patience, "patience", unit)
        if transition_steps is not None and (
            isinstance(transition_steps, bool) or not isinstance(transition_steps, int) or transition_steps < 0
        ):
            raise ValueError(
                f"`transition_steps` must be None (one epoch) or an integer >= 0 (0: instant), "
                f"got {transition_steps!r}."
            )
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an integer >= 1 (1: every step), got {every_n_steps!r}.")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be a float in [0, 1) (e.g. 0.95), got {ema_decay!r}.")
        if not isinstance(log_ratio, bool):
            raise ValueError(f"`log_ratio` must be a bool, got {log_ratio!r}.")
        self.transition_steps, self.unit = transition_steps, unit
        self.every_n_steps, self.ema_decay, self.log_ratio = every_n_steps, float(ema_decay), log_ratio
        self.warmup_steps = self.patience_steps = 0  # in optimizer steps, set at fit start
        self.decisions: dict[int, MomentumOffDecision] = {}
        self._removals: dict[int, _DecidedRemoval] = {}
        self._meters: dict[int, MomentumMeter] = {}
        self._loaded_decisions: dict[int, dict[str, Any]] = {}
        self._loaded_meters: dict[int, dict[str, Any]] = {}
        self._meter_states: dict[str, Any] = {}  # the EMAs at the end of the last fit, for a checkpoint after it
        self._loggers: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._suffix = False
        self._state_key = self._generate_state_key(
            low=self.low, high=self.high, eta_drop=self.eta_drop, warmup=self.warmup, patience=self.patience,
            unit=self.unit, transition_steps=self.transition_steps, optimizers=self.optimizers,
        )  # fmt: skip

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it several times a step: computed once

    @property
    def decided_steps(self) -> dict[int, int | None]:
        """Per optimizer index: the step whose measurement decided (momentum goes from the next one), or None."""
        return {i: d.decided_step for i, d in sorted(self.decisions.items())}

    # ----- setup --------------------------------------------------------------------------
    def _build(self, steps_per_epoch: int) -> _DecidedRemoval:
        check_length(steps_per_epoch, self.unit, self.transition_steps, "MeasuredMomentumOff")
        self.decisions, self._removals = {}, {}  # a new fit: _schedule_for and _check fill them per optimizer
        self.warmup_steps = to_steps(self.warmup, self.unit, steps_per_epoch)
        self.patience_steps = to_steps(self.patience, self.unit, steps_per_epoch)
        length = self.transition_steps if self.transition_steps is not None else steps_per_epoch
        self._per_epoch = steps_per_epoch
        return _DecidedRemoval(length)

    def _schedule_for(self, index: int) -> _DecidedRemoval:
        # One removal per optimizer (its start is set by that optimizer's own decision), built from the template.
        assert isinstance(self.schedule, _DecidedRemoval)
        length = self.schedule.transition_steps
        guarded = None if self._guards is None else self._guards.bind(index, length, self._per_epoch, None)
        self._removals[index] = _DecidedRemoval(length, guarded)
        return self._removals[index]

    def _check(self, clock: OptimizerClock) -> None:
        removal = self._removals[clock.index]
        decision = MomentumOffDecision(
            low=self.low, high=self.high, warmup_steps=self.warmup_steps, patience_steps=self.patience_steps,
            eta_drop=self.eta_drop,
        )  # fmt: skip
        if clock.index in self._loaded_decisions:
            decision.load_state_dict(self._loaded_decisions.pop(clock.index))
        removal.start = decision.transition_start
        self.decisions[clock.index] = decision
        if removal.transition_steps <= 1 and min((g.c0 for g in clock.groups), default=1.0) < 1.0:
            rank_zero_warn(
                f"MeasuredMomentumOff(transition_steps={self.transition_steps}) switches momentum off at once on "
                f"optimizer {clock.index}: the raw gradient then gets 1/c0 times the learning rate before the "
                "averaging settles (paper Figure 1d). Use the default transition_steps=None (one epoch) for a gradual "
                "switch."
            )

    def _start(self, trainer: pl.Trainer) -> None:
        # The first schedule callback built the clocks and called _check (on_train_start); the meters hook the
        # optimizers before the clocks do, so a reading reaches the decision before the clock writes the next step.
        self._loggers = list(trainer.loggers)
        self._trainer = trainer
        self._suffix = len(self._clocks) > 1
        if self._guards is not None:
            self._guards.start_fit(trainer, self._clocks)
        self._detach_meters()
        for index, clock in self._clocks.items():
            if self.decisions[index].decided:
                continue
            state = self._loaded_meters.pop(index, None)
            listener = partial(self._on_reading, index)
            self._meters[index] = MomentumMeter.ratio_only(clock.optimizer, self.ema_decay, state, listener)
        self._loaded_meters = {}

    def _detach_meters(self) -> None:
        for meter in self._meters.values():
            meter.detach()
        self._meters = {}

    def _retime(self, index: int, per_epoch: int, resumed: bool) -> bool:
        # Manual optimization, an optimizer with `per_epoch` steps in the trainer's first epoch: its warm-up,
        # patience and one-epoch transition in its own steps. Possible while it has not measured yet (or on a
        # resume, where the steps before the checkpoint already used this rate).
        decision = self.decisions[index]
        if not resumed and (decision.last_step is not None or decision.decided):
            return False
        if self.unit == "epoch":
            decision.warmup_steps = to_steps(self.warmup, self.unit, per_epoch)
            decision.patience_steps = to_steps(self.patience, self.unit, per_epoch)
        if self.transition_steps is None:
            self._removals[index].transition_steps = per_epoch
        return True

    # ----- measuring and deciding ---------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._guards is None and not self._meters:
            return
        clock = self._clock_of(optimizer)
        if clock is None:
            return
        index = clock.index
        if self._guards is not None:
            self._guards.before_step(index, clock)  # after the decision: watch
        meter = self._meters.get(index)
        if meter is None:
            return
        k = clock.steps  # the coming step
        warmup = self.decisions[index].warmup_steps  # this optimizer's (manual optimization: see _retime)
        if k >= warmup and (k - warmup) % self.every_n_steps == 0:
            meter.measure_next_step()
            meter.before_step()  # the first half now; the meter's step post-hook finishes it (runs first)
            if self._guards is not None and (k - warmup) % (self.every_n_steps * _REFERENCE_EVERY) == 0:
                self._guards.stash(index, clock)  # the guard's reference, read after the meter's sync

    def _on_reading(self, index: int, reading: Reading) -> None:
        """Called by the meter in its step post-hook, before the clock's: the decision reaches step ``k + 1``."""
        decision = self.decisions[index]
        if reading.status != "ok" or decision.decided:
            return
        k = self._clocks[index].steps  # the step just taken (the clock advances in its own post-hook, next)
        if self._guards is not None and reading.hypers:
            self._guards.fold_stashed(index, k, reading.hypers[0].eta, reading.g_sq)
        ratio = reading.ratio
        suffix = f"/opt{index}" if self._suffix else ""
        if self.log_ratio and math.isfinite(ratio):
            for logger in self._loggers:
                logger.log_metrics({f"spa/off_ratio{suffix}": ratio}, step=log_step(self._trainer, k))
        damping = decision.damping_step
        etas = [h.eta for h in reading.hypers if math.isfinite(h.eta)]
        if not decision.observe(k, ratio, max(etas) if etas else None):
            if damping is None and decision.damping_step is not None:
                rank_zero_warn(
                    f"MeasuredMomentumOff: optimizer {index} keeps momentum: the smoothed alignment ratio has been "
                    f"below {self.low:g} since step {decision.below_since} ({ratio:.3g} at step {k}). Below 1 momentum "
                    "damps (the iterates oscillate, or batches drawn without replacement anti-correlate the "
                    "gradients); removing it at this eta is unsafe (THEORY.md section 10). Momentum goes if the "
                    f"ratio comes into [{self.low:g}, {self.high:g}] (idle) for the patience once eta has fallen to "
                    f"{self.eta_drop:g} times its value now (e.g. at the next cut of the schedule)."
                )
            return
        start = decision.transition_start
        assert start is not None
        self._removals[index].start = start  # the clock's post-hook writes step k + 1's values next
        metrics = {f"spa/momentum_off_step{suffix}": float(start)}
        for logger in self._loggers:
            logger.log_metrics(metrics, step=log_step(self._trainer, k))
        if self._trainer is not None:  # for callbacks that read it (e.g. a ModelCheckpoint filename)
            self._trainer.callback_metrics.update({key: torch.tensor(v) for key, v in metrics.items()})
        if ratio < _OSCILLATION:
            rank_zero_warn(
                f"MeasuredMomentumOff: optimizer {index} decided at step {k} with the smoothed alignment ratio at "
                f"{ratio:.3g} (low={self.low:g}), below 1: momentum was damping (the iterates oscillate or the "
                "gradients are anti-correlated), and removing it at this eta is unsafe: the same step may diverge "
                "without momentum's averaging (on the bundled digits at SPA eta 1 one seed in five did, decided at "
                f"a ratio of 0.79). Keep `low` at its default ({DEFAULT_LOW}) or use a smaller eta."
            )
        rank_zero_info(
            f"MeasuredMomentumOff: optimizer {index}: smoothed alignment ratio {ratio:.3g}, idle (in "
            f"[{self.low:g}, {self.high:g}]) since step {decision.idle_since} (warm-up {decision.warmup_steps}, "
            f"patience {decision.patience_steps} steps); momentum off from optimizer step {start}, over "
            f"{self._removals[index].transition_steps} steps."
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A decided optimizer needs no meter any more (detached here, not inside the optimizer's hooks).
        for index in [i for i in self._meters if self.decisions[i].decided]:
            self._meters.pop(index).detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        # trainer.save_checkpoint after the fit still saves the EMAs (the meters are gone by then)
        self._meter_states = self._live_meter_states()
        self._detach_meters()
        self._trainer = None
        if self._guards is not None:
            self._guards.end_fit()

    # ----- checkpoints --------------------------------------------------------------------
    def _live_meter_states(self) -> dict[str, Any]:
        return {str(i): m.state_dict() for i, m in self._meters.items() if not self.decisions[i].decided}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A resumed run holds what the uninterrupted one would (issue 17: callback_metrics after a resume).
        starts = {i: d.transition_start for i, d in self.decisions.items() if d.transition_start is not None}
        if self._guards is not None:
            self._guards.publish(trainer, starts)
        elif starts:
            suffix = {i: f"/opt{i}" if self._suffix else "" for i in starts}
            trainer.callback_metrics.update(
                {f"spa/momentum_off_step{suffix[i]}": torch.tensor(float(s)) for i, s in starts.items()}
            )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if not state:  # not set up yet: nothing to save
            return state
        if self._guards is not None:
            state["guards"] = self._guards.state_dict()
        state["decisions"] = {str(i): d.state_dict() for i, d in self.decisions.items()}
        state["meters"] = self._live_meter_states() if self._in_fit else self._meter_states
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._guards is not None:  # before the decisions: a loaded guard keeps its own plan
            self._guards.load_state_dict(state_dict.get("guards", {}), self._in_fit and bool(self._clocks))
        decisions = {int(i): s for i, s in state_dict.get("decisions", {}).items()}
        meters = {int(i): s for i, s in state_dict.get("meters", {}).items()}
        if not (self._in_fit and self._clocks):  # not set up yet (the set-up, at on_train_start, follows every restore)
            self._loaded_decisions, self._loaded_meters = decisions, meters
            return
        # A load into a fit that is set up: apply it now.
        for index, state in decisions.items():
            if index in self.decisions:
                self.decisions[index].load_state_dict(state)
                self._removals[index].start = self.decisions[index].transition_start
        for index, state in meters.items():
            if index in self._meters:
                self._meters[index].load_state_dict(state)
