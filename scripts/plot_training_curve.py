"""Plot a training log (scripts/train.py's log.csv) as train and eval loss against tokens seen.

    python -m scripts.plot_training_curve runs/demo/log.csv docs/demo_training_curve.png

Needs matplotlib (not a dependency of the package; the test extra has it).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot(rows: list[dict], png: Path, title: str = "demo model training") -> Path:
    """rows: log rows with ``tokens``, ``train_loss`` and (some) ``eval_loss`` -> the PNG at ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(float(r["tokens"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] / 1e6 for p in pts], [p[1] / math.log(2) for p in pts]  # loss in bits per byte

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*series("train_loss"), label="train (batch mean)", lw=1)
    ax.plot(*series("eval_loss"), "o-", label="held-out", ms=3)
    ax.set_xlabel("tokens seen (millions of bytes)")
    ax.set_ylabel("loss (bits per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m scripts.plot_training_curve LOG.csv OUT.png", file=sys.stderr)
        return 2
    log = Path(argv[0])
    if not log.is_file():
        print(f"error: log file {log} does not exist", file=sys.stderr)
        return 2
    print(plot(read_log(log), Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
