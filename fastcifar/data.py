"""FFCV loaders for the train and test betons, delivering uint8 batches on the training device.

The loader only decodes and moves bytes: image batches arrive as uint8 [N, 3, 32, 32] in channels_last
memory on `device` (copied with non_blocking=True, overlapping the previous step on a GPU), labels as
int64 [N]. Augmentation and normalisation happen afterwards, on the device, on whole batches
(fastcifar.augment), which is what keeps the CPU out of the critical path on a GPU machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar.errors import DataError

PREPARE_HINT = "create it with: python data_prep/write_beton.py --data-dir {data_dir}"


@dataclass
class Loaders:
    train: object  # ffcv.loader.Loader (typed loosely: importing ffcv costs ~3 s)
    test: object
    train_size: int
    test_size: int


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


def make_loader(path: Path, batch_size: int, num_workers: int, device: torch.device, train: bool,
                subset: int = 0, seed: int = 0, distributed: bool = False) -> object:
    """An FFCV Loader over `path`: random order for training, sequential for test; never drops a batch.
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
    return loader


def make_loaders(data_dir: str | Path, batch_size: int, test_batch_size: int, num_workers: int,
                 device: torch.device, seed: int = 0, train_subset: int = 0, test_subset: int = 0,
                 distributed: bool = False) -> Loaders:
    """Train and test loaders; sizes are the whole sets' (also when `distributed` gives each rank a shard)."""
    data_dir = Path(data_dir)
    train_path, test_path = data_dir / "train.beton", data_dir / "test.beton"
    train = make_loader(train_path, batch_size, num_workers, device, True, train_subset, seed, distributed)
    test = make_loader(test_path, test_batch_size, num_workers, device, False, test_subset, seed, distributed)
    return Loaders(train, test, len(train.indices), len(test.indices))


@contextlib.contextmanager
def epoch(loader: object) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Iterate one epoch of `loader`, and always shut its worker thread down, even when the caller
    stops early or raises: an FFCV iterator abandoned mid-epoch can abort the process at exit."""
    with keep_torch_threads():
        iterator = iter(loader)
    try:
        yield iterator
    finally:
        iterator.terminate_event.set()
        while iterator.is_alive():  # the worker blocks on a full queue until it sees the event
            with contextlib.suppress(Exception):
                iterator.output_queue.get(timeout=0.1)
        iterator.close()
