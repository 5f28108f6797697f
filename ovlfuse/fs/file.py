"""File I/O on the object an open file was opened for.

Files opened for writing are always upper objects (the engine copies them up
first); writes go straight to them at the offset the kernel gives.  Reads are
served inline when the data is already in the page cache (one
``preadv2(RWF_NOWAIT)``) and otherwise on a worker thread, so a cold read from
disk never stalls the trio loop that serves every other request.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

import trio

from ovlfuse.fs.inode import Inode, fail
from ovlfuse.fs.layers import Layer

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
# Flags passed on to the upper file; O_APPEND is not: the kernel sends the offset.
PASSED_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME


class Opened(NamedTuple):
    """An open file as the kernel is told of it."""

    fh: int
    keep_cache: bool  # the page cache survives across opens
    direct_io: bool  # writes bypass a page cache another name of the object shares


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    """Read until ``size`` bytes or the end of the file.

    A short count before the end means the read stopped at an error (a bad
    block in a layer); FUSE would take the short reply for the end of the
    file, so the read goes on and the error is raised instead.
    """
    chunks = []
    while size:
        data = os.pread(fd, size, offset)
        if not data:
            break
        chunks.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(chunks)


class OpenFiles:
    """fh (a real file descriptor) -> the inode it was opened for, and the layer it was opened in.

    A file opened before its object's copy-up follows the copy (as on the
    kernel's overlay): the first read after the copy-up reopens it in the
    upper layer, under the same fh.
    """

    def __len__(self) -> int:
        return len(self._files)

    def __init__(self) -> None:
        self._files: dict[int, tuple[Inode, Layer]] = {}
        self._nowait = True

    def open(self, inode: Inode, flags: int, direct_io: bool = False) -> Opened:
        if flags & WRITE_FLAGS and not inode.is_upper:
            raise fail(errno.EROFS)
        opened = self.adopt(inode.open(flags & PASSED_FLAGS), inode, direct_io)
        if flags & os.O_TRUNC:
            inode.stale = True
        return opened

    def adopt(self, fd: int, inode: Inode, direct_io: bool = False) -> Opened:
        self._files[fd] = (inode, inode.layer)
        return Opened(fd, not direct_io, direct_io)

    def inode(self, fh: int) -> Inode:
        try:
            return self._files[fh][0]
        except KeyError:
            raise fail(errno.EBADF) from None

    def write(self, fh: int, offset: int, data: bytes) -> int:
        inode = self.inode(fh)
        written = os.pwrite(fh, data, offset)
        inode.stale = True
        return written

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.inode(fh)
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    def _follow_copy_up(self, fh: int) -> None:
        inode, layer = self._files[fh]
        if inode.layer is not layer:
            fd = inode.open(os.O_RDONLY)
            try:
                os.dup2(fd, fh)
            finally:
                os.close(fd)
            self._files[fh] = (inode, inode.layer)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        self.inode(fh)
        self._follow_copy_up(fh)
        if not self._nowait:
            return await trio.to_thread.run_sync(_pread_full, fh, size, offset)
        buf = bytearray(size)
        try:
            n = os.preadv(fh, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            n = -1  # nothing cached at offset
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self._nowait = False
            return await self.read(fh, offset, size)
        if n == size:
            return bytes(buf)
        if n >= 0 and offset + n >= os.fstat(fh).st_size:
            return bytes(memoryview(buf)[:n])  # end of file
        done = max(n, 0)
        rest = await trio.to_thread.run_sync(_pread_full, fh, size - done, offset + done)
        return bytes(memoryview(buf)[:done]) + rest

    def release(self, fh: int) -> None:
        if self._files.pop(fh, None) is not None:
            os.close(fh)

    def close(self) -> None:
        for fh in list(self._files):
            self.release(fh)
