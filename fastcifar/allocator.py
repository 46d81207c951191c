"""The memory allocator of the project's commands: tcmalloc (or jemalloc) instead of glibc's malloc on Linux.

A CPU training step allocates and frees its activation buffers, ~2.4 GB at batch 512, on every step; glibc's
malloc returns the large ones to the OS and faults them in again each time. Preloading tcmalloc made the default
fp32 step 1.21x faster on the 2-core EPYC (BENCHMARKS.md, "The memory allocator"). It changes no number a run
computes. An allocator has to be in place before the process starts (`LD_PRELOAD`), so a command that would
run without it starts itself again, once, with it: `os.execve` of the same command line, same process id (so
torchrun, a shell's `$!` and signals are unaffected), before torch is imported.

`FASTCIFAR_ALLOCATOR` chooses: `auto` (default: tcmalloc, else jemalloc, else the system's, as installed),
`tcmalloc`, `jemalloc` or `system` (no change). Only the project's commands are relaunched (`python -m
fastcifar.<command>`, `python -m benchmarks.<command>`, the `fastcifar-*` console scripts); `import fastcifar`
in a notebook or a script never is. The allocator in use is recorded in each run's env.json. torch ships a
general launcher of the same idea (`python -m torch.backends.xeon.run_cpu --enable-tcmalloc`); this one is
automatic for our commands.

Standard library only: it runs before the package imports torch, on every command's start.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fastcifar.errors import one_line

ENV = "FASTCIFAR_ALLOCATOR"
SETTINGS = ("auto", "tcmalloc", "jemalloc", "system")
# Set before relaunching: a second start never relaunches again, even if the dynamic loader could not preload.
_TRIED = "FASTCIFAR_ALLOCATOR_TRIED"
LIBRARIES = {  # shared-object names, preferred first (Debian: libtcmalloc-minimal4, libjemalloc2)
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}  # Debian/Ubuntu
COMMAND_PACKAGES = ("fastcifar", "benchmarks")


class AllocatorError(Exception):
    """An allocator was asked for by name and cannot be used; the message says what to do."""


def library_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where shared libraries are looked for: the active conda or virtual environment, then the system's."""
    dirs = [Path(environ[var]) / "lib" for var in ("CONDA_PREFIX", "VIRTUAL_ENV") if environ.get(var)]
    multiarch = sysconfig.get_config_var("MULTIARCH")  # e.g. x86_64-linux-gnu on Debian
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    dirs += [Path("/usr/local/lib64"), Path("/usr/lib64")]
    return dirs


def find_library(kind: str, dirs: Iterable[Path]) -> Path | None:
    """The first of `kind`'s shared objects (LIBRARIES) found in `dirs`, else None."""
    dirs = list(dirs)
    for name in LIBRARIES[kind]:
        for folder in dirs:
            if (folder / name).is_file():
                return folder / name
    return None


def loaded(maps: str) -> str | None:
    """Which known allocator a process has mapped (the text of /proc/PID/maps), else None."""
    for kind, names in LIBRARIES.items():
        if any(name.split(".so")[0] + ".so" in maps for name in names):
            return kind
    return None


def choose(setting: str, dirs: Iterable[Path]) -> Path | None:
    """The library to preload for `setting` (SETTINGS), or None for the system's allocator.

    Raises AllocatorError for an unknown setting, or a named allocator that is not installed."""
    if setting not in SETTINGS:
        raise AllocatorError(f"{ENV}={setting!r} is not one of {', '.join(SETTINGS)}")
    if setting == "system":
        return None
    dirs = list(dirs)
    for kind in (("tcmalloc", "jemalloc") if setting == "auto" else (setting,)):
        path = find_library(kind, dirs)
        if path is not None:
            return path
    if setting == "auto":
        return None
    raise AllocatorError(f"{ENV}={setting} but {LIBRARIES[setting][0]} is not installed; install it "
                         f"(Debian/Ubuntu: apt-get install {PACKAGES[setting]}) or set {ENV}=auto")


def command_name(orig_argv: Sequence[str]) -> str | None:
    """What `python [options] ...` runs: the module of `-m MODULE`, the file name of a script (a console
    script such as `fastcifar` is one), or None (`-c`, stdin, the REPL)."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg.startswith("-m") and len(arg) > 2:  # python -mfastcifar.train
            return arg[2:]
        if arg in ("-X", "-W", "--check-hash-based-pycs"):
            next(args, None)  # the option's own value
        elif arg in ("-c", "-"):
            return None
        elif not arg.startswith("-"):
            return Path(arg).name  # a script comes first; what follows are its own arguments
    return None


def is_command(name: str | None) -> bool:
    """One of the project's commands: `python -m fastcifar[.X]` / `benchmarks.X`, or the `fastcifar` console script
    (and `fastcifar-*` ones of earlier versions)."""
    return name is not None and (name.split(".")[0] in COMMAND_PACKAGES or name.startswith("fastcifar-"))


def relaunch_plan(orig_argv: Sequence[str], environ: Mapping[str, str], maps: str,
                  dirs: Iterable[Path]) -> dict[str, str] | None:
    """The environment to start this command again with, or None to go on as it is.

    None unless this is one of the project's commands on Linux, with no allocator of ours loaded yet and no
    earlier relaunch; raises AllocatorError where the setting asks for what cannot be had."""
    if not is_command(command_name(orig_argv)) or not sys.platform.startswith("linux"):
        return None
    setting = environ.get(ENV, "auto").strip().lower() or "auto"
    path = choose(setting, dirs)  # validates the setting even when nothing is to be done
    if path is None or environ.get(_TRIED) or loaded(maps):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join([str(path), *env.get("LD_PRELOAD", "").split()])
    env[_TRIED] = str(path)
    # tcmalloc prints a line for every allocation above 1 GiB by default; the resident loader's data set and
    # a large test batch are such allocations, and expected.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def _maps() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def relaunch_command() -> None:
    """Start this command again with the faster allocator when relaunch_plan says so (does not return then).

    An invalid FASTCIFAR_ALLOCATOR is one line on stderr and exit 2, as for any bad option."""
    try:
        env = relaunch_plan(sys.orig_argv, os.environ, _maps(), library_dirs(os.environ))
    except AllocatorError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
    """The allocator of this process, for env.json: 'tcmalloc (PATH)', 'jemalloc (PATH)' or 'system'."""
    for line in _maps().splitlines():
        kind = loaded(line)
        if kind is not None:
            return f"{kind} ({line.split()[-1]})"
    return "system"
