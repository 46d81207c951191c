"""CIFAR-10 (python version archive) -> FFCV `train.beton` and `test.beton`: the data step's script.

    python data_prep/write_beton.py [--archive PATH] [--data-dir DIR] [--force]

The code lives in fastcifar/prepare.py (`python data_prep/write_beton.py --help` lists the options).
"""

import sys

from fastcifar.prepare import main

if __name__ == "__main__":
    sys.exit(main())
