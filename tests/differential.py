"""Differential runs: the same calls on a kernel overlay mount and an ovlfuse mount, compared.

An operation (``Op``) is a small function of a mount root, named for the
report; ``call`` turns its result or errno into a value to compare.  A
``Pair`` holds the two mounts of two copies of one store (``store_pair``):
``apply`` runs operations on both and reports where the results differ, and
the merged trees and the two upper dirs are compared with the times and the
kernel's bookkeeping that must differ normalized away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from overlaypair import Layers, mount
from ovlfuse.sys.safeio import renameat2
from stores import kernel_twin, rich_store
from treesnap import Snapshot, differences, snapshot

Op = Callable[[str], object]
AT_FDCWD = -100
# xattrs the kernel writes for its own bookkeeping, which ovlfuse need not write alike
BOOKKEEPING = {"trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.uuid"}


def call(root: str, op: Op) -> tuple[str, object]:
    """("ok", what ``op`` returned) or ("error", the errno's name)."""
    try:
        return "ok", op(root)
    except OSError as e:
        return "error", errno.errorcode.get(e.errno, e.errno)


def normalized(snap: Snapshot, started_ns: int) -> Snapshot:
    """Times set during the run differ between the two runs; older ones (copied up) must not."""
    records = {}
    for path, rec in snap.records.items():
        mtime = rec.mtime_ns
        if mtime is not None and mtime >= started_ns:
            mtime = -1
        xattrs = tuple((n, v) for n, v in rec.xattrs if n not in BOOKKEEPING)
        records[path] = dataclasses.replace(rec, mtime_ns=mtime, xattrs=xattrs)
    return Snapshot(records, snap.inos, snap.dino_mismatch)


def upper_snapshot(diff: str, started_ns: int) -> Snapshot:
    """An upper dir as the comparison sees it: whiteouts unlinked from each other."""
    snap = normalized(snapshot(diff), started_ns)
    inos = dict(snap.inos)
    for path, rec in snap.records.items():
        if rec.kind == "chardev" and rec.rdev == 0:
            snap.records[path] = dataclasses.replace(rec, nlink=1, mtime_ns=None)
            inos[path] = -len(inos) - hash(path)  # each whiteout its own object
    return Snapshot(snap.records, inos, snap.dino_mismatch)


@dataclass
class Pair:
    """The kernel's mount of one copy of a store and ovlfuse's mount of another."""

    kernel: Layers
    ours: Layers
    kmnt: str
    omnt: str
    started_ns: int = dataclasses.field(default_factory=time.time_ns)
    results: dict[str, tuple[str, object]] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def mounted(self, *, fuse_options: Sequence[str] = (), whiteout_files: bool = False) -> Iterator[Pair]:
        """Both copies mounted, each by its filesystem (see overlaypair.mount for the options)."""
        with mount("kernel", self.kernel, self.kmnt), \
                mount("ovlfuse", self.ours, self.omnt, fuse_options=fuse_options, whiteout_files=whiteout_files):
            yield self

    def apply(self, ops: list[Op]) -> list[str]:
        """Run each op on both mounts; return the mismatches (the kernel's results go to ``results``)."""
        out = []
        for op in ops:
            expected, actual = call(self.kmnt, op), call(self.omnt, op)
            self.results[op.__name__] = expected
            if expected != actual:
                out.append(f"{op.__name__}: kernel {expected!r} ovlfuse {actual!r}")
        return out

    def tree_differences(self) -> list[str]:
        return differences(normalized(snapshot(self.kmnt), self.started_ns),
                           normalized(snapshot(self.omnt), self.started_ns))

    def upper_differences(self) -> list[str]:
        assert self.kernel.upper and self.ours.upper
        return differences(upper_snapshot(self.kernel.upper, self.started_ns),
                           upper_snapshot(self.ours.upper, self.started_ns))


def store_pair(tmp_path: Path, mounts_in: str | None = None, extra_layers: int = 0) -> Pair:
    """Two copies of stores.rich_store (with ``extra_layers`` more), and their mount points, not yet mounted.

    The mount points are made in ``mounts_in`` (by default ``tmp_path``).
    """
    source = rich_store(str(tmp_path / "source"), extra_layers=extra_layers, link_length=6)
    kernel = kernel_twin(source, str(tmp_path / "kernel"))
    ours = kernel_twin(source, str(tmp_path / "ours"))
    kmnt, omnt = (os.path.join(mounts_in or str(tmp_path), name) for name in ("kmnt", "omnt"))
    os.mkdir(kmnt)
    os.mkdir(omnt)
    return Pair(Layers.of_layer(kernel.root, kernel.top), Layers.of_layer(ours.root, ours.top), kmnt, omnt)


@contextlib.contextmanager
def mounted_pair(tmp_path: Path, mounts_in: str | None = None, *, fuse_options: Sequence[str] = (),
                 extra_layers: int = 0, whiteout_files: bool = False) -> Iterator[Pair]:
    """``store_pair``, mounted."""
    pair = store_pair(tmp_path, mounts_in, extra_layers)
    with pair.mounted(fuse_options=fuse_options, whiteout_files=whiteout_files):
        yield pair


# --- operations: each a small function of the mount root -----------------------

def p(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def read(rel: str) -> Op:
    def op(root: str) -> bytes:
        with open(p(root, rel), "rb") as f:
            return f.read()
    op.__name__ = f"read {rel}"
    return op


def stat_of(rel: str) -> Op:
    def op(root: str) -> tuple:
        st = os.lstat(p(root, rel))
        return (stat.filemode(st.st_mode), st.st_nlink,
                st.st_uid, st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else None, st.st_rdev)
    op.__name__ = f"stat {rel}"
    return op


def listing(rel: str) -> Op:
    def op(root: str) -> list[str]:
        return sorted(os.listdir(p(root, rel)))
    op.__name__ = f"listdir {rel}"
    return op


def named(name: str, fn: Callable[[str], object]) -> Op:
    fn.__name__ = name
    return fn


_OPEN_MODES = {"wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
               "r+b": os.O_RDWR}


def write_file(rel: str, data: bytes, mode: str = "wb", at: int | None = None) -> Op:
    def op(root: str) -> int:
        fd = os.open(p(root, rel), _OPEN_MODES[mode] | os.O_NONBLOCK, 0o644)  # a fifo must not block
        try:
            if at is not None:
                os.lseek(fd, at, os.SEEK_SET)
            return os.write(fd, data)
        finally:
            os.close(fd)
    return named(f"write {rel} {mode} at {at}", op)


def same_file(a: str, b: str) -> Op:
    def op(root: str) -> bool:
        return os.lstat(p(root, a)).st_ino == os.lstat(p(root, b)).st_ino
    return named(f"same inode {a} {b}", op)


def dir_times(rel: str) -> Op:
    def op(root: str) -> int:
        return os.stat(p(root, rel)).st_mtime_ns
    return named(f"dir mtime {rel}", op)


def xattrs_of(rel: str) -> Op:
    def op(root: str) -> list:
        path = p(root, rel)
        return sorted((n, os.getxattr(path, n, follow_symlinks=False))
                      for n in os.listxattr(path, follow_symlinks=False))
    return named(f"xattrs {rel}", op)


def fs(name: str, fn: Callable[..., object], rels: str | tuple[str, ...], *args: object, **kwargs: object) -> Op:
    """An os function applied to paths under the root, then to ``args``."""
    paths = (rels,) if isinstance(rels, str) else rels

    def op(root: str) -> object:
        return fn(*(p(root, r) for r in paths), *args, **kwargs)
    return named(f"{name} {' '.join(paths)} {args or ''} {kwargs or ''}", op)


def rename2(a: str, b: str, flags: int) -> Op:
    def op(root: str) -> None:
        renameat2(AT_FDCWD, os.fsencode(p(root, a)), AT_FDCWD, os.fsencode(p(root, b)), flags)
    return named(f"renameat2 {a} {b} flags {flags}", op)


def shell(command: str) -> Op:
    """A shell command run in the mount root; the result is its status and output."""
    def op(root: str) -> tuple[int, str]:
        done = subprocess.run(["sh", "-c", command], cwd=root, capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr.replace(root, "ROOT")
    return named(f"sh: {command}", op)

