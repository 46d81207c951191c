"""The command-line wrapper: every error is one line with an exit status; OS errors and broken pipes too."""

import errno
import subprocess
import sys

import pytest

from fastcifar.errors import FastCifarError, os_error_message, require_output_folder, run_cli
from tests.conftest import REPO


@pytest.mark.parametrize(("code", "fragment"), [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                                (errno.EACCES, "permission denied"),
                                                (errno.ENAMETOOLONG, "name is too long")])
def test_os_errors_become_one_line_saying_what_to_do(capsys, code, fragment):
    def action():
        raise OSError(code, "raw", "/some/file")

    assert run_cli(action) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot access /some/file: ") and fragment in err


def test_os_error_message_names_what_failed():
    assert os_error_message(OSError(errno.ENOSPC, "x"), "cannot write", "/d/m.pt") == (
        "cannot write /d/m.pt: the disk is full; free space or write elsewhere (--out-dir / --data-dir)")


def test_a_closed_pipe_ends_quietly():
    code = "from fastcifar.errors import run_cli\nrun_cli(lambda: [print('x' * 100) for _ in range(100000)])"
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.stdout.strip() == "x" * 100 and "Traceback" not in proc.stderr


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch):
    with pytest.raises(FastCifarError, match="its folder does not exist"):
        require_output_folder(tmp_path / "nope" / "x.json", "--save")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FastCifarError, match=r"^--out .*taken is a folder; give the path of the file to write"):
        require_output_folder(tmp_path / "taken", "--out")  # matplotlib would fail on it after the plotting

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    with pytest.raises(FastCifarError, match=r"--save .*x\.json: cannot write in .*: the file system is read-only"):
        require_output_folder(tmp_path / "x.json", "--save")
