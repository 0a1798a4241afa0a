"""Counting host-device synchronisations: in labelled windows, and per batch of a small Lightning fit."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import Context
from ._fit import fit, memory_logger, mixed_precision, mlp_module


class SyncWindows:
    """Counts host-device synchronisations in labelled windows (``set_sync_debug_mode("warn")``).

    In ``"warn"`` mode torch emits one ``UserWarning`` per synchronising CUDA call; the warnings
    raised between :meth:`open` and :meth:`close` are recorded, counted and located (the Python
    line that made the call). On the CPU (smoke runs) the windows exist but count nothing.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.counts: dict[str, list[tuple[int, int]]] = {}  # label -> [(step, syncs)]
        self.sources: dict[str, int] = {}  # "file:line" -> syncs, over all windows
        self._open: tuple[str, int] | None = None
        self._catcher: Any = None
        self._log: list[warnings.WarningMessage] = []

    def open(self, label: str, step: int) -> None:
        import torch

        self.close()
        self._catcher = warnings.catch_warnings(record=True)
        self._log = self._catcher.__enter__()
        warnings.simplefilter("always")
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        self._open = (label, step)

    def close(self) -> None:
        import torch

        if self._open is None:
            return
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        syncs = [w for w in self._log if "synchroniz" in str(w.message)]
        for w in syncs:
            where = f"{Path(w.filename).name}:{w.lineno}"
            self.sources[where] = self.sources.get(where, 0) + 1
        label, step = self._open
        self.counts.setdefault(label, []).append((step, len(syncs)))
        self._open = None


def top_sources(sources: dict[str, int], n: int = 3) -> str:
    """``" [file:line xN, ...]"``: the ``n`` lines that synchronised most; empty if none did."""
    top = sorted(sources.items(), key=lambda kv: -kv[1])[:n]
    return f" [{', '.join(f'{k} x{v}' for k, v in top)}]" if top else ""


def sync_probe(windows: SyncWindows) -> Any:
    """A callback, first in ``trainer.callbacks``, that opens one window per batch: from the start of
    batch ``k`` (before the other callbacks' hooks) to the start of batch ``k + 1``. A window holds
    every hook of the batch, the forward and backward, the optimizer step with its hooks and
    Lightning's logging; a run without the callbacks under test is the control."""
    from pytorch_lightning.callbacks import Callback

    class BatchWindows(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            windows.open("batch", trainer.global_step)

        def on_train_end(self, *args: Any) -> None:
            windows.close()

    return BatchWindows()


def sync_counts(
    ctx: Context,
    callbacks: list[Any],
    steps: int,
    optimizer_factory: Callable[[Any], Any] | None = None,
    amp: bool = False,
) -> tuple[dict[int, int], set[int], dict[str, int]]:
    """``({step: syncs}, steps at which a "spa/" metric was logged, {"file:line": syncs})`` of a small
    Lightning fit (an MLP; SPA unless ``optimizer_factory``; ``16-mixed`` with a GradScaler if ``amp``)
    with ``callbacks``."""
    from lightning_spa.optim import SPA

    windows = SyncWindows(ctx.cuda)
    logger = memory_logger()
    module = mlp_module(optimizer_factory or (lambda ps: SPA(ps, lr=1.0, c=0.1)), steps)
    plugins = mixed_precision(ctx) if amp else None
    try:
        fit(ctx, module, steps, [sync_probe(windows), *callbacks], logger=logger, plugins=plugins)
    finally:
        windows.close()
    logged = {int(s) for s, m in logger.rows if s is not None and any(k.startswith("spa/") for k in m)}
    return dict(windows.counts.get("batch", [])), logged, windows.sources
