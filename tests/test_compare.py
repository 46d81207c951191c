import pytest

from fastcifar import compare as cmp
from fastcifar.config import Config
from fastcifar.reporting import comparison_markdown, plot_comparison
from fastcifar.rundir import append_jsonl, write_json

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(path, preset="reference", accs=(0.5, 0.6, 0.7), overrides=None, train_s=1800.0):
    """A run folder as train leaves it after len(accs) epochs (unfinished: no results.json)."""
    path.mkdir(parents=True)
    write_json(path / "config.json", Config.from_preset(preset, overrides).to_dict())
    for epoch, acc in enumerate(accs, 1):
        append_jsonl(path / "metrics.jsonl", {"epoch": epoch, "train_loss": 1.0, "train_acc": acc, "test_loss": 1.0,
                                              "test_acc": acc, "train_s": train_s})
    return path


def test_table_puts_runs_side_by_side_and_leaves_missing_epochs_blank(tmp_path):
    make_run(tmp_path / "ref", accs=(0.5, 0.6))
    make_run(tmp_path / "fast", "fast", accs=(0.55, 0.65, 0.75), train_s=900.0)
    write_json(tmp_path / "fast" / "tta.json", {"tta": True, "test_acc": 0.7612})
    lines = cmp.compare([str(tmp_path / "ref"), str(tmp_path / "fast")]).splitlines()
    assert lines[0] == "| epoch | ref (reference) | fast (fast, flip TTA) |"
    assert lines[2:] == ["| 1 | 50.00% | 55.00% |", "| 2 | 60.00% | 65.00% |", "| 3 |  | 75.00% |",
                         "| final weights, flip TTA |  | 76.12% |", "| hours in training passes | 1.00 | 0.75 |"]


def test_an_epoch_logged_twice_counts_once_with_its_last_record(tmp_path):
    run = make_run(tmp_path / "run", accs=(0.5, 0.6))
    append_jsonl(run / "metrics.jsonl", {"epoch": 2, "train_loss": 1.0, "train_acc": 0.6, "test_loss": 1.0,
                                         "test_acc": 0.62, "train_s": 1800.0})
    assert cmp.compare([str(run)]).splitlines()[2:] == ["| 1 | 50.00% |", "| 2 | 62.00% |",
                                                         "| hours in training passes | 1.00 |"]


def test_runs_with_the_same_folder_name_are_told_apart_by_their_paths(tmp_path):
    a, b = make_run(tmp_path / "a" / "seed0"), make_run(tmp_path / "b" / "seed0", "fast")
    header = cmp.compare([str(a), str(b)]).splitlines()[0]
    assert header == f"| epoch | {a} (reference) | {b} (fast, flip TTA) |"


def test_figure_has_one_curve_per_run_on_both_axes(tmp_path):
    runs = {"a (reference)": [{"epoch": e, "test_acc": 0.1 * e, "train_s": 60.0} for e in (1, 2, 3)],
            "b (fast)": [{"epoch": e, "test_acc": 0.2 * e, "train_s": 30.0} for e in (1, 2)]}
    fig = plot_comparison(runs)
    by_epoch, by_time = fig.axes
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]
    assert list(by_epoch.get_lines()[1].get_ydata()) == pytest.approx([20, 40])
    assert list(by_time.get_lines()[0].get_xdata()) == pytest.approx([60 / 3600, 120 / 3600, 180 / 3600])
    assert [t.get_text() for t in by_time.get_legend().get_texts()] == list(runs)
    assert "final weights" not in comparison_markdown(runs)


def test_cli_writes_the_figure(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "cmp.png"
    assert cmp.main([str(run), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.err
    assert "wrote" not in captured.out  # stdout is the table alone, so `> table.md` captures nothing else


@pytest.mark.parametrize(("setup", "args", "message"), [
    (lambda p: None, ["nothing"], "is not a run directory ("),
    (lambda p: make_run(p / "run", accs=()), ["run"], "metrics.jsonl holds no finished epoch yet"),
    (lambda p: make_run(p / "run"), ["run", "run"], "is given twice"),
    (lambda p: make_run(p / "run"), ["run", "--out", "no/such/folder/x.png"], "its folder does not exist"),
    (lambda p: (make_run(p / "run"), (p / "run" / "tta.json").write_text("{")), ["run"], "delete it or write it"),
    (lambda p: (make_run(p / "run"), (p / "run" / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": "x"}\n')),
     ["run"], "metrics.jsonl, line 1: 'test_acc' must be a number or null, got 'x'"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, capsys, monkeypatch, setup, args, message):
    setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cmp.main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "no").exists()


def test_rows_of_another_version_without_times_or_tests_still_compare(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "train_s": 5.0}\n')
    assert cmp.main([str(run), "--out", str(tmp_path / "c.png")]) == 0
    table = capsys.readouterr().out
    assert "| 2 |  |" in table and table.rstrip().endswith("| hours in training passes | - |")


def test_seed_mode_puts_the_runs_beside_the_seeds_log(tmp_path):
    run = make_run(tmp_path / "ref", accs=(0.5, 0.6))
    out = tmp_path / "seed.png"
    lines = cmp.compare([str(run)], str(out), seed=True).splitlines()
    assert lines[0].startswith("| epoch | seed LR | seed train % | seed test % | ref (reference) train % |")
    assert lines[2] == "| 1 | 0.00200 | 40.72 | 53.93 | 50.00 | 50.00 | +9.28 | -3.93 |"
    assert lines[-1].startswith("| 24 | 0.00289 | 97.97 | 91.21 |  |  |")
    assert out.read_bytes()[:8] == PNG
