import json

import numpy as np
import pytest
import torch
from torch import nn

from fastcifar.config import Config
from fastcifar.custom_resnet import CustomResNet
from fastcifar.data import make_loader
from fastcifar.errors import FastCifarError
from fastcifar.evaluation import evaluate_checkpoint, load_checkpoint, main, read_tta_accuracy
from fastcifar.inference import CLASSES, Predictions, predict
from fastcifar.rundir import save_checkpoint


def test_checkpoint_evaluation_matches_the_training_run(tiny_run, synthetic, capsys):
    # batch 16: 13 batches, more than FFCV's buffer slots, so a kept view of a batch would be overwritten
    preds = evaluate_checkpoint(tiny_run.run_dir / "model.pt", device="cpu", batch_size=16, num_workers=1)
    np.testing.assert_array_equal(preds.labels, synthetic["test"][1])
    assert preds.accuracy == pytest.approx(tiny_run.metrics[-1]["test_acc"], abs=1e-9)
    assert preds.loss == pytest.approx(tiny_run.metrics[-1]["test_loss"], rel=1e-3)
    saved = tiny_run.run_dir.parent / "tta.json"
    argv = ["--checkpoint", str(tiny_run.run_dir / "model.pt"), "--device", "cpu", "--tta", "--save", str(saved)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("test accuracy") and "airplane" in out and "truck" in out
    report = json.loads(saved.read_text())
    assert report["tta"] is True and report["images"] == len(preds.labels)
    assert f"test accuracy {report['test_acc']:.2%}" in out
    assert sorted(report["per_class_acc"]) == sorted(CLASSES)
    assert report["command"].startswith("python -m fastcifar.evaluate --checkpoint ") and "--tta" in report["command"]
    assert read_tta_accuracy(saved) == report["test_acc"]


def test_save_into_a_missing_folder_fails_before_evaluating(tiny_run, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_run.run_dir / "model.pt"), "--save", str(tmp_path / "nope" / "x.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --save") and "folder does not exist" in err and err.count("\n") == 1


class FlipInvariant(nn.Module):
    """f(x) = g(x) + g(mirror(x)): the same output for an image and its mirror image, by construction."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))

    def forward(self, x):
        return self.g(x) + self.g(x.flip(-1))


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize(("content", "expected"), [
    ({"tta": True, "test_acc": 0.9175}, 0.9175),
    ({"tta": False, "test_acc": 0.9079}, None),  # saved without --tta: not a TTA number
    ({"tta_test_acc": 0.5262}, 0.5262),  # the ablation runner's older files
    (None, None),  # no file
])
def test_saved_tta_accuracy_is_read_back(tmp_path, content, expected):
    path = tmp_path / "tta.json"
    if content is not None:
        path.write_text(json.dumps(content))
    assert read_tta_accuracy(path) == expected


@pytest.mark.parametrize("text", ["{", "[]", '{"test_acc": 0.9}', '{"tta": true, "test_acc": "high"}'])
def test_a_broken_tta_file_is_named_in_the_error(tmp_path, text):
    (tmp_path / "tta.json").write_text(text)
    with pytest.raises(FastCifarError, match="tta.json is not a file written by python -m fastcifar evaluate"):
        read_tta_accuracy(tmp_path / "tta.json")


def test_flip_tta_changes_nothing_for_a_flip_invariant_model(synthetic):
    model = FlipInvariant()
    model(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    loader = make_loader(synthetic["data_dir"] / "test.beton", 50, 1, torch.device("cpu"), train=False)
    plain = predict(model, loader, _to_float, _no_autocast)
    tta = predict(model, loader, _to_float, _no_autocast, tta=True)
    np.testing.assert_allclose(tta.probs, plain.probs, rtol=1e-5, atol=1e-6)
    assert len(tta.labels) == 200


def _to_float(images):
    return images.float() / 255


def test_unsafe_and_foreign_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FastCifarError, match="could run code") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(info.value)  # never pass on PyTorch's advice to turn the protection off
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(FastCifarError, match="is not a fastcifar checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "old.pt", {"model": {}, "config": {}})
    torch.save({"format": 0, "model": {}}, tmp_path / "old.pt")
    with pytest.raises(FastCifarError, match="checkpoint format 0"):
        load_checkpoint(tmp_path / "old.pt")
    with pytest.raises(FastCifarError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_prediction_statistics_on_hand_made_arrays():
    probs = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    preds = Predictions(probs * 0.9 + 0.1 / 3, np.array([0, 1, 2, 1]), np.zeros((0, 32, 32, 3), np.uint8),
                        np.zeros(0, np.int64))
    assert preds.accuracy == 0.75
    np.testing.assert_array_equal(preds.confusion(3), [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_allclose(preds.per_class_accuracy(3), [1, 0.5, 1])


class _Linear(torch.nn.Module):
    """A position-dependent linear model: every view of the TTA gives different logits."""

    def __init__(self):
        super().__init__()
        self.weight = torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


class _ReusesItsOutput(_Linear):
    """Returns the same buffer on every call, as a model under CUDA graphs does."""

    def forward(self, x):
        if not hasattr(self, "out"):
            self.out = torch.empty(len(x), 10)
        return self.out.copy_(super().forward(x))


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("translate", [0, 1, 2])
def test_tta_views_are_the_mirror_and_the_reflect_shifted_copies(flip, translate):
    from fastcifar.inference import tta_logits

    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model = _Linear()

    def views(v):
        return [model(v), model(v.flip(-1))] if flip else [model(v)]

    expected = torch.stack(views(x)).mean(0)
    if translate:
        padded = torch.nn.functional.pad(x, (translate,) * 4, mode="reflect")
        t2 = 2 * translate
        shifted = [padded[..., :32, :32], padded[..., t2:t2 + 32, t2:t2 + 32]]
        expected = (expected + torch.stack([o for s in shifted for o in views(s)]).mean(0)) / 2
    assert torch.allclose(tta_logits(model, x, flip, translate), expected, atol=1e-4)
    # a model that hands back one buffer for every forward (CUDA graphs) gets the same answer
    assert torch.allclose(tta_logits(_ReusesItsOutput(), x, flip, translate), expected, atol=1e-4)


def test_checkpoints_that_do_not_fit_are_one_line(tmp_path):
    narrow = CustomResNet(Config.from_preset("smoke").model)
    save_checkpoint(tmp_path / "other.pt", {"model": narrow.state_dict(), "config": Config().to_dict()})
    with pytest.raises(FastCifarError, match=r"its weights do not fit the network its config describes") as info:
        load_checkpoint(tmp_path / "other.pt")
    assert "\n" not in str(info.value)
    save_checkpoint(tmp_path / "bare.pt", {"weights": {}})
    with pytest.raises(FastCifarError, match="holds no model weights with their config"):
        load_checkpoint(tmp_path / "bare.pt")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--batch-size", "0"], "--batch-size must be in [1, 10000]"),
    (["--batch-size", "100000000"], "--batch-size must be in [1, 10000] (the test set), got 100000000"),  # 1.5 TB
    (["--translate", "9"], "--translate must be in [0, 4]"),
])
def test_evaluate_refuses_bad_options_in_one_line(tmp_path, capsys, args, fragment):
    assert main(["--checkpoint", str(tmp_path / "x.pt"), *args]) == 2
    assert fragment in capsys.readouterr().err
