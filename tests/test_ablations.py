"""The ablation runner: variants = fast + one change, a table in the markdown, and a rerun that reuses runs."""

import json
from pathlib import Path

import pytest

from benchmarks import ablations
from fastcifar.config import Config

TINY = ["--set", "model.widths=8,16,32,64", "--set", "data.batch_size=64", "--set", "data.test_batch_size=64",
        "--set", "data.num_workers=1", "--set", "run.precision=fp32"]


def test_every_variant_is_fast_plus_its_change_and_valid():
    base = {"schedule.epochs": 3, "schedule.peak_epoch": 0.625}
    fast = Config.from_preset("fast", base)
    for name, (_, overrides) in ablations.VARIANTS.items():
        cfg = ablations.variant_config(name, base)
        assert cfg.run.name == name and cfg.schedule.epochs == 3
        if name == "reference":
            assert cfg.preset == "reference" and cfg.schedule.max_lr == 0.02  # the seed's
            continue
        changed = {f"{s}.{k}" for s, sec in cfg.to_dict().items() if isinstance(sec, dict)
                   for k, v in sec.items() if v != fast.to_dict()[s][k]}
        assert changed == set(overrides) | {"run.name", "data.test_flip"}, name
        assert cfg.data.test_flip is False  # rows test without flips; the TTA column tests with them


def test_runner_trains_each_variant_writes_the_table_and_reuses_runs(synthetic, tmp_path, capsys):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nhand-written\n")
    argv = ["--variants", "fast,ema", "--epochs", "1", "--peak-epoch", "0.5", "--train-subset", "256",
            "--data-dir", str(synthetic["data_dir"]), "--out-dir", str(tmp_path / "abl"), "--markdown", str(md), *TINY]
    assert ablations.main(argv) == 0
    record = json.loads((tmp_path / "abl" / "ablations.json").read_text())
    assert [r["variant"] for r in record["rows"]] == ["fast", "ema"]
    assert all(r["stats"]["final_test_acc"]["n"] == 1 for r in record["rows"])
    for row in record["rows"]:  # the TTA column: the run's own weights, tested with flips
        (run,) = row["runs"]
        saved = json.loads((Path(run["run_dir"]) / "tta.json").read_text())
        assert 0 < run["tta_test_acc"] <= 1 and saved["tta"] is True and saved["test_acc"] == run["tta_test_acc"]
        assert saved["command"].startswith("python -m fastcifar.evaluate --checkpoint ")
        assert "--tta" in saved["command"]
    text = md.read_text()
    assert "hand-written" in text and ablations.markers(str(tmp_path / "abl"))[0] in text
    assert "| ema | + weight EMA" in text and ablations.machine(Config().override({"run.precision": "fp32"})) in text
    assert "| fast | the fast preset itself | 1 |" in text and "(1 seed)" in text
    capsys.readouterr()
    assert ablations.main(argv) == 0  # again: every run is read back, nothing trained
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 2
    assert json.loads((tmp_path / "abl" / "ablations.json").read_text()) == record
    # another invocation at the same budget: its row replaces that variant's, the other row stays
    argv_ema = [*argv[:1], "ema", *argv[2:]]
    assert ablations.main(argv_ema) == 0
    rows = json.loads((tmp_path / "abl" / "ablations.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fast", "ema"] and rows[0] == record["rows"][0]
    assert "--variants ema" in rows[1]["command"] and "--variants ema" in md.read_text()


def test_rows_of_another_budget_or_machine_are_refused_before_training(tmp_path, capsys):
    argv = ["--variants", "fast", "--out-dir", str(tmp_path), "--markdown", "", "--data-dir", str(tmp_path / "none")]
    base = ablations.budget(ablations.build_parser().parse_args(argv))
    here = ablations.machine(ablations.variant_config("fast", base))
    fast = ablations.fast_recipe()
    for record in ({"budget": base, "machine": "Another CPU (cpu), bfloat16", "fast": fast},
                   {"budget": base | {"schedule.epochs": 9}, "machine": here, "fast": fast},
                   {"budget": base, "machine": here, "fast": fast | {"data.flip_mode": "random"}},  # another fast
                   {"budget": base, "machine": here},  # a record from before rows named their fast preset
                   {"budget": base, "rows": []}):  # a record from before rows named their machine
        (tmp_path / "ablations.json").write_text(json.dumps(record | {"rows": []}))
        assert ablations.main(argv) == 1
        err = capsys.readouterr().err
        assert "another budget, machine or fast preset" in err and "--out-dir" in err and err.count("\n") == 1
        assert json.loads((tmp_path / "ablations.json").read_text()) == record | {"rows": []}  # left as it was


def test_fast_recipe_names_what_the_preset_changes():
    recipe = ablations.fast_recipe()
    assert recipe["data.flip_mode"] == "alternate" and recipe["model.whiten_frozen"] is True
    assert recipe["optim.bn_lr_scale"] == 64.0 and "data.batch_size" not in recipe  # the spec's 512 in both
    # before-b undoes exactly the candidate-B levers and alternating flips
    undone = ablations.VARIANTS["before-b"][1]
    reference = Config.from_preset("reference").to_dict()
    assert set(undone) <= set(recipe) and all(reference[k.split(".")[0]][k.split(".")[1]] == v
                                              for k, v in undone.items())


def test_tta_cache_of_older_runs_is_read_without_evaluating(tmp_path):
    (tmp_path / "tta.json").write_text('{"tta_test_acc": 0.5}')  # no model.pt: evaluating would fail
    assert ablations.tta_accuracy({"run_dir": str(tmp_path)}, Config()) == 0.5


@pytest.mark.parametrize(("argv", "message"), [
    (["--variants", "fast,nope"], "unknown variant(s) nope"),
    (["--set", "model.widths"], "--set takes KEY=VALUE"),
    (["--set", "optim.nope=1"], "unknown option 'optim.nope'"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert ablations.main([*argv, "--out-dir", str(tmp_path), "--markdown", ""]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _row(variant, accs):
    runs = [{"seed": s, "final_test_acc": a} for s, a in accs.items()]
    return {"variant": variant, "runs": runs}


def test_difference_to_fast_is_paired_on_common_seeds():
    fast = _row("fast", {0: 0.50, 1: 0.56})
    assert ablations.paired_delta(_row("x", {0: 0.52}), fast) == pytest.approx((0.02, 1))
    assert ablations.paired_delta(_row("x", {0: 0.52, 1: 0.55, 2: 0.9}), fast) == pytest.approx((0.005, 2))
    assert ablations.paired_delta(_row("x", {3: 0.5}), fast) is None


def test_table_only_rewrites_the_table_from_the_record(tmp_path, capsys):
    assert ablations.main(["--table-only", "--out-dir", str(tmp_path), "--markdown", ""]) != 0
    assert "run the ablations first" in capsys.readouterr().err
