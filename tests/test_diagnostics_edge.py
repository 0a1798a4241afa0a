"""MomentumDiagnostics on the less travelled paths: complex and sparse parameters, eta = 0, and
16-mixed AMP with optimizers that unscale inside their step (torch's fused SGD, fused SPA).

Every expected number is the displacement, gradient and buffer computed directly (float64)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from test_diagnostics import read_scalars
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA, MomentumDiagnostics
from lightning_spa.meter import MomentumMeter
from lightning_spa.optim import SPASpikeWarning

CPU = torch.device("cpu")


def _measured_step(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[list[float], float, float]:
    """Measures one step with a MomentumMeter (ema 0: raw samples); returns its total row and the
    step_sq / grad_sq computed directly."""
    meter = MomentumMeter(opt, every_n_steps=1, ema_decay=0.0).attach()
    x0 = [p.detach().clone() for p in params]
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for p in params]  # type: ignore[union-attr]
    meter.before_step()
    opt.step()
    meter.detach()
    assert meter.latest is not None and meter.latest.status == "ok"
    step_sq = sum(float((p.detach() - x).abs().square().sum()) for p, x in zip(params, x0, strict=True))
    eta = meter.latest.hypers[0].eta
    grad_sq = eta**2 * sum(float(g.abs().square().sum()) for g in grads)
    return meter.latest.values[-1], step_sq, grad_sq


@pytest.mark.parametrize("kind", ["sgd", "spa"])
def test_complex_parameters_use_the_real_inner_product(kind: str) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, dtype=torch.complex128))
    opt = SPA([w], lr=0.5, c=0.2) if kind == "spa" else torch.optim.SGD([w], lr=0.1, momentum=0.8)
    for _ in range(3):
        w.grad = torch.randn(40, dtype=torch.complex128)
        opt.step()
    g = torch.randn(40, dtype=torch.complex128)
    w.grad = g.clone()
    m = opt.state[w]["momentum_buffer"].clone()
    row, step_sq, grad_sq = _measured_step(opt, [w])
    assert row[0] == pytest.approx(step_sq, rel=1e-9) and row[1] == pytest.approx(grad_sq, rel=1e-9)
    cosine = float(torch.vdot(g, m).real / (g.norm() * m.norm()))  # Re<g, m> of C^n as R^2n
    assert row[3] == pytest.approx(cosine, rel=1e-9)
    assert cosine != pytest.approx(float(torch.dot(g, m).real / (g.norm() * m.norm())), rel=1e-3)  # not conj-free


def test_sparse_gradients_are_measured_exactly() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 4, sparse=True, dtype=torch.float64)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    for ids in ([1, 2, 2, 7], [2, 3, 9], [7, 7, 40]):  # repeated ids: uncoalesced gradients
        opt.zero_grad()
        emb(torch.tensor(ids)).square().sum().backward()
        if ids[-1] != 40:
            opt.step()
    m = opt.state[emb.weight]["momentum_buffer"].to_dense()
    g = emb.weight.grad.to_dense()  # type: ignore[union-attr]
    row, step_sq, grad_sq = _measured_step(opt, [emb.weight])
    assert row[0] == pytest.approx(step_sq, rel=1e-9) and row[1] == pytest.approx(grad_sq, rel=1e-9)
    assert row[3] == pytest.approx(float(g.flatten() @ m.flatten() / (g.norm() * m.norm())), rel=1e-9)


def test_spa_eta_zero_step_is_measured_from_the_scale() -> None:
    # At eta = 0: x_{k+1} - x_k = -c (s m) with s = (1 - c) eta_prev: finite, though beta = s / eta is not.
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    opt = SPA([w], lr=0.5, c=0.2)
    for _ in range(2):
        w.grad = torch.randn(20, dtype=torch.float64)
        opt.step()
    opt.param_groups[0]["lr"] = 0.0
    w.grad = torch.randn(20, dtype=torch.float64)
    with pytest.warns(SPASpikeWarning, match="eta fell to 0"):
        row, step_sq, _ = _measured_step(opt, [w])
    assert step_sq > 0 and row[0] == pytest.approx(step_sq, rel=1e-9)
    assert row[1] == 0.0 and not math.isfinite(row[4])  # no noise level at eta = 0: no ratio (not logged)


class _Noise(pl.LightningModule):
    def __init__(self, make: Any, overflow_at: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((64,), 3.0))
        self.make, self.overflow_at, self.batches = make, overflow_at, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.w * torch.randn(64, generator=torch.Generator().manual_seed(batch_idx))).sum()

    def on_after_backward(self) -> None:
        if self.overflow_at is not None and self.global_step == self.overflow_at:
            self.w.grad[0] = float("inf")  # type: ignore[index]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self.parameters())


def _fit(
    tmp_path: Path, name: str, model: pl.LightningModule, amp: bool, every: int = 1, steps: int = 6,
    clock: list[int] | None = None,
) -> dict[str, dict[int, float]]:  # fmt: skip
    """Fits ``steps`` batches; logged values are keyed by the trainer's step (the batch); ``clock``
    receives the optimizer's final step count."""
    diagnostics = MomentumDiagnostics(every_n_steps=every, ema_decay=0.0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=pl.loggers.TensorBoardLogger(tmp_path, name=name, version=0),
        callbacks=[diagnostics], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if amp else None,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1))
    if clock is not None:
        clock.append(diagnostics.meters[0].step)
    return read_scalars(tmp_path / name / "version_0")


@pytest.mark.parametrize(
    "make",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
        lambda params: SPA(params, lr=1.0, c=0.1, fused=True),
    ],
    ids=["torch_fused_sgd", "fused_spa"],
)
def test_16_mixed_fused_optimizer_measures_unscaled_gradients(tmp_path: Path, make: Any) -> None:
    assert make([torch.nn.Parameter(torch.ones(1))])._step_supports_amp_scaling  # unscaled inside the step
    fp32 = _fit(tmp_path, "fp32", _Noise(make), amp=False)
    amp = _fit(tmp_path, "amp", _Noise(make), amp=True)
    # The loss is elementwise (no autocast op): the unscaled gradient is the fp32 one, so is grad_sq,
    # eta^2 ||noise_k||^2 with eta = 1 (not ~2^32 times it, as with the loss scale left in).
    for k in range(6):
        noise = torch.randn(64, generator=torch.Generator().manual_seed(k)).double()
        assert amp["spa/grad_sq"][k] == pytest.approx(float(noise.square().sum()), rel=1e-5)
        for tag in ("spa/grad_sq", "spa/step_sq", "spa/ratio"):
            assert amp[tag][k] == pytest.approx(fp32[tag][k], rel=1e-5), (tag, k)


def test_16_mixed_fused_sgd_overflow_step_is_not_counted(tmp_path: Path) -> None:
    make = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)  # noqa: E731
    clock: list[int] = []
    with pytest.warns(UserWarning, match="AMP grad scaler skipped optimizer step 2"):
        s = _fit(tmp_path, "overflow", _Noise(make, overflow_at=2), amp=True, clock=clock)
    # Batch 2's step is skipped inside the fused kernel: 5 steps taken (clock 0..4), logged on the
    # trainer's axis like train_loss (batches 0, 1, 3, 4, 5), all finite.
    assert sorted(s["spa/grad_sq"]) == [0, 1, 3, 4, 5] and clock == [5]
    assert all(math.isfinite(v) for tag in s.values() for v in tag.values())
    noise = torch.randn(64, generator=torch.Generator().manual_seed(3)).double()  # step 2 is batch 3's
    assert s["spa/grad_sq"][3] == pytest.approx(float(noise.square().sum()), rel=1e-5)


def test_16_mixed_fused_sgd_unmeasured_overflow_is_read_at_the_next_measurement(tmp_path: Path) -> None:
    make = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)  # noqa: E731
    clock: list[int] = []
    s = _fit(tmp_path, "late", _Noise(make, overflow_at=2), amp=True, every=2, steps=8, clock=clock)
    # Batch 2's skip happens inside the fused kernel on an unmeasured step; its flag stays on the
    # device (no sync) until the next measurement reads it. So batch 3's step (k = 2) is measured with
    # the clock one ahead; from then on k = 3, 5 (batches 4, 6) as usual, and the clock ends exact.
    assert sorted(s["spa/grad_sq"]) == [1, 3, 4, 6] and clock == [7]
    for batch in (1, 3, 4, 6):
        noise = torch.randn(64, generator=torch.Generator().manual_seed(batch)).double()
        assert s["spa/grad_sq"][batch] == pytest.approx(float(noise.square().sum()), rel=1e-5)


def test_sparse_embedding_fit_is_measured(tmp_path: Path) -> None:
    class Sparse(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(100, 8, sparse=True)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.emb(torch.tensor([batch_idx, batch_idx + 1, 50])).square().sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=pl.loggers.TensorBoardLogger(tmp_path, name="sparse", version=0),
        callbacks=[MomentumDiagnostics(every_n_steps=1)], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(Sparse(), DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1))
    s = read_scalars(tmp_path / "sparse" / "version_0")
    assert sorted(s["spa/ratio"]) == [0, 1, 2, 3] and s["spa/ratio"][0] == pytest.approx(0.1 * 1.9, rel=1e-5)


def test_meter_state_with_more_groups_than_the_optimizer_loads() -> None:
    # A checkpoint saved after a group was added, loaded before the run re-adds it: no shape error.
    w, v = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))
    two = SPA([{"params": [w]}, {"params": [v]}], lr=1.0, c=0.5)
    saved = MomentumMeter(two, every_n_steps=1).state_dict()
    one = SPA([torch.nn.Parameter(torch.ones(4))], lr=1.0, c=0.5)
    meter = MomentumMeter(one, every_n_steps=1, ema_decay=0.0)
    meter.load_state_dict(saved)
    meter.attach()
    one.param_groups[0]["params"][0].grad = torch.ones(4)
    meter.before_step()
    one.step()
    assert meter.latest is not None and len(meter.latest.values) == 2  # group 0, then the total
    assert meter.latest.values[-1][4] == pytest.approx(0.5 * 1.5)  # first step: ratio c (2 - c)
