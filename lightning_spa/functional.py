r"""``spa(...)``: one SPA step on lists of tensors, like :func:`torch.optim.sgd.sgd`.

SPA (``THEORY.md`` sections 1, 2 and 9), for step ``k`` with step size ``eta_k`` and averaging
weight ``c_k`` in ``(0, 1]``, ``g_k`` the gradient at ``x_k`` plus ``weight_decay * x_k``::

    z_{k+1} = z_k - eta_k g_k          x_{k+1} = (1 - c_k) x_k + c_k z_{k+1}

runs on torch SGD's state: a momentum buffer ``m`` that carries a scale ``s`` with
``z = x - s m``. Each parameter's history is ``(prev_eta, prev_c)``, ``s = (1 - prev_c) * prev_eta``
(None: no buffer, ``z = x``). :func:`lightning_spa.theorem.spa_step` gives the coefficients
(``t = max(s, eta)``: ``m' = (s/t) m + (eta/t) g;  x' = x - c t m';  s' = (1 - c) t``), so
``eta = 0`` and tiny ``eta`` are exact, and a constant schedule is torch's
``SGD(c*eta, momentum=1-c)`` bit for bit on each path.

Two modes:

- floats (``lr`` and ``c`` Python numbers, or ``fused=True``): parameters are batched by
  history and each batch runs one kernel: the per-tensor loop, foreach, or torch's fused SGD
  kernel (which also takes ``grad_scale``/``found_inf`` from a ``GradScaler``);
- tensors (``lr`` or ``c`` a one-element tensor, without ``fused=True``, under ``torch.compile``
  or with the tensor on an accelerator): the histories are 0-dim tensors on each parameter's
  device, in the parameters' precision (at least float32: :func:`scalar_dtype`), and the
  arithmetic has no host value in it: no device synchronisation, and
  ``torch.compile`` does not recompile when the values change. A per-parameter loop (fused by
  the compiler; in eager, slower than the float mode). A CPU tensor in eager is read as a
  float (free: no synchronisation) and runs the float mode.

``c = 1`` leaves no history: the buffers are dropped (set to None) unless ``c`` is a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_spa import _compat
from lightning_spa.theorem import StepCoefficients, spa_step, step_momentum

__all__ = [
    "LOW_PRECISION",
    "InfFlag",
    "StepInfo",
    "default_kernel",
    "float_step",
    "kernel_choice",
    "scalar_dtype",
    "spa",
]

PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})
"""Tensor types of the fused kernel (not ``DTensor`` and other subclasses)."""
Scalar = float | Tensor


class InfFlag:
    """``found_inf`` read on the host at most once (one sync), however many param groups ask."""

    __slots__ = ("found_inf", "value")

    def __init__(self, found_inf: Tensor) -> None:
        self.found_inf = found_inf
        self.value: bool | None = None

    def __call__(self) -> bool:
        if self.value is None:
            self.value = bool(self.found_inf.item())
        return self.value


class StepInfo(NamedTuple):
    """What :func:`spa` did, for the optimizer's bookkeeping.

    Attributes:
        changed: some buffer or history entry of the lists was replaced (write them back).
        momentum: the largest equivalent SGD+M momentum ``s / eta`` of the step (``inf`` at
            ``eta = 0``; float mode, parameters with a buffer), None if unknown or none.
        skipped: a ``found_inf`` was set: nothing was changed.
    """

    changed: bool
    momentum: float | None
    skipped: bool = False


def spa(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    prev_etas: list[Scalar | None],
    prev_cs: list[Scalar | None],
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    *,
    lr: Scalar,
    c: Scalar,
    weight_decay: float,
    maximize: bool,
    found_inf_read: Callable[[], bool] | None = None,
) -> StepInfo:
    """One SPA step in place on ``params``; updates the three state lists in place.

    Args:
        params: parameters ``x`` with a gradient.
        grads: their gradients (dense).
        momentum_buffer_list: ``m`` of each parameter, None without history.
        prev_etas: ``prev_eta`` of each history (float or 0-dim tensor), None without one.
        prev_cs: ``prev_c`` of each history, None without one.
        foreach: use the multi-tensor kernels (float mode).
        fused: use torch's fused SGD kernel (float mode; tensor values are read with ``.item()``).
            Both None: fused where every parameter supports it, else foreach, else the loop;
            under ``torch.compile``, foreach.
        grad_scale: with ``fused=True``, the ``GradScaler`` scale the kernel divides gradients by.
        found_inf: with ``fused=True``, non-zero skips the step. The kernel skips it on the device;
            the host reads it (one sync) only on steps that change a history or start buffers.
        lr: ``eta_k`` (>= 0), a float or a one-element tensor.
        c: ``c_k`` in ``(0, 1]``, a float or a one-element tensor.
        weight_decay: coupled L2 weight decay (>= 0).
        maximize: ascend instead of descend.
        found_inf_read: how the host reads ``found_inf`` (default: an :class:`InfFlag`); an
            optimizer passes one :class:`InfFlag` to all its groups, so a step syncs at most once.
    """
    if not params:
        return StepInfo(False, None)
    if (grad_scale is not None or found_inf is not None) and not fused:
        raise RuntimeError("`grad_scale` and `found_inf` need `fused=True` (the kernel unscales the gradients).")
    if (isinstance(lr, Tensor) or isinstance(c, Tensor)) and not fused:
        on_host = all(not isinstance(v, Tensor) or v.device.type == "cpu" for v in (lr, c))
        if torch.compiler.is_compiling() or not on_host:
            return _tensor_mode(params, grads, momentum_buffer_list, prev_etas, prev_cs, lr, c, weight_decay, maximize)
        # eager, values on the host: reading them costs no synchronisation; run the float mode
    eta, c_ = float(lr), float(c)
    impl = kernel_choice(foreach, fused)
    # Batch the parameters by the history of their buffers (a history exists iff a buffer does):
    # one batch unless some parameters skipped steps or joined later.
    e0, q0 = prev_etas[0], prev_cs[0]
    batches: dict[tuple[float, float] | None, list[int] | None]
    if len(set(prev_etas)) == 1 and len(set(prev_cs)) == 1 and not isinstance(e0, Tensor):
        batches = {None if e0 is None else (float(e0), float(q0)): None}  # type: ignore[arg-type]
    else:
        grouped: dict[tuple[float, float] | None, list[int]] = {}
        for i, (e, q) in enumerate(zip(prev_etas, prev_cs, strict=True)):
            grouped.setdefault(None if e is None else (float(e), float(q)), []).append(i)  # type: ignore[arg-type]
        batches = dict(grouped)
    plans = [(key, idx, spa_step(eta, c_, key)) for key, idx in batches.items()]
    keeps = [coef.history == key and (key is None or not coef.fresh) for key, _, coef in plans]
    # The kernel skips an inf step by itself; the host needs found_inf only when the step would
    # change the histories (or start buffers): one read then, none on a constant schedule.
    if found_inf is not None and not all(keeps) and (found_inf_read or InfFlag(found_inf))():
        return StepInfo(False, None, skipped=True)
    changed, momentum = False, None
    for (key, idx, coef), keep in zip(plans, keeps, strict=True):
        if key is not None:
            beta = step_momentum(eta, *key)
            momentum = beta if momentum is None else max(momentum, beta)
        if idx is None:
            ps, gs, bs = params, grads, momentum_buffer_list
        else:
            ps, gs, bs = [params[i] for i in idx], [grads[i] for i in idx], [momentum_buffer_list[i] for i in idx]
        bs = float_step(ps, gs, bs, coef, impl, weight_decay, maximize, grad_scale, found_inf)
        if keep:
            continue  # no history before or after, or buffers updated in place: nothing to write
        changed = True
        new_eta, new_c = coef.history if coef.history is not None else (None, None)
        for j, i in enumerate(range(len(params)) if idx is None else idx):
            momentum_buffer_list[i] = bs[j] if coef.history is not None else None
            prev_etas[i], prev_cs[i] = new_eta, new_c
    return StepInfo(changed, momentum)


def float_step(
    ps: list[Tensor],
    gs: list[Tensor],
    bs: list[Tensor | None],
    coef: StepCoefficients,
    impl: str | None,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    bucket: tuple[torch.device, torch.dtype] | None = None,
) -> list[Tensor | None]:
    """Runs ``coef`` on one batch with the loop, foreach or fused kernel; returns the buffers.

    ``impl`` None picks the kernel (default dispatch); ``bucket``, the ``(device, dtype)`` of all of
    ``ps`` when the caller knows they share one, skips the grouping by device and dtype.
    """
    if coef.fresh and coef.lr == 0.0:
        return bs  # eta = 0 and no buffer: nothing moves
    if coef.fresh:
        bs = [None] * len(ps)  # no buffer, or a stale one (zero scale): m' = g
    elif coef.grad_weight == 0.0:  # eta = 0 on a buffer: x' = x - c s m; g is not even read
        if impl == "loop" or not set(map(type, ps)) <= PLAIN_TYPES:
            for p, buf in zip(ps, bs, strict=True):
                p.add_(buf, alpha=-coef.lr)  # type: ignore[arg-type]
        else:
            for (pp, bb), _ in _group([ps, bs], bucket).values():
                torch._foreach_add_(pp, bb, alpha=-coef.lr)
        return bs
    buckets = None
    if impl is None:  # default dispatch
        if torch.compiler.is_compiling():
            impl = "foreach" if set(map(type, ps)).issubset(_compat.foreach_types()) else "loop"
        else:
            buckets = _group([ps, gs, bs], bucket)
            impl = default_kernel(set(map(type, ps)), buckets)
    if impl == "fused":
        buckets = buckets or _group([ps, gs, bs], bucket)
        _compat.fused_sgd_(
            buckets,
            momentum=coef.momentum if coef.history is not None or not coef.fresh else 0.0,
            dampening=1.0 - coef.grad_weight, lr=coef.lr, weight_decay=weight_decay, maximize=maximize,
            grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
        if coef.fresh and coef.history is not None:  # the kernel started new buffers in the buckets
            for (_, _, bb), indices in buckets.values():
                for i, buf in zip(indices, bb, strict=True):
                    bs[i] = buf
    elif impl == "foreach":
        _foreach_step(buckets or _group([ps, gs, bs], bucket), bs, coef, weight_decay, maximize)
    else:
        _loop_step(ps, gs, bs, coef, weight_decay, maximize)
    return bs


def kernel_choice(foreach: bool | None, fused: bool | None) -> str | None:
    """The kernel ``foreach``/``fused`` ask for; None (both None) means :func:`default_kernel`."""
    return "fused" if fused else "foreach" if foreach else None if foreach is None and fused is None else "loop"


LOW_PRECISION = frozenset({torch.bfloat16, torch.float16})
"""Dtypes for which the default dispatch leaves torch's fused CPU kernel out (see :func:`default_kernel`)."""


def default_kernel(types: set[type], buckets: Collection[tuple[torch.device, torch.dtype]]) -> str:
    """The default dispatch (eager): fused where every parameter supports it, else foreach, else the loop.

    ``types`` are the parameters' tensor types, ``buckets`` their ``(device, dtype)`` pairs.
    bfloat16/float16 on the CPU never default to fused: torch's fused CPU kernel leaves the
    parameters of those dtypes unchanged in torch <= 2.13 (pytorch/pytorch#191763; see
    :func:`lightning_spa._compat.fused_cpu_broken_dtypes`), and torch SGD's default is the loop
    there, so SPA's default takes the loop too (the same bits as torch SGD's default).
    """
    fused_devices, foreach_devices, foreach_types = _compat.kernel_support()
    if types <= PLAIN_TYPES and all(
        d.type in fused_devices and t.is_floating_point and not (d.type == "cpu" and t in LOW_PRECISION)
        for d, t in buckets
    ):
        return "fused"
    if types.issubset(foreach_types) and all(d.type in foreach_devices for d, _ in buckets):
        return "foreach"
    return "loop"


def _group(lists: list[list[Any]], bucket: tuple[torch.device, torch.dtype] | None) -> _compat.Buckets:
    """The lists as buckets by device and dtype; one bucket, without grouping, when ``bucket`` is known."""
    if bucket is None:
        return _compat.group_by_device_and_dtype(lists)
    return {bucket: (lists, list(range(len(lists[0]))))}


def _loop_step(
    ps: list[Tensor], gs: list[Tensor], bs: list[Tensor | None], coef: StepCoefficients, wd: float, maximize: bool
) -> None:
    """torch's ``_single_tensor_sgd`` with a gradient weight (same operations, same bits)."""
    keep = coef.history is not None or not coef.fresh
    for i, (p, grad) in enumerate(zip(ps, gs, strict=True)):
        g = grad if not maximize else -grad
        if wd != 0.0:
            g = g.add(p, alpha=wd)
        if keep:
            buf = bs[i]
            if buf is None:
                buf = bs[i] = g.detach().clone()
            else:
                buf.mul_(coef.momentum).add_(g, alpha=coef.grad_weight)
            g = buf
        p.add_(g, alpha=-coef.lr)


def _foreach_step(
    buckets: _compat.Buckets, bs: list[Tensor | None], coef: StepCoefficients, wd: float, maximize: bool
) -> None:
    """torch's ``_multi_tensor_sgd`` with a gradient weight (same operations, same bits)."""
    keep = coef.history is not None or not coef.fresh
    for (pp, gg, bb), indices in buckets.values():
        if maximize:
            gg = list(torch._foreach_neg(gg))
        if wd != 0.0:
            gg = list(torch._foreach_add(gg, pp, alpha=wd))
        if keep:
            if coef.fresh:
                bb = [g.detach().clone() for g in gg]
                for i, buf in zip(indices, bb, strict=True):
                    bs[i] = buf
            else:
                if coef.momentum != 1.0:
                    torch._foreach_mul_(bb, coef.momentum)
                torch._foreach_add_(bb, gg, alpha=coef.grad_weight)
            gg = bb
        torch._foreach_add_(pp, gg, alpha=-coef.lr)


def _tensor_mode(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    prev_etas: list[Scalar | None],
    prev_cs: list[Scalar | None],
    lr: Scalar,
    c: Scalar,
    weight_decay: float,
    maximize: bool,
) -> StepInfo:
    """The step with tensor scalars: no host value, no branch on a value (see the module docstring)."""
    plain_sgd = not isinstance(c, Tensor) and float(c) == 1.0  # c = 1 known on the host: no buffers
    changed = False
    scalars: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
    for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
        key = (p.device, p.dtype)
        if key not in scalars:  # once per device and dtype, no synchronisation (see _scalar_on)
            dtype = scalar_dtype(p.dtype, lr, c)
            scalars[key] = (_scalar_on(lr, p.device, dtype), _scalar_on(c, p.device, dtype))
        eta, cc = scalars[key]
        g = grad if not maximize else -grad
        if weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)
        buf = bufs[i]
        if buf is None:
            if plain_sgd:
                p.addcmul_(g, eta, value=-1)
                continue
            buf = bufs[i] = g.detach().clone()
            p.addcmul_(buf, cc * eta, value=-1)
            prev_etas[i], prev_cs[i], changed = eta.clone(), cc.clone(), True
            continue
        b, q = _history_tensor(prev_etas[i], eta), _history_tensor(prev_cs[i], eta)
        s = (1 - q) * b
        t = torch.maximum(s, eta)
        safe = torch.where(t > 0, t, torch.ones_like(t))
        buf.mul_(torch.where(eta == b, 1 - q, s / safe)).addcmul_(g, eta / safe)
        p.addcmul_(buf, cc * t, value=-1)
        if plain_sgd:
            bufs[i] = prev_etas[i] = prev_cs[i] = None
            changed = True
        elif b is prev_etas[i] and q is prev_cs[i]:
            b.copy_(t)  # in place: the state keeps its tensors (no recompilation)
            q.copy_(cc)
        else:  # a float history (or another dtype/device) becomes this mode's tensors
            prev_etas[i], prev_cs[i], changed = t, cc.clone(), True
    return StepInfo(changed, None)


_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def scalar_dtype(param_dtype: torch.dtype, *values: Scalar) -> torch.dtype:
    """The dtype of tensor mode's scalars (``eta``, ``c`` and the histories) for parameters of ``param_dtype``.

    The parameters' precision, at least float32 (bfloat16/float16 parameters compute in float32, so
    their histories stay exact: 0.7 is not rounded to bfloat16's 0.699), and at least that of a
    floating tensor ``lr``/``c``; a Python float is taken in the parameters' precision (float64 for
    float64 parameters, never the default dtype). Complex parameters use their real dtype.
    """
    # Plain dtype look-ups only: this runs traced by torch.compile, where Tensor.is_complex() and
    # dtype.to_real() made the compiled step compute wrong iterates (torch 2.13, backend "eager";
    # tests/test_optim_dtypes.py::test_compiled_step_with_float_lr_and_float64_tensor_c_keeps_float64).
    dtype = _REAL.get(param_dtype, param_dtype)
    dtype = torch.promote_types(dtype if dtype.is_floating_point else torch.get_default_dtype(), torch.float32)
    for value in values:
        if isinstance(value, Tensor):
            value_dtype = _REAL.get(value.dtype, value.dtype)
            if value_dtype.is_floating_point:
                dtype = torch.promote_types(dtype, value_dtype)
    return dtype


def _scalar_on(value: Scalar, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``value`` as a 0-dim tensor on ``device`` without a blocking copy.

    A float becomes ``torch.full`` (the value travels as a kernel argument; ``torch.tensor(v,
    device=cuda)`` would be a blocking host-to-device copy, pytorch/pytorch#120996). A CPU tensor
    in eager is read on the host (free) and filled the same way; other tensors move device to
    device, non-blocking (under ``torch.compile``, a traced copy).
    """
    if not isinstance(value, Tensor):
        return torch.full((), float(value), dtype=dtype, device=device)
    if value.device != device and value.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.full((), (value.real if value.is_complex() else value).item(), dtype=dtype, device=device)
    value = value.real if value.is_complex() else value
    return value.detach().reshape(()).to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def _history_tensor(value: Scalar | None, like: Tensor) -> Tensor:
    """A history value as a 0-dim tensor like ``like``: itself when it already is one (updated in
    place), else a copy (a float history, or one of another dtype or device)."""
    if isinstance(value, Tensor) and value.dtype == like.dtype and value.device == like.device:
        return value
    return _scalar_on(value, like.device, like.dtype)  # type: ignore[arg-type]
