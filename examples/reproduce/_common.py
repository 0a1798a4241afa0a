"""Shared helpers of the reproduction scripts: one digits run, TensorBoard scalars, markdown tables."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_spa.demos import DigitsCNN, DigitsDataModule

__all__ = ["fit_digits", "mean_std", "read_scalars", "write_table"]


def read_scalars(log_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{tag: (steps, values)}`` of every scalar logged under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: ([e.step for e in acc.Scalars(t)], [e.value for e in acc.Scalars(t)]) for t in acc.Tags()["scalars"]}


def fit_digits(
    seed: int,
    epochs: int,
    callbacks: Sequence[pl.Callback],
    log_dir: Path | None = None,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    batch_size: int = 64,
) -> tuple[pl.Trainer, dict[str, tuple[list[int], list[float]]]]:
    """Trains the digits CNN (default SPA eta 1.0, c 0.1) and returns the trainer and its scalars."""
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and robust on a busy machine
    pl.seed_everything(seed, verbose=False)
    logger = TensorBoardLogger(str(log_dir), name="", version=f"seed{seed}") if log_dir is not None else False
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=list(callbacks),
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(DigitsCNN(optimizer=optimizer), DigitsDataModule(batch_size=batch_size, seed=0))
    scalars = read_scalars(trainer.logger.log_dir) if log_dir is not None else {}  # type: ignore[union-attr]
    return trainer, scalars


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(value: float, digits: int = 4) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}g}"


def write_table(path: Path, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], notes: str = "") -> str:
    """Writes (and returns) a small markdown table."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + ("\n\n" + notes if notes else "") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
