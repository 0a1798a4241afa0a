"""``make demo``: the paper's recipe on real data in a few minutes on 2 CPU cores.

Runs the LightningCLI digits app (``examples/digits_cli.py``) with ``configs/digits_spa.yaml``:
SPA ``eta 1.0, c 0.1`` (torch SGD ``lr 0.1, momentum 0.9``), a gradual paper-mode decay (``eta``
10x down and ``c`` 10x up, geometric over one epoch) two thirds of the way through, and
:class:`~lightning_spa.MomentumDiagnostics` every step. At the end it prints the final
validation accuracy, the log directory and the ``tensorboard`` command, and writes
``summary.png`` (loss, accuracy, ``spa/ratio``, ``eta``/``c``) and ``diagnostics.png``
(``lightning-spa plot``) into the log directory.

Usage::

    python examples/demo.py                       # 15 epochs, logs under runs/demo
    python examples/demo.py --epochs 3 --limit-train-batches 5 --save-dir /tmp/x   # a smoke run
    python examples/demo.py --lightning           # the same run with `lightning.pytorch`'s CLI and Trainer
    LIGHTNING_SPA_DEMO_EPOCHS=3 make demo
    make demo DEMO_ARGS=--lightning
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

from digits_cli import cli_main  # noqa: E402

CONFIG = EXAMPLES / "configs" / "digits_spa.yaml"


def read_scalars(log_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{tag: (steps, values)}`` of every scalar in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: ([e.step for e in acc.Scalars(t)], [e.value for e in acc.Scalars(t)]) for t in acc.Tags()["scalars"]}


def plot_summary(log_dir: str | Path, out: str | Path, title: str = "") -> Path:
    """Four panels over optimizer steps: loss, accuracy, ``spa/ratio`` and ``eta``/``c``."""
    from lightning_spa.figures import require_matplotlib
    from lightning_spa.plotting import draw_hyperparameters

    plt = require_matplotlib()
    s = read_scalars(log_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (ax_loss, ax_acc), (ax_ratio, ax_hyper) = axes

    def line(ax, tag: str, label: str, **kw) -> None:  # type: ignore[no-untyped-def]
        if tag in s:
            ax.plot(*s[tag], label=label, **kw)

    line(ax_loss, "train/loss", "train loss (batch)", alpha=0.6)
    line(ax_loss, "val/loss", "validation loss", marker="o")
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    line(ax_acc, "train/acc", "train accuracy (epoch)", marker=".")
    line(ax_acc, "val/acc", "validation accuracy", marker="o")
    ax_acc.set_title("accuracy")
    line(ax_ratio, "spa/ratio", "spa/ratio")
    ax_ratio.axhline(1.0, color="black", lw=0.8, ls=":", label="1: noise level")
    ax_ratio.set_yscale("log")
    ax_ratio.set_title("alignment ratio (> 1 accelerates, ~1 idle, < 1 damps)")
    draw_hyperparameters(ax_hyper, s)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title or f"lightning_spa demo: {log_dir}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Runs the demo; returns the final metrics and paths (also printed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("LIGHTNING_SPA_DEMO_EPOCHS", 15)))
    parser.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch (smoke runs)")
    parser.add_argument("--save-dir", default="runs", help="TensorBoard root (default: %(default)s)")
    parser.add_argument("--name", default="demo", help="run name under --save-dir (default: %(default)s)")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--lightning", action="store_true", help="run with the unified `lightning` package instead of pytorch_lightning"
    )
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the decay happens two thirds of the way through)")
    # The model is tiny: one thread is fastest, and far faster on a busy machine.
    torch.set_num_threads(1)
    milestone = max(1, round(2 * args.epochs / 3))
    callbacks = [
        {
            "class_path": "lightning_spa.GradualSchedule",
            "init_args": {"milestones": [milestone], "factor": 0.1, "mode": "paper", "transition": "geometric"},
        },
        {"class_path": "lightning_spa.MomentumDiagnostics", "init_args": {"every_n_steps": 1, "ema_decay": 0.9}},
    ]
    cli_args = [
        "fit",
        "--config", str(CONFIG),
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.callbacks", json.dumps(callbacks),
        "--trainer.logger.init_args.save_dir", args.save_dir,
        "--trainer.logger.init_args.name", args.name,
        "--trainer.default_root_dir", args.save_dir,
        "--trainer.enable_progress_bar", str(not args.no_progress_bar).lower(),
    ]  # fmt: skip
    if args.limit_train_batches is not None:
        cli_args += ["--trainer.limit_train_batches", str(args.limit_train_batches)]
    print(f"lightning_spa demo: SPA eta 1.0, c 0.1 (SGD+M lr 0.1, momentum 0.9) on the bundled digits, "
          f"{args.epochs} epochs; eta 10x down and c 10x up from epoch {milestone}, geometric over one epoch.")
    start = time.perf_counter()
    cli = cli_main(cli_args, package="lightning.pytorch" if args.lightning else "pytorch_lightning")
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    log_dir = Path(trainer.logger.log_dir)  # type: ignore[union-attr]
    acc = float(trainer.callback_metrics["val/acc"])
    summary = plot_summary(log_dir, log_dir / "summary.png")
    diagnostics = None
    try:
        from lightning_spa.plotting import plot_run

        diagnostics = plot_run(log_dir, log_dir / "diagnostics.png")
    except (ImportError, ValueError) as err:  # pragma: no cover - reported, not fatal
        print(f"(no diagnostics.png: {err})")
    ratio = read_scalars(log_dir).get("spa/ratio", ([], []))[1]
    root = Path(args.save_dir) / args.name
    print()
    print(f"final validation accuracy: {acc:.4f}  ({trainer.global_step} optimizer steps in {seconds:.0f} s, "
          f"{type(trainer).__module__.split('.trainer')[0]} Trainer)")
    if ratio:
        print(f"spa/ratio: first logged {ratio[0]:.3g}, max {max(ratio):.3g}, last {ratio[-1]:.3g}")
    print(f"TensorBoard logs: {log_dir}")
    print(f"  tensorboard --logdir {root}")
    print(f"summary PNG: {summary}")
    if diagnostics is not None:
        print(f"diagnostics PNG: {diagnostics}   (lightning-spa plot {log_dir})")
    return {"val_acc": acc, "log_dir": log_dir, "summary": summary, "seconds": seconds}


if __name__ == "__main__":
    main()
