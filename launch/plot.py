"""Plot loss curves from metrics.jsonl files.

    python launch/plot.py OUT.png RUN_DIR_OR_METRICS[=LABEL] ...

Each input is a run directory (its metrics.jsonl is read) or a metrics file; the
label defaults to the directory name. Solid lines: training loss; markers: validation loss.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

__all__ = ["read_metrics", "plot_runs"]


def read_metrics(path: str) -> List[Dict]:
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(out_png: str, runs: Sequence[Tuple[str, List[Dict]]], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (label, rows) in enumerate(runs):
        color = f"C{i}"
        tr = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, lw=1.2, label=f"{label} train")
        if va:
            ax.plot(*zip(*va), color=color, ls="--", marker="o", ms=3.5, lw=1, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    runs = []
    for spec in argv[1:]:
        path, _, label = spec.partition("=")
        label = label or os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
        runs.append((label, read_metrics(path)))
    plot_runs(argv[0], runs)
    print(f"plot: {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
