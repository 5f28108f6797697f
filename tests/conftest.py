import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="session")
def _require_root_and_fuse():
    if os.geteuid() != 0:
        pytest.exit("the test suite mounts kernel overlays and must run as root", returncode=2)
    if not os.path.exists("/dev/fuse"):
        pytest.exit("/dev/fuse is missing; install fuse3", returncode=2)
