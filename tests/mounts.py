"""Real mounts for tests: ovlfuse daemons and kernel overlay mounts, always cleaned up.

Every mount made here is unmounted in a ``finally`` and every daemon is ended
by its PID, even when the test fails.  Daemons are started by the spawner
ovlfuse's own ``verify`` uses (``ovlfuse.sys.daemons``).  Commands run the
installed ``ovlfuse`` program from a directory that holds a folder named
``ovlfuse`` that must never be imported, as from a home directory holding a
clone: a command that imported it would fail.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from ovlfuse.sys import daemons
from ovlfuse.sys.mountinfo import is_mounted

__all__ = ["OVLFUSE", "decoy_cwd", "is_mounted", "kernel_mount", "ovlfuse_mount", "run_ovlfuse"]

# The console script pip installed next to this interpreter: what users run.
OVLFUSE = [os.path.join(os.path.dirname(sys.executable), "ovlfuse")]
DECOY_MESSAGE = "a folder named ovlfuse in the current directory was imported"


@functools.cache
def decoy_cwd() -> str:
    """A world-readable directory holding an ``ovlfuse`` package that fails loudly when imported."""
    base = tempfile.mkdtemp(prefix="ovlfuse-cwd.")
    os.chmod(base, 0o755)
    os.mkdir(os.path.join(base, "ovlfuse"), 0o755)
    with open(os.path.join(base, "ovlfuse", "__init__.py"), "w") as f:
        f.write(f"raise ImportError({DECOY_MESSAGE!r})\n")
    os.chmod(os.path.join(base, "ovlfuse", "__init__.py"), 0o644)
    atexit.register(shutil.rmtree, base, True)
    return base


def run_ovlfuse(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
                cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*OVLFUSE, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd or decoy_cwd())


@contextlib.contextmanager
def ovlfuse_mount(args: list[str], mountpoint: str, timeout: float = 60,
                  command: list[str] | None = None) -> Iterator[daemons.Daemon]:
    """Run ``ovlfuse -f ARGS`` (started by ``command``) and yield once ``mountpoint`` is live."""
    with daemons.mounted(args, mountpoint, program=command, timeout=timeout, cwd=decoy_cwd()) as daemon:
        yield daemon


@contextlib.contextmanager
def kernel_mount(lowers: list[str], mountpoint: str, upper: str | None = None, work: str | None = None,
                 cwd: str | None = None, extra: str = "") -> Iterator[None]:
    """``mount -t overlay``; layer paths may be relative to ``cwd`` (keeps deep chains under one page)."""
    opts = "lowerdir=" + ":".join(lowers)
    if upper:
        opts += f",upperdir={upper},workdir={work}"
    if extra:
        opts += "," + extra
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mountpoint], check=True, cwd=cwd,
                   capture_output=True)
    try:
        yield
    finally:
        daemons.unmount(mountpoint)
