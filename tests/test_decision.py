"""The momentum-off decision rule as a pure state machine (no torch, no Lightning)."""

from __future__ import annotations

import math
import sys

import pytest

from lightning_spa.decision import DEFAULT_THRESHOLD, MomentumOffDecision


def _run(rule: MomentumOffDecision, ratios: dict[int, float]) -> int | None:
    for step in sorted(ratios):
        rule.observe(step, ratios[step])
    return rule.decided_step


def test_imports_neither_torch_nor_lightning() -> None:
    import subprocess

    code = "import sys, lightning_spa.decision; print(any(m in sys.modules for m in ('torch', 'pytorch_lightning')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize(("warmup", "patience"), [(0, 0), (10, 0), (10, 5), (0, 7), (23, 11)])
def test_constant_low_ratio_every_step_decides_at_warmup_plus_patience(warmup: int, patience: int) -> None:
    rule = MomentumOffDecision(threshold=1.1, warmup_steps=warmup, patience_steps=patience)
    assert _run(rule, dict.fromkeys(range(200), 1.0)) == warmup + patience
    assert rule.transition_start == warmup + patience + 1
    assert rule.decided


@pytest.mark.parametrize(("n", "warmup", "patience"), [(5, 12, 7), (5, 10, 10), (50, 0, 10), (3, 1, 0)])
def test_sampled_every_n_steps(n: int, warmup: int, patience: int) -> None:
    """Window opens at the first sampled step >= warmup; decides at the first sampled step >= open + patience."""
    rule = MomentumOffDecision(warmup_steps=warmup, patience_steps=patience)
    opens = -(-warmup // n) * n
    expected = -(-(opens + patience) // n) * n
    assert _run(rule, {k: 0.5 for k in range(0, 500, n)}) == expected


def test_threshold_is_inclusive_and_a_high_ratio_restarts_the_window() -> None:
    rule = MomentumOffDecision(threshold=1.1, warmup_steps=0, patience_steps=10)
    ratios = dict.fromkeys(range(40), 1.1)  # at the threshold: counts as low
    ratios[8] = 1.1000001  # breaks the first window: the next one opens at step 9
    assert _run(rule, ratios) == 19


def test_high_ratio_never_decides_and_warmup_measurements_are_ignored() -> None:
    rule = MomentumOffDecision(threshold=1.1, warmup_steps=50, patience_steps=5)
    ratios = {k: (0.2 if k < 50 else 3.0) for k in range(1000)}  # low only during warm-up
    assert _run(rule, ratios) is None
    assert rule.below_since is None and rule.transition_start is None and not rule.decided


def test_non_finite_ratio_changes_nothing() -> None:
    rule = MomentumOffDecision(warmup_steps=0, patience_steps=4)
    ratios = {0: 2.0, 1: math.nan, 2: 1.0, 3: math.inf, 4: -math.nan, 5: 1.0}
    # neither extends nor closes a window: the one opened at step 2 decides at 2 + 4
    assert _run(rule, ratios) is None and rule.below_since == 2
    assert rule.observe(6, 1.0) and rule.decided_step == 6


def test_decision_is_final() -> None:
    rule = MomentumOffDecision(patience_steps=0)
    assert rule.observe(3, 0.9)
    assert not rule.observe(4, 50.0)
    assert rule.decided_step == 3


def test_steps_must_increase() -> None:
    rule = MomentumOffDecision()
    rule.observe(5, 2.0)
    with pytest.raises(ValueError, match="step 5 after one at step 5"):
        rule.observe(5, 2.0)


@pytest.mark.parametrize("cut", [0, 12, 15, 16, 30])
def test_state_dict_round_trip_anywhere_gives_the_same_decision(cut: int) -> None:
    ratios = {k: (2.0 if k < 10 else 1.0) for k in range(40)}
    ratios[13] = 1.5
    reference = MomentumOffDecision(warmup_steps=5, patience_steps=6)
    expected = _run(reference, ratios)
    assert expected == 20  # window reopens at 14 after the high ratio at 13; 14 + 6
    first = MomentumOffDecision(warmup_steps=5, patience_steps=6)
    _run(first, {k: v for k, v in ratios.items() if k < cut})
    resumed = MomentumOffDecision(warmup_steps=5, patience_steps=6)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()
    assert _run(resumed, {k: v for k, v in ratios.items() if k >= cut}) == expected


def test_default_threshold() -> None:
    assert MomentumOffDecision().threshold == DEFAULT_THRESHOLD == 1.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 0.0}, "`threshold` must be finite and > 0"),
        ({"threshold": math.inf}, "`threshold` must be finite and > 0"),
        ({"threshold": "1.1"}, "`threshold` must be a number"),
        ({"threshold": True}, "`threshold` must be a number"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an integer >= 0"),
        ({"warmup_steps": 1.5}, "`warmup_steps` must be an integer >= 0"),
        ({"patience_steps": -3}, "`patience_steps` must be an integer >= 0"),
        ({"patience_steps": True}, "`patience_steps` must be an integer >= 0"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentumOffDecision(**kwargs)  # type: ignore[arg-type]
