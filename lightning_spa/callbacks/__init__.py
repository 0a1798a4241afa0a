"""Lightning callbacks: thin adapters over :mod:`lightning_spa.schedule` and the diagnostics math.

Imported lazily, like the top-level package, so ``import lightning_spa.callbacks._adapter``
style imports of the pure helpers stay cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_spa._lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
