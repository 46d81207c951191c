import numpy as np
import pytest
import torch

from fastcifar.data import epoch, make_loader, make_loaders
from fastcifar.errors import DataError
from tests.synthetic import decode_index

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaders(synthetic):
    # batch sizes that do not divide 1000 / 200, so the last batch is partial
    return make_loaders(synthetic["data_dir"], batch_size=64, test_batch_size=30, num_workers=1, device=CPU, seed=1)


def _one_epoch(loader) -> tuple[np.ndarray, np.ndarray, list[int]]:
    indices, labels, sizes = [], [], []
    with epoch(loader) as batches:
        for images, targets in batches:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert targets.dtype == torch.int64 and targets.shape == (len(images),)
            indices.append(decode_index(images.numpy()))
            labels.append(targets.numpy().copy())
            sizes.append(len(images))
    return np.concatenate(indices), np.concatenate(labels), sizes


@pytest.mark.parametrize("split", ["train", "test"])
def test_each_sample_exactly_once_with_its_own_label(loaders, synthetic, split):
    loader = getattr(loaders, split)
    _, true_labels = synthetic[split]
    seen, labels, sizes = _one_epoch(loader)
    assert sorted(seen.tolist()) == list(range(len(true_labels)))  # no drops, no repeats
    np.testing.assert_array_equal(labels, true_labels[seen])
    assert sizes[-1] == len(true_labels) % loader.batch_size  # drop_last=False keeps the partial batch
    if split == "test":
        assert seen.tolist() == list(range(len(true_labels)))  # sequential order


def test_train_order_is_shuffled_differently_each_epoch(loaders):
    first, _, _ = _one_epoch(loaders.train)
    second, _, _ = _one_epoch(loaders.train)
    assert first.tolist() != sorted(first.tolist()) and first.tolist() != second.tolist()


def test_subset_takes_the_first_images(synthetic):
    loader = make_loader(synthetic["data_dir"] / "train.beton", 16, 1, CPU, train=True, subset=50)
    seen, _, _ = _one_epoch(loader)
    assert sorted(seen.tolist()) == list(range(50))
    with pytest.raises(DataError, match="holds 1000 images; cannot take a subset of 5000"):
        make_loader(synthetic["data_dir"] / "train.beton", 16, 1, CPU, train=True, subset=5000)


def test_stopping_early_shuts_the_epoch_down(loaders):
    with epoch(loaders.train) as batches:
        next(batches)
        iterator = batches
    assert not iterator.is_alive()
    seen, _, _ = _one_epoch(loaders.train)  # the loader still works afterwards
    assert len(seen) == 1000


def test_torch_thread_count_survives_loaders(loaders):
    before = torch.get_num_threads()
    with epoch(loaders.test) as batches:
        for _ in batches:
            pass
    assert torch.get_num_threads() == before


def test_missing_beton_names_the_command(tmp_path):
    with pytest.raises(DataError, match=r"missing .*train\.beton; create it with: python data_prep/write_beton.py"):
        make_loaders(tmp_path, 8, 8, 1, CPU)


def test_corrupt_beton_is_reported(tmp_path):
    for name in ("train.beton", "test.beton"):
        (tmp_path / name).write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="not a readable CIFAR-10 beton"):
        make_loaders(tmp_path, 8, 8, 1, CPU)


def _write(path, fields, rows):
    from ffcv.writer import DatasetWriter

    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(rows)


def test_truncated_beton_is_reported(synthetic, tmp_path):
    whole = (synthetic["data_dir"] / "test.beton").read_bytes()
    (tmp_path / "test.beton").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="test.beton is (not a readable CIFAR-10 beton|truncated)"):
        make_loader(tmp_path / "test.beton", 8, 1, CPU, train=False)


@pytest.mark.parametrize(("kind", "fragment"), [("size", "not 32x32"), ("schema", "not CIFAR-10's image")])
def test_beton_of_the_wrong_kind_is_reported(tmp_path, kind, fragment):
    from ffcv.fields import FloatField, IntField, RGBImageField

    side = 40 if kind == "size" else 32
    rows = [(np.zeros((side, side, 3), np.uint8), i % 10) for i in range(4)]
    label = IntField() if kind == "size" else FloatField()
    _write(tmp_path / "x.beton", {"image": RGBImageField(write_mode="raw"), "label": label}, rows)
    with pytest.raises(DataError, match=fragment):
        make_loader(tmp_path / "x.beton", 8, 1, CPU, train=False)
