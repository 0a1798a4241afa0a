"""Benchmark: ``optimizer.step()`` time of SPA vs ``torch.optim.SGD(momentum=0.9)``.

Each configuration owns a copy of the same parameters and the same random gradients (kept
fixed between steps, as if ``backward()`` had just run). After warm-up steps, the
configurations are timed in alternating rounds (each configuration once a round, in an order
shuffled every round by a seeded generator) so that a noisy, shared machine slows all of them
alike and no configuration always runs right after the same one. An untimed torch SGD optimizer
on its own copy of the parameters is created and stepped before the configurations: without it,
the configuration created first measured 5-10% slower on resnet18 and mlp100 on CPU, whichever
configuration it was. Each round times a short block of ``--steps`` consecutive
``step()`` calls per configuration, and the table reports the median over rounds of the
per-step time, and the ratio SPA default / fastest torch SGD both as a ratio of medians and as
the median of per-round ratios.

Configurations: SPA default (``foreach=None, fused=None``: the fused kernel where every
parameter supports it), SPA loop / foreach / fused, and torch SGD loop / foreach / fused,
all with ``lr=0.01, momentum=0.9`` (SPA built with :meth:`SPA.from_sgdm`: ``eta=0.1, c=0.1``);
momentum off: ``SPA(lr=0.01, c=1)`` (no buffers) against torch SGD with ``momentum=0``
(default and fused); and the peer ``schedulefree.SGDScheduleFree(lr=0.01, momentum=0.9)``
(foreach, in train mode; skipped when ``schedulefree`` is not installed). Each row's ratio is
against the fastest torch SGD row of its kind (momentum 0.9, or momentum 0 for ``c=1``).

Model shapes (no torchvision needed):

- ``resnet18``: the 62 parameter tensors of torchvision's ResNet-18 (11,689,512 floats);
- ``mlp100``: a 100-layer MLP of width 64 (200 small tensors: Python overhead dominates);
- ``mlp250``: the same with 250 layers (500 tensors);
- ``digits``: the small CNN of :mod:`lightning_spa.demos.digits` (10 tensors, 10,026 floats).

Usage::

    python benchmarks/optimizer_step.py                       # CPU, 2 threads, all models
    python benchmarks/optimizer_step.py --models resnet18 --rounds 300 --steps 1
    python benchmarks/optimizer_step.py --device cuda         # where a GPU exists
"""

from __future__ import annotations

import argparse
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_spa.optim import SPA

Shape = tuple[int, ...]
LR, MOMENTUM = 0.01, 0.9


def _conv_bn(c_out: int, c_in: int, k: int) -> list[Shape]:
    return [(c_out, c_in, k, k), (c_out,), (c_out,)]  # conv (no bias), batch-norm weight and bias


def resnet18_shapes(num_classes: int = 1000) -> list[Shape]:
    """Parameter shapes of torchvision's ``resnet18()`` in ``named_parameters()`` order."""
    shapes = _conv_bn(64, 3, 7)
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += _conv_bn(c_out, c_in, 3) + _conv_bn(c_out, c_out, 3)
            if block == 0 and (stride != 1 or c_in != c_out):
                shapes += _conv_bn(c_out, c_in, 1)  # downsample
            c_in = c_out
    return [*shapes, (num_classes, 512), (num_classes,)]


def mlp_shapes(depth: int = 100, width: int = 64) -> list[Shape]:
    """Weight and bias shapes of a ``depth``-layer MLP of constant ``width``."""
    return [s for _ in range(depth) for s in ((width, width), (width,))]


def digits_shapes(channels: int = 16) -> list[Shape]:
    """Parameter shapes of :class:`lightning_spa.demos.digits.DigitsCNN` (``channels=16``)."""
    c2 = 2 * channels
    conv1 = [(channels, 1, 3, 3), (channels,), (channels,), (channels,)]  # conv weight, bias; batch-norm weight, bias
    conv2 = [(c2, channels, 3, 3), (c2,), (c2,), (c2,)]
    return [*conv1, *conv2, (10, c2 * 16), (10,)]


MODELS: dict[str, Callable[[], list[Shape]]] = {
    "resnet18": resnet18_shapes,
    "mlp100": mlp_shapes,
    "mlp250": lambda: mlp_shapes(depth=250),
    "digits": digits_shapes,
}

Factory = Callable[[list[Tensor]], Optimizer]


def _schedule_free(ps: list[Tensor]) -> Optimizer:
    """``schedulefree.SGDScheduleFree`` (the peer users would pick instead), in train mode."""
    import schedulefree

    opt = schedulefree.SGDScheduleFree(ps, lr=LR, momentum=MOMENTUM)
    opt.train()
    return opt


# name -> (factory, the torch SGD rows it is compared with: "momentum" (0.9) or "plain" (momentum 0))
CONFIGS: dict[str, tuple[Factory, str]] = {
    "SPA default": (lambda ps: SPA.from_sgdm(ps, lr=LR, momentum=MOMENTUM), "momentum"),
    "SPA loop": (lambda ps: SPA.from_sgdm(ps, lr=LR, momentum=MOMENTUM, foreach=False, fused=False), "momentum"),
    "SPA foreach": (lambda ps: SPA.from_sgdm(ps, lr=LR, momentum=MOMENTUM, foreach=True), "momentum"),
    "SPA fused": (lambda ps: SPA.from_sgdm(ps, lr=LR, momentum=MOMENTUM, fused=True), "momentum"),
    "SGD loop": (lambda ps: SGD(ps, lr=LR, momentum=MOMENTUM, foreach=False, fused=False), "momentum"),
    "SGD foreach": (lambda ps: SGD(ps, lr=LR, momentum=MOMENTUM, foreach=True), "momentum"),
    "SGD fused": (lambda ps: SGD(ps, lr=LR, momentum=MOMENTUM, fused=True), "momentum"),
    "SPA c=1 default": (lambda ps: SPA(ps, lr=LR, c=1.0), "plain"),
    "SGD m=0 default": (lambda ps: SGD(ps, lr=LR, momentum=0.0), "plain"),
    "SGD m=0 fused": (lambda ps: SGD(ps, lr=LR, momentum=0.0, fused=True), "plain"),
    "SGDScheduleFree": (_schedule_free, "momentum"),
}


def _available(name: str) -> bool:
    if name != "SGDScheduleFree":
        return True
    try:
        import schedulefree  # noqa: F401
    except ImportError:
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_params(shapes: list[Shape], device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """Random parameters with random gradients already set (the same for every call)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen, dtype=dtype).to(device)
        params.append(p)
    return params


def bench_model(
    shapes: list[Shape],
    configs: list[str],
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    steps: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Per-step times in seconds (by ``clock``), one per round, for each configuration."""
    # An untimed optimizer created and stepped first, kept alive: the configuration created first measured
    # 5-10% slower (resnet18 and mlp100 on CPU, whichever it was); with it, equal configurations agree.
    spare = SGD(make_params(shapes, device, dtype), lr=LR, momentum=MOMENTUM, fused=device.type in ("cpu", "cuda"))
    for _ in range(warmup):
        spare.step()
    opts = {name: CONFIGS[name][0](make_params(shapes, device, dtype)) for name in configs}
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in configs}
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        order = list(configs)
        shuffle(order)
        for name in order:
            step = opts[name].step
            _sync(device)
            t0 = clock()
            for _ in range(steps):
                step()
            _sync(device)
            times[name].append((clock() - t0) / steps)
    del spare
    return times


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Runs the benchmark, prints markdown tables and returns ``{model: {config: median seconds}}``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if _available(c)], choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--rounds", type=int, default=100, help="alternating rounds (default 100)")
    parser.add_argument("--steps", type=int, default=2, help="step() calls per configuration per round (default 2)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per configuration (default 10)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: time.perf_counter (default); cpu: time.process_time, the CPU time of all threads of the "
        "process (less sensitive to other processes on a shared machine; CPU only)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--rounds, --steps and --threads must be >= 1 and --warmup >= 0")
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures host CPU time; use the wall clock with --device cuda")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shown = [sys.executable.rsplit("/", 1)[-1], *sys.argv] if argv is None else ["optimizer_step.py", *argv]
    print(f"command: `{shlex.join(shown)}`")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, device {device} ({dev_name}), {args.threads} threads, {args.dtype}, "
        f"{args.rounds} rounds x {args.steps} steps, {args.warmup} warm-up steps; "
        f"median {args.clock}-clock ms per step()\n"
    )
    results: dict[str, dict[str, float]] = {}
    for model in args.models:
        shapes = MODELS[model]()
        n = sum(torch.Size(s).numel() for s in shapes)
        times = bench_model(shapes, args.configs, device, dtype, args.rounds, args.steps, args.warmup, clock)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        results[model] = med
        best: dict[str, str] = {}
        for kind in ("momentum", "plain"):
            sgd = {k: v for k, v in med.items() if k.startswith("SGD ") and CONFIGS[k][1] == kind}
            if sgd:
                best[kind] = min(sgd, key=sgd.__getitem__)
        print(f"### {model}: {len(shapes)} tensors, {n:,} floats\n")
        print("| config | median ms | IQR ms | vs fastest torch SGD of its kind |")
        print("|---|---:|---:|---:|")
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
            peer = best.get(CONFIGS[name][1])
            ratio = f"{med[name] / med[peer]:.3f}x ({peer})" if peer else "-"
            print(f"| {name} | {_fmt_ms(med[name])} | {_fmt_ms(q[0])}-{_fmt_ms(q[2])} | {ratio} |")
        print()
        for name, kind in (("SPA default", "momentum"), ("SPA c=1 default", "plain"), ("SGDScheduleFree", "momentum")):
            if name in times and kind in best:
                # Also the median of per-round ratios: both timed in the same round, close in time.
                ref = times[best[kind]]
                paired = statistics.median(a / b for a, b in zip(times[name], ref, strict=True))
                print(
                    f"{name} / {best[kind]}: **{med[name] / med[best[kind]]:.3f}x** (ratio of medians); "
                    f"median of per-round ratios {paired:.3f}x"
                )
        print()
    return results


if __name__ == "__main__":
    main()
