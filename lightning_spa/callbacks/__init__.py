"""Lightning callbacks: thin adapters over :mod:`lightning_spa.schedule` and the diagnostics math."""

__all__: list[str] = []
