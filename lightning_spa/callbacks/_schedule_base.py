"""The Lightning side shared by the schedule callbacks (see :mod:`lightning_spa.callbacks.schedules`).

At fit start the first schedule callback in ``trainer.callbacks`` sets up all of them: each one
builds its schedule and selects its optimizers (:func:`~lightning_spa.callbacks._select.select_optimizers`),
and every selected optimizer gets one :class:`~lightning_spa.callbacks._adapter.OptimizerClock`
shared by all callbacks that target it, composing their schedules in a canonical order (so the
order of the callbacks changes nothing). The clocks hook the optimizers; the callbacks only
check the setup, write the first values and hook the optimizers once the optimizer state is
restored (``on_train_start``), and save the clocks in checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_spa import _lightning as pl
from lightning_spa._lightning import Callback, rank_zero_warn
from lightning_spa.callbacks._adapter import OptimizerClock
from lightning_spa.callbacks._select import (
    OptimizerSelection,
    Selected,
    check_selection,
    is_instance_by_name,
    select_optimizers,
    warn_lr_monitor_momentum,
)
from lightning_spa.schedule import SPASchedule

__all__ = ["SPAScheduleCallback", "check_length", "check_unit", "to_steps"]


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

    # ----- to implement -------------------------------------------------------------------
    def _build(self, steps_per_epoch: int) -> SPASchedule:
        raise NotImplementedError

    def _schedule_for(self, index: int) -> SPASchedule:
        """This callback's schedule on optimizer ``index``: the one built at fit start, shared by all of them."""
        assert self.schedule is not None
        return self.schedule

    def _check(self, clock: OptimizerClock) -> None:
        """Checks of this callback's schedule on ``clock``'s composition (optional)."""

    @property
    def _name(self) -> str:
        return type(self).__name__

    # ----- setup --------------------------------------------------------------------------
    def _prepare(self, trainer: pl.Trainer) -> None:
        """Builds the schedule in optimizer steps and selects the optimizers."""
        self._total_steps = float(trainer.estimated_stepping_batches)
        per_epoch = steps_per_epoch(trainer)
        self.schedule = self._build(per_epoch)
        self._selected = select_optimizers(trainer, self.optimizers, self._name, "schedule")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit = True
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SPAScheduleCallback)]  # type: ignore[attr-defined]
        self._owner = peers[0] is self
        if not self._owner:
            return  # the first schedule callback set this one up
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
                raise ValueError(
                    f"{target.owner} writes the learning rate of every step of optimizer {target.index}, so it would "
                    f"overwrite {type(config.scheduler).__name__} on the same optimizer. Remove that scheduler from "
                    "configure_optimizers and express it with the schedule callbacks (several GradualSchedule / "
                    "MomentumOff callbacks compose: eta factors multiply, c is the largest; mode='lr' changes eta "
                    "only), target other optimizers with `optimizers=`, or drop the callback and keep the scheduler."
                )
        # BackboneFinetuning rewrites the lr of the group it adds to the first optimizer at every epoch after it
        # unfreezes (an LR schedule of its own): refuse now rather than with a foreign-write error mid-run.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        finetuning = next((cb for cb in callbacks if is_instance_by_name(cb, "BackboneFinetuning")), None)
        if finetuning is not None and 0 in clocks:
            raise ValueError(
                f"{clocks[0].owner} writes the learning rate of every step of optimizer 0, but "
                f"{type(finetuning).__name__} also sets the backbone group's lr at every epoch after it unfreezes. "
                "Use a BaseFinetuning subclass whose finetune_function only calls unfreeze_and_add_param_group "
                "(the schedule callbacks then schedule the new group from its own starting lr), or target other "
                "optimizers with `optimizers=`."
            )
        for peer in peers:
            for clock in peer._clocks.values():
                peer._check(clock)
        warn_lr_monitor_momentum(trainer, [s for peer in peers for s in peer._selected], self._name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizer state (param groups included) is restored by now: write the coming step's values.
        # Hooking the optimizers this late puts the clocks' post-step hooks after those other callbacks
        # registered at fit start, so those still see the values of the step just taken.
        if not self._owner:
            return
        for clock in dict.fromkeys(self._all_clocks(trainer)):
            if trainer.ckpt_path and not clock.loaded:
                rank_zero_warn(
                    f"{clock.owner}: the checkpoint {trainer.ckpt_path} holds no schedule clock for optimizer "
                    f"{clock.index} (saved without these callbacks, or with other arguments), so its schedule starts "
                    "at step 0 again, from the lr and momentum/c the checkpoint restored into the param groups."
                )
                # The starting values read at fit start were configure_optimizers' own; the checkpoint's (a torch
                # SGD state converted by Theorem 1, a decayed lr) replaced them since. write() reads them again
                # (as groups joining at step 0, with the same safety check).
                clock.groups = []
            clock.write()
            clock.attach()

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
        return {"clocks": {str(i): clock.state_dict() for i, clock in self._clocks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Kept for on_fit_start (the usual order), and applied at once to the clocks of a fit that is set up
        # (strategies that restore after setup load the state after on_fit_start).
        self._loaded = {int(i): state for i, state in state_dict.get("clocks", {}).items()}
        if self._in_fit:
            for index, state in self._loaded.items():
                if index in self._clocks:
                    self._clocks[index].load_state_dict(state)
