"""Tests on the real CIFAR-10 archive (FASTCIFAR_CIFAR_ARCHIVE, or ../shared/data next to the repo).
Skipped where there is none; CI has one."""

import numpy as np
import pytest

from fastcifar.config import Config
from fastcifar.prepare import prepare, read_cifar10
from fastcifar.training import train
from tests.conftest import real_archive

pytestmark = [pytest.mark.real_data, pytest.mark.skipif(real_archive() is None, reason="no CIFAR-10 archive here")]


@pytest.fixture(scope="module")
def real_betons(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("real") / "data"
    manifest = prepare(data_dir, archive=str(real_archive()))
    assert (manifest["train"]["count"], manifest["test"]["count"]) == (50_000, 10_000)
    return data_dir


def test_archive_has_the_cifar10_structure(tmp_path):
    train_split, test_split = read_cifar10(real_archive(), tmp_path)
    assert train_split.images.shape == (50_000, 32, 32, 3) and test_split.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(train_split.labels).tolist() == [5000] * 10
    assert np.bincount(test_split.labels).tolist() == [1000] * 10


@pytest.mark.slow
def test_short_run_on_a_subset_is_far_above_chance(real_betons, tmp_path):
    # The default recipe (LRs from the range test) for 2 epochs on the first 10,000 training images, with a
    # 4x narrower network and batch 128 so that it takes about a minute on a 2-core CPU (the full network
    # trains at ~60 img/s there); tested on the first 2,000 test images. Measured
    # here: 45.6% after 2 epochs (36.6% after 1) in 47 s; chance is 10%.
    cfg = Config.from_preset("reference", {
        "data.data_dir": str(real_betons), "data.train_subset": 10_000, "data.test_subset": 2_000,
        "data.batch_size": 128, "model.widths": "16,32,64,128", "schedule.epochs": 2, "schedule.peak_epoch": 0.5,
        "run.precision": "fp32", "run.compile": "off", "run.progress": "off", "run.out_dir": str(tmp_path)})
    result = train(cfg, log=print)
    assert result.metrics[-1]["test_acc"] > 0.30
