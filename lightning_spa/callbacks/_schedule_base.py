"""The Lightning side shared by the schedule callbacks (see :mod:`lightning_spa.callbacks.schedules`).

At train start (``on_train_start``: after any checkpoint is restored and once the fit loop has loaded
the training dataloader, so nothing here moves a resumed stateful dataloader) the first schedule
callback in ``trainer.callbacks`` sets up all of them: each one builds its schedule and selects its
optimizers (:func:`~lightning_spa.callbacks._select.select_optimizers`), and every selected optimizer
gets one :class:`~lightning_spa.callbacks._adapter.OptimizerClock` shared by all callbacks that
target it, composing their schedules in a canonical order (so the order of the callbacks changes
nothing). The clocks hook the optimizers; the callbacks only check the setup (LR schedulers:
:func:`check_scheduler`; ``StochasticWeightAveraging``: :func:`check_swa`), write the first values,
hand the lr over to SWA's ``SWALR`` at its first epoch, count each optimizer's steps in the first
epoch under manual optimization (``unit="epoch"`` is the Trainer's epochs for every optimizer), and
save the clocks in checkpoints.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from lightning_spa import _lightning as pl
from lightning_spa._lightning import Callback, rank_zero_warn, unwrap_optimizer
from lightning_spa.callbacks._adapter import OptimizerClock
from lightning_spa.callbacks._select import (
    OptimizerSelection,
    Selected,
    check_selection,
    is_instance_by_name,
    select_optimizers,
    warn_lr_monitor_momentum,
)
from lightning_spa.schedule import MomentumRemoval, SPASchedule, StepDecay, changes_eta, settled_from

__all__ = ["SPAScheduleCallback", "check_length", "check_scheduler", "check_swa", "check_unit", "to_steps"]


def check_unit(unit: str) -> None:
    if unit not in ("epoch", "step"):
        raise ValueError(f"`unit` must be 'epoch' or 'step', got {unit!r}.")


def to_steps(value: float, unit: str, steps_per_epoch: int) -> int:
    return int(value) if unit == "step" else round(float(value) * steps_per_epoch)


def check_length(steps_per_epoch: int, unit: str, transition_steps: int | None, owner: str) -> None:
    """Epochs (``unit='epoch'``, or ``transition_steps=None``: one epoch) need a dataloader with a length."""
    if steps_per_epoch == 0 and (unit == "epoch" or transition_steps is None):
        raise ValueError(
            f"{owner}: the training dataloader has no length, so epochs cannot be converted to optimizer steps; "
            "use unit='step' and give transition_steps."
        )


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps per epoch of one optimizer (0 when the dataloader has no length)."""
    if trainer.train_dataloader is None:  # not set up yet when max_steps alone bounds the run
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return 0
    if trainer.lightning_module.automatic_optimization:
        batches = math.ceil(batches / trainer.accumulate_grad_batches)
    return max(1, int(batches))


def scheduler_source(trainer: pl.Trainer, scheduler: Any) -> str:
    """Where ``scheduler`` came from, for messages: LightningCLI's ``--lr_scheduler`` or ``configure_optimizers``."""
    # LightningCLI (auto_configure_optimizers) replaces the module's configure_optimizers by a bound
    # functools.partial of its own configure_optimizers holding the optimizer and the lr_scheduler it built.
    method = vars(trainer.lightning_module).get("configure_optimizers")
    func = getattr(method, "__func__", None)
    if isinstance(func, functools.partial) and func.keywords.get("lr_scheduler") is scheduler:
        return "LightningCLI's --lr_scheduler (its configure_optimizers steps it once per epoch)"
    return "configure_optimizers"


def check_scheduler(clock: OptimizerClock, scheduler: Any, trainer: pl.Trainer) -> None:
    """Refuses an LR scheduler on ``clock``'s optimizer when the clock writes the lr (see ``_adapter``).

    On SPA a clock that only moves ``c`` (momentum removal) leaves the lr to the scheduler: accepted.
    """
    if "lr" not in clock.written_keys:
        return
    name, source = type(scheduler).__name__, scheduler_source(trainer, scheduler)
    decay = (
        "express the decay with GradualSchedule (several GradualSchedule / MomentumOff callbacks compose: eta "
        "factors multiply, c is the largest; mode='lr' changes eta only), or keep the scheduler and drop "
        "GradualSchedule (MomentumOff and MeasuredMomentumOff compose with any LR scheduler on SPA)"
    )
    if clock.kind == "spa":
        raise ValueError(
            f"{clock.owner} writes eta (the lr) of every step of optimizer {clock.index} (GradualSchedule changes "
            f"it), so it would overwrite {name} from {source} on the same optimizer. Keep one of the two: {decay}; "
            "or target other optimizers with `optimizers=`."
        )
    spa_way = (
        "Build the optimizer as lightning_spa.SPA.from_sgdm(params, lr=..., momentum=...) instead (the same "
        "trajectory; its lr is eta = lr / (1 - momentum) and c = 1 - momentum; in a LightningCLI YAML: optimizer "
        "class_path lightning_spa.SPA with init_args lr: <lr / (1 - momentum)>, c: <1 - momentum>): on SPA, "
        "MomentumOff and MeasuredMomentumOff write c only and leave the lr to the scheduler"
    )
    if clock.writes_eta and any(changes_eta(s) for s in clock.schedules):
        spa_way += f" (GradualSchedule writes eta on SPA too: {decay})"
    raise ValueError(
        f"{clock.owner} writes the lr and the momentum of every step of torch.optim.SGD optimizer {clock.index} "
        f"(removing momentum with eta = lr / (1 - momentum) kept needs both), so it would overwrite {name} from "
        f"{source} on the same optimizer. {spa_way}. Or target other optimizers with `optimizers=`."
    )


def check_swa(clock: OptimizerClock, swa_start: int, per_epoch: int) -> None:
    """Refuses schedules that would still change what ``clock`` hands over to SWA's SWALR from epoch ``swa_start``.

    From SWA's first epoch (optimizer step ``swa_start * per_epoch``) SWALR writes the lr. On SPA the clock keeps
    writing ``c`` (momentum removal goes on), so only a change of ``eta`` after that step would be lost; on torch
    SGD the momentum must stay what it is (changing it keeps eta only with the lr), so any change would be.
    """
    handover = swa_start * per_epoch
    relevant = [s for s in clock.schedules if clock.kind == "sgd" or changes_eta(s)]
    late = [s for s in relevant if settled_from(s) >= handover]
    if not late:
        return
    settled = max(settled_from(s) for s in late)
    what = "eta (GradualSchedule)" if clock.kind == "spa" else "the lr or the momentum"
    until = (
        "at a step only known during the run (MeasuredMomentumOff)"
        if math.isinf(settled)
        else (f"until its optimizer step {int(settled)}")
    )
    fix = (
        "let GradualSchedule's milestones and transitions (and warmup_steps) end before swa_epoch_start, or start "
        "SWA later"
        if clock.kind == "spa"
        else "let every schedule end before swa_epoch_start (MomentumOff: after_epochs and transition_steps; its "
        "guard watches one epoch after c reaches 1: MomentumOff(guard=MomentumGuard(watch_steps=0)) ends the watch "
        "with the removal), start SWA later, or build the optimizer as lightning_spa.SPA.from_sgdm(...): on SPA "
        "momentum removal writes c only, so it goes on under SWALR"
    )
    raise ValueError(
        f"{clock.owner} changes {what} of optimizer {clock.index} ({clock.kind.upper()}) {until}, but "
        f"StochasticWeightAveraging's SWALR writes its learning rate from epoch {swa_start} (optimizer step "
        f"{handover}) on, and the schedule hands the lr over to it there. {fix[0].upper()}{fix[1:]}."
    )


class SPAScheduleCallback(Callback):
    """Base of the schedule callbacks: setup, checks and checkpointing (see the module docstring).

    Args:
        optimizers: which optimizers to schedule (:mod:`lightning_spa.callbacks._select`).
    """

    def __init__(self, optimizers: OptimizerSelection = None) -> None:
        self.optimizers = check_selection(optimizers, type(self).__name__)
        self.schedule: SPASchedule | None = None
        self._selected: list[Selected] = []
        self._clocks: dict[int, OptimizerClock] = {}
        self._loaded: dict[int, dict[str, Any]] = {}
        self._owner = False  # the callback that set up the clocks (the first schedule callback)
        self._total_steps: float = math.inf
        self._in_fit = False
        self._swa: Any = None  # Lightning's StochasticWeightAveraging, when the fit has one
        self._per_epoch = 0  # optimizer steps per trainer epoch, as converted at the set-up (one per batch)
        self._manual = False

    # ----- to implement -------------------------------------------------------------------
    def _build(self, steps_per_epoch: int) -> SPASchedule:
        raise NotImplementedError

    def _schedule_for(self, index: int) -> SPASchedule:
        """This callback's schedule on optimizer ``index``: the one built at fit start, shared by all of them."""
        assert self.schedule is not None
        return self.schedule

    def _schedule_on(self, index: int) -> SPASchedule:
        """The schedule that ``_schedule_for(index)`` gave optimizer ``index``'s clock (the shared one here)."""
        assert self.schedule is not None
        return self.schedule

    def _rebind(self, index: int, built: SPASchedule, per_epoch: int) -> SPASchedule:
        """Optimizer ``index``'s schedule after ``_build(per_epoch)`` gave ``built`` (manual optimization)."""
        return built

    def _check(self, clock: OptimizerClock) -> None:
        """Checks of this callback's schedule on ``clock``'s composition (optional)."""

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _clock_of(self, optimizer: Any) -> OptimizerClock | None:
        """This callback's clock of ``optimizer`` (a torch optimizer or a ``LightningOptimizer``), or None.

        A look-up among this callback's clocks (its selected optimizers), for the per-step hooks: no walk of
        ``trainer.optimizers`` (a property chain through the strategy) on every step."""
        raw = unwrap_optimizer(optimizer)
        for clock in self._clocks.values():
            if clock.optimizer is raw:
                return clock
        return None

    # ----- setup --------------------------------------------------------------------------
    def _prepare(self, trainer: pl.Trainer) -> None:
        """Builds the schedule in optimizer steps and selects the optimizers."""
        self._total_steps = float(trainer.estimated_stepping_batches)
        self._per_epoch = steps_per_epoch(trainer)
        self.schedule = self._build(self._per_epoch)
        self._selected = select_optimizers(trainer, self.optimizers, self._name, "schedule")

    def _start(self, trainer: pl.Trainer) -> None:
        """Called on every schedule callback once the clocks are built, before they hook the optimizers."""

    def _retime(self, index: int, per_epoch: int, resumed: bool) -> bool:
        """Manual optimization: converts this callback's epochs for optimizer ``index`` with its ``per_epoch``.

        For callbacks whose schedule is not rebuilt from its arguments; returns whether it could (see
        ``_apply_rate``). ``resumed``: the rate comes from the checkpoint.
        """
        return False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit = True
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SPAScheduleCallback)]  # type: ignore[attr-defined]
        self._owner = peers[0] is self
        self._clocks, self._swa = {}, None
        # The set-up waits for on_train_start: converting epochs needs the training dataloader's length, and
        # loading it now (before the checkpoint's loop state is restored) would make Lightning restart a resumed
        # epoch's stateful dataloader from its beginning (a mid-epoch resume would not be exact).

    def _setup(self, trainer: pl.Trainer) -> None:
        """Run by the first schedule callback: builds every peer's schedule and the shared clocks, checks them."""
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SPAScheduleCallback)]  # type: ignore[attr-defined]
        for peer in peers:
            peer._prepare(trainer)
        clocks: dict[int, OptimizerClock] = {}
        for index in sorted({s.index for peer in peers for s in peer._selected}):
            members = [peer for peer in peers if any(s.index == index for s in peer._selected)]
            chosen = next(s for s in members[0]._selected if s.index == index)
            schedules = [peer._schedule_for(index) for peer in members if peer.schedule is not None]
            names = " + ".join(dict.fromkeys(peer._name for peer in members))
            clock = OptimizerClock(chosen.optimizer, chosen.kind, index, schedules, names, rank_zero_warn)
            clock.total_steps = self._total_steps
            clock.start(next((peer._loaded[index] for peer in members if index in peer._loaded), None))
            clocks[index] = clock
        for peer in peers:
            peer._clocks = {s.index: clocks[s.index] for s in peer._selected}
            peer._loaded = {}
        for config in trainer.lr_scheduler_configs:
            target = next((c for c in clocks.values() if config.scheduler.optimizer is c.optimizer), None)  # type: ignore[union-attr]
            if target is not None:
                check_scheduler(target, config.scheduler, trainer)
        # BackboneFinetuning rewrites the lr of the group it adds to the first optimizer at every epoch after it
        # unfreezes (an LR schedule of its own): refuse now rather than with a foreign-write error mid-run.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        finetuning = next((cb for cb in callbacks if is_instance_by_name(cb, "BackboneFinetuning")), None)
        if finetuning is not None and 0 in clocks and "lr" in clocks[0].written_keys:
            raise ValueError(
                f"{clocks[0].owner} writes the learning rate of every step of optimizer 0, but "
                f"{type(finetuning).__name__} also sets the backbone group's lr at every epoch after it unfreezes. "
                "Use a BaseFinetuning subclass whose finetune_function only calls unfreeze_and_add_param_group "
                "(the schedule callbacks then schedule the new group from its own starting lr), or target other "
                "optimizers with `optimizers=`."
            )
        swa = next((cb for cb in callbacks if is_instance_by_name(cb, "StochasticWeightAveraging")), None)
        if swa is not None and 0 in clocks:
            check_swa(clocks[0], int(swa.swa_start), steps_per_epoch(trainer))
            self._swa = swa
        for peer in peers:
            for clock in peer._clocks.values():
                peer._check(clock)
        warn_lr_monitor_momentum(trainer, [s for peer in peers for s in peer._selected], self._name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizer state (param groups included) and the loop state are restored by now, and the fit loop
        # has loaded the training dataloader: build the clocks and write the coming step's values.
        # Hooking the optimizers this late puts the clocks' post-step hooks after those other callbacks
        # registered at fit start, so those still see the values of the step just taken.
        if not self._owner:
            return
        self._setup(trainer)
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SPAScheduleCallback)]  # type: ignore[attr-defined]
        for peer in peers:
            peer._start(trainer)
        self._hand_over_to_swa(trainer)
        self._manual = not trainer.lightning_module.automatic_optimization
        for clock in dict.fromkeys(self._all_clocks(trainer)):
            if self._manual and clock.per_epoch is not None:  # resumed after the first epoch: its counted rate
                self._apply_rate(trainer, clock, clock.per_epoch, resumed=True)
            if trainer.ckpt_path and not clock.loaded:
                rank_zero_warn(
                    f"{clock.owner}: the checkpoint {trainer.ckpt_path} holds no schedule clock for optimizer "
                    f"{clock.index} (saved without these callbacks, or with other arguments), so its schedule starts "
                    "at step 0 again, from the lr and momentum/c the checkpoint restored into the param groups."
                )
            clock.write()
            clock.attach()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._owner:
            self._hand_over_to_swa(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Manual optimization: an optimizer may step on some batches only. `unit="epoch"` means the trainer's
        # epochs for every optimizer, so each one's epochs are converted with its own steps in the first epoch.
        if not (self._owner and self._manual and trainer.current_epoch == 0):
            return
        for clock in dict.fromkeys(self._all_clocks(trainer)):
            if clock.per_epoch is None and clock.steps > 0:
                self._apply_rate(trainer, clock, clock.steps)
                clock.write()  # the coming step's values at that rate

    def _apply_rate(self, trainer: pl.Trainer, clock: OptimizerClock, per_epoch: int, resumed: bool = False) -> None:
        """Rebuilds the epoch-based schedules of ``clock`` for ``per_epoch`` of its optimizer's steps per epoch.

        ``resumed``: the rate comes from the checkpoint (the steps taken before already used it).
        """
        clock.per_epoch = per_epoch
        if per_epoch == self._per_epoch:
            return
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SPAScheduleCallback)]  # type: ignore[attr-defined]
        members = [peer for peer in peers if clock.index in peer._clocks]
        rebuilt: dict[int, tuple[SPAScheduleCallback, SPASchedule, SPASchedule]] = {}
        for peer in members:
            epoch_based = getattr(peer, "unit", "step") == "epoch" or getattr(peer, "transition_steps", 0) is None
            if not epoch_based:
                continue
            if isinstance(peer.schedule, (StepDecay, MomentumRemoval)):  # built purely from the arguments
                current, built = peer._schedule_on(clock.index), peer._build(per_epoch)
                rebuilt[id(current)] = (peer, built, peer._rebind(clock.index, built, per_epoch))
            elif not peer._retime(clock.index, per_epoch, resumed):
                rank_zero_warn(
                    f"{peer._name}: optimizer {clock.index} took {per_epoch} steps in the trainer's first epoch of "
                    f"{self._per_epoch} batches; {peer._name} converts its epochs with {self._per_epoch} steps per "
                    "epoch for every optimizer. Give its arguments in optimizer steps (unit='step', transition_steps) "
                    "to time them for this optimizer."
                )
        if not rebuilt:
            return
        taken = range(0 if resumed else clock.steps)
        before = [clock.values(g, k) for g in range(len(clock.groups)) for k in taken]
        clock.schedules = sorted([rebuilt[id(s)][2] if id(s) in rebuilt else s for s in clock.schedules], key=repr)
        clock.writes_eta = clock.kind == "sgd" or any(changes_eta(s) for s in clock.schedules)
        if [clock.values(g, k) for g in range(len(clock.groups)) for k in taken] != before:
            rank_zero_warn(
                f"{clock.owner}: optimizer {clock.index} took {per_epoch} steps in the trainer's first epoch of "
                f"{self._per_epoch} batches, so its epochs are now converted with {per_epoch} steps per epoch; a point "
                "inside the first epoch was already converted with one step per batch. Give such points in "
                "optimizer steps (unit='step')."
            )
        for peer, schedule, _ in rebuilt.values():  # the fit-start checks, for this optimizer's schedule
            template, peer.schedule = peer.schedule, schedule
            try:
                peer._check(clock)
            finally:
                peer.schedule = template

    def _hand_over_to_swa(self, trainer: pl.Trainer) -> None:
        """From SWA's first epoch its SWALR writes optimizer 0's lr (``check_swa`` made sure nothing is lost)."""
        swa = self._swa
        if swa is None or trainer.current_epoch < int(swa.swa_start) or 0 not in self._clocks:
            return
        clock = self._clocks[0]
        if clock.lr_owner is None:
            clock.hand_over_lr(f"{type(swa).__name__}'s SWALR")

    def _all_clocks(self, trainer: pl.Trainer) -> list[OptimizerClock]:
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SPAScheduleCallback)]  # type: ignore[attr-defined]
        return [clock for peer in peers for clock in peer._clocks.values()]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._in_fit = False
        self._loaded = {}
        for clock in self._clocks.values():  # the clocks stay readable (and saved) after the fit
            clock.detach()

    # ----- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Nothing before the first set-up: Lightning then saves no entry (so Tuner.lr_find, which checkpoints before
        # it fits without the other callbacks, restores without "callbacks ... need to be provided").
        if not self._clocks:
            return {}
        return {"clocks": {str(i): clock.state_dict() for i, clock in self._clocks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Kept for the set-up at on_train_start (which follows every restore), and applied at once to the clocks
        # of a fit that is set up.
        self._loaded = {int(i): state for i, state in state_dict.get("clocks", {}).items()}
        if self._in_fit and self._clocks:
            for index, state in self._loaded.items():
                if index in self._clocks:
                    self._clocks[index].load_state_dict(state)
