"""Render the diagnostics logged by :class:`~lightning_spa.callbacks.MomentumDiagnostics` to a PNG.

Reads one run written by a ``TensorBoardLogger`` (event files; tensorboard is a dependency)
or a ``CSVLogger`` (``metrics.csv``: its ``step`` column and ``spa/*`` columns hold what the
callback logged), from either Lightning package, and draws the paper's Figure 2 layout:
``spa/step_sq`` against its noise level ``spa/grad_sq_scaled``, the alignment ratio with the
line at 1, the cosine between gradient and momentum buffer, and the hyper-parameters in both
forms. Needs matplotlib (the ``examples`` extra).

The tags it reads are the callback's: ``spa/<name>`` for a run that measured one optimizer,
``spa/<name>/opt<i>`` for each of several (``<name>`` one of :data:`MEASURED`), each with
``/<group>`` variants under ``per_group=True``. One panel set is drawn per optimizer (per-group
series as thinner lines in it), or only the one picked by ``optimizer=``; ``group=`` draws
one parameter group's series instead of the whole optimizer's. ``MeasuredMomentumOff``'s
``spa/off_ratio`` and ``spa/momentum_off_step`` are drawn on the same panels when logged.

Reading the ratio (``THEORY.md`` sections 4 and 10): above 1 the gradients are aligned with the
momentum buffer and momentum accelerates; near 1 it is idle (noise level); below 1 it damps
(oscillation, or the anti-correlated noise of batches drawn without replacement), and removing
it at this ``eta`` is unsafe.

Example::

    from lightning_spa.plotting import plot_run
    plot_run("lightning_logs/version_0", "diagnostics.png")
    plot_run("lightning_logs/version_1", "gan.png", optimizer=1)   # a run with two optimizers
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MEASURED",
    "PanelSet",
    "draw_hyperparameters",
    "draw_ratio_reading",
    "draw_run",
    "panel_sets",
    "plot_run",
    "read_csv_run",
    "read_run",
    "read_tensorboard_run",
]

_REQUIRED = "ratio"  # a run with diagnostics logged spa/ratio (one optimizer) or spa/ratio/opt<i> (several)
_CSV_NAME = "metrics.csv"  # what CSVLogger writes in its log_dir
MEASURED = ("step_sq", "grad_sq", "grad_sq_scaled", "cosine", "ratio", "eta", "c", "lr", "momentum")
"""The ``<name>`` of every ``spa/<name>[/opt<i>][/<group>]`` tag that MomentumDiagnostics logs."""
_OFF = ("off_ratio", "momentum_off_step")  # MeasuredMomentumOff's tags: spa/<name>[/opt<i>]
_OPT = re.compile(r"opt(\d+)")

Series = dict[str, tuple[list[int], list[float]]]


def read_tensorboard_run(event_dir: str | Path) -> Series:
    """``{tag: (steps, values)}`` of the ``spa/...`` scalars in the event files of ``event_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("spa/")]
    return {t: ([e.step for e in acc.Scalars(t)], [e.value for e in acc.Scalars(t)]) for t in tags}


def read_csv_run(metrics_csv: str | Path) -> Series:
    """``{tag: (steps, values)}`` of the ``spa/...`` columns of a ``CSVLogger`` ``metrics.csv``.

    Each row is one ``log_metrics`` call: its ``step`` column and the values it logged (other
    columns empty), so a column's non-empty cells are its series.

    Raises:
        ValueError: the file has ``spa/...`` columns but no ``step`` column, or a cell is not a number.
    """
    path = Path(metrics_csv)
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        tags = [t for t in reader.fieldnames or () if t.startswith("spa/")]
        if tags and "step" not in (reader.fieldnames or ()):
            raise ValueError(f"{path} has `spa/...` columns but no `step` column: is it a CSVLogger metrics.csv?")
        data: Series = {t: ([], []) for t in tags}
        for line, row in enumerate(reader, start=2):
            try:
                step = None
                for t in tags:
                    cell = row.get(t)
                    if cell:  # empty: this row logged something else
                        step = int(float(row["step"])) if step is None else step
                        data[t][0].append(step)
                        data[t][1].append(float(cell))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}, line {line}: {err}: not a CSVLogger metrics.csv row.") from None
    return {t: series for t, series in data.items() if series[0]}


def _has_diagnostics(data: Series) -> bool:
    return any(t == f"spa/{_REQUIRED}" or t.startswith(f"spa/{_REQUIRED}/") for t in data)


def _runs(root: Path) -> tuple[dict[Path, Series], dict[Path, list[str]]]:
    """Every run under ``root`` with diagnostics, by directory (event files win over a CSV in the same one), and the
    ``spa/*`` tags of the others that logged some."""
    runs: dict[Path, Series] = {}
    others: dict[Path, list[str]] = {}
    found = [(d, "events") for d in sorted({p.parent for p in root.rglob("events.out.tfevents.*")})]
    found += [(p.parent, "csv") for p in sorted(root.rglob(_CSV_NAME))]
    for d, kind in found:
        if d in runs:
            continue
        data = read_tensorboard_run(d) if kind == "events" else read_csv_run(d / _CSV_NAME)
        if _has_diagnostics(data):
            runs[d] = data
            others.pop(d, None)
        elif data:
            others.setdefault(d, sorted(data))
    return runs, others


def _tag_list(tags: list[str], limit: int = 12) -> str:
    shown = ", ".join(tags[:limit])
    return shown + (f", ... ({len(tags)} in all)" if len(tags) > limit else "")


def read_run(run_dir: str | Path) -> Series:
    """Returns ``{tag: (steps, values)}`` for the ``spa/...`` scalars of the run in ``run_dir``.

    ``run_dir`` is the log directory of one run (``.../version_0``) written by a
    ``TensorBoardLogger`` (event files) or a ``CSVLogger`` (``metrics.csv``), or a folder
    holding exactly one run with diagnostics (``spa/ratio``, or ``spa/ratio/opt<i>`` per
    optimizer). Where both loggers wrote to the same directory, the event files are read.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds neither event files nor ``metrics.csv``.
        ValueError: no run under ``run_dir`` logged MomentumDiagnostics' ratio (the message lists
            the ``spa/*`` tags found instead), or several did (pass one of them), or a
            ``metrics.csv`` is not in the CSVLogger format.
    """
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"`run_dir` {root} does not exist.")
    if not any(root.rglob("events.out.tfevents.*")) and not any(root.rglob(_CSV_NAME)):
        raise FileNotFoundError(
            f"No TensorBoard event file and no CSVLogger {_CSV_NAME} under `run_dir` {root}: give the log directory "
            "of a run (e.g. lightning_logs/version_0)."
        )
    runs, others = _runs(root)
    if not runs:
        if others:
            found = "; ".join(f"{d}: {_tag_list(tags)}" for d, tags in others.items())
            raise ValueError(
                f"No run under {root} logged `spa/ratio` (or `spa/ratio/opt<i>`), which the panels are drawn from; "
                f"the spa/* tags found: {found}. Those come from other callbacks; MomentumDiagnostics logs the ratio."
            )
        raise ValueError(
            f"No run under {root} logged any spa/* value (its loggers' files hold only other metrics): add "
            "lightning_spa.MomentumDiagnostics to the Trainer's callbacks, with a TensorBoardLogger or CSVLogger."
        )
    if len(runs) > 1:
        names = ", ".join(str(d) for d in runs)
        raise ValueError(f"`run_dir` {root} holds several runs with diagnostics ({names}); pass one of them.")
    return next(iter(runs.values()))


@dataclass(frozen=True)
class PanelSet:
    """The series of one measured optimizer: what one set of panels shows.

    Attributes:
        optimizer: the optimizer's index, from the ``/opt<i>`` of its tags; ``None`` for a run
            that measured one optimizer (tags without ``/opt<i>``, its index not logged).
        suffix: what follows ``spa/<name>`` in the optimizer's own tags (``""`` or ``"/opt<i>"``).
        groups: the parameter groups logged with ``per_group=True``: ``{name: tag suffix}``.
    """

    optimizer: int | None
    suffix: str
    groups: dict[str, str]

    @property
    def label(self) -> str:
        return "" if self.optimizer is None else f"optimizer {self.optimizer}"


def panel_sets(data: Series) -> list[PanelSet]:
    """The panel sets of a run's ``spa/*`` series (:func:`read_run`), one per measured optimizer, in index order.

    A run that measured several optimizers logs every value as ``spa/<name>/opt<i>[/<group>]``;
    one that measured a single optimizer as ``spa/<name>[/<group>]``.
    """
    multi = f"spa/{_REQUIRED}" not in data
    sets: dict[int | None, dict[str, str]] = {}
    for tag in data:
        name, _, tail = tag.removeprefix("spa/").partition("/")
        if name not in MEASURED:
            continue
        if not multi:
            sets.setdefault(None, {})
            if tail:
                sets[None][tail] = f"/{tail}"
            continue
        head, _, group = tail.partition("/")
        match = _OPT.fullmatch(head)
        if match is None:
            continue
        groups = sets.setdefault(int(match.group(1)), {})
        if group:
            groups[group] = f"/{head}/{group}"
    return [
        PanelSet(index, "" if index is None else f"/opt{index}", groups)
        for index, groups in sorted(sets.items(), key=lambda item: -1 if item[0] is None else item[0])
    ]


def _describe(sets: list[PanelSet]) -> str:
    parts = []
    for ps in sets:
        where = ps.label or "one optimizer (tags without /opt<i>)"
        tags = f"spa/ratio{ps.suffix}"
        groups = f", groups {', '.join(ps.groups)}" if ps.groups else ""
        parts.append(f"{where}: {tags}{groups}")
    return "; ".join(parts)


def _select(sets: list[PanelSet], optimizer: int | str | None, group: str | None) -> list[tuple[PanelSet, str]]:
    """``[(panel set, suffix of the series drawn as its main line)]`` for ``optimizer`` and ``group``."""
    if optimizer is not None:
        text = str(optimizer)
        match = _OPT.fullmatch(text)
        index = int(match.group(1)) if match else int(text) if text.isdigit() else None
        if index is None:
            raise ValueError(
                f"`optimizer` (`--optimizer`) must be an optimizer index (0, 1, ... or opt0, opt1, ...), got {text!r}."
            )
        if sets[0].optimizer is None:
            raise ValueError(
                f"`optimizer` (`--optimizer`) {text!r} given, but this run measured one optimizer (its tags have no "
                f"/opt<i>: {_describe(sets)}): leave it out."
            )
        chosen = [ps for ps in sets if ps.optimizer == index]
        if not chosen:
            indices = ", ".join(str(ps.optimizer) for ps in sets)
            raise ValueError(
                f"`optimizer` (`--optimizer`) {text!r} was not measured in this run; it holds {_describe(sets)}. "
                f"Pick one of {indices}, or leave it out for one panel set each."
            )
        sets = chosen
    if group is None:
        return [(ps, ps.suffix) for ps in sets]
    with_group = [ps for ps in sets if group in ps.groups]
    if not with_group:
        grouped = [ps for ps in sets if ps.groups]
        hint = (
            f"it holds {_describe(sets)}"
            if grouped
            else "no parameter group was logged (MomentumDiagnostics(per_group=True) logs them)"
        )
        raise ValueError(f"`group` (`--group`) {group!r} is not in this run: {hint}.")
    return [(ps, ps.groups[group]) for ps in with_group]


def draw_hyperparameters(ax: Any, data: Series, suffix: str = "") -> None:
    """Draws ``spa/eta``, ``spa/c``, ``spa/lr`` and ``spa/momentum`` (both forms, log scale) on ``ax``.

    ``suffix`` picks an optimizer's or a group's series (``"/opt1"``, ``"/opt1/decay"``).
    """
    styles = [
        ("spa/eta", r"$\eta$", "-"),
        ("spa/c", "$c$", "-"),
        ("spa/lr", r"SGD+M lr $\alpha$", "--"),
        ("spa/momentum", r"SGD+M momentum $\beta$", "--"),
    ]
    for tag, label, linestyle in styles:
        if tag + suffix in data:
            ax.plot(*data[tag + suffix], label=label, linestyle=linestyle)
    ax.set_yscale("log")
    ax.set_title("hyper-parameters (both forms)")


RATIO_TITLE = "alignment ratio (1 = noise level: momentum idle)"
RATIO_ABOVE = "above 1: aligned, momentum accelerates"
RATIO_BELOW = "below 1: momentum damps; removing it at this eta is unsafe"


def draw_ratio_reading(ax: Any) -> None:
    """The reading of the ratio on its panel: the line at 1 and what each side of it means (``THEORY.md`` 10)."""
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="1: idle (noise level)")
    ax.set_yscale("log")
    ax.set_title(RATIO_TITLE)
    box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.7, "linewidth": 0}
    ax.text(0.02, 0.97, RATIO_ABOVE, transform=ax.transAxes, va="top", fontsize=7, color="C2", bbox=box)
    ax.text(0.02, 0.03, RATIO_BELOW, transform=ax.transAxes, va="bottom", fontsize=7, color="C3", bbox=box)


def _draw_set(axes: list[Any], data: Series, ps: PanelSet, main: str, title: str) -> None:
    """One panel set on four axes: step_sq vs noise level, ratio, cosine, hyper-parameters."""
    ax_sq, ax_ratio, ax_cos, ax_hyper = axes

    def line(ax: Any, name: str, suffix: str, label: str, **kwargs: Any) -> None:
        if f"spa/{name}{suffix}" in data:
            ax.plot(*data[f"spa/{name}{suffix}"], label=label, **kwargs)

    extra = [(g, sfx) for g, sfx in ps.groups.items() if sfx != main] if main == ps.suffix else []
    line(ax_sq, "step_sq", main, r"$\|x_{k+1}-x_k\|^2$ (EMA)")
    line(ax_sq, "grad_sq_scaled", main, r"noise level $\frac{c}{2-c}\eta^2\|g\|^2$ (EMA)", linestyle="--")
    ax_sq.set_yscale("log")
    ax_sq.set_title("step size against its noise level")
    line(ax_ratio, "ratio", main, "ratio", color="C0")
    for i, (g, sfx) in enumerate(extra):
        line(ax_ratio, "ratio", sfx, f"group {g}", linewidth=0.8, alpha=0.7, color=f"C{4 + i % 6}")
    line(ax_ratio, "off_ratio", ps.suffix, "MeasuredMomentumOff's ratio", linestyle="--", color="C1")
    draw_ratio_reading(ax_ratio)
    line(ax_cos, "cosine", main, r"$\cos(g_k, m_k)$ (EMA)", color="C0")
    for i, (g, sfx) in enumerate(extra):
        line(ax_cos, "cosine", sfx, f"group {g}", linewidth=0.8, alpha=0.7, color=f"C{4 + i % 6}")
    ax_cos.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax_cos.set_title("gradient / momentum alignment")
    draw_hyperparameters(ax_hyper, data, main)
    off = data.get(f"spa/momentum_off_step{ps.suffix}")
    for ax in axes:
        if off is not None:
            step = off[1][-1]
            ax.axvline(step, color="0.4", linewidth=0.8, linestyle="--", label=f"momentum off from step {step:g}")
        if title:
            ax.set_title(f"{title}: {ax.get_title()}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def draw_run(run_dir: str | Path, optimizer: int | str | None = None, group: str | None = None) -> Any:
    """The figure of :func:`plot_run` (a ``matplotlib.figure.Figure``, not saved; no pyplot involved).

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError, ValueError: as :func:`plot_run`.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: the user's backend and figures are left alone
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_run needs matplotlib: pip install 'lightning-spa[examples]'.") from err
    data = read_run(run_dir)
    chosen = _select(panel_sets(data), optimizer, group)
    if len(chosen) == 1:  # the paper's Figure 2 layout
        fig = Figure(figsize=(11, 7))
        grid = fig.subplots(2, 2, sharex=True)
        rows = [[grid[0][0], grid[0][1], grid[1][0], grid[1][1]]]
        bottom = list(grid[1])
    else:  # one row per optimizer
        fig = Figure(figsize=(18, 3.8 * len(chosen)))
        grid = fig.subplots(len(chosen), 4, sharex=True, squeeze=False)
        rows = [list(row) for row in grid]
        bottom = list(grid[-1])
    for axes, (ps, main) in zip(rows, chosen, strict=True):
        title = ", ".join(t for t in (ps.label, f"group {group}" if group is not None else "") if t)
        _draw_set(axes, data, ps, main, title)
    for ax in bottom:
        ax.set_xlabel("optimizer step")
    fig.suptitle(f"Momentum diagnostics: {Path(run_dir)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_run(
    run_dir: str | Path, out_png: str | Path, optimizer: int | str | None = None, group: str | None = None
) -> Path:
    """Draws the momentum diagnostics of one run to ``out_png`` and returns its path.

    One panel set (step size against its noise level, the ratio, the cosine, the
    hyper-parameters) per measured optimizer: the paper's Figure 2 layout (2 x 2) for one, a row
    of four panels per optimizer for several.

    Args:
        run_dir: the run's log directory, TensorBoard or CSV (see :func:`read_run`).
        out_png: where to write the figure; parent folders are created.
        optimizer: draw only this optimizer (its index: ``1`` or ``"opt1"``); ``None``: one panel
            set per measured optimizer.
        group: draw this parameter group's series (logged with ``per_group=True``) instead of the
            whole optimizer's; ``None``: the whole optimizer's, with each group's ratio and cosine
            as thinner lines.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: no event file or ``metrics.csv`` under ``run_dir``.
        ValueError: no (or more than one) run with diagnostics under ``run_dir``; ``optimizer`` or
            ``group`` not in the run (each message lists what the run holds).
    """
    fig = draw_run(run_dir, optimizer, group)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
