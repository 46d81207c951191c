"""`python -m fastcifar.sweep`: the old name of `python -m fastcifar.seeds` (one recipe, several seeds), kept so that
earlier commands still run (code: fastcifar/multiseed.py)."""

import sys

from fastcifar.multiseed import main

if __name__ == "__main__":
    sys.exit(main())
