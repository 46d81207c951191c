"""Shared fixtures: a tiny synthetic CIFAR-10 archive and betons made from it (built once per session,
because importing FFCV and JIT-compiling a loader each cost seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_prep.write_beton import prepare
from tests.synthetic import write_archive

REPO = Path(__file__).resolve().parents[1]
_SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"


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
