"""SPA's steady-state fast path (``lightning_spa._steady``) against the general path it shortcuts,
its invalidation, host reads of ``found_inf``, device scalars of tensor mode, and ``fused``
per param group."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_spa import SPA
from lightning_spa._steady import GroupPlan
from lightning_spa.functional import InfFlag
from lightning_spa.optim import SPASpikeWarning

PATHS = {
    "default": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "loop": {"foreach": False},
    "fused-wd-maximize": {"fused": True, "weight_decay": 0.01, "maximize": True},
    "foreach-wd": {"foreach": True, "weight_decay": 0.01},
}


def _scenario(opt: SPA, params: list[torch.Tensor], extra: torch.Tensor) -> list[torch.Tensor]:
    """Every kind of step the fast path must either take exactly or hand to the general path."""
    gen = torch.Generator().manual_seed(0)
    snapshots = []

    def step(skip: tuple[int, ...] = (4,)) -> None:  # parameter 4 is frozen: never a gradient
        for i, p in enumerate(opt.param_groups[0]["params"]):
            p.grad = None if i in skip else torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if len(opt.param_groups) > 1:
            extra.grad = torch.randn(extra.shape, generator=gen, dtype=extra.dtype)
        opt.step()
        snapshots.extend(p.detach().clone() for p in [*params, extra])
        for p in [*params, extra]:
            history = opt.momentum_history(p)
            if history is not None:
                snapshots.extend([history[0].clone(), torch.tensor(float(history[1]), dtype=torch.float64)])

    group = opt.param_groups[0]
    for _ in range(3):  # constant: coefficients cached
        step()
    for eta in (0.45, 0.4, 0.42):  # eta changes every step: histories move in place
        group["lr"] = eta
        step()
    group["lr"] = 0.04  # an instant drop (spike), then eta = 0 and back up
    step()
    group["lr"] = 0.0
    step()
    group["lr"] = 0.3
    step()
    step(skip=(1, 4))  # a parameter without a gradient this step: mixed histories after it (general path)
    step()
    group["c"] = 1.0  # momentum off: buffers dropped; c = 1 steady; back on
    step()
    step()
    group["c"], group["lr"] = 0.25, 1  # an int lr
    step()
    step()
    opt.add_param_group({"params": [extra], "lr": 0.2, "c": 0.5})
    step()
    step()
    opt.state[params[0]]["prev_eta"] = 0.35  # the state edited in place: read afresh
    step()
    group["params"][2] = params[2]  # the parameter list rewritten in place (same tensor)
    step()
    opt.load_state_dict(opt.state_dict())  # new groups and state
    step()
    step()
    opt.param_groups.pop()  # a group removed: its plan is let go
    step()
    assert len(opt._plans) <= 1
    return snapshots


def _model(dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shapes = ((4, 3), (3,), (2, 2, 2), (), (2,))
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    return params, torch.randn(5, generator=gen, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
def test_fast_path_gives_the_bits_of_the_general_path(path, monkeypatch):
    runs, taken = [], []
    original = GroupPlan.step

    def counting(self, *args, **kwargs):
        done = original(self, *args, **kwargs)
        taken.append(done is not None)
        return done

    for fast in (True, False):
        params, extra = _model()
        opt = SPA(params, lr=0.5, c=0.2, **PATHS[path])
        monkeypatch.setattr(GroupPlan, "step", counting if fast else lambda *args, **kwargs: None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append(_scenario(opt, params, extra))
        assert [w.category.__name__ for w in caught] == ["SPASpikeWarning"]
        if fast:
            assert sum(taken) >= 20 and not all(taken)  # most steps are fast; the skipped gradient is not
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_fast_path_matches_torch_sgd_bits_and_momentum_off_keeps_no_state():
    params = _model(torch.float32)[0][:4]
    twins = [p.detach().clone().requires_grad_() for p in params]
    spa, sgd = SPA(params, lr=0.5, c=0.2), torch.optim.SGD(twins, lr=0.2 * 0.5, momentum=1 - 0.2, fused=True)
    plain = [p.detach().clone().requires_grad_() for p in params]
    plain_twins = [p.detach().clone().requires_grad_() for p in params]
    spa1, sgd0 = SPA(plain, lr=0.3, c=1.0), torch.optim.SGD(plain_twins, lr=0.3, fused=True)
    for k in range(6):
        for ps in (params, twins, plain, plain_twins):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.1 * (k + 1) - 0.05 * i)
        for opt in (spa, sgd, spa1, sgd0):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twins, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, plain_twins, strict=True))
    assert not spa1.state and spa._plans[0].kernel is not None


@pytest.mark.parametrize("maximize", [False, True])
def test_momentum_off_on_large_cpu_tensors_adds_per_tensor_like_torch_sgd_momentum_0(maximize):
    """c = 1 on CPU tensors of >= 2**16 elements on average: x <- x - lr * g per tensor (torch SGD's
    momentum-0 loop, faster there than the fused kernel), bit for bit; smaller tensors keep the fused kernel."""
    torch.manual_seed(0)
    big = [torch.randn(300, 300, requires_grad=True), torch.randn(70_000, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in big]
    spa, sgd = SPA(big, lr=0.3, c=1.0, maximize=maximize), torch.optim.SGD(twins, lr=0.3, maximize=maximize)
    for _ in range(3):
        for a, b in zip(big, twins, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        spa.step()
        sgd.step()
    assert all(torch.equal(a, b) for a, b in zip(big, twins, strict=True))
    assert spa._plans[0].add_when_off and not spa.state
    small = SPA([torch.randn(100, requires_grad=True)], lr=0.3, c=1.0)
    small.param_groups[0]["params"][0].grad = torch.ones(100)
    small.step()
    assert not small._plans[0].add_when_off
    decayed = SPA([torch.randn(300, 300, requires_grad=True)], lr=0.3, c=1.0, weight_decay=0.1)
    twin = decayed.param_groups[0]["params"][0].detach().clone().requires_grad_()
    ref = torch.optim.SGD([twin], lr=0.3, weight_decay=0.1, fused=True)
    decayed.param_groups[0]["params"][0].grad = torch.ones(300, 300)
    twin.grad = torch.ones(300, 300)
    decayed.step()
    ref.step()  # weight decay keeps the fused kernel
    assert torch.equal(decayed.param_groups[0]["params"][0], twin)


class _CountingInf(torch.Tensor):
    """A ``found_inf`` tensor that counts its host reads."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.item:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize(("etas", "reads"), [((0.5, 0.5, 0.5), 0), ((0.5, 0.4, 0.3), 1)], ids=["constant", "changing"])
def test_found_inf_is_read_at_most_once_per_step_whatever_the_groups(etas, reads):
    params = [torch.randn(3, requires_grad=True) for _ in range(3)]
    opt = SPA([{"params": [p]} for p in params], lr=0.5, c=0.2, fused=True)
    for p in params:
        p.grad = torch.ones(3)
    opt.step()  # buffers started, without a scaler
    opt.grad_scale = torch.ones(())
    spike = pytest.warns(SPASpikeWarning) if reads else contextlib.nullcontext()  # 0.5 -> 0.4 at c = 0.2: beta 1
    with spike:
        for eta in etas:
            for group in opt.param_groups:
                group["lr"] = eta
            opt.found_inf = torch.zeros(()).as_subclass(_CountingInf)
            _CountingInf.reads = 0
            opt.step()
            assert _CountingInf.reads == (reads if eta != 0.5 else 0)
    flag = InfFlag(torch.ones(()).as_subclass(_CountingInf))
    _CountingInf.reads = 0
    assert flag() and flag() and _CountingInf.reads == 1


class _HostTensors(TorchDispatchMode):
    """Records every op that takes a CPU tensor and returns a tensor on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type != "cpu" for t in outputs):
            self.copies.append(str(func))
        return out


@pytest.mark.parametrize("values", ["device-lr", "host-lr-device-c"])
def test_tensor_mode_copies_no_host_value_to_the_device(values, monkeypatch):
    """``torch.tensor(v, device=cuda)`` is a blocking copy (pytorch/pytorch#120996): float and
    host values must reach the device as ``torch.full`` arguments (meta tensors stand in for CUDA)."""
    params = [torch.zeros(3, device="meta", requires_grad=True), torch.zeros(2, 2, device="meta", requires_grad=True)]
    opt = SPA(params, lr=0.5, c=0.2, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # float mode: float histories, which tensor mode converts
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, lambda *a, _n=name, **k: pytest.fail(f"torch.{_n} in a step"))
    group = opt.param_groups[0]
    if values == "device-lr":
        group["lr"] = torch.full((), 0.4, device="meta")
    else:
        group["lr"], group["c"] = torch.full((), 0.4), torch.full((), 0.3, device="meta")
    with _HostTensors() as mode:
        opt.step()
        opt.step()
    assert mode.copies == []
    assert isinstance(opt.state[params[0]]["prev_eta"], torch.Tensor)


def test_fused_per_param_group_as_torch_sgd():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = SPA([{"params": [a], "fused": False}, {"params": [b]}], fused=True)  # torch SGD accepts this too
    assert [g["fused"] for g in opt.param_groups] == [False, True]
    opt = SPA([a])
    opt.add_param_group({"params": [b], "fused": True})
    assert [g["fused"] for g in opt.param_groups] == [None, True]
    fused = SPA([a], fused=True)
    fused.load_state_dict(SPA([a]).state_dict())  # a group's own flag, loaded as saved
    assert fused.param_groups[0]["fused"] is None
