"""Epoch time end to end: training steps with data loading and augmentation, plus the full test pass.

The usual way (data path a + fp32 eager NCHW model) against fastcifar's default on the device with each
loader kind (FFCV, resident), same model, same batch size, same number of steps (on a GPU: whole
epochs). Both run `steps` timed training steps from the start of an
epoch (after an untimed warm-up: loader start-up, JIT, compilation) and one whole test pass, and the
projected epoch time is train time per step x steps per epoch + test pass. Where the device is the CPU,
host timers also split the training time into waiting for data, augmentation and the model step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.data_paths import torch_loader
from benchmarks.step_throughput import training_model
from fastcifar.augment import BatchAugment
from fastcifar.calibrate import choose
from fastcifar.config import DEFAULT_PRESET, Config, ModelConfig
from fastcifar.custom_resnet import CustomResNet
from fastcifar.data import open_split
from fastcifar.loop import PassThrough, Trainer, batch_shapes, test_pass, train_step, warm_up
from fastcifar.runtime import Amp, compile_model
from fastcifar.session import make_trainer


@dataclass
class EndToEndResult:
    name: str
    steps: int
    train_s: float  # the timed steps
    data_s: float  # waiting for the next batch (host time)
    augment_s: float  # on-device augmentation (host time: exact on a CPU, launch time only on a GPU)
    test_s: float  # one whole test pass
    steps_per_epoch: int

    @property
    def epoch_s(self) -> float:
        return self.train_s / self.steps * self.steps_per_epoch + self.test_s

    @property
    def overhead(self) -> float:
        """Data wait + augmentation + test pass, as a fraction of the projected epoch."""
        per_step = (self.data_s + self.augment_s) / self.steps
        return (per_step * self.steps_per_epoch + self.test_s) / self.epoch_s


class _TimedAugment:
    """Wraps BatchAugment to add up the time spent in `train` (host time)."""

    def __init__(self, inner: BatchAugment) -> None:
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str) -> object:  # generator, normalize, side_at...: the wrapped augmentation's
        return getattr(self.inner, name)

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:  # the warm-up and the epoch set it on the augmentation itself
        self.inner.epoch = value

    def train(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.inner.train(images)
        self.seconds += time.perf_counter() - start
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_steps(batches, steps: int, step_fn, device: torch.device) -> tuple[float, float]:
    """(total seconds, seconds waiting for data) of `steps` steps."""
    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        images, labels = next(batches)
        waited += time.perf_counter() - t
        step_fn(images, labels)
    _sync(device)
    return time.perf_counter() - start, waited


def usual_way(arrays: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int, workers: int, steps: int,
              device: torch.device, widths: tuple[int, int, int, int]) -> EndToEndResult:
    torch.manual_seed(0)
    model = CustomResNet(ModelConfig(widths=widths)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    # fastcifar's step with nothing of fastcifar's around it: fp32, the batches augmented and normalised by the
    # DataLoader's workers, as they come
    trainer = Trainer(model, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), loss_fn,
                      PassThrough(), Amp(device, torch.float32))
    train = torch_loader(*arrays["train"], batch_size, workers, device)
    test = torch_loader(*arrays["test"], 1024, workers, device, train=False)
    steps = min(steps, len(train))

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        train_step(trainer, images.to(device, non_blocking=True), labels.to(device, non_blocking=True))

    model.train()
    _train_steps(iter(train), min(2, len(train)), step, device)  # warm-up: worker start-up, allocations
    train_s, data_s = _train_steps(iter(train), steps, step, device)
    model.eval()
    next(iter(test))  # warm-up of the test loader's workers
    start = time.perf_counter()
    with torch.no_grad():
        for images, labels in test:
            model(images.to(device, non_blocking=True)).argmax(1).eq(labels.to(device)).sum()
    _sync(device)
    return EndToEndResult("usual (torch DataLoader + fp32 eager NCHW)", steps, train_s, data_s, 0.0,
                          time.perf_counter() - start, len(train))


def fastcifar_default(data_dir: Path, batch_size: int, steps: int, device: torch.device,
                      widths: tuple[int, int, int, int], kind: str = "ffcv") -> EndToEndResult:
    """An epoch of the default preset as `python -m fastcifar.train` runs it: its precision, compile and filter
    gradient choices, frozen layers, augmentation, label-smoothed loss and optimizer groups, and a test pass with
    flip TTA (two views of every test image), as `fast` tests after every epoch. The default recipe, `fast12`, tests
    once, after its last epoch, with six views (flip x translation); a per-epoch flip-TTA pass keeps this benchmark
    comparable with its earlier records and with the usual way's per-epoch test pass."""
    cfg = Config.from_preset(DEFAULT_PRESET, {"model.widths": ",".join(map(str, widths)), "data.loader": kind,
                                              "data.data_dir": str(data_dir), "data.batch_size": batch_size,
                                              "data.test_translate": 0})
    choice = choose(cfg.run, cfg.model, device, batch_size, frozen_prep=cfg.model.whiten_frozen, log=lambda _: None)
    amp, compiled, im2col = Amp(device, choice.dtype), choice.compile, choice.conv_grad == "im2col"
    torch.manual_seed(0)
    model = training_model(cfg, device, choice.way)
    forward = compile_model(model, cfg.run.compile_mode) if compiled else model
    # num_workers 0: fastcifar's auto; steps 0: the whole epoch (the default on a GPU, where steps are ms)
    test_batch = cfg.data.test_batch_size
    train, test = open_split(cfg.data, "train", device), open_split(cfg.data, "test", device)
    steps = min(steps or len(train), len(train))
    augment = _TimedAugment(BatchAugment(cfg.data, device, 0, amp.dtype, choice.channels_last))
    trainer = make_trainer(cfg, model, forward, augment, amp, len(train), compiled)
    if compiled:
        warm_up(trainer, batch_shapes(train.images, batch_size), batch_shapes(test.images, test_batch))

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        train_step(trainer, images, labels)

    model.train()
    with train.epoch() as batches:  # warm-up: FFCV's JIT compilation, allocations
        _train_steps(batches, min(2, len(train)), step, device)
    with test.epoch() as batches:  # the test loader's JIT compilation
        next(batches)
    augment.seconds = 0.0
    with train.epoch() as batches:
        train_s, data_s = _train_steps(batches, steps, step, device)
    test_stats = test_pass(forward, test, normalize=augment.inner.normalize, loss_fn=trainer.loss_fn, amp=amp,
                           flip=cfg.data.test_flip, translate=cfg.data.test_translate)
    views = (2 if cfg.data.test_flip else 1) * (3 if cfg.data.test_translate else 1)  # inference.tta_logits
    layout = "channels_last" if choice.channels_last else "contiguous"
    name = (f"fastcifar default ({str(amp.dtype).removeprefix('torch.')}, {layout}, compile={compiled}, "
            f"{'im2col filter grads at 4x4, ' if im2col else ''}{views} test view{'s' if views > 1 else ''}, "
            f"{kind} loader)")
    return EndToEndResult(name, steps, train_s, data_s, augment.seconds, test_stats.seconds, len(train))
