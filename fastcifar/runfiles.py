"""Checked readers of a finished run's summaries: results.json and env.json (metrics.jsonl: rundir.read_metrics).

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
ENV_TEXT = ("started", "python", "torch", "ffcv", "numpy", "platform", "cpu", "cpu_kind", "allocator", "device",
            "device_name", "cuda", "git_commit", "loader")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fits(kind: str, value: Any) -> bool:
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if kind == "fraction":
        return _is_number(value) and 0 <= value <= 1
    return _is_number(value)


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
                and (reached["seconds"] is None or _is_number(reached["seconds"]))):
            raise bad(f"time_to_test_acc.{mark}", '{"epoch": integer or null, "seconds": number or null}', reached)
    return results


def read_env(path: Path) -> dict[str, Any]:
    """A run's env.json, checked, or {} where there is none (runs from before it was written). Known text fields
    must be printable text or null; `resumes` a list of objects; `auto` an object."""
    if not Path(path).exists():
        return {}
    env = read_object(path, "a run's environment record")
    for key in ENV_TEXT:
        value = env.setdefault(key, None)
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
        value = env.setdefault(key, None)
        if value is not None and not _fits("count", value):
            raise FastCifarError(f"{path}: {key!r} must be a positive integer or null, got {value!r}"[:300])
    return env
