"""Paper Figure 4 on the bundled digits: an instant step-size drop spikes the loss, a geometric one does not.

Reuses ``examples/spike.py``: the digits CNN with SPA ``eta 1, c 0.1`` under
:class:`~lightning_spa.GradualSchedule` in paper mode (``eta`` 10x down, ``c`` 10x up at the
milestone), ``transition="instant"`` (equivalent SGD+M momentum ``(1 - 0.1) / 0.1 = 9`` for one
step) against ``transition="geometric"`` over one epoch. The loss on the whole training set is
measured after every optimizer step around the milestone (``THEORY.md`` section 6), per seed.
Writes ``figure4.png`` and ``figure4.md``.

Run (about a minute on 2 CPU cores)::

    python examples/reproduce/figure4.py --out runs/reproduce --seeds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import mean_std, write_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spike


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--milestone-epoch", type=int, default=4)
    parser.add_argument("--before", type=int, default=10, help="steps measured before the milestone")
    parser.add_argument("--after", type=int, default=40, help="steps measured after the milestone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs: dict[str, list[dict[int, float]]] = {"instant": [], "geometric": []}
    milestone = 0
    for seed in range(args.seeds):
        for transition in runs:
            milestone, losses = spike.run(transition, seed, args.milestone_epoch, args.before, args.after)
            runs[transition].append(losses)

    rows = []
    stats: dict[str, dict[str, list[float]]] = {}
    for transition, seeds in runs.items():
        st: dict[str, list[float]] = {"pre": [], "at": [], "peak": [], "rise": [], "peak_step": [], "final": []}
        for losses in seeds:
            after = {s: v for s, v in losses.items() if s > milestone}
            peak_step = max(after, key=after.__getitem__)
            st["pre"].append(max(v for s, v in losses.items() if s <= milestone))
            st["at"].append(losses[milestone])
            st["peak"].append(after[peak_step])
            st["rise"].append(after[peak_step] / losses[milestone])
            st["peak_step"].append(peak_step - milestone)
            st["final"].append(losses[max(losses)])
        stats[transition] = st
        cells = [transition]
        for key, digits in (("pre", 4), ("at", 4), ("peak", 4), ("rise", 3), ("peak_step", 1), ("final", 4)):
            m, sd = mean_std(st[key])
            cells.append(f"{m:.{digits}f} ± {sd:.{digits}f}")
        rows.append(cells)
    wins = sum(i > g for i, g in zip(stats["instant"]["peak"], stats["geometric"]["peak"], strict=True))
    notes = (
        f"Digits CNN, SPA eta 1, c 0.1, batch 64; milestone at epoch {args.milestone_epoch} (optimizer step "
        f"{milestone}): eta 10x down and c 10x up (paper mode). Full training-set loss after every optimizer step "
        f"from m-{args.before} to m+{args.after}; mean ± std over {args.seeds} seeds (same seeds in both arms). "
        f"'rise' = peak after the milestone / loss at the milestone. The instant drop's peak is higher than the "
        f"geometric one's in {wins} of {args.seeds} seeds."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = write_table(
        args.out / "figure4.md",
        "Figure 4 (digits): instant vs geometric transition",
        [
            "transition",
            f"max loss m-{args.before}..m",
            "loss at milestone",
            "peak after",
            "rise",
            "peak at step m+",
            f"loss at m+{args.after}",
        ],
        rows,
        notes,
    )

    from lightning_spa.figures import require_matplotlib

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (transition, seeds) in enumerate(runs.items()):
        steps = sorted(seeds[0])
        for losses in seeds:
            ax.plot([s - milestone for s in steps], [losses[s] for s in steps], color=f"C{i}", alpha=0.25, lw=0.8)
        mean = [sum(losses[s] for losses in seeds) / len(seeds) for s in steps]
        ax.plot([s - milestone for s in steps], mean, color=f"C{i}", lw=2, marker=".", label=f"{transition} (mean)")
    ax.axvline(0, color="grey", ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer steps after the milestone (eta 10x down, c 10x up)")
    ax.set_ylabel("full training-set loss")
    ax.set_title(f"Figure 4 on digits: instant vs geometric paper-mode drop ({args.seeds} seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "figure4.png", dpi=110)
    print(table)
    print(f"wrote {args.out / 'figure4.png'} and {args.out / 'figure4.md'} in {time.perf_counter() - start:.0f} s")
    return table


if __name__ == "__main__":
    main()
