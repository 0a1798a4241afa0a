"""Check 4, ``speed``: ``benchmarks/optimizer_step.py`` on the device (its table captured) and the
``MomentumDiagnostics`` overhead on a ResNet-18 with fake data (default and ``every_n_steps=1``)."""

from __future__ import annotations

import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from ._common import FAIL, INFO, Context, run
from ._fit import fake_module, fit, memory_logger, resnet18


def _overhead(ctx: Context) -> tuple[str, dict[str, float]]:
    """MomentumDiagnostics' cost on a ResNet-18 (CIFAR shape, batch 128, fake data), in a real fit loop."""
    import pytorch_lightning as pl
    import torch

    from lightning_spa.callbacks import MomentumDiagnostics
    from lightning_spa.optim import SPA

    steps, rounds = (30, 2) if ctx.quick else (100, 3)
    if not ctx.cuda:
        steps, rounds = 4, 1
    batch = 128 if ctx.cuda else 8

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.seconds = math.nan

        def _sync(self) -> None:
            if ctx.cuda:
                torch.cuda.synchronize()

        def on_train_start(self, *args: Any) -> None:
            self._sync()
            self.t0 = time.perf_counter()

        def on_train_end(self, *args: Any) -> None:
            self._sync()
            self.seconds = (time.perf_counter() - self.t0) / steps

    configs: dict[str, Callable[[], list[Any]]] = {
        "baseline": lambda: [],
        "default (every 50 steps)": lambda: [MomentumDiagnostics()],
        "every_n_steps=1": lambda: [MomentumDiagnostics(every_n_steps=1)],
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    for r in range(rounds + 1):  # round 0 warms up (cudnn autotuning, allocator) and is dropped
        for name in names[r % len(names) :] + names[: r % len(names)]:
            clock = Clock()
            module = fake_module(resnet18, lambda ps: SPA(ps, lr=1.0, c=0.1), (3, 32, 32), batch, 10, steps)
            # Lightning's default log_every_n_steps=50, which MomentumDiagnostics() follows.
            fit(ctx, module, steps, [*configs[name](), clock], logger=memory_logger(), log_every_n_steps=50)
            if r:
                times[name].append(clock.seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"ResNet-18 (11.2M parameters), batch {batch} of 3x32x32 fake data, SPA default path, "
        f"{steps} steps per fit, {rounds} alternating rounds after one warm-up round; median per-step time.",
        "",
        "| configuration | ms / step | overhead vs baseline |",
        "|---|---:|---:|",
    ]
    for name in names:
        lines.append(f"| {name} | {med[name] * 1e3:.2f} | {(med[name] / med['baseline'] - 1) * 100:+.1f}% |")
    return "\n".join(lines), med


def check(ctx: Context) -> None:
    cmd = [sys.executable, "benchmarks/optimizer_step.py", "--device", ctx.device.type]
    if not ctx.cuda:  # smoke run: one small model, a few rounds
        cmd += ["--rounds", "3", "--warmup", "1", "--models", "digits"]
    elif ctx.quick:
        cmd += ["--rounds", "20"]
    result = run(ctx, "speed", "benchmarks/optimizer_step.py", "runs", cmd)
    if result is not None:
        rc, out = result
        ctx.report.add(
            "speed",
            "benchmarks/optimizer_step.py",
            INFO if rc == 0 else FAIL,
            "table below" if rc == 0 else f"exit {rc}",
            "runs",
        )
        ctx.report.sections.append((f"Optimizer step: `{shlex.join(cmd[1:])}`", out.strip()))
    table, med = _overhead(ctx)
    base = med["baseline"]
    for name in ("default (every 50 steps)", "every_n_steps=1"):
        ctx.report.add(
            "speed",
            f"MomentumDiagnostics {name}, ResNet-18",
            INFO,
            f"{(med[name] / base - 1) * 100:+.1f}% step time",
            "table below",
        )
    ctx.report.sections.append(("MomentumDiagnostics overhead, ResNet-18 fit loop", table))
