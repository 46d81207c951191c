"""Imported first by the package (and by benchmarks/): a command run as `python -m fastcifar.<command>` starts
itself again with the faster memory allocator here, before anything imports torch (see fastcifar/allocator.py).
Importing fastcifar from a notebook or a script does nothing here."""

from fastcifar.allocator import relaunch_command

relaunch_command()
