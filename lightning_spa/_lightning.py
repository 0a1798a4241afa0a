"""The single place that knows which Lightning package(s) are installed.

Users run either ``pytorch_lightning`` or the unified ``lightning`` (``lightning.pytorch``),
and often have both installed. Our callbacks subclass the ``Callback`` of *every* installed
package, so a Trainer or LightningCLI from either one accepts them; everything else here
(optimizer unwrapping, logger checks, warnings) accepts the classes of both packages.
Callbacks import Lightning only through this module.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch.optim import Optimizer

__all__ = [
    "PACKAGES",
    "Callback",
    "LightningModule",
    "Trainer",
    "is_tensorboard_logger",
    "rank_zero_info",
    "rank_zero_warn",
    "unwrap_optimizer",
]


def _installed(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# (module name, module) of each installed package, pytorch_lightning first (our declared dependency).
PACKAGES: tuple[tuple[str, Any], ...] = tuple(
    (name, module)
    for name, module in ((n, _installed(n)) for n in ("pytorch_lightning", "lightning.pytorch"))
    if module is not None
)
if not PACKAGES:  # pragma: no cover - pytorch-lightning is a dependency
    raise ImportError("lightning_spa's callbacks need `pytorch-lightning` or `lightning`: pip install lightning-spa")

_primary = PACKAGES[0][1]
# Static names for type hints (both packages' Trainer/LightningModule have the same interface).
Trainer = _primary.Trainer
LightningModule = _primary.LightningModule

_CALLBACK_BASES: tuple[type, ...] = tuple(dict.fromkeys(module.Callback for _, module in PACKAGES))
if len(_CALLBACK_BASES) == 1:
    Callback: type = _CALLBACK_BASES[0]
else:
    # A subclass of both packages' Callback: both define the same hooks with empty bodies, and
    # each Trainer calls hooks by name, so one class serves either Trainer and either CLI.
    Callback = type("Callback", _CALLBACK_BASES, {"__module__": __name__, "__doc__": "Callback of both packages."})

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
