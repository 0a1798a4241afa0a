"""Check 5, ``memory``: the peak CUDA memory of a step and the optimizer state, SPA vs torch SGD.

On a ResNet-18's parameter shapes with random gradients, foreach and fused paths: SPA keeps one
buffer per parameter, as SGD with momentum does, so the state is equal and a step peaks no higher.
"""

from __future__ import annotations

from typing import Any

from ._common import PATHS, SKIP, Context
from ._fit import resnet18

MIB = 2.0**20


def _step_memory(ctx: Context, shapes: list[tuple[int, ...]], factory: Any) -> tuple[int, int, int]:
    """``(peak bytes of the first step, of the second step, optimizer state bytes)`` on fresh parameters."""
    import torch

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=ctx.device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = factory(params)
    peaks = []
    for _ in range(2):  # the first step allocates the buffers
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
    state = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    del opt, params
    torch.cuda.empty_cache()
    return peaks[0], peaks[1], state


def check(ctx: Context) -> None:
    import torch

    from lightning_spa.optim import SPA

    if not ctx.cuda:
        ctx.report.add("memory", "peak CUDA memory of a step", SKIP, "cpu run", "")
        return
    shapes = [tuple(p.shape) for p in resnet18().parameters()]
    for path in ("foreach", "fused"):
        flags = PATHS[path]
        spa = _step_memory(ctx, shapes, lambda ps, f=flags: SPA(ps, lr=1.0, c=0.1, **f))
        sgd = _step_memory(ctx, shapes, lambda ps, f=flags: torch.optim.SGD(ps, lr=0.1, momentum=0.9, **f))
        (f_spa, s_spa, st_spa), (f_sgd, s_sgd, st_sgd) = spa, sgd
        slack = 1.0 * MIB
        ctx.report.expect(
            "memory",
            f"{path}: optimizer state, SPA vs SGD",
            st_spa == st_sgd,
            f"{st_spa / MIB:.1f} vs {st_sgd / MIB:.1f} MiB",
            "equal (one buffer)",
        )
        ctx.report.expect(
            "memory",
            f"{path}: peak of a step (first; steady)",
            f_spa <= f_sgd + slack and s_spa <= s_sgd + slack,
            f"SPA {f_spa / MIB:.1f}; {s_spa / MIB:.1f} vs SGD {f_sgd / MIB:.1f}; {s_sgd / MIB:.1f} MiB",
            "SPA <= SGD + 1 MiB",
        )
