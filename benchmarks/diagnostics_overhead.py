"""Benchmark: the training-throughput cost of :class:`~lightning_spa.callbacks.MomentumDiagnostics`.

A real Lightning fit loop: the small CNN of :mod:`lightning_spa.demos.digits` on the bundled
digits (batch 64, SPA ``eta=1, c=0.1``), CPU, a TensorBoardLogger in every configuration (the
callback writes through it), no validation, checkpointing or progress bar. Configurations:

- ``baseline``: no diagnostics;
- ``noop``: a callback that does nothing (Lightning's hook dispatch, paid by any callback);
- ``harness``: the timing wrappers around empty hooks (what timing costs, to subtract);
- ``default``: ``MomentumDiagnostics()``, measuring on the trainer's logging steps
  (``log_every_n_steps=50``);
- ``every-step``: ``MomentumDiagnostics(every_n_steps=1)``, measuring and logging every step.

Each fit runs ``--steps`` optimizer steps; the time from ``on_train_start`` to ``on_train_end``
(Trainer set-up excluded) gives the per-step time. The configurations run in alternating rounds
(the order rotates every round) so that load on a shared machine hits them alike; the table
reports the median per-step time over rounds and the median over rounds of each round's ratio
to the baseline (a paired estimate, robust to drift), as throughput overhead, and the wall
time spent inside the callback's own code (its Lightning hooks and the meter's step post-hook)
per unmeasured and per measured step: the direct cost, free of load drift.

Usage::

    python benchmarks/diagnostics_overhead.py                    # 15 rounds x 200 steps
    python benchmarks/diagnostics_overhead.py --rounds 30 --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import math
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

CONFIGS = ("baseline", "noop", "harness", "default", "every-step")


class _Noop(pl.Callback):
    """A callback that does nothing: what Lightning's hook dispatch costs any callback."""

    @property
    def state_key(self) -> str:
        return "_Noop"


class _TimedDiagnostics(MomentumDiagnostics):
    """MomentumDiagnostics that adds up the wall time spent in its own code per step (its Lightning
    hooks and the meters' step post-hook), split into unmeasured and measured steps."""

    def __init__(self, hollow: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hollow = hollow  # time empty hooks of the same shape: what the timing wrappers cost
        self.seconds: dict[str, list[float]] = {"unmeasured": [], "measured": []}
        self._this_step = self._timer_cost = 0.0
        self._measured = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        for meter in self.meters.values():  # time the meter's post-hook too: re-attach a timed wrapper
            meter.detach()
            inner = (lambda *args: None) if self.hollow else meter._after_step

            def timed(optimizer: Any, args: Any, kwargs: Any, inner: Any = inner) -> None:
                start = time.perf_counter()
                inner(optimizer, args, kwargs)
                self._this_step += time.perf_counter() - start

            meter._after_step = timed  # type: ignore[method-assign]
            meter.attach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        start = time.perf_counter()
        if not self.hollow:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        middle = time.perf_counter()
        # An empty timed region, to subtract what timing itself costs (two regions a step).
        self._timer_cost = time.perf_counter() - middle
        self._this_step += middle - start
        self._measured = any(m._pending is not None for m in self.meters.values())

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:  # not ours: MomentumDiagnostics has none
        kind = "measured" if self._measured else "unmeasured"
        self.seconds[kind].append(max(self._this_step - 2 * self._timer_cost, 0.0))
        self._this_step, self._measured = 0.0, False


class _Timer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds_per_step = (time.perf_counter() - self.start) / max(trainer.global_step, 1)


def run_once(config: str, steps: int, log_dir: str) -> tuple[float, float, float]:
    """One fit of ``steps`` optimizer steps; returns seconds per step and the median seconds inside the
    callback of an unmeasured and of a measured step (NaN where there was none)."""
    pl.seed_everything(0, verbose=False)
    timer = _Timer()
    callbacks: list[Any] = [timer]
    diagnostics = None
    if config == "noop":
        callbacks.append(_Noop())
    elif config == "harness":
        diagnostics = _TimedDiagnostics(hollow=True)
    elif config == "default":
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
    if diagnostics is None:
        return timer.seconds_per_step, 0.0, 0.0
    # The median step: a preemption on a shared machine inflates a few steps by milliseconds.
    per = {k: statistics.median(v) if v else math.nan for k, v in diagnostics.seconds.items()}
    return timer.seconds_per_step, per["unmeasured"], per["measured"]


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
    unmeasured: dict[str, list[float]] = {c: [] for c in CONFIGS}
    measured: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as log_dir:
        for config in CONFIGS:  # warm-up: imports, data, first-call overheads
            run_once(config, 20, log_dir)
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for config in order:
                per_step, cost_unmeasured, cost_measured = run_once(config, args.steps, log_dir)
                times[config].append(per_step)
                unmeasured[config].append(cost_unmeasured)
                measured[config].append(cost_measured)
    print(f"command: python {shlex.join(['benchmarks/diagnostics_overhead.py', *(argv or sys.argv[1:])])}")
    print(
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps, digits CNN batch 64"
    )
    header = ("config", "median ms/step", "steps/s", "overhead, paired", "us/unmeasured step", "us/measured step")
    print(f"{header[0]:<11} {header[1]:>14} {header[2]:>8} {header[3]:>17} {header[4]:>19} {header[5]:>17}")
    for config in CONFIGS:
        med = statistics.median(times[config])
        paired = statistics.median(t / b - 1.0 for t, b in zip(times[config], times["baseline"], strict=True))
        cost = [statistics.median(x[config]) for x in (unmeasured, measured)]
        cells = [f"{1e6 * c:>19.1f}" if math.isfinite(c) else f"{'-':>19}" for c in cost]
        print(f"{config:<11} {1e3 * med:>14.3f} {1.0 / med:>8.1f} {100 * paired:>16.2f}% {cells[0]} {cells[1]:>17}")
    net_default, net_harness = (statistics.median(unmeasured[c]) for c in ("default", "harness"))
    print(
        "overhead, paired: median over rounds of (time/step) / (baseline time/step in the same round) - 1.\n"
        "us/unmeasured step, us/measured step: wall time inside MomentumDiagnostics' own code (its Lightning hooks "
        "and the meter's step post-hook, less the timer's own cost) in the median step of each kind, median over "
        "rounds; free of load drift.\n"
        "noop: a callback that does nothing; Lightning's dispatch of ~20 hooks per step, paid by any callback, is "
        "in its overhead. harness: the same timing wrappers around empty hooks; the callback's own cost of an "
        f"unmeasured step is default - harness = {1e6 * (net_default - net_harness):.1f} us."
    )


if __name__ == "__main__":
    main()
