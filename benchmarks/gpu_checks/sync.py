"""Check 2, ``sync``: host-device synchronisations, counted with ``torch.cuda.set_sync_debug_mode``.

An SPA step with a float ``lr`` makes none (``"error"`` mode), nor with a tensor ``lr`` on the device;
``MomentumDiagnostics`` none on an unmeasured step and at most one on a measured step (also under
``16-mixed`` with fused SPA and fused torch SGD); the schedule callbacks none. Counted for
information: a tensor ``lr`` with ``fused=True`` or on the CPU, a GradScaler step. Fit-loop counts
are per batch, less a control run without the callbacks under test (the loop's and scaler's own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import FAIL, FUSED, INFO, PASS, PATHS, SKIP, Context, isolated, random_params
from ._sync_windows import SyncWindows, sync_counts, top_sources


def spa_steps_under_error_mode(device: Any, flags: dict[str, Any]) -> None:
    """Six SPA steps with a float ``lr`` (the first step, steady state, an ``eta`` and ``c`` change),
    each under ``torch.cuda.set_sync_debug_mode("error")`` on CUDA: a host sync raises."""
    import torch

    from lightning_spa.optim import SPA

    on_cuda = device.type == "cuda"
    params = random_params(device)
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


def extra_syncs(
    ctx: Context,
    callbacks: list[Any],
    steps: int,
    optimizer_factory: Callable[[Any], Any] | None = None,
    amp: bool = False,
    control: dict[int, int] | None = None,
) -> tuple[dict[int, int], set[int], dict[str, int]]:
    """:func:`sync_counts` with ``callbacks`` less those of the same fit without them (``control``,
    run here unless given): ``({step: extra syncs}, steps measured, {"file:line": syncs})``."""
    if control is None:
        control = sync_counts(ctx, [], steps, optimizer_factory, amp)[0]
    counts, logged, sources = sync_counts(ctx, callbacks, steps, optimizer_factory, amp)
    return {s: n - control.get(s, 0) for s, n in counts.items()}, logged, sources


def count_steps(
    ctx: Context, make_opt: Callable[[list[Any]], Any], scaler: Any = None, steps: int = 4
) -> tuple[int, str]:
    """``(N, "N per step [where]")``: the most syncs of a step (first step included) of an optimizer on
    3 tensors, optionally through a GradScaler (``scaler.step`` and ``scaler.update``), and where the
    worst ones come from."""
    import torch

    windows = SyncWindows(ctx.cuda)
    params = random_params(ctx.device)
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
    n = max(n for _, n in windows.counts["step"])
    return n, f"{n} per step" + (top_sources(windows.sources, 2) if n else "")


def check(ctx: Context) -> None:
    rep = ctx.report
    note = "" if ctx.cuda else " (cpu: nothing to count)"

    def status(ok: bool) -> str:
        return (PASS if ok else FAIL) if ctx.cuda else SKIP

    for path, flags in PATHS.items():

        def float_lr(flags: dict[str, Any] = flags, path: str = path) -> None:
            spa_steps_under_error_mode(ctx.device, flags)
            rep.add("sync", f"SPA step, float lr, {path}", status(True), "none in 6 steps (mode 'error')" + note, "0")

        isolated(ctx, "sync", f"SPA step, float lr, {path}", float_lr)

    def tensor_lr(lr_device: str, flags: dict[str, Any], claim: bool) -> None:
        import torch

        from lightning_spa.optim import SPA

        case = f"SPA step, tensor lr on {lr_device}, {'fused' if flags else 'default'} path"

        def make(ps: list[Any]) -> Any:
            return SPA(ps, lr=torch.tensor(1.0, device=lr_device), c=0.1, **flags)

        n, shown = count_steps(ctx, make)
        if claim:  # the SPA docstring: a tensor lr (without fused=True) reads no host value
            rep.add("sync", case, status(n == 0), shown + note, "0 (tensor mode)")
        else:
            rep.add("sync", case, INFO, shown + note, "counted")

    def scaler_step(name: str) -> None:
        import torch

        _, shown = count_steps(ctx, FUSED[name], torch.amp.GradScaler(ctx.device.type, init_scale=2.0**8))
        rep.add("sync", f"GradScaler step + update, {name}", INFO, shown + note, "counted")

    if ctx.cuda:
        isolated(ctx, "sync", "tensor lr, device", lambda: tensor_lr(ctx.device.type, {}, True))
        isolated(ctx, "sync", "tensor lr, device, fused", lambda: tensor_lr(ctx.device.type, {"fused": True}, False))
        isolated(ctx, "sync", "tensor lr, cpu", lambda: tensor_lr("cpu", {}, False))
    else:
        isolated(ctx, "sync", "tensor lr, cpu", lambda: tensor_lr("cpu", {}, True))
    for name in FUSED:
        isolated(ctx, "sync", f"GradScaler step, {name}", lambda n=name: scaler_step(n))

    steps, every = 24, 4  # cheap: a small MLP
    base: dict[int, int] = {}

    def control() -> None:
        counts, _, sources = sync_counts(ctx, [], steps)
        base.update(counts)
        shown = f"max {max(counts.values(), default=0)} per batch over {len(counts)} batches" + top_sources(sources)
        rep.add("sync", "Lightning loop alone (control)", INFO, shown + note, "subtracted below")

    def diagnostics(label: str = "", factory: Callable[[Any], Any] | None = None, amp: bool = False) -> None:
        from lightning_spa.callbacks import MomentumDiagnostics

        # the same run without the callback is the control: with AMP, the scaler's own syncs
        own = base if factory is None and not amp else None
        extra, logged, sources = extra_syncs(ctx, [MomentumDiagnostics(every_n_steps=every)], steps, factory, amp, own)
        unmeasured = [n for s, n in extra.items() if s not in logged]
        measured = [n for s, n in extra.items() if s in logged]
        name = f"MomentumDiagnostics{label}"
        if not unmeasured or not measured:
            rep.add("sync", name, FAIL, f"{len(logged)} measured of {len(extra)} batches", "")
            return
        located = top_sources(sources) if max(unmeasured) > 0 or max(measured) > 1 else ""
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

    def schedules(with_off: bool, amp_optimizer: str | None = None) -> None:
        from lightning_spa.callbacks import GradualSchedule, MomentumOff

        # eta halves from step 4 over 8 steps (the equivalent momentum stays < 1); momentum off at step 16.
        callbacks = [GradualSchedule(milestones=[4], factor=0.5, unit="step", transition_steps=8)]
        if with_off:
            callbacks.append(MomentumOff(after_epochs=16, unit="step"))
        name = "GradualSchedule + MomentumOff" if with_off else "GradualSchedule"
        if amp_optimizer is None:
            extra, _, sources = extra_syncs(ctx, callbacks, steps, control=base)
        else:  # the scaler's own syncs are the control's
            name += f" (16-mixed, {amp_optimizer})"
            extra, _, sources = extra_syncs(ctx, callbacks, steps, FUSED[amp_optimizer], amp=True)
        worst = max(extra.values(), default=0)
        shown = f"max {worst} per batch over {len(extra)} batches" + (top_sources(sources) if worst else "")
        # Under fused AMP the callbacks read the scaler's found_inf (a skipped step does not move the clock).
        ok_status = status(worst == 0) if amp_optimizer is None else INFO
        rep.add("sync", name, ok_status, shown + note, "0" if amp_optimizer is None else "counted")

    isolated(ctx, "sync", "Lightning loop alone (control)", control)
    isolated(ctx, "sync", "MomentumDiagnostics", diagnostics)

    def fused_amp(name: str) -> None:
        diagnostics(f" (16-mixed, {name})", FUSED[name], amp=True)

    for name in FUSED:
        isolated(ctx, "sync", f"MomentumDiagnostics (16-mixed, {name})", lambda n=name: fused_amp(n))
    isolated(ctx, "sync", "GradualSchedule", lambda: schedules(False))
    isolated(ctx, "sync", "GradualSchedule + MomentumOff", lambda: schedules(True))
    for name in FUSED:
        isolated(ctx, "sync", f"schedules (16-mixed, {name})", lambda n=name: schedules(True, n))
