"""examples/quickstart.ipynb runs top to bottom (install cell skipped) with the tiny smoke preset: on a copy in
memory, so that the committed outputs of the real run stay as they are."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from fastcifar.prepare import prepare
from tests.synthetic import write_archive

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes_and_shows_every_figure(tmp_path, monkeypatch):
    # 1,250 / 600 synthetic images: enough for the smoke preset's subsets (1,024 / 512).
    write_archive(tmp_path / "cifar-10-python.tar.gz", per_batch=250, n_test=600)
    prepare(tmp_path / "data", archive=str(tmp_path / "cifar-10-python.tar.gz"), counts=None, num_workers=1)
    monkeypatch.delenv("FASTCIFAR_CIFAR_ARCHIVE", raising=False)  # the notebook must find the betons as they are
    monkeypatch.setenv("FASTCIFAR_NOTEBOOK_PRESET", "smoke")
    monkeypatch.setenv("FASTCIFAR_NOTEBOOK_EPOCHS", "2")
    monkeypatch.setenv("FASTCIFAR_NOTEBOOK_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FASTCIFAR_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "install" in nb.cells[1].metadata.get("tags", [])
    nb.cells = [c for c in nb.cells if "install" not in c.metadata.get("tags", [])]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # range test, curves, LR schedule, misclassified images, confusion matrix
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "Total params: " in text and "epoch         lr  train_loss" in text and "flip TTA" in text
    assert "preset smoke: 2 epochs" in text and "cores, torch" in text  # the recipe and the machine are named
    assert (tmp_path / "runs" / "quickstart" / "results.json").is_file()
    nbformat.write(nb, tmp_path / "executed.ipynb")  # kept for a look when the test fails


def _committed_output_text() -> str:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)


def test_the_committed_outputs_are_a_full_run_without_warts():
    """What a reader sees: a real run (all cells ran, every figure), no path of the machine that made it, no
    warning, the layer table once, the auto settings' rates once."""
    text = _committed_output_text()
    assert "epoch         lr  train_loss" in text and "final test accuracy" in text
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp|usr|opt|mnt|venv)/", text), "a path of this machine"
    assert "Warning" not in text and "warn" not in text.lower()
    assert text.count("Total params: ") == 1
    assert sum(" img/s > " in line for line in text.splitlines()) == 1  # the machine cell's list of rates
