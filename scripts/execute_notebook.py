"""Execute examples/quickstart.ipynb top to bottom and save it with its outputs (the install cell is kept, not run).

    python scripts/execute_notebook.py [--preset fast10] [--data data] [--out runs] [--timeout 14400]

This is how the committed notebook's outputs were made: a real run on the full data, on the machine the notebook
names. The tests run the notebook tiny on a copy (tests/test_notebook.py) and never write this file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from fastcifar import allocator

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/execute_notebook.py", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="fast10", help="the notebook's PRESET (default: %(default)s)")
    parser.add_argument("--data", default="data", help="the data folder (default: %(default)s)")
    parser.add_argument("--out", default="runs", help="where its runs go (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per cell (default: %(default)s)")
    args = parser.parse_args(argv)
    for name, value in (("--data", args.data), ("--out", args.out)):
        if Path(value).is_absolute():  # it would be printed in the committed outputs: no paths of this machine there
            parser.error(f"{name} must be a path relative to the current folder, got {value}")
    os.environ |= {"FASTCIFAR_NOTEBOOK_PRESET": args.preset, "FASTCIFAR_NOTEBOOK_DATA": args.data,
                   "FASTCIFAR_NOTEBOOK_OUT": args.out, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    # The kernel gets the allocator the commands preload themselves (fastcifar/allocator.py), as the notebook tells
    # its readers to start Jupyter: the committed outputs show the speed of a kernel started that way.
    library = allocator.choose(os.environ.get(allocator.ENV, "auto"), allocator.library_dirs(os.environ))
    if library is not None:
        os.environ["LD_PRELOAD"] = " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")]))
    os.environ.pop("FASTCIFAR_NOTEBOOK_EPOCHS", None)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
    for cell in install:  # not run: this machine has fastcifar installed; its text stays in the notebook
        cell.metadata["tags"] = [*cell.metadata["tags"], "skip-execution"]
    NotebookClient(nb, timeout=args.timeout, kernel_name="python3", skip_cells_with_tag="skip-execution",
                   resources={"metadata": {"path": os.getcwd()}}).execute()
    for cell in install:
        cell.metadata["tags"] = [t for t in cell.metadata["tags"] if t != "skip-execution"]
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
