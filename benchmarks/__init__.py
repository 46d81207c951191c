"""Benchmarks of fastcifar (`python -m benchmarks.run`); their commands start with the faster allocator too."""

import fastcifar._launch  # noqa: F401  (before torch: see fastcifar/allocator.py)
