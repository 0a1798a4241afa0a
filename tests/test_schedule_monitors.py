"""Schedule callbacks with LearningRateMonitor, their defaults and refusals, tensor learning rates (issue 9)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import Logger
from test_schedule_setups import data, fit, make_module, sgd, spa

from lightning_spa import SPA, GradualSchedule, MomentumOff


class Memory(Logger):
    """Keeps every logged metric in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]




def test_lr_monitor_listed_first_logs_the_theorem_1_values_of_each_torch_sgd_step() -> None:
    logger = Memory()
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    cb = GradualSchedule([3], unit="step", transition_steps=4)  # eta0 0.5, c0 0.5 (lr 0.25, momentum 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # in particular no LearningRateMonitor warning of ours
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
        fit(pl, make_module(pl, [sgd()]), [monitor, cb], max_steps=8, logger=logger, log_every_n_steps=1)
    etas = [0.5 * 0.1 ** min(1.0, max(0.0, (k - 2) / 4)) for k in range(8)]
    cs = [0.5 * 2 ** min(1.0, max(0.0, (k - 2) / 4)) for k in range(8)]
    momentum = [0.5] + [(1 - cs[k - 1]) * etas[k - 1] / etas[k] for k in range(1, 8)]
    assert logger.series("lr-SGD") == pytest.approx([c * e for c, e in zip(cs, etas, strict=True)], rel=1e-13)
    assert logger.series("lr-SGD-momentum") == pytest.approx(momentum, rel=1e-13)
    assert max(momentum) == pytest.approx(0.5 * 10**0.25) and max(momentum) < 1.0


def test_lr_monitor_with_spa_gets_one_warning_that_names_momentum_diagnostics() -> None:
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    callbacks = [monitor, GradualSchedule([3], unit="step", transition_steps=4), MomentumOff(5, 2, "step")]
    with pytest.warns(UserWarning) as record:
        fit(pl, make_module(pl, [spa()]), callbacks, max_steps=4, logger=Memory(), log_every_n_steps=1)
    ours = [str(w.message) for w in record if "(log_momentum=True) logs momentum 0" in str(w.message)]
    assert len(ours) == 1
    assert "MomentumDiagnostics" in ours[0] and "spa/momentum" in ours[0]


def test_momentum_off_default_is_gradual_over_one_epoch() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
        # guard=False: this regression diverges without momentum at eta 0.5 (the guard aborts at step 7, rightly);
        # the test is about the schedule's formula
        _, rec = fit(pl, make_module(pl, [spa(0.5, 0.1)]), [MomentumOff(guard=False)], max_epochs=3)  # 4 steps/epoch
    expected = [0.1] * 4 + [0.1 * 10 ** ((j + 1) / 4) for j in range(4)] + [1.0] * 4
    assert rec.key("c") == pytest.approx(expected, rel=1e-14)
    assert rec.key("lr") == [0.5] * 12


def test_momentum_off_instant_warns() -> None:
    with pytest.warns(UserWarning, match=r"transition_steps=0\) switches momentum off at once at optimizer step 4"):
        _, rec = fit(pl, make_module(pl, [spa(0.5, 0.1)]), [MomentumOff(transition_steps=0, guard=False)], max_epochs=2)
    assert rec.key("c") == [0.1] * 4 + [1.0] * 4


def test_momentum_off_at_zero_warns_what_happens() -> None:
    with pytest.warns(UserWarning, match=r"after_epochs=0\) removes momentum from the first optimizer step"):
        MomentumOff(after_epochs=0)


def test_empty_milestones_without_warmup_are_refused() -> None:
    with pytest.raises(ValueError, match=r"milestones=\[\]\) with warmup_steps=0 would never change anything"):
        GradualSchedule(milestones=[])
    GradualSchedule(milestones=[], warmup_steps=3)  # a warm-up alone is fine


@pytest.mark.parametrize("bad", [[-1], "", [1.5]])
def test_optimizers_argument_is_checked_at_construction(bad: Any) -> None:
    with pytest.raises(ValueError, match="`optimizers`"):
        MomentumOff(optimizers=bad)


def test_float32_tensor_lr_is_not_taken_for_a_foreign_write() -> None:
    def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return SPA(params, lr=torch.tensor(0.5), c=0.5)  # float32: written values round

    _, rec = fit(pl, make_module(pl, [factory]), [GradualSchedule([1], unit="step", transition_steps=4)], max_steps=6)
    expected = [0.5] + [0.5 * 0.1 ** min(1.0, j / 4) for j in range(1, 6)]
    assert rec.key("lr") == pytest.approx(expected, rel=1e-6)


def test_a_param_group_the_schedule_cannot_handle_is_refused_when_it_joins() -> None:
    class AddPlainSGDGroup(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 2:
                pl_module.head.requires_grad_(True)
                trainer.optimizers[0].add_param_group({"params": list(pl_module.head.parameters()), "momentum": 0.0})

    def body_only(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params[:2], lr=0.25, momentum=0.5)

    module = make_module(pl, [body_only])
    module.head.requires_grad_(False)
    with pytest.raises(ValueError, match=r"param group 1 added to optimizer 0 has momentum=0.0"):
        fit(pl, module, [GradualSchedule([3], unit="step", transition_steps=4), AddPlainSGDGroup()], max_steps=4,
            loader=data())  # fmt: skip


def test_resuming_from_a_checkpoint_without_a_clock_warns(tmp_path: Any) -> None:
    trainer, _ = fit(pl, make_module(pl, [spa()]), [], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.warns(UserWarning, match=r"holds no schedule clock for optimizer 0 .* starts at step 0 again"):
        _, rec = fit(pl, make_module(pl, [spa()]), [GradualSchedule([1], unit="step", transition_steps=4)],
                     ckpt_path=str(tmp_path / "plain.ckpt"), max_epochs=2)  # fmt: skip
    assert rec.key("lr")[0] == 0.5  # step 0 of the schedule


@pytest.mark.parametrize("diagnostics_first", [True, False])
def test_group_added_at_epoch_2_under_gradual_schedule_and_momentum_diagnostics(diagnostics_first: bool) -> None:
    from test_schedule_setups import head_adder

    from lightning_spa import MomentumDiagnostics

    def body_only(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return SPA(params[:2], lr=0.5, c=0.5)

    schedule = GradualSchedule([3, 10], factor=0.5, transition_steps=4, unit="step")
    diagnostics = MomentumDiagnostics(every_n_steps=1, per_group=True)
    callbacks = [diagnostics, schedule] if diagnostics_first else [schedule, diagnostics]
    logger = Memory()
    fit(pl, make_module(pl, [body_only]), [*callbacks, head_adder(pl)], loader=data(batches=3), max_epochs=6,
        logger=logger, log_every_n_steps=1)  # fmt: skip
    ps = [min(1.0, max(0.0, (k - 2) / 4)) + min(1.0, max(0.0, (k - 9) / 4)) for k in range(18)]
    # the body from step 0, the head (eta 0.2, c 0.3) from step 6 relative to its own values
    assert logger.series("spa/eta/0") == pytest.approx([0.5 * 0.5**p for p in ps], rel=1e-12)
    assert logger.series("spa/eta/1") == pytest.approx([0.2 * 0.5 ** (p - 1) for p in ps[6:]], rel=1e-12)
    assert logger.series("spa/c/1") == pytest.approx([0.3 * 2 ** (p - 1) for p in ps[6:]], rel=1e-12)
