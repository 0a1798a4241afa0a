"""Theorem 1 (THEORY.md sections 2-3): schedules and optimizer state, both directions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_spa import SPA, sgdm_optimizer_to_spa, sgdm_to_spa, spa_optimizer_to_sgdm, spa_to_sgdm
from lightning_spa.mapping import NoSPAEquivalentError

N, CHANGE = 100, 20  # Figure 1: a change at step 20 of 100


def _piecewise(before: float, after: float) -> list[float]:
    return [before] * CHANGE + [after] * (N - CHANGE)


def test_constant_schedules_map_to_constants():
    assert spa_to_sgdm(1.0, 0.1) == pytest.approx((0.1, 0.9))
    assert sgdm_to_spa(0.1, 0.9) == pytest.approx((1.0, 0.1))
    lr, momentum = spa_to_sgdm([1.0] * 5, [0.1] * 5)
    assert lr == pytest.approx([0.1] * 5) and momentum == pytest.approx([0.9] * 5)
    assert isinstance(lr, list) and isinstance(spa_to_sgdm(2.0, 0.5)[0], float)


def test_scalar_broadcasts_against_a_sequence():
    lr, momentum = spa_to_sgdm(1.0, [0.1, 0.2])
    assert lr == pytest.approx([0.1, 0.2]) and momentum == pytest.approx([0.9, 0.9])


def test_round_trip_recovers_a_random_schedule():
    gen = torch.Generator().manual_seed(0)
    eta = (torch.rand(30, generator=gen, dtype=torch.float64) + 0.1).tolist()
    c = (torch.rand(30, generator=gen, dtype=torch.float64) * 0.25 + 0.05).tolist()
    lr, momentum = spa_to_sgdm(eta, c)
    eta2, c2 = sgdm_to_spa(lr, momentum, eta0=eta[0])
    assert eta2 == pytest.approx(eta, rel=1e-9) and c2 == pytest.approx(c, rel=1e-9)


def test_panel_a_lr_drop_makes_eta_grow_geometrically():
    eta, c = sgdm_to_spa(_piecewise(0.1, 0.01), [0.9] * N)
    assert eta[:CHANGE] == pytest.approx([1.0] * CHANGE) and c[CHANGE] == pytest.approx(0.01)
    ratios = [eta[k + 1] / eta[k] for k in range(CHANGE + 1, N - 1)]
    # eta_{k+1}/eta_k = (1 - c_k)/beta -> 1/0.9 = 1.11 as c_k shrinks geometrically.
    assert ratios[0] == pytest.approx((1 - c[CHANGE + 1]) / 0.9)
    assert ratios[-1] == pytest.approx(1 / 0.9, rel=1e-3) and all(r > 1.09 for r in ratios)
    assert all(c[k + 1] < c[k] for k in range(CHANGE, N - 1))


def test_panel_b_momentum_drop_makes_the_same_drift():
    eta, c = sgdm_to_spa([0.1] * N, _piecewise(0.9, 0.8))
    ratios = [eta[k + 1] / eta[k] for k in range(CHANGE, N - 1)]
    assert ratios[5] == pytest.approx((1 - c[CHANGE + 5]) / 0.8)
    assert ratios[-1] == pytest.approx(1 / 0.8, rel=1e-3) and all(r > 1.1 for r in ratios)
    assert all(c[k + 1] < c[k] for k in range(CHANGE, N - 1))


def test_long_constant_schedules_stay_constant():
    # The converse recursion amplifies round-off by 1/(1-c) a step; constant runs must not drift.
    eta, c = sgdm_to_spa([0.1] * 10000, [0.9] * 10000)
    assert eta[-1] == pytest.approx(1.0, rel=1e-12) and c[-1] == pytest.approx(0.1, rel=1e-12)
    spa_eta = [1.0] * 3000 + [0.1] * 3000 + [0.01] * 3000  # the paper's instant stage-wise schedule
    spa_c = [0.1] * 3000 + [1.0] * 6000
    eta, c = sgdm_to_spa(*spa_to_sgdm(spa_eta, spa_c))
    assert eta == pytest.approx(spa_eta, rel=1e-12) and c == pytest.approx(spa_c, rel=1e-12)


def test_round_trip_of_the_papers_gradual_schedule():
    eta = [1.0] * 50 + [0.1 ** (j / 30) for j in range(1, 31)] + [0.1] * 2000
    c = [0.1] * 50 + [min(1.0, 0.1 * 10 ** (j / 30)) for j in range(1, 31)] + [1.0] * 2000
    eta2, c2 = sgdm_to_spa(*spa_to_sgdm(eta, c))
    assert eta2 == pytest.approx(eta, rel=1e-12) and c2 == pytest.approx(c, rel=1e-12)


def test_round_trip_of_a_long_gradual_lr_transition():
    # Forwards, the converse recursion would multiply round-off by 1/momentum = 1.11 a step:
    # after 5,000 steps of a geometric eta decay at c = 0.1 nothing would be left of it.
    eta = [1.0] * 10 + [0.1 ** (j / 5000) for j in range(1, 5001)] + [0.1] * 100
    eta2, c2 = sgdm_to_spa(*spa_to_sgdm(eta, 0.1))
    assert eta2 == pytest.approx(eta, rel=1e-12) and c2 == pytest.approx([0.1] * len(eta), rel=1e-12)


def test_panels_c_and_e_spike_to_nine():
    lr, momentum = spa_to_sgdm(_piecewise(1.0, 0.1), [0.1] * N)  # c: eta 10x down
    assert momentum[CHANGE] == pytest.approx(9.0)
    assert momentum[CHANGE + 1 :] == pytest.approx([0.9] * (N - CHANGE - 1)) and lr[CHANGE] == pytest.approx(0.01)
    lr, momentum = spa_to_sgdm(_piecewise(1.0, 0.1), _piecewise(0.1, 1.0))  # e: and c 10x up
    assert momentum[CHANGE] == pytest.approx(9.0)
    assert momentum[CHANGE + 1 :] == pytest.approx([0.0] * (N - CHANGE - 1))
    assert lr[CHANGE:] == pytest.approx([0.1] * (N - CHANGE))


def test_panel_d_momentum_off_keeps_the_effective_step():
    lr, momentum = spa_to_sgdm([1.0] * N, _piecewise(0.1, 1.0))
    assert lr[CHANGE] == pytest.approx(1.0) and lr[CHANGE - 1] == pytest.approx(0.1)  # alpha 10x up
    assert momentum[CHANGE] == pytest.approx(0.9) and momentum[CHANGE + 1 :] == pytest.approx([0.0] * (N - CHANGE - 1))


def test_panel_f_geometric_transition_keeps_momentum_below_one():
    r = 1.1
    steps = 24  # r**24 > 10: eta reaches 0.1 and c reaches 1
    eta = [1.0] * CHANGE + [max(0.1, r**-j) for j in range(1, N - CHANGE + 1)]
    c = [0.1] * CHANGE + [min(1.0, 0.1 * r**j) for j in range(1, N - CHANGE + 1)]
    _, momentum = spa_to_sgdm(eta, c)
    assert max(momentum[1:]) < 1.0
    assert momentum[CHANGE] == pytest.approx(0.9 * r)  # (1 - c_{k-1}) * r = 0.99
    assert momentum[CHANGE + steps + 1 :] == pytest.approx([0.0] * (N - CHANGE - steps - 1))


def test_momentum_zero_after_step_zero_needs_c_one_before_it():
    lr, momentum = [0.1] * 10, [0.9] * 7 + [0.0] * 3
    with pytest.raises(NoSPAEquivalentError, match="step 7") as err:  # the natural start 1.0 has c 0.1 at step 6
        sgdm_to_spa(lr, momentum, eta0=1.0)
    assert err.value.step == 7 and "eta0=None" in str(err.value)
    eta, c = sgdm_to_spa(lr, momentum)  # the default finds the form that reaches c = 1 at step 6
    assert c[6] == pytest.approx(1.0) and c[7:] == pytest.approx([1.0] * 3)
    lr2, momentum2 = spa_to_sgdm(eta, c)  # momentum2[0] is 1 - c_0: beta_0 has no effect
    assert lr2 == pytest.approx(lr, rel=1e-12) and momentum2[1:] == pytest.approx(momentum[1:], abs=1e-12)


def test_rising_momentum_from_an_explicit_eta0_names_the_first_unrepresentable_step():
    warmup = [0.5 + 0.4 * min(1.0, k / 10) for k in range(30)]  # a momentum warm-up 0.5 -> 0.9
    with pytest.raises(NoSPAEquivalentError) as err:
        sgdm_to_spa([0.1] * 30, warmup, eta0=0.2)  # the natural start lr / (1 - 0.5)
    k = err.value.step
    eta, _ = sgdm_to_spa([0.1] * k, warmup[:k], eta0=0.2)  # everything before it maps
    assert (eta[-1] - 0.1) / warmup[k] < 0.1  # eta_k < alpha_k: c_k > 1


def test_plain_sgd_and_restarts_map():
    eta, c = sgdm_to_spa([0.1] * 5, [0.0] * 5)
    assert eta == pytest.approx([0.1] * 5) and c == pytest.approx([1.0] * 5)
    eta, c = sgdm_to_spa([0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5])  # momentum switched on after c = 1
    assert c[1] == pytest.approx(0.5) and spa_to_sgdm(eta, c)[1][2:] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0.1, 0.1], [0.9]), "same length"),
        (([-0.1], [0.9]), "`lr` at step 0"),
        (([0.1], [-0.9]), "`momentum` at step 0"),
        (([], []), "empty"),
    ],
)
def test_sgdm_to_spa_input_errors(args, match):
    with pytest.raises(ValueError, match=match):
        sgdm_to_spa(*args)


def test_spa_to_sgdm_input_errors():
    with pytest.raises(ValueError, match="`c` at step 1"):
        spa_to_sgdm([1.0, 1.0], [0.1, 1.5])
    with pytest.raises(ValueError, match="`eta` at step 0"):
        spa_to_sgdm(0.0, 0.1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _steps(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for k in range(start, stop):
        gen = torch.Generator().manual_seed(k)
        x, y = torch.randn(32, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_state_conversion_sgd_spa_sgd_mid_run_keeps_the_trajectory():
    reference, switched = _model(), _model()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 0.05, "momentum": 0.9, "name": "body"},
        {"params": m[2].parameters(), "lr": 0.2, "momentum": 0.8},
    ]
    sgd_ref = torch.optim.SGD(groups(reference), weight_decay=1e-3)
    _steps(reference, sgd_ref, 0, 60)

    sgd = torch.optim.SGD(groups(switched), weight_decay=1e-3)
    _steps(switched, sgd, 0, 20)
    spa = sgdm_optimizer_to_spa(sgd)
    assert isinstance(spa, SPA) and spa.param_groups[0]["name"] == "body"
    assert spa.param_groups[0]["lr"] == pytest.approx(0.5) and spa.param_groups[1]["c"] == pytest.approx(0.2)
    _steps(switched, spa, 20, 40)
    sgd_again = spa_optimizer_to_sgdm(spa)
    assert sgd_again.param_groups[1]["momentum"] == pytest.approx(0.8)
    assert sgd_again.param_groups[0]["weight_decay"] == 1e-3
    _steps(switched, sgd_again, 40, 60)
    for p, q in zip(reference.parameters(), switched.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_state_conversion_exposes_z():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _steps(model, sgd, 0, 3)
    spa = sgdm_optimizer_to_spa(sgd)
    p = next(model.parameters())
    expected = p - 0.9 * 1.0 * sgd.state[p]["momentum_buffer"]  # z = x - (1 - c) * eta * m
    torch.testing.assert_close(spa.z(p), expected)


def test_state_conversion_refuses_nesterov():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        sgdm_optimizer_to_spa(sgd)


def test_state_conversion_with_eta_takes_momentum_one():
    # momentum >= 1 has no constant SPA form, but with `eta` given the buffers convert (z = x - beta * eta * m).
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=1.0)
    _steps(model, sgd, 0, 3)
    spa = sgdm_optimizer_to_spa(sgd, eta=2.0)
    p = next(model.parameters())
    torch.testing.assert_close(spa.z(p), p - 1.0 * 2.0 * sgd.state[p]["momentum_buffer"])


def test_multisteplr_drifts_by_default_and_bounded_stays_finite():
    # CIFAR-10 recipe in SGD form: lr 0.1, momentum 0.9, 10x drops at epochs 150 and 225 (391 steps each).
    m = 150 * 391
    lr = [0.1] * m + [0.01] * (75 * 391) + [0.001] * (75 * 391)
    eta, _ = sgdm_to_spa(lr[: m + 50], 0.9)  # the natural form: constant, then Figure 1a's drift ...
    assert eta[m - 1] == pytest.approx(1.0) and eta[m + 1] == pytest.approx(1.1) and eta[-1] > 100
    with pytest.raises(NoSPAEquivalentError, match="'bounded'") as err:
        sgdm_to_spa(lr, 0.9, eta0=1.0)  # ... until eta overflows a float
    assert m < err.value.step < len(lr)
    assert sgdm_to_spa(lr, 0.9) == sgdm_to_spa(lr, 0.9, eta0="bounded")  # the default falls back to the finite form
    eta, c = sgdm_to_spa(lr, 0.9, eta0="bounded")  # moves ahead of each drop and stays finite
    assert eta[0] == pytest.approx(1.0) and c[m + 1000] == pytest.approx(0.1) and eta[-1] == pytest.approx(0.01)
    assert max(c[m - 300 : m]) > 0.5  # c rises before the drop: the equivalent of keeping momentum 0.9
    lr2, momentum2 = spa_to_sgdm(eta, c)
    assert lr2 == pytest.approx(lr, rel=1e-12) and momentum2[1:] == pytest.approx([0.9] * (len(lr) - 1), rel=1e-12)


def test_unknown_eta0_string_is_refused():
    with pytest.raises(ValueError, match="`eta0`"):
        sgdm_to_spa([0.1], [0.9], eta0="natural")
