"""The loader contract, and the two loader kinds that meet it: FFCV over the betons, and resident arrays.

Every loader kind delivers the same thing (`BatchLoader`): for epoch `e`, uint8 image batches [N, 3, 32, 32]
in channels_last memory on the training device and int64 labels [N], in an order that is a pure function
of (seed, e), so that a run resumed in the middle of epoch e replays it and skips the batches it had done.
Augmentation and normalisation happen afterwards, on the device, on whole batches (fastcifar.augment),
which keeps the CPU out of the critical path on a GPU machine.

- `ffcv` (`make_loader`): betons decoded by FFCV and moved with non-blocking copies (overlapping the previous
  step on a GPU). Nothing outside this module knows FFCV: its loader, iterator thread and `next_epoch` stay here.
- `resident` (`make_resident_loader`): the whole split as one uint8 tensor on the training device (50,000 x
  32 x 32 x 3 = 150 MB), shuffled by a device permutation drawn from (seed, epoch), batches as gathers of
  slices of it: no Python per-image work and no host work per step (as airbench and Page's code do). It reads
  `train.npz` / `test.npz`, which the data step writes beside the betons, and needs no FFCV.
`open_split` picks the kind (`auto`: FFCV where it is installed, else resident).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fastcifar.errors import DataError

PREPARE_HINT = "create it with: python data_prep/write_beton.py --data-dir {data_dir}"
LOADER_KINDS = ("auto", "ffcv", "resident")
FFCV_HINT = "install FFCV with: bash scripts/setup.sh (or pip install 'fastcifar[ffcv]' with its system libraries)"

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images [N, 3, 32, 32] (channels_last), int64 labels [N]


class BatchLoader(Protocol):
    """One split, batch by batch, on the training device: what the training loop and the test pass need."""

    images: int  # images in the whole split (all ranks together)

    def __len__(self) -> int:
        """Batches per epoch (on this rank); the last one may be smaller."""
        ...

    def epoch(self, index: int = 0, skip: int = 0) -> contextlib.AbstractContextManager[Iterator[Batch]]:
        """Iterate epoch `index` from its batch number `skip`: the same batches for the same (seed, index)
        every time. Leaving the `with` block early, by break or exception, leaves nothing running."""
        ...


@dataclass
class Loaders:
    train: BatchLoader
    test: BatchLoader

    @property
    def train_size(self) -> int:
        return self.train.images

    @property
    def test_size(self) -> int:
        return self.test.images


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """FFCV sets torch's intra-op thread count (to 1 on import, to its worker count when a loader or
    an epoch starts); on a CPU that silently slows training, so put back what the process had."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_beton(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"missing {path}; " + PREPARE_HINT.format(data_dir=path.parent))


def _check_schema(reader: object, path: Path) -> None:
    """The beton must hold 32x32 RGB images and integer labels, with every sample inside the file: a
    wrong or damaged file is refused here rather than crashing (or silently training) later."""
    fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    if fields != {"image": "RGBImageField", "label": "IntField"}:
        raise DataError(f"{path} has fields {fields}, not CIFAR-10's image (RGBImageField) and label (IntField); "
                        f"rebuild it with: python data_prep/write_beton.py --force")
    images = reader.metadata[f"f{list(reader.handlers).index('image')}"]  # FFCV names metadata columns f0, f1...
    if reader.num_samples and not ((images["width"] == 32).all() and (images["height"] == 32).all()):
        raise DataError(f"{path} holds images that are not 32x32 (e.g. {images['width'][0]}x{images['height'][0]}); "
                        f"fastcifar trains on CIFAR-10's 32x32 images")
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > path.stat().st_size:
        raise DataError(f"{path} is truncated (samples point past its end); "
                        f"rebuild it with: python data_prep/write_beton.py --force")


def auto_workers(device: torch.device) -> int:
    """Decode threads for `num_workers=0`. On a CPU the training step needs every core and the decode is
    cheap (raw pixels), so one thread; see BENCHMARKS.md (two threads contend with the augmentation's and
    the step's own threads and made the data path slower, not faster, in development measurements)."""
    return 1 if device.type == "cpu" else 2


class FfcvLoader:
    """An FFCV Loader behind the BatchLoader contract."""

    def __init__(self, loader: object, images: int) -> None:
        self._loader = loader
        self.images = images

    def __len__(self) -> int:
        return len(self._loader)

    @contextlib.contextmanager
    def epoch(self, index: int = 0, skip: int = 0) -> Iterator[Iterator[Batch]]:
        # FFCV's shuffle of an epoch depends only on (seed, epoch number): set it, and the order is replayable.
        self._loader.next_epoch = index
        with keep_torch_threads():
            iterator = iter(self._loader)
        try:
            for _ in range(skip):  # decoded and dropped: cheap next to the training steps they stand for
                next(iterator)
            yield iterator
        finally:
            _shut_down(iterator)


def _shut_down(iterator: object) -> None:
    """Stop an FFCV epoch iterator's worker thread, even mid-epoch: an abandoned one can abort the process at
    exit."""
    iterator.terminate_event.set()
    while iterator.is_alive():  # the worker blocks on a full queue until it sees the event
        with contextlib.suppress(Exception):
            iterator.output_queue.get(timeout=0.1)
    iterator.close()


def make_loader(path: Path, batch_size: int, num_workers: int, device: torch.device, train: bool,
                subset: int = 0, seed: int = 0, distributed: bool = False) -> FfcvLoader:
    """An FFCV loader over `path`: random order for training, sequential for test; never drops a batch.
    `num_workers` 0 means `auto_workers(device)`. `distributed`: this rank's shard only (FFCV's emulation of
    DistributedSampler; needs the process group; a rank gets ceil(N / world) samples, padded by repeats
    where N does not divide)."""
    _check_beton(path)  # before importing FFCV (~3 s): a missing file is the common mistake
    with keep_torch_threads():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    try:
        reader = Reader(str(path))
    except Exception as err:  # FFCV raises assorted errors for files that are not its format (or truncated)
        raise DataError(f"{path} is not a readable CIFAR-10 beton ({type(err).__name__}: {err}); "
                        f"rebuild it with: python data_prep/write_beton.py --force") from None
    _check_schema(reader, path)
    num_samples = reader.num_samples
    if subset > num_samples:
        raise DataError(f"{path} holds {num_samples} images; cannot take a subset of {subset}")
    with keep_torch_threads():
        loader = Loader(
            str(path), batch_size=batch_size, num_workers=num_workers or auto_workers(device), seed=seed,
            drop_last=False, distributed=distributed,
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
            indices=np.arange(subset) if subset else None,
            pipelines={
                "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=True),
                          ToTorchImage(channels_last=True, convert_back_int16=False)],
                "label": [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True), Squeeze(1)],
            },
        )
    return FfcvLoader(loader, len(loader.indices))


def ffcv_available() -> bool:
    """Whether FFCV can be imported here (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("ffcv") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["ffcv"] is None (made unimportable)
        return False


def resolve_kind(kind: str) -> str:
    """auto -> ffcv where FFCV is installed, else resident; ffcv without FFCV is an error saying what to do."""
    if kind not in LOADER_KINDS:
        raise DataError(f"data.loader must be auto, ffcv or resident, got {kind!r}")
    if kind == "auto":
        return "ffcv" if ffcv_available() else "resident"
    if kind == "ffcv" and not ffcv_available():
        raise DataError(f"--data.loader ffcv: FFCV is not installed; {FFCV_HINT}, or use --data.loader resident")
    return kind


def open_split(data_dir: str | Path, split: str, batch_size: int, device: torch.device, *, train: bool,
               subset: int = 0, seed: int = 0, distributed: bool = False, num_workers: int = 0,
               kind: str = "auto") -> BatchLoader:
    """A loader of one split ("train" or "test") of `data_dir`, of the given kind (see the module docstring):
    random order when `train`, else sequential; `distributed`: this rank's shard."""
    data_dir = Path(data_dir)
    if resolve_kind(kind) == "ffcv":
        return make_loader(data_dir / f"{split}.beton", batch_size, num_workers, device, train, subset, seed,
                           distributed)
    return make_resident_loader(data_dir / f"{split}.npz", batch_size, device, train, subset, seed, distributed)


def make_loaders(data_dir: str | Path, batch_size: int, test_batch_size: int, num_workers: int,
                 device: torch.device, seed: int = 0, train_subset: int = 0, test_subset: int = 0,
                 distributed: bool = False, kind: str = "auto") -> Loaders:
    """Train and test loaders; sizes are the whole sets' (also when `distributed` gives each rank a shard)."""
    common = {"seed": seed, "distributed": distributed, "num_workers": num_workers, "kind": kind}
    train = open_split(data_dir, "train", batch_size, device, train=True, subset=train_subset, **common)
    test = open_split(data_dir, "test", test_batch_size, device, train=False, subset=test_subset, **common)
    return Loaders(train, test)


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


class _ArrayDataset:
    """Images and labels as the indexed dataset FFCV's writer reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def write_beton(images: np.ndarray, labels: np.ndarray, path: Path, num_workers: int) -> None:
    """Write uint8 images [N, 32, 32, 3] and labels [N] as an FFCV dataset (raw RGB images, int labels) to
    `path`, atomically (a temporary name, renamed when complete)."""
    with keep_torch_threads():
        from ffcv.fields import IntField, RGBImageField  # heavy import (~3 s), only when writing
        from ffcv.writer import DatasetWriter

    tmp = path.with_name(path.name + ".tmp")
    try:
        fields = {"image": RGBImageField(write_mode="raw", max_resolution=32), "label": IntField()}
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(_ArrayDataset(images, labels))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ resident arrays


def write_arrays(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """uint8 images [N, 32, 32, 3] and int64 labels [N] as an uncompressed .npz at `path`, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, images=np.ascontiguousarray(images, dtype=np.uint8), labels=labels.astype(np.int64))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_arrays(path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a .npz written by `write_arrays`, checked: shape, dtype, matching counts and
    label range; anything else is a DataError that says how to rebuild it."""
    rebuild = f"rebuild it with: python data_prep/write_beton.py --data-dir {path.parent} --force"
    if not path.is_file():
        raise DataError(f"missing {path}; " + PREPARE_HINT.format(data_dir=path.parent))
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not a readable CIFAR-10 array file ({type(err).__name__}: {err}); "
                        f"{rebuild}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path} holds images of {images.dtype} {images.shape}, not uint8 [N, 32, 32, 3]; {rebuild}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path} holds {labels.dtype} labels {labels.shape} for {len(images)} images; {rebuild}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}; {rebuild}")
    return images, labels.astype(np.int64)


class ResidentLoader:
    """A split held on the device as one uint8 tensor [N, 32, 32, 3]; batches are gathers of slices of a
    permutation that depends only on (seed, epoch) (identity order for a test split)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self._images, self._labels = images, labels
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.images = len(labels)
        self._shard = math.ceil(self.images / world_size)  # padded by repeats where world_size does not divide

    def __len__(self) -> int:
        return math.ceil(self._shard / self.batch_size)

    def order(self, index: int) -> torch.Tensor:
        """This rank's sample order in epoch `index` (on the device)."""
        device, n = self._labels.device, self.images
        if self.train:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed * 1_000_003 + index)  # a pure function of (seed, epoch): resumable
            order = torch.randperm(n, generator=generator, device=device)
        else:
            order = torch.arange(n, device=device)
        if self.world_size > 1:  # like DistributedSampler: pad with the first samples, then every world-th one
            order = torch.cat([order, order[: self._shard * self.world_size - n]])[self.rank::self.world_size]
        return order

    @contextlib.contextmanager
    def epoch(self, index: int = 0, skip: int = 0) -> Iterator[Iterator[Batch]]:
        yield self._batches(self.order(index), skip)

    def _batches(self, order: torch.Tensor, skip: int) -> Iterator[Batch]:
        for start in range(skip * self.batch_size, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            # NHWC rows gathered -> a dense channels_last [B, 3, 32, 32] view, as FFCV delivers it
            yield self._images.index_select(0, idx).permute(0, 3, 1, 2), self._labels.index_select(0, idx)


def make_resident_loader(path: Path, batch_size: int, device: torch.device, train: bool, subset: int = 0,
                         seed: int = 0, distributed: bool = False) -> ResidentLoader:
    """A ResidentLoader over the .npz at `path` (the first `subset` images when > 0), loaded onto `device`
    once. `distributed`: this rank's shard of the process group."""
    images, labels = read_arrays(path)
    if subset > len(labels):
        raise DataError(f"{path} holds {len(labels)} images; cannot take a subset of {subset}")
    if subset:
        images, labels = images[:subset], labels[:subset]
    rank, world = 0, 1
    if distributed:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ResidentLoader(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device), batch_size,
                          train, seed, rank, world)
