import pytest
import torch

from benchmarks.step_throughput import measure


@pytest.mark.parametrize("variant", ["fp32", "fp32-cl"])
def test_step_throughput_measures_a_positive_rate(variant):
    warm, rate = measure(variant, batch_size=2, warmup=1, steps=1, device=torch.device("cpu"))
    assert warm > 0 and rate > 0
