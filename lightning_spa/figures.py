r"""Paper Figure 1: one hyper-parameter change seen in both forms (``THEORY.md`` section 3).

A change at step 20 of 100 from ``(eta, c) = (1, 0.1)``, i.e. ``(alpha, beta) = (0.1, 0.9)``:

- (a) SGD+M ``alpha`` 10x down  ->  SPA ``eta`` grows, ``c`` shrinks geometrically;
- (b) SGD+M ``beta`` 0.9 -> 0.8  ->  the same drift;
- (c) SPA ``eta`` 10x down      ->  SGD+M ``beta`` 9 for one step;
- (d) SPA ``c`` 0.1 -> 1        ->  ``alpha`` 10x up, ``beta`` 0;
- (e) SPA ``eta`` 10x down, ``c`` 10x up  ->  ``beta`` 9, then ``alpha`` 0.1 and ``beta`` 0;
- (f) as (e), geometric with ratio ``r = 1.1`` a step  ->  ``beta = (1 - c_{k-1}) r <= 0.99``.

The panel data needs no plotting library; :func:`plot_figure1` and :func:`plot_conversion`
import matplotlib when called (``pip install 'lightning-spa[examples]'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_spa.convert import ConversionReport, convert_sgdm, convert_spa, sgdm_schedule
from lightning_spa.mapping import spa_to_sgdm
from lightning_spa.schedule import MomentumRemoval, StepDecay

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["Panel", "figure1_panels", "plot_conversion", "plot_figure1", "require_matplotlib"]

STEPS, CHANGE = 100, 20


@dataclass(frozen=True)
class Panel:
    """One panel of Figure 1: its letter, what was changed, and the schedule in both forms."""

    letter: str
    title: str
    report: ConversionReport


def _geometric_panel_f(r: float = 1.1) -> ConversionReport:
    eta = [1.0 if k < CHANGE else max(0.1, r ** -(k - CHANGE + 1)) for k in range(STEPS)]
    c = [0.1 if k < CHANGE else min(1.0, 0.1 * r ** (k - CHANGE + 1)) for k in range(STEPS)]
    alpha, beta = spa_to_sgdm(eta, c)
    flags = [(k, b) for k, b in enumerate(beta) if k >= 1 and b >= 1.0]
    return ConversionReport("spa", f"SPA eta /{r:g} and c x{r:g} a step", alpha, beta, eta, c, momentum_ge_1=flags)


def figure1_panels() -> list[Panel]:
    """The six panels (a-f) of paper Figure 1 as :class:`~lightning_spa.convert.ConversionReport` s."""
    a_alpha, a_beta = sgdm_schedule(STEPS, 0.1, 0.9, [CHANGE], factor=0.1)
    b_alpha, b_beta = sgdm_schedule(STEPS, 0.1, 0.9, [CHANGE], factor=1.0, momentum_after=[0.8])
    return [
        Panel("a", "SGD+M: lr 10x down", convert_sgdm(a_alpha, a_beta, "SGD+M lr 10x down at step 20")),
        Panel("b", "SGD+M: momentum 0.9 -> 0.8", convert_sgdm(b_alpha, b_beta, "SGD+M momentum 0.8 at step 20")),
        Panel("c", "SPA: eta 10x down", convert_spa(STEPS, 1.0, 0.1, StepDecay((CHANGE,), 0.1, "lr", 1))),
        Panel("d", "SPA: c 0.1 -> 1", convert_spa(STEPS, 1.0, 0.1, others=[MomentumRemoval(CHANGE)])),
        Panel("e", "SPA: eta 10x down, c 10x up", convert_spa(STEPS, 1.0, 0.1, StepDecay((CHANGE,), 0.1, "paper", 1))),
        Panel("f", "SPA: as (e), geometric r = 1.1", _geometric_panel_f()),
    ]


def require_matplotlib() -> Any:
    """Returns ``matplotlib.pyplot`` with the non-interactive Agg backend, or raises a clear ImportError."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("Plotting needs matplotlib: pip install 'lightning-spa[examples]' (or matplotlib).") from err
    return plt


# Values this far from 1 (decades) go on a linear axis of log10(value): matplotlib's log axis
# computes its margins and ticks as 10**(decade), which overflows a float (numpy "overflow
# encountered in exp/power") for data near 1e308, e.g. the drifting eta of an SGD+M lr drop.
_LOG_AXIS_DECADES = 100.0


def _series(ax: Axes, values: Sequence[float], color: str, name: str) -> None:
    """Plots ``values`` against their step on ``ax``: linear, log scale if they span > 2 decades, log10 if extreme."""
    decades = [math.log10(v) for v in values if v > 0.0]
    wide = bool(decades) and max(decades) - min(decades) > 2.0
    if wide and max(abs(d) for d in decades) > _LOG_AXIS_DECADES:
        ax.plot(range(len(values)), [math.log10(v) if v > 0.0 else math.nan for v in values], color=color)
        ax.set_ylabel(f"log10 {name}", color=color)
        return
    ax.plot(range(len(values)), values, color=color)
    ax.set_ylabel(name, color=color)
    if wide:
        ax.set_yscale("log")


def _draw(ax_sgd: Axes, ax_spa: Axes, report: ConversionReport, title: str) -> None:
    steps = range(report.total_steps)
    _series(ax_sgd, report.alpha, "C0", "lr")
    twin = ax_sgd.twinx()
    twin.plot(steps, report.beta, color="C1", label="momentum (beta)")
    twin.axhline(1.0, color="0.6", lw=0.8, ls=":")
    for k, b in report.momentum_ge_1:
        twin.plot([k], [b], "rv", ms=6)
    twin.set_ylabel("momentum", color="C1")
    ax_sgd.set_title(f"{title}\nSGD+M form", fontsize=9)
    _series(ax_spa, report.eta, "C2", "eta")
    _series(ax_spa.twinx(), report.c, "C3", "c")
    if report.no_spa_equivalent is not None:
        ax_spa.axvline(report.no_spa_equivalent["step"], color="r", ls="--", lw=1)
        ax_spa.text(0.02, 0.9, f"no SPA form from step {report.no_spa_equivalent['step']}", color="r",
                    transform=ax_spa.transAxes, fontsize=8)
    ax_spa.set_title("SPA form", fontsize=9)
    ax_spa.set_xlabel("step")


def plot_conversion(report: ConversionReport, out: str | Path, title: str = "") -> Path:
    """Draws both forms of one schedule (lr/momentum above, eta/c below) into a PNG.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = require_matplotlib()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    _draw(ax1, ax2, report, title or report.description)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_figure1(out: str | Path) -> Path:
    """Draws the six panels of Figure 1 (each in both forms) into a PNG.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = require_matplotlib()
    panels = figure1_panels()
    fig, axes = plt.subplots(4, 3, figsize=(15, 12))
    for i, panel in enumerate(panels):
        row, col = 2 * (i // 3), i % 3
        _draw(axes[row][col], axes[row + 1][col], panel.report, f"({panel.letter}) {panel.title}")
    fig.suptitle("Figure 1: a change at step 20 from eta=1, c=0.1 (lr 0.1, momentum 0.9), in both forms")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
