"""GradualSchedule / MomentumOff in the setups real Lightning projects use (issue 9).

Several optimizers (GAN-style manual optimization, SPA + Adam), callback order, a param group
added mid-run, skipped optimizer steps and parameters without a gradient (torch SGD must follow
SPA exactly), resume with the same callback instance, LearningRateMonitor. The core fit and
resume run under both ``pytorch_lightning`` and ``lightning.pytorch``. Tiny float64 linear
models on random data: seconds each.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA, GradualSchedule, MomentumOff

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@pytest.fixture
def L(package: ModuleType) -> ModuleType:
    """The Lightning package under test (conftest's ``package``: each test runs under both)."""
    return package


@pytest.fixture
def pl() -> ModuleType:
    return importlib.import_module("pytorch_lightning")




def data(batches: int = 4, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * batch_size, 4, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + 0.1 * torch.randn(len(x), generator=g)
    return DataLoader(TensorDataset(x, y.double()), batch_size=batch_size, shuffle=False)


def spa(lr: float = 0.5, c: float = 0.5) -> Factory:
    return lambda params: SPA(params, lr=lr, c=c)


def sgd(lr: float = 0.25, momentum: float = 0.5) -> Factory:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def make_module(L: ModuleType, factories: list[Factory], manual: bool = False, plan: Any = None) -> Any:
    """A two-layer float64 regression. ``factories``: one optimizer each for (body, head), or one for both.

    ``plan(batch_idx) -> (steps, use_head)`` (manual optimization): which optimizer indices step on that
    batch, and whether the loss goes through the head (if not, the head has no gradient).
    """

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Linear(4, 4, dtype=torch.float64)
            self.head = nn.Linear(4, 1, dtype=torch.float64)
            self.automatic_optimization = not manual

        def loss(self, batch: Any, use_head: bool = True) -> torch.Tensor:
            x, y = batch
            h = self.body(x)
            out = self.head(h).squeeze(-1) if use_head else h.sum(-1)
            return ((out - y) ** 2).mean()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if not manual:
                return self.loss(batch)
            optimizers = self.optimizers()
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            steps, use_head = plan(batch_idx) if plan is not None else (range(len(optimizers)), True)
            for opt in optimizers:
                opt.zero_grad()
            self.manual_backward(self.loss(batch, use_head))
            for i in steps:
                optimizers[i].step()
            return None

        def configure_optimizers(self) -> Any:
            if len(factories) == 1:
                return factories[0](list(self.parameters()))
            return [factories[0](list(self.body.parameters())), factories[1](list(self.head.parameters()))]

    return Tiny()


def recorder(L: ModuleType) -> Any:
    """Records, right before each optimizer step, every group's values, per optimizer index."""

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.values: dict[int, list[list[dict[str, float]]]] = {}

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            index = [o for o in trainer.optimizers].index(getattr(optimizer, "optimizer", optimizer))
            groups = [{k: float(g[k]) for k in ("lr", "c", "momentum") if k in g} for g in optimizer.param_groups]
            self.values.setdefault(index, []).append(groups)

        def key(self, name: str, index: int = 0, group: int = 0) -> list[float]:
            return [gs[group][name] for gs in self.values[index]]

    return Recorder()


def fit(L: ModuleType, module: Any, callbacks: list[Any], ckpt_path: str | None = None, **kw: Any) -> tuple[Any, Any]:
    rec = recorder(L)
    loader = kw.pop("loader", None) or data()
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, precision="64-true",
    )  # fmt: skip
    kwargs.update(kw)
    trainer = L.Trainer(callbacks=[*callbacks, rec], **kwargs)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, rec


def paper(k: int, m: int, t: int, eta0: float, c0: float, f: float = 0.1) -> tuple[float, float]:
    """GradualSchedule paper mode, one geometric transition at step m over t steps (c capped by its own ratio)."""
    share = min(1.0, max(0.0, (k - m + 1) / t))
    return eta0 * f**share, c0 * (min(1.0, c0 / f) / c0) ** share


# ----- both packages: fit, order, resume with the same instances ------------------------------------------------


def schedules() -> list[Any]:
    # eta0 0.5, c0 0.5: milestone step 3, T = 4 (0.5 * 10**(1/4) = 0.89 < 1); momentum off from step 10 over 2
    return [GradualSchedule([3], unit="step", transition_steps=4), MomentumOff(10, transition_steps=2, unit="step")]


def expected(k: int) -> tuple[float, float]:
    eta, c = paper(k, 3, 4, 0.5, 0.5)
    off = 0.5 * 2 ** min(1.0, max(0.0, (k - 10 + 1) / 2))
    return eta, max(c, off)


def test_core_fit_follows_the_formula_in_either_callback_order(L: ModuleType) -> None:
    runs = []
    for callbacks in (schedules(), schedules()[::-1]):
        _, rec = fit(L, make_module(L, [spa()]), callbacks, max_epochs=3)  # 4 steps per epoch
        runs.append(rec)
        for k in range(12):
            eta, c = expected(k)
            assert rec.key("lr")[k] == pytest.approx(eta, rel=1e-14)
            assert rec.key("c")[k] == pytest.approx(c, rel=1e-14)
    assert runs[0].values == runs[1].values  # identical to the last bit


def test_resume_with_the_same_callback_instances(L: ModuleType, tmp_path: Path) -> None:
    _, full = fit(L, make_module(L, [sgd()]), schedules(), max_epochs=3)
    callbacks = schedules()
    trainer, _ = fit(L, make_module(L, [sgd()]), callbacks, max_epochs=1)  # stops at step 4, inside 3..6
    assert [cb.state_dict()["clocks"]["0"]["steps"] for cb in callbacks] == [4, 4]
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    module = make_module(L, [sgd()])
    _, resumed = fit(L, module, callbacks, ckpt_path=str(tmp_path / "mid.ckpt"), max_epochs=3)
    assert resumed.values[0] == full.values[0][4:]
    assert max(resumed.key("momentum")) < 1.0
    assert callbacks[0].state_dict()["clocks"]["0"]["steps"] == 12


# ----- several optimizers --------------------------------------------------------------------------------------


def test_gan_style_two_spa_optimizers_each_on_its_own_clock(pl: ModuleType) -> None:
    # body steps every batch, head every other batch: after 8 batches their clocks are 8 and 4
    def plan(batch_idx: int) -> tuple[list[int], bool]:
        return ([0, 1] if batch_idx % 2 == 0 else [0]), True

    gradual = GradualSchedule([2], factor=0.5, mode="lr", transition="instant", unit="step")
    callbacks = [gradual, MomentumOff(3, 2, "step", guard=False)]  # the toy diverges without momentum (1e7x ||g||^2)
    module = make_module(pl, [spa(1.0, 0.5), spa(3.0, 0.25)], manual=True, plan=plan)
    _, rec = fit(pl, module, callbacks, max_epochs=2)
    assert [cb.state_dict()["clocks"] for cb in callbacks] == [
        {"0": {"steps": 8, "groups": [[1.0, 0.5, 0]]}, "1": {"steps": 4, "groups": [[3.0, 0.25, 0]]}}
    ] * 2
    assert rec.key("lr", 0) == [1.0, 1.0] + [0.5] * 6
    assert rec.key("lr", 1) == [3.0, 3.0, 1.5, 1.5]
    assert rec.key("c", 0) == pytest.approx([0.5] * 3 + [0.5 * 2**0.5] + [1.0] * 4, rel=1e-14)
    assert rec.key("c", 1) == pytest.approx([0.25] * 3 + [0.5], rel=1e-14)  # 0.25 * 4**(1/2)


def test_spa_with_adam_schedules_spa_and_skips_adam_with_one_warning(pl: ModuleType) -> None:
    adam = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    module = make_module(pl, [spa(1.0, 0.5), adam], manual=True)
    with pytest.warns(UserWarning, match=r"GradualSchedule skips optimizer 1 \(Adam\).*works on optimizers \[0\]"):
        _, rec = fit(pl, module, [GradualSchedule([1], factor=0.5, mode="lr", transition="instant", unit="step")],
                     max_steps=6)  # fmt: skip
    assert rec.key("lr", 0) == [1.0, 0.5, 0.5]
    assert rec.key("lr", 1) == [0.01] * 3


@pytest.mark.parametrize("selection", [[1], ["Adam"]])
def test_selecting_adam_explicitly_is_an_error_before_training(pl: ModuleType, selection: list[Any]) -> None:
    adam = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    module = make_module(pl, [spa(1.0, 0.5), adam], manual=True)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(TypeError, match=r"GradualSchedule \(optimizers=.*optimizer 1\) cannot handle .*Adam"):
        fit(pl, module, [GradualSchedule([1], unit="step", optimizers=selection)], max_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_targeting_by_param_group_name(pl: ModuleType) -> None:
    named = lambda params: SPA([{"params": params, "name": "generator"}], lr=1.0, c=0.5)  # noqa: E731
    module = make_module(pl, [spa(1.0, 0.5), named], manual=True)
    cb = GradualSchedule([1], factor=0.5, mode="lr", transition="instant", unit="step", optimizers=["generator"])
    _, rec = fit(pl, module, [cb], max_steps=6)
    assert rec.key("lr", 0) == [1.0] * 3 and rec.key("lr", 1) == [1.0, 0.5, 0.5]
    assert list(cb.state_dict()["clocks"]) == ["1"]


# ----- skipped steps, parameters without a gradient: torch SGD follows SPA exactly ----------------------------


def test_skipped_step_and_gradless_params_inside_transitions_spa_equals_torch_sgd(pl: ModuleType) -> None:
    # eta0 0.05, c0 0.2 (SGD lr 0.01, momentum 0.8); paper mode 2x at steps 3 and 9, T = 4: momentum
    # peaks at 0.8 * 2**(1/4) = 0.951. Batch 4 skips its step (the clock stays at 4); the head has no
    # gradient on batches 5, 6 (clock 4, 5: inside the first transition) and 11 (clock 10: the second).
    def plan(batch_idx: int) -> tuple[list[int], bool]:
        return ([] if batch_idx == 4 else [0]), batch_idx not in (5, 6, 11)

    def run(factory: Factory) -> tuple[Any, Any, Any]:
        cb = GradualSchedule([3, 9], factor=0.5, transition_steps=4, unit="step")
        module = make_module(pl, [factory], manual=True, plan=plan)
        _, rec = fit(pl, module, [cb], max_epochs=1, loader=data(batches=16, batch_size=4))
        return module, rec, cb

    init = [p.detach().clone() for p in make_module(pl, [spa()]).parameters()]
    spa_module, spa_rec, spa_cb = run(spa(0.05, 0.2))
    sgd_module, sgd_rec, sgd_cb = run(sgd(0.01, 0.8))
    assert spa_cb.state_dict()["clocks"]["0"]["steps"] == sgd_cb.state_dict()["clocks"]["0"]["steps"] == 15

    def eta_c(k: int) -> tuple[float, float]:
        p = min(1.0, max(0.0, (k - 2) / 4)) + min(1.0, max(0.0, (k - 8) / 4))  # transitions made
        return 0.05 * 0.5**p, 0.2 * 2**p

    for k in range(15):  # indexed by steps taken: the skipped batch left no gap
        eta, c = eta_c(k)
        eta_prev, c_prev = eta_c(k - 1) if k else (eta, c)
        assert spa_rec.key("lr")[k] == pytest.approx(eta, rel=1e-14)
        assert spa_rec.key("c")[k] == pytest.approx(c, rel=1e-14)
        assert sgd_rec.key("lr")[k] == pytest.approx(c * eta, rel=1e-14)
        assert sgd_rec.key("momentum")[k] == pytest.approx((1 - c_prev) * eta_prev / eta, rel=1e-13)
    assert max(sgd_rec.key("momentum")) == pytest.approx(0.8 * 2**0.25, rel=1e-13)
    assert max(sgd_rec.key("momentum")) < 1.0
    moved = 0.0
    for a, b, a0 in zip(spa_module.parameters(), sgd_module.parameters(), init, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
        moved = max(moved, (a - a0).abs().max().item())
    assert moved > 1e-2


def test_fused_sgd_step_skipped_by_the_grad_scaler_does_not_advance_the_clock() -> None:
    from lightning_spa.callbacks._adapter import OptimizerClock
    from lightning_spa.schedule import StepDecay

    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.5, fused=True)
    clock = OptimizerClock(opt, "sgd", 0, [StepDecay((1,), 0.5, "lr", 1)], "GradualSchedule")
    clock.start(None)
    clock.attach()
    clock.write()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for k, grad in enumerate([1.0, float("inf"), 1.0]):
        opt.zero_grad()
        scaler.scale((w * torch.full((3,), grad)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        assert clock.steps == [1, 1, 2][k]
    # eta0 0.2, c0 0.5: step 0 at eta 0.2, then the skip, then step 1 at eta 0.1 (momentum 0.5 * 0.2 / 0.1 = 1:
    # the instant drop); the next step would use momentum 0.5 again
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and opt.param_groups[0]["momentum"] == pytest.approx(0.5)
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.1 - 0.05 * (1 * 1.0 + 1.0)))


# ----- a param group added mid-run ---------------------------------------------------------------------------


def head_adder(L: ModuleType) -> Any:
    """Adds the (frozen) head as a new param group at epoch 2, and again at fit start when resuming, as
    BackboneFinetuning does."""

    class AddHead(L.Callback):
        def __init__(self) -> None:
            self.added = False

        def add(self, trainer: Any, pl_module: Any) -> None:
            pl_module.head.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.head.parameters()), "lr": 0.2, "c": 0.3})
            self.added = True

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            pl_module.head.requires_grad_(False)
            if self.added:
                self.add(trainer, pl_module)

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 2 and not self.added:
                self.add(trainer, pl_module)

        def state_dict(self) -> dict[str, Any]:
            return {"added": self.added}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.added = state_dict["added"]

    return AddHead()


def test_param_group_added_at_epoch_2_is_scheduled_from_its_own_values_and_resumes(
    pl: ModuleType, tmp_path: Path
) -> None:
    def body_only(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return SPA(params[:2], lr=0.5, c=0.5)  # body weight and bias

    def run(ckpt: str | None = None, **kw: Any) -> tuple[Any, Any, Any]:
        module = make_module(pl, [body_only])
        cb = GradualSchedule([3, 10], factor=0.5, transition_steps=4, unit="step")
        trainer, rec = fit(pl, module, [cb, head_adder(pl)], ckpt_path=ckpt, loader=data(batches=3), **kw)
        return trainer, module, rec

    _, full_module, full = run(max_epochs=6)  # 3 steps per epoch: the head joins at step 6
    ps = [min(1.0, max(0.0, (k - 2) / 4)) + min(1.0, max(0.0, (k - 9) / 4)) for k in range(18)]
    assert full.key("lr") == pytest.approx([0.5 * 0.5**p for p in ps], rel=1e-14)
    assert full.key("c") == pytest.approx([min(1.0, 0.5 * 2**p) for p in ps], rel=1e-14)
    # the head from step 6, relative to its own (0.2, 0.3) and to the schedule at step 6 (one transition made)
    head = [gs[1] for gs in full.values[0][6:]]
    assert [g["lr"] for g in head] == pytest.approx([0.2 * 0.5 ** (p - 1) for p in ps[6:]], rel=1e-14)
    assert [g["c"] for g in head] == pytest.approx([0.3 * 2 ** (p - 1) for p in ps[6:]], rel=1e-14)
    assert all(len(gs) == 1 for gs in full.values[0][:6])

    trainer, _, _ = run(max_epochs=4)  # stops at step 12, inside the second transition (10..13)
    trainer.save_checkpoint(tmp_path / "joined.ckpt")
    _, resumed_module, resumed = run(str(tmp_path / "joined.ckpt"), max_epochs=6)
    assert resumed.values[0] == full.values[0][12:]
    for a, b in zip(full_module.parameters(), resumed_module.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["fused_sgd", "spa"])
def test_16_mixed_step_skipped_by_the_grad_scaler_is_not_counted(pl: ModuleType, kind: str) -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    loader = data(batches=8)
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    x[40:48] *= 1e5  # batch 5 overflows float16: inf gradients, the grad scaler skips that step
    loader = DataLoader(TensorDataset(x.float(), y.float()), batch_size=8, shuffle=False)
    if kind == "spa":
        factory: Factory = spa(0.5, 0.5)
    else:
        factory = lambda params: torch.optim.SGD(params, lr=0.25, momentum=0.5, fused=True)  # noqa: E731
    module = make_module(pl, [factory]).float()
    cb = GradualSchedule([2], factor=0.5, mode="lr", transition_steps=4, unit="step")
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000))
    _, rec = fit(pl, module, [cb], max_epochs=1, loader=loader, precision=None, plugins=[plugin])
    assert cb.state_dict()["clocks"]["0"]["steps"] == 7
    clock = [0, 1, 2, 3, 4, 5, 5, 6]  # Lightning calls on_before_optimizer_step for the skipped step too
    etas = [0.5 * 0.5 ** min(1.0, max(0.0, (k - 1) / 4)) for k in clock]
    got = rec.key("lr") if kind == "spa" else [lr / 0.5 for lr in rec.key("lr")]
    assert got == pytest.approx(etas, rel=1e-6)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_optimizer_step_override_that_skips_a_step_is_not_counted(pl: ModuleType) -> None:
    class SkipsOneBatch(make_module(pl, [sgd()]).__class__):  # type: ignore[misc]
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
            optimizer_closure()
            if (epoch, batch_idx) != (0, 2):
                optimizer.step()

    cb = GradualSchedule([2], factor=0.5, mode="lr", transition_steps=4, unit="step")
    trainer, rec = fit(pl, SkipsOneBatch(), [cb], max_epochs=2)  # 8 batches, 7 steps taken
    assert trainer.global_step == 8  # Lightning counts the skipped step; the schedule clock does not
    assert cb.state_dict()["clocks"]["0"]["steps"] == 7
    etas = [0.5 * 0.5 ** min(1.0, max(0.0, (k - 1) / 4)) for k in range(7)]
    assert [lr / 0.5 for lr in rec.key("lr")] == pytest.approx(etas, rel=1e-14)
    assert max(rec.key("momentum")) < 1.0


def test_targeted_callbacks_compose_the_same_in_either_order(pl: ModuleType) -> None:
    def callbacks() -> list[Any]:
        gradual = GradualSchedule([1], factor=0.3, mode="lr", transition_steps=3, unit="step", warmup_steps=2,
                                  optimizers=[0])  # fmt: skip
        return [gradual, MomentumOff(2, 2, "step"), GradualSchedule([3], factor=0.7, transition_steps=5, unit="step")]

    runs = []
    for order in (callbacks(), callbacks()[::-1]):
        module = make_module(pl, [spa(1.0, 0.5), spa(2.0, 0.4)], manual=True)
        _, rec = fit(pl, module, order, max_epochs=2)
        runs.append((rec.values, [p.detach().clone() for p in module.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    # optimizer 1 is not targeted by the first GradualSchedule: no warm-up, no 0.3 drop
    assert runs[0][0][1][0][0]["lr"] == 2.0 and runs[0][0][0][0][0]["lr"] == 0.5
