"""`lightning-spa plot` / `plot_run` on real runs with several optimizers and per-group series (issue 17, point 5),
and the reading of the ratio on its panel (issue 15, point 4).

The runs are tiny fits of the two-optimizer module of ``test_diagnostics_setups`` (manual optimization,
SPA ``(eta, c) = (1, 0.1)`` on ``g`` and ``(2, 0.5)`` on ``d``, pure-noise losses) with
``MomentumDiagnostics(ema_decay=0, per_group=True)``, logged by each package's TensorBoardLogger or CSVLogger:
the values drawn are the raw samples, recomputed in float64 by ``raw_spa``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from test_diagnostics_setups import modules, raw_spa
from torch.utils.data import DataLoader, TensorDataset

from lightning_spa import MomentumDiagnostics
from lightning_spa.cli import EXIT_INVALID, EXIT_OK, main
from lightning_spa.plotting import PanelSet, draw_run, panel_sets, read_run

pytest.importorskip("matplotlib")  # lightning_spa.plotting imports it when drawing

STEPS = 6
# optimizer i: (eta, c), and the name of its one param group (the generator's is named, the other's is its index)
OPTIMIZERS = {0: (1.0, 0.1, "generator"), 1: (2.0, 0.5, "0")}


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _two_optimizer_run(package: ModuleType, tmp_path: Path, logger: str, **diagnostics: Any) -> Path:
    """Fits the two-optimizer module; returns the run's log directory."""
    _, _, Gan = modules(package.__name__)
    loggers = package.loggers
    if logger == "csv":
        log = loggers.CSVLogger(str(tmp_path), name="gan", version=0)
    else:
        log = loggers.TensorBoardLogger(str(tmp_path), name="gan", version=0)
    options = {"every_n_steps": 1, "ema_decay": 0.0, "per_group": True, **diagnostics}
    trainer = package.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[MomentumDiagnostics(**options)], logger=log,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(Gan(), DataLoader(TensorDataset(torch.zeros(STEPS, 1)), batch_size=1))
    return Path(log.log_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``runs(package, logger, **diagnostics)``: a run's directory, fitted once per module (plots only read it)."""
    done: dict[tuple[str, str, str], Path] = {}

    def get(package: ModuleType, logger: str, **diagnostics: Any) -> Path:
        key = (package.__name__, logger, repr(sorted(diagnostics.items())))
        if key not in done:
            done[key] = _two_optimizer_run(package, tmp_path_factory.mktemp("run"), logger, **diagnostics)
        return done[key]

    return get


def _ydata(ax: Any, label: str) -> list[float]:
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return [float(y) for y in line.get_ydata()]


def _texts(fig: Any) -> str:
    return " | ".join([ax.get_title() for ax in fig.axes] + [t.get_text() for ax in fig.axes for t in ax.texts])


@pytest.mark.parametrize("logger", ["tensorboard", "csv"])
def test_two_optimizers_one_panel_set_each(
    package: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], logger: str, runs: Any
) -> None:
    run = runs(package, logger)
    data = read_run(run)
    assert "spa/ratio" not in data and {"spa/ratio/opt0", "spa/ratio/opt1"} <= set(data)
    assert panel_sets(data) == [
        PanelSet(0, "/opt0", {"generator": "/opt0/generator"}),
        PanelSet(1, "/opt1", {"0": "/opt1/0"}),
    ]
    fig = draw_run(run)
    assert len(fig.axes) == 8  # a row of 4 panels per optimizer
    for i, (eta, c, group) in OPTIMIZERS.items():
        expected = raw_spa(eta, c, STEPS, i)
        ax_sq, ax_ratio, ax_cos, ax_hyper = fig.axes[4 * i : 4 * i + 4]
        assert f"optimizer {i}" in ax_ratio.get_title()
        assert _ydata(ax_ratio, "ratio") == pytest.approx(expected["ratio"], rel=1e-5)
        # the optimizer's only group: its series are the optimizer's
        assert _ydata(ax_ratio, f"group {group}") == pytest.approx(expected["ratio"], rel=1e-5)
        assert _ydata(ax_cos, r"$\cos(g_k, m_k)$ (EMA)") == pytest.approx(expected["cosine"][1:], rel=1e-5)
        assert _ydata(ax_sq, r"$\|x_{k+1}-x_k\|^2$ (EMA)") == pytest.approx(expected["step_sq"], rel=1e-5)
        assert _ydata(ax_hyper, "$c$") == pytest.approx([c] * STEPS)
        assert _ydata(ax_hyper, r"SGD+M lr $\alpha$") == pytest.approx([c * eta] * STEPS)  # Theorem 1: alpha = c eta
    png = tmp_path / "all.png"
    assert main(["plot", str(run), "--out", str(png)]) == EXIT_OK
    assert _png_size(png) == (1800, 760)  # figsize (18, 3.8 x 2 rows) at 100 dpi
    assert capsys.readouterr().out == f"wrote {png}\n"


@pytest.mark.parametrize("choice", ["1", "opt1"])
def test_one_optimizer_or_one_group_chosen(package: ModuleType, tmp_path: Path, choice: str, runs: Any) -> None:
    run = runs(package, "tensorboard")
    fig = draw_run(run, optimizer=choice)
    assert len(fig.axes) == 4  # the paper's 2 x 2 layout
    assert _ydata(fig.axes[1], "ratio") == pytest.approx(raw_spa(2.0, 0.5, STEPS, 1)["ratio"], rel=1e-5)
    png = tmp_path / "one.png"
    assert main(["plot", str(run), "--optimizer", choice, "--out", str(png)]) == EXIT_OK
    assert _png_size(png) == (1100, 700)
    # a group's series instead of the optimizer's: only the optimizer that has the group
    fig = draw_run(run, group="generator")
    assert len(fig.axes) == 4 and "optimizer 0, group generator" in fig.axes[1].get_title()
    assert _ydata(fig.axes[1], "ratio") == pytest.approx(raw_spa(1.0, 0.1, STEPS, 0)["ratio"], rel=1e-5)
    assert main(["plot", str(run), "--group", "generator", "--out", str(png)]) == EXIT_OK


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--optimizer", "2"],
            "`optimizer` (`--optimizer`) '2' was not measured in this run; it holds optimizer 0: spa/ratio/opt0, "
            "groups generator; optimizer 1: spa/ratio/opt1, groups 0. Pick one of 0, 1",
        ),
        (["--optimizer", "gen"], "must be an optimizer index (0, 1, ... or opt0, opt1, ...), got 'gen'"),
        (["--group", "head"], "`group` (`--group`) 'head' is not in this run: it holds optimizer 0: spa/ratio/opt0"),
    ],
)
def test_choices_not_in_the_run_are_named_with_what_it_holds(
    package: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str, runs: Any
) -> None:
    run = runs(package, "csv")
    assert main(["plot", str(run), *argv, "--out", str(tmp_path / "x.png")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_single_optimizer_run_refuses_optimizer_and_absent_groups(
    package: ModuleType, capsys: pytest.CaptureFixture[str], runs: Any
) -> None:
    # measuring only the generator: tags without /opt<i>, its index is not logged
    run = runs(package, "tensorboard", optimizers=["generator"], per_group=False)
    assert [ps.optimizer for ps in panel_sets(read_run(run))] == [None]
    assert main(["plot", str(run), "--optimizer", "0"]) == EXIT_INVALID
    assert "this run measured one optimizer (its tags have no /opt<i>" in capsys.readouterr().err
    assert main(["plot", str(run), "--group", "generator"]) == EXIT_INVALID
    assert "no parameter group was logged (MomentumDiagnostics(per_group=True) logs them)" in capsys.readouterr().err
    assert main(["plot", str(run)]) == EXIT_OK


def test_run_without_the_ratio_lists_its_spa_tags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # what MeasuredMomentumOff alone logs: no MomentumDiagnostics panels to draw
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,spa/momentum_off_step,spa/off_ratio,step\n0,,0.8,3\n0,4.0,,3\n")
    assert main(["plot", str(run)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "the spa/* tags found: " in err and "spa/momentum_off_step, spa/off_ratio" in err
    assert "MomentumDiagnostics logs the ratio" in err and err.count("\n") == 1


def test_ratio_panel_says_what_each_side_of_one_means(package: ModuleType, runs: Any) -> None:
    """Above 1 aligned (momentum accelerates), near 1 idle, below 1 damping (removal unsafe): not "> 1 helps"."""
    fig = draw_run(runs(package, "tensorboard"), optimizer=0)
    text = _texts(fig)
    for phrase in ("above 1: aligned, momentum accelerates", "momentum idle",
                   "below 1: momentum damps; removing it at this eta is unsafe"):  # fmt: skip
        assert phrase in text, text
    assert "helps" not in text
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert "1: idle (noise level)" in labels
