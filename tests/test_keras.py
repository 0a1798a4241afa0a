"""Porting a Keras/TensorFlow recipe (issue 16 item 16; THEORY.md section 9).

Keras' SGD keeps the learning rate inside the velocity: ``v <- mu v - lr g;  x <- x + v``.
Reimplemented here in float64; SPA with ``keras_to_spa``'s schedule and torch SGD with
``keras_to_sgdm``'s schedule must reproduce it, while torch SGD with Keras' own numbers does not.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from lightning_spa import SPA, SPASpikeWarning, keras_to_sgdm, keras_to_spa
from lightning_spa.cli import EXIT_FLAGGED, EXIT_OK, main

N = 80


def _keras_lr() -> list[float]:
    """A time-varying Keras schedule: linear warm-up, a 10x step decay, then a cosine tail."""
    warm, drop = 10, 40
    out = []
    for k in range(N):
        if k < warm:
            out.append(0.05 * (k + 1) / warm)
        elif k < drop:
            out.append(0.05)
        else:
            out.append(0.005 * 0.5 * (1 + math.cos(math.pi * (k - drop) / (N - drop))) + 1e-4)
    return out


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(10, 10, dtype=torch.float64, generator=gen)
    return a @ a.T / 10 + 0.05 * torch.eye(10, dtype=torch.float64), torch.randn(
        N, 10, dtype=torch.float64, generator=gen
    )


def _keras_path(lr: list[float], mu: list[float]) -> torch.Tensor:
    h, noise = _problem()
    x, v, path = torch.ones(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64), []
    for k in range(N):
        g = h @ x + 0.1 * noise[k]
        v = mu[k] * v - lr[k] * g  # Keras: tf.keras.optimizers.SGD(momentum=mu), nesterov=False
        x = x + v
        path.append(x.clone())
    return torch.stack(path)


def _torch_path(opt_cls: type, first: list[float], second: list[float], key: str, recipe: bool = True) -> torch.Tensor:
    """Iterates of ``opt_cls`` driven per step; ``recipe``: torch SGD's momentum-0 steps as ``mapping`` advises."""
    h, noise = _problem()
    x = torch.ones(10, dtype=torch.float64, requires_grad=True)
    opt = opt_cls([x], lr=first[0], **{key: second[0]})
    path = []
    for k in range(N):
        opt.param_groups[0].update({"lr": first[k], key: second[k]})
        if recipe and key == "momentum" and k >= 1 and second[k] == 0.0:
            opt.state[x].pop("momentum_buffer", None)  # lightning_spa.mapping's recipe for momentum-0 steps
            opt.param_groups[0]["momentum"] = 0.5
        x.grad = h @ x.detach() + 0.1 * noise[k]
        opt.step()
        path.append(x.detach().clone())
    return torch.stack(path)


@pytest.mark.parametrize("momentum", ["constant", "varying"])
def test_spa_and_converted_torch_sgd_reproduce_keras(momentum: str) -> None:
    lr = _keras_lr()
    mu = [0.9] * N if momentum == "constant" else [0.9] * 30 + [0.8] * 20 + [0.0] + [0.95] * (N - 51)
    keras = _keras_path(lr, mu)
    eta, c = keras_to_spa(lr, mu)
    if momentum == "constant":
        assert c == pytest.approx([0.1] * N, rel=1e-15) and eta == pytest.approx([a / 0.1 for a in lr], rel=1e-15)
    assert all(0.0 < ck <= 1.0 for ck in c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spa = _torch_path(SPA, eta, c, "c")
    if momentum == "constant":  # Keras' 10x lr drop is SPA's instant eta drop: the spike (torch momentum 9)
        assert [type(w.message) for w in caught] == [SPASpikeWarning]
        assert "SPA step 40 (counted from 0)" in str(caught[0].message)  # 0-based, as the other messages
    sgd_lr, sgd_momentum = keras_to_sgdm(lr, mu)
    assert sgd_lr == pytest.approx(lr, rel=1e-15)
    assert sgd_momentum[1:] == pytest.approx(
        [m * a / b for m, a, b in zip(mu[1:], lr, lr[1:], strict=False)], rel=1e-12
    )
    sgd = _torch_path(torch.optim.SGD, sgd_lr, sgd_momentum, "momentum")
    scale = keras.abs().max().item()
    assert (spa - keras).abs().max().item() <= 1e-13 * scale
    assert (sgd - keras).abs().max().item() <= 1e-13 * scale
    naive = _torch_path(torch.optim.SGD, lr, mu, "momentum", recipe=False)  # torch SGD with Keras' own numbers
    assert (naive - keras).abs().max().item() > 1e-3 * scale


def test_keras_to_spa_scalars_and_errors() -> None:
    assert keras_to_spa(0.01, 0.9) == (pytest.approx(0.1), pytest.approx(0.1))
    with pytest.raises(ValueError, match="`momentum` at step 0"):
        keras_to_spa(0.01, 1.0)
    with pytest.raises(ValueError, match="`lr` at step 1"):
        keras_to_spa([0.1, -0.1], 0.9)
    assert keras_to_spa([0.1, 0.0], 0.9)[0][1] == 0.0  # SPA runs eta = 0
    with pytest.raises(ValueError, match="`lr` is 0 at step 1"):
        keras_to_sgdm([0.1, 0.0], 0.9)


def test_convert_from_keras_prints_the_spa_and_torch_forms(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--from", "keras", "--lr", "0.1", "--momentum", "0.9", "--milestones", "30"]
    assert main([*argv, "--total-steps", "60", "--factor", "0.1"]) != EXIT_OK  # an instant drop: flagged
    out = capsys.readouterr().out
    assert "Keras form (lr, momentum):" in out and "SPA form (eta, c):" in out
    assert "torch SGD form (lr, momentum):" in out
    spa_rows = out.split("SPA form (eta, c):")[1].split("\n\n")[0]
    assert "eta 1 " in spa_rows and "eta 0.1 " in spa_rows and "c 0.1" in spa_rows  # eta = lr / (1 - mu), c = 1 - mu
    assert "momentum 9" in out  # torch's momentum at the drop: 0.9 * lr_prev / lr


def test_convert_from_keras_suggests_the_shortest_safe_lr_transition(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--from", "keras", "--lr", "0.1", "--momentum", "0.9", "--milestones", "30"]
    argv += ["--total-steps", "90"]
    assert main([*argv, "--json"]) == EXIT_FLAGGED
    t = json.loads(capsys.readouterr().out)["suggestion"]["transition_steps"]
    # torch's momentum in a geometric lr transition over T steps is 0.9 * 10**(1/T): the smallest T with it < 1
    assert t == math.floor(math.log(10) / -math.log(0.9)) + 1 == 22
    for steps, code in ((t, EXIT_OK), (t - 1, EXIT_FLAGGED)):
        assert main([*argv, "--transition", "geometric", "--transition-steps", str(steps), "--check"]) == code
    capsys.readouterr()
