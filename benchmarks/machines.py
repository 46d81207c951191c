"""The per-machine table of BENCHMARKS.md, from committed records: `python -m benchmarks.machines benchmarks/results
--markdown BENCHMARKS.md`.

It reads three kinds of record under the folders it is given (and their subfolders, two levels down):
- benchmark records (`benchmarks-*.json`, written by `python -m benchmarks.run`): the training step, the matmul
  peaks, the projected epoch and the data path, from full runs of the command (every section, the default step
  variants: `is_full_run`; the side experiments of one section stay in their folders and the experiment log);
- calibration records (`calibration-*.json`, written by `python -m fastcifar calibrate --save`): what `auto` picks;
- run directories (written by `python -m fastcifar train`): the epochs of real runs, on the full data with the
  specified network at batch 512, split by whether the run tested after every epoch or once at the end.

Each machine kind is one column, named in words as in the README's results table (fastcifar.tables.machine_kind):
a record that did not note its CPU's kind is left out, and the footnote counts it. Where several records of a kind
hold a number, the latest one gives it, and the table names its date and file. Nothing here is typed by hand: rerun
the command after committing a record.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from fastcifar.config import Config, ConfigError, read_config_file
from fastcifar.errors import FastCifarError, run_cli
from fastcifar.runfiles import read_env, read_metrics
from fastcifar.tables import UNKNOWN, machine_kind

BEGIN, END = "<!-- machines:begin", "<!-- machines:end -->"
SPECIFIED = Config()  # the network and batch whose epochs the table reports


def kind_of(machine: dict[str, Any], default_step: str = "") -> str:
    """The machine kind in words, without a precision ("AVX512-BF16 EPYC"), or UNKNOWN. `default_step` is a benchmark
    record's default way ("fp32-cl"): an AMD EPYC record from before records noted the CPU's kind ran fp32 by default
    only where the CPU had no bf16 instructions (that rule chose bf16 wherever they were listed): the AVX2 one."""
    kind = machine_kind(machine, SPECIFIED)
    if kind == UNKNOWN and "cpu_kind" not in machine and "EPYC" in str(machine.get("cpu")) \
            and default_step.startswith("fp32"):
        return "AVX2 EPYC"
    return kind if kind == UNKNOWN else kind.rsplit(", ", 1)[0]


def is_full_run(record: dict[str, Any]) -> bool:
    """A record of `python -m benchmarks.run` as the table reads it: every section, the default step variants, the
    specified network at batch 512. Records of one section or of other variants (side experiments) are left out."""
    settings = record.get("settings") or {}
    sections = set(str(settings.get("sections", "")).split(","))
    return ({"data", "step", "e2e", "physics"} <= sections and not settings.get("step_variants")
            and settings.get("batch_size") == SPECIFIED.data.batch_size
            and settings.get("widths") == ",".join(map(str, SPECIFIED.model.widths)))


@dataclass
class Kind:
    """What the records say about one machine kind."""

    benchmarks: list[tuple[str, Path, dict]] = field(default_factory=list)  # (started, file, record)
    calibrations: list[tuple[str, Path, dict]] = field(default_factory=list)
    epochs_once: list[float] = field(default_factory=list)  # each run's median epoch, tested once at the end
    epochs_every: list[float] = field(default_factory=list)  # tested after every epoch

    def latest(self, section: str) -> tuple[str, Path, dict] | None:
        """The latest full benchmark record that holds `section`."""
        having = [b for b in self.benchmarks if b[2].get(section)]
        return max(having, key=lambda b: b[0]) if having else None


@dataclass
class Records:
    kinds: dict[str, Kind] = field(default_factory=dict)
    left_out: list[Path] = field(default_factory=list)  # records without a machine kind

    def kind(self, machine: dict[str, Any], path: Path, default_step: str = "") -> Kind | None:
        name = kind_of(machine, default_step)
        if name == UNKNOWN:
            self.left_out.append(path)
            return None
        return self.kinds.setdefault(name, Kind())


def _is_run(folder: Path) -> bool:
    return all((folder / f).exists() for f in ("config.json", "results.json", "metrics.jsonl"))


def _add_run(records: Records, folder: Path) -> None:
    try:
        cfg = read_config_file(folder / "config.json", "the run's config")
    except (ConfigError, FastCifarError):  # a run of an older config format: not a record of today's network
        return
    specified = (cfg.data.train_subset == 0 and cfg.model.widths == SPECIFIED.model.widths
                 and cfg.data.batch_size == SPECIFIED.data.batch_size and cfg.model.ghost_batch == 0
                 and cfg.data.low_res_epochs == 0  # a low-res epoch is not a full one
                 and (cfg.data.prune_fraction == 0 or cfg.data.prune_epochs == 0))  # nor is a pruned one
    epochs = [float(row["epoch_s"]) for row in read_metrics(folder / "metrics.jsonl") if row.get("epoch_s")]
    if not specified or not epochs:
        return
    try:
        env = read_env(folder / "env.json")
    except FastCifarError:  # broken: the kind is unknown, and the run counts nowhere
        return
    kind = records.kind(env, folder)
    if kind is not None:
        (kind.epochs_every if cfg.run.test_every == 1 else kind.epochs_once).append(median(epochs))


def _add_file(records: Records, path: Path) -> None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FastCifarError(f"{path} is not a readable JSON record ({e}); fix or remove it") from None
    machine = record.get("machine") if isinstance(record, dict) else None
    if not isinstance(machine, dict):
        records.left_out.append(path)
        return
    if "choice" not in record and not is_full_run(record):
        return
    try:  # the fields the cells read, checked here: a record of another shape is one line, not a traceback
        default = next((r["variant"] for r in record.get("step") or [] if r["variant"].startswith("default")), "")
        for row in record.get("step") or []:
            float(row["images_per_s"])
        for row in record.get("e2e") or []:
            str(row["name"]), float(row["epoch_s"])
        dict(record.get("physics") or {}), dict(record.get("ratios") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FastCifarError(f"{path} is not a record as python -m benchmarks.run writes it ({type(err).__name__}: "
                             f"{err}); fix or remove it") from None
    kind = records.kind(machine, path, default.partition("(")[2].rstrip(")"))
    if kind is None:
        return
    entry = (str(machine.get("started") or record.get("date") or ""), path, record)
    (kind.calibrations if "choice" in record else kind.benchmarks).append(entry)


def collect(paths: list[Path]) -> Records:
    """Every record under `paths` (files, run directories, or folders of them, two levels down)."""
    records = Records()

    def visit(path: Path, depth: int) -> None:
        if path.is_file():
            if path.name.startswith(("benchmarks-", "calibration-")) and path.suffix == ".json":
                _add_file(records, path)
        elif _is_run(path):
            _add_run(records, path)
        elif path.is_dir() and depth <= 2:
            for child in sorted(path.iterdir()):
                visit(child, depth + 1)

    for path in paths:
        if not path.exists():
            raise FastCifarError(f"{path} does not exist; pass folders of committed records, e.g. benchmarks/results")
        visit(path, 0)
    return records


# ----------------------------------------------------------------------------------------------------- the cells

def _date(entry: tuple[str, Path, dict] | None) -> str:
    return entry[0][:10] if entry else ""


def _step(kind: Kind) -> str:
    entry = kind.latest("step")
    if entry is None:
        return "-"
    rows = entry[2]["step"]
    default = next((r for r in rows if r["variant"].startswith("default")), None)
    others = [f"{r['variant']} {r['images_per_s']:.1f}" for r in rows
              if r["variant"] in ("fp32-cl", "bf16-cl") and r is not default]
    way = default["variant"].partition("(")[2].rstrip(")") if default else ""
    head = f"{default['images_per_s']:.1f} ({way}, the default)" if default else ""
    return "; ".join([head] + others if head else others) + f" [{_date(entry)}]"


def _peaks(kind: Kind) -> str:
    entry = kind.latest("physics")
    if entry is None:
        return "-"
    peaks = entry[2]["physics"].get("matmul_peak_flops") or {}
    return ", ".join(f"{p} {v / 1e9:,.0f}" for p, v in peaks.items()) + f" [{_date(entry)}]"


def _share(kind: Kind) -> str:
    entry = kind.latest("physics")
    physics = entry[2]["physics"] if entry else {}
    if "default_fraction_of_peak" not in physics:
        return "-"
    useful = physics.get("default_useful_fraction_of_peak")
    return (f"{physics['default_fraction_of_peak']:.0%} by the FLOP count"
            + (f", {useful:.0%} over real pixels" if useful else "") + f" [{_date(entry)}]")


def _projected(kind: Kind) -> str:
    entry = kind.latest("e2e")
    if entry is None:
        return "-"
    ours = [r for r in entry[2]["e2e"] if r["name"].startswith("fastcifar default")]
    return (", ".join(f"{r['epoch_s']:.0f} s" for r in ours[:1]) or "-") + f" [{_date(entry)}]"


def _real(epochs: list[float]) -> str:
    if not epochs:
        return "-"
    low, high = min(epochs), max(epochs)
    spread = f" ({low:.0f}-{high:.0f})" if len(epochs) > 1 else ""
    return f"{median(epochs):.0f} s{spread}, {len(epochs)} run{'s' if len(epochs) > 1 else ''}"


def _data(kind: Kind) -> str:
    entry = kind.latest("ratios")
    ratio = (entry[2]["ratios"] or {}).get("data_ours_vs_torch") if entry else None
    return f"{ratio:.1f}x [{_date(entry)}]" if ratio else "-"


def _auto(kind: Kind) -> str:
    if not kind.calibrations:
        return "not calibrated yet"
    started, _, record = max(kind.calibrations, key=lambda c: c[0])
    choice = record["choice"]
    rates = {k: v for k, v in (choice.get("rates") or {}).items() if "@" not in k}  # at the batch in use only
    shown = " > ".join(f"{k} {v:.0f}" for k, v in sorted(rates.items(), key=lambda kv: -kv[1])[:4])
    return f"**{choice['precision']}**, {'channels_last' if choice['channels_last'] else 'contiguous'}, " \
           f"{choice['conv_grad']} filter gradient ({shown} img/s) [{started[:10]}]"


def _allocators(kind: Kind) -> str:
    names = sorted({str(b[2]["machine"]["allocator"]).split(" ")[0] if b[2]["machine"].get("allocator")
                    else "not recorded" for b in kind.benchmarks})
    return ", ".join(names) or "-"


def _files(kind: Kind, root: Path) -> str:
    used = {e[1] for e in (kind.latest(s) for s in ("step", "physics", "e2e", "ratios")) if e}
    used |= {max(kind.calibrations, key=lambda c: c[0])[1]} if kind.calibrations else set()
    return "<br>".join(f"`{_relative(p, root)}`" for p in sorted(used)) or "-"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


ROWS = (
    ("`auto` picks, measured (`python -m fastcifar calibrate`; the fastest ways, images/s)", _auto),
    ("training step, images/s at batch 512 (the default way, then fp32-cl and bf16-cl)", _step),
    ("matmul peak, GFLOP/s", _peaks),
    ("the default step's share of its precision's matmul peak", _share),
    ("epoch end to end, projected (training + a 2-view test pass)", _projected),
)


def table(records: Records, root: Path = Path(".")) -> str:
    """The markdown table: one column per machine kind, in alphabetical order."""
    names = sorted(records.kinds)
    kinds = [records.kinds[n] for n in names]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(k) for k in kinds) + " |")
    lines.append("| epoch in real runs, tested once at the end (median of the runs' median epochs, range) | "
                 + " | ".join(_real(k.epochs_once) for k in kinds) + " |")
    lines.append("| epoch in real runs, tested after every epoch | "
                 + " | ".join(_real(k.epochs_every) for k in kinds) + " |")
    lines.append("| data path: fastcifar's vs a torch DataLoader with per-image augmentation | "
                 + " | ".join(_data(k) for k in kinds) + " |")
    lines.append("| allocator in the benchmark records | " + " | ".join(_allocators(k) for k in kinds) + " |")
    lines.append("| records | " + " | ".join(_files(k, root) for k in kinds) + " |")
    text = "\n".join(lines) + "\n"
    if records.left_out:
        text += (f"\n{len(records.left_out)} record(s) left out: they do not note their CPU's kind (written before "
                 f"records did).\n")
    return text


def write_block(path: Path, text: str, command: str) -> None:
    """Replace the block of `path` from its `<!-- machines:begin ...` line to `<!-- machines:end -->` with `text`,
    the begin line naming `command`; an error if the file has no such block (nothing is written then)."""
    try:
        old = path.read_text()
    except OSError as e:
        raise FastCifarError(f"cannot read {path} ({e.strerror}); pass the markdown file with the table") from None
    start, end = old.find(BEGIN), old.find(END)
    if start < 0 or end < start:
        raise FastCifarError(f"{path} has no machines block ({BEGIN} ... {END}); add the two marker lines where the "
                             f"table goes")
    path.write_text(f"{old[:start]}{BEGIN} (generated by {command}) -->\n{text}{old[end:]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.machines", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="records, run directories, or folders of them (two levels down), e.g. benchmarks/results")
    parser.add_argument("--markdown", default="", metavar="FILE",
                        help="also write the table between the machines markers of FILE, e.g. BENCHMARKS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> None:
        text = table(collect(args.paths))
        print(text, end="")
        if args.markdown:
            command = "python -m benchmarks.machines " + " ".join(shlex.quote(str(p)) for p in args.paths)
            write_block(Path(args.markdown), text, command)
            print(f"updated {args.markdown}")

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
