"""Calls on open descriptors, against the kernel's overlay: they act on the object that was opened.

A program keeps using a file through its descriptor after the name changes:
it is unlinked, unlinked and taken by a new file, renamed, replaced by a
rename over it, hard-linked, or its object is copied up through another
descriptor.  Every descriptor-based call (fstat, ftruncate, fchmod, fchown,
the f*xattr calls, futimens, fsync, read, write, mmap) must act on the
opened object, or fail as the kernel's overlay fails, and never touch what
holds the name now.  Each case runs on a kernel overlay mount and on an
ovlfuse mount of two copies of the same layers; every call's result, the
object's state seen through the descriptor and through the names left, and
the upper dirs must be the same.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest

from mounts import kernel_mount, ovlfuse_mount
from differential import upper_snapshot
from treesnap import differences

CONTENT = b"lower data of the object\n"
# the object behind the name before the event: lower (opened read-only or read-write: a copy-up),
# already copied up, or new in the upper layer
KINDS = ("lower", "copied", "new")
MODES = {"ro": os.O_RDONLY, "rw": os.O_RDWR}


def _result(fn: Callable[[], object]) -> object:
    try:
        value = fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
    return value if value is not None else "ok"


def _state(st: os.stat_result, started_ns: int) -> tuple:
    """What fstat or lstat shows, times set during the run folded (the two runs differ in them)."""
    times = tuple("now" if t >= started_ns else t for t in (st.st_atime_ns, st.st_mtime_ns))
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_size, times[1])


def _name_state(path: str, started_ns: int) -> object:
    try:
        st = os.lstat(path)
        with open(path, "rb") as f:
            data = f.read()
        xattrs = sorted(os.listxattr(path))
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
    return _state(st, started_ns), data, xattrs


# --- what happens to the name while the descriptor is open ----------------------------------

def _unlinked(d: str, name: str) -> list[str]:
    os.unlink(f"{d}/{name}")
    return [name]


def _reused(d: str, name: str) -> list[str]:
    os.unlink(f"{d}/{name}")
    with open(f"{d}/{name}", "wb") as f:
        f.write(b"someone else\n")
    return [name]


def _renamed(d: str, name: str) -> list[str]:
    os.rename(f"{d}/{name}", f"{d}/{name}.moved")
    return [name, f"{name}.moved"]


def _replaced(d: str, name: str) -> list[str]:
    with open(f"{d}/{name}.other", "wb") as f:
        f.write(b"the replacement\n")
    os.rename(f"{d}/{name}.other", f"{d}/{name}")
    return [name, f"{name}.other"]


def _linked(d: str, name: str) -> list[str]:
    os.link(f"{d}/{name}", f"{d}/{name}.link")
    os.unlink(f"{d}/{name}")
    return [name, f"{name}.link"]


def _copied_elsewhere(d: str, name: str) -> list[str]:
    fd = os.open(f"{d}/{name}", os.O_RDWR)
    try:
        os.pwrite(fd, b"WRITTEN THROUGH ANOTHER FD", 0)
    finally:
        os.close(fd)
    return [name]


EVENTS = {"unlinked": _unlinked, "reused": _reused, "renamed": _renamed, "replaced": _replaced,
          "linked": _linked, "copied-elsewhere": _copied_elsewhere}


# --- the calls on the descriptor ------------------------------------------------------------

def _in_child(fn: Callable[[], object]) -> object:
    """``fn()`` in a forked child: a mapping past the object's real end kills with SIGBUS, not the test."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_fd, pickle.dumps(_result(fn)))
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    return pickle.loads(data) if data else f"killed by signal {os.WTERMSIG(status)}"


def _mmap_read(fd: int) -> object:
    def read() -> bytes:
        size = os.fstat(fd).st_size
        if not size:
            return b""
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            return m[:]
    return _in_child(read)


def _mmap_write(fd: int) -> object:
    def write() -> str:
        with mmap.mmap(fd, 4, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[:4] = b"MMAP"
            m.flush()
        return "ok"
    return _in_child(write)


CALLS: list[tuple[str, Callable[[int], object]]] = [
    ("fstat", lambda fd: None),
    ("read", lambda fd: os.pread(fd, 100, 0)),
    ("fchmod", lambda fd: os.fchmod(fd, 0o640)),
    ("fchown", lambda fd: os.fchown(fd, 1234, 4321)),
    ("fsetxattr", lambda fd: os.setxattr(fd, "user.test", b"value")),
    ("fgetxattr", lambda fd: os.getxattr(fd, "user.test")),
    ("flistxattr", lambda fd: sorted(os.listxattr(fd))),
    ("fremovexattr", lambda fd: os.removexattr(fd, "user.test")),
    ("fsetxattr again", lambda fd: os.setxattr(fd, "user.again", b"2")),
    ("futimens", lambda fd: os.utime(fd, ns=(1_000_000_000, 2_000_000_000))),
    ("write", lambda fd: os.pwrite(fd, b"W", 1)),
    ("ftruncate", lambda fd: os.ftruncate(fd, 6)),
    ("fsync", lambda fd: os.fsync(fd)),
    ("mmap read", _mmap_read),
    ("mmap write", _mmap_write),
    ("read after", lambda fd: os.pread(fd, 100, 0)),
]


def _run_started() -> int:
    """Where "set during the run" begins: a second back, as file times come from a clock coarser than time_ns."""
    return time.time_ns() - 10**9


def _cases() -> Iterator[tuple[str, str, str]]:
    for event in EVENTS:
        for kind in KINDS:
            for mode in MODES:
                yield event, kind, mode


def _prepare(d: str) -> None:
    """Give the ``copied`` and ``new`` objects their state through the mount, before the descriptors open."""
    for event, kind, mode in _cases():
        name = f"{event}-{kind}-{mode}"
        if kind == "copied":
            os.chmod(f"{d}/{name}", 0o664)
        elif kind == "new":
            with open(f"{d}/{name}", "wb") as f:
                f.write(CONTENT)


def _run(d: str, started_ns: int) -> dict[str, object]:
    """Every case on the mount at ``d``: what each call gave and what the descriptor and the names show."""
    out: dict[str, object] = {}
    for event, kind, mode in _cases():
        name = f"{event}-{kind}-{mode}"
        fd = os.open(f"{d}/{name}", MODES[mode])
        try:
            names = EVENTS[event](d, name)
            for call, fn in CALLS:
                out[f"{name}: {call}"] = _result(lambda: fn(fd))
                out[f"{name}: fstat after {call}"] = _result(lambda: _state(os.fstat(fd), started_ns))
        finally:
            os.close(fd)
        for left in names:
            out[f"{name}: name {left}"] = _name_state(f"{d}/{left}", started_ns)
    return out


def _layers(base: str) -> None:
    lower, upper, work = (f"{base}/{n}" for n in ("lower", "upper", "work"))
    for path in (f"{lower}/d", upper, work):
        os.makedirs(path)
    for event, kind, mode in _cases():
        if kind != "new":
            with open(f"{lower}/d/{event}-{kind}-{mode}", "wb") as f:
                f.write(CONTENT)
            os.chmod(f"{lower}/d/{event}-{kind}-{mode}", 0o644)
            os.utime(f"{lower}/d/{event}-{kind}-{mode}", ns=(10**9, 10**9))
    os.utime(f"{lower}/d", ns=(10**9, 10**9))


@contextmanager
def _mounted(tmp_path) -> Iterator[tuple[str, str, str, str]]:
    kbase, obase = str(tmp_path / "kernel"), str(tmp_path / "ours")
    _layers(kbase)
    shutil.copytree(kbase, obase, symlinks=True)
    kmnt, omnt = str(tmp_path / "kmnt"), str(tmp_path / "omnt")
    os.mkdir(kmnt)
    os.mkdir(omnt)
    with ExitStack() as stack:
        stack.enter_context(kernel_mount([f"{kbase}/lower"], kmnt, upper=f"{kbase}/upper", work=f"{kbase}/work"))
        stack.enter_context(ovlfuse_mount(
            ["-o", f"lowerdir={obase}/lower,upperdir={obase}/upper,workdir={obase}/work", omnt], omnt))
        yield kbase, obase, kmnt, omnt


def test_descriptor_calls_act_on_the_opened_object(tmp_path):
    with _mounted(tmp_path) as (kbase, obase, kmnt, omnt):
        started = _run_started()
        _prepare(f"{kmnt}/d")
        _prepare(f"{omnt}/d")
        kernel = _run(f"{kmnt}/d", started)
        ours = _run(f"{omnt}/d", started)
    # The kernel's documented non-standard behaviour ("Non-standard behavior" in its overlayfs.rst):
    # a lower file opened read-only and mapped keeps mapping the lower file after another
    # descriptor's copy-up.  ovlfuse maps what read() returns, as POSIX has it.
    stale_map = "copied-elsewhere-lower-ro: mmap read"
    assert kernel.pop(stale_map) == CONTENT + b"\0"
    assert ours.pop(stale_map) == ours["copied-elsewhere-lower-ro: read after"] == b"WRITTEN THROUGH ANOTHER FD"
    mismatches = [f"{key}: kernel {kernel[key]!r} ovlfuse {ours.get(key)!r}"
                  for key in kernel if kernel[key] != ours.get(key)]
    assert mismatches == [], "\n".join(mismatches)
    assert differences(upper_snapshot(f"{kbase}/upper", started), upper_snapshot(f"{obase}/upper", started)) == []


@pytest.mark.parametrize("how", ["getattr", "setattr", "xattr"])
def test_inode_calls_without_a_descriptor_after_the_name_went(tmp_path, how):
    """An O_PATH descriptor holds the inode: calls through /proc/self/fd act on it or fail, never on the new name."""
    with _mounted(tmp_path) as (kbase, obase, kmnt, omnt):
        started = _run_started()
        results = []
        for mnt in (kmnt, omnt):
            out = []
            for kind in ("lower", "new"):
                name = f"{mnt}/d/reused-{kind}-ro"
                if kind == "new":
                    with open(name, "wb") as f:
                        f.write(CONTENT)
                fd = os.open(name, os.O_PATH)
                try:
                    _reused(f"{mnt}/d", f"reused-{kind}-ro")
                    proc = f"/proc/self/fd/{fd}"
                    if how == "getattr":
                        out.append(_result(lambda: _state(os.stat(proc), started)))
                    elif how == "setattr":
                        out.append(_result(lambda: os.chmod(proc, 0o600)))
                        out.append(_result(lambda: _state(os.stat(proc), started)))
                    else:
                        out.append(_result(lambda: os.setxattr(proc, "user.x", b"1")))
                        out.append(_result(lambda: sorted(os.listxattr(proc))))
                finally:
                    os.close(fd)
                out.append(_name_state(name, started))
            results.append(out)
    assert results[0] == results[1]
