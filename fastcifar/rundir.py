"""A run directory holds everything needed to trust and reproduce a run:

    config.json      the resolved configuration (load it back with --config)
    env.json         versions, device, CPU, threads, git commit, start time
    metrics.jsonl    one JSON object per epoch
    results.json     final summary (written last: its presence marks a finished run)
    checkpoint.pt    the full training state after the last finished epoch (or at a signal): --resume
    best.pt          weights + config of the epoch with the best test accuracy so far
    model.pt         final weights + config (load with torch.load(..., weights_only=True))
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fastcifar import allocator
from fastcifar.errors import FastCifarError, WriteError, os_error_message
from fastcifar.runfiles import read_env

CHECKPOINT_FORMAT = 1


# Every file a training run writes into its directory: --overwrite removes all of them before the new run writes
# anything, so that nothing of the old run (a checkpoint to resume, weights, figures) survives into the new one.
RUN_FILES = ("config.json", "env.json", "metrics.jsonl", "results.json", "checkpoint.pt", "best.pt", "model.pt",
             "predictions.npz", "curves.png", "lr_schedule.png", "misclassified.png", "confusion.png", "summary.md",
             "tta.json", "find_lr.json", "find_lr.png", "lr_sweep.json", "lr_sweep.png")
LOCK = ".lock"
_HELD: dict[Path, Any] = {}  # run directory -> its open lock file, held until the process ends


def create_run_dir(out_dir: str, name: str, preset: str, overwrite: bool) -> Path:
    """Make (or, with `overwrite`, empty and reuse) the run directory, and lock it for this process. Refuses a
    directory that holds a finished or an unfinished run (without --overwrite) or that another process uses."""
    name = name or f"{dt.datetime.now():%Y%m%d-%H%M%S}-{preset}"
    run_dir = Path(out_dir) / name
    check_new_run_dir(run_dir, overwrite)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise FastCifarError(os_error_message(err, "cannot write to", run_dir)) from None
    lock_run_dir(run_dir)
    for stale in RUN_FILES:  # an overwritten run leaves nothing behind (and a plain new one has none of them)
        (run_dir / stale).unlink(missing_ok=True)
    return run_dir


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Everything that would refuse `run_dir` for a new run, checked without creating anything (so that a command
    can say it in its first second, before it reads data): in use by a running training (which process), a finished
    or an unfinished run there (without --overwrite), or a place that cannot be written."""
    owner = lock_owner(run_dir)
    if owner:
        raise FastCifarError(f"{run_dir} is in use by a training that is still running ({owner}); wait for it, "
                             f"stop it, or choose another --name")
    if not overwrite and (run_dir / "results.json").exists():
        raise FastCifarError(f"{run_dir} already holds a finished run; choose another --name or pass --overwrite")
    if not overwrite and (run_dir / "checkpoint.pt").exists():
        raise FastCifarError(f"{run_dir} holds an unfinished run; continue it with: python -m fastcifar train "
                             f"--resume {run_dir} (or pass --overwrite to start over)")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:  # where the folders would be made
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise FastCifarError(f"{existing} is a file, not a folder; choose another --out-dir or --name")
    if not os.access(existing, os.W_OK | os.X_OK):  # False on a read-only mount also for root
        why = "the file system is read-only" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise FastCifarError(f"cannot write to {existing} ({why}); choose another --out-dir")


def lock_owner(run_dir: Path) -> str:
    """Who holds RUN_DIR's lock ('pid 1234'), or "" when no running process does."""
    import fcntl

    if run_dir.resolve() in _HELD or not (run_dir / LOCK).exists():
        return ""
    try:
        with open(run_dir / LOCK) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "another process"
    except OSError:
        return ""
    return ""


def reopen_run_dir(run_dir: Path) -> Path:
    """An existing run directory, to resume in: must still be writable, and not in use by another process."""
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise FastCifarError(os_error_message(err, "cannot write to", run_dir)) from None
    lock_run_dir(run_dir)
    return run_dir


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on RUN_DIR/.lock until this process ends (the OS drops it even after kill -9), so
    that two trainings never share one directory."""
    import fcntl  # POSIX only; elsewhere the lock is skipped

    key = run_dir.resolve()
    if key in _HELD:
        return
    handle = open(run_dir / LOCK, "a+")  # noqa: SIM115 (kept open on purpose: the lock lives with the handle)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise FastCifarError(f"{run_dir} is in use by a training that is still running ({owner}); wait for it, "
                             f"stop it, or choose another --name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _HELD[key] = handle
    for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write; we hold the lock: none is live
        stale.unlink(missing_ok=True)


def release_run_dir(run_dir: Path) -> None:
    """Give up this process's lock (the API releases it when a run ends; a process exit releases it anyway)."""
    handle = _HELD.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()


def record_environment(path: Path, env: dict[str, Any], resumed: bool) -> None:
    """env.json: the environment of the start, plus one entry per resumption (which may be elsewhere)."""
    if resumed and path.exists():
        first = read_env(path)  # checked: a broken record is one line, not a traceback halfway into the resume
        env = first | {"resumes": first.get("resumes", []) + [env]}
    write_json(path, env)


def _temporary(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and call (two writers never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(temporary_path)` and rename it into place, so that a reader never sees half a
    file; on any error (a full or read-only disk...) the temporary file is removed, `path` is left as it was,
    and an OSError becomes one WriteError line naming the path and what to do."""
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise WriteError(os_error_message(err, "cannot write", path)) from None
    except RuntimeError as err:  # torch.save reports a full disk as RuntimeError ("unexpected pos ...")
        if "write" in str(err) or "pos" in str(err) or "file" in str(err):
            raise WriteError(f"cannot write {path}: {str(err).splitlines()[0]} (a full disk?); free space or "
                             f"write elsewhere (--out-dir)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _json(obj: Any, **options: Any) -> str:
    """JSON with non-finite floats written as null (bare NaN is not JSON)."""
    return json.dumps(_finite(obj), allow_nan=False, **options)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (temp file + rename), so a reader never sees half a file."""
    atomic_write(path, lambda tmp: tmp.write_text(_json(obj, indent=2) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def append_jsonl(path: Path, obj: Any) -> None:
    try:
        with open(path, "a") as f:
            f.write(_json(obj) + "\n")
    except OSError as err:
        raise WriteError(os_error_message(err, "cannot write", path)) from None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace a .jsonl file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text("".join(_json(row) + "\n" for row in rows)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def state_checksum(state: Any) -> str:
    """A digest of every tensor and plain value in `state` (dict keys sorted): a checkpoint corrupted inside a
    tensor, with its zip structure intact, no longer matches."""
    digest = hashlib.blake2b(digest_size=16)

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                digest.update(str(key).encode())
                visit(obj[key])
        elif isinstance(obj, list | tuple):
            for item in obj:
                visit(item)
        else:
            digest.update(repr(obj).encode())

    visit(state)
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save atomically, with a checksum of the state; `state` must hold only tensors and plain Python
    values (weights_only)."""
    full = {"format": CHECKPOINT_FORMAT, **state}
    full["checksum"] = state_checksum(full)
    atomic_write(path, lambda tmp: torch.save(full, tmp))


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, loaded with weights_only=True: tensors and plain values
    only, so a malicious file cannot run code. Errors say what is wrong in one line."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise FastCifarError(f"{path} is not a checkpoint (not a file written by torch.save); pass a model.pt, best.pt "
                             f"or checkpoint.pt written by fastcifar.train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FastCifarError(f"no checkpoint at {path}") from None
    except Exception as err:  # weights_only refuses anything but tensors and plain values
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise FastCifarError(f"{path} holds objects other than tensors and plain values; it is refused, "
                                 f"because loading it could run code") from None
        raise FastCifarError(f"{path} is not a loadable fastcifar checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'corrupt or truncated'})") from None
    if not isinstance(state, dict) or "format" not in state:
        raise FastCifarError(f"{path} is not a fastcifar checkpoint (no format marker); pass a model.pt, best.pt or "
                             f"checkpoint.pt written by fastcifar.train")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise FastCifarError(f"{path}: checkpoint format {state.get('format')!r}, this fastcifar reads "
                             f"{CHECKPOINT_FORMAT} (written by an incompatible version)")
    saved = state.pop("checksum", None)
    if saved is None:
        raise FastCifarError(f"{path} has no checksum: it was not written by fastcifar (or was altered); it is refused "
                             f"unverified. Use the run's own checkpoint, or train again")
    if saved != state_checksum(state):
        raise FastCifarError(f"{path} is corrupt (its contents do not match the checksum written with it); use "
                             f"another copy, or best.pt / an earlier run")
    return state


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@functools.cache
def read_cpuinfo() -> str:
    """/proc/cpuinfo, read once per process ("" where there is none): the CPU's name and its kind come from it."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpuinfo_field(text: str, key: str) -> str | None:
    """The value of the first `key : value` line of a /proc/cpuinfo text (the whole key: "model" is not
    "model name")."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return next((value.strip() for name, value in pairs if name.strip() == key), None)


def cpu_name() -> str:
    return cpuinfo_field(read_cpuinfo(), "model name") or platform.processor() or platform.machine()


def cpu_kind(cpuinfo: str | None = None) -> str:
    """Which of the CPU kinds that train differently this is, from the instruction sets the kernel reports: AMX
    (bf16 matrix units), AVX512-BF16 without AMX (bf16 dot products in the vector units), or neither (PyTorch's
    bf16 kernels are slow there, so fp32 trains). Two CPUs that both call themselves "AMD EPYC" differ this way."""
    flags = set((cpuinfo_field(read_cpuinfo() if cpuinfo is None else cpuinfo, "flags") or "").split())
    if "amx_bf16" in flags:
        return "amx_bf16"
    if "avx512_bf16" in flags:
        return "avx512_bf16, no amx"
    return f"{torch.backends.cpu.get_cpu_capability().lower()}, no bf16 instructions" if flags else "unknown"


def cpu_family(cpuinfo: str | None = None) -> str | None:
    """'family 26 model 2': the CPU's generation as the kernel reports it, or None where it does not (not x86 Linux).
    Two CPUs of one kind and one model name can still differ by a generation: the 2-core "AMD EPYC" machines here
    were Zen 4 (family 25) at ~265 s per epoch and Zen 5 (family 26) at ~180 s."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    family, model = cpuinfo_field(text, "cpu family"), cpuinfo_field(text, "model")
    return f"family {family} model {model}" if family and model else None


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device: torch.device) -> dict[str, Any]:
    """Facts that decide what a run's numbers mean."""
    return {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ffcv": _version("ffcv"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_kind": cpu_kind(),  # amx_bf16 / avx512_bf16 / neither: what decides the CPU's training precision
        "cpu_family": cpu_family(),  # the generation within a kind: the same kind and name can differ 1.5x in speed
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator.describe(),  # tcmalloc where installed (fastcifar/allocator.py): speed only
        "device": str(device),
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
