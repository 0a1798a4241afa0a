from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/spa_reference.py and other helpers


@pytest.fixture(scope="session")
def digits64() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits as float64 images ``(1797, 1, 8, 8)`` and labels."""
    from lightning_spa.demos.digits import load_digits_tensors

    return load_digits_tensors(torch.float64)
