"""lightning_spa: SGD with momentum as stochastic primal averaging, for PyTorch Lightning.

Theory: A. Defazio, "Momentum via Primal Averaging" (arXiv 2010.00406); see THEORY.md.

Public names are imported lazily (PEP 562): ``from lightning_spa import SPA`` or the scalar
mapping never import Lightning; the callbacks import it when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_spa._lazy import lazy_names

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "SPA": "lightning_spa.optim",
    "SPASpikeWarning": "lightning_spa.optim",
    "sgd_state_dict_to_spa": "lightning_spa.mapping",
    "GradualSchedule": "lightning_spa.callbacks",
    "MomentumDiagnostics": "lightning_spa.callbacks",
    "MomentumOff": "lightning_spa.callbacks",
    "MeasuredMomentumOff": "lightning_spa.callbacks",
    "MomentumOffDecision": "lightning_spa.decision",
    "MomentumGuard": "lightning_spa.guard",
    "GroupedSGD": "lightning_spa.factory",
    "GroupedSPA": "lightning_spa.factory",
    "build_optimizer": "lightning_spa.factory",
    "spa_param_groups": "lightning_spa.factory",
    "sgdm_optimizer_to_spa": "lightning_spa.mapping",
    "sgdm_to_spa": "lightning_spa.mapping",
    "spa_optimizer_to_sgdm": "lightning_spa.mapping",
    "spa_to_sgdm": "lightning_spa.mapping",
}

__all__ = [
    "SPA",
    "SPASpikeWarning",
    "sgd_state_dict_to_spa",
    "GradualSchedule",
    "GroupedSGD",
    "GroupedSPA",
    "MomentumDiagnostics",
    "MomentumOff",
    "MeasuredMomentumOff",
    "MomentumOffDecision",
    "MomentumGuard",
    "build_optimizer",
    "sgdm_optimizer_to_spa",
    "sgdm_to_spa",
    "spa_optimizer_to_sgdm",
    "spa_param_groups",
    "spa_to_sgdm",
]

if TYPE_CHECKING:
    from lightning_spa.callbacks import GradualSchedule, MeasuredMomentumOff, MomentumDiagnostics, MomentumOff
    from lightning_spa.decision import MomentumOffDecision
    from lightning_spa.factory import GroupedSGD, GroupedSPA, build_optimizer, spa_param_groups
    from lightning_spa.guard import MomentumGuard
    from lightning_spa.mapping import (
        sgd_state_dict_to_spa,
        sgdm_optimizer_to_spa,
        sgdm_to_spa,
        spa_optimizer_to_sgdm,
        spa_to_sgdm,
    )
    from lightning_spa.optim import SPA, SPASpikeWarning


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
