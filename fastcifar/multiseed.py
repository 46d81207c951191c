"""One recipe, several seeds: `python -m fastcifar seeds --seeds 5 [train options]` (also `python -m fastcifar.seeds`;
`python -m fastcifar.sweep` is its old name; its files keep that name: sweep.json).

Each seed trains in its own run directory, OUT_DIR/NAME/seed<S>, and the sweep then reports mean, standard
deviation (n - 1), min and max of the final and best test accuracy and of the time, as a table and in
OUT_DIR/NAME/sweep.json (with the config). Single runs differ by a few tenths of a point from seed to seed,
which is as large as many of the effects worth measuring: quote a recipe by such a table where the
hardware allows.

A sweep can be stopped and run again with the same command: seeds that finished are read back (if their
config is the requested one), a seed with a checkpoint is resumed, the others start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastcifar import rundir
from fastcifar.checkpoint import CHECKPOINT, recipe_differences
from fastcifar.cli import Parser, add_config_arguments, config_from_args
from fastcifar.config import Config, ConfigError, read_config_file
from fastcifar.errors import FastCifarError, run_cli
from fastcifar.interrupt import TrainingInterrupted
from fastcifar.runfiles import read_metrics, read_results
from fastcifar.training import time_to, train

STATS = ("final_test_acc", "best_test_acc", "total_seconds")


@dataclass
class SweepResult:
    sweep_dir: Path
    runs: list[dict]  # one per seed: seed, run_dir, the results.json values, epoch/seconds to the target
    stats: dict[str, dict[str, float]]  # per STATS key: mean, std, min, max

    def table(self) -> str:
        return format_table(self.runs, self.stats)


MAX_SEEDS = 1000  # a count beyond this is a typo, not a sweep


def parse_seeds(text: str) -> list[int]:
    """"5" -> seeds 0..4; "0,3,7" -> those seeds."""
    try:
        count = None if "," in text else int(text)
        if count is not None and count > MAX_SEEDS:
            raise ConfigError(f"--seeds {count}: at most {MAX_SEEDS} seeds in one sweep")
        seeds = [int(s) for s in text.split(",")] if count is None else list(range(count))
    except ValueError:
        raise ConfigError(f"--seeds takes a count (5) or a comma-separated list (0,3,7), got {text!r}") from None
    if not seeds or min(seeds) < 0 or max(seeds) >= 2**32 or len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
        raise ConfigError(f"--seeds needs 1 to {MAX_SEEDS} distinct seeds in [0, 2**32), got {text!r}")
    return seeds


def summarise(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


RERUN_HINT = ("stopped; run the same command again to continue: finished seeds are read back and a stopped one "
              "resumes from its checkpoint")


def run_seeds(cfg: Config, seeds: Sequence[int], target: float | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Train `cfg` once per seed (see the module docstring for the directories); returns the per-seed results
    and their statistics."""
    name = cfg.run.name or f"{dt.datetime.now():%Y%m%d-%H%M%S}-{cfg.preset}-sweep"
    sweep_dir = Path(cfg.run.out_dir) / name
    runs = []
    for seed in seeds:
        seed_cfg = cfg.override({"run.seed": seed, "run.out_dir": str(sweep_dir), "run.name": f"seed{seed}"})
        log(f"--- seed {seed} ({len(runs) + 1} of {len(seeds)}) -> {sweep_dir / f'seed{seed}'}")
        try:
            metrics, results = _run_one(seed_cfg, log)
        except TrainingInterrupted as stopped:  # its checkpoint is saved; this command, not --resume, continues it
            raise TrainingInterrupted(f"{RERUN_HINT} (seed {seed} stopped with its checkpoint saved)",
                                      stopped.exit_code - 128) from None
        row = {"seed": seed, "run_dir": str(sweep_dir / f"seed{seed}")} | results
        if target is not None:
            row["target"] = target
            row["epochs_to_target"], row["seconds_to_target"] = time_to(metrics, target,
                                                                         results["compile_seconds"]
                                                                         + (results["setup_seconds"] or 0.0))
        runs.append(row)
    stats = {key: summarise([r[key] for r in runs]) for key in STATS}
    rundir.write_json(sweep_dir / "sweep.json", {"config": cfg.to_dict(), "seeds": list(seeds), "target": target,
                                                 "runs": runs, "stats": stats})
    result = SweepResult(sweep_dir, runs, stats)
    log(result.table())
    return result


def _run_one(cfg: Config, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Train one seed, or read it back / resume it when an earlier sweep got that far."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if (run_dir / "results.json").exists() and not cfg.run.overwrite:
        saved = read_config_file(run_dir / "config.json", "the finished run's config")
        differ = recipe_differences(saved, cfg)
        if differ:
            raise FastCifarError(f"{run_dir} holds a finished run of another recipe ({', '.join(differ)}); "
                                 f"choose another --name or pass --overwrite")
        log(f"finished earlier: {run_dir}")
        metrics = read_metrics(run_dir / "metrics.jsonl")
        return metrics, read_results(run_dir / "results.json", needs=(*STATS, "compile_seconds"))
    resume = run_dir if (run_dir / CHECKPOINT).exists() and not cfg.run.overwrite else None
    result = train(cfg, log=log, resume=resume)
    return result.metrics, result.summary


def format_table(runs: list[dict], stats: dict[str, dict[str, float]]) -> str:
    has_target = any("target" in r for r in runs)
    head = f"{'seed':>6}  {'final acc':>9}  {'best acc':>8}  {'seconds':>8}"
    head += f"  {'to target':>15}" if has_target else ""
    lines = [head]
    for r in runs:
        line = f"{r['seed']:>6}  {r['final_test_acc']:>9.2%}  {r['best_test_acc']:>8.2%}  {r['total_seconds']:>8.0f}"
        if has_target:
            reached = r["epochs_to_target"]
            where = f"epoch {reached}, {r['seconds_to_target']:.0f} s" if reached else "not reached"
            line += f"  {where:>15}"
        lines.append(line)
    for stat in ("mean", "std", "min", "max"):
        f, b, t = (stats[k][stat] for k in STATS)
        lines.append(f"{stat:>6}  {f:>9.2%}  {b:>8.2%}  {t:>8.0f}")
    return "\n".join(lines)


def build_parser(prog: str = "python -m fastcifar.seeds") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description="Train one recipe for several seeds and report mean, std, min and max test accuracy.",
        epilog="Any option of python -m fastcifar train works here (except --seed: this command sets it).")
    parser.add_argument("--seeds", required=True, help="a count (5: seeds 0..4) or a list (0,3,7)")
    parser.add_argument("--target", type=float, help="also report the first epoch (and seconds) reaching this "
                                                     "test accuracy, e.g. 0.91")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m fastcifar.seeds") -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> SweepResult:
        if "run.seed" in vars(args):
            raise ConfigError("this command sets the seed of each run: give --seeds, not --seed")
        if args.target is not None and not 0 < args.target <= 1:
            raise ConfigError(f"--target is an accuracy in (0, 1], got {args.target}")
        return run_seeds(config_from_args(args), parse_seeds(args.seeds), args.target)

    return run_cli(run, interrupted=RERUN_HINT)


if __name__ == "__main__":
    sys.exit(main())
