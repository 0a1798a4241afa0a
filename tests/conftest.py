from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/spa_reference.py and other helpers

from lightning_spa._lightning import PACKAGE_NAMES as LIGHTNING_PACKAGES  # tests taking `package` run under each

CUDA_SKIP_REASON = "no CUDA device (torch.cuda.is_available() is False); `pytest -m cuda` runs these on a GPU"


def pytest_configure(config: pytest.Config) -> None:
    # Registered here as well as in pyproject.toml, so that `-m cuda` and `--strict-markers` work
    # whichever configuration file pytest picked up.
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; `pytest -m cuda` selects them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are reported as skipped, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits64() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits as float64 images ``(1797, 1, 8, 8)`` and labels."""
    from lightning_spa.demos.digits import load_digits_tensors

    return load_digits_tensors(torch.float64)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small models on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sys.argv`` without pytest's own arguments: a test that runs ``LightningCLI(args=...)`` would otherwise
    get Lightning's warning that both ``args`` and command-line arguments were given."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture(params=LIGHTNING_PACKAGES)
def package(request: pytest.FixtureRequest) -> ModuleType:
    """The Lightning package (``pytorch_lightning`` or ``lightning.pytorch``) whose Trainer, loggers and CLI
    a test uses: a test taking this fixture runs once under each."""
    return importlib.import_module(request.param)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Per Lightning package: how many tests ran under it, and which (module::test)."""
    runs: dict[str, dict[str, int]] = {name: {} for name in LIGHTNING_PACKAGES}
    tests: dict[str, set[str]] = {name: set() for name in LIGHTNING_PACKAGES}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            when = getattr(report, "when", "call")
            if "[" not in nodeid or when not in ("call", "setup") or (outcome == "passed" and when != "call"):
                continue
            params = nodeid[nodeid.index("[") + 1 : -1].split("-")
            for name in LIGHTNING_PACKAGES:
                if name in params:
                    runs[name][outcome] = runs[name].get(outcome, 0) + 1
                    tests[name].add(nodeid[: nodeid.index("[")].removeprefix("tests/"))
    if not any(runs.values()):
        return
    terminalreporter.section("Lightning packages")
    for name, counts in runs.items():
        summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "no test"
        terminalreporter.write_line(f"{name}: {summary}: {', '.join(sorted(tests[name]))}")
