"""`lightning-spa`: convert / figure1 on the Figure 1 panels (THEORY.md sections 2, 3 and 6), exit codes, plot."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import pytest

from lightning_spa.cli import EXIT_FLAGGED, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main

PANEL_E = ["convert", "--eta", "1", "--c", "0.1", "--milestones", "20", "--total-steps", "100"]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    """The JSON report; the exit status is 3 exactly when something is flagged (the policy, with or without --check)."""
    code = main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == (EXIT_FLAGGED if out["momentum_ge_1"] or out["no_spa_equivalent"] else EXIT_OK)
    return out


def _safe_t(c0: float, factor: float) -> int:
    # the first transition step has momentum (1 - c0) * factor**(-1/T); smallest T with it < 1
    return math.floor(math.log(1.0 / factor) / -math.log1p(-c0)) + 1


def test_instant_paper_mode_flags_the_spike(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PANEL_E) == EXIT_FLAGGED
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
    assert main([*PANEL_E, "--transition", "geometric"]) == EXIT_OK
    assert f"geometric over {t} steps" in capsys.readouterr().out


def test_epochs_and_steps_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--eta", "1", "--c", "0.1", "--milestones", "150", "225", "--unit", "epoch"]
    out = _json(capsys, [*argv, "--steps-per-epoch", "10", "--epochs", "300"])
    assert out["total_steps"] == 3000
    # paper mode: c reaches 1 at the first milestone, so only that one spikes; the second is plain SGD
    assert [f["step"] for f in out["momentum_ge_1"]] == [1500]
    assert main(argv) == 1  # epochs without --steps-per-epoch
    assert "--steps-per-epoch" in capsys.readouterr().err


def test_rising_momentum_has_an_spa_form_at_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--lr", "0.1", "--momentum", "0.5", "--milestones", "20", "--factor", "1"]
    argv += ["--momentum-after", "0.9", "--total-steps", "100", "--per-step"]
    # from the constant start eta_19 = 0.2: eta_20 = (0.2 - 0.1)/0.9 = 1/9 (c = 0.9); eta_21 = (1/9 - 0.1)/0.9 < 0.1
    # = lr, so c > 1. eta_0 is free: the bounded solution (eta 1 = 0.1 / (1 - 0.9) from step 20 on) exists.
    out = _json(capsys, argv)  # before: "no SPA equivalent from step 21 on" and exit 3 with --check
    assert out["no_spa_equivalent"] is None and out["momentum_ge_1"] == []
    eta, c = out["per_step"]["eta"], out["per_step"]["c"]
    assert eta[20:] == pytest.approx([1.0] * 80) and c[20:] == pytest.approx([0.1] * 80)
    assert eta[19] == pytest.approx(0.9 * 1.0 + 0.1) and all(0.0 < ck <= 1.0 for ck in c)  # eta_19 = b_20 eta_20 + lr
    assert "bounded" in out["note"]
    assert main(argv[:-1]) == EXIT_OK
    text = capsys.readouterr().out
    assert "OK: every step has an SPA equivalent." in text and "Note: the constant start" in text


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
    out = _json(capsys, ["convert", "--lr", "0.1", "--momentum", "1.0", "--total-steps", "10", "--per-step"])
    assert [f["step"] for f in out["momentum_ge_1"]] == list(range(1, 10))
    assert out["no_spa_equivalent"] is None  # a finite schedule with momentum 1 has an SPA form: c = 1 at the end
    assert out["per_step"]["c"][-1] == 1.0 and out["per_step"]["eta"][0] == pytest.approx(1.0)  # eta_k = lr * (n - k)


def test_figure1_and_convert_plot_write_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig1.png"
    assert main(["figure1", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    conv = tmp_path / "conv.png"
    assert main([*PANEL_E, "--plot", str(conv)]) == EXIT_FLAGGED
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
    # the natural SPA form drifts after the first drop until eta overflows: the default takes the bounded one
    out = _json(capsys, argv)  # before: "no SPA equivalent" with a hint that named eta0='bounded', not --bounded
    assert out["no_spa_equivalent"] is None and "`--bounded` always picks it" in out["note"]
    bounded = _json(capsys, [*argv, "--bounded"])
    assert bounded["no_spa_equivalent"] is None and bounded["momentum_ge_1"] == [] and bounded["note"] is None
    assert bounded["spa"] == out["spa"]
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


# -- exit codes ----------------------------------------------------------------------------------


def test_exit_codes_tell_usage_invalid_and_flagged_apart(capsys: pytest.CaptureFixture[str]) -> None:
    assert (EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_FLAGGED) == (0, 1, 2, 3)
    with pytest.raises(SystemExit) as usage:  # a typo in an option name: argparse's usage error
        main(["convert", "--etaa", "1", "--c", "0.1"])
    assert usage.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as malformed:  # a value that is not a number
        main(["convert", "--eta", "one", "--c", "0.1"])
    assert malformed.value.code == EXIT_USAGE
    capsys.readouterr()
    assert main(["convert", "--eta", "1", "--c", "1.5"]) == EXIT_INVALID  # parses, but no valid schedule
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback
    capsys.readouterr()
    assert main([*PANEL_E, "--check"]) == EXIT_FLAGGED  # momentum 9 at step 20
    verdict = capsys.readouterr().out  # --check: the verdict lines only
    assert verdict.startswith("FLAG: equivalent momentum >= 1 at 1 step(s): 20 (9)") and "SPA form" not in verdict
    assert main([*PANEL_E]) == EXIT_FLAGGED  # the same status without --check (before: 0), with the full report
    assert "SPA form (eta, c):" in capsys.readouterr().out
    assert main([*PANEL_E, "--transition", "geometric", "--check"]) == EXIT_OK  # the smallest safe transition
    assert main([*PANEL_E, "--transition", "geometric"]) == EXIT_OK
    rising = ["convert", "--lr", "0.1", "--momentum", "0.5", "--milestones", "20", "--factor", "1"]
    assert main([*rising, "--momentum-after", "0.9", "--total-steps", "100", "--check"]) == EXIT_OK  # has an SPA form
    capsys.readouterr()
    assert main([*PANEL_E, "--check", "--json"]) == EXIT_INVALID
    assert "`--check` prints only the verdict lines" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["convert", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "exit status:" in text
        assert all(f"\n  {code}  " in text for code in (EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_FLAGGED))


# -- fractional epochs ---------------------------------------------------------------------------


def test_fractional_epoch_milestones_round_to_the_nearest_step(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["convert", "--eta", "1", "--c", "0.1", "--unit", "epoch", "--total-steps", "400", "--mode", "lr"]
    # round(epochs * steps_per_epoch), the rule of the schedule callbacks: 1.5 * 10 = 15, 0.25 * 391 = 97.75 -> 98
    out = _json(capsys, [*base, "--milestones", "1.5", "--steps-per-epoch", "10"])
    assert [f["step"] for f in out["momentum_ge_1"]] == [15]
    out = _json(capsys, [*base, "--milestones", "0.25", "--steps-per-epoch", "391"])
    assert [f["step"] for f in out["momentum_ge_1"]] == [98]
    assert "milestones [0.25] (epochs)" in out["description"]
    # momentum off after half an epoch: c = 1 from step 5 on, so SGD+M momentum (1 - c_{k-1}) is 0 from step 6
    out = _json(capsys, [*base[:-2], "--momentum-off", "0.5", "--steps-per-epoch", "10", "--per-step"])
    c, momentum = out["per_step"]["c"], out["per_step"]["momentum"]
    assert c[4] == 0.1 and c[5] == 1.0 and momentum[6] == 0.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--milestones", "20.5"], "`--milestones` 20.5 is in optimizer steps"),
        (["--momentum-off", "2.5"], "`--momentum-off` 2.5 is in optimizer steps"),
        (["--milestones", "0.1", "0.12", "--unit", "epoch", "--steps-per-epoch", "10"], "not strictly increasing"),
    ],
)
def test_fractions_that_name_no_step_are_refused(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["convert", "--eta", "1", "--c", "0.1", *extra]) == EXIT_INVALID
    assert message in capsys.readouterr().err


# -- plot: CSVLogger runs ------------------------------------------------------------------------


def _write_csv_run(run: Path, steps: list[int]) -> dict[str, list[float]]:
    """A metrics.csv as Lightning's CSVLogger writes it: sorted header, one row per log call, empty cells."""
    run.mkdir(parents=True)
    values = {
        "spa/ratio": [1.0 + k for k in steps],
        "spa/step_sq": [0.1 * (k + 1) for k in steps],
        "spa/grad_sq_scaled": [0.05 * (k + 1) for k in steps],
        "spa/cosine": [0.5 for _ in steps],
        "spa/eta": [1.0 for _ in steps],
        "spa/c": [0.1 for _ in steps],
        "spa/lr": [0.1 for _ in steps],
        "spa/momentum": [0.9 for _ in steps],
    }
    rows: list[dict[str, object]] = []
    for i, k in enumerate(steps):
        rows.append({**{t: v[i] for t, v in values.items()}, "step": k})
        rows.append({"epoch": 0, "train_loss": 1.0 / (k + 1), "step": k})  # Lightning's own row
    with (run / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    return values


def test_plot_reads_a_csvlogger_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from lightning_spa.plotting import read_run

    run = tmp_path / "csv" / "version_0"
    values = _write_csv_run(run, [0, 2, 4])
    data = read_run(tmp_path)  # found below a parent folder too
    assert data["spa/ratio"] == ([0, 2, 4], values["spa/ratio"])
    assert set(data) == set(values)  # Lightning's own columns are not spa/* and are left out
    assert main(["plot", str(run)]) == EXIT_OK
    assert (run / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.startswith("wrote ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No TensorBoard event file and no CSVLogger metrics.csv"),
        ("epoch,step,train_loss\n0,0,1.0\n", "No run under"),
        ("spa/ratio,x\n1.0,2\n", "no `step` column"),
        ("spa/ratio,step\nabc,0\n", "line 2"),
    ],
)
def test_plot_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "metrics.csv").write_text(content)
    assert main(["plot", str(tmp_path)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# -- no stray warnings ---------------------------------------------------------------------------


def test_plot_of_a_drifting_eta_prints_no_numpy_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    # An lr drop at fixed momentum: the natural SPA eta grows by 1/0.9 a step up to ~1e308 (Figure 1a).
    # matplotlib's log axis overflowed computing its limits and ticks (numpy "overflow encountered in exp").
    argv = ["convert", "--lr", "0.1", "--momentum", "0.9", "--milestones", "20", "--total-steps", "6700"]
    png = tmp_path / "drift.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*argv, "--plot", str(png), "--json", "--per-step"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["per_step"]["eta"][-1] > 1e300  # drifted, still finite
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_prefers_event_files_to_a_csv_in_the_same_directory(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_spa.plotting import read_run

    run = tmp_path / "version_0"
    _write_csv_run(run, [0, 1])  # both loggers pointed at one directory: one run, read once
    writer = SummaryWriter(str(run))
    for k in (0, 5):
        writer.add_scalar("spa/ratio", 2.0, k)
    writer.close()
    assert read_run(tmp_path)["spa/ratio"] == ([0, 5], [2.0, 2.0])


# -- issue 16 item 14: warm-up in SGD form, fractional epochs, options past the end ------------------


def test_sgdm_warmup_is_accepted_and_has_an_spa_form(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "--lr", "0.1", "--momentum", "0.9", "--warmup-steps", "10", "--total-steps", "50", "--per-step"]
    out = _json(capsys, argv)  # before: "`--warmup-steps` applies to SPA schedules (--eta/--c) only"
    lr = out["per_step"]["lr"]
    assert lr[:10] == pytest.approx([0.1 * (k + 1) / 10 for k in range(10)]) and lr[10:] == pytest.approx([0.1] * 40)
    assert out["no_spa_equivalent"] is None and "linear lr warm-up over 10 steps" in out["description"]
    eta, c = out["per_step"]["eta"], out["per_step"]["c"]
    assert all(0.0 < ck <= 1.0 for ck in c)
    assert [ck * e for ck, e in zip(c, eta, strict=True)] == pytest.approx(lr, rel=1e-12)  # alpha_k = c_k eta_k
    beta = [(1 - c[k - 1]) * eta[k - 1] / eta[k] for k in range(1, 50)]  # Theorem 1, momentum kept at 0.9
    assert beta == pytest.approx([0.9] * 49, rel=1e-12)
    keras = _json(capsys, [*argv[:1], "--from", "keras", *argv[1:]])
    assert keras["per_step"]["keras_lr"] == pytest.approx(lr) and keras["per_step"]["c"] == pytest.approx([0.1] * 50)


def test_fractional_steps_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    spe = 1281167 / 8192  # ImageNet at batch 8192: 156.39... optimizer steps an epoch
    argv = ["convert", "--eta", "1", "--c", "0.1", "--milestones", "30", "60", "--unit", "epoch", "--mode", "lr"]
    out = _json(capsys, [*argv, "--steps-per-epoch", "156.4", "--epochs", "90"])  # before: a usage error (exit 2)
    assert out["total_steps"] == round(90 * 156.4) == 14076
    assert [f["step"] for f in out["momentum_ge_1"]] == [round(30 * 156.4), round(60 * 156.4)] == [4692, 9384]
    assert _json(capsys, [*argv, "--steps-per-epoch", repr(spe), "--epochs", "90"])["total_steps"] == round(90 * spe)
    for bad in ("0", "-1.5"):
        with pytest.raises(SystemExit) as usage:
            main([*argv, "--steps-per-epoch", bad])
        assert usage.value.code == EXIT_USAGE


EPOCHS_40_5 = ["--unit", "epoch", "--steps-per-epoch", "40.5", "--total-steps", "100"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eta", "1", "--c", "0.1", "--momentum-off", "100", "--total-steps", "100"], "`--momentum-off` 100 falls"),
        (["--eta", "1", "--c", "0.1", "--momentum-off", "3", *EPOCHS_40_5], "falls at step 122"),
        (["--eta", "1", "--c", "0.1", "--warmup-steps", "150", "--total-steps", "100"], "`--warmup-steps` 150"),
        (["--eta", "1", "--c", "0.1", "--bounded"], "`--bounded` chooses"),
        (["--eta", "1", "--c", "0.1", "--from", "keras"], "takes no `--from`"),
        (["--from", "keras", "--lr", "0.1", "--momentum", "0.9", "--bounded"], "a Keras schedule has one"),
        (["--from", "keras", "--lr", "0.1", "--momentum", "1.0"], "Keras' momentum must be in [0, 1)"),
    ],
)
def test_options_past_the_end_or_without_effect_are_refused(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["convert", *extra]) == EXIT_INVALID  # before: --momentum-off past the end was silently ignored
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
