"""SPA against torch.optim.SGD (Theorem 1) and against the paper's literal recursion."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from spa_reference import ReferenceSPA
from torch import nn

from lightning_spa import SPA, sgdm_to_spa, spa_to_sgdm
from lightning_spa.demos.digits import DigitsCNN
from lightning_spa.optim import SPASpikeWarning

PATHS = [
    pytest.param({"foreach": False}, id="loop"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param({"fused": True}, id="fused"),
    pytest.param({}, id="default"),
]
STEPS = 300
BATCH = 32


def _digits_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN(channels=4).net.double()


def _run(model: nn.Module, opt: torch.optim.Optimizer, data, schedule, steps: int = STEPS) -> list[float]:
    """Trains on consecutive digits batches; ``schedule(k, opt)`` sets step k's hyper-parameters."""
    images, labels = data
    losses = []
    for k in range(steps):
        i = (k * BATCH) % (len(labels) - BATCH)
        schedule(k, opt)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images[i : i + BATCH]), labels[i : i + BATCH])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


# An SGD+M schedule with two 10x lr drops and a momentum change, as users write them.
SGD_LR = [0.1] * 100 + [0.01] * 100 + [0.001] * 100
SGD_MOMENTUM = [0.9] * 150 + [0.8] * 150


@pytest.mark.parametrize("path", PATHS)
def test_spa_reproduces_torch_sgd_schedule(path, digits64):
    eta, c = sgdm_to_spa(SGD_LR, SGD_MOMENTUM)
    sgd_model, spa_model = _digits_model(), _digits_model()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    spa = SPA(spa_model.parameters(), lr=eta[0], c=c[0], weight_decay=1e-3, **path)

    def sgd_schedule(k, opt):
        opt.param_groups[0].update(lr=SGD_LR[k], momentum=SGD_MOMENTUM[k])

    def spa_schedule(k, opt):
        opt.param_groups[0].update(lr=eta[k], c=c[k])

    sgd_losses = _run(sgd_model, sgd, digits64, sgd_schedule)
    spa_losses = _run(spa_model, spa, digits64, spa_schedule)
    assert sgd_losses[-1] < 0.5 * sgd_losses[0]  # the model really trains
    assert _max_diff(sgd_model, spa_model) < 1e-12
    assert max(abs(a - b) for a, b in zip(sgd_losses, spa_losses, strict=True)) < 1e-12


@pytest.mark.parametrize("path", PATHS)
def test_torch_sgd_reproduces_spa_schedule_through_spa_to_sgdm(path, digits64):
    # An SPA schedule with an instant eta drop (the spike), a c change and momentum off (c = 1).
    # (torch SGD leaves its buffer untouched on momentum-0 steps, so momentum coming back after
    # c = 1 is checked against the paper's recursion instead, below.)
    eta = [1.0] * 80 + [0.1] * 80 + [0.1] * 60 + [0.05] * 80
    c = [0.1] * 80 + [0.1] * 80 + [0.3] * 60 + [1.0] * 80
    lr, momentum = spa_to_sgdm(eta, c)
    assert momentum[80] == pytest.approx(9.0)
    sgd_model, spa_model = _digits_model(1), _digits_model(1)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=lr[0], momentum=momentum[0], weight_decay=5e-4)
    spa = SPA(spa_model.parameters(), lr=eta[0], c=c[0], weight_decay=5e-4, **path)
    _run(sgd_model, sgd, digits64, lambda k, o: o.param_groups[0].update(lr=lr[k], momentum=momentum[k]))
    with pytest.warns(SPASpikeWarning, match="SPA step 80 .* of 9 >= 1"):  # the instant drop, on purpose
        _run(spa_model, spa, digits64, lambda k, o: o.param_groups[0].update(lr=eta[k], c=c[k]))
    assert _max_diff(sgd_model, spa_model) < 1e-11


@pytest.mark.parametrize("path", PATHS)
def test_spa_matches_the_papers_recursion_and_z(path):
    torch.manual_seed(0)
    target = torch.randn(50, dtype=torch.float64)
    x_ref = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    x = x_ref.detach().clone().requires_grad_(True)
    ref, spa = ReferenceSPA([x_ref], weight_decay=0.01), SPA([x], lr=0.5, c=0.2, weight_decay=0.01, **path)
    for k in range(120):
        eta, c = (0.5, 0.2) if k < 40 else (0.5 * 0.9 ** (k - 39), min(1.0, 0.2 * 1.05 ** (k - 39)))
        spa.param_groups[0].update(lr=eta, c=c)
        noise = torch.randn(50, dtype=torch.float64)
        for p in (x_ref, x):
            p.grad = (p.detach() - target) * torch.linspace(0.1, 2.0, 50, dtype=torch.float64) + noise
        ref.step(eta, c)
        spa.step()
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(spa.z(x), ref.zs[0], rtol=0, atol=1e-12)


def test_c_equal_one_is_plain_sgd_and_momentum_can_return():
    torch.manual_seed(0)
    x_ref = torch.randn(20, dtype=torch.float64, requires_grad=True)
    x = x_ref.detach().clone().requires_grad_(True)
    ref, spa = ReferenceSPA([x_ref]), SPA([x], lr=0.3, c=1.0)
    for k in range(30):
        c = 1.0 if k < 10 or 15 <= k < 20 else 0.25
        spa.param_groups[0]["c"] = c
        for p in (x_ref, x):
            p.grad = torch.sin(p.detach() * (k + 1))
        ref.step(0.3, c)
        spa.step()
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-12)
        if c == 1.0:
            assert torch.equal(spa.z(x), x.detach())


def test_from_sgdm_is_torch_sgd():
    model = _digits_model()
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8, weight_decay=1e-4)
    spa = SPA.from_sgdm(twin.parameters(), lr=0.05, momentum=0.8, weight_decay=1e-4)
    assert spa.param_groups[0]["lr"] == pytest.approx(0.25) and spa.param_groups[0]["c"] == pytest.approx(0.2)
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    for _ in range(20):
        for m, o in ((model, sgd), (twin, spa)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert _max_diff(model, twin) < 1e-13


def test_maximize_tensor_lr_and_missing_grads():
    torch.manual_seed(0)
    a, b = (
        torch.randn(5, dtype=torch.float64, requires_grad=True),
        torch.randn(3, dtype=torch.float64, requires_grad=True),
    )
    a_ref = a.detach().clone().requires_grad_(True)
    spa = SPA([a, b], lr=torch.tensor(0.2, dtype=torch.float64), c=0.5, maximize=True)
    ref = ReferenceSPA([a_ref])
    b_before = b.detach().clone()
    for _ in range(5):
        a.grad = torch.cos(a.detach())
        a_ref.grad = -torch.cos(a_ref.detach())  # maximize == minimizing the negated gradient
        spa.step()
        ref.step(0.2, 0.5)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-14)
    assert torch.equal(b, b_before) and b not in spa.state  # no gradient: skipped, as in torch SGD


def _train_steps(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("path", PATHS)
def test_state_dict_resume_is_bit_exact(path, tmp_path):
    full, resumed = _digits_model(), _digits_model()
    opt_full = SPA(full.parameters(), lr=0.8, c=0.2, weight_decay=1e-4, **path)
    _train_steps(full, opt_full, 7, seed=1)
    torch.save({"model": full.state_dict(), "opt": opt_full.state_dict()}, tmp_path / "ckpt.pt")
    opt_full.param_groups[0].update(lr=0.4, c=0.5)
    with pytest.warns(SPASpikeWarning, match="of 1.6 >= 1"):  # (1 - 0.2) * 0.8 / 0.4: an instant drop
        _train_steps(full, opt_full, 6, seed=2)

    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = SPA(resumed.parameters(), lr=123.0, c=0.9, **path)  # hyper-parameters come from the checkpoint
    opt_resumed.load_state_dict(ckpt["opt"])
    assert opt_resumed.param_groups[0]["lr"] == 0.8 and opt_resumed.param_groups[0]["weight_decay"] == 1e-4
    opt_resumed.param_groups[0].update(lr=0.4, c=0.5)
    with pytest.warns(SPASpikeWarning, match="of 1.6 >= 1"):  # the resumed run sees the same drop
        _train_steps(resumed, opt_resumed, 6, seed=2)
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt_full.z(p), opt_resumed.z(q))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1}, "`lr`"),
        ({"lr": math.nan}, "`lr`"),
        ({"lr": math.inf}, "`lr`"),
        ({"c": 0.0}, "`c`"),
        ({"c": 1.5}, "`c`"),
        ({"c": math.nan}, "`c`"),
        ({"weight_decay": -1e-4}, "`weight_decay`"),
        ({"weight_decay": math.inf}, "`weight_decay`"),
        ({"fused": True, "foreach": True}, "`fused=True` and `foreach=True`"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPA([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": "0.1"}, TypeError, "`lr`"),
        ({"c": "0.1"}, TypeError, "`c`"),
        ({"lr": None}, TypeError, "`lr`"),
        ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "Tensor lr must be 1-element"),
        ({"c": torch.tensor([0.1, 0.2])}, ValueError, "Tensor c must be 1-element"),
        ({"lr": torch.tensor(-1.0)}, ValueError, "Invalid learning rate"),
        ({"c": torch.tensor(0.0)}, ValueError, "`c`"),
    ],
)
def test_types_and_tensor_values_are_checked_like_torch(kwargs, error, match):
    with pytest.raises(error, match=match):
        SPA([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        ({"c": 1.5}, ValueError, "`c`"),
        ({"lr": -1.0}, ValueError, "`lr`"),
        ({"lr": "fast"}, TypeError, "`lr`"),
        ({"weight_decay": -1.0}, ValueError, "`weight_decay`"),
        ({"fused": True, "foreach": True}, ValueError, "`fused=True` and `foreach=True`"),
    ],
)
def test_add_param_group_validates_like_the_constructor(group, error, match):
    opt = SPA([torch.zeros(2, requires_grad=True)])
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], **group})
    assert len(opt.param_groups) == 1  # the bad group was not kept


def test_from_sgdm_names_nesterov_and_dampening():
    params = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="`nesterov=True` has no SPA form"):
        SPA.from_sgdm(params, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="`dampening`"):
        SPA.from_sgdm(params, lr=0.1, momentum=0.9, dampening=0.5)
    assert SPA.from_sgdm(params, lr=0.1, momentum=0.9, nesterov=False, dampening=0.0).param_groups[0]["c"] == 1 - 0.9


def test_invalid_values_set_between_steps_are_caught_at_the_step():
    p = torch.zeros(2, requires_grad=True)
    opt = SPA([p])
    p.grad = torch.ones(2)
    opt.param_groups[0]["c"] = 0.0
    with pytest.raises(ValueError, match="`c`"):
        opt.step()
    opt.param_groups[0].update(c=0.5, lr="0.1")
    with pytest.raises(TypeError, match="`lr`"):
        opt.step()
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.1])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.step()


def test_per_group_values_are_validated():
    with pytest.raises(ValueError, match="`c`"):
        SPA([{"params": [torch.zeros(2, requires_grad=True)], "c": 2.0}])


def test_fused_on_unsupported_dtype_names_fused():
    with pytest.raises(RuntimeError, match="fused"):
        SPA([torch.zeros(2, dtype=torch.int64)], fused=True)


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SPA(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_from_sgdm_rejects_momentum_one():
    with pytest.raises(ValueError, match="`momentum`"):
        SPA.from_sgdm([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=1.0)


def test_fused_request_on_dtensor_parameters_is_refused_at_construction(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(RuntimeError, match="DTensor"):
            SPA([param], fused=True)
        opt = SPA([param])  # the default dispatch avoids the fused kernel for DTensor
        param.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
        before = param.detach().full_tensor().clone()
        opt.step()
        torch.testing.assert_close(param.detach().full_tensor(), before - 0.1)  # c * eta * g on the first step
        plain = before.clone().requires_grad_()
        ref = SPA([plain])
        ref.param_groups[0]["lr"] = 1.0
        for eta, c in ((1.0, 0.1), (0.0, 0.1), (0.5, 0.1), (0.5, 1.0), (0.5, 0.3)):  # eta = 0, momentum off and on
            if eta != 1.0:
                opt.param_groups[0].update(lr=eta, c=c)
                param.grad = distribute_tensor(torch.full((4, 3), 0.5), mesh, [Shard(0)])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SPASpikeWarning)
                    opt.step()
            ref.param_groups[0].update(lr=eta, c=c)
            plain.grad = torch.ones(4, 3) if eta == 1.0 else torch.full((4, 3), 0.5)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SPASpikeWarning)
                ref.step()
            torch.testing.assert_close(param.detach().full_tensor(), plain.detach(), rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
