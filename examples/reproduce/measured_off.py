"""Momentum off when the measurement says so, on the bundled digits: Figures 2 and 3 joined.

Three arms over several seeds, the setup of ``figure3.py`` (SPA ``eta 1.0, c 0.1`` = SGD+M ``lr 0.1,
momentum 0.9``; ``eta`` 10x down at 50% and 75% of training, ``"lr"`` mode, geometric over one
epoch):

- ``momentum throughout``;
- ``MomentumOff(after_epochs=1)``: ``c -> 1`` from the start of epoch 2, geometric over one epoch;
- ``MeasuredMomentumOff()``: the same switch, started once the alignment ratio (measured every
  step from the end of epoch 1, EMA decay 0.95) has stayed idle, inside ``[0.9, 1.25]``, for one
  epoch (after a damping episode at ``eta_d``: only at ``eta <= 0.5 eta_d``).

Both switches at their defaults, with the guard (``THEORY.md`` section 11).

Reports the final validation accuracy and loss, the switch step of each seed and the optimizer
state (momentum buffers: SPA drops them once ``c`` reaches 1) over training. Writes
``measured_off.png`` (the ratio the rule reads, with each decision marked; the optimizer-state
bytes; the accuracies) and ``measured_off.md``.

Run (two to three minutes on 2 busy CPU cores)::

    python examples/reproduce/measured_off.py --out runs/reproduce --seeds 5
    python examples/reproduce/measured_off.py --out runs/reproduce --seeds 5 --eta 0.3 --name measured_off_eta0.3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from _common import fit_digits, mean_std, write_table

from lightning_spa import SPA, GradualSchedule, MomentumOff
from lightning_spa.callbacks.measured import MeasuredMomentumOff
from lightning_spa.decision import DEFAULT_HIGH, DEFAULT_LOW

ARMS = ("momentum throughout", "MomentumOff(after_epochs=1)", "MeasuredMomentumOff()")
STEPS_PER_EPOCH = 23  # 1,437 training images, batch 64


class StateBytes(pl.Callback):
    """Bytes held in tensors of the optimizer's state after each optimizer step, and the ``c`` of each step."""

    def __init__(self) -> None:
        self.bytes: list[int] = []
        self.cs: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.cs.append(float(trainer.optimizers[0].param_groups[0]["c"]))  # the c this step uses

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        opt = trainer.optimizers[0]
        self.bytes.append(
            sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eta", type=float, default=1.0, help="SPA step size (c = 0.1)")
    parser.add_argument("--name", default="measured_off", help="file names of the outputs (NAME.md, NAME.png)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    milestones = [args.epochs // 2, (3 * args.epochs) // 4]
    results: dict[str, dict[str, list[Any]]] = {
        arm: {"acc": [], "loss": [], "switch": [], "bytes": [], "cs": [], "train_loss": []} for arm in ARMS
    }
    ratios: list[tuple[list[int], list[float], int | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for arm in ARMS:
                state = StateBytes()
                callbacks: list[pl.Callback] = [
                    GradualSchedule(milestones, factor=0.1, mode="lr", transition="geometric"),
                    state,
                ]
                measured = None
                if arm.startswith("MomentumOff"):
                    callbacks.append(MomentumOff(after_epochs=1))
                elif arm.startswith("Measured"):
                    measured = MeasuredMomentumOff(log_ratio=True)
                    callbacks.append(measured)
                trainer, scalars = fit_digits(
                    seed, args.epochs, callbacks, log_dir=Path(tmp) / arm.split("(")[0],
                    optimizer=lambda p: SPA(p, lr=args.eta, c=0.1),
                )  # fmt: skip
                r = results[arm]
                r["acc"].append(float(trainer.callback_metrics["val/acc"]))
                r["loss"].append(float(trainer.callback_metrics["val/loss"]))
                r["bytes"].append(state.bytes)
                r["cs"].append(state.cs)
                r["train_loss"].append(scalars.get("train/loss", ([], [])))
                if measured is not None:
                    decided = measured.decided_steps[0]
                    r["switch"].append(None if decided is None else decided + 1)
                    steps, values = scalars.get("spa/off_ratio", ([], []))
                    ratios.append((steps, values, decided))
                elif arm.startswith("MomentumOff"):
                    r["switch"].append(STEPS_PER_EPOCH)
                else:
                    r["switch"].append(None)

    def c_one(cs: list[float]) -> str:
        return str(next((k for k, c in enumerate(cs) if c >= 1.0), "never"))

    rows = []
    for arm in ARMS:
        r = results[arm]
        (am, asd), (lm, lsd) = mean_std(r["acc"]), mean_std(r["loss"])
        switch = ", ".join("-" if s is None else str(s) for s in r["switch"])
        c1 = ", ".join(c_one(cs) for cs in r["cs"])
        mean_kib = mean_std([sum(b) / len(b) / 1024 for b in r["bytes"]])[0]
        end_kib = mean_std([b[-1] / 1024 for b in r["bytes"]])[0]
        per_seed = ", ".join(f"{a:.3f}" for a in r["acc"])
        diverged = sum(a < 0.2 for a in r["acc"])  # 0.1 is chance on 10 balanced classes
        rows.append([arm, f"{am:.4f} ± {asd:.4f}", per_seed, f"{lm:.4f} ± {lsd:.4f}", diverged, switch, c1,
                     f"{mean_kib:.1f}", f"{end_kib:.1f}"])  # fmt: skip
    notes = (
        f"Digits CNN, 360 validation images; val/acc is torchmetrics' MulticlassAccuracy (macro average over the 10 "
        f"classes). {args.seeds} seeds (the same seeds in every arm), {args.epochs} epochs of {STEPS_PER_EPOCH} "
        f"optimizer steps, batch 64, SPA eta {args.eta:g}, c 0.1; eta 10x down at epochs {milestones} (lr mode, "
        "geometric over one epoch). Mean ± sample std over seeds. 'diverged': final accuracy below 0.2 (chance is "
        "0.1). 'switch step': the first optimizer step with c > 0.1, per seed; 'c = 1 from': the first step with "
        "c = 1, per seed. Optimizer state: "
        "bytes held by the optimizer's tensors after each step (SPA's momentum buffers; dropped once c = 1), mean "
        "over the run and at the end, mean over seeds. MeasuredMomentumOff defaults: idle band [0.9, 1.25], "
        "eta_drop 0.5, warm-up 1 epoch, patience 1 epoch, measured every step from the warm-up on, EMA decay 0.95, "
        "transition one epoch, guard on."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    header = ["arm", "val accuracy", "per seed", "val loss", "diverged seeds", "switch step (per seed)",
              "c = 1 from (per seed)", "optimizer state, mean KiB", "at the end, KiB"]  # fmt: skip
    table = write_table(args.out / f"{args.name}.md", "Momentum off when measured (digits): final validation accuracy",
                        header, rows, notes)  # fmt: skip

    from lightning_spa.figures import require_matplotlib

    plt = require_matplotlib()
    fig, ((ax_ratio, ax_loss), (ax_mem, ax_box)) = plt.subplots(2, 2, figsize=(14, 10))
    for n, (steps, values, decided) in enumerate(ratios):
        ax_ratio.plot(steps, values, color=f"C{n}", lw=1, label=f"seed {n}")
        if decided is not None:
            ax_ratio.axvline(decided, color=f"C{n}", ls="--", lw=1)
    ax_ratio.axhline(1.0, color="k", lw=0.8)
    ax_ratio.axhspan(DEFAULT_LOW, DEFAULT_HIGH, color="g", alpha=0.12, label="idle band (<: damping, >: accelerating)")
    ax_ratio.axvspan(0, STEPS_PER_EPOCH, color="0.9", label="warm-up (not measured)")
    ax_ratio.set_yscale("log")
    last = max([d for _, _, d in ratios if d is not None], default=0)
    xmax = max(6 * STEPS_PER_EPOCH, last + 2 * STEPS_PER_EPOCH)
    ax_ratio.set_xlim(0, xmax)
    ax_ratio.set_xlabel("optimizer step")
    ax_ratio.set_ylabel("smoothed alignment ratio read by the rule")
    ax_ratio.set_title("MeasuredMomentumOff: ratio, decision (dashed)")
    ax_ratio.legend(fontsize=8)
    ax_ratio.grid(alpha=0.3)
    # Training loss of the seeds that diverged in any arm (seed 0 if none), switch steps marked.
    bad = sorted({n for arm in ARMS for n, a in enumerate(results[arm]["acc"]) if a < 0.2}) or [0]
    for i, arm in enumerate(ARMS):
        for n in bad:
            steps, values = results[arm]["train_loss"][n]
            ax_loss.plot(steps, values, color=f"C{i}", lw=1, alpha=0.8, ls=["-", "--", ":", "-."][n % 4],
                         label=f"{arm}, seed {n}")  # fmt: skip
            if results[arm]["switch"][n] is not None:
                ax_loss.axvline(results[arm]["switch"][n], color=f"C{i}", lw=0.8, ls=":")
    ax_loss.set_yscale("log")
    ax_loss.set_xlim(0, 10 * STEPS_PER_EPOCH)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (per batch)")
    ax_loss.set_title(f"seeds {bad}: training loss, switch steps dotted")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    for i, arm in enumerate(ARMS):
        for n, b in enumerate(results[arm]["bytes"]):
            ax_mem.plot([v / 1024 for v in b], color=f"C{i}", alpha=0.6, lw=1, label=arm if n == 0 else None)
    ax_mem.set_xlabel("optimizer step")
    ax_mem.set_ylabel("optimizer state (KiB)")
    ax_mem.set_xlim(0, xmax)
    ax_mem.legend(fontsize=8)
    ax_mem.grid(alpha=0.3)
    ax_box.boxplot([results[a]["acc"] for a in ARMS])
    ax_box.set_xticks(range(1, len(ARMS) + 1), [a.replace("(", "\n(") for a in ARMS])
    for i, arm in enumerate(ARMS):
        ax_box.scatter([i + 1] * len(results[arm]["acc"]), results[arm]["acc"], color=f"C{i}", zorder=3)
    ax_box.set_ylabel(f"final validation accuracy ({args.seeds} seeds)")
    ax_box.grid(alpha=0.3)
    fig.suptitle(f"Digits, SPA eta {args.eta:g}: momentum off after epoch 1 vs when the alignment ratio says so")
    fig.tight_layout()
    fig.savefig(args.out / f"{args.name}.png", dpi=110)
    print(table)
    print(f"wrote {args.out / args.name}.png and .md in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return table


if __name__ == "__main__":
    main()
