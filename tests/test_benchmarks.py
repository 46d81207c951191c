"""The benchmark runner on tiny settings: every section runs, records JSON and rewrites only its part of the
markdown file. (Numbers are measured in BENCHMARKS.md, never asserted here.)"""

import json

import numpy as np
import pytest
import torch

from benchmarks import physics, step_throughput, test_pass
from benchmarks import run as bench
from benchmarks.data_paths import AugmentedCifar
from benchmarks.step_throughput import default_overrides, default_variant, measure, parse_variant
from fastcifar import calibrate
from fastcifar.augment import CIFAR10_MEAN, CIFAR10_STD
from fastcifar.config import DEFAULT_PRESET, Config, ConfigError
from fastcifar.errors import FastCifarError
from fastcifar.runtime import cpu_has_fast_bf16


def test_the_cpu_matmul_peak_is_the_fastest_call(monkeypatch):
    # a fake clock: calls of 3, 1 and 2 s, then the time is up; the peak is the 1 s call's rate
    ticks = iter([0.0, 0.0, 3.0, 3.0, 4.0, 4.0, 6.0, 100.0])
    monkeypatch.setattr(physics.time, "perf_counter", lambda: next(ticks))
    assert physics.matmul_peak(torch.float32, torch.device("cpu"), n=8, seconds=5.0) == 2 * 8**3 / 1.0


@pytest.mark.parametrize(("side", "share"), [(1, 8 / 9), (2, 1 - 16 / 36), (4, 1 - 100 / 144), (32, 1 - 94**2 / 9216)])
def test_the_padding_share_counts_the_taps_that_fall_outside_the_image(side, share):
    assert physics.padding_share(side) == pytest.approx(share)
    # the same by brute force: each output position's 3x3 window, taps over the image counted
    inside = sum(0 <= i + di < side and 0 <= j + dj < side
                 for i in range(side) for j in range(side) for di in (-1, 0, 1) for dj in (-1, 0, 1))
    assert physics.padding_share(side) == pytest.approx(1 - inside / (9 * side * side))


def test_the_gemm_rates_time_each_shape_as_a_matmul_and_a_1x1_convolution(capsys):
    rows = physics.gemm_rates(torch.float32, ((8, 4, 6), (5, 3, 2)), calls=1)
    assert [(r["m"], r["k"], r["n"]) for r in rows] == [(8, 4, 6), (5, 3, 2)]
    assert all(r["matmul"] > 0 and r["conv1x1"] > 0 for r in rows)
    physics.main(["--dtype", "fp32", "--shapes", "8x4x6", "--calls", "1"])
    assert "8 x     4 x     6   matmul" in capsys.readouterr().out


def test_the_1x1_convolution_computes_the_same_product():
    a, b = torch.randn(5, 3), torch.randn(3, 2)
    x = a.t().reshape(1, 3, 5, 1).contiguous(memory_format=torch.channels_last)
    w = b.t().reshape(2, 3, 1, 1).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, w).reshape(2, 5).t(), a @ b)


@pytest.mark.parametrize("shapes", ["8x4", "8x0x2", "axbxc"])
def test_bad_gemm_shapes_are_refused(shapes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        physics.main(["--shapes", shapes])
    assert exit_info.value.code == 2 and "expected MxKxN" in capsys.readouterr().err


def test_the_step_flops_split_into_convolutions_and_their_padding():
    flops = physics.training_step_flops(batch_size=512)
    linear = 3 * 2 * 512 * 512 * 10  # the head: forward, input gradient, filter gradient
    assert flops["conv_train_step"] + linear == pytest.approx(flops["train_step"])  # the counter agrees
    shares = {32: physics.padding_share(32), 16: physics.padding_share(16), 8: physics.padding_share(8),
              4: physics.padding_share(4)}
    # per pass: prep and layer1's conv at 32x32, layer1's two and layer2's at 16x16, layer3's at 8x8, its two at 4x4
    g = 2 * 512 * 9 * 32 * 32  # FLOPs per (input, output) channel pair per pass at 32x32
    expected = (2 * 3 * 64 * g * shares[32] + 3 * 64 * 128 * g * shares[32] + 3 * 2 * 128 * 128 * g / 4 * shares[16]
                + 3 * 128 * 256 * g / 4 * shares[16] + 3 * 256 * 512 * g / 16 * shares[8]
                + 3 * 2 * 512 * 512 * g / 64 * shares[4])
    assert flops["train_step_padding"] == pytest.approx(expected)
    assert 0.13 < flops["train_step_padding"] / flops["train_step"] < 0.14


@pytest.mark.parametrize("variant", ["fp32", "fp32-cl", "fp32-cl-im2col", "default"])
def test_step_throughput_measures_a_positive_rate(variant):
    r = measure(variant, batch_size=2, warmup=1, steps=1, device=torch.device("cpu"), widths=(4, 8, 8, 16))
    assert r.warmup_s > 0 and r.images_per_s > 0 and r.step_s > 0
    # the default names what training would take at these shapes on this CPU (calibrated once, then cached)
    resolved = default_variant(torch.device("cpu"), batch_size=2, widths=(4, 8, 8, 16))
    assert r.variant == (f"default ({resolved})" if variant == "default" else variant)


def test_a_default_variant_with_config_options_runs_the_changed_step():
    r = measure("default@model.ghost_batch=2", batch_size=4, warmup=1, steps=1, device=torch.device("cpu"),
                widths=(4, 8, 8, 16))
    resolved = default_variant(torch.device("cpu"), batch_size=4, widths=(4, 8, 8, 16))
    assert r.images_per_s > 0 and r.variant == f"default@model.ghost_batch=2 ({resolved})"
    assert default_overrides("default@model.ghost_batch=32@optim.ema_decay=0.9") == {
        "model.ghost_batch": "32", "optim.ema_decay": "0.9"}
    assert default_overrides("default") == {} and default_overrides("bf16-cl") is None


@pytest.mark.parametrize(("text", "error", "fragment"), [
    ("default@model.ghost", ValueError, "cannot read step variant"),
    ("default@model.colour=1", ConfigError, "unknown option 'model.colour'"),
    ("default@model.ghost_batch=-1", ConfigError, "model.ghost_batch must be in \\[0, 50000\\]")])
def test_bad_default_options_are_refused(text, error, fragment):
    with pytest.raises(error, match=fragment):
        default_overrides(text)
    with pytest.raises(FastCifarError, match=fragment):
        bench._variants(text, torch.device("cpu"))


def test_the_profile_of_the_default_step_splits_its_time_into_shares():
    shares = step_throughput.op_shares(batch_size=2, device=torch.device("cpu"), widths=(4, 8, 8, 16), steps=1, top=3)
    ops = [r["op"] for r in shares]
    assert ops[-1] == "other" and len(ops) == len(set(ops))
    # listed even where they are not among the 3 largest ops (every step has one: the uint8 batch's conversion)
    assert "aten::copy_" in ops
    assert 4 <= len(shares) <= 3 + len(step_throughput.COPY_OPS) + 1
    assert sum(r["share"] for r in shares) == pytest.approx(1.0) and all(r["ms_per_step"] >= 0 for r in shares)


@pytest.mark.parametrize(("text", "parsed"), [
    ("fp32", ("fp32", False, False, None, False)), ("bf16-cl", ("bf16", True, False, None, False)),
    ("bf16-cl-im2col", ("bf16", True, False, None, True)),
    ("fp32-cl-compile", ("fp32", True, True, None, False)),
    ("fp32-cl-compile:max-autotune", ("fp32", True, True, "max-autotune", False))])
def test_variant_names_parse(text, parsed):
    assert parse_variant(text) == parsed


@pytest.mark.parametrize("text", ["fp64", "fp32-xl", "fp32:max-autotune", "bf16-cl-fusedbn"])
def test_bad_variant_names_are_refused(text):
    with pytest.raises(ValueError, match="cannot read step variant"):
        parse_variant(text)


@pytest.mark.parametrize(("fastest", "expected"), [("fp32-cl", "fp32-cl"), ("bf16-cl", "bf16-cl")])
def test_the_default_variant_is_what_the_calibration_chooses(monkeypatch, tmp_path, fastest, expected):
    monkeypatch.setattr(calibrate, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setenv("FASTCIFAR_CACHE_DIR", str(tmp_path))  # a stubbed answer must not reach the suite's cache

    def timer(way, batch, steps, limit=float("inf")):  # the named way runs at 100 images/s, the others at 50
        return batch / (100.0 if way.label == fastest else 50.0)

    assert default_variant(torch.device("cpu"), timer=timer) == expected


def test_a_default_variant_is_named_for_what_its_options_resolve_to():
    cpu = torch.device("cpu")
    given = {"run.conv_grad": "im2col", "run.precision": "fp32", "run.channels_last": "on"}
    run = Config.from_preset(DEFAULT_PRESET, given).run
    assert default_variant(cpu, run) == "fp32-cl-im2col"
    run = Config.from_preset(DEFAULT_PRESET, given | {"run.compile": "on", "run.compile_mode": "max-autotune"}).run
    assert default_variant(cpu, run).endswith("-compile:max-autotune")
    r = measure("default@run.conv_grad=im2col@run.precision=fp32@run.channels_last=on", batch_size=2, warmup=1,
                steps=1, device=cpu, widths=(4, 8, 8, 16))
    assert r.variant == "default@run.conv_grad=im2col@run.precision=fp32@run.channels_last=on (fp32-cl-im2col)"


@pytest.mark.parametrize(("fast_bf16", "compiled"), [(True, "bf16-cl"), (False, "fp32-cl")])
def test_compile_variants_on_a_cpu_run_in_the_precision_that_trains_there(monkeypatch, fast_bf16, compiled):
    trained = torch.bfloat16 if fast_bf16 else torch.float32  # what the calibration measured fastest
    monkeypatch.setattr(bench, "training_precision", lambda device: trained)
    variants = bench.default_variants(torch.device("cpu"))
    assert [v for v in variants if "compile" in v] == [f"{compiled}-compile", f"{compiled}-compile:max-autotune"]
    assert variants[:4] == ["fp32", "fp32-cl", "bf16-cl", f"{compiled}-im2col"] and variants[-1] == "default"


def test_per_sample_baseline_normalises_and_augments():
    images = np.full((4, 32, 32, 3), 200, np.uint8)
    plain = AugmentedCifar(images, np.arange(4), train=False)[0][0]
    expected = (200 / 255 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(plain[:, 5, 5], expected)
    x, label = AugmentedCifar(images, np.arange(4), train=True)[2]
    assert x.shape == (3, 32, 32) and label == 2
    assert (x == 0).all(dim=0).sum() >= 16  # the cutout (and any padding) is 0 after normalisation


def test_markdown_block_is_replaced_and_the_rest_kept(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(f"# Title\n\nintro\n\n{bench.BEGIN}\nold table\n{bench.END}\n\n## Notes\nkept\n")
    bench.update_markdown(path, "new table")
    text = path.read_text()
    assert "new table" in text and "old table" not in text and text.startswith("# Title") and "kept" in text
    bench.update_markdown(tmp_path / "fresh.md", "t")
    assert bench.BEGIN in (tmp_path / "fresh.md").read_text()


@pytest.mark.slow
def test_runner_runs_every_section_and_records_them(synthetic, tmp_path, capsys):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\n{bench.BEGIN}\n{bench.END}\n\nhand-written notes\n")
    code = bench.main(["--data-dir", str(synthetic["data_dir"]), "--batch-size", "64", "--widths", "4,8,8,16",
                       "--steps", "1", "--step-warmup", "1", "--e2e-steps", "2", "--workers", "1",
                       "--step-variants", "fp32,fp32-cl,bf16-cl,default", "--out-dir", str(tmp_path),
                       "--markdown", str(markdown)])
    assert code == 0, capsys.readouterr().err
    (record_path,) = tmp_path.glob("benchmarks-cpu-*.json")
    record = json.loads(record_path.read_text())
    assert [r["path"] for r in record["data"]] == ["torch", "ffcv", "ours", "resident"]
    assert all(r["images_per_s"] > 0 for r in record["data"] + record["step"])
    if not cpu_has_fast_bf16():
        assert [r["timed_steps"] for r in record["step"]][2] == 1  # slow bf16 on this CPU: one step only
    assert len(record["e2e"]) == 3 and all(0 < r["overhead"] < 1 for r in record["e2e"])  # usual, ffcv, resident
    assert [r["name"].endswith(f"{kind} loader)") for r, kind in zip(record["e2e"][1:], ("ffcv", "resident"),
                                                                      strict=True)] == [True, True]
    assert all("2 test views" in r["name"] for r in record["e2e"][1:])  # a flip-TTA test pass, as `fast` tests
    physics_record = record["physics"]
    assert physics_record["flops"]["train_step"] > 2 * physics_record["flops"]["forward"]
    # the share of the peak is given twice: over the counted FLOPs, and over those that are not zero padding
    assert physics_record["default_useful_fraction_of_peak"] == pytest.approx(
        physics_record["default_fraction_of_peak"] * (1 - physics_record["flops"]["train_step_padding"]
                                                       / physics_record["flops"]["train_step"]))
    shares = record["physics"]["default_op_shares"]
    assert sum(r["share"] for r in shares) == pytest.approx(1.0) and any("conv" in r["op"] for r in shares)
    assert {"data_ours_vs_torch", "data_ours_vs_ffcv", "step_default_vs_fp32_nchw", "epoch_ours_vs_usual"} <= \
        record["ratios"].keys()
    assert record["machine"]["torch"] == torch.__version__ and "git_commit" in record["machine"]
    text = markdown.read_text()
    assert "| c. fastcifar" in text and "**Physics**" in text and "| op | share |" in text
    assert "products over real pixels" in text
    assert record["settings"]["e2e_steps"] == 2 and "(2 timed training steps" in text
    assert text.endswith("hand-written notes\n")


@pytest.mark.parametrize("steps, says", [(20, "(20 timed training steps"), (0, "(one whole training epoch")])
def test_markdown_names_the_end_to_end_steps_that_ran(steps, says):
    machine = {"started": "t", "device_name": "cpu", "device": "cpu", "torch_threads": 2, "torch": "x", "ffcv": "y",
               "git_commit": None}
    row = {"name": "way", "train_s": 1.0, "data_s": 0.0, "augment_s": 0.0, "test_s": 1.0, "epoch_s": 2.0,
           "overhead": 0.5}
    text = bench.markdown({"machine": machine, "settings": {"batch_size": 512, "repeats": 1, "e2e_steps": steps},
                           "command": "c", "e2e": [row]})
    assert says in text and "None" not in text


def test_unknown_section_is_a_one_line_error(tmp_path, capsys):
    assert bench.main(["--sections", "data,nope", "--out-dir", str(tmp_path), "--markdown", ""]) == 2
    assert "--sections: unknown section(s) nope" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--widths", "1,2"], "--widths must be 4 integers in [1, 4096]"),  # was a ValueError from unpacking
    (["--widths", "a,b,c,d"], "--widths: cannot read 'a,b,c,d'"),
    (["--batch-size", "99999999"], "--batch-size must be in [1, "),
    (["--steps", "0"], "--steps must be in [1, 10000], got 0"),
    (["--steps", "1000000000000"], "--steps must be in [1, 10000]"),  # would never end
    (["--step-warmup", "-1"], "--step-warmup must be in [0, 1000]"),
    (["--workers", "1000"], "--workers must be in [1, 64]"),
])
def test_the_network_and_batch_flags_follow_the_configs_rules(tmp_path, capsys, args, fragment):
    assert bench.main(["--sections", "step", "--out-dir", str(tmp_path), "--markdown", "", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and not list(tmp_path.iterdir())


def test_folding_batch_norm_into_its_convs_keeps_the_outputs():
    model = test_pass.random_model(widths=(4, 8, 8, 16))  # positive BN scales: every BN folds
    folded, pairs = test_pass.fold_batch_norm(model)
    assert pairs == 8  # prep, the four residual convs, and the three pooled layers (their scales are positive)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0
    x = torch.randn(6, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert test_pass.images_per_s(folded, x, torch.inference_mode, repeats=1) > 0


def test_a_pooled_layer_with_a_negative_bn_scale_is_not_folded():
    model = test_pass.random_model(widths=(4, 8, 8, 16))
    with torch.no_grad():
        model.layer2[2].weight[0] = -1.0  # layer2: conv -> max-pool -> BN -> ReLU; max(-x) is not -max(x)
    folded, pairs = test_pass.fold_batch_norm(model)
    assert pairs == 7 and isinstance(folded.layer2[2], torch.nn.BatchNorm2d)
    x = torch.randn(6, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_the_test_pass_benchmark_runs_in_the_chosen_precision(monkeypatch, capsys):
    original = test_pass.random_model
    monkeypatch.setattr(test_pass, "random_model", lambda: original((4, 8, 8, 16)))  # a tiny network
    test_pass.main(["--batch-size", "4", "--rounds", "1", "--dtype", "bf16"])
    out = capsys.readouterr().out
    assert "bfloat16 | 8 BNs folded" in out and out.count("images/s") == 4


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:1"])
def test_an_unknown_device_is_one_line(tmp_path, device, capsys):
    assert bench.main(["--device", device, "--out-dir", str(tmp_path), "--markdown", ""]) == 2  # a bad option
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device must be " in err, err
