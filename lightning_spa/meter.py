r"""The measuring half of :class:`~lightning_spa.callbacks.MomentumDiagnostics`, usable without Lightning.

:class:`MomentumMeter` attaches to one SPA or torch SGD optimizer and

- counts the steps it actually takes (its *clock*, :attr:`MomentumMeter.step`: ``optimizer.step()``
  calls seen by its step post-hook; a step skipped by an AMP grad scaler, or never called, does
  not count. A skip inside a fused-AMP step (``_step_supports_amp_scaling``) is a device flag, read
  at the next measurement or checkpoint rather than with a sync: until then the measurement
  schedule runs one step ahead per such skip, while every reading is labelled with its exact step);
- measures step ``k`` (:mod:`lightning_spa.diagnostics`) when ``(k + 1) % every_n_steps == 0``,
  the convention of Lightning's ``log_every_n_steps``, or the next step after
  :meth:`MomentumMeter.measure_next_step`: the first half after backward
  (:meth:`MomentumMeter.before_step`), the second in the step post-hook, which reads the
  hyper-parameters the step really used, whoever wrote them and whenever;
- keeps bias-corrected EMAs (:class:`DiagnosticsEMA`) and hands every measurement to its
  listeners as a :class:`Reading` (host floats).

On an unmeasured step it costs one tiny step post-hook (the clock, which also sets
:attr:`MomentumMeter.due` for the next step); a driver tests ``due`` before calling
:meth:`MomentumMeter.before_step`. Example, in a plain loop (no closure)::

    meter = MomentumMeter(opt, every_n_steps=10).attach(before_hook=True)
    meter.listeners.append(lambda r: print(r.step, r.ratio))
    for batch in data:
        loss_fn(model(batch)).backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_spa.diagnostics import (
    GroupHyper,
    complete_sums,
    cosine_of,
    group_hyper,
    has_spa_form,
    measure_after_step,
    measure_before_step,
    prev_scales,
    step_samples,
)
from lightning_spa.distributed import has_sharded_params, local_tensor

__all__ = ["EMA_NAMES", "DiagnosticsEMA", "MomentumMeter", "Reading"]

#: Columns of :meth:`DiagnosticsEMA.corrected` and of :attr:`Reading.values` rows.
EMA_NAMES = ("step_sq", "grad_sq", "grad_sq_scaled", "cosine", "ratio")


def _insert_empty_rows(table: Tensor, extra: int) -> Tensor:
    """``table`` with ``extra`` zero rows inserted before its last row (the whole optimizer's): the rows
    of param groups added mid-run."""
    pad = torch.zeros(extra, table.shape[1], device=table.device, dtype=table.dtype)
    return torch.cat([table[:-1], pad, table[-1:]])


class DiagnosticsEMA:
    """Bias-corrected exponential moving averages of ``step_sq``, ``grad_sq``, ``grad_sq_scaled`` and
    ``cosine`` for ``n_rows`` series (param groups, then the whole optimizer), kept on one device.

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

    def extend(self, n_rows: int) -> None:
        """Grows to ``n_rows`` series: new param groups get empty rows, inserted before the last row."""
        extra = n_rows - self.values.shape[0]
        if extra > 0:
            self.values = _insert_empty_rows(self.values, extra)
            self.weights = _insert_empty_rows(self.weights, extra)

    def update(self, samples: Tensor, step: int | Tensor, default_gap: int = 1, accept: Tensor | None = None) -> Tensor:
        """Folds one step's :func:`~lightning_spa.diagnostics.step_samples` in; returns the 0-dim bool ``ok``.

        ``ok`` is ``accept`` (default true) and all samples finite. A rejected step leaves the
        state unchanged (its weight is not spent either: the next accepted sample weighs for the
        steps since the last accepted one), and so do rows whose cosine is undefined for the
        cosine column. No host sync.
        """
        gap = torch.where(torch.isnan(self._last), float(default_gap), step - self._last).clamp(min=1.0)
        weight = 1.0 - self.decay**gap
        cos, cos_valid = cosine_of(samples)
        new = torch.stack([samples[:, 0], samples[:, 1], samples[:, 2], cos], dim=-1)
        ok = torch.isfinite(new).all()
        if accept is not None:
            ok = ok & accept
        valid = ok & torch.ones_like(new, dtype=torch.bool)
        valid[:, 3] &= cos_valid
        w = torch.where(valid, weight, 0.0).to(self.values.dtype)
        self.values = self.values * (1 - w) + w * torch.where(valid, new, 0.0)
        self.weights = self.weights * (1 - w) + w
        # torch.full, not torch.as_tensor(step, device=...): the latter is a blocking host-to-device copy
        self._last = torch.where(ok, torch.full((), float(step), dtype=self._last.dtype, device=self._last.device),
                                 self._last)  # fmt: skip
        return ok

    def corrected(self) -> Tensor:
        """``(n_rows, 5)``: the bias-corrected :data:`EMA_NAMES` (NaN where nothing was folded in)."""
        nan = torch.full_like(self.values, math.nan)
        avg = torch.where(self.weights > 0, self.values / torch.where(self.weights > 0, self.weights, 1.0), nan)
        ratio = avg[:, 0] / avg[:, 2]
        return torch.cat([avg, ratio[:, None]], dim=-1)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.tolist(), "weights": self.weights.tolist(), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a saved state; one with fewer rows (param groups added since) is padded, not refused."""
        kw = dict(device=self.values.device, dtype=self.values.dtype)
        values, weights = torch.tensor(state["values"], **kw), torch.tensor(state["weights"], **kw)  # type: ignore[arg-type]
        n_rows = max(values.shape[0], self.values.shape[0])
        self.values, self.weights = values, weights
        self.extend(n_rows)
        last = state["last_step"]
        self._last = torch.tensor(math.nan if last is None else float(last), **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Reading:
    """One measured optimizer step, as host numbers.

    Attributes:
        step: the optimizer's clock at the step (steps it took before this one).
        hypers: each param group's hyper-parameters of the step.
        groups: each param group's name (its ``"name"`` key, else its index).
        values: one row per group then one for the whole optimizer, columns :data:`EMA_NAMES`
            (the EMAs after this step; NaN where undefined). Empty when nothing was measured.
        status: ``"ok"``; ``"nonfinite"`` (a gradient was inf/NaN: not folded in); ``"skipped"``
            (an AMP scaler skipped the step: not counted, measured again when taken); ``"spike"``
            (torch SGD with ``momentum >= 1``, which has no SPA form: not measured).
    """

    step: int
    hypers: list[GroupHyper]
    groups: list[str]
    values: list[list[float]]
    status: str

    @property
    def ratio(self) -> float:
        """The whole optimizer's ``ratio`` EMA (NaN if undefined)."""
        return self.values[-1][4] if self.values else math.nan

    @property
    def cosine(self) -> float:
        """The whole optimizer's ``cosine`` EMA (NaN if undefined)."""
        return self.values[-1][3] if self.values else math.nan


class MomentumMeter:
    """Counts an optimizer's steps, measures every ``every_n_steps``-th one and keeps the EMAs.

    The driver calls :meth:`before_step` after backward and before ``optimizer.step()`` (the
    callback does it in ``on_before_optimizer_step``; ``attach(before_hook=True)`` does it from a
    step pre-hook, for loops without a closure). On a due step it takes the first half of the
    measurement there, and the step post-hook finishes it with the hyper-parameters the step used.

    Args:
        optimizer: :class:`~lightning_spa.SPA`, or :class:`torch.optim.SGD` without Nesterov and
            dampening (the check is :func:`lightning_spa.callbacks._select.unsupported_reason`).
        every_n_steps: measure step ``k`` when ``(k + 1) % every_n_steps == 0``; ``None`` measures
            only after :meth:`measure_next_step`.
        ema_decay: per-step decay of the EMAs, in ``[0, 1)``.

    Attributes:
        listeners: callables that receive each :class:`Reading` (called inside ``optimizer.step()``).
        latest: the last :class:`Reading`, or None.
        ema: the :class:`DiagnosticsEMA`.
    """

    def __init__(self, optimizer: Optimizer, every_n_steps: int | None = 1, ema_decay: float = 0.99) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"`every_n_steps` must be a positive int or None, got {every_n_steps!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay!r}.")
        self.optimizer, self.every_n_steps = optimizer, every_n_steps
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharded = has_sharded_params(params)
        self.device = local_tensor(params[0]).device if params else torch.device("cpu")
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.groups: list[str] = []
        self.ema = DiagnosticsEMA(1, ema_decay, self.device, dtype)
        self._sync_groups()
        self.listeners: list[Callable[[Reading], None]] = []
        self.latest: Reading | None = None
        self._taken = 0  # optimizer.step() calls seen by the post-hook
        self._skipped = 0  # of which skipped by an AMP scaler inside the step (known on the host)
        self._unsure: list[Tensor] = []  # skip flags (or a count) of unmeasured fused-AMP steps, not read yet
        self._handles: list[RemovableHandle] = []
        self._requested = False
        self._pending: tuple[Tensor, list[float | None]] | None = None  # the first half of a measurement
        #: Whether the coming step is to be measured (kept up to date by the step post-hook).
        self.due = False
        self._update_due()

    # -- clock ----------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Steps the optimizer has taken (the index of the next one). Reading it may sync the device
        once, when an AMP scaler that unscales inside the step (fused SGD) left flags unread."""
        self._reconcile()
        return self._taken - self._skipped

    def _unsure_count(self) -> Tensor | None:
        """How many of the unread fused-AMP steps were skipped, as a device tensor (no sync); None if none."""
        if not self._unsure:
            return None
        dtype = self.ema.values.dtype
        return torch.stack([f.reshape(()).to(self.device, dtype) for f in self._unsure]).gt(0).sum().to(dtype)

    def _reconcile(self, count: float | None = None) -> None:
        """Folds the unread flags into the host clock (``count``: their sum, already read)."""
        if self._unsure:
            if count is None:
                count = float(self._unsure_count())  # type: ignore[arg-type]
            self._skipped += int(count)
            self._unsure.clear()
            self._update_due()

    # -- hooks ----------------------------------------------------------------------------------

    def attach(self, before_hook: bool = False) -> MomentumMeter:
        """Registers the clock (a step post-hook); ``before_hook=True`` also calls :meth:`before_step`
        from a step pre-hook (only for loops where the gradients exist before ``step()`` is called,
        i.e. no closure)."""
        self.detach()
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        if before_hook:  # a pre-hook must return None (anything else replaces step()'s arguments)
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_hook))
        return self

    def _before_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.before_step()

    def detach(self) -> None:
        """Removes every hook this meter registered on the optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending = None

    def measure_next_step(self) -> None:
        """Measures the next step the optimizer takes, whatever ``every_n_steps`` says."""
        self._requested = True
        self.due = True

    def _update_due(self) -> None:
        n = self.every_n_steps
        self.due = self._requested or (n is not None and (self._taken - self._skipped + 1) % n == 0)

    def before_step(self) -> bool:
        """Call after backward, before ``optimizer.step()``; takes the first half of the measurement
        if the coming step is :attr:`due` (returns whether it did). Cheap otherwise."""
        if self._pending is not None:
            self._pending = None  # the step measured last time never ran (AMP scaler, a skipping user)
        if not self.due:  # a plain attribute: drivers may test it before calling
            return False
        self._sync_groups()
        optimizer = self.optimizer
        self._pending = (measure_before_step(optimizer, self.device, self.ema.values.dtype), prev_scales(optimizer))
        hooks = getattr(optimizer, "_optimizer_step_post_hooks", None)
        if self._handles and hasattr(hooks, "move_to_end"):  # run first: read the hyper-parameters as used
            hooks.move_to_end(self._handles[0].id, last=False)  # type: ignore[union-attr]
        return True

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending is None:  # an unmeasured step, the common case: a few attribute operations
            found_inf = optimizer.__dict__.get("found_inf")  # set by GradScaler around a fused-AMP step
            if found_inf is not None:
                self._unsure.append(found_inf > 0)
                if len(self._unsure) > 64:  # fold into one count on the device (no sync)
                    self._unsure = [self._unsure_count()]  # type: ignore[list-item]
        else:
            status = self._finish()
            if status == "skipped":
                self._skipped += 1
            else:
                self._requested = False
        self._taken += 1
        n = self.every_n_steps  # _update_due, inlined
        self.due = self._requested or (n is not None and (self._taken - self._skipped + 1) % n == 0)

    # -- measurement ----------------------------------------------------------------------------

    def _sync_groups(self) -> None:
        names = [str(g.get("name", i)) for i, g in enumerate(self.optimizer.param_groups)]
        if len(names) != len(self.groups):  # groups added mid-run (e.g. BaseFinetuning): extend the EMAs
            self.groups = names
            self.ema.extend(len(names) + 1)

    def _fit_rows(self, samples: Tensor) -> Tensor:
        """Pads ``samples`` with empty group rows when the EMAs have more (a checkpoint saved after
        groups were added that this run has not added yet)."""
        extra = self.ema.values.shape[0] - samples.shape[0]
        return _insert_empty_rows(samples, extra) if extra > 0 else samples

    @torch.no_grad()
    def _finish(self) -> str:
        """The second half, in the step post-hook: hyper-parameters as used, the EMAs, one host sync."""
        assert self._pending is not None
        (before, prevs), self._pending = self._pending, None
        optimizer = self.optimizer
        hypers = [group_hyper(optimizer, g, prev) for g, prev in zip(optimizer.param_groups, prevs, strict=True)]
        if not all(has_spa_form(h) for h in hypers):
            self._emit(Reading(self.step, hypers, list(self.groups), [], "spike"))
            return "spike"
        # The step's index: the host clock less the fused-AMP skips not read yet, read with the rest.
        unsure = self._unsure_count()
        step: int | Tensor = self._taken - self._skipped if unsure is None else self._taken - self._skipped - unsure
        grad_scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        dtype = self.ema.values.dtype
        after = measure_after_step(optimizer, self.device, dtype)
        samples = step_samples(*complete_sums(before, after, self.sharded), hypers, grad_scale)
        accept = None if found_inf is None else found_inf.to(self.device).reshape(()) == 0
        ok = self.ema.update(self._fit_rows(samples), step, default_gap=self.every_n_steps or 1, accept=accept)
        zero = torch.zeros((), device=self.device, dtype=dtype)
        taken = zero + 1 if accept is None else accept.to(dtype)
        flags = torch.stack([ok.to(dtype), taken, zero if unsure is None else unsure])
        host = torch.cat([self.ema.corrected().reshape(-1), flags]).tolist()  # the one host-device sync
        table, (ok_value, taken_value, unsure_value) = host[:-3], host[-3:]
        self._reconcile(unsure_value)
        step = self._taken - self._skipped
        status = "ok" if ok_value else "nonfinite" if taken_value else "skipped"
        width = len(EMA_NAMES)
        rows = [table[i : i + width] for i in range(0, len(table), width)]
        rows = [*rows[: len(hypers)], rows[-1]]  # the groups this optimizer has now, then the total
        self._emit(Reading(step, hypers, list(self.groups), rows, status))
        return status

    def _emit(self, reading: Reading) -> None:
        self.latest = reading
        for listener in self.listeners:
            listener(reading)

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._taken, self._skipped, self._unsure, self._pending = int(state["step"]), 0, [], None
        self.ema.load_state_dict(state["ema"])
        self._update_due()
