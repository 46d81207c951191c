"""Checked readers of a run's summaries: results.json, env.json, metrics.jsonl and `evaluate --save`'s file.

Every command that reads one of these files reads it here, so that a file of another version, a truncated one or
a hand-edited one is one FastCifarError naming the file and the field, never a KeyError or a TypeError further on.
A required field that is missing is named; an optional one reads as None; fields this version does not know are
kept as they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastcifar.config import MAX_TEXT
from fastcifar.config import _plain_text as plain_text  # the config's rule for names and paths, reused
from fastcifar.errors import FastCifarError

# results.json: what `train` writes when a run finishes: each field the commands read, and what it must be. Each
# reader names the fields it needs (a missing one is an error naming it); the others read as None when missing.
RESULTS_FIELDS = {"epochs": "count", "final_test_acc": "fraction", "best_test_acc": "fraction",
                  "steps_per_epoch": "count", "train_seconds": "number", "total_seconds": "number",
                  "compile_seconds": "number", "mean_train_img_s": "number", "final_test_loss": "number",
                  "setup_seconds": "number", "train_images": "number", "train_images_32px": "number",
                  "parameters": "count", "world_size": "count"}
REPORT_NEEDS = ("epochs", "final_test_acc", "best_test_acc", "steps_per_epoch", "train_seconds", "total_seconds",
                "compile_seconds", "mean_train_img_s")  # `report`'s summary and schedule plot

# env.json: the machine a run trained on. Every field is optional (older runs lack most of them).
ENV_TEXT = ("started", "python", "torch", "ffcv", "numpy", "platform", "cpu", "cpu_kind", "cpu_family", "allocator",
            "device", "device_name", "cuda", "git_commit", "loader")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool: JSON's true is no number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fits(kind: str, value: Any) -> bool:
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if kind == "fraction":
        return is_number(value) and 0 <= value <= 1
    return is_number(value)


RULES = {"count": "a positive integer", "fraction": "a number in [0, 1]", "number": "a finite number"}


def read_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; a FastCifarError naming the file (as `what`) when it is missing, unreadable,
    not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FastCifarError(f"{path} is missing: not a finished run ({what})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FastCifarError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    except ValueError as err:
        raise FastCifarError(f"{path} is not JSON ({err}); {what} as python -m fastcifar train writes it is "
                             f"needed: rerun the run, or restore the file") from None
    if not isinstance(data, dict):
        raise FastCifarError(f"{path} holds a JSON {type(data).__name__}, not an object: not {what}")
    return data


def read_results(path: Path, needs: tuple[str, ...] = REPORT_NEEDS) -> dict[str, Any]:
    """A run's results.json, checked: the fields in `needs` present, every known field of its kind (or null where
    not needed; missing ones read as None), `time_to_test_acc` a mapping of marks to {"epoch", "seconds"} (each an
    integer/number or null)."""
    results = read_object(path, "a run's results")

    def bad(key: str, rule: str, value: Any) -> FastCifarError:
        return FastCifarError(f"{path}: {key!r} must be {rule}, got {value!r}"[:300] + "; not a results file as "
                              "python -m fastcifar train writes it (rerun the run, or restore the file)")

    missing = [key for key in needs if results.get(key) is None]
    if missing:
        raise FastCifarError(f"{path} lacks {', '.join(missing)}: not a run written by this fastcifar; retrain or "
                             f"restore the file")
    for key, kind in RESULTS_FIELDS.items():
        value = results.setdefault(key, None)
        if value is not None and not _fits(kind, value):
            raise bad(key, RULES[kind] + ("" if key in needs else " or null"), value)
    marks = results.setdefault("time_to_test_acc", {})
    if not isinstance(marks, dict):
        raise bad("time_to_test_acc", "an object of accuracy marks", marks)
    for mark, reached in marks.items():
        if not (isinstance(reached, dict) and set(reached) == {"epoch", "seconds"}
                and (reached["epoch"] is None or _fits("count", reached["epoch"]))
                and (reached["seconds"] is None or is_number(reached["seconds"]))):
            raise bad(f"time_to_test_acc.{mark}", '{"epoch": integer or null, "seconds": number or null}', reached)
    return results


def read_env(path: Path) -> dict[str, Any]:
    """A run's env.json, checked, or {} where there is none (runs from before it was written). Known text fields
    must be printable text or null; `resumes` a list of objects; `auto` an object. Returned as written: a missing
    field stays missing (a resume writes the record back with its new entry), so read it with .get()."""
    if not Path(path).exists():
        return {}
    env = read_object(path, "a run's environment record")
    for key in ENV_TEXT:
        value = env.get(key)
        if value is not None and not (isinstance(value, str) and plain_text(value)):
            raise FastCifarError(f"{path}: {key!r} must be printable text of at most {MAX_TEXT} characters or null, "
                                 f"got {value!r}"[:300] + "; restore the file or remove the field")
    for key, kind, rule in (("resumes", list, "a list"), ("auto", dict, "an object")):
        value = env.get(key)
        if value is not None and (not isinstance(value, kind)
                                  or kind is list and not all(isinstance(item, dict) for item in value)):
            raise FastCifarError(f"{path}: {key!r} must be {rule}{' of objects' if kind is list else ''} or null, got "
                                 f"{value!r}"[:300] + "; restore the file or remove the field")
    for key in ("cpu_count", "torch_threads", "world_size"):
        value = env.get(key)
        if value is not None and not _fits("count", value):
            raise FastCifarError(f"{path}: {key!r} must be a positive integer or null, got {value!r}"[:300])
    return env


def read_evaluation(path: Path) -> dict[str, Any]:
    """A file written by `evaluate --save`, checked: `test_acc` a number in [0, 1], `tta` true or false, `translate`
    0..4 pixels (0 where missing: files from before translation TTA). The ablation runner's older files, which hold
    only `tta_test_acc`, read as a flip-TTA evaluation."""
    def bad(why: str) -> FastCifarError:
        return FastCifarError(f"{path} is not a file written by python -m fastcifar evaluate --save ({why[:200]}); "
                              f"delete it or write it again")

    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise bad(f"{type(err).__name__}: {err}") from None
    if not isinstance(saved, dict):
        raise bad(f"a JSON {type(saved).__name__}, not an object")
    if "test_acc" not in saved and "tta_test_acc" in saved:
        saved = {"test_acc": saved["tta_test_acc"], "tta": True, "translate": 0}
    saved.setdefault("translate", 0)
    if not _fits("fraction", saved.get("test_acc")):
        raise bad(f"'test_acc' must be a number in [0, 1], got {saved.get('test_acc')!r}")
    if not isinstance(saved.get("tta"), bool):
        raise bad(f"'tta' must be true or false, got {saved.get('tta')!r}")
    translate = saved["translate"]
    if not (isinstance(translate, int) and not isinstance(translate, bool) and 0 <= translate <= 4):
        raise bad(f"'translate' must be an integer in [0, 4], got {translate!r}")
    return saved


# metrics.jsonl: one object per epoch. `epoch` is required; the others may be missing (a row of another version,
# or a number the run did not measure) and read as None; where present they must be numbers or null.
METRIC_NUMBERS = ("lr", "lr_end", "train_loss", "train_acc", "test_loss", "test_acc", "train_s", "test_s", "epoch_s",
                  "train_img_s", "test_img_s")
METRIC_COUNTS = ("skipped_steps", "train_side")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, checked: each a JSON object with a positive integer `epoch`, every known
    field a finite number or null (missing ones read as None; unknown ones are kept). A FastCifarError names the file,
    the line and the field otherwise."""
    def bad(number: int, what: str) -> FastCifarError:
        return FastCifarError(f"{path}, line {number}: {what}; not a metrics file as python -m fastcifar train "
                              f"writes it (rerun the run, or remove the line)")

    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FastCifarError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise bad(number, f"not JSON ({err})") from None
        if not isinstance(row, dict):
            raise bad(number, f"a JSON {type(row).__name__}, not an object")
        epoch = row.get("epoch")
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1):
            raise bad(number, f"'epoch' must be a positive integer, got {epoch!r}"[:200])
        for key in METRIC_NUMBERS + METRIC_COUNTS:
            value = row.setdefault(key, None)
            if value is not None and not is_number(value):
                raise bad(number, f"{key!r} must be a number or null, got {value!r}"[:200])
        rows.append(row)
    return rows
