"""Check 6, ``pytest``: ``pytest -m cuda``, the CUDA tests of the suite (skipped, with the reason, on the CPU)."""

from __future__ import annotations

import re
import sys

from ._common import FAIL, PASS, SKIP, Context, run


def check(ctx: Context) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    result = run(ctx, "pytest", "pytest -m cuda", "all pass", cmd)
    if result is None:
        return
    rc, out = result
    counts = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b")
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if counts.search(ln)), out.strip()[-160:])
    ok = rc == 0 and ("skipped" not in summary or not ctx.cuda)
    status = (PASS if ok else FAIL) if ctx.cuda else (SKIP if rc == 0 else FAIL)
    ctx.report.add("pytest", "pytest -m cuda", status, summary[:160], "all pass, none skipped")
    ctx.report.sections.append(("`pytest -m cuda`", "```\n" + "\n".join(out.strip().splitlines()[-40:]) + "\n```"))
