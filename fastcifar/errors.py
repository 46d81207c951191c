"""Errors that the command-line tools turn into a one-line message and a non-zero exit."""

import errno
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType


class FastCifarError(Exception):
    """Base class: bad input or environment, explained in the message (no traceback needed)."""


class DataError(FastCifarError):
    """Missing, corrupt or unsuitable data files (archives, betons)."""


def one_line(text: str) -> str:
    """`text` as one printable line: a line break, a NUL or another control character inside it (a path or a value
    as the user typed it) is shown escaped, as Python writes it in a string ('\\n'), so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (which handles it itself, see fastcifar.interrupt): stop like Ctrl-C."""

    signum = signal.SIGTERM


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run_cli(action: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a command-line action: our errors become one line on stderr and an exit status
    (2 for invalid options or config, an error's own `exit_code` if it has one, 1 for anything else);
    Ctrl-C becomes 130 and SIGTERM (e.g. from `timeout`) 143, each after the one line `interrupted`, rather than a
    traceback or, for SIGTERM, a silent exit."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        action()
    except FastCifarError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else getattr(err, "exit_code", 1)
    except KeyboardInterrupt as err:
        print(interrupted, file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    except BrokenPipeError:  # e.g. `... | head -1`: the reader left; say nothing more, like other Unix tools
        _silence_stdout()
        return 141
    except OSError as err:  # the last net: any file-system error not explained closer to its cause
        print(f"error: {one_line(os_error_message(err))}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of a closed pipe raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


_ADVICE = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere (--out-dir / --data-dir)",
    errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere (--out-dir / --data-dir)",
    errno.EROFS: "the file system is read-only; write elsewhere (--out-dir / --data-dir)",
    errno.EACCES: "permission denied; write elsewhere (--out-dir / --data-dir) or fix the permissions",
    errno.EPERM: "not permitted; write elsewhere (--out-dir / --data-dir) or fix the permissions",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter --name or path",
}


def os_error_message(err: OSError, doing: str = "", path: str | Path | None = None) -> str:
    """One line for a file-system error: what failed, on which path, and what to do."""
    where = f" {path or err.filename}" if (path or err.filename) else ""
    advice = _ADVICE.get(err.errno or 0, err.strerror or str(err))
    return f"{doing or 'cannot access'}{where}: {advice}"


class WriteError(FastCifarError):
    """Writing a file failed (full or read-only disk, permissions, name too long); nothing half-written kept."""


def require_output_folder(path: str | Path, flag: str) -> None:
    """Fail at once if an output file written only at the end of a command cannot be written there: the path is a
    folder, or its folder does not exist or cannot be written. Better than failing after minutes of evaluation or
    plotting."""
    if Path(path).is_dir():
        raise FastCifarError(f"{flag} {path} is a folder; give the path of the file to write (it may be inside "
                             f"that folder)")
    folder = Path(path).parent
    if not folder.is_dir():
        raise FastCifarError(f"{flag} {path}: its folder does not exist; create it or pick another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise FastCifarError(f"{flag} {path}: {os_error_message(err, 'cannot write in', folder)}") from None


def numpy_load_error(err: BaseException) -> str:
    """numpy's error on a file that is not what it expects, in our words: never its advice to load the file with
    pickles (that could run code)."""
    text = str(err).splitlines()[0] if str(err) else ""
    if "pickle" in text or isinstance(err, EOFError) or not text:
        return "not a numpy .npz archive of arrays"
    return f"{type(err).__name__}: {text}"
