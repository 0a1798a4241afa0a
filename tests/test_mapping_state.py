"""Optimizer state across the two forms (issue 16 items 1, 4, 15; THEORY.md section 2).

- ``initial_lr`` (an LR scheduler's) converts with ``lr`` in both optimizer converters;
- an SPA state dict converts to the torch SGD state dict that continues it (and back);
- the ``mapping`` module's advice for torch SGD on momentum-0 steps follows the recursion.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_spa
from lightning_spa import SPA, sgdm_optimizer_to_spa, spa_optimizer_to_sgdm, spa_to_sgdm
from lightning_spa.state_dicts import sgd_state_dict_to_spa, spa_state_dict_to_sgd


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()


def _grad_step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    x, y = (
        torch.randn(16, 5, generator=gen, dtype=torch.float64),
        torch.randn(16, 2, generator=gen, dtype=torch.float64),
    )
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _assert_same(a: nn.Module, b: nn.Module, atol: float = 1e-12) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


# -- item 1: initial_lr --------------------------------------------------------------------------


def test_sgdm_optimizer_to_spa_converts_initial_lr_so_a_new_scheduler_starts_in_spa_units():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.05, momentum=0.9)
    torch.optim.lr_scheduler.LambdaLR(sgd, lambda k: 1.0)  # writes initial_lr = 0.05
    spa = sgdm_optimizer_to_spa(sgd)
    assert spa.param_groups[0]["lr"] == pytest.approx(0.5)
    assert spa.param_groups[0]["initial_lr"] == pytest.approx(0.5)  # was 0.05: a scheduler started 10x low
    scheduler = torch.optim.lr_scheduler.LambdaLR(spa, lambda k: 1.0)
    assert scheduler.base_lrs == pytest.approx([0.5])
    spa_eta = sgdm_optimizer_to_spa(sgd, eta=2.0)  # a chosen eta: initial_lr scales by eta / lr
    assert spa_eta.param_groups[0]["initial_lr"] == pytest.approx(2.0)


def test_spa_optimizer_to_sgdm_converts_initial_lr():
    spa = SPA(_model().parameters(), lr=1.0, c=0.1)
    torch.optim.lr_scheduler.LambdaLR(spa, lambda k: 1.0)  # initial_lr = 1.0 (eta)
    sgd = spa_optimizer_to_sgdm(spa)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.1)
    assert sgd.param_groups[0]["initial_lr"] == pytest.approx(0.1)  # was 1.0: a scheduler started 10x high
    assert torch.optim.lr_scheduler.LambdaLR(sgd, lambda k: 1.0).base_lrs == pytest.approx([0.1])


# -- item 4: SPA state dict -> torch SGD -----------------------------------------------------------


def test_spa_state_dict_is_exported_and_importable_from_the_old_places():
    from lightning_spa.mapping import sgd_state_dict_to_spa as old_place

    assert old_place is sgd_state_dict_to_spa is lightning_spa.sgd_state_dict_to_spa
    assert lightning_spa.spa_state_dict_to_sgd is spa_state_dict_to_sgd


def test_spa_state_dict_continues_as_torch_sgd_on_a_constant_schedule():
    ref, switched = _model(), _model()
    spa_ref = SPA(ref.parameters(), lr=0.8, c=0.2, weight_decay=1e-3)
    spa = SPA(switched.parameters(), lr=0.8, c=0.2, weight_decay=1e-3)
    for k in range(6):
        _grad_step(ref, spa_ref, k)
        _grad_step(switched, spa, k)
    converted = spa_state_dict_to_sgd(spa.state_dict())
    group = converted["param_groups"][0]
    assert (group["lr"], group["momentum"]) == (pytest.approx(0.16), pytest.approx(0.8))
    assert group["weight_decay"] == 1e-3 and "c" not in group
    sgd = torch.optim.SGD(switched.parameters(), lr=123.0, momentum=0.1)  # the values come from the state dict
    sgd.load_state_dict(converted)
    for k in range(6, 30):
        _grad_step(ref, spa_ref, k)
        _grad_step(switched, sgd, k)  # before: KeyError 'momentum' at the first step (a raw SPA state dict)
    _assert_same(ref, switched)
    with pytest.warns(UserWarning, match="converted by Theorem 1"):  # and back: the inverse
        again = sgd_state_dict_to_spa(sgd.state_dict())
    assert (again["param_groups"][0]["lr"], again["param_groups"][0]["c"]) == (pytest.approx(0.8), pytest.approx(0.2))
    for key, st in spa_ref.state_dict()["state"].items():
        torch.testing.assert_close(again["state"][key]["momentum_buffer"], st["momentum_buffer"], rtol=0, atol=1e-12)


def test_spa_state_dict_after_an_eta_change_takes_the_theorem_1_momentum_of_the_next_step():
    ref, switched = _model(), _model()
    spa_ref, spa = SPA(ref.parameters(), lr=1.0, c=0.1), SPA(switched.parameters(), lr=1.0, c=0.1)
    for k in range(5):
        _grad_step(ref, spa_ref, k)
        _grad_step(switched, spa, k)
    for opt in (spa_ref, spa):
        opt.param_groups[0]["lr"] = 0.95  # the next step's momentum is 0.9 * 1.0 / 0.95, then 0.9
    converted = spa_state_dict_to_sgd(spa.state_dict())
    assert converted["param_groups"][0]["momentum"] == pytest.approx(0.9 / 0.95)
    assert converted["param_groups"][0]["lr"] == pytest.approx(0.095)
    sgd = torch.optim.SGD(switched.parameters(), lr=0.05, momentum=0.9)
    sgd.load_state_dict(converted)
    _grad_step(ref, spa_ref, 5)
    _grad_step(switched, sgd, 5)
    sgd.param_groups[0]["momentum"] = 0.9  # from the second step on, a constant SPA schedule is momentum 1 - c
    for k in range(6, 20):
        _grad_step(ref, spa_ref, k)
        _grad_step(switched, sgd, k)
    _assert_same(ref, switched)


def test_spa_state_dict_without_history_and_initial_lr():
    model = _model()
    spa = SPA(model.parameters(), lr=2.0, c=0.5)
    torch.optim.lr_scheduler.LambdaLR(spa, lambda k: 1.0)
    converted = spa_state_dict_to_sgd(spa.state_dict())  # before any step: no buffers
    assert converted["state"] == {}
    group = converted["param_groups"][0]
    assert (group["lr"], group["momentum"], group["initial_lr"]) == (1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="not an SPA state dict"):
        spa_state_dict_to_sgd(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict())


def test_spa_state_dict_with_mixed_histories_or_eta_zero_is_refused():
    model = _model()
    spa = SPA(model.parameters(), lr=1.0, c=0.1)
    _grad_step(model, spa, 0)
    spa.param_groups[0]["lr"] = 0.0
    with pytest.raises(ValueError, match="eta = 0 with momentum history"):
        spa_state_dict_to_sgd(spa.state_dict())
    state = spa.state_dict()
    first = state["param_groups"][0]["params"][0]
    state["state"][first] = {**state["state"][first], "prev_eta": 0.3}
    state["param_groups"][0]["lr"] = 1.0
    with pytest.raises(ValueError, match="different momentum histories"):
        spa_state_dict_to_sgd(state)


# -- item 15: torch SGD on momentum-0 steps --------------------------------------------------------

ETA = [0.5] * 16
C = [0.2] * 5 + [1.0] + [0.3] * 10  # c = 1 at step 5: momentum 0 at step 6, then 0.7 again


def _torch_sgd_run(recipe: str) -> nn.Module:
    model = _model()
    lr, momentum = spa_to_sgdm(ETA, C)
    assert momentum[6] == 0.0 and momentum[7] == pytest.approx(0.7)
    sgd = torch.optim.SGD(model.parameters(), lr=lr[0], momentum=momentum[0])
    for k in range(len(ETA)):
        sgd.param_groups[0].update(lr=lr[k], momentum=momentum[k])
        if k >= 1 and momentum[k] == 0.0 and recipe != "torch as is":
            for p in model.parameters():
                sgd.state[p].pop("momentum_buffer", None)
            if recipe == "documented":  # a first step with any momentum > 0: torch sets m = g
                sgd.param_groups[0]["momentum"] = 0.5
        _grad_step(model, sgd, k)
    return model


def test_documented_momentum_zero_recipe_follows_spa_and_the_old_advice_does_not():
    model = _model()
    spa = SPA(model.parameters(), lr=ETA[0], c=C[0])
    for k in range(len(ETA)):
        spa.param_groups[0].update(lr=ETA[k], c=C[k])
        _grad_step(model, spa, k)
    _assert_same(model, _torch_sgd_run("documented"))
    for wrong in ("old advice: drop the buffer", "torch as is"):
        gap = max(
            (p - q).abs().max().item()
            for p, q in zip(model.parameters(), _torch_sgd_run(wrong).parameters(), strict=True)
        )
        assert gap > 1e-4, wrong
    doc = lightning_spa.mapping.__doc__ or ""
    assert "delete the buffers" in doc and "any momentum" in doc and "must drop the buffer" not in doc
