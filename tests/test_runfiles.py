"""The readers of results.json, env.json and metrics.jsonl (fastcifar.runfiles), and every command that reads a
run's files fed generated corruptions of them: `report` and `compare --table` end with exit 0, or with one line
that names the file."""

import json
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcifar import compare, reporting, runfiles
from fastcifar.config import Config
from fastcifar.errors import FastCifarError
from fastcifar.inference import Predictions
from fastcifar.rundir import append_jsonl, write_json
from fastcifar.runfiles import read_env, read_results

RESULTS = {"epochs": 3, "final_test_acc": 0.7, "best_test_acc": 0.75, "steps_per_epoch": 98, "train_seconds": 10.0,
           "total_seconds": 12.0, "compile_seconds": 0.0, "mean_train_img_s": 99.0,
           "time_to_test_acc": {"0.90": {"epoch": None, "seconds": None}, "0.70": {"epoch": 3, "seconds": 12.0}}}
ENV = {"device": "cpu", "device_name": "test CPU", "cpu": "AMD EPYC", "cpu_kind": "avx512_bf16, no amx",
       "torch": "2.13.0", "git_commit": None, "cpu_count": 2, "resumes": [{"started": "x"}], "auto": {"choice": "x"}}


def make_run(folder):
    """A hand-made finished run: 3 epochs, predictions for 20 test images."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = Config.from_preset("reference", {"schedule.epochs": 3, "schedule.peak_epoch": 1})
    write_json(folder / "config.json", cfg.to_dict())
    write_json(folder / "env.json", ENV)
    for epoch in (1, 2, 3):
        append_jsonl(folder / "metrics.jsonl", {"epoch": epoch, "train_loss": 2 / epoch, "train_acc": 0.2 * epoch,
                                                "test_loss": 2.1 / epoch, "test_acc": 0.25 * epoch, "epoch_s": 4.0})
    write_json(folder / "results.json", RESULTS)
    write_json(folder / "tta.json", {"tta": True, "translate": 0, "test_acc": 0.78})  # evaluate --save's files
    write_json(folder / "tta-translate1.json", {"tta": True, "translate": 1, "test_acc": 0.79})
    labels = np.arange(20) % 10
    probs = np.full((20, 10), 0.01, np.float32)
    probs[np.arange(20), labels] = 0.91  # all right: no misclassified images to keep
    Predictions(probs, labels, np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)).save(
        folder / "predictions.npz")
    return folder


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("template") / "run")


def test_a_written_run_reads_back(template):
    results = read_results(template / "results.json")
    assert results["final_test_acc"] == 0.7 and results["train_images"] is None  # optional and missing: None
    env = read_env(template / "env.json")
    assert env == ENV  # as written: a missing field stays missing (a resume writes the record back)
    assert read_env(template / "no-such-env.json") == {}


@pytest.mark.parametrize(("change", "fragment"), [
    ({"epochs": None}, "lacks epochs"),
    ({"final_test_acc": 1.5}, "'final_test_acc' must be a number in [0, 1]"),
    ({"final_test_acc": "0.9"}, "'final_test_acc' must be a number in [0, 1]"),
    ({"steps_per_epoch": True}, "'steps_per_epoch' must be a positive integer"),
    ({"train_seconds": "fast"}, "'train_seconds' must be a finite number,"),
    ({"train_images": "many"}, "'train_images' must be a finite number or null"),
    ({"time_to_test_acc": [1]}, "'time_to_test_acc' must be an object"),
    ({"time_to_test_acc": {"0.90": {"epoch": 0, "seconds": 1.0}}}, "'time_to_test_acc.0.90' must be"),
])
def test_results_fields_of_the_wrong_kind_are_named(tmp_path, change, fragment):
    results = {k: v for k, v in (RESULTS | change).items() if v is not None}
    write_json(tmp_path / "results.json", results)
    with pytest.raises(FastCifarError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        read_results(tmp_path / "results.json")


@pytest.mark.parametrize(("change", "fragment"), [
    ({"cpu": "AMD\x00EPYC"}, "'cpu' must be printable text"),
    ({"device_name": 7}, "'device_name' must be printable text"),
    ({"resumes": {"a": 1}}, "'resumes' must be a list of objects"),
    ({"auto": "bf16"}, "'auto' must be an object"),
    ({"cpu_count": -2}, "'cpu_count' must be a positive integer"),
])
def test_env_fields_of_the_wrong_kind_are_named(tmp_path, change, fragment):
    write_json(tmp_path / "env.json", ENV | change)
    with pytest.raises(FastCifarError, match=fragment):
        read_env(tmp_path / "env.json")


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "is not JSON"), (b"\xff\xfe", "cannot read"), (b"[1, 2]", "holds a JSON list, not an object"),
    (b'{"epochs": 3', "is not JSON"),
])
def test_a_file_that_is_not_a_json_object_is_one_error(tmp_path, content, fragment):
    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(FastCifarError, match=fragment):
        read_results(tmp_path / "results.json")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 20)),
    st.tuples(st.just("set"), st.integers(0, 20), JSON_VALUES),
    st.tuples(st.just("nul"), st.integers(0, 20)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("whole"), JSON_VALUES),
)


def corrupt(path, corruption) -> None:
    """Apply one generated corruption to a JSON file (or to any file, for the byte-level ones)."""
    kind, *args = corruption
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: int(len(data) * args[0])])
    elif kind == "bytes":
        path.write_bytes(args[0])
    elif kind == "whole":
        path.write_text(json.dumps(args[0]))
    elif path.suffix == ".jsonl":  # one row of the file: the first of the rest's numbers picks it
        lines = path.read_text().splitlines()
        row = args[0] % len(lines)
        lines[row] = json.dumps(_changed(json.loads(lines[row]), kind, args))
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps(_changed(json.loads(data), kind, args)))


def _changed(obj: dict, kind: str, args: list) -> dict:
    key = sorted(obj)[args[0] % len(obj)]
    if kind == "drop":
        del obj[key]
    elif kind == "nul":
        obj[key] = "bad\x00name"
    else:
        obj[key] = args[1]
    return obj


def one_line_naming(err: str, name: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0]


COMMANDS = {"report": lambda run: reporting.main([str(run)]),
            "compare": lambda run: compare.main([str(run)]),
            "compare --table": lambda run: compare.main(["--table", str(run)])}
# What each command reads of a run (report: also predictions.npz, below)
READS = {"report": ("results.json", "env.json", "metrics.jsonl", "config.json"),
         "compare": ("metrics.jsonl", "config.json", "tta.json"),
         "compare --table": ("results.json", "env.json", "metrics.jsonl", "config.json", "tta-translate1.json")}
CASES = [(command, name) for command, names in READS.items() for name in names]
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize(("command", "name"), CASES)
@PROPERTY
@given(corruption=CORRUPTIONS)
def test_every_command_reading_a_run_survives_a_corrupted_summary(template, tmp_path_factory, capsys, command, name,
                                                                  corruption):
    run = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(template, run)
    corrupt(run / name, corruption)
    capsys.readouterr()
    code = COMMANDS[command](run)
    out, err = capsys.readouterr()
    assert code == 0 or (code in (1, 2) and one_line_naming(err, name)), (code, err)
    if code == 0:  # it did its job: the summary written, or a table of the run printed
        assert (run / "summary.md").is_file() if command == "report" else out.count("\n|") >= 2, out


@PROPERTY
@given(corruption=st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1)),
                            st.tuples(st.just("bytes"), st.binary(max_size=64))))
def test_report_survives_corrupted_predictions(template, tmp_path_factory, capsys, corruption):
    run = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(template, run)
    corrupt(run / "predictions.npz", corruption)
    capsys.readouterr()
    code = reporting.main([str(run)])
    err = capsys.readouterr().err
    assert code == 0 or (code in (1, 2) and one_line_naming(err, "predictions.npz")), (code, err)


def test_metrics_rows_of_another_version_read_with_their_missing_numbers_as_none(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 1.5, "future_field": "kept"}\n\n{"epoch": 2, "test_acc": null}\n')
    first, second = runfiles.read_metrics(path)
    assert first["test_acc"] is None and first["train_loss"] == 1.5 and first["future_field"] == "kept"
    assert second["epoch"] == 2 and second["train_s"] is None


@pytest.mark.parametrize(("line", "fragment"), [
    ("{not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: a JSON list, not an object"),
    ('{"train_loss": 1.0}', "line 2: 'epoch' must be a positive integer, got None"),
    ('{"epoch": 0}', "'epoch' must be a positive integer, got 0"),
    ('{"epoch": "2"}', "'epoch' must be a positive integer, got '2'"),
    ('{"epoch": true}', "'epoch' must be a positive integer, got True"),
    ('{"epoch": 2, "test_acc": "91%"}', "'test_acc' must be a number or null, got '91%'"),
    ('{"epoch": 2, "train_s": NaN}', "'train_s' must be a number or null, got nan"),
    ('{"epoch": 2, "test_acc": [0.9]}', "'test_acc' must be a number or null"),
])
def test_a_bad_metrics_row_is_named_by_file_line_and_field(tmp_path, line, fragment):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n' + line + "\n")
    with pytest.raises(FastCifarError, match=re.escape(fragment)) as err:
        runfiles.read_metrics(path)
    assert str(err.value).startswith(f"{path}, line 2: ") and "\n" not in str(err.value)
