"""``pytest tests/unit`` passes as an ordinary user: the pure parts need no root and no mount.

A copy of the unit tests (with pyproject.toml's settings and tests/conftest.py)
runs as the test user from its own home, with the system's python, as a
user without the repository's venv runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from users import ordinary_user

TESTS = os.path.dirname(os.path.abspath(__file__))


def _copy_unit_tests(dest: str) -> None:
    """The unit tests, and one test that mounts (with the module it needs)."""
    os.makedirs(os.path.join(dest, "tests"))
    shutil.copy(os.path.join(os.path.dirname(TESTS), "pyproject.toml"), dest)
    for name in ("conftest.py", "mounts.py", "test_options.py"):
        shutil.copy(os.path.join(TESTS, name), os.path.join(dest, "tests"))
    shutil.copytree(os.path.join(TESTS, "unit"), os.path.join(dest, "tests", "unit"),
                    ignore=shutil.ignore_patterns("__pycache__"))


def test_unit_tests_pass_as_an_ordinary_user():
    with ordinary_user() as user:
        checkout = os.path.join(user.home, "checkout")
        _copy_unit_tests(checkout)
        user.own(checkout)
        unit = os.path.join(checkout, "tests", "unit")
        collected = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only",
                                    "-q", unit], capture_output=True, text=True, cwd=checkout)
        count = re.search(r"^(\d+) tests? collected", collected.stdout, re.M)
        assert count and int(count.group(1)) > 100, collected.stdout[-2000:] + collected.stderr[-2000:]
        began = time.monotonic()
        result = user.python_run("-m", "pytest", "-p", "no:cacheprovider", "-q", unit, timeout=120)
        print(f"tests/unit as {user.name}: {time.monotonic() - began:.1f}s")
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert re.fullmatch(rf"{count.group(1)} passed in [\d.]+s( \(.*\))?", summary), summary
        # the tests that mount still stop at once, before any runs, and say why
        mounting = user.python_run("-m", "pytest", "-p", "no:cacheprovider", "-q", os.path.join(checkout, "tests"),
                                   timeout=120)
        assert mounting.returncode == 2, mounting.stdout[-3000:] + mounting.stderr[-3000:]
        assert (f"{len(_mounting_tests(checkout))} of the selected tests mount kernel overlays and must run as root "
                "(tests/unit runs as any user: pytest tests/unit)") in mounting.stdout + mounting.stderr
        assert " passed" not in mounting.stdout


def _mounting_tests(checkout: str) -> list[str]:
    """The tests of the copied test_options.py, as root collects them."""
    collected = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                                os.path.join(checkout, "tests", "test_options.py")],
                               capture_output=True, text=True, cwd=checkout)
    return [line for line in collected.stdout.splitlines() if "::" in line]
