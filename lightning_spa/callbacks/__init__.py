"""Lightning callbacks: thin adapters over :mod:`lightning_spa.schedule` and the diagnostics math."""

from lightning_spa.callbacks.diagnostics import MomentumDiagnostics
from lightning_spa.callbacks.schedules import GradualSchedule, MomentumOff

__all__: list[str] = ["GradualSchedule", "MomentumDiagnostics", "MomentumOff"]
