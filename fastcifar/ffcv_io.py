"""Everything the package knows of FFCV: beton loaders behind the loader contract (`FfcvLoader`) and the beton
writer (the benchmarks' FFCV-with-its-own-augmentation loader is in benchmarks/data_paths.py). FFCV is imported
only inside these functions (it takes seconds, and it is an optional extra): `ffcv_available()` says whether it
is installed.

The FFCV loader only decodes and moves bytes: image batches arrive as uint8 [N, 3, 32, 32] in channels_last
memory on the device (copied with non_blocking=True, overlapping the previous step on a GPU), labels as int64.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastcifar.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]
REBUILD = "rebuild it with: python -m fastcifar prepare --data-dir {data_dir} --force"
PREPARE_HINT = "create it with: python -m fastcifar prepare --data-dir {data_dir}"


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """FFCV sets torch's intra-op thread count (to 1 on import, to its worker count when a loader or
    an epoch starts); on a CPU that silently slows training, so put back what the process had.

    Also silences one warning of FFCV's import: `import ffcv` imports its writer, whose tqdm helpers import
    `tqdm.auto`, which in a Jupyter kernel without ipywidgets warns "IProgress not found" (with the path of the
    environment). No FFCV progress bar is shown by these functions, so the warning is about nothing here."""
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="IProgress not found")
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
                        + REBUILD.format(data_dir=path.parent))
    images = reader.metadata[f"f{list(reader.handlers).index('image')}"]  # FFCV names metadata columns f0, f1...
    if reader.num_samples and not ((images["width"] == 32).all() and (images["height"] == 32).all()):
        raise DataError(f"{path} holds images that are not 32x32 (e.g. {images['width'][0]}x{images['height'][0]}); "
                        f"fastcifar trains on CIFAR-10's 32x32 images")
    labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]
    if reader.num_samples and (int(labels.min()) < 0 or int(labels.max()) >= 10):
        raise DataError(f"{path} has labels {int(labels.min())}..{int(labels.max())}, not CIFAR-10's 0..9 (another "
                        f"data set?); " + REBUILD.format(data_dir=path.parent))
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > path.stat().st_size:
        raise DataError(f"{path} is truncated (samples point past its end); "
                        + REBUILD.format(data_dir=path.parent))


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
                        + REBUILD.format(data_dir=path.parent)) from None
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


class _ArrayDataset:
    """Images and labels as the indexed dataset FFCV's writer reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


# Shared-memory segments of our beton writers are named SHM_PREFIX + the writer's pid + "_" + a count, so that a
# clean-up removes exactly those of one writer (never another program's), also after a kill -9 (`sweep_stale`).
SHM_PREFIX = "fastcifar_beton_"
SHM_DIR = Path("/dev/shm")


def write_beton(images: np.ndarray, labels: np.ndarray, path: Path, num_workers: int) -> None:
    """Write uint8 images [N, 32, 32, 3] and labels [N] as an FFCV dataset (raw RGB images, int labels) to
    `path`, atomically (a temporary name, renamed when complete).

    FFCV's writer forks worker processes that would inherit our signal handlers (and print tracebacks, or hang the
    parent joining them, on Ctrl-C / SIGTERM), and it waits forever for a worker that died (a full disk). So the
    writing runs in a child process of its own process group with the default handlers, whose workers report an
    error through a pipe instead of a traceback, and which ends at once when one of them fails. Every process of
    it dies with its parent (a kill -9 of the data step takes the writer along). A signal to us, or a failure,
    kills that whole group, removes the shared memory it created (by its own names) and the temporary file, and
    ends in one line."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    read_end, write_end = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # the writer
        os.close(read_end)
        code = 1
        try:
            os.setpgid(0, 0)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            _die_with(parent)
            _write_beton_here(images, labels, tmp, num_workers, write_end)
            code = 0
        except BaseException as err:  # reported to the parent through the pipe, never as a traceback here
            _report(write_end, err)
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        _, status = os.waitpid(child, 0)
    except BaseException:  # Ctrl-C / SIGTERM (errors.Terminated) while the writer runs
        _end_writer(child, tmp)
        os.close(read_end)
        raise
    message = os.read(read_end, 4000).decode(errors="replace")
    os.close(read_end)
    if status != 0:
        _end_writer(child, tmp)
        print(file=sys.stderr)  # FFCV's progress bar stopped mid-line: the error gets a line of its own
        full = any(word in message for word in ("No space", "ENOSPC", "Errno 28"))
        advice = "the disk is full; free space or use another --data-dir" if full else message or f"status {status}"
        raise DataError(f"cannot write {path}: {advice}")
    _remove_shared_memory(child)  # FFCV unlinks its segment itself; nothing should be left, but be sure
    os.replace(tmp, path)


def _end_writer(child: int, tmp: Path) -> None:
    """Kill what is left of the writer's process group, then remove its shared memory and temporary file."""
    with contextlib.suppress(OSError):
        os.killpg(child, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.waitpid(child, 0)
    _remove_shared_memory(child)
    tmp.unlink(missing_ok=True)


def _report(fd: int, err: BaseException) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{type(err).__name__}: {err}".encode()[:2000])


def _die_with(parent: int) -> None:
    """Linux: have this process killed when its parent dies (prctl PR_SET_PDEATHSIG); if the parent is already
    gone, exit now. Elsewhere nothing (the process then outlives a kill -9 of the data step by its run time)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _write_beton_here(images: np.ndarray, labels: np.ndarray, tmp: Path, num_workers: int, report: int) -> None:
    """In the writer process: FFCV's DatasetWriter with its shared memory under our names, and its workers watched
    (one that fails writes its error to `report` and ends this process at once)."""
    import multiprocessing
    import threading
    from multiprocessing import shared_memory

    with warnings.catch_warnings():  # the "IProgress not found" of FFCV's import (keep_torch_threads)
        warnings.filterwarnings("ignore", message="IProgress not found")
        import ffcv.writer  # heavy import (~3 s), only when writing
        from ffcv.fields import IntField, RGBImageField

    writer_pid, workers = os.getpid(), []

    class NamedSharedMemory(shared_memory.SharedMemory):
        made = 0

        def __init__(self, name: str | None = None, create: bool = False, size: int = 0) -> None:
            if create and name is None:
                NamedSharedMemory.made += 1
                name = f"{SHM_PREFIX}{writer_pid}_{NamedSharedMemory.made}"
            super().__init__(name=name, create=create, size=size)

    class Worker(multiprocessing.get_context("fork").Process):
        def start(self) -> None:
            workers.append(self)
            super().start()

        def run(self) -> None:
            _die_with(writer_pid)
            try:
                super().run()
            except BaseException as err:  # e.g. OSError: [Errno 28] No space left on device
                _report(report, err)
                os._exit(1)

    def watch() -> None:  # FFCV's writer would wait forever for a worker that died
        while True:
            if any(w.exitcode not in (None, 0) for w in list(workers)):
                os._exit(1)
            time.sleep(0.2)

    ffcv.writer.shared_memory = type("SharedMemoryModule", (), {"SharedMemory": NamedSharedMemory})
    ffcv.writer.Process = Worker
    threading.Thread(target=watch, daemon=True).start()
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=32), "label": IntField()}
    ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(
        _ArrayDataset(images, labels))


def _remove_shared_memory(writer: int) -> list[str]:
    """Remove the shared-memory segments of the writer process `writer` (by their names); returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in SHM_DIR.iterdir():
            if entry.name.startswith(f"{SHM_PREFIX}{writer}_"):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(str(entry))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_stale(data_dir: Path) -> list[str]:
    """What dead writers left: temporary files `.NAME.PID.tmp` in `data_dir` and our shared-memory segments whose
    process is gone (a kill -9 of an earlier data step). Removes them; returns their paths."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in data_dir.iterdir():
            parts = entry.name.split(".")
            if (entry.name.startswith(".") and entry.name.endswith(".tmp") and len(parts) >= 4
                    and parts[-2].isdigit() and int(parts[-2]) != os.getpid() and not _alive(int(parts[-2]))):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(str(entry))
    with contextlib.suppress(OSError):
        for entry in SHM_DIR.iterdir():
            pid = entry.name.removeprefix(SHM_PREFIX).split("_")[0]
            if entry.name.startswith(SHM_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                removed += _remove_shared_memory(int(pid))
    return removed
