"""The momentum guard on the digits CNN: what it sees when momentum goes after the first epoch.

``MomentumOff(after_epochs=1)`` (gradual over one epoch, the guard at its defaults) on SPA
``c = 0.1`` at several ``eta``, several seeds. Per run: the final validation accuracy (0.1 is
chance: a diverged run), the guard's aborts, its reference (``||g||^2`` before the removal) and the
largest ``||g||^2`` and training loss in the watch, relative to that reference level. The guard
reads the gradients only, so an arm without abort trains exactly as without the guard.

Run (about a minute on 2 CPU cores)::

    python examples/reproduce/guard_digits.py --out runs/reproduce --seeds 5 --epochs 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from _common import fit_digits, write_table

from lightning_spa import SPA, MomentumOff

STEPS_PER_EPOCH = 23  # 1,437 training images, batch 64


class _Tap(pl.Callback):
    """``||g||^2`` before each optimizer step and each batch's training loss."""

    def __init__(self) -> None:
        self.grad_sq: list[float] = []
        self.loss: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grad_sq.append(sum(float(p.grad.square().sum()) for p in pl_module.parameters() if p.grad is not None))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss.append(float(torch.as_tensor(loss)))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--etas", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    args = parser.parse_args(argv)
    rows = []
    start, watch_end = STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH - 1  # removal over epoch 2, watched through epoch 3
    with tempfile.TemporaryDirectory():
        for eta in args.etas:
            for seed in range(args.seeds):
                callback, tap = MomentumOff(after_epochs=1), _Tap()
                trainer, _ = fit_digits(
                    seed, args.epochs, [callback, tap], optimizer=lambda p, eta=eta: SPA(p, lr=eta, c=0.1)
                )
                guard = callback._guards.guards[0]  # type: ignore[union-attr]
                ref = guard.reference or float("nan")
                loss_ref = sum(tap.loss[start - 10 : start]) / 10
                watched = slice(start, watch_end + 1)
                rows.append([
                    f"{eta:g}", seed, f"{float(trainer.callback_metrics['val/acc']):.3f}", guard.aborted_steps or "-",
                    f"{ref:.3g}", f"{max(tap.grad_sq[watched]) / ref:.3g}", f"{max(tap.loss[watched]) / loss_ref:.3g}",
                ])  # fmt: skip
    notes = (
        f"Digits CNN, SPA c 0.1, MomentumOff(after_epochs=1) with the default guard; {args.epochs} epochs, "
        f"{STEPS_PER_EPOCH} steps an epoch; the removal runs over steps {start}..{2 * STEPS_PER_EPOCH - 1} and is "
        f"watched through step {watch_end}. `max g2/ref`: the largest ||g||^2 of the watch over the guard's "
        "reference; `max loss/ref`: the largest batch loss of the watch over the mean of the 10 batches before it."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = write_table(
        args.out / "guard_digits.md", "Momentum guard on digits: MomentumOff after epoch 1",
        ["eta", "seed", "val acc", "aborted at", "reference ||g||^2", "max g2/ref", "max loss/ref"], rows, notes,
    )  # fmt: skip
    print(table)
    return table


if __name__ == "__main__":
    main()
