"""GPU check: everything about lightning_spa that needs a CUDA device, in one run of a few minutes.

A GPU is available only now and then, for minutes, so this script runs every CUDA check at once,
isolates them (one failing check is reported as FAIL with its error; the others still run),
prints one summary table and writes it, with the captured benchmark tables, as markdown.

Checks (``--list`` prints them):

1. ``trajectory``: SPA vs ``torch.optim.SGD`` driven by Theorem 1 (``lightning_spa.theorem``),
   every path (loop, foreach, fused, default) in float32 and bfloat16, 200 steps with schedule
   changes (a geometric transition, an instant ``eta`` drop, momentum switched off);
2. ``sync``: host synchronisations, counted with ``torch.cuda.set_sync_debug_mode``: an SPA step
   with a float ``lr`` makes none (``"error"`` mode), nor with a tensor ``lr`` on the device;
   ``MomentumDiagnostics`` none on an unmeasured step and at most one on a measured step (also
   under ``16-mixed`` with fused SPA and fused torch SGD); the schedule callbacks none; counted
   for information: a tensor ``lr`` with ``fused=True`` or on the CPU, a GradScaler step;
3. ``amp``: Lightning ``16-mixed`` with a GradScaler for ``SPA(fused=True)`` and torch fused
   SGD, with ``MomentumDiagnostics``: the logged ``grad_sq`` equals ``||g||^2`` read after the
   backward (float32 run) and the float32 run's (16-mixed run); a step the scaler skips leaves
   no trace (first step and later);
4. ``speed``: ``benchmarks/optimizer_step.py --device cuda`` (captured table) and the
   ``MomentumDiagnostics`` overhead on a ResNet-18 with fake data (default and ``every_n_steps=1``);
5. ``memory``: the peak CUDA memory of a step and the optimizer state, SPA vs torch SGD;
6. ``pytest``: ``pytest -m cuda`` (the CUDA tests of the suite).

A failing row names what was measured; sync rows also name the Python lines that synchronised.

Usage::

    python benchmarks/gpu_check.py                 # all checks, ~3-4 minutes on one GPU
    python benchmarks/gpu_check.py --quick         # fewer steps and rounds, ~1-2 minutes
    python benchmarks/gpu_check.py --list          # the checks, no device needed
    python benchmarks/gpu_check.py --checks trajectory,sync --out /tmp/gpu.md

Without CUDA it exits with status 2 and one line, ``no CUDA device: ...``. ``--device cpu`` runs
the same code on the CPU as a smoke test of the script itself (sync and memory checks skipped);
its numbers are not GPU figures and it writes no file unless ``--out`` is given.
Exit status: 0 all checks passed, 1 some check failed, 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.md"

PASS, FAIL, INFO, SKIP = "PASS", "FAIL", "INFO", "SKIP"


@dataclass
class Row:
    """One line of the summary table."""

    check: str
    case: str
    status: str
    measured: str = ""
    expected: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, markdown body)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (check, traceback)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, check: str, case: str, status: str, measured: str = "", expected: str = "") -> None:
        self.rows.append(Row(check, case, status, measured, expected))

    def expect(self, check: str, case: str, ok: bool, measured: str, expected: str) -> None:
        self.add(check, case, PASS if ok else FAIL, measured, expected)


@dataclass
class Context:
    device: Any  # torch.device
    quick: bool
    report: Report
    tmp: Path

    @property
    def cuda(self) -> bool:
        return bool(self.device.type == "cuda")


# -- helpers shared by the checks -------------------------------------------------------------------


def _isolated(ctx: Context, check: str, case: str, fn: Callable[[], None]) -> None:
    """Runs one case of a check; an exception becomes a FAIL row (and its traceback an error section)."""
    try:
        fn()
    except Exception as err:
        ctx.report.add(check, case, FAIL, f"{type(err).__name__}: {err}"[:160])
        ctx.report.errors.append((f"{check}: {case}", traceback.format_exc()))


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|GPU available but not used|TensorBoard).*")


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


def memory_logger() -> Any:
    from pytorch_lightning.loggers.logger import Logger

    class MemoryLogger(Logger):
        """Keeps every ``log_metrics`` call in memory: ``rows = [(step, metrics), ...]``."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int | None, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def series(self, key: str) -> dict[int, float]:
            return {int(s): m[key] for s, m in self.rows if s is not None and key in m}

    return MemoryLogger()


def _fit(
    ctx: Context,
    module: Any,
    steps: int,
    callbacks: list[Any],
    logger: Any = None,
    precision: Any = "32-true",
    plugins: list[Any] | None = None,
    log_every_n_steps: int = 1,
) -> Any:
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        accelerator="gpu" if ctx.cuda else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        precision=precision if plugins is None else None,
        plugins=plugins,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=log_every_n_steps,
        default_root_dir=str(ctx.tmp),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return trainer


def fake_module(
    net_factory: Callable[[], Any],
    optimizer_factory: Callable[[Any], Any],
    input_shape: tuple[int, ...],
    batch: int,
    classes: int,
    steps: int,
    seed: int = 0,
) -> Any:
    """A LightningModule training ``net_factory()`` on one fixed random batch (kept on the device)."""
    import pytorch_lightning as pl
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class FakeData(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = net_factory()
            gen = torch.Generator().manual_seed(seed + 1)
            self.register_buffer("x", torch.randn(batch, *input_shape, generator=gen), persistent=False)
            self.register_buffer("y", torch.randint(0, classes, (batch,), generator=gen), persistent=False)

        def training_step(self, batch_: Any, batch_idx: int) -> Any:
            return F.cross_entropy(self.net(self.x), self.y)

        def configure_optimizers(self) -> Any:
            return optimizer_factory(self.parameters())

        def train_dataloader(self) -> Any:
            return DataLoader(TensorDataset(torch.zeros(max(steps, 1))), batch_size=1)

    return FakeData()


def mlp() -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def resnet18(num_classes: int = 10) -> Any:
    """ResNet-18 for 32x32 inputs (CIFAR stem), 11.2M parameters; no torchvision needed."""
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x: Any) -> Any:
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(c_in, c_out, stride), Block(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


PATHS: dict[str, dict[str, Any]] = {
    "loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
}
# torch SGD counterpart of each SPA path (SPA's default picks the fused kernel where it exists).
SGD_PATHS: dict[str, dict[str, Any]] = {**PATHS, "default": {"fused": True}}


def schedule(steps: int) -> list[tuple[float, float]]:
    """``(eta_k, c_k)`` for ``k < steps``: constant, a geometric transition (eta down 10x, c up 5x),
    an instant eta halving (a momentum spike of 1.0 in SGD+M form), then c -> 1 (momentum off).
    Scaled to ``steps`` so the quick run sees every change."""
    out = []
    s = steps / 200
    t0, t1, drop, off0, off1 = int(40 * s), int(60 * s), int(100 * s), int(140 * s), int(150 * s)
    for k in range(steps):
        eta, c = 1.0, 0.1
        if k >= t0:
            f = min(1.0, (k - t0 + 1) / max(t1 - t0, 1))
            eta, c = 0.1**f, 0.1 * 5.0**f
        if k >= drop:
            eta *= 0.5
        if k >= off0:
            c = c * (1.0 / c) ** min(1.0, (k - off0 + 1) / max(off1 - off0, 1))
        out.append((eta, min(c, 1.0)))
    return out


# -- 1. trajectories --------------------------------------------------------------------------------


def check_trajectory(ctx: Context) -> None:
    import torch

    from lightning_spa.optim import SPA
    from lightning_spa.theorem import step_spa_to_sgdm

    steps = 60 if ctx.quick else 200
    sched = schedule(steps)
    shapes = [(33,), (8, 5), (4, 4, 3), (1000,)]
    # max |x_spa - x_sgd| / max |x|: float32 round-off; bfloat16 keeps 8 bits, so ten units in the last place
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
    for dtype, tol in tolerance.items():
        gen = torch.Generator().manual_seed(0)
        start = [torch.randn(s, generator=gen) for s in shapes]
        curv = [torch.rand(s, generator=gen) + 0.1 for s in shapes]  # a diagonal quadratic
        noise = [[0.1 * torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
        curv = [t.to(ctx.device, dtype) for t in curv]
        noise = [[t.to(ctx.device, dtype) for t in row] for row in noise]
        for path, flags in PATHS.items():
            case = f"{path}, {str(dtype).removeprefix('torch.')}"
            try:
                xs = [torch.nn.Parameter(t.to(ctx.device, dtype).clone()) for t in start]
                ys = [torch.nn.Parameter(t.to(ctx.device, dtype).clone()) for t in start]
                spa = SPA(xs, lr=sched[0][0], c=sched[0][1], **flags)
                sgd = torch.optim.SGD(ys, lr=0.1, momentum=0.9, **SGD_PATHS[path])
                diffs: list[Any] = []
                sizes: list[Any] = []
                prev: tuple[float, float] | None = None
                for k, (eta, c) in enumerate(sched):
                    for group in spa.param_groups:
                        group["lr"], group["c"] = eta, c
                    lr, momentum = step_spa_to_sgdm(eta, c, prev)
                    for group in sgd.param_groups:
                        group["lr"], group["momentum"] = lr, momentum
                    prev = (eta, c)
                    for params in (xs, ys):
                        for p, a, n in zip(params, curv, noise[k], strict=True):
                            p.grad = a * p.detach() + n
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # SPA's warning about the instant eta drop
                        spa.step()
                    sgd.step()
                    with torch.no_grad():  # on the device: no sync per step
                        pairs = zip(xs, ys, strict=True)
                        diffs.append(torch.stack([(x.float() - y.float()).abs().max() for x, y in pairs]).max())
                        sizes.append(torch.stack([y.float().abs().max() for y in ys]).max())
                worst, scale = float(torch.stack(diffs).max()), float(torch.stack(sizes).max())
                rel = worst / max(scale, 1e-30)
                finite = all(bool(torch.isfinite(x).all()) for x in xs)
                ctx.report.expect(
                    "trajectory",
                    case,
                    finite and rel <= tol,
                    f"max diff {worst:.2e} ({rel:.1e} of max|x|)",
                    f"<= {tol:g}",
                )
            except Exception as err:  # one failing path does not hide the others
                ctx.report.add("trajectory", case, FAIL, f"{type(err).__name__}: {err}"[:160])
                ctx.report.errors.append((f"trajectory {case}", traceback.format_exc()))


# -- 2. host synchronisations -----------------------------------------------------------------------


def spa_steps_under_error_mode(device: Any, flags: dict[str, Any]) -> None:
    """Six SPA steps with a float ``lr`` (the first step, steady state, an ``eta`` and ``c`` change),
    each under ``torch.cuda.set_sync_debug_mode("error")`` on CUDA: a host sync raises."""
    import torch

    from lightning_spa.optim import SPA

    on_cuda = device.type == "cuda"
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((64, 32), (32,), (1000,))]
    opt = SPA(params, lr=1.0, c=0.1, **flags)
    for k in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        if k == 3:  # a schedule change: new eta and c, a new beta for the kernel
            for group in opt.param_groups:
                group["lr"], group["c"] = 0.5, 0.2
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")


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
    import torch
    from pytorch_lightning.plugins.precision import MixedPrecision

    from lightning_spa.optim import SPA

    windows = SyncWindows(ctx.cuda)
    logger = memory_logger()
    factory = optimizer_factory or (lambda ps: SPA(ps, lr=1.0, c=0.1))
    module = fake_module(mlp, factory, (32,), 64, 10, steps)
    plugins = None
    if amp:
        scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**10)
        plugins = [MixedPrecision("16-mixed", ctx.device.type, scaler=scaler)]
    try:
        _fit(ctx, module, steps, [sync_probe(windows), *callbacks], logger=logger, plugins=plugins)
    finally:
        windows.close()
    logged = {int(s) for s, m in logger.rows if s is not None and any(k.startswith("spa/") for k in m)}
    return dict(windows.counts.get("batch", [])), logged, windows.sources


def check_sync(ctx: Context) -> None:
    rep = ctx.report
    note = "" if ctx.cuda else " (cpu: nothing to count)"

    def status(ok: bool) -> str:
        return (PASS if ok else FAIL) if ctx.cuda else SKIP

    for path, flags in PATHS.items():

        def float_lr(flags: dict[str, Any] = flags, path: str = path) -> None:
            spa_steps_under_error_mode(ctx.device, flags)
            rep.add("sync", f"SPA step, float lr, {path}", status(True), "none in 6 steps (mode 'error')" + note, "0")

        _isolated(ctx, "sync", f"SPA step, float lr, {path}", float_lr)

    def count_steps(make_opt: Callable[[list[Any]], Any], scaler: Any = None, steps: int = 4) -> tuple[int, str]:
        """Max syncs per step (first step included) of an optimizer on 3 tensors, optionally through a
        GradScaler (``scaler.step`` and ``scaler.update``), and where the worst ones come from."""
        import torch

        windows = SyncWindows(ctx.cuda)
        params = [torch.nn.Parameter(torch.randn(s, device=ctx.device)) for s in ((64, 32), (32,), (1000,))]
        opt = make_opt(params)
        for k in range(steps):
            if scaler is None:
                for p in params:
                    p.grad = torch.randn_like(p)
            else:
                scaler.scale(sum((p * torch.randn_like(p)).sum() for p in params)).backward()
            if ctx.cuda:
                torch.cuda.synchronize()
            windows.open("step", k)
            try:
                if scaler is None:
                    opt.step()
                else:
                    scaler.step(opt)
                    scaler.update()
            finally:
                windows.close()
            opt.zero_grad()
        top = sorted(windows.sources.items(), key=lambda kv: -kv[1])[:2]
        return max(n for _, n in windows.counts["step"]), ", ".join(f"{k} x{v}" for k, v in top)

    def tensor_lr(lr_device: str, flags: dict[str, Any], claim: bool) -> None:
        import torch

        from lightning_spa.optim import SPA

        case = f"SPA step, tensor lr on {lr_device}, {'fused' if flags else 'default'} path"

        def make(ps: list[Any]) -> Any:
            return SPA(ps, lr=torch.tensor(1.0, device=lr_device), c=0.1, **flags)

        n, where_ = count_steps(make)
        shown = f"{n} per step" + (f" [{where_}]" if n else "") + note
        if claim:  # the SPA docstring: a tensor lr (without fused=True) reads no host value
            rep.add("sync", case, status(n == 0), shown, "0 (tensor mode)")
        else:
            rep.add("sync", case, INFO, shown, "counted")

    def scaler_step(name: str) -> None:
        import torch

        from lightning_spa.optim import SPA

        def make(ps: list[Any]) -> Any:
            if name.startswith("SPA"):
                return SPA(ps, lr=1.0, c=0.1, fused=True)
            return torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)

        n, where_ = count_steps(make, torch.amp.GradScaler(ctx.device.type, init_scale=2.0**8))
        shown = f"{n} per step" + (f" [{where_}]" if n else "") + note
        rep.add("sync", f"GradScaler step + update, {name}", INFO, shown, "counted")

    if ctx.cuda:
        _isolated(ctx, "sync", "tensor lr, device", lambda: tensor_lr(ctx.device.type, {}, True))
        _isolated(ctx, "sync", "tensor lr, device, fused", lambda: tensor_lr(ctx.device.type, {"fused": True}, False))
        _isolated(ctx, "sync", "tensor lr, cpu", lambda: tensor_lr("cpu", {}, False))
    else:
        _isolated(ctx, "sync", "tensor lr, cpu", lambda: tensor_lr("cpu", {}, True))
    for name in ("SPA(fused=True)", "torch SGD(fused=True)"):
        _isolated(ctx, "sync", f"GradScaler step, {name}", lambda n=name: scaler_step(n))

    steps, every = 24, 4  # cheap: a small MLP
    base: dict[int, int] = {}

    def where(sources: dict[str, int]) -> str:
        top = sorted(sources.items(), key=lambda kv: -kv[1])[:3]
        return f" [{', '.join(f'{k} x{v}' for k, v in top)}]" if top else ""

    def control() -> None:
        counts, _, sources = sync_counts(ctx, [], steps)
        base.update(counts)
        shown = f"max {max(counts.values(), default=0)} per batch over {len(counts)} batches" + where(sources)
        rep.add("sync", "Lightning loop alone (control)", INFO, shown + note, "subtracted below")

    def diagnostics(label: str = "", factory: Callable[[Any], Any] | None = None, amp: bool = False) -> None:
        from lightning_spa.callbacks import MomentumDiagnostics

        control = base
        if factory is not None or amp:  # the same run without the callback (the scaler's own syncs)
            control = sync_counts(ctx, [], steps, factory, amp)[0]
        counts, logged, sources = sync_counts(ctx, [MomentumDiagnostics(every_n_steps=every)], steps, factory, amp)
        extra = {s: n - control.get(s, 0) for s, n in counts.items()}
        unmeasured = [n for s, n in extra.items() if s not in logged]
        measured = [n for s, n in extra.items() if s in logged]
        name = f"MomentumDiagnostics{label}"
        if not unmeasured or not measured:
            rep.add("sync", name, FAIL, f"{len(logged)} measured of {len(counts)} batches", "")
            return
        located = where(sources) if max(unmeasured) > 0 or max(measured) > 1 else ""
        rep.add(
            "sync",
            f"{name}, unmeasured step",
            status(max(unmeasured) == 0),
            f"max {max(unmeasured)} per batch over {len(unmeasured)} batches" + located + note,
            "0",
        )
        rep.add(
            "sync",
            f"{name}, measured step",
            status(max(measured) <= 1),
            f"max {max(measured)}, min {min(measured)} over {len(measured)} batches" + located + note,
            "<= 1",
        )

    def fused_factory(name: str) -> Callable[[Any], Any]:
        import torch

        from lightning_spa.optim import SPA

        if name.startswith("SPA"):
            return lambda ps: SPA(ps, lr=1.0, c=0.1, fused=True)
        return lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)

    def schedules(with_off: bool, amp_optimizer: str | None = None) -> None:
        from lightning_spa.callbacks import GradualSchedule, MomentumOff

        # eta halves from step 4 over 8 steps (the equivalent momentum stays < 1); momentum off at step 16.
        callbacks = [GradualSchedule(milestones=[4], factor=0.5, unit="step", transition_steps=8)]
        if with_off:
            callbacks.append(MomentumOff(after_epochs=16, unit="step"))
        name = "GradualSchedule + MomentumOff" if with_off else "GradualSchedule"
        control, factory, amp = base, None, amp_optimizer is not None
        if amp_optimizer is not None:  # the scaler's own syncs are the control's
            name += f" (16-mixed, {amp_optimizer})"
            factory = fused_factory(amp_optimizer)
            control = sync_counts(ctx, [], steps, factory, amp)[0]
        counts, _, sources = sync_counts(ctx, callbacks, steps, factory, amp)
        worst = max((n - control.get(s, 0) for s, n in counts.items()), default=0)
        shown = f"max {worst} per batch over {len(counts)} batches" + (where(sources) if worst else "")
        # Under fused AMP the callbacks read the scaler's found_inf (a skipped step does not move the clock).
        ok_status = status(worst == 0) if amp_optimizer is None else INFO
        rep.add("sync", name, ok_status, shown + note, "0" if amp_optimizer is None else "counted")

    _isolated(ctx, "sync", "Lightning loop alone (control)", control)
    _isolated(ctx, "sync", "MomentumDiagnostics", diagnostics)

    def fused_amp(name: str) -> None:
        diagnostics(f" (16-mixed, {name})", fused_factory(name), amp=True)

    for name in ("SPA(fused=True)", "torch SGD(fused=True)"):
        _isolated(ctx, "sync", f"MomentumDiagnostics (16-mixed, {name})", lambda n=name: fused_amp(n))
    _isolated(ctx, "sync", "GradualSchedule", lambda: schedules(False))
    _isolated(ctx, "sync", "GradualSchedule + MomentumOff", lambda: schedules(True))
    for name in ("SPA(fused=True)", "torch SGD(fused=True)"):
        _isolated(ctx, "sync", f"schedules (16-mixed, {name})", lambda n=name: schedules(True, n))


# -- 3. AMP -----------------------------------------------------------------------------------------


def _amp_grad_sq(ctx: Context, name: str, factory: Callable[[Any], Any], steps: int) -> None:
    """``MomentumDiagnostics`` under Lightning ``16-mixed`` (GradScaler) logs the float32 run's ``grad_sq``."""
    import torch
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.plugins.precision import MixedPrecision

    from lightning_spa.callbacks import MomentumDiagnostics

    class GradProbe(Callback):
        """``||g_k||^2`` read directly in ``on_before_optimizer_step`` (float32 run: after the backward)."""

        def __init__(self) -> None:
            self.grad_sq: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            total = sum(float(p.grad.double().square().sum()) for p in pl_module.parameters() if p.grad is not None)
            self.grad_sq[trainer.global_step] = total

    tol = 2e-2  # fp16 autocast of the forward pass vs float32; a still-scaled gradient would be off by scale**2
    runs: dict[str, Any] = {}
    probe = GradProbe()
    for precision in ("32-true", "16-mixed"):
        logger = memory_logger()
        module = fake_module(mlp, factory, (32,), 64, 10, steps)
        plugins = None
        if precision == "16-mixed":
            # A moderate initial scale, so that no step overflows: both runs take every step.
            scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**10)
            plugins = [MixedPrecision("16-mixed", ctx.device.type, scaler=scaler)]
        callbacks = [MomentumDiagnostics(every_n_steps=1, ema_decay=0.0)]  # raw samples
        if precision == "32-true":
            callbacks.append(probe)
        trainer = _fit(ctx, module, steps, callbacks, logger, precision=precision, plugins=plugins)
        runs[precision] = (logger, trainer)
    # eta = 1 for both optimizers (SPA eta 1; SGD lr 0.1, momentum 0.9), no weight decay: grad_sq = ||g||^2.
    logged = runs["32-true"][0].series("spa/grad_sq")
    common = sorted(set(logged) & set(probe.grad_sq))
    rel = max((abs(logged[s] - probe.grad_sq[s]) / max(probe.grad_sq[s], 1e-30) for s in common), default=math.inf)
    ctx.report.expect(
        "amp",
        f"{name}: 32-true logged grad_sq vs ||g||^2 read after backward",
        rel <= 1e-5 and len(common) == steps,
        f"max rel diff {rel:.1e} over {len(common)}/{steps} steps",
        "<= 1e-05, every step",
    )
    for key in ("spa/grad_sq", "spa/step_sq"):
        ref, amp = runs["32-true"][0].series(key), runs["16-mixed"][0].series(key)
        common = sorted(set(ref) & set(amp))
        case = f"{name}: {key.removeprefix('spa/')}, 16-mixed vs 32-true"
        if not common:
            ctx.report.add("amp", case, FAIL, f"logged steps: 32-true {len(ref)}, 16-mixed {len(amp)}", f"<= {tol:g}")
            continue
        rel = max(abs(amp[s] - ref[s]) / max(abs(ref[s]), 1e-30) for s in common)
        ok = rel <= tol and len(common) == steps
        measured = f"max rel diff {rel:.1e} over {len(common)}/{steps} steps"
        ctx.report.expect("amp", case, ok, measured, f"<= {tol:g}, every step")
    in_kernel = bool(getattr(runs["16-mixed"][1].optimizers[0], "_step_supports_amp_scaling", False))
    ctx.report.add(
        "amp",
        f"{name}: GradScaler unscales inside the step",
        (PASS if in_kernel else FAIL) if name.startswith("SPA") else INFO,
        "yes (_step_supports_amp_scaling)" if in_kernel else "no: the scaler unscales before the step",
        "yes",
    )


def skipped_step_difference(device: Any, factory: Callable[[list[Any]], Any], skip: int, steps: int = 4) -> float:
    """Max ``|x_amp - x_ref|`` after ``steps`` GradScaler steps whose step ``skip`` overflows, against a
    float run that never takes that step. The freed memory is poisoned with NaN right before the
    skipped step, so that a momentum buffer allocated but never written there shows."""
    import torch

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (33,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    xs = [torch.nn.Parameter(t.to(device).clone()) for t in start]
    ys = [torch.nn.Parameter(t.to(device).clone()) for t in start]
    opt, ref = factory(xs), factory(ys)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)  # a power of 2: unscaling is exact
    for k in range(steps):
        g = [t.to(device) for t in grads[k]]
        if k == skip:
            g[0] = g[0].clone()
            g[0][0, 0] = math.inf
        loss = sum((x * gi).sum() for x, gi in zip(xs, g, strict=True))
        scaler.scale(loss).backward()
        if k == skip:
            poison = [torch.full_like(gi, math.nan) for gi in g]
            del poison
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if k != skip:
            for y, gi in zip(ys, g, strict=True):
                y.grad = gi.clone()
            ref.step()
            ref.zero_grad()
    with torch.no_grad():
        return max(float((x - y).abs().max().nan_to_num(math.inf)) for x, y in zip(xs, ys, strict=True))


def check_amp(ctx: Context) -> None:
    import torch

    from lightning_spa.optim import SPA

    steps = 6 if ctx.quick else 12
    optimizers: dict[str, Callable[[Any], Any]] = {
        "SPA(fused=True)": lambda ps: SPA(ps, lr=1.0, c=0.1, fused=True),
        "torch SGD(fused=True)": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    }
    for name, factory in optimizers.items():
        _isolated(ctx, "amp", f"{name}: Lightning 16-mixed", lambda n=name, f=factory: _amp_grad_sq(ctx, n, f, steps))
    for name, factory in optimizers.items():
        for skip, when in ((0, "first step"), (2, "a later step")):
            case = f"{name}: GradScaler skips {when} (inf), no trace"

            def skipped(case: str = case, factory: Callable[[Any], Any] = factory, skip: int = skip) -> None:
                diff = skipped_step_difference(ctx.device, factory, skip)
                status = (PASS if diff <= 1e-6 else FAIL) if case.startswith("SPA") else INFO
                ctx.report.add("amp", case, status, f"max diff {diff:.1e} vs a run without that step", "<= 1e-06")

            _isolated(ctx, "amp", case, skipped)


# -- 4. speed ---------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + (f"\n{proc.stderr}" if proc.returncode else "")


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
            _fit(ctx, module, steps, [*configs[name](), clock], logger=memory_logger(), log_every_n_steps=50)
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


def check_speed(ctx: Context) -> None:
    cmd = [sys.executable, "benchmarks/optimizer_step.py", "--device", ctx.device.type]
    if not ctx.cuda:  # smoke run: one small model, a few rounds
        cmd += ["--rounds", "3", "--warmup", "1", "--models", "digits"]
    elif ctx.quick:
        cmd += ["--rounds", "20"]
    try:
        rc, out = _run(cmd, timeout=240)
        ctx.report.add(
            "speed",
            "benchmarks/optimizer_step.py",
            INFO if rc == 0 else FAIL,
            "table below" if rc == 0 else f"exit {rc}",
            "runs",
        )
        ctx.report.sections.append((f"Optimizer step: `{shlex.join(cmd[1:])}`", out.strip()))
    except subprocess.TimeoutExpired:
        ctx.report.add("speed", "benchmarks/optimizer_step.py", FAIL, "timed out after 240 s", "runs")
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


# -- 5. memory --------------------------------------------------------------------------------------


def check_memory(ctx: Context) -> None:
    import torch

    from lightning_spa.optim import SPA

    if not ctx.cuda:
        ctx.report.add("memory", "peak CUDA memory of a step", SKIP, "cpu run", "")
        return
    shapes = [tuple(p.shape) for p in resnet18().parameters()]
    mib = 2.0**20
    for path in ("foreach", "fused"):
        flags = PATHS[path]
        result = {}
        for name, factory in (
            ("SPA", lambda ps: SPA(ps, lr=1.0, c=0.1, **flags)),  # noqa: B023
            ("SGD", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, **flags)),  # noqa: B023
        ):
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, device=ctx.device)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = factory(params)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            opt.step()  # the first step allocates the buffers
            torch.cuda.synchronize()
            first = torch.cuda.max_memory_allocated() - before
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            opt.step()
            torch.cuda.synchronize()
            steady = torch.cuda.max_memory_allocated() - before
            state = sum(
                t.numel() * t.element_size()
                for s in opt.state.values()
                for t in s.values()
                if isinstance(t, torch.Tensor)
            )
            result[name] = (first, steady, state)
            del opt, params
            torch.cuda.empty_cache()
        (f_spa, s_spa, st_spa), (f_sgd, s_sgd, st_sgd) = result["SPA"], result["SGD"]
        slack = 1.0 * mib
        ctx.report.expect(
            "memory",
            f"{path}: optimizer state, SPA vs SGD",
            st_spa == st_sgd,
            f"{st_spa / mib:.1f} vs {st_sgd / mib:.1f} MiB",
            "equal (one buffer)",
        )
        ctx.report.expect(
            "memory",
            f"{path}: peak of a step (first; steady)",
            f_spa <= f_sgd + slack and s_spa <= s_sgd + slack,
            f"SPA {f_spa / mib:.1f}; {s_spa / mib:.1f} vs SGD {f_sgd / mib:.1f}; {s_sgd / mib:.1f} MiB",
            "SPA <= SGD + 1 MiB",
        )


# -- 6. pytest -m cuda ------------------------------------------------------------------------------


def check_pytest(ctx: Context) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    try:
        rc, out = _run(cmd, timeout=240)
    except subprocess.TimeoutExpired:
        ctx.report.add("pytest", "pytest -m cuda", FAIL, "timed out after 240 s", "all pass")
        return
    counts = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b")
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if counts.search(ln)), out.strip()[-160:])
    ok = rc == 0 and ("skipped" not in summary or not ctx.cuda)
    status = (PASS if ok else FAIL) if ctx.cuda else (SKIP if rc == 0 else FAIL)
    ctx.report.add("pytest", "pytest -m cuda", status, summary[:160], "all pass, none skipped")
    ctx.report.sections.append(("`pytest -m cuda`", "```\n" + "\n".join(out.strip().splitlines()[-40:]) + "\n```"))


CHECKS: dict[str, tuple[Callable[[Context], None], str]] = {
    "trajectory": (check_trajectory, "SPA vs torch SGD under Theorem 1, loop/foreach/fused/default, fp32 and bf16"),
    "sync": (check_sync, "host syncs: SPA step, MomentumDiagnostics (unmeasured/measured), schedule callbacks"),
    "amp": (check_amp, "16-mixed + GradScaler, SPA and torch fused SGD: diagnostics grad_sq equals float32's"),
    "speed": (check_speed, "optimizer_step.py --device cuda; diagnostics overhead on ResNet-18 (default, every 1)"),
    "memory": (check_memory, "peak CUDA memory of a step and optimizer state, SPA vs torch SGD"),
    "pytest": (check_pytest, "pytest -m cuda"),
}


# -- driver -----------------------------------------------------------------------------------------


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    """``commit`` of the checkout, ``+ local changes`` when the tree differs from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "no git"
    if rev.returncode:
        return "not a git checkout"
    return f"commit {rev.stdout.strip()}" + (" + local changes" if dirty.stdout.strip() else "")


def _environment(ctx: Context, argv: list[str]) -> list[str]:
    import torch

    lines = [
        f"command: `{shlex.join(['python', 'benchmarks/gpu_check.py', *argv])}`",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"pytorch_lightning {_version('pytorch_lightning')}, schedulefree {_version('schedulefree')}",
        f"lightning_spa: {_git_revision()}",
    ]
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        lines.append(
            f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
        )
    else:
        lines.append("device: cpu (smoke run of the script: not GPU figures)")
    return lines


def render(report: Report, header: list[str], elapsed: float) -> str:
    out = ["# GPU check", "", *[f"- {ln}" for ln in header], f"- total time: {elapsed:.0f} s", ""]
    out += ["| check | case | status | measured | expected |", "|---|---|---|---|---|"]
    for r in report.rows:
        cells = (r.check, r.case, r.status, r.measured, r.expected)
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out.append("")
    out.append("Time per check: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items()))
    for title, body in report.sections:
        out += ["", f"## {title}", "", body]
    if report.errors:
        out += ["", "## Errors", ""]
        for where, tb in report.errors:
            out += [f"### {where}", "", "```", tb.strip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


@contextlib.contextmanager
def _reset_after(ctx: Context) -> Iterator[None]:
    import torch

    try:
        yield
    finally:
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (~1-2 minutes)")
    parser.add_argument("--list", action="store_true", help="print the checks and exit (no device needed)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of: {', '.join(CHECKS)}")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"markdown file to write (default {DEFAULT_OUT.relative_to(ROOT)} on cuda; none on cpu)",
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cuda (default); cpu only smoke-tests this script, its numbers are not GPU figures",
    )
    args = parser.parse_args(argv)
    selected = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in selected if c not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    if args.list:
        for i, name in enumerate(CHECKS, 1):
            print(f"{i}. {name:<10} {CHECKS[name][1]}")
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(
            f"no CUDA device: torch {torch.__version__} ({built}) sees no GPU; run this on a GPU machine "
            "(`--list` shows the checks, `--device cpu` smoke-tests the script)",
            file=sys.stderr,
        )
        return 2

    _quiet_lightning()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(torch.device(args.device), args.quick, Report(), Path(tmp))
        header = _environment(ctx, argv)
        print("\n".join(header), flush=True)
        for name in selected:
            fn = CHECKS[name][0]
            t0 = time.perf_counter()
            n_rows = len(ctx.report.rows)
            try:
                with _reset_after(ctx):
                    fn(ctx)
            except Exception as err:  # isolate: report and go on
                ctx.report.add(name, "(check aborted)", FAIL, f"{type(err).__name__}: {err}"[:200])
                ctx.report.errors.append((name, traceback.format_exc()))
            ctx.report.seconds[name] = time.perf_counter() - t0
            for r in ctx.report.rows[n_rows:]:
                print(f"  {r.status:<4} {r.check:<10} {r.case}: {r.measured}", flush=True)
    text = render(ctx.report, header, time.perf_counter() - t_start)
    print()
    print(text)
    out = args.out if args.out is not None else (DEFAULT_OUT if ctx.cuda else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written: {out}")
    failed = [r for r in ctx.report.rows if r.status == FAIL]
    if failed:
        print(f"{len(failed)} check(s) FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
