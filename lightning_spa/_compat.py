"""The one place lightning_spa touches private torch APIs, each with a public-API fallback.

:mod:`lightning_spa.functional` and :mod:`lightning_spa._steady` ask this module five things:

- :func:`kernel_support`: which parameters may use the fused and the foreach kernels (torch's
  private device lists and ``_foreach_supported_types``, which ``torch.distributed.tensor``
  extends with ``DTensor``; fallback: the device lists of torch 2.4 - 2.13 and plain tensors);
- :func:`group_by_device_and_dtype`: the C++ grouping torch's own kernels use (fallback: a dict);
- :func:`fused_kernel`: ``torch._fused_sgd_`` itself, for a caller that already holds one
  ``(device, dtype)`` bucket (None on the fallback);
- :func:`fused_cpu_broken_dtypes`: which low-precision dtypes torch's fused CPU kernel fails to
  update (measured once through the public ``sgd(fused=True)``; pytorch/pytorch#191763);
- :func:`fused_sgd_`: torch's fused SGD kernel ``torch._fused_sgd_`` called once per
  ``(device, dtype)`` bucket (fallback: the public functional ``torch.optim.sgd.sgd(fused=True)``,
  a few Python calls slower).

``PRIVATE`` switches all of them to the fallbacks (the tests run both ways). Every private
name is looked up at call time, so a torch that drops one degrades to the fallback instead
of failing at import.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer
from torch.optim.sgd import sgd as _public_sgd

__all__ = [
    "PRIVATE",
    "foreach_types",
    "fused_cpu_broken_dtypes",
    "fused_kernel",
    "fused_sgd_",
    "group_by_device_and_dtype",
    "kernel_support",
]

PRIVATE = True
"""Use torch's private helpers when they exist; ``False`` forces the public fallbacks."""

_FALLBACK_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", "mtia")
_FALLBACK_FOREACH_DEVICES = ("cuda", "xpu", "mtia")

Buckets = dict[tuple[torch.device, torch.dtype], tuple[list[list[Any]], list[int]]]


def _private(module: Any, name: str) -> Any:
    return getattr(module, name, None) if PRIVATE else None


def kernel_support() -> tuple[Sequence[str], Sequence[str], Sequence[type]]:
    """``(fused devices, foreach devices, tensor types foreach accepts)`` of this torch.

    The device lists are computed once per process; the types are torch's live list (which
    ``torch.distributed.tensor`` extends with ``DTensor`` when it is imported).
    """
    return (*_devices(PRIVATE), foreach_types())


def foreach_types() -> Sequence[type]:
    """The tensor types torch's foreach kernels accept (``DTensor`` too, once imported)."""
    types = _private(_optimizer, "_foreach_supported_types")
    return types if types is not None else (Tensor, torch.nn.Parameter)


_DEVICES: dict[bool, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _devices(private: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # A dict, not functools.lru_cache: torch.compile traces this and warns about an lru_cache wrapper.
    if private not in _DEVICES:
        _DEVICES[private] = _find_devices(private)
    return _DEVICES[private]


def _find_devices(private: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    fused = getattr(_optimizer, "_get_fused_kernels_supported_devices", None) if private else None
    foreach = getattr(_optimizer, "_get_foreach_kernels_supported_devices", None) if private else None
    privateuse1 = torch._C._get_privateuse1_backend_name()
    return (
        tuple(fused()) if fused is not None else (*_FALLBACK_FUSED_DEVICES, privateuse1),
        tuple(foreach()) if foreach is not None else (*_FALLBACK_FOREACH_DEVICES, privateuse1),
    )


def group_by_device_and_dtype(lists: list[list[Any]]) -> Buckets:
    """``{(device, dtype): ([sublist of each list], indices)}``, keyed by the tensors of ``lists[0]``.

    Entries of the other lists may be None; order is kept within a bucket. Under
    ``torch.compile`` the Python fallback runs (the C++ grouping does not trace).
    """
    grouping = _private(torch._C, "_group_tensors_by_device_and_dtype")
    if grouping is not None and not torch.compiler.is_compiling():
        return grouping(lists, True)  # type: ignore[no-any-return]
    buckets: Buckets = {}
    for i, p in enumerate(lists[0]):
        subs, indices = buckets.setdefault((p.device, p.dtype), ([[] for _ in lists], []))
        for sub, full in zip(subs, lists, strict=True):
            sub.append(full[i])
        indices.append(i)
    return buckets


@functools.lru_cache(maxsize=1)
def fused_cpu_broken_dtypes() -> frozenset[torch.dtype]:
    """The low-precision dtypes whose parameters torch's fused CPU SGD kernel does not update.

    In torch <= 2.13 the kernel's vectorised loop for bfloat16/float16 updates the momentum
    buffer (reading it as float32) but never stores the new parameters: only the last
    ``numel % vector width`` elements of each chunk move (pytorch/pytorch#191763, fixed by
    pytorch/pytorch#192545). Measured once per process: one momentum-free step of ``lr = 1`` on
    256 zeros with gradient 1, through torch's public ``sgd(fused=True)``; a dtype whose result is
    not all ``-1`` is broken.
    """
    broken = set()
    for dtype in (torch.bfloat16, torch.float16):
        p, g = torch.zeros(256, dtype=dtype), torch.ones(256, dtype=dtype)
        _public_sgd(
            [p], [g], [None], fused=True, weight_decay=0.0, momentum=0.0, lr=1.0, dampening=0.0,
            nesterov=False, maximize=False,
        )  # fmt: skip
        if not bool((p == -1).all()):
            broken.add(dtype)
    return frozenset(broken)


def fused_kernel() -> Any:
    """torch's fused SGD kernel ``torch._fused_sgd_`` (one ``(device, dtype)`` bucket a call), or
    None where it is missing or ``PRIVATE`` is off (then use :func:`fused_sgd_`)."""
    return _private(torch, "_fused_sgd_")


def fused_sgd_(
    buckets: Buckets,
    *,
    momentum: float,
    dampening: float,
    lr: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """torch's fused SGD step (no Nesterov) in place on ``buckets`` of ``[params, grads, bufs]``.

    ``bufs`` all None (with ``momentum != 0``) starts the buffers: the None entries of each
    bucket's list are replaced by the new buffers (map them back with the indices). The kernel
    computes ``g = (+/-) grad / grad_scale + weight_decay * p``, then
    ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` on a first step) and
    ``p -= lr * buf``; ``momentum == 0`` uses no buffer; a non-zero ``found_inf`` skips it all.
    """
    kernel = fused_kernel()
    for (device, _), ((ps, gs, bs), _) in buckets.items():
        if kernel is None:
            _public_sgd(
                ps, gs, bs, fused=True, grad_scale=grad_scale, found_inf=found_inf,
                weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening, nesterov=False,
                maximize=maximize,
            )  # fmt: skip
            continue
        first = momentum != 0.0 and bs[0] is None
        if first:
            bs[:] = [torch.empty_like(g) for g in gs]
        kernel(
            ps, gs, [] if momentum == 0.0 else bs,
            weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening, nesterov=False,
            maximize=maximize, is_first_step=first,
            grad_scale=None if grad_scale is None else grad_scale.to(device),
            found_inf=None if found_inf is None else found_inf.to(device),
        )  # fmt: skip
