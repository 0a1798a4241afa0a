"""Runs a multi-process (DDP / FSDP2 on gloo) test script in a subprocess, with a timeout.

A new session, so that a hanging run is killed with every rank it launched, and the test fails
instead of blocking the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def run_script(args: list[str], cwd: Path, what: str, extra_env: dict[str, str] | None = None) -> None:
    """Runs ``python *args`` in ``cwd`` with the repository on ``PYTHONPATH``; fails the test on a
    non-zero exit (with the end of stderr) or after :data:`TIMEOUT_S` seconds (``what`` hangs)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(extra_env or {})}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} did not finish within {TIMEOUT_S} s: a rank hangs")
    assert proc.returncode == 0, stderr[-3000:]


def end_ranks() -> None:
    """Called by each rank of a multi-process script when it is done: a barrier, then the process group
    destroyed, so that gloo's threads are joined before the interpreter exits (otherwise a rank can die
    at exit with "terminate called without an active exception", seen under load)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
