r"""When to turn momentum off, decided from the alignment ratio (``THEORY.md`` sections 4 and 10).

The smoothed alignment ratio

    ratio_k = EMA(||x_{k+1} - x_k||^2) / ( (c_k / (2 - c_k)) * EMA(eta_k^2 * ||g_k||^2) )

is normalised so that gradients uncorrelated with the past step give 1. It has three readings:

- **above 1: aligned.** New gradients point along the momentum buffer; momentum *accelerates*
  (a constant gradient gives ``(2 - c) / c``, 19 at ``c = 0.1``).
- **near 1: idle.** The gradients are noise uncorrelated with the past step; momentum only
  averages it, and removing it (``c -> 1``, ``eta`` kept) changes little.
- **below 1: damping.** Consecutive gradients are anti-correlated: the iterate oscillates across
  a valley (a step too large for plain SGD), or the batches are drawn without replacement (within
  an epoch the noise sums to zero). Momentum is *damping*; on a quadratic of curvature ``L`` it is
  stable up to ``eta L < 2 (2 - c) / c`` against ``eta L < 2`` without it, so removing it at this
  ``eta`` is unsafe.

:class:`MomentumOffDecision` therefore switches only when the ratio is *idle*: inside a band
``[low, high]`` around 1, for ``patience_steps``. A state machine over optimizer steps:

1. **warm-up**: measurements at steps ``k < warmup_steps`` are ignored. The first steps of a
   run have no momentum yet (the first ratio is ``c (2 - c)``, e.g. 0.19 for ``c = 0.1``), so
   an early ratio says nothing.
2. **watching**: a finite ratio in ``[low, high]`` opens the *idle* window at its step ``s`` (if
   none is open); a ratio outside closes it. A ratio ``< low`` opens the *damping* window
   instead; once it has lasted ``patience_steps`` the rule records :attr:`damping_step` (the first
   time: a driver reports it) and the step size of that step, :attr:`damping_eta` (once per
   episode: the EMA lags a cut of ``eta``, so the same episode often outlasts it), and keeps
   momentum. A non-finite ratio (nothing measured, e.g. a zero gradient) leaves the state
   unchanged.
3. **after damping**: once momentum has damped at step size ``eta_d``, that step size needs it, and
   a ratio that drifts back to 1 at the same ``eta`` does not make the removal safe. An idle ratio
   then counts only once ``eta <= eta_drop * eta_d`` (``eta`` as passed to :meth:`observe`; without
   it, never): typically after the next cut of the schedule, where the ratio is measured again.
4. **decided**: at the first measured step ``k`` with an open idle window and
   ``k - s >= patience_steps`` the decision is taken at step ``k``; it is final. Momentum then
   goes from step ``k + 1`` (the measurement of step ``k`` exists only after that step).

Patience is counted in **optimizer steps**, not in measurements, so the rule means the same
thing at any sampling rate: measured every ``n`` steps, a window opens at the first measured
step ``s >= warmup_steps`` inside the band and the decision falls on the first measured step
``>= s + patience_steps``. Measured every step on a problem whose ratio stays inside the band,
the decision is at step ``warmup_steps + patience_steps`` exactly.

The defaults (``docs/THEORY.md`` section 10): band ``[0.9, 1.25]``. On a noisy quadratic of
curvature ``L`` the stationary ratio is ``1 / (1 + (1 - c) eta L / (2 - c))``, so 0.9 is
``eta L ~ 0.23`` at ``c = 0.1``, far inside plain SGD's ``eta L < 2`` (ratio ``(2 - c) / (4 - 3 c)``,
0.51): a margin for the curvature an average over directions hides. Idle phases measured by
``examples/reproduce/momentum_off_setups.py`` read up to 1.1-1.28. ``eta_drop = 0.5``: on the
digits at SPA ``eta 1`` a seed that damped for five epochs and then read idle for one, at the same
``eta``, lost 27 points when switched there; after the cut it matched momentum throughout.

Pure Python: no torch, no Lightning; serves plain PyTorch loops and every DDP rank alike (given
the same, all-reduced ratios, every rank takes the same decision).

Example::

    rule = MomentumOffDecision(low=0.9, high=1.25, warmup_steps=100, patience_steps=50)
    for k in range(steps):
        ...  # optimizer step k, then its smoothed ratio
        if rule.observe(k, ratio, eta=eta_k):
            print(f"momentum off from step {rule.transition_start}")
"""

from __future__ import annotations

import math
import warnings
from typing import Any

__all__ = [
    "DEFAULT_ETA_DROP",
    "DEFAULT_HIGH",
    "DEFAULT_LOW",
    "MomentumOffDecision",
    "check_band",
    "check_eta_drop",
    "reading",
]

#: Lower edge of the idle band: below it momentum damps (anti-correlated gradients) and is kept.
DEFAULT_LOW = 0.9
#: Upper edge of the idle band: above it the gradients are aligned and momentum accelerates.
DEFAULT_HIGH = 1.25
#: After momentum has damped at step size ``eta_d``, an idle ratio counts only at ``eta <= DEFAULT_ETA_DROP * eta_d``.
DEFAULT_ETA_DROP = 0.5


def reading(ratio: float, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH) -> str:
    """The meaning of a smoothed ratio for the band ``[low, high]``: ``"damping"``, ``"idle"``, ``"accelerating"``
    (or ``"unmeasured"`` for a non-finite ratio)."""
    if not math.isfinite(ratio):
        return "unmeasured"
    return "damping" if ratio < low else "accelerating" if ratio > high else "idle"


def _check_int(value: Any, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0 ({fix}), got {value!r}.")
    return value


def _check_edge(value: Any, name: str, example: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number (e.g. {example}), got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be finite and > 0 (1 is the noise level; e.g. {example}), got {value}.")
    return float(value)


def check_band(
    low: Any = DEFAULT_LOW, high: Any = DEFAULT_HIGH, threshold: Any = None, owner: str = "MomentumOffDecision"
) -> tuple[float, float]:
    """Validates the idle band and maps the removed ``threshold`` onto it; returns ``(low, high)``.

    ``threshold`` (the one-sided rule "ratio <= threshold") is deprecated: it becomes ``high``, with a
    :class:`FutureWarning`; ``low`` keeps its value, so a damping ratio never switches.

    Raises:
        ValueError: an edge not a finite positive number, ``low > 1``, ``high < 1``, or both ``threshold``
            and a non-default ``high``.
    """
    if threshold is not None:
        if high != DEFAULT_HIGH:
            raise ValueError(f"{owner}: give `high` only; `threshold` is its deprecated name.")
        high = _check_edge(threshold, "threshold", DEFAULT_HIGH)
        warnings.warn(
            f"{owner}(threshold=...) is deprecated: the one-sided rule 'ratio <= threshold' also switched momentum "
            f"off where it damps (ratio below 1; unsafe at the same eta). Use the idle band `low`/`high` (defaults "
            f"{DEFAULT_LOW}, {DEFAULT_HIGH}); `threshold={threshold}` is taken as `high={threshold}` with "
            f"`low={low}`.",
            FutureWarning,
            stacklevel=3,
        )
    low, high = _check_edge(low, "low", DEFAULT_LOW), _check_edge(high, "high", DEFAULT_HIGH)
    if low > 1.0:
        raise ValueError(f"`low` must be <= 1 (the noise level, which counts as idle; e.g. {DEFAULT_LOW}), got {low}.")
    if high < 1.0:
        raise ValueError(
            f"`high` must be >= 1 (the noise level, which counts as idle; e.g. {DEFAULT_HIGH}), got {high}."
        )
    return low, high


def check_eta_drop(value: Any) -> float:
    """Validates ``eta_drop`` (in ``(0, 1]``) and returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"`eta_drop` must be a number in (0, 1] (e.g. {DEFAULT_ETA_DROP}: after momentum damped at eta_d, switch "
            f"only at eta <= {DEFAULT_ETA_DROP} * eta_d), got {value!r}."
        )
    return float(value)


class MomentumOffDecision:
    """The warm-up / idle band / patience rule of the module docstring, with its state.

    Args:
        low: lower edge of the idle band, in ``(0, 1]``: a ratio below it means momentum damps
            (anti-correlated gradients) and is kept. Default :data:`DEFAULT_LOW`.
        high: upper edge of the idle band, ``>= 1``: a ratio above it means the gradients are aligned
            and momentum accelerates. Default :data:`DEFAULT_HIGH`.
        warmup_steps: optimizer steps whose measurements are ignored (``k < warmup_steps``).
        patience_steps: optimizer steps the ratio must stay inside the band (from the first idle
            measurement to the deciding one); 0 decides at the first idle measurement.
        eta_drop: in ``(0, 1]``: after a damping episode at step size ``eta_d``, an idle ratio counts
            only once ``eta <= eta_drop * eta_d``. Default :data:`DEFAULT_ETA_DROP`.
        threshold: deprecated name of ``high`` (the one-sided rule it stood for is gone); warns.

    Raises:
        ValueError: ``low``/``high`` not finite positive numbers, ``low > 1`` or ``high < 1``,
            ``warmup_steps`` / ``patience_steps`` not integers ``>= 0``, or ``eta_drop`` not in ``(0, 1]``.

    Example::

        rule = MomentumOffDecision(low=0.9, high=1.25, warmup_steps=20, patience_steps=10)
        rule.observe(25, 0.97)   # False: idle window opens at step 25
        rule.observe(35, 1.02)   # True: 35 - 25 >= 10
        rule.decided_step, rule.transition_start   # (35, 36)
    """

    def __init__(
        self,
        *,
        low: float = DEFAULT_LOW,
        high: float = DEFAULT_HIGH,
        warmup_steps: int = 0,
        patience_steps: int = 0,
        eta_drop: float = DEFAULT_ETA_DROP,
        threshold: float | None = None,
    ) -> None:
        self.low, self.high = check_band(low, high, threshold)
        self.eta_drop = check_eta_drop(eta_drop)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", "0: measurements count from the first step")
        self.patience_steps = _check_int(patience_steps, "patience_steps", "0: decide at the first idle ratio")
        self.idle_since: int | None = None
        self.below_since: int | None = None
        self.damping_step: int | None = None
        self.damping_eta: float | None = None
        self.damping_episode: int | None = None
        self.decided_step: int | None = None
        self.last_step: int | None = None
        self.last_ratio: float = math.nan

    @property
    def decided(self) -> bool:
        """Whether the decision has been taken (it is final)."""
        return self.decided_step is not None

    @property
    def transition_start(self) -> int | None:
        """The first optimizer step without full momentum: ``decided_step + 1``, or None before the decision."""
        return None if self.decided_step is None else self.decided_step + 1

    @property
    def waiting_for_eta(self) -> bool:
        """Whether momentum damped earlier and ``eta`` has not yet fallen to ``eta_drop`` times that step size."""
        return self.damping_eta is not None

    def _eta_allows(self, eta: float | None) -> bool:
        if self.damping_eta is None:
            return True
        if eta is None or not math.isfinite(eta) or not math.isfinite(self.damping_eta):
            return False
        return eta <= self.eta_drop * self.damping_eta

    def observe(self, step: int, ratio: float, eta: float | None = None) -> bool:
        """Folds in the smoothed ratio measured at optimizer step ``step``; True when this takes the decision.

        Args:
            step: the optimizer step the measurement belongs to (strictly increasing).
            ratio: the smoothed alignment ratio after that step.
            eta: the (largest) SPA step size of that step; needed to switch after a damping episode.

        Raises:
            ValueError: ``step`` not after the previous observation's step.
        """
        if self.decided_step is not None:
            return False
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"MomentumOffDecision: measurement at optimizer step {step} after one at step {self.last_step}; "
                "steps must increase (one decision object per optimizer; reset it with a fresh object)."
            )
        self.last_step = step
        if step < self.warmup_steps or not math.isfinite(ratio):
            return False
        self.last_ratio = float(ratio)
        if ratio < self.low:  # damping: keep momentum, and say so once it lasts
            self.idle_since = None
            if self.below_since is None:
                self.below_since = step
            if step - self.below_since >= self.patience_steps and self.damping_episode != self.below_since:
                if self.damping_step is None:
                    self.damping_step = step
                self.damping_episode = self.below_since  # once per episode: a cut inside it is what lets it end
                self.damping_eta = math.nan if eta is None else float(eta)  # this eta needs momentum
            return False
        self.below_since = None
        if ratio > self.high or not self._eta_allows(eta):  # aligned (momentum accelerates), or eta not yet cut
            self.idle_since = None
            return False
        self.damping_eta = None  # eta has fallen enough: measured again from here
        if self.idle_since is None:
            self.idle_since = step
        if step - self.idle_since >= self.patience_steps:
            self.decided_step = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (plain Python values)."""
        return {
            "idle_since": self.idle_since, "below_since": self.below_since, "damping_step": self.damping_step,
            "damping_eta": self.damping_eta, "damping_episode": self.damping_episode,
            "decided_step": self.decided_step, "last_step": self.last_step, "last_ratio": self.last_ratio,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; the rule's arguments are those of this object.

        A state saved by the one-sided rule (no ``"idle_since"``: its ``"below_since"``
        window mixed idle and damping ratios) restores the decision and the clock but no open window.
        """

        def opt_int(key: str) -> int | None:
            value = state.get(key)
            return None if value is None else int(value)

        band_state = "idle_since" in state
        self.idle_since = opt_int("idle_since")
        self.below_since = opt_int("below_since") if band_state else None
        self.damping_step = opt_int("damping_step")
        damping_eta = state.get("damping_eta")
        self.damping_eta = None if damping_eta is None else float(damping_eta)
        self.damping_episode = opt_int("damping_episode")
        self.decided_step = opt_int("decided_step")
        self.last_step = opt_int("last_step")
        self.last_ratio = float(state.get("last_ratio", math.nan))

    def __repr__(self) -> str:
        return (
            f"MomentumOffDecision(low={self.low:g}, high={self.high:g}, warmup_steps={self.warmup_steps}, "
            f"patience_steps={self.patience_steps}, eta_drop={self.eta_drop:g}, decided_step={self.decided_step})"
        )
