"""MomentumDiagnostics: the paper's alignment ratio (Insight 1, ``THEORY.md`` section 4), live.

The math lives in :mod:`lightning_spa.diagnostics` (measurement, bias-corrected EMAs) and
:mod:`lightning_spa.distributed` (sums over DTensor shards); this callback decides when to
measure, wires the two halves of a measurement around the optimizer step and logs the result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_spa import _lightning as pl
from lightning_spa._lightning import Callback, is_tensorboard_logger, rank_zero_warn, unwrap_optimizer
from lightning_spa.diagnostics import (
    DiagnosticsEMA,
    GroupHyper,
    complete_sums,
    group_hyper,
    has_spa_form,
    measure_after_step,
    measure_before_step,
    step_samples,
    unsupported_reason,
)
from lightning_spa.distributed import has_sharded_params, local_tensor

__all__ = ["MomentumDiagnostics"]

_EMA_NAMES = ("step_sq", "grad_sq", "grad_sq_scaled", "cosine", "ratio")
_HYPER_NAMES = ("eta", "c", "lr", "momentum")


class _Tracker:
    """Diagnostics state of one supported optimizer."""

    def __init__(self, optimizer: Optimizer, suffix: str, decay: float) -> None:
        self.optimizer, self.suffix = optimizer, suffix
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharded = has_sharded_params(params)
        self.device = local_tensor(params[0]).device if params else torch.device("cpu")
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.groups = [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]
        self.ema = DiagnosticsEMA(len(self.groups) + 1, decay, self.device, dtype)
        self.pending: tuple[int, list[GroupHyper], Tensor] | None = None
        self.handle: RemovableHandle | None = None


class MomentumDiagnostics(Callback):
    r"""Logs whether momentum is helping: the alignment ratio of Defazio (2020), Figure 2.

    At every ``every_n_steps``-th optimizer step ``k`` it measures, for :class:`~lightning_spa.SPA`
    and :class:`torch.optim.SGD` with momentum (``THEORY.md`` section 4)::

        spa/step_sq         EMA of ||x_{k+1} - x_k||^2 = alpha_k^2 ||m_{k+1}||^2
        spa/grad_sq         EMA of eta_k^2 ||g_k||^2     (g_k as the optimizer uses it: weight decay,
                                                           maximize and gradient clipping included)
        spa/grad_sq_scaled  EMA of (c_k / (2 - c_k)) eta_k^2 ||g_k||^2, the noise-level step_sq
        spa/ratio           spa/step_sq / spa/grad_sq_scaled: ~1 noise, > 1 momentum helps, < 1 oscillation
        spa/cosine          EMA of cos(g_k, m_k) (m_k: the momentum buffer before the step)
        spa/eta, spa/c      the SPA hyper-parameters of the step (group 0)
        spa/lr, spa/momentum  their SGD+M equivalents (Theorem 1)
        spa/one             the constant 1, the reference line of the ratio chart

    with ``/<group name or index>`` variants when ``per_group=True`` (and an ``/opt<i>`` part when
    several optimizers are measured). Values are logged through ``trainer.loggers`` at step ``k``.
    For SGD+M, ``eta = lr / (1 - momentum)`` and ``c = 1 - momentum`` (the constant-schedule
    mapping at the current values). The whole-model ratio divides the summed ``step_sq`` by the
    summed per-group ``grad_sq_scaled``.

    Cost: on the other steps the callback does nothing (no allocation, no device synchronisation);
    on a measured step it takes a few dot products per parameter tensor (no parameter-sized
    allocation), updates EMAs kept on the device, and synchronises once to log. ``ema_decay`` is
    per optimizer step, so a sample taken ``n`` steps after the previous one weighs
    ``1 - ema_decay**n``; the EMAs are bias-corrected (the first value is the first sample, whose
    ratio is ``c (2 - c)`` since the first step has no momentum yet). Sampling every
    ``log_every_n_steps`` (the default) keeps the overhead below 1% of a small CNN's training
    throughput on CPU; ``every_n_steps=1`` measures every step and costs more
    (``benchmarks/diagnostics_overhead.py``).

    Distributed: under DDP the numbers are computed locally (gradients are already averaged); with
    DTensor parameters (FSDP2 ``fully_shard`` through ``ModelParallelStrategy``) local sums are
    combined by one small ``all_reduce`` per measured step, so every strategy logs the
    single-process values. FSDP1 (``FSDPStrategy``) flat shards are not DTensors: a warning says
    the values would be per-rank.

    Skipped steps: a step skipped by an AMP grad scaler is not measured, and a step with non-finite
    gradients is not folded into the EMAs (one warning each). With gradient accumulation there is
    one measurement per optimizer step. The EMA state is saved in checkpoints.

    Args:
        every_n_steps: measure and log every this many optimizer steps (at steps ``k`` with
            ``k % every_n_steps == 0``); ``None`` follows ``Trainer(log_every_n_steps)``.
        ema_decay: per-step decay of the EMAs, in ``[0, 1)``; ``0`` logs the raw samples.
        per_group: also log every parameter group.
        prog_bar: show ``spa/ratio`` and ``spa/cosine`` in the progress bar.

    Raises:
        ValueError: ``every_n_steps`` not a positive integer, or ``ema_decay`` outside ``[0, 1)``.
        TypeError: ``per_group`` or ``prog_bar`` not a bool.

    Example::

        from lightning_spa import SPA
        from lightning_spa.callbacks import MomentumDiagnostics

        trainer = pl.Trainer(callbacks=[MomentumDiagnostics()], logger=TensorBoardLogger("runs"))
        trainer.fit(model)   # TensorBoard: CUSTOM SCALARS tab, "spa: alignment ratio"
    """

    def __init__(
        self, every_n_steps: int | None = None, ema_decay: float = 0.99, per_group: bool = False, prog_bar: bool = False
    ) -> None:
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
        self.per_group, self.prog_bar = per_group, prog_bar
        self._n = every_n_steps or 1
        self._trackers: list[_Tracker] = []
        self._loaded: dict[str, Any] | None = None
        self._bar: dict[str, float] = {}
        self._warned: set[str] = set()
        self._loggers: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, ema_decay=self.ema_decay)

    # -- set-up ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Trainer(log_every_n_steps) is stored by Lightning's logger connector (0 under barebones=True).
        self._n = self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 0) or 50)
        self._loggers = list(trainer.loggers)
        self._remove_hooks()
        supported = []
        for i, optimizer in enumerate(trainer.optimizers):
            reason = unsupported_reason(optimizer)
            if reason is None:
                supported.append((i, optimizer))
            else:
                rank_zero_warn(
                    f"MomentumDiagnostics: optimizer {i} ({type(optimizer).__name__}) is not measured: {reason}. "
                    "Nothing is logged for it; use lightning_spa.SPA or torch.optim.SGD(momentum=...)."
                )
        multi = len(supported) > 1
        self._trackers = [_Tracker(opt, f"/opt{i}" if multi else "", self.ema_decay) for i, opt in supported]
        for tracker in self._trackers:
            tracker.handle = tracker.optimizer.register_step_post_hook(self._make_post_hook(tracker))
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            rank_zero_warn(
                "MomentumDiagnostics under FSDPStrategy (FSDP1): flat-parameter shards are not DTensors, so the "
                "logged values are those of each rank's shard. Use ModelParallelStrategy with fully_shard (FSDP2) "
                "for exact global values."
            )
        if not self._loggers and not self.prog_bar and self._trackers:
            rank_zero_warn("MomentumDiagnostics: the trainer has no logger and prog_bar=False; nothing is recorded.")
        if self._loaded is not None:
            self._apply_loaded()
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

    def _remove_hooks(self) -> None:
        for tracker in self._trackers:
            if tracker.handle is not None:
                tracker.handle.remove()
                tracker.handle = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # -- measurement ----------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        optimizer = unwrap_optimizer(optimizer)
        for tracker in self._trackers:
            if tracker.optimizer is not optimizer:
                continue
            if tracker.pending is not None:
                self._warn_once(
                    "skipped",
                    f"MomentumDiagnostics: optimizer step {tracker.pending[0]} was skipped (e.g. by an AMP grad "
                    "scaler that found inf/NaN gradients); it is not measured. Further skips are not reported.",
                )
                tracker.pending = None
            step = trainer.global_step
            if step % self._n:
                return
            hypers = [group_hyper(optimizer, g) for g in optimizer.param_groups]
            if not all(has_spa_form(h) for h in hypers):
                self._warn_once(
                    "spike",
                    f"MomentumDiagnostics: torch SGD momentum >= 1 at optimizer step {step} (the spike of an instant "
                    "hyper-parameter change) has no SPA form; that step is not measured. Further ones are not "
                    "reported.",
                )
                return
            tracker.pending = (step, hypers, measure_before_step(optimizer, tracker.device, tracker.ema.values.dtype))

    def _make_post_hook(self, tracker: _Tracker) -> Any:
        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            if tracker.pending is not None:
                self._finish(tracker)

        return hook

    def _finish(self, tracker: _Tracker) -> None:
        assert tracker.pending is not None
        step, hypers, before = tracker.pending
        tracker.pending = None
        after = measure_after_step(tracker.optimizer, hypers, tracker.device, tracker.ema.values.dtype)
        before_sum, after_sum = complete_sums(before, after, tracker.sharded)
        ok = tracker.ema.update(step_samples(before_sum, after_sum, hypers), step, default_gap=self._n)
        values = torch.cat([tracker.ema.corrected().reshape(-1), ok.reshape(1).to(tracker.ema.values.dtype)])
        host = values.tolist()  # the one host-device synchronisation of a measured step
        if not host[-1]:
            self._warn_once(
                "nonfinite",
                f"MomentumDiagnostics: non-finite gradients at optimizer step {step}; that step is not folded into "
                "the EMAs. Further occurrences are not reported.",
            )
        metrics = self._metrics(tracker, host[:-1], hypers)
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)
        if self.prog_bar and not tracker.suffix:
            self._bar = {k: metrics[k] for k in ("spa/ratio", "spa/cosine") if k in metrics}

    def _metrics(self, tracker: _Tracker, flat: list[float], hypers: list[GroupHyper]) -> dict[str, float]:
        width = len(_EMA_NAMES)
        rows = [flat[i * width : (i + 1) * width] for i in range(len(tracker.groups) + 1)]
        metrics: dict[str, float] = {}

        def put(row: list[float], hyper: GroupHyper, suffix: str) -> None:
            for name, value in zip(_EMA_NAMES, row, strict=True):
                if value == value and abs(value) != float("inf"):  # an undefined value is left out
                    metrics[f"spa/{name}{suffix}"] = value
            for name, value in zip(_HYPER_NAMES, (hyper.eta, hyper.c, hyper.lr, hyper.momentum), strict=True):
                metrics[f"spa/{name}{suffix}"] = value

        put(rows[-1], hypers[0], tracker.suffix)
        if self.per_group:
            for name, row, hyper in zip(tracker.groups, rows[:-1], hypers, strict=True):
                put(row, hyper, f"{tracker.suffix}/{name}")
        metrics["spa/one"] = 1.0
        return metrics

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.prog_bar and self._bar:
            for name, value in self._bar.items():
                pl_module.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if not self._trackers and self._loaded is not None:
            return self._loaded
        return {"version": 1, "ema": {t.suffix or "/": t.ema.state_dict() for t in self._trackers}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict
        if self._trackers:
            self._apply_loaded()

    def _apply_loaded(self) -> None:
        assert self._loaded is not None
        saved = dict(self._loaded.get("ema", {}))
        for tracker in self._trackers:
            if (tracker.suffix or "/") in saved:
                tracker.ema.load_state_dict(saved.pop(tracker.suffix or "/"))
        if saved:
            rank_zero_warn(
                f"MomentumDiagnostics: the checkpoint holds EMA state for optimizers {sorted(saved)} that this run "
                "does not measure; that state is dropped and their EMAs restart."
            )
        self._loaded = None
