r"""A guard on a momentum removal: abort it when training destabilises (``THEORY.md`` sections 10, 11).

Layer: a pure state machine, like :mod:`lightning_spa.decision` (its neighbour, which decides *when*
momentum goes). The callbacks that remove momentum (:class:`~lightning_spa.callbacks.MomentumOff`,
:class:`~lightning_spa.callbacks.MeasuredMomentumOff`) feed it one number per watched optimizer
step through a thin adapter (:mod:`lightning_spa.callbacks._guard`); :class:`GuardedRemoval` is
the schedule (:mod:`lightning_spa.schedule`) whose start the guard controls. No torch, no Lightning.

Why a guard. On a quadratic of curvature ``L`` heavy ball with ``alpha = c eta``, ``beta = 1 - c``
is stable iff ``eta L < 2 (2 - c) / c``, plain SGD (``c = 1``) iff ``eta L < 2``: momentum can be
what keeps a step size stable (19x more room at ``c = 0.1``). Removing it at the same ``eta`` then
diverges. The alignment ratio cannot warn: at ``c = 1`` it is 1 by construction.

The signal: ``G_k = ||g_k||^2``, the squared norm of the loss gradient the optimizer receives at
step ``k`` (after AMP unscaling, before clipping), compared with its level just before the removal.
It stays informative as ``c -> 1``: once ``eta L > 2 (2 - c) / c`` the iterate, hence ``g``, grows
geometrically in the unstable direction (by ``|1 - eta L|`` a step at ``c = 1``), while on a stable
problem removing momentum at the same ``eta`` keeps the effective step ``alpha / (1 - beta) = eta``,
so ``G`` stays at its level (on a noisy quadratic with small ``eta L`` the stationary ``E G`` is the
same with and without momentum). The training loss would do as well on one process, but under DDP
each rank has its own loss (an all-reduce per watched step), while gradients are already averaged:
``G`` is bitwise the same on every rank, so the guard decides identically with no collective
(FSDP2 sums the shards' squares with one small all-reduce).

The rule, for one optimizer (all steps are that optimizer's steps actually taken):

1. **reference**: a removal planned to start at step ``s`` (:meth:`MomentumGuard.plan`) is
   preceded by the reference window ``[s - R, s)`` (``R = reference_steps``; clipped at 0). Each
   finite ``G_k`` observed before the watch folds into a bias-corrected EMA with decay ``d``
   (``ema_decay``): ``ref`` is a smoothed level of ``G`` right before momentum starts to go (a
   caller may also fold in earlier readings: :class:`~lightning_spa.callbacks.MeasuredMomentumOff`
   feeds its decision window).
2. **watch**: from ``s`` through ``s + T - 1 + W`` (``T`` the removal's length, at least 1; ``W =
   watch_steps`` after ``c`` reached 1) each ``G_k`` updates ``S_k = d S_{k-1} + (1 - d) G_k`` with
   ``S_{s-1} = ref``. The removal is **aborted at step** ``a = k`` when ``S_k > factor * ref`` or
   ``G_k`` is not finite. (No reference, or ``ref = 0``: the first positive ``G`` of the watch is
   taken as ``ref``.) From step ``a + 1`` the removal asks for ``c0`` again: ``c`` is back at its
   value before the removal one step after the abort (an instant restore is safe: the equivalent
   SGD+M momentum ``(1 - c_a) eta_a / eta_{a+1} <= 1 - c_a`` stays below 1).
3. **retry**: after an abort at ``a`` with ``eta_a`` the step size then, the first step ``r > a``
   with ``eta_r <= retry_factor * eta_a`` (e.g. past an LR milestone) plans a new removal at
   ``r + R`` (a fresh reference over ``[r, r + R)``), watched the same way. ``retry_factor=None``:
   never. Each retry needs ``eta`` to fall by the factor again, so the number of aborts is at most
   ``log(eta_0 / eta_min) / log(1 / retry_factor) + 1``.
4. **passed**: after ``s + T - 1 + W`` the removal stands; nothing more is watched.
5. **idle check** (``low``, ``high``; a caller that measures the alignment ratio: ``MomentumOff``):
   the smoothed ratio ``rho`` of ``THEORY.md`` section 4 over the reference window is fed in
   (:meth:`MomentumGuard.observe_ratio`); at the planned start ``s`` (:meth:`MomentumGuard.check_start`)
   momentum goes only if the last reading is *idle*, ``low <= rho <= high``. Below ``low`` it damps
   (section 10: the iterates oscillate or the gradients are anti-correlated, and plain SGD at this
   ``eta`` may diverge); above ``high`` it accelerates (the early, aligned phase, where the step is
   large and a ReLU net can die within a step or two of plain SGD, faster than any ``||g||^2``
   signal: the digits runs of ``examples/reproduce/results/momentum_off_setups.md`` read 1.7 to 10
   at epoch 1). Outside the band the removal is **postponed**: recorded as an abort at ``s`` (``c``
   moved for one step at most, back at ``c0`` from ``s + 1``), retried as in 3, and the retry
   checked again. ``[0.9, 1.25]``: the idle band of :mod:`lightning_spa.decision` (same evidence);
   ``None`` drops a side. Without a reading (nothing measured) the removal goes ahead.

Why these defaults. Divergence is exponential: at ``c = 1`` the unstable direction's ``G`` grows by
``(eta L - 1)^2`` per step (4x at ``eta L = 3``), so a large ``factor`` costs a few steps only, while
a stable problem must never trip it. ``factor = 10`` (``||g||`` 3.2x its level) with ``d = 0.9``:
one batch alone must exceed 91x the reference to abort, far beyond the batch-to-batch spread of
``G``, and the gradient level of a stable run does not grow 10x within the watch (it falls as
the loss falls). ``retry_factor = 0.5``: eta halved, i.e. the plain-SGD stability bound ``eta L <
2`` is twice as far away; a 10x milestone passes it. ``reference_steps = 20`` (about ``2 / (1 - d)``
steps: the EMA's memory).

The decisions depend on the observed values and the step counts only; the schedule after an
abort is a pure function of the optimizer step and :meth:`MomentumGuard.state_dict` (plain Python
values), so a resumed run continues bit-exactly.

Example::

    guard = MomentumGuard().bind(transition_steps=50, watch_steps=100)
    guard.plan(200)                       # MomentumOff at step 200: reference over steps 180..199
    removal = GuardedRemoval(guard)       # the schedule: c -> 1 from step 200 unless aborted
    for k in range(steps):
        if guard.retry_due(k, eta_k):     # after an abort, eta fell enough: a new removal is planned
            ...
        if guard.needs(k) and guard.observe(k, grad_sq_k, eta_k):
            print(f"momentum removal aborted at step {k}; c back at c0 from step {k + 1}")
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lightning_spa.decision import DEFAULT_HIGH, DEFAULT_LOW
from lightning_spa.schedule import MomentumRemoval

__all__ = ["GuardedRemoval", "MomentumGuard"]


def _check_number(
    value: Any, name: str, low: float, high: float, fix: str, *, low_open: bool = True, high_open: bool = True
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number ({fix}), got {value!r}.")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be in {interval} ({fix}), got {value!r}.")
    return float(value)


def _check_int(value: Any, name: str, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum} ({fix}), got {value!r}.")
    return value


class MomentumGuard:
    """The reference / watch / abort / retry rule of the module docstring, with its state.

    Construct it with the rule's parameters (this is what a callback's ``guard=`` takes); the
    callback makes one bound copy per optimizer (:meth:`bind`) that knows the removal's length.

    Args:
        factor: abort when the smoothed ``||g||^2`` exceeds this multiple of its pre-removal
            reference; ``> 1``. Default 10.
        ema_decay: per-reading decay ``d`` of the reference EMA and of the watched average, in
            ``[0, 1)`` (0: no smoothing). Default 0.9.
        reference_steps: ``R``, optimizer steps before the removal over which the reference is
            measured (and the delay of a retry); ``>= 1``. Default 20.
        watch_steps: ``W``, optimizer steps watched after ``c`` reached 1; ``>= 0``, or None: the
            callback's choice (one epoch of optimizer steps). Default None.
        retry_factor: retry once ``eta`` has fallen to at most this multiple of ``eta`` at the abort,
            in ``(0, 1)``; None: never retry. Default 0.5.
        low: postpone a removal whose smoothed alignment ratio over the reference window is below
            this (momentum damps: item 5 of the module docstring), in ``(0, 1]``; None: no lower
            check. Default 0.9. Only callers that measure the ratio use ``low`` and ``high``
            (``MomentumOff``; ``MeasuredMomentumOff`` decides on the ratio itself).
        high: postpone it when the ratio is above this (momentum accelerates), ``>= 1``; None: no
            upper check. Default 1.25. ``low=None, high=None``: only ``||g||^2`` is watched.

    Raises:
        ValueError: an argument outside its range (the message names it and the valid range).

    Example::

        MomentumOff(after_epochs=1, guard=MomentumGuard(factor=20, retry_factor=None))
    """

    def __init__(
        self,
        factor: float = 10.0,
        ema_decay: float = 0.9,
        reference_steps: int = 20,
        watch_steps: int | None = None,
        retry_factor: float | None = 0.5,
        low: float | None = DEFAULT_LOW,
        high: float | None = DEFAULT_HIGH,
    ) -> None:
        self.factor = _check_number(factor, "factor", 1.0, math.inf, "the smoothed ||g||^2 over its reference; e.g. 10")
        self.ema_decay = _check_number(ema_decay, "ema_decay", 0.0, 1.0, "e.g. 0.9", low_open=False)
        self.reference_steps = _check_int(reference_steps, "reference_steps", 1, "e.g. 20")
        if watch_steps is not None:
            _check_int(watch_steps, "watch_steps", 0, "None: one epoch after c reached 1")
        self.watch_steps = watch_steps
        if retry_factor is not None:
            retry_factor = _check_number(retry_factor, "retry_factor", 0.0, 1.0, "None: never retry; e.g. 0.5")
        self.retry_factor = retry_factor
        if low is not None:
            low = _check_number(low, "low", 0.0, 1.0, "None: no lower check; e.g. 0.9", high_open=False)
        if high is not None:
            high = _check_number(high, "high", 1.0, math.inf, "None: no upper check; e.g. 1.25", low_open=False)
        self.low, self.high = low, high
        self.transition_steps = 1  # set by bind(): the removal's length T (0 or 1: instant)
        self._watch = 0 if watch_steps is None else watch_steps
        self._clear()

    def _clear(self) -> None:
        self.episodes: list[list[int | None]] = []  # [start, aborted_at or None], oldest first
        self.ref_value = 0.0  # the reference EMA (biased) and its weight: ref = ref_value / ref_weight
        self.ref_weight = 0.0
        self.smoothed: float | None = None  # S_k during the watch
        self.eta_at_abort: float | None = None
        self.last_step: int | None = None
        self.start_ratio: float | None = None  # the last smoothed ratio read in the reference window

    def bind(self, transition_steps: int, watch_steps: int) -> MomentumGuard:
        """A fresh guard with these parameters for one optimizer's removal of ``transition_steps``.

        Args:
            transition_steps: the removal's length ``T`` (0 or 1: instant).
            watch_steps: ``W`` to use when this guard's ``watch_steps`` is None.
        """
        guard = MomentumGuard(
            self.factor, self.ema_decay, self.reference_steps, self.watch_steps, self.retry_factor, self.low, self.high
        )
        guard.transition_steps = _check_int(transition_steps, "transition_steps", 0, "0 or 1: instant")
        fallback = _check_int(watch_steps, "watch_steps", 0, "steps watched after c reached 1")
        guard._watch = self.watch_steps if self.watch_steps is not None else fallback
        return guard

    # ----- the state, read ----------------------------------------------------------------
    @property
    def reference(self) -> float | None:
        """The reference level of ``||g||^2`` (None: nothing folded in yet)."""
        return self.ref_value / self.ref_weight if self.ref_weight > 0 else None

    @property
    def aborted_steps(self) -> list[int]:
        """The steps at which removals were aborted, in order."""
        return [int(a) for _, a in self.episodes if a is not None]

    @property
    def aborted(self) -> bool:
        """Whether the latest removal was aborted (``c`` is back at its value before it)."""
        return bool(self.episodes) and self.episodes[-1][1] is not None

    @property
    def planned_start(self) -> int | None:
        """The start of the latest removal (aborted or not), or None when none was planned."""
        return None if not self.episodes else int(self.episodes[-1][0])  # type: ignore[arg-type]

    def watch_end(self) -> int | None:
        """The last watched step of the latest removal, ``s + max(T, 1) - 1 + W`` (None: none planned)."""
        start = self.planned_start
        return None if start is None else start + max(1, self.transition_steps) - 1 + self._watch

    def start_at(self, k: int) -> int | None:
        """The start of the removal in effect at step ``k``, or None where ``c`` stays at ``c0``."""
        for start, aborted in reversed(self.episodes):
            assert start is not None
            if start <= k:
                return None if aborted is not None and k > aborted else start
        return None

    def needs(self, k: int) -> bool:
        """Whether step ``k``'s ``||g||^2`` is wanted: in the reference window or the watch of a live removal."""
        start, end = self.planned_start, self.watch_end()
        if start is None or end is None or self.aborted:
            return False
        return start - self.reference_steps <= k <= end

    # ----- the rule -----------------------------------------------------------------------
    def plan(self, start: int) -> None:
        """A removal starts at step ``start`` (the reference folded in so far is kept).

        Raises:
            ValueError: ``start`` negative, or a removal is already planned and not aborted.
        """
        _check_int(start, "start", 0, "the first step with a larger c")
        if self.episodes and not self.aborted:
            raise ValueError(f"MomentumGuard: a removal from step {self.planned_start} is already planned.")
        self.episodes.append([start, None])
        self.smoothed = None
        self.start_ratio = None

    def wants_ratio(self, k: int) -> bool:
        """Whether step ``k``'s smoothed alignment ratio is wanted: the reference window of a planned removal."""
        start = self.planned_start
        if (self.low is None and self.high is None) or start is None or self.aborted:
            return False
        return start - self.reference_steps <= k < start

    def observe_ratio(self, step: int, ratio: float) -> None:
        """Folds in the smoothed alignment ratio after step ``step`` (kept when in the reference window)."""
        if self.wants_ratio(step) and math.isfinite(ratio):
            self.start_ratio = float(ratio)

    def check_start(self, k: int, eta: float) -> bool:
        """At the planned start ``k``: True (the removal postponed: an abort at ``k``) unless momentum is idle.

        Item 5 of the module docstring: the last ratio read in the reference window is outside ``[low, high]``.
        """
        if self.aborted or k != self.planned_start or self.start_ratio is None:
            return False
        below = self.low is not None and self.start_ratio < self.low
        above = self.high is not None and self.start_ratio > self.high
        return self._abort(k, eta) if below or above else False

    def observe(self, step: int, grad_sq: float, eta: float) -> bool:
        """Folds in ``||g||^2`` of optimizer step ``step`` (used with step size ``eta``); True when it aborts.

        Before the watch a finite value updates the reference; in the watch it updates ``S`` and
        may abort (item 2 of the module docstring); otherwise it is ignored.

        Raises:
            ValueError: ``step`` before the previous observation's step.
        """
        if self.last_step is not None and step < self.last_step:
            raise ValueError(
                f"MomentumGuard: reading of optimizer step {step} after one of step {self.last_step}; steps must not "
                "decrease (one guard per optimizer)."
            )
        self.last_step = step
        start, end = self.planned_start, self.watch_end()
        if start is None or step < start:  # the reference (before any plan, too: a caller's earlier readings)
            if math.isfinite(grad_sq):
                d = self.ema_decay
                self.ref_value = d * self.ref_value + (1.0 - d) * grad_sq
                self.ref_weight = d * self.ref_weight + (1.0 - d)
            return False
        if self.aborted or end is None or step > end:
            return False
        if not math.isfinite(grad_sq):
            return self._abort(step, eta)
        ref = self.reference
        if ref is None or ref <= 0.0:  # nothing to compare with yet: this reading is the reference
            if grad_sq > 0.0:
                self.ref_value, self.ref_weight, self.smoothed = grad_sq, 1.0, grad_sq
            return False
        previous = ref if self.smoothed is None else self.smoothed
        self.smoothed = self.ema_decay * previous + (1.0 - self.ema_decay) * grad_sq
        if self.smoothed > self.factor * ref:
            return self._abort(step, eta)
        return False

    def _abort(self, step: int, eta: float) -> bool:
        self.episodes[-1][1] = step
        self.eta_at_abort = float(eta)
        return True

    def retry_due(self, k: int, eta: float) -> bool:
        """After an abort: True (and a new removal planned at ``k + R``) when ``eta <= retry_factor * eta_at_abort``.

        Call it with each step's ``eta`` before that step (item 3 of the module docstring).
        """
        if not self.aborted or self.retry_factor is None or self.eta_at_abort is None:
            return False
        aborted_at = self.episodes[-1][1]
        assert aborted_at is not None
        if k <= aborted_at or not eta <= self.retry_factor * self.eta_at_abort:
            return False
        self.ref_value = self.ref_weight = 0.0  # a fresh reference, over [k, k + R)
        self.plan(k + self.reference_steps)
        return True

    # ----- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (plain Python values)."""
        return {
            "episodes": [list(e) for e in self.episodes],
            "ref_value": self.ref_value,
            "ref_weight": self.ref_weight,
            "smoothed": self.smoothed,
            "eta_at_abort": self.eta_at_abort,
            "last_step": self.last_step,
            "start_ratio": self.start_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; the rule's parameters are those of this object."""

        def opt(value: Any, kind: type) -> Any:
            return None if value is None else kind(value)

        self.episodes = [[int(s), opt(a, int)] for s, a in state.get("episodes", [])]
        self.ref_value = float(state.get("ref_value", 0.0))
        self.ref_weight = float(state.get("ref_weight", 0.0))
        self.smoothed = opt(state.get("smoothed"), float)
        self.eta_at_abort = opt(state.get("eta_at_abort"), float)
        self.last_step = opt(state.get("last_step"), int)
        self.start_ratio = opt(state.get("start_ratio"), float)

    def __repr__(self) -> str:
        retry = "None" if self.retry_factor is None else f"{self.retry_factor:g}"
        return (
            f"MomentumGuard(factor={self.factor:g}, ema_decay={self.ema_decay:g}, "
            f"reference_steps={self.reference_steps}, watch_steps={self.watch_steps}, retry_factor={retry}, "
            f"low={self.low}, high={self.high})"
        )


class GuardedRemoval:
    """A :class:`~lightning_spa.schedule.MomentumRemoval` whose start (and abort) the guard decides.

    Step ``k`` asks for ``MomentumRemoval(s, T).c_value(k, ...)`` with ``s = guard.start_at(k)``,
    and for ``c0`` where no removal is in effect (before the first, and after an abort until the
    retry starts). ``eta`` is kept. A pure function of ``k`` and the guard's state.
    """

    #: ``eta`` is kept: on SPA the removal writes ``c`` alone (an LR scheduler may own ``eta``).
    changes_eta = False

    def __init__(self, guard: MomentumGuard) -> None:
        self.guard = guard
        self.transition_steps = guard.transition_steps

    @property
    def settled_from(self) -> float:
        """The last step at which ``c`` may still change: the end of the watch of the planned removal.

        After an abort a retry may come at any later step (inf), unless retries are off. Unknown
        (inf) while no removal is planned.
        """
        if self.guard.aborted:
            aborted = self.guard.aborted_steps
            return math.inf if self.guard.retry_factor is not None else float(aborted[-1] + 1)
        end = self.guard.watch_end()
        return math.inf if end is None else float(end)

    def eta_factor(self, k: int) -> float:
        return 1.0

    def c_value(self, k: int, c0: float, joined: int = 0) -> float:
        start = self.guard.start_at(k)
        if start is None:
            return c0
        return MomentumRemoval(start, self.transition_steps).c_value(k, c0, joined)

    def critical_steps(self) -> Iterable[int]:
        return ()  # eta never falls: the equivalent momentum stays at most 1 - c

    def __repr__(self) -> str:  # the clock orders schedules by repr; eta factor 1 makes the order irrelevant
        return f"GuardedMomentumRemoval(transition_steps={self.transition_steps})"
