"""`compare --table`: finished runs grouped by recipe, mean ± sd over seeds, time per epoch and to 91% per machine."""

import json

import pytest

from fastcifar.config import Config
from fastcifar.errors import FastCifarError
from fastcifar.rundir import append_jsonl, write_json
from fastcifar.tables import machine_kind, recipe_label, results_table

EPYC = {"device": "cpu", "device_name": "AMD EPYC", "cpu_kind": "avx512_bf16, no amx"}
XEON = {"device": "cpu", "device_name": "Intel(R) Xeon(R) Processor", "cpu_kind": "amx_bf16"}


def make_run(path, cfg: Config, acc: float, env: dict, epoch_s: float = 300.0, to_91: float | None = None,
             translate: float | None = None, finished: bool = True):
    path.mkdir(parents=True)
    write_json(path / "config.json", cfg.to_dict())
    write_json(path / "env.json", env)
    for epoch in range(1, cfg.schedule.epochs + 1):
        append_jsonl(path / "metrics.jsonl", {"epoch": epoch, "epoch_s": epoch_s, "test_acc": acc})
    if finished:
        write_json(path / "results.json", {"epochs": cfg.schedule.epochs, "final_test_acc": acc,
                                           "time_to_test_acc": {"0.91": {"epoch": None if to_91 is None else 1,
                                                                         "seconds": to_91}}})
    if translate is not None:
        write_json(path / "tta-translate1.json", {"tta": True, "translate": 1, "test_acc": translate})
    return str(path)


def test_runs_of_one_recipe_are_one_row_with_mean_sd_and_a_column_per_machine_kind(tmp_path):
    fast10 = Config.from_preset("fast10")
    dirs = [make_run(tmp_path / "a", fast10.override({"run.seed": 0}), 0.90, EPYC, 290, translate=0.905),
            make_run(tmp_path / "b", fast10.override({"run.seed": 1}), 0.92, XEON, 120, to_91=1500.0, translate=0.915),
            make_run(tmp_path / "c", fast10.override({"run.seed": 2, "run.test_every": 0}), 0.91, EPYC, 310,
                     to_91=3000.0)]
    header, _, *rows = results_table(dirs).splitlines()
    assert len(rows) == 1  # test_every and the seed do not make another recipe
    assert [c.strip() for c in header.strip("|").split("|")][5:] == [
        "s per epoch, AVX512-BF16 EPYC, bf16", "s per epoch, AMX Xeon, bf16", "time to 91%, AVX512-BF16 EPYC, bf16",
        "time to 91%, AMX Xeon, bf16"]  # the kind with the most runs first; each cell holds one machine kind
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:5] == ["fast10", "10", "3 (0,1,2)", "91.00 ± 1.00% (flip TTA)", "91.00 ± 0.71% (n=2)"]
    assert cells[5:] == ["300 s (n=2)", "120 s (n=1)", "50.0 min (1 of 2)", "25.0 min (1 of 1)"]


def test_a_run_of_unknown_machine_counts_for_accuracy_only_and_a_recipe_without_runs_on_a_kind_shows_a_dash(tmp_path):
    unknown = {"device": "cpu", "device_name": "AMD EPYC"}  # env.json from before cpu_kind was recorded
    dirs = [make_run(tmp_path / "a", Config.from_preset("fast10"), 0.90, unknown, 800),
            make_run(tmp_path / "b", Config.from_preset("fast16"), 0.915, XEON, 120, to_91=2000.0)]
    header, _, fast10, fast16 = results_table(dirs).splitlines()
    assert "unknown" not in header and header.count("AMX Xeon, bf16") == 2
    assert fast10.endswith("| - | - |") and "| 1 (0) | 90.00% (flip TTA) |" in fast10
    assert fast16.endswith("| 120 s (n=1) | 33.3 min (1 of 1) |")


def test_seconds_per_epoch_is_the_median_epoch_so_a_paused_epoch_does_not_count(tmp_path):
    cfg = Config.from_preset("fast10")
    run = make_run(tmp_path / "a", cfg, 0.90, EPYC, 300)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    paused = [json.dumps({**json.loads(line), "epoch_s": 1500.0}) if i in (3, 4) else line
              for i, line in enumerate(lines)]  # two epochs that shared the CPU (mean 540 s)
    (tmp_path / "a" / "metrics.jsonl").write_text("\n".join(paused) + "\n")
    assert "| 300 s (n=1) |" in results_table([run])


def test_a_changed_setting_is_another_recipe_named_after_the_nearest_preset(tmp_path):
    base = Config.from_preset("fast", {"schedule.epochs": 10, "schedule.peak_epoch": 2.08})  # = fast10's recipe
    dirs = [make_run(tmp_path / "a", base, 0.90, EPYC),
            make_run(tmp_path / "b", base.override({"optim.label_smoothing": 0.1}), 0.89, EPYC)]
    recipes = [line.split("|")[1].strip() for line in results_table(dirs).splitlines()[2:]]
    assert recipes == ["fast10", "fast10 + optim.label_smoothing=0.1"]
    assert recipe_label(Config.from_preset("reference", {"schedule.epochs": 24})) == "reference"


def test_unfinished_runs_are_left_out_and_a_folder_named_twice_counts_once(tmp_path):
    cfg = Config.from_preset("fast16")
    done = make_run(tmp_path / "done", cfg, 0.915, EPYC)
    make_run(tmp_path / "running", cfg, 0.5, EPYC, finished=False)
    table = results_table([done, str(tmp_path / "running"), done + "/"])
    assert "| fast16 | 16 | 1 (0) | 91.50% (flip TTA) |" in table


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FastCifarError, match="is not a run directory"):
        results_table([str(tmp_path)])
    make_run(tmp_path / "half", Config(), 0.5, EPYC, finished=False)
    with pytest.raises(FastCifarError, match="none of these runs has finished"):
        results_table([str(tmp_path / "half")])
    broken = make_run(tmp_path / "broken", Config(), 0.5, EPYC)
    (tmp_path / "broken" / "results.json").write_text("[1, 2]")
    with pytest.raises(FastCifarError, match=r"broken/results.json holds a JSON list, not an object"):
        results_table([broken])


@pytest.mark.parametrize(("env", "precision", "expected"), [
    (EPYC, "auto", "AVX512-BF16 EPYC, bf16"), (XEON, "auto", "AMX Xeon, bf16"), (XEON, "fp32", "AMX Xeon, fp32"),
    ({"device": "cpu", "cpu_kind": "avx2, no bf16 instructions", "device_name": "AMD EPYC"}, "auto", "AVX2 EPYC, fp32"),
    ({"device": "cpu", "device_name": "AMD EPYC"}, "auto", "unknown"),
    ({"device": "cpu", "device_name": "Intel(R) Xeon(R) Platinum"}, "auto", "AMX Xeon, bf16"),  # before cpu_kind
    # the Xeon whose AMX is hidden lists avx512_bf16 as the EPYC does: its name tells, and the precision it measured
    ({"device": "cpu", "device_name": "Intel(R) Xeon(R)", "cpu_kind": "avx512_bf16, no amx",
      "auto": {"precision": "fp32"}}, "auto", "Xeon without AMX, fp32"),
    (EPYC | {"auto": {"precision": "bf16"}}, "auto", "AVX512-BF16 EPYC, bf16"),
    # the generation, where the run recorded it: two "AMD EPYC"s ~1.5x apart
    (EPYC | {"cpu_family": "family 26 model 2"}, "auto", "AVX512-BF16 EPYC (Zen 5), bf16"),
    (EPYC | {"cpu_family": "family 25 model 17"}, "auto", "AVX512-BF16 EPYC (Zen 4), bf16"),
    (EPYC | {"cpu_family": "family 99 model 1"}, "auto", "AVX512-BF16 EPYC, bf16"),  # a family not known here
    (EPYC | {"cpu_family": None}, "auto", "AVX512-BF16 EPYC, bf16"),
    ({"device": "cuda", "device_name": "NVIDIA H100"}, "bf16", "NVIDIA H100, bf16")])
def test_machine_kinds(env, precision, expected):
    assert machine_kind(env, Config().override({"run.precision": precision})) == expected


def test_the_command_prints_it(tmp_path, capsys):
    from fastcifar.compare import main
    run = make_run(tmp_path / "r", Config.from_preset("fast10"), 0.9, EPYC)
    assert main(["--table", run]) == 0
    assert "| fast10 | 10 | 1 (0) |" in capsys.readouterr().out
    assert main(["--table", "--seed", run]) == 2
    assert json.dumps("--table prints the results table only")[1:-1] in capsys.readouterr().err


def test_the_table_goes_into_a_markdown_files_results_block_and_nothing_else_changes(tmp_path):
    from fastcifar.compare import main
    run = make_run(tmp_path / "r", Config.from_preset("fast16"), 0.915, EPYC)
    doc = tmp_path / "README.md"
    doc.write_text("# title\n\n<!-- results:begin (old) -->\nold table\n<!-- results:end -->\n\nafter\n")
    assert main(["--table", run, "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# title\n\n<!-- results:begin (python -m fastcifar compare --table ") and "old" not in text
    assert "| fast16 | 16 | 1 (0) |" in text and text.endswith("<!-- results:end -->\n\nafter\n")
    (tmp_path / "plain.md").write_text("no block\n")
    assert main(["--table", run, "--markdown", str(tmp_path / "plain.md")]) == 1


def test_a_baseline_gives_each_recipe_its_difference_paired_by_seed(tmp_path):
    twelve = Config.from_preset("fast", {"schedule.epochs": 12, "schedule.peak_epoch": 2.5})
    base = [make_run(tmp_path / f"base{s}", twelve.override({"run.seed": s}), 0.90, EPYC, translate=0.905 + s / 100)
            for s in (0, 1)]
    # the lever tested with translation TTA inside the run: its final accuracy is the one to pair
    lever = twelve.override({"optim.label_smoothing": 0.1, "data.test_translate": 1})
    runs = [make_run(tmp_path / f"ls{s}", lever.override({"run.seed": s}), acc, XEON)
            for s, acc in ((0, 0.910), (1, 0.913), (2, 0.99))]  # seed 2 has no baseline run: not paired
    table = results_table(runs, base)
    header, _, row = table.splitlines()
    assert header.endswith("| vs fast + schedule.epochs=12, schedule.peak_epoch=2.5, 12 epochs, paired by seed |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "93.77 ± 4.53% (n=3)"  # the in-run translation TTA counts as one
    assert cells[-1] == "+0.15 pt (translation TTA; seed 0 +0.50, seed 1 -0.20)"


def test_a_pair_measured_differently_is_not_compared(tmp_path):
    plain = Config.from_preset("reference")
    base = make_run(tmp_path / "base", Config.from_preset("fast10"), 0.90, EPYC)  # flip TTA, no translation file
    run = make_run(tmp_path / "run", plain, 0.85, EPYC)  # plain
    assert results_table([run], [base]).splitlines()[2].endswith("| - |")
    same = make_run(tmp_path / "same", Config.from_preset("fast16"), 0.915, EPYC)
    assert results_table([same], [base]).splitlines()[2].endswith("| +1.50 pt (flip TTA; seed 0 +1.50) |")


def test_bad_baselines_are_one_line_errors(tmp_path, capsys):
    from fastcifar.compare import main
    run = make_run(tmp_path / "r", Config.from_preset("fast10"), 0.9, EPYC)
    twice = [make_run(tmp_path / name, Config.from_preset("fast10"), 0.9, EPYC) for name in ("b0", "b0-again")]
    with pytest.raises(FastCifarError, match="two baseline runs share a seed"):
        results_table([run], twice)
    make_run(tmp_path / "half", Config(), 0.5, EPYC, finished=False)
    with pytest.raises(FastCifarError, match="none of the baseline runs has finished"):
        results_table([run], [str(tmp_path / "half")])
    assert main(["--baseline", run, run]) == 2
    assert "--baseline goes with --table" in capsys.readouterr().err


def test_the_baseline_is_named_in_the_markdown_blocks_command(tmp_path):
    from fastcifar.compare import main
    base = make_run(tmp_path / "base", Config.from_preset("fast10"), 0.9, EPYC)
    run = make_run(tmp_path / "r", Config.from_preset("fast16"), 0.915, EPYC)
    doc = tmp_path / "log.md"
    doc.write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    assert main(["--table", "--baseline", base, run, "--markdown", str(doc)]) == 0
    assert f"compare --table --baseline {base} {run}) -->" in doc.read_text()
    assert "| +1.50 pt (flip TTA; seed 0 +1.50) |" in doc.read_text()
