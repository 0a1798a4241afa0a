"""Lightning callbacks: thin adapters over :mod:`lightning_spa.schedule` and the diagnostics math.

Imported lazily, like the top-level package, so ``import lightning_spa.callbacks._adapter``
style imports of the pure helpers stay cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "GradualSchedule": "lightning_spa.callbacks.schedules",
    "MomentumOff": "lightning_spa.callbacks.schedules",
    "MomentumDiagnostics": "lightning_spa.callbacks.diagnostics",
    "MeasuredMomentumOff": "lightning_spa.callbacks.measured",
}

__all__ = ["GradualSchedule", "MeasuredMomentumOff", "MomentumDiagnostics", "MomentumOff"]

if TYPE_CHECKING:
    from lightning_spa.callbacks.diagnostics import MomentumDiagnostics
    from lightning_spa.callbacks.measured import MeasuredMomentumOff
    from lightning_spa.callbacks.schedules import GradualSchedule, MomentumOff


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_spa.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
