"""LightningCLI app for the paper's large-scale settings: CIFAR-10 (PreAct ResNet) and ImageNet (ResNet-50).

Needs torchvision for the datasets (``pip install torchvision==0.28.0`` matches torch 2.13.0;
pin it to your torch so pip does not replace torch). Point ``data.data_dir`` at your data::

    python examples/vision_cli.py fit --config examples/configs/cifar10_preact_resnet.yaml \\
        --data.data_dir /data/cifar10 --data.download true
    python examples/vision_cli.py fit --config examples/configs/imagenet_resnet50.yaml \\
        --data.data_dir /data/imagenet            # expects train/ and val/ class folders

What was tested here (2 CPU cores, no GPU, no data): both configs parse, and one optimizer step
plus one validation batch runs on fake data (``--data.fake_data true``, see
``tests/test_examples.py``). The full runs (300 CIFAR-10 epochs, 100 ImageNet epochs on 8 GPUs)
were not run; they need GPUs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchmetrics
from models import build_model
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_spa import GroupedSPA
from lightning_spa import _lightning as pl  # classes of both Lightning packages
from lightning_spa._lightning import app_cli, injected_optimizers, main_args

OptimizerCallable = Callable[[Iterable[Any]], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], LRScheduler | ReduceLROnPlateau]

__all__ = ["CIFAR10DataModule", "ImageClassifier", "ImageNetDataModule", "cli_main"]


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            "The CIFAR-10/ImageNet data modules need torchvision: pip install 'torchvision==0.28.0' for torch 2.13.0 "
            "(pin the version matching your torch), or pass --data.fake_data true for a smoke test."
        ) from err
    return torchvision


def _fake(n: int, size: int, num_classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g))


class _ImageDataModule(pl.LightningDataModule):
    num_classes = 10
    image_size = 32

    def __init__(self, data_dir: str, batch_size: int, num_workers: int, fake_data: bool, fake_size: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.data_dir, self.batch_size, self.num_workers = Path(data_dir), batch_size, num_workers
        self.fake_data, self.fake_size = fake_data, fake_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _real(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.fake_data:
            self.train_set = _fake(self.fake_size, self.image_size, self.num_classes, 0)
            self.val_set = _fake(self.fake_size, self.image_size, self.num_classes, 1)
        else:
            self.train_set, self.val_set = self._real()

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class CIFAR10DataModule(_ImageDataModule):
    """CIFAR-10 as in the paper (Appendix G): flips, random crop 32 (padding 4), normalised around 0.5.

    Args:
        data_dir: where ``torchvision.datasets.CIFAR10`` finds (or downloads) the data.
        batch_size: per-device batch size (paper: 128).
        num_workers: DataLoader workers.
        download: download CIFAR-10 into ``data_dir`` if missing.
        fake_data: random tensors instead of CIFAR-10 (smoke tests; no torchvision needed).
        fake_size: number of fake images.
    """

    num_classes, image_size = 10, 32

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        fake_data: bool = False,
        fake_size: int = 256,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, fake_data, fake_size)
        self.download = download

    def _real(self) -> tuple[Dataset, Dataset]:
        tv = _torchvision()
        t = tv.transforms
        norm = t.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        train_t = t.Compose([t.RandomCrop(32, padding=4), t.RandomHorizontalFlip(), t.ToTensor(), norm])
        val_t = t.Compose([t.ToTensor(), norm])
        root = str(self.data_dir)
        return (
            tv.datasets.CIFAR10(root, train=True, transform=train_t, download=self.download),
            tv.datasets.CIFAR10(root, train=False, transform=val_t, download=self.download),
        )


class ImageNetDataModule(_ImageDataModule):
    """ImageNet as in the paper: RandomResizedCrop(224) and flips; resize 256 + center crop to validate.

    Args:
        data_dir: a folder with ``train/`` and ``val/`` class sub-folders (``ImageFolder`` layout).
        batch_size: per-device batch size (paper: 8 GPUs x 32).
        num_workers: DataLoader workers per device.
        image_size: crop size (224).
        fake_data: random tensors instead of ImageNet (smoke tests; no torchvision needed).
        fake_size: number of fake images.
    """

    num_classes = 1000

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 32,
        num_workers: int = 8,
        image_size: int = 224,
        fake_data: bool = False,
        fake_size: int = 64,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, fake_data, fake_size)
        self.image_size = image_size

    def _real(self) -> tuple[Dataset, Dataset]:
        tv = _torchvision()
        t = tv.transforms
        for split in ("train", "val"):
            if not (self.data_dir / split).is_dir():
                raise FileNotFoundError(f"`data_dir`={self.data_dir} has no {split}/ folder (ImageFolder layout).")
        norm = t.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        train_t = t.Compose([t.RandomResizedCrop(self.image_size), t.RandomHorizontalFlip(), t.ToTensor(), norm])
        resize = int(self.image_size * 256 / 224)
        val_t = t.Compose([t.Resize(resize), t.CenterCrop(self.image_size), t.ToTensor(), norm])
        return (
            tv.datasets.ImageFolder(str(self.data_dir / "train"), train_t),
            tv.datasets.ImageFolder(str(self.data_dir / "val"), val_t),
        )


class ImageClassifier(pl.LightningModule):
    """Classifier for the paper's vision experiments; logs ``train/loss``, ``val/loss``, ``val/acc``.

    Args:
        arch: ``preact_resnet152`` (paper, CIFAR-10), ``preact_resnet18`` (quicker) or ``resnet50``.
        num_classes: 10 (CIFAR-10) or 1000 (ImageNet).
        optimizer: ``params -> Optimizer`` (LightningCLI dependency injection); called with
            ``named_parameters()``. ``None``: ``GroupedSPA(eta=1.0, c=0.1, weight_decay=1e-4)``.
        lr_scheduler: ``optimizer -> scheduler`` (``--model.lr_scheduler``) of that optimizer, stepped
            once per epoch as LightningCLI's ``--lr_scheduler`` (which goes with a top-level
            ``--optimizer`` only; the app refuses it otherwise). ``None``: no scheduler.
    """

    def __init__(
        self,
        arch: str = "preact_resnet152",
        num_classes: int = 10,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = build_model(arch, num_classes)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(self.named_parameters())
        else:
            optimizer = GroupedSPA(self, eta=1.0, c=0.1, weight_decay=1e-4, no_decay=())
        return injected_optimizers(optimizer, self.lr_scheduler_factory)


def cli_main(
    args: Sequence[str] | dict[str, Any] | None = None,
    run: bool = True,
    package: Literal["pytorch_lightning", "lightning.pytorch"] = "pytorch_lightning",
) -> Any:
    """Builds (and with ``run=True`` runs) the CLI; choose the data module with ``--data``.

    ``package`` picks whose ``LightningCLI`` (and Trainer) runs the app; ``--lightning`` as the
    first command-line argument picks ``lightning.pytorch``.
    """
    return app_cli(package)(
        ImageClassifier,
        args=args,  # type: ignore[arg-type]
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_args, cli_package = main_args(sys.argv[1:])
    cli_main(cli_args, package=cli_package)  # type: ignore[arg-type]
