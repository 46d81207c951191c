"""`python -m fastcifar.find_lr`: LR range test / sweep (the code lives in fastcifar/lr_finder.py).

A separate, tiny module so that the package attribute `fastcifar.find_lr` can be the function of the same name
(see fastcifar/__init__.py) while `python -m fastcifar.find_lr` still names the command.
"""

import sys

from fastcifar.lr_finder import main

if __name__ == "__main__":
    sys.exit(main())
