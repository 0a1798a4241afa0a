r"""Theorem 1: the exact mapping between SGD+M and SPA (``THEORY.md`` section 2).

Notation, indexed by the optimizer step ``k`` that uses each value:

- SGD+M (torch form): learning rate ``alpha_k`` (``lr``) and momentum ``beta_k``;
- SPA: step size ``eta_k`` and averaging weight ``c_k`` in ``(0, 1]``.

The forms give identical iterates when ``alpha_k = c_k * eta_k`` and
``beta_k = (1 - c_{k-1}) * eta_{k-1} / eta_k`` for ``k >= 1``. ``beta_0`` has no effect and
is reported as ``1 - c_0``; conversely ``eta_0`` is free and defaults to
``alpha_0 / (1 - beta_0)`` where that start has an SPA form (else the bounded solution,
:func:`sgdm_to_spa`), so constant schedules map to constant schedules
(``lr 0.1, momentum 0.9 <=> eta 1.0, c 0.1``).

Schedules are floats (constant) or equal-length sequences (one value per step); each function
returns the kind it was given. Optimizer state converts both ways with
``z = x - (1 - c_{k-1}) * eta_{k-1} * m`` (:func:`sgdm_optimizer_to_spa`,
:func:`spa_optimizer_to_sgdm`; state dicts: :mod:`lightning_spa.state_dicts`). Keras/TensorFlow
recipes (velocity ``v <- mu v - lr g``) map with :func:`keras_to_spa` and :func:`keras_to_sgdm`
(``THEORY.md`` section 9). Layer: pure schedule math on :mod:`lightning_spa.theorem`; no
Lightning import here.

A torch detail that matters for exactness: a step with ``momentum_k = 0`` is, in the SGD+M
recursion, ``m_{k+1} = g_k`` (the buffer forgets the past and holds this step's gradient, which
the next step with momentum uses: ``m_{k+2} = momentum_{k+1} g_k + g_{k+1}``). ``torch.optim.SGD``
instead leaves its buffer untouched on steps with ``momentum == 0``, and dropping the buffer on
such a step is wrong too (the next step then restarts ``m = g_{k+1}`` and loses ``g_k``). To drive
torch SGD through a schedule with momentum-0 steps followed by momentum again (what
:func:`spa_to_sgdm` returns after a ``c = 1`` step), run each momentum-0 step as a first step:
delete the buffers (``opt.state[p].pop("momentum_buffer", None)``) and step with any momentum
``> 0``; torch then sets ``m = g`` and moves ``x`` by ``lr * g``, exactly the recursion
(``tests/test_mapping_state.py``). :class:`SPA` follows the recursion by itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, overload

from lightning_spa.state_dicts import (
    _SGD_ONLY,
    _copy_group_options,
    _scaled_initial_lr,
    _sgd_group_to_spa,
    group_spa_to_sgdm,
    sgd_state_dict_to_spa,
    spa_state_dict_to_sgd,
)
from lightning_spa.theorem import constant_sgdm_to_spa, step_spa_to_sgdm

__all__ = [
    "NoSPAEquivalentError",
    "keras_to_sgdm",
    "keras_to_spa",
    "sgd_state_dict_to_spa",
    "sgdm_optimizer_to_spa",
    "sgdm_to_spa",
    "spa_optimizer_to_sgdm",
    "spa_state_dict_to_sgd",
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

    ``eta0`` is free: every choice that keeps ``c`` in ``(0, 1]`` gives an exact equivalent, and
    one always exists when ``lr > 0`` (the bounded solution below has ``eta_k >= lr_k``). The
    default ``eta0=None`` first tries the natural start ``lr[0] / (1 - momentum[0])``, which keeps
    a constant start constant; a later ``lr`` drop at fixed momentum then makes ``eta`` grow by
    ``1/momentum`` a step (Figure 1a). Where that start leaves ``(0, 1]`` (a rising momentum:
    a momentum warm-up, OneCycleLR's ``cycle_momentum``; a fast ``lr`` warm-up) or overflows a
    float, the default takes the bounded solution instead, so it finds an SPA form whenever one
    exists. ``eta0="bounded"`` always picks the one member of the family that stays bounded: it
    moves ``eta`` and ``c`` ahead of each change, so that e.g. a MultiStepLR schedule maps to a
    finite SPA schedule of any length. Each stretch after a momentum-0 step chooses alike.

    Numerics: run forwards, the recursion multiplies any error in ``eta`` by ``1/momentum``
    a step. Runs of constant ``(lr, momentum)`` are therefore computed in closed form
    (``eta* + d / momentum**j``, ``eta* = lr / (1 - momentum)``), stretches that change every
    step as the bounded solution (computed backwards, where errors shrink) plus the drift
    away from it, and a drift below ``1e-9 * eta`` at the start of either counts as round-off.
    So a constant or gradual schedule maps back to the constant or gradual one it came from.

    Args:
        lr: SGD learning rate(s) ``alpha_k`` (>= 0).
        momentum: SGD momentum(s) ``beta_k`` (>= 0); ``momentum[0]`` only fixes ``eta0``.
        eta0: the free initial step size: None (the natural start where it works, else the
            bounded solution), ``"bounded"``, or a float (an error if it has no SPA form).

    Raises:
        NoSPAEquivalentError: (a ``ValueError``) naming the first step with no SPA equivalent:
            with the default or ``"bounded"`` only ``lr = 0`` at a step with momentum before or
            after it (``c`` would be 0; SPA's ``eta = 0`` moves nothing, SGD's step still fills
            its buffer); with a float ``eta0`` also ``c`` leaving ``(0, 1]`` or ``eta``
            overflowing from that start.
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
    n = len(alphas)
    starts = [0] + [k for k in range(1, n) if betas[k] == 0.0]
    etas: list[float] = []
    for s, e in zip(starts, [*starts[1:], n], strict=True):
        p = _bounded_solution(alphas, betas, s, e)
        segment = p
        if eta0 != "bounded" and not (s == 0 and eta0 is None and betas[0] >= 1.0):
            if s == 0 and eta0 is not None:
                start = float(eta0)  # the user's choice: an error if it has no SPA form
            elif s == 0:
                start = constant_sgdm_to_spa(alphas[0], betas[0])[0]
            else:
                nxt = betas[s + 1] if s + 1 < n else 0.0
                start = constant_sgdm_to_spa(alphas[s], nxt)[0] if nxt < 1.0 else alphas[s]
            natural = _forward(alphas, betas, s, e, start, p)
            failure = _first_failure(alphas, natural, s, e < n)
            if failure is None:
                segment = natural
            elif s == 0 and eta0 is not None:  # an explicit eta0 that leaves (0, 1]: say so, with the fix
                k, reason = failure
                raise NoSPAEquivalentError(
                    k,
                    f"with eta0 = {float(eta0):.6g}, {reason}. Another eta0 gives an SPA form: eta0=None (the "
                    "default) or 'bounded' finds one.",
                )
        failure = _first_failure(alphas, segment, s, e < n)
        if failure is not None:  # only lr = 0 (c = 0) is left: no eta0 helps
            raise NoSPAEquivalentError(*failure)
        etas.extend(segment)
    cs = [min(1.0, a / e) if e else 1.0 for a, e in zip(alphas, etas, strict=True)]
    return (etas[0], cs[0]) if scalar else (etas, cs)


def _first_failure(alphas: list[float], segment: list[float], s: int, restart: bool) -> tuple[int, str] | None:
    """The first step of ``segment`` (steps ``s..``) that is no SPA step, as ``(step, reason)``, or None.

    ``restart``: a momentum-0 step follows the segment, which needs ``c = 1`` on its last step.
    """
    for k, eta in enumerate(segment, start=s):
        if eta == 0.0 and alphas[k] == 0.0 and len(segment) == 1:
            continue  # lr 0 between momentum-0 steps: SPA's eta = 0 step (c = 1), which moves nothing
        if not (0.0 < eta < math.inf):
            if alphas[k] == 0.0:
                return k, "lr is 0 there: c = lr/eta would be 0, outside (0, 1] (SPA needs lr > 0 before momentum)"
            return k, f"eta would be {eta} (it drifts by 1/momentum a step)"
        ck = alphas[k] / eta
        if not 0.0 < ck <= 1.0 + 1e-12:
            return k, f"c = lr/eta = {alphas[k]:.6g}/{eta:.6g} = {ck:.6g} is outside (0, 1]"
    last = s + len(segment) - 1
    c_last = alphas[last] / segment[-1] if segment[-1] else 1.0
    if restart and abs(c_last - 1.0) > 1e-9:
        return last + 1, f"momentum 0 needs c = 1 at step {last}, where c was {c_last:.6g}"
    return None


@overload
def keras_to_spa(lr: float, momentum: float) -> tuple[float, float]: ...
@overload
def keras_to_spa(lr: Sequence[float], momentum: Schedule) -> tuple[list[float], list[float]]: ...
@overload
def keras_to_spa(lr: float, momentum: Sequence[float]) -> tuple[list[float], list[float]]: ...


def keras_to_spa(lr: Schedule, momentum: Schedule) -> tuple[Any, Any]:
    """Maps a Keras/TensorFlow SGD schedule ``(lr, momentum)`` to the SPA schedule ``(eta, c)``.

    Keras (and TensorFlow, and older MXNet) keep the learning rate inside the velocity:
    ``v <- mu_k v - lr_k g_k;  x <- x + v``. SPA's steps obey
    ``x_{k+1} - x_k = (c_k (1 - c_{k-1}) / c_{k-1}) (x_k - x_{k-1}) - c_k eta_k g_k``
    (``THEORY.md`` section 9), so the two give identical iterates when
    ``mu_k = c_k (1 - c_{k-1}) / c_{k-1}`` and ``lr_k = c_k eta_k``. Solved backwards (where it is
    stable, as :func:`sgdm_to_spa`'s bounded solution)::

        c_{n-1} = 1 - mu_{n-1}      c_{k-1} = c_k / (mu_k + c_k)      eta_k = lr_k / c_k

    which is always in ``(0, 1]``: every Keras schedule has an SPA form. With a constant momentum
    this is ``c = 1 - mu`` and ``eta_k = lr_k / (1 - mu)`` whatever the learning-rate schedule: a
    Keras recipe runs in PyTorch as ``SPA(lr=lr_k / (1 - mu), c=1 - mu)``, while
    ``torch.optim.SGD`` with the same ``lr_k`` takes another path (its buffer keeps past gradients
    at their own learning rate); :func:`keras_to_sgdm` gives the torch SGD schedule that
    reproduces the Keras run. ``mu_0`` has no effect (the velocity starts at 0); a momentum 0
    at step ``k`` gives ``c_{k-1} = 1``.

    Args:
        lr: Keras learning rate(s) ``lr_k >= 0`` (0 gives ``eta = 0``, which SPA runs exactly).
        momentum: Keras momentum(s) ``0 <= mu_k < 1``.

    Raises:
        ValueError: values out of range, or lengths differ.
    """
    lrs, mus, scalar = _as_lists(lr, momentum, ("lr", "momentum"))
    for k, (a, m) in enumerate(zip(lrs, mus, strict=True)):
        if not (0.0 <= a < math.inf):
            raise ValueError(f"`lr` at step {k} is {a}: it must be finite and >= 0.")
        if not 0.0 <= m < 1.0:
            raise ValueError(f"`momentum` at step {k} is {m}: Keras' momentum must be in [0, 1).")
    cs = [1.0 - mus[-1]]
    for k in range(len(lrs) - 1, 0, -1):
        cs.append(cs[-1] / (mus[k] + cs[-1]))
    cs.reverse()
    etas = [a / ck for a, ck in zip(lrs, cs, strict=True)]
    return (etas[0], cs[0]) if scalar else (etas, cs)


@overload
def keras_to_sgdm(lr: float, momentum: float) -> tuple[float, float]: ...
@overload
def keras_to_sgdm(lr: Sequence[float], momentum: Schedule) -> tuple[list[float], list[float]]: ...
@overload
def keras_to_sgdm(lr: float, momentum: Sequence[float]) -> tuple[list[float], list[float]]: ...


def keras_to_sgdm(lr: Schedule, momentum: Schedule) -> tuple[Any, Any]:
    """Maps a Keras/TensorFlow SGD schedule to the ``torch.optim.SGD`` schedule ``(lr, momentum)`` that reproduces it.

    :func:`spa_to_sgdm` of :func:`keras_to_spa`: torch's ``lr_k`` is Keras' and its momentum is
    ``mu_k * lr_{k-1} / lr_k`` (Goyal et al.'s "momentum correction"): unchanged while the
    learning rate is constant, rescaled at every change.

    Raises:
        ValueError: as :func:`keras_to_spa`, or ``lr = 0`` at a step (torch's momentum would be infinite;
            :class:`~lightning_spa.SPA` runs it with :func:`keras_to_spa`).
    """
    eta, c = keras_to_spa(lr, momentum)
    etas = [eta] if isinstance(eta, float) else eta
    for k, e in enumerate(etas):
        if e == 0.0:
            raise ValueError(
                f"`lr` is 0 at step {k}: no torch SGD step reproduces the Keras step after it (torch's momentum "
                "would be infinite); run it with lightning_spa.SPA and keras_to_spa instead."
            )
    return spa_to_sgdm(eta, c)


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


def sgdm_optimizer_to_spa(sgd: Any, eta: float | Sequence[float] | None = None) -> Any:
    """Builds an :class:`~lightning_spa.SPA` optimizer that continues ``sgd``'s trajectory exactly.

    Works between any two steps. Each param group's next step keeps SGD's ``lr`` (alpha) and
    ``momentum`` (beta): the SPA group gets ``eta`` (default ``alpha / (1 - beta)``, one value
    or one per group) and ``c = alpha / eta``; the momentum buffers are copied, so that
    ``z = x - beta * eta * m``. Extra group keys (names) are kept; ``initial_lr`` (written by an
    LR scheduler) is converted like ``lr`` (times ``eta / alpha``), so a scheduler attached to the
    SPA optimizer afterwards starts from the SPA value.

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
        opts = _copy_group_options(group, (*_SGD_ONLY, "lr", "initial_lr"))
        opts.update(_scaled_initial_lr(group, float(group_eta) / alpha if alpha else 1.0))
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
    ``initial_lr`` (an LR scheduler's) is converted like ``lr`` (times ``c``). The state-dict
    form of this conversion is :func:`~lightning_spa.state_dicts.spa_state_dict_to_sgd`.

    Raises:
        ValueError: parameters of one group with different histories, or ``eta = 0`` with history
            (no SGD step reproduces it).
    """
    import torch

    groups, momenta = [], []
    for i, group in enumerate(spa.param_groups):
        eta, c = float(group["lr"]), float(group["c"])
        histories = [
            (st["prev_eta"], st["prev_c"])
            for p in group["params"]
            if (st := spa.state.get(p)) and st.get("momentum_buffer") is not None
        ]
        lr, momentum = group_spa_to_sgdm(i, eta, c, histories)
        momenta.append(momentum)
        opts = _copy_group_options(group, ("c", "lr", "initial_lr"))
        opts.update(_scaled_initial_lr(group, c))  # lr / eta
        groups.append({**opts, "lr": lr, "momentum": momentum})
    sgd = torch.optim.SGD(groups)
    for group, momentum in zip(spa.param_groups, momenta, strict=True):
        for p in group["params"]:
            history = spa.momentum_history(p)
            if history is not None and momentum != 0.0:
                sgd.state[p] = {"momentum_buffer": history[0].detach().clone()}
    return sgd
