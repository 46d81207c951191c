"""The GPU path, on a real CUDA device (marker `cuda`; skipped where there is none, as in CI).

`scripts/gpu_check.sh` runs these first on a machine that has a GPU. They use the resident loader (the GPU
machine has no FFCV) and synthetic data in the exact CIFAR-10 format (tests/synthetic.py).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from fastcifar.augment import BatchAugment, cutout, normalize, random_crop, random_flip
from fastcifar.config import DataConfig
from fastcifar.data import make_resident_loader
from fastcifar.runtime import resolve_precision
from fastcifar.training import train
from tests.conftest import signal_at, tiny_config
from tests.synthetic import decode_index

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
QUIET = {"log": lambda _: None}
ON_GPU = {"run.device": "cuda"}


def _loader(synthetic, split="train", batch=64, train_order=True):
    return make_resident_loader(synthetic["data_dir"] / f"{split}.npz", batch, CUDA, train=train_order, seed=1)


def test_auto_precision_is_native_bf16_only_from_sm80():
    major, _ = torch.cuda.get_device_capability()
    assert resolve_precision("auto", CUDA) == (torch.bfloat16 if major >= 8 else torch.float16)


def test_the_loader_gives_every_sample_once_per_epoch_on_the_device_channels_last(synthetic):
    loader = _loader(synthetic)
    seen, labels = [], []
    with loader.epoch(3) as batches:
        for images, targets in batches:
            assert images.device.type == "cuda" and targets.device.type == "cuda"
            assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
            seen.append(decode_index(images.cpu().numpy()))
            labels.append(targets.cpu().numpy())
    seen, labels = np.concatenate(seen), np.concatenate(labels)
    assert sorted(seen.tolist()) == list(range(1000))
    np.testing.assert_array_equal(labels, synthetic["train"][1][seen])


def test_the_loader_is_right_under_a_lagging_gpu(synthetic):
    """Batches must not be overwritten while the GPU still works on them (a buffer-reuse race shows here)."""
    loader = _loader(synthetic)
    expected = []
    with loader.epoch(1) as batches:
        expected = [(x.clone(), y.clone()) for x, y in batches]
    kept = []
    with loader.epoch(1) as batches:
        for x, y in batches:
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time queued before the batch is used
            kept.append((x.float().sum(dim=(1, 2, 3)), y.clone()))
    torch.cuda.synchronize()
    for (x, y), (sums, labels) in zip(expected, kept, strict=True):
        assert torch.equal(x.float().sum(dim=(1, 2, 3)), sums) and torch.equal(y, labels)


def test_an_epoch_stopped_early_leaves_a_clean_next_epoch(synthetic):
    loader = _loader(synthetic)
    with loader.epoch(0) as batches:
        next(batches)
    with loader.epoch(1) as batches:
        assert sum(len(y) for _, y in batches) == 1000


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_fused_augmentation_on_cuda_equals_the_separate_functions(synthetic, pad_mode):
    with _loader(synthetic).epoch(0) as batches:
        images, _ = next(batches)
    settings = DataConfig(pad_mode=pad_mode, flip_mode="random")
    fused = BatchAugment(settings, CUDA, 7, torch.float32)
    gen = torch.Generator(device=CUDA).manual_seed(7)
    x = random_crop(images, 4, gen, pad_mode)
    x = random_flip(x, gen)
    x = cutout(x, 8, gen, fused.fill)
    assert torch.equal(fused.train(images), normalize(x, fused.mean, fused.std, torch.float32).contiguous(
        memory_format=torch.channels_last))


def test_augmentation_makes_no_host_sync(synthetic):
    augment = BatchAugment(DataConfig(pad_mode="reflect", flip_mode="random"), CUDA, 0, torch.bfloat16)
    with _loader(synthetic).epoch(0) as batches:
        images, _ = next(batches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            augment.train(images)
            augment.normalize(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_no_recompiles_after_the_warm_up(synthetic, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    cfg = tiny_config(synthetic, tmp_path, **ON_GPU, **{"run.compile": "on", "data.loader": "resident",
                                                        "schedule.epochs": 2})
    from fastcifar import session as session_module
    from fastcifar.training import _train

    session = session_module.Session.open(cfg, **QUIET)
    session.warm_up()
    torch._dynamo.config.error_on_recompile = True  # any recompile after the warm-up raises
    try:
        _train(session, None, QUIET["log"], time.perf_counter())
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_fp16_with_the_grad_scaler_trains_and_counts_skipped_steps(synthetic, tmp_path):
    run = train(tiny_config(synthetic, tmp_path, **ON_GPU, **{"run.precision": "fp16"}), **QUIET)
    assert run.metrics[-1]["train_loss"] < run.metrics[0]["train_loss"]
    assert all(isinstance(m["skipped_steps"], int) and m["skipped_steps"] >= 0 for m in run.metrics)


def test_deterministic_cuda_runs_repeat_bit_for_bit(synthetic, tmp_path):
    cfg = tiny_config(synthetic, tmp_path, **ON_GPU, **{"run.deterministic": True, "schedule.epochs": 1,
                                                        "schedule.peak_epoch": 1})
    a = train(cfg.override({"run.name": "a"}), **QUIET)
    b = train(cfg.override({"run.name": "b"}), **QUIET)
    assert [m["train_loss"] for m in a.metrics] == [m["train_loss"] for m in b.metrics]
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_tta_under_cuda_graphs_equals_eager():
    from fastcifar.config import ModelConfig
    from fastcifar.custom_resnet import CustomResNet
    from fastcifar.inference import tta_logits

    model = CustomResNet(ModelConfig(widths=(8, 16, 32, 64))).to(CUDA, memory_format=torch.channels_last).eval()
    x = torch.randn(32, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    graphed = torch.compile(model, mode="reduce-overhead", dynamic=False)
    with torch.no_grad():
        eager = tta_logits(model, x, True, 1)
        for _ in range(3):  # record, then replay
            out = tta_logits(graphed, x, True, 1)
    assert torch.allclose(out, eager, atol=1e-4, rtol=1e-4)


def test_a_tiny_cuda_run_learns_and_records_the_gpu(synthetic, tmp_path):
    run = train(tiny_config(synthetic, tmp_path, **ON_GPU), **QUIET)
    assert run.metrics[-1]["test_acc"] > 0.5
    env = json.loads((run.run_dir / "env.json").read_text())
    assert env["device"].startswith("cuda") and torch.cuda.get_device_name() in env["device_name"]


def test_resume_on_cuda_matches_the_uninterrupted_run(synthetic, tmp_path, monkeypatch):

    from fastcifar.interrupt import TrainingInterrupted

    cfg = tiny_config(synthetic, tmp_path, **ON_GPU, **{"run.deterministic": True})
    whole = train(cfg.override({"run.name": "whole"}), **QUIET)
    signal_at(monkeypatch, "train_step", 21)
    with pytest.raises(TrainingInterrupted):
        train(cfg.override({"run.name": "stopped"}), **QUIET)
    monkeypatch.undo()
    resumed = train(cfg.override({"run.name": "stopped"}), resume=tmp_path / "stopped", **QUIET)
    assert [m["test_acc"] for m in resumed.metrics] == [m["test_acc"] for m in whole.metrics]
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())


def test_a_run_started_on_the_cpu_is_not_resumed_on_the_gpu(synthetic, tmp_path, monkeypatch):
    """--device auto both times: the checkpoint's generator states belong to the CPU."""

    from fastcifar.errors import FastCifarError
    from fastcifar.interrupt import TrainingInterrupted

    cfg = tiny_config(synthetic, tmp_path, **{"run.device": "auto"})
    signal_at(monkeypatch, "train_step", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    with pytest.raises(TrainingInterrupted):
        train(cfg, **QUIET)
    monkeypatch.undo()
    with pytest.raises(FastCifarError, match="saved on cpu"):
        train(cfg, resume=tmp_path / "run", **QUIET)
