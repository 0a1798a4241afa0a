"""The schedule math of lightning_spa.schedule, without a Trainer (THEORY.md sections 2, 5, 6)."""

from __future__ import annotations

import math

import pytest

from lightning_spa.mapping import spa_to_sgdm
from lightning_spa.schedule import (
    MomentumRemoval,
    StepDecay,
    compose,
    equivalent_momentum,
    find_momentum_overflow,
    smallest_safe_transition_steps,
    transition_fraction,
)


def test_transition_fraction() -> None:
    assert [transition_fraction(k, 5, 4) for k in range(3, 11)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [transition_fraction(k, 5, 1) for k in (4, 5, 6)] == [0, 1, 1]


def test_geometric_paper_transition_follows_the_formula() -> None:
    m, T, f, eta0, c0 = 10, 25, 0.1, 2.0, 0.1
    decay = StepDecay((m,), f, "paper", T)
    for k in range(m):
        assert compose([decay], k, eta0, c0) == (eta0, c0)
    for j in range(T):
        eta, c = compose([decay], m + j, eta0, c0)
        assert eta == pytest.approx(eta0 * f ** ((j + 1) / T), rel=1e-14)
        assert c == pytest.approx(c0 * (1 / f) ** ((j + 1) / T), rel=1e-14)
    # the new values are reached exactly at m + T - 1, and kept
    for k in (m + T - 1, m + T, m + 3 * T):
        assert compose([decay], k, eta0, c0) == (eta0 * f, 1.0)
    # alpha = c * eta is kept during the whole transition (insight 2)
    for k in range(m, m + T):
        eta, c = compose([decay], k, eta0, c0)
        assert c * eta == pytest.approx(c0 * eta0, rel=1e-13)


def test_paper_mode_caps_c_with_its_own_ratio_and_later_milestones_lower_eta_only() -> None:
    f, c0, T = 0.1, 0.5, 4  # c would reach 5: capped at 1, reached at the end of the transition
    decay = StepDecay((0, 10), f, "paper", T)
    cs = [compose([decay], k, 1.0, c0)[1] for k in range(T)]
    assert cs == pytest.approx([c0 * (1 / c0) ** ((j + 1) / T) for j in range(T)], rel=1e-14)
    assert cs[-1] == 1.0
    for j in range(T):
        eta, c = compose([decay], 10 + j, 1.0, c0)
        assert c == 1.0
        assert eta == pytest.approx(f ** (1 + (j + 1) / T), rel=1e-14)


def test_lr_mode_keeps_c_and_instant_drops_at_the_milestone() -> None:
    decay = StepDecay((3, 6), 0.5, "lr", 1)
    assert [compose([decay], k, 1.0, 0.2) for k in range(8)] == [(1.0, 0.2)] * 3 + [(0.5, 0.2)] * 3 + [(0.25, 0.2)] * 2


def test_warmup_is_linear_from_eta_over_w() -> None:
    decay = StepDecay((), warmup_steps=4)
    assert [decay.eta_factor(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_momentum_removal_keeps_eta_and_moves_c_to_one() -> None:
    off = MomentumRemoval(5, transition_steps=3)
    c0 = 0.1
    assert [compose([off], k, 1.0, c0)[0] for k in range(10)] == [1.0] * 10
    got = [compose([off], k, 1.0, c0)[1] for k in range(4, 9)]
    assert got == pytest.approx([c0, c0 * 10 ** (1 / 3), c0 * 10 ** (2 / 3), 1.0, 1.0], rel=1e-14)
    assert compose([MomentumRemoval(5)], 5, 1.0, c0) == (1.0, 1.0)  # 0: instant
    assert compose([MomentumRemoval(5)], 4, 1.0, c0) == (1.0, c0)


def test_compose_multiplies_eta_and_takes_the_largest_c() -> None:
    a = StepDecay((2,), 0.5, "paper", 1)
    b = StepDecay((4,), 0.1, "lr", 1)
    off = MomentumRemoval(6)
    c0 = 0.1
    assert compose([a, b, off], 1, 1.0, c0) == (1.0, c0)
    assert compose([a, b, off], 3, 1.0, c0) == (0.5, 0.2)
    assert compose([a, b, off], 5, 1.0, c0) == pytest.approx((0.05, 0.2))
    assert compose([a, b, off], 6, 1.0, c0) == pytest.approx((0.05, 1.0))


def test_instant_paper_drop_has_the_theorem_1_spike() -> None:
    decay = StepDecay((5,), 0.1, "paper", 1)
    betas = [equivalent_momentum([decay], k, 1.0, 0.1) for k in range(8)]
    assert betas[:5] == pytest.approx([0.9] * 5)
    assert betas[5] == pytest.approx(9.0)  # (1 - c_prev) * eta_prev / eta = 0.9 / 0.1
    assert betas[6:] == [0.0, 0.0]  # c = 1 from step 5 on
    overflow = find_momentum_overflow([decay], 1.0, 0.1)
    assert overflow is not None and overflow.step == 5 and overflow.momentum == pytest.approx(9.0)


def test_equivalent_momentum_matches_theorem_1_mapping() -> None:
    decay = StepDecay((4, 30), 0.1, "paper", 26, warmup_steps=3)
    off = MomentumRemoval(40, 5)
    etas, cs = zip(*(compose([decay, off], k, 1.5, 0.1) for k in range(50)), strict=True)
    lr, momentum = spa_to_sgdm(list(etas), list(cs))
    for k in range(50):
        assert equivalent_momentum([decay, off], k, 1.5, 0.1) == pytest.approx(momentum[k], rel=1e-12, abs=1e-15)
        assert lr[k] == pytest.approx(cs[k] * etas[k], rel=1e-15)


def test_geometric_momentum_is_one_minus_c_times_r_and_stays_below_one() -> None:
    T = 30
    decay = StepDecay((10,), 0.1, "paper", T)
    r = 10 ** (1 / T)
    for j in range(T):
        c_prev = compose([decay], 10 + j - 1, 1.0, 0.1)[1]
        assert equivalent_momentum([decay], 10 + j, 1.0, 0.1) == pytest.approx((1 - c_prev) * r, rel=1e-13)
    assert find_momentum_overflow([decay], 1.0, 0.1) is None


@pytest.mark.parametrize(
    ("c0", "factor", "mode"), [(0.1, 0.1, "paper"), (0.1, 0.1, "lr"), (0.01, 0.5, "lr"), (0.3, 0.01, "paper")]
)
def test_smallest_safe_transition_steps_is_exact(c0: float, factor: float, mode: str) -> None:
    # the largest momentum of a transition is its first: (1 - c0) * factor**(-1/T) < 1
    expected = math.floor(math.log(1 / factor) / math.log(1 / (1 - c0))) + 1
    decay = StepDecay((5,), factor, mode, 1)  # type: ignore[arg-type]
    got = smallest_safe_transition_steps(decay, [], [(1.0, c0)])
    assert got == expected
    unsafe = find_momentum_overflow([StepDecay((5,), factor, mode, expected - 1)], 1.0, c0)  # type: ignore[arg-type]
    assert unsafe is not None and unsafe.step == 5
    assert find_momentum_overflow([StepDecay((5,), factor, mode, expected)], 1.0, c0) is None  # type: ignore[arg-type]


def test_smallest_safe_transition_steps_none_when_milestones_too_close() -> None:
    decay = StepDecay((5, 10), 0.1, "lr", 1)
    assert smallest_safe_transition_steps(decay, [], [(1.0, 0.1)]) is None


def test_overflow_beyond_the_run_is_ignored() -> None:
    decay = StepDecay((50,), 0.1, "paper", 1)
    assert find_momentum_overflow([decay], 1.0, 0.1, total_steps=50) is None
    assert find_momentum_overflow([decay], 1.0, 0.1, total_steps=51) is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"milestones": (5, 5)}, "strictly increasing"),
        ({"milestones": (-1,)}, "milestones"),
        ({"milestones": (1,), "factor": 0.0}, "factor"),
        ({"milestones": (1,), "factor": 1.5}, "factor"),
        ({"milestones": (1,), "mode": "fast"}, "mode"),
        ({"milestones": (1,), "transition_steps": 0}, "transition_steps"),
        ({"milestones": (1, 5), "transition_steps": 6}, "overlap"),
        ({"milestones": (1,), "warmup_steps": -2}, "warmup_steps"),
    ],
)
def test_step_decay_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StepDecay(**kwargs)


def test_momentum_removal_validation() -> None:
    with pytest.raises(ValueError, match="start"):
        MomentumRemoval(-1)
    with pytest.raises(ValueError, match="transition_steps"):
        MomentumRemoval(3, -1)


# ----- param groups that join mid-run -------------------------------------------------------------


def test_a_group_joining_mid_run_starts_from_its_own_values() -> None:
    decay = StepDecay((4, 12), 0.1, "paper", 4, warmup_steps=2)
    eta0, c0, j = 0.3, 0.05, 6  # joins after the first transition (steps 4..7 -> progress 0.75 at step 6)
    assert compose([decay], j, eta0, c0, joined=j) == pytest.approx((eta0, c0), rel=1e-14)
    for k in range(j, 20):
        p = min(1.0, max(0.0, (k - 3) / 4)) + min(1.0, max(0.0, (k - 11) / 4)) - 0.75  # transitions since step 6
        eta, c = compose([decay], k, eta0, c0, joined=j)
        assert eta == pytest.approx(eta0 * 0.1**p, rel=1e-13)
        assert c == pytest.approx(min(1.0, c0 * 10**p), rel=1e-13)
    # alpha = c * eta is kept while c < 1 (insight 2), as for the groups present from the start
    assert compose([decay], 13, eta0, c0, joined=j)[0] * compose([decay], 13, eta0, c0, joined=j)[1] == pytest.approx(
        eta0 * c0, rel=1e-13
    )


def test_a_group_joining_during_or_after_a_momentum_removal() -> None:
    off = MomentumRemoval(10, transition_steps=4)  # shares 1/4, 2/4, 3/4, 1 at steps 10..13
    c0 = 0.2
    # joins at step 11 (share 1/2): the rest of the way to 1 over the two remaining steps
    assert [compose([off], k, 1.0, c0, joined=11)[1] for k in (11, 12, 13, 14)] == pytest.approx(
        [c0, c0 * 5**0.5, 1.0, 1.0], rel=1e-14
    )
    assert compose([off], 20, 1.0, c0, joined=20) == (1.0, 1.0)  # momentum is already off
    assert compose([off], 5, 2.0, c0, joined=3) == (2.0, c0)


def test_the_first_step_of_a_joining_group_has_no_momentum_to_overflow() -> None:
    decay = StepDecay((5,), 0.1, "paper", 1)  # instant: (1 - 0.1) / 0.1 = 9 at step 5
    # a group joining at the milestone starts at its own values; its first step reports 1 - c0
    assert equivalent_momentum([decay], 5, 1.0, 0.1, joined=5) == pytest.approx(0.9)
    assert compose([decay], 6, 1.0, 0.1, joined=5) == (1.0, 0.1)
    assert find_momentum_overflow([decay], 1.0, 0.1, joined=5) is None
    overflow = find_momentum_overflow([decay], 1.0, 0.1, joined=4)
    assert overflow is not None and overflow.step == 5 and overflow.momentum == pytest.approx(9.0)
