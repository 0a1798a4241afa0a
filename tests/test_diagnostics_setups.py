"""MomentumDiagnostics in the setups users run: two optimizers, SPA + Adam, callback order, a param
group added mid-run, monitors, resume with the same instance, both Lightning packages.

Expected numbers are recomputed in float64 from the gradient sequence (pure-noise losses seeded by
the step, so every gradient is known): with ``ema_decay=0`` the logged values are the raw samples
``step_sq = ||x_{k+1} - x_k||^2``, ``grad_sq = eta^2 ||g_k||^2``, ``ratio = step_sq / ((c/(2-c)) grad_sq)``.
"""

from __future__ import annotations

import functools
import importlib
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from test_diagnostics import read_layout_charts, read_scalars
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import SPA, GradualSchedule, MomentumDiagnostics

DIM = 32


def noise(k: int, which: int = 0) -> torch.Tensor:
    """The gradient of optimizer ``which`` at its step ``k``."""
    return torch.randn(DIM, generator=torch.Generator().manual_seed(1000 * which + k))


def raw_spa(eta: float, c: float, steps: int, which: int = 0) -> dict[str, list[float]]:
    """Raw samples of constant-(eta, c) SPA on the gradients noise(k, which), in float64."""
    m = torch.zeros(DIM, dtype=torch.float64)
    out: dict[str, list[float]] = {"step_sq": [], "grad_sq": [], "ratio": [], "cosine": []}
    for k in range(steps):
        g = noise(k, which).double()
        m_next = g if k == 0 else (1 - c) * m + g
        out["step_sq"].append(float((c * eta) ** 2 * m_next.square().sum()))
        out["grad_sq"].append(float(eta**2 * g.square().sum()))
        out["ratio"].append(out["step_sq"][-1] / (c / (2 - c) * out["grad_sq"][-1]))
        out["cosine"].append(float(g @ m / (g.norm() * m.norm())) if k else math.nan)
        m = m_next
    return out


@functools.cache
def modules(package_name: str) -> Any:
    """LightningModule classes of ``package_name`` (a Trainer only accepts its own package's modules)."""
    L = importlib.import_module(package_name)

    class Noise(L.LightningModule):
        """One SPA (or torch SGD) optimizer; loss <w, noise(k)> with k the optimizer's own step."""

        def __init__(self, make: Any = None) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((DIM,), 3.0))
            self.make = make or (lambda params: SPA(params, lr=1.0, c=0.1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return (self.w * noise(self.global_step)).sum()

        def configure_optimizers(self) -> Any:
            return self.make(self.parameters())

    class Gan(L.LightningModule):
        """Two optimizers stepped in turn (manual optimization): global_step counts both."""

        def __init__(self, second: str = "spa") -> None:
            super().__init__()
            self.automatic_optimization = False
            self.g = torch.nn.Parameter(torch.full((DIM,), 3.0))
            self.d = torch.nn.Parameter(torch.full((DIM,), -1.0))
            self.second = second

        def training_step(self, batch: Any, batch_idx: int) -> None:
            for which, (opt, p) in enumerate(zip(self.optimizers(), (self.g, self.d), strict=True)):
                self.manual_backward((p * noise(batch_idx, which)).sum())
                opt.step()
                opt.zero_grad()

        def configure_optimizers(self) -> Any:
            second = SPA([self.d], lr=2.0, c=0.5) if self.second == "spa" else torch.optim.Adam([self.d], lr=0.1)
            return [SPA([{"params": [self.g], "name": "generator"}], lr=1.0, c=0.1), second]

    return L, Noise, Gan


def fit(package: ModuleType, tmp_path: Path, model: Any, batches: int, callbacks: list[Any], name: str = "run",
        ckpt_path: str | None = None, **kwargs: Any) -> tuple[Any, dict[str, dict[int, float]]]:  # fmt: skip
    trainer = package.Trainer(
        accelerator="cpu", max_epochs=kwargs.pop("max_epochs", 1), callbacks=callbacks,
        logger=package.loggers.TensorBoardLogger(str(tmp_path), name=name, version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **{"log_every_n_steps": 1, **kwargs},
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(batches, 1)), batch_size=1), ckpt_path=ckpt_path)
    return trainer, read_scalars(tmp_path / name / "version_0")


def test_gan_two_spa_optimizers_each_on_its_own_clock(package: ModuleType, tmp_path: Path) -> None:
    _, _, Gan = modules(package.__name__)
    # Every other step of *each* optimizer (k = 1, 3, 5): global_step counts both, so the old
    # global_step % 2 rule measured only the first one.
    trainer, s = fit(package, tmp_path, Gan(), 6, [MomentumDiagnostics(every_n_steps=2, ema_decay=0.0)])
    assert trainer.global_step == 12
    for which, (suffix, eta, c) in enumerate((("/opt0", 1.0, 0.1), ("/opt1", 2.0, 0.5))):
        expected = raw_spa(eta, c, 6, which)
        assert sorted(s[f"spa/ratio{suffix}"]) == [1, 3, 5]
        for k in (1, 3, 5):
            for name in ("step_sq", "grad_sq", "ratio", "cosine"):
                assert s[f"spa/{name}{suffix}"][k] == pytest.approx(expected[name][k], rel=1e-5), (suffix, name, k)
        assert s[f"spa/c{suffix}"][5] == pytest.approx(c)
    assert trainer.callback_metrics["spa/ratio/opt1"].item() == pytest.approx(raw_spa(2.0, 0.5, 6, 1)["ratio"][5],
                                                                              rel=1e-5)  # fmt: skip


def test_spa_and_adam_measures_spa_and_skips_adam_once(package: ModuleType, tmp_path: Path) -> None:
    _, _, Gan = modules(package.__name__)
    with pytest.warns(UserWarning, match=r"MomentumDiagnostics skips optimizer 1 \(Adam\)") as record:
        _, s = fit(package, tmp_path, Gan("adam"), 4, [MomentumDiagnostics(every_n_steps=1, ema_decay=0.0)])
    assert sum("skips optimizer 1" in str(w.message) for w in record) == 1
    expected = raw_spa(1.0, 0.1, 4)
    assert sorted(s["spa/ratio"]) == [0, 1, 2, 3]  # only SPA is measured: no /opt suffix
    assert [s["spa/ratio"][k] for k in range(4)] == pytest.approx(expected["ratio"], rel=1e-5)
    with pytest.raises(TypeError, match="Adam"):  # selected explicitly: an error before any step
        fit(package, tmp_path, Gan("adam"), 4, [MomentumDiagnostics(optimizers=[1])], name="explicit")
    _, s = fit(package, tmp_path, Gan(), 4, [MomentumDiagnostics(every_n_steps=1, optimizers=["generator"])],
               name="by_name")  # fmt: skip
    assert "spa/ratio" in s and not any("/opt" in tag for tag in s)


@pytest.mark.parametrize("order", ["schedule_first", "diagnostics_first"])
def test_callback_order_does_not_change_the_numbers(tmp_path: Path, order: str) -> None:
    import pytorch_lightning

    _, Noise, _ = modules("pytorch_lightning")

    class Recording(Noise):
        """Records the (eta, c) each step really used: read after the closure, as SPA.step does."""

        used: list[tuple[float, float]]

        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any) -> None:
            def closure() -> Any:
                loss = optimizer_closure()
                group = optimizer.param_groups[0]
                self.used.append((float(group["lr"]), group["c"]))
                return loss

            optimizer.step(closure=closure)

    model = Recording()
    model.used = []
    schedule = GradualSchedule(milestones=[3], unit="step", factor=0.5, transition_steps=8)
    diagnostics = MomentumDiagnostics(every_n_steps=1, ema_decay=0.0)
    callbacks = [schedule, diagnostics] if order == "schedule_first" else [diagnostics, schedule]
    _, s = fit(pytorch_lightning, tmp_path, model, 10, callbacks)
    used = model.used
    assert len({eta for eta, _ in used}) > 1  # the schedule moved eta
    for k, (eta, c) in enumerate(used):  # logged = what the step used, whatever the order
        assert s["spa/eta"][k] == pytest.approx(eta, rel=1e-6) and s["spa/c"][k] == pytest.approx(c, rel=1e-6)
        assert s["spa/grad_sq"][k] == pytest.approx(eta**2 * float(noise(k).double().square().sum()), rel=1e-5)


def test_param_group_added_at_epoch_2_extends_the_emas(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    _, Noise, _ = modules("pytorch_lightning")

    class TwoParts(Noise):
        def __init__(self) -> None:
            super().__init__()
            self.v = torch.nn.Parameter(torch.ones(8))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx) + 0.5 * self.v.square().sum()

        def configure_optimizers(self) -> Any:
            return SPA([{"params": [self.w], "name": "head"}], lr=1.0, c=0.1)

    class Unfreeze(pl.Callback):  # what BaseFinetuning does
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 2:
                trainer.optimizers[0].add_param_group({"params": [pl_module.v], "name": "backbone", "c": 0.5})

    diagnostics = MomentumDiagnostics(every_n_steps=1, ema_decay=0.0, per_group=True)
    schedule = GradualSchedule(milestones=[1], factor=0.5, transition_steps=8)
    _, s = fit(pl, tmp_path, TwoParts(), 3, [Unfreeze(), schedule, diagnostics], max_epochs=3)
    assert sorted(s["spa/step_sq/backbone"]) == [6, 7, 8]
    assert sorted(s["spa/step_sq/head"]) == list(range(9))
    for k in (6, 7, 8):
        total = s["spa/step_sq/head"][k] + s["spa/step_sq/backbone"][k]
        assert s["spa/step_sq"][k] == pytest.approx(total, rel=1e-5)
    # the backbone's first step has no momentum yet: ratio c (2 - c) with its own c
    assert s["spa/ratio/backbone"][6] == pytest.approx(s["spa/c/backbone"][6] * (2 - s["spa/c/backbone"][6]), rel=1e-5)


def test_early_stopping_and_checkpoint_monitor_spa_ratio(package: ModuleType, tmp_path: Path) -> None:
    L, Noise, _ = modules(package.__name__)
    # Pure noise: the ratio rises from c (2 - c) = 0.19 towards 1, so "min" stops improving at once.
    stop = L.callbacks.EarlyStopping(monitor="spa/ratio", mode="min", patience=0, check_on_train_epoch_end=True)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="spa/ratio", mode="min")
    trainer = package.Trainer(
        accelerator="cpu", max_epochs=10, callbacks=[MomentumDiagnostics(every_n_steps=2, ema_decay=0.0), stop, ckpt],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Noise(), DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1))
    expected = raw_spa(1.0, 0.1, 8)["ratio"]
    assert trainer.current_epoch == 2 and trainer.global_step == 8  # epoch 1 did not improve on epoch 0
    assert trainer.callback_metrics["spa/ratio"].item() == pytest.approx(expected[7], rel=1e-5)
    assert ckpt.best_model_score.item() == pytest.approx(expected[3], rel=1e-5)  # step 3 ends epoch 0


def test_resume_with_the_same_instance_keeps_the_checkpoint_state(package: ModuleType, tmp_path: Path) -> None:
    _, Noise, _ = modules(package.__name__)
    diagnostics = MomentumDiagnostics(every_n_steps=3, ema_decay=0.9)
    first, _ = fit(package, tmp_path, Noise(), 6, [diagnostics], name="first")
    first.save_checkpoint(tmp_path / "mid.ckpt")
    fit(package, tmp_path, Noise(), 4, [diagnostics], name="other")  # the instance now holds another fit's state
    _, resumed = fit(package, tmp_path, Noise(), 6, [diagnostics], name="resumed", max_epochs=2,
                     ckpt_path=str(tmp_path / "mid.ckpt"))  # fmt: skip
    # Measured at k = 2, 5, 8, 11: the EMA over the raw samples, each 3 steps apart (weight 1 - 0.9**3).
    raw = raw_spa(1.0, 0.1, 12)
    num = den = 0.0
    for k in (2, 5, 8, 11):
        num, den = 0.9**3 * num + (1 - 0.9**3) * raw["step_sq"][k], 0.9**3 * den + (1 - 0.9**3)
        if k > 5:
            assert resumed["spa/step_sq"][k] == pytest.approx(num / den, rel=1e-5)
    assert sorted(resumed["spa/step_sq"]) == [8, 11]
    assert diagnostics.meters[0].step == 12


def test_tensorboard_layout_with_either_package(package: ModuleType, tmp_path: Path) -> None:
    _, Noise, _ = modules(package.__name__)
    trainer, s = fit(package, tmp_path, Noise(), 3, [MomentumDiagnostics(every_n_steps=1, prog_bar=True)])
    assert "spa/ratio" in trainer.progress_bar_metrics and s["spa/one"][2] == 1.0
    charts = read_layout_charts(tmp_path / "run" / "version_0")
    assert [r"^spa/ratio(/.*)?$", r"^spa/one$"] in charts.values()


def test_tensor_lr_and_no_hooks_on_unmeasured_steps(tmp_path: Path) -> None:
    import pytorch_lightning

    _, Noise, _ = modules("pytorch_lightning")
    diagnostics = MomentumDiagnostics(every_n_steps=4, ema_decay=0.0)
    assert diagnostics.state_key is diagnostics.state_key  # computed once (Lightning reads it per hook)
    model = Noise(lambda params: SPA(params, lr=torch.tensor(0.7), c=0.1))  # a float32 tensor lr
    trainer, s = fit(pytorch_lightning, tmp_path, model, 8, [diagnostics])
    assert sorted(s["spa/eta"]) == [3, 7] and s["spa/eta"][7] == pytest.approx(0.7, rel=1e-6)
    assert s["spa/ratio"][7] == pytest.approx(raw_spa(float(torch.tensor(0.7)), 0.1, 8)["ratio"][7], rel=1e-5)
    opt = trainer.optimizers[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # all removed at fit end


def test_a_step_the_module_skips_does_not_count(tmp_path: Path) -> None:
    import pytorch_lightning

    _, Noise, _ = modules("pytorch_lightning")

    class SkipsBatch2(Noise):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return (self.w * noise(batch_idx)).sum()  # the gradient of batch b is noise(b)

        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any) -> None:
            if batch_idx == 2:
                optimizer_closure()  # backward and on_before_optimizer_step run, the step does not
            else:
                optimizer.step(closure=optimizer_closure)

    diagnostics = MomentumDiagnostics(every_n_steps=1, ema_decay=0.0)
    _, s = fit(pytorch_lightning, tmp_path, SkipsBatch2(), 6, [diagnostics])
    # 5 steps (clock 0..4), logged on the trainer's axis like train_loss: batches 0, 1, 3, 4, 5
    assert sorted(s["spa/grad_sq"]) == [0, 1, 3, 4, 5] and diagnostics.meters[0].step == 5
    for batch in (1, 3, 5):  # step 2 is batch 3's
        assert s["spa/grad_sq"][batch] == pytest.approx(float(noise(batch).double().square().sum()), rel=1e-5)
