"""The merge engine: every FUSE request of the merged view, without FUSE.

``operations.OverlayOperations`` forwards requests here one to one, so the
engine can be driven directly in tests.  It owns the layer stack, the merged
index cache (``namei``), the node table (``inode``), open directories
(``readdir``) and open files (``file``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

import pyfuse3

from ovlfuse import inode
from ovlfuse.file import OpenFiles
from ovlfuse.inode import NodeTable, entry_attributes, negative_entry
from ovlfuse.layers import LayerStack
from ovlfuse.namei import Entry, Namei
from ovlfuse.readdir import DirHandles


class MergeEngine:
    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        self.namei = Namei(stack)
        self.nodes = NodeTable(self.namei.root)
        self.dirs = DirHandles()
        self.files = OpenFiles()

    def _entry(self, ino: int) -> Entry:
        return self.nodes.get(ino).entry

    def _directory(self, ino: int) -> Entry:
        entry = self._entry(ino)
        if not stat.S_ISDIR(entry.st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return entry

    # --- namei -----------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        try:
            entry = self.namei.lookup(self._directory(parent), name)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        if entry is None:
            return negative_entry()
        return self.nodes.remember(entry)

    def forget(self, inodes: list[tuple[int, int]]) -> None:
        for ino, count in inodes:
            self.nodes.forget(ino, count)

    # --- attributes --------------------------------------------------------
    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        return entry_attributes(self._entry(ino))

    def readlink(self, ino: int) -> bytes:
        node = self.nodes.get(ino)
        if node.symlink is None:
            node.symlink = inode.readlink(node.entry)
        return node.symlink

    def getxattr(self, ino: int, name: bytes) -> bytes:
        return inode.getxattr(self._entry(ino), os.fsdecode(name))

    def listxattr(self, ino: int) -> list[bytes]:
        return inode.listxattr(self._entry(ino))

    def statfs(self) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.stack.layers[0].fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(sv, field))
        return data

    # --- readdir -----------------------------------------------------------
    def opendir(self, ino: int) -> int:
        directory = self._directory(ino)
        return self.dirs.open(directory, self.namei.parent(directory), self.namei.index(directory))

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Entry, int, bool]]:
        """(name, entry, next offset, counts) from ``start``.

        ``counts``: the kernel takes a reference to the entry when it is sent
        (readdirplus), so call ``nodes.remember`` for it; "." and ".." are not counted.
        """
        for offset, (name, entry) in enumerate(self.dirs.entries(fh, start), start + 1):
            yield name, entry, offset, name not in (b".", b"..")

    def releasedir(self, fh: int) -> None:
        self.dirs.release(fh)

    # --- file I/O ------------------------------------------------------------
    def open(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        entry = self._entry(ino)
        if stat.S_ISDIR(entry.st.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            return self.files.open(entry, flags)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self.files.read(fh, offset, size)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    def close(self) -> None:
        self.stack.close()
