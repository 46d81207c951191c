"""Results tables from committed run directories: `python -m fastcifar.compare --table RUN_DIR ...`.

Finished runs (those with a results.json) are grouped by recipe: the preset they name and every training or test
setting in which they differ from that preset as it is defined now; the seed and the run's own plumbing (paths,
names, threads, how often it tested or checkpointed) do not split a group. One row per recipe gives the final test
accuracy as mean ± sd over its runs (as the runs measured it: plain, flip TTA or translation TTA), the
translation-TTA accuracy of the final weights where `evaluate --tta --translate 1 --save tta-translate1.json`
left its file, and per machine kind the seconds per epoch (each run's median epoch, so that an epoch paused or
shared with other work does not stand for the recipe; averaged over runs) and the time to 91% from the command's
start (set-up, warm-up and every test pass the run made included), each with how many runs it averages.

With baseline runs (`--baseline RUN_DIR`, repeatable), a last column gives each recipe's difference against them
paired by seed: for every run whose seed a baseline run shares, its accuracy minus that baseline's, in translation
TTA where both have it (a run that tested with flip and +-1 px translation TTA has it as its final accuracy), else
as tested where both tested alike; the mean of the pairs, then each pair. This is how a lever is judged here: a
difference between seeds is not a difference between recipes.

README's tables are this command's output: rerun it to refresh them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median, stdev
from typing import Any

from fastcifar.config import Config, read_config_file
from fastcifar.errors import FastCifarError
from fastcifar.presets import PRESETS
from fastcifar.reporting import test_method
from fastcifar.runfiles import read_env, read_evaluation, read_metrics, read_results

TRANSLATE_FILE = "tta-translate1.json"
TARGET = 0.91
# What a run may set without being another recipe: where it reads and writes, how fast it runs, how often it tests
# or checkpoints (the last test pass, whose accuracy the table reports, is always there).
NOT_RECIPE = ("run.", "data.data_dir", "data.num_workers", "data.loader", "data.test_batch_size", "lr_finder.")
UNKNOWN = "unknown"


@dataclass
class Run:
    path: Path
    recipe: str
    epochs: int
    seed: int
    test_acc: float
    method: str
    machine: str  # UNKNOWN where the run did not record its machine kind
    epoch_s: float
    to_target_s: float | None
    translate_acc: float | None


@dataclass
class Row:
    recipe: str
    epochs: int
    runs: list[Run] = field(default_factory=list)


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}


def _recipe(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in _flat(cfg).items() if not k.startswith(NOT_RECIPE) and k != "schedule.lr_from"}


def recipe_label(cfg: Config) -> str:
    """'fast10', or 'fast + schedule.epochs=12, schedule.peak_epoch=2.5': the preset whose recipe is nearest (fewest
    settings differ; the preset the run named wins a tie) and the settings in which the run differs from it."""
    ours = _recipe(cfg)
    names = sorted(PRESETS, key=lambda name: name != cfg.preset)  # the named preset first: it wins ties
    best = min(names, key=lambda name: sum(v != ours[k] for k, v in _recipe(Config.from_preset(name)).items()))
    theirs = _recipe(Config.from_preset(best))
    changed = [f"{k}={_short(v)}" for k, v in ours.items() if v != theirs[k]]
    return best + (" + " + ", ".join(changed) if changed else "")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# AMD's CPU families with AVX-512 (Zen 3, also family 25, has none): runs record it since 2026-12-07 (env.json's
# cpu_family); one "AMD EPYC" of each ran here, ~1.5x apart in speed, so they are kept apart where known.
AMD_GENERATIONS = {"25": "Zen 4", "26": "Zen 5"}


def _generation(env: dict) -> str:
    family = str(env.get("cpu_family") or "").split()
    return f" ({AMD_GENERATIONS[family[1]]})" if len(family) > 1 and family[1] in AMD_GENERATIONS else ""


def machine_kind(env: dict, cfg: Config) -> str:
    """The machine kind and precision in words: 'AMX Xeon, bf16', 'AVX512-BF16 EPYC (Zen 5), bf16' (the generation
    where env.json recorded it), 'Xeon without AMX, fp32',
    'AVX2 EPYC, fp32', or the GPU's name and precision; UNKNOWN where env.json did not record the CPU's kind. The
    precision is what the run recorded choosing (env.json's auto entry), else the one it set, else what `auto` meant
    on that kind before it was measured."""
    recorded = env.get("auto") if isinstance(env.get("auto"), dict) else {}
    given = cfg.run.precision if cfg.run.precision != "auto" else None
    precision = recorded.get("precision") or given
    if str(env.get("device", "")).startswith("cuda"):
        return f"{env.get('device_name') or 'GPU'}, {precision or 'bf16'}"
    kind = str(env.get("cpu_kind") or "").split(",")[0].strip()
    xeon = "Xeon" in str(env.get("device_name") or env.get("cpu") or "")
    if kind == "amx_bf16":
        return f"AMX Xeon, {precision or 'bf16'}"
    if kind == "avx512_bf16":  # both list avx512_bf16: the model name tells them apart
        epyc = f"AVX512-BF16 EPYC{_generation(env)}"
        return f"{'Xeon without AMX' if xeon else epyc}, {precision or 'bf16'}"
    if kind.startswith("avx2"):
        return f"AVX2 EPYC, {precision or 'fp32'}"
    if xeon and env.get("cpu_kind") is None:  # before env.json recorded the kind, every Xeon here was an AMX one
        return f"AMX Xeon, {precision or 'bf16'}"
    return UNKNOWN


def read_run(path: Path) -> Run | None:
    """A finished run's numbers; None for an unfinished one (no results.json); an error for a folder that is not a
    run directory."""
    if not (path / "results.json").exists():
        if not (path / "config.json").exists():
            raise FastCifarError(f"{path} is not a run directory (no config.json); pass folders written by "
                                 f"python -m fastcifar train")
        return None
    # Each file through its checked reader (fastcifar/runfiles.py): a broken one is an error that names it.
    cfg = read_config_file(path / "config.json", "the run's config")
    results = read_results(path / "results.json", needs=("epochs", "final_test_acc"))
    env = read_env(path / "env.json")
    epochs = [row["epoch_s"] for row in read_metrics(path / "metrics.jsonl") if row["epoch_s"] is not None]
    if not epochs:
        raise FastCifarError(f"{path / 'metrics.jsonl'} has no epoch times: not the metrics of a finished run; "
                             f"rerun the run, or restore the file")
    target = results["time_to_test_acc"].get(f"{TARGET:.2f}", {}).get("seconds")
    translate = None
    if (path / TRANSLATE_FILE).exists():
        saved = read_evaluation(path / TRANSLATE_FILE)
        translate = float(saved["test_acc"]) if saved["translate"] else None
    elif cfg.data.test_translate == 1 and cfg.data.test_flip and not cfg.optim.ema_decay:
        translate = float(results["final_test_acc"])  # the run tested as `evaluate --tta --translate 1` does
    return Run(path, recipe_label(cfg), int(results["epochs"]), cfg.run.seed, float(results["final_test_acc"]),
               test_method(cfg) or "plain", machine_kind(env, cfg), median(epochs), target, translate)


def group(runs: list[Run]) -> list[Row]:
    rows: dict[tuple[str, int], Row] = {}
    for run in runs:
        rows.setdefault((run.recipe, run.epochs), Row(run.recipe, run.epochs)).runs.append(run)
    return sorted(rows.values(), key=lambda r: (r.recipe.split(" ")[0], r.epochs, r.recipe))


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}%"
    return f"{100 * mean(values):.2f} ± {100 * stdev(values):.2f}%"


def machines(runs: list[Run]) -> list[str]:
    """The known machine kinds among `runs`, those with the most runs first."""
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        if run.machine != UNKNOWN:
            counts[run.machine] += 1
    return sorted(counts, key=lambda m: (-counts[m], m))


def _epoch_cell(runs: list[Run]) -> str:
    return f"{mean(r.epoch_s for r in runs):.0f} s (n={len(runs)})" if runs else "-"


def _target_cell(runs: list[Run]) -> str:
    if not runs:
        return "-"
    reached = [r.to_target_s for r in runs if r.to_target_s is not None]
    if not reached:
        return f"not reached (n={len(runs)})"
    return f"{mean(reached) / 60:.1f} min ({len(reached)} of {len(runs)})"


def _finished(run_dirs: list[str]) -> list[Run]:
    unique = list(dict.fromkeys(Path(d).resolve() for d in run_dirs))  # overlapping globs name a run twice
    return [run for run in (read_run(path) for path in unique) if run is not None]


def _pair(run: Run, base: Run) -> tuple[float, str] | None:
    """`run`'s accuracy minus `base`'s and how both were measured, or None if they were measured differently."""
    if run.translate_acc is not None and base.translate_acc is not None:
        return run.translate_acc - base.translate_acc, "translation TTA"
    if run.method == base.method:
        return run.test_acc - base.test_acc, run.method
    return None


def paired_difference(runs: list[Run], baseline: list[Run]) -> str:
    """'+0.12 pt (translation TTA; seed 0 +0.20, seed 1 +0.04)': the mean difference over the runs that have a
    baseline run of the same seed, then each pair; '-' where none has."""
    by_seed = {base.seed: base for base in baseline}
    pairs = [(run.seed, *pair) for run in sorted(runs, key=lambda r: r.seed)
             if run.seed in by_seed and (pair := _pair(run, by_seed[run.seed])) is not None]
    if not pairs:
        return "-"
    methods = ", ".join(sorted({method for _, _, method in pairs}))
    each = ", ".join(f"seed {seed} {100 * diff:+.2f}" for seed, diff, _ in pairs)
    return f"{100 * mean(diff for _, diff, _ in pairs):+.2f} pt ({methods}; {each})"


def results_table(run_dirs: list[str], baseline_dirs: list[str] | None = None) -> str:
    """The markdown table of the finished runs among `run_dirs`, with a column of paired differences against the
    runs in `baseline_dirs` if given (see the module docstring)."""
    runs = _finished(run_dirs)
    if not runs:
        raise FastCifarError("none of these runs has finished (no results.json); nothing to tabulate")
    baseline = _finished(baseline_dirs or [])
    if baseline_dirs and not baseline:
        raise FastCifarError("none of the baseline runs has finished (no results.json); nothing to pair against")
    seeds = [base.seed for base in baseline]
    if len(set(seeds)) < len(seeds):
        raise FastCifarError("two baseline runs share a seed; give one baseline run per seed")
    kinds = machines(runs)
    speed = [f"s per epoch, {m}" for m in kinds] + [f"time to {TARGET:.0%}, {m}" for m in kinds]
    lines = ["| recipe | epochs | n (seeds) | final test acc (as tested) | + translation TTA | " + " | ".join(speed)
             + " |", "|---|---:|---|---|---|" + "---|" * len(speed)]
    if baseline:
        recipes = {(base.recipe, base.epochs) for base in baseline}
        label = "{}, {} epochs".format(*recipes.pop()) if len(recipes) == 1 else "the baseline runs"
        lines = [lines[0] + f" vs {label}, paired by seed |", lines[1] + "---|"]
    for row in group(runs):
        methods = sorted({r.method for r in row.runs})
        seeds = ",".join(str(r.seed) for r in sorted(row.runs, key=lambda r: r.seed))
        translate = [r.translate_acc for r in row.runs if r.translate_acc is not None]
        trans = f"{_mean_sd(translate)} (n={len(translate)})" if translate else "-"
        on = {m: [r for r in row.runs if r.machine == m] for m in kinds}
        cells = [_epoch_cell(on[m]) for m in kinds] + [_target_cell(on[m]) for m in kinds]
        lines.append(f"| {row.recipe} | {row.epochs} | {len(row.runs)} ({seeds}) | "
                     f"{_mean_sd([r.test_acc for r in row.runs])} ({', '.join(methods)}) | {trans} | "
                     + " | ".join(cells) + " |" + (f" {paired_difference(row.runs, baseline)} |" if baseline else ""))
    return "\n".join(lines) + "\n"


BLOCK_BEGIN, BLOCK_END = "<!-- results:begin", "<!-- results:end -->"


def write_block(path: Path, table: str, command: str) -> None:
    """Replace the results block of a markdown file (from its `<!-- results:begin ...` line to `<!-- results:end -->`)
    with `table`, its begin line naming `command`; an error if the file has no such block."""
    text = path.read_text()
    start, end = text.find(BLOCK_BEGIN), text.find(BLOCK_END)
    if start < 0 or end < start:
        raise FastCifarError(f"{path} has no results block ({BLOCK_BEGIN} ... {BLOCK_END}); add the two marker lines "
                             f"where the table goes")
    block = f"{BLOCK_BEGIN} ({command}) -->\n{table}"
    path.write_text(text[:start] + block + text[end:])
