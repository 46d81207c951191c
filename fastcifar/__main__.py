"""`python -m fastcifar <command> [options]` (or the `fastcifar` console script): every command in one place.

Each command is the module command of the same job (`python -m fastcifar.train` and the others keep working);
`python -m fastcifar <command> --help` shows its options.
"""

from __future__ import annotations

import importlib
import sys

from fastcifar.errors import run_cli

# command -> (module holding its main(argv, prog), one line of what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("fastcifar.prepare", "write the data: CIFAR-10 (download or --archive) -> data/*.beton and *.npz"),
    "train": ("fastcifar.training", "train the network (a preset plus --section.field options; --resume)"),
    "evaluate": ("fastcifar.evaluation", "test a saved model.pt, with flip / translation TTA"),
    "report": ("fastcifar.reporting", "(re)write a run's figures and summary.md from its run directory"),
    "find-lr": ("fastcifar.lr_finder", "LR range test: step-wise (Smith) or epoch-wise (the seed's)"),
    "seeds": ("fastcifar.multiseed", "one recipe over several seeds: mean, std, min, max"),
    "compare": ("fastcifar.compare", "runs side by side, per epoch (--seed: beside the seed's log)"),
    "calibrate": ("fastcifar.calibrate", "what --run.* auto picks on this machine: measured once, then cached"),
    "bench": ("benchmarks.run", "the benchmarks: data paths, training step, end to end (from a clone)"),
}
PROG = "python -m fastcifar"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        code = run_cli(lambda: print(usage()))  # (run_cli: `| head` ends quietly)
        return code or (0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)} (see: {PROG} --help)",
              file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0]:
            raise
        print(f"error: {PROG} {name} needs the repository's {module_name.split('.')[0]}/ folder: run it from a clone "
              f"of fastcifar", file=sys.stderr)
        return 2
    return int(module.main(rest, prog=f"{PROG} {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
