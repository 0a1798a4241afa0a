r"""Lightning callbacks for the paper's schedules: :class:`GradualSchedule` and :class:`MomentumOff`.

Thin adapters over :mod:`lightning_spa.schedule` (the math, as pure functions of the optimizer
step) and :mod:`lightning_spa.callbacks._adapter` (Theorem 1 on SPA or torch SGD param groups);
the hooks they share live in :mod:`lightning_spa.callbacks._schedule_base`.

Which optimizers. ``optimizers=None`` (default) schedules every SPA and torch SGD+M optimizer
of the module and skips the others with one warning; ``optimizers=[0]`` or
``optimizers=["generator"]`` selects by index in ``configure_optimizers`` or by name (class name,
or a param group's ``"name"``); an explicitly selected unsupported optimizer is an error
(:mod:`lightning_spa.callbacks._select`).

How they compose. All schedule callbacks that target an optimizer act as one schedule, defined
by the schedules alone, not by the order of the callbacks: ``eta`` factors multiply and ``c`` is
the largest requested value (:func:`~lightning_spa.schedule.compose`). So ``GradualSchedule`` and
``MomentumOff`` together give ``eta0 * factor**i`` with ``c = max(c_gradual, c_off)``.

Step index: one clock per optimizer, counting its optimizer steps actually taken (so
``accumulate_grad_batches`` shifts nothing, and a step skipped by the AMP grad scaler, by an
``optimizer_step`` override or in manual optimization does not advance it: a transition resumes
where it was, and torch SGD's momentum is computed from the previous step taken, so it stays
below 1); saved in the checkpoint. Right after each step the values of the next one are
written, so loggers and other callbacks always see the values the coming step uses. They depend
on the clock and each param group's starting values only (a group added mid-run starts from its
own values at the step it joins), so a resumed run continues bit-exactly and every DDP rank
computes the same values with no collective.

With Lightning's other features. The callbacks set up at ``on_train_start`` (after any checkpoint
is restored, so a mid-epoch resume with a stateful dataloader is bit-exact). On SPA a momentum
removal (``MomentumOff``, ``MeasuredMomentumOff``) writes ``c`` only: an LR scheduler,
``Tuner.lr_find``'s lr or SWA's ``SWALR`` owns ``eta``. ``GradualSchedule`` writes ``eta``, and on
torch SGD every schedule writes ``lr`` and ``momentum``: an LR scheduler on such an optimizer is
refused at fit start (the message names ``SPA.from_sgdm``). ``StochasticWeightAveraging``: from
its first epoch ``SWALR`` writes the lr (on SPA, ``eta``; its ``swa_lrs`` are etas) while ``c``
keeps following the schedules (SPA) or the momentum stays what the schedules left (torch SGD); a
schedule that would still change what SWA owns is refused at fit start. Manual optimization:
``unit="epoch"`` means the Trainer's epochs for every optimizer; an optimizer that steps on some
batches only has its epochs converted with its own steps in the first epoch (one step per batch
until then; saved in the checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from itertools import pairwise
from typing import Any, Literal

from lightning_spa import _lightning as pl
from lightning_spa._lightning import rank_zero_warn
from lightning_spa.callbacks._adapter import OptimizerClock
from lightning_spa.callbacks._guard import GuardRunner, check_guard
from lightning_spa.callbacks._schedule_base import SPAScheduleCallback, check_length, check_unit, to_steps
from lightning_spa.callbacks._select import OptimizerSelection
from lightning_spa.guard import MomentumGuard
from lightning_spa.meter import MomentumMeter, Reading
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
    both follow the same trajectory, also across skipped steps and parameters without a
    gradient). Each param group is scheduled relative to its own starting values (a group added
    mid-run, from the step it joins). Composes with :class:`MomentumOff` regardless of callback
    order (see the module docstring); an LR scheduler on the same optimizer is refused (it would
    write eta too). The
    values are pure functions of the optimizer's step count: resumes are bit-exact and DDP ranks
    agree without any collective.

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
            uses ``eta * (k+1)/warmup_steps``. With ``milestones=[]`` the callback is a warm-up only.
        optimizers: which optimizers to schedule: None (every SPA / torch SGD+M optimizer; others
            skipped with a warning), or a list of indices into ``configure_optimizers``'s
            optimizers and names (an optimizer class name, or a param group's ``"name"``).

    Raises:
        ValueError: at construction, for invalid arguments (``milestones=[]`` without
            ``warmup_steps``: nothing to do); at fit start, for an unsupported optimizer setting,
            an LR scheduler on the same optimizer, transitions that overlap, or a geometric
            transition so fast that the equivalent momentum ``(1 - c_{k-1}) * eta_{k-1} / eta_k``
            reaches 1 (the message gives the value, the step and the smallest safe
            ``transition_steps``).
        TypeError: at fit start, an explicitly selected optimizer other than SPA or torch SGD.

    Example::

        trainer = pl.Trainer(max_epochs=300, callbacks=[GradualSchedule(milestones=[150, 225])])
        GradualSchedule(milestones=[30], optimizers=["generator"])   # a GAN: the generator's SPA only

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
        optimizers: OptimizerSelection = None,
    ) -> None:
        super().__init__(optimizers)
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
        if not values and warmup_steps == 0:
            raise ValueError(
                "GradualSchedule(milestones=[]) with warmup_steps=0 would never change anything: give the epochs "
                "(or steps, unit='step') where eta decays, e.g. milestones=[150, 225], or a warmup_steps."
            )
        self.milestones = values
        self.factor = float(factor)
        self.mode = mode
        self.transition = transition
        self.transition_steps = transition_steps
        self.unit = unit
        self.warmup_steps = warmup_steps
        self._state_key = self._generate_state_key(
            milestones=self.milestones, factor=self.factor, mode=self.mode, transition=self.transition,
            transition_steps=self.transition_steps, unit=self.unit, warmup_steps=self.warmup_steps,
            optimizers=self.optimizers,
        )  # fmt: skip

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it several times a step: computed once

    def _build(self, steps_per_epoch: int) -> StepDecay:
        check_length(steps_per_epoch, self.unit, self.transition_steps, "GradualSchedule")
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

    def _check(self, clock: OptimizerClock) -> None:
        assert isinstance(self.schedule, StepDecay)
        schedules = clock.schedules
        total = self._total_steps
        last = self.schedule.milestones[-1] if self.schedule.milestones else None
        if last is not None and last >= total:
            rank_zero_warn(
                f"GradualSchedule: milestone at optimizer step {last} is beyond this run's {int(total)} steps; "
                "it will not be reached."
            )
        starts = [(g.eta0, g.c0) for g in clock.groups if g.joined == 0]
        for g, (eta0, c0, joined) in enumerate(clock.groups):
            overflow = find_momentum_overflow(schedules, eta0, c0, total, self.schedule, joined)
            if overflow is None:
                continue
            where = f"optimizer step {overflow.step} (param group {g} of optimizer {clock.index}, c0={c0:g})"
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
    ``c0 * (1/c0)**((j+1)/T)``. In torch SGD terms the learning rate becomes
    ``lr / (1 - momentum)`` and the momentum 0: the effective step is kept, the momentum removed.

    The default switch is gradual, over one epoch of optimizer steps (the paper's insight 3): an
    instant switch (``transition_steps=0``) gives the raw gradient ``1/c0`` times the learning
    rate in one step (10x for momentum 0.9; Figure 1d). It stays available and warns. Our
    reproduction of Figure 3 (``examples/reproduce/results/figure3.md``: digits CNN, 5 seeds,
    momentum off after epoch 1, SPA eta 1) does not separate the two: either switch diverged in
    1 of 5 seeds (which seed, and which switch, changes from run to run), because plain SGD at
    the resulting ``lr 1.0`` is at the edge of stability for that model; at eta 0.3 no seed
    diverged (``measured_off_eta0.3.md``).

    Works on :class:`~lightning_spa.SPA` and ``torch.optim.SGD(momentum=...)``, per param group
    (a group added mid-run from the step it joins); composes with :class:`GradualSchedule`
    regardless of callback order (``c`` is the larger of the two). Pure function of the
    optimizer's step count (and of the guard's saved state): resumes are bit-exact and DDP ranks
    agree without any collective.

    The guard (on by default; :class:`~lightning_spa.guard.MomentumGuard`, ``THEORY.md`` section
    11). Momentum can be what keeps a step size stable (on a quadratic of curvature ``L``: ``eta L <
    2 (2 - c) / c`` with momentum, ``eta L < 2`` without), so each optimizer's removal is watched:
    ``||g||^2`` (the gradient the optimizer receives, before clipping) is measured over the
    ``reference_steps`` (20) steps before ``m`` and smoothed (EMA, decay 0.9) over the transition
    and ``watch_steps`` after it (one epoch); when the smoothed value exceeds ``factor`` (10) times
    its level before the removal, or is not finite, the removal is **aborted**: ``c`` is back at its
    value before the removal from the next step, a console line says so and
    ``spa/momentum_off_aborted`` (the step of the abort; ``/opt<i>`` with several optimizers) is
    logged and put in ``trainer.callback_metrics``. It is **retried** (after a new reference) once
    ``eta`` has fallen to ``retry_factor`` (0.5) times its value at the abort, e.g. past a
    :class:`GradualSchedule` milestone (``spa/momentum_off_step`` logs the new start), never
    otherwise. Before the removal starts the guard also measures the alignment ratio over the
    reference window (:class:`~lightning_spa.meter.MomentumMeter`, the cheap measurement): momentum
    goes only where it is *idle*, the ratio in ``[low, high]`` (0.9, 1.25: the idle band of
    :class:`MeasuredMomentumOff`). Below, momentum damps (``THEORY.md`` section 10); above, it
    accelerates (the early phase, where the step is large): removing it there can kill a run faster
    than ``||g||^2`` can show (a ReLU net can die within two steps). The removal is then
    **postponed**: logged as an abort at its start (``c`` is back at ``c0`` from the next step), with
    a console line, and retried like an abort (once ``eta`` has halved), the retry checked again.
    Cost: one ``||g||^2`` and one host sync per watched step, one cheap measurement per reference
    step; nothing outside those. ``guard=False`` turns it off; ``guard=MomentumGuard(low=None,
    high=None)`` keeps only the ``||g||^2`` watch.

    Args:
        after_epochs: when momentum starts to go, in ``unit`` (epochs may be fractional). 0
            removes it from the first step (with a warning: the paper finds momentum helps most
            early, and ``c=1`` in the optimizer says the same thing directly).
        transition_steps: optimizer steps over which ``c`` rises geometrically to 1; None: one
            epoch of optimizer steps; 0 (or 1): instant, with a warning.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps) for ``after_epochs``.
        optimizers: which optimizers to schedule: None (every SPA / torch SGD+M optimizer; others
            skipped with a warning), or a list of indices into ``configure_optimizers``'s
            optimizers and names (an optimizer class name, or a param group's ``"name"``).
        guard: True (default): the guard above with its defaults; a
            :class:`~lightning_spa.guard.MomentumGuard` to choose its parameters; False: no guard.

    Raises:
        ValueError: at construction, invalid arguments; at fit start, an unsupported optimizer
            setting, an LR scheduler on the same torch SGD optimizer (on SPA only ``c`` is written: any
            LR scheduler may drive eta), or ``transition_steps=None`` with a dataloader that has no length.
        TypeError: at fit start, an explicitly selected optimizer other than SPA or torch SGD.

    Example::

        trainer = pl.Trainer(max_epochs=10, callbacks=[MomentumOff(after_epochs=1)])

        # LightningCLI YAML: over 200 optimizer steps, on the optimizer whose param group is named "generator"
        - class_path: lightning_spa.MomentumOff
          init_args: {after_epochs: 1, transition_steps: 200, optimizers: [generator]}
    """

    def __init__(
        self,
        after_epochs: float = 1,
        transition_steps: int | None = None,
        unit: Literal["epoch", "step"] = "epoch",
        optimizers: OptimizerSelection = None,
        guard: bool | MomentumGuard = True,
    ) -> None:
        super().__init__(optimizers)
        check_unit(unit)
        template = check_guard(guard, "MomentumOff")
        self.guard = template
        self._guards = None if template is None else GuardRunner("MomentumOff", template)
        self._per_epoch = 0
        # the guard's idle check: per optimizer, the meter of the alignment ratio over its reference window
        self._meters: dict[int, MomentumMeter] = {}
        self._loaded_meters: dict[int, dict[str, Any]] = {}
        if not (math.isfinite(float(after_epochs)) and float(after_epochs) >= 0):
            raise ValueError(f"`after_epochs` must be finite and >= 0, got {after_epochs}.")
        if unit == "step" and float(after_epochs) != int(after_epochs):
            raise ValueError(f"`after_epochs` in optimizer steps (unit='step') must be an integer, got {after_epochs}.")
        if transition_steps is not None and (
            isinstance(transition_steps, bool) or not isinstance(transition_steps, int) or transition_steps < 0
        ):
            raise ValueError(
                f"`transition_steps` must be None (one epoch) or an integer >= 0 (0: instant): {transition_steps!r}."
            )
        if float(after_epochs) == 0:
            rank_zero_warn(
                "MomentumOff(after_epochs=0) removes momentum from the first optimizer step (c reaches 1 after "
                "transition_steps steps), so the run trains without momentum; the paper finds momentum helps most "
                "early (Figure 3). If that is what you want, build the optimizer with c=1 (SPA) or momentum=0."
            )
        self.after_epochs = float(after_epochs)
        self.transition_steps = transition_steps
        self.unit = unit
        self._state_key = self._generate_state_key(
            after_epochs=self.after_epochs, transition_steps=self.transition_steps, unit=self.unit,
            optimizers=self.optimizers,
        )  # fmt: skip

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it several times a step: computed once

    def _build(self, steps_per_epoch: int) -> MomentumRemoval:
        check_length(steps_per_epoch, self.unit, self.transition_steps, "MomentumOff")
        length = self.transition_steps if self.transition_steps is not None else steps_per_epoch
        self._per_epoch = steps_per_epoch
        return MomentumRemoval(to_steps(self.after_epochs, self.unit, steps_per_epoch), length)

    def _schedule_for(self, index: int) -> Any:
        # Guarded: one removal per optimizer, whose start and aborts are that optimizer's guard's.
        assert isinstance(self.schedule, MomentumRemoval)
        if self._guards is None:
            return self.schedule
        removal = self.schedule
        return self._guards.bind(index, removal.transition_steps, self._per_epoch, removal.start)

    def _schedule_on(self, index: int) -> Any:
        return self.schedule if self._guards is None else self._guards.removals[index]

    def _rebind(self, index: int, built: Any, per_epoch: int) -> Any:
        # Manual optimization: the removal re-timed for this optimizer; its guard keeps what it read so far.
        if self._guards is None:
            return built
        return self._guards.rebind(index, built.transition_steps, per_epoch, built.start)

    def _check(self, clock: OptimizerClock) -> None:
        assert isinstance(self.schedule, MomentumRemoval)
        if self.schedule.transition_steps > 1 or self.schedule.start >= self._total_steps:
            return
        c0 = min(g.c0 for g in clock.groups)
        if c0 < 1.0:
            rank_zero_warn(
                f"MomentumOff(transition_steps={self.transition_steps}) switches momentum off at once at optimizer "
                f"step {self.schedule.start} of optimizer {clock.index}: the raw gradient then gets {1 / c0:.3g}x the "
                "learning rate (1/c0) in one step (paper Figure 1d). Use the default transition_steps=None (one epoch) "
                "for a gradual switch."
            )

    # ----- the guard ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._guards is not None:  # a resumed run holds what the uninterrupted one would
            self._guards.publish(trainer)

    def _start(self, trainer: pl.Trainer) -> None:
        # Before the clocks hook the optimizers: a meter's reading of a step reaches the guard before the clock
        # writes the next one. The guards learn the optimizers here, where the clocks exist (several: /opt<i> names).
        if self._guards is not None:
            self._guards.start_fit(trainer, self._clocks)
        self._detach_meters()
        template = None if self._guards is None else self._guards.template
        if template is None or (template.low is None and template.high is None):
            return
        for index, clock in self._clocks.items():  # measured on the steps the guard asks for (wants_ratio)
            state = self._loaded_meters.pop(index, None)
            listener = partial(self._on_ratio, index)
            self._meters[index] = MomentumMeter.ratio_only(clock.optimizer, template.ema_decay, state, listener)
        self._loaded_meters = {}

    def _on_ratio(self, index: int, reading: Reading) -> None:
        if self._guards is not None and index in self._guards.guards:
            self._guards.guards[index].observe_ratio(reading.step, reading.ratio)

    def _detach_meters(self) -> None:
        for meter in self._meters.values():
            meter.detach()
        self._meters = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._guards is None:
            return
        clock = self._clock_of(optimizer)
        if clock is None:
            return
        index = clock.index
        self._guards.before_step(index, clock)
        meter, guard = self._meters.get(index), self._guards.guards.get(index)
        if meter is not None and guard is not None and guard.wants_ratio(clock.steps):
            meter.measure_next_step()
            meter.before_step()  # the first half now; the meter's step post-hook finishes it

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._guards is not None:
            self._guards.end_fit()
        self._loaded_meters = {i: m.state_dict() for i, m in self._meters.items()}  # for a later fit's set-up
        self._detach_meters()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state and self._guards is not None:  # nothing before the first set-up (see the base class)
            state["guards"] = self._guards.state_dict()
            meters = {str(i): m.state_dict() for i, m in self._meters.items()}
            state["ratio_meters"] = meters or {str(i): s for i, s in self._loaded_meters.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._guards is not None:
            self._guards.load_state_dict(state_dict.get("guards", {}), self._in_fit and bool(self._clocks))
            meters = {int(i): s for i, s in state_dict.get("ratio_meters", {}).items()}
            if self._meters:  # a fit that is set up: apply now
                for index, meter_state in meters.items():
                    if index in self._meters:
                        self._meters[index].load_state_dict(meter_state)
            else:
                self._loaded_meters = meters
