"""Shared fixtures: a tiny synthetic CIFAR-10 archive and betons made from it (built once per session,
because importing FFCV and JIT-compiling a loader each cost seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import settings

from fastcifar.config import Config
from fastcifar.prepare import prepare
from fastcifar.training import TrainResult, train
from tests.synthetic import write_archive

# The property tests draw their examples at random on a developer's machine (each run explores new inputs) and the
# same examples every time in CI (CI=true): a clean clone's verdict then does not depend on the draw.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
_SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"
@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's own calibration cache (fastcifar/calibrate.py), never the user's; commands run as subprocesses
    inherit it."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("FASTCIFAR_CACHE_DIR")
    os.environ["FASTCIFAR_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FASTCIFAR_CACHE_DIR", None)
    else:
        os.environ["FASTCIFAR_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Archive (1,000 train / 200 test images), the arrays in it, and a data dir holding its betons."""
    root = tmp_path_factory.mktemp("synthetic")
    archive = root / "cifar-10-python.tar.gz"
    train_x, train_y, test_x, test_y = write_archive(archive, per_batch=200, n_test=200)
    data_dir = root / "data"
    prepare(data_dir, archive=str(archive), counts=None, num_workers=1)
    return {"archive": archive, "data_dir": data_dir, "train": (train_x, train_y), "test": (test_x, test_y)}


def real_archive() -> Path | None:
    """The real CIFAR-10 archive, if this machine has one (CI does: ../shared/data)."""
    given = os.environ.get("FASTCIFAR_CIFAR_ARCHIVE")
    path = Path(given) if given else _SHARED_ARCHIVE
    return path if path.is_file() else None


# A tiny network on the synthetic betons: learns the colour classes in 3 short epochs.
TINY = {"model.widths": "8,16,32,64", "data.batch_size": 64, "data.test_batch_size": 64, "data.num_workers": 1,
        "schedule.epochs": 3, "schedule.peak_epoch": 1, "schedule.max_lr": 0.05, "schedule.min_lr": 0.005,
        "run.compile": "off", "run.precision": "fp32", "run.progress": "off",
        # given, not measured: the runs of the suite compare numbers across runs (tests/test_calibrate.py measures)
        "run.channels_last": "on", "run.conv_grad": "onednn",
        "run.device": "cpu"}  # the CPU suite stays on the CPU on a GPU host too (tests/test_cuda.py is the GPU's)


TINY_PRESET = "reference"  # named in full: the command line's default preset is another one


def _tiny_options(synthetic: dict, out_dir: Path, overrides: dict) -> dict:
    return TINY | {"data.data_dir": str(synthetic["data_dir"]), "run.out_dir": str(out_dir),
                   "run.name": "run"} | overrides


def tiny_config(synthetic: dict, out_dir: Path, **overrides) -> Config:
    """TINY on the synthetic data, writing to out_dir/run unless overridden (dotted keys)."""
    return Config.from_preset(TINY_PRESET, _tiny_options(synthetic, out_dir, overrides))


def tiny_cli_args(synthetic: dict, out_dir: Path, preset: str | None = TINY_PRESET, **overrides) -> list[str]:
    """The command-line arguments of `tiny_config(synthetic, out_dir, **overrides)`; `preset=None` leaves the
    preset to the command's default (TINY's settings then apply on top of that preset)."""
    options = _tiny_options(synthetic, out_dir, overrides)
    named = ["--preset", preset] if preset is not None else []
    return [*named, *[f"--{key}={value}" for key, value in options.items()]]


@pytest.fixture(scope="session")
def tiny_run(synthetic: dict, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One finished tiny training run, shared by the tests that read a run directory."""
    return train(tiny_config(synthetic, tmp_path_factory.mktemp("runs")), log=lambda _: None)


# Every accuracy lever of the config switched on (tests/test_train.py, test_checkpoint.py).
LEVERS = {"optim.ema_decay": 0.9, "data.flip_mode": "alternate", "data.test_flip": True, "optim.bn_lr_scale": 4.0,
          "optim.bn_weight_decay": False, "model.whiten_init": True, "model.bn_momentum": 0.3,
          "model.logit_scale": 0.5, "optim.nesterov": True, "optim.label_smoothing": 0.1, "data.pad_mode": "reflect",
          "schedule.end_lr": 0.0, "model.whiten_frozen": True, "model.bn_weight_frozen": True,
          "model.dirac_init": True, "optim.lookahead_every": 2, "data.test_translate": 1, "optim.optimizer": "muon",
          "optim.muon_lr": 0.1, "optim.bn_wd_scale": 0.5, "model.ghost_batch": 16, "data.low_res_size": 24,
          "data.low_res_epochs": 1}


@pytest.fixture(scope="session")
def lever_run(synthetic: dict, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A finished tiny run with every lever on."""
    return train(tiny_config(synthetic, tmp_path_factory.mktemp("levers"), **LEVERS), log=lambda _: None)


def sigterm_after_first_epoch(cmd: list[str], metrics: Path, cwd: Path | None = None) -> tuple[int, str, str]:
    """Start a training command, send it SIGTERM once `metrics` (metrics.jsonl) has its first line, and return
    (exit status, stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def signal_at(monkeypatch: pytest.MonkeyPatch, target: str, call: int) -> None:
    """Send this process SIGTERM during the `call`-th call of `target`: train_step (fastcifar.loop's, which the
    epoch loop calls) or test_pass (as fastcifar.training calls it)."""
    import importlib
    import os
    import signal

    module = importlib.import_module("fastcifar.loop" if target == "train_step" else "fastcifar.training")
    original, calls = getattr(module, target), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, target, wrapper)
