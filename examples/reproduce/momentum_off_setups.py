"""Is it safe to switch momentum off? Four small set-ups, three arms, several seeds (issue 15).

Three set-ups where the smoothed alignment ratio (``THEORY.md`` section 4) stays below 1 for most of
the run, i.e. momentum *damps* (section 10), and one where momentum goes *idle* late:

- ``digits-eta1``: the digits CNN, SPA ``eta 1, c 0.1`` (SGD+M ``lr 0.1, momentum 0.9``), batch 64
  reshuffled every epoch, ``eta`` 10x down at 50% and 75% of training (``"lr"`` mode, geometric over
  one epoch): the set-up of ``measured_off.py``;
- ``waves-sgd``: the textbook torch recipe on a second task: ``torch.optim.SGD(lr 0.1, momentum 0.9,
  weight_decay 5e-4)``, batch 100 reshuffled every epoch, lr 10x down at 50% and 75%, on a
  3-layer Conv1d net classifying synthetic 1-D waveforms (10 classes, random shifts and noise);
- ``blobs-mlp``: an MLP on sklearn's ``make_classification`` (4 classes), torch SGD lr 0.1 / momentum
  0.9, batch 50 reshuffled, the same lr cuts;
- ``digits-eta2``: the digits CNN at SPA ``eta 2`` (``lr 0.2, momentum 0.9``): momentum damps hard until the
  first cut, then goes idle (the late-phase set-up).

Arms: momentum throughout; ``MomentumOff()`` at its defaults (``c -> 1`` from the end of epoch 1,
geometric over one epoch); ``MeasuredMomentumOff()`` at its defaults. Every schedule is a callback
(``GradualSchedule(mode="lr")``), so all three arms follow the same step-size schedule.

The momentum-throughout arm also records the ratio the rule would read (``MomentumMeter``, EMA 0.95,
every step from the end of epoch 1, as ``MeasuredMomentumOff`` measures it): its distribution per
phase (before the first cut / between the cuts / after the second) is what the band of
:mod:`lightning_spa.decision` is chosen from (``docs/THEORY.md``, "When is momentum idle?").

The momentum-throughout traces also replay the rule (before its decision a MeasuredMomentumOff run is that
run): where the old one-sided rule (``ratio <= 1.1``) and the band with a patience of one and two epochs
would decide.

Run with one thread (2-5 minutes for 5 seeds, 60 fits, on a busy CPU)::

    OMP_NUM_THREADS=1 python examples/reproduce/momentum_off_setups.py --seeds 5 --out examples/reproduce/results
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _common import write_table
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_spa import SPA, GradualSchedule, MomentumOff
from lightning_spa.callbacks.measured import MeasuredMomentumOff
from lightning_spa.decision import DEFAULT_ETA_DROP, DEFAULT_HIGH, DEFAULT_LOW, MomentumOffDecision
from lightning_spa.demos import DigitsCNN, DigitsDataModule
from lightning_spa.meter import MomentumMeter

ARMS = ("momentum throughout", "MomentumOff()", "MeasuredMomentumOff()")
CHANCE_MARGIN = 0.2  # 'diverged': final accuracy below chance + this (or a non-finite loss)


# ----- tasks ----------------------------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    """A network, an optimizer factory, cross-entropy; logs ``train/loss``, ``val/loss``, ``val/acc``."""

    def __init__(self, net: nn.Module, optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net, self.optimizer_factory = net, optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class Data(pl.LightningDataModule):
    def __init__(self, train: TensorDataset, val: TensorDataset, batch_size: int, replacement: bool = False) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.replacement = train, val, batch_size, replacement

    def train_dataloader(self) -> DataLoader:
        if self.replacement:  # i.i.d. batches: no anti-correlation within an epoch
            sampler = RandomSampler(self.train, replacement=True, num_samples=len(self.train))
            return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler, drop_last=True)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=1000)


def waves(n: int = 2500, length: int = 64, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """10 classes of 1-D waveforms (two sinusoids per class), randomly shifted, in Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.rand(10, 2, generator=gen) * 0.25 + 0.05
    labels = torch.arange(n) % 10
    shift = torch.rand(n, 1, generator=gen) * 2 * math.pi
    f = freqs[labels]
    x = torch.sin(2 * math.pi * f[:, :1] * t + shift) + 0.7 * torch.sin(2 * math.pi * f[:, 1:] * t + 2 * shift)
    x = x + 0.8 * torch.randn(n, length, generator=gen)
    x = x.unsqueeze(1)
    perm = torch.randperm(n, generator=gen)
    x, labels = x[perm], labels[perm]
    cut = 2000
    return TensorDataset(x[:cut], labels[:cut]), TensorDataset(x[cut:], labels[cut:])


def waves_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def blobs(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=3000, n_features=20, n_informative=10, n_classes=4, n_clusters_per_class=2,
                               class_sep=1.0, flip_y=0.02, random_state=seed)  # fmt: skip
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return TensorDataset(xt[:2500], yt[:2500]), TensorDataset(xt[2500:], yt[2500:])


def blobs_net() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))


def sgd(lr: float, momentum: float, weight_decay: float = 0.0) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, weight_decay=weight_decay)


def spa(eta: float, c: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: SPA(p, lr=eta, c=c)


@dataclass(frozen=True)
class Setup:
    name: str
    description: str
    epochs: int
    make: Callable[[Callable[[Any], torch.optim.Optimizer]], tuple[pl.LightningModule, pl.LightningDataModule]]
    optimizer: Callable[[Any], torch.optim.Optimizer]


def _digits(replacement: bool) -> Callable[..., tuple[pl.LightningModule, pl.LightningDataModule]]:
    def make(opt: Callable[[Any], torch.optim.Optimizer]) -> tuple[pl.LightningModule, pl.LightningDataModule]:
        data = DigitsDataModule(batch_size=64, seed=0)
        if replacement:
            data.setup("fit")
            return DigitsCNN(optimizer=opt), Data(data.train_set, data.val_set, 64, replacement=True)
        return DigitsCNN(optimizer=opt), data

    return make


def _task(
    dataset: Callable[[], tuple[TensorDataset, TensorDataset]],
    net: Callable[[], nn.Module],
    batch: int,
    replacement: bool = False,
):  # type: ignore[no-untyped-def]
    def make(opt: Callable[[Any], torch.optim.Optimizer]) -> tuple[pl.LightningModule, pl.LightningDataModule]:
        train, val = dataset()
        return Classifier(net(), opt), Data(train, val, batch, replacement)

    return make


SETUPS = {
    s.name: s
    for s in (
        Setup("digits-eta1", "digits CNN, SPA eta 1 c 0.1, batch 64 reshuffled", 20, _digits(False), spa(1.0, 0.1)),
        Setup(
            "waves-sgd",
            "Conv1d on synthetic waves, torch SGD lr 0.1 m 0.9 wd 5e-4, batch 100 reshuffled",
            16,
            _task(waves, waves_net, 100),
            sgd(0.1, 0.9, 5e-4),
        ),
        Setup(
            "blobs-mlp",
            "MLP on make_classification, torch SGD lr 0.1 m 0.9, batch 50 reshuffled",
            16,
            _task(blobs, blobs_net, 50),
            sgd(0.1, 0.9),
        ),
        Setup("digits-eta2", "digits CNN, SPA eta 2 c 0.1, batch 64 reshuffled", 20, _digits(False), spa(2.0, 0.1)),
    )
}


# ----- measurement ----------------------------------------------------------------------------------------


class Trace(pl.Callback):
    """Optimizer-state bytes after each step, and (``ratio=True``) the smoothed ratio from step ``start`` on,
    measured as MeasuredMomentumOff measures it (every step, EMA decay 0.95 started at ``start``)."""

    def __init__(self, start: int | None) -> None:
        self.start = start
        self.bytes: list[int] = []
        self.ratios: list[tuple[int, float, float]] = []
        self.meter: MomentumMeter | None = None
        self.steps = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.start is None or self.steps < self.start:
            return
        if self.meter is None:
            self.meter = MomentumMeter(trainer.optimizers[0], every_n_steps=None, ema_decay=0.95).attach()
            start = self.start  # the meter's clock counts from its attachment, here step `start`
            self.meter.listeners.append(lambda r: self.ratios.append((start + r.step, r.ratio, r.hypers[0].eta)))
        self.meter.measure_next_step()
        self.meter.before_step()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps += 1
        opt = trainer.optimizers[0]
        self.bytes.append(
            sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.meter is not None:
            self.meter.detach()


def guard_episodes(callback: pl.Callback) -> tuple[list[int], list[int]]:
    """Starts and aborts of the momentum removals of a callback's guard (optimizer 0), or two empty lists."""
    runner = getattr(callback, "_guards", None)  # the guard's per-optimizer state (no public accessor yet)
    guard = None if runner is None else runner.guards.get(0)
    if guard is None:
        return [], []
    return [int(start) for start, _ in guard.episodes], [int(a) for _, a in guard.episodes if a is not None]


def run(setup: Setup, arm: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    model, data = setup.make(setup.optimizer)
    milestones = [setup.epochs // 2, (3 * setup.epochs) // 4]
    if not hasattr(data, "train"):
        data.setup("fit")
    steps_per_epoch = len(data.train_dataloader())
    # geometric over at least 30 steps: 10x in 22 or fewer would push the SGD+M momentum (1-c) r to >= 1
    schedule = GradualSchedule(
        milestones,
        factor=0.1,
        mode="lr",
        transition_steps=min(max(steps_per_epoch, 30), (milestones[1] - milestones[0]) * steps_per_epoch),
    )
    off: pl.Callback | None = None
    if arm == "MomentumOff()":
        off = MomentumOff()
    elif arm == "MeasuredMomentumOff()":
        off = MeasuredMomentumOff()
    trace = Trace(start=steps_per_epoch if arm == ARMS[0] else None)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=setup.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[schedule, *([off] if off is not None else []), trace],
    )  # fmt: skip
    trainer.fit(model, data)
    acc = float(trainer.callback_metrics.get("val/acc", torch.tensor(math.nan)))
    loss = float(trainer.callback_metrics.get("val/loss", torch.tensor(math.nan)))
    switch: list[int] = []
    aborts: list[int] = []
    if off is not None:
        switch, aborts = guard_episodes(off)
    if not switch and isinstance(off, MeasuredMomentumOff):  # no guard
        switch = [s + 1 for s in off.decided_steps.values() if s is not None]
    elif not switch and isinstance(off, MomentumOff):
        switch = [steps_per_epoch]
    return {
        "acc": acc, "loss": loss, "switch": switch, "aborts": aborts,
        "bytes_start": trace.bytes[0] if trace.bytes else 0, "bytes_end": trace.bytes[-1] if trace.bytes else 0,
        "ratios": trace.ratios, "steps_per_epoch": steps_per_epoch, "milestones": milestones,
    }  # fmt: skip


# ----- report ---------------------------------------------------------------------------------------------


def phase_stats(results: list[dict[str, Any]], low: float, high: float) -> list[list[Any]]:
    """Per phase of the momentum-throughout runs: ratio quantiles and the share below / in / above the band."""
    rows = []
    spe, (m1, m2) = results[0]["steps_per_epoch"], results[0]["milestones"]
    phases = (("epoch 1 .. first cut", spe, m1 * spe), ("between the cuts", m1 * spe, m2 * spe),
              ("after the second cut", m2 * spe, 10**9))  # fmt: skip
    for label, lo, hi in phases:
        values = sorted(r for res in results for k, r, _ in res["ratios"] if lo <= k < hi and math.isfinite(r))
        if not values:
            continue
        q = statistics.quantiles(values, n=20)
        n = len(values)
        below, above = sum(v < low for v in values) / n, sum(v > high for v in values) / n
        rows.append([label, f"{q[0]:.2f}", f"{statistics.median(values):.2f}", f"{q[-1]:.2f}", f"{below:.0%}",
                     f"{1 - below - above:.0%}", f"{above:.0%}"])  # fmt: skip
    return rows


RULES = (  # label, low, high, patience in epochs, eta_drop
    ("ratio <= 1.1 (old)", 1e-9, 1.1, 1, 1.0),
    (f"band [{DEFAULT_LOW:g}, {DEFAULT_HIGH:g}] only", DEFAULT_LOW, DEFAULT_HIGH, 1, 1.0),
    ("band, patience 2 epochs", DEFAULT_LOW, DEFAULT_HIGH, 2, 1.0),
    (f"band + eta_drop {DEFAULT_ETA_DROP:g} (default)", DEFAULT_LOW, DEFAULT_HIGH, 1, DEFAULT_ETA_DROP),
)


def replay(results: list[dict[str, Any]]) -> list[str]:
    """Per rule of RULES: the decision step of each momentum-throughout trace, with its epoch and ``eta`` phase."""
    spe, (m1, m2) = results[0]["steps_per_epoch"], results[0]["milestones"]
    cells = []
    for _, low, high, patience, eta_drop in RULES:
        steps = []
        for res in results:
            rule = MomentumOffDecision(
                low=low, high=high, warmup_steps=spe, patience_steps=patience * spe, eta_drop=eta_drop
            )
            decided = next((k for k, r, eta in res["ratios"] if rule.observe(k, r, eta)), None)
            if decided is None:
                steps.append("-")
            else:
                phase = "eta0" if decided < m1 * spe else "eta0/10" if decided < m2 * spe else "eta0/100"
                steps.append(f"{decided} ({phase})")
        cells.append(", ".join(steps))
    return cells


def diverged(res: dict[str, Any], classes: int) -> bool:
    return not math.isfinite(res["loss"]) or res["acc"] < 1 / classes + CHANCE_MARGIN


def report(all_results: dict[str, dict[str, list[dict[str, Any]]]], out: Path, seconds: float) -> str:
    rows, phase_rows, replay_rows = [], [], []
    for name, by_arm in all_results.items():
        classes = 4 if name == "blobs-mlp" else 10
        base = statistics.fmean(r["acc"] for r in by_arm[ARMS[0]])
        for arm in ARMS:
            res = by_arm[arm]
            accs = [r["acc"] for r in res]
            mean = statistics.fmean(accs)
            switch = "; ".join(",".join(map(str, r["switch"])) or "-" for r in res)
            aborts = "; ".join(",".join(map(str, r["aborts"])) or "-" for r in res)
            freed = statistics.fmean((r["bytes_start"] - r["bytes_end"]) / 1024 for r in res)
            rows.append([name, arm, f"{100 * mean:.2f}", f"{100 * (mean - base):+.2f}",
                         ", ".join(f"{100 * a:.1f}" for a in accs), sum(diverged(r, classes) for r in res), switch,
                         aborts, f"{freed:.1f}"])  # fmt: skip
        for row in phase_stats(by_arm[ARMS[0]], DEFAULT_LOW, DEFAULT_HIGH):
            phase_rows.append([name, *row])
        replay_rows.append([name, *replay(by_arm[ARMS[0]])])
    header = ["set-up", "arm", "val acc % (mean)", "vs throughout", "per seed", "diverged", "switch step (per seed)",
              "abort step (per seed)", "optimizer memory freed, KiB"]  # fmt: skip
    notes = [
        "Set-ups: "
        + "; ".join(f"`{s.name}`: {s.description}, {s.epochs} epochs" for s in SETUPS.values() if s.name in all_results)
        + ". "
        "Step size 10x down at 50% and 75% of training (`GradualSchedule(mode='lr')`, geometric over one epoch, at "
        "least 30 steps) in "
        "every arm. 'diverged': a non-finite validation loss or accuracy below chance + 0.2. 'switch step': the first "
        "optimizer step with less momentum. 'abort step': a removal the guard took back (empty: none, or no guard). "
        "'memory freed': optimizer state at the first step minus at the end (momentum buffers dropped at c = 1), mean "
        "over seeds; SPA drops its buffers at c = 1, torch SGD keeps its `momentum_buffer` at momentum 0 (0 freed). "
        "Both callbacks at their defaults, guard included (`guard=True`). "
        f"Took {seconds:.0f} s with one thread.",
        "",
        f"#### The ratio MeasuredMomentumOff reads, in the momentum-throughout runs (band [{DEFAULT_LOW:g}, "
        f"{DEFAULT_HIGH:g}])",
        "",
        "| set-up | phase | 5% | median | 95% | below the band | in the band | above |",
        "|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(map(str, r)) + " |" for r in phase_rows),
        "",
        "Smoothed ratio (EMA 0.95 started at the end of epoch 1, every step measured), pooled over seeds: quantiles "
        "and the share of steps below, inside and above the idle band of `MomentumOffDecision`.",
        "",
        "#### Where each rule decides on those traces (decision step per seed; eta0/10: after the first cut)",
        "",
        "| set-up | " + " | ".join(name for name, *_ in RULES) + " |",
        "|---|" + "---|" * len(RULES),
        *("| " + " | ".join(map(str, r)) + " |" for r in replay_rows),
        "",
        "Warm-up one epoch; the rule replayed on the ratio of the momentum-throughout run, which is the run of "
        "MeasuredMomentumOff up to its decision ('-': never).",
    ]
    title = f"Momentum off: three arms on {len(all_results)} set-ups"
    return write_table(out / "momentum_off_setups.md", title, header, rows, "\n".join(notes))


def plot(all_results: dict[str, dict[str, list[dict[str, Any]]]], out: Path) -> None:
    from lightning_spa.figures import require_matplotlib

    plt = require_matplotlib()
    names = list(all_results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.5), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0][j]
        for n, res in enumerate(all_results[name][ARMS[0]]):
            ax.plot([t[0] for t in res["ratios"]], [t[1] for t in res["ratios"]], lw=0.8, color=f"C{n}")
        spe, ms = all_results[name][ARMS[0]][0]["steps_per_epoch"], all_results[name][ARMS[0]][0]["milestones"]
        ax.axhspan(DEFAULT_LOW, DEFAULT_HIGH, color="g", alpha=0.15, label="idle band")
        for m in ms:
            ax.axvline(m * spe, color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        if j == 0:
            ax.set_ylabel("smoothed ratio, momentum throughout\n(<1 damping, ~1 idle, >1 accelerating)")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1][j]
        for i, arm in enumerate(ARMS):
            accs = [100 * r["acc"] for r in all_results[name][arm]]
            ax.scatter([i] * len(accs), accs, color=f"C{i}", zorder=3)
            ax.plot([i - 0.2, i + 0.2], [statistics.fmean(accs)] * 2, color="k")
        ax.set_xticks(range(len(ARMS)), ["throughout", "MomentumOff()", "Measured..()"], fontsize=8)
        ax.set_ylabel("final validation accuracy, %")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "momentum_off_setups.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--arms", nargs="+", type=int, default=[0, 1, 2], help="indices into " + ", ".join(ARMS))
    parser.add_argument("--epochs", type=int, default=None, help="override every set-up's epochs (smoke tests)")
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in args.setups:
        setup = SETUPS[name]
        if args.epochs is not None:
            setup = Setup(setup.name, setup.description, args.epochs, setup.make, setup.optimizer)
        results[name] = {arm: [] for arm in ARMS}
        for seed in range(args.seeds):
            for a in sorted(set(args.arms) | {0}):
                res = run(setup, ARMS[a], seed)
                results[name][ARMS[a]].append(res)
                print(f"{name} {ARMS[a]} seed {seed}: acc {res['acc']:.4f} switch {res['switch']} "
                      f"aborts {res['aborts']} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        for a in range(len(ARMS)):
            if not results[name][ARMS[a]]:
                results[name][ARMS[a]] = [{**r, "acc": math.nan, "switch": [], "aborts": []}
                                          for r in results[name][ARMS[0]]]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results))
    table = report(results, args.out, time.perf_counter() - start)
    plot(results, args.out)
    print(table)
    return table


if __name__ == "__main__":
    main()
