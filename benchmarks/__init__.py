"""jaxdiff's benchmarks: ``python -m benchmarks [--quick] [--only NAME ...]`` (see ``run.py``)."""

import os

# Before any section imports jaxdiff (hence equinox): runtime checks become NaNs, costing nothing.
os.environ.setdefault("EQX_ON_ERROR", "nan")
