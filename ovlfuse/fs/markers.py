"""What overlay markers mean: the one vocabulary of whiteouts, opaque directories and overlay xattrs.

Every reader of a layer (lookup, the write path, ``which``, ``layers``,
``diff``, ``demo``) asks this module what a directory entry or an xattr is,
so each rule (what a whiteout looks like, when a directory is opaque, which
xattrs are overlay bookkeeping) is written once.  See the shared spec's
table of forms: the kernel's char 0:0 whiteouts and ``overlay.opaque``
xattrs (``trusted.`` as root, ``user.`` with ``-o userxattr``), the kernel's
xattr whiteouts (Linux >= 6.7), and the OCI ``.wh.`` files.
"""

from __future__ import annotations

import enum
import errno
import os
import stat

from ovlfuse.sys.safeio import fd_path, get_xattr

NAME_MAX = 255
WH_PREFIX = b".wh."
OPAQUE_FILE = b".wh..wh..opq"

_TRUSTED = "trusted.overlay."
_USER = "user.overlay."
_ESCAPED = "trusted.overlay.overlay."


class OvlXattr(enum.Enum):
    """The overlay xattrs, as the kernel's ``enum ovl_xattr`` names them; each has a trusted and a user form."""

    OPAQUE = "opaque"
    REDIRECT = "redirect"
    ORIGIN = "origin"
    IMPURE = "impure"
    NLINK = "nlink"
    UPPER = "upper"
    UUID = "uuid"
    METACOPY = "metacopy"
    PROTATTR = "protattr"
    WHITEOUT = "whiteout"

    def name_for(self, userxattr: bool) -> str:
        """The name this mount writes: ``user.overlay.*`` with ``-o userxattr``, else ``trusted.overlay.*``."""
        return (_USER if userxattr else _TRUSTED) + self.value

    @property
    def forms(self) -> tuple[str, str]:
        """Both names, trusted first: ovlfuse reads stores written either way."""
        return _TRUSTED + self.value, _USER + self.value

    def read(self, dirfd: int, name: bytes | None) -> bytes | None:
        """The value in either form on ``name`` in ``dirfd`` (or on ``dirfd``), trusted first; None if neither."""
        for attr in self.forms:
            value = get_xattr(dirfd, name, attr)
            if value is not None:
                return value
        return None


# Bookkeeping the kernel writes for itself into an upper dir; a comparison of upper dirs ignores it.
BOOKKEEPING = frozenset(n for x in (OvlXattr.ORIGIN, OvlXattr.IMPURE, OvlXattr.UUID) for n in x.forms)


# --- what a directory entry is ----------------------------------------------------

class Marker(enum.Enum):
    """What a directory entry of a layer means to the merge."""

    OBJECT = "object"  # a file, directory, symlink or special file of the merged view
    WHITEOUT = "whiteout"  # hides its name in the layers below
    OPAQUE = "opaque"  # .wh..wh..opq: its directory is opaque


def marker_name(name: bytes) -> tuple[Marker, bytes] | None:
    """An OCI marker told by its name alone: (OPAQUE, b"") or (WHITEOUT, hidden name); None for other names."""
    if not name.startswith(WH_PREFIX):
        return None
    if name == OPAQUE_FILE:
        return Marker.OPAQUE, b""
    return Marker.WHITEOUT, name[len(WH_PREFIX):]


def is_reserved(name: bytes) -> bool:
    """Names ovlfuse would read back as OCI markers: never names of the merged view."""
    return name.startswith(WH_PREFIX)


def is_device_whiteout(st: os.stat_result) -> bool:
    """The kernel's whiteout: a char device 0:0 (never judged by nlink: the kernel links them all to one)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_xattr_whiteout(dirfd: int, name: bytes, st: os.stat_result) -> bool:
    """The kernel's (>= 6.7) xattr whiteout: an empty regular file carrying ``overlay.whiteout``.

    Honoured only in lower directories marked ``overlay.opaque = x``
    (``holds_xattr_whiteouts``), as the kernel reads them.
    """
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    return OvlXattr.WHITEOUT.read(dirfd, name) is not None


def is_whiteout(dirfd: int, name: bytes, st: os.stat_result, xattr_whiteouts: bool) -> bool:
    """Whether an entry found by its stat is a whiteout (the name-based OCI form is ``marker_name``'s)."""
    return is_device_whiteout(st) or (xattr_whiteouts and is_xattr_whiteout(dirfd, name, st))


def classify(dirfd: int, name: bytes, st: os.stat_result, xattr_whiteouts: bool) -> tuple[Marker, bytes]:
    """What one entry of a layer directory means: (kind, the name it stands for in the merged view)."""
    by_name = marker_name(name)
    if by_name is not None:
        return by_name
    if is_whiteout(dirfd, name, st, xattr_whiteouts):
        return Marker.WHITEOUT, name
    return Marker.OBJECT, name


def opaque_value(dirfd: int, name: bytes | None = None) -> bytes:
    """First byte of ``overlay.opaque`` (b"y" opaque, b"x" holds xattr whiteouts), or b""."""
    value = OvlXattr.OPAQUE.read(dirfd, name)
    return value[:1] if value else b""


def holds_xattr_whiteouts(dirfd: int) -> bool:
    """A directory whose xattr whiteouts count (``overlay.opaque = x``)."""
    return opaque_value(dirfd) == b"x"


def is_opaque_dir(parent_fd: int, name: bytes) -> bool:
    """Whether the directory ``name`` hides the layers below it: ``overlay.opaque = y`` or ``.wh..wh..opq`` inside."""
    if opaque_value(parent_fd, name) == b"y":
        return True
    try:
        os.stat(name + b"/" + OPAQUE_FILE, dir_fd=parent_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


# --- xattrs of the merged view ----------------------------------------------------------

def is_private_xattr(name: str) -> bool:
    """Overlay bookkeeping that the merged view never shows."""
    return name.startswith((_TRUSTED, _USER)) and not name.startswith(_ESCAPED)


def stored_xattr(name: str) -> str | None:
    """The layer xattr behind a merged-view xattr name (None: the merged view has none of that name).

    As the kernel does (Linux >= 6.7), ``trusted.overlay.X`` set through the
    merged view is kept escaped as ``trusted.overlay.overlay.X``, so a nested
    overlay's markers never act on this one.
    """
    if name.startswith(_TRUSTED):
        return _ESCAPED + name[len(_TRUSTED):]
    if is_private_xattr(name):
        return None
    return name


def shown_xattr(stored: str) -> str | None:
    """The merged-view name of a layer xattr, or None for overlay bookkeeping."""
    if stored.startswith(_ESCAPED):
        return _TRUSTED + stored[len(_ESCAPED):]
    if is_private_xattr(stored):
        return None
    return stored


# --- writing markers (the upper dir's format: the kernel's own) ----------------------------

def set_opaque(dirfd: int, name: bytes, userxattr: bool) -> None:
    """Mark ``name`` in ``dirfd`` opaque: lower directories of its name no longer merge in."""
    os.setxattr(fd_path(dirfd, name), OvlXattr.OPAQUE.name_for(userxattr), b"y", follow_symlinks=False)


def make_whiteout(dirfd: int, name: bytes) -> None:
    """Create the kernel's whiteout, a char device 0:0 (allowed unprivileged since Linux 5.8)."""
    os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dirfd)


def try_make_whiteout(dirfd: int, name: bytes) -> bool:
    """Make a char 0:0 whiteout; False where the kernel or filesystem refuses one.

    They are refused on Linux before 5.8 for an ordinary user, or on an upper
    filesystem without device nodes; the OCI ``.wh.`` files are the fallback.
    """
    try:
        make_whiteout(dirfd, name)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    return True


def whiteout_file_exists(dirfd: int, name: bytes) -> bool:
    """Whether ``.wh.NAME`` is in ``dirfd`` (it cannot be, for a name within 4 bytes of NAME_MAX)."""
    marker = WH_PREFIX + name
    if len(marker) > NAME_MAX:
        return False
    try:
        os.stat(marker, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def make_whiteout_file(dirfd: int, name: bytes) -> None:
    """The OCI whiteout ``.wh.NAME``: hides NAME below, not NAME in its own layer."""
    os.close(os.open(WH_PREFIX + name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dirfd))


def remove_whiteout_file(dirfd: int, name: bytes) -> None:
    """Drop ``.wh.NAME`` once NAME itself is in the layer (it would only hide what is already hidden)."""
    if len(WH_PREFIX + name) > NAME_MAX:
        return  # no such marker can exist
    try:
        os.unlink(WH_PREFIX + name, dir_fd=dirfd)
    except FileNotFoundError:
        pass
