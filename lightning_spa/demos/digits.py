"""A small CNN on scikit-learn's bundled 8x8 digits (1,797 images): real data, no download.

Needs the ``examples`` extra (``scikit-learn``). Used by ``make demo``, the examples, the
benchmarks and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import _lightning as pl

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule", "load_digits_tensors"]

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
LRSchedulerFactory = Callable[[torch.optim.Optimizer], LRScheduler | ReduceLROnPlateau]


def load_digits_tensors(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(images, labels)``: images ``(1797, 1, 8, 8)`` scaled to [0, 1], labels ``(1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits demo needs scikit-learn: pip install 'lightning-spa[examples]'.") from err
    data = load_digits()
    images = torch.tensor(data.images, dtype=dtype).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


class DigitsDataModule(pl.LightningDataModule):
    """Train/validation split of the bundled digits.

    Args:
        batch_size: mini-batch size for both loaders.
        val_fraction: share of the 1,797 images held out for validation.
        seed: seed of the split (the training order follows Lightning's ``seed_everything``).
        num_workers: DataLoader workers (the data is in memory; 0 is fastest here).
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        self.batch_size, self.val_fraction, self.seed, self.num_workers = batch_size, val_fraction, seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits_tensors()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(labels))
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512, num_workers=self.num_workers)


class DigitsClassifier(pl.LightningModule):
    """Two conv layers and a linear head (about 20k parameters); logs loss and accuracy; no optimizer.

    The optimizer comes from elsewhere: LightningCLI's top-level ``optimizer:`` (automatic mode,
    ``examples/digits_cli.py``) or a subclass's ``configure_optimizers`` (:class:`DigitsCNN`).

    Args:
        channels: width of the conv layers.
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 16, 10),
        )
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)


class DigitsCNN(DigitsClassifier):
    """:class:`DigitsClassifier` with its optimizer: the given factory, else the paper's SPA recipe.

    Args:
        channels: width of the conv layers.
        optimizer: a callable ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``);
            ``None`` uses ``SPA(lr=1.0, c=0.1)`` (SGD+M ``lr 0.1, momentum 0.9``).
        lr_scheduler: a callable ``optimizer -> scheduler`` (LightningCLI's ``LRSchedulerCallable``),
            stepped once per epoch like LightningCLI's ``--lr_scheduler``; ``None``: no scheduler.
    """

    def __init__(
        self,
        channels: int = 16,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: LRSchedulerFactory | None = None,
    ) -> None:
        super().__init__(channels)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            return pl.injected_optimizers(self.optimizer_factory(self.parameters()), self.lr_scheduler_factory)
        from lightning_spa.optim import SPA

        return pl.injected_optimizers(SPA(self.parameters(), lr=1.0, c=0.1), self.lr_scheduler_factory)
