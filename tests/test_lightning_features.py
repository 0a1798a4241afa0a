"""The schedule callbacks alongside Lightning's own features (issues 15.3, 16.13, 17.1-17.3, 17.7).

- LR schedulers on SPA (cosine stepped per step, ReduceLROnPlateau, OneCycleLR, a SequentialLR warm-up)
  with ``MomentumOff`` / ``MeasuredMomentumOff``: the scheduler owns ``eta``, the callback ``c``;
  on torch SGD the refusal names ``SPA.from_sgdm`` and where the scheduler came from;
  ``Tuner.lr_find`` before ``fit``.
- ``StochasticWeightAveraging``: SWALR takes the lr over at ``swa_epoch_start``; ``c`` keeps its schedule
  on SPA; what cannot be handed over is refused before the first optimizer step.
- A mid-epoch checkpoint (``ModelCheckpoint(every_n_train_steps=...)``) resumed with a stateful
  dataloader: bit-identical to the uninterrupted run, with every schedule callback and
  ``MomentumDiagnostics`` (and without them, as a control).
- Manual optimization with an optimizer stepping every second batch: ``unit="epoch"`` is the Trainer's epochs.
- ``optimizers=["SPA"]`` selects a ``GroupedSPA``; the spike warning's step and advice.

Tiny float64 regressions: seconds each; each Lightning test runs under both packages (conftest's ``package``).
"""

from __future__ import annotations

import math
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR

from lightning_spa import SPA, GradualSchedule, GroupedSPA, MeasuredMomentumOff, MomentumGuard, MomentumOff
from lightning_spa.callbacks.diagnostics import MomentumDiagnostics
from lightning_spa.optim import SPASpikeWarning

BATCHES, BATCH_SIZE = 4, 8  # optimizer steps per epoch (automatic optimization)
ETA0, C0 = 0.3, 0.2
Configure = Callable[[list[nn.Parameter]], Any]
# Whether and when MeasuredMomentumOff decides here (and its console line / warning about the ratio at the
# decision) is the decision rule's business (tests/test_measured_momentum_off.py); these tests check that its
# c-only removal composes with Lightning's features whatever it decides.
DECISION_MESSAGES = pytest.mark.filterwarnings("ignore:MeasuredMomentumOff. optimizer:UserWarning")


class StatefulLoader:
    """A shuffling loader whose position can be saved and restored (what Lightning resumes mid-epoch).

    Each epoch's order is drawn from a generator seeded by the epoch; ``state_dict`` holds the epoch and
    the batches already yielded, so a restored loader continues with the next batch of the same epoch.
    """

    def __init__(self, batches: int = BATCHES, batch_size: int = BATCH_SIZE) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batches * batch_size, 4, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
        self.y = self.y + 0.3 * torch.randn(len(self.x), generator=g, dtype=torch.float64)
        self.batch_size, self.batches = batch_size, batches
        self.epoch, self.yielded = 0, 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.yielded >= self.batches:  # the previous epoch was read to its end: a new one
            self.epoch, self.yielded = self.epoch + 1, 0
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + self.epoch))
        while self.yielded < self.batches:
            idx = order[self.yielded * self.batch_size : (self.yielded + 1) * self.batch_size]
            self.yielded += 1
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded = state["epoch"], state["yielded"]


def make_module(L: ModuleType, configure: Configure, log_const: bool = False) -> Any:
    """A two-layer float64 regression whose ``configure_optimizers`` is ``configure(parameters)``."""

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Linear(4, 4, dtype=torch.float64)
            self.head = nn.Linear(4, 1, dtype=torch.float64)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = ((self.head(torch.tanh(self.body(x))).squeeze(-1) - y) ** 2).mean()
            if log_const:  # a metric that never improves: ReduceLROnPlateau(patience=0) cuts at every epoch end
                self.log("const", 1.0, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            return configure(list(self.parameters()))

    return Tiny()


def recorder(L: ModuleType) -> Any:
    """Records every param group's ``lr`` / ``c`` / ``momentum`` right before each optimizer step, per optimizer."""

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.values: dict[int, list[dict[str, float]]] = {}

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            index = list(trainer.optimizers).index(getattr(optimizer, "optimizer", optimizer))
            group = optimizer.param_groups[0]
            self.values.setdefault(index, []).append(
                {k: float(group[k]) for k in ("lr", "c", "momentum") if k in group}
            )

        def key(self, name: str, index: int = 0) -> list[float]:
            return [v[name] for v in self.values.get(index, [])]

    return Recorder()


def trainer_for(L: ModuleType, callbacks: list[Any], **kw: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, max_epochs=3,
    )  # fmt: skip
    kwargs.update(kw)
    return L.Trainer(callbacks=callbacks, **kwargs)


def fit(L: ModuleType, module: Any, callbacks: list[Any], **kw: Any) -> tuple[Any, Any]:
    rec = recorder(L)
    loader = kw.pop("loader", None) or StatefulLoader()
    ckpt_path = kw.pop("ckpt_path", None)
    trainer = trainer_for(L, [*callbacks, rec], **kw)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, rec


def removal_c(k: int, start: int, length: int, c0: float = C0) -> float:
    """``MomentumOff``'s ``c`` at step ``k``: ``c0 * (1/c0)**((j+1)/T)`` at ``start + j``, 1 from ``start + T - 1``."""
    if k < start:
        return c0
    j = k - start
    return 1.0 if j + 1 >= length else c0 * (1.0 / c0) ** ((j + 1) / length)


# ----- 15.3: LR schedulers on SPA ------------------------------------------------------------------------

EPOCHS = 3
STEPS = EPOCHS * BATCHES


def _cosine(opt: Any) -> Any:
    return lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def _plateau(opt: Any) -> Any:
    return lr_scheduler.ReduceLROnPlateau(opt, factor=0.85, patience=0)  # above 1 - c: no spike


def _onecycle(opt: Any) -> Any:
    return lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=STEPS, cycle_momentum=False)


def _warmup(opt: Any) -> Any:
    warm = lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3)
    return lr_scheduler.SequentialLR(opt, [warm, lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 3)], milestones=[3])


SCHEDULERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "cosine-per-step": (_cosine, "step"),
    "reduce-on-plateau": (_plateau, "epoch"),
    "onecycle": (_onecycle, "step"),
    "sequential-warmup": (_warmup, "step"),
}


def with_scheduler(name: str, optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Configure:
    make, interval = SCHEDULERS[name]

    def configure(params: list[nn.Parameter]) -> Any:
        opt = optimizer(params)
        config: dict[str, Any] = {"scheduler": make(opt), "interval": interval}
        if name == "reduce-on-plateau":
            config["monitor"] = "const"
        return {"optimizer": opt, "lr_scheduler": config}

    return configure


def scheduler_alone(name: str) -> list[float]:
    """The lr torch's scheduler gives each of the run's steps, stepped as Lightning steps it, on its own."""
    make, interval = SCHEDULERS[name]
    x = torch.zeros(1, requires_grad=True)
    opt = SPA([x], lr=ETA0, c=C0)
    sched = make(opt)
    lrs = []
    for k in range(STEPS):
        lrs.append(float(opt.param_groups[0]["lr"]))
        x.grad = torch.zeros(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SPASpikeWarning)  # c stays c0 here: the plateau's halving warns
            opt.step()
        if interval == "step":
            sched.step()
        elif (k + 1) % BATCHES == 0:
            sched.step(1.0) if name == "reduce-on-plateau" else sched.step()
    return lrs


@DECISION_MESSAGES
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("callback", ["MomentumOff", "MeasuredMomentumOff"])
def test_lr_schedulers_compose_with_momentum_removal_on_spa(package: ModuleType, scheduler: str, callback: str) -> None:
    """The scheduler owns eta (exactly its own values), the callback c (exactly its removal formula)."""
    if callback == "MomentumOff":
        cb: Any = MomentumOff(after_epochs=1)  # c -> 1 over the second epoch
    else:
        cb = MeasuredMomentumOff(warmup=1, patience=0.25, transition_steps=2)
    module = make_module(package, with_scheduler(scheduler, lambda p: SPA(p, lr=ETA0, c=C0)), log_const=True)
    trainer, rec = fit(package, module, [cb], max_epochs=EPOCHS)
    assert trainer.global_step == STEPS
    assert rec.key("lr") == scheduler_alone(scheduler)  # bit for bit: nothing else wrote eta
    if callback == "MomentumOff":
        start, length = BATCHES, BATCHES
    else:
        decided = cb.decided_steps[0]
        start, length = (STEPS, 2) if decided is None else (decided + 1, 2)
    assert rec.key("c") == pytest.approx([removal_c(k, start, length) for k in range(STEPS)], rel=1e-12)
    assert all(math.isfinite(float(p.detach().abs().max())) for p in module.parameters())


@pytest.mark.parametrize("callback", ["MomentumOff", "MeasuredMomentumOff"])
def test_torch_sgd_with_a_scheduler_is_refused_naming_spa_from_sgdm(package: ModuleType, callback: str) -> None:
    """On torch SGD removing momentum writes lr and momentum: refused before the first step, with the way out."""
    cb = MomentumOff(after_epochs=1) if callback == "MomentumOff" else MeasuredMomentumOff()
    sgd = lambda p: torch.optim.SGD(p, lr=0.06, momentum=0.8)  # noqa: E731
    module = make_module(package, with_scheduler("cosine-per-step", sgd))
    rec = recorder(package)
    with pytest.raises(ValueError, match=r"CosineAnnealingLR from configure_optimizers .*SPA\.from_sgdm") as err:
        trainer_for(package, [cb, rec]).fit(module, train_dataloaders=StatefulLoader())
    assert "c: <1 - momentum>" in str(err.value)
    assert rec.values == {}  # before the first optimizer step


def test_gradual_schedule_and_a_scheduler_on_spa_are_refused(package: ModuleType) -> None:
    """GradualSchedule writes eta on SPA too: it and a scheduler cannot share an optimizer."""
    module = make_module(package, with_scheduler("onecycle", lambda p: SPA(p, lr=ETA0, c=C0)))
    with pytest.raises(ValueError, match=r"writes eta .*OneCycleLR from configure_optimizers.*Keep one of the two"):
        trainer_for(package, [GradualSchedule([1], factor=0.5, transition_steps=4)]).fit(
            module, train_dataloaders=StatefulLoader()
        )


# LightningCLI itself calls jsonargparse APIs that jsonargparse deprecates (third party, not ours).
@pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning")
def test_refusal_names_lightning_cli_lr_scheduler(package: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler given with LightningCLI's --lr_scheduler is named as such (not configure_optimizers)."""
    monkeypatch.setattr(sys, "argv", ["cli"])  # args= only (LightningCLI warns when both are given)
    cli_module = __import__(f"{package.__name__}.cli", fromlist=["LightningCLI"])

    class CLIModule(package.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1, dtype=torch.float64)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return ((self.layer(x).squeeze(-1) - y) ** 2).mean()

    args = [
        "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05", "--optimizer.momentum", "0.9",
        "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1",
        "--trainer.callbacks+", "lightning_spa.MomentumOff", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "1",
    ]  # fmt: skip
    cli = cli_module.LightningCLI(CLIModule, run=False, args=args, save_config_callback=None, seed_everything_default=0)
    with pytest.raises(ValueError, match=r"StepLR from LightningCLI's --lr_scheduler .*SPA\.from_sgdm"):
        cli.trainer.fit(cli.model, train_dataloaders=StatefulLoader())


def test_lr_find_then_momentum_off(package: ModuleType) -> None:
    """Tuner.lr_find before fit: the found lr is SPA's eta and MomentumOff moves c only; the fit ends finite.

    Reported: with the steepest-descent suggestion as eta, removing momentum does not diverge here (the loss at
    the end is below its start).
    """
    tuner_module = __import__(f"{package.__name__}.tuner", fromlist=["Tuner"])

    class Tunable(package.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lr = 0.1
            self.body = nn.Linear(4, 4, dtype=torch.float64)
            self.head = nn.Linear(4, 1, dtype=torch.float64)
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = ((self.head(torch.tanh(self.body(x))).squeeze(-1) - y) ** 2).mean()
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> Any:
            return SPA(self.parameters(), lr=self.lr, c=C0)

    def tuned_fit(cb: MomentumOff) -> tuple[Any, Any]:
        module = Tunable()
        rec = recorder(package)
        trainer = trainer_for(package, [cb, rec], max_epochs=6)
        finder = tuner_module.Tuner(trainer).lr_find(
            module, train_dataloaders=StatefulLoader(), min_lr=1e-3, max_lr=3.0, num_training=24
        )
        assert finder is not None and module.lr == finder.suggestion()
        module.losses.clear()
        rec.values.clear()
        trainer.fit(module, train_dataloaders=StatefulLoader())
        assert rec.key("lr") == [module.lr] * 6 * BATCHES  # lr_find's eta, untouched
        assert all(math.isfinite(v) for v in module.losses)
        assert sum(module.losses[-BATCHES:]) < sum(module.losses[:BATCHES])
        return module, rec

    start = 2 * BATCHES
    # The formula (no idle check): c goes to 1 over epoch 2 and the fit still ends below its start.
    _, rec = tuned_fit(MomentumOff(after_epochs=2, guard=MomentumGuard(low=None, high=None)))
    assert rec.key("c") == pytest.approx([removal_c(k, start, BATCHES) for k in range(6 * BATCHES)])
    # At the defaults the guard reads the ratio first: at the found lr it is not idle here, so the removal is
    # postponed at its start (and says so), with c back at c0 from the next step.
    cb = MomentumOff(after_epochs=2)
    _, rec = tuned_fit(cb)
    guard = cb._guards.guards[0]  # type: ignore[union-attr]
    assert guard.start_ratio is not None and not 0.9 <= guard.start_ratio <= 1.25
    assert guard.aborted_steps == [start] and rec.key("c")[start + 1 :] == [C0] * (6 * BATCHES - start - 1)


# ----- 17.1: StochasticWeightAveraging ---------------------------------------------------------------------

SWA_EPOCHS, SWA_START = 4, 2  # SWA from epoch 2 (0-based; swa_epoch_start=3), optimizer step 8
# SWALR anneals once per epoch: a cut of eta below (1 - c) * eta in one step would be the spike SPA warns about.
SWA_LR = 0.25  # >= (1 - C0) * ETA0 = 0.24
HANDOVER = SWA_START * BATCHES


def swa(L: ModuleType) -> Any:
    return L.callbacks.StochasticWeightAveraging(swa_lrs=SWA_LR, swa_epoch_start=SWA_START + 1, annealing_epochs=1)


def swalr_alone(start_lr: float) -> list[float]:
    """The lr torch's SWALR gives the SWA epochs' steps, built as Lightning's SWA builds it, on its own."""
    x = torch.zeros(1, requires_grad=True)
    opt = SPA([x], lr=start_lr, c=1.0)
    opt.param_groups[0]["initial_lr"] = SWA_LR
    sched = SWALR(opt, swa_lr=[SWA_LR], anneal_epochs=1, anneal_strategy="cos", last_epoch=SWA_EPOCHS)
    lrs = []
    for _ in range(SWA_START, SWA_EPOCHS):
        for _ in range(BATCHES):
            lrs.append(float(opt.param_groups[0]["lr"]))
            x.grad = torch.zeros(1)
            opt.step()
        sched.step()
    return lrs


def test_swa_takes_the_lr_over_from_gradual_schedule_on_spa(package: ModuleType) -> None:
    """GradualSchedule's decay (done before SWA) then SWALR's lr, from the schedule's last eta; c stays there."""
    module = make_module(package, lambda p: SPA(p, lr=ETA0, c=C0))
    cb = GradualSchedule([1], factor=0.5, transition_steps=BATCHES)  # eta / 2, c * 2 over steps 4-7
    trainer, rec = fit(package, module, [cb, swa(package)], max_epochs=SWA_EPOCHS)
    assert trainer.global_step == SWA_EPOCHS * BATCHES
    f = [0.0] * BATCHES + [(j + 1) / BATCHES for j in range(BATCHES)]  # share of the transition, steps 0-7
    assert rec.key("lr")[:HANDOVER] == pytest.approx([ETA0 * 0.5**s for s in f], rel=1e-12)
    assert rec.key("lr")[HANDOVER:] == pytest.approx(swalr_alone(ETA0 * 0.5), rel=1e-12)
    assert rec.key("c") == pytest.approx([C0 * 2**s for s in f] + [2 * C0] * (SWA_EPOCHS * BATCHES - HANDOVER))


def test_swa_and_momentum_off_on_spa_c_keeps_its_schedule(package: ModuleType) -> None:
    """On SPA, momentum removal writes c only: it goes on under SWALR, across the SWA start."""
    module = make_module(package, lambda p: SPA(p, lr=ETA0, c=C0))
    # steps 6-9: across the SWA start (step 8); the formula, without the idle check (this toy is not idle at step 6)
    cb = MomentumOff(after_epochs=1.5, guard=MomentumGuard(low=None, high=None))
    _, rec = fit(package, module, [cb, swa(package)], max_epochs=SWA_EPOCHS)
    assert rec.key("c") == pytest.approx([removal_c(k, 6, BATCHES) for k in range(SWA_EPOCHS * BATCHES)])
    assert rec.key("lr") == pytest.approx([ETA0] * HANDOVER + swalr_alone(ETA0), rel=1e-12)


@DECISION_MESSAGES
def test_swa_and_measured_momentum_off_on_spa(package: ModuleType) -> None:
    module = make_module(package, lambda p: SPA(p, lr=ETA0, c=C0))
    cb = MeasuredMomentumOff(warmup=1, patience=0.25, transition_steps=2)
    _, rec = fit(package, module, [cb, swa(package)], max_epochs=SWA_EPOCHS)
    decided = cb.decided_steps[0]
    start = SWA_EPOCHS * BATCHES if decided is None else decided + 1
    assert rec.key("c") == pytest.approx([removal_c(k, start, 2) for k in range(SWA_EPOCHS * BATCHES)])
    assert rec.key("lr") == pytest.approx([ETA0] * HANDOVER + swalr_alone(ETA0), rel=1e-12)


def test_swa_and_momentum_off_done_before_it_on_torch_sgd(package: ModuleType) -> None:
    """torch SGD: the removal ends before SWA (momentum 0, lr = eta), SWALR then anneals that lr."""
    module = make_module(package, lambda p: torch.optim.SGD(p, lr=C0 * ETA0, momentum=1 - C0))
    # The guard watches one epoch after c reaches 1 and could write c (the momentum) there, under SWALR: the watch
    # ends with the removal here, so the schedule is settled before SWA starts.
    removal = MomentumOff(after_epochs=1, guard=MomentumGuard(watch_steps=0))
    _, rec = fit(package, module, [removal, swa(package)], max_epochs=SWA_EPOCHS)
    # step 7 is the last of the removal: c_7 = 1 (lr = eta), momentum (1 - c_6); from step 8 on, momentum 0
    assert rec.key("lr")[HANDOVER - 1] == pytest.approx(ETA0, rel=1e-12)
    assert rec.key("momentum")[HANDOVER:] == [0.0] * (SWA_EPOCHS * BATCHES - HANDOVER)
    assert rec.key("lr")[HANDOVER:] == pytest.approx(swalr_alone(ETA0), rel=1e-12)


@pytest.mark.parametrize(
    ("optimizer", "callback", "match"),
    [
        # the removal (steps 6-9) and its guard's watch, one epoch after c reaches 1 (steps 10-13)
        ("sgd", lambda: MomentumOff(after_epochs=1.5), r"the lr or the momentum of optimizer 0 \(SGD\) until its "
         r"optimizer step 13, but StochasticWeightAveraging's SWALR .*epoch 2 \(optimizer step 8\).*SPA\.from_sgdm"),
        ("sgd", lambda: MeasuredMomentumOff(), r"at a step only known during the run \(MeasuredMomentumOff\)"),
        ("spa", lambda: GradualSchedule([1.5], factor=0.5, transition_steps=4),
         r"eta \(GradualSchedule\) of optimizer 0 \(SPA\) until its optimizer step 9.*before swa_epoch_start"),
    ],
    ids=["sgd-momentum-off-after", "sgd-measured", "spa-gradual-after"],
)  # fmt: skip
def test_swa_with_a_schedule_it_would_cut_is_refused_before_training(
    package: ModuleType, optimizer: str, callback: Callable[[], Any], match: str
) -> None:
    if optimizer == "sgd":
        module = make_module(package, lambda p: torch.optim.SGD(p, lr=C0 * ETA0, momentum=1 - C0))
    else:
        module = make_module(package, lambda p: SPA(p, lr=ETA0, c=C0))
    rec = recorder(package)
    with pytest.raises(ValueError, match=match):
        trainer_for(package, [callback(), swa(package), rec], max_epochs=SWA_EPOCHS).fit(
            module, train_dataloaders=StatefulLoader()
        )
    assert rec.values == {}


# ----- 17.2: mid-epoch resume with a stateful dataloader ------------------------------------------------------

RESUME_CALLBACKS: dict[str, Callable[[], list[Any]]] = {
    "control": lambda: [],
    "gradual": lambda: [GradualSchedule([1], factor=0.5, transition_steps=4), MomentumDiagnostics(every_n_steps=1)],
    "momentum-off": lambda: [MomentumOff(after_epochs=1), MomentumDiagnostics(every_n_steps=1)],
    "measured": lambda: [MeasuredMomentumOff(warmup=1, patience=0.25), MomentumDiagnostics(every_n_steps=1)],
    "all": lambda: [
        GradualSchedule([1], factor=0.5, transition_steps=4),
        MomentumOff(after_epochs=2),
        MeasuredMomentumOff(warmup=1, patience=0.25, transition_steps=2),
        MomentumDiagnostics(every_n_steps=1),
    ],
}


@DECISION_MESSAGES
@pytest.mark.parametrize("callbacks", list(RESUME_CALLBACKS))
@pytest.mark.parametrize("optimizer", ["spa", "sgd"])
def test_mid_epoch_resume_is_bit_exact(package: ModuleType, tmp_path: Path, callbacks: str, optimizer: str) -> None:
    """A ModelCheckpoint(every_n_train_steps=6) checkpoint (mid-epoch 1) resumed with a stateful loader ends on the
    uninterrupted run's weights, bit for bit, with our callbacks as without them (the control)."""

    def configure(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return SPA(params, lr=ETA0, c=C0) if optimizer == "spa" else torch.optim.SGD(params, lr=C0 * ETA0, momentum=0.8)

    def checkpoints() -> Any:  # the same arguments and directory in both runs (Lightning warns otherwise)
        return package.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)

    reference = make_module(package, configure)
    _, rec = fit(package, reference, [*RESUME_CALLBACKS[callbacks](), checkpoints()], enable_checkpointing=True)
    (saved,) = (tmp_path / "ckpt").glob("epoch=1-step=6*.ckpt")  # 6 steps: batch 2 of epoch 1
    path = shutil.move(saved, tmp_path / "cut.ckpt")
    shutil.rmtree(tmp_path / "ckpt")
    resumed = make_module(package, configure)
    _, rec_resumed = fit(
        package,
        resumed,
        [*RESUME_CALLBACKS[callbacks](), checkpoints()],
        ckpt_path=str(path),
        enable_checkpointing=True,
    )
    assert rec.values[0][6:] == rec_resumed.values[0]  # the same values at the same steps
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# ----- 16.13: a class name selects subclasses ------------------------------------------------------------------


def test_class_name_selects_a_subclass(package: ModuleType) -> None:
    """optimizers=["SPA"] selects a GroupedSPA (a SPA subclass), as isinstance would."""
    module = make_module(package, lambda p: GroupedSPA(p, eta=ETA0, c=C0))
    _, rec = fit(package, module, [MomentumOff(after_epochs=1, optimizers=["SPA"])], max_epochs=2)
    assert rec.key("c") == pytest.approx([removal_c(k, BATCHES, BATCHES) for k in range(2 * BATCHES)])


# ----- 17.7: the spike warning ----------------------------------------------------------------------------------


def _first_spike(make: Callable[[Any], Any], every: int, steps: int, c: float = 0.1) -> tuple[list[Any], list[float]]:
    """SPA with ``make``'s scheduler stepped every ``every`` optimizer steps; the spike warnings and the etas."""
    x = torch.zeros(3, requires_grad=True)
    opt = SPA([x], lr=1.0, c=c)
    sched = make(opt)
    etas = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(steps):
            etas.append(float(opt.param_groups[0]["lr"]))
            x.grad = torch.ones(3)
            opt.step()
            if (k + 1) % every == 0:
                sched.step()
    return [w for w in caught if issubclass(w.category, SPASpikeWarning)], etas


def test_spike_warning_of_a_scheduler_stepped_per_epoch_names_interval_step() -> None:
    """A cosine stepped every 5 steps (per epoch) falls in a staircase: the warning says `interval: step`, at the
    first step (0-based) whose equivalent momentum (1 - c) * eta_prev / eta reaches 1."""
    epochs, every, c = 12, 5, 0.1
    caught, etas = _first_spike(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=epochs), every, epochs * every, c)
    first = next(k for k in range(1, len(etas)) if etas[k] < etas[k - 1] and (1 - c) * etas[k - 1] / etas[k] >= 1)
    assert first % every == 0 and first > 2 * every  # at an epoch boundary, after two earlier falls
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"SPA step {first} (counted from 0)" in message
    assert f"staircase, once every {every} optimizer steps" in message and '"interval": "step"' in message
    assert "--lr_scheduler" in message


def test_spike_warning_of_the_same_cosine_per_step_is_silent() -> None:
    caught, _ = _first_spike(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=60), 1, 60)
    assert caught == []


# ----- 17.3: manual optimization, an optimizer stepping every second batch -----------------------------------------


def make_manual_module(L: ModuleType) -> Any:
    """Two SPA optimizers (body, head); the head's steps on every second batch only."""

    class TwoClocks(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.body = nn.Linear(4, 4, dtype=torch.float64)
            self.head = nn.Linear(4, 1, dtype=torch.float64)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            body, head = self.optimizers()  # type: ignore[misc]
            x, y = batch
            body.zero_grad()
            head.zero_grad()
            self.manual_backward(((self.head(torch.tanh(self.body(x))).squeeze(-1) - y) ** 2).mean())
            body.step()
            if batch_idx % 2 == 1:
                head.step()

        def configure_optimizers(self) -> Any:
            return [SPA(self.body.parameters(), lr=ETA0, c=C0), SPA(self.head.parameters(), lr=ETA0, c=C0)]

    return TwoClocks()


def manual_callbacks() -> list[Any]:
    # the formula, without the idle check (this toy is not idle after epoch 1)
    off = MomentumOff(after_epochs=1, guard=MomentumGuard(low=None, high=None))
    return [GradualSchedule([2], factor=0.5, mode="lr"), off]


def expected_manual(per_epoch: int, steps: int) -> tuple[list[float], list[float]]:
    """eta halves over epoch 2 and c goes to 1 over epoch 1 (one epoch each): ``per_epoch`` steps of this optimizer."""
    f = [min(1.0, max(0.0, (k - 2 * per_epoch + 1) / per_epoch)) for k in range(steps)]
    return [ETA0 * 0.5**s for s in f], [removal_c(k, per_epoch, per_epoch) for k in range(steps)]


def test_manual_optimization_epochs_are_the_trainers_for_every_optimizer(package: ModuleType, tmp_path: Path) -> None:
    """The head steps twice per epoch: its transitions take 2 of its steps and end with the trainer's epochs.

    Resumed after the first epoch (where the rate was counted), both optimizers continue with the same values."""
    epochs = 4
    module = make_manual_module(package)
    trainer, rec = fit(package, module, manual_callbacks(), max_epochs=epochs)
    for index, per_epoch in ((0, BATCHES), (1, BATCHES // 2)):
        eta, c = expected_manual(per_epoch, epochs * per_epoch)
        assert rec.key("lr", index) == pytest.approx(eta, rel=1e-12)
        assert rec.key("c", index) == pytest.approx(c, rel=1e-12)
    assert rec.key("c", 1)[2 * (BATCHES // 2) - 1] == 1.0  # the head's removal is over at the end of epoch 1

    first = make_manual_module(package)
    trainer = trainer_for(package, [*manual_callbacks(), recorder(package)], max_epochs=2)
    with pytest.warns(UserWarning, match="milestone at optimizer step 8 is beyond this run's 8 steps"):
        trainer.fit(first, train_dataloaders=StatefulLoader())  # 2 epochs: the milestone at epoch 2 is not reached
    trainer.save_checkpoint(tmp_path / "epoch2.ckpt")
    resumed = make_manual_module(package)
    _, rec_resumed = fit(
        package, resumed, manual_callbacks(), max_epochs=epochs, ckpt_path=str(tmp_path / "epoch2.ckpt")
    )
    assert rec_resumed.values[0] == rec.values[0][2 * BATCHES :]  # the rate counted in epoch 0 came back
    assert rec_resumed.values[1] == rec.values[1][2 * (BATCHES // 2) :]


@DECISION_MESSAGES
def test_manual_optimization_measured_momentum_off_counts_the_trainers_epochs(
    package: ModuleType, tmp_path: Path
) -> None:
    """MeasuredMomentumOff's warm-up, patience and one-epoch transition for the head: 2 of its steps each, also
    after a resume."""
    cb = MeasuredMomentumOff(warmup=1, patience=1)
    trainer, _ = fit(package, make_manual_module(package), [cb], max_epochs=2)
    trainer.save_checkpoint(tmp_path / "epoch2.ckpt")
    resumed = MeasuredMomentumOff(warmup=1, patience=1)
    fit(package, make_manual_module(package), [resumed], max_epochs=3, ckpt_path=str(tmp_path / "epoch2.ckpt"))
    for callback in (cb, resumed):
        assert (callback.decisions[0].warmup_steps, callback.decisions[0].patience_steps) == (BATCHES, BATCHES)
        assert (callback.decisions[1].warmup_steps, callback.decisions[1].patience_steps) == (2, 2)
        assert [callback._removals[i].transition_steps for i in (0, 1)] == [BATCHES, BATCHES // 2]


@DECISION_MESSAGES
def test_manual_optimization_measured_momentum_off_measuring_in_the_first_epoch_says_so(package: ModuleType) -> None:
    """Measuring from a quarter epoch, the head measured before its rate was known: kept, and said, naming the fix."""
    with pytest.warns(UserWarning, match=r"optimizer 1 took 2 steps in the trainer's first epoch of 4 batches.*"
                      r"unit='step'"):  # fmt: skip
        fit(package, make_manual_module(package), [MeasuredMomentumOff(warmup=0.25, patience=1)], max_epochs=2)


def test_swa_with_batch_norm_and_momentum_off_on_spa(package: ModuleType) -> None:
    """With a BatchNorm, SWA adds an epoch that recomputes the statistics: the fit still completes, c = 1 there."""

    class WithBatchNorm(package.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Linear(4, 4, dtype=torch.float64)
            self.norm = nn.BatchNorm1d(4, dtype=torch.float64)
            self.head = nn.Linear(4, 1, dtype=torch.float64)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return ((self.head(self.norm(self.body(x))).squeeze(-1) - y) ** 2).mean()

        def configure_optimizers(self) -> Any:
            return SPA(self.parameters(), lr=ETA0, c=C0)

    module = WithBatchNorm()
    # guard=False: this toy destabilises without momentum under SWALR (the guard aborts at step 12, ||g||^2 130x its
    # level before the removal); the test is about the c schedule across SWA's extra statistics epoch.
    removal = MomentumOff(after_epochs=1.5, guard=False)
    _, rec = fit(package, module, [removal, swa(package)], max_epochs=SWA_EPOCHS)
    steps = len(rec.key("c"))
    assert steps >= SWA_EPOCHS * BATCHES  # Lightning's statistics epoch may add a step of its own
    assert rec.key("c") == pytest.approx([removal_c(k, 6, BATCHES) for k in range(steps)])
    assert rec.key("lr")[:HANDOVER] == [ETA0] * HANDOVER
    assert all(math.isfinite(float(p.detach().abs().max())) for p in module.parameters())
