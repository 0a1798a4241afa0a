"""The YAML files shipped in examples/: both LightningCLI modes, parsed and fitted on tiny runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_spa import SPA, GroupedSPA

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = EXAMPLES / "configs"
sys.path.insert(0, str(EXAMPLES))

import digits_cli  # noqa: E402
import vision_cli  # noqa: E402

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# the configs' milestone (epoch 10) is beyond a tiny run: GradualSchedule says so
BEYOND = r"milestone at optimizer step \d+ is beyond this run's (\d+) steps?; it will not be reached"


def _tiny(tmp_path: Path) -> list[str]:
    return [
        *QUIET,
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip


def _groups(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, dict]:
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_automatic_mode_spa_yaml(tmp_path: Path) -> None:
    cli = digits_cli.cli_main(["--config", str(CONFIGS / "digits_spa.yaml"), *_tiny(tmp_path)], run=False)
    opt = cli.model.configure_optimizers()
    assert type(opt) is SPA
    assert [(g["lr"], g["c"], g["weight_decay"]) for g in opt.param_groups] == [(1.0, 0.1, 1e-4)]
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "GradualSchedule" in names and "MomentumDiagnostics" in names


def test_automatic_mode_fits(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=BEYOND):
        cli = digits_cli.cli_main(["fit", "--config", str(CONFIGS / "digits_spa.yaml"), *_tiny(tmp_path)])
    assert cli.trainer.global_step == 3
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, SPA) and opt.param_groups[0]["c"] == pytest.approx(0.1)  # milestone at epoch 10
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0


def test_dependency_injection_grouped_yaml(tmp_path: Path) -> None:
    cli = digits_cli.cli_main(["--config", str(CONFIGS / "digits_grouped.yaml"), *_tiny(tmp_path)], run=False)
    opt = cli.model.configure_optimizers()
    assert isinstance(opt, GroupedSPA)
    groups = _groups(opt, cli.model)
    for name, g in groups.items():
        head = name.startswith("net.8.")
        assert g["lr"] == pytest.approx(1.0 * (2.0 if head else 1.0))  # lr 0.1, momentum 0.9 -> eta 1.0
        assert g["c"] == pytest.approx(0.1)
        decayed = name in ("net.0.weight", "net.3.weight", "net.8.weight")  # conv and linear weights only
        assert g["weight_decay"] == (1e-4 if decayed else 0.0), name
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert {"GradualSchedule", "MomentumOff", "MomentumDiagnostics"} <= set(names)


def test_dependency_injection_fits(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=BEYOND):
        cli = digits_cli.cli_main(["fit", "--config", str(CONFIGS / "digits_grouped.yaml"), *_tiny(tmp_path)])
    assert cli.trainer.global_step == 3
    assert isinstance(cli.trainer.optimizers[0], GroupedSPA)


def test_torch_sgd_yaml_fits(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=BEYOND):
        cli = digits_cli.cli_main(["fit", "--config", str(CONFIGS / "digits_sgd.yaml"), *_tiny(tmp_path)])
    opt = cli.trainer.optimizers[0]
    assert type(opt) is torch.optim.SGD
    # GradualSchedule writes the Theorem-1 values of step 3 (no milestone yet): lr 0.1, momentum 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and opt.param_groups[0]["momentum"] == pytest.approx(0.9)


def test_class_switch_carries_init_args_over(tmp_path: Path) -> None:
    """The LightningCLI behaviour the docs warn about: init_args of the previous class are kept."""
    base = ["--config", str(CONFIGS / "digits_spa.yaml"), *_tiny(tmp_path)]
    # SPA's eta (lr 1.0) silently becomes torch SGD's lr: 10x the usual 0.1.
    cli = digits_cli.cli_main([*base, "--optimizer", "torch.optim.SGD", "--optimizer.momentum", "0.9"], run=False)
    assert cli.model.configure_optimizers().param_groups[0]["lr"] == 1.0
    # GroupedSPA refuses the mix of SPA's carried-over c with a new momentum, naming both, when the
    # CLI builds it (automatic mode instantiates the optimizer up front, before any training step).
    switch = ["--optimizer", "lightning_spa.GroupedSPA", "--optimizer.lr", "0.1", "--optimizer.momentum", "0.9"]
    with pytest.raises(ValueError, match=r"not both: got lr=0.1, momentum=0.9, eta=None, c=0.1"):
        digits_cli.cli_main([*base, *switch], run=False)


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("cifar10_preact_resnet.yaml", []),
        ("imagenet_resnet50.yaml", ["--data.init_args.image_size", "64", "--trainer.precision", "32-true"]),
    ],
)
def test_vision_configs_parse_and_step_on_fake_data(tmp_path: Path, config: str, extra: list[str]) -> None:
    args = [
        "fit", "--config", str(CONFIGS / config), *QUIET,
        "--data.init_args.fake_data", "true",
        "--data.init_args.fake_size", "2",
        "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.strategy", "auto",
        "--trainer.max_epochs", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        *extra,
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=BEYOND):
        cli = vision_cli.cli_main(args)
    assert cli.trainer.global_step == 1
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, GroupedSPA)
    assert {(g["lr"], g["c"], g["weight_decay"]) for g in opt.param_groups} == {(1.0, 0.1, 1e-4)}
    assert "val/acc" in cli.trainer.callback_metrics


def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str], package: ModuleType) -> None:
    """`make demo` shortened, under each Lightning package (`--lightning` picks lightning.pytorch)."""
    import demo

    from lightning_spa.cli import main as spa_cli

    pytest.importorskip("matplotlib")
    args = ["--epochs", "2", "--limit-train-batches", "22", "--save-dir", str(tmp_path), "--no-progress-bar"]
    out = demo.main([*args, "--lightning"] if package.__name__ == "lightning.pytorch" else args)
    text = capsys.readouterr().out
    assert f"{package.__name__} Trainer" in text
    log_dir = Path(str(out["log_dir"]))
    assert f"tensorboard --logdir {tmp_path / 'demo'}" in text
    assert "final validation accuracy" in text
    scalars = demo.read_scalars(log_dir)
    steps, ratio = scalars["spa/ratio"]
    assert steps == list(range(44)) and all(r > 0 for r in ratio)
    assert ratio[0] == pytest.approx(0.1 * (2 - 0.1), rel=1e-4)  # no momentum yet at the first step: c(2-c)
    # milestone at epoch 1 = step 22, geometric over one epoch (22 steps, the smallest safe length for c = 0.1):
    # step 22 + j uses eta 0.1**((j+1)/22) and c 0.1 * 10**((j+1)/22), so lr = c * eta stays 0.1
    eta, c, lr = (scalars[t][1] for t in ("spa/eta", "spa/c", "spa/lr"))
    assert eta[21] == pytest.approx(1.0) and eta[22] == pytest.approx(0.1 ** (1 / 22), rel=1e-5)
    assert eta[43] == pytest.approx(0.1, rel=1e-5) and c[43] == pytest.approx(1.0)
    assert all(v == pytest.approx(0.1, rel=1e-5) for v in lr)
    assert Path(str(out["summary"])).read_bytes()[:4] == b"\x89PNG"
    png = tmp_path / "diag.png"
    assert spa_cli(["plot", str(log_dir), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the README's pictures from this run (examples/readme_images.py; the reproduction figure is downscaled)
    import readme_images

    for path in readme_images.main(["--demo-log-dir", str(log_dir), "--out", str(tmp_path / "images")]):
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 200_000
    capsys.readouterr()


@pytest.mark.parametrize(
    ("script", "args", "rows", "warns"),
    [
        ("figure2", ["--epochs", "1", "--seeds", "1", "--etas", "1.0"], 7, []),
        # the instant arms warn on purpose: what the paper's figures show
        ("figure3", ["--epochs", "4", "--seeds", "1"], 4, [r"MomentumOff\(transition_steps=0\) switches momentum off"]),
        (
            "figure4",
            ["--seeds", "1", "--milestone-epoch", "1", "--before", "2", "--after", "3"],
            2,
            [r"GradualSchedule\(transition='instant'\)", r"eta fell to 0.1 in one step"],
        ),
    ],
)
def test_reproduction_scripts_smoke(tmp_path: Path, script: str, args: list[str], rows: int, warns: list[str]) -> None:
    """Shortened runs of examples/reproduce/*.py: a PNG and a markdown table with one row per case."""
    pytest.importorskip("matplotlib")
    import contextlib
    import importlib

    sys.path.insert(0, str(EXAMPLES / "reproduce"))
    with contextlib.ExitStack() as expected:
        for message in warns:
            expected.enter_context(pytest.warns(UserWarning, match=message))
        table = importlib.import_module(script).main([*args, "--out", str(tmp_path)])
    assert (tmp_path / f"{script}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / f"{script}.md").read_text() == table
    assert sum(line.startswith("| ") for line in table.splitlines()) == rows + 1  # + header


# -- no Lightning warning on a plain run of the app (issue 17, point 7) ----------------------------


def _warnings_shown(caught: list[warnings.WarningMessage]) -> list[str]:
    # jsonargparse's deprecation warnings are raised by Lightning's own cli.py (third party) and hidden by
    # Python's default filters; every other warning reaches the user.
    return [str(w.message) for w in caught if w.category.__name__ != "JsonargparseDeprecationWarning"]


@pytest.mark.parametrize(
    ("config", "optimizer", "model"),
    [
        ("digits_spa.yaml", SPA, "DigitsClassifier"),  # automatic mode: the model has no configure_optimizers
        ("digits_sgd.yaml", torch.optim.SGD, "DigitsClassifier"),
        ("digits_grouped.yaml", GroupedSPA, "DigitsModel"),  # dependency injection: the model's own
        (None, SPA, "DigitsClassifier"),  # no optimizer given: the app's default, SPA eta 1, c 0.1
    ],
)
def test_app_builds_without_warning(
    package: ModuleType, monkeypatch: pytest.MonkeyPatch, config: str | None, optimizer: type, model: str
) -> None:
    """Lightning warned on every run: "args ... and command line arguments" (cli_main passes `args` while
    sys.argv has the script's own), and in automatic mode "`DigitsModel.configure_optimizers` will be overridden"."""
    argv = ["digits_cli.py", "--lightning", "fit", "--config", "x.yaml"]  # a script's own command line
    monkeypatch.setattr(sys, "argv", argv)
    args = [*QUIET, *(["--config", str(CONFIGS / config)] if config else [])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = digits_cli.cli_main(args, run=False, package=package.__name__)
        opt = cli.model.configure_optimizers()
    assert _warnings_shown(caught) == []
    assert sys.argv is argv and sys.argv == ["digits_cli.py", "--lightning", "fit", "--config", "x.yaml"]
    assert type(cli.model).__name__ == model and isinstance(cli.trainer, package.Trainer)
    assert type(opt) is optimizer
    if config is None:
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["c"]) == (1.0, 0.1)


def test_plain_script_run_prints_no_warning(package: ModuleType, tmp_path: Path) -> None:
    """`python examples/digits_cli.py [--lightning] fit --config examples/configs/digits_spa.yaml`, shortened: the
    only warning left is GradualSchedule's about the shortening (the config's milestone is at epoch 10)."""
    lightning = ["--lightning"] if package.__name__ == "lightning.pytorch" else []
    command = [
        sys.executable,
        # torch's deprecation of LeafSpec, raised inside Lightning's own _pytree.py on every fit (third party)
        "-W", "ignore:`isinstance(treespec, LeafSpec)`:FutureWarning",
        str(EXAMPLES / "digits_cli.py"), *lightning, "fit", "--config", str(CONFIGS / "digits_spa.yaml"),
        *_tiny(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    # both Python's warning format and Lightning's start "<file>.py:<line>: "
    shown = [line for line in done.stderr.splitlines() if re.match(r"\S+\.py:\d+: ", line)]
    assert len(shown) == 1 and re.search(BEYOND, shown[0]), done.stderr
    assert "Trainer.fit` stopped: `max_epochs=1` reached" in done.stderr
    assert any((tmp_path / "digits_spa").rglob("events.out.tfevents.*"))


def test_readme_pictures_are_committed_and_small() -> None:
    """The README embeds PNGs by paths valid on a fresh clone, each well under 200 kB (issue 17, point 9)."""
    root = EXAMPLES.parent
    readme = (root / "README.md").read_text()
    paths = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme)
    assert len(paths) >= 2 and {"docs/images/demo_summary.png", "docs/images/figure3.png"} <= set(paths)
    assert readme.index(paths[0]) < readme.index("**What it is.**")  # near the top, after make demo / make test
    first = [line.strip() for line in readme.splitlines() if line.strip() and not line.startswith("# ")][:2]
    assert first[0].startswith("make demo") and first[1].startswith("make test")  # still the first thing
    for path in paths:
        png = root / path
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        assert png.stat().st_size < 150_000, path
