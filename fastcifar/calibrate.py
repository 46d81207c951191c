"""`auto` chosen by measurement, as cudnn.benchmark chooses a convolution: a few training steps of the network's own
shapes on this device decide the precision, the memory format and the conv filter gradient wherever the config says
`auto`, and the answer is cached per machine and software, so the next run starts at once.

Why measure: the rules these settings used to follow were right on the machines where they were tuned and wrong on
another. On a 2-core Xeon whose hypervisor hides AMX but shows `avx512_bf16`, the old rule chose bf16, which trains
at 61 images/s there against fp32's 90 (BENCHMARKS.md). Feature flags say what a CPU can do, not how fast.

What is measured (`candidates`): for each setting left at `auto`, the ways that are numerically sound on this
device, in order of preference (the old rule's choice first):
- precision: bf16 (autocast, fp32 master weights) where oneDNN has bf16 kernels for this CPU or the GPU has native
  bf16 (sm80+), fp16 with a GradScaler on older GPUs, and fp32 everywhere. On a CPU without bf16 kernels PyTorch runs
  bf16 on a reference path ~20x slower than fp32: it is not a candidate there, so no calibration pays for a step of it;
- memory format: channels_last, and the default contiguous layout;
- conv filter gradient at 4x4 (fastcifar/conv.py): oneDNN's and the im2col matmul, on a CPU (GPUs keep cuDNN's).
Compiling is not measured: on a CUDA device `auto` compiles (a step gains far more than the compile costs over a
run), on a CPU it does not (its compile time exceeded what it saved in a short run, README); a measurement of it
would itself cost the compile time, not a few seconds.

How (`measure`): each candidate trains `loop.train_step` on random images at a small batch first; a candidate more
than `BEHIND` times slower than the best is dropped there. The rest then run at the batch size in use, one warm-up
step and `STEPS` timed ones each. A candidate whose rate is within `TIE` of the best keeps its place in the order of
preference, so that noise between near-equal ways does not flip the choice from one machine to the next. The global
random generators are left as they were: the run's initial weights do not depend on whether the cache was warm.

The cache (`cache_path`): one JSON file in the user's cache folder ($FASTCIFAR_CACHE_DIR, else $XDG_CACHE_HOME or
~/.cache, then fastcifar/), one entry per key: the device (the CPU's model, flags and core count, or the GPU's name,
capability, driver and CUDA version), the torch, oneDNN and cuDNN versions, the threads, the batch and the network's
widths, and the candidates. Any change is a new key; `--run.recalibrate` measures again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcifar import rundir
from fastcifar.config import Config, ModelConfig, RunConfig
from fastcifar.conv import use_im2col_filter_grad
from fastcifar.custom_resnet import CustomResNet, freeze_prep_conv
from fastcifar.loop import PassThrough, Trainer, train_step
from fastcifar.runtime import (
    Amp,
    cpu_has_amx,
    cpu_has_fast_bf16,
    cuda_has_native_bf16,
    resolve_compile,
    resolve_precision,
    sync,
)

SMALL_BATCH = 64  # the first round's batch: a step costs ~1/8 of one at 512, enough to drop a clearly slower way
BEHIND = 1.5  # dropped after the first round when this many times slower than the best
STEPS = 2  # timed steps per candidate at the batch in use (the fastest counts: other processes only slow a step)
CLOSE = 0.10  # at the batch in use, a way this much slower than the best after one timed step gets no second one
TIE = 0.03  # within 3% of the best rate, the order of preference decides
CACHE_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Way:
    """One way to run the training step: a precision, a memory format and a conv filter gradient."""

    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    conv_grad: str  # onednn (the library's) or im2col

    @property
    def label(self) -> str:
        return f"{self.precision}{'-cl' if self.channels_last else ''}{'-im2col' if self.conv_grad == 'im2col' else ''}"


@dataclass(frozen=True)
class Choice:
    """What a job runs with, and why: `source` is "given" (no setting left at auto, or one way only), "measured",
    "cache" (an earlier measurement on this machine) or "run" (what a resumed run chose when it started)."""

    precision: str
    channels_last: bool
    conv_grad: str
    compile: bool
    source: str
    reason: str
    rates: dict[str, float] = dataclasses.field(default_factory=dict)  # images/s per way label, where measured

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def way(self) -> Way:
        return Way(self.precision, self.channels_last, self.conv_grad)

    def record(self) -> dict[str, Any]:
        """The env.json entry: the choices, how they were made, and the rates behind them."""
        return dataclasses.asdict(self)


def precision_options(setting: str, device: torch.device) -> list[str]:
    """The precisions `setting` allows on `device`, preferred first."""
    if setting != "auto":
        return [setting]
    if device.type == "cuda":
        return ["bf16" if cuda_has_native_bf16(device) else "fp16", "fp32"]
    return ["bf16", "fp32"] if cpu_has_fast_bf16() else ["fp32"]


def candidates(run: RunConfig, device: torch.device) -> list[Way]:
    """Every way the run's settings allow on `device`, in order of preference (the old rules' choice first)."""
    layouts = {"on": [True], "off": [False], "auto": [True, False]}[run.channels_last]
    ways = []
    for precision in precision_options(run.precision, device):
        if run.conv_grad != "auto" or device.type != "cpu":
            grads = [run.conv_grad if run.conv_grad != "auto" else "onednn"]
        else:  # the im2col gradient won with AMX in bf16 (conv.py); elsewhere oneDNN's did
            grads = ["im2col", "onednn"] if precision == "bf16" and cpu_has_amx() else ["onednn", "im2col"]
        ways += [Way(precision, layout, grad) for layout in layouts for grad in grads]
    return ways


def cache_path() -> Path:
    """$FASTCIFAR_CACHE_DIR/calibration.json, else the user's cache folder's fastcifar/calibration.json."""
    folder = os.environ.get("FASTCIFAR_CACHE_DIR")
    if folder:
        return Path(folder) / "calibration.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastcifar" / "calibration.json"


@functools.cache
def _onednn_version() -> str | None:
    found = re.search(r"MKL-DNN v([\w.]+)", torch.__config__.show())
    return found.group(1) if found else None


def _cpu_facts() -> dict[str, Any]:
    info = rundir.read_cpuinfo()
    flags = " ".join(sorted(set((rundir.cpuinfo_field(info, "flags") or "").split())))
    return {"cpu": rundir.cpu_name(), "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "onednn": _onednn_version()}


def _gpu_facts(device: torch.device) -> dict[str, Any]:
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    return {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
            "driver": driver, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def cache_key(device: torch.device, batch_size: int, model: ModelConfig, ways: list[Way],
              facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a measurement holds for: the machine (`facts`, read from this one when None), the software, the step's
    shapes and the candidates. A different value anywhere is another entry."""
    if facts is None:
        facts = _gpu_facts(device) if device.type == "cuda" else _cpu_facts()
    return {"device": device.type, **facts, "torch": torch.__version__, "batch": batch_size,
            "widths": list(model.widths), "ghost_batch": model.ghost_batch, "ways": [w.label for w in ways]}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries by digest; an unreadable or foreign file counts as empty (it is only a cache: the next
    measurement rewrites it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _cached(entries: dict[str, Any], key: dict[str, Any], ways: list[Way]) -> tuple[Way, dict[str, float]] | None:
    """The cached choice for `key`, if its entry is whole and names one of `ways`."""
    entry = entries.get(_digest(key))
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("rates"), dict):
        return None
    by_label = {w.label: w for w in ways}
    chosen = by_label.get(entry.get("chosen"))
    rates = {k: float(v) for k, v in entry["rates"].items()
             if isinstance(v, int | float) and k.partition("@")[0] in by_label}
    return (chosen, rates) if chosen is not None else None


def write_cache(path: Path, key: dict[str, Any], chosen: Way, rates: dict[str, float]) -> None:
    """Add (or replace) `key`'s entry; other machines' entries stay. A cache that cannot be written only costs the
    next run a new measurement."""
    entries = read_cache(path)
    entries[_digest(key)] = {"key": key, "chosen": chosen.label, "rates": rates,
                             "measured": dt.datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_json(path, {"version": CACHE_VERSION, "entries": entries})


StepTimer = Callable[[Way, int, int, float], float]  # (way, batch, steps, limit s) -> fastest timed step, s


def time_step(model_cfg: ModelConfig, device: torch.device, frozen_prep: bool) -> StepTimer:
    """A timer of `loop.train_step` for one way: a fresh network with the run's widths and frozen layers, SGD, random
    images and labels; one untimed step (oneDNN builds its kernels then), then up to `steps` timed ones, stopping
    after a step slower than `limit` seconds (that way is behind already)."""

    def timer(way: Way, batch: int, steps: int, limit: float = float("inf")) -> float:
        model = CustomResNet(model_cfg)
        if frozen_prep:
            freeze_prep_conv(model)
        if way.conv_grad == "im2col":
            use_im2col_filter_grad(model)
        fmt = torch.channels_last if way.channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=fmt).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        trainer = Trainer(model, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                          nn.CrossEntropyLoss(), PassThrough(), Amp(device, DTYPES[way.precision]))
        images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        labels = torch.randint(0, model_cfg.num_classes, (batch,), device=device)
        best = float("inf")
        for i in range(steps + 1):
            start = time.perf_counter()
            train_step(trainer, images, labels)
            sync(device)  # a CPU-GPU sync point: the step's time is only known once the device is done
            if i:
                best = min(best, time.perf_counter() - start)
                if best > limit:
                    break
        del model, optimizer, trainer, images
        gc.collect()
        return best

    return timer


def measure(ways: list[Way], batch: int, timer: StepTimer) -> tuple[Way, dict[str, float]]:
    """The fastest way and the measured rates, images/s by label (at `batch`; "label@64": at batch 64).

    Round 1 times one step of each way at SMALL_BATCH and drops those more than BEHIND times slower than the best.
    Round 2 times the others at `batch`, fastest first by round 1, each stopping after its first timed step when that
    is more than CLOSE slower than the best so far (it cannot win). Of the ways within TIE of the best rate, the first
    in `ways` (the order of preference) is chosen."""
    small = min(batch, SMALL_BATCH)
    survivors, labelled = list(ways), {}
    if small < batch:
        first = {w: small / timer(w, small, 1, float("inf")) for w in ways}
        survivors = sorted((w for w in ways if first[w] * BEHIND >= max(first.values())), key=lambda w: -first[w])
        labelled = {f"{w.label}@{small}": round(r, 1) for w, r in first.items()}
        if len(survivors) == 1:
            return survivors[0], labelled
    rates: dict[Way, float] = {}
    for w in survivors:
        fastest = max(rates.values(), default=0.0)
        rates[w] = batch / timer(w, batch, STEPS, batch / fastest * (1 + CLOSE) if fastest else float("inf"))
    best = max(rates.values())
    chosen = next(w for w in ways if w in rates and rates[w] >= best * (1 - TIE))
    return chosen, {w.label: round(r, 1) for w, r in rates.items()} | labelled


def _explain(chosen: Way, rates: dict[str, float], source: str) -> str:
    """"bf16-cl 177 img/s > fp32-cl 90 img/s: bf16-cl" (the measured rates, fastest first)."""
    full = {label: rate for label, rate in rates.items() if "@" not in label}
    small = {label.partition("@")[0]: (rate, label.partition("@")[2]) for label, rate in rates.items() if "@" in label}
    parts = [f"{label} {rate:.0f} img/s" for label, rate in sorted(full.items(), key=lambda kv: -kv[1])]
    # the ways dropped at the small batch, after those timed at the batch in use
    parts += [f"{label} {rate:.0f} img/s (batch {batch})" for label, (rate, batch)
              in sorted(small.items(), key=lambda kv: -kv[1][0]) if label not in full]
    shown = " > ".join(parts)
    when = {"measured": "measured now", "cache": "cached: measured earlier on this machine"}[source]
    return f"{shown}: {chosen.label} ({when})"


def choose(run: RunConfig, model_cfg: ModelConfig, device: torch.device, batch_size: int,
           frozen_prep: bool = False, log: Callable[[str], None] = print, timer: StepTimer | None = None,
           facts: dict[str, Any] | None = None) -> Choice:
    """How the job runs: the explicit settings as given, and every `auto` one by measurement (or from the cache).
    `timer` and `facts` replace the step timer and the machine facts (tests)."""
    compiled = resolve_compile(run.compile, device)
    ways = candidates(run, device)
    if len(ways) == 1:
        (way,) = ways
        why = "as set" if "auto" not in (run.precision, run.channels_last, run.conv_grad) else "the only way here"
        return Choice(way.precision, way.channels_last, way.conv_grad, compiled, "given", why)
    key = cache_key(device, batch_size, model_cfg, ways, facts)
    path = cache_path()
    hit = None if run.recalibrate else _cached(read_cache(path), key, ways)
    if hit is not None:
        (way, rates), source = hit, "cache"
    else:
        log(f"calibrating the auto settings: {len(ways)} ways ({', '.join(w.label for w in ways)}) at batch "
            f"{batch_size} (once per machine; cached in {path})")
        began = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            way, rates = measure(ways, batch_size, timer or time_step(model_cfg, device, frozen_prep))
        log(f"calibration took {time.perf_counter() - began:.1f} s")
        write_cache(path, key, way, rates)
        source = "measured"
    return Choice(way.precision, way.channels_last, way.conv_grad, compiled, source, _explain(way, rates, source),
                  rates)


def recorded(env: dict[str, Any], run: RunConfig, device: torch.device) -> Choice | None:
    """The choice a run recorded in its env.json when it started (a resumed run keeps its numbers' precision and
    layout), if it recorded one that the settings still allow on `device`."""
    entry = env.get("auto") if isinstance(env, dict) else None
    if not isinstance(entry, dict):
        return None
    try:
        way = Way(str(entry["precision"]), bool(entry["channels_last"]), str(entry["conv_grad"]))
    except KeyError:
        return None
    if way not in candidates(run, device):
        return None
    return Choice(way.precision, way.channels_last, way.conv_grad, resolve_compile(run.compile, device), "run",
                  f"{way.label}, as the run chose when it started")


def for_inference(run: RunConfig, device: torch.device, env: dict[str, Any]) -> tuple[torch.dtype, bool]:
    """The precision and memory format to evaluate a run's weights with: what the run trained with (its env.json's
    record), so that an evaluation repeats its test pass exactly; for runs from before the record (or weights moved
    away from their run), the rule those runs followed: bf16 where the hardware has it, channels_last unless off."""
    choice = recorded(env, run, device)
    if choice is not None:
        return choice.dtype, choice.channels_last
    return resolve_precision(run.precision, device), run.channels_last != "off"


def training_precision(device: torch.device, batch_size: int = 512) -> torch.dtype:
    """The precision the default recipe trains in on `device` (measured, or this machine's cached measurement): what
    the benchmarks' `auto` means."""
    cfg = Config()
    return choose(cfg.run, cfg.model, device, batch_size, frozen_prep=cfg.model.whiten_frozen,
                  log=lambda _: None).dtype


# What the calibration reads: the step's shapes, the device and the settings it chooses between.
COMMAND_KEYS = ("data.batch_size", "model.widths", "model.ghost_batch", "model.whiten_frozen", "run.device",
                "run.precision", "run.channels_last", "run.conv_grad", "run.compile", "run.threads", "run.recalibrate")


def main(argv: list[str] | None = None, prog: str = "python -m fastcifar.calibrate") -> int:
    """`python -m fastcifar calibrate`: what `auto` chooses on this machine, measured now or read from the cache."""
    from fastcifar.cli import Parser, add_config_arguments, config_from_args, path_arg  # the command line only
    from fastcifar.errors import require_output_folder, run_cli
    from fastcifar.runtime import check_step_memory, resolve_device

    parser = Parser(prog=prog, description="Measure which precision, memory format and conv gradient train fastest "
                    "on this machine (what --run.* auto chooses), cache the answer, and print it with the rates.")
    add_config_arguments(parser, keys=COMMAND_KEYS)
    parser.add_argument("--save", metavar="JSON", type=path_arg,
                        help="also write the choice, its rates and the machine to a file")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.save:
            require_output_folder(args.save, "--save")
        cfg = config_from_args(args)
        device = resolve_device(cfg.run.device)
        if device.type == "cpu" and cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        check_step_memory(cfg.data.batch_size, cfg.model.widths, device)
        choice = choose(cfg.run, cfg.model, device, cfg.data.batch_size, frozen_prep=cfg.model.whiten_frozen)
        given = choice.source == "given"
        print(f"auto settings: {f'{choice.way.label} ({choice.reason})' if given else choice.reason}")
        if args.save:
            key = cache_key(device, cfg.data.batch_size, cfg.model, candidates(cfg.run, device))
            rundir.write_json(Path(args.save), {"choice": choice.record(), "key": key,
                                                "machine": rundir.environment(device),
                                                "date": dt.datetime.now().isoformat(timespec="seconds")})
            print(f"saved {args.save}")

    return run_cli(run)


if __name__ == "__main__":
    import sys

    sys.exit(main())
