r"""Insight 1 of the paper as numbers: is momentum helping? (``THEORY.md`` section 4.)

For optimizer step ``k`` of SPA (``eta_k``, ``c_k``) or of torch SGD+M (``alpha_k``, ``beta_k``)::

    g_k      = +-grad_k + weight_decay * x_k          (the gradient the optimizer uses; - if maximize)
    m_{k+1}  = beta_k * m_k + g_k                     (torch's momentum buffer)
    x_{k+1}  = x_k - alpha_k * m_{k+1}                alpha_k = c_k * eta_k

    step_sq        = ||x_{k+1} - x_k||^2 = alpha_k^2 * ||m_{k+1}||^2
    grad_sq        = eta_k^2 * ||g_k||^2
    grad_sq_scaled = (c_k / (2 - c_k)) * grad_sq       the noise-level value of step_sq
    cosine         = <g_k, m_k> / (||g_k|| ||m_k||)     (undefined on a step without history)
    ratio          = EMA(step_sq) / EMA(grad_sq_scaled)

``ratio`` is 1 when the gradients are noise uncorrelated with the past step, above 1 when they
are aligned with the momentum buffer (momentum helps) and below 1 when the iterates oscillate.
The first step has no momentum yet, so its ratio is ``c (2 - c)``.

Everything is computed from dot products of the parameters, their gradients and the momentum
buffers, without a parameter-sized allocation (for float32/float64 parameters; half-precision
ones are upcast tensor by tensor so that the sums accumulate in float32), e.g.
``||g||^2 = ||grad||^2 +- 2 wd <grad, x> + wd^2 ||x||^2``.
The dot products are taken in two halves around the step: :func:`measure_before_step` (``x_k``,
``m_k`` and the gradient as it stands) and :func:`measure_after_step` (the gradient the optimizer
really used, e.g. after clipping, and ``m_{k+1}``). A clipping by norm rescales the gradient by a
factor ``kappa`` that the second half recovers exactly; a clipping by value is approximated by
the same factor.

For SGD+M the SPA values are those of a constant schedule at the current values (Theorem 1):
``eta_k = lr / (1 - momentum)``, ``c_k = 1 - momentum``, which gives the normalisation
``(c/(2-c)) eta^2 = alpha^2 / (1 - beta^2)``. For SPA the SGD+M values are the exact Theorem-1
ones, ``lr = c_k eta_k`` and ``momentum = (1 - c_{k-1}) eta_{k-1} / eta_k`` (``1 - c_0`` on the
first step).

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

__all__ = [
    "BEFORE_FIELDS",
    "AFTER_FIELDS",
    "GroupHyper",
    "DiagnosticsEMA",
    "unsupported_reason",
    "group_hyper",
    "has_spa_form",
    "measure_before_step",
    "measure_after_step",
    "step_samples",
    "cosine_of",
    "complete_sums",
]

# Columns of the per-group partial sums.
BEFORE_FIELDS = ("grad_sq", "grad_x", "x_sq", "grad_m", "x_m", "m_sq")
AFTER_FIELDS = ("grad_sq_used", "m_next_sq")


@dataclass(frozen=True)
class GroupHyper:
    """The hyper-parameters one param group uses on this step, in both parametrisations.

    Attributes:
        eta: SPA step size ``eta_k``.
        c: SPA averaging weight ``c_k``.
        lr: SGD+M step size ``alpha_k = c_k * eta_k``.
        momentum: SGD+M momentum ``beta_k``.
        weight_decay: coupled weight decay added to the gradient.
        sign: ``-1.0`` when the optimizer maximizes, else ``1.0``.
        uses_buffer: whether the optimizer stores ``m_{k+1}`` in ``state["momentum_buffer"]``
            (otherwise ``m_{k+1} = g_k``). Read from the group's first parameter with a gradient:
            the parameters of one group are assumed to share their step history.
    """

    eta: float
    c: float
    lr: float
    momentum: float
    weight_decay: float
    sign: float
    uses_buffer: bool


def unsupported_reason(optimizer: Optimizer) -> str | None:
    """Returns why ``optimizer`` cannot be measured, or ``None`` when it can (SPA, or torch SGD without
    dampening and Nesterov)."""
    if isinstance(optimizer, SPA):
        return None
    if isinstance(optimizer, torch.optim.SGD):  # subclasses too (e.g. lightning_spa.GroupedSGD)
        for group in optimizer.param_groups:
            if group.get("nesterov", False) or group.get("dampening", 0.0) != 0.0:
                return "torch.optim.SGD with nesterov=True or dampening != 0 has no SPA form"
        return None
    return f"{type(optimizer).__name__} is neither SPA nor torch.optim.SGD"


def _history(optimizer: Optimizer, p: Tensor, group: dict[str, Any] | None = None) -> Tensor | None:
    """``m_k`` of ``p`` if the coming step folds it in (``beta_k != 0``), else ``None``.

    ``group`` is ``p``'s param group; for torch SGD a group with momentum 0 leaves its old buffer
    in place but does not use it.
    """
    if group is not None and not isinstance(optimizer, SPA) and float(group.get("momentum", 0.0)) == 0.0:
        return None
    state = optimizer.state.get(p, {})
    buf = state.get("momentum_buffer")
    if buf is None:
        return None
    if isinstance(optimizer, SPA) and not state.get("prev_scale", 0.0):
        return None  # SPA restarts from m_{k+1} = g_k (c_{k-1} = 1); the stored buffer is stale
    return buf


def group_hyper(optimizer: Optimizer, group: dict[str, Any]) -> GroupHyper:
    """Reads the hyper-parameters ``group`` will use on the coming step (call it before the step).

    Args:
        optimizer: an SPA or torch SGD optimizer (see :func:`unsupported_reason`).
        group: one of ``optimizer.param_groups``.
    """
    wd, sign = float(group.get("weight_decay", 0.0)), -1.0 if group.get("maximize", False) else 1.0
    if isinstance(optimizer, SPA):
        eta, c = float(group["lr"]), float(group["c"])
        prev = None
        for p in group["params"]:
            if p.grad is not None and _history(optimizer, p) is not None:
                prev = float(optimizer.state[p]["prev_scale"])
                break
        beta = prev / eta if prev is not None and eta > 0.0 else 1.0 - c
        # SPA stores m_{k+1} unless the step restarts (no history) with c = 1 (then m_{k+1} = g_k).
        return GroupHyper(eta, c, c * eta, beta, wd, sign, uses_buffer=prev is not None or c < 1.0)
    lr, beta = float(group["lr"]), float(group.get("momentum", 0.0))
    if beta >= 1.0:  # the one-step spike of an instant change: no constant-schedule SPA form (see has_spa_form)
        return GroupHyper(math.nan, math.nan, lr, beta, wd, sign, uses_buffer=True)
    return GroupHyper(lr / (1.0 - beta), 1.0 - beta, lr, beta, wd, sign, uses_buffer=beta != 0.0)


def has_spa_form(hyper: GroupHyper) -> bool:
    """False for a torch SGD step with ``momentum >= 1``, which such a step cannot be measured by."""
    return not math.isnan(hyper.eta)


def _to_device(values: list[Any], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small host table on ``device`` without a device synchronisation (``torch.tensor(..., device=cuda)``
    would wait for the queued kernels; a non-blocking copy from the host does not)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype not in (torch.float32, torch.float64):  # half precision: accumulate in float32
        a, b = a.float(), b.float()
    return torch.dot(a, b)


def _sums(squares: list[list[Tensor]], dots: list[list[tuple[Tensor, Tensor]]], dtype: torch.dtype) -> Tensor:
    """Sums of squared norms of each list in ``squares`` then of dot products of each list in ``dots``,
    as one vector: one ``foreach`` norm for all the squares, one dot per pair, one segment sum."""
    flat = [t for ts in squares for t in ts]
    pairs = [pr for prs in dots for pr in prs]
    device = flat[0].device
    parts = [torch.stack(torch._foreach_norm(flat, 2)).to(dtype).square()]
    if pairs:
        parts.append(torch.stack([_dot(a, b) for a, b in pairs]).to(dtype))
    sizes = [len(ts) for ts in squares] + [len(prs) for prs in dots]
    segments = [[1.0 if start <= j < start + n else 0.0 for j in range(sum(sizes))]
                for start, n in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes, strict=True)]  # fmt: skip
    return _to_device(segments, device, dtype) @ torch.cat(parts)


def _buckets(params: list[Tensor]) -> dict[int, list[Tensor]]:
    """Groups parameters by replication factor: ``0`` for ordinary tensors (identical on every rank),
    ``r >= 1`` for DTensors whose local shards, summed over all ranks, count each entry ``r`` times."""
    out: dict[int, list[Tensor]] = {}
    for p in params:
        out.setdefault(replication_factor(p) if is_sharded(p) else 0, []).append(p)
    return out


def _split_sums(
    params: list[Tensor], fields: Any, n: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(sharded, replicated)`` sums of ``fields(params) -> (n,) tensor`` over the buckets of ``params``."""
    sharded = torch.zeros(n, device=device, dtype=dtype)
    replicated = torch.zeros(n, device=device, dtype=dtype)
    for factor, ps in _buckets(params).items():
        row = fields(ps).to(device)
        if factor:
            sharded = sharded + row / factor
        else:
            replicated = replicated + row
    return sharded, replicated


@torch.no_grad()
def measure_before_step(optimizer: Optimizer, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """Local partial sums of :data:`BEFORE_FIELDS` per param group, before ``optimizer.step()``.

    Returns a ``(2, n_groups, 6)`` tensor: ``[0]`` sums over sharded (DTensor) parameters, to be
    summed across ranks; ``[1]`` sums over ordinary (replicated) parameters. The ``x`` terms are
    zero for a group without weight decay.
    """
    out = torch.zeros(2, len(optimizer.param_groups), len(BEFORE_FIELDS), device=device, dtype=dtype)
    for gi, group in enumerate(optimizer.param_groups):
        wd = bool(group.get("weight_decay", 0.0))

        def fields(ps: list[Tensor], wd: bool = wd, group: dict[str, Any] = group) -> Tensor:
            g = [local_tensor(p.grad) for p in ps]  # type: ignore[arg-type]
            x = [local_tensor(p) for p in ps] if wd else []
            hist = [(gi_, local_tensor(h), local_tensor(p)) for gi_, h, p in
                    zip(g, (_history(optimizer, p, group) for p in ps), ps, strict=True) if h is not None]  # fmt: skip
            m = [h for _, h, _ in hist]
            gm = [(gi_, h) for gi_, h, _ in hist]
            xm = [(xi, h) for _, h, xi in hist] if wd else []
            sums = _sums([g, x, m], [list(zip(g, x, strict=True)) if wd else [], gm, xm], dtype)
            return sums[[0, 3, 1, 4, 5, 2]]  # -> grad_sq, grad_x, x_sq, grad_m, x_m, m_sq

        params = [p for p in group["params"] if p.grad is not None]
        if params:
            out[0, gi], out[1, gi] = _split_sums(params, fields, len(BEFORE_FIELDS), device, dtype)
    return out


@torch.no_grad()
def measure_after_step(
    optimizer: Optimizer, hypers: list[GroupHyper], device: torch.device, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Local partial sums of :data:`AFTER_FIELDS` per param group, after ``optimizer.step()``.

    ``grad_sq_used`` is ``||grad||^2`` of the gradient the step consumed; ``m_next_sq`` is
    ``||m_{k+1}||^2`` read from the momentum buffers (zero where ``m_{k+1} = g_k``, i.e. for a
    group with ``uses_buffer=False``). Same layout as :func:`measure_before_step`.
    """
    out = torch.zeros(2, len(optimizer.param_groups), len(AFTER_FIELDS), device=device, dtype=dtype)
    for gi, (group, hyper) in enumerate(zip(optimizer.param_groups, hypers, strict=True)):

        def fields(ps: list[Tensor], hyper: GroupHyper = hyper) -> Tensor:
            bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for p in ps] if hyper.uses_buffer else []
            g = [local_tensor(p.grad) for p in ps]  # type: ignore[arg-type]
            return _sums([g, [local_tensor(b) for b in bufs if b is not None]], [], dtype)

        params = [p for p in group["params"] if p.grad is not None]
        if params:
            out[0, gi], out[1, gi] = _split_sums(params, fields, len(AFTER_FIELDS), device, dtype)
    return out


def step_samples(before: Tensor, after: Tensor, hypers: list[GroupHyper]) -> Tensor:
    """One step's raw samples per group from the (globally reduced) partial sums.

    Args:
        before: ``(n_groups, 6)`` sums of :data:`BEFORE_FIELDS`, complete across ranks.
        after: ``(n_groups, 2)`` sums of :data:`AFTER_FIELDS`, complete across ranks.
        hypers: the groups' hyper-parameters of this step (:func:`group_hyper`).

    Returns:
        ``(n_groups + 1, 6)``: rows are the groups then the whole optimizer; columns are
        ``step_sq, grad_sq, grad_sq_scaled, <g, m_k>, ||g||^2, ||m_k||^2``. The cosine is
        ``col3 / sqrt(col4 * col5)``; the optimizer row's is the cosine of the concatenated vectors.
    """
    gsq, gx, xsq, gm, xm, msq = before.unbind(-1)
    used, m_next = after.unbind(-1)
    table = [[h.eta, h.c, h.lr, h.weight_decay, h.sign, float(h.uses_buffer)] for h in hypers]
    eta, c, alpha, wd, sign, uses_buffer = _to_device(table, before.device, before.dtype).unbind(-1)
    kappa_sq = torch.where(gsq > 0, used / gsq, 1.0)  # gradient clipping, if any: used = kappa^2 * before
    kappa = kappa_sq.sqrt()
    g_sq = kappa_sq * gsq + 2.0 * sign * wd * kappa * gx + wd.square() * xsq
    g_m = sign * kappa * gm + wd * xm
    step_sq = alpha.square() * torch.where(uses_buffer > 0, m_next, g_sq)
    grad_sq = eta.square() * g_sq
    rows = torch.stack([step_sq, grad_sq, c / (2.0 - c) * grad_sq, g_m, g_sq, msq], dim=-1)
    return torch.cat([rows, rows.sum(0, keepdim=True)])


def cosine_of(samples: Tensor) -> tuple[Tensor, Tensor]:
    """``(cosine, valid)`` per row of :func:`step_samples`; invalid where ``m_k`` or ``g_k`` is zero."""
    g_m, g_sq, m_sq = samples[:, 3], samples[:, 4], samples[:, 5]
    denom = (g_sq * m_sq).sqrt()
    valid = denom > 0
    return torch.where(valid, g_m / torch.where(valid, denom, torch.ones_like(denom)), torch.zeros_like(denom)), valid


class DiagnosticsEMA:
    """Bias-corrected exponential moving averages of ``step_sq``, ``grad_sq``, ``grad_sq_scaled`` and
    ``cosine`` for ``n_rows`` series, kept on one device.

    ``decay`` is per optimizer step: a sample taken ``n`` steps after the previous one weighs
    ``1 - decay**n``. Dividing by the accumulated weight removes the bias towards the start value,
    so the first reported value is the first sample. Updates never synchronise with the host.

    Args:
        n_rows: number of series (param groups + the whole optimizer).
        decay: per-step decay in ``[0, 1)``.
        device: where the state lives.
        dtype: the state's dtype (``float64`` unless the device lacks it).
    """

    def __init__(self, n_rows: int, decay: float, device: torch.device, dtype: torch.dtype = torch.float64) -> None:
        self.decay = decay
        self.values = torch.zeros(n_rows, 4, device=device, dtype=dtype)
        self.weights = torch.zeros(n_rows, 4, device=device, dtype=dtype)
        # The step of the last accepted sample, on the device (NaN: none yet), so that rejecting a
        # sample needs no host sync.
        self._last = torch.full((), math.nan, device=device, dtype=dtype)

    @property
    def last_step(self) -> int | None:
        """The optimizer step of the last sample folded in (a host sync; for checkpoints and tests)."""
        last = float(self._last.item())
        return None if math.isnan(last) else int(last)

    def update(self, samples: Tensor, step: int, default_gap: int = 1) -> Tensor:
        """Folds one step's :func:`step_samples` in; returns the 0-dim bool ``ok`` (all finite).

        A step whose samples are not all finite leaves the state unchanged (its weight is not
        spent either: the next accepted sample weighs for the steps since the last accepted
        one), and so do rows whose cosine is undefined for the cosine column. No host sync.
        """
        gap = torch.where(torch.isnan(self._last), float(default_gap), step - self._last).clamp(min=1.0)
        weight = 1.0 - self.decay**gap
        cos, cos_valid = cosine_of(samples)
        new = torch.stack([samples[:, 0], samples[:, 1], samples[:, 2], cos], dim=-1)
        ok = torch.isfinite(new).all()
        valid = ok & torch.ones_like(new, dtype=torch.bool)
        valid[:, 3] &= cos_valid
        w = torch.where(valid, weight, 0.0).to(self.values.dtype)
        self.values = self.values * (1 - w) + w * torch.where(valid, new, 0.0)
        self.weights = self.weights * (1 - w) + w
        self._last = torch.where(ok, float(step), self._last)
        return ok

    def corrected(self) -> Tensor:
        """``(n_rows, 5)``: the bias-corrected ``step_sq, grad_sq, grad_sq_scaled, cosine, ratio``."""
        nan = torch.full_like(self.values, math.nan)
        avg = torch.where(self.weights > 0, self.values / torch.where(self.weights > 0, self.weights, 1.0), nan)
        ratio = avg[:, 0] / avg[:, 2]
        return torch.cat([avg, ratio[:, None]], dim=-1)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.tolist(), "weights": self.weights.tolist(), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = torch.tensor(state["values"], device=self.values.device, dtype=self.values.dtype)
        if values.shape != self.values.shape:
            raise ValueError(
                f"MomentumDiagnostics state has {tuple(values.shape)} EMA entries, the optimizer needs "
                f"{tuple(self.values.shape)}: the param groups changed since the checkpoint."
            )
        self.values = values
        self.weights = torch.tensor(state["weights"], device=self.values.device, dtype=self.values.dtype)
        last = state["last_step"]
        self._last = torch.tensor(math.nan if last is None else float(last), device=self.values.device,
                                  dtype=self.values.dtype)  # fmt: skip


def complete_sums(before: Tensor, after: Tensor, sharded: bool) -> tuple[Tensor, Tensor]:
    """Completes the partial sums of :func:`measure_before_step` and :func:`measure_after_step`.

    With ``sharded=True`` (the optimizer holds DTensor parameters; the same answer on every rank)
    the sharded halves are summed across ranks by one ``all_reduce`` of a small vector, which
    every rank must call at the same step; otherwise nothing is communicated.

    Returns:
        ``(before, after)`` of shapes ``(n_groups, 6)`` and ``(n_groups, 2)``.
    """
    if sharded:
        n = before[0].numel()
        flat = reduce_partial_sums(torch.cat([before[0].reshape(-1), after[0].reshape(-1)]))
        return flat[:n].view_as(before[0]) + before[1], flat[n:].view_as(after[0]) + after[1]
    return before[0] + before[1], after[0] + after[1]
