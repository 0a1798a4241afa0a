"""SPA under torch.compile, AMP grad scaling, torch's private helpers switched off, and the
scalar step of the rescaling view (``lightning_spa.theorem.spa_step``)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from spa_reference import ReferenceSPA

from lightning_spa import SPA, _compat
from lightning_spa.functional import spa
from lightning_spa.optim import SPASpikeWarning
from lightning_spa.theorem import spa_step, step_momentum


def test_spa_step_coefficients_follow_the_rescaling_view():
    # no history: m' = g, alpha = c * eta; history (eta, c) for c < 1, none for c = 1 or eta = 0
    assert spa_step(0.5, 0.2, None) == (0.8, 1.0, 0.1, (0.5, 0.2), True)
    assert spa_step(0.5, 1.0, None) == (0.0, 1.0, 0.5, None, True)
    assert spa_step(0.0, 0.2, None).lr == 0.0 and spa_step(0.0, 0.2, None).history is None
    # eta unchanged: beta = 1 - c_prev exactly (not (1 - c) * eta / eta)
    assert spa_step(0.3, 0.1, (0.3, 0.1)).momentum == 1 - 0.1
    # eta rises: beta = s / eta < 1; alpha = c * eta
    assert spa_step(1.0, 0.5, (0.5, 0.2)) == (0.4, 1.0, 0.5, (1.0, 0.5), False)
    # eta drops below s = 0.8 * 1.0: keep m, add (eta / s) g, x -= c s m', s' = (1 - c) s
    coef = spa_step(0.2, 0.5, (1.0, 0.2))
    assert coef == (1.0, 0.2 / 0.8, 0.5 * 0.8, (0.8, 0.5), False)
    assert spa_step(0.0, 0.5, (1.0, 0.2)) == (1.0, 0.0, 0.4, (0.8, 0.5), False)
    assert math.isfinite(spa_step(1e-310, 0.1, (1.0, 0.1)).grad_weight)
    assert step_momentum(0.0, 1.0, 0.2) == math.inf and step_momentum(0.1, 1.0, 0.1) == pytest.approx(9.0)


def _reference_run(steps, etas, cs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(5, dtype=torch.float64, generator=gen), torch.randn(3, 2, dtype=torch.float64, generator=gen))
             for _ in range(steps)]  # fmt: skip
    x = torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(3, 2, dtype=torch.float64, generator=gen).requires_grad_()
    return x, w, grads


def test_compiled_step_with_tensor_lr_and_c_compiles_at_most_twice():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    etas = [0.5 * 0.7**k if k != 6 else 0.0 for k in range(10)]  # changes every step, 0 included
    cs = [min(1.0, 0.2 * 1.2**k) for k in range(10)]
    x, w, grads = _reference_run(10, etas, cs)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lr, c = torch.tensor(etas[0], dtype=torch.float64), torch.tensor(cs[0], dtype=torch.float64)
    opt = SPA([x, w], lr=lr, c=c)
    ref = ReferenceSPA([x_ref, w_ref])
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    for k in range(10):
        lr.fill_(etas[k])
        c.fill_(cs[k])
        x.grad, w.grad = grads[k]
        x_ref.grad, w_ref.grad = grads[k]
        step()
        ref.step(etas[k], cs[k])
    assert counter.frame_count <= 2  # the first step (no buffers) and the others
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_compiled_step_with_the_default_dispatch_runs():
    torch._dynamo.reset()
    x, w, grads = _reference_run(4, None, None)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    opt, ref = SPA([x, w], lr=0.5, c=0.2), SPA([x_ref, w_ref], lr=0.5, c=0.2)
    # aot_eager: fake tensors run through every traced op (the fused kernel has no fake implementation)
    step = torch.compile(opt.step, backend="aot_eager")
    for g in grads:
        x.grad, w.grad = g
        x_ref.grad, w_ref.grad = g
        step()
        ref.step()
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-14)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("inf_at", "etas"),
    [
        (2, [0.5] * 5),  # steady state: the kernel skips on its own, the host reads nothing
        (2, [0.5, 0.5, 0.4, 0.4, 0.3]),  # eta changes at the inf step: the host reads found_inf
        (0, [0.5] * 5),  # the very first step: no buffer may be started
    ],
    ids=["steady", "eta-changes", "first-step"],
)
def test_grad_scaler_unscales_inside_the_fused_kernel_and_skips_inf_steps(inf_at, etas):
    torch.manual_seed(0)
    x = torch.randn(6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    opt, ref = SPA([x], lr=0.5, c=0.2, fused=True), SPA([x_ref], lr=0.5, c=0.2, fused=True)
    assert opt._step_supports_amp_scaling and not SPA([x_ref])._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    changing = len(set(etas)) > 1  # 0.5 -> 0.4 at c = 0.2: an instant drop (equivalent momentum 1), warned
    with pytest.warns(SPASpikeWarning) if changing else contextlib.nullcontext():
        _scaled_steps(opt, ref, x, x_ref, scaler, inf_at, etas)


def _scaled_steps(opt, ref, x, x_ref, scaler, inf_at, etas):
    for k, eta in enumerate(etas):
        g = torch.randn(6)
        if k == inf_at:
            g[1] = math.inf
        opt.param_groups[0]["lr"] = eta
        opt.zero_grad()
        scaler.scale((x * g).sum()).backward()
        x_before = x.detach().clone()
        state_before = {key: v.clone() if torch.is_tensor(v) else v for key, v in opt.state.get(x, {}).items()}
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if k == inf_at:  # skipped: parameters, buffer and history untouched; the scale halves
            assert torch.equal(x, x_before) and scaler.get_scale() == scale_before / 2
            state_after = opt.state.get(x, {})
            assert state_after.keys() == state_before.keys()
            for key, value in state_before.items():
                assert torch.equal(value, state_after[key]) if torch.is_tensor(value) else value == state_after[key]
        else:
            x_ref.grad = g.clone()
            ref.param_groups[0]["lr"] = eta
            ref.step()
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)  # powers of 2: exact unscaling


def test_grad_scale_without_fused_is_refused_by_the_functional():
    p = torch.zeros(2)
    with pytest.raises(RuntimeError, match="fused=True"):
        spa([p], [p.clone()], [None], [None], [None], grad_scale=torch.ones(()), lr=0.1, c=0.5,
            weight_decay=0.0, maximize=False)  # fmt: skip


@pytest.mark.parametrize("path", [{"foreach": True}, {"fused": True}, {}], ids=["foreach", "fused", "default"])
def test_public_fallbacks_give_the_same_bits(path, monkeypatch):
    def run():
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
        opt = SPA(ps, lr=0.5, c=0.2, weight_decay=0.01, **path)
        for k in range(6):
            opt.param_groups[0].update(lr=[0.5, 0.5, 0.05, 0.0, 0.3, 0.3][k], c=[0.2, 0.2, 0.2, 0.5, 1.0, 0.2][k])
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            with pytest.warns() if k == 2 else _nothing():
                opt.step()
        return ps

    private = run()
    monkeypatch.setattr(_compat, "PRIVATE", False)
    assert _compat.kernel_support()[2] == (torch.Tensor, torch.nn.Parameter)
    public = run()
    for p, q in zip(private, public, strict=True):
        assert torch.equal(p, q)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "impl", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=["loop", "foreach", "fused"]
)
def test_functional_spa_owns_the_step_on_plain_lists(impl):
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(4, dtype=torch.float64, generator=gen), torch.randn(2, 2, dtype=torch.float64, generator=gen)]
    refs = [p.clone().requires_grad_() for p in params]
    reference = ReferenceSPA(refs, weight_decay=0.1)
    bufs, etas, cs = [None, None], [None, None], [None, None]
    for eta, c in ((0.5, 0.2), (0.5, 0.2), (0.0, 0.2), (0.1, 0.5), (0.4, 1.0), (0.4, 0.3)):
        grads = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
        spa(params, grads, bufs, etas, cs, **impl, lr=eta, c=c, weight_decay=0.1, maximize=False)
        for r, g in zip(refs, grads, strict=True):
            r.grad = g
        reference.step(eta, c)
        for p, r in zip(params, refs, strict=True):
            torch.testing.assert_close(p, r.detach(), rtol=0, atol=1e-13)
        assert (bufs[0] is None) == (c == 1.0) and (etas[0] is None) == (c == 1.0)


@pytest.mark.parametrize("tensor_c", [False, True], ids=["float-c", "tensor-c"])
def test_tensor_mode_in_eager_matches_the_z_form(tensor_c, monkeypatch):
    # What an accelerator-resident lr (or a compiled step) runs, forced here on the CPU.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    etas = [0.5, 0.5, 0.05, 0.0, 0.0, 1e-310, 0.3, 0.3, 0.3]
    cs = [0.2, 0.2, 0.2, 0.2, 0.5, 0.5, 1.0, 0.4, 0.4]
    x, w, grads = _reference_run(len(etas), etas, cs, seed=3)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lr = torch.tensor(etas[0], dtype=torch.float64)
    c = torch.tensor(cs[0], dtype=torch.float64) if tensor_c else cs[0]
    opt, ref = SPA([x, w], lr=lr, c=c, weight_decay=0.05), ReferenceSPA([x_ref, w_ref], weight_decay=0.05)
    for k, (eta, ck) in enumerate(zip(etas, cs, strict=True)):
        lr.fill_(eta)
        if tensor_c:
            c.fill_(ck)
        else:
            opt.param_groups[0]["c"] = ck
        x.grad, w.grad = grads[k]
        x_ref.grad, w_ref.grad = grads[k]
        opt.step()
        ref.step(eta, ck)
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.z(w), ref.zs[1], rtol=0, atol=1e-12)
        if ck == 1.0 and not tensor_c:
            assert len(opt.state) == 0  # c = 1 known on the host: buffers dropped
        else:
            assert isinstance(opt.state[x]["prev_eta"], torch.Tensor)
