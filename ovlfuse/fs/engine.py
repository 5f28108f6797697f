"""The merge engine: every FUSE request of the merged view, without FUSE.

``operations.OverlayOperations`` forwards requests here one to one, so the
engine can be driven directly in tests.  It owns the layer stack, the merged
index cache (``namei``), the node table (``inode``), open directories
(``readdir``) and open files (``file``); with an upper layer also the workdir,
copy-up (``copyup``) and directory operations (``dirops``).

Changes run one at a time under a write lock (copy-up may wait for a worker
thread; reads go on meanwhile).  After each change the engine keeps its
entries and nodes pointing at the objects as they now are, and tells the
kernel what it cannot know: attributes of directories that a copy-up changed,
and names whose object a copy-up replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
from collections.abc import Iterator

import pyfuse3
import trio

from ovlfuse.fs import inode
from ovlfuse.fs.copyup import CopyUp, Workdir
from ovlfuse.fs.dirops import DirOps
from ovlfuse.errors import OvlError
from ovlfuse.fs.file import WRITE_FLAGS, OpenFiles
from ovlfuse.fs.inode import NodeTable, View, entry_attributes, negative_entry, stored_attributes
from ovlfuse.fs.layers import LayerStack
from ovlfuse.fs.markers import stored_xattr
from ovlfuse.fs.namei import Entry, Namei
from ovlfuse.fs.readdir import DirHandles
from ovlfuse.sys.safeio import open_beneath
from ovlfuse.fs.statoverride import Stored


class KernelCaches:
    """Invalidation of the kernel's caches; does nothing until a FUSE session exists."""

    def attributes(self, ino: int) -> None:
        pass

    def entry(self, parent: int, name: bytes) -> None:
        pass


class FuseKernelCaches(KernelCaches):
    def attributes(self, ino: int) -> None:
        with contextlib.suppress(OSError):  # attributes only: safe from inside a handler
            pyfuse3.invalidate_inode(ino, attr_only=True)

    def entry(self, parent: int, name: bytes) -> None:
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)


@contextlib.contextmanager
def _errno() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno) from None


def _stored_name(name: bytes) -> str:
    """The name an xattr set through the mount is stored under in the upper layer (EPERM: none)."""
    attr = stored_xattr(os.fsdecode(name))
    if attr is None:
        raise pyfuse3.FUSEError(errno.EPERM)
    return attr


class MergeEngine:
    def __init__(self, stack: LayerStack, view: View | None = None, volatile: bool = False) -> None:
        self.stack = stack
        self.view = view or View()
        self.volatile = volatile  # fsync and fsyncdir do nothing, as with the kernel's -o volatile
        self.namei = Namei(stack)
        self.nodes = NodeTable(self.namei.root, self.view)
        self.dirs = DirHandles()
        self.files = OpenFiles()
        self.kernel = KernelCaches()
        self._lock = trio.Lock()
        self.work: Workdir | None = None
        self.copyup: CopyUp | None = None
        self.dirops: DirOps | None = None
        if stack.upper is not None and stack.workdir is not None:
            try:
                self.work = Workdir(stack.workdir)
            except OSError as e:
                stack.close()
                raise OvlError(f"cannot use workdir {stack.workdir}: {e.strerror}; "
                               "it must be a writable directory on the upper dir's filesystem") from None
            self.copyup = CopyUp(stack, self.namei, self.work)
            self.dirops = DirOps(stack, self.namei, self.copyup, self.work)

    # --- what the adapter shows of a running mount ---------------------------
    def path_of(self, ino: int) -> bytes | None:
        """A merged path of node ``ino`` (b"" for the root), or None if the kernel holds no such node now."""
        node = self.nodes.find(ino)
        return None if node is None else node.entry.path

    def stats(self) -> dict[str, int]:
        """Sizes of the engine's caches and tables, as flat counts."""
        return {
            "nodes": len(self.nodes),
            "index_dirs": len(self.namei._cache),
            "index_entries": self.namei._cached_entries,
            "index_entries_max": self.namei.max_entries,
            "open_files": len(self.files._files),
            "open_dirs": len(self.dirs._handles),
        }

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
        entry = self._entry(ino)
        inode.refresh(entry, self.files.fd_for(entry))
        return entry_attributes(entry, self.view)

    def attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """What the kernel is told about ``entry`` (no reference is counted)."""
        return entry_attributes(entry, self.view)

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
        return self.dirs.open(self._directory(ino))

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Entry, int, bool]]:
        """(name, entry, next offset, counts) from ``start``.

        ``counts``: the kernel takes a reference to the entry when it is sent
        (readdirplus), so call ``nodes.remember`` for it; "." and ".." are not counted.
        """
        directory = self.dirs.directory(fh)
        if start == 0 or not self.dirs.has_snapshot(fh):  # a first read, or after rewinddir()
            self.dirs.snapshot(fh, [(b".", directory), (b"..", self.namei.parent(directory)),
                                    *self.namei.index(directory).items()])
        current = self.namei.index(directory)
        for offset, (name, entry) in enumerate(self.dirs.entries(fh, start), start + 1):
            counts = name not in (b".", b"..")
            if counts:
                # A name removed or replaced since the snapshot is skipped or sent as it is now:
                # readdirplus would otherwise plant a stale dentry in the kernel.
                now = current.get(name)
                if now is None:
                    continue
                entry = now
            yield name, entry, offset, counts

    def releasedir(self, fh: int) -> None:
        self.dirs.release(fh)

    # --- file I/O ------------------------------------------------------------
    async def open(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        entry = self._entry(ino)
        if stat.S_ISDIR(entry.st.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        with _errno():
            if not flags & WRITE_FLAGS or self.copyup is None:
                return self.files.open(entry, flags)
            async with self._lock:
                entry = self._canonical(ino)
                replaced = await self._copy_up(entry, 0 if flags & os.O_TRUNC else None)
                return self.files.open(entry, flags, direct_io=replaced)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self.files.read(fh, offset, size)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        with _errno():
            return self.files.write(fh, offset, data)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.volatile:
            return
        with _errno():
            await self.files.fsync(fh, datasync)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Make the names created or removed in a directory durable (its upper part, if any)."""
        listed = self.dirs.directory(fh)
        directory = self.namei.resolve(listed.path) or listed  # it may have been copied up since
        if not directory.layer.is_upper or self.volatile:
            return
        with _errno():
            fd = open_beneath(directory.layer.fd, directory.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
            finally:
                os.close(fd)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    def close(self) -> None:
        if self.work is not None:
            self.work.close()
        self.stack.close()

    # --- changes ----------------------------------------------------------------
    def _ops(self) -> DirOps:
        if self.dirops is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.dirops

    def _canonical(self, ino: int) -> Entry:
        """The node's entry as the current index has it (indexes may have been rebuilt)."""
        node = self.nodes.get(ino)
        current = self.namei.resolve(node.entry.path)
        if current is not None and current.ino == node.entry.ino:
            node.entry = current
        return node.entry

    def _directory_now(self, ino: int) -> Entry:
        entry = self._canonical(ino)
        if not entry.dirs:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return entry

    def _settle(self) -> None:
        """Tell the kernel about directories whose upper part a copy-up changed."""
        assert self.copyup is not None
        for directory in self.copyup.touched:
            inode.refresh(directory)
            self.kernel.attributes(directory.ino)
        self.copyup.touched.clear()

    async def _copy_up(self, entry: Entry, size: int | None = None) -> bool:
        """Copy ``entry`` up (data up to ``size`` only, if given); True when that gave it a new node."""
        assert self.copyup is not None
        if entry.layer.is_upper:
            return False
        before = dataclasses.replace(entry)
        try:
            await self.copyup.copy_up(entry, size)
        finally:
            self._settle()
        if entry.ino == before.ino:
            return False
        node = self.nodes.find(before.ino)
        if node is not None and node.entry is entry:
            node.entry = before  # the other names still show the lower object
        parent = self.namei.resolve(entry.parent_path())
        if parent is not None:
            self.kernel.entry(parent.ino, entry.name)
        return True

    def _owner(self, parent: Entry, ctx: pyfuse3.RequestContext, mode: int) -> Stored:
        """Owner and mode a new object stores: the caller's ids mapped back, the group of a set-group-ID parent."""
        uid, gid = self.view.ids.stored(ctx.uid, ctx.gid)
        stored_parent = stored_attributes(parent)
        if stored_parent.mode & stat.S_ISGID:
            gid = stored_parent.gid
        return Stored(uid, gid, mode)

    def _set_owner(self, dirfd: int, name: bytes, stored: Stored) -> None:
        """Owner and mode of a new upper object: in a record where the upper keeps them, else for real."""
        inode.set_owner(dirfd, name, self.stack.layers[0].override, stored)

    def _new(self, entry: Entry) -> pyfuse3.EntryAttributes:
        self._settle()
        return self.nodes.remember(entry)

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        ops = self._ops()
        opened: list[int] = []
        async with self._lock:
            parent = self._directory_now(parent_ino)

            def build(dirfd: int, new: bytes) -> None:
                fd = os.open(new, (flags & os.O_ACCMODE) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dirfd)
                opened.append(fd)
                self._set_owner(dirfd, new, self._owner(parent, ctx, stat.S_IFREG | stat.S_IMODE(mode) & ~ctx.umask))

            try:
                with _errno():
                    entry = ops.place(parent, name, build, is_dir=False)
            except BaseException:
                for fd in opened:
                    os.close(fd)
                raise
            return self.files.adopt(opened[0], entry), self._new(entry)

    async def mkdir(self, parent_ino: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ops = self._ops()
        async with self._lock:
            parent = self._directory_now(parent_ino)
            perms = stat.S_IMODE(mode) & ~ctx.umask | (stored_attributes(parent).mode & stat.S_ISGID)

            def build(dirfd: int, new: bytes) -> None:
                os.mkdir(new, 0o700, dir_fd=dirfd)
                self._set_owner(dirfd, new, self._owner(parent, ctx, stat.S_IFDIR | perms))

            with _errno():
                return self._new(ops.place(parent, name, build, is_dir=True))

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ops = self._ops()
        if stat.S_ISCHR(mode) and rdev == 0:
            raise pyfuse3.FUSEError(errno.EPERM)  # that is a whiteout; the kernel refuses it too
        async with self._lock:
            parent = self._directory_now(parent_ino)

            def build(dirfd: int, new: bytes) -> None:
                os.mknod(new, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=dirfd)
                owner = self._owner(parent, ctx, stat.S_IFMT(mode) | stat.S_IMODE(mode) & ~ctx.umask)
                self._set_owner(dirfd, new, dataclasses.replace(owner, rdev=rdev))

            with _errno():
                return self._new(ops.place(parent, name, build, is_dir=False))

    async def symlink(self, parent_ino: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ops = self._ops()
        async with self._lock:
            parent = self._directory_now(parent_ino)

            def build(dirfd: int, new: bytes) -> None:
                os.symlink(target, new, dir_fd=dirfd)
                self._set_owner(dirfd, new, self._owner(parent, ctx, stat.S_IFLNK | 0o777))

            with _errno():
                return self._new(ops.place(parent, name, build, is_dir=False))

    async def link(self, ino: int, parent_ino: int, name: bytes) -> pyfuse3.EntryAttributes:
        ops = self._ops()
        async with self._lock:
            entry = self._canonical(ino)
            parent = self._directory_now(parent_ino)
            with _errno():
                ops.check_new(parent, name)
                await self._copy_up(entry)
                return self._new(await ops.link(entry, parent, name))

    def _unlinked(self, entry: Entry) -> None:
        """Keep the node of a removed name's object pointing at a name that still exists."""
        if not entry.layer.is_upper:
            return
        node = self.nodes.find(entry.ino)
        if entry.st.st_nlink <= 1:
            self.stack.copied_inos.pop(entry.st.st_ino, None)
            self.nodes.retire(entry.ino)
        elif node is not None and node.entry.path == entry.path:
            # the node's entry may be another object for this name (moved with a directory, or rebuilt)
            other = self.namei.find_ino(entry.ino, entry)
            if other is not None:
                node.entry = other

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        ops = self._ops()
        async with self._lock:
            parent = self._directory_now(parent_ino)
            with _errno():
                inode.refresh(ops.existing(parent, name))  # its link count tells whether the object goes
                self._unlinked(ops.unlink(parent, name))
            self._settle()

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        ops = self._ops()
        async with self._lock:
            parent = self._directory_now(parent_ino)
            with _errno():
                removed = ops.rmdir(parent, name)
            if removed.layer.is_upper:
                self.stack.copied_inos.pop(removed.st.st_ino, None)
            self.nodes.retire(removed.ino)
            self._settle()

    async def rename(self, p1_ino: int, n1: bytes, p2_ino: int, n2: bytes, flags: int) -> None:
        ops = self._ops()
        async with self._lock:
            p1 = self._directory_now(p1_ino)
            p2 = self._directory_now(p2_ino)
            with _errno():
                if flags & pyfuse3.RENAME_EXCHANGE:
                    first, second = ops.existing(p1, n1), ops.existing(p2, n2)
                    moves = [(first, first.path), (second, second.path)]
                    await ops.exchange(p1, n1, p2, n2, self._copy_up)
                    replaced = None
                else:
                    old_path = ops.existing(p1, n1).path
                    victim = self.namei.lookup(p2, n2)
                    if victim is not None:
                        inode.refresh(victim)  # its link count tells whether the object goes
                    src, replaced = await ops.rename(p1, n1, p2, n2, flags, self._copy_up)
                    moves = [(src, old_path)]
            self._settle()
            self._moved(moves)
            if replaced is not None and not replaced.dirs:
                self._unlinked(replaced)
            elif replaced is not None:
                self.nodes.retire(replaced.ino)

    def _moved(self, moves: list[tuple[Entry, bytes]]) -> None:
        """Point moved entries' nodes, and the nodes below moved directories, at the new paths."""
        renames: list[tuple[Entry, bytes]] = []  # computed first: an exchange swaps two prefixes
        for node in self.nodes.nodes():
            for entry, old_path in moves:
                if entry.dirs and node.entry.path.startswith(old_path + b"/"):
                    renames.append((node.entry, entry.path + node.entry.path[len(old_path):]))
                    break
        for moved, path in renames:
            moved.path = path
        for entry, old_path in moves:
            node = self.nodes.find(entry.ino)
            if node is not None and node.entry.path in (old_path, entry.path):
                node.entry = entry

    async def setattr(self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None) -> pyfuse3.EntryAttributes:
        self._ops()
        async with self._lock:
            entry = self.files.entry(fh) if fh is not None else self._canonical(ino)
            with _errno():
                await self._copy_up(entry, attr.st_size if fields.update_size else None)
                inode.set_attributes(entry, attr, fields, self.view.ids)
            return entry_attributes(entry, self.view)

    def _record_name(self, name: bytes) -> str:
        """The stored name of a changeable xattr; the upper's stat override records are bookkeeping (EPERM)."""
        attr = _stored_name(name)
        if attr == self.stack.layers[0].override:
            raise pyfuse3.FUSEError(errno.EPERM)
        return attr

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._ops()
        attr = self._record_name(name)
        async with self._lock:
            entry = self._canonical(ino)
            with _errno():
                await self._copy_up(entry)
                inode.setxattr(entry, attr, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._ops()
        attr = self._record_name(name)
        async with self._lock:
            entry = self._canonical(ino)
            inode.getxattr(entry, os.fsdecode(name))  # ENODATA before any copy-up
            with _errno():
                await self._copy_up(entry)
                inode.removexattr(entry, attr)
