"""Benchmark: the training-throughput cost of :class:`~lightning_spa.callbacks.MomentumDiagnostics`.

A real Lightning fit loop: the small CNN of :mod:`lightning_spa.demos.digits` on the bundled
digits (batch 64, SPA ``eta=1, c=0.1``), CPU, a TensorBoardLogger in every configuration (the
callback writes through it), no validation, checkpointing or progress bar. Configurations:

- ``baseline``: no diagnostics;
- ``default``: ``MomentumDiagnostics()``, measuring on the trainer's logging steps
  (``log_every_n_steps=50``);
- ``every-step``: ``MomentumDiagnostics(every_n_steps=1)``, measuring and logging every step.

Each fit runs ``--steps`` optimizer steps; the time from ``on_train_start`` to ``on_train_end``
(Trainer set-up excluded) gives the per-step time. The configurations run in alternating rounds
(the order rotates every round) so that load on a shared machine hits them alike; the table
reports the median per-step time over rounds and the median over rounds of each round's ratio
to the baseline (a paired estimate, robust to drift), as throughput overhead.

Usage::

    python benchmarks/diagnostics_overhead.py                    # 15 rounds x 200 steps
    python benchmarks/diagnostics_overhead.py --rounds 30 --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_spa.callbacks.diagnostics import MomentumDiagnostics
from lightning_spa.demos.digits import DigitsCNN, DigitsDataModule

CONFIGS = ("baseline", "default", "every-step")


class _TimedDiagnostics(MomentumDiagnostics):
    """MomentumDiagnostics that adds up the wall time spent in its own hooks (a drift-free cost estimate)."""

    inside = 0.0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.inside += time.perf_counter() - start

    def _finish(self, tracker: Any) -> None:  # the optimizer post-step hook's work
        start = time.perf_counter()
        super()._finish(tracker)
        self.inside += time.perf_counter() - start

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.inside += time.perf_counter() - start


class _Timer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds_per_step = (time.perf_counter() - self.start) / max(trainer.global_step, 1)


def run_once(config: str, steps: int, log_dir: str) -> tuple[float, float]:
    """One fit of ``steps`` optimizer steps; returns seconds per step and seconds inside the callback per step."""
    pl.seed_everything(0, verbose=False)
    timer = _Timer()
    callbacks: list[Any] = [timer]
    diagnostics = None
    if config == "default":
        diagnostics = _TimedDiagnostics()
    elif config == "every-step":
        diagnostics = _TimedDiagnostics(every_n_steps=1)
    if diagnostics is not None:
        callbacks.append(diagnostics)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=TensorBoardLogger(log_dir, name=config),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=64))
    inside = diagnostics.inside / max(trainer.global_step, 1) if diagnostics is not None else 0.0
    return timer.seconds_per_step, inside


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds (A, B, C, ...) per configuration")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per fit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    inside: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as log_dir:
        for config in CONFIGS:  # warm-up: imports, data, first-call overheads
            run_once(config, 20, log_dir)
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for config in order:
                per_step, in_callback = run_once(config, args.steps, log_dir)
                times[config].append(per_step)
                inside[config].append(in_callback)
    base = statistics.median(times["baseline"])
    print(f"command: python {shlex.join(['benchmarks/diagnostics_overhead.py', *(argv or sys.argv[1:])])}")
    print(
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps, digits CNN batch 64"
    )
    header = ("config", "median ms/step", "steps/s", "overhead, paired", "in callback ms/step", "in callback")
    print(f"{header[0]:<11} {header[1]:>14} {header[2]:>8} {header[3]:>17} {header[4]:>20} {header[5]:>12}")
    for config in CONFIGS:
        med = statistics.median(times[config])
        paired = statistics.median(t / b - 1.0 for t, b in zip(times[config], times["baseline"], strict=True))
        cb = statistics.median(inside[config])
        print(
            f"{config:<11} {1e3 * med:>14.3f} {1.0 / med:>8.1f} {100 * paired:>16.2f}% {1e3 * cb:>20.4f} "
            f"{100 * cb / base:>11.2f}%"
        )
    print(
        f"overhead, paired: median over rounds of (time/step) / (baseline time/step in the same round) - 1.\n"
        f"in callback: wall time inside the callback's hooks per step, median over rounds, and as a share of the "
        f"baseline step ({1e3 * base:.3f} ms): the same cost, measured free of load drift."
    )


if __name__ == "__main__":
    main()
