"""Unit tests of the pure parts: no root, no mounts, seconds (``pytest tests/unit``, as any user)."""
