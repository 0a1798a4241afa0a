"""`lightning-spa convert` / `figure1` on the Figure 1 panels (THEORY.md sections 2, 3 and 6)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_spa.cli import EXIT_FLAGGED, main

PANEL_E = ["convert", "--eta", "1", "--c", "0.1", "--milestones", "20", "--total-steps", "100"]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _safe_t(c0: float, factor: float) -> int:
    # the first transition step has momentum (1 - c0) * factor**(-1/T); smallest T with it < 1
    return math.floor(math.log(1.0 / factor) / -math.log1p(-c0)) + 1


def test_instant_paper_mode_flags_the_spike(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PANEL_E) == 0
    text = capsys.readouterr().out
    assert "FLAG: equivalent momentum >= 1 at 1 step(s): 20 (9)" in text
    out = _json(capsys, PANEL_E)
    assert [f["step"] for f in out["momentum_ge_1"]] == [20]
    assert out["momentum_ge_1"][0]["momentum"] == pytest.approx((1 - 0.1) * 1.0 / 0.1)
    assert out["suggestion"]["transition_steps"] == _safe_t(0.1, 0.1) == 22
    # after the jump: alpha kept at 0.1 and momentum 0 (panel e)
    last = out["sgdm"][-1]
    assert last["lr"]["first"] == pytest.approx(0.1) and last["momentum"]["first"] == 0.0
    assert main([*PANEL_E, "--check"]) == EXIT_FLAGGED


def test_instant_lr_mode_spike_panel_c(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, [*PANEL_E, "--mode", "lr", "--milestones", "20", "50"])
    assert [(f["step"], round(f["momentum"], 9)) for f in out["momentum_ge_1"]] == [(20, 9.0), (50, 9.0)]


def test_safe_geometric_schedule_has_no_flag(capsys: pytest.CaptureFixture[str]) -> None:
    t = _safe_t(0.1, 0.1)
    out = _json(capsys, [*PANEL_E, "--transition", "geometric", "--transition-steps", str(t)])
    assert out["momentum_ge_1"] == [] and out["no_spa_equivalent"] is None
    beta_max = max(s["momentum"]["high"] or s["momentum"]["first"] for s in out["sgdm"])
    assert beta_max == pytest.approx(0.9 * 10 ** (1 / t))
    out = _json(capsys, [*PANEL_E, "--transition", "geometric", "--transition-steps", str(t - 1)])
    assert [f["step"] for f in out["momentum_ge_1"]] == [20]
    # without --transition-steps the smallest safe transition is used
    assert main([*PANEL_E, "--transition", "geometric", "--check"]) == 0
    assert f"geometric over {t} steps" in capsys.readouterr().out


def test_epochs_and_steps_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--eta", "1", "--c", "0.1", "--milestones", "150", "225", "--unit", "epoch"]
    out = _json(capsys, [*argv, "--steps-per-epoch", "10", "--epochs", "300"])
    assert out["total_steps"] == 3000
    # paper mode: c reaches 1 at the first milestone, so only that one spikes; the second is plain SGD
    assert [f["step"] for f in out["momentum_ge_1"]] == [1500]
    assert main(argv) == 1  # epochs without --steps-per-epoch
    assert "--steps-per-epoch" in capsys.readouterr().err


def test_rising_momentum_names_first_unrepresentable_step(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--lr", "0.1", "--momentum", "0.5", "--milestones", "20", "--factor", "1"]
    argv += ["--momentum-after", "0.9", "--total-steps", "100"]
    # eta_19 = 0.2; eta_20 = (0.2 - 0.1)/0.9 = 1/9 (c = 0.9); eta_21 = (1/9 - 0.1)/0.9 < 0.1 = lr: c > 1
    out = _json(capsys, argv)
    assert out["no_spa_equivalent"]["step"] == 21
    assert out["momentum_ge_1"] == []
    assert main(argv) == 0
    assert "no SPA equivalent from step 21 on" in capsys.readouterr().out


def test_sgdm_lr_drop_panel_a_is_representable(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--lr", "0.1", "--momentum", "0.9", "--milestones", "20", "--total-steps", "100", "--per-step"]
    out = _json(capsys, argv)
    assert out["no_spa_equivalent"] is None and out["momentum_ge_1"] == []
    eta = out["per_step"]["eta"]
    assert eta[20] == pytest.approx(1.0) and eta[21] == pytest.approx((1.0 - 0.01) / 0.9)  # eta grows (Figure 1a)
    assert out["suggestion"]["transition_steps"] == 22


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eta", "1", "--c", "0.1", "--lr", "0.1"], "not both"),
        (["--lr", "0.1"], "`--momentum` is missing"),
        (["--eta", "1", "--c", "0"], "`--c` must be in (0, 1]"),
        (["--lr", "0.1", "--momentum", "0.9", "--mode", "paper"], "`--mode` applies to SPA"),
        (["--eta", "1", "--c", "0.1", "--milestones", "5", "--transition-steps", "3"], "--transition geometric"),
    ],
)
def test_bad_arguments_exit_1_with_message(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    assert main(["convert", *extra]) == 1
    assert message in capsys.readouterr().err


def test_momentum_exactly_one_is_flagged_not_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["convert", "--lr", "0.1", "--momentum", "1.0", "--total-steps", "10"])
    assert [f["step"] for f in out["momentum_ge_1"]] == list(range(1, 10))
    assert out["no_spa_equivalent"]["step"] == 0


def test_figure1_and_convert_plot_write_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig1.png"
    assert main(["figure1", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    conv = tmp_path / "conv.png"
    assert main([*PANEL_E, "--plot", str(conv)]) == 0
    assert conv.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_needs_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_long_schedule_prints_compactly(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--eta", "1", "--c", "0.1", "--milestones", "150", "225", "--unit", "epoch"]
    argv += ["--steps-per-epoch", "100", "--epochs", "300", "--transition", "geometric", "--transition-steps", "100"]
    out = _json(capsys, argv)
    # constant / transition (eta down, c up) / constant / transition (eta only, c = 1) / constant
    assert [(s["start"], s["end"]) for s in out["spa"]] == [(0, 14999), (15000, 15098), (15099, 22499),
                                                            (22500, 22598), (22599, 29999)]  # fmt: skip
    kinds = [(s["eta"]["kind"], s["c"]["kind"]) for s in out["spa"]]
    assert kinds == [("constant", "constant"), ("geometric", "geometric"), ("constant", "constant"),
                     ("geometric", "constant"), ("constant", "constant")]  # fmt: skip
    assert out["spa"][1]["eta"]["ratio"] == pytest.approx(0.1 ** (1 / 100))
    assert len(out["sgdm"]) == 5 and out["momentum_ge_1"] == []
    assert main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) < 25


def test_multisteplr_overflow_is_named_and_bounded_form_is_finite(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--lr", "0.1", "--momentum", "0.9", "--milestones", "150", "225", "--unit", "epoch"]
    argv += ["--steps-per-epoch", "391", "--epochs", "300"]
    out = _json(capsys, argv)  # the natural SPA form drifts after the first drop until eta overflows
    assert 150 * 391 < out["no_spa_equivalent"]["step"] and "bounded" in out["no_spa_equivalent"]["reason"]
    out = _json(capsys, [*argv, "--bounded"])
    assert out["no_spa_equivalent"] is None and out["momentum_ge_1"] == []
    assert out["spa"][-1]["eta"]["kind"] == "constant" and out["spa"][-1]["c"]["kind"] == "constant"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--milestones", "200", "--total-steps", "100"], "at or after the end of the schedule"),
        (["--factor", "0.5", "--total-steps", "100"], "`--factor` applies at `--milestones`"),
        (["--per-step"], "add `--json`"),
        (["--milestones", "20", "--steps-per-epoch", "10"], "`--steps-per-epoch` is only used"),
    ],
)
def test_options_that_would_be_ignored_are_refused(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["convert", "--eta", "1", "--c", "0.1", *extra]) == 1
    assert message in capsys.readouterr().err
