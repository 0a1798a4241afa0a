r"""Theorem 1: the exact mapping between SGD+M and SPA (``THEORY.md`` section 2).

Notation, indexed by the optimizer step ``k`` that uses each value:

- SGD+M (torch form): learning rate ``alpha_k`` (``lr``) and momentum ``beta_k``;
- SPA: step size ``eta_k`` and averaging weight ``c_k`` in ``(0, 1]``.

The forms give identical iterates when ``alpha_k = c_k * eta_k`` and
``beta_k = (1 - c_{k-1}) * eta_{k-1} / eta_k`` for ``k >= 1``. ``beta_0`` has no effect and
is reported as ``1 - c_0``; conversely ``eta_0`` is free and defaults to
``alpha_0 / (1 - beta_0)``, so constant schedules map to constant schedules
(``lr 0.1, momentum 0.9 <=> eta 1.0, c 0.1``).

Schedules are floats (constant) or equal-length sequences (one value per step); each function
returns the kind it was given. Optimizer state converts both ways with
``z = x - (1 - c_{k-1}) * eta_{k-1} * m`` (:func:`sgdm_optimizer_to_spa`,
:func:`spa_optimizer_to_sgdm`). No Lightning import here.

A torch detail that matters for exactness: ``torch.optim.SGD`` leaves its momentum buffer
untouched on steps with ``momentum == 0`` instead of setting ``m = g``. Code that drives torch
SGD through a schedule with momentum-0 steps followed by momentum again must drop the buffer
on those steps (torch then restarts it from ``g``, which is the SGD+M recursion); :class:`SPA`
follows the recursion by itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, overload

from lightning_spa.theorem import constant_sgdm_to_spa, constant_spa_to_sgdm, step_momentum, step_spa_to_sgdm

__all__ = [
    "NoSPAEquivalentError",
    "sgd_state_dict_to_spa",
    "sgdm_optimizer_to_spa",
    "sgdm_to_spa",
    "spa_optimizer_to_sgdm",
    "spa_to_sgdm",
]

Schedule = float | Sequence[float]
_SNAP = 1e-9  # relative drift from the bounded solution treated as round-off


class NoSPAEquivalentError(ValueError):
    """An SGD+M schedule has no SPA equivalent from ``step`` on (see :func:`sgdm_to_spa`)."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"No SPA schedule exists at step {step}: {reason}")
        self.step = step
        self.reason = reason


def _as_lists(a: Schedule, b: Schedule, names: tuple[str, str]) -> tuple[list[float], list[float], bool]:
    """Broadcasts two schedules to equal-length lists; the flag says whether both were scalars."""
    a_scalar, b_scalar = not isinstance(a, Sequence), not isinstance(b, Sequence)
    if a_scalar and b_scalar:
        return [float(a)], [float(b)], True  # type: ignore[arg-type]
    n = len(b) if a_scalar else len(a)  # type: ignore[arg-type]
    la = [float(a)] * n if a_scalar else [float(v) for v in a]  # type: ignore[arg-type, union-attr]
    lb = [float(b)] * n if b_scalar else [float(v) for v in b]  # type: ignore[arg-type, union-attr]
    if len(la) != len(lb):
        raise ValueError(f"`{names[0]}` and `{names[1]}` must have the same length, got {len(la)} and {len(lb)}.")
    if not la:
        raise ValueError(f"`{names[0]}` and `{names[1]}` are empty: give at least one step.")
    return la, lb, False


@overload
def spa_to_sgdm(eta: float, c: float) -> tuple[float, float]: ...
@overload
def spa_to_sgdm(eta: Sequence[float], c: Schedule) -> tuple[list[float], list[float]]: ...
@overload
def spa_to_sgdm(eta: float, c: Sequence[float]) -> tuple[list[float], list[float]]: ...


def spa_to_sgdm(eta: Schedule, c: Schedule) -> tuple[Any, Any]:
    """Maps an SPA schedule ``(eta, c)`` to the SGD+M schedule ``(lr, momentum)``.

    Always defined. A sudden drop of ``eta`` shows up as ``momentum > 1`` for one step (the
    spike of Figure 1c/e): the tools in this package flag it, this function reports it.

    Raises:
        ValueError: ``eta`` not finite and positive, ``c`` outside ``(0, 1]``, or lengths differ.
    """
    etas, cs, scalar = _as_lists(eta, c, ("eta", "c"))
    for k, (e, ck) in enumerate(zip(etas, cs, strict=True)):
        if not (0.0 < e < math.inf):
            raise ValueError(f"`eta` at step {k} is {e}: it must be finite and > 0.")
        if not 0.0 < ck <= 1.0:
            raise ValueError(f"`c` at step {k} is {ck}: it must be in (0, 1].")
    steps = [step_spa_to_sgdm(etas[k], cs[k], (etas[k - 1], cs[k - 1]) if k else None) for k in range(len(etas))]
    lr, momentum = [a for a, _ in steps], [b for _, b in steps]
    return (lr[0], momentum[0]) if scalar else (lr, momentum)


@overload
def sgdm_to_spa(lr: float, momentum: float, eta0: float | str | None = None) -> tuple[float, float]: ...
@overload
def sgdm_to_spa(
    lr: Sequence[float], momentum: Schedule, eta0: float | str | None = None
) -> tuple[list[float], list[float]]: ...
@overload
def sgdm_to_spa(lr: float, momentum: Sequence[float], eta0: float | None = None) -> tuple[list[float], list[float]]: ...


def sgdm_to_spa(lr: Schedule, momentum: Schedule, eta0: float | str | None = None) -> tuple[Any, Any]:
    """Maps an SGD+M schedule ``(lr, momentum)`` to the SPA schedule ``(eta, c)``.

    ``eta_k = (eta_{k-1} - lr_{k-1}) / momentum_k`` and ``c_k = lr_k / eta_k``. A step with
    ``momentum 0`` (``k >= 1``) needs ``c = 1`` on the step before; the past is then forgotten
    and ``eta`` is free again, chosen as ``lr_k / (1 - momentum_{k+1})`` like ``eta0``.

    ``eta0`` is free: every choice gives an exact equivalent. The default keeps a constant
    start constant; then a later ``lr`` drop at fixed momentum makes ``eta`` grow by
    ``1/momentum`` a step for ever (Figure 1a), until it overflows a float (an error names the
    step). ``eta0="bounded"`` picks the one member of the family that stays bounded: it moves
    ``eta`` and ``c`` ahead of each change, so that e.g. a MultiStepLR schedule maps to a
    finite SPA schedule of any length.

    Numerics: run forwards, the recursion multiplies any error in ``eta`` by ``1/momentum``
    a step. Runs of constant ``(lr, momentum)`` are therefore computed in closed form
    (``eta* + d / momentum**j``, ``eta* = lr / (1 - momentum)``), stretches that change every
    step as the bounded solution (computed backwards, where errors shrink) plus the drift
    away from it, and a drift below ``1e-9 * eta`` at the start of either counts as round-off.
    So a constant or gradual schedule maps back to the constant or gradual one it came from.

    Args:
        lr: SGD learning rate(s) ``alpha_k`` (>= 0).
        momentum: SGD momentum(s) ``beta_k`` (>= 0); ``momentum[0]`` only fixes ``eta0``.
        eta0: the free initial step size: a float, None for ``lr[0] / (1 - momentum[0])``, or
            ``"bounded"``.

    Raises:
        NoSPAEquivalentError: (a ``ValueError``) naming the first step with no SPA equivalent:
            momentum 0 after a step with ``c < 1``, ``c`` leaving ``(0, 1]`` (an increasing
            momentum, e.g. a momentum warm-up, drives ``eta`` below ``lr``), or ``eta``
            overflowing.
        ValueError: negative or non-finite inputs, lengths differ, or an unknown ``eta0``.
    """
    alphas, betas, scalar = _as_lists(lr, momentum, ("lr", "momentum"))
    for k, (a, b) in enumerate(zip(alphas, betas, strict=True)):
        if not (0.0 <= a < math.inf):
            raise ValueError(f"`lr` at step {k} is {a}: it must be finite and >= 0.")
        if not (0.0 <= b < math.inf):
            raise ValueError(f"`momentum` at step {k} is {b}: it must be finite and >= 0.")
    if isinstance(eta0, str) and eta0 != "bounded":
        raise ValueError(f"`eta0` must be a float, None or 'bounded', got {eta0!r}.")
    if eta0 is None and betas[0] >= 1.0:
        raise NoSPAEquivalentError(0, f"momentum {betas[0]} >= 1; pass `eta0` explicitly.")
    n = len(alphas)
    starts = [0] + [k for k in range(1, n) if betas[k] == 0.0]
    etas: list[float] = []
    for s, e in zip(starts, [*starts[1:], n], strict=True):
        p = _bounded_solution(alphas, betas, s, e)
        if eta0 == "bounded":
            segment = p
        else:
            if s == 0:
                start = constant_sgdm_to_spa(alphas[0], betas[0])[0] if eta0 is None else float(eta0)
            else:
                nxt = betas[s + 1] if s + 1 < n else 0.0
                start = constant_sgdm_to_spa(alphas[s], nxt)[0] if nxt < 1.0 else alphas[s]
            segment = _forward(alphas, betas, s, e, start, p)
        for k, eta in enumerate(segment, start=s):
            if not (0.0 < eta < math.inf):
                hint = "" if eta0 == "bounded" else " Pass eta0='bounded' for the SPA form that stays finite."
                raise NoSPAEquivalentError(k, f"eta would be {eta} (it drifts by 1/momentum a step).{hint}")
            ck = alphas[k] / eta
            if not 0.0 < ck <= 1.0 + 1e-12:
                raise NoSPAEquivalentError(
                    k,
                    f"c = lr/eta = {alphas[k]:.6g}/{eta:.6g} = {ck:.6g} is outside (0, 1] (momentum rising too fast?).",
                )
        etas.extend(segment)
        if e < n and abs(alphas[e - 1] / etas[-1] - 1.0) > 1e-9:
            raise NoSPAEquivalentError(
                e, f"momentum 0 needs c = 1 at step {e - 1}, where c was {alphas[e - 1] / etas[-1]:.6g}."
            )
    cs = [min(1.0, a / e) for a, e in zip(alphas, etas, strict=True)]
    return (etas[0], cs[0]) if scalar else (etas, cs)


def _bounded_solution(alphas: list[float], betas: list[float], s: int, e: int) -> list[float]:
    """The bounded solution of the recursion on steps ``s..e-1``, computed backwards.

    At the last step ``c = 1`` if a momentum-0 step follows, else the schedule is taken as
    constant from there on (``eta = lr / (1 - momentum)``).
    """
    last = e - 1
    if e < len(alphas):
        p_last = alphas[last]
    else:
        b_end = betas[last] if last > s or s == 0 else 0.0  # a one-step restart at the end: c = 1
        p_last = constant_sgdm_to_spa(alphas[last], b_end)[0] if b_end < 1.0 else alphas[last]
    p = [p_last]
    for k in range(last, s, -1):  # eta_{k-1} = momentum_k * eta_k + lr_{k-1}: errors shrink
        p.append(betas[k] * p[-1] + alphas[k - 1])
    p.reverse()
    return p


def _forward(alphas: list[float], betas: list[float], s: int, e: int, start: float, p: list[float]) -> list[float]:
    """The solution from ``start`` on steps ``s..e-1`` (see :func:`sgdm_to_spa`, Numerics)."""
    out = [start]
    mode, fixed, dev, j, drift = "start", 0.0, 0.0, 0, 0.0
    for k in range(s + 1, e):
        pair = (alphas[k - 1], betas[k])
        same_prev = k - 1 > s and (alphas[k - 2], betas[k - 1]) == pair
        same_next = k + 1 < e and (alphas[k], betas[k + 1]) == pair
        b, prev = pair[1], out[-1]
        if not b < 1.0:  # a spike: one plain step
            eta, mode = (prev - pair[0]) / b, "plain"
        elif same_prev and mode == "run":
            j += 1
            eta = fixed + _drift(dev, b, j)
        elif same_next or k == e - 1:  # a run of constant (lr, momentum) starts
            fixed = constant_sgdm_to_spa(pair[0], b)[0]
            dev = prev - fixed
            if abs(dev) <= _SNAP * abs(fixed):
                dev = 0.0
            j, mode = 1, "run"
            eta = fixed + _drift(dev, b, 1)
        else:  # changes every step: bounded solution plus drift
            if mode != "changing":
                drift = prev - p[k - 1 - s]
                if abs(drift) <= _SNAP * abs(prev):
                    drift = 0.0
                mode = "changing"
            drift = _drift(drift, b, 1)
            eta = p[k - s] + drift
        out.append(eta)
    return out


def _drift(dev: float, b: float, j: int) -> float:
    """``dev / b**j`` without ``ZeroDivisionError`` or ``OverflowError`` for long runs."""
    if dev == 0.0:
        return 0.0
    try:
        return dev / b**j
    except (ZeroDivisionError, OverflowError):
        return math.copysign(math.inf, dev)


def _copy_group_options(group: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in drop}


_SGD_ONLY = ("momentum", "dampening", "nesterov", "differentiable")


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
    optimizer's own) when given. Warns once that it converted. Used by :meth:`SPA.load_state_dict`.

    Raises:
        ValueError: Nesterov, dampening or momentum >= 1 (no constant SPA form).
    """
    groups, state = [], {}
    for i, group in enumerate(state_dict["param_groups"]):
        eta, c = _sgd_group_to_spa(group, f"param group {i}")
        new = _copy_group_options(group, (*_SGD_ONLY, "lr", "foreach", "fused"))
        if current_groups is not None and i < len(current_groups):
            new.update(foreach=current_groups[i].get("foreach"), fused=current_groups[i].get("fused"))
        if "initial_lr" in group:
            new["initial_lr"] = float(group["initial_lr"]) * (eta / float(group["lr"]) if float(group["lr"]) else 1.0)
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


def sgdm_optimizer_to_spa(sgd: Any, eta: float | Sequence[float] | None = None) -> Any:
    """Builds an :class:`~lightning_spa.SPA` optimizer that continues ``sgd``'s trajectory exactly.

    Works between any two steps. Each param group's next step keeps SGD's ``lr`` (alpha) and
    ``momentum`` (beta): the SPA group gets ``eta`` (default ``alpha / (1 - beta)``, one value
    or one per group) and ``c = alpha / eta``; the momentum buffers are copied, so that
    ``z = x - beta * eta * m``. Extra group keys (names, ``initial_lr``) are kept.

    Raises:
        ValueError: Nesterov or dampening (no SPA form), or a momentum >= 1 without ``eta``.
    """
    import torch

    from lightning_spa.optim import SPA

    etas = eta if isinstance(eta, Sequence) else [eta] * len(sgd.param_groups)
    if len(etas) != len(sgd.param_groups):
        raise ValueError(f"`eta` has {len(etas)} values for {len(sgd.param_groups)} param groups.")
    groups = []
    for i, (group, group_eta) in enumerate(zip(sgd.param_groups, etas, strict=True)):
        alpha, beta = float(group["lr"]), float(group["momentum"])
        if group_eta is None:
            group_eta = _sgd_group_to_spa(group, f"param group {i}")[0]
        elif group.get("nesterov") or float(group.get("dampening", 0.0)) != 0.0:
            _sgd_group_to_spa(group, f"param group {i}")  # raises
        opts = _copy_group_options(group, (*_SGD_ONLY, "lr"))
        groups.append({**opts, "lr": float(group_eta), "c": alpha / float(group_eta)})
    spa = SPA(groups)
    with torch.no_grad():
        for group, spa_group in zip(sgd.param_groups, spa.param_groups, strict=True):
            beta, group_eta = float(group["momentum"]), spa_group["lr"]
            if beta == 0.0:
                continue
            prev_c = 1.0 - beta  # history (eta, 1 - beta): scale beta * eta to round-off (any beta, with `eta`)
            for p in group["params"]:
                buf = sgd.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    spa.state[p] = {
                        "momentum_buffer": buf.clone(), "prev_eta": group_eta, "prev_c": prev_c,
                        "prev_scale": (1.0 - prev_c) * group_eta,
                    }  # fmt: skip
    return spa


def spa_optimizer_to_sgdm(spa: Any) -> Any:
    """Builds a ``torch.optim.SGD`` (momentum) that continues ``spa``'s trajectory exactly.

    The SGD group gets ``lr = c * eta`` and ``momentum = s / eta``, the Theorem-1 momentum of
    the next step (``s`` the scale of the buffers, :meth:`SPA.momentum_history`; exactly
    ``1 - c_prev`` while eta is unchanged), and a copy of the buffers. Without history (before
    the first step, or after ``c = 1`` steps, which drop the buffers) ``momentum = 1 - c``, so a
    constant schedule continues as itself. Later steps keep those values unless a schedule
    changes them (a constant SPA schedule has ``momentum = 1 - c`` from its second step on).

    Raises:
        ValueError: parameters of one group with different histories, or ``eta = 0`` with history
            (no SGD step reproduces it).
    """
    import torch

    groups, momenta = [], []
    for i, group in enumerate(spa.param_groups):
        eta, c = float(group["lr"]), float(group["c"])
        pairs = {
            (float(st["prev_eta"]), float(st["prev_c"]))
            for p in group["params"]
            if (st := spa.state.get(p)) and st.get("momentum_buffer") is not None
        }
        if len(pairs) > 1:
            raise ValueError(
                f"Parameters of param group {i} carry different momentum histories (some skipped steps); "
                "step them together first."
            )
        lr, momentum = constant_spa_to_sgdm(eta, c)
        if pairs:
            prev_eta, prev_c = pairs.pop()
            if eta == 0.0:
                raise ValueError(f"Param group {i} has eta = 0 with momentum history: no SGD+M step reproduces it.")
            momentum = step_momentum(eta, prev_eta, prev_c)
        momenta.append(momentum)
        groups.append({**_copy_group_options(group, ("c", "lr")), "lr": lr, "momentum": momentum})
    sgd = torch.optim.SGD(groups)
    for group, momentum in zip(spa.param_groups, momenta, strict=True):
        for p in group["params"]:
            history = spa.momentum_history(p)
            if history is not None and momentum != 0.0:
                sgd.state[p] = {"momentum_buffer": history[0].detach().clone()}
    return sgd
