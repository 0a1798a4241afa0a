r"""Theorem 1 of Defazio (2020) as scalar functions: the one place the mapping is written.

SGD+M (torch form) ``m_{k+1} = beta_k m_k + g_k;  x_{k+1} = x_k - alpha_k m_{k+1}`` and SPA
``z_{k+1} = z_k - eta_k g_k;  x_{k+1} = (1 - c_k) x_k + c_k z_{k+1}`` give the same ``x_k`` when,
for every optimizer step ``k`` (``THEORY.md`` section 2)::

    alpha_k = c_k * eta_k
    beta_k  = (1 - c_{k-1}) * eta_{k-1} / eta_k        (k >= 1; beta_0 has no effect)

For a constant schedule this is ``alpha = c * eta``, ``beta = 1 - c``, and conversely
``eta = alpha / (1 - beta)``, ``c = 1 - beta`` (``lr 0.1, momentum 0.9 <=> eta 1.0, c 0.1``).

Plain floats in, plain floats out: no torch and no Lightning import, so the command line, the
schedules and the callbacks share it at no import cost. Range checks belong to the callers,
which know the argument names the user gave; these functions only refuse what has no value.
"""

from __future__ import annotations

__all__ = ["constant_sgdm_to_spa", "constant_spa_to_sgdm", "step_momentum", "step_spa_to_sgdm"]


def constant_sgdm_to_spa(lr: float, momentum: float) -> tuple[float, float]:
    """``(eta, c)`` of the constant SPA schedule equal to constant SGD+M ``(lr, momentum)``.

    ``eta = lr / (1 - momentum)`` and ``c = 1 - momentum``.

    Raises:
        ValueError: ``momentum >= 1`` (no constant SPA form; ``c`` would be <= 0).
    """
    lr, momentum = float(lr), float(momentum)
    if not momentum < 1.0:
        raise ValueError(f"momentum {momentum} >= 1 has no constant SPA form (c = 1 - momentum must be > 0).")
    return lr / (1.0 - momentum), 1.0 - momentum


def constant_spa_to_sgdm(eta: float, c: float) -> tuple[float, float]:
    """``(lr, momentum)`` of constant SGD+M equal to the constant SPA schedule ``(eta, c)``.

    ``lr = c * eta`` and ``momentum = 1 - c``.
    """
    eta, c = float(eta), float(c)
    return c * eta, 1.0 - c


def step_momentum(eta: float, prev_eta: float, prev_c: float) -> float:
    """The Theorem-1 SGD+M momentum of a step: ``beta_k = (1 - c_{k-1}) * eta_{k-1} / eta_k``.

    Returns ``inf`` for ``eta_k = 0`` after a step with momentum (the z-form is still defined
    there, see ``THEORY.md`` section 9, but no SGD+M step reproduces it), and ``0`` when the
    previous step carried no momentum (``c_{k-1} = 1`` or ``eta_{k-1} = 0``).
    """
    scale = (1.0 - float(prev_c)) * float(prev_eta)
    if scale == 0.0:
        return 0.0
    eta = float(eta)
    return scale / eta if eta != 0.0 else float("inf")


def step_spa_to_sgdm(eta: float, c: float, prev: tuple[float, float] | None) -> tuple[float, float]:
    """``(lr, momentum)`` of step ``k`` from ``(eta_k, c_k)`` and ``prev = (eta_{k-1}, c_{k-1})``.

    ``prev=None`` (step 0, or no history) reports ``momentum = 1 - c_k``, as if the schedule had
    been constant before (``beta_0`` has no effect).
    """
    if prev is None:
        return constant_spa_to_sgdm(eta, c)
    return float(c) * float(eta), step_momentum(eta, prev[0], prev[1])
