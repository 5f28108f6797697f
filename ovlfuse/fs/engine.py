"""The merge engine: every request of the merged view, without FUSE.

``fuse.operations`` translates each FUSE request into one call here, so the
engine can be driven directly in tests.  It works on node ids and names as
the kernel sends them and raises ``OSError`` for a failed call.  It owns the
lookup state (``namei``: names, indexes and the node table of inodes), open
directories (``readdir``) and open files (``file``); with an upper layer also
the workdir, copy-up (``copyup``) and directory operations (``dirops``).

Changes run one at a time under a write lock (a copy-up may wait for a
worker thread; reads go on meanwhile).  Each change updates the inodes and
names it touches, then tells the kernel what it cannot know by itself:
attributes of directories a copy-up changed, and names whose object a
copy-up replaced.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

import trio

from ovlfuse.errors import OvlError
from ovlfuse.fs import inode as inodes
from ovlfuse.fs.copyup import CopyUp
from ovlfuse.fs.dirops import DirOps, NewObject
from ovlfuse.fs.file import WRITE_FLAGS, OpenFiles, Opened
from ovlfuse.fs.inode import ROOT, Attributes, Inode, SetAttr, View, attributes, fail, negative_entry, stored_attributes
from ovlfuse.fs.layers import LayerStack
from ovlfuse.fs.markers import stored_xattr
from ovlfuse.fs.namei import Entry, Namei
from ovlfuse.fs.readdir import DirHandles
from ovlfuse.fs.statoverride import Stored
from ovlfuse.fs.workdir import Workdir
from ovlfuse.sys.safeio import RENAME_EXCHANGE


class KernelCaches:
    """Invalidation of the kernel's caches; the FUSE adapter implements it (nothing to do without a session)."""

    def attributes(self, nodeid: int) -> None:
        pass

    def entry(self, parent: int, name: bytes) -> None:
        pass


class MergeEngine:
    def __init__(self, stack: LayerStack, view: View | None = None, volatile: bool = False) -> None:
        self.stack = stack
        self.view = view or View()
        self.volatile = volatile  # fsync and fsyncdir do nothing, as with the kernel's -o volatile
        self.namei = Namei(stack)
        self.nodes = self.namei.nodes
        self.dirs = DirHandles()
        self.files = OpenFiles()
        self.kernel = KernelCaches()
        self._lock = trio.Lock()
        self.copyup: CopyUp | None = None
        self.dirops: DirOps | None = None
        self.work: Workdir | None = None
        if stack.upper is not None and stack.workdir is not None:
            try:
                self.work = Workdir(stack.workdir)
            except OSError as e:
                stack.close()
                raise OvlError(f"cannot use workdir {stack.workdir}: {e.strerror}; "
                               "it must be a writable directory on the upper dir's filesystem") from None
            self.copyup = CopyUp(stack, self.namei, self.work)
            self.dirops = DirOps(stack, self.namei, self.copyup, self.work)

    def close(self) -> None:
        self.files.close()
        self.nodes.close()
        if self.work is not None:
            self.work.close()
        self.stack.close()

    def _directory(self, nodeid: int) -> Inode:
        inode = self.nodes.get(nodeid)
        if not inode.parts:
            raise fail(errno.ENOTDIR)
        return inode

    def _attributes(self, inode: Inode) -> Attributes:
        if inode.stale:
            inode.refresh()
        return attributes(inode, self.view)

    def remember(self, entry: Entry) -> Attributes:
        """Count the kernel's new reference to ``entry``'s inode; what it is told about it."""
        inode = self.nodes.remember(entry)
        if inode.nlookup == 1:
            self.namei.held(inode)
        return self._attributes(inode)

    # --- namei ------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Attributes:
        entry = self.namei.lookup(self._directory(parent), name)
        if entry is None:
            return negative_entry()
        return self.remember(entry)

    def forget(self, inodes_: list[tuple[int, int]]) -> None:
        for nodeid, count in inodes_:
            gone = self.nodes.forget(nodeid, count)
            if gone is not None:
                self.namei.released(gone)
                if gone.is_upper and gone.st.st_nlink == 0:  # the object is gone: its number may be reused
                    self.stack.copied_inos.pop(gone.st.st_ino, None)

    # --- attributes -------------------------------------------------------------------------
    def getattr(self, nodeid: int) -> Attributes:
        inode = self.nodes.get(nodeid)
        inode.refresh()
        return attributes(inode, self.view)

    def readlink(self, nodeid: int) -> bytes:
        inode = self.nodes.get(nodeid)
        if inode.symlink is None:
            inode.symlink = inodes.readlink(inode)
        return inode.symlink

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        return inodes.getxattr(self.nodes.get(nodeid), os.fsdecode(name))

    def listxattr(self, nodeid: int) -> list[bytes]:
        return inodes.listxattr(self.nodes.get(nodeid))

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.stack.layers[0].fd)

    # --- what the adapter shows of a running mount -------------------------------------------
    def path_of(self, nodeid: int) -> bytes | None:
        """A merged path of node ``nodeid`` (b"" for the root), or None if no name reaches it now."""
        inode = self.nodes.find(nodeid)
        if inode is None or not inode.aliases:
            return None
        return inode.aliases[0].path

    def stats(self) -> dict[str, int]:
        """Sizes of the engine's caches and tables, as flat counts."""
        return {
            "nodes": len(self.nodes),
            "index_dirs": self.namei.indexed_dirs,
            "index_entries": self.namei.cached_entries,
            "index_entries_max": self.namei.max_entries,
            "open_files": len(self.files),
            "open_dirs": len(self.dirs),
        }

    # --- readdir ----------------------------------------------------------------------------
    def opendir(self, nodeid: int) -> int:
        return self.dirs.open(self._directory(nodeid))

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Attributes, int]]:
        """(name, attributes, next offset) from offset ``start``.

        Every entry but "." and ".." counts as a kernel reference (readdirplus);
        one the caller could not send must be given back with ``forget``.
        """
        for name, entry, offset, counts in self.dirs.listing(fh, start, self.namei):
            if counts:
                yield name, self.remember(entry), offset
            else:
                yield name, self._attributes(entry.inode), offset

    def releasedir(self, fh: int) -> None:
        self.dirs.release(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Make the names created or removed in a directory durable (its upper part, if any)."""
        directory = self.dirs.directory(fh)
        if not directory.is_upper or self.volatile:
            return
        fd = directory.open(os.O_RDONLY | os.O_DIRECTORY)
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)

    # --- file I/O ---------------------------------------------------------------------------
    async def open(self, nodeid: int, flags: int) -> Opened:
        inode = self.nodes.get(nodeid)
        if inode.parts:
            raise fail(errno.EISDIR)
        if not flags & WRITE_FLAGS or self.copyup is None:
            return self.files.open(inode, flags)
        async with self._lock:
            copy = await self._copy_up(inode, 0 if flags & os.O_TRUNC else None)
            # A split hard link's copy is a new object the kernel does not know under this node:
            # keep its writes out of the page cache the other names share.
            return self.files.open(copy, flags, direct_io=copy is not inode)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self.files.read(fh, offset, size)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return self.files.write(fh, offset, data)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.volatile:
            await self.files.fsync(fh, datasync)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    # --- changes ----------------------------------------------------------------------------
    def _ops(self) -> DirOps:
        if self.dirops is None:
            raise fail(errno.EROFS)
        return self.dirops

    def _settle(self) -> None:
        """Tell the kernel about directories whose upper part a copy-up changed."""
        assert self.copyup is not None
        for directory in self.copyup.touched:
            directory.stale = True
            self.kernel.attributes(self.nodes.nodeid(directory))
        self.copyup.touched.clear()

    async def _copy_up(self, inode: Inode, size: int | None = None) -> Inode:
        """Copy ``inode`` up (data up to ``size`` only, if given); the inode its name now names."""
        assert self.copyup is not None
        if inode.is_upper:
            return inode
        entry = inode.aliases[0] if inode.aliases else None
        try:
            copy = await self.copyup.copy_up(inode, size)
        finally:
            self._settle()
        if copy is not inode and entry is not None and entry.parent is not None:
            self.kernel.entry(self.nodes.nodeid(entry.parent.inode), entry.name)  # the name now has another object
        return copy

    def _owner(self, parent: Inode, uid: int, gid: int, mode: int) -> Stored:
        """Owner and mode a new object stores: the caller's ids mapped back, the group of a set-group-ID parent."""
        uid, gid = self.view.ids.stored(uid, gid)
        stored_parent = stored_attributes(parent)
        if stored_parent.mode & stat.S_ISGID:
            gid = stored_parent.gid
        return Stored(uid, gid, mode)

    async def _create(self, parent_id: int, name: bytes, make: NewObject) -> tuple[Attributes, int | None]:
        ops = self._ops()
        async with self._lock:
            parent = self._directory(parent_id)
            entry, fd = ops.create(parent, name, make)
            self._settle()
            return self.remember(entry), fd

    async def create(self, parent_id: int, name: bytes, mode: int, flags: int, uid: int, gid: int,
                     umask: int) -> tuple[Opened, Attributes]:
        parent = self._directory(parent_id)
        make = NewObject(self._owner(parent, uid, gid, stat.S_IFREG | stat.S_IMODE(mode) & ~umask), flags=flags)
        attr, fd = await self._create(parent_id, name, make)
        assert fd is not None
        return self.files.adopt(fd, self.nodes.get(attr.st_ino)), attr

    async def mkdir(self, parent_id: int, name: bytes, mode: int, uid: int, gid: int, umask: int) -> Attributes:
        parent = self._directory(parent_id)
        perms = stat.S_IMODE(mode) & ~umask | (stored_attributes(parent).mode & stat.S_ISGID)
        return (await self._create(parent_id, name, NewObject(self._owner(parent, uid, gid, stat.S_IFDIR | perms))))[0]

    async def mknod(self, parent_id: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    umask: int) -> Attributes:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise fail(errno.EPERM)  # that is a whiteout; the kernel refuses it too
        owner = self._owner(self._directory(parent_id), uid, gid, stat.S_IFMT(mode) | stat.S_IMODE(mode) & ~umask)
        owner = Stored(owner.uid, owner.gid, owner.mode, rdev)
        return (await self._create(parent_id, name, NewObject(owner)))[0]

    async def symlink(self, parent_id: int, name: bytes, target: bytes, uid: int, gid: int) -> Attributes:
        owner = self._owner(self._directory(parent_id), uid, gid, stat.S_IFLNK | 0o777)
        return (await self._create(parent_id, name, NewObject(owner, target=target)))[0]

    async def link(self, nodeid: int, parent_id: int, name: bytes) -> Attributes:
        ops = self._ops()
        async with self._lock:
            inode = self.nodes.get(nodeid)
            parent = self._directory(parent_id)
            ops.check_new(parent, name)
            if not inode.aliases and inode.is_upper:
                raise fail(errno.ENOENT)  # its last name is gone (nlink 0): no new name for it
            inode = await self._copy_up(inode)
            entry, _ = ops.create(parent, name, NewObject(stored_attributes(inode), link=inode))
            self._settle()
            return self.remember(entry)

    async def unlink(self, parent_id: int, name: bytes) -> None:
        ops = self._ops()
        async with self._lock:
            ops.unlink(self._directory(parent_id), name)
            self._settle()

    async def rmdir(self, parent_id: int, name: bytes) -> None:
        ops = self._ops()
        async with self._lock:
            ops.rmdir(self._directory(parent_id), name)
            self._settle()

    async def rename(self, p1_id: int, n1: bytes, p2_id: int, n2: bytes, flags: int) -> None:
        ops = self._ops()
        async with self._lock:
            p1, p2 = self._directory(p1_id), self._directory(p2_id)
            try:
                if flags & RENAME_EXCHANGE:
                    await ops.exchange(p1, n1, p2, n2, self._copy_up)
                else:
                    await ops.rename(p1, n1, p2, n2, flags, self._copy_up)
            finally:
                self._settle()

    async def setattr(self, nodeid: int, change: SetAttr, fh: int | None) -> Attributes:
        self._ops()
        async with self._lock:
            inode = self.files.inode(fh) if fh is not None else self.nodes.get(nodeid)
            inode = await self._copy_up(inode, change.size)
            inodes.set_attributes(inode, change, self.view.ids,
                                  fh if fh is not None and self.files.inode(fh) is inode else None)
            return attributes(inode, self.view)

    def _record_name(self, name: bytes) -> str:
        """The stored name of a changeable xattr; the upper's stat override records are bookkeeping (EPERM)."""
        attr = stored_xattr(os.fsdecode(name))
        if attr is None or attr == self.stack.layers[0].override:
            raise fail(errno.EPERM)
        return attr

    async def setxattr(self, nodeid: int, name: bytes, value: bytes) -> None:
        self._ops()
        attr = self._record_name(name)
        async with self._lock:
            inode = await self._copy_up(self.nodes.get(nodeid))
            inodes.setxattr(inode, attr, value)

    async def removexattr(self, nodeid: int, name: bytes) -> None:
        self._ops()
        attr = self._record_name(name)
        async with self._lock:
            inode = self.nodes.get(nodeid)
            inodes.getxattr(inode, os.fsdecode(name))  # ENODATA before any copy-up
            inode = await self._copy_up(inode)
            inodes.removexattr(inode, attr)


__all__ = ["ROOT", "KernelCaches", "MergeEngine", "SetAttr"]
