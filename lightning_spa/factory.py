r"""Optimizer factory: parameter groups and either parametrisation, for ``configure_optimizers`` and LightningCLI.

Notation (``THEORY.md`` sections 1-2): SGD+M uses a learning rate ``alpha`` (``lr``) and a
momentum ``beta`` (``momentum``); SPA uses a step size ``eta`` and an averaging weight ``c``.
For constant hyper-parameters Theorem 1 gives::

    alpha = c * eta        beta = 1 - c        (lr 0.1, momentum 0.9  <=>  eta 1.0, c 0.1)

The factory takes either pair and builds either form:

- :class:`GroupedSPA`: :class:`lightning_spa.SPA` with group keys ``lr`` (= ``eta``) and ``c``;
- :class:`GroupedSGD`: :class:`torch.optim.SGD` with ``lr = alpha`` and ``momentum = beta``,
  the same iterates (Theorem 1) for a user who keeps torch's optimizer;
- :func:`build_optimizer`: either of them, for ``configure_optimizers``.

Both are ``Optimizer`` subclasses, so LightningCLI takes them as the top-level ``optimizer:``
(automatic mode) and as a module's ``optimizer: OptimizerCallable`` (dependency injection).

Parameter groups (:func:`spa_param_groups`): no weight decay on biases and normalisation
weights, and per-group step-size multipliers (``{"head": 10.0}``) that scale ``eta`` in SPA
form and ``alpha`` in SGD form (the same thing, since ``alpha = c * eta``). Each group records
its multiplier under ``"lr_multiplier"`` so that schedules can stay relative to it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_spa.optim import SPA
from lightning_spa.theorem import constant_sgdm_to_spa, constant_spa_to_sgdm

__all__ = ["GroupedSGD", "GroupedSPA", "build_optimizer", "resolve_hyperparameters", "spa_param_groups"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

Form = Literal["spa", "sgd"]
NamedParams = Iterable[tuple[str, torch.Tensor]]
ParamSource = nn.Module | Iterable[Any]


def resolve_hyperparameters(
    lr: float | None = None,
    momentum: float | None = None,
    eta: float | None = None,
    c: float | None = None,
) -> tuple[float, float]:
    """Returns ``(eta, c)`` from exactly one parametrisation; nothing given means ``eta 1.0, c 0.1``.

    Args:
        lr: SGD+M learning rate ``alpha`` (> 0); needs ``momentum``.
        momentum: SGD+M momentum ``beta`` in ``[0, 1)``; needs ``lr``.
        eta: SPA step size (> 0); needs ``c``.
        c: SPA averaging weight in ``(0, 1]``; needs ``eta``.

    Raises:
        ValueError: both parametrisations given, half of a pair given, or a value out of range.

    Example::

        resolve_hyperparameters(lr=0.1, momentum=0.9)  # (1.0, 0.1), up to rounding
    """
    sgd_given = lr is not None or momentum is not None
    spa_given = eta is not None or c is not None
    if sgd_given and spa_given:
        raise ValueError(
            "Give either `lr`/`momentum` (SGD+M) or `eta`/`c` (SPA), not both: "
            f"got lr={lr}, momentum={momentum}, eta={eta}, c={c}."
        )
    if sgd_given:
        if lr is None or momentum is None:
            missing = "lr" if lr is None else "momentum"
            raise ValueError(f"`{missing}` is missing: the SGD+M parametrisation needs both `lr` and `momentum`.")
        if not (0.0 < float(lr) < math.inf):
            raise ValueError(f"Invalid `lr`={lr}: the SGD+M learning rate must be finite and > 0.")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"Invalid `momentum`={momentum}: it must be in [0, 1) (SPA: c = 1 - momentum > 0).")
        return constant_sgdm_to_spa(float(lr), float(momentum))
    if eta is None and c is None:
        return 1.0, 0.1
    if eta is None or c is None:
        missing = "eta" if eta is None else "c"
        raise ValueError(f"`{missing}` is missing: the SPA parametrisation needs both `eta` and `c`.")
    if not (0.0 < float(eta) < math.inf):
        raise ValueError(f"Invalid `eta`={eta}: the SPA step size must be finite and > 0.")
    if not 0.0 < float(c) <= 1.0:
        raise ValueError(f"Invalid `c`={c}: it must be in (0, 1] (c = 1 - momentum; c = 1 is plain SGD).")
    return float(eta), float(c)


def _named(params: ParamSource) -> tuple[list[tuple[str | None, torch.Tensor]], dict[str, nn.Module]]:
    """Returns ``[(name or None, param)]`` (trainable only) and, for a module, its submodules by name."""
    if isinstance(params, nn.Module):
        modules = dict(params.named_modules())
        return [(n, p) for n, p in params.named_parameters() if p.requires_grad], modules
    items = list(params)
    if items and isinstance(items[0], dict):
        raise TypeError(
            "`params` is already a list of param-group dicts; pass the module (or `module.named_parameters()`) "
            "to let the factory build the groups, or build the optimizer directly."
        )
    out: list[tuple[str | None, torch.Tensor]] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
        elif isinstance(item, torch.Tensor):
            out.append((None, item))
        else:
            raise TypeError(f"`params` must hold tensors or (name, tensor) pairs, got {type(item).__name__}.")
    return [(n, p) for n, p in out if p.requires_grad], {}


def _is_no_decay(name: str | None, p: torch.Tensor, modules: Mapping[str, nn.Module], patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if pattern == "bias":
            leaf = None if name is None else name.rsplit(".", 1)[-1]
            if (leaf is not None and (leaf == "bias" or leaf.endswith("_bias"))) or (name is None and p.ndim <= 1):
                return True  # `bias`, and `*_bias` such as nn.MultiheadAttention's `in_proj_bias`
        elif pattern == "norm":
            if name is None or not modules:  # module types unknown: every 1-D parameter
                if p.ndim <= 1:
                    return True
            else:
                owner = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
                if isinstance(owner, _NORM_TYPES):
                    return True
        elif name is not None and fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def _matches(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".") or fnmatch.fnmatchcase(name, key)


def _multiplier(name: str | None, lr_multipliers: Mapping[str, float]) -> float:
    if name is None or not lr_multipliers:
        return 1.0
    for key, mult in lr_multipliers.items():  # first match wins, in the order given
        if _matches(name, key):
            return float(mult)
    return 1.0


def spa_param_groups(
    params: ParamSource,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "norm"),
    lr_multipliers: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Splits parameters into groups by weight decay and step-size multiplier.

    Args:
        params: a module (best: names and module types are known), ``module.named_parameters()``,
            or plain tensors. Frozen parameters (``requires_grad=False``) are left out.
        weight_decay: coupled L2 weight decay of the decayed groups (>= 0).
        no_decay: which parameters get ``weight_decay=0``: ``"bias"`` (parameters named
            ``bias``), ``"norm"`` (weights of BatchNorm/LayerNorm/GroupNorm/... layers), or a
            glob on the full parameter name (``"*.pos_embed"``). ``"bias"`` also covers names ending
            in ``_bias`` (``nn.MultiheadAttention.in_proj_bias``). Without the module (plain
            tensors, or ``named_parameters()`` for ``"norm"``) they fall back to "every 1-D
            parameter".
        lr_multipliers: ``{prefix or glob: multiplier}``; a parameter whose name equals, starts
            with ``prefix + "."`` or matches the glob gets its group's step size times the
            multiplier (first match wins). Needs names: a module or ``named_parameters()``.

    Returns:
        Param-group dicts with ``params``, ``weight_decay`` and ``lr_multiplier``; empty
        groups are dropped.

    Raises:
        ValueError: negative ``weight_decay``, a multiplier that is not finite and > 0, or
            ``lr_multipliers`` with unnamed tensors, or a key that matches no parameter.

    Example::

        groups = spa_param_groups(model, weight_decay=1e-4, lr_multipliers={"head": 10.0})
        opt = SPA(groups, lr=1.0, c=0.1)   # then scale each group: see build_optimizer
    """
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"Invalid `weight_decay`={weight_decay}: it must be >= 0.")
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    lr_multipliers = dict(lr_multipliers or {})
    for key, mult in lr_multipliers.items():
        if not (0.0 < float(mult) < math.inf):
            raise ValueError(f"Invalid `lr_multipliers[{key!r}]`={mult}: a multiplier must be finite and > 0.")
    named, modules = _named(params)
    if lr_multipliers and any(n is None for n, _ in named):
        raise ValueError(
            "`lr_multipliers` needs parameter names: pass the module or `module.named_parameters()`, "
            "not `module.parameters()`. In LightningCLI, give the optimizer to the model's `optimizer` argument "
            "(dependency injection) rather than the top-level `optimizer:` key, which passes bare parameters."
        )
    used: set[str] = set()
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, p in named:
        wd = 0.0 if _is_no_decay(name, p, modules, no_decay) else float(weight_decay)
        mult = _multiplier(name, lr_multipliers)
        if name is not None:
            used.update(k for k in lr_multipliers if _matches(name, k))
        groups.setdefault((mult, wd), []).append(p)
    unused = sorted(set(lr_multipliers) - used)
    if unused:
        raise ValueError(f"`lr_multipliers` keys {unused} match no trainable parameter; check the module names.")
    return [
        {"params": ps, "weight_decay": wd, "lr_multiplier": mult}
        for (mult, wd), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    ]


def _check_form(form: str) -> None:
    if form not in ("spa", "sgd"):
        raise ValueError(f"Invalid `form`={form!r}: use 'spa' (lightning_spa.SPA) or 'sgd' (torch.optim.SGD).")


def _resolved_groups(
    params: ParamSource,
    lr: float | None,
    momentum: float | None,
    eta: float | None,
    c: float | None,
    weight_decay: float,
    no_decay: Sequence[str],
    lr_multipliers: Mapping[str, float] | None,
) -> tuple[float, float, list[dict[str, Any]]]:
    """``(eta, c, groups)`` for :class:`GroupedSPA` and :class:`GroupedSGD`."""
    eta_, c_ = resolve_hyperparameters(lr=lr, momentum=momentum, eta=eta, c=c)
    groups = spa_param_groups(params, weight_decay=weight_decay, no_decay=no_decay, lr_multipliers=lr_multipliers)
    if not groups:
        raise ValueError("`params` holds no trainable parameter.")
    return eta_, c_, groups


class GroupedSPA(SPA):
    """:class:`~lightning_spa.SPA` built from either parametrisation, with parameter groups.

    An ``Optimizer`` subclass, so LightningCLI accepts it both as the top-level ``optimizer:``
    (automatic mode) and as a module's ``optimizer: OptimizerCallable`` (dependency injection).
    Group ``g`` gets ``lr = eta * g["lr_multiplier"]`` (the SPA step size) and ``c``.

    Args:
        params: a module, ``named_parameters()`` or plain tensors (see :func:`spa_param_groups`).
        lr: SGD+M learning rate ``alpha`` (> 0), with ``momentum``; exclusive with ``eta``/``c``.
            Careful: here ``lr`` is SGD's, while :class:`~lightning_spa.SPA`'s ``lr`` is ``eta``.
        momentum: SGD+M momentum ``beta`` in ``[0, 1)``.
        eta: SPA step size (> 0), with ``c``. Nothing given: ``eta 1.0, c 0.1`` (the paper's).
        c: SPA averaging weight in ``(0, 1]``.
        weight_decay: coupled L2 weight decay of the decayed groups.
        no_decay: parameters without weight decay (see :func:`spa_param_groups`).
        lr_multipliers: ``{module prefix or glob: multiplier}``; needs names.
        foreach: kernel choice, as in :class:`~lightning_spa.SPA`.
        fused: kernel choice, as in :class:`~lightning_spa.SPA`.

    Raises:
        ValueError: both parametrisations, half a pair, out-of-range values, or multipliers
            without parameter names (see :func:`resolve_hyperparameters`, :func:`spa_param_groups`).

    Example::

        opt = GroupedSPA(model, lr=0.1, momentum=0.9, weight_decay=1e-4)   # eta 1.0, c 0.1
        opt = GroupedSPA(model, eta=1.0, c=0.1, lr_multipliers={"head": 10.0})
    """

    def __init__(
        self,
        params: ParamSource,
        lr: float | None = None,
        momentum: float | None = None,
        eta: float | None = None,
        c: float | None = None,
        weight_decay: float = 0.0,
        no_decay: Sequence[str] = ("bias", "norm"),
        lr_multipliers: dict[str, float] | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        eta_, c_, groups = _resolved_groups(params, lr, momentum, eta, c, weight_decay, no_decay, lr_multipliers)
        groups = [{**g, "lr": eta_ * g["lr_multiplier"], "c": c_} for g in groups]
        super().__init__(groups, lr=eta_, c=c_, weight_decay=weight_decay, foreach=foreach, fused=fused)


class GroupedSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum) built from either parametrisation, with parameter groups.

    The torch form of the same method: ``lr = c * eta`` and ``momentum = 1 - c`` (Theorem 1
    for constant hyper-parameters), so ``GroupedSGD(m, eta=1, c=0.1)`` and
    ``GroupedSPA(m, eta=1, c=0.1)`` produce the same iterates. Group ``g`` gets
    ``lr = c * eta * g["lr_multiplier"]``. Arguments and errors as :class:`GroupedSPA`.

    Example::

        opt = GroupedSGD(model, eta=1.0, c=0.1, weight_decay=1e-4)   # SGD lr 0.1, momentum 0.9
    """

    def __init__(
        self,
        params: ParamSource,
        lr: float | None = None,
        momentum: float | None = None,
        eta: float | None = None,
        c: float | None = None,
        weight_decay: float = 0.0,
        no_decay: Sequence[str] = ("bias", "norm"),
        lr_multipliers: dict[str, float] | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        eta_, c_, groups = _resolved_groups(params, lr, momentum, eta, c, weight_decay, no_decay, lr_multipliers)
        alpha, beta = constant_spa_to_sgdm(eta_, c_)
        groups = [{**g, "lr": alpha * g["lr_multiplier"], "momentum": beta} for g in groups]
        super().__init__(groups, lr=alpha, momentum=beta, weight_decay=weight_decay, foreach=foreach, fused=fused)


def build_optimizer(
    params: ParamSource,
    *,
    lr: float | None = None,
    momentum: float | None = None,
    eta: float | None = None,
    c: float | None = None,
    form: Form = "spa",
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "norm"),
    lr_multipliers: dict[str, float] | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Builds :class:`GroupedSPA` (``form="spa"``) or :class:`GroupedSGD` (``form="sgd"``).

    For ``LightningModule.configure_optimizers``; the arguments are those of :class:`GroupedSPA`.

    Raises:
        ValueError: an unknown ``form``, or as :class:`GroupedSPA`.

    Example::

        def configure_optimizers(self):
            return build_optimizer(self, lr=0.1, momentum=0.9, weight_decay=1e-4)  # SPA eta 1, c 0.1
    """
    _check_form(form)
    cls: type[GroupedSPA] | type[GroupedSGD] = GroupedSPA if form == "spa" else GroupedSGD
    return cls(
        params,
        lr=lr,
        momentum=momentum,
        eta=eta,
        c=c,
        weight_decay=weight_decay,
        no_decay=no_decay,
        lr_multipliers=lr_multipliers,
        foreach=foreach,
        fused=fused,
    )
