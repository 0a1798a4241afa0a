"""The cheap measurement (two squared norms per parameter after the step) against the full one and
against the displacement measured directly, and step_sq exact per parameter (issue 16 item 6).

Two meters watch the same optimizer, one full (``cosine_every_n_steps=1``) and one cheap (``None``),
with ``ema_decay=0`` so that every reading is the raw sample of its step. Parameters are float64:
the two paths agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from lightning_spa import SPA
from lightning_spa.meter import MomentumMeter, Reading

Make = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Make] = {
    "spa": lambda ps: SPA(ps, lr=0.5, c=0.2),
    "spa_wd_max": lambda ps: SPA(ps, lr=0.5, c=0.2, weight_decay=0.3, maximize=True),
    "spa_two_groups": lambda ps: SPA([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "c": 0.5}], lr=0.4),
    "spa_foreach": lambda ps: SPA(ps, lr=0.5, c=0.2, weight_decay=0.05, foreach=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "sgd_wd_max": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, weight_decay=0.2, maximize=True),
}


class Pair:
    """A full and a cheap meter on one optimizer, and the readings of each."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.full = MomentumMeter(opt, every_n_steps=1, ema_decay=0.0).attach()
        self.cheap = MomentumMeter(opt, every_n_steps=1, ema_decay=0.0, cosine_every_n_steps=None).attach()
        self.readings: dict[str, list[Reading]] = {"full": [], "cheap": []}
        self.full.listeners.append(self.readings["full"].append)
        self.cheap.listeners.append(self.readings["cheap"].append)

    def before_step(self) -> None:
        assert self.full.before_step() and self.cheap.before_step()


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(30, 20, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(20, dtype=torch.float64)),
    ]


def _loss(ps: list[torch.nn.Parameter]) -> torch.Tensor:
    w, b = ps
    return (
        (w**2).sum()
        + (w * torch.randn(30, 20, dtype=torch.float64)).sum()
        + (b * torch.randn(20, dtype=torch.float64)).sum()
    )


def _displacement(ps: list[torch.nn.Parameter], x0: list[torch.Tensor]) -> float:
    return sum(float((p.detach() - x).square().sum()) for p, x in zip(ps, x0, strict=True))


def _assert_rows_equal(full: Reading, cheap: Reading, rel: float = 1e-10) -> None:
    assert full.step == cheap.step and full.status == cheap.status == "ok"
    assert len(full.values) == len(cheap.values)
    for row_f, row_c in zip(full.values, cheap.values, strict=True):
        for name, vf, vc in zip(("step_sq", "grad_sq", "grad_sq_scaled"), row_f[:3], row_c[:3], strict=True):
            assert vc == pytest.approx(vf, rel=rel, abs=1e-300), name
        assert (math.isnan(row_f[4]) and math.isnan(row_c[4])) or row_c[4] == pytest.approx(row_f[4], rel=rel)
    assert math.isnan(cheap.cosine)  # the cheap measurement has no cosine


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clipped"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_cheap_equals_full_and_the_displacement(kind: str, clip: bool) -> None:
    ps = _params()
    opt = OPTIMIZERS[kind](ps)
    pair = Pair(opt)
    for k in range(6):
        if kind.startswith("spa") and k >= 3:  # eta falls by 0.95 a step: (1 - c) / 0.95 < 1, no spike
            for group in opt.param_groups:
                group["lr"] *= 0.95
        opt.zero_grad()
        _loss(ps).backward()
        pair.before_step()
        if clip:  # between the first half and the step, as Lightning clips: both paths see the clipped gradient
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
        grads = [p.grad.clone() for p in ps]  # type: ignore[union-attr]
        x0 = [p.detach().clone() for p in ps]
        opt.step()
        full, cheap = pair.readings["full"][-1], pair.readings["cheap"][-1]
        _assert_rows_equal(full, cheap)
        assert cheap.values[-1][0] == pytest.approx(_displacement(ps, x0), rel=1e-10)
        if clip:
            assert sum(float(g.square().sum()) for g in grads) == pytest.approx(
                1.0, rel=1e-6
            )  # clip_grad_norm_: eps 1e-6
        # grad_sq: eta^2 ||g||^2 with g as the step used it (weight decay at x_k, maximize, clipping)
        expected = 0.0
        for group, h in zip(opt.param_groups, cheap.hypers, strict=True):
            for p in group["params"]:
                i = next(j for j, q in enumerate(ps) if q is p)
                g = (-1.0 if group["maximize"] else 1.0) * grads[i] + group["weight_decay"] * x0[i]
                expected += h.eta**2 * float(g.square().sum())
        assert cheap.values[-1][1] == pytest.approx(expected, rel=1e-10)
    assert len(pair.readings["cheap"]) == 6 and pair.cheap.step == pair.full.step == 6


def test_cheap_equals_full_across_an_amp_skipped_step() -> None:
    # GradScaler skips optimizer.step() at the overflow: neither meter counts it, the pending
    # measurement is dropped at the next before_step, and the next step is measured as usual.
    ps = _params()
    opt = SPA(ps, lr=0.5, c=0.2, weight_decay=0.01)
    pair = Pair(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    taken = 0
    for k in range(6):
        opt.zero_grad()
        scaler.scale(_loss(ps)).backward()
        if k == 2:
            ps[0].grad[0, 0] = float("inf")  # type: ignore[index]
        pair.before_step()
        scaler.unscale_(opt)
        x0 = [p.detach().clone() for p in ps]
        scaler.step(opt)
        scaler.update()
        if k == 2:
            assert all(torch.equal(p.detach(), x) for p, x in zip(ps, x0, strict=True))  # skipped
            continue
        full, cheap = pair.readings["full"][-1], pair.readings["cheap"][-1]
        assert cheap.step == taken
        _assert_rows_equal(full, cheap)
        assert cheap.values[-1][0] == pytest.approx(_displacement(ps, x0), rel=1e-10)
        taken += 1
    assert [r.step for r in pair.readings["cheap"]] == [0, 1, 2, 3, 4] and pair.cheap.step == pair.full.step == 5


def test_cheap_falls_back_to_full_where_no_buffer_describes_the_step() -> None:
    # SPA at c = 1 drops its buffers, torch SGD at momentum 0 keeps none: the cheap meter takes the
    # full measurement there (with its cosine), so nothing goes unmeasured.
    ps = _params()
    opt = SPA(ps, lr=0.5, c=0.2)
    pair = Pair(opt)
    for k in range(4):
        if k == 2:
            opt.param_groups[0]["c"] = 1.0
        opt.zero_grad()
        _loss(ps).backward()
        pair.before_step()
        x0 = [p.detach().clone() for p in ps]
        opt.step()
        full, cheap = pair.readings["full"][-1], pair.readings["cheap"][-1]
        assert cheap.values[-1][0] == pytest.approx(_displacement(ps, x0), rel=1e-10)
        assert cheap.values[-1][0] == pytest.approx(full.values[-1][0], rel=1e-10)
    assert len(pair.readings["cheap"]) == 4
    assert math.isfinite(pair.readings["cheap"][2].values[-1][3])  # step 2 (c = 1, momentum folded in): full


@pytest.mark.parametrize("cosine_every", [None, 1])
def test_step_sq_is_exact_per_parameter_after_skipped_steps(cosine_every: int | None) -> None:
    # b has no gradient at steps 2-4 while eta falls: its buffer keeps the scale (1 - c) eta_1, the
    # others' move on. step_sq sums each parameter's own ||x_{k+1} - x_k||^2 (issue 16 item 6); one
    # scale per group (the first parameter's) was 7.7% off in the run.
    ps = _params()
    b = ps[1]
    opt = SPA(ps, lr=1.0, c=0.1)
    meter = MomentumMeter(opt, every_n_steps=1, ema_decay=0.0, cosine_every_n_steps=cosine_every).attach()
    scales = set()
    for k in range(8):
        opt.param_groups[0]["lr"] = 0.95**k
        opt.zero_grad()
        _loss(ps).backward()
        if 2 <= k <= 4:
            b.grad = None
        assert meter.before_step()
        scales.add(tuple(round(float(opt.momentum_history(p)[1]), 12) for p in ps if opt.state.get(p)))  # type: ignore[index]
        x0 = [p.detach().clone() for p in ps]
        opt.step()
        assert meter.latest is not None and meter.latest.step == k
        assert meter.latest.values[-1][0] == pytest.approx(_displacement(ps, x0), rel=1e-10), k
    assert any(len(set(s)) == 2 for s in scales)  # the two parameters really had different histories


def test_tensor_histories_are_read_with_the_sums() -> None:
    # SPA's tensor mode (a tensor lr under torch.compile or on an accelerator) keeps prev_eta / prev_c as
    # 0-dim tensors: the full path reads each such scale with the sums, the cheap one weighs each
    # buffer by its tensor a = prev_c * prev_eta. Simulated on the CPU by converting the histories.
    ps = _params()
    opt = SPA(ps, lr=0.5, c=0.2, weight_decay=0.1)
    pair = Pair(opt)
    for k in range(5):
        if k == 2:
            for p in ps:
                state = opt.state[p]
                state["prev_eta"] = torch.tensor(float(state["prev_eta"]), dtype=torch.float64)
                state["prev_c"] = torch.tensor(float(state["prev_c"]), dtype=torch.float64)
        opt.zero_grad()
        _loss(ps).backward()
        pair.before_step()
        x0 = [p.detach().clone() for p in ps]
        opt.step()
        if k >= 2:
            assert isinstance(opt.state[ps[0]]["prev_eta"], torch.Tensor)  # still tensors after the step
        full, cheap = pair.readings["full"][-1], pair.readings["cheap"][-1]
        _assert_rows_equal(full, cheap)
        assert cheap.values[-1][0] == pytest.approx(_displacement(ps, x0), rel=1e-10)


def test_half_precision_norms_accumulate_in_float32() -> None:
    # bf16 parameters: the norms are taken in float32 (a bf16 norm keeps 3 significant digits), so the
    # cheap step_sq is a^2 ||m_{k+1}||^2 of the stored bf16 buffer to float32 precision.
    torch.manual_seed(0)
    ps = [
        torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16)),
    ]
    opt = SPA(ps, lr=0.5, c=0.2, foreach=True)
    pair = Pair(opt)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        pair.before_step()
        opt.step()
        full, cheap = pair.readings["full"][-1], pair.readings["cheap"][-1]
        _assert_rows_equal(full, cheap, rel=5e-3)  # the full path uses m_k and g, the cheap one m_{k+1} in bf16
    bufs = [opt.state[p]["momentum_buffer"].double() for p in ps]
    expected = (0.2 * 0.5) ** 2 * sum(float(b.square().sum()) for b in bufs)  # a^2 ||m'||^2 in float64
    assert cheap.values[-1][0] == pytest.approx(expected, rel=1e-6)


CASES = ["one_block", "two_groups", "mixed_dtypes", "large", "no_grad", "weight_decay", "wd_maximize", "wd_no_grad"]


@pytest.mark.parametrize("case", CASES)
def test_blocks_and_their_fallbacks_measure_the_displacement(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A group whose parameters all have a gradient and one history is one block, reduced by one Gram matrix on
    # the CPU (Sums.of_blocks; with weight decay g = grad + wd x_k formed in the copy); mixed dtypes, more than
    # _FLAT_MAX elements or a parameter without a gradient take the foreach norm (Sums.of_norms), or with weight
    # decay the general path. Either way step_sq is the displacement and grad_sq eta^2 ||g||^2.
    from lightning_spa import diagnostics

    ps = _params()
    if case == "mixed_dtypes":  # a float32 block with a float64 tensor would be widened by the copy
        ps[0] = torch.nn.Parameter(ps[0].detach().float())
    if case == "large":
        monkeypatch.setattr(diagnostics, "_FLAT_MAX", 100)
    groups = [{"params": ps[:1]}, {"params": ps[1:], "c": 0.5}] if case == "two_groups" else [{"params": ps}]
    wd = 0.3 if case.startswith("w") else 0.0
    opt = SPA(groups, lr=0.5, c=0.2, weight_decay=wd, maximize=case == "wd_maximize")
    meter = MomentumMeter(opt, every_n_steps=1, ema_decay=0.0, cosine_every_n_steps=None).attach()
    paths: list[str] = []
    of_blocks, of_norms = diagnostics.Sums.of_blocks.__func__, diagnostics.Sums.of_norms.__func__  # type: ignore[attr-defined]

    def blocks_spy(cls: type, *args: object) -> object:
        sums = of_blocks(cls, *args)
        paths.append("blocks" if sums is not None else "refused")
        return sums

    def norms_spy(cls: type, *args: object) -> object:
        paths.append("foreach")
        return of_norms(cls, *args)

    monkeypatch.setattr(diagnostics.Sums, "of_blocks", classmethod(blocks_spy))
    monkeypatch.setattr(diagnostics.Sums, "of_norms", classmethod(norms_spy))
    for k in range(4):
        opt.zero_grad()
        _loss(ps).backward()
        if case.endswith("no_grad") and k == 2:
            ps[1].grad = None
        assert meter.before_step()
        x0 = [p.detach().clone() for p in ps]
        grads = [None if p.grad is None else p.grad.clone() for p in ps]
        opt.step()
        assert meter.latest is not None and meter.latest.step == k
        rel = 1e-6 if case == "mixed_dtypes" else 1e-10
        assert meter.latest.values[-1][0] == pytest.approx(_displacement(ps, x0), rel=rel), k
        sign = -1.0 if case == "wd_maximize" else 1.0
        etas = [h.eta for h in meter.latest.hypers] * (2 if len(opt.param_groups) == 1 else 1)  # per parameter
        expected = sum(
            eta**2 * float((sign * g + wd * x).square().sum())
            for g, x, eta in zip(grads, x0, etas, strict=True)
            if g is not None
        )
        assert meter.latest.values[-1][1] == pytest.approx(expected, rel=rel), k
    expected_paths = {
        "mixed_dtypes": ["refused", "foreach"] * 4,
        "large": ["refused", "foreach"] * 4,
        "no_grad": ["blocks", "blocks", "foreach", "blocks"],
        "wd_no_grad": ["blocks", "blocks", "blocks"],  # step 2: measure_cheap's parameter-by-parameter path
    }.get(case, ["blocks"] * 4)
    assert paths == expected_paths


def test_ratio_meter_loads_a_per_group_state_and_reads_its_total_row() -> None:
    # A checkpoint of MeasuredMomentumOff from before its meter kept one row holds a row per group plus the total:
    # loaded into the ratio-only meter (per_group=False), the total row continues, the same as a per-group meter.
    ps = _params()
    opt = SPA([{"params": ps[:1]}, {"params": ps[1:], "c": 0.5}], lr=0.5, c=0.2)
    full = MomentumMeter(opt, every_n_steps=1, ema_decay=0.9, cosine_every_n_steps=None).attach()
    for _ in range(3):
        opt.zero_grad()
        _loss(ps).backward()
        assert full.before_step()
        opt.step()
    state = full.state_dict()
    assert len(state["ema"]["values"]) == 3  # two groups and the total
    readings: list[Reading] = []
    ratio = MomentumMeter.ratio_only(opt, 0.9, state, readings.append)
    assert ratio.ema.n_rows == 1 and ratio.ema.values[0] == full.ema.values[-1]
    opt.zero_grad()
    _loss(ps).backward()
    assert full.before_step()
    ratio.measure_next_step()
    assert ratio.before_step()
    opt.step()
    assert full.latest is not None and len(readings) == 1 and len(readings[0].values) == 1
    assert readings[0].values[0] == pytest.approx(full.latest.values[-1], rel=1e-12, nan_ok=True)
    assert readings[0].ratio == pytest.approx(full.latest.ratio, rel=1e-12)
