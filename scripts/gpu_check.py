"""The Python half of scripts/gpu_check.sh: `python scripts/gpu_check.py STEP OUT_DIR [DATA_DIR]`.

Steps (each writes OUT_DIR/<step>.json):
  env      GPU, driver, torch, CUDA, cuDNN, compute capability, the precision `auto` resolves to
  synth    full-size synthetic CIFAR-10 arrays (50,000 / 10,000 random images) into DATA_DIR, for timing
  counts   host syncs, recompiles and graph breaks over 30 training steps after the warm-up
  profile  a 20-step torch.profiler trace: top CUDA kernels and the fraction of wall time the GPU is busy
  report   everything in OUT_DIR gathered into report.json and report.md
Needs no install beyond torch (PYTHONPATH=. from the repository root) and no FFCV.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

STEPS = 30


def _write(out: Path, name: str, record: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(record, indent=2, default=str))


def env(out: Path) -> None:
    from fastcifar.runtime import resolve_precision

    device = torch.device("cuda")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True)
    _write(out, "env", {
        "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
        "nvidia_smi": smi.stdout.strip() or smi.stderr.strip(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "auto_precision": str(resolve_precision("auto", device)), "python": sys.version.split()[0],
        "gpus": torch.cuda.device_count()})


def synth(data_dir: Path) -> None:
    from fastcifar.data import write_arrays

    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 50_000), ("test", 10_000)):
        write_arrays(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                     data_dir / f"{split}.npz")
    print(f"wrote synthetic arrays to {data_dir}")


def _session(data_dir: Path, out: Path):
    from fastcifar.config import Config
    from fastcifar.session import Session

    cfg = Config.from_preset("fast", {"data.data_dir": str(data_dir), "data.loader": "resident",
                                      "run.out_dir": str(out / "runs"), "run.name": f"probe-{time.time_ns()}",
                                      "run.progress": "off"})
    session = Session.open(cfg, log=lambda _: None)
    warm = session.warm_up()
    return session, session.trainer.scheduler, warm


def _steps(session, scheduler, count: int) -> float:
    from fastcifar.loop import train_step

    start = time.perf_counter()
    with session.loaders.train.epoch(0) as batches:
        for _, (images, labels) in zip(range(count), batches, strict=False):
            train_step(session.trainer, images, labels)
            scheduler.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def counts(out: Path, data_dir: Path) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    session, scheduler, warm = _session(data_dir, out)
    _steps(session, scheduler, 3)  # past any first-call work
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = sum(counters["graph_break"].values())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # every host sync inside the steps becomes a warning
        try:
            seconds = _steps(session, scheduler, STEPS)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    _write(out, "counts", {
        "steps": STEPS, "seconds": seconds, "images_per_s": STEPS * session.batch_size / seconds,
        "warm_up_s": warm, "host_syncs": len(syncs), "host_syncs_per_step": len(syncs) / STEPS,
        "sync_examples": sorted(set(syncs))[:10],
        "recompiles_after_warm_up": counters["stats"]["unique_graphs"] - graphs_before,
        "graph_breaks": sum(counters["graph_break"].values()) - breaks_before,
        "graph_break_reasons": dict(counters["graph_break"]), "precision": str(session.trainer.amp.dtype),
        "compiled": session.compiled})


def profile(out: Path, data_dir: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    session, scheduler, _ = _session(data_dir, out)
    _steps(session, scheduler, 5)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = _steps(session, scheduler, 20)
    kernels = sorted(prof.key_averages(), key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    top = [{"name": e.key[:90], "calls": e.count, "device_ms": getattr(e, "self_device_time_total", 0) / 1e3}
           for e in kernels[:15]]
    prof.export_chrome_trace(str(out / "profile_trace.json"))
    _write(out, "profile", {"steps": 20, "wall_s": wall, "gpu_busy_fraction": busy_us / 1e6 / wall,
                            "step_ms": wall / 20 * 1e3, "top_kernels": top})


def report(out: Path) -> None:
    record: dict = {"steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
                    if (out / "steps.jsonl").exists() else []}
    for name in ("env", "counts", "profile"):
        path = out / f"{name}.json"
        record[name] = json.loads(path.read_text()) if path.exists() else None
    runs = {}
    for metrics in sorted((out / "runs").glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        runs[metrics.parent.name] = [{k: r[k] for k in ("epoch", "test_acc", "train_s", "test_s", "train_img_s")}
                                     for r in rows]
    record["runs"] = runs
    (out / "report.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = ["# GPU check", "", f"GPU: {(record['env'] or {}).get('gpu')}, torch {(record['env'] or {}).get('torch')}, "
             f"CUDA {(record['env'] or {}).get('cuda')}, auto precision {(record['env'] or {}).get('auto_precision')}",
             "", "| step | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in record["steps"]]
    if record["counts"]:
        c = record["counts"]
        lines += ["", f"Training steps after warm-up: {c['images_per_s']:,.0f} images/s, "
                  f"{c['host_syncs_per_step']:.2f} host syncs/step, {c['recompiles_after_warm_up']} recompiles, "
                  f"{c['graph_breaks']} graph breaks."]
    if record["profile"]:
        p = record["profile"]
        lines += ["", f"Profile (20 steps): {p['step_ms']:.2f} ms/step, GPU busy {p['gpu_busy_fraction']:.0%}.", "",
                  "| kernel | calls | ms |", "|---|---:|---:|"]
        lines += [f"| `{k['name']}` | {k['calls']} | {k['device_ms']:.2f} |" for k in p["top_kernels"]]
    for name, rows in runs.items():
        lines += ["", f"Run `{name}`:", "", "| epoch | test acc | train s | test s | train img/s |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['epoch']} | {r['test_acc']:.2%} | {r['train_s']:.2f} | {r['test_s']:.2f} | "
                  f"{r['train_img_s']:,.0f} |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in {"env", "synth", "counts", "profile", "report"}:
        print(__doc__, file=sys.stderr)
        return 2
    step, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(argv[2]) if len(argv) > 2 else out / "synthetic"
    {"env": lambda: env(out), "synth": lambda: synth(data_dir), "counts": lambda: counts(out, data_dir),
     "profile": lambda: profile(out, data_dir), "report": lambda: report(out)}[step]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
