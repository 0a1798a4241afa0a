"""Result rows, the run context and the optimizer paths shared by the checks."""

from __future__ import annotations

import os
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

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

    def failed(self, check: str, case: str, err: Exception, where: str, width: int = 160) -> None:
        """The exception being handled as a FAIL row (``width`` characters) and its traceback as an error section."""
        self.add(check, case, FAIL, f"{type(err).__name__}: {err}"[:width])
        self.errors.append((where, traceback.format_exc()))


@dataclass
class Context:
    device: Any  # torch.device
    quick: bool
    report: Report
    tmp: Path

    @property
    def cuda(self) -> bool:
        return bool(self.device.type == "cuda")


def isolated(ctx: Context, check: str, case: str, fn: Callable[[], None]) -> None:
    """Runs one case of a check; an exception becomes a FAIL row (and its traceback an error section)."""
    try:
        fn()
    except Exception as err:
        ctx.report.failed(check, case, err, f"{check}: {case}")


def run(
    ctx: Context, check: str, case: str, expected: str, cmd: list[str], timeout: int = 240
) -> tuple[int, str] | None:
    """``(exit status, stdout)`` of ``cmd`` run from the repository root (stderr appended on failure);
    ``None``, and a FAIL row ``case``, if it runs past ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        ctx.report.add(check, case, FAIL, f"timed out after {timeout} s", expected)
        return None
    return proc.returncode, proc.stdout + (f"\n{proc.stderr}" if proc.returncode else "")


PATHS: dict[str, dict[str, Any]] = {
    "loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
}
# torch SGD counterpart of each SPA path. "default" against torch SGD's own default: SPA's default takes the fused
# kernel where it updates the parameters and torch SGD's default where it does not (bfloat16/float16 on the CPU,
# pytorch/pytorch#191763), so the two defaults agree to round-off on every dtype.
SGD_PATHS: dict[str, dict[str, Any]] = {**PATHS, "default": {}}


def _spa_fused(params: Any) -> Any:
    from lightning_spa.optim import SPA

    return SPA(params, lr=1.0, c=0.1, fused=True)


def _sgd_fused(params: Any) -> Any:
    import torch

    return torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)


# The fused optimizers the AMP rows compare, with eta = 1 for both (SGD lr 0.1, momentum 0.9).
FUSED: dict[str, Callable[[Any], Any]] = {"SPA(fused=True)": _spa_fused, "torch SGD(fused=True)": _sgd_fused}


def random_params(device: Any) -> list[Any]:
    """Three parameters (a matrix, a bias, a long vector) of standard normal values on ``device``."""
    import torch

    return [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((64, 32), (32,), (1000,))]
