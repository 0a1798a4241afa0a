"""Writes the README's pictures into ``docs/images/``: small PNGs (each well under 200 kB), committed.

- ``demo_summary.png``: the summary figure of ``make demo`` (``examples/demo.py``: loss, accuracy,
  ``spa/ratio``, ``eta``/``c`` over optimizer steps), drawn again from the run's logs at a lower dpi.
- ``figure3.png``: ``examples/reproduce/results/figure3.png`` (paper Figure 3 on digits, 5 seeds:
  ``python examples/reproduce/figure3.py --out examples/reproduce/results --seeds 5``), downscaled.

Usage::

    python examples/readme_images.py                                  # trains the demo first (as `make demo`)
    python examples/readme_images.py --demo-log-dir runs/demo/version_0   # a finished `make demo` run

Needs matplotlib (the ``examples`` extra) and nothing else: the downscaling is matplotlib's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
IMAGES = ROOT / "docs" / "images"
FIGURE3 = EXAMPLES / "reproduce" / "results" / "figure3.png"
sys.path.insert(0, str(EXAMPLES))

DEMO_DPI = 80  # the demo's figure is 11 x 7 inches: 880 x 560 pixels
FIGURE3_WIDTH = 900  # pixels; the reproduction's figure is 1440 wide


def downscale(src: Path, out: Path, width: int) -> Path:
    """Writes ``src`` (a PNG) at ``width`` pixels wide (aspect kept) to ``out``, resampled by matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    image = imread(src)
    height, src_width = image.shape[:2]
    dpi = 100
    fig = Figure(figsize=(width / dpi, width * height / src_width / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(image[..., :3], interpolation="antialiased")  # RGB: the figures are opaque
    ax.set_axis_off()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, pil_kwargs={"optimize": True})
    return out


def main(argv: list[str] | None = None) -> list[Path]:
    """Writes both pictures; returns their paths."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-log-dir", type=Path, help="log directory of a finished `make demo` run")
    parser.add_argument("--out", type=Path, default=IMAGES, help="folder to write into (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import demo

    log_dir = args.demo_log_dir
    if log_dir is None:
        runs = tempfile.mkdtemp(prefix="lightning_spa_demo_")  # the logs are not part of the pictures
        log_dir = Path(str(demo.main(["--no-progress-bar", "--save-dir", runs])["log_dir"]))
    title = "make demo: SPA eta 1, c 0.1 on the bundled digits; eta 10x down and c 10x up from epoch 10"
    written = [
        demo.plot_summary(log_dir, args.out / "demo_summary.png", title=title, dpi=DEMO_DPI),
        downscale(FIGURE3, args.out / "figure3.png", FIGURE3_WIDTH),
    ]
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1000:.0f} kB)")
    return written


if __name__ == "__main__":
    main()
