"""File I/O on the object a merged name resolves to.

Files opened for writing are always upper objects (the engine copies them up
first); writes go straight to them at the offset the kernel gives.  Reads are
served inline when the data is already in the page cache (one
``preadv2(RWF_NOWAIT)``) and otherwise on a worker thread, so a cold read from
disk never stalls the trio loop that serves every other request.
"""

from __future__ import annotations

import errno
import os

import pyfuse3
import trio

from ovlfuse.fs.layers import Layer
from ovlfuse.fs.namei import Entry
from ovlfuse.sys.safeio import open_beneath

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
# Flags passed on to the upper file; O_APPEND is not: the kernel sends the offset.
_PASSED_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME


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
    """fh (a real file descriptor) -> the entry it was opened for, and the layer it was opened in.

    A file opened before its copy-up follows the copy (as on the kernel's
    overlay): the first read after the copy-up reopens it in the upper layer,
    under the same fh.
    """

    def __init__(self) -> None:
        self._files: dict[int, tuple[Entry, Layer]] = {}
        self._nowait = True

    def open(self, entry: Entry, flags: int, direct_io: bool = False) -> pyfuse3.FileInfo:
        """Open the entry's object; ``direct_io`` keeps writes out of a page cache shared with other names."""
        if flags & WRITE_FLAGS and not entry.layer.is_upper:
            raise pyfuse3.FUSEError(errno.EROFS)
        fd = open_beneath(entry.layer.fd, entry.path, (flags & _PASSED_FLAGS) | os.O_NOFOLLOW)
        return self.adopt(fd, entry, direct_io)

    def adopt(self, fd: int, entry: Entry, direct_io: bool = False) -> pyfuse3.FileInfo:
        self._files[fd] = (entry, entry.layer)
        return pyfuse3.FileInfo(fh=fd, keep_cache=not direct_io, direct_io=direct_io)

    def fd_for(self, entry: Entry) -> int | None:
        """An open descriptor of ``entry``'s object, if any: it outlives the object's names."""
        for fh, (opened, layer) in self._files.items():
            if opened is entry and layer is entry.layer:
                return fh
        return None

    def entry(self, fh: int) -> Entry:
        try:
            return self._files[fh][0]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def write(self, fh: int, offset: int, data: bytes) -> int:
        self.entry(fh)
        return os.pwrite(fh, data, offset)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.entry(fh)
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    def _follow_copy_up(self, fh: int) -> None:
        entry, layer = self._files[fh]
        if entry.layer is not layer:
            fd = open_beneath(entry.layer.fd, entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.dup2(fd, fh)
            finally:
                os.close(fd)
            self._files[fh] = (entry, entry.layer)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
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
