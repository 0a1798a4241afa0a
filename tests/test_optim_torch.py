"""torch's generic optimizer tests for SPA, driven by an ``OptimizerInfo``.

``SPA_INFO`` describes SPA to torch's own test machinery
(``torch.testing._internal.common_optimizers``, which needs ``expecttest``): its configs, the
LR schedulers it is checked under, the construction errors every torch optimizer must raise,
and the kernels it supports. The tests follow ``TestOptimRenewed`` in pytorch's
``test/test_optim.py``: errors, goes-right-direction (with schedulers), foreach/fused ==
forloop (with a zero-size param, a frozen param and a step with a missing grad), state_dict
determinism and load, deepcopy, step hooks, tensor lr, complex params. CPU, float64.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR, PolynomialLR, ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook

pytest.importorskip("expecttest")
with warnings.catch_warnings():  # torch's test utilities warn (ImportWarning) when hypothesis is not installed
    warnings.simplefilter("ignore", ImportWarning)
    from torch.testing._internal.common_optimizers import (
        ErrorOptimizerInput,
        OptimizerErrorEnum,
        OptimizerInfo,
        OptimizerInput,
        _get_optim_inputs_including_global_cliquey_kwargs,
        get_error_inputs_for_all_optims,
        optim_db,
    )

from lightning_spa import SPA
from lightning_spa.optim import SPASpikeWarning

DEVICE, DTYPE = "cpu", torch.float64


def optim_inputs_func_spa(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.2, "c": 0.5}, desc="non-default lr and c"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.05, dtype=DTYPE)}, desc="tensor lr"),
        OptimizerInput(
            params=None, kwargs={"lr": torch.tensor(0.3, dtype=DTYPE), "c": torch.tensor(0.4)}, desc="tensor lr and c"
        ),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.5}, desc="non-zero weight_decay"),
        OptimizerInput(params=None, kwargs={"c": 1.0, "lr": 0.05}, desc="c=1 (plain SGD)"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize"),
    ]


def optim_error_inputs_func_spa(device, dtype):
    def error(kwargs, desc, error_type, regex):
        return ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kwargs, desc=desc), error_type=error_type,
                                   error_regex=regex)  # fmt: skip

    return [
        *get_error_inputs_for_all_optims(device, dtype),
        error({"lr": -0.5}, "negative lr", ValueError, r"^Invalid learning rate: -0\.5: "),  # torch's wording first
        error({"lr": "0.1"}, "lr not a number", TypeError, "`lr`"),
        error({"c": 0.0}, "c = 0", ValueError, r"`c`=0.0.*\(0, 1\]"),
        error({"c": 1.5}, "c > 1", ValueError, r"`c`=1.5"),
        error({"weight_decay": -0.5}, "negative weight_decay", ValueError, r"^Invalid weight_decay value: -0\.5 "),
        error({"fused": True, "foreach": True}, "fused and foreach", ValueError, "cannot be used together"),
        error({"differentiable": True}, "differentiable", TypeError, "differentiable"),
    ]


_SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
SPA_INFO = OptimizerInfo(
    SPA,
    optim_inputs_func=optim_inputs_func_spa,
    scheduler_inputs=(
        *_SGD_INFO.scheduler_inputs,  # torch's own choice for SGD
        [lambda opt: CosineAnnealingLR(opt, T_max=6, eta_min=0.0)],  # to eta = 0 and back
        [lambda opt: PolynomialLR(opt, total_iters=4, power=1.0)],  # to eta = 0 and stay
        [lambda opt: MultiStepLR(opt, milestones=[3, 6], gamma=0.1)],  # instant drops (warned)
    ),
    optim_error_inputs_func=optim_error_inputs_func_spa,
    supported_impls=("foreach", "fused"),
    supports_fused_on=("cpu", "cuda", "xpu", "mps"),
    supports_complex=True,
)


def _configs():
    """Every SPA config with its kernel flag: torch's helper (fused on CPU) plus foreach (also on CPU)."""
    configs = _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, DTYPE, SPA_INFO)
    foreach = [OptimizerInput(None, {**o.kwargs, "foreach": True}, f"{o.desc} & foreach")
               for o in SPA_INFO.optim_inputs_func(DEVICE) if "foreach" not in o.kwargs]  # fmt: skip
    return [pytest.param(o.kwargs, id=o.desc) for o in [*configs, *foreach]]


CONFIGS = _configs()


@pytest.fixture(autouse=True)
def _quiet_spikes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SPASpikeWarning)
        yield


@pytest.mark.parametrize(
    "error_input", SPA_INFO.optim_error_inputs_func(DEVICE, DTYPE), ids=lambda e: e.optimizer_error_input.desc
)
def test_errors(error_input):
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(2, dtype=DTYPE))]
    assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            SPA(params, **optim_input.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            SPA(params, **optim_input.kwargs)


@pytest.mark.parametrize(
    "error_input", _SGD_INFO.optim_error_inputs_func(DEVICE, DTYPE), ids=lambda e: e.optimizer_error_input.desc
)
def test_torch_sgd_error_inputs_raise_torch_errors_through_from_sgdm(error_input):
    """torch SGD's own error inputs (momentum -0.5 among them), given in SGD's terms to ``SPA.from_sgdm``."""
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(2, dtype=DTYPE))]
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            SPA.from_sgdm(params, **optim_input.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            SPA.from_sgdm(params, **optim_input.kwargs)


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = Parameter(torch.randn(10, 5, dtype=DTYPE, generator=gen))
    bias = Parameter(torch.randn(10, dtype=DTYPE, generator=gen))
    inputs = torch.randn(5, dtype=DTYPE, generator=gen)
    return weight, bias, inputs


def _goes_right_direction(kwargs, schedulers=(), group_flags=None):
    """Ten closure steps on ``_problem``; ``group_flags``: the weight in a param group of its own with these."""
    weight, bias, inputs = _problem()
    params = [weight, bias] if group_flags is None else [{"params": [weight], **group_flags}, {"params": [bias]}]
    opt = SPA(params, **copy.deepcopy(kwargs))
    scheds = [make(opt) for make in schedulers]

    def closure():
        opt.zero_grad()
        loss = (weight.mv(inputs) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(10):
        loss = opt.step(closure)
        for sched in scheds:
            sched.step(loss.item()) if isinstance(sched, ReduceLROnPlateau) else sched.step()
    final = closure().item()
    assert final > initial if kwargs.get("maximize") else final < initial


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_forloop_goes_right_direction(kwargs):
    _goes_right_direction(kwargs)


@pytest.mark.parametrize("schedulers", SPA_INFO.scheduler_inputs, ids=lambda s: f"{len(s)}-schedulers")
@pytest.mark.parametrize("impl", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"])
def test_goes_right_direction_with_torch_lr_schedulers(schedulers, impl):
    _goes_right_direction({"lr": 0.1, "c": 0.5, **impl}, schedulers)


def _awkward_params():
    gen = torch.Generator().manual_seed(1)
    return [
        Parameter(torch.randn(3, 4, dtype=DTYPE, generator=gen)),
        Parameter(torch.zeros(0, dtype=DTYPE)),  # zero-size
        Parameter(torch.randn(4, dtype=DTYPE, generator=gen), requires_grad=False),  # frozen: never a grad
        Parameter(torch.randn(5, dtype=DTYPE, generator=gen)),
    ]


def _run_awkward(kwargs, steps=8):
    params = _awkward_params()
    opt = SPA(params, **copy.deepcopy(kwargs))
    gen = torch.Generator().manual_seed(2)
    lr0 = opt.param_groups[0]["lr"]
    for k in range(steps):
        scale = [1.0, 1.0, 0.1, 0.0, 0.5, 0.5, 0.5, 0.5][k]  # an instant drop, eta = 0, back up
        if isinstance(lr0, torch.Tensor):
            lr0.fill_(0.3 * scale)
        else:
            opt.param_groups[0]["lr"] = 0.3 * scale
        for p in params:
            missing = p is params[3] and k == 2  # a step with a missing grad
            p.grad = None if (not p.requires_grad or missing) else torch.randn(p.shape, dtype=DTYPE, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kwargs", [c for c in CONFIGS if "foreach" in c.values[0] or "fused" in c.values[0]])
def test_foreach_and_fused_match_forloop(kwargs):
    flags = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
    params, opt = _run_awkward(kwargs)
    ref_params, ref_opt = _run_awkward({**flags, "foreach": False, "fused": False})
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)
        hist, ref_hist = opt.momentum_history(p), ref_opt.momentum_history(q)
        assert (hist is None) == (ref_hist is None)
        if hist is not None:
            torch.testing.assert_close(hist[0], ref_hist[0], rtol=1e-14, atol=1e-14)
            assert float(hist[1]) == pytest.approx(float(ref_hist[1]), rel=1e-14)
    assert params[2] not in opt.state  # frozen: no state


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_state_dict_deterministic_and_load(kwargs):
    weight, bias, inputs = _problem(3)
    opt = SPA([weight, bias], **copy.deepcopy(kwargs))

    def steps(opt, w, b, n):
        for _ in range(n):
            opt.zero_grad()
            (w.mv(inputs) + b).pow(2).sum().backward()
            opt.step()

    steps(opt, weight, bias, 3)
    w2, b2 = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2 = SPA([w2, b2], **copy.deepcopy(kwargs))
    opt2.load_state_dict(torch.load(buffer))
    steps(opt, weight, bias, 3)
    steps(opt2, w2, b2, 3)
    assert torch.equal(weight, w2) and torch.equal(bias, b2)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    for g, g2 in zip(sd["param_groups"], sd2["param_groups"], strict=True):
        assert g.keys() == g2.keys()
        for key, value in g.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, g2[key])
            else:
                assert value == g2[key]
    for i, state in sd["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sd2["state"][i][key]))


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_deepcopy_copies_all_public_attrs_and_steps_alike(kwargs):
    params, opt = _run_awkward(kwargs, steps=3)
    twin = copy.deepcopy(opt)
    assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(twin) if not k.startswith("_")}
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(params, twin_params, strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)


def test_step_pre_and_post_hooks_run_once_per_step_and_can_be_removed():
    weight, bias, _ = _problem()
    opt = SPA([weight, bias], lr=0.1, c=0.5)
    calls: list[str] = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    glob = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("global"))
    try:
        weight.grad, bias.grad = torch.ones_like(weight), torch.ones_like(bias)
        opt.step()
        assert calls == ["pre", "post", "global"]
    finally:
        glob.remove()
    pre.remove()
    post.remove()
    opt.step()
    assert calls == ["pre", "post", "global"]


@pytest.mark.parametrize("impl", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"])
def test_tensor_lr_matches_float_lr(impl):
    a, _ = _run_awkward({"lr": torch.tensor(0.3, dtype=DTYPE), "c": 0.25, **impl})
    b, _ = _run_awkward({"lr": 0.3, "c": 0.25, **impl})
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kwargs", [c for c in CONFIGS if not c.values[0].get("fused")])
def test_complex_params_match_their_real_view(kwargs):
    gen = torch.Generator().manual_seed(4)
    z = [Parameter(torch.randn(3, 2, dtype=torch.complex128, generator=gen)) for _ in range(2)]
    r = [Parameter(torch.view_as_real(p.detach()).clone()) for p in z]
    opt_z, opt_r = SPA(z, **copy.deepcopy(kwargs)), SPA(r, **copy.deepcopy(kwargs))
    for _ in range(5):
        for p, q in zip(z, r, strict=True):
            p.grad = torch.randn(p.shape, dtype=torch.complex128, generator=gen)
            q.grad = torch.view_as_real(p.grad).clone()
        opt_z.step()
        opt_r.step()
    for p, q in zip(z, r, strict=True):
        torch.testing.assert_close(torch.view_as_real(p.detach()), q.detach(), rtol=1e-14, atol=1e-14)


# Per-group `fused` (torch SGD accepts `[dict(params=..., fused=True), dict(params=...)]`): each config with the
# first two awkward parameters in a group of its own kernel flag and the others in a group of the optimizer's.
PER_GROUP = [
    pytest.param({}, {"fused": True}, id="default & group fused"),
    pytest.param({"fused": True}, {"fused": False}, id="fused & group loop"),
    pytest.param({"fused": True}, {"fused": None}, id="fused & group default"),
    pytest.param({"foreach": True}, {"fused": True, "foreach": False}, id="foreach & group fused"),
    pytest.param({"lr": torch.tensor(0.3, dtype=DTYPE)}, {"fused": True}, id="tensor lr & group fused"),
]


def _grouped(params, kwargs, group_flags):
    return SPA([{"params": params[:2], **group_flags}, {"params": params[2:]}], **copy.deepcopy(kwargs))


@pytest.mark.parametrize(("kwargs", "group_flags"), PER_GROUP)
def test_per_group_fused_matches_forloop_and_goes_right_direction(kwargs, group_flags):
    params = _awkward_params()
    opt = _grouped(params, {**kwargs, "c": 0.25}, group_flags)
    assert opt.param_groups[0]["fused"] == group_flags.get("fused")
    ref_params = [Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in params]
    ref = SPA(ref_params, lr=0.3, c=0.25, foreach=False, fused=False)
    gen = torch.Generator().manual_seed(5)
    for k in range(6):
        for group in (*opt.param_groups, *ref.param_groups):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(0.3 * [1.0, 1.0, 0.1, 0.0, 0.5, 0.5][k])
            else:
                group["lr"] = 0.3 * [1.0, 1.0, 0.1, 0.0, 0.5, 0.5][k]
        for p, q in zip(params, ref_params, strict=True):
            grad = None if not p.requires_grad else torch.randn(p.shape, dtype=DTYPE, generator=gen)
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)
    _goes_right_direction(kwargs, group_flags=group_flags)




def _scaled_run(opt, params, scaler, steps=4):
    gen = torch.Generator().manual_seed(6)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((p * torch.randn(p.shape, dtype=DTYPE, generator=gen)).sum() for p in params)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def test_grad_scaler_with_per_group_fused():
    """The scaler asks the optimizer (its ``fused``), not a group; its scale must not reach an unfused group."""
    # SPA(fused=None) with one fused group: the scaler unscales all gradients first; the run matches the loop.
    params = [Parameter(torch.ones(20, dtype=DTYPE)), Parameter(torch.ones(3, dtype=DTYPE))]
    ref_params = [Parameter(p.detach().clone()) for p in params]
    opt = SPA([{"params": params[:1], "fused": True}, {"params": params[1:]}], lr=0.5, c=0.5)
    ref = SPA(ref_params, lr=0.5, c=0.5, fused=True)  # every group fused: the scale goes into the kernel
    _scaled_run(opt, params, torch.amp.GradScaler("cpu", init_scale=1024.0))
    _scaled_run(ref, ref_params, torch.amp.GradScaler("cpu", init_scale=1024.0))
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)
        assert not torch.equal(p, torch.ones_like(p))
    # SPA(fused=True) with an unfused group: refused at the step, before any group moves.
    params = [Parameter(torch.ones(20, dtype=DTYPE)), Parameter(torch.ones(3, dtype=DTYPE))]
    opt = SPA([{"params": params[:1]}, {"params": params[1:], "fused": False}], lr=0.5, c=0.5, fused=True)
    with pytest.raises(RuntimeError, match="param group 1 has `fused`=False"):
        _scaled_run(opt, params, torch.amp.GradScaler("cpu", init_scale=1024.0), steps=1)
    assert all(torch.equal(p, torch.ones_like(p)) for p in params) and not opt.state
    # ... unless the unfused group has no gradient: the scale does not reach it.
    opt = SPA([{"params": params[:1]}, {"params": [Parameter(torch.ones(3, dtype=DTYPE))], "fused": False}],
              lr=0.5, c=0.5, fused=True)  # fmt: skip
    _scaled_run(opt, params[:1], torch.amp.GradScaler("cpu", init_scale=1024.0), steps=1)
    assert not torch.equal(params[0], torch.ones_like(params[0]))


NEW_FLAGS = ("maximize", "foreach", "fused", "differentiable", "capturable")  # torch's test_can_load_older_state_dict


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_can_load_older_state_dict(kwargs):
    """torch's ``test_can_load_older_state_dict``: groups saved before the flags existed load, and step."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2)).to(DTYPE)
    inputs = torch.rand(1, 4, 16, 16, dtype=DTYPE)
    opt = SPA(model.parameters(), **copy.deepcopy(kwargs))

    def fwd_bwd():
        opt.zero_grad()
        model(inputs).sum().backward()

    for _ in range(3):
        fwd_bwd()
        opt.step()
    flags = [{k: g[k] for k in NEW_FLAGS if k in g} for g in opt.param_groups]
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in NEW_FLAGS:
            group.pop(flag, None)
    opt.load_state_dict(old)
    assert [{k: g[k] for k in NEW_FLAGS if k in g} for g in opt.param_groups] == flags  # the optimizer's own flags
    fwd_bwd()
    opt.step()


def test_older_state_dict_into_a_fresh_fused_optimizer():
    weight, bias, inputs = _problem()
    saved = SPA([weight, bias], lr=0.2, c=0.5)
    (weight.mv(inputs) + bias).pow(2).sum().backward()
    saved.step()
    old = saved.state_dict()
    for flag in NEW_FLAGS:
        old["param_groups"][0].pop(flag, None)
    opt = SPA([weight, bias], fused=True)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["maximize"] is False
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["c"]) == (0.2, 0.5)  # the saved hyper-parameters
    opt.step()
    # pickling an optimizer saved before the flags existed fills them the same way (__setstate__)
    state = opt.__getstate__()
    for flag in NEW_FLAGS:
        state["param_groups"][0].pop(flag, None)
    twin = SPA.__new__(SPA)
    twin.__setstate__(state)
    assert twin.param_groups[0]["fused"] is True
