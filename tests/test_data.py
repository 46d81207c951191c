import json
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcifar.config import DataConfig
from fastcifar.data import (
    ResidentLoader,
    make_loader,
    make_loaders,
    make_resident_loader,
    open_split,
    read_arrays,
    resolve_kind,
    write_arrays,
)
from fastcifar.errors import DataError
from tests.synthetic import decode_index
from tests.test_runfiles import CORRUPTIONS, JSON_VALUES, corrupt

CPU = torch.device("cpu")


KINDS = ["ffcv", "resident"]


def data_config(data_dir, kind: str, batch: int = 64, test_batch: int = 30) -> DataConfig:
    """The data section for a loader of `kind` over `data_dir` (batch sizes that do not divide 1000 / 200, so the
    last batch is partial)."""
    return DataConfig(data_dir=str(data_dir), loader=kind, batch_size=batch, test_batch_size=test_batch,
                      num_workers=1)


@pytest.fixture(scope="module", params=KINDS)
def loaders(synthetic, request):
    """Each loader kind over the same data: every contract test below runs for both."""
    return make_loaders(data_config(synthetic["data_dir"], request.param), CPU, seed=1)


BATCH = {"train": 64, "test": 30}


def _one_epoch(loader, index: int = 0, skip: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    indices, labels, sizes = [], [], []
    with loader.epoch(index, skip) as batches:
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
    assert sizes[-1] == len(true_labels) % BATCH[split]  # drop_last=False keeps the partial batch
    assert len(sizes) == len(loader) and loader.images == len(true_labels)
    if split == "test":
        assert seen.tolist() == list(range(len(true_labels)))  # sequential order


def test_train_order_is_shuffled_differently_each_epoch_and_replays_exactly(loaders):
    first, _, _ = _one_epoch(loaders.train, 0)
    second, _, _ = _one_epoch(loaders.train, 1)
    assert first.tolist() != sorted(first.tolist()) and first.tolist() != second.tolist()
    again, _, _ = _one_epoch(loaders.train, 0)  # an epoch's order is a function of (seed, epoch): resumable
    assert again.tolist() == first.tolist()


def test_skip_starts_the_epoch_at_that_batch(loaders):
    whole, labels, sizes = _one_epoch(loaders.train, 3)
    tail, tail_labels, tail_sizes = _one_epoch(loaders.train, 3, skip=5)
    assert tail.tolist() == whole[5 * 64:].tolist() and tail_sizes == sizes[5:]
    np.testing.assert_array_equal(tail_labels, labels[5 * 64:])


def test_subset_takes_the_first_images(synthetic):
    loader = make_loader(synthetic["data_dir"] / "train.beton", 16, 1, CPU, train=True, subset=50)
    seen, _, _ = _one_epoch(loader)
    assert sorted(seen.tolist()) == list(range(50))
    with pytest.raises(DataError, match="holds 1000 images; cannot take a subset of 5000"):
        make_loader(synthetic["data_dir"] / "train.beton", 16, 1, CPU, train=True, subset=5000)


def test_stopping_early_shuts_the_epoch_down(loaders):
    before = threading.active_count()
    with loaders.train.epoch() as batches:
        next(batches)
        assert threading.active_count() >= before  # FFCV's worker thread runs during the epoch
    assert threading.active_count() == before  # and not after it
    seen, _, _ = _one_epoch(loaders.train)  # the loader still works afterwards
    assert len(seen) == 1000


def test_torch_thread_count_survives_loaders(loaders):
    before = torch.get_num_threads()
    with loaders.test.epoch() as batches:
        for _ in batches:
            pass
    assert torch.get_num_threads() == before


def test_missing_beton_names_the_command(tmp_path):
    with pytest.raises(DataError, match=r"missing .*train\.beton; create it with: python -m fastcifar prepare"):
        make_loaders(data_config(tmp_path, "auto", batch=8), CPU)


def test_corrupt_beton_is_reported(tmp_path):
    for name in ("train.beton", "test.beton"):
        (tmp_path / name).write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="not a readable CIFAR-10 beton"):
        make_loaders(data_config(tmp_path, "auto", batch=8), CPU)


def _write(path, fields, rows):
    from ffcv.writer import DatasetWriter

    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(rows)


def test_truncated_beton_is_reported(synthetic, tmp_path):
    whole = (synthetic["data_dir"] / "test.beton").read_bytes()
    (tmp_path / "test.beton").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="test.beton is (not a readable CIFAR-10 beton|truncated)"):
        make_loader(tmp_path / "test.beton", 8, 1, CPU, train=False)


@pytest.mark.parametrize(("kind", "fragment"), [("size", "not 32x32"), ("schema", "not CIFAR-10's image"),
                                                ("cifar100", "has labels 0..99, not CIFAR-10's 0..9")])
def test_beton_of_the_wrong_kind_is_reported(tmp_path, kind, fragment):
    """Another data set in the same schema (CIFAR-100's labels) is refused when opened, not at the first loss."""
    from ffcv.fields import FloatField, IntField, RGBImageField

    side = 40 if kind == "size" else 32
    rows = [(np.zeros((side, side, 3), np.uint8), i * 33 % 100 if kind == "cifar100" else i % 10) for i in range(4)]
    label = FloatField() if kind == "schema" else IntField()
    _write(tmp_path / "x.beton", {"image": RGBImageField(write_mode="raw"), "label": label}, rows)
    with pytest.raises(DataError, match=fragment):
        make_loader(tmp_path / "x.beton", 8, 1, CPU, train=False)


def test_both_kinds_give_the_same_samples_each_epoch_and_the_same_test_batches(synthetic):
    kinds = {kind: make_loaders(data_config(synthetic["data_dir"], kind), CPU, seed=1) for kind in KINDS}
    epochs = {kind: _one_epoch(loaders.train, 2) for kind, loaders in kinds.items()}
    (ffcv_seen, ffcv_labels, _), (res_seen, res_labels, _) = epochs["ffcv"], epochs["resident"]
    assert sorted(ffcv_seen.tolist()) == sorted(res_seen.tolist())  # the same multiset of images...
    assert sorted(zip(ffcv_seen, ffcv_labels, strict=True)) == sorted(zip(res_seen, res_labels, strict=True))
    with kinds["ffcv"].test.epoch() as a, kinds["resident"].test.epoch() as b:
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):  # ...and equal test batches, in order
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("world", [2, 3])
def test_resident_ranks_share_every_sample_once_per_epoch(world):
    n = 12 if world == 2 else 10  # 10 / 3 ranks: padded to 12 with repeats, as DistributedSampler does
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 32, 32, 3).contiguous()
    ranks = [ResidentLoader(images, torch.arange(n), 2, train=True, seed=5, rank=r, world_size=world)
             for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # the same number of steps on every rank (DDP needs it)
    seen = []
    for r in ranks:
        with r.epoch(1) as batches:
            seen += [int(v) for x, y in batches for v in y]
    assert sorted(set(seen)) == list(range(n)) and len(seen) == world * ranks[0]._shard


def test_resident_epochs_depend_only_on_seed_and_index():
    images = torch.zeros(100, 32, 32, 3, dtype=torch.uint8)
    a, b = (ResidentLoader(images, torch.arange(100), 10, train=True, seed=s) for s in (0, 0))
    assert torch.equal(a.order(4), b.order(4)) and not torch.equal(a.order(4), a.order(5))
    other = ResidentLoader(images, torch.arange(100), 10, train=True, seed=1)
    assert not torch.equal(a.order(4), other.order(4))


def test_unknown_or_unavailable_loader_kinds_are_refused(monkeypatch):
    with pytest.raises(DataError, match="data.loader must be one of auto, ffcv, resident"):
        resolve_kind("dali")
    monkeypatch.setitem(__import__("sys").modules, "ffcv", None)  # FFCV made unimportable
    assert resolve_kind("auto") == "resident"
    with pytest.raises(DataError, match="FFCV is not installed; install FFCV with: bash scripts/setup.sh"):
        resolve_kind("ffcv")


def _good_arrays(n=4):
    return np.zeros((n, 32, 32, 3), np.uint8), np.arange(n) % 10


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing", r"missing .*train\.npz; create it with: python -m fastcifar prepare"),
    ("truncated", "not a readable CIFAR-10 array file"),
    ("foreign", "not a readable CIFAR-10 array file"),
    ("shape", r"not uint8 \[N, 32, 32, 3\]"),
    ("dtype", r"not uint8 \[N, 32, 32, 3\]"),
    ("counts", "labels"),
    ("labels", "labels outside 0..9"),
])
def test_bad_array_files_are_one_clear_error(tmp_path, case, fragment):
    path = tmp_path / "train.npz"
    images, labels = _good_arrays()
    if case == "truncated":
        write_arrays(images, labels, path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "foreign":
        path.write_text("not an npz")
    elif case == "shape":
        write_arrays(np.zeros((4, 28, 28, 3), np.uint8), labels, path)
    elif case == "dtype":
        np.savez(path, images=images.astype(np.float32), labels=labels)
    elif case == "counts":
        write_arrays(images, labels[:3], path)
    elif case == "labels":
        write_arrays(images, labels + 7, path)
    with pytest.raises(DataError, match=fragment):
        make_resident_loader(path, 8, CPU, train=True)


def test_arrays_round_trip_and_leave_no_temporary_file(tmp_path):
    images, labels = _good_arrays(6)
    write_arrays(images, labels, tmp_path / "test.npz")
    back_images, back_labels = read_arrays(tmp_path / "test.npz")
    np.testing.assert_array_equal(back_images, images)
    np.testing.assert_array_equal(back_labels, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["test.npz"]


def test_swapped_files_are_caught_by_the_manifest(synthetic, tmp_path):
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(synthetic["data_dir"], data_dir)
    for kind, (a, b) in {"ffcv": ("train.beton", "test.beton"), "resident": ("train.npz", "test.npz")}.items():
        (data_dir / a).rename(data_dir / "x")
        (data_dir / b).rename(data_dir / a)
        (data_dir / "x").rename(data_dir / b)
        with pytest.raises(DataError, match=r"holds 200 images but betons.json says 1,000: the files were swapped"):
            make_loaders(data_config(data_dir, kind), CPU)


def test_a_random_npz_gets_no_advice_to_unpickle_it(tmp_path):
    (tmp_path / "test.npz").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DataError) as err:
        read_arrays(tmp_path / "test.npz")
    assert "allow_pickle" not in str(err.value) and "pickle.load" not in str(err.value)
    assert "not a numpy .npz archive of arrays" in str(err.value)


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "data").write_text("a file")
    with pytest.raises(DataError, match="is a file, not a folder"):
        make_loaders(data_config(tmp_path / "data", "resident"), CPU)


def test_ffcvs_import_warning_about_notebook_widgets_is_silenced_and_no_other():
    """`import ffcv` pulls in tqdm.auto, which in a kernel without ipywidgets warns with the environment's path."""
    from fastcifar.ffcv_io import keep_torch_threads

    threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with keep_torch_threads():
            torch.set_num_threads(1)  # as FFCV's import does
            warnings.warn("IProgress not found. Please update jupyter and ipywidgets.", UserWarning, stacklevel=1)
            warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"] and torch.get_num_threads() == threads


# The data step's files damaged by generated changes, then opened by the loaders that every command uses
# (open_split): a loader of the split's 200 images, or one DataError line that names the damaged file. Never a
# traceback, whatever the file holds.
DAMAGE = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ENTRY = st.tuples(st.just("entry"), st.sampled_from(["train", "test", "arrays"]), st.sampled_from(["count", "bytes"]),
                  JSON_VALUES)


def _damaged_copy(synthetic, tmp_path_factory, name: str, change) -> Path:
    data_dir = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(synthetic["data_dir"], data_dir)
    if change[0] == "entry":  # one field of one file's entry (the arrays' entry of the test split)
        manifest = json.loads((data_dir / name).read_text())
        entry = manifest["arrays"]["test"] if change[1] == "arrays" else manifest[change[1]]
        entry[change[2]] = change[3]
        (data_dir / name).write_text(json.dumps(manifest))
    elif change[0] == "arrays":  # a well-formed .npz of other arrays
        _, images, labels, keys = change
        with open(data_dir / name, "wb") as f:
            np.savez(f, **dict(zip(keys, (images, labels), strict=True)))
    else:
        corrupt(data_dir / name, change)
    return data_dir


def _opens_or_names(data_dir: Path, kind: str, name: str) -> None:
    try:
        loader = open_split(data_config(data_dir, kind), "test", CPU)
    except DataError as err:
        assert "\n" not in str(err) and name in str(err), str(err)
    else:
        assert loader.images == 200


@pytest.mark.parametrize("kind", KINDS)
@DAMAGE
@given(change=st.one_of(CORRUPTIONS, ENTRY))
def test_a_damaged_manifest_is_one_error_naming_it(synthetic, tmp_path_factory, kind, change):
    _opens_or_names(_damaged_copy(synthetic, tmp_path_factory, "betons.json", change), kind, "betons.json")


def _arrays(draw_seed: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(draw_seed)
    return rng.integers(-3, 300, size=shape).astype(dtype)


ARRAY_DTYPES = st.sampled_from(["uint8", "int64", "float32", "bool", "int8"])
OTHER_ARRAYS = st.builds(
    lambda seed, image_dtype, image_shape, label_dtype, label_shape, keys: (
        "arrays", _arrays(seed, image_dtype, image_shape), _arrays(seed + 1, label_dtype, label_shape), keys),
    st.integers(0, 2**16), ARRAY_DTYPES,
    st.sampled_from([(200, 32, 32, 3), (200, 3, 32, 32), (200, 32, 32), (10, 32, 32, 3), (0, 32, 32, 3)]),
    ARRAY_DTYPES, st.sampled_from([(200,), (10,), (200, 1), ()]),
    st.sampled_from([("images", "labels"), ("labels", "images"), ("images", "targets"), ("x", "y")]))


@DAMAGE
@given(change=st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1)),
                        st.tuples(st.just("bytes"), st.binary(max_size=64)), OTHER_ARRAYS))
def test_damaged_arrays_are_one_error_naming_the_file(synthetic, tmp_path_factory, change):
    _opens_or_names(_damaged_copy(synthetic, tmp_path_factory, "test.npz", change), "resident", "test.npz")
