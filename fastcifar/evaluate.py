"""`python -m fastcifar.evaluate`: Evaluate a saved model (the code lives in fastcifar/evaluation.py).

A separate, tiny module so that the package attribute `fastcifar.evaluate` can be the function of the same name
(see fastcifar/__init__.py) while `python -m fastcifar.evaluate` still names the command.
"""

import sys

from fastcifar.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
