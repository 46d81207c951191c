"""Predictions on a test set: class probabilities, test-time augmentation (flip, translations), and what a report
needs of them (accuracy, confusion, per-class accuracy, the first misclassified images)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastcifar.data import BatchLoader
from fastcifar.errors import FastCifarError, numpy_load_error
from fastcifar.rundir import atomic_write

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
KEEP_MISCLASSIFIED = 64  # images of wrong predictions kept for the report's grid


@dataclass
class Predictions:
    probs: np.ndarray  # [N, C] float32 softmax (saved as float32: float16 would turn near-ties around)
    labels: np.ndarray  # [N] int64
    wrong_images: np.ndarray  # [K, 32, 32, 3] uint8: the first K misclassified test images
    wrong_index: np.ndarray  # [K] their positions in the test set

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.labels).mean())

    @property
    def loss(self) -> float:
        picked = self.probs[np.arange(len(self.labels)), self.labels]
        return float(-np.log(np.clip(picked, 1e-12, None)).mean())

    def confusion(self, num_classes: int = 10) -> np.ndarray:
        """[true, predicted] counts."""
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.predicted), 1)
        return matrix

    def per_class_accuracy(self, num_classes: int = 10) -> np.ndarray:
        matrix = self.confusion(num_classes)
        return matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: numpy would append .npz to the temporary name
                np.savez_compressed(f, probs=self.probs.astype(np.float32), labels=self.labels,
                                    wrong_images=self.wrong_images, wrong_index=self.wrong_index)
        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> Predictions:
        """The predictions a run saved, checked: the four arrays, of matching lengths and shapes; anything else is
        one FastCifarError line (never numpy's advice to load it with pickles)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                probs, labels = f["probs"].astype(np.float32), f["labels"]
                wrong_images, wrong_index = f["wrong_images"], f["wrong_index"]
            n = len(labels)
            if (probs.ndim != 2 or probs.shape[0] != n or labels.ndim != 1 or wrong_index.ndim != 1
                    or len(wrong_images) != len(wrong_index) or (len(wrong_index) and wrong_index.max() >= n)):
                raise ValueError("arrays of mismatched shapes")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise FastCifarError(f"{path} is not a predictions file written by fastcifar ({numpy_load_error(err)}); "
                                 f"delete it, and the report is written without the misclassified images and the "
                                 f"confusion matrix") from None
        return cls(probs, labels, wrong_images, wrong_index)


def _view_logits(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Mean float logits over `views`. Each output is copied (or added) before the next forward: under CUDA
    graphs a compiled model reuses its output buffer, and `.float()` makes no copy of fp32 logits."""
    total = model(views[0]).float().clone()
    for view in views[1:]:
        total += model(view).float()
    return total / len(views)


def tta_logits(model: nn.Module, inputs: torch.Tensor, flip: bool = True, translate: int = 0) -> torch.Tensor:
    """Test-time augmentation: the mean logits of each image and of its mirror (`flip`); with `translate`
    pixels also of two copies shifted by that much (reflect padding: up-left and down-right, each with its
    mirror when `flip`), weighted 1/2 for the unshifted views and 1/2 for the shifted ones (airbench's
    level-2 TTA)."""
    def views(x: torch.Tensor) -> list[torch.Tensor]:
        return [x, x.flip(-1)] if flip else [x]

    logits = _view_logits(model, views(inputs))
    if not translate:
        return logits
    t, (h, w) = translate, inputs.shape[-2:]
    padded = nn.functional.pad(inputs, (t, t, t, t), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2 * t:2 * t + h, 2 * t:2 * t + w]]
    channels_last = inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format  # keep the input's layout
    shifted = [x.contiguous(memory_format=memory_format) for x in shifted]
    return (logits + _view_logits(model, [v for x in shifted for v in views(x)])) / 2


def flip_tta_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the mean of the float logits of each image and of its mirror."""
    return tta_logits(model, inputs, flip=True)


@torch.no_grad()
def predict(model: nn.Module, loader: BatchLoader, normalize: Any, autocast: Any, tta: bool = False,
            translate: int = 0) -> Predictions:
    """Class probabilities for every test image (eval mode), keeping the first misclassified images
    (`tta`, `translate`: the views of `tta_logits`).
    Reads results back every batch: meant for a final pass, not for the timed training loop."""
    model.eval()
    probs, labels, wrong_images, wrong_index, seen, kept = [], [], [], [], 0, 0
    with loader.epoch() as batches:
        for images, targets in batches:
            inputs = normalize(images)
            with autocast():
                logits = tta_logits(model, inputs, tta, translate) if tta or translate else model(inputs).float()
            p = torch.softmax(logits, dim=1).cpu()
            # a copy: on a CPU `.cpu()` is a view of FFCV's batch buffer, which later batches overwrite
            y = targets.to("cpu", copy=True)
            wrong = (p.argmax(1) != y).nonzero().flatten()[: KEEP_MISCLASSIFIED - kept]
            if len(wrong):
                kept += len(wrong)
                wrong_images.append(images[wrong.to(images.device)].permute(0, 2, 3, 1).cpu().numpy())
                wrong_index.append(wrong.numpy() + seen)
            probs.append(p.numpy())
            labels.append(y.numpy())
            seen += len(targets)
    return Predictions(np.concatenate(probs), np.concatenate(labels),
                       np.concatenate(wrong_images) if wrong_images else np.zeros((0, 32, 32, 3), np.uint8),
                       np.concatenate(wrong_index) if wrong_index else np.zeros(0, np.int64))
