"""Import cost: the math, the optimizer and the command line import no Lightning (issue 10).

Each statement runs in a fresh interpreter (``sys.modules`` of this one already holds whatever
other tests imported) and reports which heavy packages it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
TORCH = ("torch",)

_MAIN = "from lightning_spa.cli import main; assert main"
_REPORT = """
import json, sys
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[1])))))
"""


def _loaded(statement: str, packages: tuple[str, ...]) -> list[str]:
    """The top-level packages among ``packages`` that ``statement`` imports in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", statement + "\n" + _REPORT, json.dumps(packages)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import lightning_spa.mapping",
        "import lightning_spa.schedule",
        "import lightning_spa.theorem",
        "from lightning_spa import SPA",
        "from lightning_spa import sgdm_to_spa, spa_to_sgdm",
        f"{_MAIN}(['convert', '--lr', '.1', '--momentum', '.9', '--milestones', '5']) == 0",
    ],
)
def test_no_lightning(statement: str) -> None:
    assert _loaded(statement, LIGHTNING) == []


@pytest.mark.parametrize(
    "statement",
    [
        "import lightning_spa",
        "import lightning_spa.theorem",
        "import lightning_spa.schedule",
        "import lightning_spa.cli",
        # `lightning-spa convert` is scalar Theorem-1 arithmetic in both forms: plain Python
        f"{_MAIN}(['convert', '--eta', '1', '--c', '0.1', '--milestones', '5']) == 3",  # flagged: an instant drop
        f"{_MAIN}(['convert', '--lr', '.1', '--momentum', '.9', '--milestones', '5']) == 0",
    ],
)
def test_no_torch_and_no_lightning(statement: str) -> None:
    assert _loaded(statement, TORCH + LIGHTNING) == []


def test_lightning_classes_load_lazily_on_first_use() -> None:
    statement = (
        "import sys, lightning_spa\n"
        "assert not {'pytorch_lightning', 'lightning'} & set(sys.modules), 'imported before use'\n"
        "from lightning_spa import GradualSchedule, MomentumDiagnostics, MomentumOff\n"
        "assert GradualSchedule.__module__.startswith('lightning_spa.callbacks')\n"
        "assert {'GradualSchedule', 'SPA', 'sgdm_to_spa'} <= set(dir(lightning_spa))\n"
    )
    assert _loaded(statement, LIGHTNING) != []


def test_unknown_public_name_is_an_attribute_error() -> None:
    import lightning_spa

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_spa.Nope  # noqa: B018
