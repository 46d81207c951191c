"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

RUN_DIR/checkpoint.pt holds model, optimizer, LR scheduler, GradScaler, the position in the run (epochs
done, and steps done in an unfinished epoch with its running loss/accuracy sums), every random number
generator (torch, CUDA, numpy, Python, the augmentation generator), the config and the metrics so far.
It is written atomically (temp file + rename) and loaded with weights_only=True, so every value in it is
a tensor or a plain Python value (numpy's and Python's RNG states are converted).

The FFCV training order of epoch e depends only on (seed, e), so continuing epoch e at step k means
replaying the loader's epoch e and skipping its first k batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcifar.config import Config, ConfigError
from fastcifar.errors import FastCifarError
from fastcifar.rundir import load_checkpoint_file, save_checkpoint

CHECKPOINT = "checkpoint.pt"
KIND = "training-state"

# Settings that may differ between the interrupted run and its resumption: they change where files are
# and how fast it runs, not the numbers (compile changes float rounding on some devices, not the recipe).
RESUMABLE_CHANGES = {
    "data.data_dir", "data.num_workers", "data.test_batch_size", "run.progress", "run.threads", "run.out_dir",
    "run.name", "run.overwrite", "run.compile", "run.compile_mode", "run.conv_grad", "run.checkpoint_every",
    "run.test_every",
    "run.dist_timeout_s",
    "run.device",  # e.g. auto -> cpu; the resolved device type itself must match the checkpoint's (training.train)
}


@dataclass
class EpochProgress:
    """How far an unfinished training epoch got: enough to continue it and report it as if unbroken."""

    step: int = 0  # optimizer steps done in this epoch
    loss_sum: float = 0.0  # sum over images of the loss (float64 sums, as on the device)
    correct: int = 0
    images: int = 0
    seconds: float = 0.0  # training time spent in this epoch so far
    skipped: int = 0  # fp16 steps skipped by the GradScaler

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def rng_states(augment_generator: torch.Generator) -> dict[str, Any]:
    """Every generator's state, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "augment": augment_generator.get_state(),
    }


def set_rng_states(states: dict[str, Any], augment_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    augment_generator.set_state(states["augment"])


def save_training_state(path: Path, *, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                        augment_generator: torch.Generator, epochs_done: int, progress: EpochProgress | None,
                        metrics: list[dict], compile_seconds: float, ranks: list[dict] | None = None,
                        setup_seconds: float = 0.0, device: str = "",
                        ema: dict | None = None, lookahead: dict | None = None) -> None:
    """`ranks`: every rank's {"rng", "progress"} in a distributed run (each rank resumes its own stream);
    `ema`: the weight average's state (optim.ema_decay > 0); `lookahead`: its slow weights."""
    save_checkpoint(path, {
        "kind": KIND,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epochs_done,  # epochs finished, test pass included
        "progress": progress.to_dict() if progress else None,  # an unfinished epoch epochs_done + 1
        "metrics": metrics,
        "compile_seconds": compile_seconds,
        "setup_seconds": setup_seconds,
        "device": device,  # the device type it trained on: its generator states belong there
        "rng": rng_states(augment_generator),
        "world_size": len(ranks) if ranks else 1,
        "ranks": ranks if ranks and len(ranks) > 1 else None,
        "ema": ema,
        "lookahead": lookahead,
    })


def load_training_state(run_dir: str | Path) -> dict[str, Any]:
    """The training state saved in `run_dir`, checked; errors say why a run cannot be resumed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FastCifarError(f"--resume {run_dir}: no such run directory")
    if (run_dir / "results.json").exists():
        raise FastCifarError(f"{run_dir} holds a finished run; nothing to resume")
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FastCifarError(f"{run_dir} has no {CHECKPOINT} (the run stopped before writing one); start it again")
    state = load_checkpoint_file(path)
    if state.get("kind") != KIND:
        raise FastCifarError(f"{path} holds weights only, not a training state; it cannot be resumed")
    return state


def recipe_differences(saved: Config, requested: Config) -> list[str]:
    """Each setting outside RESUMABLE_CHANGES (and the LR finder's) that differs, as "key old -> new"."""
    old, new = _flat(saved), _flat(requested)
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in old
            if old[k] != new[k] and k not in RESUMABLE_CHANGES and not k.startswith("lr_finder.")]


# What `--resume RUN --lower-lr` may change: the LR levels (to lower values), nothing else of the recipe.
LR_LEVELS = ("schedule.max_lr", "schedule.min_lr", "schedule.end_lr", "optim.muon_lr")


def resume_config(saved: Config, requested: Config, lower_lr: bool = False) -> Config:
    """`requested` if it only differs from the interrupted run's config in RESUMABLE_CHANGES (and, with
    `lower_lr`, in LR_LEVELS, each lower than before and at least one of them); else an error naming each
    setting that differs."""
    differ = recipe_differences(saved, requested)
    if lower_lr:
        old, new = _levels(saved), _levels(requested)
        changed = [k for k in LR_LEVELS if old[k] != new[k]]
        higher = [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed if new[k] > old[k]]
        if higher:
            raise ConfigError(f"--lower-lr only lowers learning rates: {', '.join(higher)}")
        if not changed:
            raise ConfigError("--lower-lr needs a lower learning rate than the run's, e.g. --max-lr "
                              f"{old['schedule.max_lr'] / 2:.4g}")
        differ = [d for d in differ if d.split(" ", 1)[0] not in LR_LEVELS]
    if differ:
        hint = ("; to continue a diverged run with a lower LR add --lower-lr"
                if not lower_lr and all(d.split(" ", 1)[0] in LR_LEVELS for d in differ) else
                "; start a new run instead")
        raise ConfigError(f"cannot resume with a different recipe: {', '.join(differ)}{hint}")
    return requested


def _levels(cfg: Config) -> dict[str, float]:
    """LR_LEVELS as the LRs they mean (end_lr -1 means min_lr)."""
    flat = _flat(cfg)
    levels = {k: float(flat[k]) for k in LR_LEVELS}
    if levels["schedule.end_lr"] < 0:
        levels["schedule.end_lr"] = levels["schedule.min_lr"]
    return levels


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}
