"""Paper Figure 3 on the bundled digits: momentum off after the first epoch vs momentum throughout.

Three arms, each over several seeds, same data split and schedule (``eta`` 10x down at 50% and
75% of training, ``"lr"`` mode so that ``c`` is kept, geometric over one epoch):

- ``momentum throughout``: SPA ``eta 1.0, c 0.1`` (SGD+M ``lr 0.1, momentum 0.9``) all along;
- ``momentum off after epoch 1, gradual``: the same plus :class:`~lightning_spa.MomentumOff`
  after one epoch (``c -> 1`` with ``eta`` kept: SGD+M ``lr 1.0, momentum 0``, the same
  effective step), ``c`` moved geometrically over one epoch (insight 3);
- ``momentum off after epoch 1, instant``: ``c`` jumps to 1 in one step;
- ``no momentum``: ``c = 1`` from the start (plain SGD ``lr 1.0``), for reference.

Reports the final validation accuracy and loss (mean, std, min, max over seeds). Writes
``figure3.png`` and ``figure3.md``.

Run (about a minute and a half on 2 CPU cores)::

    python examples/reproduce/figure3.py --out runs/reproduce --seeds 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import fit_digits, mean_std, write_table

from lightning_spa import SPA, GradualSchedule, MomentumOff

ARMS = (
    "momentum throughout",
    "momentum off after epoch 1, gradual",
    "momentum off after epoch 1, instant",
    "no momentum",
)
STEPS_PER_EPOCH = 23  # 1,437 training images, batch 64


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eta", type=float, default=1.0, help="SPA step size (c = 0.1 with momentum)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    milestones = [args.epochs // 2, (3 * args.epochs) // 4]
    results: dict[str, dict[str, list[float]]] = {arm: {"acc": [], "loss": []} for arm in ARMS}
    curves: dict[str, list[tuple[list[int], list[float]]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for arm in ARMS:
                callbacks = [GradualSchedule(milestones, factor=0.1, mode="lr", transition="geometric")]
                if arm.startswith("momentum off"):
                    steps = STEPS_PER_EPOCH if arm.endswith("gradual") else 0
                    callbacks.append(MomentumOff(after_epochs=1, transition_steps=steps))
                c = 1.0 if arm == "no momentum" else 0.1
                trainer, s = fit_digits(
                    seed,
                    args.epochs,
                    callbacks,
                    log_dir=Path(tmp) / arm.replace(" ", "_").replace(",", ""),
                    optimizer=lambda p, c=c: SPA(p, lr=args.eta, c=c),
                )
                results[arm]["acc"].append(float(trainer.callback_metrics["val/acc"]))
                results[arm]["loss"].append(float(trainer.callback_metrics["val/loss"]))
                curves[arm].append(s["val/acc"])
    rows = []
    for arm in ARMS:
        acc, loss = results[arm]["acc"], results[arm]["loss"]
        (am, asd), (lm, lsd) = mean_std(acc), mean_std(loss)
        diverged = sum(a < 0.2 for a in acc)  # 0.1 is chance on 10 balanced classes
        rows.append(
            [arm, f"{am:.4f} ± {asd:.4f}", f"{min(acc):.4f} .. {max(acc):.4f}", f"{lm:.4f} ± {lsd:.4f}", diverged]
        )
    notes = (
        f"Digits CNN, 360 validation images; val/acc is torchmetrics' MulticlassAccuracy (macro average over the 10 "
        f"classes; 0.1 = chance: a diverged run). {args.seeds} seeds (the same seeds in every arm), "
        f"{args.epochs} epochs, batch 64, SPA eta {args.eta:g}; eta 10x down at epochs {milestones} (lr mode, "
        "geometric over one epoch). Mean ± sample std over seeds; range = min .. max."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = write_table(args.out / "figure3.md", "Figure 3 (digits): final validation accuracy",
                        ["arm", "val accuracy", "range", "val loss", "diverged seeds"], rows, notes)

    from lightning_spa.figures import require_matplotlib

    plt = require_matplotlib()
    fig, (ax_curve, ax_box) = plt.subplots(1, 2, figsize=(13, 5))
    for i, arm in enumerate(ARMS):
        for n, (steps, values) in enumerate(curves[arm]):
            ax_curve.plot(steps, values, color=f"C{i}", alpha=0.6, lw=1, label=arm if n == 0 else None)
    ax_curve.set_ylim(0.9, 1.0)
    ax_curve.set_xlabel("optimizer step")
    ax_curve.set_ylabel("validation accuracy")
    ax_curve.legend(fontsize=8)
    ax_curve.grid(alpha=0.3)
    ax_box.boxplot([results[a]["acc"] for a in ARMS])
    ax_box.set_xticks(range(1, len(ARMS) + 1), [a.replace(" after", "\nafter").replace(", ", "\n") for a in ARMS])
    for i, arm in enumerate(ARMS):
        ax_box.scatter([i + 1] * len(results[arm]["acc"]), results[arm]["acc"], color=f"C{i}", zorder=3)
    ax_box.set_ylabel(f"final validation accuracy ({args.seeds} seeds)")
    ax_box.grid(alpha=0.3)
    fig.suptitle("Figure 3 on digits: turning momentum off after the first epoch")
    fig.tight_layout()
    fig.savefig(args.out / "figure3.png", dpi=110)
    print(table)
    print(f"wrote {args.out / 'figure3.png'} and {args.out / 'figure3.md'} in {time.perf_counter() - start:.0f} s")
    return table


if __name__ == "__main__":
    main()
