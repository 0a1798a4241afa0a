"""GradualSchedule and MomentumOff on a real tiny model (the digits CNN) with a Trainer."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_spa import SPA, GradualSchedule, MomentumGuard, MomentumOff
from lightning_spa.demos import DigitsCNN, DigitsDataModule
from lightning_spa.optim import SPASpikeWarning

CONFIGS = Path(__file__).parent / "configs"




class Recorder(pl.Callback):
    """Records, right before each optimizer step, the values every param group will use."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.groups: list[list[dict[str, float]]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.steps.append(trainer.global_step)
        self.groups.append(
            [{k: float(g[k]) for k in ("lr", "c", "momentum") if k in g} for g in optimizer.param_groups]
        )

    def key(self, name: str, group: int = 0) -> list[float]:
        return [gs[group][name] for gs in self.groups]


class OrderedDigits(DigitsDataModule):
    """No shuffling: the data order does not depend on the RNG (for resume comparisons)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


def sgd(lr: float = 0.1, momentum: float = 0.9, **kw: Any) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, **kw)


def spa(lr: float = 1.0, c: float = 0.1) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    return lambda params: SPA(params, lr=lr, c=c)


def fit(
    callbacks: list[pl.Callback],
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer] | None = None,
    model: pl.LightningModule | None = None,
    data: pl.LightningDataModule | None = None,
    seed: int = 0,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, pl.LightningModule, Recorder]:
    pl.seed_everything(seed, verbose=False)
    model = model if model is not None else DigitsCNN(channels=4, optimizer=optimizer)
    recorder = Recorder()
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[*callbacks, recorder], **kwargs)
    trainer.fit(model, data if data is not None else DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return trainer, model, recorder


# ----- per-step values --------------------------------------------------------------------------


M, T = 3, 22  # 0.9 * 10**(1/22) < 1 <= 0.9 * 10**(1/21)


def expected_eta_c(k: int, eta0: float = 1.0, c0: float = 0.1, f: float = 0.1) -> tuple[float, float]:
    """Paper mode, one geometric transition at M over T steps: the issue's formula written out."""
    if k < M:
        return eta0, c0
    share = min(1.0, (k - M + 1) / T)
    return eta0 * f**share, min(1.0, c0 * (min(1.0, c0 / f) / c0) ** share)


def test_spa_values_follow_the_formula() -> None:
    _, _, rec = fit([GradualSchedule([M], unit="step", transition_steps=T)], spa(), max_steps=M + T + 2)
    assert rec.steps == list(range(M + T + 2))
    for k in rec.steps:
        eta, c = expected_eta_c(k)
        assert rec.key("lr")[k] == pytest.approx(eta, rel=1e-14)
        assert rec.key("c")[k] == pytest.approx(c, rel=1e-14)


def test_torch_sgd_values_follow_theorem_1() -> None:
    _, _, rec = fit([GradualSchedule([M], unit="step", transition_steps=T)], sgd(0.1, 0.9), max_steps=M + T + 2)
    for k in rec.steps:
        eta, c = expected_eta_c(k)  # SGD lr 0.1, momentum 0.9 starts at eta 1, c 0.1
        eta_prev, c_prev = expected_eta_c(k - 1) if k > 0 else (eta, c)
        assert rec.key("lr")[k] == pytest.approx(c * eta, rel=1e-13)
        assert rec.key("momentum")[k] == pytest.approx((1 - c_prev) * eta_prev / eta, rel=1e-13)
    assert max(rec.key("momentum")) < 1.0
    assert rec.key("momentum")[-1] == 0.0  # c = 1: momentum removed, lr kept at 0.1
    assert rec.key("lr")[-1] == pytest.approx(0.1, rel=1e-13)


def test_instant_paper_mode_writes_the_spike_geometric_does_not() -> None:
    with pytest.warns(UserWarning, match=r"reaches 9 at optimizer step 3"):
        _, _, rec = fit([GradualSchedule([M], unit="step", transition="instant")], sgd(0.1, 0.9), max_steps=M + 2)
    assert rec.key("momentum")[M] == pytest.approx(9.0, rel=1e-13)  # (1 - 0.1) * 1 / 0.1
    assert rec.key("momentum")[M + 1] == 0.0
    assert rec.key("lr")[M:] == pytest.approx([0.1, 0.1])
    _, _, rec = fit([GradualSchedule([M], unit="step", transition_steps=T)], sgd(0.1, 0.9), max_steps=M + T)
    assert max(rec.key("momentum")) == pytest.approx(0.9 * 10 ** (1 / T), rel=1e-13)
    assert max(rec.key("momentum")) < 1.0


def test_too_fast_transition_is_refused_before_training() -> None:
    fast = 10
    safe = math.floor(math.log(10) / math.log(1 / 0.9)) + 1  # smallest T with 0.9 * 10**(1/T) < 1
    value = 0.9 * 10 ** (1 / fast)
    model = DigitsCNN(channels=4, optimizer=sgd())
    before = [p.detach().clone() for p in model.parameters()]
    pattern = rf"reaches {value:.6g} .* at optimizer step 7 .* transition_steps is {safe}\b"
    with pytest.raises(ValueError, match=pattern):
        fit([GradualSchedule([7], unit="step", transition_steps=fast)], model=model, max_steps=30)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_spa_and_torch_sgd_reach_the_same_parameters_float64() -> None:
    def callbacks() -> list[pl.Callback]:
        # the formula on both optimizers: no idle check (this regression reads aligned at step 20, so it would postpone)
        off = MomentumOff(20, 4, "step", guard=MomentumGuard(low=None, high=None))
        return [GradualSchedule([4], unit="step", transition_steps=T, warmup_steps=3), off]

    pl.seed_everything(0, verbose=False)
    init = [p.detach().double() for p in DigitsCNN(channels=4).parameters()]  # what fit() starts from
    kw = dict(max_steps=26, precision="64-true")
    _, spa_model, spa_rec = fit(callbacks(), spa(1.0, 0.1), **kw)
    _, sgd_model, sgd_rec = fit(callbacks(), sgd(0.1, 0.9), **kw)
    assert spa_rec.key("c")[-1] == 1.0 and sgd_rec.key("momentum")[-1] == 0.0
    moved = 0.0
    for (name, a), b, a0 in zip(spa_model.named_parameters(), sgd_model.parameters(), init, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        moved = max(moved, (a - a0).abs().max().item())
    assert moved > 1e-2  # the runs trained: agreement is not trivial


# ----- resume, accumulation, param groups, composition --------------------------------------------


@pytest.mark.parametrize("optimizer", ["spa", "sgd"])
def test_resume_mid_transition_is_bit_exact(tmp_path: Path, optimizer: str) -> None:
    factory = spa(1.0, 0.5) if optimizer == "spa" else sgd(0.5, 0.5)  # c0 = 0.5: T = 6 is safe for 10x

    def schedule() -> list[pl.Callback]:
        return [GradualSchedule([4], unit="step", transition_steps=6), MomentumOff(2.5, 3)]

    kw = dict(limit_train_batches=6, data=OrderedDigits(batch_size=32))
    _, full, full_rec = fit(schedule(), factory, max_epochs=3, **kw)
    trainer, _, _ = fit(schedule(), factory, max_epochs=1, **kw)  # stops at step 6, inside 4..9
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    _, resumed, resumed_rec = fit(schedule(), factory, seed=123, ckpt_path=str(ckpt), max_epochs=3, **kw)
    assert resumed_rec.steps == list(range(6, 18))
    assert resumed_rec.groups == full_rec.groups[6:]
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_accumulation_shifts_nothing() -> None:
    # 8 batches, 2 per optimizer step: 4 optimizer steps per epoch; milestone 1.5 epochs = step 6
    cb = GradualSchedule([1.5], factor=0.5, mode="lr", transition_steps=3)
    _, _, rec = fit([cb], spa(1.0, 0.5), accumulate_grad_batches=2, limit_train_batches=8, max_epochs=3)
    assert rec.steps == list(range(12))
    expected = [1.0] * 6 + [0.5 ** (1 / 3), 0.5 ** (2 / 3)] + [0.5] * 4
    assert rec.key("lr") == pytest.approx(expected, rel=1e-14)
    assert rec.key("c") == [0.5] * 12


def two_groups(kind: str) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    def make(params: Iterable[Any]) -> torch.optim.Optimizer:
        params = list(params)
        body, head = params[:-2], params[-2:]
        if kind == "spa":
            return SPA([{"params": body}, {"params": head, "lr": 10.0, "c": 0.2}], lr=1.0, c=0.1)
        return torch.optim.SGD([{"params": body}, {"params": head, "lr": 1.0, "momentum": 0.8}], lr=0.1, momentum=0.9)

    return make


@pytest.mark.parametrize("kind", ["spa", "sgd"])
def test_two_param_groups_keep_their_ratio(kind: str) -> None:
    cb = GradualSchedule([2], unit="step", transition_steps=T)
    _, _, rec = fit([cb], two_groups(kind), max_steps=2 + T + 1)
    # SPA terms: body (eta 1, c 0.1), head (eta 10, c 0.2) for both optimizers (SGD head: 1.0/(1-0.8) = 5.0)
    head_eta0 = 10.0 if kind == "spa" else 5.0
    for k in rec.steps:
        share = min(1.0, max(0.0, (k - 2 + 1) / T))
        if kind == "spa":
            assert rec.key("lr", 1)[k] / rec.key("lr", 0)[k] == pytest.approx(10.0, rel=1e-13)
            assert rec.key("c", 0)[k] == pytest.approx(min(1.0, 0.1 * 10**share), rel=1e-13)
            assert rec.key("c", 1)[k] == pytest.approx(min(1.0, 0.2 * 5**share), rel=1e-13)  # capped target 1
        else:  # alpha = c * eta is kept in paper mode: each group keeps its own lr
            assert rec.key("lr", 0)[k] == pytest.approx(0.1, rel=1e-13)
            assert rec.key("lr", 1)[k] == pytest.approx(0.2 * head_eta0 * 0.1**share * 5**share, rel=1e-13)


@pytest.mark.parametrize("order", ["gradual_first", "off_first"])
def test_both_callbacks_compose(order: str) -> None:
    gradual = GradualSchedule([2, 8], factor=0.5, mode="lr", transition="instant", unit="step")
    off = MomentumOff(after_epochs=5, transition_steps=2, unit="step")
    callbacks: list[pl.Callback] = [gradual, off] if order == "gradual_first" else [off, gradual]
    with pytest.warns(UserWarning, match="reaches 1 at optimizer step 2"):  # (1 - 0.5) * 0.1 / 0.05
        _, _, rec = fit(callbacks, sgd(0.05, 0.5), max_steps=10)  # eta0 = 0.1, c0 = 0.5
    etas = [0.1] * 2 + [0.05] * 6 + [0.025] * 2
    cs = [0.5] * 5 + [0.5 * 2**0.5, 1.0, 1.0, 1.0, 1.0]
    for k in range(10):
        eta_prev, c_prev = (etas[k - 1], cs[k - 1]) if k else (etas[0], cs[0])
        assert rec.key("lr")[k] == pytest.approx(cs[k] * etas[k], rel=1e-13)
        assert rec.key("momentum")[k] == pytest.approx((1 - c_prev) * eta_prev / etas[k], rel=1e-13, abs=1e-15)


def test_momentum_off_in_sgd_terms_keeps_the_effective_step() -> None:
    with pytest.warns(UserWarning, match=r"MomentumOff\(transition_steps=0\) switches momentum off at once"):
        off = MomentumOff(after_epochs=3, transition_steps=0, unit="step", guard=MomentumGuard(low=None, high=None))
        _, _, rec = fit([off], sgd(0.1, 0.9), max_steps=5)  # the formula (no idle check: steps 0-2 read c(2-c))
    assert rec.key("lr") == pytest.approx([0.1] * 3 + [1.0] * 2)  # lr / (1 - momentum)
    # Theorem 1: step 3 still carries (1 - c_2) * eta_2 / eta_3 = 0.9 of the old buffer, then 0 (Figure 1d)
    assert rec.key("momentum") == pytest.approx([0.9] * 4 + [0.0])


def test_warmup_in_sgd_terms() -> None:
    _, _, rec = fit([GradualSchedule([], warmup_steps=4, unit="step")], sgd(0.1, 0.9), max_steps=6)
    # eta_k = (k+1)/4 (eta0 = 1): lr = 0.1 * (k+1)/4; momentum = 0.9 * eta_{k-1}/eta_k = 0.9 * k/(k+1)
    assert rec.key("lr") == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rel=1e-13)
    assert rec.key("momentum") == pytest.approx([0.9, 0.45, 0.6, 0.675, 0.9, 0.9], rel=1e-13)


def test_epoch_milestones_and_default_transition_of_one_epoch() -> None:
    cb = GradualSchedule([0.5], factor=0.1, mode="lr")  # 10 steps per epoch: milestone step 5, T = 10
    _, _, rec = fit([cb], spa(1.0, 0.9), limit_train_batches=10, max_epochs=2)
    assert rec.key("lr") == pytest.approx([1.0] * 5 + [0.1 ** ((j + 1) / 10) for j in range(10)] + [0.1] * 5)


class TwoOptimizers(DigitsCNN):
    """Manual optimization with one SPA for the body and one for the head, each stepped once per batch."""

    def __init__(self) -> None:
        super().__init__(channels=4)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        body, head = self.optimizers()  # type: ignore[misc]
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        body.step()
        head.step()
        body.zero_grad()
        head.zero_grad()

    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        return [SPA(params[:-2], lr=1.0, c=0.5), SPA(params[-2:], lr=3.0, c=0.5)]


def test_two_optimizers_each_follow_their_own_step_count() -> None:
    seen: dict[int, list[float]] = {}

    class PerOptimizer(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            seen.setdefault(id(optimizer), []).append(optimizer.param_groups[0]["lr"])

    cb = GradualSchedule([2, 4], factor=0.5, mode="lr", transition="instant", unit="step")
    # The instant halvings are warned once per optimizer, by the schedule (at fit start) and by SPA (at the step):
    # the equivalent SGD momentum (1 - c) * eta_prev / eta = 0.5 * 2 = 1.
    instant = r"reaches 1 at optimizer step 2 \(param group 0 of optimizer {}, c0=0.5\)"
    with (
        pytest.warns(UserWarning, match=instant.format(0)),
        pytest.warns(UserWarning, match=instant.format(1)),
        pytest.warns(SPASpikeWarning, match=r"SPA step 2 \(counted from 0\), param group 0: eta fell to 0.5 "),
        pytest.warns(SPASpikeWarning, match=r"SPA step 2 \(counted from 0\), param group 0: eta fell to 1.5 "),
    ):
        fit([cb, PerOptimizer()], model=TwoOptimizers(), max_steps=10)  # global_step counts both: 5 batches
    body, head = seen.values()
    assert body == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert head == [3.0, 3.0, 1.5, 1.5, 0.75]


# ----- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (sgd(0.1, 0.9, nesterov=True), ValueError, "nesterov"),
        (sgd(0.1, 0.9, dampening=0.1), ValueError, "dampening"),
        (sgd(0.1, 0.0), ValueError, "momentum=0.0"),
        (lambda p: torch.optim.Adam(p), ValueError, "no optimizer to work on: optimizer 0 \\(Adam\\)"),
    ],
)
def test_unsupported_optimizers_are_refused(factory: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fit([MomentumOff(1, unit="step")], factory, max_steps=3)


class WithScheduler(DigitsCNN):
    def configure_optimizers(self) -> Any:
        opt = SPA(self.parameters(), lr=1.0, c=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


def test_lr_scheduler_on_the_same_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"StepLR .* mode='lr'"):
        fit([GradualSchedule([1])], model=WithScheduler(channels=4), max_steps=3)


class Meddler(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        trainer.optimizers[0].param_groups[0]["lr"] *= 0.5


def test_a_foreign_write_is_detected() -> None:
    with pytest.raises(RuntimeError, match="changed between optimizer steps"):
        fit([GradualSchedule([1], unit="step"), Meddler()], spa(), max_steps=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"milestones": [2, 1]}, "strictly increasing"),
        ({"milestones": [1], "factor": 0}, "factor"),
        ({"milestones": [1], "factor": 2}, "factor"),
        ({"milestones": [1.5], "unit": "step"}, "integers"),
        ({"milestones": [1], "transition": "instant", "transition_steps": 3}, "only used with"),
        ({"milestones": [1], "unit": "batch"}, "unit"),
        ({"milestones": [1], "warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_gradual_schedule_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradualSchedule(**kwargs)


def test_milestones_that_collide_in_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="not strictly increasing"):
        fit([GradualSchedule([1.0, 1.01], mode="lr", transition="instant")], spa(), limit_train_batches=4, max_epochs=2)


# ----- LightningCLI ------------------------------------------------------------------------------


def test_yaml_config_parses_and_fits(tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI

    args = ["fit", "--config", str(CONFIGS / "schedules.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    # The YAML's transition_steps: 0 is an instant switch, which the callback warns about on purpose.
    with pytest.warns(UserWarning, match=r"MomentumOff\(transition_steps=0\) switches momentum off at once"):
        cli = LightningCLI(DigitsCNN, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})
    gradual, off = [cb for cb in cli.trainer.callbacks if isinstance(cb, (GradualSchedule, MomentumOff))]
    assert isinstance(gradual, GradualSchedule) and gradual.milestones == [2.0] and gradual.transition_steps == 2
    assert isinstance(off, MomentumOff) and off.after_epochs == 6 and off.transition_steps == 0
    assert gradual.optimizers == [0] and off.optimizers == ["SPA"]
    assert cli.trainer.global_step == 8
    group = cli.trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(0.5) and group["c"] == 1.0


def test_cli_help_shows_the_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from pytorch_lightning.cli import LightningCLI

    with pytest.raises(SystemExit):
        LightningCLI(DigitsCNN, DigitsDataModule, args=["fit", "--trainer.callbacks.help", "GradualSchedule"])
    out = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "--trainer.callbacks.transition_steps" in out and "None: one epoch of optimizer steps" in out
    assert "--trainer.callbacks.mode {paper,lr}" in out
    assert "--trainer.callbacks.optimizers" in out and "(type: Optional[Sequence[int | str]], default: null)" in out


# ----- DDP (2 ranks, gloo): this file run as a script is the training program -------------------------


def _ddp_program(out: Path) -> None:
    """Trains under DDP and writes, per rank, the values every optimizer step used."""
    import json

    torch.set_num_threads(1)
    cbs = [GradualSchedule([1], mode="paper", transition_steps=4), MomentumOff(2.5, 2)]
    trainer, _, rec = fit(
        cbs, spa(1.0, 0.5), accelerator="cpu", devices=2, strategy="ddp", limit_train_batches=6, max_epochs=3
    )
    rank = trainer.global_rank
    clocks = [cb.state_dict()["clocks"] for cb in cbs]
    payload = {"steps": rec.steps, "groups": rec.groups, "batches": trainer.num_training_batches, "clocks": clocks}
    (out / f"rank{rank}.json").write_text(json.dumps(payload))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
def test_ddp_ranks_use_identical_values_without_collectives(tmp_path: Path) -> None:
    import json

    from multiprocess import run_script

    run_script([str(Path(__file__).resolve()), "ddp", str(tmp_path)], cwd=tmp_path, what="the DDP run")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["batches"] == 6 and ranks[0]["steps"] == list(range(18))
    assert ranks[0]["clocks"] == [{"0": {"steps": 18, "groups": [[1.0, 0.5, 0]]}}] * 2  # one clock, shared
    # 6 optimizer steps per epoch on each rank: milestone step 6 (T = 4), momentum off from step 15 (T = 2)
    etas = [1.0] * 6 + [0.1 ** ((j + 1) / 4) for j in range(4)] + [0.1] * 8
    cs = [0.5] * 6 + [0.5 * 2 ** ((j + 1) / 4) for j in range(4)] + [1.0] * 8
    got = [gs[0] for gs in ranks[0]["groups"]]
    assert [g["lr"] for g in got] == pytest.approx(etas, rel=1e-14)
    assert [g["c"] for g in got] == pytest.approx(cs, rel=1e-14)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp":
    from multiprocess import end_ranks

    _ddp_program(Path(sys.argv[2]))
    end_ranks()
