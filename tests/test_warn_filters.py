"""The suite's warning policy (issue 17 item 8): pytest turns warnings into errors, and the few third-party
warnings filtered in ``pyproject.toml`` are each named by message, with the reason on the line above."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
OURS = ("lightning_spa", "SPA", "GradualSchedule", "MomentumOff", "MomentumDiagnostics", "MomentumGuard")


def configured_filters() -> list[tuple[str, str]]:
    """``(filter, the comment line just above it)`` for each entry of pytest's ``filterwarnings`` in
    ``pyproject.toml`` (read as text: ``tomllib`` is not in Python 3.10)."""
    text = PYPROJECT.read_text()
    block = text[text.index("\nfilterwarnings = [") + 1 :]
    block = block[: block.index("\n]")]
    entries, comment = [], ""
    for line in block.splitlines()[1:]:
        line = line.strip()
        if line.startswith("#"):
            comment = line
        elif line:
            literal = line.rstrip(",")  # a TOML literal string 'raw' or a basic string "json-like"
            entries.append((literal[1:-1] if literal.startswith("'") else json.loads(literal), comment))
            comment = ""
    return entries


def test_warnings_are_errors_and_each_filter_is_a_named_third_party_message_with_a_reason() -> None:
    filters = configured_filters()
    assert filters[0][0] == "error"
    ignores = filters[1:]
    assert 0 < len(ignores) <= 5  # small: every further one needs a reason in review
    for entry, comment in ignores:
        action, message = entry.split(":")[:2]
        assert action == "ignore" and message, f"{entry!r}: filter by message"
        assert len(comment) > 20, f"{entry!r} has no reason on the line above"
        assert not any(name in message for name in OURS), f"{entry!r}: our own warnings are asserted, not filtered"


def test_a_warning_in_a_test_fails_it(tmp_path: Path) -> None:
    """The configuration as it stands: an unexpected warning of ours fails its test, a filtered message does not."""
    configured = [entry for entry, _ in configured_filters()]
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n" + "".join(f"    {f}\n" for f in configured))
    (tmp_path / "test_policy.py").write_text(
        "import warnings\n\n"
        "def test_unexpected():\n"
        "    warnings.warn('something of ours', UserWarning)\n\n"
        "def test_filtered_third_party():\n"
        "    warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated, use ...', FutureWarning)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_policy.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed" in proc.stdout
    assert "FAILED test_policy.py::test_unexpected - UserWarning: something of ours" in proc.stdout
