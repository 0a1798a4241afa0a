r"""Insight 1 of the paper as numbers: is momentum helping? (``THEORY.md`` section 4.)

The math layer of the diagnostics: :mod:`lightning_spa.meter` (the state machine: clock, EMAs)
calls it, :mod:`lightning_spa.callbacks.diagnostics` (the Lightning adapter) logs what the meter
reads, :mod:`lightning_spa.distributed` completes sums over shards. No Lightning import.

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

Two ways to measure a step, both exact per parameter (each parameter's own history, see below):

- **full** (:func:`measure_before_step` after backward, :func:`measure_after_step` right after
  ``optimizer.step()``, :func:`full_samples` on the host): dot products of ``x_k``, the gradient and
  ``m_k`` per parameter, without a parameter-sized allocation (half-precision tensors are upcast
  tensor by tensor so that the sums accumulate in float32), e.g.
  ``||g||^2 = ||grad||^2 +- 2 wd <grad, x> + wd^2 ||x||^2``. Gradient clipping between the halves
  rescales the gradient by ``kappa``, recovered from ``||grad||^2`` before and after. Gives the
  cosine too.
- **cheap** (:func:`measure_cheap` right after the step, :func:`cheap_samples`): the step is
  ``x_{k+1} - x_k = -a m_{k+1}`` with the buffer after the step, ``a = c_k t_k`` for SPA
  (``t_k = max(s_k, eta_k)`` is the ``prev_eta`` the step leaves, :func:`lightning_spa.theorem.spa_step`)
  and ``a = alpha_k`` for torch SGD, so ``step_sq = sum_p a_p^2 ||m_{k+1,p}||^2`` and
  ``grad_sq = eta_k^2 sum_p ||g_{k,p}||^2``: two squared norms per parameter, of the gradient the
  step consumed (after clipping). With weight decay ``||g_k|| = ||grad +- wd x_k||`` with
  ``x_k = x_{k+1} + a m_{k+1}``, formed in one gradient-sized temporary (the one torch's foreach SGD
  allocates at every step with weight decay). How: a param group whose parameters share one history
  (the steady state) is a :class:`Block`; on the CPU, for small float tensors, a block's rows are
  copied into one matrix and reduced by its Gram matrix (a few kernels, where a ``foreach`` norm on
  the CPU runs one per tensor: ``MeasuredMomentumOff`` measures every step); otherwise one
  ``foreach`` norm (a GPU's fused kernel) or, with weight decay, one temporary per tensor. No cosine. It needs a buffer
  after the step (:func:`cheap_supported`): not for SPA at ``c = 1`` (buffers dropped), torch SGD
  at momentum 0, sparse gradients, or optimizers that unscale AMP gradients inside their step.

Per parameter: SPA keeps each parameter's history ``z = x - s m`` (a parameter that skipped steps
while ``eta`` changed has its own ``s``), so ``x_{k+1} - x_k = -c_k (eta_k g_k + s m_k)`` and
``b = c_k s`` per parameter: the full path sums per history bucket ``(group, s)``, the cheap one
weighs each parameter by its own ``a``. ``b`` stays finite at ``eta_k = 0``, where ``beta_k`` is not
(``THEORY.md`` section 9).

The hyper-parameters are read *during* the step (:func:`group_hyper`, from a step post-hook), so
they are the ones the step used. The logged SGD+M momentum of an SPA step is the Theorem-1 one,
``beta_k = (1 - c_{k-1}) eta_{k-1} / eta_k`` from the group's previous step (``1 - c_0`` without
one), not the buffer scale over ``eta``, which after an instant drop decays over many steps. For
SGD+M the SPA values are those of a constant schedule at the current values
(:func:`lightning_spa.theorem.constant_sgdm_to_spa`).

- Complex parameters: ``<a, b> = Re(vdot(a, b))``, the real inner product of ``C^n = R^{2n}``.
- Sparse gradients (torch SGD; its momentum buffer is then sparse too): the full path's sums run
  over the stored entries (coalesced), so they are exact and cost ``O(nnz)``.
- Gradients still multiplied by an AMP loss scale ``S`` (optimizers that unscale inside their
  step, ``_step_supports_amp_scaling``: torch's fused SGD): :func:`full_samples` divides the
  gradient sums by ``S`` and ``S^2``.
- Sharded parameters (DTensor, FSDP2) contribute local sums (each divided by its replication
  factor) that :func:`read_sums` sums across ranks with one small ``all_reduce``.

The device computes one value per entry (a squared norm or a dot product: :class:`Sums`);
everything after them is host arithmetic in float64 on the numbers of one transfer
(:func:`read_sums`, which :mod:`lightning_spa.meter` also hands the step's flags).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_spa.distributed import is_sharded, local_tensor, reduce_partial_sums, replication_factor
from lightning_spa.optim import SPA
from lightning_spa.theorem import constant_sgdm_to_spa, constant_spa_to_sgdm, step_momentum

__all__ = [
    "FIELDS",
    "SAMPLE_FIELDS",
    "FirstHalf",
    "GroupHyper",
    "cheap_samples",
    "cheap_supported",
    "cosine_of",
    "full_samples",
    "group_hyper",
    "has_spa_form",
    "measure_after_step",
    "measure_before_step",
    "measure_cheap",
    "prev_scales",
    "read_sums",
    "Sums",
]

# Columns of the full path's per-bucket sums.
FIELDS = ("grad_sq", "grad_x", "x_sq", "grad_m", "x_m", "m_sq")
# Columns of full_samples / cheap_samples rows.
SAMPLE_FIELDS = ("step_sq", "grad_sq", "grad_sq_scaled", "g_m", "g_sq", "m_sq")
_SGD = "sgd"  # the history marker of a torch SGD buffer (weight lr * momentum, the same for every parameter)


@dataclass(frozen=True)
class GroupHyper:
    """The hyper-parameters one param group uses on this step, in both parametrisations.

    Attributes:
        eta: SPA step size ``eta_k`` (NaN for a torch SGD step with ``momentum >= 1``).
        c: SPA averaging weight ``c_k`` (NaN likewise).
        lr: SGD+M step size ``alpha_k = c_k * eta_k``.
        momentum: SGD+M momentum ``beta_k``; for SPA the Theorem-1 value
            ``(1 - c_{k-1}) eta_{k-1} / eta_k`` (``inf`` at ``eta_k = 0`` after a step with momentum).
        weight_decay: coupled weight decay added to the gradient.
        sign: ``-1.0`` when the optimizer maximizes, else ``1.0``.
    """

    eta: float
    c: float
    lr: float
    momentum: float
    weight_decay: float
    sign: float


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _history(optimizer: Optimizer, p: Tensor, group: dict[str, Any]) -> tuple[Tensor, float | Tensor | str] | None:
    """``(m_k, s)`` of ``p`` if the coming step folds ``m_k`` in, else ``None``.

    ``s`` is SPA's buffer scale (``z = x - s m``; a float, or a 0-dim tensor in tensor mode), or
    :data:`_SGD` for a torch SGD buffer. SPA keeps no state for a parameter without history
    (before its first step, after a step at ``c = 1``): :meth:`~lightning_spa.SPA.momentum_history`.
    A torch SGD group with momentum 0 leaves its old buffer in place but does not use it.
    """
    if isinstance(optimizer, SPA):
        history = optimizer.momentum_history(p)
        if history is None or (not isinstance(history[1], Tensor) and not history[1]):
            return None
        return history
    state = optimizer.state.get(p)
    buf = state.get("momentum_buffer") if state else None
    return (buf, _SGD) if buf is not None and float(group.get("momentum", 0.0)) != 0.0 else None


def prev_scales(optimizer: Optimizer) -> list[float | None]:
    """SPA's buffer scale ``s`` of each param group's first parameter with a gradient and history, read
    before the step (``None``: none, or not SPA). Only a fallback for the logged momentum when the
    group's previous hyper-parameters are unknown (:func:`group_hyper`); the measurement itself
    reads every parameter's own scale."""
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


def group_hyper(
    optimizer: Optimizer,
    group: dict[str, Any],
    prev: tuple[float, float] | None = None,
    prev_scale: float | None = None,
) -> GroupHyper:
    """The hyper-parameters ``group`` uses on the step (read them while the step is being taken).

    Args:
        optimizer: an SPA or torch SGD optimizer without Nesterov and dampening
            (:func:`lightning_spa.callbacks._select.unsupported_reason`).
        group: one of ``optimizer.param_groups``.
        prev: for SPA, ``(eta_{k-1}, c_{k-1})`` of the group's previous step: the momentum is then
            Theorem 1's ``(1 - c_{k-1}) eta_{k-1} / eta_k``.
        prev_scale: for SPA without ``prev``, the buffer scale read before the step
            (:func:`prev_scales`); the momentum is then ``prev_scale / eta_k``. Neither: ``1 - c_k``
            (the convention for step 0).
    """
    wd, sign = float(group.get("weight_decay", 0.0)), -1.0 if group.get("maximize", False) else 1.0
    if isinstance(optimizer, SPA):
        eta, c = _as_float(group["lr"]), _as_float(group["c"])
        lr, beta = constant_spa_to_sgdm(eta, c)  # beta_0 is reported as 1 - c_0 (no effect)
        if prev is not None:
            beta = step_momentum(eta, prev[0], prev[1])
        elif prev_scale is not None:
            beta = step_momentum(eta, prev_scale, 0.0)
        return GroupHyper(eta, c, lr, beta, wd, sign)
    lr, beta = _as_float(group["lr"]), float(group.get("momentum", 0.0))
    try:
        eta, c = constant_sgdm_to_spa(lr, beta)
    except ValueError:  # momentum >= 1: the one-step spike of an instant change (see has_spa_form)
        eta, c = math.nan, math.nan
    return GroupHyper(eta, c, lr, beta, wd, sign)


def has_spa_form(hyper: GroupHyper) -> bool:
    """False for a torch SGD step with ``momentum >= 1``, which such a step cannot be measured by."""
    return not math.isnan(hyper.eta)


def cheap_supported(optimizer: Optimizer) -> bool:
    """Whether the coming step can be measured by :func:`measure_cheap` (every parameter with a gradient
    keeps a buffer that describes the step): SPA with every ``c < 1`` (or a tensor ``c``), torch SGD
    with every momentum non-zero and dense gradients; not an optimizer that unscales AMP gradients
    inside its step (the gradients it leaves are then the kernel's business)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if isinstance(optimizer, SPA):
        return all(_as_float(g["c"]) < 1.0 for g in optimizer.param_groups)
    for group in optimizer.param_groups:
        if float(group.get("momentum", 0.0)) == 0.0:
            return False
        if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
            return False
    return True


# ----------------------------------------------------------------------------- device sums


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


_HALF = frozenset((torch.float16, torch.bfloat16, torch.complex32))
_DTYPE = operator.attrgetter("dtype")
_NUMEL = torch.Tensor.numel
_FLAT_DTYPES = (torch.float32, torch.float64)
#: Elements up to which :meth:`Sums.of_blocks` copies the tensors into matrices on the CPU (4 MiB of float32).
_FLAT_MAX = 1 << 20
_flatten = torch._utils._flatten_dense_tensors  # one C++ copy of the tensors into a flat vector
_NO_VALUES = torch.zeros(0)  # Sums.values before compute() (not written to: a fresh tensor per Sums costs a kernel)


def _square_norms(ts: list[Tensor], dtype: torch.dtype, dense: bool = False) -> Tensor:
    """``||t||^2`` of each tensor in ``dtype`` (one ``foreach`` norm for the dense ones; half precision
    accumulates in float32). ``dense=True``: the caller knows none is sparse."""
    if not ts:
        return torch.zeros(0, dtype=dtype)
    if dense or not any(t.is_sparse for t in ts):
        wide = torch.float32 if any(t.dtype in _HALF for t in ts) else None
        return torch.stack(torch._foreach_norm(ts, 2, dtype=wide)).to(dtype).square()
    norms = [torch.linalg.vector_norm(t.coalesce().values() if t.is_sparse else t) for t in ts]
    return torch.stack(norms).to(dtype).square()


class Block(NamedTuple):
    """A param group whose parameters all have a gradient and share one float history (:func:`measure_cheap`)."""

    row: int  #: the group's index
    grads: list[Tensor]
    params: list[Tensor]  #: the parameters after the step, ``x_{k+1}`` (read with weight decay only)
    bufs: list[Tensor] | None  #: the momentum buffers after the step (None: no history)
    a: float  #: the step's ``x_{k+1} - x_k = -a m_{k+1}`` (SPA: ``prev_c * prev_eta``; torch SGD: ``lr``)
    decay: float  #: ``+-weight_decay`` (``-`` when maximizing), 0.0 without


class Sums:
    """The per-entry values of one measurement (squared norms, dot products) and where each one goes.

    Entry ``i`` adds ``weight_i * value_i`` to cell ``(row, col)`` of a ``rows x cols`` table. The
    device computes the values (one ``foreach`` norm for the squares, one product per dot); the
    weights (a DTensor's ``1 / replication factor``, the cheap path's ``a^2``) are applied on the host
    after one transfer (:func:`read_sums`), so the device does no bookkeeping. Entries of sharded
    (DTensor) parameters come first in :attr:`values` and are summed across ranks before that.

    Attributes:
        values: the raw values (a flat tensor on the measuring device; sharded entries first).
        n_sharded: how many leading entries are local parts of sharded parameters.
        meta: per entry ``(row, col, weight, j)``: ``j`` indexes ``tensor_weights`` (a device-side
            factor read with the values, SPA's tensor mode) or is None.
        rows, cols: the table's shape.
        tensor_weights: 0-dim tensors the host multiplies entries with.
    """

    def __init__(self, rows: int, cols: int, dense: bool = False) -> None:
        self.rows, self.cols, self.dense = rows, cols, dense
        # [sharded, ordinary] lists of (tensor(s), meta)
        self._squares: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._square_meta: tuple[list[Any], list[Any]] = ([], [])
        self._dots: tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]] = ([], [])
        self._dot_meta: tuple[list[Any], list[Any]] = ([], [])
        self.tensor_weights: list[Tensor] = []
        self.values = _NO_VALUES  # set by compute()
        self.n_sharded = 0
        self.norms = False  # values are norms, not yet squared (of_norms)
        self.meta: list[tuple[int, int, float, int | None]] = []

    def _weight(self, weight: float | Tensor, factor: float) -> tuple[float, int | None]:
        if isinstance(weight, Tensor):
            self.tensor_weights.append(weight)
            return factor, len(self.tensor_weights) - 1
        return weight * factor, None

    def square(self, t: Tensor, row: int, col: int, placed: tuple[int, float], weight: float | Tensor = 1.0) -> None:
        """Adds ``weight * ||t||^2`` at ``(row, col)``; ``placed`` is :func:`_placement` of its parameter."""
        self._squares[placed[0]].append(t)
        self._square_meta[placed[0]].append((row, col, *self._weight(weight, placed[1])))

    def dot(self, a: Tensor, b: Tensor, row: int, col: int, placed: tuple[int, float]) -> None:
        """Adds ``Re<a, b>`` at ``(row, col)``."""
        self._dots[placed[0]].append((a, b))
        self._dot_meta[placed[0]].append((row, col, placed[1], None))

    def compute(self, device: torch.device, dtype: torch.dtype) -> Sums:
        """Runs the device work (sets :attr:`values`); returns ``self``."""
        squares = self._squares[0] + self._squares[1]
        dots = self._dots[0] + self._dots[1]
        pieces = []
        if squares:
            sq = _square_norms(squares, dtype, self.dense).to(device)
        if dots:
            dt = torch.stack([_dot(a, b).to(dtype) for a, b in dots]).to(device)
        ns, nd = len(self._squares[0]), len(self._dots[0])
        for part, n, both in ((0, ns, squares), (0, nd, dots), (1, ns, squares), (1, nd, dots)):
            if not both:
                continue
            values = sq if both is squares else dt
            piece = values[:n] if part == 0 else values[n:]
            if piece.numel():
                pieces.append(piece)
        if not pieces:
            self.values = torch.zeros(0, device=device, dtype=dtype)
        else:
            self.values = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        self.n_sharded = ns + nd
        self.meta = [*self._square_meta[0], *self._dot_meta[0], *self._square_meta[1], *self._dot_meta[1]]
        return self

    def reduce(self, values: Sequence[float], tensor_values: Sequence[float] = ()) -> list[float]:
        """The ``rows * cols`` table (row-major) from the completed host values of :attr:`values` and
        of :attr:`tensor_weights`."""
        out = [0.0] * (self.rows * self.cols)
        cols = self.cols
        if self.norms:  # plain norms (:meth:`of_norms`): squared here, in float64
            for v, (row, col, w, _) in zip(values, self.meta, strict=True):
                out[row * cols + col] += v * v * w
            return out
        for v, (row, col, w, j) in zip(values, self.meta, strict=True):
            out[row * cols + col] += v * (w if j is None else w * tensor_values[j])
        return out

    @classmethod
    def of_blocks(cls, rows: int, cols: int, blocks: list[Block]) -> Sums | None:
        """``[||g||^2, a^2 ||m||^2]`` at ``(row, 0), (row, 1)`` from :class:`Block` s. A block's gradients,
        parameters (with weight decay) and buffers, all of the same parameters, are copied into the
        rows of one matrix; with weight decay the gradient row becomes ``g = grad + decay (x' + a m)``
        (``x_k = x_{k+1} + a m_{k+1}``) in place, the arithmetic of the general path; the Gram matrix
        of the ``g`` and ``m`` rows (one BLAS call) gives both squares on its diagonal: a few kernels a
        block, where a ``foreach`` norm on the CPU runs one a tensor.

        Only on the CPU, for float32/float64 tensors of one dtype and at most :data:`_FLAT_MAX` elements
        (the copy); None otherwise (:meth:`of_norms` then, or the general path with weight decay)."""
        first = blocks[0].grads[0]
        if not first.is_cpu or first.dtype not in _FLAT_DTYPES:
            return None
        lists = [[*b.grads, *(b.params if b.decay else ()), *(b.bufs if b.bufs is not None else ())] for b in blocks]
        # the rows of a block are tensors of the same sizes: its parameters' elements times its rows
        if (
            sum(sum(map(_NUMEL, b.params)) * (len(ts) // len(b.params)) for b, ts in zip(blocks, lists, strict=True))
            > _FLAT_MAX
        ):
            return None
        sums = cls(rows, cols, dense=True)
        diagonals = []
        for b, ts in zip(blocks, lists, strict=True):
            try:
                if b.decay:
                    with torch.no_grad():  # the parameters' values only
                        flat = _flatten(ts)
                else:  # gradients and buffers: no autograd history to drop
                    flat = _flatten(ts)
            except RuntimeError:  # tensors on several devices
                return None
            if flat.dtype != first.dtype:  # several dtypes (promoted by the copy)
                return None
            matrix = flat.view(len(ts) // len(b.grads), -1)  # rows: grad, [x'], [m]
            if b.decay:
                g = matrix[0].add_(matrix[1], alpha=b.decay)
                if b.bufs is not None:
                    g.add_(matrix[2], alpha=b.decay * b.a)
                matrix = matrix[::2]  # g, [m]
            diagonals.append(torch.mm(matrix, matrix.t()).diagonal())
            sums.meta.append((b.row, 0, 1.0, None))
            if b.bufs is not None:
                sums.meta.append((b.row, 1, b.a * b.a, None))
        sums.values = diagonals[0] if len(diagonals) == 1 else torch.cat(diagonals)
        return sums

    @classmethod
    def of_norms(cls, rows: int, cols: int, ts: list[Tensor], meta: list[tuple[int, int, float, int | None]]) -> Sums:
        """The common case in one ``foreach`` norm: ordinary dense tensors, float weights. :attr:`values`
        holds the norms themselves (no cast, no squaring on the device); :meth:`reduce` squares them."""
        sums = cls(rows, cols, dense=True)
        if ts:
            wide = None if _HALF.isdisjoint(map(_DTYPE, ts)) else torch.float32
            sums.values = torch.stack(torch._foreach_norm(ts, 2, dtype=wide))
        sums.meta, sums.norms = meta, True
        return sums


def read_sums(parts: list[Sums], sharded: bool, extras: Sequence[Tensor] = ()) -> tuple[list[list[float]], list[float]]:
    """Completes ``parts`` (computed) across ranks and reads them and ``extras`` (0-dim tensors: flags the
    caller wants with them) to the host in one transfer, the one device synchronisation.

    With ``sharded=True`` (the optimizer holds DTensor parameters; the same answer on every rank)
    the sharded entries are summed across ranks by one ``all_reduce`` of a small vector, which every
    rank must call at the same step; otherwise nothing is communicated.

    Returns:
        ``(tables, extras)``: each part's table (:meth:`Sums.reduce`) and the values of ``extras``.
    """
    if len(parts) == 1 and not extras and not parts[0].tensor_weights and not (sharded and parts[0].n_sharded):
        only = parts[0]  # the cheap measurement's case: one table, nothing else to read
        return [only.reduce(only.values.tolist())], []
    vectors = [p.values for p in parts]
    if sharded and any(p.n_sharded for p in parts):
        reduced = reduce_partial_sums(torch.cat([p.values[: p.n_sharded] for p in parts]))
        vectors, at = [], 0
        for p in parts:
            vectors += [reduced[at : at + p.n_sharded], p.values[p.n_sharded :]]
            at += p.n_sharded
    device, dtype = parts[0].values.device, parts[0].values.dtype
    weights = [w for p in parts for w in p.tensor_weights]
    scalars = [t.reshape(()).to(device, dtype) for t in (*weights, *extras)]
    if scalars:
        vectors.append(torch.stack(scalars))
    flat: list[float] = (torch.cat(vectors) if len(vectors) > 1 else vectors[0]).tolist()
    n_values = sum(p.values.numel() for p in parts)
    tail = flat[n_values:]
    tables, at, wat = [], 0, 0
    for p in parts:
        n, nw = p.values.numel(), len(p.tensor_weights)
        tables.append(p.reduce(flat[at : at + n], tail[wat : wat + nw]))
        at, wat = at + n, wat + nw
    return tables, tail[wat:]


_ORDINARY = (1, 1.0)


def _placement(p: Tensor) -> tuple[int, float]:
    """``(part, weight)`` of ``p``'s entries: ``(0, 1 / replication factor)`` for a DTensor (its local
    shards summed over all ranks count each entry that many times), else ``(1, 1)``."""
    return (0, 1.0 / replication_factor(p)) if is_sharded(p) else _ORDINARY


@dataclass
class FirstHalf:
    """The first half of a full measurement (:func:`measure_before_step`).

    Attributes:
        sums: per-entry sums of :data:`FIELDS`, one table row per history bucket.
        buckets: per bucket ``(group index, s)``: ``s`` the SPA buffer scale of its parameters (a
            float, or an int ``j``: the ``j``-th entry of ``tensor_scales``), ``"sgd"`` for torch
            SGD buffers, None without history.
        tensor_scales: SPA tensor-mode scales (0-dim tensors), read with the rest after the step.
    """

    sums: Sums
    buckets: list[tuple[int, float | int | str | None]]
    tensor_scales: list[Tensor] = field(default_factory=list)


@torch.no_grad()
def measure_before_step(optimizer: Optimizer, device: torch.device, dtype: torch.dtype = torch.float64) -> FirstHalf:
    """Sums of :data:`FIELDS` per history bucket, after backward and before ``optimizer.step()``.

    The ``x`` terms are zero for a group without weight decay, the ``m`` terms for a bucket without
    history. Gradients are read as they are (still scaled under fused AMP, not yet clipped:
    :func:`full_samples` corrects both).
    """
    keys: dict[tuple[int, Any], int] = {}
    buckets: list[tuple[int, float | int | str | None]] = []
    tensor_scales: list[Tensor] = []
    entries: list[tuple[int, Tensor, Tensor, Tensor | None, bool, tuple[int, float]]] = []
    for gi, group in enumerate(optimizer.param_groups):
        wd = bool(group.get("weight_decay", 0.0))
        for p in group["params"]:
            if p.grad is None:
                continue
            history = _history(optimizer, p, group)
            scale: float | int | str | None
            key: Any
            if history is None:
                scale = key = None
            elif isinstance(history[1], Tensor):  # tensor mode: its own bucket, the value read later
                scale, key = len(tensor_scales), ("tensor", len(tensor_scales))
                tensor_scales.append(history[1])
            else:
                scale = key = history[1] if isinstance(history[1], str) else float(history[1])
            b = keys.get((gi, key))
            if b is None:
                b = keys[(gi, key)] = len(buckets)
                buckets.append((gi, scale))
            m = None if history is None else local_tensor(history[0])
            entries.append((b, local_tensor(p.grad), local_tensor(p.detach()), m, wd, _placement(p)))
    sums = Sums(len(buckets), len(FIELDS))
    for b, g, x, m, wd, placed in entries:
        sums.square(g, b, 0, placed)
        if wd:
            sums.dot(g, x, b, 1, placed)
            sums.square(x, b, 2, placed)
        if m is not None:
            sums.dot(g, m, b, 3, placed)
            if wd:
                sums.dot(x, m, b, 4, placed)
            sums.square(m, b, 5, placed)
    return FirstHalf(sums.compute(device, dtype), buckets, tensor_scales)


@torch.no_grad()
def measure_after_step(optimizer: Optimizer, device: torch.device, dtype: torch.dtype = torch.float64) -> Sums:
    """``||grad||^2`` per param group right after ``optimizer.step()``: the gradient the step consumed
    (after clipping). One table column, one row per group."""
    sums = Sums(len(optimizer.param_groups), 1)
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.grad is not None:
                sums.square(local_tensor(p.grad), gi, 0, _placement(p))
    return sums.compute(device, dtype)


def measure_cheap(
    optimizer: Optimizer, device: torch.device, dtype: torch.dtype = torch.float64, sharded: bool = True
) -> Sums:
    """``[||g_k||^2, ||x_{k+1} - x_k||^2]`` per param group (table rows), right after ``optimizer.step()``.

    Only for a step that :func:`cheap_supported` allowed (see the module docstring): every parameter
    with a gradient moved by ``-a m_{k+1}`` (or did not move and keeps no buffer: SPA at ``eta = 0``
    without history). ``sharded=False`` (no DTensor parameter:
    :func:`~lightning_spa.distributed.has_sharded_params`) skips the per-tensor DTensor checks.
    Reads only detached tensors (no autograd).
    """
    if not sharded:
        fast = _cheap_norms(optimizer)
        if fast is not None:
            return fast
    sums = Sums(len(optimizer.param_groups), 2, dense=True)
    spa = isinstance(optimizer, SPA)
    state_of = optimizer.state
    for gi, group in enumerate(optimizer.param_groups):
        wd, sign = float(group.get("weight_decay", 0.0)), -1.0 if group.get("maximize", False) else 1.0
        lr = None if spa else _as_float(group["lr"])
        by_a: dict[float, list[tuple[Tensor, Tensor, Tensor | None, tuple[int, float]]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = state_of.get(p)
            buf = state.get("momentum_buffer") if state else None
            a: float | Tensor
            if buf is None:
                a = 0.0
            elif spa:
                e, q = state["prev_eta"], state["prev_c"]  # type: ignore[index]
                a = q * e if isinstance(e, Tensor) or isinstance(q, Tensor) else float(q) * float(e)
            else:
                a = lr  # type: ignore[assignment]
            if sharded:
                placed = _placement(p)
                g, m = local_tensor(p.grad), None if buf is None else local_tensor(buf)
            else:
                placed, g, m = _ORDINARY, p.grad, buf
            if m is not None:
                sums.square(m, gi, 1, placed, a * a)
            if not wd:
                sums.square(g, gi, 0, placed)
            elif isinstance(a, Tensor):  # tensor mode: one parameter at a time (x_k = x_{k+1} + a m_{k+1})
                x = local_tensor(p.detach())
                assert m is not None  # a is a tensor only where a buffer is
                sums.square(g + (sign * wd) * (x + a.to(x.dtype) * m), gi, 0, placed)
            else:
                by_a.setdefault(a, []).append((g, local_tensor(p.detach()), m, placed))
        for a, items in by_a.items():  # with weight decay: g = grad + sign wd x_k in one temporary per tensor
            tmp = list(torch._foreach_add([g for g, _, _, _ in items], [x for _, x, _, _ in items], alpha=sign * wd))
            with_buf = [(t, m) for t, (_, _, m, _) in zip(tmp, items, strict=True) if m is not None]
            if with_buf and a:
                torch._foreach_add_([t for t, _ in with_buf], [m for _, m in with_buf], alpha=sign * wd * a)
            for t, (_, _, _, placed) in zip(tmp, items, strict=True):
                sums.square(t, gi, 0, placed)
    return sums.compute(device, dtype)


_GRAD, _BUF = operator.attrgetter("grad"), operator.itemgetter("momentum_buffer")
_HISTORY = operator.itemgetter("prev_eta", "prev_c")
_IS_NONE = functools.partial(operator.is_, None)


def _cheap_norms(optimizer: Optimizer) -> Sums | None:
    """:func:`measure_cheap` without sharding, float histories. A group whose parameters all have a gradient
    and share one history is one :class:`Block`, listed with C-level ``map`` (the measured steps of
    ``MeasuredMomentumOff`` are every step): :meth:`Sums.of_blocks`. Without weight decay, other groups go
    parameter by parameter, and everything into one ``foreach`` norm where blocks cannot be reduced as
    such. None (the general path) where a history is a tensor (SPA's tensor mode) or where weight decay
    meets a group or a device that is not a block's."""
    spa, state_of = isinstance(optimizer, SPA), optimizer.state
    blocks: list[Block] = []
    ts: list[Tensor] = []
    meta: list[tuple[int, int, float, int | None]] = []
    for gi, group in enumerate(optimizer.param_groups):
        lr = 0.0 if spa else _as_float(group["lr"])
        params = group["params"]
        grads = list(map(_GRAD, params))
        wd = float(group.get("weight_decay", 0.0))
        decay = -wd if group.get("maximize", False) else wd
        if grads and not any(map(_IS_NONE, grads)):
            shared = _shared_history(list(map(state_of.get, params)), spa, lr) if state_of else (None, 0.0)
            if shared is not None:
                blocks.append(Block(gi, grads, params, shared[0], shared[1], decay))
                continue
        if decay:
            return None
        for p in params:  # parameters without a gradient, or their own histories
            g = p.grad
            if g is None:
                continue
            ts.append(g)
            meta.append((gi, 0, 1.0, None))
            state = state_of.get(p)
            buf = state.get("momentum_buffer") if state else None
            if buf is None:
                continue
            if spa:
                e, q = state["prev_eta"], state["prev_c"]  # type: ignore[index]
                if isinstance(e, Tensor) or isinstance(q, Tensor):
                    return None
                a = q * e
            else:
                a = lr
            ts.append(buf)
            meta.append((gi, 1, a * a, None))
    rows = len(optimizer.param_groups)
    if blocks and not ts:
        gram = Sums.of_blocks(rows, 2, blocks)
        if gram is not None:
            return gram
    if any(b.decay for b in blocks):
        return None
    for b in blocks:
        ts += b.grads
        meta += [(b.row, 0, 1.0, None)] * len(b.grads)
        if b.bufs is not None:
            ts += b.bufs
            meta += [(b.row, 1, b.a * b.a, None)] * len(b.bufs)
    return Sums.of_norms(rows, 2, ts, meta)


def _shared_history(states: list[Any], spa: bool, lr: float) -> tuple[list[Tensor] | None, float] | None:
    """``(buffers, a)`` of a group whose parameters all keep a buffer with one float history (SPA: the
    same ``prev_eta``, ``prev_c``; ``a = prev_c * prev_eta``; torch SGD: ``a = lr``), ``(None, 0)`` when
    none keeps one; None otherwise (the caller goes parameter by parameter)."""
    if not states:
        return None, 0.0
    if states[0] is None:
        return (None, 0.0) if all(map(_IS_NONE, states)) else None
    try:
        if not spa:
            bufs = list(map(_BUF, states))
            return (bufs, lr) if not any(map(_IS_NONE, bufs)) else None
        histories = set(map(_HISTORY, states))  # the (prev_eta, prev_c) pairs
        bufs = list(map(_BUF, states))
    except (TypeError, KeyError):  # a parameter without a state or a buffer
        return None
    if len(histories) != 1:
        return None
    ((e0, q0),) = histories
    if type(e0) is float and type(q0) is float and not any(map(_IS_NONE, bufs)):
        return bufs, q0 * e0
    return None


# ----------------------------------------------------------------------------- host arithmetic


def _rows(per_group: list[list[float]], hypers: list[GroupHyper]) -> list[list[float]]:
    """Sample rows from per-group ``[step_sq, g_sq, g_m, m_sq]``, then the whole optimizer's row."""
    rows = []
    for (step_sq, g_sq, g_m, m_sq), h in zip(per_group, hypers, strict=True):
        grad_sq = h.eta * h.eta * g_sq
        rows.append([step_sq, grad_sq, h.c / (2.0 - h.c) * grad_sq, g_m, g_sq, m_sq])
    rows.append([sum(col) for col in zip(*rows, strict=True)] if rows else [0.0] * len(SAMPLE_FIELDS))
    return rows


def full_samples(
    first: FirstHalf,
    before: list[float],
    after: list[float],
    hypers: list[GroupHyper],
    grad_scale: float | None = None,
    tensor_scales: list[float] | None = None,
) -> list[list[float]]:
    """One step's raw samples from the complete sums of a full measurement.

    Args:
        first: the first half (its ``buckets``).
        before: its table (:func:`read_sums`), ``n_buckets * 6`` floats (row-major).
        after: the table of :func:`measure_after_step`, one float per group.
        hypers: the groups' hyper-parameters of this step (:func:`group_hyper`).
        grad_scale: the AMP loss scale the first half's gradients still carry (``optimizer.grad_scale``
            of an optimizer that unscales inside its step; Lightning refuses clipping there, so
            ``kappa = 1``), or None.
        tensor_scales: the values of ``first.tensor_scales``.

    Returns:
        Rows: the groups then the whole optimizer; columns :data:`SAMPLE_FIELDS`. The cosine is
        ``g_m / sqrt(g_sq * m_sq)`` (:func:`cosine_of`); the optimizer row's is the cosine of the
        concatenated vectors.
    """
    n = len(hypers)
    raw_gsq = [0.0] * n
    for b, (gi, _) in enumerate(first.buckets):
        raw_gsq[gi] += before[6 * b]
    if grad_scale is not None:
        inv, kappa = 1.0 / grad_scale, [1.0] * n
    else:
        inv = 1.0
        kappa = [math.sqrt(a / g) if g > 0 else 1.0 for a, g in zip(after, raw_gsq, strict=True)]
    acc = [[0.0, 0.0, 0.0, 0.0] for _ in range(n)]
    for b, (gi, scale) in enumerate(first.buckets):
        gsq, gx, xsq, gm, xm, msq = before[6 * b : 6 * b + 6]
        h, k = hypers[gi], kappa[gi]
        wd, sign = h.weight_decay, h.sign
        g_sq = k * k * gsq * inv * inv + 2.0 * sign * wd * k * gx * inv + wd * wd * xsq
        if scale is None:
            carry, g_m, msq = 0.0, 0.0, 0.0
        else:
            if scale == _SGD:
                carry = h.lr * h.momentum
            else:
                s = tensor_scales[scale] if isinstance(scale, int) and tensor_scales is not None else scale
                carry = h.c * float(s)  # type: ignore[arg-type]
            g_m = sign * k * gm * inv + wd * xm
        alpha = h.lr
        step_sq = max(alpha * alpha * g_sq + 2.0 * alpha * carry * g_m + carry * carry * msq, 0.0)
        row = acc[gi]
        row[0] += step_sq
        row[1] += g_sq
        row[2] += g_m
        row[3] += msq
    return _rows(acc, hypers)


def cheap_samples(sums: list[float], hypers: list[GroupHyper]) -> list[list[float]]:
    """One step's raw samples from the table of :func:`measure_cheap` (``2 * n_groups`` floats):
    rows as :func:`full_samples`, with ``g_m = m_sq = 0`` (the cosine is not measured)."""
    return _rows([[sums[2 * i + 1], sums[2 * i], 0.0, 0.0] for i in range(len(hypers))], hypers)


def cosine_of(row: Sequence[float]) -> float | None:
    """The cosine of a sample row (:data:`SAMPLE_FIELDS`); None where ``m_k`` or ``g_k`` is zero (undefined)."""
    denom = math.sqrt(row[4] * row[5]) if row[4] * row[5] > 0 else 0.0
    return row[3] / denom if denom > 0 else None
