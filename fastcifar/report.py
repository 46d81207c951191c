"""`python -m fastcifar.report RUN_DIR`: (Re)write a run's report (the code lives in fastcifar/reporting.py).

A separate, tiny module: the package imports the plotting functions at start-up, so a module that held them
and the command would be imported twice by `python -m` (and Python warns about it).
"""

import sys

from fastcifar.reporting import main

if __name__ == "__main__":
    sys.exit(main())
