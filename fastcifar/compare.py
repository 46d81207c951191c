"""`python -m fastcifar.compare RUN_DIR RUN_DIR ...`: test accuracy of several runs side by side.

Reads config.json and metrics.jsonl of each run (unfinished runs too: a resumable run can be compared while
it is still under way), prints a markdown table (one row per epoch, one column per run; a row for flip TTA
where a run folder holds the tta.json of `python -m fastcifar.evaluate --tta --save`) and, with --out, draws
accuracy per epoch and against hours in training passes. With --seed, the table and figure put each run's train
and test accuracy per epoch beside the seed's log (fastcifar/seed.py), for the reproduction. With --table, the
finished runs are grouped by recipe instead: mean ± sd over seeds, seconds per epoch and time to 91% per machine
kind (fastcifar/tables.py; README's results tables are its output), and with --baseline each recipe's difference
against those runs, paired by seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastcifar.cli import Parser, path_arg
from fastcifar.config import ConfigError
from fastcifar.errors import FastCifarError, require_output_folder, run_cli
from fastcifar.evaluation import read_tta_accuracy
from fastcifar.reporting import comparison_markdown, load_history, plot_comparison, run_label, save_figure
from fastcifar.seed import plot_seed_comparison, seed_comparison_markdown
from fastcifar.tables import results_table, write_block


def compare(run_dirs: list[str], out: str | None = None, seed: bool = False) -> str:
    """The markdown table of `run_dirs`; with `out`, also the figure written there. `seed`: against the seed's log."""
    if out:
        require_output_folder(out, "--out")
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):  # e.g. ablation runs, all called seed0: their whole paths tell them apart
        names = [str(Path(d)) for d in run_dirs]
    if len(set(names)) < len(names):
        raise FastCifarError("a run directory is given twice; name each once")
    runs, tta = {}, {}
    for run_dir, name in zip(run_dirs, names, strict=True):
        cfg, metrics = load_history(run_dir)
        label = run_label(name, cfg)
        runs[label] = metrics
        if (saved := read_tta_accuracy(Path(run_dir) / "tta.json")) is not None:
            tta[label] = saved
    if seed:
        if out:
            save_figure(plot_seed_comparison(runs), Path(out))
        return seed_comparison_markdown(runs)
    if out:
        save_figure(plot_comparison(runs), Path(out))
    return comparison_markdown(runs, tta)


def _print_comparison(args: argparse.Namespace) -> None:
    for flag, value in (("--markdown", args.markdown), ("--baseline", args.baseline)):
        if value and not args.table:
            raise ConfigError(f"{flag} goes with --table")
    if args.table:
        if args.out or args.seed:
            raise ConfigError("--table prints the results table only; give --out/--seed without it")
        table = results_table(args.run_dirs, args.baseline)
        if args.markdown:
            baseline = "".join(f" --baseline {d}" for d in args.baseline or [])
            command = "python -m fastcifar compare --table" + baseline + " " + " ".join(args.run_dirs)
            write_block(Path(args.markdown), table, command)
            print(f"wrote the results table into {args.markdown}")
        else:
            print(table, end="")
        return
    print(compare(args.run_dirs, args.out, args.seed), end="")
    if args.out:  # to stderr: stdout stays the table alone, ready to redirect into a .md file
        print(f"wrote {args.out}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "python -m fastcifar.compare") -> int:
    parser = Parser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=path_arg,
                        help="run directories written by fastcifar.train")
    parser.add_argument("--out", metavar="PNG", type=path_arg,
                        help="also draw the accuracy curves into this image file")
    parser.add_argument("--seed", action="store_true", help="train and test accuracy per epoch beside the seed's log "
                        "(the run this project reproduces; fastcifar/seed_log.json)")
    parser.add_argument("--table", action="store_true", help="the finished runs grouped by recipe: mean ± sd over "
                        "seeds, seconds per epoch and time to 91%% per machine kind (README's results tables)")
    parser.add_argument("--baseline", metavar="RUN_DIR", action="append", type=path_arg,
                        help="with --table: a last column with "
                        "each recipe's accuracy minus this run's, paired by seed (repeat it, one run per seed)")
    parser.add_argument("--markdown", metavar="FILE", type=path_arg,
                        help="with --table: write it into FILE's results block "
                        "(between <!-- results:begin ... --> and <!-- results:end -->), e.g. README.md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _print_comparison(args))


if __name__ == "__main__":
    sys.exit(main())
