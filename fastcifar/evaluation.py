"""Evaluate a saved model: `python -m fastcifar.evaluate --checkpoint RUN_DIR/model.pt [--tta]`.

Prints test accuracy and loss, and accuracy per class (`--save FILE.json` also writes them, with the
command, as evidence next to a run). `--tta` averages the logits of each image and
its mirror image (horizontal-flip test-time augmentation). Checkpoints are loaded with
`torch.load(..., weights_only=True)`: a checkpoint file cannot run code.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastcifar.augment import AugmentSettings, BatchAugment
from fastcifar.config import Config, ConfigError
from fastcifar.custom_resnet import CustomResNet
from fastcifar.data import epoch, make_loader
from fastcifar.errors import FastCifarError, require_output_folder, run_cli
from fastcifar.rundir import load_checkpoint_file, write_json

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
        np.savez_compressed(path, probs=self.probs.astype(np.float32), labels=self.labels,
                            wrong_images=self.wrong_images, wrong_index=self.wrong_index)

    @classmethod
    def load(cls, path: Path) -> Predictions:
        with np.load(path) as f:
            return cls(f["probs"].astype(np.float32), f["labels"], f["wrong_images"], f["wrong_index"])


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
def predict(model: nn.Module, loader: Any, normalize: Any, autocast: Any, tta: bool = False,
            translate: int = 0) -> Predictions:
    """Class probabilities for every test image (eval mode), keeping the first misclassified images
    (`tta`, `translate`: the views of `tta_logits`).
    Reads results back every batch: meant for a final pass, not for the timed training loop."""
    model.eval()
    probs, labels, wrong_images, wrong_index, seen, kept = [], [], [], [], 0, 0
    with epoch(loader) as batches:
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


def load_checkpoint(path: str | Path) -> tuple[CustomResNet, Config, dict]:
    """Model (on CPU, eval mode) and config from a fastcifar checkpoint, loaded without pickle code."""
    state = load_checkpoint_file(path)
    try:
        cfg = Config.from_dict(state["config"])
    except ConfigError as err:
        raise FastCifarError(f"{path}: its config is not understood by this version ({err})") from None
    model = CustomResNet(cfg.model)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state


def evaluate_checkpoint(path: str | Path, tta: bool = False, data_dir: str | None = None, device: str = "auto",
                        batch_size: int = 1000, num_workers: int = 0, translate: int = 0) -> Predictions:
    from fastcifar.training import Amp, resolve_device, resolve_precision

    model, cfg, _ = load_checkpoint(path)
    dev = resolve_device(device)
    amp = Amp(dev, resolve_precision(cfg.run.precision, dev))
    memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    model = model.to(device=dev, memory_format=memory_format)
    directory = Path(data_dir or cfg.data.data_dir)
    loader = make_loader(directory / "test.beton", batch_size, num_workers, dev, train=False,
                         subset=cfg.data.test_subset)
    normalize = BatchAugment(AugmentSettings(), dev, 0, amp.dtype, cfg.run.channels_last).test
    return predict(model, loader, normalize, amp.autocast, tta, translate)


def format_report(preds: Predictions, classes: tuple[str, ...] = CLASSES) -> str:
    lines = [f"test accuracy {preds.accuracy:.2%}  loss {preds.loss:.4f}  ({len(preds.labels):,} images)",
             "per class:"]
    for name, acc in zip(classes, preds.per_class_accuracy(len(classes)), strict=True):
        lines.append(f"  {name:<11} {acc:7.2%}")
    return "\n".join(lines)


def report_dict(preds: Predictions, checkpoint: str | Path, tta: bool, command: str,
                classes: tuple[str, ...] = CLASSES, translate: int = 0) -> dict[str, Any]:
    """The numbers of one evaluation with the command that produced them, for `--save`."""
    per_class = preds.per_class_accuracy(len(classes))
    return {"checkpoint": str(checkpoint), "tta": tta, "translate": translate, "test_acc": preds.accuracy,
            "test_loss": preds.loss,
            "images": len(preds.labels), "per_class_acc": dict(zip(classes, per_class.tolist(), strict=True)),
            "command": command}


def read_tta_accuracy(path: str | Path) -> float | None:
    """The flip-TTA accuracy in a file written by `--tta --save` (or by the ablation runner, whose older files
    hold only `tta_test_acc`); None if there is no such file or it was saved without --tta."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if "tta_test_acc" in saved:
            return float(saved["tta_test_acc"])
        return float(saved["test_acc"]) if saved["tta"] else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FastCifarError(f"{path} is not a file written by fastcifar.evaluate --tta --save ({err}); "
                             f"delete it or write it again") from None


def _evaluate_and_report(args: argparse.Namespace, argv: list[str]) -> None:
    if args.save:  # checked first: an evaluation takes minutes on a CPU
        require_output_folder(args.save, "--save")
    if args.batch_size < 1 or not 0 <= args.translate <= 4:
        raise ConfigError("--batch-size must be >= 1 and --translate in [0, 4]")
    preds = evaluate_checkpoint(args.checkpoint, args.tta, args.data_dir, args.device, args.batch_size,
                                translate=args.translate)
    print(format_report(preds))
    if args.save:
        command = shlex.join(["python", "-m", "fastcifar.evaluate", *argv])
        write_json(Path(args.save), report_dict(preds, args.checkpoint, args.tta, command, translate=args.translate))
        print(f"saved {args.save}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcifar.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model.pt written by fastcifar.train")
    parser.add_argument("--tta", action="store_true", help="average logits with the horizontally flipped image")
    parser.add_argument("--translate", type=int, default=0, metavar="PX",
                        help="also average over copies shifted by PX pixels (see data.test_translate; default 0)")
    parser.add_argument("--data-dir", help="where test.beton is (default: the one the model was trained with)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--save", metavar="JSON", help="also write the numbers and this command to a JSON file")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return run_cli(lambda: _evaluate_and_report(args, argv))


if __name__ == "__main__":
    sys.exit(main())
