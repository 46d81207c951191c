"""The parts the training loop is made of: `Trainer` (what it steps), `train_step` (THE training step: training,
the warm-up, the LR finder, the benchmarks and the GPU check all call this one), the device-side sums of an
epoch, the test pass, and the compile warm-up. The epoch itself reads top to bottom in fastcifar/training.py.

One step, in order (it reads straight through `train_step`): uint8 batch from the loader (already on the
device) -> augment on the device (crop + flip + cutout as one gather) -> normalise to the compute dtype ->
forward under autocast -> loss -> backward -> optimizer step. Loss and accuracy are summed on the device
(`EpochTotals`) and read once per epoch: reading them every step would make the host wait for the GPU each step
(a progress bar reads them every `PROGRESS_EVERY` steps, and only while it is shown).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastcifar.augment import BatchAugment
from fastcifar.checkpoint import EpochProgress, NonFiniteLoss
from fastcifar.data import BatchLoader
from fastcifar.ema import Lookahead, WeightEMA
from fastcifar.inference import tta_logits
from fastcifar.prune import EasyPruner
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


class StopRequested(Exception):
    """A signal asked the test pass to stop (it is abandoned and redone on resume)."""


class EpochTotals:
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


@dataclass
class Trainer:
    """The one holder of what a training step needs: the model as called (maybe compiled / DDP-wrapped) and
    its plain module, the optimizer and its LR schedule, the loss, the augmentation and the precision policy;
    and what the epoch updates after each step: the optional weight averages. `eval_model` is what the test
    passes call (the EMA copy, when there is one); `total_steps`, the run's length (the lookahead's schedule);
    `lr_at(step)`, the schedule's LR at an optimizer step (the epoch's row reports it)."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    augment: BatchAugment | PassThrough
    amp: Amp
    eval_model: nn.Module | None = None
    ema: WeightEMA | None = None
    lookahead: Lookahead | None = None
    total_steps: int = 0
    lr_at: Callable[[int], float] = field(default=lambda step: float("nan"))
    pruner: EasyPruner | None = None  # data.prune_fraction: the per-example losses and each epoch's kept examples

    def __post_init__(self) -> None:
        if self.eval_model is None:
            self.eval_model = self.model

    @property
    def tested(self) -> nn.Module:
        """The plain module whose weights are tested and saved (the EMA copy with optim.ema_decay)."""
        return self.ema.module if self.ema is not None else self.module


class PassThrough:
    """An augmentation that leaves batches as they come (already float, normalised, on the device): for timing the
    network's step alone (the benchmarks' bare variants) or behind another pipeline's augmentation."""

    epoch = 0

    def side_at(self, epoch: int, full: int = 32) -> int:
        return full

    def train(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images


def train_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """THE training step: augment, forward, backward and one optimizer step; returns (loss, logits), still on the
    device (reading them is a host sync). The caller steps the schedule and the weight averages. `weights`: each
    example's loss weight (pruning's rescaled kept examples); the loss is then the weighted per-example mean."""
    t = trainer
    inputs = t.augment.train(images)
    with t.amp.autocast():
        logits = t.model(inputs)
        if weights is None:
            loss = t.loss_fn(logits, labels)
        else:
            per_example = F.cross_entropy(logits, labels, label_smoothing=t.loss_fn.label_smoothing, reduction="none")
            loss = (per_example * weights).mean()
    t.optimizer.zero_grad(set_to_none=True)
    t.amp.scaler.scale(loss).backward()
    t.amp.scaler.step(t.optimizer)
    t.amp.scaler.update()
    return loss, logits


def scale_before(amp: Amp) -> torch.Tensor | None:
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


def check_finite(totals: EpochTotals, lrs: dict[int, float], steps: int) -> None:
    """NonFiniteLoss naming the first step whose loss was NaN/inf, if any (a sync point)."""
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
    totals = EpochTotals(amp.device)
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


def warm_up(trainer: Trainer, train_shapes: list[int], test_shapes: list[int], repeats: int = 1,
            epochs: tuple[int, ...] = (0,)) -> float:
    """Run `train_step` on every batch shape the run will see (random uint8 images; with the augmentation set to each
    of `epochs`, 0-based, one per image size of progressive resizing), then the test model in eval mode, `repeats`
    times each, so that torch.compile builds its graphs now; then put back weights, BN statistics, optimizer,
    GradScaler, augmentation generator and epoch. Returns the seconds it took (compile time)."""
    t, amp = trainer, trainer.amp
    start = time.perf_counter()
    saved = snapshot(t.module, t.optimizer)
    scaler, generator = copy.deepcopy(amp.scaler.state_dict()), t.augment.generator.get_state()
    gen = torch.Generator(device=amp.device).manual_seed(12345)  # leaves the global RNG stream alone

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen, device=amp.device)
        return x.permute(0, 3, 1, 2), torch.randint(0, 10, (n,), generator=gen, device=amp.device)

    t.model.train()
    epoch_was = t.augment.epoch
    for epoch in epochs:
        t.augment.epoch = epoch
        for n in train_shapes:
            images, labels = batch(n)
            for _ in range(repeats):
                train_step(t, images, labels)
    t.augment.epoch = epoch_was
    t.eval_model.eval()
    with torch.no_grad():
        for n in test_shapes:
            images, labels = batch(n)
            for _ in range(repeats):
                with amp.autocast():
                    t.loss_fn(t.eval_model(t.augment.normalize(images)), labels)
    restore(t.module, t.optimizer, saved)
    if amp.scaler.is_enabled():
        amp.scaler.load_state_dict(scaler)
    t.augment.generator.set_state(generator)
    sync(amp.device)
    return time.perf_counter() - start


def batch_shapes(size: int, batch_size: int) -> list[int]:
    """The batch sizes an epoch of `size` images in batches of `batch_size` has (the last may be smaller)."""
    return sorted({min(batch_size, size), size % batch_size} - {0})
