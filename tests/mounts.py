"""Real mounts for tests: ovlfuse daemons and kernel overlay mounts, always cleaned up.

Every mount made here is unmounted in a ``finally`` and every daemon is ended
by its PID, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from ovlfuse.sys.mountinfo import mount_points

OVLFUSE = [sys.executable, "-m", "ovlfuse"]


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


def _unmount(path: str) -> None:
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True)


def run_ovlfuse(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*OVLFUSE, *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def ovlfuse_mount(args: list[str], mountpoint: str, timeout: float = 60,
                  command: list[str] = OVLFUSE) -> Iterator[subprocess.Popen]:
    """Run ``ovlfuse -f ARGS`` (started by ``command``) and yield once ``mountpoint`` is live."""
    proc = subprocess.Popen([*command, "-f", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                raise RuntimeError(f"ovlfuse exited with {proc.returncode}: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ovlfuse did not mount {mountpoint} in {timeout}s")
            time.sleep(0.02)
        yield proc
    finally:
        _unmount(mountpoint)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _unmount(mountpoint)


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
        _unmount(mountpoint)
