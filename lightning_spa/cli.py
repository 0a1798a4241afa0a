"""The ``lightning-spa`` command: check schedules against Theorem 1, draw Figure 1, plot a run.

Subcommands::

    lightning-spa convert --eta 1 --c 0.1 --milestones 150 225 --unit epoch --steps-per-epoch 391 --epochs 300
    lightning-spa convert --lr 0.1 --momentum 0.9 --milestones 30 60 90 --unit epoch --steps-per-epoch 5005
    lightning-spa figure1 --out fig1.png
    lightning-spa plot lightning_logs/version_0 --out run.png

``convert`` takes a schedule in either form (SPA ``--eta/--c`` or SGD+M ``--lr/--momentum``),
prints the equivalent schedule in the other form as segments, flags every step whose
equivalent momentum is ``>= 1`` and the first step with no SPA equivalent, and suggests the
safe geometric transition. See :mod:`lightning_spa.convert` for the math.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-spa`` (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="lightning-spa",
        description="SGD with momentum as stochastic primal averaging (Defazio 2020): schedule tools.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert",
        help="show a schedule in the other form and check it against Theorem 1",
        description="Give the schedule in SPA form (--eta, --c) or in SGD+M form (--lr, --momentum).",
    )
    form = conv.add_argument_group("starting values (one form)")
    form.add_argument("--eta", type=float, help="SPA step size eta (with --c)")
    form.add_argument("--c", type=float, help="SPA averaging weight c in (0, 1] (with --eta)")
    form.add_argument("--lr", type=float, help="SGD+M learning rate (with --momentum)")
    form.add_argument("--momentum", type=float, help="SGD+M momentum (with --lr)")
    sched = conv.add_argument_group("schedule")
    sched.add_argument(
        "--milestones", type=int, nargs="*", default=[], help="where eta (or lr) is multiplied by --factor"
    )
    sched.add_argument("--factor", type=float, help="multiplier at each milestone (default 0.1)")
    sched.add_argument("--unit", choices=["step", "epoch"], default="step", help="unit of milestones (default step)")
    sched.add_argument("--steps-per-epoch", type=_positive_int, help="optimizer steps per epoch (needed for epochs)")
    sched.add_argument("--total-steps", type=_positive_int, help="length of the schedule in optimizer steps")
    sched.add_argument("--epochs", type=_positive_int, help="schedule length in epochs (needs --steps-per-epoch)")
    sched.add_argument(
        "--mode",
        choices=["paper", "lr"],
        help="SPA only: 'paper' (default) also divides c by the factor (max 1); 'lr' changes eta only",
    )
    sched.add_argument("--transition", choices=["instant", "geometric"], default="instant")
    sched.add_argument(
        "--transition-steps",
        type=_positive_int,
        help="optimizer steps of a geometric transition (default: the smallest safe one)",
    )
    sched.add_argument(
        "--momentum-after", type=float, nargs="*", default=[], help="SGD+M only: momentum after each milestone"
    )
    sched.add_argument("--momentum-off", type=int, help="SPA only: c becomes 1 from this step/epoch on (eta kept)")
    sched.add_argument("--warmup-steps", type=int, default=0, help="SPA only: linear eta warm-up (optimizer steps)")
    sched.add_argument(
        "--bounded",
        action="store_true",
        help="SGD+M input: pick the SPA form that stays finite (eta moves ahead of each change) instead of the one "
        "that starts constant and drifts after an lr drop (Figure 1a)",
    )
    out = conv.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    out.add_argument("--per-step", action="store_true", help="with --json: include every step's values")
    out.add_argument("--plot", type=Path, metavar="PNG", help="draw both forms like paper Figure 1")
    out.add_argument("--check", action="store_true", help="exit with status 2 if any step is flagged")

    fig = sub.add_parser("figure1", help="draw the six panels of paper Figure 1")
    fig.add_argument("--out", type=Path, default=Path("figure1.png"), help="PNG to write (default figure1.png)")

    plot = sub.add_parser("plot", help="diagnostics PNG of a run logged by MomentumDiagnostics")
    plot.add_argument("run_dir", type=Path, help="a TensorBoard log directory (e.g. lightning_logs/version_0)")
    plot.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/diagnostics.png)")
    return parser


def _to_steps(value: int, args: argparse.Namespace, name: str) -> int:
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    if args.unit == "step":
        return value
    if args.steps_per_epoch is None:
        raise ValueError("`--unit epoch` needs `--steps-per-epoch` to turn epochs into optimizer steps.")
    return value * int(args.steps_per_epoch)


def _report(args: argparse.Namespace):  # type: ignore[no-untyped-def]  # returns ConversionReport
    from lightning_spa.convert import convert_sgdm, convert_spa, sgdm_schedule
    from lightning_spa.factory import resolve_hyperparameters
    from lightning_spa.schedule import Mode, MomentumRemoval, SPASchedule, StepDecay, smallest_safe_transition_steps

    spa_given = args.eta is not None or args.c is not None
    sgdm_given = args.lr is not None or args.momentum is not None
    if not (spa_given or sgdm_given):
        raise ValueError("Give the starting values: `--eta` and `--c` (SPA) or `--lr` and `--momentum` (SGD+M).")
    if spa_given and sgdm_given:
        raise ValueError("Give `--eta`/`--c` (SPA) or `--lr`/`--momentum` (SGD+M), not both.")
    if sgdm_given:  # momentum >= 1 is accepted here, to be flagged
        if args.lr is None or args.momentum is None:
            raise ValueError(f"`--{'lr' if args.lr is None else 'momentum'}` is missing: SGD+M needs both.")
        if not args.lr > 0.0 or not args.momentum >= 0.0:
            raise ValueError(f"`--lr` must be > 0 and `--momentum` >= 0, got {args.lr} and {args.momentum}.")
    else:
        eta0, c0 = resolve_hyperparameters(eta=args.eta, c=args.c)
    milestones = [_to_steps(m, args, "--milestones") for m in args.milestones]
    if args.total_steps is not None and args.epochs is not None:
        raise ValueError("Give `--total-steps` or `--epochs`, not both.")
    if args.epochs is not None:
        total = _to_steps(args.epochs, argparse.Namespace(**{**vars(args), "unit": "epoch"}), "--epochs")
    elif args.total_steps is not None:
        total = args.total_steps
    else:
        total = max(100, 2 * max(milestones, default=0))
    if args.factor is not None and not milestones:
        raise ValueError("`--factor` applies at `--milestones`: give the milestones too.")
    args.factor = 0.1 if args.factor is None else args.factor
    late = [m for m, step in zip(args.milestones, milestones, strict=True) if step >= total]
    if late:
        raise ValueError(
            f"`--milestones` {late} fall at or after the end of the schedule ({total} steps) and would be ignored: "
            "lengthen it with `--total-steps`/`--epochs` or drop them."
        )
    if args.per_step and not args.json:
        raise ValueError("`--per-step` lists every step in the JSON output: add `--json`.")
    if args.unit == "step" and args.steps_per_epoch is not None and args.epochs is None:
        raise ValueError("`--steps-per-epoch` is only used with `--unit epoch` or `--epochs`; drop it or use them.")
    if args.transition == "instant" and args.transition_steps not in (None, 1):
        raise ValueError("`--transition-steps` needs `--transition geometric` (an instant change is 1 step).")
    unit = "epoch" if args.unit == "epoch" else "step"
    where = f"milestones {args.milestones} ({unit}s)" if milestones else "no milestones"

    if sgdm_given:
        for name in ("mode", "momentum_off"):
            if getattr(args, name) is not None:
                raise ValueError(f"`--{name.replace('_', '-')}` applies to SPA schedules (--eta/--c) only.")
        if args.warmup_steps:
            raise ValueError("`--warmup-steps` applies to SPA schedules (--eta/--c) only.")
        t = args.transition_steps or 1
        if args.transition == "geometric" and args.transition_steps is None:
            raise ValueError("For an SGD+M schedule give `--transition-steps` with `--transition geometric`.")
        alpha, beta = sgdm_schedule(total, args.lr, args.momentum, milestones, args.factor, args.momentum_after, t)
        desc = (
            f"SGD+M lr {args.lr:g}, momentum {args.momentum:g}; {where}"
            + (f", lr x{args.factor:g}" if milestones else "")
            + (f", momentum -> {args.momentum_after}" if args.momentum_after else "")
            + (f", {args.transition}" if milestones else "")
            + (f" over {t} steps" if t > 1 else "")
            + f"; {total} steps"
        )
        return convert_sgdm(alpha, beta, desc, milestones, args.factor, eta0="bounded" if args.bounded else None)

    if args.momentum_after:
        raise ValueError("`--momentum-after` applies to SGD+M schedules (--lr/--momentum) only.")
    mode: Mode = "lr" if args.mode == "lr" else "paper"
    others: list[SPASchedule] = []
    if args.momentum_off is not None:
        others.append(MomentumRemoval(_to_steps(args.momentum_off, args, "--momentum-off")))
    decay = None
    t = 1
    if milestones:
        if args.transition == "geometric":
            if args.transition_steps is None:
                probe = StepDecay(tuple(milestones), args.factor, mode, 1, args.warmup_steps)
                t = smallest_safe_transition_steps(probe, others, [(eta0, c0)]) or 1
            else:
                t = args.transition_steps
        decay = StepDecay(tuple(milestones), args.factor, mode, t, args.warmup_steps)
    elif args.warmup_steps:
        decay = StepDecay((), args.factor, mode, 1, args.warmup_steps)
    desc = (
        f"SPA eta {eta0:g}, c {c0:g}; {where}"
        + (f", eta x{args.factor:g} ({mode} mode), {args.transition}" if milestones else "")
        + (f" over {t} steps" if t > 1 else "")
        + (f", linear warm-up over {args.warmup_steps} steps" if args.warmup_steps else "")
        + (f", momentum off at {args.momentum_off} ({unit}s)" if args.momentum_off is not None else "")
        + f"; {total} steps"
    )
    return convert_spa(total, eta0, c0, decay, others, desc)


def _ranges(steps: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for k in steps:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def format_report(report) -> str:  # type: ignore[no-untyped-def]
    """The text printed by ``lightning-spa convert``."""
    from lightning_spa.convert import segments

    lines = [f"Schedule: {report.description}", ""]

    def table(title: str, names: tuple[str, str], a: Sequence[float], b: Sequence[float], warn: bool) -> None:
        lines.append(title)
        flagged = {k for k, _ in report.momentum_ge_1}
        for start, end, (sa, sb) in segments(a, b):
            steps = f"step  {start}" if start == end else f"steps {start}-{end}"
            mark = "   <-- momentum >= 1" if warn and any(start <= k <= end for k in flagged) else ""
            lines.append(f"  {steps:<16} {names[0]} {sa.describe():<36} {names[1]} {sb.describe()}{mark}")
        lines.append("")

    sgd = ("SGD+M form (lr, momentum):", ("lr", "momentum"), report.alpha, report.beta, True)
    spa = ("SPA form (eta, c):", ("eta", "c"), report.eta, report.c, False)
    for title, names, a, b, warn in ([spa, sgd] if report.source == "spa" else [sgd, spa]):
        if a:
            table(title, names, a, b, warn)
        else:
            lines.extend([title, "  (none)", ""])
    if report.momentum_ge_1:
        steps = [k for k, _ in report.momentum_ge_1]
        worst = max(report.momentum_ge_1, key=lambda km: km[1])
        shown = ", ".join(f"{k} ({m:.4g})" for k, m in report.momentum_ge_1[:10])
        more = f" ... ({len(steps)} steps: {_ranges(steps)})" if len(steps) > 10 else ""
        lines.append(
            f"FLAG: equivalent momentum >= 1 at {len(steps)} step(s): {shown}{more}; largest {worst[1]:.4g} at step "
            f"{worst[0]}. A momentum >= 1 amplifies the buffer instead of averaging it: the iterates jump and the loss "
            "spikes (paper Figure 4)."
        )
    else:
        lines.append("OK: the equivalent momentum stays below 1 at every step.")
    if report.no_spa_equivalent is not None:
        k = report.no_spa_equivalent["step"]
        lines.append(
            f"FLAG: no SPA equivalent from step {k} on (steps {k}-{report.total_steps - 1}): "
            f"{report.no_spa_equivalent['reason']}"
        )
    elif report.source == "sgdm":
        lines.append("OK: every step has an SPA equivalent.")
    if report.suggestion is not None:
        lines.append(f"Suggestion: {report.suggestion['text']}.")
    return "\n".join(lines)


def _convert(args: argparse.Namespace) -> int:
    report = _report(args)
    if args.json:
        print(json.dumps(report.to_dict(per_step=args.per_step), indent=1))
    else:
        print(format_report(report))
    if args.plot is not None:
        from lightning_spa.figures import plot_conversion

        path = plot_conversion(report, args.plot)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    flagged = bool(report.momentum_ge_1) or report.no_spa_equivalent is not None
    return 2 if args.check and flagged else 0


def _plot(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise ValueError(
            f"RUN_DIR {args.run_dir} is not a directory (give a TensorBoard log dir, e.g. lightning_logs/version_0)."
        )
    try:
        from lightning_spa.plotting import plot_run
    except ImportError as err:
        raise ImportError(f"`lightning-spa plot` needs lightning_spa.plotting ({err}).") from err
    out = args.out if args.out is not None else args.run_dir / "diagnostics.png"
    path = plot_run(args.run_dir, out)
    print(f"wrote {path if path is not None else out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-spa`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "figure1":
            from lightning_spa.figures import plot_figure1

            print(f"wrote {plot_figure1(args.out)}")
            return 0
        return _plot(args)
    except (ValueError, ImportError) as err:
        print(f"lightning-spa {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
