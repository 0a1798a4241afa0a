"""MomentumDiagnostics logs the single-process numbers under 2-process DDP and FSDP2 (CPU, gloo).

Each run is a subprocess (``tests/diagnostics_dist_script.py``) with a timeout, so a hanging
rank fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from multiprocess import run_script
from test_diagnostics import read_scalars

SCRIPT = Path(__file__).with_name("diagnostics_dist_script.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _run(mode: str, optimizer: str, out: Path, cheap: bool = False) -> dict[str, dict[int, float]]:
    args = [str(SCRIPT), mode, optimizer, str(out), *(["cheap"] if cheap else [])]
    run_script(args, cwd=out.parent, what=f"the {mode} run")
    return read_scalars(out / "tb" / "version_0")


def _assert_same(reference: dict[str, dict[int, float]], other: dict[str, dict[int, float]]) -> None:
    """``other``'s spa/* series equal ``reference``'s (those it logs: the cheap measurement logs no cosine)."""
    cheap = "spa/cosine" not in other
    tags = {t for t in reference if t.startswith("spa/") and not (cheap and t.startswith("spa/cosine"))}
    assert tags == {t for t in other if t.startswith("spa/")}
    assert {"spa/ratio", "spa/ratio/body", "spa/step_sq/1"} <= tags and (cheap or "spa/cosine" in tags)
    for tag in tags:
        assert reference[tag].keys() == other[tag].keys(), tag
        for step, value in reference[tag].items():
            assert other[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


@pytest.mark.parametrize(
    ("optimizer", "modes"),
    # DDP takes the same (communication-free) path for both optimizers: checked once, to save time.
    [("spa", ("ddp", "fsdp")), ("sgd", ("fsdp",))],
)
def test_ddp_and_fsdp2_log_the_single_process_numbers(tmp_path: Path, optimizer: str, modes: tuple[str, ...]) -> None:
    single = _run("single", optimizer, tmp_path / "single")
    assert len(single["spa/ratio"]) == 30
    for mode in modes:
        _assert_same(single, _run(mode, optimizer, tmp_path / mode))
    for mode in modes:  # every rank: the same clock, and the monitor value of the single process
        for rank in (0, 1):
            held = json.loads((tmp_path / mode / f"callback_rank{rank}.json").read_text())
            assert held["clock"] == 30
            assert held["ratio"] == pytest.approx(single["spa/ratio"][29], rel=1e-6)
    # The cheap measurement (two norms per parameter after the step) under FSDP2: the same numbers.
    _assert_same(single, _run("fsdp", optimizer, tmp_path / "fsdp_cheap", cheap=True))
    for rank in (0, 1):  # the FSDP2 parameters really were sharded
        shards = json.loads((tmp_path / "fsdp" / f"params_rank{rank}.json").read_text())
        assert all(s["type"] == "DTensor" for s in shards)
        assert all(s["local"][0] < s["full"][0] for s in shards)
