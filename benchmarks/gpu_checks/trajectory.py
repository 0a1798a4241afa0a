"""Check 1, ``trajectory``: SPA vs ``torch.optim.SGD`` driven by Theorem 1 on every path and dtype.

SGD gets its ``lr`` and ``momentum`` from ``lightning_spa.theorem.step_spa_to_sgdm`` each step;
both optimizers see the same gradients of a noisy diagonal quadratic at their own iterates, along
:func:`schedule` (constant, a geometric transition, an instant ``eta`` drop, momentum off).
"""

from __future__ import annotations

import warnings
from typing import Any

from ._common import PATHS, SGD_PATHS, Context

SHAPES = [(33,), (8, 5), (4, 4, 3), (1000,)]


def schedule(steps: int) -> list[tuple[float, float]]:
    """``(eta_k, c_k)`` for ``k < steps``: constant, a geometric transition (eta down 10x, c up 5x),
    an instant eta halving (a momentum spike of 1.0 in SGD+M form), then c -> 1 (momentum off).
    Scaled to ``steps`` so the quick run sees every change."""
    out = []
    s = steps / 200
    t0, t1, drop, off0, off1 = int(40 * s), int(60 * s), int(100 * s), int(140 * s), int(150 * s)
    for k in range(steps):
        eta, c = 1.0, 0.1
        if k >= t0:
            f = min(1.0, (k - t0 + 1) / max(t1 - t0, 1))
            eta, c = 0.1**f, 0.1 * 5.0**f
        if k >= drop:
            eta *= 0.5
        if k >= off0:
            c = c * (1.0 / c) ** min(1.0, (k - off0 + 1) / max(off1 - off0, 1))
        out.append((eta, min(c, 1.0)))
    return out


def quadratic(steps: int) -> tuple[list[Any], list[Any], list[list[Any]]]:
    """``(start, curvature, noise per step)`` of the noisy diagonal quadratic on :data:`SHAPES`
    (float32 on the CPU, seed 0): the gradient at ``x`` in step ``k`` is ``curvature * x + noise[k]``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    curv = [torch.rand(s, generator=gen) + 0.1 for s in SHAPES]
    noise = [[0.1 * torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    return start, curv, noise


def check(ctx: Context) -> None:
    import torch

    steps = 60 if ctx.quick else 200
    # max |x_spa - x_sgd| / max |x|: float32 round-off; bfloat16 keeps 8 bits, so ten units in the last place
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
    for dtype, tol in tolerance.items():
        start, curv, noise = quadratic(steps)
        curv = [t.to(ctx.device, dtype) for t in curv]
        noise = [[t.to(ctx.device, dtype) for t in row] for row in noise]
        for path in PATHS:
            case = f"{path}, {str(dtype).removeprefix('torch.')}"
            try:
                worst, rel, finite = _compare(ctx, path, dtype, start, curv, noise)
                ctx.report.expect(
                    "trajectory",
                    case,
                    finite and rel <= tol,
                    f"max diff {worst:.2e} ({rel:.1e} of max|x|)",
                    f"<= {tol:g}",
                )
            except Exception as err:  # one failing path does not hide the others
                ctx.report.failed("trajectory", case, err, f"trajectory {case}")


def _compare(
    ctx: Context, path: str, dtype: Any, start: list[Any], curv: list[Any], noise: list[list[Any]]
) -> tuple[float, float, bool]:
    """``(max |x_spa - x_sgd|, that over max |x_sgd|, SPA's iterates all finite)`` along :func:`schedule`."""
    import torch

    from lightning_spa.optim import SPA
    from lightning_spa.theorem import step_spa_to_sgdm

    sched = schedule(len(noise))
    xs = [torch.nn.Parameter(t.to(ctx.device, dtype).clone()) for t in start]
    ys = [torch.nn.Parameter(t.to(ctx.device, dtype).clone()) for t in start]
    spa = SPA(xs, lr=sched[0][0], c=sched[0][1], **PATHS[path])
    sgd = torch.optim.SGD(ys, lr=0.1, momentum=0.9, **SGD_PATHS[path])
    diffs: list[Any] = []
    sizes: list[Any] = []
    prev: tuple[float, float] | None = None
    for k, (eta, c) in enumerate(sched):
        for group in spa.param_groups:
            group["lr"], group["c"] = eta, c
        lr, momentum = step_spa_to_sgdm(eta, c, prev)
        for group in sgd.param_groups:
            group["lr"], group["momentum"] = lr, momentum
        prev = (eta, c)
        for params in (xs, ys):
            for p, a, n in zip(params, curv, noise[k], strict=True):
                p.grad = a * p.detach() + n
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SPA's warning about the instant eta drop
            spa.step()
        sgd.step()
        with torch.no_grad():  # on the device: no sync per step
            pairs = zip(xs, ys, strict=True)
            diffs.append(torch.stack([(x.float() - y.float()).abs().max() for x, y in pairs]).max())
            sizes.append(torch.stack([y.float().abs().max() for y in ys]).max())
    worst, scale = float(torch.stack(diffs).max()), float(torch.stack(sizes).max())
    return worst, worst / max(scale, 1e-30), all(bool(torch.isfinite(x).all()) for x in xs)
