r"""Insight 1 of the paper as numbers: is momentum helping? (``THEORY.md`` section 4.)

For optimizer step ``k`` of SPA (``eta_k``, ``c_k``) or of torch SGD+M (``alpha_k``, ``beta_k``)::

    g_k      = +-grad_k + weight_decay * x_k          (the gradient the optimizer uses; - if maximize)
    m_{k+1}  = beta_k * m_k + g_k                     (torch's momentum buffer)
    x_{k+1}  = x_k - alpha_k * m_{k+1}                alpha_k = c_k * eta_k

    step_sq        = ||x_{k+1} - x_k||^2 = ||alpha_k g_k + b_k m_k||^2,   b_k = alpha_k beta_k
    grad_sq        = eta_k^2 * ||g_k||^2
    grad_sq_scaled = (c_k / (2 - c_k)) * grad_sq       the noise-level value of step_sq
    cosine         = Re<g_k, m_k> / (||g_k|| ||m_k||)   (undefined on a step without history)
    ratio          = EMA(step_sq) / EMA(grad_sq_scaled)

``ratio`` is 1 when the gradients are noise uncorrelated with the past step (momentum idle), above
1 when they are aligned with the momentum buffer (momentum accelerates) and below 1 when they are
anti-correlated (the iterates oscillate, or batches drawn without replacement): momentum damps, and
removing it at this ``eta`` is unsafe (``THEORY.md`` section 10). The first step has no momentum
yet, so its ratio is ``c (2 - c)``.

Everything comes from dot products of the parameters ``x_k``, their gradients and the momentum
buffers ``m_k``, without a parameter-sized allocation (half-precision tensors are upcast tensor by
tensor so that the sums accumulate in float32), e.g.
``||g||^2 = ||grad||^2 +- 2 wd <grad, x> + wd^2 ||x||^2``, taken in two halves around the step:
:func:`measure_before_step` (after backward: ``x_k``, ``m_k``, the gradient as it stands) and
:func:`measure_after_step` (the gradient the step consumed, e.g. after clipping by a factor
``kappa`` that the second half recovers). The hyper-parameters are read *during* the step
(:func:`group_hyper`, from a step post-hook), so they are the ones the step used. The
displacement is expanded the same way, which holds whatever the optimizer stores: for SPA
``x_{k+1} - x_k = -c_k (eta_k g_k + s_k m_k)`` with ``z_k = x_k - s_k m_k``
(:meth:`~lightning_spa.SPA.momentum_history`, :func:`prev_scales`), so ``b_k = c_k s_k``, finite
even at ``eta_k = 0``, where ``beta_k`` is not (``THEORY.md`` section 9).

- Complex parameters: ``<a, b> = Re(vdot(a, b))``, the real inner product of ``C^n = R^{2n}``.
- Sparse gradients (torch SGD; its momentum buffer is then sparse too): the sums run over the
  stored entries (coalesced), so they are exact and cost ``O(nnz)``.
- Gradients still multiplied by an AMP loss scale ``S`` (optimizers that unscale inside their
  step, ``_step_supports_amp_scaling``: torch's fused SGD): :func:`step_samples` divides the
  gradient sums by ``S`` and ``S^2``.

For SGD+M the SPA values are those of a constant schedule at the current values (Theorem 1,
:func:`lightning_spa.theorem.constant_sgdm_to_spa`); for SPA the SGD+M values are the exact
Theorem-1 ones of the step, ``lr = c_k eta_k`` and ``momentum = (1 - c_{k-1}) eta_{k-1} / eta_k``
(``1 - c_0`` without history). The EMAs and the step clock live in :mod:`lightning_spa.meter`.

Sharded parameters (DTensor, FSDP2) contribute local dot products that
:func:`lightning_spa.distributed.reduce_partial_sums` sums across ranks; this module imports no
Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_spa.distributed import is_sharded, local_tensor, reduce_partial_sums, replication_factor
from lightning_spa.optim import SPA
from lightning_spa.theorem import constant_sgdm_to_spa, constant_spa_to_sgdm, step_momentum

__all__ = [
    "FIELDS",
    "SAMPLE_FIELDS",
    "GroupHyper",
    "group_hyper",
    "has_spa_form",
    "prev_scales",
    "measure_before_step",
    "measure_after_step",
    "complete_sums",
    "step_samples",
    "cosine_of",
]

# Columns of the per-group partial sums.
FIELDS = ("grad_sq", "grad_x", "x_sq", "grad_m", "x_m", "m_sq")
# Columns of step_samples.
SAMPLE_FIELDS = ("step_sq", "grad_sq", "grad_sq_scaled", "g_m", "g_sq", "m_sq")


@dataclass(frozen=True)
class GroupHyper:
    """The hyper-parameters one param group uses on this step, in both parametrisations.

    Attributes:
        eta: SPA step size ``eta_k`` (NaN for a torch SGD step with ``momentum >= 1``).
        c: SPA averaging weight ``c_k`` (NaN likewise).
        lr: SGD+M step size ``alpha_k = c_k * eta_k``.
        momentum: SGD+M momentum ``beta_k`` (``inf`` for SPA at ``eta_k = 0`` after a step with momentum).
        carry: ``b_k = alpha_k * beta_k``, the weight of ``m_k`` in the step (``0`` without history).
        weight_decay: coupled weight decay added to the gradient.
        sign: ``-1.0`` when the optimizer maximizes, else ``1.0``.
    """

    eta: float
    c: float
    lr: float
    momentum: float
    carry: float
    weight_decay: float
    sign: float


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _history(optimizer: Optimizer, p: Tensor, group: dict[str, Any]) -> Tensor | None:
    """``m_k`` of ``p`` if the coming step folds it in, else ``None``.

    SPA keeps no state for a parameter without history (before its first step, after a step at
    ``c = 1``): :meth:`~lightning_spa.SPA.momentum_history`. A torch SGD group with momentum 0
    leaves its old buffer in place but does not use it.
    """
    if isinstance(optimizer, SPA):
        history = optimizer.momentum_history(p)
        return None if history is None else history[0]
    state = optimizer.state.get(p)
    buf = state.get("momentum_buffer") if state else None
    return buf if buf is not None and float(group.get("momentum", 0.0)) != 0.0 else None


def prev_scales(optimizer: Optimizer) -> list[float | None]:
    """SPA's scale ``s = (1 - c_{k-1}) eta_{k-1}`` (``z = x - s m``) per param group, read before the
    step (``None``: no history, or not SPA). Read from the group's first parameter with a gradient
    and history: the parameters of one group are assumed to share their step history."""
    if not isinstance(optimizer, SPA):
        return [None] * len(optimizer.param_groups)
    out: list[float | None] = []
    for group in optimizer.param_groups:
        prev = None
        for p in group["params"]:
            history = optimizer.momentum_history(p) if p.grad is not None else None
            if history is not None:
                prev = _as_float(history[1])  # a host read of a 0-dim tensor in SPA's tensor-lr mode
                break
        out.append(prev or None)
    return out


def group_hyper(optimizer: Optimizer, group: dict[str, Any], prev_scale: float | None = None) -> GroupHyper:
    """The hyper-parameters ``group`` uses on the step (read them while the step is being taken).

    Args:
        optimizer: an SPA or torch SGD optimizer without Nesterov and dampening
            (:func:`lightning_spa.callbacks._select.unsupported_reason`).
        group: one of ``optimizer.param_groups``.
        prev_scale: for SPA, the group's entry of :func:`prev_scales` read before the step.
    """
    wd, sign = float(group.get("weight_decay", 0.0)), -1.0 if group.get("maximize", False) else 1.0
    if isinstance(optimizer, SPA):
        eta, c = _as_float(group["lr"]), _as_float(group["c"])
        lr, beta = constant_spa_to_sgdm(eta, c)  # beta_0 is reported as 1 - c_0 (no effect)
        if prev_scale is not None:  # Theorem 1 with (1 - c_{k-1}) eta_{k-1} = prev_scale
            beta = step_momentum(eta, prev_scale, 0.0)
        return GroupHyper(eta, c, lr, beta, c * prev_scale if prev_scale is not None else 0.0, wd, sign)
    lr, beta = _as_float(group["lr"]), float(group.get("momentum", 0.0))
    try:
        eta, c = constant_sgdm_to_spa(lr, beta)
    except ValueError:  # momentum >= 1: the one-step spike of an instant change (see has_spa_form)
        eta, c = math.nan, math.nan
    return GroupHyper(eta, c, lr, beta, lr * beta, wd, sign)


def has_spa_form(hyper: GroupHyper) -> bool:
    """False for a torch SGD step with ``momentum >= 1``, which such a step cannot be measured by."""
    return not math.isnan(hyper.eta)


def _dense_dot(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.reshape(-1), b.reshape(-1)
    if a.is_complex():
        if a.dtype == torch.complex32:
            a, b = a.to(torch.complex64), b.to(torch.complex64)
        return torch.vdot(a, b).real
    if a.dtype not in (torch.float32, torch.float64):  # half precision: accumulate in float32
        a, b = a.float(), b.float()
    return torch.dot(a, b)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``Re<a, b>``; ``O(nnz)`` when either is sparse (COO)."""
    if not (a.is_sparse or b.is_sparse):
        return _dense_dot(a, b)
    if not a.is_sparse:
        a, b = b, a
    a = a.coalesce()
    if b.is_sparse:
        both = (a.conj() * b.coalesce()).coalesce().values()
        return both.sum().real if both.is_complex() else both.sum()
    return _dense_dot(a.values(), b.sparse_mask(a).values())


def _square_norms(ts: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``||t||^2`` of each tensor (one ``foreach`` norm for the dense ones)."""
    if not ts:
        return torch.zeros(0, dtype=dtype)
    if not any(t.is_sparse for t in ts):
        return torch.stack(torch._foreach_norm(ts, 2)).to(dtype).square()
    norms = [torch.linalg.vector_norm(t.coalesce().values() if t.is_sparse else t) for t in ts]
    return torch.stack(norms).to(dtype).square()


def _group_fields(optimizer: Optimizer, group: dict[str, Any], ps: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The :data:`FIELDS` sums of the local parts of ``ps`` (parameters of ``group`` with a gradient)."""
    wd = bool(group.get("weight_decay", 0.0))
    g = [local_tensor(p.grad) for p in ps]  # type: ignore[arg-type]
    x = [local_tensor(p.detach()) for p in ps]
    hist = [(gi, local_tensor(h), xi) for gi, h, xi in
            zip(g, (_history(optimizer, p, group) for p in ps), x, strict=True) if h is not None]  # fmt: skip
    m = [h for _, h, _ in hist]
    squares = _square_norms(g + (x if wd else []) + m, dtype)
    n_g, n_x = len(g), len(x) if wd else 0
    zero = torch.zeros((), dtype=dtype, device=squares.device)

    def dots(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        return torch.stack([_dot(a, b).to(dtype) for a, b in pairs]).sum() if pairs else zero

    return torch.stack([
        squares[:n_g].sum(),
        dots(list(zip(g, x, strict=True))) if wd else zero,
        squares[n_g : n_g + n_x].sum(),
        dots([(gi, h) for gi, h, _ in hist]),
        dots([(xi, h) for _, h, xi in hist]) if wd else zero,
        squares[n_g + n_x :].sum(),
    ])  # fmt: skip


def _bucketed(optimizer: Optimizer, fields: Any, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(2, n_groups, n)`` sums of ``fields(group, params) -> (n,)`` over the parameters with a gradient:
    ``[0]`` over sharded (DTensor) parameters, each divided by its replication factor (their local
    shards, summed over all ranks, count each entry that many times), ``[1]`` over ordinary ones."""
    out = torch.zeros(2, len(optimizer.param_groups), n, device=device, dtype=dtype)
    for gi, group in enumerate(optimizer.param_groups):
        buckets: dict[int, list[Tensor]] = {}  # replication factor (0: ordinary tensor) -> parameters
        for p in group["params"]:
            if p.grad is not None:
                buckets.setdefault(replication_factor(p) if is_sharded(p) else 0, []).append(p)
        for factor, ps in buckets.items():
            row = fields(group, ps).to(device)
            if factor:
                out[0, gi] += row / factor
            else:
                out[1, gi] += row
    return out


@torch.no_grad()
def measure_before_step(optimizer: Optimizer, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """Local partial sums of :data:`FIELDS` per param group, after backward and before ``optimizer.step()``.

    Returns a ``(2, n_groups, 6)`` tensor (see :func:`complete_sums`). The ``x`` terms are zero for
    a group without weight decay. Gradients are read as they are (still scaled under fused AMP,
    not yet clipped: :func:`step_samples` corrects both).
    """
    return _bucketed(optimizer, lambda group, ps: _group_fields(optimizer, group, ps, dtype), len(FIELDS), device,
                     dtype)  # fmt: skip


@torch.no_grad()
def measure_after_step(optimizer: Optimizer, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """Local partial sums of ``||grad||^2`` per param group right after ``optimizer.step()``: the gradient
    the step consumed (after clipping). A ``(2, n_groups, 1)`` tensor like :func:`measure_before_step`."""

    def fields(group: dict[str, Any], ps: list[Tensor]) -> Tensor:
        return _square_norms([local_tensor(p.grad) for p in ps], dtype).sum().reshape(1)  # type: ignore[arg-type]

    return _bucketed(optimizer, fields, 1, device, dtype)


def complete_sums(before: Tensor, after: Tensor, sharded: bool) -> tuple[Tensor, Tensor]:
    """Completes the partial sums of :func:`measure_before_step` and :func:`measure_after_step`.

    With ``sharded=True`` (the optimizer holds DTensor parameters; the same answer on every rank)
    the sharded halves are summed across ranks by one ``all_reduce`` of a small vector, which
    every rank must call at the same step; otherwise nothing is communicated.

    Returns:
        ``(before, after)`` of shapes ``(n_groups, 6)`` and ``(n_groups, 1)``.
    """
    if sharded:
        n = before[0].numel()
        flat = reduce_partial_sums(torch.cat([before[0].reshape(-1), after[0].reshape(-1)]))
        return flat[:n].view_as(before[0]) + before[1], flat[n:].view_as(after[0]) + after[1]
    return before[0] + before[1], after[0] + after[1]


def _to_device(values: list[Any], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small host table on ``device`` without a device synchronisation (``torch.tensor(..., device=cuda)``
    would wait for the queued kernels; a non-blocking copy from the host does not)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def step_samples(before: Tensor, after: Tensor, hypers: list[GroupHyper], grad_scale: Tensor | None = None) -> Tensor:
    """One step's raw samples per group from the complete sums.

    Gradient clipping between the two halves rescales the gradient by ``kappa``, recovered
    exactly from ``||grad||^2`` after and before (clipping by value is approximated by the same
    factor).

    Args:
        before: ``(n_groups, 6)`` sums of :data:`FIELDS`, complete across ranks.
        after: ``(n_groups, 1)`` sums of :func:`measure_after_step`, complete across ranks.
        hypers: the groups' hyper-parameters of this step (:func:`group_hyper`).
        grad_scale: the AMP loss scale ``before``'s gradients still carry (``optimizer.grad_scale``
            of an optimizer that unscales inside its step; Lightning refuses clipping there, so
            ``kappa = 1``), or None.

    Returns:
        ``(n_groups + 1, 6)``: rows are the groups then the whole optimizer; columns are
        :data:`SAMPLE_FIELDS`. The cosine is ``g_m / sqrt(g_sq * m_sq)``; the optimizer row's is
        the cosine of the concatenated vectors.
    """
    gsq, gx, xsq, gm, xm, msq = before.unbind(-1)
    table = [[h.eta, h.c, h.lr, h.carry, h.weight_decay, h.sign] for h in hypers]
    eta, c, alpha, carry, wd, sign = _to_device(table, before.device, before.dtype).unbind(-1)
    if grad_scale is not None:
        inv = 1.0 / grad_scale.to(before.device, before.dtype)
        gsq, gx, gm = gsq * inv.square(), gx * inv, gm * inv
        kappa = torch.ones_like(gsq)
    else:
        kappa = torch.where(gsq > 0, after[:, 0] / gsq, 1.0).sqrt()
    g_sq = kappa.square() * gsq + 2.0 * sign * wd * kappa * gx + wd.square() * xsq
    history = carry != 0  # m_k folded into this step (a torch SGD buffer left at momentum 0 is not)
    g_m = torch.where(history, sign * kappa * gm + wd * xm, 0.0)
    msq = torch.where(history, msq, 0.0)
    step_sq = (alpha.square() * g_sq + 2.0 * alpha * carry * g_m + carry.square() * msq).clamp(min=0.0)
    grad_sq = eta.square() * g_sq
    rows = torch.stack([step_sq, grad_sq, c / (2.0 - c) * grad_sq, g_m, g_sq, msq], dim=-1)
    return torch.cat([rows, rows.sum(0, keepdim=True)])


def cosine_of(samples: Tensor) -> tuple[Tensor, Tensor]:
    """``(cosine, valid)`` per row of :func:`step_samples`; invalid where ``m_k`` or ``g_k`` is zero."""
    g_m, g_sq, m_sq = samples[:, 3], samples[:, 4], samples[:, 5]
    denom = (g_sq * m_sq).sqrt()
    valid = denom > 0
    return torch.where(valid, g_m / torch.where(valid, denom, torch.ones_like(denom)), torch.zeros_like(denom)), valid
