"""Stat override records: an owner, mode and type kept in an xattr instead of on the object.

containers/storage and fuse-overlayfs write them where the real owner or
mode cannot (or must not) be set: rootless image pulls, ``force_mask``, and
fuse-overlayfs's ``xattr_permissions``.  The value is
``UID:GID:MODE[:TYPE]``, MODE in octal, TYPE one of ``file``, ``dir``,
``symlink``, ``pipe``, ``socket``, ``block-MAJ-MIN``, ``char-MAJ-MIN``
(containers/storage's format).  fuse-overlayfs writes MODE with the type bits
(``100644``); those give the type when TYPE is absent.

As in fuse-overlayfs, a layer uses records only when its root directory
carries one; the first of ``NAMES`` found there is the name read in that
layer.  Records are bookkeeping: where they take effect the merged view shows
their values and hides them as xattrs.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ovlfuse.fs.idmap import parse_id
from ovlfuse.sys.safeio import get_xattr

PRIVILEGED = "security.fuseoverlayfs.override_stat"
CONTAINERS = "user.containers.override_stat"
LEGACY = "user.fuseoverlayfs.override_stat"  # fuse-overlayfs 1.10's xattr_permissions=2
NAMES = (PRIVILEGED, CONTAINERS, LEGACY)
# xattr_permissions=N: the record name a mount marks its upper layer with.
WRITTEN = {1: PRIVILEGED, 2: CONTAINERS}

_TYPES = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "pipe": stat.S_IFIFO,
          "socket": stat.S_IFSOCK, "block": stat.S_IFBLK, "char": stat.S_IFCHR}
_NAMES_OF_TYPES = {v: k for k, v in _TYPES.items()}
# Linux device numbers: 12 bits of major, 20 of minor.
_MAX_MAJOR, _MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1


@dataclass(frozen=True)
class Stored:
    """Owner, mode (type bits included) and device number as a layer stores them."""

    uid: int
    gid: int
    mode: int
    rdev: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> "Stored":
        return cls(st.st_uid, st.st_gid, st.st_mode, st.st_rdev)


def parse(value: bytes, real: Stored) -> Stored | None:
    """The attributes a record gives an object whose real ones are ``real`` (None: not a record).

    Values no object can have (ids past 32 bits, a mode with type bits of no
    file type, a device number Linux cannot hold) make it no record either.
    """
    fields = value.decode("ascii", "replace").strip("\0\n ").split(":")
    if len(fields) < 3:
        return None
    uid, gid = parse_id(fields[0]), parse_id(fields[1])
    try:
        mode = int(fields[2], 8)
    except ValueError:
        return None
    if uid is None or gid is None or not 0 <= mode <= 0o177777 \
            or stat.S_IFMT(mode) not in (0, *_NAMES_OF_TYPES):
        return None
    fmt, rdev = stat.S_IFMT(mode) or stat.S_IFMT(real.mode), real.rdev
    if len(fields) > 3:
        kind, *dev = fields[3].split("-")
        if kind not in _TYPES:
            return None
        fmt = _TYPES[kind]
        if fmt in (stat.S_IFBLK, stat.S_IFCHR):
            if len(dev) < 2 or not (dev[0].isdigit() and dev[1].isdigit()):
                return None
            major, minor = int(dev[0]), int(dev[1])
            if major > _MAX_MAJOR or minor > _MAX_MINOR:
                return None
            rdev = os.makedev(major, minor)
    if fmt != stat.S_IFMT(real.mode) and fmt not in (stat.S_IFBLK, stat.S_IFCHR):
        rdev = 0
    return Stored(uid, gid, fmt | stat.S_IMODE(mode), rdev)


def format_record(stored: Stored) -> bytes:
    """containers/storage's form: ``UID:GID:MODE:TYPE`` with a four-digit octal mode."""
    fmt = stat.S_IFMT(stored.mode)
    kind = _NAMES_OF_TYPES.get(fmt, "file")
    if fmt in (stat.S_IFBLK, stat.S_IFCHR):
        kind += f"-{os.major(stored.rdev)}-{os.minor(stored.rdev)}"
    return b"%d:%d:%04o:%s" % (stored.uid, stored.gid, stat.S_IMODE(stored.mode), kind.encode())


def layer_marker(layer_fd: int) -> str | None:
    """The record name a layer uses: the first of NAMES on its root directory, if any."""
    for name in NAMES:
        if get_xattr(layer_fd, None, name) is not None:
            return name
    return None
