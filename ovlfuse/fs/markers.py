"""Whiteout and opaque markers: every form the kernel and the OCI tools use.

Read side only decides *what a directory entry means*; the merge itself lives
in ``namei``.  See shared spec section 2 for the table of forms.
"""

from __future__ import annotations

import errno
import os
import stat

from ovlfuse.sys.safeio import fd_path, get_xattr

NAME_MAX = 255
WH_PREFIX = b".wh."
OPAQUE_FILE = b".wh..wh..opq"
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")


_TRUSTED_PREFIX = "trusted.overlay."
_ESCAPED_PREFIX = "trusted.overlay.overlay."


def is_private_xattr(name: str) -> bool:
    """Overlay bookkeeping that the merged view never shows."""
    return name.startswith(OVERLAY_XATTR_PREFIXES) and not name.startswith(_ESCAPED_PREFIX)


def stored_xattr(name: str) -> str | None:
    """The layer xattr behind a merged-view xattr name (None: the merged view has none).

    As the kernel does (Linux >= 6.7), ``trusted.overlay.X`` set through the
    merged view is kept escaped as ``trusted.overlay.overlay.X``, so a nested
    overlay's markers never act on this one.
    """
    if name.startswith(_TRUSTED_PREFIX):
        return _ESCAPED_PREFIX + name[len(_TRUSTED_PREFIX):]
    if is_private_xattr(name):
        return None
    return name


def shown_xattr(stored: str) -> str | None:
    """The merged-view name of a layer xattr, or None for overlay bookkeeping."""
    if stored.startswith(_ESCAPED_PREFIX):
        return _TRUSTED_PREFIX + stored[len(_ESCAPED_PREFIX):]
    if is_private_xattr(stored):
        return None
    return stored


def is_device_whiteout(st: os.stat_result) -> bool:
    """The kernel's whiteout: a char device 0:0 (never judged by nlink)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque_value(dirfd: int, name: bytes | None = None) -> bytes:
    """First byte of the overlay opaque xattr (b"y" opaque, b"x" holds xattr whiteouts), or b""."""
    for attr in OPAQUE_XATTRS:
        value = get_xattr(dirfd, name, attr)
        if value:
            return value[:1]
    return b""


def is_xattr_whiteout(dirfd: int, name: bytes, st: os.stat_result) -> bool:
    """Kernel >= 6.7 whiteout: an empty regular file carrying overlay.whiteout."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    return any(get_xattr(dirfd, name, attr) is not None for attr in WHITEOUT_XATTRS)


# --- writing (the upper dir's format, shared spec section 5) -----------------

def opaque_xattr(userxattr: bool) -> str:
    """``trusted.overlay.opaque`` as root; ``user.overlay.opaque`` for a ``userxattr`` mount."""
    return OPAQUE_XATTRS[1] if userxattr else OPAQUE_XATTRS[0]


def set_opaque(dirfd: int, name: bytes, userxattr: bool) -> None:
    """Mark ``name`` in ``dirfd`` opaque: lower directories of its name no longer merge in."""
    os.setxattr(fd_path(dirfd, name), opaque_xattr(userxattr), b"y", follow_symlinks=False)


def make_whiteout(dirfd: int, name: bytes) -> None:
    """Create a whiteout, the kernel's char device 0:0 (allowed unprivileged since Linux 5.8)."""
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
