"""Whiteouts, opaque directories and stat override records, as import writes them and export reads them.

The one place ``ovlfuse/image`` touches ``ovlfuse.fs.markers`` and
``ovlfuse.fs.statoverride``: the forms themselves are defined there.

Written forms, best first, as the kernel's overlay driver would write them:
a whiteout is a char 0:0 device (an ordinary user may make one since Linux
5.8), else the OCI ``.wh.NAME`` file; an opaque directory carries
``trusted.overlay.opaque`` (root) or ``user.overlay.opaque`` (an ordinary
user, read by the kernel with ``-o userxattr`` and by ovlfuse), else holds
``.wh..wh..opq``.  Owners, modes and device types a user cannot give an
object are kept in ``user.containers.override_stat`` records, as rootless
podman's stores keep them.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from ovlfuse.fs import markers, statoverride
from ovlfuse.fs.layers import in_user_namespace
from ovlfuse.sys.safeio import fd_path, get_xattr

WH_PREFIX = markers.WH_PREFIX
OPAQUE_FILE = markers.OPAQUE_FILE
AUFS_META_PREFIX = WH_PREFIX + WH_PREFIX  # .wh..wh.plnk and the like: AUFS bookkeeping, never content
RECORD = statoverride.CONTAINERS
_REFUSED = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)


def is_bookkeeping_xattr(name: str) -> bool:
    """Overlay markers and stat records: written by the store's own rules, never taken from an archive."""
    return markers.is_private_xattr(name) or name in statoverride.NAMES


@dataclass
class Writer:
    """How one import writes markers; it learns what the filesystem and the user allow on first use."""

    privileged: bool  # may set owners, trusted.* xattrs and device nodes
    userxattr: bool  # opaque dirs marked in user.overlay.*, as the kernel reads them with -o userxattr
    device_whiteouts: bool = True
    opaque_xattrs: bool = True
    fallbacks: set[str] = field(default_factory=set)  # forms used instead of the kernel's, for the summary

    @classmethod
    def for_this_process(cls) -> "Writer":
        """Root writes the kernel's privileged forms; an ordinary user, or root of a user namespace, the
        ``userxattr`` ones (``trusted.*`` is refused there)."""
        root = os.geteuid() == 0
        return cls(privileged=root, userxattr=not root or in_user_namespace())

    def whiteout(self, dirfd: int, name: bytes) -> None:
        """Hide ``name`` of the layers below."""
        if self.device_whiteouts:
            if markers.try_make_whiteout(dirfd, name):
                return
            self.device_whiteouts = False
            self.fallbacks.add("whiteouts as .wh. files (char 0:0 devices refused)")
        markers.make_whiteout_file(dirfd, name)

    def opaque(self, dirfd: int, name: bytes) -> None:
        """Mark directory ``name`` opaque: the layers below no longer merge into it."""
        if self.opaque_xattrs:
            try:
                markers.set_opaque(dirfd, name, userxattr=self.userxattr)
                return
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self.opaque_xattrs = False
                self.fallbacks.add("opaque dirs as .wh..wh..opq files (overlay xattrs refused)")
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            os.close(os.open(OPAQUE_FILE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd))
        finally:
            os.close(fd)

    @staticmethod
    def record(dirfd: int, name: bytes | None, uid: int, gid: int, mode: int, rdev: int = 0) -> None:
        """Keep owner, mode (with type bits) and device number in the object's stat override record."""
        value = statoverride.format_record(statoverride.Stored(uid, gid, mode, rdev))
        os.setxattr(fd_path(dirfd, name), RECORD, value, follow_symlinks=name is None)


    @classmethod
    def record_path(cls, path: str, uid: int, gid: int, mode: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            cls.record(fd, None, uid, gid, mode)
        finally:
            os.close(fd)


def is_whiteout_device(st: os.stat_result) -> bool:
    return markers.is_device_whiteout(st)


def is_opaque(dirfd: int, name: bytes | None) -> bool:
    """``overlay.opaque`` = ``y`` in either namespace (``x`` only says the dir holds xattr whiteouts)."""
    return markers.opaque_value(dirfd, name) == b"y"


def holds_xattr_whiteouts(dirfd: int) -> bool:
    return markers.opaque_value(dirfd) == b"x"


def is_xattr_whiteout(dirfd: int, name: bytes, st: os.stat_result) -> bool:
    return markers.is_xattr_whiteout(dirfd, name, st)


class Records:
    """A layer's stat override records, if its root says it keeps them (as fuse-overlayfs decides)."""

    def __init__(self, layer_fd: int) -> None:
        self.name = statoverride.layer_marker(layer_fd)

    def apply(self, dirfd: int, name: bytes | None, st: os.stat_result) -> tuple[int, int, int, int]:
        """(uid, gid, mode with type bits, rdev) of an object: its record's where it has one."""
        real = statoverride.Stored.of(st)
        if self.name is not None and not stat.S_ISLNK(st.st_mode):
            value = get_xattr(dirfd, name, self.name)
            parsed = statoverride.parse(value, real) if value is not None else None
            if parsed is not None:
                return parsed.uid, parsed.gid, parsed.mode, parsed.rdev
        return real.uid, real.gid, real.mode, real.rdev
