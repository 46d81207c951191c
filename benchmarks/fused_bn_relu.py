"""An experiment for issue 20: BatchNorm + ReLU in training mode as one hand-written CPU kernel, two passes over
memory forward and two backward. Used by `python -m benchmarks.bn_relu --ways eager,fused` and by the step
benchmark's `fusedbn` flag (`--step-variants bf16-cl,bf16-cl-fusedbn`); training does not use it (BENCHMARKS.md: on
the AVX512-BF16 EPYC it won at 64 channels and lost at 256 and 512, ~1.0-1.1x over the network's blocks, and the
whole step did not measurably change; the AMX Xeon, where these ops were ~20% of the step, is the machine to
measure it on).

Eager PyTorch runs a BatchNorm followed by a ReLU as separate kernels: forward, the batch statistics (one read of
the activation), the normalisation (a read and a write) and the ReLU (another read and write); backward, the
ReLU's mask (two reads and a write) and BatchNorm's gradient (its sums, then the input gradient). torch.compile
fuses them, but its CPU code for the statistics was 5x slower than eager's kernels. The kernel
(benchmarks/csrc/bn_relu.cpp) does: forward, the statistics, then normalise + ReLU; backward, the masked sums,
then the input gradient, with the ReLU's mask recomputed from the input. Only the input is saved for backward.

It is compiled on first use by PyTorch's C++ extension loader (a C++ compiler and ninja; ~20 s, cached under
TORCH_EXTENSIONS_DIR). The module swap keeps BatchNorm2d's parameters, buffers and state dict.
`tests/test_fused_bn_relu.py` compares outputs, gradients and running statistics with BatchNorm2d + ReLU.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.errors import FastCifarError

SOURCE = Path(__file__).parent / "csrc" / "bn_relu.cpp"

# Vector instructions the kernel is compiled for, by PyTorch's name for the CPU's level, plus the bf16 conversion
# instruction where the CPU has it (the extension's name carries both, so that machines sharing a cache directory
# do not load each other's build).
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2"],
              "AVX2": ["-mavx2", "-mfma"]}


def build_flags() -> tuple[str, list[str]]:
    """(the extension's name, the compiler flags) for this CPU."""
    isa = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", *_ISA_FLAGS.get(isa, [])]
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    if isa == "AVX512" and capabilities.get("avx512_bf16", False):
        flags.append("-mavx512bf16")
        isa += "_bf16"
    return f"fastcifar_bn_relu_{isa.lower()}", flags


def missing_tools() -> list[str]:
    """The build tools the kernel needs that are not on PATH: empty where it can be built."""
    from torch.utils import cpp_extension  # heavy; only needed when the fused op is used

    return [tool for tool in ("ninja", cpp_extension.get_cxx_compiler()) if shutil.which(tool) is None]


@functools.cache
def load_extension() -> object:
    """The compiled kernel module (built once per machine kind and cached); raises FastCifarError when it cannot
    be built here, with the reason."""
    from torch.utils import cpp_extension

    missing = missing_tools()
    if missing:
        raise FastCifarError(f"cannot build the fused BatchNorm + ReLU kernel: {' and '.join(missing)} not found; "
                             f"install a C++ compiler and ninja")
    name, flags = build_flags()
    try:
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, verbose=False)
    except (RuntimeError, OSError, ImportError) as error:  # a failed compile or link, headers missing
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise FastCifarError(f"cannot build the fused BatchNorm + ReLU kernel ({reason}); install a C++ compiler "
                             f"and ninja") from error


class _BNReLUFunction(torch.autograd.Function):
    """relu(batch_norm(x, training=True)) on a channels_last CPU tensor (fp32 or bf16; weight and bias fp32)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        out, mean, invstd, unbiased_var = load_extension().forward(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, invstd, weight, bias)
        ctx.mark_non_differentiable(mean, unbiased_var)
        return out, mean, unbiased_var

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, *_: torch.Tensor) -> tuple:
        x, mean, invstd, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = load_extension().backward(grad_out, x, mean, invstd, weight, bias)
        return (grad_x, grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None)


def bn_relu_train(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(bn(x)) for a BatchNorm2d in training mode, fused, updating its running statistics as BatchNorm2d
    does (momentum; the unbiased variance)."""
    out, mean, unbiased_var = _BNReLUFunction.apply(x, bn.weight, bn.bias, bn.eps)
    with torch.no_grad():
        bn.running_mean.lerp_(mean, bn.momentum)
        bn.running_var.lerp_(unbiased_var, bn.momentum)
        bn.num_batches_tracked.add_(1)
    return out


class FusedBatchNormReLU2d(nn.BatchNorm2d):
    """A BatchNorm2d whose output has the ReLU applied (the ReLU module after it becomes nn.Identity). Training
    calls on eligible CPU tensors take the fused kernel; every other call is BatchNorm2d's own, then a ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16):
            return bn_relu_train(x, self)
        return F.relu(super().forward(x))


def _eligible(bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.momentum is not None
            and bn.weight.dtype == torch.float32)


def fuse_bn_relu(model: nn.Module) -> int:
    """In every nn.Sequential of `model`, each plain BatchNorm2d directly followed by a ReLU becomes
    FusedBatchNormReLU2d and the ReLU nn.Identity (in place; same parameters and state dict). Returns how many."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for name, following in zip(names, names[1:], strict=False):
            bn, relu = seq._modules[name], seq._modules[following]
            if _eligible(bn) and type(relu) is nn.ReLU:
                bn.__class__ = FusedBatchNormReLU2d
                seq._modules[following] = nn.Identity()
                fused += 1
    return fused
