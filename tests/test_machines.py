"""BENCHMARKS.md's per-machine table, generated from records: benchmark runs, calibrations and training runs."""

import json
from pathlib import Path

import pytest

from benchmarks import machines
from fastcifar.config import Config
from fastcifar.errors import FastCifarError
from fastcifar.rundir import append_jsonl, write_json

EPYC = {"cpu": "AMD EPYC", "device_name": "AMD EPYC", "device": "cpu", "cpu_kind": "avx512_bf16, no amx",
        "allocator": "tcmalloc (/usr/lib/libtcmalloc_minimal.so.4)"}
XEON = {"cpu": "Intel(R) Xeon(R) Processor", "device_name": "Intel(R) Xeon(R) Processor", "device": "cpu",
        "cpu_kind": "amx_bf16", "allocator": "tcmalloc"}
FULL = {"sections": "data,step,e2e,physics", "step_variants": "", "batch_size": 512, "widths": "64,128,256,512"}


def bench_record(path, machine, started, rate, settings=FULL):
    record = {"settings": settings, "machine": machine | {"started": started},
              "step": [{"variant": "fp32-cl", "images_per_s": 90.0},
                       {"variant": "default (bf16-cl)", "images_per_s": rate}],
              "e2e": [{"name": "fastcifar default (bfloat16, ffcv loader)", "epoch_s": 512 * 98 / rate + 30}],
              "physics": {"matmul_peak_flops": {"fp32": 2e11, "bf16": 4e11}, "default_fraction_of_peak": 1.1,
                          "default_useful_fraction_of_peak": 0.95},
              "ratios": {"data_ours_vs_torch": 7.0}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def run_dir(path, env, epoch_s, overrides=None):
    cfg = Config().override(overrides or {})
    path.mkdir(parents=True)
    write_json(path / "config.json", cfg.to_dict())
    write_json(path / "env.json", env)
    write_json(path / "results.json", {"final_test_acc": 0.9})
    for epoch, seconds in enumerate(epoch_s, 1):
        append_jsonl(path / "metrics.jsonl", {"epoch": epoch, "epoch_s": seconds})


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    bench_record(root / "epyc-old" / "benchmarks-cpu-1.json", EPYC, "2026-12-01T10:00:00", 150.0)
    bench_record(root / "epyc-new" / "benchmarks-cpu-2.json", EPYC, "2026-12-05T10:00:00", 196.3)
    bench_record(root / "epyc-side" / "benchmarks-cpu-3.json", EPYC, "2026-12-06T10:00:00", 12.0,
                 FULL | {"sections": "step"})  # a side experiment: one section
    bench_record(root / "xeon" / "benchmarks-cpu-4.json", XEON, "2026-12-02T10:00:00", 391.5)
    write_json(root / "calibration-epyc.json", {"choice": {"precision": "bf16", "channels_last": True,
                                                          "conv_grad": "onednn", "rates": {"bf16-cl": 184.0,
                                                                                           "fp32-cl@64": 80.0}},
                                               "machine": EPYC, "date": "2026-12-07T06:00:00"})
    run_dir(root / "once-a", EPYC, [270, 280, 400])  # the last epoch holds the test pass: the median ignores it
    run_dir(root / "once-b", EPYC, [260, 262, 300])
    run_dir(root / "every", EPYC, [340, 350, 360], {"run.test_every": 1})
    run_dir(root / "subset", EPYC, [10, 10, 10], {"data.train_subset": 1000})  # not the full data: left out
    run_dir(root / "lowres", EPYC, [150, 150, 260], {"data.low_res_epochs": 2, "data.low_res_size": 24})
    run_dir(root / "pruned", EPYC, [160, 160, 260], {"data.prune_fraction": 0.5, "data.prune_epochs": 1})
    run_dir(root / "old", {"device_name": "AMD EPYC"}, [500, 500])  # no kind noted: counted as left out
    return root


def cells(text: str) -> dict[str, list[str]]:
    header, _, *rows = [line for line in text.splitlines() if line.startswith("|")]
    kinds = [c.strip() for c in header.strip("|").split("|")][1:]
    table = {}
    for row in rows:
        label, *values = [c.strip() for c in row.strip("|").split("|")]
        table[label] = dict(zip(kinds, values, strict=True))
    return table


def test_one_column_per_kind_each_cell_from_the_latest_full_record(results):
    text = machines.table(machines.collect([results]), root=results)
    table = cells(text)
    assert list(next(iter(table.values()))) == ["AMX Xeon", "AVX512-BF16 EPYC"]
    step = table["training step, images/s at batch 512 (the default way, then fp32-cl and bf16-cl)"]
    assert step["AVX512-BF16 EPYC"] == "196.3 (bf16-cl, the default); fp32-cl 90.0 [2026-12-05]"
    assert step["AMX Xeon"].startswith("391.5 (bf16-cl, the default)")
    auto = table["`auto` picks, measured (`python -m fastcifar calibrate`; the fastest ways, images/s)"]
    assert auto["AVX512-BF16 EPYC"].startswith("**bf16**, channels_last, onednn") and "[2026-12-07]" in auto[
        "AVX512-BF16 EPYC"]
    assert auto["AMX Xeon"] == "not calibrated yet"
    once = table["epoch in real runs, tested once at the end (median of the runs' median epochs, range)"]
    assert once["AVX512-BF16 EPYC"] == "271 s (262-280), 2 runs"  # the subset, low-res and pruned runs are not counted
    assert table["epoch in real runs, tested after every epoch"]["AVX512-BF16 EPYC"] == "350 s, 1 run"
    assert "epyc-new/benchmarks-cpu-2.json" in table["records"]["AVX512-BF16 EPYC"]
    assert "1 record(s) left out" in text


def test_an_old_epyc_record_that_defaulted_to_fp32_is_the_avx2_kind():
    old = {"cpu": "AMD EPYC", "device_name": "AMD EPYC"}
    assert machines.kind_of(old, "fp32-cl") == "AVX2 EPYC"
    assert machines.kind_of(old, "bf16-cl") == machines.UNKNOWN
    assert machines.kind_of(EPYC) == "AVX512-BF16 EPYC" and machines.kind_of(XEON) == "AMX Xeon"


def test_the_command_writes_its_block_and_keeps_the_rest(results, tmp_path, capsys):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n\nbefore\n<!-- machines:begin (old) -->\nstale\n<!-- machines:end -->\nafter\n")
    assert machines.main([str(results), "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# B\n\nbefore\n<!-- machines:begin (generated by python -m benchmarks.machines ")
    assert "stale" not in text and text.endswith("<!-- machines:end -->\nafter\n") and "| AMX Xeon |" in text
    assert "updated" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["no block", "missing path", "broken record", "record of another shape"])
def test_bad_input_is_one_line_and_writes_nothing(results, tmp_path, capsys, problem):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n" if problem == "no block" else "<!-- machines:begin -->\n<!-- machines:end -->\n")
    before = doc.read_text()
    path = results
    if problem == "missing path":
        path = tmp_path / "nowhere"
    elif problem == "broken record":
        (results / "xeon" / "benchmarks-cpu-4.json").write_text("{not json")
    elif problem == "record of another shape":
        record = json.loads((results / "xeon" / "benchmarks-cpu-4.json").read_text())
        record["step"] = [{"variant": "default (bf16-cl)"}]  # no rate
        write_json(results / "xeon" / "benchmarks-cpu-4.json", record)
    assert machines.main([str(path), "--markdown", str(doc)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and doc.read_text() == before
    with pytest.raises(FastCifarError):
        if problem == "no block":
            machines.write_block(doc, "x", "cmd")
        else:
            machines.collect([path])


def test_the_committed_records_give_benchmarks_md_its_table(monkeypatch):
    """The block in BENCHMARKS.md is what the command makes of the committed records (not a hand edit)."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "BENCHMARKS.md").read_text()
    begin = text.index(machines.BEGIN)
    block = text[text.index("\n", begin) + 1:text.index(machines.END)]
    monkeypatch.chdir(root)
    assert block == machines.table(machines.collect([Path("benchmarks/results")]))
