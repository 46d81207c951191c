"""A training job's set-up, from a config: device and precision, loaders, run directory, model (initialised,
frozen where the config says, compiled), optimizer, loss and augmentation (`Session`); and the checkpoints
of its state (`Checkpointer`, `restore_state`). Used by training and the LR finder."""

from __future__ import annotations

import dataclasses
import math
import signal
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastcifar import reporting, rundir
from fastcifar.augment import AugmentSettings, BatchAugment
from fastcifar.checkpoint import CHECKPOINT, EpochProgress, rng_states, save_training_state, set_rng_states
from fastcifar.config import Config, ConfigError, DataConfig
from fastcifar.conv import apply_conv_grad
from fastcifar.custom_resnet import CustomResNet, freeze_prep_conv, summary, whiten_init
from fastcifar.data import Loaders, make_loaders, open_split, resolve_kind
from fastcifar.distributed import AgreedStop, Dist, broadcast, from_env, gather, split_batch
from fastcifar.distributed import start as start_group
from fastcifar.ema import Lookahead, WeightEMA
from fastcifar.errors import FastCifarError
from fastcifar.interrupt import TrainingInterrupted
from fastcifar.loop import NonFiniteLoss, Trainer, batch_shapes, warm_up
from fastcifar.muon import MuonSGD
from fastcifar.runtime import (
    Amp,
    check_gpu_index,
    compile_model,
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
)


def parameter_groups(model: nn.Module, bn_lr_scale: float, bn_weight_decay: bool, weight_decay: float,
                     bn_wd_scale: float = 1.0, muon: dict | None = None) -> list[dict]:
    """One group for everything, or (when the BatchNorm parameters get another LR or weight decay) a second
    group for BatchNorm weights and biases with its "lr_scale" (read by the LR scheduler). `muon` (the extra
    keys of a Muon group: lr_scale, momentum) moves the conv filters into a group of their own, first."""
    params = list(model.parameters())
    groups = []
    if muon is not None:
        filters = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad}
        groups.append({"params": [p for p in params if id(p) in filters], "muon": True, "weight_decay": 0.0, **muon})
        params = [p for p in params if id(p) not in filters]
    bn_decay = weight_decay * bn_wd_scale if bn_weight_decay else 0.0
    if bn_lr_scale == 1.0 and bn_decay == weight_decay:
        return groups + [{"params": params}]  # one group: checkpoints stay loadable across versions
    bn = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    return groups + [{"params": [p for p in params if id(p) not in bn]},
                     {"params": [p for p in params if id(p) in bn], "lr_scale": bn_lr_scale, "weight_decay": bn_decay}]


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "muon":
        muon = {"lr_scale": o.muon_lr / cfg.schedule.max_lr, "momentum": o.muon_momentum, "nesterov": True}
        groups = parameter_groups(model, o.bn_lr_scale, o.bn_weight_decay, o.weight_decay, o.bn_wd_scale, muon)
        # Newton-Schulz in bf16 on a GPU (as airbench and torch.optim.Muon do); fp32 on a CPU, where bf16
        # matmuls are slow without bf16 units and the iteration is ~2% of a step anyway.
        return MuonSGD(groups, lr=cfg.schedule.max_lr, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay, ns_dtype=torch.bfloat16 if device.type == "cuda" else None)
    groups = parameter_groups(model, o.bn_lr_scale, o.bn_weight_decay, o.weight_decay, o.bn_wd_scale)
    # fused on a GPU: one kernel for every parameter, and with fp16 the GradScaler hands it the inf check
    # instead of reading it back to the host each step
    return torch.optim.SGD(groups, lr=cfg.schedule.max_lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay, fused=device.type == "cuda" or None)


@dataclass
class Session:
    """Everything a training-like job sets up from a config: device, precision, loaders, run directory,
    model (and its compiled form), optimizer, loss and augmentation."""

    cfg: Config
    device: torch.device
    amp: Amp
    loaders: Loaders
    run_dir: Path
    env: dict
    model: nn.Module  # the plain module (its state_dict has no compile prefixes)
    forward: nn.Module  # what the loops call: `model`, or its torch.compile wrapper
    compiled: bool
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    augment: BatchAugment

    dist: Dist = Dist()
    batch_size: int = 0  # per rank (the global batch / world size)
    ema: WeightEMA | None = None  # optim.ema_decay > 0: the averaged weights that the test passes use
    eval_forward: nn.Module | None = None  # what the test passes call (the EMA copy, compiled when enabled)
    lookahead: Lookahead | None = None  # optim.lookahead_every > 0

    @property
    def tested(self) -> nn.Module:
        """The plain module whose weights are tested and saved as best.pt / model.pt."""
        return self.ema.module if self.ema is not None else self.model

    @classmethod
    def open(cls, cfg: Config, log: Callable[[str], None] = print, resume: bool = False) -> Session:
        cfg = cfg.validated()
        dist = from_env()
        local_batch = split_batch(cfg.data.batch_size, dist)  # before anything starts: a plain config error
        device = resolve_device(cfg.run.device)
        if device.type == "cuda" and dist.enabled:
            check_gpu_index(dist.local_rank, f"torchrun's local rank {dist.local_rank}")
            device = torch.device("cuda", dist.local_rank)  # one process per GPU
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the current device: where FFCV's streams and any bare "cuda" tensors go
        if cfg.run.sync_bn and dist.enabled and device.type != "cuda":
            raise ConfigError("run.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on a CPU)")
        if not dist.is_main:
            log = quiet
        if device.type == "cpu" and cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        amp = Amp(device, resolve_precision(cfg.run.precision, device))
        compiled = resolve_compile(cfg.run.compile, device)
        seed_everything(cfg.run.seed, cfg.run.deterministic, device)  # same initial weights on every rank
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls/convs left
        start_group(dist, device, cfg.run.dist_timeout_s)
        d = cfg.data
        loaders = make_loaders(d.data_dir, local_batch, d.test_batch_size, d.num_workers, device, cfg.run.seed,
                               d.train_subset, d.test_subset, distributed=dist.enabled, kind=d.loader)
        if dist.enabled and loaders.test_size % dist.world_size:
            raise ConfigError(f"{dist.world_size} ranks do not divide the {loaders.test_size:,} test images: each "
                              "rank's shard would be padded with repeats, which the test accuracy would count; use "
                              "a world size that divides it (or --data.test_subset)")
        run_dir = _open_run_dir(cfg, resume, dist)
        env = rundir.environment(device) | {"world_size": dist.world_size, "loader": resolve_kind(d.loader)}
        model = CustomResNet(cfg.model)
        log(summary(model))
        if cfg.model.whiten_init and not resume:
            count = min(loaders.train_size, WHITEN_IMAGES)
            log(f"whitening init: {_whiten_init(model, cfg, device, count)} prep filters set from the 3x3 patches "
                f"of {count:,} training images")
        if cfg.model.whiten_frozen:
            freeze_prep_conv(model)  # also on resume: the optimizer's groups depend on it
        if cfg.run.sync_bn and dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        im2col = apply_conv_grad(model, cfg.run.conv_grad, device, amp.dtype)  # before DDP and compile see it
        model = model.to(device=device, memory_format=_memory_format(cfg))
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets (no copy in and out of them)
        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True) if dist.enabled else model
        mode = cfg.run.compile_mode
        forward = compile_model(wrapped, mode) if compiled else wrapped
        # Each rank draws its own augmentations (rank 0 keeps the single-process stream).
        augment = BatchAugment(augment_settings(d), device, cfg.run.seed + 1_000_003 * dist.rank, amp.dtype,
                               cfg.run.channels_last)
        ranks = f" | {dist.world_size} ranks x {local_batch} images/step" if dist.enabled else ""
        log(f"run dir {run_dir} | device {env['device_name']} ({device}) | {str(amp.dtype).removeprefix('torch.')} "
            f"| channels_last={cfg.run.channels_last} | compile={compiled} | "
            f"conv_grad={'im2col' if im2col else 'library'} | threads {torch.get_num_threads()} | "
            f"allocator {env['allocator'].split(' (')[0]} | "
            f"{env['loader']} loader, {loaders.train_size:,} train / {loaders.test_size:,} test images, "
            f"{len(loaders.train)} steps/epoch"
            f"{ranks}" + (f" | test accuracy with {method}" if (method := reporting.test_method(cfg)) else "")
            + _test_schedule(cfg.run.test_every, cfg.schedule.epochs))
        if dist.is_main:
            rundir.write_json(run_dir / "config.json", cfg.to_dict())
            rundir.record_environment(run_dir / "env.json", env, resumed=resume)
        ema = WeightEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        eval_forward = forward if ema is None else compile_model(ema.module, mode) if compiled else ema.module
        lookahead = Lookahead(model, cfg.optim.lookahead_every) if cfg.optim.lookahead_every else None
        return cls(cfg, device, amp, loaders, run_dir, env, model, forward, compiled,
                   make_optimizer(model, cfg, device),
                   nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), augment, dist, local_batch,
                   ema, eval_forward, lookahead)

    def trainer(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> Trainer:
        """What the training loop steps, with `scheduler` driving this session's optimizer."""
        return Trainer(self.forward, self.optimizer, scheduler, self.loss_fn, self.augment, self.amp, self.ema,
                       self.lookahead, self.cfg.schedule.epochs * len(self.loaders.train))

    def warm_up(self) -> float:
        """Everything that would otherwise land in epoch 1: the loaders' first batch (FFCV JIT-compiles its
        pipelines then), and with compile on, every batch shape of the run in train and eval mode (under CUDA
        graphs three times each, so that they are recorded). Returns the seconds spent; weights, statistics
        and optimizer state are put back."""
        start = time.perf_counter()
        for loader in (self.loaders.train, self.loaders.test):
            with loader.epoch(0) as batches:
                next(batches, None)
        if self.compiled:
            shard = math.ceil(self.loaders.train_size / self.dist.world_size)
            test_shard = math.ceil(self.loaders.test_size / self.dist.world_size)
            repeats = 3 if self.cfg.run.compile_mode in ("reduce-overhead", "max-autotune") else 1
            warm_up(self.forward, self.optimizer, self.loss_fn, self.amp, batch_shapes(shard, self.batch_size),
                    batch_shapes(test_shard, self.cfg.data.test_batch_size), _memory_format(self.cfg),
                    self.eval_forward, repeats=repeats)
        return time.perf_counter() - start


def augment_settings(data: DataConfig) -> AugmentSettings:
    """The augmentation part of the data config (every AugmentSettings field has a DataConfig field of its name)."""
    return AugmentSettings(**{f.name: getattr(data, f.name) for f in dataclasses.fields(AugmentSettings)})


WHITEN_IMAGES = 5000  # training images whose 3x3 patches set the whitening init


def _whiten_init(model: CustomResNet, cfg: Config, device: torch.device, count: int) -> int:
    """Set the prep conv from the patch statistics of the first `count` training images (the same on every
    rank)."""
    d = cfg.data
    loader = open_split(d.data_dir, "train", d.test_batch_size, device, train=False, subset=count,
                        num_workers=d.num_workers, kind=d.loader)
    normalize = BatchAugment(AugmentSettings(), device, 0, torch.float32, channels_last=False).normalize
    with loader.epoch() as batches:
        images = torch.cat([normalize(x) for x, _ in batches])
    return whiten_init(model, images.cpu())


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


def quiet(_: str) -> None:
    """The log of ranks other than 0: only rank 0 prints."""


def _open_run_dir(cfg: Config, resume: bool, dist: Dist) -> Path:
    """Rank 0 creates (or reopens) the run directory; every rank gets its path or rank 0's error."""
    path, error = None, None
    if dist.is_main:
        try:
            if resume:
                path = rundir.reopen_run_dir(Path(cfg.run.out_dir) / cfg.run.name)
            else:
                path = rundir.create_run_dir(cfg.run.out_dir, cfg.run.name, cfg.preset, cfg.run.overwrite)
        except FastCifarError as err:
            error = str(err)
    path, error = broadcast((path, error), dist)
    if error:
        raise FastCifarError(error)
    return path


def _memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.run.channels_last else torch.contiguous_format


def _test_schedule(every: int, epochs: int) -> str:
    """The run header's note on skipped test passes (run.test_every), "" when every epoch is tested."""
    if every == 1 or epochs == 1:
        return ""
    if every == 0 or every >= epochs:
        return " | tested after the last epoch only"
    return f" | tested every {every} epochs and after the last"


class Checkpointer:
    """Writes checkpoint.pt (full training state) and best.pt (weights of the best test accuracy)."""

    def __init__(self, session: Session, scheduler: torch.optim.lr_scheduler.LRScheduler, metrics: list[dict],
                 compile_seconds: float, setup_seconds: float = 0.0) -> None:
        self.session, self.scheduler, self.metrics = session, scheduler, metrics
        self.compile_seconds, self.setup_seconds = compile_seconds, setup_seconds
        self.path = session.run_dir / CHECKPOINT
        self.best = max((m["test_acc"] for m in reporting.tested_epochs(metrics)), default=-1.0)

    def save(self, epochs_done: int, progress: EpochProgress | None) -> None:
        """Every rank calls this (its RNG states and epoch sums are gathered); rank 0 writes the file."""
        s = self.session
        ranks = gather({"rng": rng_states(s.augment.generator), "progress": progress.to_dict() if progress else None},
                       s.dist)
        bad = non_finite_state(s.model) or (non_finite_state(s.ema.module) if s.ema is not None else "")
        if bad:  # never overwrite the last good checkpoint with a diverged state
            raise NonFiniteLoss(f"the training state holds NaN/inf ({bad}); not saved: the last checkpoint "
                                f"({self.path}) is kept. Lower --max-lr or use --precision fp32")
        if s.dist.is_main:
            save_training_state(self.path, cfg=s.cfg, model=s.model, optimizer=s.optimizer, scheduler=self.scheduler,
                                scaler=s.amp.scaler, augment_generator=s.augment.generator, epochs_done=epochs_done,
                                progress=progress, metrics=self.metrics, compile_seconds=self.compile_seconds,
                                setup_seconds=self.setup_seconds, device=s.device.type, ranks=ranks,
                                ema=s.ema.state_dict() if s.ema is not None else None,
                                lookahead=s.lookahead.state_dict() if s.lookahead is not None else None)

    def end_of_epoch(self, ep: int, test_acc: float | None) -> None:
        """The checkpoint this epoch is due (run.checkpoint_every), and best.pt when it was tested and the best."""
        every, epochs = checkpoint_interval(self.session.cfg, self.session.device), self.session.cfg.schedule.epochs
        if every and (ep % every == 0 or ep == epochs):
            self.save(ep, None)
        if test_acc is not None and test_acc > self.best:
            self.best = test_acc
            if not self.session.dist.is_main:
                return
            rundir.save_checkpoint(self.session.run_dir / "best.pt", {
                "model": self.session.tested.state_dict(), "config": self.session.cfg.to_dict(), "epoch": ep,
                "test_acc": test_acc})

    def interrupt(self, stop: AgreedStop, epochs_done: int, progress: EpochProgress | None) -> typing.NoReturn:
        """Save the state at this point and stop with the command that continues the run."""
        self.save(epochs_done, progress)
        where = f"after epoch {epochs_done}" + (f", step {progress.step}" if progress else "")
        name = signal.Signals(stop.signum).name
        raise TrainingInterrupted(f"stopped by {name} {where}; checkpoint saved. Continue with: "
                                  f"python -m fastcifar.train --resume {self.session.run_dir}", stop.signum)


def restore_state(session: Session, scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict,
                  new_lr: bool = False) -> tuple[list[dict], EpochProgress | None]:
    """Put the saved training state into `session`; the metrics so far and how far the epoch got.

    `new_lr` (resume --lower-lr): keep the LR levels of the session's config rather than the saved ones. The
    saved optimizer and scheduler states carry the old levels (each group's "initial_lr" and "lr_scale", the
    scheduler's base_lrs); the momentum buffers and the step count are kept."""
    fresh = [(g["initial_lr"], g.get("lr_scale", 1.0)) for g in session.optimizer.param_groups]
    session.model.load_state_dict(state["model"])
    session.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if new_lr:
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # built from the new levels; not in its state
        for group, (initial, scale) in zip(session.optimizer.param_groups, fresh, strict=True):
            group["initial_lr"], group["lr_scale"], group["lr"] = initial, scale, initial * factor
        scheduler.base_lrs = [initial for initial, _ in fresh]
        scheduler._last_lr = [g["lr"] for g in session.optimizer.param_groups]
    session.amp.scaler.load_state_dict(state["scaler"])
    if session.ema is not None:
        session.ema.load_state_dict(state["ema"])
    if session.lookahead is not None:
        session.lookahead.load_state_dict(state["lookahead"])
    world = state.get("world_size", 1)
    if world != session.dist.world_size:
        raise ConfigError(f"the run was saved with {world} rank(s); resume it with {world}, "
                          f"not {session.dist.world_size}")
    mine = state["ranks"][session.dist.rank] if world > 1 else state
    set_rng_states(mine["rng"], session.augment.generator)
    progress = EpochProgress(**mine["progress"]) if mine["progress"] else None
    return list(state["metrics"]), progress


