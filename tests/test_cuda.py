"""The CUDA paths, and the CPU side of the GPU check.

Tests marked ``cuda`` need a CUDA device: ``pytest -m cuda`` selects them, and without CUDA they
are reported as skipped with the reason (``tests/conftest.py``). They use the helpers of the
checks in ``benchmarks/gpu_checks/``; ``benchmarks/gpu_check.py`` runs them too. The unmarked tests
run everywhere: the GPU check without CUDA (one line, exit status 2), its check list, a CPU smoke
run, and the marker.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from spa_reference import ReferenceSPA

from lightning_spa.optim import SPA
from lightning_spa.theorem import step_spa_to_sgdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_checks._common import PATHS as FLAGS  # noqa: E402
from gpu_checks._common import SGD_PATHS, Context, Report  # noqa: E402
from gpu_checks.amp import skipped_step_difference  # noqa: E402
from gpu_checks.sync import extra_syncs, spa_steps_under_error_mode  # noqa: E402
from gpu_checks.trajectory import quadratic, schedule  # noqa: E402

cuda = pytest.mark.cuda
PATHS = list(FLAGS)


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``python args...`` from the repository root as if no GPU existed."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# -- CUDA -------------------------------------------------------------------------------------------


def _trajectories(path: str, dtype: torch.dtype, steps: int = 60) -> tuple[float, float, float]:
    """``(max |x_spa - x_sgd|, max |x_spa - x_ref|, max |x|)`` along :func:`gpu_checks.trajectory.schedule`, where SGD
    gets its ``lr``/``momentum`` from Theorem 1 each step and ``ref`` is the literal SPA recursion in
    float64; gradients of a noisy diagonal quadratic, each run at its own iterate."""
    device = torch.device("cuda")
    start, curv, noise = quadratic(steps)
    xs = [torch.nn.Parameter(t.to(device, dtype).clone()) for t in start]
    ys = [torch.nn.Parameter(t.to(device, dtype).clone()) for t in start]
    rs = [torch.nn.Parameter(t.to(device, torch.float64).clone()) for t in start]
    sched = schedule(steps)
    spa = SPA(xs, lr=sched[0][0], c=sched[0][1], **FLAGS[path])
    sgd = torch.optim.SGD(ys, lr=0.1, momentum=0.9, **SGD_PATHS[path])
    ref = ReferenceSPA(rs)
    prev: tuple[float, float] | None = None
    d_sgd = d_ref = scale = 0.0
    for k, (eta, c) in enumerate(sched):
        spa.param_groups[0]["lr"], spa.param_groups[0]["c"] = eta, c
        sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"] = step_spa_to_sgdm(eta, c, prev)
        prev = (eta, c)
        for params in (xs, ys, rs):
            for p, a, n in zip(params, curv, noise[k], strict=True):
                p.grad = (a.to(device) * p.detach().double() + n.to(device)).to(p.dtype)
        spa.step()
        sgd.step()
        ref.step(eta, c)
        with torch.no_grad():
            for x, y, r in zip(xs, ys, rs, strict=True):
                d_sgd = max(d_sgd, float((x.double() - y.double()).abs().max()))
                d_ref = max(d_ref, float((x.double() - r).abs().max()))
                scale = max(scale, float(r.abs().max()))
    return d_sgd, d_ref, scale


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", PATHS)
def test_spa_matches_theorem1_sgd_on_cuda(path: str, dtype: torch.dtype) -> None:
    d_sgd, d_ref, scale = _trajectories(path, dtype)
    # The same recursion: equal up to round-off (bfloat16 keeps 8 bits: ten units in the last place).
    assert d_sgd <= (1e-5 if dtype == torch.float32 else 4e-2) * scale
    if dtype == torch.float32:  # and the paper's recursion, computed in float64
        assert d_ref <= 1e-4 * scale


@cuda
@pytest.mark.parametrize("lr_device", ["cuda", "cpu"])
@pytest.mark.parametrize("path", PATHS)
def test_tensor_lr_on_cuda_equals_float_lr(path: str, lr_device: str) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    start = [torch.randn(s, device=device) for s in ((16, 8), (8,))]
    a = [torch.nn.Parameter(t.clone()) for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    flags = FLAGS[path]
    opt_t = SPA(a, lr=torch.tensor(1.0, device=lr_device), c=0.1, **flags)
    opt_f = SPA(b, lr=1.0, c=0.1, **flags)
    for k in range(6):
        if k == 3:  # a schedule change, written as a tensor
            opt_t.param_groups[0]["lr"] = torch.tensor(0.5, device=lr_device)
            opt_f.param_groups[0]["lr"] = 0.5
        grads = [torch.randn_like(t) for t in start]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_t.step()
        opt_f.step()
    for p, q in zip(a, b, strict=True):  # tensor mode rounds alpha = c * eta in float32: not the same bits
        torch.testing.assert_close(p, q)


@cuda
def test_tensor_lr_on_the_device_makes_no_host_sync() -> None:
    """SPA's docstring: a one-element tensor ``lr`` on the device (without ``fused=True``) reads no host value."""
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((16, 8), (8,))]
    opt = SPA(params, lr=torch.tensor(1.0, device=device), c=0.1)
    for k in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        if k == 2:
            opt.param_groups[0]["lr"] = torch.tensor(0.5, device=device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("skip", [0, 2], ids=["first-step", "later-step"])
@pytest.mark.parametrize("path", ["fused", "default", "foreach"])
def test_grad_scaler_skipped_inf_step_leaves_no_trace_on_cuda(path: str, skip: int) -> None:
    """A step the GradScaler skips (inf gradient) changes neither the parameters nor the state: the run
    equals one that never took it. Memory freed before the skipped step is poisoned with NaN, so
    a momentum buffer allocated there but never written (torch fused SGD's first step) shows."""
    flags = FLAGS[path]
    diff = skipped_step_difference(torch.device("cuda"), lambda ps: SPA(ps, lr=1.0, c=0.1, **flags), skip)
    assert diff <= 1e-6


@cuda
def test_grad_scaler_scale_is_halved_by_a_skipped_spa_fused_step() -> None:
    device = torch.device("cuda")
    p = torch.nn.Parameter(torch.ones(8, device=device))
    opt = SPA([p], lr=1.0, c=0.1, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
    scaler.scale((p * torch.full_like(p, math.inf)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 128.0
    assert torch.equal(p.detach(), torch.ones_like(p))


@cuda
@pytest.mark.parametrize("path", PATHS)
def test_spa_step_with_float_lr_makes_no_host_sync(path: str) -> None:
    spa_steps_under_error_mode(torch.device("cuda"), FLAGS[path])  # raises on a sync


def _context(tmp_path: Path) -> Any:
    return Context(torch.device("cuda"), True, Report(), tmp_path)


FACTORIES = {
    "SPA": lambda ps: SPA(ps, lr=1.0, c=0.1),
    "SPA-fused": lambda ps: SPA(ps, lr=1.0, c=0.1, fused=True),
    "SGD-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
}


@cuda
@pytest.mark.parametrize(("optimizer", "amp"), [("SPA", False), ("SPA-fused", True), ("SGD-fused", True)])
def test_momentum_diagnostics_syncs_on_cuda(tmp_path: Path, optimizer: str, amp: bool) -> None:
    """No host sync on an unmeasured step, at most one on a measured step, with and without 16-mixed
    AMP (the same fit without the callback is the control: the scaler's own syncs are not counted)."""
    from lightning_spa.callbacks import MomentumDiagnostics

    ctx, factory = _context(tmp_path), FACTORIES[optimizer]
    extra, logged, sources = extra_syncs(ctx, [MomentumDiagnostics(every_n_steps=4)], 12, factory, amp)
    assert logged, "nothing was measured"
    assert all(n == 0 for s, n in extra.items() if s not in logged), (extra, logged, sources)
    assert all(n <= 1 for s, n in extra.items() if s in logged), (extra, logged, sources)


@cuda
def test_schedule_callbacks_make_no_host_sync_on_cuda(tmp_path: Path) -> None:
    from lightning_spa.callbacks import GradualSchedule, MomentumOff

    callbacks = [
        GradualSchedule(milestones=[4], factor=0.5, unit="step", transition_steps=8),
        MomentumOff(after_epochs=16, unit="step"),
    ]
    extra, _, sources = extra_syncs(_context(tmp_path), callbacks, 24)
    assert all(n == 0 for n in extra.values()), (extra, sources)


# -- CPU side of the GPU check ----------------------------------------------------------------------


def test_gpu_check_without_cuda_says_so_in_one_line() -> None:
    proc = _run(["benchmarks/gpu_check.py", "--quick"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpu_check_lists_its_checks_without_a_device() -> None:
    proc = _run(["benchmarks/gpu_check.py", "--list"])
    assert proc.returncode == 0, proc.stderr
    for name in ("trajectory", "sync", "amp", "speed", "memory", "pytest"):
        assert name in proc.stdout


def test_gpu_check_cpu_smoke_run_passes_and_writes_nothing() -> None:
    proc = _run(["benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--checks", "trajectory"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| trajectory | fused, bfloat16 | PASS |" in proc.stdout
    assert "FAIL" not in proc.stdout
    assert "written:" not in proc.stdout  # a CPU run is not a GPU result


def test_cuda_marker_selects_the_cuda_tests_and_skips_them_with_the_reason() -> None:
    proc = _run(["-m", "pytest", "-m", "cuda", "-q", "-rs", "--strict-markers", "-p", "no:cacheprovider",
                 "tests/test_cuda.py"])  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "PytestUnknownMarkWarning" not in out
    assert "passed" not in out.splitlines()[-1]  # nothing ran: no CUDA in the child
    assert " skipped" in out and " deselected" in out  # the cuda tests skipped, the others deselected
    assert "no CUDA device" in out  # the reason, from -rs
