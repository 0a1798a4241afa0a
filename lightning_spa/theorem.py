r"""Theorem 1 of Defazio (2020) as scalar functions: the one place the mapping is written.

SGD+M (torch form) ``m_{k+1} = beta_k m_k + g_k;  x_{k+1} = x_k - alpha_k m_{k+1}`` and SPA
``z_{k+1} = z_k - eta_k g_k;  x_{k+1} = (1 - c_k) x_k + c_k z_{k+1}`` give the same ``x_k`` when,
for every optimizer step ``k`` (``THEORY.md`` section 2)::

    alpha_k = c_k * eta_k
    beta_k  = (1 - c_{k-1}) * eta_{k-1} / eta_k        (k >= 1; beta_0 has no effect)

For a constant schedule this is ``alpha = c * eta``, ``beta = 1 - c``, and conversely
``eta = alpha / (1 - beta)``, ``c = 1 - beta`` (``lr 0.1, momentum 0.9 <=> eta 1.0, c 0.1``).

One SPA step in the rescaling view (``THEORY.md`` section 9), :func:`spa_step`: the momentum
buffer ``m`` carries the scale ``s = (1 - c_prev) * eta_prev`` (``z = x - s m``). A step with
``(eta, c)`` and gradient ``g`` normalises by ``t = max(s, eta)``::

    m' = (s / t) m + (eta / t) g        x' = x - c t m'        s' = (1 - c) t

``t = eta`` (``eta >= s``) is torch's SGD+M step with ``beta = s / eta <= 1``; ``t = s`` (an
instant drop of eta, down to 0) keeps ``m``, adds ``(eta / s) g`` and moves the scale. No
coefficient exceeds 1 and nothing divides by eta, so ``eta = 0`` and ``eta = 1e-310`` are exact.

Plain floats in, plain floats out: no torch and no Lightning import, so the command line, the
schedules and the callbacks share it at no import cost. Range checks belong to the callers,
which know the argument names the user gave; these functions only refuse what has no value.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "StepCoefficients",
    "constant_sgdm_to_spa",
    "constant_spa_to_sgdm",
    "spa_step",
    "step_momentum",
    "step_spa_to_sgdm",
]

History = tuple[float, float]
"""``(b, c_prev)`` of a momentum buffer: it carries the scale ``s = (1 - c_prev) * b``."""


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

    Exactly ``1 - c_{k-1}`` when ``eta_k == eta_{k-1}``. Returns ``inf`` for ``eta_k = 0`` after
    a step with momentum (the z-form is still defined there, see ``THEORY.md`` section 9, but no
    SGD+M step reproduces it), and ``0`` when the previous step carried no momentum
    (``c_{k-1} = 1`` or ``eta_{k-1} = 0``).
    """
    scale = (1.0 - float(prev_c)) * float(prev_eta)
    if scale == 0.0:
        return 0.0
    eta = float(eta)
    if eta == float(prev_eta):
        return 1.0 - float(prev_c)  # exactly, not (1 - c) * eta / eta: a constant schedule stays bit-exact
    return scale / eta if eta != 0.0 else float("inf")


def step_spa_to_sgdm(eta: float, c: float, prev: tuple[float, float] | None) -> tuple[float, float]:
    """``(lr, momentum)`` of step ``k`` from ``(eta_k, c_k)`` and ``prev = (eta_{k-1}, c_{k-1})``.

    ``prev=None`` (step 0, or no history) reports ``momentum = 1 - c_k``, as if the schedule had
    been constant before (``beta_0`` has no effect).
    """
    if prev is None:
        return constant_spa_to_sgdm(eta, c)
    return float(c) * float(eta), step_momentum(eta, prev[0], prev[1])


class StepCoefficients(NamedTuple):
    """The scalars of one SPA step on a momentum buffer (see :func:`spa_step`).

    ``m' = momentum * m + grad_weight * g`` (``m' = g`` when ``fresh``), then ``x' = x - lr * m'``;
    ``history`` is what ``m'`` carries afterwards (None: no buffer is needed, ``z' = x'``).
    ``lr == 0`` with ``fresh`` and no history means the step moves nothing.
    """

    momentum: float
    grad_weight: float
    lr: float
    history: History | None
    fresh: bool


def spa_step(eta: float, c: float, history: History | None) -> StepCoefficients:
    """The coefficients of SPA step ``(eta, c)`` on a buffer with ``history`` (module docstring).

    Args:
        eta: the step size ``eta_k >= 0`` (0 is allowed: ``z`` stays put, ``x`` averages toward it).
        c: the averaging weight ``c_k`` in ``(0, 1]``.
        history: ``(b, c_prev)`` of the buffer ``m_k`` (scale ``s = (1 - c_prev) * b``), or None
            when there is no buffer (first step, or ``z_k = x_k``).

    While ``eta`` equals ``b`` the momentum is exactly ``1 - c_prev``, so a constant schedule
    performs torch SGD's arithmetic ``SGD(c*eta, momentum=1-c)`` bit for bit.
    """
    eta, c = float(eta), float(c)
    scale = 0.0 if history is None else (1.0 - history[1]) * history[0]
    if history is not None and eta >= scale > 0.0:  # torch's form: t = eta, beta = s / eta <= 1
        beta = step_momentum(eta, history[0], history[1])
        if beta > 0.0:
            return StepCoefficients(beta, 1.0, c * eta, (eta, c) if c < 1.0 else None, False)
        scale = 0.0  # the buffer's weight underflowed: it is forgotten
    if scale == 0.0:  # no usable buffer: m_{k+1} = g_k
        if eta == 0.0:
            return StepCoefficients(0.0, 0.0, 0.0, None, True)
        if c == 1.0:
            return StepCoefficients(0.0, 1.0, eta, None, True)
        return StepCoefficients(1.0 - c, 1.0, c * eta, (eta, c), True)
    # eta < s (an instant drop, down to 0): keep m, move the scale; t = s
    nxt = (scale, c) if c < 1.0 and (1.0 - c) * scale > 0.0 else None
    return StepCoefficients(1.0, eta / scale, c * scale, nxt, False)
