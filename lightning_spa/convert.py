r"""Schedules in both forms, checked against Theorem 1: the engine of ``lightning-spa convert``.

Notation (``THEORY.md`` sections 2, 5, 6, 9): SGD+M ``(alpha_k, beta_k)`` (``lr``, ``momentum``)
and SPA ``(eta_k, c_k)``, indexed by the optimizer step ``k`` that uses them; a Keras/TensorFlow
schedule ``(lr_k, mu_k)`` keeps the learning rate inside the velocity. A schedule given in one
form is expanded step by step (SPA schedules through :mod:`lightning_spa.schedule`), mapped to
the other forms (:mod:`lightning_spa.mapping`, on the scalar Theorem 1 of
:mod:`lightning_spa.theorem`) and checked:

- every step whose equivalent momentum ``beta_k >= 1`` (a sudden fall of ``eta``);
- a step with no SPA equivalent (:class:`~lightning_spa.mapping.NoSPAEquivalentError`): with
  ``lr > 0`` every SGD+M schedule has one, so this is left for ``lr = 0`` steps;
- the smallest geometric transition ``T`` that keeps ``beta_k < 1`` throughout.

The result is summarised as segments: maximal step ranges on which each value is constant,
geometric (constant ratio a step) or varying, so a 100k-step schedule prints in a few lines.
No Lightning, torch or matplotlib import here (``tests/test_imports.py``): schedules are
expanded and mapped in plain Python, so ``lightning-spa convert`` starts in a fraction of the
time of ``import torch`` (``benchmarks/cli_startup.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any, Literal

from lightning_spa.mapping import NoSPAEquivalentError, keras_to_spa, sgdm_to_spa, spa_to_sgdm
from lightning_spa.schedule import SPASchedule, StepDecay, compose, smallest_safe_transition_steps
from lightning_spa.theorem import constant_sgdm_to_spa

__all__ = [
    "ConversionReport",
    "Segment",
    "convert_keras",
    "convert_sgdm",
    "convert_spa",
    "segments",
    "sgdm_schedule",
    "spa_schedule",
]

_RTOL = 1e-7  # values closer than this print alike (6 significant digits) and count as constant


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_RTOL)


@dataclass(frozen=True)
class Segment:
    """Steps ``start..end`` (inclusive) of one value: ``kind`` is constant, geometric, single or varying."""

    start: int
    end: int
    kind: Literal["constant", "geometric", "single", "varying"]
    first: float
    last: float
    ratio: float | None = None  # per step, for "geometric"
    low: float | None = None  # for "varying"
    high: float | None = None

    def describe(self) -> str:
        """A short human-readable form, e.g. ``1 -> 0.1 (x0.9 a step)``."""
        if self.kind in ("constant", "single"):
            return f"{self.first:.6g}"
        if self.kind == "geometric":
            return f"{self.first:.6g} -> {self.last:.6g} (x{self.ratio:.6g} a step)"
        return f"{self.first:.6g} -> {self.last:.6g} (range {self.low:.6g}..{self.high:.6g})"


def _classify(values: Sequence[float], start: int, end: int) -> Segment:
    v = values[start : end + 1]
    if len(v) == 1:
        return Segment(start, end, "single", v[0], v[0])
    if all(_close(x, v[0]) for x in v):
        return Segment(start, end, "constant", v[0], v[-1])
    if all(x != 0.0 for x in v):
        ratios = [b / a for a, b in pairwise(v)]
        if all(math.isclose(r, ratios[0], rel_tol=1e-6) for r in ratios):
            return Segment(start, end, "geometric", v[0], v[-1], ratio=ratios[0])
    return Segment(start, end, "varying", v[0], v[-1], low=min(v), high=max(v))


def _run_length(values: Sequence[float], start: int, cap: int) -> int:
    """Length (at most ``cap``) of the run of values close to ``values[start]`` that starts there."""
    n, j = len(values), start
    while j + 1 < n and j + 1 - start < cap and _close(values[j + 1], values[start]):
        j += 1
    return j - start + 1


def _breaks(values: Sequence[float], min_run: int = 8) -> list[int]:
    """Start indices of constant runs (at least ``min_run`` steps, or reaching an end) and of the stretches between.

    Shorter runs of equal values (a slow drift seen at 6 significant digits) belong to the
    stretch around them, so a drifting value prints as one "varying" segment.
    """
    n, starts, i = len(values), [], 0

    def is_run(k: int) -> bool:
        length = _run_length(values, k, min_run)
        return length >= min_run or k + length == n or (k == 0 and length >= 2)

    while i < n:
        starts.append(i)
        if is_run(i):
            i += _run_length(values, i, n)
            continue
        i += 1
        while i < n and not is_run(i):
            i += 1
    return starts


def segments(*series: Sequence[float]) -> list[tuple[int, int, list[Segment]]]:
    """Joint segmentation of equal-length series: rows ``(start, end, [one Segment per series])``."""
    n = len(series[0])
    cuts = sorted({b for s in series for b in _breaks(s)} | {n})
    return [(a, b - 1, [_classify(s, a, b - 1) for s in series]) for a, b in pairwise(cuts)]


@dataclass
class ConversionReport:
    """Both forms of a schedule and what Theorem 1 says about it.

    ``eta``/``c`` stop at ``no_spa_equivalent["step"]`` when the SGD+M schedule has no SPA form
    from that step on. For ``source == "keras"`` ``keras`` holds the given ``(lr, momentum)`` and
    ``alpha``/``beta`` the torch SGD schedule that reproduces it. ``note`` says which SPA form was
    chosen when that is not the obvious one.
    """

    source: str
    description: str
    alpha: list[float]
    beta: list[float]
    eta: list[float]
    c: list[float]
    momentum_ge_1: list[tuple[int, float]] = field(default_factory=list)
    no_spa_equivalent: dict[str, Any] | None = None
    suggestion: dict[str, Any] | None = None
    keras: tuple[list[float], list[float]] | None = None
    note: str | None = None

    @property
    def total_steps(self) -> int:
        return len(self.alpha)

    def to_dict(self, per_step: bool = False) -> dict[str, Any]:
        """JSON-ready summary (segments, flags, suggestion; the per-step values only if asked)."""
        out: dict[str, Any] = {
            "source": self.source,
            "description": self.description,
            "total_steps": self.total_steps,
            "sgdm": [
                {"start": a, "end": b, "lr": asdict(s[0]), "momentum": asdict(s[1])}
                for a, b, s in segments(self.alpha, self.beta)
            ],
            "spa": [
                {"start": a, "end": b, "eta": asdict(s[0]), "c": asdict(s[1])}
                for a, b, s in (segments(self.eta, self.c) if self.eta else [])
            ],
            "momentum_ge_1": [{"step": k, "momentum": m} for k, m in self.momentum_ge_1],
            "no_spa_equivalent": self.no_spa_equivalent,
            "suggestion": self.suggestion,
            "note": self.note,
        }
        if self.keras is not None:
            out["keras"] = [
                {"start": a, "end": b, "lr": asdict(s[0]), "momentum": asdict(s[1])}
                for a, b, s in segments(*self.keras)
            ]
        if per_step:
            out["per_step"] = {"lr": self.alpha, "momentum": self.beta, "eta": self.eta, "c": self.c}
            if self.keras is not None:
                out["per_step"].update(keras_lr=self.keras[0], keras_momentum=self.keras[1])
        return out


def spa_schedule(
    total_steps: int,
    eta0: float = 1.0,
    c0: float = 0.1,
    schedules: Sequence[SPASchedule] = (),
) -> tuple[list[float], list[float]]:
    """Expands composed :mod:`lightning_spa.schedule` schedules into per-step ``(eta, c)`` lists."""
    pairs = [compose(schedules, k, eta0, c0) for k in range(total_steps)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def sgdm_schedule(
    total_steps: int,
    lr: float,
    momentum: float,
    milestones: Sequence[int] = (),
    factor: float = 0.1,
    momentum_after: Sequence[float] = (),
    transition_steps: int = 1,
    warmup_steps: int = 0,
) -> tuple[list[float], list[float]]:
    """Per-step SGD+M ``(lr, momentum)``: at each milestone ``lr *= factor`` and momentum moves on.

    Over a transition of ``T`` steps starting at milestone ``m``, step ``m + j`` has moved a
    share ``(j+1)/T`` of the way: ``lr`` geometrically, momentum linearly (it may reach 0).
    A linear warm-up multiplies ``lr`` at step ``k < W`` by ``(k+1)/W`` (the rule of
    :class:`~lightning_spa.schedule.StepDecay`'s ``warmup_steps``). The same expansion serves a
    Keras schedule (``lr`` and momentum in Keras' meaning).

    Args:
        total_steps: number of optimizer steps.
        lr: starting learning rate ``alpha_0``.
        momentum: starting momentum ``beta_0``.
        milestones: optimizer steps where a change starts (strictly increasing).
        factor: multiplier of ``lr`` at each milestone, > 0 (1 keeps it).
        momentum_after: momentum after each milestone (one per milestone), or empty to keep it.
        transition_steps: ``T >= 1`` (1 is instant).
        warmup_steps: ``W >= 0`` steps of linear ``lr`` warm-up (0: none).

    Raises:
        ValueError: bad counts or lengths, or a non-positive ``factor``.
    """
    if momentum_after and len(momentum_after) != len(milestones):
        raise ValueError(
            f"`momentum_after` has {len(momentum_after)} values for {len(milestones)} milestones: "
            "give one per milestone."
        )
    if not factor > 0.0:
        raise ValueError(f"`factor` must be > 0, got {factor}.")
    if transition_steps < 1:
        raise ValueError(f"`transition_steps` must be >= 1, got {transition_steps}.")
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
    betas_after = list(momentum_after) if momentum_after else [momentum] * len(milestones)
    alphas, betas = [], []
    for k in range(total_steps):
        a, b = float(lr), float(momentum)
        for i, m in enumerate(milestones):
            if k < m:
                break
            frac = min(1.0, (k - m + 1) / transition_steps)
            a *= factor**frac
            b_prev = b
            b = b_prev + (betas_after[i] - b_prev) * frac
        if k < warmup_steps:
            a *= (k + 1) / warmup_steps
        alphas.append(a)
        betas.append(b)
    return alphas, betas


def _flags(beta: Sequence[float]) -> list[tuple[int, float]]:
    return [(k, b) for k, b in enumerate(beta) if k >= 1 and b >= 1.0]


def convert_spa(
    total_steps: int,
    eta0: float = 1.0,
    c0: float = 0.1,
    decay: StepDecay | None = None,
    others: Sequence[SPASchedule] = (),
    description: str = "",
) -> ConversionReport:
    """Expands an SPA schedule, maps it to SGD+M and flags every step with momentum ``>= 1``.

    Args:
        total_steps: number of optimizer steps (> 0).
        eta0: starting ``eta``.
        c0: starting ``c``.
        decay: the milestone schedule, if any (its safe transition is suggested).
        others: other schedules composed with it (e.g. :class:`~lightning_spa.schedule.MomentumRemoval`).
        description: a one-line summary for the report.

    Raises:
        ValueError: ``total_steps < 1`` or invalid ``eta0``/``c0``.

    Example::

        r = convert_spa(100, 1.0, 0.1, StepDecay((20,), 0.1, "paper", 1))
        r.momentum_ge_1   # [(20, 9.0)]: the spike of Figure 1e
    """
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, got {total_steps}.")
    schedules: list[SPASchedule] = [*([decay] if decay is not None else []), *others]
    eta, c = spa_schedule(total_steps, eta0, c0, schedules)
    alpha, beta = spa_to_sgdm(eta, c)
    report = ConversionReport("spa", description, alpha, beta, eta, c, momentum_ge_1=_flags(beta))
    if decay is not None and decay.milestones:
        t = smallest_safe_transition_steps(decay, list(others), [(eta0, c0)])  # whole transitions, past the end too
        if t is not None:
            rate = float(decay.factor) ** (-1.0 / t)
            safe = StepDecay(decay.milestones, decay.factor, decay.mode, t, decay.warmup_steps)
            _, safe_beta = spa_to_sgdm(*spa_schedule(total_steps, eta0, c0, [safe, *others]))
            report.suggestion = {
                "transition_steps": t,
                "eta_ratio_per_step": 1.0 / rate,
                "max_momentum": max(safe_beta[1:], default=safe_beta[0]),
                "text": (
                    f"geometric transition over {t} steps (eta x{1.0 / rate:.6g} a step"
                    + (", c rising as fast until 1" if decay.mode == "paper" else "")
                    + f"): largest equivalent momentum {max(safe_beta[1:], default=safe_beta[0]):.6g} < 1. That is "
                    "the shortest safe transition; longer ones keep the momentum further from 1 (the paper spreads "
                    "each over a few epochs)"
                ),
            }
        else:
            report.suggestion = {
                "transition_steps": None,
                "text": "no geometric transition that fits between the milestones keeps the momentum below 1",
            }
    return report


def convert_sgdm(
    alpha: Sequence[float],
    beta: Sequence[float],
    description: str = "",
    milestones: Sequence[int] = (),
    factor: float = 0.1,
    eta0: float | str | None = None,
) -> ConversionReport:
    """Maps a per-step SGD+M schedule to SPA; names the first step with no SPA equivalent.

    Args:
        alpha: per-step learning rates.
        beta: per-step momenta.
        description: a one-line summary for the report.
        milestones: the milestones of ``alpha`` (for the suggestion of the paper's SPA recipe).
        factor: the ``lr`` factor at each milestone.
        eta0: the free initial ``eta`` (see :func:`~lightning_spa.mapping.sgdm_to_spa`): None for
            ``lr/(1-momentum)``, or ``"bounded"`` for the SPA form that stays finite.

    Example::

        a, b = sgdm_schedule(100, 0.1, 0.5, milestones=[20], factor=1.0, momentum_after=[0.9])
        convert_sgdm(a, b).no_spa_equivalent["step"]   # 21: a rising momentum drives c above 1
    """
    alpha, beta = [float(a) for a in alpha], [float(b) for b in beta]
    report = ConversionReport("sgdm", description, alpha, beta, [], [], momentum_ge_1=_flags(beta))
    try:
        report.eta, report.c = sgdm_to_spa(alpha, beta, eta0=eta0)
    except NoSPAEquivalentError as err:
        report.no_spa_equivalent = {"step": err.step, "reason": err.reason}
        if err.step > 0:
            report.eta, report.c = sgdm_to_spa(alpha[: err.step], beta[: err.step], eta0=eta0)
    natural = constant_sgdm_to_spa(alpha[0], beta[0])[0] if beta[0] < 1.0 else None
    if eta0 is None and report.eta and report.eta[0] != natural:
        report.note = (
            "the constant start eta = lr / (1 - momentum) has no SPA form for this schedule (c would leave (0, 1] "
            "or eta overflow), so the SPA form shown is the bounded one (eta moves ahead of each change; "
            "`--bounded` always picks it)"
        )
    if milestones and 0.0 < factor < 1.0 and beta[0] < 1.0:
        eta0, c0 = constant_sgdm_to_spa(alpha[0], beta[0])  # beta[0] < 1: checked above
        decay = StepDecay(tuple(milestones), factor, "paper", 1)
        t = smallest_safe_transition_steps(decay, [], [(eta0, c0)])
        if t is not None:
            report.suggestion = {
                "transition_steps": t,
                "eta0": eta0,
                "c0": c0,
                "text": (
                    f"the paper's recipe for these milestones: SPA eta {eta0:.6g}, c {c0:.6g}, eta x{factor:g} and "
                    f"c /{factor:g} (max 1) at each milestone, geometric over {t} steps (momentum < 1 throughout)"
                ),
            }
    return report


def convert_keras(
    lr: Sequence[float],
    momentum: Sequence[float],
    description: str = "",
    milestones: Sequence[int] = (),
    factor: float = 0.1,
) -> ConversionReport:
    """Maps a per-step Keras/TensorFlow SGD schedule to SPA and to torch SGD; flags momentum ``>= 1``.

    Keras' ``v <- mu v - lr g;  x <- x + v`` is SPA with ``eta_k = lr_k / c_k``, ``c`` from
    :func:`~lightning_spa.mapping.keras_to_spa` (``c = 1 - mu`` for a constant momentum), and torch
    SGD with ``lr_k`` and momentum ``mu_k lr_{k-1} / lr_k`` (:func:`~lightning_spa.mapping.keras_to_sgdm`).
    An instant ``lr`` drop in Keras is an instant ``eta`` drop in SPA: torch's momentum exceeds 1
    there and is flagged, as for an SPA schedule (the loss spike of ``THEORY.md`` section 6).
    With ``milestones`` (where ``lr`` is multiplied by ``factor < 1``) at a constant momentum,
    the report suggests the shortest geometric ``lr`` transition that keeps torch's momentum
    below 1 (SPA's ``lr`` mode: ``c = 1 - mu`` stays, ``eta`` moves).

    Raises:
        ValueError: a momentum outside ``[0, 1)`` or an ``lr`` <= 0.

    Example::

        r = convert_keras([0.1] * 20 + [0.01] * 20, [0.9] * 40)
        r.eta[0], r.c[0], r.momentum_ge_1     # 1.0, 0.1, [(20, 9.0)]
    """
    lr, momentum = [float(a) for a in lr], [float(m) for m in momentum]
    if any(not a > 0.0 for a in lr):
        raise ValueError("Keras `lr` must be > 0 at every step for a torch SGD form (SPA runs lr 0 as eta 0).")
    eta, c = keras_to_spa(lr, momentum)
    alpha, beta = spa_to_sgdm(eta, c)
    report = ConversionReport(
        "keras", description, alpha, beta, eta, c, momentum_ge_1=_flags(beta), keras=(lr, momentum)
    )
    if milestones and 0.0 < factor < 1.0 and len(set(momentum)) == 1:
        eta0, c0 = constant_sgdm_to_spa(lr[0], momentum[0])  # Keras at constant mu: c = 1 - mu, eta = lr / c
        t = smallest_safe_transition_steps(StepDecay(tuple(milestones), factor, "lr", 1), [], [(eta0, c0)])
        if t is not None:
            report.suggestion = {
                "transition_steps": t,
                "text": (
                    f"move Keras' lr geometrically over {t} steps (x{factor ** (1.0 / t):.6g} a step) at each "
                    "milestone (`--transition geometric`): the shortest transition whose torch momentum stays below 1"
                ),
            }
    return report

