"""Reports of a training run: `python -m fastcifar.report RUN_DIR` (also written at the end of training).

Reads only the run directory (config.json, metrics.jsonl, results.json, predictions.npz) and writes:
    curves.png          loss and accuracy per epoch, train and test
    lr_schedule.png     LR (and momentum) per optimizer step, peak marked
    misclassified.png   a grid of misclassified test images: true class, predicted class, confidence
    confusion.png       confusion matrix and per-class accuracy
    summary.md          final/best accuracy, time, images/s, per-class accuracy, config
Each figure function returns a matplotlib Figure, so a notebook can display it inline.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# No backend is forced: without a display matplotlib falls back to Agg by itself, and notebooks keep theirs.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from fastcifar import rundir
from fastcifar.cli import Parser, path_arg
from fastcifar.config import Config, read_config_file
from fastcifar.errors import FastCifarError, run_cli
from fastcifar.inference import CLASSES, Predictions
from fastcifar.runfiles import read_env, read_metrics, read_results
from fastcifar.schedule import one_cycle_lr

FILES = ("curves.png", "lr_schedule.png", "misclassified.png", "confusion.png", "summary.md")


def test_method(cfg: Config) -> str:
    """How a run's test numbers are measured when not plainly ("flip TTA", "EMA weights", both, or ""): every
    printed test accuracy says so, since these change the number without changing training."""
    shift = [f"+-{cfg.data.test_translate} px translation TTA"] if cfg.data.test_translate else []
    return ", ".join((["flip TTA"] if cfg.data.test_flip else []) + shift
                     + (["EMA weights"] if cfg.optim.ema_decay else []))


def loss_name(cfg: Config) -> str:
    """What the logged losses are: with label smoothing they are not plain cross-entropy."""
    smoothing = cfg.optim.label_smoothing
    return f"cross-entropy loss (label smoothing {smoothing:g})" if smoothing else "cross-entropy loss"


def curve_labels(cfg: Config) -> tuple[str, str]:
    """plot_curves's loss axis label and test series label for a run with config `cfg`."""
    method = test_method(cfg)
    return loss_name(cfg), f"test ({method})" if method else "test"


def tested_epochs(metrics: list[dict]) -> list[dict]:
    """The epochs that ended with a test pass (all of them unless run.test_every was > 1 or 0)."""
    return [m for m in metrics if m["test_acc"] is not None]


def series(metrics: list[dict], key: str, scale: float = 1.0) -> list[float]:
    """One field of every row, scaled; a number a row does not hold (None: not measured, or a row of another
    version) is a gap in the line, not an error."""
    return [math.nan if m.get(key) is None else scale * m[key] for m in metrics]


def plot_curves(metrics: list[dict], loss_label: str = "cross-entropy loss", test_label: str = "test") -> Figure:
    epochs = [m["epoch"] for m in metrics]
    tested = tested_epochs(metrics)  # every epoch, unless run.test_every skipped some test passes
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(epochs, series(metrics, "train_loss"), "o-", label="train")
    loss_ax.plot([m["epoch"] for m in tested], series(tested, "test_loss"), "s-", label=test_label)
    loss_ax.set(xlabel="epoch", ylabel=loss_label, title="Loss")
    acc_ax.plot(epochs, series(metrics, "train_acc", 100), "o-", label="train (augmented)")
    acc_ax.plot([m["epoch"] for m in tested], series(tested, "test_acc", 100), "s-", label=test_label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs if len(epochs) <= 30 else ax.get_xticks())
    fig.tight_layout()
    return fig


def plot_schedule(cfg: Config, steps_per_epoch: int) -> Figure:
    s = cfg.schedule
    steps = np.arange(s.epochs * steps_per_epoch)
    lrs = one_cycle_lr(steps, steps_per_epoch, s.epochs, s.peak_epoch, s.min_lr, s.max_lr, s.end_lr)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(steps, lrs, color="C0", label="learning rate")
    peak = int(np.argmax(lrs))
    ax.annotate(f"peak {s.max_lr:g} at step {peak} (end of epoch {s.peak_epoch:g})", (peak, lrs[peak]),
                xytext=(12, -40), textcoords="offset points", fontsize=8)
    ax.axvline(peak, color="C3", ls=":", lw=1)
    ax.set(xlabel=f"optimizer step ({steps_per_epoch} per epoch)", ylabel="learning rate",
           title=f"One-cycle schedule: {s.min_lr:g} -> {s.max_lr:g} -> {s.min_lr:g} (no annihilation)")
    momentum = ax.twinx()
    momentum.plot(steps, np.full(len(steps), cfg.optim.momentum), color="C1", ls="--", label="momentum")
    momentum.set_ylabel("momentum (constant)")
    momentum.set_ylim(0, 1)
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88), fontsize=8)
    fig.tight_layout()
    return fig


def plot_misclassified(preds: Predictions, classes: tuple[str, ...] = CLASSES, count: int = 24) -> Figure:
    """The first `count` misclassified test images, each under its true and predicted class.

    One axes shows them all as a mosaic: an axes per image made this the slowest figure of every run's report
    (`python -m fastcifar.report RUN`, imports included: 3.4 s before, 3.0 s after, medians of 5 on the 2-core
    EPYC, 2026-12-05), and the test suite writes ~60 reports."""
    count = min(count, len(preds.wrong_index))
    cols = 6
    rows = max(1, -(-count // cols))
    size, gap, title = 32, 6, 12  # pixels: an image, the space beside it, its two title lines
    width, height = size + gap, size + gap + title
    mosaic = np.full((rows * height, cols * width, 3), 255, dtype=np.uint8)
    inch = 0.045  # per mosaic pixel: an image 1.4 in wide, as before
    fig = plt.figure(figsize=(cols * width * inch, rows * height * inch + 0.4))
    ax = fig.add_axes((0.0, 0.0, 1.0, rows * height * inch / (rows * height * inch + 0.4)))
    for k, (image, index) in enumerate(zip(preds.wrong_images[:count], preds.wrong_index[:count], strict=False)):
        top, left = (k // cols) * height + title + gap // 2, (k % cols) * width + gap // 2
        mosaic[top:top + size, left:left + size] = image
        p = preds.probs[index]
        ax.text(left + size / 2 - 0.5, top - 1.5, f"true {classes[preds.labels[index]]}\npred {classes[p.argmax()]} "
                f"{p.max():.0%}", ha="center", va="bottom", fontsize=8)
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(f"Misclassified test images ({count} of {int((preds.predicted != preds.labels).sum())})")
    return fig


def plot_confusion(preds: Predictions, classes: tuple[str, ...] = CLASSES) -> Figure:
    matrix = preds.confusion(len(classes))
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > matrix.max() / 2 else "black")
    per_class = preds.per_class_accuracy(len(classes))
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} ({a:.1%})" for c, a in zip(classes, per_class, strict=True)])
    ax.set(xlabel="predicted class", ylabel="true class (per-class accuracy)",
           title=f"Confusion matrix: test accuracy {preds.accuracy:.2%}")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def plot_range_test(result: dict) -> Figure:
    """Loss against LR (log axis) of a range test, with the suggested bounds marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result["lrs"], result["losses"], color="0.75", lw=1, label="loss per step")
    ax.plot(result["lrs"], result["smoothed"], color="C0", lw=2, label="smoothed loss")
    s = result["suggestion"]
    ax.axvline(s["max_lr"], color="C3", ls="--", label=f"suggested max_lr = {s['max_lr']:.3g}")
    ax.axvline(s["min_lr"], color="C2", ls="--", label=f"suggested min_lr = {s['min_lr']:.3g}")
    ax.axvline(s["steepest_lr"], color="0.4", ls=":", label=f"steepest descent at {s['steepest_lr']:.3g}")
    ax.set_xscale("log")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    ax.set_ylim(min(finite) * 0.9, min(max(finite), 3 * finite[0]) * 1.05)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss",
           title=f"LR range test: {len(result['lrs'])} steps, batch {result['batch_size']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(rows: list[dict], seed_rows: list[dict] | None = None) -> Figure:
    """Train loss and accuracy after one epoch at each LR of an epoch-wise sweep; `seed_rows` (LR, train
    accuracy), when given, adds the seed's own finder output on the same LRs."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lrs = [r["lr"] for r in rows]
    ax.plot(lrs, [r["train_loss"] for r in rows], "o-", color="C0", label="train loss")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (one epoch each, log scale)", ylabel="train loss",
           title=f"Epoch-wise LR sweep ({rows[0]['images']:,} images per LR)")
    acc = ax.twinx()
    acc.plot(lrs, [100 * r["train_acc"] for r in rows], "s--", color="C1", label="train accuracy")
    if seed_rows:
        acc.plot([r["lr"] for r in seed_rows], [100 * r["train_acc"] for r in seed_rows], "^:", color="black",
                 label="the seed's finder: train accuracy (original CIFAR-10)")
    acc.set_ylabel("train accuracy (%)")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88), fontsize=8)
    fig.tight_layout()
    return fig


def load_history(run_dir: str | Path) -> tuple[Config, list[dict]]:
    """A run's config and per-epoch metrics; the run may be unfinished (metrics.jsonl grows epoch by epoch).
    Should an epoch appear twice (a run restarted over the same folder), its last record counts."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FastCifarError(f"{run_dir} is not a run directory (no config.json); pass folders written by "
                             f"python -m fastcifar train")
    # Each file through its checked reader: a broken one is an error that names it.
    cfg = read_config_file(run_dir / "config.json", "the run's config")
    # a run writes metrics.jsonl at the end of its first epoch
    metrics = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    by_epoch = {int(m["epoch"]): m for m in metrics}
    if not by_epoch:
        raise FastCifarError(f"{run_dir / 'metrics.jsonl'} holds no finished epoch yet (a run adds a row at the end "
                             f"of each epoch); compare it after its first epoch")
    return cfg, [by_epoch[e] for e in sorted(by_epoch)]


def run_label(name: str, cfg: Config) -> str:
    """'fast-24ep-cpu (fast, flip TTA)': a run's name, its preset and how its test numbers were measured."""
    return f"{name} ({', '.join([cfg.preset, *filter(None, [test_method(cfg)])])})"


def plot_comparison(runs: dict[str, list[dict]]) -> Figure:
    """Test accuracy of several runs (label -> metrics), per epoch and against hours spent in training passes
    (test passes excluded: they differ with TTA and say nothing about the recipe's speed)."""
    fig, (epoch_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, metrics) in enumerate(runs.items()):
        hours = np.cumsum(np.nan_to_num(series(metrics, "train_s"))) / 3600  # a row without its time adds none
        tested = [(m["epoch"], h, 100 * m["test_acc"]) for m, h in zip(metrics, hours, strict=True)
                  if m["test_acc"] is not None]
        if not tested:  # a run that tests only at the end, still training: nothing to draw yet
            continue
        epochs, hours, acc = zip(*tested, strict=True)
        epoch_ax.plot(epochs, acc, "o-", color=f"C{i}", label=label, markersize=3)
        time_ax.plot(hours, acc, "o-", color=f"C{i}", label=label, markersize=3)
    epoch_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy per epoch")
    time_ax.set(xlabel="hours in training passes", ylabel="test accuracy (%)", title="Test accuracy against time")
    for ax in (epoch_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def comparison_markdown(runs: dict[str, list[dict]], tta: dict[str, float] | None = None) -> str:
    """A table with one row per epoch and one test-accuracy column per run, then the hours in training passes;
    `tta` (label -> accuracy) adds a row for final weights re-tested with flip TTA (`evaluate --tta --save`)."""
    labels = list(runs)
    by_epoch = [{m["epoch"]: m for m in metrics} for metrics in runs.values()]
    epochs = sorted(set().union(*by_epoch))
    lines = ["| epoch | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for epoch in epochs:
        cells = [f"{100 * r[epoch]['test_acc']:.2f}%" if epoch in r and r[epoch]["test_acc"] is not None else ""
                 for r in by_epoch]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    if tta:
        lines.append("| final weights, flip TTA | " + " | ".join(
            f"{100 * tta[label]:.2f}%" if label in tta else "" for label in labels) + " |")
    hours = [f"{sum(m['train_s'] for m in metrics) / 3600:.2f}" if all(m["train_s"] is not None for m in metrics)
             else "-" for metrics in runs.values()]  # "-": a row of another version did not record its time
    lines.append("| hours in training passes | " + " | ".join(hours) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(cfg: Config, results: dict, preds: Predictions | None, env: dict) -> str:
    lines = [
        f"# Run summary: {cfg.preset} preset, {results['epochs']} epochs",
        "",
        f"- final test accuracy: **{results['final_test_acc']:.2%}** (best {results['best_test_acc']:.2%}"
        + (f"; tested with {method})" if (method := test_method(cfg)) else ")"),
        f"- training time: {results['train_seconds']:.0f} s in training passes, {results['total_seconds']:.0f} s "
        f"with test passes, plus {results['compile_seconds']:.0f} s compile warm-up",
        f"- mean training throughput: {results['mean_train_img_s']:.0f} images/s",
        f"- device: {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
        f"git {str(env.get('git_commit'))[:10]}",
    ]
    if preds is not None:
        lines += ["", "| class | accuracy |", "|---|---:|"]
        lines += [f"| {c} | {a:.2%} |" for c, a in zip(CLASSES, preds.per_class_accuracy(), strict=True)]
    lines += ["", "## Config", "", "```json", json.dumps(cfg.to_dict(), indent=2), "```", ""]
    return "\n".join(lines)


def save_figure(fig: Figure, path: Path) -> None:
    """Save atomically (a full disk leaves no truncated image) and close the figure."""
    try:
        rundir.atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:]))
    finally:
        plt.close(fig)


def write_report(run_dir: str | Path) -> list[Path]:
    """(Re)write all report files of `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise FastCifarError(f"{run_dir} is not a finished run directory (no results.json); pass a folder written by "
                             f"python -m fastcifar train")
    cfg = read_config_file(run_dir / "config.json", "the run's config")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    results = read_results(run_dir / "results.json")
    env = read_env(run_dir / "env.json")
    if not metrics:
        raise FastCifarError(f"{run_dir}/metrics.jsonl holds no rows: not a finished run; retrain or restore the file")
    preds_path = run_dir / "predictions.npz"
    preds = Predictions.load(preds_path) if preds_path.exists() else None
    written = []
    save_figure(plot_curves(metrics, *curve_labels(cfg)), run_dir / "curves.png")
    save_figure(plot_schedule(cfg, results["steps_per_epoch"]), run_dir / "lr_schedule.png")
    written += [run_dir / "curves.png", run_dir / "lr_schedule.png"]
    if preds is not None:
        save_figure(plot_misclassified(preds), run_dir / "misclassified.png")
        save_figure(plot_confusion(preds), run_dir / "confusion.png")
        written += [run_dir / "misclassified.png", run_dir / "confusion.png"]
    rundir.write_text(run_dir / "summary.md", summary_markdown(cfg, results, preds, env))
    return [*written, run_dir / "summary.md"]


def main(argv: list[str] | None = None, prog: str = "python -m fastcifar.report") -> int:
    parser = Parser(
        prog=prog,
        description="(Re)write a finished run's report from its run directory alone: curves.png, lr_schedule.png, "
                    "misclassified.png, confusion.png and summary.md.")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=path_arg, help="a run directory written by fastcifar.train")
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2, after argparse's one-line message)
        return int(done.code or 0)
    return run_cli(lambda: [print(f"wrote {path}") for path in write_report(args.run_dir)])

if __name__ == "__main__":
    sys.exit(main())
