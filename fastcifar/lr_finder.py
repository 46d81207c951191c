"""LR range test: `python -m fastcifar.find_lr [--preset NAME] [--lr_finder.FIELD V ...] [config flags]`.

Step-wise (default, Smith 2015): starting from the untrained network, the LR grows every optimizer step
from `start_lr` to `end_lr` (geometrically, or linearly), on the real training pipeline (same model,
augmentation, precision, batch size). The loss is smoothed with a bias-corrected exponential moving
average, and the test stops once the smoothed loss exceeds `diverge_factor` times the best seen.

Suggestion rule (documented in README, recorded in the JSON):
- max_lr = the LR at the minimum of the smoothed loss: the largest LR at which the loss still falls
  (Smith's upper bound), beyond which it climbs. The one-cycle warm-up approaches it gradually.
- min_lr = max_lr / min_lr_divisor (10 by default): Smith's one-cycle lower bound ("1/10 of the
  maximum"), which is also where the schedule starts and, with no annihilation, where it ends.
The LR of steepest descent is recorded too, for information. It is not the rule: on this network it
falls in the first steps, where the loss drops from its large initial value whatever the LR (the
network's logits start large; measured on the real data, see benchmarks/results/find_lr-real).

Epoch-wise (`--lr_finder.method epochs`, the seed's finder): for each LR of `--lr_finder.sweep` (by default
the seed's ten, 0.001 to 0.0181), one training epoch (or `sweep_images` images) at that constant LR from the
same untrained weights, at its own weight decay (`sweep_weight_decay`; the reference presets: the seed's 0.05).
Reports train loss and accuracy per LR. Suggestion: max_lr = the LR of the highest train accuracy (what the
seed's plot of accuracy against LR reads), min_lr = max_lr / min_lr_divisor. Where the LRs are the seed's, the
figure shows the seed's own output beside ours.

Both restore the model and optimizer afterwards: the test never leaves trained weights behind.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastcifar import rundir
from fastcifar.cli import TRAINING_SECTIONS, Parser, add_config_arguments, config_from_args
from fastcifar.config import Config, LRFinderConfig
from fastcifar.data import BatchLoader
from fastcifar.errors import FastCifarError, run_cli
from fastcifar.loop import Trainer, progress_bar, progress_enabled, restore, snapshot, train_step
from fastcifar.reporting import plot_range_test, plot_sweep, save_figure
from fastcifar.seed import seed_log
from fastcifar.session import Session
from fastcifar.training import run_epoch


def lr_at(step: int, cfg: LRFinderConfig) -> float:
    frac = step / (cfg.steps - 1)
    if cfg.mode == "exp":
        return cfg.start_lr * (cfg.end_lr / cfg.start_lr) ** frac
    return cfg.start_lr + (cfg.end_lr - cfg.start_lr) * frac


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # lr_scale: a group's multiplier (optim.bn_lr_scale)
        group["lr"] = group["initial_lr"] = lr * group.get("lr_scale", 1.0)  # initial_lr: a new scheduler's start


def range_test(trainer: Trainer, loader: BatchLoader, cfg: LRFinderConfig, progress: bool | None = None) -> dict:
    """Run the step-wise range test with `trainer`'s steps; returns the raw and smoothed curve and whether it
    diverged. Weights, statistics and optimizer state are put back afterwards."""
    model, optimizer = trainer.module, trainer.optimizer
    saved = snapshot(model, optimizer)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, best, diverged = 0.0, math.inf, False
    trainer.model.train()
    bar = progress_bar(cfg.steps, "LR range test", progress)
    try:
        for index in itertools.count():  # as many epochs as the steps need
            if len(lrs) >= cfg.steps or diverged:
                break
            with loader.epoch(index) as batches:
                for images, labels in batches:
                    lr = lr_at(len(lrs), cfg)
                    _set_lr(optimizer, lr)
                    loss, _ = train_step(trainer, images, labels)
                    value = loss.item()  # a host sync per step: fine for a test that plots every step
                    average = cfg.smoothing * average + (1 - cfg.smoothing) * value
                    smooth = average / (1 - cfg.smoothing ** (len(lrs) + 1))
                    lrs.append(lr)
                    losses.append(value)
                    smoothed.append(smooth)
                    bar.update(1)
                    if not math.isfinite(smooth) or smooth > cfg.diverge_factor * best:
                        diverged = True
                        break
                    best = min(best, smooth)
                    if len(lrs) == cfg.steps:
                        break
    finally:
        bar.close()
        restore(model, optimizer, saved)
    return {"lrs": lrs, "losses": losses, "smoothed": smoothed, "diverged": diverged}


def suggest(lrs: list[float], smoothed: list[float], min_lr_divisor: float) -> dict:
    """The suggestion rule of the module docstring, applied to a (smoothed) curve."""
    lr = np.asarray(lrs, dtype=np.float64)
    loss = np.asarray(smoothed, dtype=np.float64)
    finite = np.isfinite(loss)
    lr, loss = lr[finite], loss[finite]
    if len(lr) < 3:
        raise FastCifarError("the range test produced fewer than 3 usable points; lower lr_finder.start_lr")
    i_min = int(np.argmin(loss))
    if i_min < 2:
        raise FastCifarError(f"the loss never fell (lowest at {lr[i_min]:.3g}, the start); lower lr_finder.start_lr")
    slope = np.gradient(loss[: i_min + 1], np.log(lr[: i_min + 1]))
    max_lr = float(lr[i_min])
    return {
        "max_lr": max_lr,
        "min_lr": max_lr / min_lr_divisor,
        "min_loss_lr": max_lr,
        "steepest_lr": float(lr[int(np.argmin(slope))]),
        "rule": f"max_lr = LR at the minimum of the smoothed loss; min_lr = max_lr / {min_lr_divisor:g}",
    }


def sweep(trainer: Trainer, loader: BatchLoader, lrs: tuple[float, ...],
          log: Callable[[str], None] = print) -> list[dict]:
    """One training epoch (training's `run_epoch`, at a constant LR, no weight averages) per LR, each from the
    same starting weights; train loss and accuracy per LR. The weights are put back afterwards."""
    model, optimizer = trainer.module, trainer.optimizer
    saved = snapshot(model, optimizer)
    rows = []
    try:
        for index, lr in enumerate(lrs):
            restore(model, optimizer, saved)
            _set_lr(optimizer, lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            constant = dataclasses.replace(trainer, scheduler=schedule, ema=None, lookahead=None,
                                           lr_at=lambda _, lr=lr: lr)
            row = run_epoch(constant, loader, index + 1, len(lrs))  # LR i: the loader's epoch i order
            rows.append({"lr": lr, "train_loss": row["train_loss"], "train_acc": row["train_acc"],
                         "images": loader.images, "seconds": row["train_s"]})
            log(f"lr {lr:<8g} train loss {row['train_loss']:.4f}  train acc {row['train_acc']:.2%}")
    finally:
        restore(model, optimizer, saved)
    return rows


def suggest_from_sweep(rows: list[dict], min_lr_divisor: float) -> dict:
    """The epoch-wise suggestion: the LR whose epoch reached the highest train accuracy."""
    best = max(rows, key=lambda row: row["train_acc"])
    return {"max_lr": best["lr"], "min_lr": best["lr"] / min_lr_divisor, "best_train_acc": best["train_acc"],
            "rule": f"max_lr = LR of the highest train accuracy after one epoch; min_lr = max_lr / {min_lr_divisor:g}"}


FINDER_FILES = ("find_lr.json", "find_lr.png", "lr_sweep.json", "lr_sweep.png")


def find_lr(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Run the range test (or the epoch-wise sweep) that `cfg.lr_finder` describes; writes JSON + PNG
    into the run directory and returns what it wrote."""
    f = cfg.lr_finder
    epochs = f.method == "epochs"
    if epochs and not f.sweep:  # before any data is read
        raise FastCifarError("--lr_finder.method epochs needs LRs: give --lr_finder.sweep LR,LR,...")
    if epochs and f.sweep_images:
        cfg = cfg.override({"data.train_subset": f.sweep_images})
    if epochs and f.sweep_weight_decay >= 0:
        cfg = cfg.override({"optim.weight_decay": f.sweep_weight_decay})
    earlier = [name for name in FINDER_FILES if (Path(cfg.run.out_dir) / cfg.run.name / name).exists()]
    if earlier and cfg.run.name and not cfg.run.overwrite:  # as train refuses a finished run's folder
        raise FastCifarError(f"{Path(cfg.run.out_dir) / cfg.run.name} already holds an LR test ({earlier[0]}); choose "
                             f"another --name or pass --overwrite")
    session = Session.open(cfg, log)
    trainer, train = session.trainer, session.loaders.train
    out = session.run_dir
    common = {"batch_size": cfg.data.batch_size, "config": cfg.to_dict(), "env": session.env}
    if epochs:
        rows = sweep(trainer, train, f.sweep, log)
        suggestion = suggest_from_sweep(rows, f.min_lr_divisor)
        seed_rows = seed_log()["lr_finder"]["rows"]
        same_grid = [round(r["lr"], 6) for r in seed_rows] == [round(lr, 6) for lr in f.sweep]
        result = {"sweep": rows, "suggestion": suggestion, "weight_decay": cfg.optim.weight_decay, **common}
        if same_grid:
            result["seed_sweep"] = seed_rows
        rundir.write_json(out / "lr_sweep.json", result)
        save_figure(plot_sweep(rows, seed_rows if same_grid else None), out / "lr_sweep.png")
        log(f"highest train accuracy {suggestion['best_train_acc']:.2%} at lr {suggestion['max_lr']:g} "
            f"(suggested max_lr; min_lr {suggestion['min_lr']:.4g})")
        log(f"wrote {out / 'lr_sweep.json'} and {out / 'lr_sweep.png'}")
        return result
    curve = range_test(trainer, train, f, progress=progress_enabled(cfg.run.progress))
    result = {**curve, "suggestion": suggest(curve["lrs"], curve["smoothed"], f.min_lr_divisor), **common}
    rundir.write_json(out / "find_lr.json", result)
    save_figure(plot_range_test(result), out / "find_lr.png")
    s = result["suggestion"]
    log(f"suggested max_lr {s['max_lr']:.4g}, min_lr {s['min_lr']:.4g} (minimum loss at {s['min_loss_lr']:.4g}; "
        f"{len(curve['lrs'])} steps{', stopped on divergence' if curve['diverged'] else ''})")
    log(f"wrote {out / 'find_lr.json'} and {out / 'find_lr.png'}; train with: "
        f"python -m fastcifar train --preset {cfg.preset} --lr-from {out / 'find_lr.json'}")  # the recipe it tested
    return result


def main(argv: list[str] | None = None, prog: str = "python -m fastcifar.find_lr") -> int:
    parser = Parser(prog=prog, description=__doc__.split("\n")[0])
    add_config_arguments(parser, (*TRAINING_SECTIONS, "lr_finder"))
    args = parser.parse_args(argv)

    def run() -> None:
        cfg = config_from_args(args)
        if not cfg.run.name:
            cfg = cfg.override({"run.name": f"find_lr-{time.strftime('%Y%m%d-%H%M%S')}"})
        find_lr(cfg)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
