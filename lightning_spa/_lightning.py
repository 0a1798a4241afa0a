"""The single place that knows which Lightning package(s) are installed.

Users run either ``pytorch_lightning`` or the unified ``lightning`` (``lightning.pytorch``),
and often have both installed (``lightning`` itself depends on ``pytorch-lightning``). The two
are copies of the same code under two names, so a Trainer of one refuses the classes of the
other. Our classes therefore derive from the class of *every* installed package:

- ``Callback``: both packages' ``Callback`` define the same hooks with empty bodies and each
  Trainer calls hooks by name, so plain multiple inheritance serves either Trainer and CLI.
- ``LightningModule`` / ``LightningDataModule`` (the demo): every method or property the two
  packages define differently dispatches, per instance, to the package of the Trainer the
  module is attached to (``pytorch_lightning`` before that). Each Trainer then sees its own
  package's code, e.g. when it checks which hooks a module overrides. The package is told by
  class hierarchy (:func:`package_of`), never by module name: a user's ``Trainer`` subclass
  belongs to the package it derives from.

Everything else here (optimizer unwrapping, logger checks, warnings) accepts both packages.
The rest of lightning_spa imports Lightning only through this module.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = [
    "PACKAGE_NAMES",
    "PACKAGES",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "app_cli",
    "injected_optimizers",
    "is_tensorboard_logger",
    "lightning_cli",
    "main_args",
    "package_of",
    "rank_zero_info",
    "rank_zero_warn",
    "unwrap_optimizer",
]


def _installed(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# The two distributions' import names, pytorch_lightning first (our declared dependency).
PACKAGE_NAMES = ("pytorch_lightning", "lightning.pytorch")
# (module name, module) of each installed package.
PACKAGES: tuple[tuple[str, Any], ...] = tuple(
    (name, module) for name, module in ((n, _installed(n)) for n in PACKAGE_NAMES) if module is not None
)
if not PACKAGES:  # pragma: no cover - pytorch-lightning is a dependency
    raise ImportError("lightning_spa's callbacks need `pytorch-lightning` or `lightning`: pip install lightning-spa")

_primary = PACKAGES[0][1]

_CALLBACK_BASES: tuple[type, ...] = tuple(dict.fromkeys(module.Callback for _, module in PACKAGES))
if len(_CALLBACK_BASES) == 1:
    Callback: type = _CALLBACK_BASES[0]
else:
    # A subclass of both packages' Callback: both define the same hooks with empty bodies, and
    # each Trainer calls hooks by name, so one class serves either Trainer and either CLI.
    Callback = type("Callback", _CALLBACK_BASES, {"__module__": __name__, "__doc__": "Callback of both packages."})


# (module name, Trainer class) of each installed package: the two Trainers are unrelated classes.
_TRAINERS: tuple[tuple[str, type], ...] = tuple((name, module.Trainer) for name, module in PACKAGES)


def package_of(trainer: Any) -> str | None:
    """The name of the installed package (one of :data:`PACKAGE_NAMES`) whose ``Trainer`` ``trainer`` is.

    Decided by class hierarchy, so a ``Trainer`` subclass defined anywhere (a user's module,
    ``__main__``) belongs to the package it derives from; ``None`` for an object that is neither
    package's ``Trainer``.
    """
    kind = type(trainer)
    try:
        return _PACKAGE_OF_TYPE[kind]  # resolved on every hook's attribute access: a dict look-up, not isinstance
    except KeyError:
        found = next((name for name, cls in _TRAINERS if isinstance(trainer, cls)), None)
        _PACKAGE_OF_TYPE[kind] = found
        return found


_PACKAGE_OF_TYPE: dict[type, str | None] = {}


# The package of the app_cli() building classes now, if any (see _AppCLI).
_CLI_PACKAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lightning_spa_cli_package", default=None)


def _package_of(obj: Any) -> str | None:
    """The installed package whose Trainer ``obj`` (a module or data module) is attached to.

    Not attached: the package of the :func:`app_cli` building it, if any, else ``None``.
    """
    trainer = vars(obj).get("_trainer", vars(obj).get("trainer"))
    return _CLI_PACKAGE.get() if trainer is None else package_of(trainer)


class _PerPackage:
    """A class attribute that both packages define differently: resolved per instance."""

    def __init__(self, impls: dict[str, Any]) -> None:
        self.impls = impls
        self.default = next(iter(impls.values()))

    def _impl(self, obj: Any) -> Any:
        return self.impls.get(_package_of(obj) or "", self.default) if obj is not None else self.default

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        impl = self._impl(obj)
        return impl.__get__(obj, owner) if hasattr(impl, "__get__") else impl


class _PerPackageData(_PerPackage):
    """:class:`_PerPackage` for properties and other data descriptors (settable)."""

    def __set__(self, obj: Any, value: Any) -> None:
        self._impl(obj).__set__(obj, value)


def _dual(name: str) -> type:
    """Lightning class ``name`` of every installed package as one class (see the module docstring)."""
    classes = tuple(dict.fromkeys(getattr(module, name) for _, module in PACKAGES))
    if len(classes) == 1:
        return classes[0]
    names: set[str] = set()
    for cls in classes:
        names.update(k for klass in cls.__mro__ if "lightning" in klass.__module__ for k in vars(klass))
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": f"{name} of every installed Lightning package."}
    for attr in sorted(names):
        if attr.startswith("__") and attr.endswith("__"):
            continue
        impls = {pkg: inspect.getattr_static(cls, attr, None) for (pkg, _), cls in zip(PACKAGES, classes, strict=True)}
        values = list(impls.values())
        if any(v is None for v in values) or all(v is values[0] for v in values):
            continue
        data = any(hasattr(v, "__set__") for v in values)
        namespace[attr] = (_PerPackageData if data else _PerPackage)(impls)
    return type(name, classes, namespace)


if TYPE_CHECKING:  # both packages have the same interface; check against the declared dependency
    from pytorch_lightning import LightningDataModule, LightningModule, Trainer
else:
    LightningModule = _dual("LightningModule")
    LightningDataModule = _dual("LightningDataModule")
    Trainer = _primary.Trainer  # for type hints only

_LIGHTNING_OPTIMIZERS: tuple[type, ...] = tuple(
    importlib.import_module(f"{name}.core.optimizer").LightningOptimizer for name, _ in PACKAGES
)
_TENSORBOARD_LOGGERS: tuple[type, ...] = tuple(
    importlib.import_module(f"{name}.loggers").TensorBoardLogger for name, _ in PACKAGES
)

rank_zero_warn = _primary.utilities.rank_zero_warn
rank_zero_info = _primary.utilities.rank_zero_info


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` of either package (else ``optimizer``)."""
    if isinstance(optimizer, _LIGHTNING_OPTIMIZERS):
        return optimizer.optimizer  # type: ignore[attr-defined]
    return optimizer  # type: ignore[no-any-return]


def is_tensorboard_logger(logger: Any) -> bool:
    """Whether ``logger`` is either package's ``TensorBoardLogger`` (or a subclass)."""
    return isinstance(logger, _TENSORBOARD_LOGGERS)


def lightning_cli(package: str) -> Any:
    """The ``LightningCLI`` class of ``package`` (``"pytorch_lightning"`` or ``"lightning.pytorch"``).

    Raises:
        ValueError: another ``package``.
    """
    if package not in PACKAGE_NAMES:
        raise ValueError(f"`package` must be one of {PACKAGE_NAMES}, got {package!r}.")
    return importlib.import_module(f"{package}.cli").LightningCLI


class _AppCLI:
    """Mixin of :func:`app_cli`'s classes; ``package`` is the class attribute it sets."""

    package: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Until attached to a Trainer, the modules this CLI builds dispatch to its package: its
        # automatic optimizer mode asks (is_overridden) whether the model has its own configure_optimizers.
        token = _CLI_PACKAGE.set(self.package)
        try:
            super().__init__(*args, **kwargs)
        finally:
            _CLI_PACKAGE.reset(token)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None:
            super().parse_arguments(parser, args)  # type: ignore[misc]
            return
        argv = sys.argv  # `args` stand for the command line: hidden from the parser, not from the run
        sys.argv = argv[:1]
        try:
            super().parse_arguments(parser, args)  # type: ignore[misc]
        finally:
            sys.argv = argv

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)  # type: ignore[attr-defined]
        _check_optimizer_modes(config)
        super().before_instantiate_classes()  # type: ignore[misc]


def _class_name(value: Any) -> str:
    return str(getattr(value, "class_path", value))


def _check_optimizer_modes(config: Any) -> None:
    """Refuses the optimizer and scheduler arguments that LightningCLI would silently drop.

    LightningCLI's automatic mode (top-level ``optimizer`` and ``lr_scheduler``) replaces the model's
    ``configure_optimizers`` when ``optimizer`` is given, dropping the model's injected ``model.optimizer``
    and ``model.lr_scheduler``; without ``optimizer`` it ignores ``lr_scheduler``.

    Raises:
        ValueError: naming the arguments and the fix.
    """
    optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
    injected, injected_scheduler = config.get("model.optimizer"), config.get("model.lr_scheduler")
    takes_scheduler = "model.lr_scheduler" in config
    if optimizer is not None and injected is not None:
        raise ValueError(
            f"Both `optimizer` ({_class_name(optimizer)}, LightningCLI's automatic mode) and `model.optimizer` "
            f"({_class_name(injected)}, dependency injection) are given: LightningCLI would build the top-level one "
            "and drop `model.optimizer` (its warning names only configure_optimizers). Give the optimizer once: e.g. "
            f"`--model.optimizer {_class_name(optimizer)}` in place of `--optimizer`, or remove `model.optimizer`."
        )
    if scheduler is not None and optimizer is None:
        where = (
            f"the optimizer is injected as `model.optimizer` ({_class_name(injected)})"
            if injected is not None
            else "no top-level `optimizer` is given (the model's own optimizer is used)"
        )
        fix = (
            f"give it to the model: `--model.lr_scheduler {_class_name(scheduler)}` (its init_args as "
            "`--model.lr_scheduler.<name>`)"
            if takes_scheduler
            else "give a top-level `--optimizer` too"
        )
        raise ValueError(
            f"`lr_scheduler` ({_class_name(scheduler)}) is LightningCLI's automatic-mode scheduler and applies only "
            f"with a top-level `optimizer`; here {where}, so it would be silently ignored. Instead, {fix}."
        )
    if injected_scheduler is not None and optimizer is not None:
        raise ValueError(
            f"`model.lr_scheduler` ({_class_name(injected_scheduler)}) schedules the model's optimizer, but the "
            f"top-level `optimizer` ({_class_name(optimizer)}) replaces the model's configure_optimizers, so it would "
            f"be silently ignored. Give the scheduler as `--lr_scheduler {_class_name(injected_scheduler)}` with the "
            "top-level optimizer, or the optimizer as `--model.optimizer`."
        )


def injected_optimizers(optimizer: Optimizer, lr_scheduler: Callable[[Optimizer], Any] | None = None) -> Any:
    """``configure_optimizers``' value in LightningCLI's dependency-injection mode, shaped as its automatic mode's.

    Args:
        optimizer: the optimizer (built from ``model.optimizer`` or the model's default).
        lr_scheduler: ``model.lr_scheduler`` (``optimizer -> scheduler``), stepped once per epoch as
            LightningCLI's ``--lr_scheduler``; ``None``: no scheduler. A ``ReduceLROnPlateau`` needs a
            ``monitor`` attribute (the CLI's own ``ReduceLROnPlateau`` takes it as an init argument).

    Raises:
        ValueError: a ``ReduceLROnPlateau`` without ``monitor``, before any training step.
    """
    if lr_scheduler is None:
        return optimizer
    scheduler = lr_scheduler(optimizer)
    if isinstance(scheduler, ReduceLROnPlateau):
        monitor = getattr(scheduler, "monitor", None)
        if monitor is None:
            raise ValueError(
                "`model.lr_scheduler` is torch's ReduceLROnPlateau, which needs a metric to monitor: use the CLI's "
                "subclass, which takes it: `--model.lr_scheduler lightning.pytorch.cli.ReduceLROnPlateau "
                "--model.lr_scheduler.monitor val/loss` (or `pytorch_lightning.cli.ReduceLROnPlateau`)."
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor}}
    return [optimizer], [scheduler]


def app_cli(package: str) -> type:
    """``package``'s ``LightningCLI`` for the example apps (``examples/*_cli.py``).

    It refuses, before building anything, the optimizer and scheduler arguments LightningCLI would
    silently drop (``optimizer`` with ``model.optimizer``; ``lr_scheduler`` without ``optimizer``;
    ``model.lr_scheduler`` with ``optimizer``): a ``ValueError`` naming them and the fix. Two
    more differences, both about warnings Lightning would print on every run:

    - given ``args``, it parses them as the whole command line: ``sys.argv`` is hidden while
      they are parsed (LightningCLI warns when it sees both: a script's own options,
      ``--lightning``, pytest's). The run sees the real ``sys.argv`` (DDP's launcher starts the
      other ranks from it).
    - while it builds the classes, our dual-package modules dispatch to ``package``: before they
      are attached to a Trainer they do not know it, and the CLI's automatic optimizer mode asks
      then whether the model overrides ``configure_optimizers``.

    Raises:
        ValueError: ``package`` is not one of :data:`PACKAGE_NAMES`.
    """
    base = lightning_cli(package)
    return type(base.__name__, (_AppCLI, base), {"package": package, "__module__": __name__})


def main_args(argv: list[str]) -> tuple[list[str], str]:
    """``(arguments, package)`` of an app's command line: a leading ``--lightning`` picks ``lightning.pytorch``."""
    if argv[:1] == ["--lightning"]:
        return argv[1:], PACKAGE_NAMES[1]
    return argv, PACKAGE_NAMES[0]
