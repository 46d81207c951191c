"""fastcifar: train the custom ResNet on CIFAR-10 fast (FFCV data, on-device batch augmentation, OneCycle).

The Python API; each command-line tool is a thin layer over the same functions:

    import fastcifar
    cfg = fastcifar.Config.from_preset("reference", epochs=10, data_dir="data")   # or {"optim.nesterov": True}
    lrs = fastcifar.find_lr(cfg)                       # LR range test -> dict; fastcifar.plot_range_test(lrs)
    result = fastcifar.train(cfg.override(max_lr=lrs["suggestion"]["max_lr"], min_lr=lrs["suggestion"]["min_lr"]))
    result.metrics, result.run_dir, result.model       # per-epoch dicts, the run directory, the trained model
    fastcifar.plot_curves(result.metrics)              # matplotlib Figures display inline in a notebook
    fastcifar.evaluate(result.run_dir / "model.pt", tta=True).accuracy
    fastcifar.run_seeds(cfg, seeds=[0, 1, 2]).stats    # the same recipe over several seeds: mean/std/min/max

`train`, `find_lr` and `evaluate` are both functions here and modules (`python -m fastcifar.train`); the
package attribute is the function. For the module, use `from fastcifar.training import ...` or
`importlib.import_module("fastcifar.training")` (`import fastcifar.train as m` would give the function).
Everything is imported eagerly (about 2 s, mostly torch): a lazy import would let the import system rebind
`fastcifar.train` to the module whenever some other import loads it first.
"""

from pathlib import Path
from typing import Any

from fastcifar.config import PRESETS, Config
from fastcifar.custom_resnet import CustomResNet, summary
from fastcifar.data import make_loaders
from fastcifar.evaluation import Predictions, load_checkpoint
from fastcifar.evaluation import evaluate_checkpoint as evaluate
from fastcifar.lr_finder import find_lr
from fastcifar.multiseed import SweepResult, run_seeds
from fastcifar.reporting import (
    plot_confusion,
    plot_curves,
    plot_misclassified,
    plot_range_test,
    plot_schedule,
    write_report,
)
from fastcifar.training import TrainResult, train

__version__ = "0.1.0"
evaluate_checkpoint = evaluate


def prepare_data(data_dir: str | Path = "data", **options: Any) -> dict:
    """CIFAR-10 -> data_dir/train.beton and test.beton (data_prep/write_beton.py's `prepare`: archive from
    `archive=` or $FASTCIFAR_CIFAR_ARCHIVE or data_dir, else the md5-checked download); returns the manifest."""
    from data_prep.write_beton import prepare  # here, not at the top: data_prep imports fastcifar

    return prepare(Path(data_dir), **options)

__all__ = [
    "Config", "PRESETS", "CustomResNet", "summary", "make_loaders", "train", "TrainResult", "find_lr", "evaluate",
    "evaluate_checkpoint", "load_checkpoint", "Predictions", "plot_curves", "plot_schedule", "plot_misclassified",
    "plot_confusion", "plot_range_test", "write_report", "prepare_data", "run_seeds", "SweepResult",
]
