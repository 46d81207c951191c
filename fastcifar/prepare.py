"""The data step: CIFAR-10 (python version archive) -> FFCV `train.beton` and `test.beton`.

    python data_prep/write_beton.py [--archive PATH] [--data-dir DIR] [--force]    (the script calls `main`)

Where the archive comes from, first match wins: `--archive PATH`; the environment variable
FASTCIFAR_CIFAR_ARCHIVE; `cifar-10-python.tar.gz` already in the data directory; else the official
download (md5-checked). A downloaded archive is trusted by its md5; a local one by its structure
(50,000 train / 10,000 test uint8 3x32x32 images, 10 classes), since re-packed copies differ in md5.

Nothing half-done is ever left looking complete: downloads and betons are written under temporary
names and renamed on success, and a manifest (`betons.json`) written last marks the pair as usable.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar import data, rundir
from fastcifar.cli import Parser
from fastcifar.config import MAX_TEXT, ConfigError, DataConfig, _plain_text, check_option
from fastcifar.errors import DataError, os_error_message, run_cli
from fastcifar.ffcv_io import sweep_stale

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_ENV = "FASTCIFAR_CIFAR_ARCHIVE"
COUNTS = (50_000, 10_000)
MANIFEST = data.MANIFEST
MANIFEST_VERSION = data.MANIFEST_VERSION
_BATCH_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_NEEDED = [*_TRAIN_BATCHES, "test_batch", "batches.meta"]


@dataclass
class Split:
    images: np.ndarray  # [N, 32, 32, 3] uint8, RGB
    labels: np.ndarray  # [N] int64 in 0..9


# ---------------------------------------------------------------------------------------- sources


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` (via `dest.part`, with a progress bar) and check its md5.

    On any failure the partial file is deleted and DataError says what to do.
    """
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=None) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = md5sum(part)
        if got != md5:
            raise DataError(f"downloaded {url} has md5 {got}, expected {md5}: deleted it; retry, "
                            f"or pass a verified copy with --archive PATH")
        part.replace(dest)
        return dest
    except urllib.error.HTTPError as err:
        raise DataError(f"cannot download {url} (HTTP {err.code} {err.reason}); pass a local archive with "
                        f"--archive PATH or set {ARCHIVE_ENV}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"cannot download {url} ({reason}); offline? pass a local archive with "
                        f"--archive PATH or set {ARCHIVE_ENV}") from None
    finally:
        part.unlink(missing_ok=True)


def resolve_archive(archive: str | None, data_dir: Path, url: str, md5: str) -> tuple[Path, bool]:
    """The archive to read and whether it was verified by md5 (downloaded) rather than by structure."""
    given = archive or os.environ.get(ARCHIVE_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            origin = "--archive" if archive else ARCHIVE_ENV
            raise DataError(f"{origin} names {path}, which is not a file; point it at {ARCHIVE_NAME}")
        return path, False
    local = data_dir / ARCHIVE_NAME
    if local.is_file():
        return local, False
    print(f"no local archive (--archive, {ARCHIVE_ENV} or {local}); downloading {url}")
    return download(url, local, md5), True


# ------------------------------------------------------------------------------ reading the archive


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 pickles hold (dicts, lists, bytes, numbers, numpy arrays), so a
    tampered archive cannot run code through pickle."""

    _reconstruct = np.zeros(1).__reduce__()[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # how protocol-2 pickles spell bytes
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_pickle(data: bytes, what: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # any failure to parse means the same thing to the user
        raise DataError(f"{what} is not a CIFAR-10 batch pickle ({err})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{what} is not a CIFAR-10 batch pickle (holds a {type(obj).__name__})")
    return obj


def _check_member(member: tarfile.TarInfo, dest: str) -> None:
    if not (member.isfile() or member.isdir()):
        raise DataError(f"archive member {member.name!r} is a link or special file; refusing this archive")
    try:
        tarfile.data_filter(member, dest)
    except tarfile.FilterError as err:
        raise DataError(f"archive member {member.name!r} is unsafe ({err}); refusing this archive") from None


def extract_batches(archive: Path, workdir: Path) -> dict[str, bytes]:
    """Safely extract the CIFAR-10 batch files of `archive` into `workdir` and return their bytes."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, str(workdir))
            wanted = {f"{_BATCH_DIR}/{name}": name for name in _NEEDED}
            chosen = [m for m in members if m.name in wanted and m.isfile()]
            missing = sorted(set(wanted.values()) - {wanted[m.name] for m in chosen})
            if missing:
                raise DataError(f"{archive} is not the CIFAR-10 python archive: no {_BATCH_DIR}/{missing[0]}")
            tar.extractall(workdir, members=chosen, filter="data")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):  # our disk, not the archive
            raise DataError(os_error_message(err, "cannot extract the archive into", workdir)) from None
        raise DataError(f"{archive} is not a readable tar.gz archive ({err.strerror or err}); re-download it") from None
    except (tarfile.TarError, EOFError, ValueError) as err:  # zlib errors are OSError/EOFError
        raise DataError(f"{archive} is not a readable tar.gz archive ({_tar_problem(archive, err)}); re-download it "
                        f"(the CIFAR-10 python version)") from None
    return {name: (workdir / _BATCH_DIR / name).read_bytes() for name in _NEEDED}


def _tar_problem(archive: Path, err: BaseException) -> str:
    """What is wrong with a file that tarfile cannot open, in a few words (tarfile's own message lists every
    compression it tried, one per line)."""
    with contextlib.suppress(OSError):
        if archive.stat().st_size == 0:
            return "the file is empty"
        if zipfile.is_zipfile(archive):
            return "it is a zip archive, not a tar.gz"
    text = str(err).splitlines()[0].rstrip(":") if str(err) else ""
    return "neither gzip nor tar data" if not text or "could not be opened" in text else text


def _split(batches: list[dict], names: list[str]) -> Split:
    images, labels = [], []
    for batch, name in zip(batches, names, strict=True):
        data, lab = batch.get(b"data"), batch.get(b"labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{name}: b'data' must be a uint8 array [N, 3072] (3x32x32 images)")
        if not isinstance(lab, list) or len(lab) != len(data) or not all(isinstance(x, int) for x in lab):
            raise DataError(f"{name}: b'labels' must be a list of {len(data)} integers")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(lab, dtype=np.int64))
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def read_cifar10(archive: Path, workdir: Path, counts: tuple[int, int] | None = COUNTS) -> tuple[Split, Split]:
    """Train and test splits of a CIFAR-10 archive, checked by structure (and `counts`, if given)."""
    raw = extract_batches(archive, workdir)
    names = load_pickle(raw["batches.meta"], "batches.meta").get(b"label_names")
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{archive}: batches.meta does not list 10 class names (b'label_names' is "
                        f"{type(names).__name__ if names is not None else 'missing'}); not CIFAR-10")
    train = _split([load_pickle(raw[n], n) for n in _TRAIN_BATCHES], _TRAIN_BATCHES)
    test = _split([load_pickle(raw["test_batch"], "test_batch")], ["test_batch"])
    for split, name, expected in ((train, "train", counts and counts[0]), (test, "test", counts and counts[1])):
        if expected and len(split.labels) != expected:
            raise DataError(f"{archive}: {len(split.labels)} {name} images, expected {expected}; not CIFAR-10")
        if split.labels.min() < 0 or split.labels.max() > 9 or len(np.unique(split.labels)) != 10:
            raise DataError(f"{archive}: {name} labels must cover exactly the classes 0..9; not CIFAR-10")
    return train, test


# --------------------------------------------------------------------------------- writing betons


def write_beton(split: Split, path: Path, num_workers: int) -> None:
    """Write `split` as a beton at `path`, atomically (fastcifar.data knows the format)."""
    data.write_beton(split.images, split.labels, path, num_workers)


def beton_paths(data_dir: Path) -> tuple[Path, Path]:
    return data_dir / "train.beton", data_dir / "test.beton"


def read_manifest(data_dir: Path) -> dict | None:
    """The manifest of a completed write (read and checked by data.read_manifest), or None when there is none, it is
    damaged, or a file it lists is missing or does not match it: the data step then writes the files again."""
    try:
        manifest = data.read_manifest(data_dir)
    except DataError:
        return None
    if manifest is None:
        return None
    files = [(path, manifest[path.stem]) for path in beton_paths(data_dir) if path.stem in manifest]
    arrays = manifest["arrays"]
    files += [(path, arrays[path.stem]) for path in array_paths(data_dir) if path.stem in arrays]
    try:
        return manifest if files and all(path.stat().st_size == entry["bytes"] for path, entry in files) else None
    except OSError:  # a listed file is missing or unreadable
        return None


def array_paths(data_dir: Path) -> tuple[Path, Path]:
    return data_dir / "train.npz", data_dir / "test.npz"


def _has(manifest: dict, betons: bool) -> bool:
    """Whether the manifest lists the arrays, and the betons too when FFCV is here to use them."""
    return len(manifest.get("arrays", {})) == 2 and (not betons or ("train" in manifest and "test" in manifest))


def _require_writable(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is a file, not a folder; choose another with --data-dir")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as err:
        raise DataError(f"cannot write to data directory {data_dir} ({err.strerror}); "
                        "choose another with --data-dir") from None


def prepare(data_dir: Path, archive: str | None = None, force: bool = False, url: str = URL, md5: str = MD5,
            counts: tuple[int, int] | None = COUNTS, num_workers: int = 2) -> dict:
    """Make sure `data_dir` holds up-to-date data files: train.npz / test.npz (the resident loader's) always,
    and train.beton / test.beton where FFCV is installed. Returns the manifest describing them."""
    betons = data.ffcv_available()
    existing = read_manifest(data_dir)
    if existing and not force and not (archive or os.environ.get(ARCHIVE_ENV)):
        if _has(existing, betons):
            # the archive's name and md5, not its path: the path is this machine's (and lands in notebooks' outputs)
            print(f"{data_dir}: data files up to date (from {Path(existing['source']).name}, md5 "
                  f"{existing['source_md5']}); --force rebuilds")
            return existing
        if "train" in existing and "test" in existing and betons:  # betons from before the arrays existed
            _require_writable(data_dir)
            splits = [_split_from_beton(path) for path in beton_paths(data_dir)]
            print(f"read {data_dir}'s betons: {len(splits[0].labels):,} train / {len(splits[1].labels):,} test images")
            return _write(data_dir, splits, dict(existing), betons=False, num_workers=num_workers)
    if not (archive or os.environ.get(ARCHIVE_ENV)):
        _require_writable(data_dir)  # a download (or the archive found there) is written into it
    source, downloaded = resolve_archive(archive, data_dir, url, md5)
    source_md5 = md5sum(source)
    if existing and not force and existing.get("source_md5") == source_md5 and _has(existing, betons):
        print(f"{data_dir}: data files up to date (from {source}, md5 {source_md5}); --force rebuilds")
        return existing
    _require_writable(data_dir)
    for stale in data_dir.glob(".extract-*"):  # left by a run killed while extracting (up to ~180 MB each)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in sweep_stale(data_dir):  # temporary files and shared memory of writers killed with -9
        print(f"removed {stale}, left by an earlier data step that was killed")
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as workdir:
        train, test = read_cifar10(source, Path(workdir), counts)
    print(f"read {source} (md5 {source_md5}{', verified' if downloaded else ''}): "
          f"{len(train.labels):,} train / {len(test.labels):,} test images")
    (data_dir / MANIFEST).unlink(missing_ok=True)  # the old files are no longer a matched set
    manifest = {"version": MANIFEST_VERSION, "source": str(source), "source_md5": source_md5}
    manifest = _write(data_dir, [train, test], manifest, betons=betons, num_workers=num_workers)
    if not betons:
        print(f"betons not written: FFCV is not installed ({data.FFCV_HINT}); the resident loader trains from "
              f"the .npz files")
    return manifest


def _split_from_beton(path: Path) -> Split:
    loader = data.make_loader(path, 1000, 1, torch.device("cpu"), train=False)
    images, labels = [], []
    with loader.epoch() as batches:
        for x, y in batches:  # FFCV reuses its buffers: copy
            images.append(x.permute(0, 2, 3, 1).numpy().copy())
            labels.append(y.numpy().copy())
    return Split(np.concatenate(images), np.concatenate(labels).astype(np.int64))


def _write(data_dir: Path, splits: list[Split], manifest: dict, betons: bool, num_workers: int) -> dict:
    """Write the arrays (and the betons when `betons`) of the train and test splits; the manifest goes last,
    atomically, so that it only ever describes complete files."""
    arrays = {}
    for split, path in zip(splits, array_paths(data_dir), strict=True):
        data.write_arrays(split.images, split.labels, path)
        arrays[path.stem] = {"count": len(split.labels), "bytes": path.stat().st_size}
        print(f"wrote {path} ({len(split.labels):,} images, {arrays[path.stem]['bytes'] / 1e6:.1f} MB)")
    manifest["arrays"] = arrays
    for split, path in zip(splits, beton_paths(data_dir) if betons else (), strict=False):
        start = time.perf_counter()
        write_beton(split, path, num_workers)
        size = path.stat().st_size
        manifest[path.stem] = {"count": len(split.labels), "bytes": size}
        seconds = time.perf_counter() - start
        print(f"wrote {path} ({len(split.labels):,} images, {size / 1e6:.1f} MB) in {seconds:.1f} s")
    rundir.write_json(data_dir / MANIFEST, manifest)  # atomic, last: it marks the files as a matched set
    return manifest


def _counts(text: str) -> tuple[int, int] | None:
    if text == "any":
        return None
    train, _, test = text.partition(",")
    counts = int(train), int(test)
    if not all(1 <= c <= 10**7 for c in counts):
        raise ValueError(text)  # argparse: "invalid value", one line, exit 2
    return counts


MAX_WRITERS = 64


def _checked(args: argparse.Namespace) -> argparse.Namespace:
    """The flags by the config's rules where the config has the quantity (the data folder), else by their own."""
    check_option("--data-dir", "data.data_dir", args.data_dir)
    for flag, text in (("--archive", args.archive), ("--url", args.url), ("--md5", args.md5)):
        if text is not None and not _plain_text(text):  # the config's rule for every name and path
            raise ConfigError(f"{flag} must be printable text of at most {MAX_TEXT} characters, got {text[:60]!r}")
    if not 1 <= args.workers <= MAX_WRITERS:
        raise ConfigError(f"--workers must be in [1, {MAX_WRITERS}] writer processes, got {args.workers}")
    return args


def main(argv: list[str] | None = None, prog: str = "python data_prep/write_beton.py") -> int:
    parser = Parser(prog=prog,
                    description="Write CIFAR-10 as FFCV train.beton / test.beton.")
    parser.add_argument("--archive", help=f"local {ARCHIVE_NAME} (else ${ARCHIVE_ENV}, the data dir, or download)")
    parser.add_argument("--data-dir", default=DataConfig.data_dir, help="where the betons go (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up-to-date betons exist")
    parser.add_argument("--workers", type=int, default=2, help="writer processes (default: %(default)s)")
    parser.add_argument("--url", default=URL, help="download address (a mirror of the official archive)")
    parser.add_argument("--md5", default=MD5, help="md5 the download must have (default: the official one)")
    parser.add_argument("--expect-counts", type=_counts, default=COUNTS, metavar="TRAIN,TEST",
                        help="image counts the archive must hold, or 'any' (default: 50000,10000)")
    args = parser.parse_args(argv)
    return run_cli(lambda: prepare(Path(_checked(args).data_dir), args.archive, args.force, args.url, args.md5,
                                   args.expect_counts, args.workers),
                   interrupted="interrupted: nothing half-written was kept")


if __name__ == "__main__":
    sys.exit(main())
