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
import json
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fastcifar.config import LOADER_KINDS, DataConfig, _plain_text
from fastcifar.errors import DataError, numpy_load_error
from fastcifar.ffcv_io import (  # re-exported: the FFCV kind of loader, and the beton files
    PREPARE_HINT,
    FfcvLoader,
    auto_workers,
    ffcv_available,
    keep_torch_threads,
    make_loader,
    write_beton,
)

FFCV_HINT = "install FFCV with: bash scripts/setup.sh (or pip install 'fastcifar[ffcv]' with its system libraries)"

__all__ = [
    "Batch", "BatchLoader", "Loaders", "LOADER_KINDS", "FFCV_HINT", "PREPARE_HINT", "resolve_kind", "open_split",
    "make_loaders", "write_arrays", "read_arrays", "ResidentLoader", "make_resident_loader",
    # the FFCV kind, from fastcifar.ffcv_io
    "FfcvLoader", "auto_workers", "ffcv_available", "keep_torch_threads", "make_loader",
    "write_beton",
]

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


def resolve_kind(kind: str) -> str:
    """auto -> ffcv where FFCV is installed, else resident; ffcv without FFCV is an error saying what to do."""
    if kind not in LOADER_KINDS:
        raise DataError(f"data.loader must be one of {', '.join(LOADER_KINDS)}, got {kind!r}")
    if kind == "auto":
        return "ffcv" if ffcv_available() else "resident"
    if kind == "ffcv" and not ffcv_available():
        raise DataError(f"--data.loader ffcv: FFCV is not installed; {FFCV_HINT}, or use --data.loader resident")
    return kind


def open_split(data: DataConfig, split: str, device: torch.device, *, batch_size: int | None = None,
               subset: int | None = None, train: bool | None = None, seed: int = 0,
               distributed: bool = False) -> BatchLoader:
    """A loader of one split ("train" or "test") of `data.data_dir`, of the kind `data.loader` names (see the
    module docstring). The split's batch size and subset come from `data` unless given; `train` (default: the
    train split) means random order per (seed, epoch), else sequential; `distributed`: this rank's shard."""
    data_dir = Path(data.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder; give the folder the data step wrote "
                        f"(python -m fastcifar prepare --data-dir FOLDER)")
    is_train = split == "train"
    batch_size = batch_size or (data.batch_size if is_train else data.test_batch_size)
    subset = (data.train_subset if is_train else data.test_subset) if subset is None else subset
    train = is_train if train is None else train
    if resolve_kind(data.loader) == "ffcv":
        loader = make_loader(data_dir / f"{split}.beton", batch_size, data.num_workers, device, train, subset, seed,
                             distributed)
        expected, path = _manifest_count(data_dir, split, arrays=False), data_dir / f"{split}.beton"
    else:
        loader = make_resident_loader(data_dir / f"{split}.npz", batch_size, device, train, subset, seed, distributed)
        expected, path = _manifest_count(data_dir, split, arrays=True), data_dir / f"{split}.npz"
    if expected is not None and not subset and loader.images != expected:
        raise DataError(f"{path} holds {loader.images:,} images but {MANIFEST} says {expected:,}: the files were "
                        f"swapped or replaced; rebuild them with: python -m fastcifar prepare --data-dir "
                        f"{data_dir} --force")
    return loader


MANIFEST = "betons.json"  # written last by the data step (fastcifar.prepare): the counts of every file


MANIFEST_VERSION = 1
MANIFEST_TEXT = ("source", "source_md5")  # where the data came from


def read_manifest(data_dir: Path) -> dict[str, Any] | None:
    """The data step's record of the files it wrote (`data_dir`/betons.json), checked before any use: `version` this
    version's; `train`/`test` (the betons) and `arrays.train`/`arrays.test` (the npz), where present, each
    {"count": images >= 1, "bytes": size >= 0}; `source` and `source_md5` printable text. None where there is no
    manifest (a folder written by hand, or a write that did not finish); a DataError that names the file and says
    how to rebuild it otherwise."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        return None

    def bad(why: str) -> DataError:
        return DataError(f"{path} is damaged ({why[:200]}); rebuild the data with: python -m fastcifar prepare "
                         f"--data-dir {data_dir} --force")

    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise bad(f"{type(err).__name__}: {err}") from None
    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("version") != MANIFEST_VERSION:
        raise bad(f"version {manifest.get('version')!r}, this fastcifar writes {MANIFEST_VERSION}")
    arrays = manifest.setdefault("arrays", {})
    if not isinstance(arrays, dict):
        raise bad(f"'arrays' must be an object, got {arrays!r}")
    for where, table in (("", manifest), ("arrays.", arrays)):
        for split in ("train", "test"):
            entry = table.get(split)
            if entry is None:
                continue
            if not (isinstance(entry, dict) and all(isinstance(entry.get(k), int) and not isinstance(entry[k], bool)
                                                    for k in ("count", "bytes"))
                    and entry["count"] >= 1 and entry["bytes"] >= 0):
                raise bad(f"{where}{split} must be {{\"count\": images, \"bytes\": size}}, got {entry!r}")
    for key in MANIFEST_TEXT:
        if not (isinstance(manifest.get(key), str) and _plain_text(manifest[key])):  # the config's text rule
            raise bad(f"{key!r} must be printable text, got {manifest.get(key)!r}")
    return manifest


def _manifest_count(data_dir: Path, split: str, arrays: bool) -> int | None:
    """The image count the data step recorded for this split's file, or None (no manifest, or it lists no such
    file); a damaged manifest is an error (read_manifest)."""
    manifest = read_manifest(data_dir)
    entry = None if manifest is None else (manifest["arrays"] if arrays else manifest).get(split)
    return None if entry is None else entry["count"]


def make_loaders(data: DataConfig, device: torch.device, seed: int = 0, batch_size: int | None = None,
                 distributed: bool = False) -> Loaders:
    """Train and test loaders as `data` says (`batch_size`: the training batch on this rank, when it is not
    data.batch_size); sizes are the whole sets' (also when `distributed` gives each rank a shard)."""
    train = open_split(data, "train", device, batch_size=batch_size, seed=seed, distributed=distributed)
    test = open_split(data, "test", device, seed=seed, distributed=distributed)
    return Loaders(train, test)


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
    rebuild = f"rebuild it with: python -m fastcifar prepare --data-dir {path.parent} --force"
    if not path.is_file():
        raise DataError(f"missing {path}; " + PREPARE_HINT.format(data_dir=path.parent))
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not a readable CIFAR-10 array file ({numpy_load_error(err)}); {rebuild}") from None
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
            yield self.gather(order[start:start + self.batch_size])

    def gather(self, index: torch.Tensor) -> Batch:
        """The examples at `index`: NHWC rows gathered -> a dense channels_last [B, 3, 32, 32] view, as FFCV
        delivers it, and their labels."""
        return self._images.index_select(0, index).permute(0, 3, 1, 2), self._labels.index_select(0, index)


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
