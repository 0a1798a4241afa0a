"""The checks of ``benchmarks/gpu_check.py``, one module a check.

Each check module has one entry point, ``check(ctx)``, which adds rows (and markdown sections) to
``ctx.report``; ``benchmarks/gpu_check.py`` registers them, runs each isolated and writes the summary.
Shared pieces live in ``_common`` (result rows, the run context, optimizer paths) and ``_fit``
(tiny models on fake data, a Lightning fit, an in-memory logger). No module imports torch at import
time, so ``gpu_check.py --list`` needs no torch.
"""
