"""Run directories and the files in them: atomic writes that fail in one line and keep what was there, JSON
without bare NaN, checkpoints with a checksum, one training per directory, --overwrite that leaves nothing of
the old run behind."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastcifar import evaluation, rundir
from fastcifar.errors import FastCifarError, WriteError
from fastcifar.training import main, train
from tests.conftest import REPO, signal_at, tiny_cli_args, tiny_config

QUIET = {"log": lambda _: None}


def test_json_holds_null_for_non_finite_numbers(tmp_path):
    rundir.write_json(tmp_path / "a.json", {"loss": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"loss": None, "rows": [None, 1.5]}
    rundir.append_jsonl(tmp_path / "m.jsonl", {"test_loss": float("-inf")})
    assert rundir.read_jsonl(tmp_path / "m.jsonl") == [{"test_loss": None}]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "checkpoint.pt"
    rundir.save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def failing_save(obj, target):
        with open(target, "wb") as f:
            f.write(b"half")
        raise OSError(code, "injected")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(WriteError, match=r"cannot write .*checkpoint\.pt: ") as info:
        rundir.save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_torch_saves_full_disk_error_is_a_write_error(tmp_path, monkeypatch):
    def full(obj, target):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError, match="a full disk"):
        rundir.save_checkpoint(tmp_path / "model.pt", {"model": {}})


def test_a_checkpoint_corrupted_inside_a_tensor_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    rundir.save_checkpoint(path, {"model": {"w": torch.arange(4.0)}, "config": {}})
    assert torch.equal(rundir.load_checkpoint_file(path)["model"]["w"], torch.arange(4.0))
    state = torch.load(path, weights_only=True)
    state["model"]["w"][2] = 99.0  # same size, zip structure intact: only the checksum can tell
    torch.save(state, path)
    with pytest.raises(FastCifarError, match="is corrupt"):
        rundir.load_checkpoint_file(path)


def test_temporary_names_are_unique_per_write(tmp_path):
    names = {rundir._temporary(tmp_path / "checkpoint.pt").name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(".checkpoint.pt.") for n in names)


def test_a_run_directory_in_use_by_another_process_is_refused(synthetic, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.lock_run_dir(run_dir)  # as a training in this process would
    try:
        proc = subprocess.run([sys.executable, "-m", "fastcifar.train", *tiny_cli_args(synthetic, tmp_path)],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        rundir.release_run_dir(run_dir)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "is in use by a training" in proc.stderr
    assert not (run_dir / "config.json").exists()  # nothing of the refused run was written


def test_an_unfinished_run_is_not_restarted_without_overwrite(synthetic, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"an interrupted run")
    with pytest.raises(FastCifarError, match="holds an unfinished run; continue it with: .*--resume"):
        train(tiny_config(synthetic, tmp_path), **QUIET)
    assert (run_dir / "checkpoint.pt").read_bytes() == b"an interrupted run"


def test_overwrite_removes_every_file_of_the_old_run_first(tiny_run, synthetic, tmp_path, monkeypatch):
    import shutil

    from fastcifar.interrupt import TrainingInterrupted

    old = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, old)
    signal_at(monkeypatch, "train_step", 3)  # in epoch 1
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(synthetic, tmp_path, **{"run.overwrite": True, "run.seed": 7}), **QUIET)
    left = {p.name for p in old.iterdir()}
    assert not {"model.pt", "best.pt", "results.json", "curves.png", "summary.md", "predictions.npz"} & left
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    assert state["config"]["run"]["seed"] == 7 and state["progress"]["step"] == 3  # the new run's, not the old


def test_resume_finishes_a_report_that_a_kill_left_missing(tiny_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    (run_dir / "curves.png").unlink()
    (run_dir / "summary.md").unlink()
    (run_dir / ".curves.png.4242.0badf00d.tmp").write_bytes(b"half a png")  # the killed writer's
    assert main(["--resume", str(run_dir)]) == 0
    assert (run_dir / "curves.png").is_file() and (run_dir / "summary.md").is_file()
    assert not list(run_dir.glob(".*.tmp"))
    assert "was missing and is written now" in capsys.readouterr().out
    assert main(["--resume", str(run_dir)]) == 1  # complete now: nothing to resume
    assert "finished run; nothing to resume" in capsys.readouterr().err


def test_resume_refuses_to_move_the_run(tmp_path, capsys):
    assert main(["--resume", str(tmp_path), "--name", "other"]) == 2
    err = capsys.readouterr().err
    assert "continues" in err and "in place" in err and "--run.name" in err


@pytest.mark.parametrize("flags, kind", [("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
                                         ("fpu avx2 avx512f avx512_bf16", "avx512_bf16, no amx")])
def test_cpu_kind_tells_the_bf16_hardware_apart(flags, kind):
    assert rundir.cpu_kind(f"model name\t: AMD EPYC\nflags\t\t: {flags}\n") == kind


def test_cpu_family_reads_the_model_line_not_the_model_name_line():
    text = "cpu family\t: 26\nmodel name\t: AMD EPYC\nmodel\t\t: 2\nflags\t\t: fpu\n"
    assert rundir.cpu_family(text) == "family 26 model 2"
    assert rundir.cpu_family("model name\t: Apple M2\n") is None


def test_cpu_kind_without_bf16_names_the_vector_unit_and_without_flags_says_unknown():
    assert rundir.cpu_kind("flags\t: fpu avx2 fma\n").endswith(", no bf16 instructions")
    assert rundir.cpu_kind("") == "unknown"


def test_a_directory_in_use_is_named_as_such_and_before_any_data_is_read(tmp_path):
    """A running training's folder (it has a checkpoint, as every running CPU training does) is "in use, by which
    process", not "unfinished: --resume"; and the refusal comes first, even with no data at all."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"being written by the running training")
    rundir.lock_run_dir(run_dir)
    try:
        for extra in ([], ["--resume", str(run_dir)]):
            args = ["--data-dir", str(tmp_path / "no-data"), "--out-dir", str(tmp_path), "--name", "run"]
            proc = subprocess.run([sys.executable, "-m", "fastcifar.train", *(extra or args)], capture_output=True,
                                  text=True, timeout=300, cwd=REPO)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode != 0 and len(lines) == 1, proc.stderr
            assert f"is in use by a training that is still running (pid {os.getpid()})" in lines[0], lines
    finally:
        rundir.release_run_dir(run_dir)


@pytest.mark.parametrize(("setup", "fragment"), [
    ("file", "is a file, not a folder; choose another --out-dir"),
    ("readonly", "permission denied"),
])
def test_an_unusable_out_dir_is_refused_before_the_data(tmp_path, setup, fragment):
    from fastcifar.cli import config_from_args
    from fastcifar.training import build_parser

    out = tmp_path / "out"
    if setup == "file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        out.chmod(0o500)
    cfg = config_from_args(build_parser().parse_args(["--data-dir", str(tmp_path / "no-data"), "--out-dir", str(out),
                                                      "--name", "x", "--run.device", "cpu"]))
    if setup == "readonly" and os.access(out, os.W_OK):  # root writes anywhere: the read-only mount test covers it
        pytest.skip("running as root: a read-only folder is still writable (see test_a_read_only_mount_...)")
    with pytest.raises(FastCifarError, match=fragment):
        train(cfg, **QUIET)


def _in_read_only_mount(folder, argv: list[str]) -> subprocess.CompletedProcess:
    """Run `argv` with `folder` bind-mounted read-only onto itself, in a private mount namespace (as root: CI)."""
    mount = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec \"$@\""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", *argv],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_a_read_only_mount_is_refused_before_the_data_also_as_root(tmp_path):
    """Root writes into a chmod-ed folder, not into a read-only file system: the refusal runs for real here."""
    out = tmp_path / "out"
    out.mkdir()
    probe = _in_read_only_mount(out, ["touch", str(out / "probe")])
    if os.geteuid() != 0 or probe.returncode == 0 or "Read-only" not in probe.stderr:
        pytest.skip(f"no private read-only mount here (needs root and unshare): {probe.stderr.strip()[:120]}")
    proc = _in_read_only_mount(out, [sys.executable, "-m", "fastcifar", "train", "--data-dir", str(tmp_path / "none"),
                                     "--out-dir", str(out), "--name", "x", "--run.device", "cpu"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "the file system is read-only" in lines[0] and str(out) in lines[0], lines
    assert not any(out.iterdir())


def test_random_bytes_are_not_called_a_pickle_risk(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(4000))
    with pytest.raises(FastCifarError, match=r"is not a checkpoint \(not a file written by torch.save\)"):
        rundir.load_checkpoint_file(path)


# Checkpoints damaged by generated changes of their bytes, fed to the commands that read them: `evaluate` (model.pt)
# and `train --resume` (checkpoint.pt). One line naming the file and a non-zero exit; never a traceback, never an
# unpickled object.
BYTE_DAMAGE = st.one_of(st.tuples(st.just("truncate"), st.floats(0, 0.999)),
                        st.tuples(st.just("flip"), st.floats(0, 0.999), st.integers(1, 255)),
                        st.tuples(st.just("zero"), st.floats(0, 0.999), st.integers(1, 4096)),
                        st.tuples(st.just("bytes"), st.binary(max_size=256)))


def damage(path, change) -> None:
    data = bytearray(path.read_bytes())
    kind, *args = change
    at = int(len(data) * args[0]) if kind != "bytes" else 0
    if kind == "truncate":
        data = data[:at]
    elif kind == "flip":
        data[at] ^= args[1]
    elif kind == "zero":
        data[at:at + args[1]] = bytes(len(data[at:at + args[1]]))
    else:
        data = bytearray(args[0])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["evaluate", "train --resume"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=BYTE_DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_it(tiny_run, tmp_path_factory, capsys, command, change):
    run = tmp_path_factory.mktemp("damaged") / "run"
    run.mkdir()
    name = "model.pt" if command == "evaluate" else "checkpoint.pt"
    (run / name).write_bytes((tiny_run.run_dir / "model.pt").read_bytes())
    (run / "config.json").write_bytes((tiny_run.run_dir / "config.json").read_bytes())
    damage(run / name, change)
    assume((run / name).read_bytes() != (tiny_run.run_dir / "model.pt").read_bytes())
    capsys.readouterr()
    code = (evaluation.main(["--checkpoint", str(run / name)]) if command == "evaluate"
            else main(["--resume", str(run)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and name in err[0], (code, err)
