"""MomentumDiagnostics: the measurement math against explicit tensors, and the callback end to end
(values read back from TensorBoard event files)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA, MomentumDiagnostics
from lightning_spa.diagnostics import (
    cheap_samples,
    cheap_supported,
    cosine_of,
    full_samples,
    group_hyper,
    measure_after_step,
    measure_before_step,
    measure_cheap,
    read_sums,
)
from lightning_spa.meter import DiagnosticsEMA
from lightning_spa.optim import SPASpikeWarning

CPU = torch.device("cpu")

# ----------------------------------------------------------------------------- pure math


def _explicit(opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """g_k (as the optimizer uses it) and m_k (zero without history), per parameter, in float64."""
    gs, ms = [], []
    for group in opt.param_groups:
        sign = -1.0 if group["maximize"] else 1.0
        for p in group["params"]:
            gs.append((sign * p.grad + group["weight_decay"] * p.detach()).double())
            state = opt.state.get(p, {})
            history = opt.momentum_history(p) is not None if isinstance(opt, SPA) else "momentum_buffer" in state
            zero = torch.zeros_like(p, dtype=torch.float64)
            ms.append(state["momentum_buffer"].double().clone() if history else zero)
    return gs, ms


def _make(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "spa":
        return SPA(params, lr=0.5, c=0.2)
    if kind == "spa_wd_max":
        return SPA(params, lr=0.5, c=0.2, weight_decay=0.3, maximize=True)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if kind == "sgd_wd_max":
        return torch.optim.SGD(params, lr=0.1, momentum=0.8, weight_decay=0.2, maximize=True)
    return torch.optim.SGD(params, lr=0.1)  # "sgd_plain": no momentum, m_{k+1} = g_k


def measure_both(opt: torch.optim.Optimizer) -> tuple[list[list[float]], list[list[float]] | None]:
    """Takes one step of ``opt`` measured both ways: the full rows and the cheap ones (None where the
    cheap measurement does not apply)."""
    first, cheap = measure_before_step(opt, CPU), cheap_supported(opt)
    opt.step()
    hypers = [group_hyper(opt, g) for g in opt.param_groups]
    (before, after), scales = read_sums([first.sums, measure_after_step(opt, CPU)], False, first.tensor_scales)
    full = full_samples(first, before, after, hypers, None, scales)
    if not cheap:
        return full, None
    return full, cheap_samples(read_sums([measure_cheap(opt, CPU)], False)[0][0], hypers)


@pytest.mark.parametrize("kind", ["spa", "spa_wd_max", "sgd", "sgd_wd_max", "sgd_plain"])
def test_measurement_matches_explicit_vectors(kind: str) -> None:
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(20))
    opt = _make(kind, [w, b])
    cheap_steps = 0
    for k in range(5):
        if kind == "spa" and k == 2:
            opt.param_groups[0]["lr"] = 0.1  # eta changes: beta_k = (1-c) eta_{k-1} / eta_k = 4
        if kind == "spa" and k == 3:
            opt.param_groups[0]["c"] = 1.0  # momentum still folded in this step, gone the next
        opt.zero_grad()
        ((w**2).sum() + (w * torch.randn(30, 20)).sum() + (b * torch.randn(20)).sum()).backward()
        x0 = [p.detach().double().clone() for p in (w, b)]
        gs, ms = _explicit(opt)
        if kind == "spa" and k == 2:
            with pytest.warns(SPASpikeWarning, match="momentum .* of 4 >= 1"):
                samples, cheap = measure_both(opt)
        else:
            samples, cheap = measure_both(opt)
        h = group_hyper(opt, opt.param_groups[0])
        step_sq = sum(float((p.detach().double() - x).square().sum()) for p, x in zip((w, b), x0, strict=True))
        g_sq = sum(float(g.square().sum()) for g in gs)
        m_sq = sum(float(m.square().sum()) for m in ms)
        for rows in (samples, cheap) if cheap is not None else (samples,):
            assert rows[-1][0] == pytest.approx(step_sq, rel=1e-5)
            assert rows[-1][1] == pytest.approx(h.eta**2 * g_sq, rel=1e-5)
            assert rows[-1][2] == pytest.approx(h.c / (2 - h.c) * h.eta**2 * g_sq, rel=1e-5)
        cheap_steps += cheap is not None
        assert cheap is None or cosine_of(cheap[-1]) is None  # the cheap measurement has no cosine
        cos = cosine_of(samples[-1])
        if m_sq == 0.0:
            assert cos is None
        else:
            g_m = sum(float((g * m).sum()) for g, m in zip(gs, ms, strict=True))
            assert cos == pytest.approx(g_m / math.sqrt(g_sq * m_sq), abs=1e-5)
    # every step but SPA's c = 1 steps and torch SGD at momentum 0 (no buffer describes the step)
    assert cheap_steps == {"spa": 3, "sgd_plain": 0}.get(kind, 5)


def test_hyperparameters_in_both_forms() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    spa = SPA([p], lr=2.0, c=0.25)
    h0 = group_hyper(spa, spa.param_groups[0])
    assert (h0.eta, h0.c, h0.lr, h0.momentum) == (2.0, 0.25, 0.5, 0.75)  # beta_0 reported as 1 - c_0
    p.grad = torch.ones(3)
    spa.step()
    spa.param_groups[0]["lr"] = 1.0
    h1 = group_hyper(spa, spa.param_groups[0], prev=(2.0, 0.25))
    assert h1.momentum == pytest.approx((1 - 0.25) * 2.0 / 1.0)  # Theorem 1: (1 - c_{k-1}) eta_{k-1} / eta_k
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    hs = group_hyper(sgd, sgd.param_groups[0])
    assert hs.eta == pytest.approx(1.0) and hs.c == pytest.approx(0.1) and (hs.lr, hs.momentum) == (0.1, 0.9)


def test_ema_bias_correction_gaps_and_nonfinite() -> None:
    ema = DiagnosticsEMA(1, decay=0.9)

    def sample(step_sq: float, grad_sq: float) -> torch.Tensor:  # cosine 1/2 via <g,m>=1, |g|^2=|m|^2=2
        return torch.tensor([[step_sq, grad_sq, grad_sq / 3, 1.0, 2.0, 2.0]], dtype=torch.float64)

    assert bool(ema.update(sample(4.0, 6.0), step=0, default_gap=5))
    first = ema.corrected()[0]
    assert first.tolist() == pytest.approx([4.0, 6.0, 2.0, 0.5, 2.0])  # the first value is the first sample
    ema.update(sample(1.0, 3.0), step=5)  # a sample 5 steps later weighs 1 - 0.9**5 against 0.9**5 (1 - 0.9**5)
    w_new, w_old = 1 - 0.9**5, 0.9**5 * (1 - 0.9**5)
    expected = (w_old * 4.0 + w_new * 1.0) / (w_old + w_new)
    assert ema.corrected()[0, 0].item() == pytest.approx(expected)
    before = ema.corrected().clone()
    assert not bool(ema.update(sample(float("nan"), 3.0), step=6))  # not folded in
    assert torch.equal(ema.corrected(), before) and ema.last_step == 5
    state = ema.state_dict()
    other = DiagnosticsEMA(1, decay=0.9)
    other.load_state_dict(state)
    assert torch.equal(other.corrected(), before) and other.last_step == 5
    # The rejected step spent no weight: a sample at step 7 weighs for steps 6 and 7 (1 - 0.9**2).
    other.update(sample(2.0, 3.0), step=7)
    w_new, w_old = 1 - 0.9**2, 0.9**2 * (w_old + w_new)
    expected_7 = (w_old * expected + w_new * 2.0) / (w_old + w_new)
    assert other.corrected()[0, 0].item() == pytest.approx(expected_7)


# ----------------------------------------------------------------------------- callback


class NoiseOrQuadratic(pl.LightningModule):
    """Loss ``<w, noise_k>`` (gradient independent of ``w``) or ``0.5 ||w||^2`` (deterministic); the noise
    is seeded by the step so that runs can be compared step by step."""

    def __init__(self, optimizer: str = "spa", objective: str = "noise", dim: int = 4096) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((dim,), 3.0))
        self.optimizer_name, self.objective = optimizer, objective

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.objective == "quadratic":
            return 0.5 * self.w.square().sum()
        noise = torch.randn(self.w.shape, generator=torch.Generator().manual_seed(self.global_step))
        return (self.w * noise).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "spa":
            return SPA(self.parameters(), lr=1.0, c=0.1)
        if self.optimizer_name == "spa_small":
            return SPA(self.parameters(), lr=0.01, c=0.1)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(
    tmp_path: Path,
    model: pl.LightningModule,
    steps: int,
    callback: MomentumDiagnostics,
    name: str = "run",
    ckpt_path: str | None = None,
    before: tuple[pl.Callback, ...] = (),
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, dict[str, dict[int, float]]]:
    """Fits ``model`` for ``steps`` steps with ``before`` (e.g. schedules) and then ``callback``."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(tmp_path, name=name, version=0),
        callbacks=[*before, callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **{"log_every_n_steps": 1, **trainer_kwargs},  # runs shorter than Lightning's default interval of 50
    )
    n_batches = steps * trainer_kwargs.get("accumulate_grad_batches", 1)
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(n_batches, 1)), batch_size=1), ckpt_path=ckpt_path)
    return trainer, read_scalars(tmp_path / name / "version_0")


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_layout_charts(run_dir: Path) -> dict[str, list[str]]:
    """The TensorBoard custom-scalars layout of a run: ``{chart title: its multiline tags}``."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(acc.Tensors("custom_scalars__config__")[0].tensor_proto).item())
    return {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}


@pytest.mark.parametrize("optimizer", ["spa", "sgd"])
def test_pure_noise_gives_ratio_one_and_cosine_zero(tmp_path: Path, optimizer: str) -> None:
    _, s = _fit(tmp_path, NoiseOrQuadratic(optimizer), 400, MomentumDiagnostics(every_n_steps=1))
    c = 0.1
    assert s["spa/ratio"][0] == pytest.approx(c * (2 - c), rel=1e-5)  # first step: no momentum yet
    assert abs(s["spa/ratio"][399] - 1.0) < 0.15
    assert abs(s["spa/cosine"][399]) < 0.1
    assert 0 not in s["spa/cosine"]  # undefined without a momentum buffer: not logged
    assert s["spa/eta"][399] == pytest.approx(1.0) and s["spa/c"][399] == pytest.approx(c)
    assert s["spa/lr"][399] == pytest.approx(0.1) and s["spa/momentum"][399] == pytest.approx(0.9)
    assert s["spa/one"][399] == 1.0
    scaled, grad = s["spa/grad_sq_scaled"][399], s["spa/grad_sq"][399]
    assert scaled == pytest.approx(c / (2 - c) * grad, rel=1e-5)
    assert s["spa/ratio"][399] == pytest.approx(s["spa/step_sq"][399] / scaled, rel=1e-5)


def test_deterministic_quadratic_small_step_ratio_far_above_one(tmp_path: Path) -> None:
    # g_k = x_k and the step is small: m accumulates ~ g / (1 - beta), so step_sq ~ eta^2 |g|^2
    # against the noise level c/(2-c) eta^2 |g|^2: ratio -> (2 - c) / c = 19.
    _, s = _fit(tmp_path, NoiseOrQuadratic("spa_small", "quadratic", dim=64), 100, MomentumDiagnostics(every_n_steps=1))
    assert s["spa/ratio"][99] > 5.0
    assert s["spa/cosine"][99] > 0.9


def test_default_follows_log_every_n_steps_and_sampled_ema(tmp_path: Path) -> None:
    model = NoiseOrQuadratic("sgd", dim=256)
    _, raw = _fit(tmp_path, model, 40, MomentumDiagnostics(every_n_steps=1, ema_decay=0.0), name="raw")

    class Logging(NoiseOrQuadratic):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    _, s = _fit(
        tmp_path, Logging("sgd", dim=256), 40, MomentumDiagnostics(ema_decay=0.9), name="s", log_every_n_steps=10
    )
    assert sorted(s["spa/step_sq"]) == [9, 19, 29, 39]  # Lightning's logging steps: (k + 1) % 10 == 0
    assert sorted(s["train_loss"]) == sorted(s["spa/step_sq"])
    # Bias-corrected EMA of the raw samples at 9, 19, 29, 39 with per-step decay 0.9: each weighs 1 - 0.9**10.
    num = den = 0.0
    for k in (9, 19, 29, 39):
        num = 0.9**10 * num + (1 - 0.9**10) * raw["spa/step_sq"][k]
        den = 0.9**10 * den + (1 - 0.9**10)
        assert s["spa/step_sq"][k] == pytest.approx(num / den, rel=1e-5)


def test_per_group_names_and_other_optimizers(tmp_path: Path) -> None:
    class TwoGroups(NoiseOrQuadratic):
        def __init__(self) -> None:
            super().__init__("spa", dim=16)
            self.v = torch.nn.Parameter(torch.ones(8))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx) + 0.5 * self.v.square().sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return SPA([{"params": [self.w], "name": "head"}, {"params": [self.v], "c": 0.5}], lr=0.1, c=0.1)

    _, s = _fit(tmp_path, TwoGroups(), 5, MomentumDiagnostics(every_n_steps=1, per_group=True))
    for name in ("step_sq", "grad_sq", "grad_sq_scaled", "ratio", "eta", "c", "lr", "momentum"):
        assert {f"spa/{name}", f"spa/{name}/head", f"spa/{name}/1"} <= s.keys()
    assert s["spa/c/1"][4] == pytest.approx(0.5) and s["spa/c/head"][4] == pytest.approx(0.1)
    total = s["spa/step_sq/head"][4] + s["spa/step_sq/1"][4]
    assert s["spa/step_sq"][4] == pytest.approx(total, rel=1e-5)

    with pytest.raises(ValueError, match=r"MomentumDiagnostics has no optimizer to work on: optimizer 0 \(Adam\)"):
        _fit(tmp_path, NoiseOrQuadratic("adam", dim=8), 5, MomentumDiagnostics(every_n_steps=1), name="adam")


def test_gradient_accumulation_one_measurement_per_optimizer_step(tmp_path: Path) -> None:
    _, s = _fit(tmp_path, NoiseOrQuadratic(dim=32), 6, MomentumDiagnostics(every_n_steps=1), accumulate_grad_batches=3)
    assert sorted(s["spa/step_sq"]) == [0, 1, 2, 3, 4, 5]


def test_gradient_clipping_is_seen(tmp_path: Path) -> None:
    # |noise| ~ 64 in 4096 dims, clipped to norm 1: grad_sq = eta^2 * 1 with eta = lr / (1 - momentum) = 1
    # (raw samples with decay 0). Unclipped it would be ~4096.
    _, s = _fit(
        tmp_path, NoiseOrQuadratic("sgd"), 3, MomentumDiagnostics(every_n_steps=1, ema_decay=0.0), gradient_clip_val=1.0
    )
    for k in range(3):
        assert s["spa/grad_sq"][k] == pytest.approx((0.1 / (1 - 0.9)) ** 2, rel=1e-4)


def test_nonfinite_gradients_skipped_with_one_warning(tmp_path: Path) -> None:
    class Corrupt(NoiseOrQuadratic):
        def on_after_backward(self) -> None:
            if self.global_step in (2, 3):
                self.w.grad[0] = float("inf")  # seen by the measurement, repaired before the step below

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.w.grad[0] = 0.0

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, s = _fit(tmp_path, Corrupt("sgd", dim=64), 6, MomentumDiagnostics(every_n_steps=1))
    assert sum("non-finite gradients" in str(w.message) for w in record) == 1
    assert all(math.isfinite(v) for tag in s for v in s[tag].values())


# Every batch is the same zeros (the model draws its own noise per step): where the loader restarts does not matter.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended:UserWarning")
def test_resume_continues_without_jump(tmp_path: Path) -> None:
    diag = dict(every_n_steps=1, ema_decay=0.95)
    _, full = _fit(tmp_path, NoiseOrQuadratic("spa", dim=256), 40, MomentumDiagnostics(**diag), name="full")
    first, _ = _fit(tmp_path, NoiseOrQuadratic("spa", dim=256), 20, MomentumDiagnostics(**diag), name="first")
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)
    _, resumed = _fit(
        tmp_path, NoiseOrQuadratic("spa", dim=256), 40, MomentumDiagnostics(**diag), name="resumed", ckpt_path=str(ckpt)
    )
    assert sorted(resumed["spa/ratio"]) == list(range(20, 40))
    for tag in ("spa/step_sq", "spa/grad_sq", "spa/ratio", "spa/cosine"):
        for k in range(20, 40):
            assert resumed[tag][k] == pytest.approx(full[tag][k], rel=1e-6), (tag, k)


def test_tensorboard_layout_and_prog_bar(tmp_path: Path) -> None:
    trainer, _ = _fit(tmp_path, NoiseOrQuadratic(dim=8), 3, MomentumDiagnostics(every_n_steps=1, prog_bar=True))
    assert "spa/ratio" in trainer.progress_bar_metrics
    charts = read_layout_charts(tmp_path / "run" / "version_0")
    assert [r"^spa/step_sq(/.*)?$", r"^spa/grad_sq_scaled(/.*)?$"] in charts.values()
    assert [r"^spa/ratio(/.*)?$", r"^spa/one$"] in charts.values()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": 2.5}, ValueError, "every_n_steps"),
        ({"ema_decay": 1.0}, ValueError, "ema_decay"),
        ({"ema_decay": -0.1}, ValueError, "ema_decay"),
        ({"per_group": "yes"}, TypeError, "per_group"),
        ({"prog_bar": 1}, TypeError, "prog_bar"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MomentumDiagnostics(**kwargs)


def test_amp_step_skipped_by_grad_scaler_is_not_counted(tmp_path: Path) -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    class Overflow(NoiseOrQuadratic):
        def on_after_backward(self) -> None:
            if self.global_step == 2:
                self.w.grad[0] = float("inf")  # the scaler finds it and skips optimizer.step()

    # 6 batches, the third skipped: the optimizer takes 5 steps, its clock reads 0..4, all measured and
    # logged on the trainer's axis, as train_loss is (batches 0, 1, 3, 4, 5).
    diagnostics = MomentumDiagnostics(every_n_steps=1)
    _, s = _fit(
        tmp_path,
        Overflow("sgd", dim=64),
        6,
        diagnostics,
        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))],
    )
    assert sorted(s["spa/step_sq"]) == [0, 1, 3, 4, 5]
    assert diagnostics.meters[0].step == 5
    assert all(math.isfinite(v) for tag in s for v in s[tag].values())


def test_plot_run_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lightning_spa.plotting import plot_run, read_run

    _fit(tmp_path, NoiseOrQuadratic(dim=8), 5, MomentumDiagnostics(every_n_steps=1))
    data = read_run(tmp_path / "run")
    assert data["spa/ratio"][0] == [0, 1, 2, 3, 4]
    out = plot_run(tmp_path / "run" / "version_0", tmp_path / "fig" / "diag.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="run_dir"):
        plot_run(tmp_path / "missing", tmp_path / "x.png")
    _fit(tmp_path, NoiseOrQuadratic(dim=8), 2, MomentumDiagnostics(every_n_steps=1), name="second")
    with pytest.raises(ValueError, match="several runs"):
        read_run(tmp_path)


def test_torch_sgd_momentum_spike_is_not_measured(tmp_path: Path) -> None:
    from lightning_spa import GradualSchedule

    # An instant paper-mode drop writes momentum (1-c)/factor = 9 into torch SGD at step 5: that step
    # has no SPA form, so it is left out (one warning) and every logged value stays finite.
    schedule = GradualSchedule(milestones=[5], unit="step", transition="instant")
    with pytest.warns(UserWarning) as record:
        _, s = _fit(tmp_path, NoiseOrQuadratic("sgd"), 12, MomentumDiagnostics(every_n_steps=1), before=(schedule,))
    messages = [str(w.message) for w in record]
    assert any("momentum >= 1 at optimizer step 5" in m for m in messages)
    assert any("transition='instant'" in m for m in messages)  # the schedule's own warning of the spike
    assert 5 not in s["spa/ratio"] and set(s["spa/ratio"]) == set(range(12)) - {5}
    assert all(math.isfinite(v) for tag in s.values() for v in tag.values())
    assert s["spa/eta"][6] == pytest.approx(0.1) and s["spa/c"][6] == pytest.approx(1.0)  # eta 10x down, c -> 1


def test_torch_sgd_buffer_left_by_momentum_zero_is_not_used(tmp_path: Path) -> None:
    class ZeroMomentum(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step >= 4:
                trainer.optimizers[0].param_groups[0]["momentum"] = 0.0

    # From step 4 torch SGD runs with momentum 0 and keeps its old buffer untouched: the cosine
    # with m_k is undefined from then on, so the cosine EMA must stop changing.
    _, s = _fit(tmp_path, NoiseOrQuadratic("sgd"), 10, MomentumDiagnostics(every_n_steps=1), before=(ZeroMomentum(),))
    assert s["spa/momentum"][4] == 0.0 and s["spa/momentum"][3] == pytest.approx(0.9)
    assert len({s["spa/cosine"][k] for k in range(3, 10)}) == 1
    assert s["spa/cosine"][2] != s["spa/cosine"][3]
