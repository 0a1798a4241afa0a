"""The momentum-off decision rule: a pure state machine (no torch, no Lightning), and its three readings.

The rule switches only while the smoothed alignment ratio is *idle* (inside ``[low, high]`` around 1), never
while momentum *damps* (below ``low``) or *accelerates* (above ``high``). The second half feeds it the ratio
that :class:`~lightning_spa.meter.MomentumMeter` measures on SPA in a plain loop, on problems whose stationary
ratio follows from ``THEORY.md`` section 4: ``D_{k+1} = (1-c) D_k - c eta g_k`` with stationary
``E||D||^2 = c^2 eta^2 sum_{i,j} (1-c)^{i+j} E<g_i, g_j>``, i.e.

    ratio = 1 + 2 sum_{l >= 1} (1 - c)^l rho(l)          (rho: autocorrelation of g, independent of x)

and, on a noisy quadratic of curvature ``L`` (the AR(2) recursion of heavy ball, Yule-Walker),

    ratio = 1 / (1 + (1 - c) eta L / (2 - c)).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import pytest

from lightning_spa.decision import DEFAULT_HIGH, DEFAULT_LOW, MomentumOffDecision, check_band, reading


def _run(rule: MomentumOffDecision, ratios: dict[int, float], eta: Callable[[int], float] | None = None) -> int | None:
    for step in sorted(ratios):
        rule.observe(step, ratios[step], None if eta is None else eta(step))
    return rule.decided_step


def test_imports_neither_torch_nor_lightning() -> None:
    import subprocess

    code = "import sys, lightning_spa.decision; print(any(m in sys.modules for m in ('torch', 'pytorch_lightning')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize(("warmup", "patience"), [(0, 0), (10, 0), (10, 5), (0, 7), (23, 11)])
def test_constant_idle_ratio_every_step_decides_at_warmup_plus_patience(warmup: int, patience: int) -> None:
    rule = MomentumOffDecision(warmup_steps=warmup, patience_steps=patience)
    assert _run(rule, dict.fromkeys(range(200), 1.0)) == warmup + patience
    assert rule.transition_start == warmup + patience + 1
    assert rule.decided and rule.damping_step is None


@pytest.mark.parametrize(("n", "warmup", "patience"), [(5, 12, 7), (5, 10, 10), (50, 0, 10), (3, 1, 0)])
def test_sampled_every_n_steps(n: int, warmup: int, patience: int) -> None:
    """Window opens at the first sampled step >= warmup; decides at the first sampled step >= open + patience."""
    rule = MomentumOffDecision(warmup_steps=warmup, patience_steps=patience)
    opens = -(-warmup // n) * n
    expected = -(-(opens + patience) // n) * n
    assert _run(rule, {k: 1.0 for k in range(0, 500, n)}) == expected


@pytest.mark.parametrize(("outside", "side"), [(0.8999999, "damping"), (1.2500001, "accelerating")])
def test_band_edges_are_inclusive_and_a_ratio_outside_restarts_the_window(outside: float, side: str) -> None:
    rule = MomentumOffDecision(low=0.9, high=1.25, warmup_steps=0, patience_steps=10)
    ratios = {k: (0.9 if k % 2 else 1.25) for k in range(40)}  # on the edges: idle
    ratios[8] = outside  # breaks the first window: the next one opens at step 9
    assert reading(outside, 0.9, 1.25) == side
    assert _run(rule, ratios) == 19


def test_damping_ratio_never_switches_and_is_reported_once_after_the_patience() -> None:
    """Below ``low`` momentum damps: kept however long it lasts; ``damping_step`` marks the first full window."""
    rule = MomentumOffDecision(warmup_steps=5, patience_steps=10)
    assert _run(rule, dict.fromkeys(range(500), 0.5)) is None
    assert not rule.decided and rule.idle_since is None
    assert rule.below_since == 5 and rule.damping_step == 15
    rule.observe(500, 0.4)
    assert rule.damping_step == 15  # reported once


def test_damping_then_idle_switches_only_once_eta_has_fallen() -> None:
    """The late phase: damping at eta 1 until step 100, idle from then on; eta cut 10x at step 150 (through 0.5 at
    step 150 + 3 with a geometric cut 10**(-(k - 149) / 10)). The idle reading at eta 1 does not count: the switch
    follows the idle window that opens once eta <= 0.5 * 1."""
    ratios = {k: (0.4 if k < 100 else 1.0) for k in range(300)}

    def eta(k: int) -> float:
        return 10.0 ** (-min(max(k - 149, 0), 10) / 10)

    first_allowed = next(k for k in range(300) if eta(k) <= 0.5)
    assert first_allowed == 153
    rule = MomentumOffDecision(warmup_steps=0, patience_steps=20)
    assert _run(rule, ratios, eta) == first_allowed + 20
    assert rule.damping_step == 20 and rule.damping_eta is None and rule.below_since is None
    same_eta = MomentumOffDecision(warmup_steps=0, patience_steps=20)
    assert _run(same_eta, ratios, lambda k: 1.0) is None  # idle again at the eta that needed momentum: kept
    assert same_eta.damping_eta == 1.0 and same_eta.waiting_for_eta
    no_memory = MomentumOffDecision(warmup_steps=0, patience_steps=20, eta_drop=1.0)
    assert _run(no_memory, ratios, lambda k: 1.0) == 120  # eta_drop=1: an idle reading counts at the same eta
    unknown = MomentumOffDecision(warmup_steps=0, patience_steps=20)
    assert _run(unknown, ratios) is None  # after damping, no eta given: never


def test_a_damping_episode_that_outlasts_the_cut_records_the_eta_it_started_at() -> None:
    """The EMA lags a cut of eta, so the ratio stays low for a while after it: that episode's eta is the one of its
    full patience window (1), not the cut one (0.1); idle from step 200 at eta 0.1 <= 0.5 switches at 200 + 20."""
    rule = MomentumOffDecision(warmup_steps=0, patience_steps=20)
    ratios = {k: (0.4 if k < 200 else 1.0) for k in range(300)}
    assert _run(rule, ratios, lambda k: 1.0 if k < 150 else 0.1) == 220
    second = MomentumOffDecision(warmup_steps=0, patience_steps=20)  # a new episode at 0.1 needs eta <= 0.05
    ratios.update({k: 0.4 for k in range(205, 240)})
    assert _run(second, ratios, lambda k: 1.0 if k < 150 else 0.1) is None and second.damping_eta == 0.1


def test_aligned_ratio_never_switches_and_warmup_measurements_are_ignored() -> None:
    rule = MomentumOffDecision(warmup_steps=50, patience_steps=5)
    ratios = {k: (1.0 if k < 50 else 3.0) for k in range(1000)}  # idle only during warm-up
    assert _run(rule, ratios) is None
    assert rule.idle_since is None and rule.transition_start is None and not rule.decided


def test_non_finite_ratio_changes_nothing() -> None:
    rule = MomentumOffDecision(warmup_steps=0, patience_steps=4)
    ratios = {0: 2.0, 1: math.nan, 2: 1.0, 3: math.inf, 4: -math.nan, 5: 1.0}
    # neither extends nor closes a window: the one opened at step 2 decides at 2 + 4
    assert _run(rule, ratios) is None and rule.idle_since == 2
    assert rule.observe(6, 1.0) and rule.decided_step == 6


def test_decision_is_final() -> None:
    rule = MomentumOffDecision(patience_steps=0)
    assert rule.observe(3, 0.95)
    assert not rule.observe(4, 50.0)
    assert rule.decided_step == 3


def test_steps_must_increase() -> None:
    rule = MomentumOffDecision()
    rule.observe(5, 2.0)
    with pytest.raises(ValueError, match="step 5 after one at step 5"):
        rule.observe(5, 2.0)


@pytest.mark.parametrize("cut", [0, 12, 15, 16, 22, 24, 29, 45])
def test_state_dict_round_trip_anywhere_gives_the_same_decision(cut: int) -> None:
    ratios = {k: (2.0 if k < 10 else 0.5 if k < 20 else 1.0) for k in range(60)}
    ratios[23] = 1.5

    def eta(k: int) -> float:
        return 1.0 if k < 20 else 0.1  # cut at step 20, after the damping

    reference = MomentumOffDecision(warmup_steps=5, patience_steps=6)
    expected = _run(reference, ratios, eta)
    assert expected == 30  # damping 10-19 (reported at 16), idle from 20, broken at 23, reopens at 24; 24 + 6
    assert reference.damping_step == 16
    first = MomentumOffDecision(warmup_steps=5, patience_steps=6)
    _run(first, {k: v for k, v in ratios.items() if k < cut}, eta)
    resumed = MomentumOffDecision(warmup_steps=5, patience_steps=6)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict() or cut == 0  # NaN last_ratio before any reading
    assert _run(resumed, {k: v for k, v in ratios.items() if k >= cut}, eta) == expected
    assert resumed.damping_step == 16 and resumed.decided_step == 30


def test_a_state_of_the_one_sided_rule_restores_no_open_window() -> None:
    """Its ``below_since`` mixed idle and damping ratios: keeping it could switch while momentum damps."""
    rule = MomentumOffDecision(warmup_steps=0, patience_steps=10)
    rule.load_state_dict({"below_since": 3, "decided_step": None, "last_step": 12})
    assert rule.idle_since is None and rule.below_since is None and rule.last_step == 12
    assert _run(rule, dict.fromkeys(range(13, 40), 1.0)) == 23  # a fresh window from step 13
    old_decided = MomentumOffDecision()
    old_decided.load_state_dict({"below_since": 3, "decided_step": 20, "last_step": 20})
    assert old_decided.decided_step == 20 and old_decided.transition_start == 21


def test_defaults_and_readings() -> None:
    rule = MomentumOffDecision()
    assert (rule.low, rule.high) == (DEFAULT_LOW, DEFAULT_HIGH) == (0.9, 1.25)
    assert [reading(r) for r in (0.5, 0.9, 1.0, 1.25, 3.0, math.nan)] == [
        "damping", "idle", "idle", "idle", "accelerating", "unmeasured",
    ]  # fmt: skip


def test_threshold_is_deprecated_and_becomes_high() -> None:
    with pytest.warns(FutureWarning, match=r"threshold=...\) is deprecated.*`low`/`high`.*high=1.1"):
        rule = MomentumOffDecision(threshold=1.1, patience_steps=0)
    assert (rule.low, rule.high) == (DEFAULT_LOW, 1.1)
    assert not rule.observe(0, 0.5, 1.0)  # the old rule switched here (0.5 <= 1.1); momentum damps: kept
    assert not rule.observe(1, 1.2, 0.1)  # above high = threshold
    assert rule.observe(2, 1.0, 0.1)  # idle, eta cut since the damping
    with pytest.raises(ValueError, match="give `high` only"):
        check_band(high=1.3, threshold=1.1)


def test_positional_arguments_are_refused() -> None:
    """``MomentumOffDecision(1.1, 10, 15)`` meant (threshold, warmup, patience): refused, not misread."""
    with pytest.raises(TypeError):
        MomentumOffDecision(1.1, 10, 15)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"low": 0.0}, "`low` must be finite and > 0"),
        ({"high": math.inf}, "`high` must be finite and > 0"),
        ({"low": "0.9"}, "`low` must be a number"),
        ({"high": True}, "`high` must be a number"),
        ({"low": 1.05}, "`low` must be <= 1"),
        ({"high": 0.95}, "`high` must be >= 1"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an integer >= 0"),
        ({"warmup_steps": 1.5}, "`warmup_steps` must be an integer >= 0"),
        ({"patience_steps": -3}, "`patience_steps` must be an integer >= 0"),
        ({"patience_steps": True}, "`patience_steps` must be an integer >= 0"),
        ({"eta_drop": 0.0}, r"`eta_drop` must be a number in \(0, 1\]"),
        ({"eta_drop": 1.5}, r"`eta_drop` must be a number in \(0, 1\]"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentumOffDecision(**kwargs)  # type: ignore[arg-type]


# ----- the rule on measured ratios: idle, damping, accelerating ----------------------------------------


def _measured_ratios(grad: Callable[[int, object], object], steps: int, eta: float, c: float, decay: float = 0.95,
                     dim: int = 1000) -> list[float]:  # fmt: skip
    """The smoothed ratio of SPA(eta, c) after each step, measured by MomentumMeter, gradients from ``grad``."""
    import torch

    from lightning_spa import SPA
    from lightning_spa.meter import MomentumMeter

    w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    opt = SPA([w], lr=eta, c=c)
    meter = MomentumMeter(opt, every_n_steps=1, ema_decay=decay).attach(before_hook=True)
    out: list[float] = []
    meter.listeners.append(lambda r: out.append(r.ratio))
    for k in range(steps):
        w.grad = grad(k, w.detach())  # type: ignore[assignment]
        opt.step()
    meter.detach()
    return out


def _decide(ratios: list[float], warmup: int, patience: int) -> MomentumOffDecision:
    rule = MomentumOffDecision(warmup_steps=warmup, patience_steps=patience)
    for k, r in enumerate(ratios):
        rule.observe(k, r)
    return rule


def test_pure_noise_is_idle_and_switches() -> None:
    """Gradients independent of x and of each other: rho = 0, ratio 1 (a few % of EMA noise at dim 1000)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ratios = _measured_ratios(lambda k, w: torch.randn(1000, generator=gen, dtype=torch.float64), 120, 0.1, 0.2)
    assert all(0.9 < r < 1.1 for r in ratios[20:])
    assert _decide(ratios, warmup=20, patience=30).decided_step == 50


def test_reshuffled_batches_damp_and_do_not_switch() -> None:
    """N zero-sum batch noises, a new order each epoch: rho(l) = -(N - l) / (N (N - 1)) for l < N (same epoch with
    probability (N - l) / N, correlation -1/(N - 1)), so ratio = 1 - 2 sum_l (1-c)^l (N - l) / (N (N - 1)):
    0.508 for N = 10, c = 0.2. Momentum damps the epoch's anti-correlated noise: below ``low``, never switched."""
    import torch

    n, c = 10, 0.2
    expected = 1 - 2 * sum((1 - c) ** lag * (n - lag) for lag in range(1, n)) / (n * (n - 1))
    assert expected == pytest.approx(0.5078, abs=1e-4)
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(n, 1000, generator=gen, dtype=torch.float64)
    data -= data.mean(0)  # the batch gradients of one epoch sum to the full gradient, here 0
    order: list[torch.Tensor] = []

    def batch(k: int, w: object) -> torch.Tensor:
        if k % n == 0:
            order[:] = [torch.randperm(n, generator=gen)]
        return data[order[0][k % n]]

    ratios = _measured_ratios(batch, 1500, 0.1, c, decay=0.99)
    assert sum(ratios[500:]) / len(ratios[500:]) == pytest.approx(expected, rel=0.05)
    rule = _decide(ratios, warmup=20, patience=30)
    assert rule.decided_step is None and rule.damping_step is not None
    assert max(ratios[100:]) < DEFAULT_LOW


def test_oscillating_quadratic_damps_and_does_not_switch() -> None:
    """Noisy quadratic, L = 8, eta = 0.5, c = 0.2: eta L = 4 is stable with momentum (< 2 (2 - c) / c = 18) and not
    without (> 2). Heavy ball's stationary ratio 1 / (1 + (1 - c) eta L / (2 - c)) = 0.36: damping, kept."""
    import torch

    lipschitz, eta, c = 8.0, 0.5, 0.2
    assert 2 < eta * lipschitz < 2 * (2 - c) / c
    expected = 1 / (1 + (1 - c) * eta * lipschitz / (2 - c))
    assert expected == pytest.approx(0.36)
    gen = torch.Generator().manual_seed(0)
    ratios = _measured_ratios(
        lambda k, w: lipschitz * w + torch.randn(1000, generator=gen, dtype=torch.float64), 600, eta, c, decay=0.99
    )
    assert sum(ratios[300:]) / len(ratios[300:]) == pytest.approx(expected, rel=0.03)
    rule = _decide(ratios, warmup=20, patience=30)
    assert rule.decided_step is None and rule.damping_step == 50


def test_aligned_gradient_accelerates_and_does_not_switch() -> None:
    """A constant gradient: D -> -eta g, ratio -> (2 - c) / c = 9 at c = 0.2; momentum accelerates, kept."""
    import torch

    g = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratios = _measured_ratios(lambda k, w: g, 150, 0.1, 0.2)
    assert ratios[-1] == pytest.approx((2 - 0.2) / 0.2, rel=0.01)
    assert min(ratios[20:]) > DEFAULT_HIGH
    rule = _decide(ratios, warmup=20, patience=30)
    assert rule.decided_step is None and rule.damping_step is None
