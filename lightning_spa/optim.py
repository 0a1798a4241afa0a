r"""SPA: SGD with momentum in the stochastic primal averaging form.

The update, for optimizer step ``k`` with the group's current step size ``eta_k`` (key
``"lr"``) and averaging weight ``c_k`` (key ``"c"``)::

    z_{k+1} = z_k - eta_k * g_k
    x_{k+1} = (1 - c_k) * x_k + c_k * z_{k+1}         z_0 = x_0,  0 < c_k <= 1

``g_k`` is the gradient at ``x_k`` plus ``weight_decay * x_k`` (coupled, as in
:class:`torch.optim.SGD`). The parameters always hold ``x``; there is no train/eval switch.

How it runs. By Theorem 1 (``THEORY.md`` section 2) the same iterates come out of torch's
SGD+M recursion ``m_{k+1} = beta_k m_k + g_k;  x_{k+1} = x_k - alpha_k m_{k+1}`` with::

    alpha_k = c_k * eta_k
    beta_k  = (1 - c_{k-1}) * eta_{k-1} / eta_k

so each step derives ``(alpha_k, beta_k)`` from the group's ``(eta_k, c_k)`` and calls
torch's own SGD kernels (loop, foreach or fused). Per parameter the state holds

- ``"momentum_buffer"``: ``m_{k+1}``, exactly torch SGD's buffer;
- ``"prev_scale"``: ``(1 - c_k) * eta_k`` of the last step taken, a Python float,

and ``z`` is recovered on demand as ``z = x - prev_scale * m`` (:meth:`SPA.z`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd as _torch_sgd

__all__ = ["SPA", "validate_eta", "validate_c"]


def validate_eta(value: float | Tensor, name: str = "lr") -> float:
    """Returns ``value`` as a float after checking it is a finite, non-negative step size."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor `{name}` must have exactly one element, got shape {tuple(value.shape)}.")
        value = float(value.item())
    value = float(value)
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"Invalid `{name}`={value}: the step size eta must be finite and >= 0.")
    return value


def validate_c(value: float, name: str = "c") -> float:
    """Returns ``value`` as a float after checking it lies in ``(0, 1]``."""
    value = float(value)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"Invalid `{name}`={value}: the averaging weight c must be in (0, 1] "
            "(c = 1 - momentum; c = 1 is plain SGD)."
        )
    return value


# Parameter types the default dispatch sends to the fused kernel (not DTensor & co., see SPA._step_batch).
_PLAIN_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})


def _fused_supported(p: Tensor) -> bool:
    devices = _torch_optimizer._get_fused_kernels_supported_devices()
    return type(p) in _PLAIN_TENSOR_TYPES and p.device.type in devices and torch.is_floating_point(p)


def _foreach_supported(p: Tensor) -> bool:
    devices = _torch_optimizer._get_foreach_kernels_supported_devices()
    return type(p) in _torch_optimizer._foreach_supported_types and p.device.type in devices


class SPA(Optimizer):
    r"""Stochastic primal averaging: SGD with momentum, written as an average of SGD iterates.

    ``SPA(params, lr=eta, c=c)`` produces exactly the iterates of
    ``torch.optim.SGD(params, lr=c*eta, momentum=1-c)`` while ``eta`` and ``c`` are constant,
    and the iterates of the Theorem-1 equivalent SGD+M schedule when they change (see the
    module docstring). Change ``group["lr"]`` and ``group["c"]`` between steps to schedule
    them; LR schedulers and :class:`~pytorch_lightning.callbacks.LearningRateMonitor` see
    ``lr`` as ``eta``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: the step size ``eta`` of the ``z`` sequence (float or one-element tensor; a tensor
            is read with ``.item()`` each step, a host sync on CUDA).
            ``eta = 1.0, c = 0.1`` is SGD+M ``lr 0.1, momentum 0.9``.
        c: averaging weight in ``(0, 1]``; ``1 - c`` plays the role of momentum and
            ``c = 1`` is plain SGD.
        weight_decay: coupled L2 penalty added to the gradient, as in torch SGD.
        maximize: maximize the objective instead of minimizing it.
        foreach: use the multi-tensor kernels. ``None`` (with ``fused=None``) picks the
            fastest path available: fused where every parameter supports it, else foreach,
            else the per-tensor loop.
        fused: use torch's fused SGD kernel (CPU, CUDA and other devices torch supports).

    Raises:
        ValueError: an invalid ``lr``, ``c`` or ``weight_decay``, or ``fused`` and
            ``foreach`` both requested.
        RuntimeError: ``fused=True`` for parameters on a device or of a dtype the fused kernel
            does not support, or a sparse gradient (at the first step).

    Example::

        opt = SPA(model.parameters(), lr=1.0, c=0.1)      # == SGD(lr=0.1, momentum=0.9)
        opt = SPA.from_sgdm(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        z = opt.z(next(model.parameters()))                # the paper's z sequence
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        c: float = 0.1,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        validate_eta(lr, "lr")
        validate_c(c, "c")
        if not 0.0 <= float(weight_decay) < float("inf"):
            raise ValueError(f"Invalid `weight_decay`={weight_decay}: it must be finite and >= 0.")
        if fused and foreach:
            raise ValueError("`fused=True` and `foreach=True` cannot be used together; choose one.")
        defaults = dict(lr=lr, c=c, weight_decay=weight_decay, maximize=maximize, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        for group in self.param_groups:  # per-group overrides are checked too
            validate_eta(group["lr"], "lr")
            validate_c(group["c"], "c")
            if not 0.0 <= float(group["weight_decay"]) < float("inf"):
                raise ValueError(
                    f"Invalid `weight_decay`={group['weight_decay']} in a param group: it must be finite and >= 0."
                )
            if group["fused"]:
                for p in group["params"]:
                    if not _fused_supported(p):
                        raise RuntimeError(
                            "`fused=True` needs plain floating-point tensors on a device with torch's fused SGD "
                            f"kernel, got a {type(p).__name__} of {p.dtype} on {p.device.type} (DTensor/FSDP2 "
                            "parameters have no fused kernel); pass `fused=None` to pick a path."
                        )

    @classmethod
    def from_sgdm(cls, params: ParamsT, lr: float = 0.1, momentum: float = 0.9, **kwargs: Any) -> SPA:
        """Builds the SPA optimizer equivalent to ``torch.optim.SGD(params, lr, momentum)``.

        Uses ``eta = lr / (1 - momentum)`` and ``c = 1 - momentum`` (Theorem 1 for a constant
        schedule). ``kwargs`` go to :class:`SPA` (``weight_decay``, ``foreach``, ...).
        """
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"Invalid `momentum`={momentum}: SPA needs 0 <= momentum < 1.")
        lr = validate_eta(lr, "lr")
        return cls(params, lr=lr / (1.0 - momentum), c=1.0 - momentum, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    @torch.no_grad()
    def z(self, p: Tensor) -> Tensor:
        """Returns the paper's ``z`` for parameter ``p`` (a new tensor; ``z = x`` before any step)."""
        state = self.state.get(p, {})
        buf = state.get("momentum_buffer")
        if buf is None or state.get("prev_scale", 0.0) == 0.0:
            return p.detach().clone()
        return torch.add(p.detach(), buf, alpha=-state["prev_scale"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one SPA step with each group's current ``lr`` (eta) and ``c``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        state_of = self.state
        for group in self.param_groups:
            eta = validate_eta(group["lr"], "lr")
            c = validate_c(group["c"], "c")
            # One pass over the parameters (this loop is most of SPA's Python cost per step).
            # They are batched by the scale their buffer carries: all equal, unless some
            # parameters skipped steps or were added later.
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor | None] = []
            keys: list[float | None] = []
            key0: float | None = None
            uniform = True
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SPA does not support sparse gradients; use a dense embedding or SparseAdam.")
                state = state_of[p]
                buf = state.get("momentum_buffer")
                key = None if buf is None else state.get("prev_scale")  # no buffer: m_{k+1} = g_k
                if not params:
                    key0 = key
                elif uniform and key != key0:
                    uniform = False
                params.append(p)
                grads.append(grad)
                bufs.append(buf)
                keys.append(key)
            if not params:
                continue
            if uniform:
                self._step_batch(group, params, grads, bufs, eta, c, key0)
                continue
            batches: dict[float | None, list[int]] = {}
            for i, key in enumerate(keys):
                batches.setdefault(key, []).append(i)
            for prev_scale, idx in batches.items():
                self._step_batch(
                    group, [params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx], eta, c, prev_scale
                )
        return loss

    def _step_batch(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        bufs: list[Tensor | None],
        eta: float,
        c: float,
        prev_scale: float | None,
    ) -> None:
        """One Theorem-1 SGD step on ``params``, whose buffers ``bufs`` all carry ``prev_scale``."""
        alpha = c * eta
        fresh = prev_scale is None or prev_scale == 0.0
        if fresh:
            # No usable history: m_{k+1} = g_k. torch's kernels start a buffer from None.
            beta = 1.0 if c < 1.0 else 0.0  # any non-zero momentum makes torch create the buffer
            bufs = [None] * len(params)
        else:
            if eta == 0.0:
                raise ValueError(
                    "`lr` (eta) became 0 while momentum was active: beta = (1-c_prev)*eta_prev/eta is undefined. "
                    "Set c=1 first or keep eta > 0."
                )
            beta = cast(float, prev_scale) / eta
        foreach, fused = group["foreach"], group["fused"]
        grouped = None
        if foreach is None and fused is None:
            # torch's fused SGD kernel has no DTensor (FSDP2) sharding rule: plain tensors only.
            fused = set(map(type, params)) <= _PLAIN_TENSOR_TYPES
            if fused:  # device and dtype support, checked once per (device, dtype) bucket
                grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, bufs])  # type: ignore[list-item]
                fused_devices = _torch_optimizer._get_fused_kernels_supported_devices()
                keys = cast(list[tuple[torch.device, torch.dtype]], list(grouped))
                fused = all(dev.type in fused_devices and dtype.is_floating_point for dev, dtype in keys)
            foreach = not fused and all(_foreach_supported(p) for p in params)
        hyper: dict[str, Any] = dict(
            weight_decay=group["weight_decay"], momentum=beta, lr=alpha, dampening=0.0, nesterov=False,
            maximize=group["maximize"],
        )  # fmt: skip
        if fused and not fresh and beta != 0.0:
            # Steady state: call torch's fused kernel directly, once per (device, dtype) bucket, with
            # exactly the arguments torch.optim.sgd._fused_sgd would pass (no first step, no AMP scaling).
            if grouped is None:
                grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, bufs])  # type: ignore[list-item]
            for (device_params, device_grads, device_bufs), _ in grouped.values():
                torch._fused_sgd_(
                    cast(list[Tensor], device_params),
                    cast(list[Tensor], device_grads),
                    cast(list[Tensor], device_bufs),
                    **hyper,
                    is_first_step=False,
                )
        else:
            _torch_sgd(
                params,
                grads,
                bufs,
                foreach=bool(foreach),
                fused=bool(fused),
                **hyper,
            )
        scale = (1.0 - c) * eta
        if not fresh and scale == prev_scale:
            return  # buffers were updated in place and the scale they carry is unchanged: no state to write
        for p, buf in zip(params, bufs, strict=True):
            state = self.state[p]
            if beta != 0.0:
                state["momentum_buffer"] = buf
            state["prev_scale"] = scale

    def z_params(self) -> Iterable[tuple[Tensor, Tensor]]:
        """Yields ``(x, z)`` for every parameter of every group."""
        for group in self.param_groups:
            for p in group["params"]:
                yield p, self.z(p)
