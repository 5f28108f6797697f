"""Inodes of the merged view: the kernel's node table, attributes and xattrs.

FUSE node ids are the inode numbers the merged view reports (pyfuse3 uses
``st_ino`` for both), so hard links share a node and ``readdir``'s d_ino
equals ``st_ino``.  The table only counts the kernel's references; what a node
*is* lives in its ``Entry`` (see ``namei``), so dropping a node on FORGET loses
nothing that a new lookup cannot give back.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

import pyfuse3

from ovlfuse.markers import is_private_xattr
from ovlfuse.namei import Entry
from ovlfuse.safeio import get_xattr, list_xattrs, open_beneath

# Layers do not change under a mount, and the write path invalidates what it
# changes, so the kernel may keep entries and attributes for a long time.
CACHE_TIMEOUT = 86400.0


def entry_attributes(entry: Entry) -> pyfuse3.EntryAttributes:
    """What the kernel is told about ``entry``."""
    st = entry.st
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = entry.ino
    attr.generation = 0
    attr.entry_timeout = CACHE_TIMEOUT
    attr.attr_timeout = CACHE_TIMEOUT
    attr.st_mode = st.st_mode
    # The kernel's root always merges at least two layers, so it reports 1 too.
    attr.st_nlink = 1 if entry.merged or not entry.path else st.st_nlink
    attr.st_uid = st.st_uid
    attr.st_gid = st.st_gid
    attr.st_rdev = st.st_rdev
    attr.st_size = st.st_size
    attr.st_blksize = st.st_blksize
    attr.st_blocks = st.st_blocks
    attr.st_atime_ns = st.st_atime_ns
    attr.st_mtime_ns = st.st_mtime_ns
    attr.st_ctime_ns = st.st_ctime_ns
    return attr


def negative_entry() -> pyfuse3.EntryAttributes:
    """A cacheable "no such name" (st_ino 0): the kernel remembers it for CACHE_TIMEOUT."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 0
    attr.entry_timeout = CACHE_TIMEOUT
    return attr


@dataclass(slots=True, eq=False)
class Node:
    entry: Entry
    nlookup: int = 0
    symlink: bytes | None = None  # target, read once (layers do not change)


class NodeTable:
    """FUSE node id -> Node, with the kernel's lookup counts."""

    def __init__(self, root: Entry) -> None:
        self.root = Node(root, nlookup=1)
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: self.root}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def remember(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """Count one kernel reference to ``entry`` and return its attributes."""
        node = self._nodes.get(entry.ino)
        if node is None:
            node = self._nodes[entry.ino] = Node(entry)
        elif node.entry is not entry:
            node.entry = entry  # another name of a hard link, or a rebuilt index
        node.nlookup += 1
        return entry_attributes(entry)

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or node is self.root:
            return
        node.nlookup -= count
        if node.nlookup <= 0:
            del self._nodes[ino]


def _parent_fd(entry: Entry) -> int:
    return open_beneath(entry.layer.fd, entry.parent_path(), os.O_PATH | os.O_DIRECTORY)


def _object_args(entry: Entry, parent_fd: int) -> tuple[int, bytes | None]:
    """(dirfd, name) that reach the entry's object for safeio's xattr calls."""
    if entry.path == b"":
        return entry.layer.fd, None
    return parent_fd, entry.name


def getxattr(entry: Entry, name: str) -> bytes:
    if is_private_xattr(name):
        raise pyfuse3.FUSEError(errno.ENODATA)
    fd = _parent_fd(entry)
    try:
        value = get_xattr(*_object_args(entry, fd), name)
    finally:
        os.close(fd)
    if value is None:
        raise pyfuse3.FUSEError(errno.ENODATA)
    return value


def listxattr(entry: Entry) -> list[bytes]:
    fd = _parent_fd(entry)
    try:
        names = list_xattrs(*_object_args(entry, fd))
    finally:
        os.close(fd)
    return [os.fsencode(n) for n in names if not is_private_xattr(n)]


def readlink(entry: Entry) -> bytes:
    if not stat.S_ISLNK(entry.st.st_mode):
        raise pyfuse3.FUSEError(errno.EINVAL)
    fd = _parent_fd(entry)
    try:
        return os.readlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
