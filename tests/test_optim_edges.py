"""SPA where a torch optimizer is expected to keep working (issue 8): eta -> 0, LR schedulers,
the spike warning, constant schedules bit for bit, c = 1, checkpoints across forms, validation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from spa_reference import ReferenceSPA
from test_optim import PATHS, _digits_model
from torch import nn
from torch.optim import lr_scheduler

from lightning_spa import SPA, spa_optimizer_to_sgdm
from lightning_spa.optim import SPASpikeWarning

SCALES = torch.linspace(0.1, 2.0, 30, dtype=torch.float64)


def _quadratic_grads(x: torch.Tensor, target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (x.detach() - target) * SCALES + noise


def _run_against_reference(path, schedule, steps, c=0.2, wd=0.01, seed=0):
    """SPA driven by ``schedule(opt)`` (called after each step) vs the literal z-form, float64."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(30, dtype=torch.float64, generator=gen)
    x = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    opt = SPA([x], lr=0.5, c=c, weight_decay=wd, **path)
    ref = ReferenceSPA([x_ref], weight_decay=wd)
    scheduler = schedule(opt)
    etas = []
    for _ in range(steps):
        eta = opt.param_groups[0]["lr"]
        etas.append(eta)
        noise = torch.randn(30, dtype=torch.float64, generator=gen)
        x.grad, x_ref.grad = _quadratic_grads(x, target, noise), _quadratic_grads(x_ref, target, noise)
        opt.step()
        ref.step(eta, c)
        scale = x_ref.detach().abs().max()
        assert torch.isfinite(x).all()
        assert (x - x_ref).abs().max() <= 1e-12 * scale
        assert (opt.z(x) - ref.zs[0]).abs().max() <= 1e-12 * max(scale, ref.zs[0].abs().max())
        if scheduler is not None:
            scheduler.step()
    return etas


@pytest.mark.parametrize("path", PATHS)
def test_cosine_annealing_to_zero_and_back_matches_the_z_form(path):
    etas = _run_against_reference(path, lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.0), 45)
    assert etas[20] == 0.0 and etas[30] == pytest.approx(0.25) and etas[40] == pytest.approx(0.5)  # to 0 and back


@pytest.mark.parametrize("path", PATHS)
def test_polynomial_lr_to_zero_then_back_up_matches_the_z_form(path):
    def schedule(opt):
        sched = lr_scheduler.PolynomialLR(opt, total_iters=10, power=2.0)
        step = sched.step

        def stepper():
            step()
            if sched.last_epoch == 16:
                opt.param_groups[0]["lr"] = 0.3  # back up after 6 steps at 0

        sched.step = stepper  # type: ignore[method-assign]
        return sched

    etas = _run_against_reference(path, schedule, 25)
    assert etas[10:16] == [0.0] * 6 and etas[16] == 0.3


@pytest.mark.parametrize("path", PATHS)
def test_instant_drops_to_tiny_eta_and_zero_are_exact(path):
    values = [0.5] * 5 + [1e-300] * 3 + [0.0] * 3 + [1e-310, 0.4, 0.4, 1e-310, 0.5]

    def schedule(opt):
        lam = lr_scheduler.LambdaLR(opt, lambda k: values[min(k, len(values) - 1)] / 0.5)
        return lam

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SPASpikeWarning)
        etas = _run_against_reference(path, schedule, len(values), c=0.3)
    assert etas[8] == 0.0 and etas[11] == 1e-310


@pytest.mark.parametrize("path", PATHS)
def test_eta_1e_310_gives_finite_iterates(path):
    x = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = SPA([x], lr=1.0, c=0.1, **path)
    for k in range(6):
        opt.param_groups[0]["lr"] = 1.0 if k < 2 else 1e-310
        x.grad = torch.full((4,), 3.0, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SPASpikeWarning)
            opt.step()
        assert torch.isfinite(x).all() and torch.isfinite(opt.z(x)).all()


def _spike_warnings(make_scheduler, steps=40, c=0.1):
    x = torch.zeros(3, requires_grad=True)
    opt = SPA([x], lr=1.0, c=c)
    sched = make_scheduler(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x.grad = torch.ones(3)
            opt.step()
            sched.step()
    return [w for w in caught if issubclass(w.category, SPASpikeWarning)]


def test_spike_warning_fires_once_for_multistep_lr():
    caught = _spike_warnings(lambda o: lr_scheduler.MultiStepLR(o, milestones=[10, 20], gamma=0.1))
    assert len(caught) == 1
    message = str(caught[0].message)
    # step 10 (0-based: the 11th) runs eta = 0.1 after eta = 1: equivalent momentum (1 - 0.1) * 1 / 0.1 = 9
    assert "SPA step 10 (counted from 0)" in message and " 9 " in message and "GradualSchedule" in message
    assert "staircase" not in message  # one drop: not a scheduler stepped per epoch
    assert caught[0].filename == __file__  # points at the caller of step()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda o: lr_scheduler.ExponentialLR(o, gamma=0.95), id="geometric"),  # (1-c)/0.95 < 1
        pytest.param(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=0.0), id="cosine-to-0"),
        pytest.param(lambda o: lr_scheduler.PolynomialLR(o, total_iters=30, power=1.0), id="linear-to-0"),
    ],
)
def test_no_spike_warning_for_smooth_schedules(make):
    assert _spike_warnings(make) == []


def _batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(n)
    ]


def _train(model, opt, batches, maximize=False):
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (-loss if maximize else loss).backward()
        opt.step()


@pytest.mark.parametrize("path", PATHS[:3])
@pytest.mark.parametrize(("eta", "c"), [(0.3, 0.1), (0.8, 0.25), (0.05, 1.0)])
def test_constant_schedule_is_torch_sgd_bit_for_bit(path, eta, c):
    spa_model, sgd_model = _digits_model(), _digits_model()
    spa = SPA(spa_model.parameters(), lr=eta, c=c, weight_decay=1e-3, **path)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=c * eta, momentum=1 - c, weight_decay=1e-3, **path)
    batches = _batches(30, seed=3)
    _train(spa_model, spa, batches)
    _train(sgd_model, sgd, batches)
    for p, q in zip(spa_model.parameters(), sgd_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_c_one_drops_the_buffers_and_momentum_returns_exactly():
    torch.manual_seed(0)
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    opt, ref = SPA([x], lr=0.3, c=0.2), ReferenceSPA([x_ref])
    for k in range(12):
        c = 1.0 if 4 <= k < 8 else 0.2
        opt.param_groups[0]["c"] = c
        for p in (x, x_ref):
            p.grad = torch.sin(3 * p.detach() + k)
        opt.step()
        ref.step(0.3, c)
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-13)
        if c == 1.0:
            assert len(opt.state) == 0 and opt.state_dict()["state"] == {} and opt.momentum_history(x) is None
        else:
            assert opt.momentum_history(x) is not None


def test_sgd_checkpoint_loaded_into_spa_continues_the_sgd_run():
    model = _digits_model(1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    _train(model, sgd, _batches(8, seed=1))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": sgd.state_dict()})
    _train(model, sgd, _batches(10, seed=2))  # the SGD run goes on

    resumed = _digits_model(7)
    resumed.load_state_dict(ckpt["model"])
    spa = SPA(resumed.parameters(), lr=123.0, c=0.5)
    with pytest.warns(UserWarning, match="converted by Theorem 1"):
        spa.load_state_dict(ckpt["opt"])
    assert spa.param_groups[0]["lr"] == pytest.approx(0.5) and spa.param_groups[0]["c"] == pytest.approx(0.1)
    _train(resumed, spa, _batches(10, seed=2))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_sgd_checkpoint_with_nesterov_names_the_converter():
    p = torch.zeros(2, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="sgdm_optimizer_to_spa"):
        SPA([p]).load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("last_c", [1.0, 0.2])
def test_spa_to_sgd_after_c_one_steps_continues_exactly(last_c):
    spa_model, sgd_model = _digits_model(2), _digits_model(2)
    spa = SPA(spa_model.parameters(), lr=0.4, c=0.2)
    _train(spa_model, spa, _batches(5, seed=4))
    spa.param_groups[0]["c"] = 1.0
    _train(spa_model, spa, _batches(3, seed=5))
    spa.param_groups[0]["c"] = last_c
    _train(spa_model, spa, _batches(2, seed=6))
    sgd_model.load_state_dict(spa_model.state_dict())
    twin = SPA(sgd_model.parameters(), lr=0.4, c=last_c)
    twin.load_state_dict(spa.state_dict())
    sgd = spa_optimizer_to_sgdm(twin)
    assert sgd.param_groups[0]["momentum"] == 1.0 - last_c  # exactly: eta unchanged
    _train(spa_model, spa, _batches(6, seed=7))
    _train(sgd_model, sgd, _batches(6, seed=7))
    for p, q in zip(spa_model.parameters(), sgd_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
