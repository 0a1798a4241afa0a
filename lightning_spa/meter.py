r"""The measuring half of :class:`~lightning_spa.callbacks.MomentumDiagnostics`, usable without Lightning.

The state-machine layer of the diagnostics: :mod:`lightning_spa.diagnostics` holds the math, the
Lightning adapters (:class:`~lightning_spa.callbacks.MomentumDiagnostics`,
:class:`~lightning_spa.callbacks.MeasuredMomentumOff`) drive it. :class:`MomentumMeter` attaches to
one SPA or torch SGD optimizer and

- counts the steps it actually takes (its *clock*, :attr:`MomentumMeter.step`: ``optimizer.step()``
  calls seen by its step post-hook; a step skipped by an AMP grad scaler, or never called, does
  not count. A skip inside a fused-AMP step (``_step_supports_amp_scaling``) is a device flag, read
  at the next measurement or checkpoint rather than with a sync: until then the measurement
  schedule runs one step ahead per such skip, while every reading is labelled with its exact step);
- measures step ``k`` (:mod:`lightning_spa.diagnostics`) when ``(k + 1) % every_n_steps == 0``,
  the convention of Lightning's ``log_every_n_steps``, or the next step after
  :meth:`MomentumMeter.measure_next_step`. A *full* measurement (the cosine too) takes its first
  half after backward (:meth:`MomentumMeter.before_step`) and its second in the step post-hook; a
  *cheap* one (``step_sq``, ``grad_sq`` and the ratio, exactly; no cosine) happens entirely in the
  post-hook: two squared norms per parameter. ``cosine_every_n_steps`` says which steps get the
  full one. The post-hook reads the hyper-parameters the step really used, whoever wrote them and
  whenever, and keeps each SPA group's ``(eta, c)`` for the next step's Theorem-1 momentum;
- keeps bias-corrected EMAs (:class:`DiagnosticsEMA`, host floats) and hands every measurement to
  its listeners as a :class:`Reading` (host floats). A measurement synchronises with the device
  once: the sums and the step's flags travel in one transfer.

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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_spa.diagnostics import (
    FirstHalf,
    GroupHyper,
    cheap_samples,
    cheap_supported,
    cosine_of,
    full_samples,
    group_hyper,
    has_spa_form,
    measure_after_step,
    measure_before_step,
    measure_cheap,
    prev_scales,
    read_sums,
)
from lightning_spa.distributed import has_sharded_params, local_tensor
from lightning_spa.optim import SPA

__all__ = ["EMA_NAMES", "DiagnosticsEMA", "MomentumMeter", "Reading"]

#: Columns of :meth:`DiagnosticsEMA.corrected` and of :attr:`Reading.values` rows.
EMA_NAMES = ("step_sq", "grad_sq", "grad_sq_scaled", "cosine", "ratio")


def _ratio(num: float, den: float) -> float:
    """``num / den`` as float64 tensors divide it (``x / 0`` is ``+-inf``, ``0 / 0`` NaN)."""
    if den != 0.0 or math.isnan(num):
        return num / den if den != 0.0 else math.nan
    return math.nan if num == 0.0 else math.copysign(math.inf, num)


class DiagnosticsEMA:
    """Bias-corrected exponential moving averages of ``step_sq``, ``grad_sq``, ``grad_sq_scaled`` and
    ``cosine`` for ``n_rows`` series (param groups, then the whole optimizer), as host floats (float64).

    ``decay`` is per optimizer step: a sample taken ``n`` steps after the previous one of the same
    series weighs ``1 - decay**n`` (each column keeps its own last step, so a cosine sampled less
    often than the ratio weighs for its own gap). Dividing by the accumulated weight removes the
    bias towards the start value, so the first reported value is the first sample.

    Args:
        n_rows: number of series (param groups + the whole optimizer).
        decay: per-step decay in ``[0, 1)``.
        device: where :meth:`corrected` puts its tensor (default CPU).
        dtype: its dtype (default float64).
    """

    def __init__(
        self, n_rows: int, decay: float, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        self.decay = decay
        self.device, self.dtype = device, dtype
        self.values = [[0.0] * 4 for _ in range(n_rows)]
        self.weights = [[0.0] * 4 for _ in range(n_rows)]
        self.last: list[list[float | None]] = [[None] * 4 for _ in range(n_rows)]  # step of each last sample

    @property
    def n_rows(self) -> int:
        return len(self.values)

    @property
    def last_step(self) -> int | None:
        """The optimizer step of the last sample folded in (None: none yet)."""
        steps = [s for row in self.last for s in row if s is not None]
        return int(max(steps)) if steps else None

    def extend(self, n_rows: int) -> None:
        """Grows to ``n_rows`` series: new param groups get empty rows, inserted before the last row."""
        extra = n_rows - self.n_rows
        if extra > 0:
            at = max(self.n_rows - 1, 0)
            self.values[at:at] = [[0.0] * 4 for _ in range(extra)]
            self.weights[at:at] = [[0.0] * 4 for _ in range(extra)]
            self.last[at:at] = [[None] * 4 for _ in range(extra)]

    def update(
        self,
        samples: Tensor | Sequence[Sequence[float]],
        step: int | float | Tensor,
        default_gap: int = 1,
        accept: bool | Tensor | None = None,
    ) -> bool:
        """Folds one step's sample rows (:data:`lightning_spa.diagnostics.SAMPLE_FIELDS`) in; returns ``ok``.

        ``ok`` is ``accept`` (default true) and all samples finite. A rejected step leaves the
        state unchanged (its weight is not spent either: the next accepted sample weighs for the
        steps since the last accepted one), and so do rows whose cosine is undefined for the
        cosine column.
        """
        rows = samples.tolist() if isinstance(samples, Tensor) else samples
        if accept is not None and not bool(accept):
            return False
        new: list[tuple[float, float, float, float | None]] = []
        isfinite = math.isfinite
        for row in rows:
            a, b, c = row[0], row[1], row[2]
            cos = cosine_of(row) if row[5] else None  # m_sq = 0 (a cheap sample, a first step): no cosine
            if not (isfinite(a) and isfinite(b) and isfinite(c)) or (cos is not None and not isfinite(cos)):
                return False
            new.append((a, b, c, cos))
        step, decay = float(step), self.decay
        weight_of: dict[float, float] = {1.0: 1.0 - decay}  # 1 - decay**gap, once per gap
        for values, weights, last, sample in zip(self.values, self.weights, self.last, new, strict=True):
            for j, value in enumerate(sample):
                if value is None:
                    continue
                prev = last[j]
                gap = max(float(default_gap) if prev is None else step - prev, 1.0)
                w = weight_of.get(gap)
                if w is None:
                    w = weight_of[gap] = 1.0 - decay**gap
                values[j] = values[j] * (1.0 - w) + w * value
                weights[j] = weights[j] * (1.0 - w) + w
                last[j] = step
        return True

    def rows(self) -> list[list[float]]:
        """``n_rows`` lists of the bias-corrected :data:`EMA_NAMES` (NaN where nothing was folded in)."""
        out = []
        for values, weights in zip(self.values, self.weights, strict=True):
            avg = [v / w if w > 0 else math.nan for v, w in zip(values, weights, strict=True)]
            out.append([*avg, _ratio(avg[0], avg[2])])
        return out

    def corrected(self) -> Tensor:
        """``(n_rows, 5)``: :meth:`rows` as a tensor."""
        table = torch.tensor(self.rows(), dtype=torch.float64)
        return table.to(self.device or table.device, self.dtype or table.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": [list(r) for r in self.values],
            "weights": [list(r) for r in self.weights],
            "last_step": self.last_step,
            "last": [list(r) for r in self.last],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a saved state; one with fewer rows (param groups added since) is padded, not refused.
        A state without per-column steps (before they existed) gives every column ``last_step``."""
        n_rows = max(len(state["values"]), self.n_rows)
        self.values = [[float(v) for v in r] for r in state["values"]]
        self.weights = [[float(v) for v in r] for r in state["weights"]]
        if "last" in state:
            self.last = [[None if v is None else float(v) for v in r] for r in state["last"]]
        else:
            last = state["last_step"]
            self.last = [[None if last is None else float(last)] * 4 for _ in self.values]
        self.extend(n_rows)


class Reading(NamedTuple):
    """One measured optimizer step, as host numbers (immutable; a named tuple: built at every measured step).

    Attributes:
        step: the optimizer's clock at the step (steps it took before this one).
        hypers: each param group's hyper-parameters of the step.
        groups: each param group's name (its ``"name"`` key, else its index).
        values: one row per group then one for the whole optimizer (only the latter from a meter with
            ``per_group=False``), columns :data:`EMA_NAMES` (the EMAs after this step; NaN where
            undefined). Empty when nothing was measured.
        status: ``"ok"``; ``"nonfinite"`` (a gradient was inf/NaN: not folded in); ``"skipped"``
            (an AMP scaler skipped the step: not counted, measured again when taken); ``"spike"``
            (torch SGD with ``momentum >= 1``: no constant-schedule SPA form, not measured).
        g_sq: the step's own ``||g_k||^2`` over every group (the sample, not smoothed, no ``eta``:
            the gradient the step consumed, weight decay included); NaN when nothing was measured.
    """

    step: int
    hypers: list[GroupHyper]
    groups: list[str]
    values: list[list[float]]
    status: str
    g_sq: float = math.nan

    @property
    def ratio(self) -> float:
        """The whole optimizer's ``ratio`` EMA (NaN if undefined)."""
        return self.values[-1][4] if self.values else math.nan

    @property
    def cosine(self) -> float:
        """The whole optimizer's ``cosine`` EMA (NaN if undefined, or never measured)."""
        return self.values[-1][3] if self.values else math.nan


def _check_every(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")


class MomentumMeter:
    """Counts an optimizer's steps, measures every ``every_n_steps``-th one and keeps the EMAs.

    The driver calls :meth:`before_step` after backward and before ``optimizer.step()`` (the
    callback does it in ``on_before_optimizer_step``; ``attach(before_hook=True)`` does it from a
    step pre-hook, for loops without a closure). On a due step that gets the full measurement it
    takes the first half there; the step post-hook finishes every measurement with the
    hyper-parameters the step used.

    Args:
        optimizer: :class:`~lightning_spa.SPA`, or :class:`torch.optim.SGD` without Nesterov and
            dampening (the check is :func:`lightning_spa.callbacks._select.unsupported_reason`).
        every_n_steps: measure step ``k`` when ``(k + 1) % every_n_steps == 0``; ``None`` measures
            only after :meth:`measure_next_step`.
        ema_decay: per-step decay of the EMAs, in ``[0, 1)``.
        cosine_every_n_steps: a measured step ``k`` gets the full measurement (the cosine too) when
            ``(k + 1) % cosine_every_n_steps == 0``, the cheap one otherwise (same ``step_sq``,
            ``grad_sq`` and ratio, at a fraction of the cost; :mod:`lightning_spa.diagnostics`).
            ``1`` (default): always full; ``None``: never (no cosine). Steps the cheap one cannot
            measure (SPA at ``c = 1``, torch SGD at momentum 0, sparse gradients, fused AMP
            unscaling) always get the full one.
        per_group: keep an EMA per param group (their rows in :attr:`Reading.values`); False: only
            the whole optimizer's row (what a rule on the total ratio reads, at half the host work).

    Attributes:
        listeners: callables that receive each :class:`Reading` (called inside ``optimizer.step()``).
        latest: the last :class:`Reading`, or None.
        ema: the :class:`DiagnosticsEMA`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        every_n_steps: int | None = 1,
        ema_decay: float = 0.99,
        cosine_every_n_steps: int | None = 1,
        per_group: bool = True,
    ) -> None:
        _check_every(every_n_steps, "every_n_steps")
        _check_every(cosine_every_n_steps, "cosine_every_n_steps")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay!r}.")
        self.optimizer, self.every_n_steps = optimizer, every_n_steps
        self.cosine_every_n_steps, self.per_group = cosine_every_n_steps, per_group
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharded = has_sharded_params(params)
        self.device = local_tensor(params[0]).device if params else torch.device("cpu")
        #: dtype of the device-side sums (float64 unless the device lacks it); the EMAs are host float64.
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._spa = isinstance(optimizer, SPA)
        self.groups: list[str] = []
        self.ema = DiagnosticsEMA(1, ema_decay)
        self._sync_groups()
        self.listeners: list[Callable[[Reading], None]] = []
        self.latest: Reading | None = None
        self._taken = 0  # optimizer.step() calls seen by the post-hook
        self._skipped = 0  # of which skipped by an AMP scaler inside the step (known on the host)
        self._unsure: list[Tensor] = []  # skip flags (or a count) of unmeasured fused-AMP steps, not read yet
        self._handles: list[RemovableHandle] = []
        self._requested = False
        # A measurement under way: (first half of a full one, or None for a cheap one; fallback scales)
        self._pending: tuple[FirstHalf | None, list[float | None] | None] | None = None
        # SPA: each group's (eta, c) of the previous step (the Theorem-1 momentum of the next one)
        self._prev: list[tuple[Any, Any]] | None = None
        self._hyper_cache: list[tuple[Any, GroupHyper] | None] = []  # per group: (what it was read from, value)
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
        dtype = self.dtype
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

    @classmethod
    def ratio_only(
        cls, optimizer: Optimizer, ema_decay: float, state: dict[str, Any] | None, listener: Callable[[Reading], None]
    ) -> MomentumMeter:
        """An attached meter of the ratio alone for the callbacks that decide on it (the cheap measurement, no
        cosine, the whole optimizer's row only, on the steps its driver asks for with :meth:`measure_next_step`),
        from ``state`` if given."""
        meter = cls(optimizer, every_n_steps=None, ema_decay=ema_decay, cosine_every_n_steps=None, per_group=False)
        if state is not None:
            meter.load_state_dict(state)
        meter.listeners.append(listener)
        return meter.attach()

    def attach(self, before_hook: bool = False) -> MomentumMeter:
        """Registers the clock (a step post-hook, moved ahead of the optimizer's other post-hooks so that
        it reads the hyper-parameters as the step used them); ``before_hook=True`` also calls
        :meth:`before_step` from a step pre-hook (only for loops where the gradients exist before
        ``step()`` is called, i.e. no closure)."""
        self.detach()
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        self._move_first()
        if before_hook:  # a pre-hook must return None (anything else replaces step()'s arguments)
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_hook))
        return self

    def _move_first(self) -> None:
        hooks: Any = getattr(self.optimizer, "_optimizer_step_post_hooks", None)
        if self._handles and hasattr(hooks, "move_to_end") and next(iter(hooks)) != self._handles[0].id:
            hooks.move_to_end(self._handles[0].id, last=False)

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
        """Call after backward, before ``optimizer.step()``; prepares the measurement if the coming step
        is :attr:`due` (returns whether it did): the first half of a full one, nothing for a cheap one.
        Cheap otherwise."""
        if self._pending is not None:
            self._pending = None  # the step measured last time never ran (AMP scaler, a skipping user)
        if not self.due:  # a plain attribute: drivers may test it before calling
            return False
        self._sync_groups()
        optimizer = self.optimizer
        n = self.cosine_every_n_steps
        full = (n is not None and (self._taken - self._skipped + 1) % n == 0) or not cheap_supported(optimizer)
        prev = self._prev
        fallback = prev_scales(optimizer) if self._spa and (prev is None or len(prev) < len(self.groups)) else None
        self._pending = (measure_before_step(optimizer, self.device, self.dtype) if full else None, fallback)
        self._move_first()  # run first: read the hyper-parameters as used
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
            elif status == "unmeasured":
                self._requested = True  # the step changed what it needs: measure the next one instead
            else:
                self._requested = False
        self._taken += 1
        if self._spa:  # the (eta, c) this step used, for the next step's Theorem-1 momentum
            prev = []
            for g in optimizer.param_groups:
                eta, c = g["lr"], g["c"]
                # a tensor may be updated in place by a scheduler: keep a copy (SPA's tensor mode only)
                prev.append((eta.detach().clone() if isinstance(eta, Tensor) else eta,
                             c.detach().clone() if isinstance(c, Tensor) else c))  # fmt: skip
            self._prev = prev
        n = self.every_n_steps  # _update_due, inlined
        self.due = self._requested or (n is not None and (self._taken - self._skipped + 1) % n == 0)

    # -- measurement ----------------------------------------------------------------------------

    def _sync_groups(self) -> None:
        if len(self.optimizer.param_groups) == len(self.groups):
            return
        names = [str(g.get("name", i)) for i, g in enumerate(self.optimizer.param_groups)]
        if len(names) != len(self.groups):  # groups added mid-run (e.g. BaseFinetuning): extend the EMAs
            self.groups = names
            if self.per_group:
                self.ema.extend(len(names) + 1)

    def _fit_rows(self, samples: list[list[float]]) -> list[list[float]]:
        """Pads ``samples`` with empty group rows when the EMAs have more (a checkpoint saved after
        groups were added that this run has not added yet)."""
        extra = self.ema.n_rows - len(samples)
        if extra <= 0:
            return samples
        return [*samples[:-1], *([[0.0] * len(samples[0])] * extra), samples[-1]]

    def _hypers(self, fallback: list[float | None] | None) -> list[GroupHyper]:
        optimizer, prev, cache = self.optimizer, self._prev, self._hyper_cache
        groups = optimizer.param_groups
        if len(cache) != len(groups):
            cache[:] = [None] * len(groups)
        out = []
        for i, group in enumerate(groups):
            before = None if prev is None or i >= len(prev) else (float(prev[i][0]), float(prev[i][1]))
            scale = fallback[i] if before is None and fallback is not None and i < len(fallback) else None
            # what group_hyper reads (a schedule held constant reads the same values at every measured step)
            lr, c = group["lr"], group.get("c")
            if type(lr) is not float or (c is not None and type(c) is not float):  # a tensor may change in place
                out.append(group_hyper(optimizer, group, before, scale))
                continue
            key = (lr, c, group.get("momentum"), group.get("weight_decay"), group.get("maximize"), before, scale)
            hit = cache[i]
            if hit is not None and hit[0] == key:
                out.append(hit[1])
                continue
            hyper = group_hyper(optimizer, group, before, scale)
            cache[i] = (key, hyper)
            out.append(hyper)
        return out

    def _finish(self) -> str:
        """The measurement in the step post-hook: hyper-parameters as used, the sums, one host sync."""
        assert self._pending is not None
        (first, fallback), self._pending = self._pending, None
        optimizer = self.optimizer
        hypers = self._hypers(fallback)
        if not all(map(has_spa_form, hypers)):
            self._emit(Reading(self.step, hypers, list(self.groups), [], "spike"))
            return "spike"
        # The cheap measurement needs buffers that describe the step (cheap_supported's check on the values the
        # step used, which may have changed since: e.g. c written to 1 inside the step)
        if first is None and any((h.c >= 1.0 if self._spa else h.momentum == 0.0) for h in hypers):
            return "unmeasured"
        device, dtype = self.device, self.dtype
        if first is None:  # measure_cheap reads detached tensors only: no grad-mode switch needed
            parts = [measure_cheap(optimizer, device, dtype, self.sharded)]
        else:
            parts = [first.sums, measure_after_step(optimizer, device, dtype)]
        # The step's flags travel with the sums: the one host-device sync of a measurement.
        attributes = vars(optimizer)  # set by GradScaler around a step that unscales inside it (fused SGD)
        grad_scale, found_inf = attributes.get("grad_scale"), attributes.get("found_inf")
        unsure = self._unsure_count() if self._unsure else None  # hot path: no call when there is nothing
        flags = [t for t in (found_inf, unsure, grad_scale) if t is not None]
        tables, tail = read_sums(parts, self.sharded, [*flags, *(first.tensor_scales if first else ())])
        inf_value = tail.pop(0) if found_inf is not None else 0.0
        unsure_value = tail.pop(0) if unsure is not None else 0.0
        scale_value = tail.pop(0) if grad_scale is not None else None
        if first is None:
            samples = cheap_samples(tables[0], hypers)
        else:
            samples = full_samples(first, tables[0], tables[1], hypers, scale_value, tail)
        samples = self._fit_rows(samples) if self.per_group else samples[-1:]
        if self._unsure:
            self._reconcile(unsure_value)
        step = self._taken - self._skipped  # the step's index (this step is not counted yet)
        taken = inf_value == 0.0
        ok = self.ema.update(samples, step, default_gap=self.every_n_steps or 1, accept=taken)
        status = "ok" if ok else "nonfinite" if taken else "skipped"
        rows = self.ema.rows()
        if self.per_group:
            rows = [*rows[: len(hypers)], rows[-1]]  # the groups this optimizer has now, then the total
        self._emit(Reading(step, hypers, list(self.groups), rows, status, samples[-1][4]))  # g_sq: the total row
        return status

    def _emit(self, reading: Reading) -> None:
        self.latest = reading
        for listener in self.listeners:
            listener(reading)

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        prev = None if self._prev is None else [[float(e), float(c)] for e, c in self._prev]
        return {"step": self.step, "ema": self.ema.state_dict(), "prev": prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._taken, self._skipped, self._unsure, self._pending = int(state["step"]), 0, [], None
        ema = state["ema"]
        if not self.per_group and len(ema["values"]) > 1:  # saved with group rows: the whole optimizer's is the last
            ema = {**ema, **{key: ema[key][-1:] for key in ("values", "weights", "last") if key in ema}}
        self.ema.load_state_dict(ema)
        prev = state.get("prev")  # absent in checkpoints from before it was saved: the buffer scale stands in
        self._prev = None if prev is None else [(float(e), float(c)) for e, c in prev]
        self._update_due()
