r"""SPA: SGD with momentum in the stochastic primal averaging form.

The update, for optimizer step ``k`` with the group's current step size ``eta_k`` (key
``"lr"``) and averaging weight ``c_k`` (key ``"c"``)::

    z_{k+1} = z_k - eta_k * g_k
    x_{k+1} = (1 - c_k) * x_k + c_k * z_{k+1}         z_0 = x_0,  eta_k >= 0,  0 < c_k <= 1

``g_k`` is the gradient at ``x_k`` plus ``weight_decay * x_k`` (coupled, as in
:class:`torch.optim.SGD`). The parameters always hold ``x``; there is no train/eval switch.

How it runs (``THEORY.md`` sections 2 and 9): on torch SGD's state, a momentum buffer ``m``
that carries a scale ``s`` with ``z = x - s m``. While ``eta`` does not fall faster than by
``1 - c`` a step this is torch's SGD+M step with ``alpha_k = c_k eta_k`` and
``beta_k = (1 - c_{k-1}) eta_{k-1} / eta_k``; an instant drop (down to ``eta = 0``) keeps ``m``
and moves the scale instead. The arithmetic is :func:`lightning_spa.functional.spa`; this
class validates the hyper-parameters (:mod:`lightning_spa._validation`) and keeps the state; the
common case, every parameter with a gradient and one shared history, takes the fast path of
:mod:`lightning_spa._steady` (the same arithmetic, at the Python cost of torch's SGD or less).
Per parameter with history:

- ``"momentum_buffer"``: ``m``, exactly torch SGD's buffer on a constant schedule;
- ``"prev_eta"``, ``"prev_c"``: the pair whose ``(1 - prev_c) * prev_eta`` is the scale (after
  an ordinary step, that step's ``eta`` and ``c``): floats, or 0-dim tensors with tensor ``lr``;
- ``"prev_scale"``: ``s = (1 - prev_c) * prev_eta`` (float mode only; read the scale with
  :meth:`SPA.momentum_history`, which serves both modes).

No history (no state at all) means ``z = x``: before the first step and after a ``c = 1`` step,
whose buffers are dropped (momentum off costs nothing; turning it back on restarts ``m = g``).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from lightning_spa._steady import _GRAD, _IS_SPARSE, _SPARSE, GroupPlan
from lightning_spa._validation import (
    check_scaled_groups,
    fused_low_precision,
    step_value,
    validate_c,
    validate_eta,
    validate_group,
)
from lightning_spa.functional import InfFlag, spa
from lightning_spa.state_dicts import sgd_state_dict_to_spa
from lightning_spa.theorem import constant_sgdm_to_spa

__all__ = ["SPA", "SPASpikeWarning", "validate_c", "validate_eta"]


_FLAGS = ("maximize", "foreach", "fused")  # group keys a state dict of an older format may lack


class SPASpikeWarning(UserWarning):
    """An instant drop of ``eta``: the equivalent SGD+M momentum of a step reached 1 or more."""


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside torch and lightning_spa."""
    inside = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


class SPA(Optimizer):
    r"""Stochastic primal averaging: SGD with momentum, written as an average of SGD iterates.

    ``SPA(params, lr=eta, c=c)`` produces exactly the iterates (the same bits, on the same kernel
    path) of ``torch.optim.SGD(params, lr=c*eta, momentum=1-c)`` while ``eta`` and ``c`` are constant, and
    the paper's z-form when they change (see the module docstring): any torch LR scheduler may
    drive ``lr`` (= ``eta``), down to 0 and back. An instant drop of ``eta`` by more than a factor
    ``1 - c`` (e.g. ``MultiStepLR``) is the loss spike of ``THEORY.md`` section 6: SPA warns once
    (:class:`SPASpikeWarning`) and runs it.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: the step size ``eta >= 0`` of the ``z`` sequence, a float or a one-element tensor.
            ``eta = 1.0, c = 0.1`` is SGD+M ``lr 0.1, momentum 0.9``. A tensor ``lr`` (or ``c``)
            under ``torch.compile`` or on an accelerator is never read on the host: no sync, no
            recompilation when the values change, no spike check; the histories are then 0-dim
            tensors and eager steps run a per-parameter loop. A CPU tensor in eager is read for
            free and runs the float kernels; ``fused=True`` always reads it with ``.item()``.
        c: averaging weight in ``(0, 1]`` (float or one-element tensor); ``1 - c`` plays the
            role of momentum and ``c = 1`` is plain SGD (no buffers).
        weight_decay: coupled L2 penalty added to the gradient, as in torch SGD.
        maximize: maximize the objective instead of minimizing it.
        foreach: use the multi-tensor kernels. ``None`` (with ``fused=None``) picks the fastest
            path: the fused kernel where every parameter supports it, else foreach, else the loop.
        fused: use torch's fused SGD kernel. ``True`` also lets ``torch.amp.GradScaler`` pass its
            scale to the kernel (no separate unscale pass; an inf step is skipped on the device, and
            read on the host, once per step, only at steps that change eta or c); the default leaves
            unscaling to the caller, as torch does. A param group may set its own ``fused``, as in
            torch SGD; the scaler asks the optimizer (this argument), not a group, so with
            ``fused=True`` here a scale that reaches a group without ``fused`` is refused at the
            step. Under Lightning's ``precision="16-mixed"``,
            ``fused=True`` makes Lightning refuse gradient clipping (``gradient_clip_val``), exactly
            as for torch's fused SGD: the gradients are still scaled when clipping would run. The
            default ``fused=None`` (which still picks the fused kernel where it can) keeps clipping
            working: Lightning unscales first, then clips. bfloat16/float16 parameters on the CPU
            never default to fused (torch SGD's default, the loop, runs there): torch <= 2.13's
            fused CPU kernel does not update them (pytorch/pytorch#191763); ``fused=True`` there
            warns.

    Raises:
        TypeError: ``lr`` or ``c`` not a number or a one-element tensor.
        ValueError: an out-of-range ``lr``, ``c`` or ``weight_decay``, or ``fused`` and ``foreach``
            both requested.
        RuntimeError: ``fused=True`` for parameters the fused kernel does not support; at the step,
            a sparse gradient, or a ``GradScaler`` scale reaching a group without ``fused=True``.

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
        c: float | Tensor = 0.1,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, c=c, weight_decay=weight_decay, maximize=maximize, foreach=foreach, fused=fused)
        validate_group({**defaults, "params": []}, "in the arguments")
        self._spike: dict[str, Any] = {"warned": False, "steps": 0, "last": {}}
        self._plans: dict[int, GroupPlan] = {}
        super().__init__(params, defaults)

    @property
    def _step_supports_amp_scaling(self) -> bool:  # read by torch.amp.GradScaler.step
        return bool(self.defaults.get("fused"))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group (torch's checks, then SPA's: ``lr``, ``c``, ``weight_decay``, ``fused``).

        Raises:
            ValueError: as the constructor.
        """
        super().add_param_group(param_group)
        where = f"in param group {len(self.param_groups) - 1}"
        try:
            validate_group(self.param_groups[-1], where)
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise
        message = fused_low_precision(self.param_groups[-1], where)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=_caller_level())

    @classmethod
    def from_sgdm(cls, params: ParamsT, lr: float = 0.1, momentum: float = 0.9, **kwargs: Any) -> SPA:
        """Builds the SPA optimizer equivalent to ``torch.optim.SGD(params, lr, momentum)``.

        Uses ``eta = lr / (1 - momentum)`` and ``c = 1 - momentum`` (Theorem 1 for a constant
        schedule). ``kwargs`` go to :class:`SPA` (``weight_decay``, ``foreach``, ...); torch's
        ``nesterov=False`` and ``dampening=0`` are accepted, other values have no SPA form.
        """
        if kwargs.pop("nesterov", False):
            raise ValueError(
                "`nesterov=True` has no SPA form: SPA is plain SGD momentum (nesterov=False, dampening=0)."
            )
        if kwargs.pop("dampening", 0.0) != 0.0:
            raise ValueError(
                "`dampening` != 0 has no SPA form: SPA is plain SGD momentum (nesterov=False, dampening=0)."
            )
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}: SPA needs 0 <= `momentum` < 1.")
        eta, c = constant_sgdm_to_spa(float(validate_eta(lr, "lr")), momentum)
        return cls(params, lr=eta, c=c, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_spike", {"warned": False, "steps": 0, "last": {}})
        self.__dict__.setdefault("_plans", {})
        for group in self.param_groups:  # groups saved before a flag existed: the optimizer's own flags
            for key, default in (("maximize", False), ("foreach", None), ("fused", None)):
                group.setdefault(key, self.defaults.get(key, default))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads an SPA state dict, or a ``torch.optim.SGD`` (momentum) one converted by Theorem 1.

        An SGD state dict (groups with ``momentum`` and no ``c``) becomes the SPA state that
        continues the SGD run exactly (to round-off), with a warning that says so:
        ``eta = lr / (1 - momentum)``, ``c = 1 - momentum``, the buffers kept
        (:func:`lightning_spa.state_dicts.sgd_state_dict_to_spa`). Tensor-mode histories keep their
        dtype (torch would cast them to the parameter's, e.g. bfloat16), so a resumed run continues
        exactly. A state dict saved before ``prev_eta``/``prev_c`` existed (``prev_scale`` only)
        loads exactly too, and so do groups saved without ``maximize``/``foreach``/``fused`` (an
        older format): this optimizer's matching group fills them in.

        An SGD state dict written under an LR scheduler (its groups carry ``initial_lr``) is
        refused when an LR scheduler also drives this optimizer (its groups carry ``initial_lr``,
        e.g. Lightning resuming an SGD checkpoint whose ``configure_optimizers`` now returns SPA):
        that scheduler's state, restored next, schedules SGD's ``lr``; driving ``eta`` with it
        would not continue the SGD run, and no torch scheduler can drive SPA along it (SGD's
        schedule maps to a step-by-step ``(eta, c)`` pair, ``THEORY.md`` sections 2-3).

        Raises:
            ValueError: an SGD state dict with Nesterov, dampening or momentum >= 1; an SGD state
                dict with an LR scheduler's ``initial_lr`` while a scheduler drives this optimizer
                (the message gives the ways on).
        """
        groups = state_dict.get("param_groups", [])
        if groups and all("c" not in g and "momentum" in g for g in groups):
            if any("initial_lr" in g for g in groups) and any("initial_lr" in g for g in self.param_groups):
                raise ValueError(
                    "This state dict is a torch.optim.SGD one written under an LR scheduler (its param groups carry "
                    "`initial_lr`), and an LR scheduler drives this SPA optimizer too: the scheduler state restored "
                    "next (e.g. by Lightning's resume) holds SGD's learning rates, and whatever it sets as SPA's eta "
                    "leaves the SGD trajectory (an SGD lr schedule is, in SPA form, a pair (eta, c) that changes "
                    "together step by step: lightning_spa.sgdm_to_spa). To continue the SGD run exactly, resume it "
                    "with torch.optim.SGD and its scheduler. To switch to SPA here, resume without an LR scheduler "
                    "(the optimizer state converts exactly), or start the SPA schedule fresh: load the weights only "
                    "(e.g. LightningModule.load_from_checkpoint) and keep the momentum with "
                    "lightning_spa.sgdm_optimizer_to_spa."
                )
            state_dict = sgd_state_dict_to_spa(state_dict, self.param_groups)
        groups = state_dict.get("param_groups", [])
        if len(groups) == len(self.param_groups) and any(k not in g for g in groups for k in _FLAGS):
            own_flags = [{k: own[k] for k in _FLAGS if k in own} for own in self.param_groups]
            filled = [{**flags, **g} for g, flags in zip(groups, own_flags, strict=True)]
            state_dict = {**state_dict, "param_groups": filled}
        super().load_state_dict(state_dict)
        self._restore_exact_histories(state_dict)
        for state in self.state.values():
            if "prev_scale" in state and "prev_eta" not in state:  # the layout before prev_eta/prev_c
                state["prev_eta"], state["prev_c"] = state["prev_scale"], 0.0
            if "momentum_buffer" in state and not float((1 - state["prev_c"]) * state["prev_eta"]):
                state.clear()  # a stale buffer (zero scale) means z = x

    def _restore_exact_histories(self, state_dict: dict[str, Any]) -> None:
        """Tensor-mode histories as saved: torch's ``load_state_dict`` casts every state tensor but
        ``step`` to its parameter's dtype (``Optimizer._process_value_according_to_param_policy``,
        a static method called by class, so not overridable), which would round ``prev_eta`` 0.7 of
        a bfloat16 parameter to 0.699. ``prev_eta``/``prev_c`` are scalars of the recursion, not
        tensors of the parameter's shape: they keep their dtype (moved to the parameter's device)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):  # torch checked the group sizes
            saved = state_dict["state"].get(i)
            if not saved or p not in self.state:
                continue
            for key in ("prev_eta", "prev_c"):
                value = saved.get(key)
                if isinstance(value, Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)

    def momentum_history(self, p: Tensor) -> tuple[Tensor, float | Tensor] | None:
        """``(m, s)`` of parameter ``p`` with ``z = x - s m``, or None when ``z = x`` (no history)."""
        state = self.state.get(p)
        if not state or state.get("momentum_buffer") is None:
            return None
        return state["momentum_buffer"], (1 - state["prev_c"]) * state["prev_eta"]

    @torch.no_grad()
    def z(self, p: Tensor) -> Tensor:
        """Returns the paper's ``z`` for parameter ``p`` (a new tensor; ``z = x`` without history)."""
        history = self.momentum_history(p)
        if history is None:
            return p.detach().clone()
        buf, scale = history
        return p.detach() - scale * buf

    def z_params(self) -> Iterable[tuple[Tensor, Tensor]]:
        """Yields ``(x, z)`` for every parameter of every group."""
        for group in self.param_groups:
            for p in group["params"]:
                yield p, self.z(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one SPA step with each group's current ``lr`` (eta) and ``c``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        state_of = self.state
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        inf_read = None if found_inf is None else InfFlag(found_inf)  # one host read per step, at most
        if grad_scale is not None or found_inf is not None:
            check_scaled_groups(self.param_groups)  # before any group moves
        self._spike["steps"] += 1
        plans, eager = self._plans, not torch.compiler.is_compiling()
        for index, group in enumerate(self.param_groups):
            eta, c = group["lr"], group["c"]
            if not (type(eta) is float and 0.0 <= eta < math.inf):
                eta = step_value(group, "lr")
            if not (type(c) is float and 0.0 < c <= 1.0):
                c = step_value(group, "c")
            done = None
            if eager and type(eta) is float and type(c) is float:  # the common case: lightning_spa._steady
                plan = plans.get(index)
                if plan is None or not plan.fits(group):
                    plan = plans[index] = GroupPlan(group)
                done = plan.step(state_of, eta, c, group, grad_scale, found_inf, inf_read)
            if done is None:
                done = self._general_step(group, eta, c, grad_scale, found_inf, inf_read)
            if not done[0] and not isinstance(eta, Tensor):
                self._check_spike(index, eta, done[1])
        if len(plans) > len(self.param_groups):  # groups removed: let go of their tensors
            for index in [i for i in plans if i >= len(self.param_groups)]:
                del plans[index]
        return loss

    def _general_step(
        self,
        group: dict[str, Any],
        eta: float | Tensor,
        c: float | Tensor,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        inf_read: InfFlag | None,
    ) -> tuple[bool, float | None]:
        """A group's step in every case (parameters without gradients, mixed histories, tensors)."""
        state_of = self.state
        all_grads = list(map(_GRAD, group["params"]))
        params = [p for p, g in zip(group["params"], all_grads, strict=True) if g is not None]
        grads: list[Tensor] = [g for g in all_grads if g is not None]
        if any(map(_IS_SPARSE, grads)):
            raise RuntimeError(_SPARSE)
        if state_of:
            states = [state_of.get(p) for p in params]
            bufs: list[Tensor | None] = [s["momentum_buffer"] if s else None for s in states]
            etas: list[Any] = [s["prev_eta"] if s else None for s in states]
            cs: list[Any] = [s["prev_c"] if s else None for s in states]
        else:  # no history anywhere (first step, or momentum off)
            bufs, etas, cs = [None] * len(params), [None] * len(params), [None] * len(params)
        info = spa(
            params, grads, bufs, etas, cs, group["foreach"], group["fused"], grad_scale, found_inf,
            lr=eta, c=c, weight_decay=group["weight_decay"], maximize=group["maximize"], found_inf_read=inf_read,
        )  # fmt: skip
        if info.changed and not info.skipped:
            for p, buf, e, q in zip(params, bufs, etas, cs, strict=True):
                if buf is None:
                    state_of.pop(p, None)
                elif isinstance(e, Tensor):  # tensor mode: the scale is derived (momentum_history)
                    state_of[p] = {"momentum_buffer": buf, "prev_eta": e, "prev_c": q}
                else:
                    state_of[p] = {"momentum_buffer": buf, "prev_eta": e, "prev_c": q, "prev_scale": (1 - q) * e}
        return info.skipped, info.momentum

    def _check_spike(self, index: int, eta: float, momentum: float | None) -> None:
        """Warns once when a step's equivalent momentum is >= 1 and eta fell at this step only.

        An instant drop (MultiStepLR, StepLR) falls after a step at which eta did not fall; the
        tail of a smooth decay to 0 (cosine, linear), whose equivalent momentum also exceeds 1,
        falls at every step, and a rise after ``eta = 0`` does not fall at all: neither is warned.
        A smooth scheduler stepped once every ``n`` steps (per epoch: Lightning's default interval)
        falls in a staircase, every ``n`` steps: the warning then says to step it every step.
        Steps are counted from 0 (the step index Lightning's ``global_step`` and loggers use).
        """
        last = self._spike["last"]
        k = self._spike["steps"] - 1  # this step, 0-based
        prev = last.get(index)
        falling = prev is not None and eta < prev[0]
        sudden = prev is None or (falling and not prev[1])
        fell_at, gap = (prev[2], prev[3]) if prev is not None and len(prev) == 4 else (None, None)
        staircase = False
        if falling:
            new_gap = None if fell_at is None else k - fell_at
            staircase = new_gap is not None and new_gap >= 2 and new_gap == gap
            fell_at, gap = k, new_gap
        last[index] = (eta, falling, fell_at, gap)
        if momentum is None or momentum < 1.0 or not sudden or self._spike["warned"]:
            return
        self._spike["warned"] = True
        if staircase:
            advice = (
                f"eta falls in a staircase, once every {gap} optimizer steps: an LR scheduler stepped every {gap} "
                "steps, e.g. once per epoch (Lightning's default `interval: epoch`, and how LightningCLI's "
                "--lr_scheduler steps it). Step it every optimizer step instead: return "
                '{"scheduler": ..., "interval": "step"} as the lr_scheduler of configure_optimizers (with '
                "LightningCLI, override its configure_optimizers to do so), its length in optimizer steps (e.g. "
                "T_max=trainer.estimated_stepping_batches)"
            )
        else:
            advice = (
                "to avoid the spike, move eta (and c) gradually: lightning_spa.GradualSchedule, or a smooth LR "
                "scheduler stepped every optimizer step (cosine with `interval: step`, or a per-step decay by a "
                "factor above 1 - c)"
            )
        warnings.warn(
            f"SPA step {k} (counted from 0), param group {index}: eta fell to {eta:.6g} in one step, an "
            f"equivalent SGD momentum (1 - c_prev) * eta_prev / eta of {momentum:.4g} >= 1 (the loss spike of an "
            f"instant drop). SPA runs it exactly; {advice}. Warned once per optimizer.",
            SPASpikeWarning,
            stacklevel=_caller_level(),
        )
