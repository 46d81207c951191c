"""Where and how a job computes: the device, the precision (autocast and, for fp16, a GradScaler), whether to
torch.compile, seeding, and the one "wait for the GPU" helper. Everything that runs models uses these, so a
CPU and a GPU job differ only in what these functions decide."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from fastcifar.errors import FastCifarError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else the CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head, _, index = name.partition(":")
    if head not in ("cpu", "cuda") or index and not index.isdigit() or head == "cpu" and index:
        raise FastCifarError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastCifarError(f"device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None:
        check_gpu_index(device.index, f"--device {name}")
    return device


def check_gpu_index(index: int, what: str) -> None:
    """A CUDA device number must name one of this machine's GPUs (else CUDA's bare "invalid device ordinal")."""
    count = torch.cuda.device_count()
    if index >= count:
        raise FastCifarError(f"{what} needs GPU {index}, but this machine has {count} (cuda:0 to cuda:{count - 1}); "
                             f"use a lower index, or with torchrun at most --nproc_per_node={count}")


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512-BF16/AMX class). Without them PyTorch runs
    bf16 convolutions on a slow reference path: measured ~20x slower than fp32 on an AVX2-only EPYC."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) and later. `torch.cuda.is_bf16_supported()` also
    counts emulation (V100, T4), where bf16 runs far slower than fp16 with a GradScaler."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The precision by the hardware's features alone. auto: bf16 on GPUs with native bf16 (sm80+), else fp16 +
    GradScaler; on a CPU, bf16 where oneDNN has bf16 kernels for it, else fp32. Training measures instead
    (fastcifar/calibrate.py: on a Xeon with AMX hidden, bf16 has the kernels and is the slower path); this rule is
    what runs recorded before that trained with, and what evaluating their weights repeats."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise FastCifarError("fp16 is for CUDA; on a CPU use --precision bf16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_compile(setting: str, device: torch.device) -> bool:
    """auto: compile on CUDA (large gain), not on CPU (see README: measured gain too small for the
    compile time of a short run)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def cpu_has_amx() -> bool:
    """Intel AMX (bf16 matrix tiles, `amx_bf16`), as PyTorch's CPU probe reports it."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: then no AMX is assumed
    return bool(capabilities is not None and capabilities().get("amx_bf16", False))


@dataclass
class Amp:
    """Mixed-precision policy: autocast to `dtype`, and a GradScaler for fp16 only (bf16 has fp32's range)."""

    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def compile_model(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """torch.compile with one static graph per input shape (`dynamic=False`): a run sees two training and two
    test batch shapes at most, and a dynamic graph (what Dynamo switches to after the second shape) is slower."""
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def seed_everything(seed: int, deterministic: bool, device: torch.device | None = None) -> None:
    """Seed every generator; `deterministic`: deterministic algorithms only (on CUDA this needs cuBLAS's
    fixed workspace, set here before the first matmul creates the cuBLAS handle)."""
    if deterministic and device is not None and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU, where every op is synchronous): a CPU-GPU sync
    point, used only where a timing or a value must be final."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A training step of the spec's network keeps ~2.4 GB of activations for 512 images in fp32 (measured on the CPU,
# BENCHMARKS.md): ~4.7 MB per image, roughly in proportion to the widths' sum (64+128+256+512 = 960).
STEP_BYTES_PER_IMAGE = 2.4e9 / 512
# A test pass (no gradients, one view at a time) peaks at ~1.2 MB per image in fp32 (the growth of the process's
# peak memory over a forward of 1,000 images, spec widths, channels_last, on the CPU; 0.7 MB under bf16 autocast).
TEST_BYTES_PER_IMAGE = 1.2e6
SPEC_WIDTH_SUM = 960


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a training step on `device`: the GPU's free memory, or the host's MemAvailable; None where it
    cannot be read."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def check_step_memory(batch_size: int, widths: tuple[int, ...], device: torch.device) -> None:
    """A one-line error, before any data is read, when a step of `batch_size` images cannot fit in memory."""
    _check_memory(batch_size * STEP_BYTES_PER_IMAGE * sum(widths) / SPEC_WIDTH_SUM, device,
                  f"a training step of {batch_size:,} images", "--batch-size (the spec: 512)")


def check_test_memory(batch_size: int, widths: tuple[int, ...], device: torch.device,
                      flag: str = "--data.test_batch_size") -> None:
    """A one-line error, before any data is read, when a test batch of `batch_size` images cannot fit in memory."""
    _check_memory(batch_size * TEST_BYTES_PER_IMAGE * sum(widths) / SPEC_WIDTH_SUM, device,
                  f"a test batch of {batch_size:,} images", f"{flag} (default 1000)")


def _check_memory(need: float, device: torch.device, what: str, smaller: str) -> None:
    free = available_memory(device)
    if free is not None and need > free:
        raise FastCifarError(f"{what} needs about {need / 1e9:.0f} GB, and {device.type} has {free / 1e9:.0f} GB "
                             f"free: use a smaller {smaller}")
