r"""Optimizer state dicts across the two forms of Theorem 1 (``THEORY.md`` section 2).

Layer: pure state conversion, below both :mod:`lightning_spa.optim` (whose
:meth:`~lightning_spa.SPA.load_state_dict` converts a torch SGD state dict with
:func:`sgd_state_dict_to_spa`) and :mod:`lightning_spa.mapping` (schedules and live
optimizers). It imports only :mod:`lightning_spa.theorem`: no torch optimizer, no Lightning.

A torch ``SGD`` state keeps the buffer ``m`` of ``m_{k+1} = beta_k m_k + g_k``; an SPA state
keeps the same buffer with the history ``(prev_eta, prev_c)``, whose scale
``s = (1 - prev_c) * prev_eta`` gives ``z = x - s m``. Converting keeps ``x`` and ``m`` and maps
the hyper-parameters of the *next* step:

- SGD -> SPA: ``eta = lr / (1 - momentum)``, ``c = 1 - momentum``, history ``(eta, c)``, so
  ``s = momentum * eta`` and SPA's next step is SGD's;
- SPA -> SGD: ``lr = c * eta``, ``momentum = s / eta`` (the Theorem-1 momentum of the next step;
  ``1 - c`` without history), so SGD's next step is SPA's. Later steps agree as long as the SPA
  schedule is constant from there on (its momentum is then ``1 - c`` from the second step on:
  when the history differs from ``(eta, c)``, set SGD's momentum to ``1 - c`` after one step).

``initial_lr`` (written by torch LR schedulers) is converted with ``lr``, so a scheduler created
afterwards starts from the converted value.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from lightning_spa.theorem import constant_sgdm_to_spa, constant_spa_to_sgdm, step_momentum

__all__ = ["sgd_state_dict_to_spa", "spa_state_dict_to_sgd"]

_SGD_ONLY = ("momentum", "dampening", "nesterov", "differentiable")


def _copy_group_options(group: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in drop}


def _scaled_initial_lr(group: dict[str, Any], factor: float) -> dict[str, Any]:
    """``{"initial_lr": initial_lr * factor}`` when ``group`` has one (an LR scheduler's), else empty."""
    return {"initial_lr": float(group["initial_lr"]) * factor} if "initial_lr" in group else {}


def _sgd_group_to_spa(group: dict[str, Any], where: str) -> tuple[float, float]:
    """``(eta, c)`` of the constant SPA schedule equal to SGD group ``group``'s next step."""
    if group.get("nesterov") or float(group.get("dampening", 0.0)) != 0.0:
        raise ValueError(
            f"torch.optim.SGD {where} uses nesterov=True or dampening != 0, which has no SPA form; "
            "only plain SGD momentum converts (see lightning_spa.sgdm_optimizer_to_spa)."
        )
    momentum = float(group["momentum"])
    if not 0.0 <= momentum < 1.0:
        raise ValueError(
            f"torch.optim.SGD {where} has momentum {momentum} >= 1, which has no constant SPA form; "
            "convert the optimizer with lightning_spa.sgdm_optimizer_to_spa(sgd, eta=...) instead."
        )
    return constant_sgdm_to_spa(float(group["lr"]), momentum)


def sgd_state_dict_to_spa(
    state_dict: dict[str, Any], current_groups: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A ``torch.optim.SGD`` state dict as the SPA state dict that continues it (Theorem 1).

    Each group's ``(lr, momentum)`` becomes ``eta = lr / (1 - momentum)``, ``c = 1 - momentum``
    (``initial_lr`` is scaled alike, for LR schedulers); each buffer ``m`` is kept with the
    history ``(prev_eta, prev_c) = (eta, c)``, i.e. ``z = x - momentum * eta * m``. Groups with
    momentum 0 keep no buffer. ``foreach``/``fused`` come from ``current_groups`` (the SPA
    optimizer's own) when given. Warns once that it converted. Used by :meth:`SPA.load_state_dict`;
    the inverse is :func:`spa_state_dict_to_sgd`.

    Raises:
        ValueError: Nesterov, dampening or momentum >= 1 (no constant SPA form).
    """
    groups, state = [], {}
    for i, group in enumerate(state_dict["param_groups"]):
        eta, c = _sgd_group_to_spa(group, f"param group {i}")
        new = _copy_group_options(group, (*_SGD_ONLY, "lr", "foreach", "fused"))
        if current_groups is not None and i < len(current_groups):
            new.update(foreach=current_groups[i].get("foreach"), fused=current_groups[i].get("fused"))
        new.update(_scaled_initial_lr(group, 1.0 / c))  # eta / lr
        groups.append({**new, "lr": eta, "c": c})
        for key in group["params"]:
            buf = state_dict["state"].get(key, {}).get("momentum_buffer")
            if buf is not None and c < 1.0:
                state[key] = {"momentum_buffer": buf, "prev_eta": eta, "prev_c": c, "prev_scale": (1.0 - c) * eta}
    summary = ", ".join(f"group {i}: eta {g['lr']:.6g}, c {g['c']:.6g}" for i, g in enumerate(groups))
    warnings.warn(
        f"Loaded a torch.optim.SGD state dict into SPA: converted by Theorem 1 (eta = lr / (1 - momentum), "
        f"c = 1 - momentum; momentum buffers kept), so training continues the SGD run: {summary}.",
        UserWarning,
        stacklevel=3,
    )
    return {"state": state, "param_groups": groups}


def group_spa_to_sgdm(index: int, eta: float, c: float, histories: Sequence[tuple[Any, Any]]) -> tuple[float, float]:
    """``(lr, momentum)`` of the SGD group that continues SPA param group ``index`` (Theorem 1).

    ``histories``: ``(prev_eta, prev_c)`` of each of its parameters with a momentum buffer. Without
    history ``momentum = 1 - c``; with one, the Theorem-1 momentum of the next step.

    Raises:
        ValueError: different histories in one group, or ``eta = 0`` with history.
    """
    pairs = {(float(prev_eta), float(prev_c)) for prev_eta, prev_c in histories}
    if len(pairs) > 1:
        raise ValueError(
            f"Parameters of param group {index} carry different momentum histories {sorted(pairs)} (some skipped "
            "steps while eta changed): one SGD momentum cannot continue them all; step them together first."
        )
    lr, momentum = constant_spa_to_sgdm(eta, c)
    if pairs:
        prev_eta, prev_c = pairs.pop()
        if eta == 0.0:
            raise ValueError(
                f"param group {index} has eta = 0 with momentum history: no SGD+M step reproduces it "
                "(convert at a step with eta > 0)."
            )
        momentum = step_momentum(eta, prev_eta, prev_c)
    return lr, momentum


def spa_state_dict_to_sgd(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An SPA state dict as the ``torch.optim.SGD`` state dict that continues it (Theorem 1).

    The inverse of :func:`sgd_state_dict_to_spa`: load the result with
    ``torch.optim.SGD(params, lr=..., momentum=...).load_state_dict(...)`` (the group values come
    from the state dict). Each group gets ``lr = c * eta`` and ``momentum = s / eta``, the
    Theorem-1 momentum of its next step (``s = (1 - prev_c) * prev_eta`` the scale of its buffers;
    exactly ``1 - c`` on a constant schedule), ``dampening 0``, ``nesterov False``; without
    history (before the first step, after ``c = 1`` steps) ``momentum = 1 - c`` and no buffer.
    ``initial_lr`` is scaled by ``c``. Tensor-mode histories (0-dim tensors) become floats.

    Raises:
        ValueError: parameters of one group with different histories (some skipped steps while eta
            changed), ``eta = 0`` with history (no SGD step reproduces it), or a state dict that is
            not SPA's (a group without ``c``).
    """
    groups, state = [], {}
    for i, group in enumerate(state_dict["param_groups"]):
        if "c" not in group:
            raise ValueError(
                f"param group {i} has no `c`: this is not an SPA state dict (a torch.optim.SGD one loads as it is)."
            )
        eta, c = float(group["lr"]), float(group["c"])
        saved = state_dict["state"]
        with_history = [k for k in group["params"] if saved.get(k, {}).get("momentum_buffer") is not None]
        histories = [(saved[k]["prev_eta"], saved[k]["prev_c"]) for k in with_history]
        lr, momentum = group_spa_to_sgdm(i, eta, c, histories)
        new = _copy_group_options(group, ("c", "lr", "initial_lr"))
        new.update(_scaled_initial_lr(group, c))  # lr / eta
        groups.append(
            {**new, "lr": lr, "momentum": momentum, "dampening": 0.0, "nesterov": False, "differentiable": False}
        )
        if momentum != 0.0:
            for k in with_history:
                state[k] = {"momentum_buffer": saved[k]["momentum_buffer"]}
    return {"state": state, "param_groups": groups}
