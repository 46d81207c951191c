"""`python -m fastcifar.sweep --seeds N [train options]`: one recipe, several seeds (code: fastcifar/multiseed.py)."""

import sys

from fastcifar.multiseed import main

if __name__ == "__main__":
    sys.exit(main())
