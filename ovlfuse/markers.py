"""Whiteout and opaque markers: every form the kernel and the OCI tools use.

Read side only decides *what a directory entry means*; the merge itself lives
in ``namei``.  See shared spec section 2 for the table of forms.
"""

from __future__ import annotations

import os
import stat

from ovlfuse.safeio import get_xattr

WH_PREFIX = b".wh."
OPAQUE_FILE = b".wh..wh..opq"
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")


def is_private_xattr(name: str) -> bool:
    """Overlay bookkeeping that the merged view never shows."""
    return name.startswith(OVERLAY_XATTR_PREFIXES)


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
