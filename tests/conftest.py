import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

UNIT = os.path.join(os.path.dirname(os.path.realpath(__file__)), "unit")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Tests outside tests/unit mount kernel overlays and FUSE: without root or /dev/fuse, stop before any runs.

    tests/unit holds the pure parts and runs as any user.
    """
    mounting = [item for item in session.items if not os.path.realpath(item.path).startswith(UNIT + os.sep)]
    if not mounting:
        return
    if os.geteuid() != 0:
        pytest.exit(f"{len(mounting)} of the selected tests mount kernel overlays and must run as root "
                    "(tests/unit runs as any user: pytest tests/unit)", returncode=2)
    if not os.path.exists("/dev/fuse"):
        pytest.exit("/dev/fuse is missing; install fuse3", returncode=2)
