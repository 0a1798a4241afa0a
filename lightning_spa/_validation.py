"""Validation of SPA's hyper-parameters, in one place for the constructor, ``add_param_group``,
``load_state_dict`` and the per-step read (``lr`` = ``eta``, ``c``, ``weight_decay``, ``fused``; a
``GradScaler`` scale that reaches a group without ``fused``),
with torch's own wording where torch has a generic check."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_scaled_groups", "fused_low_precision", "step_value", "validate_c", "validate_eta", "validate_group"]


def _scalar(value: Any, name: str, what: str) -> float | Tensor:
    """``value`` if it is a real number or a one-element tensor (torch's checks and wording)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element; got shape {tuple(value.shape)} for `{name}` ({what}).")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` ({what}) must be a float or a one-element tensor, got {type(value).__name__}.")
    return float(value)


def validate_eta(value: Any, name: str = "lr") -> float | Tensor:
    """Checks a step size ``eta``: a finite float >= 0, or a one-element tensor (checked by value
    here, at construction and ``add_param_group``; in the step a tensor is not read, to avoid a sync).

    Raises:
        TypeError: not a number or tensor (as torch's optimizers).
        ValueError: negative, NaN or infinite; a tensor with more than one element.
    """
    given = value
    value = _scalar(value, name, "the step size eta")
    v = float(value) if not isinstance(value, Tensor) or not value.is_meta else 0.0
    if not 0.0 <= v < math.inf:  # torch's wording first, then SPA's hint
        raise ValueError(
            f"Invalid learning rate: {given}: `{name}` must be finite and >= 0 (SPA's `lr` is the step size eta)."
        )
    return value


def validate_c(value: Any, name: str = "c") -> float | Tensor:
    """Checks an averaging weight ``c`` in ``(0, 1]`` (``c = 1 - momentum``; ``c = 1`` is plain SGD)."""
    value = _scalar(value, name, "the averaging weight c")
    v = float(value) if not isinstance(value, Tensor) or not value.is_meta else 1.0
    if not 0.0 < v <= 1.0:  # also rejects NaN
        raise ValueError(
            f"Invalid `{name}`={v}: the averaging weight c must be in (0, 1] (c = 1 - momentum; c = 1 is plain SGD)."
        )
    return value


def validate_group(group: dict[str, Any], where: str) -> None:
    """The one check of a param group (constructor, ``add_param_group``; see :meth:`SPA.step`)."""
    validate_eta(group["lr"], "lr")
    validate_c(group["c"], "c")
    wd = group["weight_decay"]
    if isinstance(wd, bool) or not isinstance(wd, Real) or not 0.0 <= float(wd) < math.inf:
        raise ValueError(f"Invalid weight_decay value: {wd} {where}: `weight_decay` must be a finite float >= 0.")
    if group.get("fused") and group.get("foreach"):
        raise ValueError(f"`fused=True` and `foreach=True` cannot be used together {where}; choose one.")
    if group.get("differentiable"):
        raise ValueError("SPA does not support `differentiable=True`.")
    if group.get("fused"):
        from lightning_spa import _compat

        fused_devices = _compat.kernel_support()[0]
        for p in group["params"]:
            if not (
                type(p) in (Tensor, torch.nn.Parameter) and p.device.type in fused_devices and p.is_floating_point()
            ):
                raise RuntimeError(
                    f"`fused=True` needs plain floating-point tensors on a device with torch's fused SGD kernel "
                    f"{list(fused_devices)}, got a {type(p).__name__} of {p.dtype} on {p.device.type} {where} "
                    "(DTensor/FSDP2 parameters have no fused kernel); pass `fused=None` to pick a path."
                )


def fused_low_precision(group: dict[str, Any], where: str) -> str | None:
    """The warning for ``fused=True`` on CPU parameters that torch's fused kernel does not update, or None.

    torch <= 2.13's fused CPU SGD kernel leaves bfloat16/float16 parameters unchanged (all but the
    last ``numel % vector width`` elements; :func:`lightning_spa._compat.fused_cpu_broken_dtypes`
    measures it): such a run does not train. ``fused=None`` (the default) takes torch SGD's loop there.
    """
    if not group.get("fused"):
        return None
    from lightning_spa import _compat

    dtypes = {p.dtype for p in group["params"] if p.device.type == "cpu"} & _compat.fused_cpu_broken_dtypes()
    if not dtypes:
        return None
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return (
        f"`fused=True` {where} with {names} parameters on the CPU: this torch's fused CPU SGD kernel does not update "
        "parameters of that dtype (pytorch/pytorch#191763, fixed after torch 2.13), so they would not train. "
        "Pass `fused=None` (the default: torch SGD's loop for these dtypes) or keep the parameters in float32."
    )


def check_scaled_groups(groups: list[dict[str, Any]]) -> None:
    """Refuses a ``GradScaler`` scale that reaches a param group without ``fused=True``.

    ``torch.amp.GradScaler`` asks the optimizer, not a group, whether the step unscales the
    gradients (``_step_supports_amp_scaling``, SPA's ``fused`` argument, as torch SGD's). Then it
    hands ``grad_scale``/``found_inf`` to the step instead of unscaling: only the fused kernel can
    take them. Called at a step that received them, before any group moves.

    Raises:
        RuntimeError: a group with gradients whose ``fused`` is not True.
    """
    for i, group in enumerate(groups):
        if not group.get("fused") and any(p.grad is not None for p in group["params"]):
            raise RuntimeError(
                f"A GradScaler passed its scale to SPA, built with `fused=True` (so the scaler leaves unscaling to "
                f"the fused kernel), but param group {i} has `fused`={group.get('fused')!r}: its kernel cannot "
                "unscale the gradients (a group's `fused` is its own, or the one of a loaded state dict, as in torch "
                "SGD). Set `fused=True` on every group, or build SPA with `fused=None` (the scaler then unscales all "
                "gradients before the step), or split the groups into two optimizers."
            )


def step_value(group: dict[str, Any], key: str) -> float | Tensor:
    """The per-step read of ``lr``/``c``: floats checked by value, tensors by size only (no sync)."""
    value = group[key]
    if type(value) is float and (0.0 <= value < math.inf if key == "lr" else 0.0 < value <= 1.0):
        return value
    if isinstance(value, Tensor):
        return _scalar(value, key, "the step size eta" if key == "lr" else "the averaging weight c")
    return validate_eta(value) if key == "lr" else validate_c(value)
