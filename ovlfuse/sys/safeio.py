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


# A path handed to the kernel must stay under PATH_MAX (4096); longer ones are
# walked in pieces, each confined below the directory the previous one opened.
_PIECE = 3072


def open_beneath(dirfd: int, relpath: bytes, flags: int, mode: int = 0) -> int:
    """Open ``relpath`` (``b""`` for the directory itself) strictly below ``dirfd``.

    Raises OSError; ELOOP or EXDEV mean the path tried to cross a symlink or
    leave the layer.
    """
    if len(relpath) > _PIECE:
        cut = relpath.rfind(b"/", 0, _PIECE)
        if cut > 0:
            head = open_beneath(dirfd, relpath[:cut], os.O_PATH | os.O_DIRECTORY)
            try:
                return open_beneath(head, relpath[cut + 1:], flags, mode)
            finally:
                os.close(head)
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


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


def _check(ret: int, what: bytes) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(what))
    return ret


def renameat2(old_dirfd: int, old: bytes, new_dirfd: int, new: bytes, flags: int) -> None:
    """rename(2) with flags (EXCHANGE, NOREPLACE, WHITEOUT), which ``os.rename`` lacks."""
    _check(_libc.renameat2(ctypes.c_int(old_dirfd), ctypes.c_char_p(old), ctypes.c_int(new_dirfd),
                           ctypes.c_char_p(new), ctypes.c_uint(flags)), old)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def name_to_handle(dirfd: int, name: bytes) -> tuple[int, bytes]:
    """(type, bytes) of the file handle of ``name`` in ``dirfd`` (never following it)."""
    fh = _FileHandle(128, 0)
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(ctypes.c_int(dirfd), ctypes.c_char_p(name), ctypes.byref(fh),
                                   ctypes.byref(mount_id), ctypes.c_int(0)), name)
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes) -> int:
    """An O_PATH descriptor of the object a file handle names (needs CAP_DAC_READ_SEARCH)."""
    fh = _FileHandle(len(handle), handle_type)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    return _check(_libc.open_by_handle_at(ctypes.c_int(mount_fd), ctypes.byref(fh),
                                          ctypes.c_int(os.O_PATH | os.O_CLOEXEC)), b"<handle>")
