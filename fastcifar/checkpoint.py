"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

RUN_DIR/checkpoint.pt holds model, optimizer, LR scheduler, GradScaler, the position in the run (epochs
done, and steps done in an unfinished epoch with its running loss/accuracy sums), every random number
generator (torch, CUDA, numpy, Python, the augmentation generator), the config and the metrics so far.
It is written atomically (temp file + rename) and loaded with weights_only=True, so every value in it is
a tensor or a plain Python value (numpy's and Python's RNG states are converted).

The FFCV training order of epoch e depends only on (seed, e), so continuing epoch e at step k means
replaying the loader's epoch e and skipping its first k batches.

The plumbing that training uses is here too: `Checkpointer` writes checkpoint.pt when an epoch is due or a signal
stops the run (and best.pt), and `restore_state` puts a loaded state back into a trainer. Both take the trainer
as the `TrainingParts` it is (fastcifar.loop.Trainer meets that protocol), so this module imports no loop code.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
from torch import nn

from fastcifar.augment import BatchAugment
from fastcifar.config import Config, ConfigError
from fastcifar.custom_resnet import CustomResNet
from fastcifar.distributed import AgreedStop, Dist, gather
from fastcifar.ema import Lookahead, WeightEMA
from fastcifar.errors import FastCifarError
from fastcifar.interrupt import TrainingInterrupted
from fastcifar.prune import EasyPruner
from fastcifar.rundir import load_checkpoint_file, lock_owner, save_checkpoint
from fastcifar.runtime import Amp

CHECKPOINT = "checkpoint.pt"
KIND = "training-state"

# Settings that may differ between the interrupted run and its resumption: they change where files are
# and how fast it runs, not the numbers (compile changes float rounding on some devices, not the recipe).
RESUMABLE_CHANGES = {
    "data.data_dir", "data.num_workers", "data.test_batch_size", "run.progress", "run.summary", "run.threads",
    "run.out_dir",
    "run.name", "run.overwrite", "run.compile", "run.compile_mode", "run.conv_grad", "run.checkpoint_every",
    "run.test_every", "run.recalibrate",
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
                        ema: dict | None = None, lookahead: dict | None = None,
                        pruner: dict | None = None) -> None:
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
        "pruner": pruner,  # data.prune_fraction: the per-example losses and the current epoch's kept examples
    })


def load_training_state(run_dir: str | Path) -> dict[str, Any]:
    """The training state saved in `run_dir`, checked; errors say why a run cannot be resumed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FastCifarError(f"--resume {run_dir}: no such run directory")
    if owner := lock_owner(run_dir):  # its checkpoint may be half a step old: say who is still training there
        raise FastCifarError(f"{run_dir} is in use by a training that is still running ({owner}); wait for it or stop "
                             f"it before resuming")
    if (run_dir / "results.json").exists():
        raise FastCifarError(f"{run_dir} holds a finished run; nothing to resume")
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FastCifarError(f"{run_dir} has no {CHECKPOINT} (the run stopped before writing one); start it again")
    state = load_checkpoint_file(path)
    if state.get("kind") != KIND:
        raise FastCifarError(f"{path} holds weights only, not a training state; it cannot be resumed")
    problem = training_state_problem(state)
    if problem:
        raise FastCifarError(f"{path} is not a complete training state ({problem}); it cannot be resumed: start the "
                             f"run again, or resume another copy")
    return state


# What a training state holds, each part's type: checked as a whole before any part of it is used.
_STATE_PARTS: dict[str, type | tuple[type, ...]] = {
    "config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "epoch": int,
    "progress": (dict, type(None)), "metrics": list, "compile_seconds": (int, float), "rng": dict,
    "world_size": int, "ranks": (list, type(None)), "ema": (dict, type(None)), "lookahead": (dict, type(None)),
    "pruner": (dict, type(None)),
}
_RNG_PARTS = ("torch", "cuda", "numpy", "python", "augment")


def training_state_problem(state: dict[str, Any]) -> str:
    """What is wrong with a loaded training state, or "": every part there with its type, the config valid, the
    weights those of the network the config describes, the optimizer's groups and the random generators complete."""
    for key, kind in _STATE_PARTS.items():
        if key not in state and key not in ("ema", "lookahead", "ranks", "pruner"):
            return f"no {key!r}"
        if key in state and not isinstance(state[key], kind):
            return f"{key!r} is a {type(state[key]).__name__}"
    try:
        cfg = Config.from_dict(state["config"])
    except ConfigError as err:
        return f"its config: {err}"
    expected = CustomResNet(cfg.model).state_dict()
    model = state["model"]
    if model.keys() != expected.keys() or any(
            not isinstance(model[k], torch.Tensor) or model[k].shape != v.shape for k, v in expected.items()):
        return "its weights are not those of the network its config describes"
    if not {"state", "param_groups"} <= state["optimizer"].keys() or not state["optimizer"]["param_groups"]:
        return "its optimizer state has no parameter groups"
    if any(part not in state["rng"] for part in _RNG_PARTS):
        return "its random generator states are incomplete"
    if state["epoch"] < 0 or len(state["metrics"]) != state["epoch"] or not all(
            isinstance(m, dict) for m in state["metrics"]):
        return f"{len(state['metrics'])} metrics rows for {state['epoch']} epochs"
    if state["progress"] is not None and set(state["progress"]) != set(EpochProgress().to_dict()):
        return "its epoch progress is incomplete"
    if cfg.optim.ema_decay and not isinstance(state.get("ema"), dict):
        return "its config averages the weights (optim.ema_decay) but it holds no average"
    if cfg.optim.lookahead_every and not isinstance(state.get("lookahead"), dict):
        return "its config uses lookahead but it holds no slow weights"
    if cfg.data.prune_fraction and cfg.data.prune_epochs and not isinstance(state.get("pruner"), dict):
        return "its config prunes easy examples but it holds no per-example losses"
    ranks = state.get("ranks")
    if state["world_size"] > 1 and (not isinstance(ranks, list) or len(ranks) != state["world_size"]):
        return f"it was saved by {state['world_size']} ranks but holds the states of another number"
    return ""


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


class TrainingParts(Protocol):
    """What a checkpoint saves and restores of a trainer (fastcifar.loop.Trainer)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: BatchAugment
    amp: Amp
    ema: WeightEMA | None
    lookahead: Lookahead | None
    pruner: EasyPruner | None

    @property
    def tested(self) -> nn.Module: ...


class NonFiniteLoss(FastCifarError):
    """The loss, the weights or the statistics became NaN or infinite: training diverged."""


def non_finite_state(model: nn.Module) -> str:
    """The name of the first parameter or buffer of `model` holding NaN/inf, or "" (one sync)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    floats = [(name, t) for name, t in tensors if t.is_floating_point()]
    if not floats:
        return ""
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu()
    return next((name for (name, _), ok in zip(floats, finite.tolist(), strict=True) if not ok), "")


def checkpoint_interval(cfg: Config, device: torch.device) -> int:
    """run.checkpoint_every, with -1 (auto) meaning every epoch on a CPU (epochs take minutes) and every 10 on a
    GPU, where writing ~80 MB costs as much as a whole ~1 s epoch (a signal still writes one at once)."""
    every = cfg.run.checkpoint_every
    return every if every >= 0 else 1 if device.type == "cpu" else 10


class Checkpointer:
    """Writes RUN_DIR/checkpoint.pt (the whole training state) and best.pt (the weights of the best test
    accuracy). `metrics` is the run's list of rows, which grows as the run goes."""

    def __init__(self, trainer: TrainingParts, cfg: Config, run_dir: Path, dist: Dist, device: torch.device,
                 metrics: list[dict], compile_seconds: float, setup_seconds: float = 0.0,
                 steps_per_epoch: int = 0) -> None:
        self.trainer, self.cfg, self.run_dir, self.dist, self.device = trainer, cfg, run_dir, dist, device
        self.steps_per_epoch = steps_per_epoch  # for the stop message's "step 92 of 98" (0: not said)
        self.metrics, self.compile_seconds, self.setup_seconds = metrics, compile_seconds, setup_seconds
        self.path = run_dir / CHECKPOINT
        self.best = max((m["test_acc"] for m in metrics if m["test_acc"] is not None), default=-1.0)

    def save(self, epochs_done: int, progress: EpochProgress | None) -> None:
        """Every rank calls this (its RNG states and epoch sums are gathered); rank 0 writes the file."""
        t = self.trainer
        ranks = gather({"rng": rng_states(t.augment.generator), "progress": progress.to_dict() if progress else None},
                       self.dist)
        bad = non_finite_state(t.module) or (non_finite_state(t.ema.module) if t.ema is not None else "")
        if bad:  # never overwrite the last good checkpoint with a diverged state
            raise NonFiniteLoss(f"the training state holds NaN/inf ({bad}); not saved: the last checkpoint "
                                 f"({self.path}) is kept. Lower --max-lr or use --precision fp32")
        if self.dist.is_main:
            save_training_state(self.path, cfg=self.cfg, model=t.module, optimizer=t.optimizer,
                                scheduler=t.scheduler, scaler=t.amp.scaler, augment_generator=t.augment.generator,
                                epochs_done=epochs_done, progress=progress, metrics=self.metrics,
                                compile_seconds=self.compile_seconds, setup_seconds=self.setup_seconds,
                                device=self.device.type, ranks=ranks,
                                ema=t.ema.state_dict() if t.ema is not None else None,
                                lookahead=t.lookahead.state_dict() if t.lookahead is not None else None,
                                pruner=t.pruner.state_dict() if t.pruner is not None else None)

    def end_of_epoch(self, ep: int, test_acc: float | None) -> None:
        """The checkpoint this epoch is due (run.checkpoint_every), and best.pt when it was tested and the best."""
        every, epochs = checkpoint_interval(self.cfg, self.device), self.cfg.schedule.epochs
        if every and (ep % every == 0 or ep == epochs):
            self.save(ep, None)
        if test_acc is not None and test_acc > self.best:
            self.best = test_acc
            if not self.dist.is_main:
                return
            save_checkpoint(self.run_dir / "best.pt", {"model": self.trainer.tested.state_dict(),
                                                       "config": self.cfg.to_dict(), "epoch": ep,
                                                       "test_acc": test_acc})

    def interrupt(self, stop: AgreedStop, epochs_done: int, progress: EpochProgress | None) -> NoReturn:
        """Save the state at this point and stop with the command that continues the run."""
        self.save(epochs_done, progress)
        name = signal.Signals(stop.signum).name
        raise TrainingInterrupted(f"stopped by {name} {where_stopped(epochs_done, progress, self.steps_per_epoch)}; "
                                  f"checkpoint saved. Continue with: python -m fastcifar train --resume "
                                  f"{self.run_dir}", stop.signum)


def where_stopped(epochs_done: int, progress: EpochProgress | None, steps_per_epoch: int = 0) -> str:
    """Where a stopped run is, numbered as the epoch table numbers epochs (from 1): "in epoch 3, after step 92 of 98",
    or "after epoch 2" when only whole epochs are done."""
    if progress is None:
        return f"after epoch {epochs_done}"
    if progress.step == 0:
        return f"in epoch {epochs_done + 1}, before its first step"
    of = f" of {steps_per_epoch}" if steps_per_epoch else ""
    return f"in epoch {epochs_done + 1}, after step {progress.step}{of}"


def restore_state(trainer: TrainingParts, state: dict, dist: Dist,
                  new_lr: bool = False) -> tuple[list[dict], EpochProgress | None]:
    """Put the saved training state into `trainer`; returns the metrics so far and how far the epoch got.

    `new_lr` (resume --lower-lr): keep the LR levels of the trainer's (new) config rather than the saved ones. The
    saved optimizer and scheduler states carry the old levels (each group's "initial_lr" and "lr_scale", the
    scheduler's base_lrs); the momentum buffers and the step count are kept."""
    t, scheduler = trainer, trainer.scheduler
    fresh = [(g["initial_lr"], g.get("lr_scale", 1.0)) for g in t.optimizer.param_groups]
    t.module.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if new_lr:
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # built from the new levels; not in its state
        for group, (initial, scale) in zip(t.optimizer.param_groups, fresh, strict=True):
            group["initial_lr"], group["lr_scale"], group["lr"] = initial, scale, initial * factor
        scheduler.base_lrs = [initial for initial, _ in fresh]
        scheduler._last_lr = [g["lr"] for g in t.optimizer.param_groups]
    t.amp.scaler.load_state_dict(state["scaler"])
    if t.ema is not None:
        t.ema.load_state_dict(state["ema"])
    if t.lookahead is not None:
        t.lookahead.load_state_dict(state["lookahead"])
    if t.pruner is not None:
        t.pruner.load_state_dict(state["pruner"])
    world = state.get("world_size", 1)
    if world != dist.world_size:
        raise ConfigError(f"the run was saved with {world} rank(s); resume it with {world}, not {dist.world_size}")
    mine = state["ranks"][dist.rank] if world > 1 else state
    set_rng_states(mine["rng"], t.augment.generator)
    progress = EpochProgress(**mine["progress"]) if mine["progress"] else None
    return list(state["metrics"]), progress
