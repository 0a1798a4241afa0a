r"""SPA schedules as pure functions of the optimizer step index (``THEORY.md`` sections 5-6).

Notation as in the paper: step ``k`` of an SPA optimizer uses the step size ``eta_k`` and the
averaging weight ``c_k`` in ``(0, 1]``; ``alpha_k = c_k * eta_k`` and
``beta_k = (1 - c_{k-1}) * eta_{k-1} / eta_k`` are the torch SGD+M learning rate and momentum
that give the same iterates (Theorem 1, :mod:`lightning_spa.mapping`).

Every schedule here is relative to a parameter group's starting values ``(eta0, c0)`` and is a
pure function of ``k``, so a resumed run, a plain PyTorch loop and every DDP rank compute the
same values without saving or communicating anything. A schedule exposes

- ``eta_factor(k)``: the multiplier of ``eta0`` it asks for at step ``k``;
- ``c_value(k, c0)``: the ``c`` it asks for at step ``k`` (``>= c0``, at most 1).

Several schedules compose (:func:`compose`): the ``eta`` factors multiply and ``c`` is the
largest of the requested values (a value within ``1e-12`` of 1 is written as 1). The product is
taken in the order given; the callbacks pass the schedules sorted by ``repr``, so the result
does not depend on the order of the callbacks, to the last bit.

A param group that *joins* at step ``j > 0`` (``optimizer.add_param_group`` mid-run, as
``BackboneFinetuning`` does) is scheduled relative to its own starting values ``(eta0, c0)``
from that step: ``eta_k = eta0 * F(k) / F(j)`` with ``F`` the composed ``eta`` factor, and each
schedule moves ``c`` from ``c0`` by the change it makes after ``j`` (``c_value(k, c0, joined=j)``):
a later milestone in ``"paper"`` mode divides it by ``factor`` (capped at 1), a momentum removal
moves it to 1 over what is left of its transition (at once when that is over).

:class:`StepDecay` is the paper's milestone schedule: at milestone step ``m`` ``eta`` is
multiplied by ``factor`` and, in ``"paper"`` mode, ``c`` is divided by ``factor`` (capped at 1),
keeping ``alpha = c * eta`` (insight 2). A transition of ``T`` steps is geometric (insight 3):
step ``m + j`` (``0 <= j < T``) uses ``eta_old * factor**((j+1)/T)`` and
``c_old * (c_new/c_old)**((j+1)/T)``, so the new values are reached exactly at step
``m + T - 1``; ``T = 1`` is the classic instant drop, whose equivalent momentum
``(1 - c_old) / factor`` is 9 for ``c = 0.1, factor = 0.1`` (the loss spike of paper Figure 4).
:class:`MomentumRemoval` moves ``c`` to 1 while keeping ``eta`` (paper Figure 3).

Example::

    decay = StepDecay(milestones=[100, 200], factor=0.1, transition_steps=30)
    eta, c = compose([decay], k=120, eta0=1.0, c0=0.1)
    beta = equivalent_momentum([decay], k=120, eta0=1.0, c0=0.1)   # 0.9 * 10**(1/30) < 1
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, Protocol

from lightning_spa.theorem import step_momentum

__all__ = [
    "SPASchedule",
    "StepDecay",
    "MomentumRemoval",
    "transition_fraction",
    "changes_eta",
    "compose",
    "settled_from",
    "equivalent_momentum",
    "MomentumOverflow",
    "find_momentum_overflow",
    "smallest_safe_transition_steps",
]

Mode = Literal["paper", "lr"]

# A composed c this close to 1 is 1: it absorbs the round-off of c0 = 1 - momentum (0.1 / 0.1 for
# SGD's 0.9 gives 0.9999999999999998), so "momentum off" writes exactly 0 rather than 2e-16.
_C_ONE_TOL = 1e-12


class SPASchedule(Protocol):
    """What :func:`compose` needs from a schedule (see the module docstring)."""

    def eta_factor(self, k: int) -> float:
        """Multiplier of the group's starting ``eta`` at optimizer step ``k``."""
        ...

    def c_value(self, k: int, c0: float, joined: int = 0) -> float:
        """The ``c`` requested at optimizer step ``k`` for a group that started at ``c0`` at step ``joined``."""
        ...

    def critical_steps(self) -> Iterable[int]:
        """Steps at which ``eta`` may fall, i.e. where the equivalent momentum can exceed ``1 - c``."""
        ...


def changes_eta(schedule: SPASchedule) -> bool:
    """Whether ``schedule`` may ask for an ``eta`` factor other than 1 (its ``changes_eta``; unknown: True).

    A schedule that never does (a momentum removal) writes ``c`` alone on SPA, leaving ``eta`` to an LR scheduler.
    """
    return bool(getattr(schedule, "changes_eta", True))


def settled_from(schedule: SPASchedule) -> float:
    """The first step from which ``schedule`` asks for the same values at every later step (unknown: inf)."""
    settled = getattr(schedule, "settled_from", None)
    return math.inf if settled is None else float(settled)


def transition_fraction(k: int, start: int, length: int) -> float:
    """Share of a transition applied at step ``k``: 0 before ``start``, ``(j+1)/length`` at ``start + j``, then 1.

    Args:
        k: optimizer step index.
        start: first step that uses a changed value (the milestone step ``m``).
        length: number of steps ``T >= 1`` of the transition (1: instant).
    """
    if k < start:
        return 0.0
    j = k - start
    return 1.0 if j + 1 >= length else (j + 1) / length


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


@dataclass(frozen=True)
class StepDecay:
    """Milestone decay of ``eta`` (and, in ``"paper"`` mode, rise of ``c``) in optimizer steps.

    Args:
        milestones: strictly increasing optimizer steps ``m_i >= 0`` at which a transition starts.
        factor: multiplier of ``eta`` at each milestone, in ``(0, 1]``.
        mode: ``"paper"`` also divides ``c`` by ``factor`` (capped at 1), keeping ``alpha = c*eta``;
            ``"lr"`` changes ``eta`` only.
        transition_steps: length ``T >= 1`` of each geometric transition (1: instant drop).
            Transitions may not overlap: ``T <= m_{i+1} - m_i``.
        warmup_steps: linear warm-up: step ``k < W`` multiplies ``eta`` by ``(k+1)/W`` (so ``eta``
            rises from ``eta/W``, never exactly 0, and reaches its value at step ``W - 1``).

    Raises:
        ValueError: milestones negative, non-integer or not strictly increasing, ``factor``
            outside ``(0, 1]``, an unknown ``mode``, ``transition_steps < 1``, overlapping
            transitions or ``warmup_steps < 0``.
    """

    milestones: tuple[int, ...]
    factor: float = 0.1
    mode: Mode = "paper"
    transition_steps: int = 1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for m in self.milestones:
            _check_int(m, "milestones", 0)
        for a, b in pairwise(self.milestones):
            if b <= a:
                raise ValueError(f"`milestones` must be strictly increasing, got {list(self.milestones)}.")
        if not 0.0 < float(self.factor) <= 1.0:
            raise ValueError(f"`factor` must be in (0, 1] (eta is multiplied by it), got {self.factor}.")
        if self.mode not in ("paper", "lr"):
            raise ValueError(f"`mode` must be 'paper' or 'lr', got {self.mode!r}.")
        _check_int(self.transition_steps, "transition_steps", 1)
        _check_int(self.warmup_steps, "warmup_steps", 0)
        for a, b in pairwise(self.milestones):
            if b - a < self.transition_steps:
                raise ValueError(
                    f"Transitions overlap: milestones at steps {a} and {b} are {b - a} steps apart but "
                    f"`transition_steps`={self.transition_steps}. Use transition_steps <= {b - a} or move them."
                )

    def _progress(self, k: int) -> tuple[int, float]:
        """Number of completed transitions and the fraction of the current one at step ``k``."""
        done, frac = 0, 0.0
        for m in self.milestones:
            f = transition_fraction(k, m, self.transition_steps)
            if f >= 1.0:
                done += 1
            else:
                frac = f
                break
        return done, frac

    def eta_factor(self, k: int) -> float:
        """``factor**(i + f)`` times the warm-up factor (``i`` transitions done, ``f`` the current share)."""
        done, frac = self._progress(k)
        scale = float(self.factor) ** done
        if frac > 0.0:
            scale *= float(self.factor) ** frac
        if k < self.warmup_steps:
            scale *= (k + 1) / self.warmup_steps
        return scale

    def c_value(self, k: int, c0: float, joined: int = 0) -> float:
        """``c0`` in ``"lr"`` mode; in ``"paper"`` mode ``c_b * (c_a/c_b)**f`` with ``c_a = min(1, c_b/factor)``.

        A group that joined at step ``joined > 0`` gets ``min(1, c0 / factor**(p(k) - p(joined)))``,
        ``p`` counting the transitions made (fractions included).
        """
        if self.mode == "lr" or float(self.factor) == 1.0:
            return c0
        done, frac = self._progress(k)
        if joined > 0:
            done_j, frac_j = self._progress(joined)
            return min(1.0, c0 * float(self.factor) ** -((done + frac) - (done_j + frac_j)))
        c_before = min(1.0, c0 / float(self.factor) ** done)
        if frac == 0.0 or c_before >= 1.0:
            return c_before
        c_after = min(1.0, c_before / float(self.factor))
        return min(1.0, c_before * (c_after / c_before) ** frac)

    @property
    def changes_eta(self) -> bool:
        """Whether ``eta`` ever moves: a milestone with ``factor < 1``, or a warm-up."""
        return (bool(self.milestones) and float(self.factor) != 1.0) or self.warmup_steps > 0

    @property
    def settled_from(self) -> int:
        """The step at which the last transition (or the warm-up) reaches its final values."""
        last = self.milestones[-1] + self.transition_steps - 1 if self.milestones else 0
        return max(last, self.warmup_steps - 1, 0)

    def critical_steps(self) -> Iterable[int]:
        """The steps of every transition (``eta`` falls only there)."""
        for m in self.milestones:
            yield from range(m, m + self.transition_steps)


@dataclass(frozen=True)
class MomentumRemoval:
    """``c`` rises to 1 from step ``start`` (geometrically over ``transition_steps``); ``eta`` is kept.

    In SGD+M terms the learning rate becomes ``lr/(1-momentum)`` and the momentum 0 (paper
    Figure 3, Figure 1d). Step ``start + j`` uses ``c0 * (1/c0)**((j+1)/T)``.

    Args:
        start: first optimizer step with a larger ``c``.
        transition_steps: ``T``; 0 or 1 is instant.

    Raises:
        ValueError: ``start < 0`` or ``transition_steps < 0``.
    """

    start: int
    transition_steps: int = 0

    def __post_init__(self) -> None:
        _check_int(self.start, "start", 0)
        _check_int(self.transition_steps, "transition_steps", 0)

    #: ``eta`` is kept: on SPA the removal writes ``c`` alone.
    changes_eta = False

    @property
    def settled_from(self) -> int:
        """The step at which ``c`` reaches 1."""
        return self.start + max(1, self.transition_steps) - 1

    def eta_factor(self, k: int) -> float:
        """Always 1: ``eta`` is kept."""
        return 1.0

    def c_value(self, k: int, c0: float, joined: int = 0) -> float:
        """``c0 * (1/c0)**f`` with ``f`` the share of the transition at step ``k``.

        A group that joined at step ``joined > 0`` covers what is left of the transition:
        ``f = (f_k - f_j) / (1 - f_j)``, and ``c = 1`` from the start when the transition is over.
        """
        length = max(1, self.transition_steps)
        frac = transition_fraction(k, self.start, length)
        if joined > 0:
            frac_j = transition_fraction(joined, self.start, length)
            frac = 1.0 if frac_j >= 1.0 else max(0.0, frac - frac_j) / (1.0 - frac_j)
        return 1.0 if frac >= 1.0 else min(1.0, c0 * (1.0 / c0) ** frac)

    def critical_steps(self) -> Iterable[int]:
        """None: ``eta`` never falls, so the equivalent momentum stays at most ``1 - c``."""
        return ()


def compose(schedules: Sequence[SPASchedule], k: int, eta0: float, c0: float, joined: int = 0) -> tuple[float, float]:
    """Returns ``(eta_k, c_k)``: ``eta0`` times every factor, and the largest requested ``c`` (at least ``c0``).

    Args:
        schedules: the schedules to compose, multiplied in this order.
        k: optimizer step.
        eta0: the group's starting ``eta``.
        c0: the group's starting ``c``.
        joined: the step at which the group joined (0: from the start); a later group's factors
            are relative to step ``joined`` (see the module docstring).
    """
    eta = eta0
    c = c0
    for schedule in schedules:
        factor = schedule.eta_factor(k)
        eta *= factor if joined == 0 else factor / schedule.eta_factor(joined)
        c = max(c, schedule.c_value(k, c0, joined))
    return eta, 1.0 if c >= 1.0 - _C_ONE_TOL else c


def equivalent_momentum(schedules: Sequence[SPASchedule], k: int, eta0: float, c0: float, joined: int = 0) -> float:
    """The SGD+M momentum ``beta_k = (1 - c_{k-1}) * eta_{k-1} / eta_k`` of the composed schedule.

    ``beta_0`` (and a joined group's first step) has no effect; it is reported as ``1 - c_0``
    (``THEORY.md`` section 2).
    """
    eta, c = compose(schedules, k, eta0, c0, joined)
    if k <= joined:
        return 1.0 - c
    eta_prev, c_prev = compose(schedules, k - 1, eta0, c0, joined)
    return step_momentum(eta, eta_prev, c_prev)


@dataclass(frozen=True)
class MomentumOverflow:
    """A step whose equivalent SGD+M momentum reaches 1 or more."""

    step: int
    momentum: float


def find_momentum_overflow(
    schedules: Sequence[SPASchedule],
    eta0: float,
    c0: float,
    total_steps: float = math.inf,
    only: SPASchedule | None = None,
    joined: int = 0,
) -> MomentumOverflow | None:
    """Returns the first step ``joined < k < total_steps`` whose equivalent momentum is ``>= 1``, or None.

    Only the :meth:`~SPASchedule.critical_steps` of ``schedules`` (or of ``only``) are examined:
    elsewhere ``eta`` does not fall and ``beta_k <= 1 - c_{k-1} < 1``. ``joined``: see :func:`compose`.
    """
    sources = [only] if only is not None else schedules
    steps = sorted({k for s in sources for k in s.critical_steps() if joined < k < total_steps})
    for k in steps:
        beta = equivalent_momentum(schedules, k, eta0, c0, joined)
        if beta >= 1.0:
            return MomentumOverflow(k, beta)
    return None


def smallest_safe_transition_steps(
    decay: StepDecay,
    others: Sequence[SPASchedule],
    starts: Sequence[tuple[float, float]],
    total_steps: float = math.inf,
) -> int | None:
    """Smallest ``transition_steps`` for which ``decay`` (with ``others``) keeps every momentum below 1.

    The largest momentum of a transition, ``(1 - c_old) * factor**(-1/T)``, falls as ``T``
    grows, so a bisection over ``T`` finds the exact smallest value.

    Args:
        decay: the schedule to fix; only its ``transition_steps`` is varied.
        others: schedules composed with it (e.g. a :class:`MomentumRemoval`).
        starts: the ``(eta0, c0)`` of every parameter group that must be safe.
        total_steps: steps of the run; later steps are not checked.

    Returns:
        The smallest safe ``T``, or None when no ``T`` that fits between the milestones is safe.
    """
    # T_est keeps (1 - c0) * factor**(-1/T) < 1 for the smallest c0: safe, since c only rises
    # and a warm-up only lowers eta_{k-1}/eta_k. Bisection below it finds the exact minimum.
    c_min = min(c for _, c in starts)
    log_q = -math.log(float(decay.factor))
    t_est = 1 if c_min >= 1.0 or log_q == 0.0 else math.floor(log_q / -math.log1p(-c_min)) + 1
    gaps = [b - a for a, b in pairwise(decay.milestones)]
    hi = max(1, min([t_est, *gaps]))

    def safe(t: int) -> bool:
        candidate = StepDecay(decay.milestones, decay.factor, decay.mode, t, decay.warmup_steps)
        composed = [candidate, *others]
        return all(find_momentum_overflow(composed, e, c, total_steps, only=candidate) is None for e, c in starts)

    if not safe(hi):
        return None
    lo = 0  # unsafe (or invalid) by convention
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if safe(mid):
            hi = mid
        else:
            lo = mid
    return hi
