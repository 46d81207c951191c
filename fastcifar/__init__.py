"""fastcifar: train the custom ResNet on CIFAR-10 fast (FFCV data, on-device batch augmentation, OneCycle).

Public API (imported lazily, so that `import fastcifar` and the data-prep script stay light):
    Config, CustomResNet, make_loaders, train, evaluate_checkpoint, find_lr, write_report
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "fastcifar.config",
    "CustomResNet": "fastcifar.custom_resnet",
    "make_loaders": "fastcifar.data",
    "train": "fastcifar.train",
    "evaluate_checkpoint": "fastcifar.evaluate",
    "find_lr": "fastcifar.find_lr",
    "write_report": "fastcifar.report",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastcifar' has no attribute {name!r}")
