import contextlib
import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcifar import prepare as wb
from fastcifar.data import read_arrays
from fastcifar.errors import DataError
from tests.synthetic import add_bytes, md5_of, write_archive

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def archive(tmp_path) -> Path:
    path = tmp_path / "src" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    write_archive(path, per_batch=10, n_test=20)
    return path


@pytest.fixture(autouse=True)
def no_archive_env(monkeypatch):
    monkeypatch.delenv(wb.ARCHIVE_ENV, raising=False)


def test_reads_the_exact_cifar_layout(archive, tmp_path):
    train_x, train_y, test_x, test_y = write_archive(archive, per_batch=10, n_test=20)
    train, test = wb.read_cifar10(archive, tmp_path, counts=(50, 20))
    np.testing.assert_array_equal(train.images, train_x)
    np.testing.assert_array_equal(train.labels, train_y)
    np.testing.assert_array_equal(test.images, test_x)
    assert train.images.shape == (50, 32, 32, 3) and train.images.dtype == np.uint8


def test_up_to_date_data_names_its_archive_by_name_and_md5_not_by_this_machines_path(archive, tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.delenv(wb.ARCHIVE_ENV, raising=False)
    data = tmp_path / "data"
    wb.prepare(data, archive=str(archive), counts=(50, 20), num_workers=1)
    capsys.readouterr()
    wb.prepare(data)  # no archive given: the manifest's record is reported (a notebook's output shows this line)
    out = capsys.readouterr().out
    assert f"up to date (from {archive.name}, md5 {md5_of(archive)})" in out and str(archive.parent) not in out


def test_prepare_writes_betons_arrays_and_manifest_then_skips(archive, tmp_path, capsys):
    data = tmp_path / "data"
    manifest = wb.prepare(data, archive=str(archive), counts=(50, 20), num_workers=1)
    assert manifest["train"]["count"] == 50 and manifest["test"]["count"] == 20
    assert manifest["source_md5"] == md5_of(archive)
    assert sorted(p.name for p in data.iterdir()) == ["betons.json", "test.beton", "test.npz", "train.beton",
                                                      "train.npz"]
    assert manifest["arrays"]["train"]["count"] == 50 and manifest["arrays"]["test"]["count"] == 20
    out = capsys.readouterr().out
    assert "wrote" in out and "50 images" in out
    mtime = (data / "train.beton").stat().st_mtime_ns
    wb.prepare(data, archive=str(archive), counts=(50, 20))
    assert "up to date" in capsys.readouterr().out
    assert (data / "train.beton").stat().st_mtime_ns == mtime
    wb.prepare(data, archive=str(archive), counts=(50, 20), force=True, num_workers=1)
    assert (data / "train.beton").stat().st_mtime_ns != mtime


def test_archive_source_order(archive, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    other = tmp_path / "env.tar.gz"
    other.write_bytes(archive.read_bytes())
    (data / wb.ARCHIVE_NAME).write_bytes(archive.read_bytes())
    assert wb.resolve_archive(str(archive), data, "http://unused", "x") == (archive, False)
    monkeypatch.setenv(wb.ARCHIVE_ENV, str(other))
    assert wb.resolve_archive(None, data, "http://unused", "x") == (other, False)
    monkeypatch.delenv(wb.ARCHIVE_ENV)
    assert wb.resolve_archive(None, data, "http://unused", "x") == (data / wb.ARCHIVE_NAME, False)


def test_counts_are_checked_against_the_real_sizes(archive, tmp_path):
    with pytest.raises(DataError, match="50 train images, expected 50000; not CIFAR-10"):
        wb.read_cifar10(archive, tmp_path)


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            add_bytes(tar, name, payload)
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


@pytest.mark.parametrize(("members", "links", "fragment"), [
    ({"../evil": b"x"}, None, "unsafe"),
    ({"/etc/evil": b"x"}, None, "unsafe"),
    ({}, {"cifar-10-batches-py/data_batch_1": "/etc/passwd"}, "link or special file"),
    ({"cifar-10-batches-py/readme.txt": b"hi"}, None, "no cifar-10-batches-py/batches.meta"),
])
def test_unsafe_or_foreign_archives_are_refused(tmp_path, members, links, fragment):
    path = _tar(tmp_path / "bad.tar.gz", members, links)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DataError, match=fragment):
        wb.read_cifar10(path, work, counts=None)
    assert not (tmp_path / "evil").exists() and list(work.iterdir()) == []


@pytest.mark.parametrize("meta", [{b"label_names": 5}, {b"label_names": [b"a"] * 9}, {b"label_names": [1] * 10},
                                  {b"num_vis": 3072}])
def test_a_batches_meta_without_ten_class_names_is_one_line(tmp_path, meta):
    path = tmp_path / "a.tar.gz"  # the later member of the same name is the one extracted
    write_archive(path, per_batch=10, n_test=20, extra={"cifar-10-batches-py/batches.meta": pickle.dumps(meta)})
    with pytest.raises(DataError, match=r"batches.meta does not list 10 class names \(b'label_names' is \w+\)"):
        wb.read_cifar10(path, tmp_path, counts=None)


def test_a_file_that_is_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(1000))
    with pytest.raises(DataError, match="not a readable tar.gz"):
        wb.read_cifar10(path, tmp_path, counts=None)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps({b"data": _Boom()}, protocol=2)
    with pytest.raises(DataError, match="refusing to load (posix|os).system"):
        wb.load_pickle(evil, "data_batch_1")
    assert not (tmp_path / "pwned").exists()
    path = tmp_path / "a.tar.gz"
    write_archive(path, per_batch=10, n_test=20)
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    members["cifar-10-batches-py/data_batch_3"] = evil
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 batch pickle"):
        wb.read_cifar10(_tar(tmp_path / "b.tar.gz", members), tmp_path / "w", counts=None)
    assert not (tmp_path / "pwned").exists()


def test_wrong_image_shape_is_refused(tmp_path):
    bad = pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2)
    with pytest.raises(DataError, match=r"uint8 array \[N, 3072\]"):
        wb._split([wb.load_pickle(bad, "data_batch_1")], ["data_batch_1"])


# ----------------------------------------------------------------------------------- download path


@pytest.fixture
def http_server(archive):
    """Serves the synthetic archive on 127.0.0.1 (an ephemeral port)."""
    payload = archive.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path != "/cifar-10-python.tar.gz":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_with_good_md5(http_server, archive, tmp_path):
    data = tmp_path / "data"
    manifest = wb.prepare(data, url=f"{http_server}/cifar-10-python.tar.gz", md5=md5_of(archive), counts=(50, 20),
                          num_workers=1)
    assert (data / wb.ARCHIVE_NAME).read_bytes() == archive.read_bytes()
    assert manifest["train"]["count"] == 50
    assert not list(data.glob("*.part"))


def test_download_with_bad_md5_deletes_the_file(http_server, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(DataError, match="expected 0123"):
        wb.prepare(data, url=f"{http_server}/cifar-10-python.tar.gz", md5="0123", counts=(50, 20))
    assert list(data.iterdir()) == []


def test_download_of_missing_file_fails_cleanly(http_server, tmp_path):
    with pytest.raises(DataError, match="cannot download .*404.*--archive"):
        wb.prepare(tmp_path / "data", url=f"{http_server}/nope.tar.gz", md5="x")
    assert list((tmp_path / "data").iterdir()) == []


def test_unreachable_host_fails_with_the_offline_hint(tmp_path):
    with contextlib.closing(socket.socket()) as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError, match=f"offline\\? pass a local archive with --archive PATH or set {wb.ARCHIVE_ENV}"):
        wb.prepare(tmp_path / "data", url=f"http://127.0.0.1:{port}/c.tar.gz", md5="x", counts=None)


# ------------------------------------------------------------------------------------ command line


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != wb.ARCHIVE_ENV} | (env or {})
    return subprocess.run([sys.executable, str(REPO / "data_prep" / "write_beton.py"), *args],
                          capture_output=True, text=True, env=environ, timeout=120)


def test_cli_reports_errors_in_one_line_and_exits_nonzero(archive, tmp_path):
    proc = _cli("--archive", str(tmp_path / "missing.tar.gz"), "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --archive names")
    proc = _cli("--archive", str(archive), "--data-dir", str(tmp_path / "d"))  # 50 images is not CIFAR-10
    assert proc.returncode == 1 and "expected 50000" in proc.stderr
    assert not list((tmp_path / "d").glob("*.beton"))


def test_cli_env_var_and_counts(archive, tmp_path):
    proc = _cli("--data-dir", str(tmp_path / "d"), "--expect-counts", "50,20", "--workers", "1",
                env={wb.ARCHIVE_ENV: str(archive)})
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "d" / "train.beton").is_file()


def test_unwritable_data_dir(archive, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match="cannot write to data directory"):
        wb.prepare(blocker / "data", archive=str(archive))


def test_stale_betons_without_manifest_are_rebuilt(archive, tmp_path):
    data = tmp_path / "data"
    wb.prepare(data, archive=str(archive), counts=(50, 20), num_workers=1)
    (data / "train.beton").write_bytes(b"truncated")
    assert wb.read_manifest(data) is None
    wb.prepare(data, archive=str(archive), counts=(50, 20), num_workers=1)
    assert wb.read_manifest(data) is not None


def test_interrupted_write_leaves_no_complete_looking_beton(archive, tmp_path, monkeypatch):
    data = tmp_path / "data"
    calls = []

    def fail_second(split, path, workers):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(split, path, workers)

    original = wb.write_beton
    monkeypatch.setattr(wb, "write_beton", fail_second)
    with pytest.raises(KeyboardInterrupt):
        wb.prepare(data, archive=str(archive), counts=(50, 20), num_workers=1)
    assert wb.read_manifest(data) is None and not (data / "test.beton").exists()
    assert not list(data.glob("*.tmp")) and not list(data.glob(".extract-*"))


def test_a_killed_extraction_leaves_nothing_for_good(archive, tmp_path):
    write_archive(archive, per_batch=10, n_test=20)
    data = tmp_path / "data"
    (data / ".extract-abc123" / "cifar-10-batches-py").mkdir(parents=True)  # as a kill -9 mid-extraction leaves
    wb.prepare(data, archive=str(archive), counts=(50, 20), num_workers=1)
    assert not list(data.glob(".extract-*"))


@pytest.mark.slow
def test_sigterm_while_writing_a_beton_stops_in_one_line_and_leaves_nothing_running(tmp_path):
    import os
    import signal
    import time

    archive = tmp_path / "cifar-10-python.tar.gz"
    write_archive(archive, per_batch=4000, n_test=2000)  # 20,000 images: a few seconds of writing
    data = tmp_path / "data"
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    proc = subprocess.Popen([sys.executable, str(REPO / "data_prep" / "write_beton.py"), "--archive", str(archive),
                             "--data-dir", str(data), "--expect-counts", "any"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (data / "train.npz").exists():  # arrays first, then the betons
        time.sleep(0.05)
    time.sleep(1.0)  # inside FFCV's writer now
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["interrupted: nothing half-written was kept"], err
    time.sleep(1.0)
    leftover = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout.split()
    assert leftover == [], "writer processes left running"
    if shm_before:
        assert set(os.listdir("/dev/shm")) <= shm_before, "shared memory left behind"
    assert not list(data.glob("*.tmp")) and not list(data.glob(".*.tmp")) and not (data / "betons.json").exists()


# ------------------------------------------------------------------ faults of the data step, in private mounts
# Each test runs the data step inside a private mount namespace (unshare, as root) with its own /dev/shm (and, for
# the full disk, a small tmpfs as the data directory), so that what it leaves behind, and what it removes, can be
# checked exactly, and another program's segment is there to be kept.

def _private_mounts_work() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               "mount -t tmpfs tmpfs /dev/shm"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_private_mounts = pytest.mark.skipif(not _private_mounts_work(),
                                          reason="needs unshare --mount (root) for a private /dev/shm and tmpfs")


def _in_private_mounts(script: str, timeout: float = 300) -> str:
    """Run a shell script in a private mount namespace whose /dev/shm is a fresh tmpfs holding another program's
    segment; returns its stdout."""
    head = "set -u\nmount -t tmpfs tmpfs /dev/shm\necho keep > /dev/shm/other_app_segment\n"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", head + script],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _step(archive: Path, data: Path) -> str:
    return (f"{sys.executable} {REPO / 'data_prep' / 'write_beton.py'} --archive {archive} --data-dir {data} "
            f"--expect-counts any")


def _after(data: Path) -> str:
    """The script's report: exit status, what is in the data dir and /dev/shm, and any writer still running."""
    return f"echo; echo SHM $(ls -A /dev/shm); echo DATA $(ls -A {data}); echo LEFT {_writers()}\n"


def _writers() -> str:
    """Shell: the pids of data-step processes still running (python ones only: the script's own shell has the
    same words in its command line)."""
    return f"$(pgrep -f '^{sys.executable} {REPO / 'data_prep' / 'write_beton.py'}' | tr '\\n' ' ')"


def _wait_for_the_beton_writer(data: Path) -> str:
    return f"while ! ls -A {data} | grep -q '^\\.train\\.beton\\..*\\.tmp$'; do sleep 0.05; done; sleep 0.5\n"


@pytest.mark.slow
@needs_private_mounts
def test_a_full_disk_while_writing_a_beton_ends_in_one_line_and_leaves_nothing(tmp_path):
    """FFCV's worker fails with ENOSPC; the step must end (it used to wait for that worker forever)."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    # extraction 5.3 MB, arrays 3.7 MB; the train beton (FFCV writes 8 MB pages) does not fit beside them in 8 MB
    write_archive(archive, per_batch=200, n_test=200)
    data = tmp_path / "data"
    data.mkdir()
    out = _in_private_mounts(f"mount -t tmpfs -o size=8m tmpfs {data}\n"
                             f"timeout -s KILL 150 {_step(archive, data)} >/dev/null 2>{tmp_path}/err; echo RC $?\n"
                             f"cat {tmp_path}/err\n"
                             + _after(data))
    assert "RC 1" in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write {data / 'train.beton'}: the disk is full; free space or use another "
                      f"--data-dir"], out
    assert "Traceback" not in out and "OSError" not in out  # the worker's error arrives as that one line
    assert "SHM other_app_segment" in out and "fastcifar_beton_" not in out
    data_line = next(line for line in out.splitlines() if line.startswith("DATA"))
    assert ".tmp" not in data_line and "betons.json" not in data_line
    assert next(line for line in out.splitlines() if line.startswith("LEFT")).strip() == "LEFT"


@pytest.mark.slow
@needs_private_mounts
def test_sigterm_during_a_beton_write_removes_its_own_shared_memory_and_nobody_elses(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_archive(archive, per_batch=4000, n_test=2000)  # 20,000 images: a few seconds of writing
    data = tmp_path / "data"
    out = _in_private_mounts(f"{_step(archive, data)} >/dev/null 2>{tmp_path}/err & pid=$!\n"
                             + _wait_for_the_beton_writer(data) +
                             "ls /dev/shm | grep -c fastcifar_beton_ | sed 's/^/WRITING /'\n"
                             f"kill -TERM $pid; wait $pid; echo RC $?; cat {tmp_path}/err; sleep 1\n" + _after(data))
    assert "WRITING 1" in out, out  # the writer's segment existed, under our name
    assert "RC 143" in out and "interrupted: nothing half-written was kept" in out, out
    assert next(line for line in out.splitlines() if line.startswith("SHM")) == "SHM other_app_segment"
    assert next(line for line in out.splitlines() if line.startswith("LEFT")).strip() == "LEFT"


@pytest.mark.slow
@needs_private_mounts
def test_kill_9_during_a_beton_write_takes_the_writer_along_and_the_next_step_sweeps_what_it_left(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_archive(archive, per_batch=4000, n_test=2000)
    data = tmp_path / "data"
    out = _in_private_mounts(f"{_step(archive, data)} >/dev/null 2>&1 & pid=$!\n"
                             + _wait_for_the_beton_writer(data) +
                             f"kill -KILL $pid; wait $pid; sleep 2\n"
                             f"echo AFTERKILL {_writers()}\n"
                             f"echo STALE $(ls -A {data} | grep -c 'tmp$') $(ls /dev/shm | grep -c fastcifar_beton_)\n"
                             f"{_step(archive, data)}; echo RC $?\n" + _after(data))
    assert next(line for line in out.splitlines() if line.startswith("AFTERKILL")).strip() == "AFTERKILL", out
    # the kill left a temporary beton (its segment, if any, is swept too: test_sweep_removes_only_dead_writers_files)
    assert "STALE 1 " in out, out
    assert "RC 0" in out and ".train.beton." in out and "left by an earlier data step that was killed" in out, out
    assert next(line for line in out.splitlines() if line.startswith("SHM")) == "SHM other_app_segment"
    data_line = next(line for line in out.splitlines() if line.startswith("DATA"))
    assert ".tmp" not in data_line and "train.beton" in data_line and "betons.json" in data_line


def test_sweep_removes_only_what_dead_writers_left(tmp_path, monkeypatch):
    import os

    from fastcifar import ffcv_io

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(ffcv_io, "SHM_DIR", shm)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has just ended
    live = str(os.getppid())
    data = tmp_path / "data"
    data.mkdir()
    for name in (f".train.beton.{dead}.tmp", f".train.npz.{dead}.tmp", f".train.beton.{live}.tmp", "train.beton",
                 ".notes.txt"):
        (data / name).write_text("x")
    for name in (f"fastcifar_beton_{dead}_1", f"fastcifar_beton_{live}_1", "other_app_segment", "psm_1234"):
        (shm / name).write_text("x")
    removed = sorted(Path(p).name for p in ffcv_io.sweep_stale(data))
    assert removed == sorted([f".train.beton.{dead}.tmp", f".train.npz.{dead}.tmp", f"fastcifar_beton_{dead}_1"])
    assert sorted(p.name for p in shm.iterdir()) == sorted([f"fastcifar_beton_{live}_1", "other_app_segment",
                                                            "psm_1234"])


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "the file is empty"), (bytes(range(256)) * 8, "neither gzip nor tar data"), ("zip", "it is a zip archive")])
def test_archives_that_are_not_tar_gz_are_one_line(tmp_path, content, fragment, capsys):
    import zipfile

    path = tmp_path / "cifar-10-python.tar.gz"
    if content == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data_batch_1", b"x")
    else:
        path.write_bytes(content)
    assert wb.main(["--archive", str(path), "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path, archive, capsys):
    (tmp_path / "data").write_text("a file")
    assert wb.main(["--archive", str(archive), "--data-dir", str(tmp_path / "data"), "--expect-counts", "any"]) == 1
    assert "is a file, not a folder; choose another with --data-dir" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--workers", "0"], "--workers must be in [1, 64] writer processes, got 0"),
    (["--workers", "100000"], "--workers must be in [1, 64]"),
    (["--data-dir", "da\x00ta"], "--data-dir must be printable text"),
    (["--archive", "a\nb.tar.gz"], "--archive must be printable text"),
])
def test_the_data_steps_flags_are_checked_before_any_work(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert wb.main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("counts", ["0,10000", "50000", "-1,5", "x,y"])
def test_expected_counts_must_be_two_positive_numbers(capsys, counts):
    with pytest.raises(SystemExit) as refused:
        wb.main(["--expect-counts", counts])
    assert refused.value.code == 2 and "--expect-counts" in capsys.readouterr().err


# The archive's pickles with generated contents (a test batch or batches.meta of other keys, types, shapes and
# values), fed to the data step's command: it writes the data (exit 0) or says in one line what is wrong (exit 1).
# Never a traceback.
ANY_VALUE = st.one_of(st.none(), st.integers(-5, 20), st.binary(max_size=8), st.text(max_size=8),
                      st.lists(st.integers(-2, 12), max_size=12))


@st.composite
def batch_contents(draw) -> dict:
    n = draw(st.sampled_from([0, 20, 21]))
    shape = draw(st.sampled_from([(n, 3072), (n, 3, 32, 32), (n,), (n, 3071)]))
    dtype = draw(st.sampled_from(["uint8", "float32", "int64"]))
    valid = draw(st.booleans())  # half the draws keep b'data' right, so that the labels' checks are reached
    data = np.zeros((n, 3072), np.uint8) if valid else draw(st.one_of(st.just(np.zeros(shape, dtype)), ANY_VALUE))
    count = draw(st.sampled_from([n, n + 1, max(n - 1, 0)]))
    labels = draw(st.one_of(st.lists(st.integers(-1, 10), min_size=count, max_size=count),
                            st.just(np.arange(count) % 10), st.just([str(i % 10) for i in range(count)]),
                            st.just([i % 10 for i in range(count)]), ANY_VALUE))
    keys = draw(st.sampled_from([(b"data", b"labels"), ("data", "labels"), (b"data", b"fine_labels")]))
    return dict(zip(keys, (data, labels), strict=True))


META = st.one_of(
    st.builds(lambda names: {b"label_names": names},
              st.one_of(st.just([f"c{i}".encode() for i in range(10)]), st.just([b"x"] * 9), st.just(5),
                        st.just(list(range(10))), st.just({b"a": 1}), ANY_VALUE)),
    st.just({b"num_vis": 3072}), st.just([1, 2]))


@pytest.mark.parametrize("member", ["test_batch", "batches.meta"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_pickle_contents_are_data_or_one_line(tmp_path_factory, capsys, member, data):
    content = data.draw(batch_contents() if member == "test_batch" else META)
    root = tmp_path_factory.mktemp("pickles")
    archive = root / "cifar-10-python.tar.gz"
    write_archive(archive, per_batch=20, n_test=20,
                  extra={f"cifar-10-batches-py/{member}": pickle.dumps(content, protocol=2)})
    capsys.readouterr()
    code = wb.main(["--archive", str(archive), "--data-dir", str(root / "data"), "--expect-counts", "any"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 or (code == 1 and len(err) == 1 and err[0].startswith("error: ")), (code, err, content)
    if code == 0:  # what was written is CIFAR-shaped: images and labels of one count, labels 0..9
        manifest = json.loads((root / "data" / "betons.json").read_text())
        for split in ("train", "test"):
            images, labels = read_arrays(root / "data" / f"{split}.npz")
            assert len(images) == len(labels) == manifest["arrays"][split]["count"]
            assert labels.min() >= 0 and labels.max() <= 9
