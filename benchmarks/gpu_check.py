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
Each check is a module of ``benchmarks/gpu_checks/`` with one entry point, ``check(ctx)``; this
file is the driver: the options, the registry, each check isolated, the summary table.

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
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) not in sys.path:  # the checks, however this file is run or imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_checks import amp, memory, pytest_run, speed, sync, trajectory
from gpu_checks._common import FAIL, ROOT, Context, Report
from gpu_checks._fit import quiet_lightning

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.md"

CHECKS: dict[str, tuple[Callable[[Context], None], str]] = {
    "trajectory": (trajectory.check, "SPA vs torch SGD under Theorem 1, loop/foreach/fused/default, fp32 and bf16"),
    "sync": (sync.check, "host syncs: SPA step, MomentumDiagnostics (unmeasured/measured), schedule callbacks"),
    "amp": (amp.check, "16-mixed + GradScaler, SPA and torch fused SGD: diagnostics grad_sq equals float32's"),
    "speed": (speed.check, "optimizer_step.py --device cuda; diagnostics overhead on ResNet-18 (default, every 1)"),
    "memory": (memory.check, "peak CUDA memory of a step and optimizer state, SPA vs torch SGD"),
    "pytest": (pytest_run.check, "pytest -m cuda"),
}


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

    quiet_lightning()
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
                ctx.report.failed(name, "(check aborted)", err, name, width=200)
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
