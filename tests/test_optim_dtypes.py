"""SPA's kernels and dtypes: bfloat16 parameters, tensor-mode scalars and histories (issue 16, items 7 and 8)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_spa import SPA, _compat
from lightning_spa.demos.digits import DigitsCNN
from lightning_spa.functional import default_kernel

CPU = torch.device("cpu")


def _bf16_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN(channels=4).net.to(torch.bfloat16)


def _train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int = 80, batch: int = 32) -> list[float]:
    images, labels = data[0].to(torch.bfloat16), data[1]
    losses = []
    for k in range(steps):
        i = (k * batch) % (len(labels) - batch)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images[i : i + batch]).float(), labels[i : i + batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_default_is_torch_sgds_default_and_trains(digits64):
    """bfloat16 on the CPU (Lightning's precision="bf16-true"): SPA's default is torch SGD's default, bit for bit."""
    sgd_model, spa_model = _bf16_model(), _bf16_model()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)  # default: the per-tensor loop on the CPU
    spa = SPA(spa_model.parameters(), lr=1.0, c=0.1)  # Theorem 1: the same method
    sgd_losses = _train(sgd_model, sgd, digits64)
    spa_losses = _train(spa_model, spa, digits64)
    assert sum(sgd_losses[-10:]) < 0.5 * sum(sgd_losses[:10])  # torch SGD's default trains
    assert spa_losses == sgd_losses
    for p, q in zip(spa_model.parameters(), sgd_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_dispatch_leaves_low_precision_cpu_to_the_loop(dtype):
    plain = {torch.nn.Parameter}
    assert default_kernel(plain, [(CPU, dtype)]) == "loop"  # torch SGD's default on the CPU
    assert default_kernel(plain, [(CPU, torch.float32), (CPU, dtype)]) == "loop"
    assert default_kernel(plain, [(CPU, torch.float32)]) == "fused"  # the fast path of float32/float64 stays


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_true_on_low_precision_cpu_warns_where_the_kernel_does_not_update(dtype):
    """``fused=True`` stays available; where torch's kernel leaves the parameters unchanged, SPA says so."""
    p = nn.Parameter(torch.zeros(64, dtype=dtype))
    broken = dtype in _compat.fused_cpu_broken_dtypes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SPA([p], lr=1.0, c=1.0, fused=True)
    messages = [str(w.message) for w in caught]
    assert messages == ([messages[0]] if broken else [])
    if broken:
        assert "pytorch/pytorch#191763" in messages[0] and caught[0].filename == __file__
    p.grad = torch.ones_like(p)
    opt.step()  # c = 1: x <- x - eta * g, so every element should be -1
    assert bool((p == -1).all()) != broken  # the probe agrees with SPA's own fused step


def _tensor_mode(monkeypatch):
    """What a compiled step (or an lr on an accelerator) runs: tensor mode, forced here in eager on the CPU."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@pytest.mark.parametrize("tensor", ["c", "lr"])
def test_tensor_mode_scalars_in_the_parameters_precision(tensor, monkeypatch):
    """A float ``lr`` with a float64 tensor ``c`` (or the reverse) on float64 parameters: float64 arithmetic.

    Built in float32 (the default dtype), eta = 0.3 would be 0.30000001192...: a relative drift of 4e-8
    a step, against the paper's recursion computed in float64."""
    from spa_reference import ReferenceSPA

    _tensor_mode(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, dtype=torch.float64, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    eta, c = 0.3, 0.7
    kwargs = {"lr": eta, "c": torch.tensor(c, dtype=torch.float64)}
    if tensor == "lr":
        kwargs = {"lr": torch.tensor(eta, dtype=torch.float64), "c": c}
    opt, ref = SPA([x], **kwargs), ReferenceSPA([x_ref])
    for _ in range(6):
        x.grad = torch.randn(30, dtype=torch.float64, generator=gen)
        x_ref.grad = x.grad.clone()
        opt.step()
        ref.step(eta, c)
    assert opt.state[x]["prev_eta"].dtype == torch.float64 and opt.state[x]["prev_eta"].item() == eta
    torch.testing.assert_close(x, x_ref, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(opt.z(x), ref.zs[0], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    ("param_dtype", "lr", "expected"),
    [
        (torch.float64, 0.3, torch.float64),
        (torch.float32, 0.3, torch.float32),
        (torch.bfloat16, 0.3, torch.float32),  # low precision: its opmath, float32
        (torch.float16, torch.tensor(0.3, dtype=torch.float64), torch.float64),
        (torch.float32, torch.tensor(0.3, dtype=torch.float64), torch.float64),
        (torch.complex128, 0.3, torch.float64),
    ],
)
def test_scalar_dtype(param_dtype, lr, expected):
    from lightning_spa.functional import scalar_dtype

    assert scalar_dtype(param_dtype, lr, torch.tensor(0.1, dtype=torch.float32)) == expected


def _bf16_tensor_run(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        opt.step()


def test_bf16_tensor_mode_histories_survive_load_state_dict(monkeypatch):
    """torch's load_state_dict casts state tensors to the parameter's dtype; SPA's scalar histories stay exact."""
    _tensor_mode(monkeypatch)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(20).to(torch.bfloat16)), nn.Parameter(torch.randn(5).to(torch.bfloat16))]
    lr = torch.tensor(0.7, dtype=torch.float64)
    opt = SPA(params, lr=lr, c=0.1)
    gen = torch.Generator().manual_seed(1)
    _bf16_tensor_run(opt, params, gen, 3)
    saved = copy.deepcopy(opt.state_dict())  # as through torch.save and torch.load
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = SPA(twins, lr=lr, c=0.1)
    resumed.load_state_dict(saved)
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        for key in ("prev_eta", "prev_c"):
            assert torch.equal(resumed.state[q][key], opt.state[p][key])
            assert resumed.state[q][key].dtype == opt.state[p][key].dtype
            assert resumed.state[q][key] is not saved["state"][i][key]  # a copy, not shared
        assert resumed.state[q]["prev_eta"].item() == 0.7  # not bfloat16's 0.69921875
        assert resumed.state[q]["momentum_buffer"].dtype == torch.bfloat16  # buffers: the parameter's dtype
    state = copy.deepcopy(gen.get_state())
    _bf16_tensor_run(opt, params, gen, 3)
    gen.set_state(state)
    _bf16_tensor_run(resumed, twins, gen, 3)
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)


def test_compiled_step_with_float_lr_and_float64_tensor_c_keeps_float64():
    """The case as observed: ``torch.compile(opt.step)``, ``lr`` a float, ``c`` a float64 tensor."""
    from spa_reference import ReferenceSPA

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, dtype=torch.float64, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    opt, ref = SPA([x], lr=0.3, c=torch.tensor(0.7, dtype=torch.float64)), ReferenceSPA([x_ref])
    step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(4):
        x.grad = torch.randn(30, dtype=torch.float64, generator=gen)
        x_ref.grad = x.grad.clone()
        step()
        ref.step(0.3, 0.7)
    assert opt.state[x]["prev_eta"].dtype == torch.float64
    torch.testing.assert_close(x, x_ref, rtol=1e-15, atol=1e-15)
    torch._dynamo.reset()
