"""GradualSchedule / MomentumOff in the setups real Lightning projects use (issue 9).

Several optimizers (GAN-style manual optimization, SPA + Adam), callback order, a param group
added mid-run, skipped optimizer steps and parameters without a gradient (torch SGD must follow
SPA exactly), resume with the same callback instance, LearningRateMonitor. The core fit and
resume run under both ``pytorch_lightning`` and ``lightning.pytorch``. Tiny float64 linear
models on random data: seconds each.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA, GradualSchedule, MomentumOff

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]
Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@pytest.fixture(params=PACKAGES)
def L(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


@pytest.fixture
def pl() -> ModuleType:
    return importlib.import_module("pytorch_lightning")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, precision="64-true",
    )  # fmt: skip
    kwargs.update(kw)
    trainer = L.Trainer(callbacks=[*callbacks, rec], **kwargs)
    trainer.fit(module, train_dataloaders=kw.pop("loader", None) or data(), ckpt_path=ckpt_path)
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
    callbacks = [gradual, MomentumOff(3, 2, "step")]
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
