"""The common case of :meth:`lightning_spa.SPA.step`, at the Python cost of torch's own SGD or less.

A param group whose parameters with a gradient share one float history (the same
``(prev_eta, prev_c)`` on every buffer, or no buffer anywhere: the steady state of any run whose
parameters do not come and go) is one batch of :func:`lightning_spa.functional.spa`. Its step needs:

- the kernel path, and whether the parameters form one ``(device, dtype)`` bucket: these depend on
  the parameter list only, so a :class:`GroupPlan` decides them once and is rebuilt when the list,
  ``foreach``/``fused`` or ``_compat.PRIVATE`` change (torch's SGD decides them at every step);
- the step's coefficients :func:`lightning_spa.theorem.spa_step`, recomputed only when ``eta``,
  ``c`` or the history change (a constant schedule computes them once);
- a state write only when the history changes (a constant schedule writes nothing; a changing
  ``eta`` updates each state in place).

With one bucket on the fused path, a steady step (constant ``eta``, ``c < 1``) and a momentum-off
step (``c = 1``, no buffers) call torch's fused SGD kernel directly, with exactly the arguments the
general path passes (same bits). Everything else (mixed histories, tensor ``lr``/``c``,
``torch.compile``, parameters that are not plain tensors) takes the general path, which handles
all cases.
The state is read afresh at every step (one dict look-up per parameter, as torch's SGD does), so
edits of ``optimizer.state`` and ``load_state_dict`` need no invalidation.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_spa import _compat
from lightning_spa.functional import PLAIN_TYPES, default_kernel, float_step, kernel_choice
from lightning_spa.theorem import StepCoefficients, spa_step, step_momentum

__all__ = ["GroupPlan"]

_GRAD, _IS_SPARSE = operator.attrgetter("grad"), operator.attrgetter("is_sparse")
_BUF, _ETA, _C = (operator.itemgetter(k) for k in ("momentum_buffer", "prev_eta", "prev_c"))
_IS_NONE = functools.partial(operator.is_, None)
_SPARSE = "SPA does not support sparse gradients; use a dense embedding or SparseAdam."


# Mean elements per tensor from which a momentum-off step on the CPU adds the gradients per tensor.
_LARGE_MEAN_NUMEL = 1 << 16

class GroupPlan:
    """The per-parameter-list decisions of one param group, and its last step's coefficients.

    ``impl`` None means the group always takes the general path (not all plain tensors); ``bucket``
    is the ``(device, dtype)`` of all parameters when they share one, else None (grouped per step).
    """

    __slots__ = ("add_when_off", "bucket", "flags", "group", "impl", "kernel", "last", "n", "params", "private", "seen")

    def __init__(self, group: dict[str, Any]) -> None:
        params = group["params"]
        self.group, self.params, self.seen, self.n = group, params, tuple(params), len(params)
        self.flags, self.private = (group["foreach"], group["fused"]), _compat.PRIVATE
        self.impl: str | None = None
        self.bucket: tuple[torch.device, torch.dtype] | None = None
        self.kernel: Callable[..., Any] | None = None
        self.last: tuple[Any, StepCoefficients, float | None] | None = None
        self.add_when_off = False
        if not params or not set(map(type, params)) <= PLAIN_TYPES:
            return
        buckets = {(p.device, p.dtype) for p in params}
        self.bucket = next(iter(buckets)) if len(buckets) == 1 else None
        # the kernel the flags ask for, else the default dispatch of functional.float_step, decided once
        self.impl = kernel_choice(*self.flags) or default_kernel(set(map(type, params)), buckets)
        if self.impl == "fused" and self.bucket is not None:
            self.kernel = _compat.fused_kernel()
        # Momentum off (c = 1) on large CPU tensors: torch's fused SGD kernel at momentum 0 is slower there
        # than a plain x -= lr * g per tensor (torch SGD's own momentum-0 loop; 5-9% on ResNet-18 shapes,
        # benchmarks/optimizer_step.py), while on small tensors the fused call's lower overhead wins.
        self.add_when_off = (
            self.impl == "fused" and self.flags == (None, None) and self.bucket is not None
            and self.bucket[0].type == "cpu" and sum(p.numel() for p in params) >= _LARGE_MEAN_NUMEL * len(params)
        )  # fmt: skip

    def fits(self, group: dict[str, Any]) -> bool:
        """Whether this plan still describes ``group`` (same parameters and kernel choice)."""
        params = group["params"]
        return (
            self.group is group
            and self.params is params
            and len(params) == self.n
            and self.private is _compat.PRIVATE
            and (group["foreach"], group["fused"]) == self.flags
            and all(map(operator.is_, params, self.seen))
        )

    def step(
        self,
        state_of: dict[Tensor, dict[str, Any]],
        eta: float,
        c: float,
        group: dict[str, Any],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        inf_read: Callable[[], bool] | None,
    ) -> tuple[bool, float | None] | None:
        """One step of the group: ``(skipped, equivalent momentum)``, or None: take the general path."""
        if self.impl is None or ((grad_scale is not None or found_inf is not None) and not self.flags[1]):
            return None  # not plain tensors; or AMP scaling for a group that is not fused: the general path refuses
        if torch.compiler.is_compiling():
            # Traced on its own: a graph break in a compiled `opt.step` leaves SPA.step running eagerly
            # (which picked this path) while dynamo compiles this frame, where the plan's fused kernel
            # has no fake implementation. The general path picks the compiler's kernel (foreach).
            return None
        params, n = self.params, self.n
        weight_decay, maximize = group["weight_decay"], group["maximize"]
        grads = list(map(_GRAD, params))
        try:
            sparse = any(map(_IS_SPARSE, grads))
        except AttributeError:  # parameters without a gradient (frozen, unused): step the others
            if self.impl != "fused" and self.flags == (None, None):
                return None  # the default dispatch might pick another kernel for the others
            params = [p for p, g in zip(params, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
            n = len(params)
            if not n:
                return False, None
            sparse = any(map(_IS_SPARSE, grads))
        if sparse:
            raise RuntimeError(_SPARSE)
        states: list[Any] | None = None
        bufs: list[Any] | None = None
        key: tuple[float, float] | None = None
        if state_of:
            states = list(map(state_of.get, params))
            if states[0] is None:
                if states.count(None) != n:
                    return None
                states = None
            else:
                try:
                    bufs, etas, cs = list(map(_BUF, states)), list(map(_ETA, states)), list(map(_C, states))
                except (TypeError, KeyError):  # some parameter has no history
                    return None
                e0, q0 = etas[0], cs[0]
                if not (type(e0) is float and type(q0) is float and etas.count(e0) == n and cs.count(q0) == n) or any(
                    map(_IS_NONE, bufs)
                ):
                    return None
                key = (e0, q0)
        last = self.last
        if last is not None and last[0] == (eta, c, key):
            coef, momentum = last[1], last[2]
        else:
            coef = spa_step(eta, c, key)
            momentum = None if key is None else step_momentum(eta, *key)
            self.last = ((eta, c, key), coef, momentum)
        keep = coef.history == key and (key is None or not coef.fresh)
        if inf_read is not None and not keep and inf_read():
            return True, None  # an inf step that would change the histories: skipped, state untouched
        kernel = self.kernel
        if (
            self.add_when_off and bufs is None and coef.history is None and coef.lr and not weight_decay
            and grad_scale is None and found_inf is None
        ):  # momentum off on large CPU tensors: x <- x - lr * g, as torch SGD's momentum-0 loop computes it
            torch._foreach_add_(params, grads, alpha=coef.lr if maximize else -coef.lr)
            return False, momentum  # no buffer before or after: no state to write
        if kernel is not None and (
            (not coef.fresh and coef.grad_weight == 1.0) if bufs is not None else (coef.history is None and coef.lr)
        ):  # a steady momentum step, or momentum off: torch's kernel with the arguments of _compat.fused_sgd_
            device = self.bucket[0]  # type: ignore[index]
            kernel(
                params, grads, [] if bufs is None else bufs,
                weight_decay=weight_decay, momentum=0.0 if bufs is None else coef.momentum, lr=coef.lr,
                dampening=0.0, nesterov=False, maximize=maximize, is_first_step=False,
                grad_scale=None if grad_scale is None else grad_scale.to(device),
                found_inf=None if found_inf is None else found_inf.to(device),
            )  # fmt: skip
            new_bufs: list[Any] | None = bufs
        else:
            new_bufs = float_step(
                params, grads, [None] * n if bufs is None else bufs, coef, self.impl, weight_decay, maximize,
                grad_scale, found_inf, bucket=self.bucket,
            )  # fmt: skip
        if not keep:
            _write_histories(state_of, params, states, new_bufs, coef)
        return False, momentum


def _write_histories(
    state_of: dict[Tensor, dict[str, Any]],
    params: list[Tensor],
    states: list[dict[str, Any]] | None,
    bufs: list[Any] | None,
    coef: StepCoefficients,
) -> None:
    """The state after a step that changed the shared history (the general path's layout)."""
    if coef.history is None:  # no history left: z = x, buffers dropped
        if states is not None:
            for p in params:
                state_of.pop(p, None)
        return
    e, q = coef.history
    entry = {"prev_eta": e, "prev_c": q, "prev_scale": (1 - q) * e}
    if states is not None and not coef.fresh:  # the same buffers, updated in place: move the history
        for st in states:
            st.update(entry)
        return
    for p, buf in zip(params, bufs, strict=True):  # type: ignore[arg-type]
        state_of[p] = {"momentum_buffer": buf, **entry}
