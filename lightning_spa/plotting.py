"""Render the diagnostics logged by :class:`~lightning_spa.callbacks.MomentumDiagnostics` to a PNG.

Reads the TensorBoard event files of one run (tensorboard is a dependency) and draws the
paper's Figure 2 layout: ``spa/step_sq`` against its noise level ``spa/grad_sq_scaled``, the
alignment ratio with the line at 1, the cosine between gradient and momentum buffer, and the
hyper-parameters in both forms. Needs matplotlib (the ``examples`` extra).

Example::

    from lightning_spa.plotting import plot_run
    plot_run("lightning_logs/version_0", "diagnostics.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["draw_hyperparameters", "plot_run", "read_run"]

_REQUIRED = "spa/ratio"


def _event_dirs(run_dir: Path) -> list[Path]:
    return sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})


def read_run(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Returns ``{tag: (steps, values)}`` for the ``spa/...`` scalars of the run in ``run_dir``.

    ``run_dir`` is a TensorBoard run directory (``.../version_0``) or a folder holding exactly one
    run with diagnostics.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no event file.
        ValueError: no run under ``run_dir`` logged ``spa/ratio``, or several did (pass one of them).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"`run_dir` {root} does not exist.")
    dirs = _event_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"No TensorBoard event file under `run_dir` {root}.")
    runs: dict[Path, dict[str, tuple[list[int], list[float]]]] = {}
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.startswith("spa/")]
        if _REQUIRED in tags:
            runs[d] = {t: ([e.step for e in acc.Scalars(t)], [e.value for e in acc.Scalars(t)]) for t in tags}
    if not runs:
        raise ValueError(
            f"No run under {root} logged `{_REQUIRED}`: train with lightning_spa.callbacks.MomentumDiagnostics "
            "and a TensorBoardLogger."
        )
    if len(runs) > 1:
        names = ", ".join(str(d) for d in runs)
        raise ValueError(f"`run_dir` {root} holds several runs with diagnostics ({names}); pass one of them.")
    return next(iter(runs.values()))


def draw_hyperparameters(ax: Any, data: dict[str, tuple[list[int], list[float]]]) -> None:
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
        run_dir: the TensorBoard run directory (see :func:`read_run`).
        out_png: where to write the figure; parent folders are created.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: no event file under ``run_dir``.
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
