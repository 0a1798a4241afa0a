"""How often must the alignment ratio be measured for MeasuredMomentumOff to decide? (digits)

Trains the digits CNN (SPA ``eta``, ``c = 0.1``, constant schedule) with
``MomentumDiagnostics(every_n_steps=1, ema_decay=0)``, which logs the raw samples ``step_sq`` and
``grad_sq_scaled`` of every step. Then, offline, it feeds every ``n``-th step from the warm-up on
into the same bias-corrected EMA (:class:`lightning_spa.meter.DiagnosticsEMA`, decay per step, so a
sample ``n`` steps after the last weighs ``1 - decay**n``) and the same rule
(:class:`lightning_spa.decision.MomentumOffDecision`, MeasuredMomentumOff's defaults: warm-up and
patience one epoch, idle band [0.9, 1.25]), as MeasuredMomentumOff(every_n_steps=n) would. Also for an EMA
started at step 0 (what MomentumDiagnostics shows), to show why the callback starts it at the
warm-up. Writes ``measured_off_sampling.md``.

Run (about a minute on 2 busy CPU cores)::

    python examples/reproduce/measured_off_sampling.py --out runs/reproduce
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import fit_digits, write_table

from lightning_spa import SPA, MomentumDiagnostics
from lightning_spa.decision import DEFAULT_HIGH, DEFAULT_LOW, MomentumOffDecision
from lightning_spa.meter import DiagnosticsEMA

STEPS_PER_EPOCH = 23  # 1,437 training images, batch 64


def replay(
    steps: list[int], step_sq: list[float], scaled: list[float], n: int, start: int, decay: float, warmup: int,
    patience: int, eta: float = 1.0,
) -> tuple[dict[int, float], int | None]:  # fmt: skip
    """The ratio an EMA of every ``n``-th step from ``start`` reads, and the rule's decision step (constant ``eta``:
    once the ratio has damped for the patience, never)."""
    ema = DiagnosticsEMA(1, decay, torch.device("cpu"))
    rule = MomentumOffDecision(warmup_steps=warmup, patience_steps=patience)
    ratios: dict[int, float] = {}
    for k, a, b in zip(steps, step_sq, scaled, strict=True):
        if k < start or (k - start) % n:
            continue
        ema.update(torch.tensor([[a, 0.0, b, 0.0, 0.0, 0.0]], dtype=torch.float64), k, default_gap=n)
        ratios[k] = float(ema.corrected()[0, 4])
        if k >= warmup:
            rule.observe(k, ratios[k], eta)
    return ratios, rule.decided_step


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.95)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 5, 10])
    args = parser.parse_args(argv)
    start_time = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            _, s = fit_digits(seed, args.epochs, [MomentumDiagnostics(every_n_steps=1, ema_decay=0.0)],
                              log_dir=Path(tmp), optimizer=lambda p: SPA(p, lr=args.eta, c=0.1))  # fmt: skip
            steps, step_sq = s["spa/step_sq"]
            steps2, scaled = s["spa/grad_sq_scaled"]
            assert steps == steps2
            runs.append((steps, step_sq, scaled))
    w = p = STEPS_PER_EPOCH
    late = range(3 * STEPS_PER_EPOCH, args.epochs * STEPS_PER_EPOCH)
    rows = []
    for label, start in (("at the warm-up (MeasuredMomentumOff)", w), ("at step 0 (MomentumDiagnostics)", 0)):
        for n in args.every:
            decided, medians, highs = [], [], []
            for steps, a, b in runs:
                ratios, d = replay(steps, a, b, n, start, args.ema_decay, w, p, args.eta)
                decided.append("never" if d is None else str(d))
                values = [r for k, r in ratios.items() if k in late]
                medians.append(statistics.median(values))
                highs.append(max(values))
            rows.append([label, n, ", ".join(decided), f"{statistics.median(medians):.3g}",
                         f"{min(medians):.3g} .. {max(medians):.3g}", f"{statistics.median(highs):.3g}"])  # fmt: skip
    notes = (
        f"Digits CNN, SPA eta {args.eta:g}, c 0.1, constant schedule, batch 64 ({STEPS_PER_EPOCH} steps an epoch), "
        f"{args.epochs} epochs, {args.seeds} seeds; raw samples of every step replayed into DiagnosticsEMA (decay "
        f"{args.ema_decay:g} per step) and MomentumOffDecision (idle band [{DEFAULT_LOW:g}, {DEFAULT_HIGH:g}], "
        f"warm-up {w}, patience {p} steps). "
        f"'decision step' per seed; 'median ratio': median over epochs 4-{args.epochs} of the ratio read, median "
        "over seeds (and its range over seeds); 'max': its maximum in that window, median over seeds."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = write_table(
        args.out / "measured_off_sampling.md", "Sampling rate of the measured decision (digits)",
        ["EMA started", "every n steps", "decision step (per seed)", "median ratio, epochs 4+", "range over seeds",
         "max"], rows, notes,
    )  # fmt: skip
    print(table)
    print(f"wrote {args.out / 'measured_off_sampling.md'} in {time.perf_counter() - start_time:.0f} s")
    return table


if __name__ == "__main__":
    main()
