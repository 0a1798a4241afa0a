"""MomentumGuard, the pure state machine (issue 15 item 2): no torch, no Lightning.

The numbers are those of the rule in ``lightning_spa/guard.py``'s docstring: a bias-corrected
reference EMA, ``S_k = d S_{k-1} + (1 - d) G_k`` from ``S = ref``, abort when ``S > factor * ref``.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from lightning_spa.guard import GuardedRemoval, MomentumGuard
from lightning_spa.schedule import MomentumRemoval


def bound(transition_steps: int = 10, watch_steps: int = 5, **kwargs: Any) -> MomentumGuard:
    return MomentumGuard(**kwargs).bind(transition_steps, watch_steps)


def planned(start: int = 30, reference: float = 1.0, **kwargs: Any) -> MomentumGuard:
    """A guard whose removal starts at ``start``, with a reference of exactly ``reference``."""
    guard = bound(**kwargs)
    guard.plan(start)
    for k in range(start - guard.reference_steps, start):
        guard.observe(k, reference, 1.0)
    return guard


# ----- arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 1.0}, "`factor` must be in"),
        ({"factor": math.inf}, "`factor` must be a finite number"),
        ({"factor": True}, "`factor`"),
        ({"ema_decay": 1.0}, r"`ema_decay` must be in \[0, 1\)"),
        ({"ema_decay": -0.1}, "`ema_decay`"),
        ({"reference_steps": 0}, "`reference_steps` must be an integer >= 1"),
        ({"reference_steps": 2.5}, "`reference_steps`"),
        ({"watch_steps": -1}, "`watch_steps` must be an integer >= 0"),
        ({"retry_factor": 1.0}, "`retry_factor` must be in .*None: never retry"),
        ({"retry_factor": 0.0}, "`retry_factor`"),
    ],
)
def test_invalid_arguments_name_the_argument_and_the_fix(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentumGuard(**kwargs)


def test_bind_gives_a_fresh_guard_with_the_removal_length_and_the_watch() -> None:
    template = MomentumGuard(factor=20.0)
    guard = template.bind(transition_steps=8, watch_steps=50)
    assert guard is not template and guard.factor == 20.0 and guard.transition_steps == 8
    guard.plan(100)
    assert guard.watch_end() == 100 + 8 - 1 + 50  # s + T - 1 + W
    explicit = MomentumGuard(watch_steps=3).bind(transition_steps=0, watch_steps=50)
    explicit.plan(100)
    assert explicit.watch_end() == 100 + 0 + 3  # an instant removal is one step long; watch_steps wins
    assert template.episodes == []  # the template keeps no state


# ----- reference and watch -----------------------------------------------------------------------------


def test_reference_is_the_bias_corrected_ema_of_the_window() -> None:
    guard = bound(ema_decay=0.9)
    guard.plan(30)
    assert not guard.needs(9) and guard.needs(10) and guard.needs(29)  # the window [s - R, s), R = 20
    guard.observe(28, 4.0, 1.0)
    assert guard.reference == pytest.approx(4.0)  # the first sample is the reference: no bias towards 0
    guard.observe(29, 2.0, 1.0)
    assert guard.reference == pytest.approx((0.9 * 0.1 * 4.0 + 0.1 * 2.0) / (0.9 * 0.1 + 0.1))
    guard.observe(29, math.nan, 1.0)  # a non-finite reading before the removal is not the removal's doing
    assert guard.reference == pytest.approx((0.9 * 4.0 + 2.0) / 1.9)


@pytest.mark.parametrize(("value", "readings"), [(100.0, 1), (50.0, 2), (20.0, 7)])
def test_aborts_when_the_smoothed_value_passes_factor_times_the_reference(value: float, readings: int) -> None:
    """Constant ``G = value`` from ``S = 1``: ``S_n = value - (value - 1) 0.9^n``; abort at the first ``S_n > 10``."""
    expected = next(n for n in range(1, 100) if value - (value - 1.0) * 0.9**n > 10.0)
    assert expected == readings
    guard = planned(start=30)
    aborts = [k for k in range(30, 45) if guard.needs(k) and guard.observe(k, value, 1.0)]
    assert aborts == [30 + readings - 1]
    assert guard.aborted and guard.aborted_steps == aborts
    assert not guard.needs(aborts[0] + 1)  # nothing is read after an abort


def test_a_non_finite_reading_in_the_watch_aborts_at_once() -> None:
    guard = planned(start=30)
    assert not guard.observe(30, 1.0, 1.0)
    assert guard.observe(31, math.inf, 1.0)
    assert guard.aborted_steps == [31]


def test_factor_times_the_reference_is_never_passed_from_below() -> None:
    """``G = factor * ref`` forever: ``S`` tends to ``10`` from below and never exceeds it; the watch ends."""
    guard = planned(start=30)  # T = 10, W = 5: watched through step 44
    assert not any(guard.observe(k, 10.0, 1.0) for k in range(30, 60))
    assert guard.smoothed is not None and guard.smoothed < 10.0
    assert not guard.needs(45) and guard.needs(44)
    assert guard.start_at(1000) == 30 and not guard.aborted  # the removal stands


def test_a_stable_noisy_signal_never_aborts() -> None:
    """A heavy-ish tailed ``G`` (chi-square with 4 degrees of freedom, mean 1) over 100 000 watched steps."""
    rng = random.Random(0)
    guard = MomentumGuard().bind(transition_steps=1000, watch_steps=100_000)
    guard.plan(20)
    for k in range(0, 100_000):
        if guard.needs(k):
            value = sum(rng.gauss(0.0, 1.0) ** 2 for _ in range(4)) / 4
            assert not guard.observe(k, value, 1.0), k


def test_without_a_reference_the_first_positive_watched_reading_is_the_reference() -> None:
    guard = bound()
    guard.plan(0)  # removal from the first step: no step before it
    assert guard.reference is None
    assert not guard.observe(0, 0.0, 1.0)  # a zero gradient says nothing yet
    assert not guard.observe(1, 3.0, 1.0)
    assert guard.reference == 3.0
    assert guard.observe(2, 3.0 * 100.0, 1.0)  # S = 0.9 * 3 + 0.1 * 300 = 32.7 > 30


# ----- the schedule ------------------------------------------------------------------------------------


def test_guarded_removal_is_the_removal_until_the_abort_then_c0() -> None:
    guard = planned(start=30)
    removal, plain = GuardedRemoval(guard), MomentumRemoval(30, 10)
    c0 = 0.1
    assert [removal.c_value(k, c0) for k in range(25, 36)] == [plain.c_value(k, c0) for k in range(25, 36)]
    assert removal.eta_factor(33) == 1.0 and list(removal.critical_steps()) == []
    assert guard.observe(36, math.nan, 1.0)  # aborted at 36: step 36 keeps its c, step 37 has c0 again
    assert removal.c_value(36, c0) == plain.c_value(36, c0)
    assert [removal.c_value(k, c0) for k in range(37, 200)] == [c0] * 163
    assert removal.c_value(40, c0, joined=38) == c0  # a group that joined after the abort: no removal either
    assert repr(removal) == "GuardedMomentumRemoval(transition_steps=10)"


def test_no_removal_before_a_plan() -> None:
    guard = bound()
    assert GuardedRemoval(guard).c_value(50, 0.2) == 0.2 and guard.start_at(50) is None
    assert not guard.needs(50)


# ----- retry -------------------------------------------------------------------------------------------


def test_retry_once_eta_has_fallen_by_the_factor_with_a_fresh_reference() -> None:
    guard = planned(start=30, retry_factor=0.5)
    assert guard.observe(31, math.inf, 0.8)  # eta at the abort: 0.8
    assert not guard.retry_due(31, 0.1)  # not at the abort step itself
    assert not guard.retry_due(40, 0.41)  # 0.41 > 0.5 * 0.8
    assert guard.retry_due(41, 0.4)  # 0.4 <= 0.4: a new removal at 41 + R
    assert guard.episodes == [[30, 31], [61, None]]
    assert guard.reference is None and guard.needs(41) and not guard.needs(40)
    assert guard.start_at(50) is None and guard.start_at(61) == 61
    removal = GuardedRemoval(guard)
    assert removal.c_value(61 + 9, 0.1) == 1.0  # the new removal completes over T = 10 steps
    assert not guard.retry_due(62, 0.01)  # nothing to retry while the new removal is live


def test_retry_factor_none_never_retries() -> None:
    guard = planned(start=30, retry_factor=None)
    assert guard.observe(31, math.inf, 1.0)
    assert not any(guard.retry_due(k, 1e-9) for k in range(32, 1000))
    assert guard.start_at(10_000) is None


def test_misuse_is_refused() -> None:
    guard = planned(start=30)
    with pytest.raises(ValueError, match="already planned"):
        guard.plan(40)
    guard.observe(31, 1.0, 1.0)
    with pytest.raises(ValueError, match="steps must not decrease"):
        guard.observe(30, 1.0, 1.0)
    with pytest.raises(ValueError, match="`start` must be an integer >= 0"):
        bound().plan(-1)


# ----- checkpoints -------------------------------------------------------------------------------------


def test_state_dict_is_plain_and_a_restored_guard_continues_identically() -> None:
    rng = random.Random(1)
    values = [rng.uniform(0.5, 1.5) for _ in range(35)] + [4.0 * 1.5**j for j in range(30)]
    original = MomentumGuard().bind(transition_steps=10, watch_steps=20)
    original.plan(30)
    for k, v in enumerate(values[:33]):
        original.observe(k, v, 1.0) if original.needs(k) else None
    state = json.loads(json.dumps(original.state_dict()))  # plain Python values
    restored = MomentumGuard().bind(transition_steps=10, watch_steps=20)
    restored.load_state_dict(state)
    for guard in (original, restored):
        for k in range(33, len(values)):
            if guard.needs(k):
                guard.observe(k, values[k], 1.0)
    assert original.aborted_steps and restored.state_dict() == original.state_dict()
