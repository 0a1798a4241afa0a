"""The loss spike of an instant step-size drop, and its absence with a geometric one (paper Figure 4).

Trains the bundled-digits CNN with SPA (``eta 1, c 0.1``, i.e. SGD+M ``lr 0.1, momentum 0.9``)
under :class:`~lightning_spa.GradualSchedule` in paper mode (``eta`` 10x down, ``c`` 10x up)
twice per seed: ``transition="instant"`` (equivalent SGD+M momentum 9 for one step) and
``transition="geometric"`` over one epoch. Around the milestone the loss on the *whole*
training set is evaluated after every optimizer step (``THEORY.md`` section 6: the per-batch
loss is too noisy), averaged over seeds, plotted, and the peak after the milestone printed.

Run::

    python examples/spike.py --out spike.png            # about a minute or two on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_spa import GradualSchedule
from lightning_spa.demos import DigitsCNN, DigitsDataModule


class FullTrainLoss(pl.Callback):
    """After each optimizer step in ``[first, last]``, the mean loss over the whole training set."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.losses: dict[int, float] = {}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps taken: the loss of x_step
        if not self.first <= step <= self.last:
            return
        data = trainer.datamodule.train_set  # type: ignore[attr-defined]
        images, labels = data.tensors
        pl_module.eval()
        loss = F.cross_entropy(pl_module(images.to(pl_module.device)), labels.to(pl_module.device))
        pl_module.train()
        self.losses[step] = float(loss)


def run(transition: str, seed: int, milestone_epoch: int, before: int, after: int) -> tuple[int, dict[int, float]]:
    """Trains one run; returns the milestone's optimizer step and the full-training-set losses."""
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64)
    data.setup()
    steps_per_epoch = -(-len(data.train_set) // data.batch_size)
    milestone = milestone_epoch * steps_per_epoch
    probe = FullTrainLoss(milestone - before, milestone + after)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=milestone + after,
        callbacks=[GradualSchedule([milestone_epoch], factor=0.1, mode="paper", transition=transition), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(DigitsCNN(), data)  # SPA(lr=1.0, c=0.1)
    return milestone, probe.losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="spike.png", help="where to write the PNG (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds averaged (default: %(default)s)")
    parser.add_argument("--milestone-epoch", type=int, default=4, help="epoch of the 10x drop (default: %(default)s)")
    parser.add_argument("--before", type=int, default=10, help="steps shown before the milestone")
    parser.add_argument("--after", type=int, default=40, help="steps shown after the milestone")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.milestone_epoch < 1 or args.before < 1 or args.after < 1:
        parser.error("--seeds, --milestone-epoch, --before and --after must be >= 1")
    # One thread: this model is far too small to gain from more, and on a busy machine extra
    # intra-op threads make each step up to 50x slower.
    torch.set_num_threads(1)
    start = time.perf_counter()

    curves: dict[str, dict[int, float]] = {}
    milestone = 0
    for transition in ("instant", "geometric"):
        total: dict[int, float] = {}
        for seed in range(args.seeds):
            milestone, losses = run(transition, seed, args.milestone_epoch, args.before, args.after)
            for step, loss in losses.items():
                total[step] = total.get(step, 0.0) + loss / args.seeds
        curves[transition] = total

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for transition, curve in curves.items():
        steps = sorted(curve)
        ax.plot([s - milestone for s in steps], [curve[s] for s in steps], marker=".", label=transition)
    ax.axvline(0, color="grey", linestyle=":")
    ax.set_xlabel("optimizer steps after the milestone (eta 10x down, c 10x up)")
    ax.set_ylabel(f"full training-set loss (mean of {args.seeds} seeds)")
    ax.set_yscale("log")
    ax.set_title("SPA eta 1, c 0.1 on digits: instant vs geometric paper-mode drop")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)

    print(f"milestone at optimizer step {milestone} (epoch {args.milestone_epoch}); {args.seeds} seeds")
    for transition, curve in curves.items():
        pre = curve[milestone]  # loss of x_m: the last iterate before the drop acts
        pre_max = max(v for s, v in curve.items() if s <= milestone)
        peak_step = max((s for s in curve if s > milestone), key=curve.__getitem__)
        print(
            f"{transition:>9}: loss at the milestone {pre:.4f} (max of the {args.before} steps before {pre_max:.4f}), "
            f"peak after it {curve[peak_step]:.4f} (step m+{peak_step - milestone}), final {curve[max(curve)]:.4f}"
        )
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
