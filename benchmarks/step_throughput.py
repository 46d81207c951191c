"""Training-step throughput of the exact model for several variants, side by side in one process.

    python benchmarks/step_throughput.py [--variants fp32,fp32-cl,default] [--batch-size 512] [--steps 4]

A variant is a precision (fp32 | bf16 | fp16) followed by flags: `cl` (channels_last), `im2col` (the 4x4
convolutions' filter gradient as one matmul, fastcifar/conv.py) and `compile` (torch.compile, optionally
`compile:MODE`, e.g. `fp32-cl-compile:max-autotune`); `default` is the training step itself
(fastcifar.loop.train_step with the default preset's augmentation, loss and optimizer, in what fastcifar
picks on the device: run.precision/compile/conv_grad auto, channels_last), and `default@KEY=VALUE[@...]` is
that step with config options changed (`default@model.ghost_batch=32`: a lever's cost, side by side).
Each variant gets a fresh model and SGD, runs `--warmup` untimed steps (compilation happens there and is
reported as warm-up time), then `--steps` timed steps on a fixed random batch: forward + cross-entropy +
backward + SGD step, no data loading. On CUDA the timed steps are measured with CUDA events.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastcifar.augment import BatchAugment
from fastcifar.calibrate import DTYPES, StepTimer, Way, choose
from fastcifar.config import DEFAULT_PRESET, Config, ModelConfig, RunConfig
from fastcifar.conv import use_im2col_filter_grad
from fastcifar.custom_resnet import CustomResNet, freeze_prep_conv
from fastcifar.loop import PassThrough, Trainer, train_step
from fastcifar.runtime import Amp, compile_model
from fastcifar.session import make_trainer


def default_variant(device: torch.device, run: RunConfig | None = None, batch_size: int = 512,
                    widths: tuple[int, int, int, int] = ModelConfig.widths, timer: StepTimer | None = None) -> str:
    """What the training step runs on `device` with the run settings `run` (default: the default preset's) at this
    batch size and widths, spelled as a variant: the precision, memory format and filter gradient that training
    takes (fastcifar/calibrate.py: measured where `auto`, or this machine's cached measurement), and compile with
    its mode. `timer`: calibrate's step timer (tests)."""
    cfg = Config.from_preset(DEFAULT_PRESET)
    run = run or cfg.run
    choice = choose(run, ModelConfig(widths=widths), device, batch_size, frozen_prep=cfg.model.whiten_frozen,
                    log=lambda _: None, timer=timer)
    mode = f":{run.compile_mode}" if choice.compile and run.compile_mode != "default" else ""
    return choice.way.label + (f"-compile{mode}" if choice.compile else "")


def default_overrides(variant: str) -> dict[str, str] | None:
    """"default@model.ghost_batch=32" -> {"model.ghost_batch": "32"}; {} for "default"; None for other variants.
    The keys and values are checked by the config (unknown keys and bad values raise ConfigError)."""
    head, *options = variant.split("@")
    if head != "default":
        return None
    pairs = [option.partition("=") for option in options]
    if any(not key or not sep for key, sep, _ in pairs):
        raise ValueError(f"cannot read step variant {variant!r} (e.g. default@model.ghost_batch=32)")
    overrides = {key: value for key, _, value in pairs}
    Config.from_preset(DEFAULT_PRESET, overrides)
    return overrides


class Variant(NamedTuple):
    precision: str  # a DTYPES key
    channels_last: bool
    compiled: bool
    mode: str | None  # torch.compile's mode, None for its default
    im2col: bool


def parse_variant(variant: str) -> Variant:
    """"fp32-cl-compile:max-autotune" -> Variant("fp32", channels_last, compiled, "max-autotune", ...)."""
    head, _, mode = variant.partition(":")  # the mode itself may contain dashes
    precision, *flags = head.split("-")
    unknown = set(flags) - {"cl", "compile", "im2col"}
    if precision not in DTYPES or unknown or (mode and "compile" not in flags):
        raise ValueError(f"cannot read step variant {variant!r} (e.g. fp32, bf16-cl, bf16-cl-im2col, "
                         "fp32-cl-compile:max-autotune)")
    return Variant(precision, "cl" in flags, "compile" in flags, mode or None, "im2col" in flags)


@dataclass
class StepResult:
    variant: str
    warmup_s: float  # includes compilation for compiled variants
    images_per_s: float
    step_s: float


def _timer(device: torch.device) -> tuple:
    """(start, stop) callables measuring seconds: CUDA events on a GPU (no host timing of async work)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def stop() -> float:
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1000
        return begin.record, stop
    t0 = [0.0]

    def start() -> None:
        t0[0] = time.perf_counter()
    return start, lambda: time.perf_counter() - t0[0]


def measure(variant: str, batch_size: int, warmup: int, steps: int, device: torch.device,
            widths: tuple[int, int, int, int] = ModelConfig.widths) -> StepResult:
    """Warm-up seconds and timed images/s of one variant."""
    overrides = default_overrides(variant)
    # a default variant with options names what those options resolve to (`default@run.conv_grad=onednn` runs
    # bf16-cl on a bf16 CPU), and its precision and compile come from them
    resolved = (default_variant(device, Config.from_preset(DEFAULT_PRESET, overrides).run, batch_size, widths)
                if overrides is not None else variant)
    precision, channels_last, compiled, mode, im2col = parse_variant(resolved)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    amp = Amp(device, DTYPES[precision])
    if device.type == "cuda":  # as training sets them
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    if overrides is not None:
        way = Way(precision, channels_last, "im2col" if im2col else "onednn")
        step = _training_step(batch_size, device, widths, way, compiled, overrides)
    else:
        model = CustomResNet(ModelConfig(widths=widths))
        if im2col:
            use_im2col_filter_grad(model)
        model = model.to(device=device, memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        forward = compile_model(model, mode or "default") if compiled else model
        trainer = Trainer(forward, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                          torch.nn.CrossEntropyLoss(), PassThrough(), amp)
        x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (batch_size,), device=device)

        def step() -> None:
            train_step(trainer, x, y)

    start, stop = _timer(device)
    begin = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warm = time.perf_counter() - begin
    start()
    for _ in range(steps):
        step()
    seconds = stop()
    name = f"{variant} ({resolved})" if overrides is not None else variant
    return StepResult(name, warm, steps * batch_size / seconds, seconds / steps)


def training_model(cfg: Config, device: torch.device, way: Way) -> CustomResNet:
    """The network as training builds it from `cfg` (fastcifar.session), with random weights (the whitening init
    changes values, not the time): the whitening layer frozen where the config says so (no filter gradient), and
    the memory format and filter gradient of `way` (what fastcifar/calibrate.py chose), on `device`."""
    model = CustomResNet(cfg.model)
    if cfg.model.whiten_frozen:
        freeze_prep_conv(model)
    if way.conv_grad == "im2col":
        use_im2col_filter_grad(model)
    return model.to(device=device, memory_format=torch.channels_last if way.channels_last else torch.contiguous_format)


def _training_step(batch_size: int, device: torch.device, widths: tuple[int, int, int, int], way: Way,
                   compiled: bool, overrides: dict[str, str] | None = None) -> Callable[[], None]:
    """The step training runs, as the default preset builds it: a uint8 batch through the fused augmentation,
    the model (compiled when `compiled`) in `way`, label-smoothed cross-entropy and the preset's optimizer, via
    fastcifar.loop.train_step: so that this row and a training run agree. `overrides`: config options changed."""
    cfg = Config.from_preset(DEFAULT_PRESET, {"model.widths": ",".join(map(str, widths)), **(overrides or {})})
    model = training_model(cfg, device, way)
    amp = Amp(device, DTYPES[way.precision])
    forward = compile_model(model, cfg.run.compile_mode) if compiled else model
    augment = BatchAugment(cfg.data, device, 0, amp.dtype, way.channels_last)
    trainer = make_trainer(cfg, model, forward, augment, amp, steps_per_epoch=1, compiled=compiled)
    images = torch.randint(0, 256, (batch_size, 32, 32, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        train_step(trainer, images, labels)
    return step


# Shown even when they are not among the largest ops: the copies, autocast's dtype casts among them (on a bf16 CPU it
# casts the conv and linear weights to bf16 every step; batch norm takes the bf16 activations as they are).
COPY_OPS = ("aten::_to_copy", "aten::copy_")


def op_shares(batch_size: int, device: torch.device, widths: tuple[int, int, int, int] = ModelConfig.widths,
              steps: int = 2, top: int = 8) -> list[dict]:
    """Where the default step's time goes: torch.profiler over `steps` steps (after one untimed), each op's
    self time as a share of the total, the `top` largest first, then the COPY_OPS not among them, and the rest as
    one "other" row."""
    from torch.profiler import ProfilerActivity, profile  # only here: importing it costs ~1 s

    precision, channels_last, compiled, _, im2col = parse_variant(default_variant(device, batch_size=batch_size,
                                                                                  widths=widths))
    way = Way(precision, channels_last, "im2col" if im2col else "onednn")
    step = _training_step(batch_size, device, widths, way, compiled)
    step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [(e.key, getattr(e, key)) for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(t for _, t in events) or 1.0
    events.sort(key=lambda e: -e[1])
    shown = events[:top] + [e for e in events[top:] if e[0] in COPY_OPS]
    rows = [{"op": name, "share": t / total, "ms_per_step": t / 1000 / steps} for name, t in shown]
    rest = sum(t for name, t in events[top:] if name not in COPY_OPS)  # what `shown` left out
    if rest:
        rows.append({"op": "other", "share": rest / total, "ms_per_step": rest / 1000 / steps})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="fp32,fp32-cl,default")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    for variant in args.variants.split(","):
        r = measure(variant, args.batch_size, args.warmup, args.steps, device)
        print(f"{r.variant:<28} warm-up {r.warmup_s:6.1f} s   {r.images_per_s:8.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
