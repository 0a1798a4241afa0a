r"""Reading and writing SPA-terms ``(eta, c)`` on an optimizer's param groups (Theorem 1).

Two optimizers are supported:

- :class:`~lightning_spa.optim.SPA`: ``group["lr"]`` is ``eta`` and ``group["c"]`` is ``c``;
- :class:`torch.optim.SGD` with ``0 < momentum < 1``, ``dampening=0`` and ``nesterov=False``:
  the group starts at ``eta0 = lr / (1 - momentum)``, ``c0 = 1 - momentum``, and step ``k``
  gets ``lr = c_k * eta_k`` and ``momentum = (1 - c_{k-1}) * eta_{k-1} / eta_k`` (``THEORY.md``
  section 2; ``momentum = 1 - c_0`` at step 0, where it has no effect).

Anything else gets a :class:`TypeError` or :class:`ValueError` that says what is supported.
No Lightning import here.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim import Optimizer

from lightning_spa.optim import SPA

__all__ = ["OptimizerKind", "optimizer_kind", "read_group_values", "read_start_values", "write_spa_terms"]

OptimizerKind = Literal["spa", "sgd"]

_SUPPORTED = (
    "Supported: lightning_spa.SPA, or torch.optim.SGD with 0 < momentum < 1, dampening=0 and nesterov=False "
    "(convert other SGD+M setups with lightning_spa.SPA.from_sgdm)."
)


def optimizer_kind(optimizer: Optimizer, owner: str = "This callback") -> OptimizerKind:
    """Returns ``"spa"`` or ``"sgd"`` after checking the optimizer can be scheduled exactly.

    Raises:
        TypeError: an optimizer that is neither SPA nor torch SGD.
        ValueError: torch SGD with Nesterov, ``dampening != 0``, or ``momentum`` outside ``(0, 1)``.
    """
    if isinstance(optimizer, SPA):
        return "spa"
    if isinstance(optimizer, torch.optim.SGD):  # subclasses too (e.g. lightning_spa.GroupedSGD)
        for i, group in enumerate(optimizer.param_groups):
            momentum = float(group["momentum"])
            if group.get("nesterov", False):
                raise ValueError(f"{owner}: torch.optim.SGD param group {i} uses nesterov=True. {_SUPPORTED}")
            if float(group.get("dampening", 0.0)) != 0.0:
                raise ValueError(
                    f"{owner}: torch.optim.SGD param group {i} has dampening={group['dampening']}. {_SUPPORTED}"
                )
            if not 0.0 < momentum < 1.0:
                raise ValueError(
                    f"{owner}: torch.optim.SGD param group {i} has momentum={momentum}; SGD+M in SPA terms needs "
                    f"0 < momentum < 1 (momentum 0 has no c to schedule). {_SUPPORTED}"
                )
        return "sgd"
    raise TypeError(f"{owner} cannot schedule {type(optimizer).__module__}.{type(optimizer).__name__}. {_SUPPORTED}")


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def read_start_values(optimizer: Optimizer, kind: OptimizerKind) -> list[tuple[float, float]]:
    """Returns ``(eta0, c0)`` for each param group, in SPA terms."""
    if kind == "spa":
        return [(_as_float(g["lr"]), float(g["c"])) for g in optimizer.param_groups]
    out = []
    for g in optimizer.param_groups:
        momentum = float(g["momentum"])
        out.append((_as_float(g["lr"]) / (1.0 - momentum), 1.0 - momentum))
    return out


def _set(group: dict[str, Any], key: str, value: float) -> None:
    current = group[key]
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group[key] = value


def write_spa_terms(
    group: dict[str, Any],
    kind: OptimizerKind,
    eta: float,
    c: float,
    prev: tuple[float, float] | None,
) -> dict[str, float]:
    """Writes step ``k``'s ``(eta_k, c_k)`` into ``group``; returns the values written, by key.

    Args:
        group: a param group of an optimizer of ``kind``.
        kind: from :func:`optimizer_kind`.
        eta: ``eta_k``.
        c: ``c_k``.
        prev: ``(eta_{k-1}, c_{k-1})``, or None at step 0.
    """
    if kind == "spa":
        values = {"lr": eta, "c": c}
    else:
        eta_prev, c_prev = prev if prev is not None else (eta, c)
        values = {"lr": c * eta, "momentum": (1.0 - c_prev) * eta_prev / eta}
    for key, value in values.items():
        _set(group, key, value)
    return values


def read_group_values(group: dict[str, Any], keys: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Current values of ``keys`` in ``group`` as floats (to detect writes by someone else)."""
    return {key: _as_float(group[key]) for key in keys}
