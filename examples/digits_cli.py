"""LightningCLI app: a small CNN on scikit-learn's bundled digits, configured entirely from YAML.

Runs offline on 2 CPU cores in seconds. The optimizer can be given in both LightningCLI modes:

- automatic mode, a top-level ``optimizer:`` key (``configs/digits_spa.yaml``)::

      optimizer:
        class_path: lightning_spa.SPA
        init_args: {lr: 1.0, c: 0.1}          # SPA's lr is eta: SGD+M lr 0.1, momentum 0.9

- dependency injection, the model's ``optimizer: OptimizerCallable`` argument
  (``configs/digits_grouped.yaml``, with parameter groups)::

      model:
        optimizer:
          class_path: lightning_spa.GroupedSPA
          init_args: {lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4}

A scheduler goes with its optimizer: top-level ``lr_scheduler:`` in automatic mode,
``model.lr_scheduler:`` (``LRSchedulerCallable``) in dependency injection. LightningCLI would
silently drop a scheduler given in the other mode (and ``model.optimizer`` beside a top-level
``optimizer``); the app refuses those mixes before building anything, naming the fix.

In automatic mode the model (:func:`digits_model`) is a ``DigitsClassifier`` with no
``configure_optimizers`` of its own, so LightningCLI has nothing to override (and prints no
warning); in dependency-injection mode it is :class:`DigitsModel`. With neither, the app uses
:data:`DEFAULT_OPTIMIZER` in automatic mode.

Usage::

    python examples/digits_cli.py fit --config examples/configs/digits_spa.yaml
    python examples/digits_cli.py fit --config examples/configs/digits_grouped.yaml --trainer.max_epochs 5
    python examples/digits_cli.py --lightning fit --config examples/configs/digits_spa.yaml   # lightning.pytorch
    tensorboard --logdir runs/digits

Either Lightning package: ``--lightning`` (first argument) runs ``lightning.pytorch.cli.LightningCLI``
instead of ``pytorch_lightning.cli.LightningCLI``; the configs are the same, since they name the
logger by its class name (``TensorBoardLogger``), which each CLI resolves in its own package.

When you switch ``optimizer.class_path`` on the command line, LightningCLI carries the init
arguments of the previous class over to the new one when their names match: SPA's
``lr`` (eta = 1.0) would become torch SGD's ``lr`` (1.0, ten times the usual 0.1). Restate every
init argument when you change the class, or use a separate config file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal

from lightning_spa._lightning import app_cli, injected_optimizers, main_args
from lightning_spa.demos.digits import (
    DigitsClassifier,
    DigitsCNN,
    DigitsDataModule,
    LRSchedulerFactory,
    OptimizerFactory,
)

__all__ = ["DigitsModel", "cli_main", "digits_model"]


class DigitsModel(DigitsCNN):
    """:class:`~lightning_spa.demos.DigitsCNN` that hands the optimizer named parameters.

    With names, :class:`~lightning_spa.GroupedSPA` can exempt biases and normalisation weights
    from weight decay by module type and apply ``lr_multipliers`` (``{"net.8": 2.0}``: the head).
    """

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            return injected_optimizers(self.optimizer_factory(self.named_parameters()), self.lr_scheduler_factory)
        return super().configure_optimizers()


def digits_model(
    channels: int = 16, optimizer: OptimizerFactory | None = None, lr_scheduler: LRSchedulerFactory | None = None
) -> DigitsClassifier:
    """The app's model (LightningCLI's ``model:`` section).

    Args:
        channels: width of the conv layers.
        optimizer: dependency-injection mode: the optimizer, given ``named_parameters()``. Leave it
            unset in automatic mode (a top-level ``optimizer:``), which LightningCLI configures.
        lr_scheduler: dependency-injection mode's scheduler (``--model.lr_scheduler``) of
            ``optimizer`` (unset: of :data:`DEFAULT_OPTIMIZER`); in automatic mode use the top-level
            ``lr_scheduler:``. The app refuses the mix of the modes, which LightningCLI would drop.

    In automatic mode the model has no ``configure_optimizers`` of its own, so LightningCLI's
    replaces nothing (and does not warn that it overrides ``DigitsModel.configure_optimizers``).
    """
    if optimizer is None and lr_scheduler is None:
        return DigitsClassifier(channels)
    return DigitsModel(channels, optimizer, lr_scheduler)


# Neither mode given: the demo's default, SPA eta 1.0, c 0.1 (SGD+M lr 0.1, momentum 0.9), in automatic mode.
DEFAULT_OPTIMIZER = {"class_path": "lightning_spa.SPA", "init_args": {"lr": 1.0, "c": 0.1}}


def _digits_cli(package: str) -> Any:
    """The package's ``LightningCLI`` (:func:`~lightning_spa._lightning.app_cli`), falling back to
    :data:`DEFAULT_OPTIMIZER` when no optimizer is given (in automatic mode; with ``model.lr_scheduler``,
    the model's own, the same SPA)."""
    from jsonargparse import Namespace

    class DigitsCLI(app_cli(package)):  # type: ignore[misc]
        def before_instantiate_classes(self) -> None:
            config = self.config.get(str(self.subcommand), self.config)
            given = ("optimizer", "model.optimizer", "model.lr_scheduler")
            if all(config.get(key) is None for key in given):
                config["optimizer"] = Namespace(
                    class_path=DEFAULT_OPTIMIZER["class_path"], init_args=Namespace(**DEFAULT_OPTIMIZER["init_args"])
                )
            super().before_instantiate_classes()

    return DigitsCLI


Package = Literal["pytorch_lightning", "lightning.pytorch"]


def cli_main(
    args: Sequence[str] | dict[str, Any] | None = None, run: bool = True, package: Package = "pytorch_lightning"
) -> Any:
    """Builds (and with ``run=True`` runs) the CLI; ``args`` replaces ``sys.argv`` (tests, notebooks).

    ``package`` picks whose ``LightningCLI`` (and so whose Trainer) runs the app.
    """
    return _digits_cli(package)(
        digits_model,
        DigitsDataModule,
        args=args,  # type: ignore[arg-type]
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_args, cli_package = main_args(sys.argv[1:])
    cli_main(cli_args, package=cli_package)  # type: ignore[arg-type]
