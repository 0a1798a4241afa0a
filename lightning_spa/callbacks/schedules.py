r"""Lightning callbacks for the paper's schedules: :class:`GradualSchedule` and :class:`MomentumOff`.

Thin adapters over :mod:`lightning_spa.schedule` (the math, as pure functions of the optimizer
step) and :mod:`lightning_spa.callbacks._adapter` (Theorem 1 on SPA or torch SGD param groups);
the hooks they share live in :mod:`lightning_spa.callbacks._schedule_base`.

How they cooperate. Every schedule callback in ``trainer.callbacks`` contributes a schedule;
the first one in that list is the *writer*: before each optimizer step it composes all of them
(``eta`` factors multiply, ``c`` is the largest requested value; :func:`~lightning_spa.schedule.compose`)
and writes the result once. The others only contribute. So ``GradualSchedule`` and
``MomentumOff`` together give ``eta0 * factor**i`` with ``c = max(c_gradual, c_off)``, and no
value is written twice or overwritten.

Step index. Optimizer steps: ``trainer.global_step`` (so ``accumulate_grad_batches`` shifts
nothing); with several optimizers under manual optimization, each optimizer's own step count
(saved in the checkpoint). The values of step ``k`` are written in ``on_train_batch_start`` and
again in ``on_before_optimizer_step``, right before the step. They depend on ``k`` and each
param group's starting values only (recorded at fit start and saved in the checkpoint), so a
resumed run continues bit-exactly and under DDP every rank computes the same values with no
collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

from lightning_spa._lightning import rank_zero_warn
from lightning_spa.callbacks._schedule_base import SPAScheduleCallback, check_unit, to_steps
from lightning_spa.schedule import (
    MomentumRemoval,
    StepDecay,
    find_momentum_overflow,
    smallest_safe_transition_steps,
)

__all__ = ["GradualSchedule", "MomentumOff"]


class GradualSchedule(SPAScheduleCallback):
    r"""Milestone decay of the SPA step size ``eta``, with momentum reduced and moved gradually.

    At each milestone ``eta`` is multiplied by ``factor``; ``mode="paper"`` also divides ``c`` by
    ``factor`` (capped at 1), keeping ``alpha = c*eta`` (the paper's insight 2: at a decay,
    lose momentum rather than step size). ``transition="geometric"`` moves the values by a
    constant ratio each optimizer step: step ``m + j`` (``0 <= j < T``) uses
    ``eta_old * factor**((j+1)/T)`` and ``c_old * (c_new/c_old)**((j+1)/T)`` (insight 3).
    ``transition="instant"`` is the classic stage-wise drop, kept for comparison: its
    equivalent SGD+M momentum ``(1-c)/factor`` (9 for ``c=0.1, factor=0.1``) makes the loss
    spike (paper Figure 4); a warning says so at fit start.

    Works on :class:`~lightning_spa.SPA` (writes ``lr`` = eta and ``c``) and on
    ``torch.optim.SGD(momentum=...)`` (writes the Theorem-1 ``lr`` and ``momentum`` each step:
    both follow the same trajectory). Each param group is scheduled relative to its own
    starting values. Composes with :class:`MomentumOff` (see the module docstring); an LR
    scheduler on the same optimizer is refused. The values are pure functions of the optimizer
    step: resumes are bit-exact and DDP ranks agree without any collective.

    Args:
        milestones: where each decay starts, strictly increasing, in ``unit`` (fractions of an
            epoch allowed).
        factor: multiplier of ``eta`` at each milestone, in ``(0, 1]``.
        mode: ``"paper"``: ``c`` is divided by ``factor`` too (capped at 1); ``"lr"``: ``eta`` only.
        transition: ``"geometric"`` (gradual, over ``transition_steps``) or ``"instant"``.
        transition_steps: optimizer steps per geometric transition; None: one epoch of
            optimizer steps. Must fit between milestones.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps) for ``milestones``.
        warmup_steps: linear warm-up of ``eta`` over this many optimizer steps: step ``k``
            uses ``eta * (k+1)/warmup_steps``.

    Raises:
        ValueError: at construction, for invalid arguments; at fit start, for an unsupported
            optimizer, an LR scheduler on the same optimizer, transitions that overlap, or a
            geometric transition so fast that the equivalent momentum
            ``(1 - c_{k-1}) * eta_{k-1} / eta_k`` reaches 1 (the message gives the value, the
            step and the smallest safe ``transition_steps``).
        TypeError: at fit start, an optimizer other than SPA or torch SGD.

    Example::

        trainer = pl.Trainer(max_epochs=300, callbacks=[GradualSchedule(milestones=[150, 225])])

        # LightningCLI YAML
        trainer:
          callbacks:
            - class_path: lightning_spa.GradualSchedule
              init_args: {milestones: [150, 225], factor: 0.1, mode: paper}
    """

    def __init__(
        self,
        milestones: Sequence[float],
        factor: float = 0.1,
        mode: Literal["paper", "lr"] = "paper",
        transition: Literal["geometric", "instant"] = "geometric",
        transition_steps: int | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        check_unit(unit)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise ValueError(f"`milestones` must be a list of numbers, got {milestones!r}.")
        values = [float(m) for m in milestones]
        if any(not math.isfinite(m) or m < 0 for m in values):
            raise ValueError(f"`milestones` must be finite and >= 0, got {list(milestones)}.")
        if any(b <= a for a, b in pairwise(values)):
            raise ValueError(f"`milestones` must be strictly increasing, got {list(milestones)}.")
        if unit == "step" and any(m != int(m) for m in values):
            raise ValueError(f"`milestones` in optimizer steps (unit='step') must be integers, got {list(milestones)}.")
        if not 0.0 < float(factor) <= 1.0:
            raise ValueError(f"`factor` must be in (0, 1] (eta is multiplied by it at each milestone), got {factor}.")
        if mode not in ("paper", "lr"):
            raise ValueError(f"`mode` must be 'paper' (eta down, c up) or 'lr' (eta only), got {mode!r}.")
        if transition not in ("geometric", "instant"):
            raise ValueError(f"`transition` must be 'geometric' or 'instant', got {transition!r}.")
        if transition_steps is not None:
            if transition == "instant":
                raise ValueError("`transition_steps` is only used with transition='geometric'; remove it.")
            if isinstance(transition_steps, bool) or not isinstance(transition_steps, int) or transition_steps < 1:
                raise ValueError(f"`transition_steps` must be an integer >= 1 or None, got {transition_steps!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}.")
        self.milestones = values
        self.factor = float(factor)
        self.mode = mode
        self.transition = transition
        self.transition_steps = transition_steps
        self.unit = unit
        self.warmup_steps = warmup_steps

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            milestones=self.milestones, factor=self.factor, mode=self.mode, transition=self.transition,
            transition_steps=self.transition_steps, unit=self.unit, warmup_steps=self.warmup_steps,
        )  # fmt: skip

    def _build(self, steps_per_epoch: int) -> StepDecay:
        steps = [to_steps(m, self.unit, steps_per_epoch) for m in self.milestones]
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError(
                f"GradualSchedule: `milestones`={self.milestones} epochs fall on optimizer steps {steps} "
                f"({steps_per_epoch} per epoch), which are not strictly increasing; space them further apart."
            )
        if self.transition == "instant":
            length = 1
        else:
            length = self.transition_steps if self.transition_steps is not None else max(1, steps_per_epoch)
        try:
            return StepDecay(tuple(steps), self.factor, self.mode, length, self.warmup_steps)
        except ValueError as err:
            raise ValueError(f"GradualSchedule (milestones at optimizer steps {steps}): {err}") from err

    def _check(self, writer: SPAScheduleCallback) -> None:
        assert isinstance(self.schedule, StepDecay) and writer._start is not None
        schedules = writer._schedules()
        total = writer._total_steps
        last = self.schedule.milestones[-1] if self.schedule.milestones else None
        if last is not None and last >= total:
            rank_zero_warn(
                f"GradualSchedule: milestone at optimizer step {last} is beyond this run's {int(total)} steps; "
                "it will not be reached."
            )
        starts = [s for groups in writer._start for s in groups]
        for opt_index, groups in enumerate(writer._start):
            for g, (eta0, c0) in enumerate(groups):
                overflow = find_momentum_overflow(schedules, eta0, c0, total, only=self.schedule)
                if overflow is None:
                    continue
                where = f"optimizer step {overflow.step} (param group {g} of optimizer {opt_index}, c0={c0:g})"
                if self.transition == "instant":
                    rank_zero_warn(
                        f"GradualSchedule(transition='instant'): the equivalent SGD+M momentum "
                        f"(1-c_prev)*eta_prev/eta reaches {overflow.momentum:.4g} at {where}: expect the loss spike "
                        "of paper Figure 4. Use transition='geometric' to avoid it."
                    )
                    return
                others = [s for s in schedules if s is not self.schedule]
                safe = smallest_safe_transition_steps(self.schedule, others, starts, total)
                advice = (
                    f"the smallest safe transition_steps is {safe}"
                    if safe is not None
                    else "no transition_steps that fits between the milestones is safe; space the milestones "
                    "further apart or use a factor closer to 1"
                )
                raise ValueError(
                    f"GradualSchedule: with transition_steps={self.schedule.transition_steps} the equivalent SGD+M "
                    f"momentum (1-c_prev)*eta_prev/eta reaches {overflow.momentum:.6g} (>= 1) at {where}; {advice}."
                )


class MomentumOff(SPAScheduleCallback):
    r"""Turns momentum off: ``c`` goes to 1 while ``eta`` is kept (paper Figure 3, Figure 1d).

    From optimizer step ``m`` (``after_epochs`` converted with ``unit``) step ``m + j`` uses
    ``c0 * (1/c0)**((j+1)/T)`` with ``T = transition_steps`` (0 or 1: instant). In torch SGD
    terms the learning rate becomes ``lr / (1 - momentum)`` and the momentum 0: the effective
    step is kept, the momentum removed. Works on :class:`~lightning_spa.SPA` and
    ``torch.optim.SGD(momentum=...)``, per param group; composes with :class:`GradualSchedule`
    (``c`` is the larger of the two). Pure function of the optimizer step: resumes are
    bit-exact and DDP ranks agree without any collective.

    Args:
        after_epochs: when momentum starts to go, in ``unit`` (epochs may be fractional).
        transition_steps: optimizer steps over which ``c`` rises geometrically to 1; 0 is instant.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps) for ``after_epochs``.

    Raises:
        ValueError: at construction, invalid arguments; at fit start, an unsupported optimizer
            setting or an LR scheduler on the same optimizer.
        TypeError: at fit start, an optimizer other than SPA or torch SGD.

    Example::

        trainer = pl.Trainer(max_epochs=10, callbacks=[MomentumOff(after_epochs=1)])
    """

    def __init__(
        self, after_epochs: float = 1, transition_steps: int = 0, unit: Literal["epoch", "step"] = "epoch"
    ) -> None:
        super().__init__()
        check_unit(unit)
        if not (math.isfinite(float(after_epochs)) and float(after_epochs) >= 0):
            raise ValueError(f"`after_epochs` must be finite and >= 0, got {after_epochs}.")
        if unit == "step" and float(after_epochs) != int(after_epochs):
            raise ValueError(f"`after_epochs` in optimizer steps (unit='step') must be an integer, got {after_epochs}.")
        if isinstance(transition_steps, bool) or not isinstance(transition_steps, int) or transition_steps < 0:
            raise ValueError(f"`transition_steps` must be an integer >= 0 (0: instant), got {transition_steps!r}.")
        self.after_epochs = float(after_epochs)
        self.transition_steps = transition_steps
        self.unit = unit

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            after_epochs=self.after_epochs, transition_steps=self.transition_steps, unit=self.unit
        )

    def _build(self, steps_per_epoch: int) -> MomentumRemoval:
        return MomentumRemoval(to_steps(self.after_epochs, self.unit, steps_per_epoch), self.transition_steps)
