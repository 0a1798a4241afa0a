"""MeasuredMomentumOff: momentum off when the alignment ratio says so (issue 11).

Problems (``tests/measured_off_problem.py``): pure noise (ratio ~1, idle: decides at warm-up + patience
exactly), a deterministic quadratic (ratio ~(2-c)/c, accelerating: never decides), a quadratic with noise
(high ratio, then the noise level: a decision step that depends on the trajectory), and a noisy quadratic
at a step beyond plain SGD's limit (ratio 1 / (1 + (1-c) eta L / (2-c)) < 1, damping: never decides).
Float64, one parameter vector, one step per batch: seconds each.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from measured_off_problem import MIXED, Objective, loader
from multiprocess import run_script

from lightning_spa.callbacks.measured import MeasuredMomentumOff
from lightning_spa.callbacks.schedules import GradualSchedule
from lightning_spa.decision import DEFAULT_HIGH, DEFAULT_LOW, MomentumOffDecision
from lightning_spa.schedule import MomentumRemoval

ROOT = Path(__file__).resolve().parents[1]




class Record(pl.Callback):
    """The ``c`` (SPA) or ``momentum`` (torch SGD) each optimizer step used, read right before it."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.values.append(float(group["c"] if "c" in group else group["momentum"]))


def fit(
    model: pl.LightningModule, callbacks: list[pl.Callback], steps: int, ckpt: str | None = None, **trainer: Any
) -> pl.Trainer:
    t = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **{"logger": False, **trainer},
    )  # fmt: skip
    t.fit(model, loader(400), ckpt_path=ckpt)
    return t


def expected_c(c0: float, start: int | None, length: int, steps: range) -> list[float]:
    if start is None:
        return [c0 for _ in steps]
    removal = MomentumRemoval(start, length)
    return [1.0 if (v := removal.c_value(k, c0)) >= 1.0 - 1e-12 else v for k in steps]


# ----- the rule on real measurements -----------------------------------------------------------------


@pytest.mark.parametrize(("warmup", "patience"), [(10, 15), (25, 0)])
def test_pure_noise_switches_off_after_warmup_plus_patience(warmup: int, patience: int) -> None:
    callback = MeasuredMomentumOff(warmup=warmup, patience=patience, unit="step", transition_steps=12, log_ratio=True)
    record = Record()
    fit(Objective(h=0.0), [callback, record], steps=80)
    decided = warmup + patience  # the noise ratio (1 +- a few %) is inside [0.9, 1.25] at every measured step
    assert callback.decided_steps == {0: decided}
    # c0 until the decision's step, then MomentumOff's geometric transition over 12 steps from the next one
    assert record.values == pytest.approx(expected_c(0.2, decided + 1, 12, range(80)), rel=1e-12)
    assert record.values[decided] == 0.2 and record.values[decided + 12] == 1.0


def test_deterministic_quadratic_never_switches() -> None:
    callback = MeasuredMomentumOff(warmup=5, patience=5, unit="step", transition_steps=10)
    ratios: list[float] = []
    record = Record()
    model = Objective(dim=50, h=1.0, noise=0.0, eta=0.01, c=0.1)
    fit(model, [callback, record, _RatioTap(callback, ratios)], steps=150)
    assert callback.decided_steps == {0: None}
    assert record.values == [0.1] * 150
    # Overdamped (eta * h = 0.01), so ||g|| only shrinks along the path. The first measured step (k = 5)
    # carries at least the constant-gradient share of momentum, x_{k+1} - x_k = -eta (1 - (1-c)^(k+1)) g,
    # i.e. a ratio >= (1 - 0.9^6)^2 (2 - c) / c = 4.18; later, with g shrinking by q = 1 - eta h a step,
    # x_{k+1} - x_k -> -eta g c / (1 - (1-c)/q): the ratio tends to (2-c)/c * (c / (1 - (1-c)/q))^2 = 23.0.
    assert len(ratios) == 145
    assert min(ratios) == ratios[0] >= (1 - 0.9**6) ** 2 * 19
    assert ratios[-1] == pytest.approx(19 * (0.1 / (1 - 0.9 / 0.99)) ** 2, rel=0.02)


class _RatioTap(pl.Callback):
    """Collects the smoothed ratio the decision reads, through the meters' listeners."""

    def __init__(self, callback: MeasuredMomentumOff, out: list[float]) -> None:
        self.callback, self.out = callback, out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for meter in self.callback._meters.values():
            meter.listeners.append(lambda r: self.out.append(r.ratio))


def test_decision_equals_the_rule_on_the_shared_measurement() -> None:
    """The callback's decision is MomentumOffDecision applied to MomentumMeter's ratio from the warm-up on."""
    ratios: list[float] = []
    callback = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=8)
    fit(Objective(**MIXED), [callback, _RatioTap(callback, ratios)], steps=150)  # type: ignore[arg-type]
    decided = callback.decided_steps[0]
    assert decided is not None and 25 < decided < 150  # the mixed problem needs the ratio to fall first
    rule = MomentumOffDecision(warmup_steps=10, patience_steps=15)
    steps = range(10, 10 + len(ratios))
    assert [rule.observe(k, r) for k, r in zip(steps, ratios, strict=True)].index(True) + 10 == decided
    assert ratios[0] > DEFAULT_HIGH  # accelerating while W is far from the target
    assert DEFAULT_LOW <= ratios[-1] <= DEFAULT_HIGH  # idle at the decision


def test_torch_sgd_and_spa_decide_at_the_same_step() -> None:
    results = {}
    for name in ("spa", "sgd"):
        callback = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=8)
        model = Objective(**{**MIXED, "optimizer": name})  # type: ignore[arg-type]
        fit(model, [callback], steps=150)
        results[name] = (callback.decided_steps[0], model.w.detach().clone())
    assert results["spa"][0] == results["sgd"][0] is not None
    torch.testing.assert_close(results["sgd"][1], results["spa"][1], rtol=1e-9, atol=1e-9)


def test_alongside_momentum_diagnostics(tmp_path: Path) -> None:
    """MomentumDiagnostics on the same optimizer (its own meter and EMA, from step 0) changes nothing here."""
    from pytorch_lightning.loggers import CSVLogger

    from lightning_spa.callbacks.diagnostics import MomentumDiagnostics

    measured = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=12)
    diagnostics = MomentumDiagnostics(every_n_steps=5, ema_decay=0.95)
    record = Record()
    fit(Objective(h=0.0), [diagnostics, measured, record], steps=60, logger=CSVLogger(tmp_path, name="", version=0))
    assert measured.decided_steps == {0: 25}
    assert record.values == pytest.approx(expected_c(0.2, 26, 12, range(60)), rel=1e-12)


# ----- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("problem", "cut", "same_instance"),
    [("noise", 18, False), ("noise", 30, False), ("mixed", 60, True), ("mixed", 60, False), ("mixed", 125, False)],
    ids=["noise-before", "noise-inside-transition", "mixed-before-same-instance", "mixed-before", "mixed-inside"],
)
# Every batch is the same zeros (the objective draws its own noise per step): where the loader restarts does not matter.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended:UserWarning")
def test_decision_survives_a_resume(tmp_path: Path, problem: str, cut: int, same_instance: bool) -> None:
    """Noise: the open window is restored (lost, it would reopen at the cut and decide later). Mixed: the EMA is
    restored too (restarted at the cut, the ratio and the decision would differ)."""
    kwargs: dict[str, Any] = {"h": 0.0, "dim": 1000} if problem == "noise" else MIXED
    steps = 60 if problem == "noise" else 150

    def make() -> tuple[MeasuredMomentumOff, Record]:
        return MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=12), Record()

    callback, record = make()
    reference = Objective(**kwargs)
    fit(reference, [callback, record], steps=steps)
    decided = callback.decided_steps[0]
    assert decided is not None
    if problem == "noise":
        assert decided == 25
    first_cb, first_rec = make()
    first = Objective(**kwargs)
    trainer = fit(first, [first_cb, first_rec], steps=cut)
    assert first_cb.decided_steps == {0: None if cut <= decided else decided}
    path = str(tmp_path / "cut.ckpt")
    trainer.save_checkpoint(path)
    resumed_cb, resumed_rec = (first_cb, Record()) if same_instance else make()
    resumed = Objective(**kwargs)
    fit(resumed, [resumed_cb, resumed_rec], steps=steps, ckpt=path)
    assert resumed_cb.decided_steps == {0: decided}
    assert first_rec.values + resumed_rec.values == record.values  # bit-exact, transition included
    assert torch.equal(resumed.w, reference.w)


# ----- several optimizers, composition ----------------------------------------------------------------


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: optimizer 0 on pure noise, optimizer 1 on a deterministic quadratic."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(2000, generator=gen, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(50, generator=gen, dtype=torch.float64))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        xi = torch.randn(2000, generator=torch.Generator().manual_seed(batch_idx), dtype=torch.float64)
        for opt, loss in ((opt_a, (self.a * xi).sum()), (opt_b, 0.5 * self.b.square().sum())):
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        from lightning_spa import SPA

        return [SPA([self.a], lr=0.1, c=0.2), SPA([self.b], lr=0.01, c=0.1)]


def test_each_optimizer_decides_on_its_own_measurement() -> None:
    callback = MeasuredMomentumOff(warmup=10, patience=5, unit="step", transition_steps=4)
    model = TwoOptimizers()
    trainer = fit(model, [callback], steps=2 * 60)  # global_step counts both optimizers' steps
    assert callback.decided_steps == {0: 15, 1: None}  # each on its own clock: 60 steps each
    assert trainer.optimizers[0].param_groups[0]["c"] == 1.0
    assert trainer.optimizers[1].param_groups[0]["c"] == 0.1


@pytest.mark.parametrize("order", ["measured-first", "gradual-first"])
def test_composes_with_gradual_schedule_in_any_order(order: str) -> None:
    measured = MeasuredMomentumOff(warmup=10, patience=5, unit="step", transition_steps=4)
    gradual = GradualSchedule(milestones=[40], factor=0.5, mode="lr", transition_steps=5, unit="step")
    record = Record()
    callbacks = [measured, gradual] if order == "measured-first" else [gradual, measured]
    fit(Objective(h=0.0), [*callbacks, record], steps=60)
    assert measured.decided_steps == {0: 15}
    assert record.values == pytest.approx(expected_c(0.2, 16, 4, range(60)), rel=1e-12)


def test_unified_lightning_package() -> None:
    """The same callback object works under ``lightning.pytorch`` (pure noise: decides at warm-up + patience)."""
    L = pytest.importorskip("lightning.pytorch")

    class Noise(L.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2000, dtype=torch.float64))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(batch_idx)
            return (self.w * torch.randn(2000, generator=g, dtype=torch.float64)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([self.w], lr=0.02, momentum=0.8)

    callback = MeasuredMomentumOff(warmup=5, patience=7, unit="step", transition_steps=3)
    trainer = L.Trainer(accelerator="cpu", max_steps=20, logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(Noise(), loader(40))
    assert callback.decided_steps == {0: 12}
    group = trainer.optimizers[0].param_groups[0]
    assert group["momentum"] == 0.0 and group["lr"] == pytest.approx(0.1)  # c = 1: lr / (1 - momentum), momentum 0


# ----- arguments, logging ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 0}, "`threshold` must be finite and > 0"),
        ({"threshold": "1.1"}, "`threshold` must be a number"),
        ({"threshold": 1.1, "high": 1.3}, "give `high` only"),
        ({"low": 1.2}, "`low` must be <= 1"),
        ({"high": 0.9}, "`high` must be >= 1"),
        ({"low": -0.1}, "`low` must be finite and > 0"),
        ({"warmup": -1}, "`warmup` must be a finite number >= 0"),
        ({"patience": math.nan}, "`patience` must be a finite number >= 0"),
        ({"warmup": 2.5, "unit": "step"}, r"`warmup` in optimizer steps \(unit='step'\) must be an integer"),
        ({"unit": "epochs"}, "`unit` must be 'epoch' or 'step'"),
        ({"transition_steps": -2}, "`transition_steps` must be None"),
        ({"every_n_steps": 0}, "`every_n_steps` must be an integer >= 1"),
        ({"ema_decay": 1.0}, r"`ema_decay` must be a float in \[0, 1\)"),
        ({"log_ratio": "yes"}, "`log_ratio` must be a bool"),
        ({"optimizers": []}, "`optimizers` must be None"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MeasuredMomentumOff(**kwargs)


def test_instant_switch_warns() -> None:
    with pytest.warns(UserWarning, match="switches momentum off at once"):
        fit(Objective(h=0.0, dim=100), [MeasuredMomentumOff(warmup=2, patience=2, unit="step", transition_steps=0)],
            steps=3)  # fmt: skip


def test_damping_never_switches_and_warns_once() -> None:
    """Noisy quadratic, h = 8, eta = 0.5, c = 0.2: eta h = 4 is stable with momentum (< 2 (2-c)/c = 18), not
    without (> 2). Heavy ball's stationary ratio is 1 / (1 + (1-c) eta h / (2-c)) = 0.36 < low: momentum damps,
    so it is kept, with one warning once the ratio has been below ``low`` for the patience (step 10 + 15)."""
    callback = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=8)
    ratios: list[float] = []
    record = Record()
    with pytest.warns(UserWarning, match=r"keeps momentum.*below 0.9 since step 10.*momentum damps") as caught:
        fit(Objective(dim=2000, h=8.0, noise=1.0, eta=0.5, c=0.2), [callback, record, _RatioTap(callback, ratios)],
            steps=120)  # fmt: skip
    assert sum("keeps momentum" in str(w.message) for w in caught) == 1
    assert callback.decided_steps == {0: None} and callback.decisions[0].damping_step == 25
    assert record.values == [0.2] * 120
    expected = 1 / (1 + (1 - 0.2) * 0.5 * 8.0 / (2 - 0.2))
    assert expected == pytest.approx(0.36)
    assert sum(ratios[-50:]) / 50 == pytest.approx(expected, rel=0.05)


def test_after_damping_switches_only_once_eta_has_fallen() -> None:
    """Damping at eta h = 4 (ratio 0.36), then eta cut 20x from step 60 (over 15 steps): eta h = 0.2, stationary ratio
    1 / (1 + 0.8 * 0.2 / 1.8) = 0.918, idle. The switch waits for that: not before eta <= 0.5 * 0.5, and only once
    the EMA has forgotten the damping phase (its old terms are 400x larger, so that takes ~120 steps)."""
    callback = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=8)
    gradual = GradualSchedule(milestones=[60], factor=0.05, mode="lr", transition_steps=15, unit="step")
    ratios: list[float] = []
    record = Record()
    with pytest.warns(UserWarning, match="keeps momentum"):
        fit(Objective(dim=2000, h=8.0, noise=1.0, eta=0.5, c=0.2), [gradual, callback, record,
            _RatioTap(callback, ratios)], steps=300)  # fmt: skip
    decided = callback.decided_steps[0]
    assert decided is not None and decided >= 60 + 15
    assert record.values[: decided + 1] == [0.2] * (decided + 1) and record.values[-1] == 1.0
    expected = 1 / (1 + (1 - 0.2) * 0.5 * 0.05 * 8.0 / (2 - 0.2))
    assert expected == pytest.approx(0.918, abs=1e-3)
    assert ratios[-1] == pytest.approx(expected, rel=0.05)  # the reading at the decision
    assert max(ratios[:50]) < DEFAULT_LOW  # damping at the full step


def test_a_band_widened_below_the_oscillation_level_decides_and_warns() -> None:
    """eta h = 1.6: ratio 1 / (1 + 0.8 * 1.6 / 1.8) = 0.584; with ``low=0.5`` that reads idle, and the decision
    taken below 0.9 warns that momentum was damping."""
    callback = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=8, low=0.5)
    with pytest.warns(UserWarning, match=r"ratio at 0\.[5-7].*low=0.5.*momentum was damping"):
        fit(Objective(dim=2000, h=8.0, noise=1.0, eta=0.2, c=0.2), [callback], steps=40)
    decided = callback.decided_steps[0]
    assert decided is not None and 25 <= decided < 40  # W + P, or a little later: the start (W = T + noise) settles


def test_threshold_is_deprecated_and_becomes_high() -> None:
    with pytest.warns(FutureWarning, match=r"MeasuredMomentumOff\(threshold=...\) is deprecated.*high=1.1"):
        callback = MeasuredMomentumOff(threshold=1.1, warmup=10, patience=15, unit="step", transition_steps=8)
    assert (callback.low, callback.high) == (DEFAULT_LOW, 1.1)
    with pytest.warns(UserWarning, match="keeps momentum"):  # damping (ratio 0.36): the old rule switched at 25
        fit(Objective(dim=2000, h=8.0, noise=1.0, eta=0.5, c=0.2), [callback], steps=40)
    assert callback.decided_steps == {0: None}


def test_logs_the_decision_and_one_console_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pytorch_lightning.loggers import CSVLogger

    callback = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=12, log_ratio=True)
    with caplog.at_level("INFO"):
        trainer = fit(Objective(h=0.0, dim=1000), [callback], steps=40, logger=CSVLogger(tmp_path, name="", version=0))
    assert float(trainer.callback_metrics["spa/momentum_off_step"]) == 26.0
    lines = [r.getMessage() for r in caplog.records if "MeasuredMomentumOff" in r.getMessage()]
    assert len(lines) == 1 and "momentum off from optimizer step 26" in lines[0]
    rows = (tmp_path / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col_off, col_ratio, col_step = (
        header.index("spa/momentum_off_step"),
        header.index("spa/off_ratio"),
        header.index("step"),
    )
    offs = [(int(r.split(",")[col_step]), r.split(",")[col_off]) for r in rows[1:] if r.split(",")[col_off]]
    assert offs == [(25, "26.0")]
    ratio_steps = sorted({int(r.split(",")[col_step]) for r in rows[1:] if r.split(",")[col_ratio]})
    assert ratio_steps == list(range(10, 26))  # measured from the warm-up to the decision, then no more


# ----- DDP ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_rank_ddp_and_fsdp2_decide_at_the_same_step_as_one_process(tmp_path: Path) -> None:
    script = Path(__file__).with_name("measured_off_problem.py")
    results = {}
    for mode in ("single", "ddp", "fsdp"):
        run_script([str(script), mode, str(tmp_path / mode)], cwd=tmp_path, what=f"the {mode} run",
                   extra_env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        results[mode] = [json.loads((tmp_path / mode / f"rank{r}.json").read_text())
                         for r in range(1 if mode == "single" else 2)]  # fmt: skip
    single = results["single"][0]
    assert single["decided"] is not None and 25 < single["decided"] < 150
    assert all(rank["sharded"] for rank in results["fsdp"])  # W really was a sharded DTensor
    for rank in results["ddp"] + results["fsdp"]:
        assert rank["decided"] == single["decided"]
        assert rank["cs"] == single["cs"]
        assert rank["w_sum"] == pytest.approx(single["w_sum"], rel=1e-12)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_momentum_off_guard_on_two_rank_ddp_and_fsdp2_matches_one_process(tmp_path: Path) -> None:
    """MomentumOff's guard (its ratio meter before the removal, its ||g||^2 watch after) on the same problem: every
    rank's guard state, c sequence and result equal one process's; under FSDP2 the guard knows W is sharded."""
    script = Path(__file__).with_name("measured_off_problem.py")
    results = {}
    for mode in ("single", "ddp", "fsdp"):
        run_script([str(script), mode, str(tmp_path / mode), "off"], cwd=tmp_path, what=f"the {mode} run",
                   extra_env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        results[mode] = [json.loads((tmp_path / mode / f"rank{r}.json").read_text())
                         for r in range(1 if mode == "single" else 2)]  # fmt: skip
    single = results["single"][0]
    assert single["guard"]["episodes"][0][0] == 40 and single["guard"]["start_ratio"] is not None
    assert [rank["guard_sharded"] for rank in results["fsdp"]] == [True, True]
    for rank in results["ddp"] + results["fsdp"]:
        assert rank["guard"]["episodes"] == single["guard"]["episodes"]
        assert rank["guard"]["start_ratio"] == pytest.approx(single["guard"]["start_ratio"], rel=1e-9)
        assert rank["cs"] == single["cs"]
        assert rank["w_sum"] == pytest.approx(single["w_sum"], rel=1e-12)


# ----- the reproduction script ------------------------------------------------------------------------


def test_reproduction_script_smoke(tmp_path: Path) -> None:
    """A shortened run of examples/reproduce/measured_off.py: a PNG and a table with one row per arm."""
    pytest.importorskip("matplotlib")
    import importlib

    sys.path.insert(0, str(ROOT / "examples" / "reproduce"))
    table = importlib.import_module("measured_off").main(["--epochs", "3", "--seeds", "1", "--out", str(tmp_path)])
    assert (tmp_path / "measured_off.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "measured_off.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # header + three arms
    # MomentumOff(after_epochs=1): the switch is planned at step 23; at SPA eta 1 the ratio there reads aligned
    # (momentum accelerates, not idle), so its guard postpones it and c never reaches 1 in these 3 epochs
    assert rows[2].split(" | ")[5:7] == ["23", "never"]


def test_setups_study_smoke(tmp_path: Path) -> None:
    """A shortened run of examples/reproduce/momentum_off_setups.py: the table, the replay, the PNG."""
    pytest.importorskip("matplotlib")
    import importlib

    sys.path.insert(0, str(ROOT / "examples" / "reproduce"))
    args = ["--epochs", "4", "--seeds", "1", "--setups", "digits-eta1", "--out", str(tmp_path)]
    table = importlib.import_module("momentum_off_setups").main(args)
    assert (tmp_path / "momentum_off_setups.md").read_text() == table
    assert (tmp_path / "momentum_off_setups.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| digits-eta1 | ")]
    assert [r[1] for r in rows[:3]] == ["momentum throughout", "MomentumOff()", "MeasuredMomentumOff()"]
    # MomentumOff(): planned after epoch 1 (23 steps); the ratio is not idle there, so the guard postpones it (an
    # abort at 23) and retries after the cuts of eta
    assert rows[1][6].startswith("23,") and rows[1][7].split(",")[0] == "23"
    assert len(rows) == 3 + 3 + 1  # three arms, three phases of the ratio, one replay row


def test_sampling_study_smoke(tmp_path: Path) -> None:
    """A shortened run of examples/reproduce/measured_off_sampling.py: one row per (EMA start, sampling rate)."""
    import importlib

    sys.path.insert(0, str(ROOT / "examples" / "reproduce"))
    args = ["--epochs", "4", "--seeds", "1", "--every", "1", "3", "--out", str(tmp_path)]
    table = importlib.import_module("measured_off_sampling").main(args)
    assert (tmp_path / "measured_off_sampling.md").read_text() == table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 2 * 2


class _JoinAndSkip(Objective):
    """Pure noise; a second parameter joins as a param group at batch 5, and batch 3's optimizer step is skipped."""

    def __init__(self) -> None:
        super().__init__(h=0.0)
        self.v = torch.nn.Parameter(torch.zeros(500, dtype=torch.float64), requires_grad=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        xi = torch.randn(self.v.shape, generator=torch.Generator().manual_seed(7 + batch_idx), dtype=torch.float64)
        return super().training_step(batch, batch_idx) + (self.v * xi).sum()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 5:
            self.v.requires_grad_(True)
            self.trainer.optimizers[0].add_param_group({"params": [self.v]})

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer_closure()
        if batch_idx != 3:  # batch 3: no step is taken, so no clock tick
            optimizer.step()


def test_decision_counts_steps_taken_and_covers_a_group_that_joined() -> None:
    """A skipped step does not count towards warm-up + patience, and a param group that joined before the
    decision goes to c = 1 with the others."""
    callback = MeasuredMomentumOff(warmup=10, patience=15, unit="step", transition_steps=12)
    record = Record()
    model = _JoinAndSkip()
    trainer = fit(model, [callback, record], steps=60)  # 60 batches, one of them without a step
    assert trainer.global_step == 60  # Lightning counts the skipped step; the clocks do not
    assert callback.decided_steps == {0: 25}  # optimizer steps taken, not batches
    assert record.values == pytest.approx(expected_c(0.2, 26, 12, range(59)), rel=1e-12)
    assert [group["c"] for group in trainer.optimizers[0].param_groups] == [1.0, 1.0]
