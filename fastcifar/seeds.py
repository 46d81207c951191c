"""`python -m fastcifar.seeds --seeds N [train options]`: one recipe, several seeds (code: fastcifar/multiseed.py).

`python -m fastcifar seeds ...` is the same command; `python -m fastcifar.sweep` its old name.
"""

import sys

from fastcifar.multiseed import main

if __name__ == "__main__":
    sys.exit(main())
