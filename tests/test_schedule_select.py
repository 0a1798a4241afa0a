"""The shared optimizer selection of the callbacks (lightning_spa.callbacks._select), without a Trainer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_spa import SPA, GradualSchedule
from lightning_spa.callbacks._adapter import OptimizerClock
from lightning_spa.callbacks._select import check_selection, select_optimizers, unsupported_reason


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2))]


def trainer(*optimizers: torch.optim.Optimizer) -> Any:
    return SimpleNamespace(optimizers=list(optimizers), callbacks=[])


def gan() -> Any:
    gen = SPA([{"params": _params(), "name": "generator"}], lr=1.0, c=0.1)
    disc = torch.optim.Adam([{"params": _params(), "name": "discriminator"}])
    sgd = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    return trainer(gen, disc, sgd)


def test_default_selects_every_supported_optimizer_and_warns_once_about_the_rest() -> None:
    with pytest.warns(UserWarning, match=r"skips optimizer 1 \(Adam, groups discriminator\).*optimizers \[0, 2\]"):
        selected = select_optimizers(gan(), None, "GradualSchedule")
    assert [(s.index, s.kind) for s in selected] == [(0, "spa"), (2, "sgd")]


@pytest.mark.parametrize(("selection", "expected"), [([2], [2]), (["generator"], [0]), (["SGD", 0], [0, 2])])
def test_indices_and_names(selection: list[Any], expected: list[int]) -> None:
    t = gan()
    assert [s.index for s in select_optimizers(t, selection, "X")] == expected
    assert [s.optimizer for s in select_optimizers(t, selection, "X")] == [t.optimizers[i] for i in expected]


@pytest.mark.parametrize(
    ("selection", "error", "match"),
    [
        ([1], TypeError, r"optimizer 1\).*torch.optim.adam.Adam is neither"),
        (["discriminator"], TypeError, "Adam is neither"),
        ([3], ValueError, r"selects index 3, but .* 3 optimizer\(s\): optimizer 0 \(SPA, groups generator\)"),
        (["critic"], ValueError, r"'critic' is neither the class name"),
    ],
)
def test_explicit_selection_of_something_unsupported_or_missing_is_an_error(
    selection: list[Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        select_optimizers(gan(), selection, "GradualSchedule")


def test_nothing_supported_is_an_error() -> None:
    with pytest.raises(ValueError, match="has no optimizer to work on: optimizer 0 \\(Adam\\)"):
        select_optimizers(trainer(torch.optim.Adam(_params())), None, "MomentumOff")


def test_momentum_zero_can_be_measured_not_scheduled() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1)
    assert unsupported_reason(opt, "measure") is None
    assert "momentum=0.0" in str(unsupported_reason(opt, "schedule"))
    with pytest.raises(ValueError, match=r"param group 0 has momentum=0.0"):
        select_optimizers(trainer(opt), [0], "GradualSchedule")


@pytest.mark.parametrize("bad", [[], [-1], [1.5], [True], "", {"a": 1}])
def test_check_selection_refuses_bad_arguments(bad: Any) -> None:
    with pytest.raises(ValueError, match="`optimizers`"):
        check_selection(bad, "GradualSchedule")


def test_check_selection_accepts_a_single_entry_and_none() -> None:
    assert check_selection(None, "X") is None
    assert check_selection(1, "X") == [1]
    assert check_selection("generator", "X") == ["generator"]
    assert check_selection((0, "SPA"), "X") == [0, "SPA"]


def test_clock_of_unwraps_lightning_optimizers() -> None:
    """The per-step hooks find an optimizer's clock from what Lightning hands them (raw or wrapped)."""
    from pytorch_lightning.core.optimizer import LightningOptimizer

    t = gan()
    callback = GradualSchedule(milestones=[1])
    callback._clocks = {i: OptimizerClock(t.optimizers[i], "spa", i, [], "X") for i in (0, 2)}
    assert callback._clock_of(t.optimizers[2]) is callback._clocks[2]
    assert callback._clock_of(LightningOptimizer(t.optimizers[0])) is callback._clocks[0]
    assert callback._clock_of(t.optimizers[1]) is None  # not selected
    assert callback._clock_of(SPA(_params())) is None
