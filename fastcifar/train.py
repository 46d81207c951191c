"""`python -m fastcifar.train`: Train the custom ResNet (the code lives in fastcifar/training.py).

A separate, tiny module so that the package attribute `fastcifar.train` can be the function of the same name
(see fastcifar/__init__.py) while `python -m fastcifar.train` still names the command.
"""

import sys

from fastcifar.training import main

if __name__ == "__main__":
    sys.exit(main())
