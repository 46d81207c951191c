import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from fastcifar import reporting as report
from fastcifar.config import Config
from fastcifar.inference import Predictions
from fastcifar.rundir import append_jsonl, write_json

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path):
    """A hand-made run directory: 3 epochs, predictions for 100 test images (30 wrong)."""
    cfg = Config.from_preset("reference", {"schedule.epochs": 3, "schedule.peak_epoch": 1})
    write_json(tmp_path / "config.json", cfg.to_dict())
    write_json(tmp_path / "env.json", {"device": "cpu", "device_name": "test CPU", "torch": "x", "git_commit": None})
    for epoch in (1, 2, 3):
        append_jsonl(tmp_path / "metrics.jsonl", {"epoch": epoch, "train_loss": 2 / epoch, "train_acc": 0.3 * epoch,
                                                  "test_loss": 2.1 / epoch, "test_acc": 0.25 * epoch})
    write_json(tmp_path / "results.json", {"epochs": 3, "final_test_acc": 0.7, "best_test_acc": 0.75,
                                           "train_seconds": 10.0, "total_seconds": 12.0, "compile_seconds": 0.0,
                                           "mean_train_img_s": 99.0, "steps_per_epoch": 98})
    rng = np.random.default_rng(0)
    labels = np.arange(100) % 10
    predicted = np.where(np.arange(100) < 30, (labels + 1) % 10, labels)
    probs = np.full((100, 10), 0.02, np.float32)
    probs[np.arange(100), predicted] = 0.82
    wrong = np.arange(30)
    Predictions(probs, labels, rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), wrong).save(
        tmp_path / "predictions.npz")
    return tmp_path


def test_write_report_makes_every_file(run_dir):
    written = report.write_report(run_dir)
    assert sorted(p.name for p in written) == sorted(report.FILES)
    for name in report.FILES:
        data = (run_dir / name).read_bytes()
        assert data[:8] == PNG if name.endswith(".png") else data.startswith(b"# Run summary")
    summary = (run_dir / "summary.md").read_text()
    assert "**70.00%**" in summary and "best 75.00%" in summary and "99 images/s" in summary
    assert "| cat | 70.00% |" in summary  # 3 of the 10 cats are among the first 30 (wrong) images
    assert json.loads(summary.split("```json")[1].split("```")[0])["schedule"]["epochs"] == 3


def test_figures_are_matplotlib_objects(run_dir):
    preds = Predictions.load(run_dir / "predictions.npz")
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    figures = [report.plot_curves([{"epoch": 1, "train_loss": 1, "train_acc": 0.5, "test_loss": 1, "test_acc": 0.5}]),
               report.plot_schedule(cfg, 98), report.plot_misclassified(preds), report.plot_confusion(preds)]
    assert all(isinstance(f, Figure) for f in figures)


@pytest.mark.parametrize("count", [24, 5, 0])
def test_misclassified_mosaic_shows_each_image_under_its_classes(run_dir, count):
    preds = Predictions.load(run_dir / "predictions.npz")
    if count < len(preds.wrong_index):
        preds = Predictions(preds.probs, preds.labels, preds.wrong_images[:count], preds.wrong_index[:count])
    fig = report.plot_misclassified(preds)
    (ax,) = fig.axes
    mosaic = np.asarray(ax.images[0].get_array())
    titles = [t.get_text() for t in ax.texts]
    assert len(titles) == min(count, 24)
    for image, index, title in zip(preds.wrong_images, preds.wrong_index, titles, strict=False):
        # every image appears whole in the mosaic, under its own true and predicted class names
        spots = np.argwhere((mosaic[:-31, :-31] == image[0, 0]).all(axis=-1))
        assert any((mosaic[r:r + 32, c:c + 32] == image).all() for r, c in spots)
        label, predicted = preds.labels[index], preds.probs[index].argmax()
        assert title == f"true {report.CLASSES[label]}\npred {report.CLASSES[predicted]} 82%"
    assert [t.get_text() for t in fig.texts] == [f"Misclassified test images ({min(count, 24)} of 30)"]


def test_schedule_plot_has_its_peak_at_the_end_of_epoch_5():
    cfg = Config.from_preset("fast", {"schedule.end_lr": -1})  # no annihilation: never below min_lr
    fig = report.plot_schedule(cfg, 98)
    xs, ys = fig.axes[0].lines[0].get_data()
    assert xs[np.argmax(ys)] == 5 * 98 and max(ys) == pytest.approx(cfg.schedule.max_lr)
    assert len(xs) == 24 * 98 and min(ys) >= cfg.schedule.min_lr


def test_cli(run_dir, tmp_path, capsys):
    assert report.main([str(run_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert report.main([str(tmp_path / "nothing")]) == 1
    assert "not a finished run directory" in capsys.readouterr().err
    assert report.main([]) == 2


def test_the_command_runs_as_a_module_without_import_warnings(run_dir):
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fastcifar.report", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "Warning" not in proc.stderr


@pytest.mark.parametrize(("overrides", "method", "loss"), [
    ({}, "", "cross-entropy loss"),
    ({"data.test_flip": True, "optim.label_smoothing": 0.2}, "flip TTA", "cross-entropy loss (label smoothing 0.2)"),
    ({"data.test_flip": True, "optim.ema_decay": 0.99}, "flip TTA, EMA weights", "cross-entropy loss"),
])
def test_reports_say_how_test_numbers_were_measured(run_dir, overrides, method, loss):
    cfg = Config.from_preset("reference", {"schedule.epochs": 3, "schedule.peak_epoch": 1, **overrides})
    assert report.test_method(cfg) == method and report.loss_name(cfg) == loss
    write_json(run_dir / "config.json", cfg.to_dict())
    report.write_report(run_dir)
    first_line = (run_dir / "summary.md").read_text().splitlines()[2]
    assert first_line.endswith(f"(best 75.00%; tested with {method})" if method else "(best 75.00%)")
    fig = report.plot_curves([{"epoch": 1, "train_loss": 1, "train_acc": 0.5, "test_loss": 1, "test_acc": 0.5}],
                             *report.curve_labels(cfg))
    assert fig.axes[0].get_ylabel() == loss
    test_label = f"test ({method})" if method else "test"
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["train (augmented)", test_label]


def test_a_corrupt_predictions_file_is_one_line_and_the_report_works_without_it(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "predictions.npz").write_bytes(bytes(range(256)) * 40)
    assert report.main([str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a predictions file written by fastcifar" in err
    assert "allow_pickle" not in err
    (copy / "predictions.npz").unlink()
    assert report.main([str(copy)]) == 0
