"""Training; the command is `python -m fastcifar.train [--preset NAME] [--epochs N] [--section.field VALUE ...]`.

One step, in order: uint8 batch from FFCV (already on the device) -> augment on the device ->
normalise to the compute dtype -> forward under autocast -> loss -> backward -> SGD step -> LR step.
Loss and accuracy are summed on the device and read once per epoch: reading them every step would
make the host wait for the GPU each step (the progress bar reads them every `PROGRESS_EVERY` steps).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import random
import signal
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastcifar import reporting, rundir
from fastcifar.augment import AugmentSettings, BatchAugment
from fastcifar.checkpoint import (
    CHECKPOINT,
    EpochProgress,
    load_training_state,
    resume_config,
    rng_states,
    save_training_state,
    set_rng_states,
)
from fastcifar.config import Config, ConfigError, DataConfig, add_config_arguments, config_from_args
from fastcifar.custom_resnet import CustomResNet, count_parameters, freeze_prep_conv, summary, whiten_init
from fastcifar.data import Loaders, epoch, make_loader, make_loaders
from fastcifar.distributed import (
    AgreedStop,
    Dist,
    all_max,
    all_sum,
    broadcast,
    from_env,
    gather,
    keep_until_exit,
    split_batch,
)
from fastcifar.distributed import start as start_group
from fastcifar.distributed import stop as stop_group
from fastcifar.ema import Lookahead, WeightEMA
from fastcifar.errors import FastCifarError, run_cli
from fastcifar.evaluation import Predictions, predict, tta_logits
from fastcifar.interrupt import StopSignals, TrainingInterrupted
from fastcifar.muon import MuonSGD
from fastcifar.schedule import make_scheduler, one_cycle_lr

PROGRESS_EVERY = 10  # steps between progress-bar updates (each one is a host-device sync on a GPU)


# ------------------------------------------------------------------------------- device and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastCifarError(f"device {name} requested but CUDA is not available; use --device cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512-BF16/AMX class). Without them PyTorch runs
    bf16 convolutions on a slow reference path: measured ~20x slower than fp32 on an AVX2-only EPYC."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA where supported (else fp16 + GradScaler); on a CPU, bf16 only where oneDNN
    has fast bf16 kernels for it, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise FastCifarError("fp16 is for CUDA; on a CPU use --precision bf16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_compile(setting: str, device: torch.device) -> bool:
    """auto: compile on CUDA (large gain), not on CPU (see README: measured gain too small for the
    compile time of a short run)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


@dataclass
class Amp:
    """Mixed-precision policy: autocast to `dtype`, and a GradScaler for fp16 only (bf16 has fp32's range)."""

    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host waits for queued GPU work, so timings mean something


# ------------------------------------------------------------------------------------ epoch loops


@dataclass
class PassStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    finished: bool = True  # False when a training epoch stopped early on a signal
    progress: EpochProgress | None = None  # a training epoch's position and sums (for a checkpoint)


class NonFiniteLoss(FastCifarError):
    """The loss became NaN or infinite: training diverged."""


class StopRequested(Exception):
    """A signal asked the test pass to stop (it is abandoned and redone on resume)."""


class _Totals:
    """Sums of loss and correct predictions kept on the device (no host sync until `read`), continuing
    from `start` when an interrupted epoch is resumed."""

    def __init__(self, device: torch.device, start: EpochProgress | None = None) -> None:
        s = start or EpochProgress()
        self.loss = torch.tensor(s.loss_sum, dtype=torch.float64, device=device)
        self.correct = torch.tensor(s.correct, dtype=torch.int64, device=device)
        self.images, self.steps, self.skipped = s.images, s.step, s.skipped
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.steps += 1
        loss = loss.detach()
        self.loss += loss.double() * len(labels)
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.images += len(labels)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.steps, self.first_bad)

    def read(self) -> tuple[float, float]:
        """Mean loss and accuracy; a sync point."""
        n = max(self.images, 1)
        return self.loss.item() / n, self.correct.item() / n

    def first_non_finite(self) -> int | None:
        """The step (1-based, in this epoch) whose loss was first NaN/inf, or None; a sync point."""
        step = int(self.first_bad)
        return None if step < 0 else step

    def progress(self, seconds: float) -> EpochProgress:
        return EpochProgress(self.steps, self.loss.item(), int(self.correct), self.images, seconds, self.skipped)


def progress_enabled(setting: str) -> bool | None:
    """run.progress -> tqdm's switch: None lets tqdm decide (shown on a terminal only)."""
    return {"auto": None, "on": True, "off": False}[setting]


def progress_bar(total: int, desc: str, enabled: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=None if enabled is None else not enabled,
                dynamic_ncols=True)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, augment: BatchAugment,
               optimizer: torch.optim.Optimizer, loss_fn: nn.Module, amp: Amp) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment, forward, backward and one optimizer step; returns (loss, logits), still on the device."""
    inputs = augment.train(images)
    with amp.autocast():
        logits = model(inputs)
        loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    amp.scaler.scale(loss).backward()
    amp.scaler.step(optimizer)
    amp.scaler.update()
    return loss, logits


def train_one_epoch(model: nn.Module, loader: Any, augment: BatchAugment, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, amp: Amp,
                    desc: str = "train", progress: bool | None = None, start: EpochProgress | None = None,
                    stop: Callable[[], bool] | None = None, ema: WeightEMA | None = None,
                    lookahead: Lookahead | None = None, total_steps: int = 0) -> PassStats:
    """One pass over `loader` with SGD steps; returns mean loss/accuracy over the epoch's batches.

    `start` continues an epoch interrupted after `start.step` steps: the loader replays the same order and
    those batches are skipped. When `stop()` becomes true the epoch ends after the current step
    (`finished` False, `progress` saying how far it got). A NaN/inf loss raises NonFiniteLoss. `ema`, when
    given, is updated after every step (from the plain module: `ema` must not hold a compiled/DDP wrapper);
    `lookahead` likewise, counting the scheduler's steps out of the run's `total_steps`.
    """
    model.train()
    start = start or EpochProgress()
    totals = _Totals(amp.device, start)
    # On a CPU every step is synchronous anyway; on a GPU reading the loss is a sync, so only every few steps.
    check_every = 1 if amp.device.type == "cpu" else PROGRESS_EVERY
    began, lrs = time.perf_counter(), {}
    if start.step < len(loader):
        with epoch(loader) as batches, progress_bar(len(loader), desc, progress) as bar:
            bar.update(start.step)
            for step, (images, labels) in enumerate(batches, 1):
                if step <= start.step:
                    continue  # done before the interruption
                lrs[step] = scheduler.get_last_lr()[0]
                scale = amp.scaler.get_scale() if amp.scaler.is_enabled() else 0.0  # fp16 only (steps sync anyway)
                loss, logits = train_step(model, images, labels, augment, optimizer, loss_fn, amp)
                totals.skipped += int(amp.scaler.is_enabled() and amp.scaler.get_scale() < scale)
                scheduler.step()
                if lookahead is not None:
                    lookahead.step(_plain(model), scheduler.last_epoch, total_steps)
                if ema is not None:
                    ema.update(_plain(model))
                totals.add(loss, logits, labels)
                if step % check_every == 0 or step == len(loader):
                    _check_finite(totals, lrs, len(loader))
                if not bar.disable and (step % PROGRESS_EVERY == 0 or step == len(loader)):
                    loss_avg, acc = totals.read()  # sync point, only while a progress bar is shown
                    bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}", refresh=False)
                    bar.update(step - bar.n)
                if stop is not None and stop() and step < len(loader):
                    break
    _sync(amp.device)
    _check_finite(totals, lrs, len(loader))
    seconds = start.seconds + time.perf_counter() - began
    loss_avg, acc = totals.read()
    return PassStats(loss_avg, acc, totals.images, seconds, totals.steps == len(loader), totals.progress(seconds))


def _plain(model: nn.Module) -> nn.Module:
    """The module under torch.compile and DDP wrappers (same parameters)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, DistributedDataParallel) else model


def _check_finite(totals: _Totals, lrs: dict[int, float], steps: int) -> None:
    bad = totals.first_non_finite()
    if bad is not None:
        raise NonFiniteLoss(f"the loss became NaN/inf at step {bad} of {steps} in this epoch (lr {lrs[bad]:.4g})")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, normalize: Callable[[torch.Tensor], torch.Tensor], loss_fn: nn.Module,
             amp: Amp, stop: Callable[[], bool] | None = None, tta: bool = False, translate: int = 0) -> PassStats:
    """Mean loss and accuracy of `model` on `loader` (eval mode, no augmentation; `tta`, `translate`: the
    test-time views of `evaluation.tta_logits`). Raises StopRequested as soon as `stop()` is true."""
    model.eval()
    totals = _Totals(amp.device)
    start = time.perf_counter()
    with epoch(loader) as batches:
        for images, labels in batches:
            if stop is not None and stop():
                raise StopRequested
            with amp.autocast():
                inputs = normalize(images)
                logits = tta_logits(model, inputs, tta, translate) if tta or translate else model(inputs)
                totals.add(loss_fn(logits, labels), logits, labels)
    _sync(amp.device)
    loss_avg, acc = totals.read()
    return PassStats(loss_avg, acc, totals.images, time.perf_counter() - start)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the model's weights and buffers and of the optimizer state, for `restore`."""
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: tuple[dict, dict]) -> None:
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])


def warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, amp: Amp,
            train_shapes: list[int], test_shapes: list[int], memory_format: torch.memory_format,
            eval_model: nn.Module | None = None) -> float:
    """Run the compiled model on every batch shape the epoch will see (train mode, then eval mode on
    `eval_model`, default `model`), then restore weights, BN statistics and optimizer state; returns the
    seconds it took (compile time)."""
    start = time.perf_counter()
    saved = snapshot(model, optimizer)
    gen = torch.Generator(device=amp.device).manual_seed(12345)  # leaves the global RNG stream alone

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, 32, 32, generator=gen, device=amp.device).to(amp.dtype)
        return x.contiguous(memory_format=memory_format), torch.randint(0, 10, (n,), generator=gen, device=amp.device)

    model.train()
    for n in train_shapes:
        x, y = batch(n)
        with amp.autocast():
            loss = loss_fn(model(x), y)
        amp.scaler.scale(loss).backward()
        optimizer.zero_grad(set_to_none=True)
    tested = model if eval_model is None else eval_model
    tested.eval()
    with torch.no_grad():
        for n in test_shapes:
            x, y = batch(n)
            with amp.autocast():
                loss_fn(tested(x), y)
    restore(model, optimizer, saved)
    _sync(amp.device)
    return time.perf_counter() - start


def _batch_shapes(size: int, batch_size: int) -> list[int]:
    return sorted({min(batch_size, size), size % batch_size} - {0})


# ----------------------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    """What `train` returns: the run directory, one dict per epoch, the trained model (on its device, in
    eval mode after the final test pass; with optim.ema_decay, the averaged weights: the ones tested and
    saved as model.pt), the resolved config and the results.json summary."""

    run_dir: Path
    metrics: list[dict]
    model: nn.Module
    config: Config
    summary: dict

    def predictions(self) -> Predictions:
        """The final test-set predictions (from predictions.npz), e.g. for `plot_misclassified`."""
        return Predictions.load(self.run_dir / "predictions.npz")


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


def _make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "muon":
        muon = {"lr_scale": o.muon_lr / cfg.schedule.max_lr, "momentum": o.muon_momentum, "nesterov": True}
        groups = parameter_groups(model, o.bn_lr_scale, o.bn_weight_decay, o.weight_decay, o.bn_wd_scale, muon)
        # Newton-Schulz in bf16 on a GPU (as airbench and torch.optim.Muon do); fp32 on a CPU, where bf16
        # matmuls are slow without bf16 units and the iteration is ~2% of a step anyway.
        return MuonSGD(groups, lr=cfg.schedule.max_lr, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay, ns_dtype=torch.bfloat16 if device.type == "cuda" else None)
    groups = parameter_groups(model, o.bn_lr_scale, o.bn_weight_decay, o.weight_decay, o.bn_wd_scale)
    return torch.optim.SGD(groups, lr=cfg.schedule.max_lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


class EpochTable:
    """The aligned per-epoch table printed during training."""

    COLUMNS = [("epoch", "{:>5d}"), ("lr", "{:>9.5f}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.2%}"),
               ("test_loss", "{:>9.4f}"), ("test_acc", "{:>8.2%}"), ("epoch_s", "{:>7.1f}"),
               ("train_img_s", "{:>11.0f}")]

    def header(self) -> str:
        widths = [len(fmt.format(0.0 if "d" not in fmt else 0)) for _, fmt in self.COLUMNS]
        return "  ".join(name.rjust(w) for (name, _), w in zip(self.COLUMNS, widths, strict=True))

    def row(self, metrics: dict) -> str:
        return "  ".join(fmt.format(metrics[name]) for name, fmt in self.COLUMNS)


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
            device = torch.device("cuda", dist.local_rank)  # one process per GPU
            torch.cuda.set_device(device)
        if cfg.run.sync_bn and dist.enabled and device.type != "cuda":
            raise ConfigError("run.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on a CPU)")
        if not dist.is_main:
            log = _quiet
        if device.type == "cpu" and cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        amp = Amp(device, resolve_precision(cfg.run.precision, device))
        compiled = resolve_compile(cfg.run.compile, device)
        seed_everything(cfg.run.seed, cfg.run.deterministic)  # same initial weights on every rank
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls/convs left
        start_group(dist, device, cfg.run.dist_timeout_s)
        d = cfg.data
        loaders = make_loaders(d.data_dir, local_batch, d.test_batch_size, d.num_workers, device, cfg.run.seed,
                               d.train_subset, d.test_subset, distributed=dist.enabled)
        run_dir = _open_run_dir(cfg, resume, dist)
        env = rundir.environment(device) | {"world_size": dist.world_size}
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
        model = model.to(device=device, memory_format=_memory_format(cfg))
        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
            if dist.enabled else model
        mode = None if cfg.run.compile_mode == "default" else cfg.run.compile_mode
        forward = torch.compile(wrapped, mode=mode) if compiled else wrapped
        # Each rank draws its own augmentations (rank 0 keeps the single-process stream).
        augment = BatchAugment(augment_settings(d), device, cfg.run.seed + 1_000_003 * dist.rank, amp.dtype,
                               cfg.run.channels_last)
        ranks = f" | {dist.world_size} ranks x {local_batch} images/step" if dist.enabled else ""
        log(f"run dir {run_dir} | device {env['device_name']} ({device}) | {str(amp.dtype).removeprefix('torch.')} "
            f"| channels_last={cfg.run.channels_last} | compile={compiled} | threads {torch.get_num_threads()} | "
            f"{loaders.train_size:,} train / {loaders.test_size:,} test images, {len(loaders.train)} steps/epoch"
            f"{ranks}" + (f" | test accuracy with {method}" if (method := reporting.test_method(cfg)) else ""))
        if dist.is_main:
            rundir.write_json(run_dir / "config.json", cfg.to_dict())
            rundir.record_environment(run_dir / "env.json", env, resumed=resume)
        ema = WeightEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        eval_forward = forward if ema is None else torch.compile(ema.module, mode=mode) if compiled else ema.module
        lookahead = Lookahead(model, cfg.optim.lookahead_every) if cfg.optim.lookahead_every else None
        return cls(cfg, device, amp, loaders, run_dir, env, model, forward, compiled,
                   _make_optimizer(model, cfg, device),
                   nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), augment, dist, local_batch,
                   ema, eval_forward, lookahead)

    def warm_up(self) -> float:
        """Compile (if enabled) on every batch shape of the run; returns seconds spent (0 when eager)."""
        if not self.compiled:
            return 0.0
        shard = math.ceil(self.loaders.train_size / self.dist.world_size)
        test_shard = math.ceil(self.loaders.test_size / self.dist.world_size)
        return warm_up(self.forward, self.optimizer, self.loss_fn, self.amp, _batch_shapes(shard, self.batch_size),
                       _batch_shapes(test_shard, self.cfg.data.test_batch_size), _memory_format(self.cfg),
                       self.eval_forward)


def augment_settings(data: DataConfig) -> AugmentSettings:
    """The augmentation part of the data config (every AugmentSettings field has a DataConfig field of its name)."""
    return AugmentSettings(**{f.name: getattr(data, f.name) for f in dataclasses.fields(AugmentSettings)})


WHITEN_IMAGES = 5000  # training images whose 3x3 patches set the whitening init


def _whiten_init(model: CustomResNet, cfg: Config, device: torch.device, count: int) -> int:
    """Set the prep conv from the patch statistics of the first `count` training images (the same on every
    rank)."""
    d = cfg.data
    loader = make_loader(Path(d.data_dir) / "train.beton", d.test_batch_size, d.num_workers, device, train=False,
                         subset=count)
    normalize = BatchAugment(AugmentSettings(), device, 0, torch.float32, channels_last=False).test
    with epoch(loader) as batches:
        images = torch.cat([normalize(x) for x, _ in batches])
    return whiten_init(model, images.cpu())


def _quiet(_: str) -> None:
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


def train(cfg: Config, log: Callable[[str], None] = print, resume: str | Path | None = None) -> TrainResult:
    """Train the network as `cfg` says, writing the run directory; returns metrics and the model.

    `resume`: a run directory whose checkpoint.pt to continue from (exactly: same batches, same random
    draws); `cfg` may then differ from that run's config only in RESUMABLE_CHANGES (paths, speed settings).
    """
    state = None
    if resume is not None:
        state = load_training_state(resume)
        run_dir = Path(resume)
        cfg = resume_config(Config.from_dict(state["config"]),
                            cfg.override({"run.out_dir": str(run_dir.parent), "run.name": run_dir.name}))
    session = Session.open(cfg, log, resume=state is not None)
    if session.dist.enabled:
        keep_until_exit(session.forward)  # its destructor can deadlock gloo at the end: see distributed._KEPT
    try:
        result = _train(session, state, log if session.dist.is_main else _quiet)
    except BaseException:
        stop_group(wait=False)  # the other ranks may be anywhere: do not wait for them
        raise
    stop_group()
    return result


def _train(session: Session, state: dict | None, log: Callable[[str], None]) -> TrainResult:
    run_dir, s = session.run_dir, session.cfg.schedule
    scheduler = make_scheduler(session.optimizer, len(session.loaders.train), s.epochs, s.peak_epoch, s.min_lr,
                               s.max_lr, s.end_lr)
    compile_seconds = session.warm_up()
    if session.compiled:
        log(f"torch.compile warm-up: {compile_seconds:.1f} s (not counted in epoch times)")
    metrics: list[dict] = []
    progress: EpochProgress | None = None
    if state is not None:  # after the warm-up, which puts back what it changed
        metrics, progress = _restore(session, scheduler, state)
        compile_seconds += state["compile_seconds"]
        if session.dist.is_main:
            rundir.write_jsonl(run_dir / "metrics.jsonl", metrics)  # drops rows logged after the checkpoint
        log(f"resumed {run_dir} after epoch {len(metrics)}"
            + (f", step {progress.step} of epoch {len(metrics) + 1}" if progress else ""))

    ckpt = Checkpointer(session, scheduler, metrics, compile_seconds)
    table = EpochTable()
    log(table.header())
    for row in metrics:
        log(table.row(row))
    with StopSignals() as signals:
        # On a CPU every step is synchronous anyway; on GPUs agreeing is a sync, so every few steps.
        stop = AgreedStop(signals, session.dist, session.device, 1 if session.device.type == "cpu" else PROGRESS_EVERY)
        for ep in range(len(metrics) + 1, s.epochs + 1):
            row = _train_epoch(session, scheduler, ep, progress, stop, ckpt)
            progress = None
            metrics.append(row)
            if session.dist.is_main:
                rundir.append_jsonl(run_dir / "metrics.jsonl", row)
            log(table.row(row))
            ckpt.end_of_epoch(ep, row["test_acc"])
            if stop():
                ckpt.interrupt(stop, ep, None)
    return _finish(session, metrics, ckpt.compile_seconds, log)


def _train_epoch(session: Session, scheduler: torch.optim.lr_scheduler.LRScheduler, ep: int,
                 start: EpochProgress | None, stop: AgreedStop, ckpt: Checkpointer) -> dict:
    """Epoch `ep` (1-based): training, then the test pass; a signal saves a checkpoint and raises."""
    s = session.cfg.schedule
    loader = session.loaders.train
    loader.next_epoch = ep - 1  # FFCV's shuffle of epoch e depends only on (seed, e): resumable
    session.augment.epoch = ep - 1  # alternating flips depend on it
    lr = float(one_cycle_lr((ep - 1) * len(loader), len(loader), s.epochs, s.peak_epoch, s.min_lr, s.max_lr,
                            s.end_lr))  # at the epoch's first step, also when resuming in its middle
    try:
        tr = train_one_epoch(session.forward, loader, session.augment, session.optimizer, scheduler,
                             session.loss_fn, session.amp, f"epoch {ep}/{s.epochs}",
                             progress_enabled(session.cfg.run.progress), start, stop, session.ema,
                             session.lookahead, s.epochs * len(loader))
    except NonFiniteLoss as err:
        kept = f"the last checkpoint ({ckpt.path}) is intact" if ckpt.path.exists() else "no checkpoint was written"
        raise NonFiniteLoss(f"training diverged in epoch {ep}: {err}; {kept}. Lower --max-lr (see python -m "
                            f"fastcifar.find_lr), use --precision fp32, or add --model.logit_scale 0.125") from None
    if not tr.finished or stop():
        ckpt.interrupt(stop, ep - 1, tr.progress)
    if session.lookahead is not None and ep == s.epochs:
        session.lookahead.finish(session.model)  # the slow weights are the run's result (idempotent on resume)
    try:
        te = evaluate(session.eval_forward, session.loaders.test, session.augment.test, session.loss_fn, session.amp,
                      stop, session.cfg.data.test_flip, session.cfg.data.test_translate)
    except StopRequested:
        ckpt.interrupt(stop, ep - 1, tr.progress)  # training part done: resume redoes only the test pass
    skipped = int(all_sum([tr.progress.skipped], session.dist, session.device)[0])
    tr, te = _over_ranks(tr, session), _over_ranks(te, session)
    return {"epoch": ep, "lr": lr, "lr_end": scheduler.get_last_lr()[0], "train_loss": tr.loss,
            "train_acc": tr.accuracy, "test_loss": te.loss, "test_acc": te.accuracy,
            "train_s": tr.seconds, "test_s": te.seconds, "epoch_s": tr.seconds + te.seconds,
            "train_img_s": tr.images / tr.seconds, "test_img_s": te.images / te.seconds,
            "skipped_steps": skipped}


def _over_ranks(stats: PassStats, session: Session) -> PassStats:
    """Loss/accuracy over every rank's images, time of the slowest rank (the stats themselves alone)."""
    if not session.dist.enabled:
        return stats
    loss_sum, correct, images = all_sum([stats.loss * stats.images, stats.accuracy * stats.images, stats.images],
                                        session.dist, session.device)
    seconds = all_max(stats.seconds, session.dist, session.device)
    return dataclasses.replace(stats, loss=loss_sum / images, accuracy=round(correct) / images, images=int(images),
                               seconds=seconds)


class Checkpointer:
    """Writes checkpoint.pt (full training state) and best.pt (weights of the best test accuracy)."""

    def __init__(self, session: Session, scheduler: torch.optim.lr_scheduler.LRScheduler, metrics: list[dict],
                 compile_seconds: float) -> None:
        self.session, self.scheduler, self.metrics = session, scheduler, metrics
        self.compile_seconds = compile_seconds
        self.path = session.run_dir / CHECKPOINT
        self.best = max((m["test_acc"] for m in metrics), default=-1.0)

    def save(self, epochs_done: int, progress: EpochProgress | None) -> None:
        """Every rank calls this (its RNG states and epoch sums are gathered); rank 0 writes the file."""
        s = self.session
        ranks = gather({"rng": rng_states(s.augment.generator), "progress": progress.to_dict() if progress else None},
                       s.dist)
        if s.dist.is_main:
            save_training_state(self.path, cfg=s.cfg, model=s.model, optimizer=s.optimizer, scheduler=self.scheduler,
                                scaler=s.amp.scaler, augment_generator=s.augment.generator, epochs_done=epochs_done,
                                progress=progress, metrics=self.metrics, compile_seconds=self.compile_seconds,
                                ranks=ranks, ema=s.ema.state_dict() if s.ema is not None else None,
                                lookahead=s.lookahead.state_dict() if s.lookahead is not None else None)

    def end_of_epoch(self, ep: int, test_acc: float) -> None:
        every, epochs = self.session.cfg.run.checkpoint_every, self.session.cfg.schedule.epochs
        if every and (ep % every == 0 or ep == epochs):
            self.save(ep, None)
        if test_acc > self.best:
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


def _restore(session: Session, scheduler: torch.optim.lr_scheduler.LRScheduler,
             state: dict) -> tuple[list[dict], EpochProgress | None]:
    session.model.load_state_dict(state["model"])
    session.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
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


def _finish(session: Session, metrics: list[dict], compile_seconds: float,
            log: Callable[[str], None]) -> TrainResult:
    """The final weights, predictions, results.json (marks the run finished) and the report."""
    cfg, run_dir, model, dist = session.cfg, session.run_dir, session.model, session.dist
    # DDP keeps the weights equal on every rank; check it (batch-norm statistics are per rank: rank 0's are kept).
    checksums = gather(sum(float(p.detach().double().sum()) for p in model.parameters()), dist)
    result = _summarise(metrics, compile_seconds, count_parameters(model)) | {
        "steps_per_epoch": len(session.loaders.train), "world_size": dist.world_size}
    if dist.enabled:
        result["rank_weight_checksums"] = checksums
        if len(set(checksums)) != 1:
            raise FastCifarError(f"weights differ across ranks after training ({checksums}); this is a bug")
    if not dist.is_main:
        broadcast(None, dist)  # wait for rank 0's files
        return TrainResult(run_dir, metrics, session.tested, cfg, result)
    rundir.save_checkpoint(run_dir / "model.pt", {"model": session.tested.state_dict(), "config": cfg.to_dict(),
                                                  "epoch": cfg.schedule.epochs})
    # One more, untimed test pass that keeps every prediction, for the report (confusion, misclassified);
    # on rank 0 over the whole test set, also in a distributed run.
    test = session.loaders.test if not dist.enabled else make_loader(
        Path(cfg.data.data_dir) / "test.beton", cfg.data.test_batch_size, cfg.data.num_workers, session.device,
        train=False, subset=cfg.data.test_subset)
    predict(session.eval_forward, test, session.augment.test, session.amp.autocast, cfg.data.test_flip,
            cfg.data.test_translate).save(
        run_dir / "predictions.npz")
    rundir.write_json(run_dir / "results.json", result)
    reporting.write_report(run_dir)
    method = f" with {m}" if (m := reporting.test_method(cfg)) else ""
    log(f"final test accuracy{method} {result['final_test_acc']:.2%} (best {result['best_test_acc']:.2%}) | "
        f"{result['train_seconds']:.0f} s training, {result['total_seconds']:.0f} s in epochs, "
        f"{result['mean_train_img_s']:.0f} img/s | {run_dir}")
    broadcast(None, dist)
    return TrainResult(run_dir, metrics, session.tested, cfg, result)


def _summarise(metrics: list[dict], compile_seconds: float, parameters: int) -> dict:
    total = sum(m["epoch_s"] for m in metrics)
    train_s = sum(m["train_s"] for m in metrics)
    images = sum(m["train_img_s"] * m["train_s"] for m in metrics)
    return {
        "epochs": len(metrics),
        "final_test_acc": metrics[-1]["test_acc"],
        "best_test_acc": max(m["test_acc"] for m in metrics),
        "final_test_loss": metrics[-1]["test_loss"],
        "train_seconds": train_s,
        "total_seconds": total,
        "compile_seconds": compile_seconds,
        "mean_train_img_s": images / train_s,
        "parameters": parameters,
        # the first epoch whose test accuracy reaches each mark, and the seconds in epochs up to it (+ compile)
        "time_to_test_acc": {f"{mark:.2f}": dict(zip(("epoch", "seconds"), time_to(metrics, mark, compile_seconds),
                                                     strict=True)) for mark in ACCURACY_MARKS},
    }


ACCURACY_MARKS = (0.90, 0.91, 0.92, 0.93, 0.94)


def time_to(metrics: list[dict], target: float, start_seconds: float = 0.0) -> tuple[int | None, float | None]:
    """The first epoch whose test accuracy reaches `target` and the seconds spent in epochs up to and
    including it (plus `start_seconds`, e.g. the compile warm-up); (None, None) if no epoch does."""
    elapsed = start_seconds
    for m in metrics:
        elapsed += m["epoch_s"]
        if m["test_acc"] >= target:
            return m["epoch"], elapsed
    return None, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastcifar.train",
        description="Train the custom ResNet on CIFAR-10 (betons from data_prep/write_beton.py).",
        epilog="Every config field is a dotted flag, e.g. --optim.weight_decay 1e-3 (see fastcifar/config.py).",
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR/checkpoint.pt")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> TrainResult:
        if args.resume is None:
            return train(config_from_args(args))
        # The interrupted run's config, with only the options given now changed (checked in train).
        saved = load_training_state(args.resume)["config"]
        return train(config_from_args(args, base=Config.from_dict(saved)), resume=args.resume)

    code = run_cli(run)
    if from_env().enabled:  # every file is written and closed; skip the gloo/DDP teardown (distributed._KEPT)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
