"""The step loops: one training step, one training epoch, one test pass, and the compile warm-up.

One step, in order (it reads straight through `train_step`): uint8 batch from the loader (already on the
device) -> augment on the device (crop + flip + cutout as one gather) -> normalise to the compute dtype ->
forward under autocast -> loss -> backward -> optimizer step; `train_one_epoch` then steps the LR schedule
and the weight averages. Loss and accuracy are summed on the device and read once per epoch: reading them
every step would make the host wait for the GPU each step (a progress bar reads them every
`PROGRESS_EVERY` steps, and only while it is shown).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastcifar.augment import BatchAugment
from fastcifar.checkpoint import EpochProgress
from fastcifar.data import BatchLoader
from fastcifar.ema import Lookahead, WeightEMA
from fastcifar.errors import FastCifarError
from fastcifar.inference import tta_logits
from fastcifar.runtime import Amp, sync

PROGRESS_EVERY = 10  # steps between progress-bar updates (each one is a host-device sync on a GPU)
CHECK_EVERY_GPU = 50  # steps between the NaN/inf checks on a GPU (each is a sync)


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
        self.images, self.steps = s.images, s.step
        self.skipped_on_device = torch.tensor(s.skipped, dtype=torch.int64, device=device)  # fp16 steps skipped
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
        return EpochProgress(self.steps, self.loss.item(), int(self.correct), self.images, seconds,
                             int(self.skipped_on_device))


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


@dataclass
class Trainer:
    """What the training loop steps: the model as called (maybe compiled / DDP-wrapped), its optimizer and
    schedule, the loss, the augmentation, the precision policy, and the optional weight averages (updated
    from the plain module after every step). `total_steps`: the run's length, for the lookahead's schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    augment: BatchAugment
    amp: Amp
    ema: WeightEMA | None = None
    lookahead: Lookahead | None = None
    total_steps: int = 0


def train_one_epoch(trainer: Trainer, loader: BatchLoader, *, epoch: int = 0, desc: str = "train",
                    show_progress: bool | None = None, start: EpochProgress | None = None,
                    stop: Callable[[], bool] | None = None) -> PassStats:
    """Epoch `epoch` (0-based) of `loader` with optimizer steps; returns mean loss/accuracy over its batches.

    `start` continues an epoch interrupted after `start.step` steps: the loader replays the same epoch from
    that batch on. When `stop()` becomes true the epoch ends after the current step (`finished` False,
    `progress` saying how far it got). A NaN/inf loss raises NonFiniteLoss.
    """
    t, amp = trainer, trainer.amp
    t.model.train()
    t.augment.epoch = epoch  # alternating flips depend on it
    start = start or EpochProgress()
    totals = _Totals(amp.device, start)
    # On a CPU every step is synchronous anyway; on a GPU reading the loss is a sync, so rarely: the first
    # non-finite step is recorded on the device either way, and the error names it.
    check_every = 1 if amp.device.type == "cpu" else CHECK_EVERY_GPU
    began, lrs, steps = time.perf_counter(), {}, len(loader)
    if start.step < steps:
        with loader.epoch(epoch, skip=start.step) as batches, progress_bar(steps, desc, show_progress) as bar:
            bar.update(start.step)
            for step, (images, labels) in enumerate(batches, start.step + 1):
                lrs[step] = t.scheduler.get_last_lr()[0]
                scale = _scale_before(amp)
                loss, logits = train_step(t.model, images, labels, t.augment, t.optimizer, t.loss_fn, amp)
                if scale is not None:  # fp16: the GradScaler lowered its scale = it skipped this step (on device)
                    totals.skipped_on_device += (amp.scaler._scale < scale).sum()
                t.scheduler.step()
                if t.lookahead is not None:
                    t.lookahead.step(plain_module(t.model), t.scheduler.last_epoch, t.total_steps)
                if t.ema is not None:
                    t.ema.update(plain_module(t.model))
                totals.add(loss, logits, labels)
                if step % check_every == 0 or step == steps:
                    _check_finite(totals, lrs, steps)
                if not bar.disable and (step % PROGRESS_EVERY == 0 or step == steps):
                    loss_avg, acc = totals.read()  # sync point, only while a progress bar is shown
                    bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}", refresh=False)
                    bar.update(step - bar.n)
                if stop is not None and stop() and step < steps:
                    break
    sync(amp.device)
    _check_finite(totals, lrs, steps)
    seconds = start.seconds + time.perf_counter() - began
    loss_avg, acc = totals.read()
    return PassStats(loss_avg, acc, totals.images, seconds, totals.steps == steps, totals.progress(seconds))


def _scale_before(amp: Amp) -> torch.Tensor | None:
    """A copy of the fp16 GradScaler's scale tensor before a step (None without fp16). Compared with the scale
    after the step, on the device: no host sync (get_scale() would be one)."""
    if not amp.scaler.is_enabled():
        return None
    scale = getattr(amp.scaler, "_scale", None)
    if scale is None:  # before the first step: the initial scale (get_scale() reads it without a sync then)
        return torch.full((1,), amp.scaler.get_scale(), dtype=torch.float32, device=amp.device)
    return scale.clone()


def plain_module(model: nn.Module) -> nn.Module:
    """The module under torch.compile and DDP wrappers (same parameters)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, DistributedDataParallel) else model


def _check_finite(totals: _Totals, lrs: dict[int, float], steps: int) -> None:
    bad = totals.first_non_finite()
    if bad is not None:
        raise NonFiniteLoss(f"the loss became NaN/inf at step {bad} of {steps} in this epoch (lr {lrs[bad]:.4g})")


@torch.no_grad()
def test_pass(model: nn.Module, loader: BatchLoader, *, normalize: Callable[[torch.Tensor], torch.Tensor],
              loss_fn: nn.Module, amp: Amp, stop: Callable[[], bool] | None = None, flip: bool = False,
              translate: int = 0) -> PassStats:
    """Mean loss and accuracy of `model` on `loader` (eval mode, no augmentation; `flip`, `translate`: the
    test-time views of `inference.tta_logits`). Raises StopRequested as soon as `stop()` is true."""
    model.eval()
    totals = _Totals(amp.device)
    start = time.perf_counter()
    with loader.epoch() as batches:
        for images, labels in batches:
            if stop is not None and stop():
                raise StopRequested
            with amp.autocast():
                inputs = normalize(images)
                logits = tta_logits(model, inputs, flip, translate) if flip or translate else model(inputs)
                totals.add(loss_fn(logits, labels), logits, labels)
    sync(amp.device)
    loss_avg, acc = totals.read()
    return PassStats(loss_avg, acc, totals.images, time.perf_counter() - start)


test_pass.__test__ = False  # pytest: a function named test_* that is not a test


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the model's weights and buffers and of the optimizer state, for `restore`."""
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: tuple[dict, dict]) -> None:
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])


def warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, amp: Amp,
            train_shapes: list[int], test_shapes: list[int], memory_format: torch.memory_format,
            eval_model: nn.Module | None = None, repeats: int = 1) -> float:
    """Run the compiled model on every batch shape the epoch will see (train mode, then eval mode on
    `eval_model`, default `model`), `repeats` times each, then restore weights, BN statistics and optimizer
    state; returns the seconds it took (compile time)."""
    start = time.perf_counter()
    saved = snapshot(model, optimizer)
    gen = torch.Generator(device=amp.device).manual_seed(12345)  # leaves the global RNG stream alone

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, 32, 32, generator=gen, device=amp.device).to(amp.dtype)
        return x.contiguous(memory_format=memory_format), torch.randint(0, 10, (n,), generator=gen, device=amp.device)

    model.train()
    for n in train_shapes:
        x, y = batch(n)
        for _ in range(repeats):
            with amp.autocast():
                loss = loss_fn(model(x), y)
            amp.scaler.scale(loss).backward()
            optimizer.zero_grad(set_to_none=True)
    tested = model if eval_model is None else eval_model
    tested.eval()
    with torch.no_grad():
        for n in test_shapes:
            x, y = batch(n)
            for _ in range(repeats):
                with amp.autocast():
                    loss_fn(tested(x), y)
    restore(model, optimizer, saved)
    sync(amp.device)
    return time.perf_counter() - start


def batch_shapes(size: int, batch_size: int) -> list[int]:
    """The batch sizes an epoch of `size` images in batches of `batch_size` has (the last may be smaller)."""
    return sorted({min(batch_size, size), size % batch_size} - {0})
