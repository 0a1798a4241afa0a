r"""When to turn momentum off, decided from the alignment ratio (``THEORY.md`` section 4).

The paper's first insight: momentum helps while the new gradients are aligned with the
momentum buffer, which shows as a smoothed alignment ratio

    ratio_k = EMA(||x_{k+1} - x_k||^2) / ( (c_k / (2 - c_k)) * EMA(eta_k^2 * ||g_k||^2) )

far above 1; once the gradients are noise uncorrelated with the past step the ratio settles at
1 (and below 1 the iterates oscillate). :class:`MomentumOffDecision` turns a stream of measured
ratios into one decision, as a small state machine over optimizer steps:

1. **warm-up**: measurements at steps ``k < warmup_steps`` are ignored. The first steps of a
   run have no momentum yet (the first ratio is ``c (2 - c)``, e.g. 0.19 for ``c = 0.1``), so
   an early ratio below 1 says nothing about noise.
2. **watching**: a finite measured ratio ``<= threshold`` opens a window at its step ``s`` (if
   none is open); a ratio ``> threshold`` closes it. A non-finite ratio (nothing measured, e.g.
   a zero gradient) leaves the state unchanged.
3. **decided**: at the first measured step ``k`` with an open window and
   ``k - s >= patience_steps`` the decision is taken at step ``k``; it is final. Momentum then
   goes from step ``k + 1`` (the measurement of step ``k`` exists only after that step).

Patience is counted in **optimizer steps**, not in measurements, so the rule means the same
thing at any sampling rate: measured every ``n`` steps, a window opens at the first measured
step ``s >= warmup_steps`` with a low ratio and the decision falls on the first measured step
``>= s + patience_steps``. Measured every step on a problem whose ratio stays below the
threshold, the decision is at step ``warmup_steps + patience_steps`` exactly.

Pure Python: no torch, no Lightning; serves plain PyTorch loops and every DDP rank alike (given
the same, all-reduced ratios, every rank takes the same decision).

Example::

    rule = MomentumOffDecision(threshold=1.1, warmup_steps=100, patience_steps=50)
    for k in range(steps):
        ...  # optimizer step k, then its smoothed ratio
        if rule.observe(k, ratio):
            print(f"momentum off from step {rule.transition_start}")
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DEFAULT_THRESHOLD", "MomentumOffDecision"]

#: Ratio at or below which momentum is taken to have stopped helping. 1 is the noise level; the
#: 10% margin absorbs the EMA's sampling noise around it (on the bundled digits the ratio stays
#: within 0.86-1.19 once past the first epoch, while an aligned phase is well above 1.5).
DEFAULT_THRESHOLD = 1.1


def _check_int(value: Any, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0 ({fix}), got {value!r}.")
    return value


class MomentumOffDecision:
    """The warm-up / threshold / patience rule of the module docstring, with its state.

    Args:
        threshold: the smoothed ratio at or below which momentum is not helping; finite and
            positive. 1 is the noise level.
        warmup_steps: optimizer steps whose measurements are ignored (``k < warmup_steps``).
        patience_steps: optimizer steps the ratio must stay at or below ``threshold`` (from the
            first low measurement to the deciding one); 0 decides at the first low measurement.

    Raises:
        ValueError: ``threshold`` not a finite positive number, or ``warmup_steps`` /
            ``patience_steps`` not integers ``>= 0``.

    Example::

        rule = MomentumOffDecision(threshold=1.1, warmup_steps=20, patience_steps=10)
        rule.observe(25, 0.97)   # False: window opens at step 25
        rule.observe(35, 1.02)   # True: 35 - 25 >= 10
        rule.decided_step, rule.transition_start   # (35, 36)
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, warmup_steps: int = 0, patience_steps: int = 0) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"`threshold` must be a number (e.g. {DEFAULT_THRESHOLD}), got {threshold!r}.")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(
                f"`threshold` must be finite and > 0 (1 is the noise level; e.g. {DEFAULT_THRESHOLD}), got {threshold}."
            )
        self.threshold = float(threshold)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", "0: measurements count from the first step")
        self.patience_steps = _check_int(patience_steps, "patience_steps", "0: decide at the first low ratio")
        self.below_since: int | None = None
        self.decided_step: int | None = None
        self.last_step: int | None = None

    @property
    def decided(self) -> bool:
        """Whether the decision has been taken (it is final)."""
        return self.decided_step is not None

    @property
    def transition_start(self) -> int | None:
        """The first optimizer step without full momentum: ``decided_step + 1``, or None before the decision."""
        return None if self.decided_step is None else self.decided_step + 1

    def observe(self, step: int, ratio: float) -> bool:
        """Folds in the smoothed ratio measured at optimizer step ``step``; True when this takes the decision.

        Args:
            step: the optimizer step the measurement belongs to (strictly increasing).
            ratio: the smoothed alignment ratio after that step.

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
        if ratio > self.threshold:
            self.below_since = None
            return False
        if self.below_since is None:
            self.below_since = step
        if step - self.below_since >= self.patience_steps:
            self.decided_step = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (plain Python values)."""
        return {"below_since": self.below_since, "decided_step": self.decided_step, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; the rule's arguments are those of this object."""

        def opt_int(key: str) -> int | None:
            value = state.get(key)
            return None if value is None else int(value)

        self.below_since = opt_int("below_since")
        self.decided_step = opt_int("decided_step")
        self.last_step = opt_int("last_step")

    def __repr__(self) -> str:
        return (
            f"MomentumOffDecision(threshold={self.threshold:g}, warmup_steps={self.warmup_steps}, "
            f"patience_steps={self.patience_steps}, decided_step={self.decided_step})"
        )
