"""Benchmark: the training-throughput cost of :class:`~lightning_spa.callbacks.measured.MeasuredMomentumOff`.

The approach of ``benchmarks/diagnostics_overhead.py``: a real Lightning fit loop, the small CNN of
:mod:`lightning_spa.demos.digits` on the bundled digits (batch 64, SPA ``eta=1, c=0.1``), CPU, no
logger, validation, checkpointing or progress bar. Configurations:

- ``baseline``: no callback;
- ``no-op``: a callback with the same Lightning hooks and optimizer step hooks (two post-hooks, one
  pre-hook) doing nothing: what any such callback costs in Lightning's loop, the floor under the others;
- ``measuring``: ``MeasuredMomentumOff(warmup=0, patience=10**9, unit="step")``: the rule never
  decides, so every step is measured, the cost of the phase between the warm-up and the decision
  (the default measures every step there, with the meter's cheap measurement: two squared norms
  per parameter after the step, :mod:`lightning_spa.diagnostics`);
- ``decided``: ``MeasuredMomentumOff(warmup=0, patience=0, unit="step", transition_steps=10**9, low=0.01)``:
  decided at step 0, so no step after it is measured (the meter is detached; ``c`` moves so slowly
  that the step itself is unchanged): the cost after the decision.

Each fit runs ``--steps`` optimizer steps; the time from ``on_train_start`` to ``on_train_end``
gives the per-step time. Configurations alternate in rounds (the order rotates), and the table
reports the median per-step time, the median of each round's ratio to the baseline (paired) and
the wall time spent inside the callback's hooks and the meter's post-hook per step.

``--clock cpu`` times the main thread's CPU time instead of elapsed time: with ``--threads 1`` that
is all the work, and other jobs on a shared machine do not inflate it (they still share caches).

Usage::

    python benchmarks/measured_off_overhead.py                   # 7 rounds x 150 steps
    python benchmarks/measured_off_overhead.py --rounds 15 --steps 300 --threads 1
    python benchmarks/measured_off_overhead.py --threads 1 --clock cpu   # on a shared machine
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_spa import SPA
from lightning_spa.callbacks.measured import MeasuredMomentumOff
from lightning_spa.demos.digits import DigitsCNN, DigitsDataModule

CONFIGS = ("baseline", "no-op", "measuring", "decided")
_CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = _CLOCKS["wall"]


class _Timed(MeasuredMomentumOff):
    """Adds up the wall time inside its own hooks and inside its meters' step post-hooks."""

    inside = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # the callback builds its meters here
        for meter in self._meters.values():
            finish = meter._finish

            def timed(finish: Any = finish) -> str:
                start = _clock()
                try:
                    return finish()  # type: ignore[no-any-return]
                finally:
                    self.inside += _clock() - start

            meter._finish = timed  # type: ignore[method-assign]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        start = _clock()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.inside += _clock() - start

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        start = _clock()
        super().on_train_batch_end(*args, **kwargs)
        self.inside += _clock() - start


class _NoOp(pl.Callback):
    """The hooks MeasuredMomentumOff uses (its own, its clock's and its meter's), empty."""

    inside = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(lambda *args: None)
        optimizer.register_step_post_hook(lambda *args: None)
        optimizer.register_step_post_hook(lambda *args: None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        pass

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Timer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = _clock()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds_per_step = (_clock() - self.start) / max(trainer.global_step, 1)


def run_once(config: str, steps: int, weight_decay: float = 0.0) -> tuple[float, float]:
    """One fit of ``steps`` optimizer steps; returns seconds per step and seconds inside the callback per step."""
    pl.seed_everything(0, verbose=False)
    timer = _Timer()
    callbacks: list[Any] = [timer]
    measured: Any = None
    if config == "no-op":
        measured = _NoOp()
    elif config == "measuring":
        measured = _Timed(warmup=0, patience=10**9, unit="step", transition_steps=10)
    elif config == "decided":
        # low=0.01: the first step's ratio c (2 - c) counts as idle, so the rule decides at step 0
        measured = _Timed(warmup=0, patience=0, unit="step", transition_steps=10**9, low=0.01)
    if measured is not None:
        callbacks.append(measured)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    factory = None if not weight_decay else partial(SPA, lr=1.0, c=0.1, weight_decay=weight_decay)
    trainer.fit(DigitsCNN(optimizer=factory), DigitsDataModule(batch_size=64))
    inside = measured.inside / max(trainer.global_step, 1) if measured is not None else 0.0
    return timer.seconds_per_step, inside


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per configuration")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per fit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock", choices=sorted(_CLOCKS), default="wall",
        help="wall: elapsed time; cpu: this thread's CPU time (with --threads 1 all the work; robust on a machine "
        "shared with other jobs, which wall time is not)",
    )  # fmt: skip
    parser.add_argument(
        "--weight-decay", type=float, default=0.0,
        help="SPA's weight decay (0: the demo's recipe; the measurement then forms g = grad + wd x)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    global _clock
    _clock = _CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    inside: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for config in CONFIGS:  # warm-up: imports, data, first-call overheads
        run_once(config, 20, args.weight_decay)
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
        for config in order:
            per_step, in_callback = run_once(config, args.steps, args.weight_decay)
            times[config].append(per_step)
            inside[config].append(in_callback)
    base = statistics.median(times["baseline"])
    print(f"command: python {shlex.join(['benchmarks/measured_off_overhead.py', *(argv or sys.argv[1:])])}")
    print(
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} steps, digits CNN batch 64, "
        f"SPA(lr=1, c=0.1, weight_decay={args.weight_decay:g}); "
        f"{args.clock} clock"
    )
    header = ("config", "median ms/step", "steps/s", "overhead, paired", "paired IQR", "in callback ms/step",
              "in callback")  # fmt: skip
    widths = (-10, 14, 8, 17, 15, 20, 12)
    print(" ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for config in CONFIGS:
        med = statistics.median(times[config])
        ratios = [t / b - 1.0 for t, b in zip(times[config], times["baseline"], strict=True)]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        cb = statistics.median(inside[config])
        print(
            f"{config:<10} {1e3 * med:>14.3f} {1.0 / med:>8.1f} {100 * statistics.median(ratios):>16.2f}% "
            f"{f'{100 * low:.1f}..{100 * high:.1f}%':>15} {1e3 * cb:>20.4f} {100 * cb / base:>11.2f}%"
        )
    print(
        "overhead, paired: median over rounds of (time/step) / (baseline time/step in the same round) - 1; paired IQR: "
        "the middle half of those per-round values (how noisy the machine was).\n"
        f"in callback: wall time inside the callback's hooks and its meters' post-hooks per step, median over rounds, "
        f"and as a share of the baseline step ({1e3 * base:.3f} ms)."
    )


if __name__ == "__main__":
    main()
