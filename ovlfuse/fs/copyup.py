"""Copy-up: give a lower object an upper copy before it is changed.

Parents go first, as directories with their own metadata; then the object
itself: data (holes stay holes), owner, mode, xattrs (data first, because
writing data and chown clear ``security.capability``), times, and the origin
record.  Every copy is built in the workdir and renamed into place, so a crash
leaves either no copy or a whole one, never a partial one in the merged view.
Big files are copied on a worker thread so other requests keep being served.

A copy-up changes the ``Inode`` in place: every name and open file of the
object sees the copy.  Only a lower hard link splits, as on the kernel
without ``index``: the name copied up gets a new object of its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

import trio

from ovlfuse.fs import origin
from ovlfuse.fs.inode import Attrs, Inode, fail, set_owner, stored_attributes
from ovlfuse.fs.layers import LayerStack
from ovlfuse.fs.markers import shown_xattr
from ovlfuse.fs.namei import Entry, Namei
from ovlfuse.fs.workdir import Workdir
from ovlfuse.fs.statoverride import Stored
from ovlfuse.sys.safeio import RENAME_NOREPLACE, fd_path, list_xattrs, open_beneath, renameat2

# Copies bigger than this run on a worker thread (a thread hop costs ~0.3 ms).
THREAD_COPY_BYTES = 1 << 20
_FICLONE = 0x40049409
_READ_COPY_BYTES = 1 << 20  # one read and write of a copy that copy_file_range cannot do
_RANGE_BYTES = 64 << 20  # one copy_file_range call at most, so progress is reported as a big copy goes


def copy_metadata(st: os.stat_result, src_fd: int, src_name: bytes | None, dst_fd: int, dst_name: bytes,
                  owner: Stored | None = None, records: tuple[str | None, str | None] = (None, None)) -> None:
    """Owner, mode, xattrs and times of ``st`` onto ``dst_name`` in ``dst_fd``, in that order.

    ``owner`` is the owner and mode the copy must show (a stat override
    record's, if the source has one); ``records`` are the stat override
    record names of the source's layer and of the upper.  The source's record
    is not copied; the upper's gets ``owner``, and without one the copy gets
    ``owner`` for real.
    """
    is_link = stat.S_ISLNK(st.st_mode)
    upper_record = records[1]
    owner = owner or Stored.of(st)
    real = Stored.of(st) if upper_record else owner
    os.chown(dst_name, real.uid, real.gid, dir_fd=dst_fd, follow_symlinks=False)
    if not is_link:
        os.chmod(fd_path(dst_fd, dst_name), stat.S_IMODE(real.mode))
    for attr in list_xattrs(src_fd, src_name):
        if shown_xattr(attr) is None or attr in records:
            continue  # overlay bookkeeping (escaped names are user data and go along)
        try:
            value = os.getxattr(fd_path(src_fd, src_name), attr, follow_symlinks=src_name is None)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        os.setxattr(fd_path(dst_fd, dst_name), attr, value, follow_symlinks=False)
    if upper_record is not None:
        set_owner(dst_fd, dst_name, upper_record, owner)
    os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)


def _ignore(*args: object) -> None:
    pass


def copy_data(src: int, dst: int, size: int, sync: bool = False,
              report: Callable[[int], None] = _ignore) -> None:
    """Copy ``size`` bytes, sharing extents where the filesystem can and skipping holes.

    ``sync``: make the data durable before the copy is renamed into place, as
    the kernel's copy-up does, so not even a power cut exposes a partial copy.
    ``report(offset)``: how far the copy has come, as it goes.
    """
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        if os.fstat(dst).st_size != size:  # a copy-up for a truncate wants only the head
            os.ftruncate(dst, size)
    except OSError:
        _copy_extents(src, dst, size, report)
    if sync:
        os.fsync(dst)


def _copy_extents(src: int, dst: int, size: int, report: Callable[[int], None]) -> None:
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole is left
            raise
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_range(src, dst, data, hole, report)
        offset = hole
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, pos: int, end: int, report: Callable[[int], None]) -> None:
    """Copy bytes ``pos``..``end`` to the same offsets.

    copy_file_range does not cross filesystem types (EXDEV: a btrfs lower
    under an ext4 upper, say); plain reads and writes do the copy then.
    """
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, min(end - pos, _RANGE_BYTES), pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.pwrite(dst, os.pread(src, min(end - pos, _READ_COPY_BYTES), pos), pos)
        if n == 0:
            break
        pos += n
        report(pos)


def _rename_keeping_times(work_fd: int, tmp: bytes, upper_parent: int, name: bytes) -> None:
    """Move a finished copy into place; like the kernel, a copy-up leaves the parent's times alone."""
    before = os.stat(fd_path(upper_parent))
    renameat2(work_fd, tmp, upper_parent, name, RENAME_NOREPLACE)
    os.utime(fd_path(upper_parent), ns=(before.st_atime_ns, before.st_mtime_ns))


class CopyUp:
    """Copies lower objects into the upper layer, parents first.

    Each copy is reported to two hooks, for a view of the running mount:
    ``progress(path, done, total)`` when it starts (``done`` 0) and as its
    data is copied (from a worker thread for a big file), and
    ``finished(path, ok)`` once it is in place or abandoned.  ``total`` is
    the number of data bytes to copy (0 for anything but a regular file).
    """

    def __init__(self, stack: LayerStack, namei: Namei, work: Workdir) -> None:
        assert stack.upper is not None
        self.stack = stack
        self.upper = stack.upper
        self.namei = namei
        self.work = work
        self.touched: list[Inode] = []  # directories whose upper part changed (for invalidation)
        self.progress: Callable[[bytes, int, int], None] = _ignore
        self.finished: Callable[[bytes, bool], None] = _ignore

    def upper_dir(self, entry: Entry) -> int:
        """An O_PATH fd of the directory ``entry``'s upper part, copying it (and its parents) up if needed."""
        directory = entry.inode
        if not directory.is_upper:
            assert entry.parent is not None  # the root always has an upper part on a writable mount
            parent_fd = self.upper_dir(entry.parent)
            try:
                self._copy_dir(entry, parent_fd)
            finally:
                os.close(parent_fd)
            self.touched.append(entry.parent.inode)
        return open_beneath(self.upper.fd, entry.path, os.O_PATH | os.O_DIRECTORY)

    def _copy_dir(self, entry: Entry, upper_parent: int) -> None:
        directory = entry.inode
        path = entry.path
        parent_path = path.rpartition(b"/")[0]
        src_parent = open_beneath(directory.layer.fd, parent_path, os.O_PATH | os.O_DIRECTORY)
        tmp = self.work.tmpname()
        self.progress(path, 0, 0)
        ok = False
        try:
            os.mkdir(tmp, 0o700, dir_fd=self.work.fd)
            # O_PATH: the copy needs the directory's metadata only, and a directory with a bad
            # block in its listing may not open for reading at all
            src = open_beneath(directory.layer.fd, path, os.O_PATH | os.O_DIRECTORY)
            try:
                st = os.fstat(src)
                copy_metadata(st, src, None, self.work.fd, tmp, stored_attributes(directory),
                              (directory.layer.override, self.upper.override))
            finally:
                os.close(src)
            origin.record(self.stack, src_parent, entry.name, self.work.fd, tmp)
            _rename_keeping_times(self.work.fd, tmp, upper_parent, entry.name)
            ok = True
        except BaseException:
            self.work.discard(tmp)
            raise
        finally:
            os.close(src_parent)
            self.finished(path, ok)
        directory.layer = self.upper
        directory.parts = (self.upper,) + directory.parts
        directory.st = Attrs(os.stat(entry.name, dir_fd=upper_parent, follow_symlinks=False))

    async def copy_up(self, inode: Inode, size: int | None = None) -> Inode:
        """Give ``inode`` an upper copy; returns the inode its name now names.

        That is ``inode`` itself, changed in place, except for a lower hard
        link named elsewhere too: like the kernel without ``index``, the copy
        is then a new object with its own number, and the other names keep
        the lower one.  ``size``: the copy is about to be truncated to this
        size, so no data past it is copied (an O_TRUNC open of a big lower
        file copies nothing).  An object whose name is gone cannot be copied
        up (EEXIST, as the kernel answers: its name holds something else).
        """
        if inode.is_upper:
            return inode
        if not inode.aliases:
            raise fail(errno.EEXIST)
        entry = inode.aliases[0]
        if inode.parts:
            os.close(self.upper_dir(entry))
            return inode
        assert entry.parent is not None
        upper_parent = self.upper_dir(entry.parent)
        self.touched.append(entry.parent.inode)
        try:
            await self._copy_object(inode, entry, upper_parent, size)
            st = os.stat(entry.name, dir_fd=upper_parent, follow_symlinks=False)
        finally:
            os.close(upper_parent)
        if inode.st.st_nlink > 1:  # the copy is a new object: the kernel reports its own number
            copy = Inode(self.stack.ino(self.upper, st.st_ino), self.upper, st)
            copy.nlookup = 0
            inode.drop_alias(entry)
            entry.inode = copy
            copy.add_alias(entry)
            return copy
        self.stack.copied_inos[st.st_ino] = inode.ino
        inode.layer = self.upper
        inode.st = Attrs(st)
        inode.record = None
        return inode

    async def _copy_object(self, inode: Inode, entry: Entry, upper_parent: int, limit: int | None) -> None:
        st = inode.st
        name = entry.name
        path = entry.path
        src_parent = open_beneath(inode.layer.fd, path.rpartition(b"/")[0], os.O_PATH | os.O_DIRECTORY)
        tmp = self.work.tmpname()
        wfd = self.work.fd
        started = ok = False
        try:
            if stat.S_ISREG(st.st_mode):
                src = open_beneath(inode.layer.fd, path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=wfd)
                    try:
                        size = os.fstat(src).st_size
                        if limit is not None:
                            size = min(size, limit)
                        self.progress(path, 0, size)
                        started = True
                        if size > THREAD_COPY_BYTES:
                            await trio.to_thread.run_sync(copy_data, src, dst, size, True,
                                                          lambda done: self.progress(path, done, size))
                        elif size:  # a small copy inline, its fsync (milliseconds) on a worker thread
                            copy_data(src, dst, size)
                            await trio.to_thread.run_sync(os.fsync, dst)
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            else:
                self.progress(path, 0, 0)
                started = True
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(name, dir_fd=src_parent), tmp, dir_fd=wfd)
                else:  # fifo, socket, device
                    os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=wfd)
            lst = os.stat(name, dir_fd=src_parent, follow_symlinks=False)
            copy_metadata(lst, src_parent, name, wfd, tmp, stored_attributes(inode),
                          (inode.layer.override, self.upper.override))
            origin.record(self.stack, src_parent, name, wfd, tmp)
            _rename_keeping_times(wfd, tmp, upper_parent, name)
            ok = True
        except BaseException:
            self.work.discard(tmp)
            raise
        finally:
            os.close(src_parent)
            if started:
                self.finished(path, ok)
