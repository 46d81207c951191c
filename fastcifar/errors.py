"""Errors that the command-line tools turn into a one-line message and a non-zero exit."""

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType


class FastCifarError(Exception):
    """Base class: bad input or environment, explained in the message (no traceback needed)."""


class DataError(FastCifarError):
    """Missing, corrupt or unsuitable data files (archives, betons)."""


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
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else getattr(err, "exit_code", 1)
    except KeyboardInterrupt as err:
        print(interrupted, file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def require_output_folder(path: str | Path, flag: str) -> None:
    """Fail at once if the folder of an output file written only at the end of a command does not exist:
    better than failing after minutes of evaluation or plotting."""
    if not Path(path).parent.is_dir():
        raise FastCifarError(f"{flag} {path}: its folder does not exist; create it or pick another path")
