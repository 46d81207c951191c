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
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fastcifar.errors import FastCifarError

CHECKPOINT_FORMAT = 1


def create_run_dir(out_dir: str, name: str, preset: str, overwrite: bool) -> Path:
    """Make (or, with `overwrite`, reuse) the run directory; refuses to clobber a finished run."""
    name = name or f"{dt.datetime.now():%Y%m%d-%H%M%S}-{preset}"
    run_dir = Path(out_dir) / name
    if (run_dir / "results.json").exists() and not overwrite:
        raise FastCifarError(f"{run_dir} already holds a finished run; choose another --name or pass --overwrite")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise FastCifarError(f"cannot write to {run_dir} ({err.strerror}); choose another --out-dir") from None
    for stale in ("metrics.jsonl", "results.json"):
        (run_dir / stale).unlink(missing_ok=True)
    return run_dir


def reopen_run_dir(run_dir: Path) -> Path:
    """An existing run directory, to resume in; must still be writable."""
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise FastCifarError(f"cannot write to {run_dir} ({err.strerror})") from None
    return run_dir


def record_environment(path: Path, env: dict[str, Any], resumed: bool) -> None:
    """env.json: the environment of the start, plus one entry per resumption (which may be elsewhere)."""
    if resumed and path.exists():
        first = json.loads(path.read_text())
        env = first | {"resumes": first.get("resumes", []) + [env]}
    write_json(path, env)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON atomically (temp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace a .jsonl file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save atomically; `state` must hold only tensors and plain Python values (weights_only)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, loaded with weights_only=True: tensors and plain values
    only, so a malicious file cannot run code. Errors say what is wrong in one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FastCifarError(f"no checkpoint at {path}") from None
    except Exception as err:  # weights_only refuses anything but tensors and plain values
        raise FastCifarError(f"{path} is not a loadable fastcifar checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'corrupt or truncated'})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise FastCifarError(f"{path}: checkpoint format {found!r}, this fastcifar reads {CHECKPOINT_FORMAT} "
                             f"(written by an incompatible version)")
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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def environment(device: torch.device) -> dict[str, Any]:
    """Facts that decide what a run's numbers mean."""
    return {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ffcv": _version("ffcv"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
