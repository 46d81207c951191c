import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar import allocator
from fastcifar.allocator import AllocatorError, choose, command_name, find_library, is_command, loaded, relaunch_plan
from tests.conftest import tiny_cli_args

TCMALLOC = find_library("tcmalloc", allocator.library_dirs(os.environ))


@pytest.mark.parametrize("argv, module", [
    (["python", "-m", "fastcifar.train", "--epochs", "2"], "fastcifar.train"),
    (["python", "-u", "-m", "benchmarks.run"], "benchmarks.run"),  # torchrun's workers start with -u
    (["python", "-X", "faulthandler", "-W", "error", "-m", "fastcifar.evaluate"], "fastcifar.evaluate"),
    (["python", "-mfastcifar.sweep"], "fastcifar.sweep"),
    (["python", "/venv/bin/fastcifar", "train", "--epochs", "2"], "fastcifar"),  # the console script
    (["python", "-m", "fastcifar", "train"], "fastcifar"),  # the package's __main__
    (["python", "train.py", "-m", "fastcifar.train"], "train.py"),  # a script; its own -m is its argument
    (["python", "-c", "import fastcifar", "-m", "x"], None),
    (["python"], None),
    (["python", "-m"], None),
])
def test_the_command_is_read_from_the_interpreters_command_line(argv, module):
    assert command_name(argv) == module


@pytest.mark.parametrize("name, command", [
    ("fastcifar.train", True), ("benchmarks.run", True), ("fastcifar", True), ("fastcifar-write-beton", True),
    ("pytest", False), ("train.py", False), ("fastcifarx.train", False), (None, False),
])
def test_only_the_projects_commands_are_relaunched(name, command):
    assert is_command(name) == command


def _libs(tmp_path: Path, *names: str) -> list[Path]:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    return [tmp_path / "missing", tmp_path]


@pytest.mark.parametrize("installed, setting, expected", [
    (("libjemalloc.so.2", "libtcmalloc_minimal.so.4"), "auto", "libtcmalloc_minimal.so.4"),  # tcmalloc first
    (("libjemalloc.so.2",), "auto", "libjemalloc.so.2"),
    ((), "auto", None),  # nothing installed: the system's malloc, silently
    (("libtcmalloc.so.4",), "tcmalloc", "libtcmalloc.so.4"),  # gperftools' full build counts too
    (("libjemalloc.so.2", "libtcmalloc_minimal.so.4"), "jemalloc", "libjemalloc.so.2"),
    (("libtcmalloc_minimal.so.4",), "system", None),
])
def test_the_setting_chooses_an_installed_library(tmp_path, installed, setting, expected):
    path = choose(setting, _libs(tmp_path, *installed))
    assert (path.name if path else None) == expected


def test_a_named_allocator_that_is_missing_or_an_unknown_setting_says_what_to_do(tmp_path):
    with pytest.raises(AllocatorError, match="apt-get install libjemalloc2"):
        choose("jemalloc", _libs(tmp_path, "libtcmalloc_minimal.so.4"))
    with pytest.raises(AllocatorError, match="not one of auto, tcmalloc, jemalloc, system"):
        choose("mimalloc", [])


COMMAND = ["python", "-m", "fastcifar.train", "--epochs", "1"]


def test_a_command_is_relaunched_once_with_the_library_in_front_of_ld_preload(tmp_path):
    dirs = _libs(tmp_path, "libtcmalloc_minimal.so.4")
    env = relaunch_plan(COMMAND, {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}, maps="", dirs=dirs)
    assert env["LD_PRELOAD"] == f"{tmp_path / 'libtcmalloc_minimal.so.4'} /opt/other.so"
    assert env["PATH"] == "/bin" and env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]
    # the relaunched process: never again, even where the loader could not preload the library
    assert relaunch_plan(COMMAND, env, maps="", dirs=dirs) is None


@pytest.mark.parametrize("argv, environ, maps", [
    (["python", "-m", "pytest"], {}, ""),  # not one of the project's commands
    (["python", "-c", "import fastcifar"], {}, ""),  # the API: never relaunched
    (COMMAND, {"FASTCIFAR_ALLOCATOR": "system"}, ""),
    (COMMAND, {}, "7f00-7f10 r-xp 0 fd:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"),  # preloaded by hand
])
def test_no_relaunch_where_it_is_not_wanted(tmp_path, argv, environ, maps):
    assert relaunch_plan(argv, environ, maps, _libs(tmp_path, "libtcmalloc_minimal.so.4")) is None


def test_an_invalid_setting_stops_a_command_but_not_an_import(tmp_path):
    with pytest.raises(AllocatorError):
        relaunch_plan(COMMAND, {"FASTCIFAR_ALLOCATOR": "fast"}, "", [tmp_path])
    assert relaunch_plan(["python", "-c", "pass"], {"FASTCIFAR_ALLOCATOR": "fast"}, "", [tmp_path]) is None


@pytest.mark.parametrize("line, kind", [
    ("7f00-7f10 r-xp 0 fd:01 42 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10", "tcmalloc"),
    ("7f00-7f10 r-xp 0 fd:01 42 /usr/lib/libjemalloc.so.2", "jemalloc"),
    ("7f00-7f10 r-xp 0 fd:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6", None),
])
def test_the_loaded_allocator_is_read_from_the_process_maps(line, kind):
    assert loaded(line) == kind


def test_a_bad_setting_is_one_line_and_exit_2_before_the_command_starts():
    env = os.environ | {"FASTCIFAR_ALLOCATOR": "fast"}
    proc = subprocess.run([sys.executable, "-m", "fastcifar.train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: FASTCIFAR_ALLOCATOR='fast' is not one of auto, tcmalloc, jemalloc, system"]


def _train(synthetic: dict, out_dir: Path, setting: str) -> tuple[dict, list[dict]]:
    args = tiny_cli_args(synthetic, out_dir, **{"run.name": setting, "schedule.epochs": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FASTCIFAR_ALLOCATOR_TRIED")}
    proc = subprocess.run([sys.executable, "-m", "fastcifar.train", *args], capture_output=True, text=True,
                          env=env | {"FASTCIFAR_ALLOCATOR": setting}, timeout=900)
    assert proc.returncode == 0, proc.stderr
    run = out_dir / setting
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "env.json").read_text()), metrics


@pytest.mark.skipif(TCMALLOC is None, reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_training_runs_on_tcmalloc_when_installed_with_the_same_numbers(synthetic, tmp_path):
    system_env, system = _train(synthetic, tmp_path, "system")
    tc_env, tc = _train(synthetic, tmp_path, "tcmalloc")
    assert system_env["allocator"] == "system"
    assert tc_env["allocator"].startswith("tcmalloc (") and "libtcmalloc" in tc_env["allocator"]
    # the allocator is speed only: the same seed computes the same losses and accuracies, bit for bit
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    assert [[m[k] for k in keys] for m in tc] == [[m[k] for k in keys] for m in system]
