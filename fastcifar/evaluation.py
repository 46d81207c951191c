"""Evaluate a saved model: `python -m fastcifar.evaluate --checkpoint RUN_DIR/model.pt [--tta]`.

Prints test accuracy and loss, and accuracy per class (`--save FILE.json` also writes them, with the
command, as evidence next to a run). `--tta` averages the logits of each image and
its mirror image (horizontal-flip test-time augmentation). Checkpoints are loaded with
`torch.load(..., weights_only=True)`: a checkpoint file cannot run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from fastcifar.augment import BatchAugment
from fastcifar.calibrate import for_inference
from fastcifar.cli import Parser, path_arg
from fastcifar.config import Config, ConfigError, check_option
from fastcifar.custom_resnet import CustomResNet
from fastcifar.data import open_split
from fastcifar.errors import FastCifarError, require_output_folder, run_cli
from fastcifar.inference import CLASSES, Predictions, predict
from fastcifar.rundir import load_checkpoint_file, write_json
from fastcifar.runfiles import read_env, read_evaluation
from fastcifar.runtime import Amp, check_test_memory, resolve_device


def load_checkpoint(path: str | Path) -> tuple[CustomResNet, Config, dict]:
    """Model (on CPU, eval mode) and config from a fastcifar checkpoint, loaded without pickle code."""
    state = load_checkpoint_file(path)
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("model"), dict):
        raise FastCifarError(f"{path} holds no model weights with their config; pass a model.pt or best.pt "
                             f"written by fastcifar.train")
    try:
        cfg = Config.from_dict(state["config"])
    except ConfigError as err:
        raise FastCifarError(f"{path}: its config is not understood by this version ({err})") from None
    model = CustomResNet(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # missing keys or other shapes: a 40-line message from torch
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise FastCifarError(f"{path}: its weights do not fit the network its config describes ({first})") from None
    return model.eval(), cfg, state


def evaluate_checkpoint(path: str | Path, tta: bool = False, data_dir: str | None = None, device: str = "auto",
                        batch_size: int = 1000, num_workers: int = 0, translate: int = 0) -> Predictions:
    model, cfg, _ = load_checkpoint(path)
    dev = resolve_device(device)
    check_test_memory(batch_size, cfg.model.widths, dev, "--batch-size")  # before the data
    # the run's own precision and layout (its env.json beside the weights), so that its test pass repeats exactly
    dtype, channels_last = for_inference(cfg.run, dev, read_env(Path(path).parent / "env.json"))
    amp = Amp(dev, dtype)
    model = model.to(device=dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # auto, not the run's kind: both kinds give the same test images in the same order
    data = dataclasses.replace(cfg.data, data_dir=str(data_dir or cfg.data.data_dir), num_workers=num_workers,
                               loader="auto", test_batch_size=batch_size)
    loader = open_split(data, "test", dev)
    normalize = BatchAugment(cfg.data, dev, 0, amp.dtype, channels_last).normalize
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
    if not Path(path).exists():
        return None
    saved = read_evaluation(Path(path))
    return float(saved["test_acc"]) if saved["tta"] else None


def _evaluate_and_report(args: argparse.Namespace, argv: list[str]) -> None:
    if args.save:  # checked first: an evaluation takes minutes on a CPU
        require_output_folder(args.save, "--save")
    # the config's rules for the same quantities: the test batch, the translation TTA, the device
    check_option("--batch-size", "data.test_batch_size", args.batch_size)
    check_option("--translate", "data.test_translate", args.translate)
    check_option("--device", "run.device", args.device)
    preds = evaluate_checkpoint(args.checkpoint, args.tta, args.data_dir, args.device, args.batch_size,
                                translate=args.translate)
    print(format_report(preds))
    if args.save:
        command = shlex.join(["python", "-m", "fastcifar.evaluate", *argv])
        write_json(Path(args.save), report_dict(preds, args.checkpoint, args.tta, command, translate=args.translate))
        print(f"saved {args.save}")


def main(argv: list[str] | None = None, prog: str = "python -m fastcifar.evaluate") -> int:
    parser = Parser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=path_arg, help="a model.pt written by fastcifar.train")
    parser.add_argument("--tta", action="store_true", help="average logits with the horizontally flipped image")
    parser.add_argument("--translate", type=int, default=0, metavar="PX",
                        help="also average over copies shifted by PX pixels (see data.test_translate; default 0)")
    parser.add_argument("--data-dir", type=path_arg,
                        help="where test.beton is (default: the one the model was trained with)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--save", metavar="JSON", type=path_arg,
                        help="also write the numbers and this command to a JSON file")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return run_cli(lambda: _evaluate_and_report(args, argv))


if __name__ == "__main__":
    sys.exit(main())
