"""Which optimizers a callback works on: the one support check and the one selection rule.

Every callback of the package (``GradualSchedule``, ``MomentumOff``, ``MomentumDiagnostics``)
takes ``optimizers=`` and resolves it here at fit start:

- ``None`` (default): every optimizer of ``trainer.optimizers`` the callback supports; the
  others are skipped with **one** warning that names them (an error if none is left).
- a list whose entries are
    - an ``int``: the optimizer's index in ``trainer.optimizers``, i.e. the order in which
      ``configure_optimizers`` returns them (``0`` for a single optimizer);
    - a ``str``: every optimizer whose class, or one of its base classes, is named that string
      (``"SPA"`` selects :class:`~lightning_spa.GroupedSPA` too, ``"SGD"`` a ``GroupedSGD``), or that
      has a param group whose ``"name"`` key is that string. The ``"name"`` key is the one
      :class:`~pytorch_lightning.callbacks.LearningRateMonitor` already reads, so a GAN written
      as ``SPA([{"params": gen.parameters(), "name": "generator"}])`` is selected with
      ``optimizers: [generator]`` in a LightningCLI YAML.

  An explicitly selected optimizer that is not supported is an error naming it and what is
  supported; so is an entry that matches nothing.

Supported: :class:`~lightning_spa.SPA`, and :class:`torch.optim.SGD` (subclasses too) without
Nesterov and with ``dampening=0``; a schedule also needs ``0 < momentum < 1`` in every param
group (momentum 0 has no ``c`` to schedule).

The support check imports no Lightning (plain PyTorch tools use it too); the functions that take
a trainer import :mod:`lightning_spa._lightning` when called.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.optim import Optimizer

from lightning_spa.optim import SPA

if TYPE_CHECKING:
    from lightning_spa import _lightning as pl

__all__ = [
    "OptimizerKind",
    "OptimizerSelection",
    "Purpose",
    "SUPPORTED",
    "Selected",
    "check_selection",
    "group_unsupported_reason",
    "is_instance_by_name",
    "optimizer_kind",
    "select_optimizers",
    "unsupported_reason",
    "warn_lr_monitor_momentum",
]

OptimizerKind = Literal["spa", "sgd"]
#: ``"schedule"``: the callback writes ``(eta, c)`` (needs ``0 < momentum < 1`` on torch SGD);
#: ``"measure"``: it only reads them (any torch SGD momentum).
Purpose = Literal["schedule", "measure"]
#: What a callback's ``optimizers=`` argument accepts (see the module docstring).
OptimizerSelection = Sequence[int | str] | None

SUPPORTED = (
    "Supported: lightning_spa.SPA, or torch.optim.SGD with 0 < momentum < 1, dampening=0 and nesterov=False "
    "(convert other SGD+M setups with lightning_spa.SPA.from_sgdm)."
)


def group_unsupported_reason(optimizer: Optimizer, group: dict[str, Any], purpose: Purpose = "schedule") -> str | None:
    """Why ``group`` of ``optimizer`` (SPA or torch SGD) cannot be handled, or ``None`` when it can."""
    if isinstance(optimizer, SPA):
        return None
    if group.get("nesterov", False):
        return "uses nesterov=True, which has no SPA form"
    if float(group.get("dampening", 0.0)) != 0.0:
        return f"has dampening={group['dampening']}, which has no SPA form"
    momentum = float(group.get("momentum", 0.0))
    if purpose == "schedule" and not 0.0 < momentum < 1.0:
        return f"has momentum={momentum}; SGD+M in SPA terms needs 0 < momentum < 1 (momentum 0 has no c to schedule)"
    return None


def unsupported_reason(optimizer: Optimizer, purpose: Purpose = "schedule") -> str | None:
    """Why ``optimizer`` cannot be scheduled (or measured), or ``None`` when it can. The one support check."""
    if isinstance(optimizer, SPA):
        return None
    if not isinstance(optimizer, torch.optim.SGD):  # subclasses too (e.g. lightning_spa.GroupedSGD)
        name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        return f"{name} is neither lightning_spa.SPA nor torch.optim.SGD"
    for i, group in enumerate(optimizer.param_groups):
        reason = group_unsupported_reason(optimizer, group, purpose)
        if reason is not None:
            return f"torch.optim.SGD param group {i} {reason}"
    return None


def optimizer_kind(optimizer: Optimizer, owner: str = "This callback", purpose: Purpose = "schedule") -> OptimizerKind:
    """Returns ``"spa"`` or ``"sgd"`` after :func:`unsupported_reason` found nothing to object to.

    Raises:
        TypeError: an optimizer that is neither SPA nor torch SGD.
        ValueError: torch SGD with Nesterov, ``dampening != 0``, or (to schedule) ``momentum`` outside ``(0, 1)``.
    """
    reason = unsupported_reason(optimizer, purpose)
    if reason is not None:
        error = ValueError if isinstance(optimizer, torch.optim.SGD) else TypeError
        raise error(f"{owner} cannot handle {_describe(optimizer)}: {reason}. {SUPPORTED}")
    return "spa" if isinstance(optimizer, SPA) else "sgd"


@dataclass(frozen=True)
class Selected:
    """An optimizer a callback works on: its index in ``trainer.optimizers``, the torch optimizer, its kind."""

    index: int
    optimizer: Optimizer
    kind: OptimizerKind


def check_selection(optimizers: OptimizerSelection, owner: str) -> list[int | str] | None:
    """Validates a callback's ``optimizers=`` argument in ``__init__``; returns it as a list (or None).

    Raises:
        ValueError: not None and not a non-empty list of non-negative ints and strings.
    """
    if optimizers is None:
        return None
    if isinstance(optimizers, (int, str)) and not isinstance(optimizers, bool):
        optimizers = [optimizers]  # a single index or name, as a convenience
    if not isinstance(optimizers, Sequence) or not optimizers:
        raise ValueError(
            f"{owner}: `optimizers` must be None (every supported optimizer) or a non-empty list of indices into "
            f"trainer.optimizers and names, got {optimizers!r}."
        )
    out: list[int | str] = []
    for entry in optimizers:
        valid_index = isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0
        if not (valid_index or (isinstance(entry, str) and entry)):
            raise ValueError(
                f"{owner}: `optimizers` entries must be indices >= 0 into trainer.optimizers or names (an optimizer "
                f"class name such as 'SPA', or a param group 'name'), got {entry!r}."
            )
        out.append(entry)
    return out


def _describe(optimizer: Optimizer, index: int | None = None) -> str:
    names = [str(g["name"]) for g in optimizer.param_groups if "name" in g]
    where = "" if index is None else f"optimizer {index} "
    return f"{where}({type(optimizer).__name__}{', groups ' + ', '.join(names) if names else ''})"


def _matches(optimizer: Optimizer, name: str) -> bool:
    """A class name selects subclasses too (``"SPA"``: a ``GroupedSPA``); or a param group's ``"name"``."""
    return is_instance_by_name(optimizer, name) or any(g.get("name") == name for g in optimizer.param_groups)


def select_optimizers(
    trainer: pl.Trainer, selection: OptimizerSelection, owner: str, purpose: Purpose = "schedule"
) -> list[Selected]:
    """Resolves ``selection`` (see the module docstring) against ``trainer.optimizers``; call at fit start.

    Args:
        trainer: the trainer whose optimizers are configured (``on_fit_start`` or later).
        selection: None, or a list of indices and names.
        owner: the callback's name, for messages.
        purpose: ``"schedule"`` or ``"measure"`` (see :func:`unsupported_reason`).

    Returns:
        The selected supported optimizers, in index order.

    Raises:
        ValueError: an index out of range or a name that matches no optimizer, an explicitly selected
            torch SGD that is not supported, or nothing supported at all.
        TypeError: an explicitly selected optimizer that is neither SPA nor torch SGD.
    """
    from lightning_spa._lightning import rank_zero_warn, unwrap_optimizer

    optimizers = [unwrap_optimizer(opt) for opt in trainer.optimizers]
    available = "; ".join(_describe(opt, i) for i, opt in enumerate(optimizers)) or "none"
    if selection is None:
        chosen = list(range(len(optimizers)))
    else:
        picked: set[int] = set()
        for entry in selection:
            if isinstance(entry, int):
                if entry >= len(optimizers):
                    raise ValueError(
                        f"{owner}: `optimizers` selects index {entry}, but the LightningModule configured "
                        f"{len(optimizers)} optimizer(s): {available}."
                    )
                picked.add(entry)
            else:
                hits = {i for i, opt in enumerate(optimizers) if _matches(opt, entry)}
                if not hits:
                    raise ValueError(
                        f"{owner}: `optimizers` name {entry!r} is neither the class name of an optimizer (or of a "
                        f"base class) nor the 'name' of a param group. Configured: {available}."
                    )
                picked |= hits
        chosen = sorted(picked)
    selected: list[Selected] = []
    skipped: list[str] = []
    for i in chosen:
        reason = unsupported_reason(optimizers[i], purpose)
        if reason is None:
            selected.append(Selected(i, optimizers[i], "spa" if isinstance(optimizers[i], SPA) else "sgd"))
        elif selection is not None:
            optimizer_kind(optimizers[i], f"{owner} (optimizers={list(selection)}, optimizer {i})", purpose)
        else:
            skipped.append(f"{_describe(optimizers[i], i)}: {reason}")
    if not selected:
        raise ValueError(f"{owner} has no optimizer to work on: {'; '.join(skipped) or 'none configured'}. {SUPPORTED}")
    if skipped:
        rank_zero_warn(
            f"{owner} skips {'; '.join(skipped)}. It works on optimizers {[s.index for s in selected]}; pass "
            f"`optimizers=` to choose explicitly. {SUPPORTED}"
        )
    return selected


_WARNED_LR_MONITOR: weakref.WeakSet[Any] = weakref.WeakSet()


def is_instance_by_name(obj: Any, class_name: str) -> bool:
    """Whether ``obj`` is an instance of a class named ``class_name`` (or a subclass): matches either package's."""
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


def _is_lr_monitor_logging_momentum(callback: Any) -> bool:
    return is_instance_by_name(callback, "LearningRateMonitor") and bool(getattr(callback, "log_momentum", False))


def warn_lr_monitor_momentum(trainer: pl.Trainer, selected: Sequence[Selected], owner: str) -> None:
    """Warns once per trainer when ``LearningRateMonitor(log_momentum=True)`` would log SPA's momentum as 0.

    SPA param groups have ``lr`` (= ``eta``) and ``c`` but no ``momentum`` key, so the monitor logs 0.
    Torch SGD under the schedule callbacks is logged correctly (the groups hold the Theorem-1
    ``lr`` and ``momentum`` of the coming step). Call at fit start, from any callback.
    """
    from lightning_spa._lightning import rank_zero_warn

    if trainer in _WARNED_LR_MONITOR or not any(s.kind == "spa" for s in selected):
        return
    if not any(_is_lr_monitor_logging_momentum(cb) for cb in trainer.callbacks):  # type: ignore[attr-defined]
        return
    _WARNED_LR_MONITOR.add(trainer)
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    present = any(is_instance_by_name(cb, "MomentumDiagnostics") for cb in callbacks)
    diagnostics = "MomentumDiagnostics (in your callbacks)" if present else "Add MomentumDiagnostics: it"
    rank_zero_warn(
        f"{owner}: LearningRateMonitor(log_momentum=True) logs momentum 0 for lightning_spa.SPA, whose param groups "
        "hold eta (as 'lr') and c, not a momentum; its 'lr' is eta, not the SGD+M learning rate c*eta. "
        f"{diagnostics} logs spa/eta, spa/c and their SGD+M equivalents spa/lr and spa/momentum (the Theorem-1 "
        "momentum (1-c_prev)*eta_prev/eta of each step)."
    )
