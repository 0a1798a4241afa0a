r"""One optimizer under the schedule callbacks: its clock, and ``(eta, c)`` written as Theorem 1 says.

Two optimizers are supported (:mod:`lightning_spa.callbacks._select` checks them):

- :class:`~lightning_spa.SPA`: ``group["lr"]`` is ``eta`` and ``group["c"]`` is ``c``;
- :class:`torch.optim.SGD` with ``0 < momentum < 1``: the group starts at ``eta0 = lr / (1 - momentum)``,
  ``c0 = 1 - momentum``, and step ``k`` gets ``lr = c_k * eta_k`` and
  ``momentum = (1 - c_{k-1}) * eta_{k-1} / eta_k`` (:mod:`lightning_spa.theorem`).

:class:`OptimizerClock` counts the optimizer's steps actually taken (a post-step hook: a step the
AMP grad scaler skips, or a ``step()`` nobody calls, does not count) and writes, right after
each step, the values of the next one, computed from the step count alone (so the previous
step's values, which torch SGD's momentum needs, are those of the previous step *taken*). Right
before a step it checks nobody else changed them and picks up param groups added since. So
between steps the param groups always hold the coming step's values; a reader of the step just
taken reads them before the step (``on_before_optimizer_step``, a pre-step hook), or in a
post-step hook registered before the clock's (the callbacks hook at ``on_train_start``), or
computes them: ``clock.values(g, clock.steps - 1)``.

Exactness on torch SGD when some parameters have no gradient. SPA keeps, per parameter, the scale
``s = (1 - c) * eta`` its momentum buffer carries (``z = x - s * m``); torch SGD has one momentum
per group. After a step whose scale changes from ``s_{k-1}`` to ``s_k``, the buffers of torch SGD
parameters that had no gradient are multiplied by ``s_{k-1} / s_k``, so they keep the same ``z``
and the next step folds them in exactly as SPA does. At ``c_k = 1`` (``s_k = 0``) that is not
possible: such a parameter loses its momentum under torch SGD (one warning).

Who owns the learning rate. On SPA, a clock whose schedules never change ``eta`` (momentum
removal alone) writes and checks ``c`` only: ``group["lr"]`` (``eta``) stays free for an LR
scheduler, ``lr_find``'s result or SWA's ``SWALR``, and SPA runs whatever ``eta`` they set with
the scheduled ``c``. On torch SGD removing momentum means writing ``lr`` *and* ``momentum``
(``lr = c * eta``), so the clock owns both. :meth:`OptimizerClock.hand_over_lr` gives the lr away
mid-run (SWA): from then on the clock writes ``c`` (SPA) or ``momentum`` (torch SGD) only. No
Lightning import.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_spa.callbacks._select import OptimizerKind, group_unsupported_reason
from lightning_spa.schedule import SPASchedule, changes_eta, compose, find_momentum_overflow
from lightning_spa.theorem import constant_sgdm_to_spa, step_spa_to_sgdm

__all__ = ["GroupStart", "OptimizerClock", "read_start", "write_spa_terms"]


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def read_start(group: dict[str, Any], kind: OptimizerKind) -> tuple[float, float]:
    """The group's current ``(eta, c)`` in SPA terms (torch SGD: the constant-schedule mapping)."""
    if kind == "spa":
        return _as_float(group["lr"]), float(group["c"])
    return constant_sgdm_to_spa(_as_float(group["lr"]), float(group["momentum"]))


def write_spa_terms(
    group: dict[str, Any],
    kind: OptimizerKind,
    eta: float,
    c: float,
    prev: tuple[float, float] | None,
    keys: Sequence[str] | None = None,
) -> None:
    """Writes step ``k``'s ``(eta_k, c_k)`` into ``group``; ``prev`` is ``(eta_{k-1}, c_{k-1})`` (None: no history).

    A tensor value (``lr`` as a tensor) is filled in place. ``keys``: write only these of the group's
    keys (``"lr"``, ``"c"`` / ``"momentum"``); None: both.
    """
    if kind == "spa":
        values = {"lr": eta, "c": c}
    else:
        lr, momentum = step_spa_to_sgdm(eta, c, prev)
        values = {"lr": lr, "momentum": momentum}
    for key, value in values.items():
        if keys is not None and key not in keys:
            continue
        current = group[key]
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        else:
            group[key] = value


class GroupStart(NamedTuple):
    """A param group's starting values and the step at which it joined (0: from the start)."""

    eta0: float
    c0: float
    joined: int


class OptimizerClock:
    """Steps taken by one optimizer and the ``(eta, c)`` each of its param groups uses (module docstring).

    Args:
        optimizer: the torch optimizer.
        kind: ``"spa"`` or ``"sgd"``.
        index: its index in ``trainer.optimizers`` (for messages).
        schedules: every schedule that targets it; composed in ``repr`` order, so the values do
            not depend on the order of the callbacks.
        owner: the callbacks' names, for messages.
        warn: how to warn (the callbacks pass Lightning's ``rank_zero_warn``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        kind: OptimizerKind,
        index: int,
        schedules: Sequence[SPASchedule],
        owner: str,
        warn: Callable[[str], Any] = warnings.warn,
    ) -> None:
        self.optimizer, self.kind, self.index, self.owner, self._warn = optimizer, kind, index, owner, warn
        self.schedules = sorted(schedules, key=repr)
        self.steps = 0
        self.groups: list[GroupStart] = []
        self.total_steps = float("inf")  # for the safety check of groups that join
        # On SPA, schedules that never change eta (momentum removal) write c alone: the lr (eta) stays free for
        # an LR scheduler, lr_find or SWA. hand_over_lr() gives the lr away mid-run (SWA's SWALR).
        self.writes_eta = kind == "sgd" or any(changes_eta(s) for s in self.schedules)
        self.lr_owner: str | None = None  # who writes the lr after hand_over_lr (None: not handed over)
        # Per group: what it holds (read back, for the foreign-write check), and the (eta, c) of the
        # coming step and of the last step taken (None before its first step).
        self._written: list[dict[str, float]] = []
        self._coming: list[tuple[float, float]] = []
        self._taken: list[tuple[float, float] | None] = []
        self._handles: list[RemovableHandle] = []
        self._warned_lost = False
        self.loaded = False  # whether the clock came from a checkpoint
        # Manual optimization: the optimizer's own steps in the trainer's first epoch (None: not counted yet), with
        # which the callbacks convert epochs for it (an optimizer may step on some batches only).
        self.per_epoch: int | None = None

    @property
    def written_keys(self) -> tuple[str, ...]:
        """The param-group keys the clock writes (and checks): ``lr`` only while it owns it."""
        second = "c" if self.kind == "spa" else "momentum"
        owns_lr = self.lr_owner is None and (self.kind == "sgd" or self.writes_eta)
        return ("lr", second) if owns_lr else (second,)

    def hand_over_lr(self, owner: str) -> None:
        """From now on ``owner`` writes the lr; the clock writes ``c`` (SPA) or ``momentum`` (torch SGD) only.

        On SPA ``c`` keeps following the schedules (the lr ``owner`` writes is ``eta``); on torch SGD the
        momentum written is the schedules' Theorem-1 value (``1 - c`` once they no longer change eta).
        """
        self.lr_owner = owner
        for written in self._written:
            written.pop("lr", None)

    # ----- state ------------------------------------------------------------------------------
    def start(self, loaded: dict[str, Any] | None) -> None:
        """At fit start: the configured starting values, or the checkpoint's (``loaded``) clock."""
        if loaded is not None:
            self.load_state_dict(loaded)
        else:
            self.steps = 0
            self.groups = [GroupStart(*read_start(g, self.kind), 0) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps, "groups": [list(g) for g in self.groups]}
        if self.per_epoch is not None:
            state["per_epoch"] = self.per_epoch
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = True
        self.steps = int(state["steps"])
        self.per_epoch = None if state.get("per_epoch") is None else int(state["per_epoch"])
        self.groups = [GroupStart(float(e), float(c), int(j)) for e, c, j in state["groups"]]

    def values(self, g: int, k: int) -> tuple[float, float]:
        """``(eta_k, c_k)`` of param group ``g`` at optimizer step ``k``."""
        eta0, c0, joined = self.groups[g]
        return compose(self.schedules, k, eta0, c0, joined)

    # ----- writing ----------------------------------------------------------------------------
    def write(self) -> None:
        """Writes the values of the coming step (``self.steps``) into every param group."""
        self._join_new_groups()
        if len(self.groups) > len(self.optimizer.param_groups):
            raise ValueError(
                f"{self.owner}: optimizer {self.index} has {len(self.optimizer.param_groups)} param groups, but the "
                f"checkpoint's schedule has {len(self.groups)}. Add the missing groups before the optimizer state is "
                "restored (in on_fit_start, as BackboneFinetuning does)."
            )
        self._written, self._coming, self._taken = [], [], []
        for g in range(len(self.groups)):
            k, joined = self.steps, self.groups[g].joined
            self._write_group(g, self.values(g, k), self.values(g, k - 1) if k > joined else None)

    def _write_group(self, g: int, coming: tuple[float, float], taken: tuple[float, float] | None) -> None:
        """Writes ``coming`` into group ``g`` (appended when ``g`` is new); ``taken``: the previous step's values."""
        group = self.optimizer.param_groups[g]
        write_spa_terms(group, self.kind, *coming, taken, self.written_keys)
        # Read back what the group holds (a float32 tensor lr rounds): that is what the next check compares.
        written = {key: _as_float(group[key]) for key in self.written_keys}
        if g == len(self._written):  # a new group
            self._written.append(written)
            self._coming.append(coming)
            self._taken.append(taken)
        else:
            self._written[g], self._coming[g], self._taken[g] = written, coming, taken

    def _join_new_groups(self) -> None:
        for g in range(len(self.groups), len(self.optimizer.param_groups)):
            group = self.optimizer.param_groups[g]
            reason = group_unsupported_reason(self.optimizer, group, "schedule")
            if reason is not None:
                raise ValueError(f"{self.owner}: param group {g} added to optimizer {self.index} {reason}.")
            start = GroupStart(*read_start(group, self.kind), self.steps)
            for schedule in self.schedules:
                overflow = find_momentum_overflow(
                    self.schedules, start.eta0, start.c0, self.total_steps, schedule, start.joined
                )
                if overflow is None:
                    continue
                message = (
                    f"{self.owner}: param group {g} added to optimizer {self.index} at its step {start.joined} "
                    f"(eta {start.eta0:g}, c {start.c0:g}) reaches the equivalent SGD+M momentum "
                    f"{overflow.momentum:.4g} at step {overflow.step}"
                )
                if getattr(schedule, "transition_steps", 1) <= 1:  # an instant change: warned at fit start too
                    self._warn(f"{message}: expect the loss spike of an instant change.")
                    continue
                raise ValueError(
                    f"{message} (>= 1). Give the group a larger c (smaller momentum) or use a longer transition_steps."
                )
            self.groups.append(start)
            self._write_group(g, self.values(g, start.joined), None)  # (eta0, c0), or c = 1 if momentum is off

    # ----- hooks on the optimizer ---------------------------------------------------------------
    def attach(self) -> None:
        """Registers the pre- and post-step hooks (idempotent)."""
        if not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._before_step),
                self.optimizer.register_step_post_hook(self._after_step),
            ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for g, written in enumerate(self._written):
            group = optimizer.param_groups[g]
            if any(_as_float(group[key]) != value for key, value in written.items()):
                now = {key: _as_float(group[key]) for key in written}
                raise RuntimeError(
                    f"{self.owner}: param group {g} of optimizer {self.index} was changed between optimizer steps by "
                    f"something else (now {now}, written {written}): an LR scheduler, another callback or user code. "
                    "Schedule it through the schedule callbacks only (they compose), or target other optimizers "
                    "with `optimizers=`."
                )
        if len(optimizer.param_groups) != len(self.groups):
            self._join_new_groups()

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # Set by GradScaler for optimizers that unscale inside their step (torch's fused SGD): reading it
        # costs one host sync per step, in that setup only (the clock must know whether the step happened).
        found_inf = vars(optimizer).get("found_inf")
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.item()):
            return  # the fused kernel skipped the step: the clock does not move
        self.steps += 1
        for g in range(len(self.groups)):
            taken, before = self._coming[g], self._taken[g]
            if self.kind == "sgd" and before is not None:
                self._carry_buffers_without_grad(g, (1.0 - before[1]) * before[0], (1.0 - taken[1]) * taken[0])
            coming = self.values(g, self.steps)
            if coming == taken and before == taken:
                continue  # steady: the group holds these values already (_before_step checked it), SGD's too
            self._write_group(g, coming, taken)

    def _carry_buffers_without_grad(self, g: int, before: float, after: float) -> None:
        """Group ``g``'s scale went from ``before`` to ``after`` in the step just taken (module docstring)."""
        if before == after or before == 0.0:
            return
        k = self.steps - 1
        for p in self.optimizer.param_groups[g]["params"]:
            if p.grad is not None:
                continue
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is None:
                continue
            if after == 0.0:
                if not self._warned_lost:
                    self._warned_lost = True
                    self._warn(
                        f"{self.owner}: a parameter of optimizer {self.index} (torch SGD) had no gradient at step "
                        f"{k}, where c reached 1 (momentum 0): torch SGD drops its momentum, SPA would keep it. "
                        "Use lightning_spa.SPA for an exact result."
                    )
                continue
            buf.mul_(before / after)
