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

`train`, `find_lr` and `evaluate` are both functions here and command modules (`python -m fastcifar.train`);
the package attribute is always the function, whatever is imported first: loading a submodule makes the
import system set the package attribute of its name to the module, and this package refuses that one
rebinding for those three names (the modules stay in `sys.modules`, e.g. `sys.modules["fastcifar.train"]`).
For the code behind a command, import the module that holds it (`fastcifar.training`, `fastcifar.lr_finder`,
`fastcifar.evaluation`).
"""

import sys
import types
from pathlib import Path
from typing import Any

import fastcifar._launch  # noqa: F401  first: a command restarts with the faster allocator before torch loads
from fastcifar.config import PRESETS, Config
from fastcifar.custom_resnet import CustomResNet, summary
from fastcifar.data import make_loaders
from fastcifar.evaluation import evaluate_checkpoint as evaluate
from fastcifar.evaluation import load_checkpoint
from fastcifar.inference import Predictions
from fastcifar.lr_finder import find_lr
from fastcifar.multiseed import SweepResult, run_seeds
from fastcifar.prepare import prepare as _prepare  # the package attribute `prepare` stays the module
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
    """CIFAR-10 -> data_dir/train.beton and test.beton (fastcifar.prepare's `prepare`: archive from
    `archive=` or $FASTCIFAR_CIFAR_ARCHIVE or data_dir, else the md5-checked download); returns the manifest."""
    return _prepare(Path(data_dir), **options)


_COMMANDS = ("train", "find_lr", "evaluate")  # API functions that share their name with a command module


class _Package(types.ModuleType):
    """This package's module type: `fastcifar.train` stays the function when fastcifar/train.py is imported."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _COMMANDS and isinstance(value, types.ModuleType):
            return  # the import system binding the command module: keep the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "Config", "PRESETS", "CustomResNet", "summary", "make_loaders", "train", "TrainResult", "find_lr", "evaluate",
    "evaluate_checkpoint", "load_checkpoint", "Predictions", "plot_curves", "plot_schedule", "plot_misclassified",
    "plot_confusion", "plot_range_test", "write_report", "prepare_data", "run_seeds", "SweepResult",
]
