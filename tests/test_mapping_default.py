"""``sgdm_to_spa`` at its defaults finds an SPA form whenever one exists (issue 16 item 3).

``eta_0`` is free; the bounded solution (computed backwards, ``eta_{k-1} = beta_k eta_k +
alpha_{k-1} >= alpha_{k-1}``) always has ``c`` in ``(0, 1]`` when ``lr > 0``. Schedules whose
natural start ``lr_0 / (1 - momentum_0)`` leaves ``(0, 1]`` (a rising momentum, a fast lr
warm-up) therefore still convert at the defaults, and SPA driven by the result reproduces
torch SGD in float64.
"""

from __future__ import annotations

import pytest
import torch

from lightning_spa import SPA, sgdm_to_spa, spa_to_sgdm
from lightning_spa.mapping import NoSPAEquivalentError


def _one_cycle(steps: int = 60) -> tuple[list[float], list[float]]:
    """torch's OneCycleLR with ``cycle_momentum`` (momentum 0.95 -> 0.85 -> 0.95), read per step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=steps, cycle_momentum=True)
    lr, momentum = [], []
    for _ in range(steps):
        lr.append(opt.param_groups[0]["lr"])
        momentum.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return lr, momentum


SCHEDULES = {
    "OneCycleLR(cycle_momentum)": _one_cycle,
    "momentum warm-up 0.5 -> 0.9": lambda: ([0.1] * 40, [0.5 + 0.4 * min(1.0, k / 10) for k in range(40)]),
    "lr warm-up": lambda: ([0.1 * min(1.0, (k + 1) / 10) for k in range(40)], [0.9] * 40),
}


def _run(schedule: str, lr: list[float], second: list[float]) -> torch.Tensor:
    """Iterates of a noisy float64 quadratic under torch SGD ``(lr, momentum)`` or SPA ``(eta, c)``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, dtype=torch.float64, generator=gen)
    h = a @ a.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
    noise = torch.randn(len(lr), 12, dtype=torch.float64, generator=gen)
    x = torch.ones(12, dtype=torch.float64, requires_grad=True)
    if schedule == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([x], lr=lr[0], momentum=second[0])
        key = "momentum"
    else:
        opt = SPA([x], lr=lr[0], c=second[0])
        key = "c"
    path = []
    for k in range(len(lr)):
        opt.param_groups[0].update({"lr": lr[k], key: second[k]})
        opt.zero_grad()
        x.grad = h @ x.detach() + 0.1 * noise[k]
        opt.step()
        path.append(x.detach().clone())
    return torch.stack(path)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_with_an_spa_form_convert_at_the_defaults_and_match_sgd(name: str) -> None:
    lr, momentum = SCHEDULES[name]()
    with pytest.raises(NoSPAEquivalentError, match="eta0=None"):  # the natural start alone has none (the old default)
        sgdm_to_spa(lr, momentum, eta0=lr[0] / (1 - momentum[0]))
    eta, c = sgdm_to_spa(lr, momentum)  # before: NoSPAEquivalentError ("momentum rising too fast?")
    assert all(0.0 < ck <= 1.0 for ck in c)
    lr2, momentum2 = spa_to_sgdm(eta, c)
    assert lr2 == pytest.approx(lr, rel=1e-12) and momentum2[1:] == pytest.approx(momentum[1:], rel=1e-12)
    sgd_path, spa_path = _run("sgd", lr, momentum), _run("spa", eta, c)
    scale = sgd_path.abs().max().item()
    assert (sgd_path - spa_path).abs().max().item() <= 1e-14 * max(1.0, scale)


def test_the_natural_start_is_kept_where_it_works() -> None:
    eta, _ = sgdm_to_spa([0.1] * 10 + [0.01] * 10, 0.9)  # Figure 1a: constant, then drifting
    assert eta[:10] == pytest.approx([1.0] * 10) and eta[11] == pytest.approx(1.1)


def test_only_a_zero_lr_next_to_momentum_has_no_spa_form() -> None:
    with pytest.raises(NoSPAEquivalentError, match="outside") as err:  # SGD's lr-0 step fills its buffer
        sgdm_to_spa([0.1, 0.0, 0.1, 0.1], 0.9)
    assert err.value.step == 1
    with pytest.raises(NoSPAEquivalentError) as err:  # a warm-up from lr 0 at momentum 0.9: g_0 enters the buffer
        sgdm_to_spa([0.0, 0.05, 0.1], 0.9)
    assert err.value.step == 0
    eta, c = sgdm_to_spa([0.0, 0.1, 0.1], [0.0, 0.0, 0.0])  # plain SGD through lr 0: eta 0 moves nothing too
    assert eta == pytest.approx([0.0, 0.1, 0.1]) and c == [1.0, 1.0, 1.0]
