"""MomentumDiagnostics: the paper's alignment ratio (Insight 1, ``THEORY.md`` section 4), live.

The Lightning-adapter layer of the diagnostics. The math lives in :mod:`lightning_spa.diagnostics`
(the measurement), :mod:`lightning_spa.meter` (the per-optimizer step clock, the measured-step
hooks and the bias-corrected EMAs) and :mod:`lightning_spa.distributed` (sums over DTensor shards);
this callback picks the optimizers, attaches one :class:`~lightning_spa.meter.MomentumMeter` to
each and logs what they read on the trainer's step axis (:func:`log_step`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from lightning_spa import _lightning as pl
from lightning_spa._lightning import Callback, is_tensorboard_logger, rank_zero_warn, unwrap_optimizer
from lightning_spa.callbacks._select import (
    OptimizerSelection,
    check_selection,
    select_optimizers,
    warn_lr_monitor_momentum,
)
from lightning_spa.diagnostics import GroupHyper
from lightning_spa.meter import EMA_NAMES, MomentumMeter, Reading

__all__ = ["MomentumDiagnostics", "log_step"]

_HYPER_NAMES = ("eta", "c", "lr", "momentum")
_OWNER = "MomentumDiagnostics"
_WARNINGS = {
    "nonfinite": "non-finite gradients at optimizer {where}; that step is not folded into the EMAs.",
    "skipped": "the AMP grad scaler skipped optimizer {where} (inf/NaN gradients); it is not counted and is "
    "measured when it is taken.",
    "spike": "torch SGD momentum >= 1 at optimizer {where} (the spike of an instant hyper-parameter change) has "
    "no constant-schedule SPA form (c = 1 - momentum <= 0); that step is not measured.",
}


def log_step(trainer: pl.Trainer | None, default: int) -> int:
    """The step Lightning's ``self.log`` gives the loggers now (``train_loss``'s axis): the fit loop's count
    of batches that stepped (``trainer.global_step`` counts every optimizer's steps under manual
    optimization, so two optimizers would double it). ``default`` outside a fit loop."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)  # what LoggerConnector.log_metrics uses; no public name
    return int(step) if isinstance(step, int) else default


class MomentumDiagnostics(Callback):
    r"""Logs what momentum is doing (accelerating, idle, damping): the alignment ratio of Defazio (2020), Figure 2.

    For each measured :class:`~lightning_spa.SPA` or :class:`torch.optim.SGD` (without Nesterov and
    dampening) it logs at its optimizer step ``k`` (``THEORY.md`` section 4)::

        spa/step_sq         EMA of ||x_{k+1} - x_k||^2
        spa/grad_sq         EMA of eta_k^2 ||g_k||^2     (g_k as the optimizer uses it: weight decay,
                                                           maximize and gradient clipping included)
        spa/grad_sq_scaled  EMA of (c_k / (2 - c_k)) eta_k^2 ||g_k||^2, the noise-level step_sq
        spa/ratio           spa/step_sq / spa/grad_sq_scaled: > 1 aligned (momentum accelerates), ~1 idle
                            (noise), < 1 momentum damps (removing it at this eta is unsafe)
        spa/cosine          EMA of cos(g_k, m_k) (m_k: the momentum buffer before the step)
        spa/eta, spa/c      the SPA hyper-parameters of the step (group 0)
        spa/lr, spa/momentum  their SGD+M equivalents (Theorem 1: lr = c_k eta_k,
                              momentum = (1 - c_{k-1}) eta_{k-1} / eta_k)
        spa/one             the constant 1, the reference line of the ratio chart

    with ``/<group name or index>`` variants when ``per_group=True``, and an ``/opt<i>`` part
    (``i``: the index in ``trainer.optimizers``) when several optimizers are measured. Values go to
    ``trainer.loggers`` on the trainer's step axis, the step ``self.log("train_loss", ...)`` gets
    (the batch count; with one optimizer and no skipped step it equals ``k``; with two optimizers
    under manual optimization both series line up with ``train_loss``), and to
    ``trainer.callback_metrics`` (as CPU tensors), so ``EarlyStopping(monitor="spa/ratio")`` and
    ``ModelCheckpoint`` can use them. For SGD+M, ``eta = lr / (1 - momentum)`` and ``c = 1 - momentum``
    (the constant-schedule mapping at the current values). The whole-model ratio divides the summed
    ``step_sq`` by the summed per-group ``grad_sq_scaled``.

    When: each optimizer has its own clock ``k``, the steps it actually took (a step skipped by
    an AMP grad scaler does not count; a GAN's two optimizers each count their own). Step ``k``
    is measured when ``(k + 1) % every_n_steps == 0``, Lightning's ``log_every_n_steps``
    convention, so by default (one optimizer, no skipped step) the measured steps are the
    trainer's logging steps. A due step's gradients, parameters and momentum buffers are read in
    ``on_before_optimizer_step``; the meter's step post-hook (moved ahead of the other post-hooks)
    finishes the measurement with the hyper-parameters the step used, whatever the callback order
    and whichever callback wrote them.

    Cost: on the other steps a dictionary look-up, an attribute test and one tiny step post-hook
    (the clock): under 10 microseconds of Python (``benchmarks/diagnostics_overhead.py``). A
    measured step takes a few dot products per parameter tensor (no parameter-sized allocation)
    and synchronises once; the EMAs are host floats.
    ``ema_decay`` is per optimizer step, so a sample taken ``n`` steps after the previous one
    weighs ``1 - ema_decay**n``; the EMAs are bias-corrected (the first value is the first
    sample, whose ratio is ``c (2 - c)`` since the first step has no momentum yet).

    Also handled: param groups added mid-run (``BaseFinetuning``) extend the EMAs; complex
    parameters (``Re<a, b>``); sparse gradients (exact, ``O(nnz)``); 16-mixed AMP, including
    optimizers that unscale inside their step (fused SGD: the loss scale is divided out, and a step
    the scaler skips is not measured); a step with non-finite gradients is not folded in (one
    warning). With gradient accumulation there is one measurement per optimizer step. The clocks
    and EMAs are saved in checkpoints, and the same instance can be reused for a resumed fit.

    Distributed: under DDP the numbers are computed locally (gradients are already averaged); with
    DTensor parameters (FSDP2 ``fully_shard`` through ``ModelParallelStrategy``) local sums are
    combined by one small ``all_reduce`` per measured step, so every strategy logs the
    single-process values. FSDP1 (``FSDPStrategy``) flat shards are not DTensors: a warning says
    the values would be per-rank.

    Args:
        every_n_steps: measure every this many optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps)``.
        ema_decay: per-step decay of the EMAs, in ``[0, 1)``; ``0`` logs the raw samples.
        per_group: also log every parameter group.
        prog_bar: show ``spa/ratio`` and ``spa/cosine`` in the progress bar.
        optimizers: which of ``trainer.optimizers`` to measure: indices and names (an optimizer
            class name, or a param group ``"name"``). ``None``: every supported one; the others
            (e.g. a GAN's Adam discriminator) are skipped with one warning. An explicitly selected
            unsupported optimizer is an error at fit start.
        cosine_every_n_steps: measure the cosine (a few dot products per parameter before the
            step) on measured steps ``k`` with ``(k + 1) % cosine_every_n_steps == 0``; the other
            measured steps get the cheap measurement (two squared norms per parameter after the
            step: the same ``step_sq``, ``grad_sq`` and ratio; :mod:`lightning_spa.diagnostics`).
            ``1`` (default): every measured step; ``None``: never (``spa/cosine`` is not logged).
            Worth it with ``every_n_steps=1`` on a small model.

    Raises:
        ValueError: ``every_n_steps`` or ``cosine_every_n_steps`` not a positive integer (or None),
            ``ema_decay`` outside ``[0, 1)``, or
            ``optimizers`` not None or a list of indices and names. At fit start, before any step:
            an index out of range or a name that matches nothing, an explicitly selected torch SGD
            with Nesterov or dampening, or no supported optimizer at all.
        TypeError: ``per_group`` or ``prog_bar`` not a bool; at fit start, an explicitly selected
            optimizer that is neither SPA nor torch SGD.

    Example::

        from lightning_spa.callbacks import MomentumDiagnostics

        trainer = pl.Trainer(callbacks=[MomentumDiagnostics()], logger=TensorBoardLogger("runs"))
        trainer.fit(model)   # TensorBoard: CUSTOM SCALARS tab, "spa: alignment ratio"

        # A GAN: measure the SPA generator only; stop when momentum stops helping
        callbacks = [MomentumDiagnostics(optimizers=["generator"]),
                     EarlyStopping(monitor="spa/ratio", mode="max", patience=3)]

    Measuring from another callback: :attr:`meters` maps each measured optimizer's index to its
    :class:`~lightning_spa.meter.MomentumMeter` (clock, EMAs, ``latest`` reading, ``listeners``).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        ema_decay: float = 0.99,
        per_group: bool = False,
        prog_bar: bool = False,
        optimizers: OptimizerSelection = None,
        cosine_every_n_steps: int | None = 1,
    ) -> None:
        if cosine_every_n_steps is not None and (
            isinstance(cosine_every_n_steps, bool) or not isinstance(cosine_every_n_steps, int)
            or cosine_every_n_steps < 1
        ):  # fmt: skip
            raise ValueError(
                f"`cosine_every_n_steps` must be a positive int (1: every measured step) or None (never), "
                f"got {cosine_every_n_steps!r}."
            )
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(
                f"`every_n_steps` must be a positive int or None (follow the trainer's log_every_n_steps), "
                f"got {every_n_steps!r}."
            )
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be a float in [0, 1) (e.g. 0.99), got {ema_decay!r}.")
        for name, value in (("per_group", per_group), ("prog_bar", prog_bar)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}.")
        self.every_n_steps, self.ema_decay = every_n_steps, float(ema_decay)
        self.cosine_every_n_steps = cosine_every_n_steps
        self.per_group, self.prog_bar = per_group, prog_bar
        self.optimizers = check_selection(optimizers, _OWNER)
        key: dict[str, Any] = dict(every_n_steps=every_n_steps, ema_decay=self.ema_decay)
        if self.optimizers is not None:
            key["optimizers"] = self.optimizers
        if cosine_every_n_steps != 1:  # the default keeps the state key of older checkpoints
            key["cosine_every_n_steps"] = cosine_every_n_steps
        # Lightning reads state_key for every hook call (profiler names): computed once.
        self._state_key = self._generate_state_key(**key)
        #: The meter of each measured optimizer, by index in ``trainer.optimizers`` (set at fit start).
        self.meters: dict[int, MomentumMeter] = {}
        self._by_id: dict[int, MomentumMeter | None] = {}  # id of a (wrapped) optimizer -> its meter
        self._loaded: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._bar_names: set[str] = set()
        self._warned: set[str] = set()
        self._loggers: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._state_key

    # -- set-up ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Trainer(log_every_n_steps) is stored by Lightning's logger connector (0 under barebones=True).
        n = self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 0) or 50)
        self._loggers = list(trainer.loggers)
        self._trainer = trainer
        self._detach()
        selected = select_optimizers(trainer, self.optimizers, _OWNER, purpose="measure")
        warn_lr_monitor_momentum(trainer, selected, _OWNER)
        multi = len(selected) > 1
        self.meters = {}
        for s in selected:
            meter = MomentumMeter(
                s.optimizer, every_n_steps=n, ema_decay=self.ema_decay, cosine_every_n_steps=self.cosine_every_n_steps
            )
            suffix = f"/opt{s.index}" if multi else ""
            meter.listeners.append(functools.partial(self._on_reading, suffix=suffix))
            self.meters[s.index] = meter
        if self._loaded is not None:
            self._apply_loaded()
        for meter in self.meters.values():
            meter.attach()
        self._by_id = {id(meter.optimizer): meter for meter in self.meters.values()}
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            rank_zero_warn(
                "MomentumDiagnostics under FSDPStrategy (FSDP1): flat-parameter shards are not DTensors, so the "
                "logged values are those of each rank's shard. Use ModelParallelStrategy with fully_shard (FSDP2) "
                "for exact global values."
            )
        if trainer.is_global_zero:
            self._register_tensorboard_layout()

    def _register_tensorboard_layout(self) -> None:
        layout = {
            "spa: momentum diagnostics": {
                "spa: step_sq vs its noise level (c/(2-c)) eta^2 |g|^2": [
                    "Multiline",
                    [r"^spa/step_sq(/.*)?$", r"^spa/grad_sq_scaled(/.*)?$"],
                ],
                "spa: alignment ratio (1 = noise level)": ["Multiline", [r"^spa/ratio(/.*)?$", r"^spa/one$"]],
                "spa: cosine(g_k, m_k)": ["Multiline", [r"^spa/cosine(/.*)?$"]],
                "spa: eta and c": ["Multiline", [r"^spa/eta(/.*)?$", r"^spa/c(/.*)?$"]],
                "spa: SGD+M lr and momentum": ["Multiline", [r"^spa/lr(/.*)?$", r"^spa/momentum(/.*)?$"]],
            }
        }
        for logger in self._loggers:
            if is_tensorboard_logger(logger):
                logger.experiment.add_custom_scalars(layout)

    def _detach(self) -> None:
        for meter in self.meters.values():
            meter.detach()
        self._by_id = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        self._trainer = None

    # -- measurement and logging ----------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Runs on every optimizer step: a look-up and an attribute test (no call on most steps).
        key = id(optimizer)
        if key not in self._by_id:  # first sight (an unmeasured optimizer, or a LightningOptimizer)
            self._by_id[key] = self._by_id.get(id(unwrap_optimizer(optimizer)))
        meter = self._by_id[key]
        if meter is not None and meter.due:
            meter.before_step()

    # -- logging --------------------------------------------------------------------------------

    def _on_reading(self, reading: Reading, suffix: str) -> None:
        where = f"step {reading.step}{' of optimizer ' + suffix[4:] if suffix else ''}"
        if reading.status != "ok" and reading.status not in self._warned:
            self._warned.add(reading.status)
            rank_zero_warn(f"MomentumDiagnostics: {_WARNINGS[reading.status].format(where=where)} "
                           "Further occurrences are not reported.")  # fmt: skip
        if not reading.values or reading.status == "skipped":
            return
        metrics = self._metrics(reading, suffix)
        step = log_step(self._trainer, reading.step)
        for logger in self._loggers:
            logger.log_metrics({**metrics, "spa/one": 1.0}, step=step)
        if self._trainer is not None:
            # For EarlyStopping / ModelCheckpoint(monitor="spa/ratio") and the progress bar. Written into
            # the trainer's dicts (reset only at fit start): LightningModule.log from a callback costs
            # ~1 ms per value, most of a small model's step.
            self._trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            if self.prog_bar:
                bar = self._trainer.progress_bar_metrics
                bar.update({k: v for k, v in metrics.items() if k in self._bar_names})

    def _metrics(self, reading: Reading, suffix: str) -> dict[str, float]:
        metrics: dict[str, float] = {}

        def put(row: list[float], hyper: GroupHyper, tail: str) -> None:
            values = (*row, hyper.eta, hyper.c, hyper.lr, hyper.momentum)
            for name, value in zip((*EMA_NAMES, *_HYPER_NAMES), values, strict=True):
                if math.isfinite(value):  # an undefined value is left out
                    metrics[f"spa/{name}{tail}"] = value

        put(reading.values[-1], reading.hypers[0], suffix)
        if self.per_group:
            for name, row, hyper in zip(reading.groups, reading.values[:-1], reading.hypers, strict=True):
                put(row, hyper, f"{suffix}/{name}")
        self._bar_names.update((f"spa/ratio{suffix}", f"spa/cosine{suffix}"))
        return metrics

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if not self.meters and self._loaded is not None:
            return self._loaded
        return {"version": 2, "meters": {str(i): meter.state_dict() for i, meter in self.meters.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start builds the meters: applied there, so a
        # reused instance takes the checkpoint's state instead of the previous fit's.
        self._loaded = state_dict

    def _apply_loaded(self) -> None:
        assert self._loaded is not None
        loaded, self._loaded = self._loaded, None
        if loaded.get("version") != 2:
            rank_zero_warn("MomentumDiagnostics: the checkpoint's diagnostics state is from an older version; the "
                           "step clocks and EMAs restart.")  # fmt: skip
            return
        saved = dict(loaded.get("meters", {}))
        for index, meter in self.meters.items():
            if str(index) in saved:
                meter.load_state_dict(saved.pop(str(index)))
        if saved:
            rank_zero_warn(
                f"MomentumDiagnostics: the checkpoint holds diagnostics state for optimizers {sorted(saved)} that "
                "this run does not measure; that state is dropped."
            )
