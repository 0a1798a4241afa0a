"""Benchmark: wall time of ``lightning-spa`` commands against ``python -c "import torch"``.

The goal (issue 10): ``lightning-spa --help`` and ``lightning-spa convert ...`` take at most 1 s
more than importing torch. Each command runs as a fresh process, as a user runs it; the commands
take turns within a round (the order rotates every round) so that load on a shared machine hits
them alike, and the table reports the median over rounds and the difference to the median of
``import torch``. Commands:

- ``python -c pass``: the interpreter alone;
- ``python -c "import torch"``: the reference;
- ``lightning-spa --help``;
- ``convert`` of a short SPA schedule (100 steps: start-up dominates);
- ``convert`` of a short SGD+M schedule (the same, through :func:`lightning_spa.mapping.sgdm_to_spa`);
- ``convert`` of the CIFAR-10 schedule of the module docstring of :mod:`lightning_spa.cli`
  (117,300 steps: the per-step arithmetic shows), in SPA form and in SGD+M form (``--bounded``).

Usage::

    python benchmarks/cli_startup.py               # 7 rounds
    python benchmarks/cli_startup.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 1.0


def _cli() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m lightning_spa.cli``."""
    script = Path(sys.executable).with_name("lightning-spa")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_spa.cli"]


def commands() -> dict[str, list[str]]:
    """Label -> argv of every timed command."""
    cli, py = _cli(), sys.executable
    spa = ["convert", "--eta", "1", "--c", "0.1"]
    cifar = ["--milestones", "150", "225", "--unit", "epoch", "--steps-per-epoch", "391", "--epochs", "300"]
    return {
        "python -c pass": [py, "-c", "pass"],
        'python -c "import torch"': [py, "-c", "import torch"],
        "lightning-spa --help": [*cli, "--help"],
        "convert (SPA, 100 steps)": [*cli, *spa, "--milestones", "20", "--total-steps", "100"],
        "convert (SGD+M, 100 steps)": [*cli, "convert", "--lr", "0.1", "--momentum", "0.9", "--milestones", "20"],
        "convert (SPA, CIFAR 117k steps)": [*cli, *spa, *cifar],
        "convert (SGD+M, CIFAR 117k steps)": [*cli, "convert", "--lr", "0.1", "--momentum", "0.9", *cifar, "--bounded"],
    }


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: `convert` flagged the schedule (the instant drops here), still a run
        raise SystemExit(f"{shlex.join(argv)} exited with {done.returncode}:\n{done.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs of every command (default 7)")
    args = parser.parse_args(argv)
    cmds = commands()
    labels = list(cmds)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            times[label].append(_time(cmds[label]))
    median = {label: statistics.median(t) for label, t in times.items()}
    torch_s = median['python -c "import torch"']
    print(f"# lightning-spa start-up: median of {args.rounds} runs each (fresh processes)")
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; {shlex.join(_cli())}")
    print()
    print("| command | median s | min s | vs import torch |")
    print("|---|---:|---:|---:|")
    for label in labels:
        delta = median[label] - torch_s
        print(f"| {label} | {median[label]:.2f} | {min(times[label]):.2f} | {delta:+.2f} |")
    print()
    for label in labels[2:]:
        ok = median[label] - torch_s <= GOAL_S
        print(f"goal (at most {GOAL_S:g} s more than import torch): {label}: {'met' if ok else 'NOT met'}")
    for label, argv_ in cmds.items():
        print(f"  {label}: {shlex.join(argv_)}")


if __name__ == "__main__":
    main()
