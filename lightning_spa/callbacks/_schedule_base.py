"""The machinery shared by the schedule callbacks (see :mod:`lightning_spa.callbacks.schedules`).

Optimizer checks, starting values per param group, composition of every schedule callback of
the trainer by the first of them (the writer), and the writes before each optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer

from lightning_spa import _lightning as pl
from lightning_spa._lightning import Callback, rank_zero_warn, unwrap_optimizer
from lightning_spa.callbacks._adapter import (
    OptimizerKind,
    optimizer_kind,
    read_group_values,
    read_start_values,
    write_spa_terms,
)
from lightning_spa.schedule import SPASchedule, compose

__all__ = ["SPAScheduleCallback", "check_unit", "to_steps"]


def check_unit(unit: str) -> None:
    if unit not in ("epoch", "step"):
        raise ValueError(f"`unit` must be 'epoch' or 'step', got {unit!r}.")


def to_steps(value: float, unit: str, steps_per_epoch: int) -> int:
    return int(value) if unit == "step" else round(float(value) * steps_per_epoch)


class SPAScheduleCallback(Callback):
    """Shared machinery: optimizer checks, starting values, composition and writing (see the module docstring)."""

    def __init__(self) -> None:
        self.schedule: SPASchedule | None = None
        self._start: list[list[tuple[float, float]]] | None = None  # per optimizer, per group: (eta0, c0)
        self._loaded_start: list[list[tuple[float, float]]] | None = None
        self._loaded_counts: list[int] | None = None
        self._counts: list[int] = []  # per-optimizer steps (several optimizers, manual optimization)
        self._kinds: list[OptimizerKind] = []
        self._peers: list[SPAScheduleCallback] = []
        self._written: dict[tuple[int, int], dict[str, float]] = {}
        self._total_steps: float = math.inf
        self._in_fit = False  # between on_fit_start and teardown: a loaded state applies at once

    # ----- to implement -------------------------------------------------------------------
    def _build(self, steps_per_epoch: int) -> SPASchedule:
        raise NotImplementedError

    def _check(self, writer: SPAScheduleCallback) -> None:
        """Checks of this callback's schedule against the composition ``writer`` will write (optional)."""

    # ----- helpers ------------------------------------------------------------------------
    @property
    def _name(self) -> str:
        return type(self).__name__

    @staticmethod
    def _steps_per_epoch(trainer: pl.Trainer) -> tuple[int, float]:
        total = float(trainer.estimated_stepping_batches)
        if trainer.train_dataloader is None:  # not set up yet when max_steps alone bounds the run
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return 0, total
        per_epoch = batches
        if trainer.lightning_module.automatic_optimization:
            per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        return max(1, int(per_epoch)), total

    def _ensure_built(self, trainer: pl.Trainer) -> None:
        if self.schedule is not None:
            return
        steps_per_epoch, self._total_steps = self._steps_per_epoch(trainer)
        if steps_per_epoch == 0 and getattr(self, "unit", "step") == "epoch":
            raise ValueError(
                f"{self._name}: the training dataloader has no length, so epochs cannot be converted to optimizer "
                "steps; use unit='step'."
            )
        self.schedule = self._build(steps_per_epoch)

    def _optimizers(self, trainer: pl.Trainer) -> list[Optimizer]:
        return list(trainer.optimizers)

    # ----- hooks --------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit = True
        self.schedule = None
        self._ensure_built(trainer)
        optimizers = self._optimizers(trainer)
        if not optimizers:
            raise ValueError(f"{self._name}: the LightningModule configured no optimizer to schedule.")
        self._kinds = [optimizer_kind(opt, self._name) for opt in optimizers]
        # on_fit_start runs before the optimizer state is restored: these are the configured values.
        fresh = [read_start_values(opt, kind) for opt, kind in zip(optimizers, self._kinds, strict=True)]
        if self._loaded_start is not None:
            if [len(g) for g in self._loaded_start] != [len(g) for g in fresh]:
                raise ValueError(
                    f"{self._name}: the checkpoint was saved with param groups {[len(g) for g in self._loaded_start]} "
                    f"per optimizer, but this run has {[len(g) for g in fresh]}."
                )
            if self._loaded_start != fresh:
                rank_zero_warn(f"{self._name}: resuming with the starting (eta, c) of the checkpoint, not {fresh}.")
            self._start = self._loaded_start
        else:
            self._start = fresh
        self._loaded_start = None
        counts = self._loaded_counts
        self._counts = counts if counts is not None and len(counts) == len(optimizers) else [0] * len(optimizers)
        self._loaded_counts = None
        self._written = {}
        peers = [cb for cb in trainer.callbacks if isinstance(cb, SPAScheduleCallback)]  # type: ignore[attr-defined]
        self._peers = peers if peers and peers[0] is self else []
        if not self._peers:
            return
        for peer in peers:
            peer._ensure_built(trainer)
        for config in trainer.lr_scheduler_configs:
            if any(config.scheduler.optimizer is opt for opt in optimizers):  # type: ignore[union-attr]
                raise ValueError(
                    f"{self._name} writes the learning rate of every optimizer step, so it would overwrite "
                    f"{type(config.scheduler).__name__} on the same optimizer. Remove that scheduler from "
                    "configure_optimizers and express it with the schedule callbacks (several GradualSchedule / "
                    "MomentumOff callbacks compose: eta factors multiply, c is the largest; mode='lr' changes eta "
                    "only), or drop the callback and keep the scheduler."
                )
        for peer in peers:
            peer._check(self)

    def _step_index(self, trainer: pl.Trainer, index: int) -> int:
        if len(self._counts) > 1:
            return self._counts[index]
        return trainer.global_step

    def _schedules(self) -> list[SPASchedule]:
        return [peer.schedule for peer in self._peers if peer.schedule is not None]

    def _write(self, trainer: pl.Trainer, index: int, optimizer: Optimizer) -> None:
        assert self._start is not None
        k = self._step_index(trainer, index)
        schedules = self._schedules()
        kind = self._kinds[index]
        for g, (group, (eta0, c0)) in enumerate(zip(optimizer.param_groups, self._start[index], strict=True)):
            last = self._written.get((index, g))
            if last is not None and read_group_values(group, tuple(last)) != last:
                raise RuntimeError(
                    f"{self._name}: param group {g} of optimizer {index} was changed between optimizer steps by "
                    f"something else (now {read_group_values(group, tuple(last))}, written {last}): an LR scheduler, "
                    "another callback or user code. Schedule it through the schedule callbacks only."
                )
            eta, c = compose(schedules, k, eta0, c0)
            prev = compose(schedules, k - 1, eta0, c0) if k > 0 else None
            self._written[(index, g)] = write_spa_terms(group, kind, eta, c, prev)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Write early too, so loggers such as LearningRateMonitor see the values of the coming step.
        if self._peers and len(self._counts) == 1:
            self._write(trainer, 0, trainer.optimizers[0])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._peers:
            return
        raw = unwrap_optimizer(optimizer)
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is raw), None)
        if index is None:
            raise RuntimeError(f"{self._name}: an optimizer that was not configured at fit start is being stepped.")
        self._write(trainer, index, raw)
        if len(self._counts) > 1:
            self._counts[index] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"start": self._start, "counts": list(self._counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        start = state_dict.get("start")
        self._loaded_start = [[(float(e), float(c)) for e, c in groups] for groups in start] if start else None
        self._loaded_counts = [int(n) for n in state_dict.get("counts", [])]
        if self._in_fit:  # strategies that restore after setup load the state after on_fit_start
            if self._loaded_start is not None:
                self._start = self._loaded_start
            if len(self._loaded_counts) == len(self._counts):
                self._counts = self._loaded_counts

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._in_fit = False
