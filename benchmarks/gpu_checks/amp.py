"""Check 3, ``amp``: Lightning ``16-mixed`` with a GradScaler, ``SPA(fused=True)`` and torch fused SGD.

With ``MomentumDiagnostics``, the logged ``grad_sq`` equals ``||g||^2`` read after the backward
(float32 run) and the float32 run's (16-mixed run); a step the scaler skips leaves no trace (first
step and later).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._common import FAIL, FUSED, INFO, PASS, Context, isolated
from ._fit import fit, memory_logger, mixed_precision, mlp_module


def _amp_grad_sq(ctx: Context, name: str, factory: Callable[[Any], Any], steps: int) -> None:
    """``MomentumDiagnostics`` under Lightning ``16-mixed`` (GradScaler) logs the float32 run's ``grad_sq``."""
    from pytorch_lightning.callbacks import Callback

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
        module = mlp_module(factory, steps)
        # A moderate initial scale, so that no step overflows: both runs take every step.
        plugins = mixed_precision(ctx) if precision == "16-mixed" else None
        callbacks = [MomentumDiagnostics(every_n_steps=1, ema_decay=0.0)]  # raw samples
        if precision == "32-true":
            callbacks.append(probe)
        trainer = fit(ctx, module, steps, callbacks, logger, precision=precision, plugins=plugins)
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


def check(ctx: Context) -> None:
    steps = 6 if ctx.quick else 12
    for name, factory in FUSED.items():
        isolated(ctx, "amp", f"{name}: Lightning 16-mixed", lambda n=name, f=factory: _amp_grad_sq(ctx, n, f, steps))
    for name, factory in FUSED.items():
        for skip, when in ((0, "first step"), (2, "a later step")):
            case = f"{name}: GradScaler skips {when} (inf), no trace"

            def skipped(case: str = case, factory: Callable[[Any], Any] = factory, skip: int = skip) -> None:
                diff = skipped_step_difference(ctx.device, factory, skip)
                status = (PASS if diff <= 1e-6 else FAIL) if case.startswith("SPA") else INFO
                ctx.report.add("amp", case, status, f"max diff {diff:.1e} vs a run without that step", "<= 1e-06")

            isolated(ctx, "amp", case, skipped)
