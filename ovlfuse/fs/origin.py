"""Where a copied-up object came from: the ``trusted.overlay.origin`` record.

The kernel keeps reporting a copied-up object's lower inode number, and finds
that number again after a remount through ``trusted.overlay.origin``, a file
handle of the lower object in its own on-disk format.  ovlfuse writes and
reads the same record, so inode numbers survive copy-up and remounts whether
the upper dir is served by ovlfuse or by the kernel.

Format (as the kernel writes it on a little-endian machine, all layers on one
filesystem): version 0, magic 0xfb, total length, flags 0, handle type, a
16-byte uuid (zero: the kernel leaves it null when every layer shares one
filesystem), then the handle bytes.  Writing needs ``trusted.*`` (root); on
other set-ups no record is written and numbers are stable within a mount only.
"""

from __future__ import annotations

import os
import stat
import struct

from ovlfuse.fs.layers import LayerStack
from ovlfuse.sys.safeio import fd_path, get_xattr, name_to_handle, open_beneath, open_by_handle

ORIGIN_XATTR = "trusted.overlay.origin"
_HEADER = struct.Struct("<BBBBB16s")
_VERSION, _MAGIC = 0, 0xFB


def encode(dirfd: int, name: bytes) -> bytes:
    """The origin record of ``name`` in ``dirfd`` (a lower object)."""
    handle_type, handle = name_to_handle(dirfd, name)
    return _HEADER.pack(_VERSION, _MAGIC, _HEADER.size + len(handle), 0, handle_type, bytes(16)) + handle


def record(stack: LayerStack, lower_dirfd: int, lower_name: bytes, upper_dirfd: int, upper_name: bytes) -> None:
    """Write the origin of a fresh copy (best effort: only where the kernel would read it back)."""
    if not stack.samefs or os.geteuid() != 0:
        return
    try:
        value = encode(lower_dirfd, lower_name)
        os.setxattr(fd_path(upper_dirfd, upper_name), ORIGIN_XATTR, value, follow_symlinks=False)
    except OSError:
        pass  # no file handles or no trusted xattrs here: numbers hold within this mount only


def lower_ino(stack: LayerStack, upper_dirfd: int, name: bytes, st: os.stat_result) -> int | None:
    """The inode number the kernel reports for an upper non-directory with an origin, or None.

    Like the kernel (index off), the lower number is used only while the lower
    object has a single link; a copied-up hard link reports its own number.
    """
    if not stack.samefs or len(stack.layers) < 2:
        return None
    value = get_xattr(upper_dirfd, name, ORIGIN_XATTR)
    if value is None or len(value) < _HEADER.size:
        return None
    version, magic, length, _flags, handle_type, _uuid = _HEADER.unpack_from(value)
    if version != _VERSION or magic != _MAGIC or length != len(value):
        return None
    try:
        mount_fd = open_beneath(stack.layers[1].fd, b"", os.O_RDONLY | os.O_DIRECTORY)  # O_PATH will not do
    except OSError:
        return None
    try:
        fd = open_by_handle(mount_fd, handle_type, value[_HEADER.size:])
    except OSError:
        return None  # the lower object is gone
    finally:
        os.close(mount_fd)
    try:
        lower = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_IFMT(lower.st_mode) != stat.S_IFMT(st.st_mode) or lower.st_nlink != 1:
        return None
    return lower.st_ino
