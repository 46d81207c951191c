"""The seed's run, as data: the per-epoch log and the LR finder output of the notebook that this project
reproduces, and our runs put beside it, epoch by epoch.

`seed_log.json` (next to this file) holds the numbers as the seed's notebook printed them, with their source:
repository, path, commit and cells. `python -m fastcifar.compare --seed RUN_DIR ...` prints the table and, with
`--out`, draws the figure; the functions here return them for a notebook.

What "train accuracy" means is the same on both sides: the running accuracy over the epoch's augmented batches,
as the model was updated. The seed measured it on the original CIFAR-10 files and our runs on whatever data they
trained on (the rebuilt copy, here): say which when quoting a difference.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from statistics import mean

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

LOG_FILE = Path(__file__).with_name("seed_log.json")


@cache
def seed_log() -> dict:
    """The seed's log: {"source": ..., "fields": ..., "lr_finder": {"rows": [...]}, "epochs": [...]}."""
    return json.loads(LOG_FILE.read_text())


def _by_epoch(metrics: list[dict]) -> dict[int, dict]:
    return {int(m["epoch"]): m for m in metrics}


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def seed_comparison_markdown(runs: dict[str, list[dict]]) -> str:
    """One row per epoch: the seed's LR, train and test accuracy, then each run's (label -> metrics), then the
    runs' mean where there are several, and the difference of that mean from the seed's."""
    seed = _by_epoch(seed_log()["epochs"])
    ours = {label: _by_epoch(metrics) for label, metrics in runs.items()}
    several = len(ours) > 1
    head = ["epoch", "seed LR", "seed train %", "seed test %"]
    for label in ours:
        head += [f"{label} train %", f"{label} test %"]
    if several:
        head += ["mean train %", "mean test %"]
    head += ["train - seed (pt)", "test - seed (pt)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for epoch in sorted(seed.keys() | set().union(*ours.values())):
        s = seed.get(epoch, {})
        cells = [str(epoch), f"{s['lr']:.5f}" if s else "", _pct(s.get("train_acc")), _pct(s.get("test_acc"))]
        trains, tests = [], []
        for run in ours.values():
            m = run.get(epoch, {})
            train, test = m.get("train_acc"), m.get("test_acc")
            cells += [_pct(train), _pct(test)]
            trains += [train] if train is not None else []
            tests += [test] if test is not None else []
        # a mean only over all runs: an unfinished run must not shift it epoch by epoch
        train_mean = mean(trains) if len(trains) == len(ours) else None
        test_mean = mean(tests) if len(tests) == len(ours) else None
        if several:
            cells += [_pct(train_mean), _pct(test_mean)]
        cells += [_difference(train_mean, s.get("train_acc")), _difference(test_mean, s.get("test_acc"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _difference(ours: float | None, seed: float | None) -> str:
    return "" if ours is None or seed is None else f"{100 * (ours - seed):+.2f}"


def plot_seed_comparison(runs: dict[str, list[dict]]) -> Figure:
    """Train and test accuracy per epoch: the seed's log (black) and each run (label -> metrics)."""
    seed = seed_log()["epochs"]
    fig, (train_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in ((train_ax, "train_acc"), (test_ax, "test_acc")):
        ax.plot([s["epoch"] for s in seed], [100 * s[key] for s in seed], "s-", color="black", markersize=3,
                label="seed's log (original CIFAR-10)")
        for i, (label, metrics) in enumerate(runs.items()):
            points = [(m["epoch"], 100 * m[key]) for m in metrics if m.get(key) is not None]
            if points:
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, "o-", color=f"C{i}", markersize=3, label=label)
        ax.set(xlabel="epoch", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    train_ax.set_title("Train accuracy (augmented batches, running)")
    test_ax.set_title("Test accuracy (no TTA)")
    fig.tight_layout()
    return fig
