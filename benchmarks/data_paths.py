"""Four ways to feed augmented CIFAR-10 training batches to a model, measured in images/s (no model).

Each path delivers what a training step consumes: normalised float32 batches [N, 3, 32, 32] on the
device, after pad-4 random crop, horizontal flip and one 8x8 cutout per image.

  a. torch   the usual PyTorch way: a per-sample Dataset doing numpy pad/crop/flip/cutout/normalise
             on each image in DataLoader worker processes, default collate, then .to(device);
  b. ffcv    FFCV with its built-in per-image CPU ops (RandomTranslate, RandomHorizontalFlip, Cutout,
             NormalizeImage; numba-compiled, run in FFCV's threads), then to the device;
  c. ours    fastcifar: FFCV only decodes uint8 and moves it to the device; fastcifar.augment crops,
             flips, cuts out and normalises whole batches there. With fastcifar's default decode
             threads (auto: 1 on a CPU); a and b use --workers.
  d. resident fastcifar's resident loader: the whole training set on the device as one uint8 tensor,
             a device permutation per epoch, batches gathered from it, then the same batch augmentation
             as c. No FFCV, no worker threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment
from fastcifar.config import DataConfig
from fastcifar.data import make_loader, make_resident_loader
from fastcifar.ffcv_io import FfcvLoader, keep_torch_threads

MEAN = np.array(CIFAR10_MEAN, np.float32)
STD = np.array(CIFAR10_STD, np.float32)
PATHS = ("torch", "ffcv", "ours", "resident")


class AugmentedCifar(torch.utils.data.Dataset):
    """Per-sample augmentation as most tutorials write it (torchvision-style, in numpy)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool = True) -> None:
        self.images, self.labels, self.train = images, labels, train  # images uint8 [N, 32, 32, 3]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = (self.images[i].astype(np.float32) / 255 - MEAN) / STD
        if self.train:
            rng = np.random.default_rng()  # a fresh stream per call: workers must not share draws
            x = np.pad(x, ((4, 4), (4, 4), (0, 0)))  # zeros after normalisation = the mean colour
            top, left = rng.integers(0, 9, size=2)
            x = x[top:top + 32, left:left + 32]
            if rng.random() < 0.5:
                x = x[:, ::-1]
            cy, cx = rng.integers(0, 32, size=2)
            x = x.copy()
            x[max(cy - 4, 0):cy + 4, max(cx - 4, 0):cx + 4] = 0.0
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(self.labels[i])


def ffcv_augmenting_loader(path: Path, batch_size: int, workers: int, device: torch.device,
                           mean: tuple[float, ...], std: tuple[float, ...]) -> FfcvLoader:
    """For the benchmarks: FFCV with its own per-image augmentation ops (flip, translate 4, cutout 8,
    normalise; the way FFCV's CIFAR example does it), delivering float batches."""
    with keep_torch_threads():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (
            Cutout,
            NormalizeImage,
            RandomHorizontalFlip,
            RandomTranslate,
            Squeeze,
            ToDevice,
            ToTensor,
            ToTorchImage,
        )

    fill = tuple(int(round(m * 255)) for m in mean)
    image = [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=4, fill=fill),
             Cutout(8, fill), NormalizeImage(np.array(mean) * 255, np.array(std) * 255, np.float32), ToTensor(),
             ToDevice(device, non_blocking=True), ToTorchImage()]
    with keep_torch_threads():
        loader = Loader(str(path), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM, seed=0,
                        pipelines={"image": image, "label": [IntDecoder(), ToTensor(), ToDevice(device), Squeeze(1)]})
    return FfcvLoader(loader, len(loader.indices))


def torch_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int, device: torch.device,
                 train: bool = True) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(AugmentedCifar(images, labels, train), batch_size=batch_size, shuffle=train,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0)


@dataclass
class DataPathResult:
    path: str
    images_per_s: float
    epoch_s: float
    warmup_s: float  # process start-up / JIT compilation, excluded


def _time_epochs(make_iter: Callable[[], Iterable], consume: Callable, epochs: int,
                 device: torch.device) -> tuple[float, int]:
    seconds, images = 0.0, 0
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in make_iter():
            images += consume(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
    return seconds, images


def measure_path(name: str, data_dir: Path, arrays: tuple[np.ndarray, np.ndarray] | None, batch_size: int,
                 workers: int, device: torch.device, epochs: int) -> DataPathResult:
    """Images/s of one path over `epochs` whole epochs, after an untimed warm-up epoch (JIT, workers)."""
    start = time.perf_counter()
    if name == "torch":
        loader = torch_loader(*arrays, batch_size, workers, device)

        def batches() -> Iterable:
            return loader

        def consume(batch: tuple) -> int:
            x = batch[0].to(device, non_blocking=True)
            return len(x)
    else:
        if name == "ffcv":
            loader = ffcv_augmenting_loader(data_dir / "train.beton", batch_size, workers, device, CIFAR10_MEAN,
                                            CIFAR10_STD)

            def consume(batch: tuple) -> int:
                return len(batch[0])
        else:
            if name == "resident":
                loader = make_resident_loader(data_dir / "train.npz", batch_size, device, train=True)
            else:
                # fastcifar's own default (data.num_workers 0 = auto), not --workers: see fastcifar.data.auto_workers
                loader = make_loader(data_dir / "train.beton", batch_size, 0, device, train=True)
            augment = BatchAugment(DataConfig(), device, 0, torch.float32)

            def consume(batch: tuple) -> int:
                return len(augment.train(batch[0]))

        def batches() -> Iterable:
            with loader.epoch() as it:
                yield from it

    _time_epochs(batches, consume, 1, device)  # warm-up epoch
    warm = time.perf_counter() - start
    seconds, images = _time_epochs(batches, consume, epochs, device)
    return DataPathResult(name, images / seconds, seconds / epochs, warm)
