"""Loaded at start-up by a Python whose PYTHONPATH holds this directory: plants the fault of ovlfuse_faults."""

import ovlfuse_faults  # noqa: F401
