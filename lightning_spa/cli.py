"""The ``lightning-spa`` command: check schedules against Theorem 1, draw Figure 1, plot a run.

Subcommands::

    lightning-spa convert --eta 1 --c 0.1 --milestones 150 225 --unit epoch --steps-per-epoch 391 --epochs 300
    lightning-spa convert --lr 0.1 --momentum 0.9 --milestones 30 60 90 --unit epoch --steps-per-epoch 5005
    lightning-spa convert --from keras --lr 0.01 --momentum 0.9 --milestones 30 60 --unit epoch --steps-per-epoch 156.4
    lightning-spa figure1 --out fig1.png
    lightning-spa plot lightning_logs/version_0 --out run.png

``convert`` takes a schedule in SPA form (``--eta/--c``), torch SGD+M form (``--lr/--momentum``)
or Keras/TensorFlow form (``--from keras --lr/--momentum``), prints the equivalent schedules as
segments, flags every step whose equivalent momentum is ``>= 1`` and a step with no SPA
equivalent, and suggests the safe geometric transition. See :mod:`lightning_spa.convert`.

Exit status (also in ``--help``), the same with or without ``--check``: 0 success, nothing
flagged; 1 invalid input (the options parse but describe no valid schedule, or ``plot`` finds
no readable run); 2 usage error (argparse); 3 ``convert`` flagged the schedule (its report is
printed in full; ``--check`` prints only the verdict lines).

Start-up cost: this module imports only the standard library; ``--help`` and ``convert``
import neither torch nor Lightning (``tests/test_imports.py``, ``benchmarks/cli_startup.py``).
``figure1`` and ``plot`` import matplotlib (``plot``: tensorboard too, for event files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

__all__ = ["EXIT_FLAGGED", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
"""Success; for ``convert``: nothing flagged."""
EXIT_INVALID = 1
"""Invalid input: the options parse but are rejected (one line on stderr names the option and the fix)."""
EXIT_USAGE = 2
"""Usage error reported by argparse: unknown option, missing or malformed value."""
EXIT_FLAGGED = 3
"""``convert`` flagged the schedule (with or without ``--check``): a step with momentum >= 1, or no SPA equivalent."""

_EXIT_CODES = f"""\
exit status:
  {EXIT_OK}  success; for `convert`: nothing flagged
  {EXIT_INVALID}  invalid input: the options parse but describe no valid schedule (a value out of
     range, options that conflict or would be ignored), or `plot` finds no readable run; one
     line on stderr names the option and the fix
  {EXIT_USAGE}  usage error (argparse): unknown option, missing or malformed value
  {EXIT_FLAGGED}  `convert` flagged the schedule (with or without --check): some step has an
     equivalent momentum >= 1, or a step has no SPA equivalent
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_number(text: str) -> float:
    """A finite float > 0 (argparse type), e.g. fractional steps per epoch (1281167 / 8192 = 156.4)."""
    value = _number(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _number(text: str) -> float:
    """A finite float (argparse type): ``nan`` and ``inf`` are usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-spa`` (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="lightning-spa",
        description="SGD with momentum as stochastic primal averaging (Defazio 2020): schedule tools.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert",
        help="show a schedule in the other form and check it against Theorem 1",
        description="Give the schedule in SPA form (--eta, --c), in torch SGD+M form (--lr, --momentum), or in "
        "Keras/TensorFlow form (--from keras --lr --momentum).",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    form = conv.add_argument_group("starting values (one form)")
    form.add_argument("--eta", type=_number, help="SPA step size eta (with --c)")
    form.add_argument("--c", type=_number, help="SPA averaging weight c in (0, 1] (with --eta)")
    form.add_argument("--lr", type=_number, help="SGD+M learning rate (with --momentum)")
    form.add_argument("--momentum", type=_number, help="SGD+M momentum (with --lr)")
    form.add_argument(
        "--from",
        dest="source",
        choices=["torch", "keras"],
        help="what --lr/--momentum mean: torch.optim.SGD's (default; m <- momentum m + g, x <- x - lr m) or "
        "Keras/TensorFlow SGD's (v <- momentum v - lr g, x <- x + v): prints the SPA and torch SGD schedules "
        "that reproduce the Keras run",
    )
    sched = conv.add_argument_group("schedule")
    sched.add_argument(
        "--milestones",
        type=_number,
        nargs="*",
        default=[],
        help="where eta (or lr) is multiplied by --factor; epochs may be fractional (rounded to the nearest "
        "optimizer step, as the callbacks do)",
    )
    sched.add_argument("--factor", type=_number, help="multiplier at each milestone (default 0.1)")
    sched.add_argument("--unit", choices=["step", "epoch"], default="step", help="unit of milestones (default step)")
    sched.add_argument(
        "--steps-per-epoch",
        type=_positive_number,
        help="optimizer steps per epoch (needed for epochs); may be fractional (dataset size / batch size)",
    )
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
        "--momentum-after", type=_number, nargs="*", default=[], help="SGD+M only: momentum after each milestone"
    )
    sched.add_argument(
        "--momentum-off",
        type=_number,
        help="SPA only: c becomes 1 from this step/epoch on (eta kept; epochs may be fractional)",
    )
    sched.add_argument(
        "--warmup-steps",
        type=_nonnegative_int,
        default=0,
        help="linear warm-up of eta (SPA) or lr (SGD+M, Keras) over this many optimizer steps: step k < W "
        "multiplies it by (k+1)/W",
    )
    sched.add_argument(
        "--bounded",
        action="store_true",
        help="torch SGD+M input: always pick the SPA form that stays finite (eta moves ahead of each change); the "
        "default starts constant and drifts after an lr drop (Figure 1a), and takes the finite form only where "
        "the constant start has none",
    )
    out = conv.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    out.add_argument("--per-step", action="store_true", help="with --json: include every step's values")
    out.add_argument("--plot", type=Path, metavar="PNG", help="draw both forms like paper Figure 1")
    out.add_argument(
        "--check",
        action="store_true",
        help=f"print only the verdict lines (FLAG/OK/Suggestion), for scripts; the exit status is {EXIT_FLAGGED} when "
        "anything is flagged, with or without --check",
    )

    fig = sub.add_parser("figure1", help="draw the six panels of paper Figure 1")
    fig.add_argument("--out", type=Path, default=Path("figure1.png"), help="PNG to write (default figure1.png)")

    plot = sub.add_parser(
        "plot",
        help="diagnostics PNG of a run logged by MomentumDiagnostics",
        description="Reads the spa/* values of one run written by a TensorBoardLogger (event files) or a CSVLogger "
        "(metrics.csv) and draws one panel set per measured optimizer (tags spa/<name>, or spa/<name>/opt<i> when "
        "several were measured; per-group series spa/<name>[/opt<i>]/<group> as thinner lines). The ratio panel "
        "reads: above 1 aligned, momentum accelerates; near 1 idle; below 1 momentum damps (removing it at this "
        "eta is unsafe).",
    )
    plot.add_argument(
        "run_dir", type=Path, help="the run's log directory (e.g. lightning_logs/version_0), TensorBoard or CSV"
    )
    plot.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/diagnostics.png)")
    plot.add_argument(
        "--optimizer",
        metavar="INDEX",
        help="a run that measured several optimizers (tags spa/ratio/opt0, spa/ratio/opt1, ...): draw only this one "
        "(0, 1, ... or opt0, opt1, ...); default: one panel set per optimizer",
    )
    plot.add_argument(
        "--group",
        metavar="NAME",
        help="a run logged with MomentumDiagnostics(per_group=True): draw this parameter group's series instead of "
        "the whole optimizer's (default: the optimizer's, each group as a thinner line)",
    )
    return parser


def _to_steps(value: float, args: argparse.Namespace, name: str) -> int:
    """Optimizer step of ``value`` in ``args.unit``: epochs (may be fractional) round to the nearest step.

    ``round(epochs * steps_per_epoch)``, the rule of the schedule callbacks, so a milestone
    lands on the same step here and in training.
    """
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value:g}.")
    if args.unit == "step":
        if value != int(value):
            raise ValueError(
                f"`{name}` {value:g} is in optimizer steps (`--unit step`), which are whole numbers: round it, or give "
                "epochs with `--unit epoch --steps-per-epoch N` (fractional epochs are fine there)."
            )
        return int(value)
    if args.steps_per_epoch is None:
        raise ValueError("`--unit epoch` needs `--steps-per-epoch` to turn epochs into optimizer steps.")
    return round(value * args.steps_per_epoch)


def _check_spa_start(eta: float | None, c: float | None) -> tuple[float, float]:
    """``(eta, c)`` from ``--eta``/``--c``, checked (no torch import, unlike the optimizer factory)."""
    if eta is None or c is None:
        raise ValueError(f"`--{'eta' if eta is None else 'c'}` is missing: the SPA form needs both `--eta` and `--c`.")
    if not eta > 0.0:
        raise ValueError(f"`--eta` must be > 0 (the SPA step size), got {eta:g}.")
    if not 0.0 < c <= 1.0:
        raise ValueError(f"`--c` must be in (0, 1] (c = 1 - momentum; 1 is plain SGD), got {c:g}.")
    return eta, c


def _milestone_text(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _report(args: argparse.Namespace):  # type: ignore[no-untyped-def]  # returns ConversionReport
    from lightning_spa.convert import convert_keras, convert_sgdm, convert_spa, sgdm_schedule
    from lightning_spa.schedule import Mode, MomentumRemoval, SPASchedule, StepDecay, smallest_safe_transition_steps

    spa_given = args.eta is not None or args.c is not None
    sgdm_given = args.lr is not None or args.momentum is not None
    if not (spa_given or sgdm_given):
        raise ValueError("Give the starting values: `--eta` and `--c` (SPA) or `--lr` and `--momentum` (SGD+M).")
    if spa_given and sgdm_given:
        raise ValueError("Give `--eta`/`--c` (SPA) or `--lr`/`--momentum` (SGD+M), not both.")
    keras = args.source == "keras"
    if spa_given and args.source is not None:
        raise ValueError("`--from` says what `--lr`/`--momentum` mean; the SPA form (--eta/--c) takes no `--from`.")
    if sgdm_given:  # momentum >= 1 is accepted here (torch form), to be flagged
        if args.lr is None or args.momentum is None:
            raise ValueError(f"`--{'lr' if args.lr is None else 'momentum'}` is missing: SGD+M needs both.")
        if not args.lr > 0.0 or not args.momentum >= 0.0:
            raise ValueError(f"`--lr` must be > 0 and `--momentum` >= 0, got {args.lr:g} and {args.momentum:g}.")
        bad = [m for m in [args.momentum, *args.momentum_after] if not m < 1.0]
        if keras and bad:
            raise ValueError(f"Keras' momentum must be in [0, 1) (`--momentum`, `--momentum-after`), got {bad[0]:g}.")
    else:
        eta0, c0 = _check_spa_start(args.eta, args.c)
    milestones = [_to_steps(m, args, "--milestones") for m in args.milestones]
    if any(b <= a for a, b in pairwise(milestones)):
        per_epoch = f" ({args.steps_per_epoch:g} per epoch)" if args.unit == "epoch" else ""
        raise ValueError(
            f"`--milestones` {_milestone_text(args.milestones)} fall on optimizer steps {milestones}{per_epoch}, which "
            "are not strictly increasing: give them in increasing order and further apart."
        )
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
            f"`--milestones` {_milestone_text(late)} fall at or after the end of the schedule ({total} steps) and "
            "would be ignored: lengthen it with `--total-steps`/`--epochs` or drop them."
        )
    if args.per_step and not args.json:
        raise ValueError("`--per-step` lists every step in the JSON output: add `--json`.")
    if args.check and args.json:
        raise ValueError(
            "`--check` prints only the verdict lines of the text report; the JSON output carries the verdict "
            "(`momentum_ge_1`, `no_spa_equivalent`) and the exit status is the same: drop one of them."
        )
    if args.unit == "step" and args.steps_per_epoch is not None and args.epochs is None:
        raise ValueError("`--steps-per-epoch` is only used with `--unit epoch` or `--epochs`; drop it or use them.")
    if args.transition == "instant" and args.transition_steps not in (None, 1):
        raise ValueError("`--transition-steps` needs `--transition geometric` (an instant change is 1 step).")
    unit = "epoch" if args.unit == "epoch" else "step"
    where = f"milestones {_milestone_text(args.milestones)} ({unit}s)" if milestones else "no milestones"

    if args.momentum_off is not None:
        off = _to_steps(args.momentum_off, args, "--momentum-off")
        if off >= total:
            raise ValueError(
                f"`--momentum-off` {args.momentum_off:g} falls at step {off}, at or after the end of the schedule "
                f"({total} steps), and would be ignored: lengthen it with `--total-steps`/`--epochs` or drop it."
            )
    if args.warmup_steps > total:
        raise ValueError(
            f"`--warmup-steps` {args.warmup_steps} is longer than the schedule ({total} steps) and would be cut: "
            "lengthen it with `--total-steps`/`--epochs` or shorten the warm-up."
        )

    if sgdm_given:
        for name in ("mode", "momentum_off"):
            if getattr(args, name) is not None:
                raise ValueError(f"`--{name.replace('_', '-')}` applies to SPA schedules (--eta/--c) only.")
        if keras and args.bounded:
            raise ValueError("`--bounded` chooses among torch SGD's SPA forms; a Keras schedule has one: drop it.")
        t = args.transition_steps or 1
        if args.transition == "geometric" and args.transition_steps is None:
            raise ValueError("For an SGD+M schedule give `--transition-steps` with `--transition geometric`.")
        alpha, beta = sgdm_schedule(
            total, args.lr, args.momentum, milestones, args.factor, args.momentum_after, t, args.warmup_steps
        )
        desc = (
            f"{'Keras SGD' if keras else 'SGD+M'} lr {args.lr:g}, momentum {args.momentum:g}; {where}"
            + (f", lr x{args.factor:g}" if milestones else "")
            + (f", momentum -> {args.momentum_after}" if args.momentum_after else "")
            + (f", {args.transition}" if milestones else "")
            + (f" over {t} steps" if t > 1 else "")
            + (f", linear lr warm-up over {args.warmup_steps} steps" if args.warmup_steps else "")
            + f"; {total} steps"
        )
        if keras:
            return convert_keras(alpha, beta, desc, milestones, args.factor)
        return convert_sgdm(alpha, beta, desc, milestones, args.factor, eta0="bounded" if args.bounded else None)

    if args.momentum_after:
        raise ValueError("`--momentum-after` applies to SGD+M schedules (--lr/--momentum) only.")
    if args.bounded:
        raise ValueError("`--bounded` chooses among the SPA forms of a torch SGD+M schedule (--lr/--momentum) only.")
    mode: Mode = "lr" if args.mode == "lr" else "paper"
    others: list[SPASchedule] = []
    if args.momentum_off is not None:
        others.append(MomentumRemoval(off))
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
        + (f", momentum off at {args.momentum_off:g} ({unit}s)" if args.momentum_off is not None else "")
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


def format_report(report, verdict_only: bool = False) -> str:  # type: ignore[no-untyped-def]
    """The text printed by ``lightning-spa convert``; ``verdict_only`` (``--check``): the FLAG/OK/Note lines."""
    from lightning_spa.convert import segments

    lines = [] if verdict_only else [f"Schedule: {report.description}", ""]

    def table(title: str, names: tuple[str, str], a: Sequence[float], b: Sequence[float], warn: bool) -> None:
        lines.append(title)
        flagged = {k for k, _ in report.momentum_ge_1}
        width = max(16, 2 * len(str(report.total_steps)) + 7)  # "steps A-B" for the longest A and B
        for start, end, (sa, sb) in segments(a, b):
            steps = f"step  {start}" if start == end else f"steps {start}-{end}"
            mark = "   <-- momentum >= 1" if warn and any(start <= k <= end for k in flagged) else ""
            lines.append(f"  {steps:<{width}} {names[0]} {sa.describe():<36} {names[1]} {sb.describe()}{mark}")
        lines.append("")

    sgd_title = "torch SGD form (lr, momentum):" if report.source == "keras" else "SGD+M form (lr, momentum):"
    sgd = (sgd_title, ("lr", "momentum"), report.alpha, report.beta, True)
    spa = ("SPA form (eta, c):", ("eta", "c"), report.eta, report.c, False)
    forms = {"spa": [spa, sgd], "sgdm": [sgd, spa]}.get(report.source)
    if forms is None:  # keras: the given form first, then the two that reproduce it
        forms = [("Keras form (lr, momentum):", ("lr", "momentum"), *report.keras, False), spa, sgd]
    for title, names, a, b, warn in [] if verdict_only else forms:
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
    elif report.source != "spa":
        lines.append("OK: every step has an SPA equivalent.")
    if report.note is not None:
        lines.append(f"Note: {report.note}.")
    if report.suggestion is not None:
        lines.append(f"Suggestion: {report.suggestion['text']}.")
    return "\n".join(lines)


def _convert(args: argparse.Namespace) -> int:
    report = _report(args)
    if args.json:
        print(json.dumps(report.to_dict(per_step=args.per_step), indent=1))
    else:
        print(format_report(report, verdict_only=args.check))
    if args.plot is not None:
        from lightning_spa.figures import plot_conversion

        path = plot_conversion(report, args.plot)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    flagged = bool(report.momentum_ge_1) or report.no_spa_equivalent is not None
    return EXIT_FLAGGED if flagged else EXIT_OK


def _plot(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise ValueError(
            f"RUN_DIR {args.run_dir} is not a directory: give the log directory of one run (TensorBoardLogger or "
            "CSVLogger), e.g. lightning_logs/version_0."
        )
    try:
        from lightning_spa.plotting import plot_run
    except ImportError as err:
        raise ImportError(f"`lightning-spa plot` needs lightning_spa.plotting ({err}).") from err
    out = args.out if args.out is not None else args.run_dir / "diagnostics.png"
    path = plot_run(args.run_dir, out, optimizer=args.optimizer, group=args.group)
    print(f"wrote {path if path is not None else out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-spa`` console script; returns the exit status.

    A usage error exits through argparse (``SystemExit(2)``); every other failure is one line on
    stderr and a return value (see the module docstring for the codes).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "figure1":
            from lightning_spa.figures import plot_figure1

            print(f"wrote {plot_figure1(args.out)}")
            return EXIT_OK
        return _plot(args)
    except BrokenPipeError:  # the reader closed stdout (`lightning-spa convert ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 128 + 13  # what the shell reports for a program ended by SIGPIPE
    except (ValueError, ImportError, OSError) as err:  # OSError: a file that cannot be read or written
        print(f"lightning-spa {args.command}: error: {err}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
