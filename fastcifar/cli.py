"""The command line's view of the config: `--preset`, `--config FILE`, the short flags and one dotted flag per
field (`--section.field VALUE`, with the field's help text and the default preset's value), parsed into a
validated Config. Unknown options and bad values are one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import NoReturn

from fastcifar.config import (
    DEFAULT_PRESET,
    MAX_TEXT,
    PRESETS,
    SECTIONS,
    SHORT_FLAGS,
    Config,
    ConfigError,
    _plain_text,
    all_keys,
    read_config_file,
)
from fastcifar.errors import one_line


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line naming the problem and --help, not a usage block
    (a training command has ~80 options)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {one_line(message)} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def path_arg(text: str) -> str:
    """argparse's `type` for a path given on the command line (a run folder, a file to read or write): the config's
    rule for every path and name, printable and at most MAX_TEXT characters. A NUL would reach the OS as
    `ValueError: embedded null byte`; argparse makes the refusal one usage line, exit 2."""
    if not _plain_text(text):
        raise argparse.ArgumentTypeError(f"must be printable text of at most {MAX_TEXT} characters, got "
                                         f"{text[:60]!r}")
    return text


# The config sections that training uses; the LR finder also reads `lr_finder`.
TRAINING_SECTIONS = ("data", "model", "optim", "schedule", "run")


def add_config_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = TRAINING_SECTIONS,
                         keys: tuple[str, ...] | None = None) -> None:
    """Add --preset, the short flags and one dotted flag per field of `sections` (or only the dotted `keys`) to
    `parser`: a command lists (and accepts) only the fields it uses; the others keep the preset's values."""
    # default None, not the name: --resume must tell "no preset given" from an explicit --preset.
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"starting recipe: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", metavar="JSON", help="start from a saved config.json (e.g. of a run)")
    short = {dest: flag for flag, dest in SHORT_FLAGS.items()}
    defaults = Config()  # the default preset's values
    helps = {f"{s}.{f.name}": f.metadata.get("help", "") for s, c in SECTIONS.items() for f in dataclasses.fields(c)}
    for key in all_keys():
        section, name = key.split(".")
        if section not in sections or keys is not None and key not in keys:
            continue
        flags = [f"--{key}"] + ([short[key]] if key in short else [])
        default = getattr(getattr(defaults, section), name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(*flags, dest=key, default=argparse.SUPPRESS, metavar="V",
                            help=f"{helps[key]} (default: {shown})".replace("%", "%%"))
    parser.add_argument("--overwrite", dest="run.overwrite", action="store_const", const="true",
                        default=argparse.SUPPRESS, help="same as --run.overwrite true")


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The Config that parsed command-line arguments describe (preset, file or `base`, then overrides)."""
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    if "schedule.lr_from" in overrides and {"schedule.min_lr", "schedule.max_lr"} & overrides.keys():
        raise ConfigError("give either --lr-from or --min-lr/--max-lr, not both")
    if base is not None:
        if getattr(args, "config", None) or args.preset is not None:
            raise ConfigError("--resume takes the run's own config; do not combine it with --config or --preset")
        cfg = base.override(overrides)
    elif getattr(args, "config", None):
        cfg = read_config_file(args.config, "--config").override(overrides)
    else:
        cfg = Config.from_preset(args.preset or DEFAULT_PRESET, overrides)
    return cfg
