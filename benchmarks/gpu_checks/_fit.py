"""Tiny models on fake data, a quiet Lightning fit and an in-memory logger, for the checks that train."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from ._common import Context


def quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|GPU available but not used|TensorBoard).*")


def memory_logger() -> Any:
    from pytorch_lightning.loggers.logger import Logger

    class MemoryLogger(Logger):
        """Keeps every ``log_metrics`` call in memory: ``rows = [(step, metrics), ...]``."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int | None, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def series(self, key: str) -> dict[int, float]:
            return {int(s): m[key] for s, m in self.rows if s is not None and key in m}

    return MemoryLogger()


def fit(
    ctx: Context,
    module: Any,
    steps: int,
    callbacks: list[Any],
    logger: Any = None,
    precision: Any = "32-true",
    plugins: list[Any] | None = None,
    log_every_n_steps: int = 1,
) -> Any:
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        accelerator="gpu" if ctx.cuda else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        precision=precision if plugins is None else None,
        plugins=plugins,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=log_every_n_steps,
        default_root_dir=str(ctx.tmp),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return trainer


def mixed_precision(ctx: Context) -> list[Any]:
    """Lightning ``16-mixed`` with a GradScaler of a moderate initial scale (2**10: no step overflows)."""
    import torch
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**10)
    return [MixedPrecision("16-mixed", ctx.device.type, scaler=scaler)]


def fake_module(
    net_factory: Callable[[], Any],
    optimizer_factory: Callable[[Any], Any],
    input_shape: tuple[int, ...],
    batch: int,
    classes: int,
    steps: int,
    seed: int = 0,
) -> Any:
    """A LightningModule training ``net_factory()`` on one fixed random batch (kept on the device)."""
    import pytorch_lightning as pl
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class FakeData(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = net_factory()
            gen = torch.Generator().manual_seed(seed + 1)
            self.register_buffer("x", torch.randn(batch, *input_shape, generator=gen), persistent=False)
            self.register_buffer("y", torch.randint(0, classes, (batch,), generator=gen), persistent=False)

        def training_step(self, batch_: Any, batch_idx: int) -> Any:
            return F.cross_entropy(self.net(self.x), self.y)

        def configure_optimizers(self) -> Any:
            return optimizer_factory(self.parameters())

        def train_dataloader(self) -> Any:
            return DataLoader(TensorDataset(torch.zeros(max(steps, 1))), batch_size=1)

    return FakeData()


def mlp() -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp_module(optimizer_factory: Callable[[Any], Any], steps: int) -> Any:
    """The small MLP of the sync and AMP checks, on a batch of 64 fake 32-feature samples in 10 classes."""
    return fake_module(mlp, optimizer_factory, (32,), 64, 10, steps)


def resnet18(num_classes: int = 10) -> Any:
    """ResNet-18 for 32x32 inputs (CIFAR stem), 11.2M parameters; no torchvision needed."""
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x: Any) -> Any:
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(c_in, c_out, stride), Block(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)
