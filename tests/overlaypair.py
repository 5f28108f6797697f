"""The same layers mounted by the kernel's overlay and by ovlfuse (or fuse-overlayfs), to compare them.

A test names its layers once, as ``Layers``: explicit directories, or a layer
of an overlay2 store.  ``mount`` mounts them with any of the filesystems,
``on_both`` runs one scenario on fresh layers under the kernel and under
ovlfuse in turn, ``user_mount`` and ``kernel_command`` do what an ordinary
user can (ovlfuse in the background, the kernel's overlay inside a user
namespace).  Mounts are made by mounts.py: each is unmounted and its daemon
ended by its PID, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mounts import OVLFUSE, is_mounted, kernel_mount, ovlfuse_mount
from ovlfuse.tools.demo import LayerRef
from users import OrdinaryUser

FILESYSTEMS = ("kernel", "ovlfuse")
# ovlfuse under a seccomp filter that refuses char 0:0 devices: it writes .wh. files instead
NO_DEVICE_WHITEOUTS = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "no_device_whiteouts.py")]
T = TypeVar("T")


@dataclass(frozen=True)
class Layers:
    """Layers to mount: absolute paths, and for a store's layer the store root and the layer id."""

    lowers: tuple[str, ...]  # topmost first; a store's chain as its l/ links
    upper: str | None = None
    work: str | None = None
    store: tuple[str, str] | None = None  # (root, layer id): ovlfuse mounts the layer by its id
    read_only: bool = False  # for a store's layer: mount it read-only

    @classmethod
    def dirs(cls, lowers: Sequence[str | os.PathLike], upper: str | os.PathLike | None = None,
             work: str | os.PathLike | None = None) -> Layers:
        """Explicit directories, given to ovlfuse as ``-o lowerdir=...,upperdir=...,workdir=...``."""
        return cls(tuple(map(os.fspath, lowers)), upper and os.fspath(upper), work and os.fspath(work))

    @classmethod
    def of_layer(cls, root: str, layer: LayerRef, read_only: bool = False) -> Layers:
        """``layer`` of the store at ``root`` (which may be a copy of the store ``layer`` was made in).

        ``read_only``: its diff as the topmost lower, as a committed layer mounts.
        """
        own = os.path.join(root, os.path.basename(layer.dir))
        chain = tuple(os.path.join(root, "l", link) for link in layer.chain)
        if read_only:
            return cls((os.path.join(own, "diff"), *chain), store=(root, layer.id), read_only=True)
        return cls(chain, os.path.join(own, "diff"), os.path.join(own, "work"), (root, layer.id))

    def ovlfuse_args(self, options: Sequence[str] = ()) -> list[str]:
        """How a user names these layers to ovlfuse (the mount point not included)."""
        opts = list(options)
        if self.store is None:
            layers = [f"lowerdir={':'.join(self.lowers)}"]
            if self.upper:
                layers += [f"upperdir={self.upper}", f"workdir={self.work}"]
            return ["-o", ",".join(layers + opts)]
        root, layer_id = self.store
        committed = os.path.exists(os.path.join(root, layer_id, "committed"))  # mounts read-only by itself
        return [*(["--read-only"] if self.read_only and not committed else []), "--root", root, layer_id,
                *(["-o", ",".join(opts)] if opts else [])]

    def _kernel_paths(self) -> tuple[list[str], str | None, str | None, str | None]:
        """(lowers, upper, work, cwd): a store's relative to its l/, so that a deep chain fits one page."""
        if self.store is None:
            return list(self.lowers), self.upper, self.work, None
        cwd = os.path.join(self.store[0], "l")
        rel = [os.path.relpath(p, cwd) for p in self.lowers]
        return (rel, self.upper and os.path.relpath(self.upper, cwd), self.work and os.path.relpath(self.work, cwd),
                cwd)


@contextlib.contextmanager
def _kernel(layers: Layers, mnt: str, options: Sequence[str]) -> Iterator[None]:
    lowers, upper, work, cwd = layers._kernel_paths()
    empty = None
    if len(lowers) == 1 and upper is None:  # the kernel wants two lowers without an upper
        empty = f"{mnt}.empty-lower"
        os.mkdir(empty)
        lowers.append(empty)
    try:
        with kernel_mount(lowers, mnt, upper=upper, work=work, cwd=cwd, extra=",".join(options)):
            yield
    finally:
        if empty:
            os.rmdir(empty)


@contextlib.contextmanager
def fuse_overlayfs(layers: Layers, mnt: str, options: Sequence[str] = ()) -> Iterator[subprocess.Popen]:
    """fuse-overlayfs in the foreground on explicit directories, unmounted and ended by its PID."""
    assert layers.store is None, "fuse-overlayfs takes explicit directories"
    with ovlfuse_mount(layers.ovlfuse_args(options) + [mnt], mnt, timeout=30,
                       command=["fuse-overlayfs"]) as proc:
        yield proc


def mount(fs: str, layers: Layers, mnt: str | os.PathLike, options: Sequence[str] = (), *,
          fuse_options: Sequence[str] = (), whiteout_files: bool = False
          ) -> contextlib.AbstractContextManager[subprocess.Popen | None]:
    """``layers`` mounted at ``mnt`` by ``fs`` ("kernel", "ovlfuse" or "fuse-overlayfs"); yields the daemon.

    ``options`` go to every filesystem (``-o``), ``fuse_options`` (allow_other)
    to the FUSE ones only; ``whiteout_files``: ovlfuse runs where char 0:0
    devices cannot be made (see no_device_whiteouts.py).  The kernel's mount
    yields None.
    """
    mnt = os.fspath(mnt)
    if fs == "kernel":
        return _kernel(layers, mnt, options)
    if fs == "fuse-overlayfs":
        return fuse_overlayfs(layers, mnt, [*options, *fuse_options])
    assert fs == "ovlfuse", fs
    return ovlfuse_mount(layers.ovlfuse_args([*options, *fuse_options]) + [mnt], mnt,
                         command=NO_DEVICE_WHITEOUTS if whiteout_files else OVLFUSE)


@dataclass(frozen=True)
class Mounted:
    """One filesystem's mount in ``on_both``."""

    fs: str
    path: Path
    layers: Layers
    daemon: subprocess.Popen | None  # None for the kernel

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None


def on_both(base: str | os.PathLike, make_layers: Callable[[Path], Layers], scenario: Callable[[Mounted], T], *,
            fuse_options: Sequence[str] = ()) -> dict[str, T]:
    """``scenario`` run under the kernel, then ovlfuse, each on fresh layers ``make_layers(base/FS)``: FS -> result.

    The mount point is ``base/FS/mnt``; ``fuse_options`` go to ovlfuse alone.
    """
    results = {}
    for fs in FILESYSTEMS:
        where = Path(base) / fs
        where.mkdir(parents=True, exist_ok=True)
        layers = make_layers(where)
        mnt = where / "mnt"
        mnt.mkdir(exist_ok=True)
        with mount(fs, layers, mnt, fuse_options=fuse_options) as daemon:
            results[fs] = scenario(Mounted(fs, mnt, layers, daemon))
    return results


# --- as an ordinary user ---------------------------------------------------------------------------------

@contextlib.contextmanager
def user_mount(user: OrdinaryUser, layers: Layers, mnt: str) -> Iterator[None]:
    """ovlfuse started by ``user`` as a user starts it (in the background, with ``--pid-file``).

    Unmounted with the user's ``fusermount3 -u`` (root's ``umount -l`` as a
    fallback) and the daemon waited for, SIGKILLed by its PID if it lingers.
    """
    pid_file = f"{mnt}.pid"
    try:
        mounted = user.run("--pid-file", pid_file, *layers.ovlfuse_args(), mnt)
        assert mounted.returncode == 0, mounted.stderr
        yield
    finally:
        if is_mounted(mnt):
            user.command("fusermount3", "-u", mnt)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        _end_by_pid_file(pid_file)


def _end_by_pid_file(pid_file: str) -> None:
    try:
        with open(pid_file) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def kernel_command(layers: Layers, mnt: str, options: Sequence[str] = ("userxattr",)) -> str:
    """The shell command that mounts the kernel's overlay of ``layers`` (in a user namespace: with userxattr)."""
    opts = [f"lowerdir={':'.join(layers.lowers)}"]
    if layers.upper:
        opts += [f"upperdir={layers.upper}", f"workdir={layers.work}"]
    return f"mount -t overlay overlay -o {shlex.quote(','.join([*options, *opts]))} {shlex.quote(mnt)}"
