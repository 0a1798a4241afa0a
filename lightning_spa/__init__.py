"""lightning_spa: SGD with momentum as stochastic primal averaging, for PyTorch Lightning.

Theory: A. Defazio, "Momentum via Primal Averaging" (arXiv 2010.00406); see THEORY.md.
"""

from lightning_spa.callbacks import GradualSchedule, MomentumDiagnostics, MomentumOff
from lightning_spa.factory import GroupedSGD, GroupedSPA, build_optimizer, spa_param_groups
from lightning_spa.mapping import sgdm_optimizer_to_spa, sgdm_to_spa, spa_optimizer_to_sgdm, spa_to_sgdm
from lightning_spa.optim import SPA

__version__ = "0.1.0"

__all__ = [
    "SPA",
    "GradualSchedule",
    "GroupedSGD",
    "GroupedSPA",
    "MomentumDiagnostics",
    "MomentumOff",
    "build_optimizer",
    "sgdm_optimizer_to_spa",
    "sgdm_to_spa",
    "spa_optimizer_to_sgdm",
    "spa_param_groups",
    "spa_to_sgdm",
]
