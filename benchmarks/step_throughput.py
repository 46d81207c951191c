"""Training-step throughput of the model for several variants, side by side in one process.

    python benchmarks/step_throughput.py [--variants fp32-cl,fp32-cl-compile,...] [--batch-size 512] [--steps 4]

A variant name is a precision (fp32 | bf16) followed by flags: `cl` (channels_last), `compile`
(torch.compile). Each variant gets a fresh model and SGD, runs `--warmup` untimed steps (compile happens
there), then `--steps` timed steps on a fixed random batch: forward + cross-entropy + backward + SGD step,
no data loading. Prints images/s per variant. (A first step towards benchmarks/ of issue 4.)
"""

from __future__ import annotations

import argparse
import time

import torch

from fastcifar.custom_resnet import CustomResNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, batch_size: int, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(warm-up seconds, timed images/s) of one variant."""
    precision, *flags = variant.split("-")
    channels_last, compiled = "cl" in flags, "compile" in flags
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = CustomResNet().to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return warm, steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="fp32,fp32-cl,fp32-cl-compile")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    for variant in args.variants.split(","):
        warm, rate = measure(variant, args.batch_size, args.warmup, args.steps, device)
        print(f"{variant:<18} warm-up {warm:6.1f} s   {rate:8.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
