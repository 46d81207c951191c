"""A training job's set-up, from a config (`Session.open`): device and precision, loaders, run directory, and the
`Trainer` (fastcifar/loop.py): the model (initialised, frozen where the config says, compiled), optimizer, LR
schedule, loss and augmentation. Used by training, the LR finder and the GPU check."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastcifar import reporting, rundir
from fastcifar.augment import BatchAugment
from fastcifar.calibrate import Choice, choose, recorded
from fastcifar.config import Config, ConfigError
from fastcifar.conv import use_im2col_filter_grad
from fastcifar.custom_resnet import CustomResNet, freeze_prep_conv, summary, whiten_init
from fastcifar.data import Loaders, make_loaders, open_split, resolve_kind
from fastcifar.distributed import Dist, broadcast, from_env, split_batch
from fastcifar.distributed import start as start_group
from fastcifar.ema import Lookahead, WeightEMA
from fastcifar.errors import FastCifarError
from fastcifar.loop import Trainer, batch_shapes, warm_up
from fastcifar.muon import MuonSGD
from fastcifar.prune import EasyPruner, PrunedLoader
from fastcifar.runfiles import read_env
from fastcifar.runtime import (
    Amp,
    check_gpu_index,
    check_step_memory,
    check_test_memory,
    compile_model,
    resolve_device,
    seed_everything,
)
from fastcifar.schedule import make_scheduler, one_cycle_lr


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


def make_trainer(cfg: Config, model: nn.Module, forward: nn.Module, augment: BatchAugment, amp: Amp,
                 steps_per_epoch: int, compiled: bool = False) -> Trainer:
    """The trainer of `model` (its plain module; `forward`: what the steps call, e.g. compiled or DDP-wrapped) as
    `cfg` says: optimizer and parameter groups, one-cycle schedule, loss, and the weight averages (EMA,
    lookahead). Training and the benchmarks build theirs here, so that both step the same thing."""
    o, s = cfg.optim, cfg.schedule
    ema = WeightEMA(model, o.ema_decay) if o.ema_decay > 0 else None
    eval_model = forward if ema is None else compile_model(ema.module, cfg.run.compile_mode) if compiled else ema.module
    optimizer = make_optimizer(model, cfg, amp.device)
    return Trainer(forward, model, optimizer,
                   make_scheduler(optimizer, steps_per_epoch, s.epochs, s.peak_epoch, s.min_lr, s.max_lr, s.end_lr),
                   nn.CrossEntropyLoss(label_smoothing=o.label_smoothing), augment, amp, eval_model=eval_model, ema=ema,
                   lookahead=Lookahead(model, o.lookahead_every) if o.lookahead_every else None,
                   total_steps=s.epochs * steps_per_epoch,
                   lr_at=functools.partial(one_cycle_lr, steps_per_epoch=steps_per_epoch, epochs=s.epochs,
                                           peak_epoch=s.peak_epoch, min_lr=s.min_lr, max_lr=s.max_lr, end_lr=s.end_lr))


@dataclass
class Session:
    """Everything a training-like job sets up from a config: device, loaders, run directory, environment facts,
    and the trainer (model, optimizer, schedule, loss, augmentation, precision)."""

    cfg: Config
    device: torch.device
    loaders: Loaders
    run_dir: Path
    env: dict
    trainer: Trainer
    compiled: bool
    dist: Dist = Dist()
    batch_size: int = 0  # per rank (the global batch / world size)

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
        check_step_memory(local_batch, cfg.model.widths, device)  # before the data: a batch that cannot fit
        check_test_memory(cfg.data.test_batch_size, cfg.model.widths, device)
        if dist.is_main:  # the run directory's refusals too, in the first second rather than after the data
            _check_run_dir(cfg, resume)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls/convs left
        start_group(dist, device, cfg.run.dist_timeout_s)
        # Before the loaders start their threads: the measurement has the machine to itself. Rank 0 decides for all.
        choice = broadcast(_choose(cfg, device, local_batch, resume, log) if dist.is_main else None, dist)
        amp = Amp(device, choice.dtype)
        compiled = choice.compile
        seed_everything(cfg.run.seed, cfg.run.deterministic, device)  # same initial weights on every rank
        d = cfg.data
        pruning = d.prune_fraction > 0 and d.prune_epochs > 0
        if pruning and dist.enabled:
            raise ConfigError("data.prune_fraction runs in one process: each rank would need every example's loss")
        # pruning leaves examples out by index: the resident loader (data.loader auto picks it then)
        loader_kind = "resident" if pruning else resolve_kind(d.loader)
        loaders = make_loaders(dataclasses.replace(d, loader=loader_kind), device, cfg.run.seed,
                               batch_size=local_batch, distributed=dist.enabled)
        pruner = None
        if pruning:
            pruner = EasyPruner(loaders.train_size, d.prune_fraction, d.prune_epochs, cfg.run.seed, device)
            loaders = Loaders(PrunedLoader(loaders.train, pruner), loaders.test)
        if dist.enabled and loaders.test_size % dist.world_size:
            raise ConfigError(f"{dist.world_size} ranks do not divide the {loaders.test_size:,} test images: each "
                              "rank's shard would be padded with repeats, which the test accuracy would count; use "
                              "a world size that divides it (or --data.test_subset)")
        run_dir = _open_run_dir(cfg, resume, dist)
        env = rundir.environment(device) | {"world_size": dist.world_size, "loader": loader_kind,
                                            "auto": choice.record()}
        model = CustomResNet(cfg.model)
        if cfg.run.summary:
            log(summary(model))
        if cfg.model.whiten_init and not resume:
            count = min(loaders.train_size, WHITEN_IMAGES)
            log(f"whitening init: {_whiten_init(model, cfg, device, count)} prep filters set from the 3x3 patches "
                f"of {count:,} training images")
        if cfg.model.whiten_frozen:
            freeze_prep_conv(model)  # also on resume: the optimizer's groups depend on it
        if cfg.run.sync_bn and dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        im2col = choice.conv_grad == "im2col" and use_im2col_filter_grad(model) > 0  # before DDP and compile
        model = model.to(device=device, memory_format=choice.memory_format)
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets (no copy in and out of them)
        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True) if dist.enabled else model
        mode = cfg.run.compile_mode
        forward = compile_model(wrapped, mode) if compiled else wrapped
        # Each rank draws its own augmentations (rank 0 keeps the single-process stream).
        augment = BatchAugment(d, device, cfg.run.seed + 1_000_003 * dist.rank, amp.dtype, choice.channels_last)
        ranks = f" | {dist.world_size} ranks x {local_batch} images/step" if dist.enabled else ""
        log(f"run dir {run_dir} | device {env['device_name']} ({device}) | {str(amp.dtype).removeprefix('torch.')} "
            f"| channels_last={choice.channels_last} | compile={compiled} | "
            f"conv_grad={'im2col' if im2col else 'library'} | threads {torch.get_num_threads()} | "
            f"allocator {env['allocator'].split(' (')[0]} | "
            f"{env['loader']} loader, {loaders.train_size:,} train / {loaders.test_size:,} test images, "
            f"{len(loaders.train)} steps/epoch"
            f"{ranks}" + (f" | test accuracy with {method}" if (method := reporting.test_method(cfg)) else "")
            + _test_schedule(cfg.run.test_every, cfg.schedule.epochs))
        if dist.is_main:
            rundir.write_json(run_dir / "config.json", cfg.to_dict())
            rundir.record_environment(run_dir / "env.json", env, resumed=resume)
        trainer = make_trainer(cfg, model, forward, augment, amp, len(loaders.train), compiled)
        trainer.pruner = pruner
        return cls(cfg, device, loaders, run_dir, env, trainer, compiled, dist, local_batch)

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
            d = self.cfg.data
            # one epoch per training image size: the low-res epochs of progressive resizing, then the full-size ones
            epochs = (0, d.low_res_epochs) if 0 < d.low_res_epochs < self.cfg.schedule.epochs else (0,)
            warm_up(self.trainer, batch_shapes(shard, self.batch_size),
                    batch_shapes(test_shard, d.test_batch_size), repeats=repeats, epochs=epochs)
        return time.perf_counter() - start


def _choose(cfg: Config, device: torch.device, batch: int, resume: bool, log: Callable[[str], None]) -> Choice:
    """The run's precision, memory format and conv gradient (fastcifar/calibrate.py): a resumed run keeps what it
    chose when it started (its env.json), so that its numbers continue exactly; a new one measures, or reads this
    machine's cached measurement. Logged with the reason."""
    choice = None
    if resume:
        env = read_env(Path(cfg.run.out_dir) / cfg.run.name / "env.json")
        choice = recorded(env, cfg.run, device)
    if choice is None:
        choice = choose(cfg.run, cfg.model, device, batch, frozen_prep=cfg.model.whiten_frozen, log=log)
    if choice.source == "cache":  # the rates were shown when measured; env.json and `calibrate` keep them
        log(f"auto settings: {choice.way.label} (cached: measured earlier on this machine; python -m fastcifar "
            f"calibrate shows the rates)")
    elif choice.source != "given":
        log(f"auto settings: {choice.reason}")
    return choice


WHITEN_IMAGES = 5000  # training images whose 3x3 patches set the whitening init


def _whiten_init(model: CustomResNet, cfg: Config, device: torch.device, count: int) -> int:
    """Set the prep conv from the patch statistics of the first `count` training images (the same on every
    rank)."""
    d = cfg.data
    loader = open_split(d, "train", device, batch_size=d.test_batch_size, subset=count, train=False)
    normalize = BatchAugment(d, device, 0, torch.float32, channels_last=False).normalize
    with loader.epoch() as batches:
        images = torch.cat([normalize(x) for x, _ in batches])
    return whiten_init(model, images.cpu())


def quiet(_: str) -> None:
    """The log of ranks other than 0: only rank 0 prints."""


def _check_run_dir(cfg: Config, resume: bool) -> None:
    target = Path(cfg.run.out_dir) / (cfg.run.name or "(a new run)")  # a new time-stamped name is always free
    if not resume:
        rundir.check_new_run_dir(target, cfg.run.overwrite)
    elif owner := rundir.lock_owner(target):
        raise FastCifarError(f"{target} is in use by a training that is still running ({owner}); wait for it or stop "
                             f"it before resuming")


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


def _test_schedule(every: int, epochs: int) -> str:
    """The run header's note on skipped test passes (run.test_every), "" when every epoch is tested."""
    if every == 1 or epochs == 1:
        return ""
    if every == 0 or every >= epochs:
        return " | tested after the last epoch only"
    return f" | tested every {every} epochs and after the last"
