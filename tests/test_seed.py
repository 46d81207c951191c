"""The seed's log as data, and runs put beside it."""

import pytest

from fastcifar.seed import plot_seed_comparison, seed_comparison_markdown, seed_log


def test_the_log_holds_the_seeds_printed_run():
    log = seed_log()
    assert log["source"]["repository"].endswith("NSR9/EVA8") and len(log["source"]["commit"]) == 40
    epochs = log["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 25))
    assert (epochs[-1]["train_acc"], epochs[-1]["test_acc"]) == (0.9797, 0.9121)  # its headline numbers
    assert epochs[0]["lr"] == 0.002 and epochs[4]["lr"] == pytest.approx(0.0199980, abs=1e-7)  # peak before epoch 5
    finder = log["lr_finder"]["rows"]
    assert [r["lr"] for r in finder] == pytest.approx([0.001 + 0.0019 * k for k in range(10)])
    assert max(finder, key=lambda r: r["train_acc"])["lr"] == pytest.approx(0.0048)


def _run(offset: float, epochs: int = 24) -> list[dict]:
    seed = seed_log()["epochs"]
    return [{"epoch": e["epoch"], "train_acc": e["train_acc"] + offset, "test_acc": e["test_acc"] + offset}
            for e in seed[:epochs]]


def test_the_table_puts_each_run_and_their_mean_beside_the_seed():
    table = seed_comparison_markdown({"a": _run(-0.02), "b": _run(-0.04)})
    rows = [line for line in table.splitlines() if line.startswith("| 24 |")]
    assert rows == ["| 24 | 0.00289 | 97.97 | 91.21 | 95.97 | 89.21 | 93.97 | 87.21 | 94.97 | 88.21 | -3.00 | -3.00 |"]


def test_an_unfinished_run_leaves_the_mean_blank_instead_of_shifting_it():
    table = seed_comparison_markdown({"done": _run(0.0), "half": _run(0.0, epochs=12)})
    last = next(line for line in table.splitlines() if line.startswith("| 24 |"))
    cells = [c.strip() for c in last.strip("|").split("|")]
    assert cells[4:6] == ["97.97", "91.21"] and cells[6:] == ["", "", "", "", "", ""]


def test_the_figure_draws_the_seed_and_each_run():
    fig = plot_seed_comparison({"a": _run(-0.02)})
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
