"""`auto` by measurement (fastcifar/calibrate.py): the candidates, the choice under stubbed timings, explicit values,
the cache and its key, and one real calibration of tiny shapes end to end."""

import json

import pytest
import torch

from fastcifar import calibrate, rundir, session
from fastcifar.calibrate import Way, cache_key, cache_path, candidates, choose, measure, recorded
from fastcifar.config import Config, ModelConfig, RunConfig
from fastcifar.training import train
from tests.conftest import tiny_config

CPU = torch.device("cpu")
TINY_MODEL = ModelConfig(widths=(4, 8, 8, 16))
MACHINE = {"cpu": "Some Xeon", "flags": "abc", "cores": 2, "threads": 2, "onednn": "3.12.0"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_config(**fields) -> RunConfig:
    return Config().override({f"run.{k}": v for k, v in fields.items()}).run


class StubTimer:
    """Seconds per step from images/s per way label (bf16 61 and fp32 90: the Xeon whose AMX is hidden); records
    every call."""

    def __init__(self, rates: dict[str, float]) -> None:
        self.rates, self.calls = rates, []

    def __call__(self, way: Way, batch: int, steps: int, limit: float = float("inf")) -> float:
        self.calls.append((way.label, batch))
        return batch / self.rates[way.label]


XEON_NO_AMX = {"bf16-cl": 61.0, "bf16": 40.0, "bf16-cl-im2col": 58.0, "bf16-im2col": 39.0,
               "fp32-cl": 90.0, "fp32": 70.0, "fp32-cl-im2col": 85.0, "fp32-im2col": 66.0}


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU that lists bf16 kernels (so bf16 is a candidate) and no AMX."""
    monkeypatch.setattr(calibrate, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(calibrate, "cpu_has_amx", lambda: False)


def test_auto_covers_precision_layout_and_conv_grad_and_explicit_values_narrow_it(bf16_cpu):
    ways = candidates(run_config(), CPU)
    assert {w.precision for w in ways} == {"bf16", "fp32"} and {w.channels_last for w in ways} == {True, False}
    assert {w.conv_grad for w in ways} == {"onednn", "im2col"} and len(ways) == 8
    assert ways[0] == Way("bf16", True, "onednn")  # the old rule's choice is preferred on a tie
    assert candidates(run_config(precision="fp32", channels_last="on", conv_grad="onednn"), CPU) == [
        Way("fp32", True, "onednn")]
    assert {w.precision for w in candidates(run_config(precision="bf16"), CPU)} == {"bf16"}


def test_without_bf16_kernels_bf16_is_no_candidate(monkeypatch):
    monkeypatch.setattr(calibrate, "cpu_has_fast_bf16", lambda: False)
    assert {w.precision for w in candidates(run_config(), CPU)} == {"fp32"}


def test_where_bf16_is_slower_auto_trains_in_fp32_and_says_why(bf16_cpu):
    lines = []
    choice = choose(run_config(), TINY_MODEL, CPU, 512, log=lines.append, timer=StubTimer(XEON_NO_AMX), facts=MACHINE)
    assert (choice.precision, choice.channels_last, choice.conv_grad) == ("fp32", True, "onednn")
    assert choice.source == "measured" and choice.reason.startswith("fp32-cl 90 img/s > ")
    assert "bf16-cl 61 img/s" in choice.reason and choice.reason.endswith("fp32-cl (measured now)")
    assert choice.rates["fp32-cl"] == 90.0 and any("calibrating" in line for line in lines)


def test_explicit_values_are_never_overridden(bf16_cpu):
    timer = StubTimer(XEON_NO_AMX)
    choice = choose(run_config(precision="bf16", channels_last="on", conv_grad="onednn"), TINY_MODEL, CPU, 512,
                    timer=timer, facts=MACHINE)
    assert (choice.precision, choice.source, choice.reason) == ("bf16", "given", "as set") and timer.calls == []
    # one setting given, the others measured: the given one holds even though its other value would be faster
    choice = choose(run_config(precision="bf16"), TINY_MODEL, CPU, 512, timer=timer, facts=MACHINE)
    assert choice.precision == "bf16" and choice.way == Way("bf16", True, "onednn")


def test_a_clearly_slower_way_is_dropped_at_the_small_batch():
    timer = StubTimer({"bf16-cl": 200.0, "fp32-cl": 60.0, "fp32-cl-im2col": 180.0})
    ways = [Way("bf16", True, "onednn"), Way("fp32", True, "onednn"), Way("fp32", True, "im2col")]
    chosen, rates = measure(ways, 512, timer)
    assert chosen == ways[0]
    assert ("fp32-cl", 64) in timer.calls and ("fp32-cl", 512) not in timer.calls  # 3.3x behind: dropped
    assert rates["fp32-cl@64"] == 60.0 and set(rates) == {"bf16-cl", "fp32-cl-im2col", "bf16-cl@64", "fp32-cl@64",
                                                          "fp32-cl-im2col@64"}
    assert [label for label, batch in timer.calls if batch == 512] == ["bf16-cl", "fp32-cl-im2col"]  # fastest first


def test_at_the_batch_in_use_a_way_that_cannot_win_gets_one_timed_step():
    steps_taken = {}

    def timer(way, batch, steps, limit=float("inf")):
        seconds = batch / {"bf16-cl": 100.0, "bf16-cl-im2col": 80.0, "bf16": 98.0}[way.label]
        if batch == 512:  # one timed step, and a second only while it is not clearly behind
            steps_taken[way.label] = 1 if seconds > limit else steps
        return seconds

    ways = [Way("bf16", True, "onednn"), Way("bf16", True, "im2col"), Way("bf16", False, "onednn")]
    chosen, _ = measure(ways, 512, timer)
    assert chosen == ways[0] and steps_taken == {"bf16-cl": 2, "bf16": 2, "bf16-cl-im2col": 1}


@pytest.mark.parametrize(("second", "expected"), [(101.0, 0), (110.0, 1)])
def test_within_the_tie_margin_the_preferred_way_wins(second, expected):
    ways = [Way("bf16", True, "onednn"), Way("bf16", True, "im2col")]
    chosen, _ = measure(ways, 512, StubTimer({"bf16-cl": 100.0, "bf16-cl-im2col": second}))
    assert chosen == ways[expected]


def test_the_second_run_reads_the_cache_and_recalibrate_measures_again(bf16_cpu, cache_dir):
    first = choose(run_config(), TINY_MODEL, CPU, 512, timer=StubTimer(XEON_NO_AMX), facts=MACHINE)
    assert first.source == "measured" and cache_path() == cache_dir / "calibration.json"
    untouched = StubTimer({})  # any call would fail: the cached answer needs no step
    second = choose(run_config(), TINY_MODEL, CPU, 512, timer=untouched, facts=MACHINE)
    assert (second.way, second.source, untouched.calls) == (first.way, "cache", [])
    assert second.reason.endswith("(cached: measured earlier on this machine)") and second.rates == first.rates
    faster_bf16 = {k: v * (3 if k.startswith("bf16") else 1) for k, v in XEON_NO_AMX.items()}
    again = choose(run_config(recalibrate=True), TINY_MODEL, CPU, 512, timer=StubTimer(faster_bf16), facts=MACHINE)
    assert again.source == "measured" and again.precision == "bf16"


@pytest.mark.parametrize("change", [{"cpu": "AMD EPYC"}, {"flags": "abd"}, {"cores": 4}, {"threads": 1},
                                    {"onednn": "3.13.0"}])
def test_the_cache_key_changes_with_the_machine_and_a_new_machine_measures(bf16_cpu, change):
    ways = candidates(run_config(), CPU)
    assert cache_key(CPU, 512, TINY_MODEL, ways, MACHINE) != cache_key(CPU, 512, TINY_MODEL, ways, MACHINE | change)
    choose(run_config(), TINY_MODEL, CPU, 512, timer=StubTimer(XEON_NO_AMX), facts=MACHINE)
    timer = StubTimer(XEON_NO_AMX)
    assert choose(run_config(), TINY_MODEL, CPU, 512, timer=timer, facts=MACHINE | change).source == "measured"
    assert timer.calls


def test_the_key_also_holds_the_software_batch_and_widths():
    ways = [Way("fp32", True, "onednn")]
    key = cache_key(CPU, 512, TINY_MODEL, ways, MACHINE)
    assert key["torch"] == torch.__version__ and key["batch"] == 512 and key["widths"] == [4, 8, 8, 16]
    assert key != cache_key(CPU, 256, TINY_MODEL, ways, MACHINE)
    assert key != cache_key(CPU, 512, ModelConfig(), ways, MACHINE)
    assert cache_key(CPU, 512, TINY_MODEL, ways)["cpu"]  # this machine's own facts


@pytest.mark.parametrize("content", [b"", b"\x00\xff", b"[1, 2]", b'{"version": 99, "entries": {}}',
                                     b'{"version": 1, "entries": {"x": 5}}'])
def test_a_broken_cache_is_measured_over_and_rewritten(bf16_cpu, cache_dir, content):
    cache_dir.mkdir(parents=True)
    (cache_dir / "calibration.json").write_bytes(content)
    choice = choose(run_config(), TINY_MODEL, CPU, 512, timer=StubTimer(XEON_NO_AMX), facts=MACHINE)
    assert choice.source == "measured"
    assert json.loads((cache_dir / "calibration.json").read_text())["version"] == calibrate.CACHE_VERSION


def test_a_real_calibration_of_tiny_shapes_runs_caches_and_is_reused(cache_dir):
    run = run_config(precision="fp32")  # layout and conv gradient measured: 4 ways
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = choose(run, TINY_MODEL, CPU, 16, log=lambda _: None)
    assert torch.equal(torch.rand(3), expected)  # the global generator is as it was: same initial weights
    assert first.source == "measured" and first.precision == "fp32" and all(r > 0 for r in first.rates.values())
    entry = next(iter(json.loads((cache_dir / "calibration.json").read_text())["entries"].values()))
    assert entry["chosen"] == first.way.label and entry["key"]["widths"] == [4, 8, 8, 16]
    second = choose(run, TINY_MODEL, CPU, 16, log=lambda _: None)
    assert second.source == "cache" and second.way == first.way


def test_a_resumed_run_keeps_the_choice_it_started_with(bf16_cpu):
    env = {"auto": {"precision": "fp32", "channels_last": False, "conv_grad": "im2col"}}
    choice = recorded(env, run_config(), CPU)
    assert choice.way == Way("fp32", False, "im2col") and choice.source == "run"
    assert recorded({}, run_config(), CPU) is None  # runs from before the record: measured (or cached) instead
    assert recorded(env, run_config(precision="bf16"), CPU) is None  # the settings no longer allow it


@pytest.mark.parametrize(("value", "expected"), [(True, "on"), (False, "off"), ("true", "on"), ("0", "off"),
                                                 ("auto", "auto")])
def test_channels_last_of_earlier_configs_still_reads(value, expected):
    assert Config.from_dict({"run": {"channels_last": value}}).run.channels_last == expected


@pytest.mark.parametrize(("amx", "precision", "first"), [(True, "bf16", "im2col"), (False, "bf16", "onednn"),
                                                         (True, "fp32", "onednn")])
def test_the_preferred_conv_gradient_is_the_one_measured_faster_where_it_was_tuned(monkeypatch, amx, precision,
                                                                                   first):
    """im2col won on the AMX Xeon in bf16 (fastcifar/conv.py); on the AVX512-BF16 EPYC and in fp32 oneDNN's did: the
    order that breaks a tie. GPUs keep cuDNN's."""
    monkeypatch.setattr(calibrate, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(calibrate, "cpu_has_fast_bf16", lambda: True)
    ways = candidates(run_config(precision=precision, channels_last="on"), CPU)
    assert [w.conv_grad for w in ways] == [first, {"im2col": "onednn", "onednn": "im2col"}[first]]


def test_the_command_prints_the_choice_and_saves_it(tmp_path, capsys):
    code = calibrate.main(["--model.widths", "4,8,8,16", "--batch-size", "8", "--precision", "fp32",
                           "--save", str(tmp_path / "choice.json")])
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines()[0].startswith("calibrating the auto settings: 4 ways")
    assert out.splitlines()[-2].startswith("auto settings: fp32") and "img/s" in out
    saved = json.loads((tmp_path / "choice.json").read_text())
    assert saved["choice"]["precision"] == "fp32" and saved["key"]["batch"] == 8
    assert saved["machine"]["cpu_kind"] == rundir.cpu_kind()  # what names its machine kind in BENCHMARKS.md
    with pytest.raises(SystemExit) as refused:  # an option the command does not read: one line, exit 2
        calibrate.main(["--precision", "fp32", "--optim.momentum", "0.5"])
    assert refused.value.code == 2 and "--optim.momentum" in capsys.readouterr().err


def test_a_training_run_records_what_auto_chose_and_why(synthetic, tmp_path):
    lines = []
    auto = {"run.channels_last": "auto", "run.conv_grad": "auto"}  # precision fp32 (TINY's), the rest measured
    result = train(tiny_config(synthetic, tmp_path, **auto), log=lines.append)
    env = json.loads((result.run_dir / "env.json").read_text())
    assert env["auto"]["source"] == "measured" and env["auto"]["precision"] == "fp32"
    assert env["auto"]["rates"] and any(line.startswith("auto settings: ") for line in lines)
    lines.clear()  # a second run reads the cache: one short line, the rates stay in env.json
    again = train(tiny_config(synthetic, tmp_path, **auto, **{"run.name": "again"}), log=lines.append)
    chose = json.loads((again.run_dir / "env.json").read_text())["auto"]
    label = Way(chose["precision"], chose["channels_last"], chose["conv_grad"]).label
    assert chose["source"] == "cache" and [line for line in lines if line.startswith("auto settings: ")] == [
        f"auto settings: {label} (cached: measured earlier on this machine; python -m fastcifar calibrate shows the "
        f"rates)"]


def test_a_resumed_session_reads_its_runs_record_not_the_cache(bf16_cpu, synthetic, tmp_path):
    cfg = tiny_config(synthetic, tmp_path, **{"run.precision": "auto", "run.channels_last": "auto",
                                              "run.conv_grad": "auto"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "env.json").write_text(json.dumps(
        {"auto": {"precision": "bf16", "channels_last": False, "conv_grad": "im2col"}}))
    lines = []
    choice = session._choose(cfg, CPU, 64, resume=True, log=lines.append)
    assert choice.way == Way("bf16", False, "im2col") and lines == [
        "auto settings: bf16-im2col, as the run chose when it started"]
