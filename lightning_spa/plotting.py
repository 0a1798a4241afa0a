"""Render the diagnostics logged by :class:`~lightning_spa.callbacks.MomentumDiagnostics` to a PNG.

Reads one run written by a ``TensorBoardLogger`` (event files; tensorboard is a dependency)
or a ``CSVLogger`` (``metrics.csv``: its ``step`` column and ``spa/*`` columns hold what the
callback logged), from either Lightning package, and draws the paper's Figure 2 layout:
``spa/step_sq`` against its noise level ``spa/grad_sq_scaled``, the alignment ratio with the
line at 1, the cosine between gradient and momentum buffer, and the hyper-parameters in both
forms. Needs matplotlib (the ``examples`` extra).

Example::

    from lightning_spa.plotting import plot_run
    plot_run("lightning_logs/version_0", "diagnostics.png")
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

__all__ = ["draw_hyperparameters", "plot_run", "read_csv_run", "read_run", "read_tensorboard_run"]

_REQUIRED = "spa/ratio"
_CSV_NAME = "metrics.csv"  # what CSVLogger writes in its log_dir

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


def _runs(root: Path) -> dict[Path, Series]:
    """Every run under ``root`` that logged ``spa/ratio``, by directory (event files win over a CSV in the same one)."""
    runs: dict[Path, Series] = {}
    for d in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        data = read_tensorboard_run(d)
        if _REQUIRED in data:
            runs[d] = data
    for path in sorted(root.rglob(_CSV_NAME)):
        if path.parent not in runs:
            data = read_csv_run(path)
            if _REQUIRED in data:
                runs[path.parent] = data
    return runs


def read_run(run_dir: str | Path) -> Series:
    """Returns ``{tag: (steps, values)}`` for the ``spa/...`` scalars of the run in ``run_dir``.

    ``run_dir`` is the log directory of one run (``.../version_0``) written by a
    ``TensorBoardLogger`` (event files) or a ``CSVLogger`` (``metrics.csv``), or a folder
    holding exactly one run with diagnostics. Where both loggers wrote to the same directory,
    the event files are read.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds neither event files nor ``metrics.csv``.
        ValueError: no run under ``run_dir`` logged ``spa/ratio``, or several did (pass one of them),
            or a ``metrics.csv`` is not in the CSVLogger format.
    """
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"`run_dir` {root} does not exist.")
    if not any(root.rglob("events.out.tfevents.*")) and not any(root.rglob(_CSV_NAME)):
        raise FileNotFoundError(
            f"No TensorBoard event file and no CSVLogger {_CSV_NAME} under `run_dir` {root}: give the log directory "
            "of a run (e.g. lightning_logs/version_0)."
        )
    runs = _runs(root)
    if not runs:
        raise ValueError(
            f"No run under {root} logged `{_REQUIRED}`: train with lightning_spa.MomentumDiagnostics and a "
            "TensorBoardLogger or CSVLogger."
        )
    if len(runs) > 1:
        names = ", ".join(str(d) for d in runs)
        raise ValueError(f"`run_dir` {root} holds several runs with diagnostics ({names}); pass one of them.")
    return next(iter(runs.values()))


def draw_hyperparameters(ax: Any, data: Series) -> None:
    """Draws ``spa/eta``, ``spa/c``, ``spa/lr`` and ``spa/momentum`` (both forms, log scale) on ``ax``."""
    styles = [
        ("spa/eta", r"$\eta$", "-"),
        ("spa/c", "$c$", "-"),
        ("spa/lr", r"SGD+M lr $\alpha$", "--"),
        ("spa/momentum", r"SGD+M momentum $\beta$", "--"),
    ]
    for tag, label, linestyle in styles:
        if tag in data:
            ax.plot(*data[tag], label=label, linestyle=linestyle)
    ax.set_yscale("log")
    ax.set_title("hyper-parameters (both forms)")


def plot_run(run_dir: str | Path, out_png: str | Path) -> Path:
    """Draws the momentum diagnostics of one run to ``out_png`` and returns its path.

    Args:
        run_dir: the run's log directory, TensorBoard or CSV (see :func:`read_run`).
        out_png: where to write the figure; parent folders are created.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: no event file or ``metrics.csv`` under ``run_dir``.
        ValueError: no (or more than one) run with diagnostics under ``run_dir``.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: the user's backend and figures are left alone
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_run needs matplotlib: pip install 'lightning-spa[examples]'.") from err
    data = read_run(run_dir)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2, sharex=True)
    (ax_sq, ax_ratio), (ax_cos, ax_hyper) = axes

    def line(ax: object, tag: str, label: str, **kwargs: object) -> None:
        if tag in data:
            steps, values = data[tag]
            ax.plot(steps, values, label=label, **kwargs)  # type: ignore[attr-defined]

    line(ax_sq, "spa/step_sq", r"$\|x_{k+1}-x_k\|^2$ (EMA)")
    line(ax_sq, "spa/grad_sq_scaled", r"noise level $\frac{c}{2-c}\eta^2\|g\|^2$ (EMA)", linestyle="--")
    ax_sq.set_yscale("log")
    ax_sq.set_title("step size against its noise level")
    line(ax_ratio, "spa/ratio", "ratio")
    ax_ratio.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="1 (noise level)")
    ax_ratio.set_yscale("log")
    ax_ratio.set_title("alignment ratio: > 1 momentum helps")
    line(ax_cos, "spa/cosine", r"$\cos(g_k, m_k)$ (EMA)")
    ax_cos.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax_cos.set_title("gradient / momentum alignment")
    draw_hyperparameters(ax_hyper, data)
    for ax in axes.flat:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(f"Momentum diagnostics: {Path(run_dir)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out
