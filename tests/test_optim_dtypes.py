"""SPA's kernels and dtypes: bfloat16 parameters, tensor-mode scalars and histories (issue 16, items 7 and 8)."""

from __future__ import annotations

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
