from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/spa_reference.py and other helpers

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
