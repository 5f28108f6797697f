"""Confined access to layer directories.

Every path the daemon touches inside a layer is resolved relative to that
layer's directory file descriptor by the kernel itself, with ``openat2``'s
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``: a symlink (or ``..``) planted in a
layer can never lead the daemon outside the layer, even if the store changes
under it.  Single names are then handled with ``*at`` calls on the opened
parent, which never follow the last component.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_openat2 = 437  # the same number on every architecture (generic table)

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def open_beneath(dirfd: int, relpath: bytes, flags: int, mode: int = 0) -> int:
    """Open ``relpath`` (``b""`` for the directory itself) strictly below ``dirfd``.

    Raises OSError; ELOOP or EXDEV mean the path tried to cross a symlink or
    leave the layer.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE)
    fd = _syscall(
        ctypes.c_long(_SYS_openat2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(relpath or b"."),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(relpath or b"."))
    return int(fd)


def fd_path(fd: int, name: bytes | None = None) -> bytes:
    """A path that reaches ``name`` in the directory ``fd`` (or ``fd`` itself).

    Used for calls that have no ``*at`` form in Python (xattrs): the parent is
    already confined, and the last component is never followed because callers
    pass ``follow_symlinks=False`` whenever ``name`` is given.
    """
    base = b"/proc/self/fd/%d" % fd
    return base if name is None else base + b"/" + name


def get_xattr(dirfd: int, name: bytes | None, attr: str) -> bytes | None:
    """Value of ``attr`` on ``name`` in ``dirfd`` (or on ``dirfd``), None if absent."""
    try:
        return os.getxattr(fd_path(dirfd, name), attr, follow_symlinks=name is None)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def list_xattrs(dirfd: int, name: bytes | None) -> list[str]:
    try:
        return os.listxattr(fd_path(dirfd, name), follow_symlinks=name is None)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return []
        raise
