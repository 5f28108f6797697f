"""The pyfuse3 face of the merge engine: each request translated into one engine call.

This is the only module that knows pyfuse3's types.  It converts what the
kernel sends (contexts, setattr fields, flags) into plain values, the
engine's answers into pyfuse3's ``EntryAttributes`` and ``FileInfo``, and the
engine's ``OSError`` into ``FUSEError``: the one error boundary.  Any other
failure of one request answers that caller with EIO and the daemon serves
on, since pyfuse3 would otherwise end the whole session.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, FileNameT, FlagT, InodeT, ModeT, RequestContext

from ovlfuse.fs.engine import KernelCaches, MergeEngine
from ovlfuse.fs.file import Opened
from ovlfuse.fs.inode import Attributes, SetAttr

log = logging.getLogger("ovlfuse.requests")

P = ParamSpec("P")
R = TypeVar("R")


def fuse_errors(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Answer a failed request with its errno (an OSError's own, else EIO, logged)."""

    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except OSError as e:
            log.debug("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class FuseKernelCaches(KernelCaches):
    def attributes(self, nodeid: int) -> None:
        try:  # attributes only: safe from inside a handler
            pyfuse3.invalidate_inode(InodeT(nodeid), attr_only=True)
        except OSError:
            pass

    def entry(self, parent: int, name: bytes) -> None:
        # the synchronous call deadlocks inside a handler
        pyfuse3.invalidate_entry_async(InodeT(parent), FileNameT(name), ignore_enoent=True)


def entry_attributes(attr: Attributes) -> EntryAttributes:
    out = EntryAttributes()
    out.st_ino = InodeT(attr.st_ino)
    out.generation = attr.generation
    out.entry_timeout = attr.entry_timeout
    out.attr_timeout = attr.attr_timeout
    out.st_mode = ModeT(attr.st_mode)
    out.st_nlink = attr.st_nlink
    out.st_uid = attr.st_uid
    out.st_gid = attr.st_gid
    out.st_rdev = attr.st_rdev
    out.st_size = attr.st_size
    out.st_blksize = attr.st_blksize
    out.st_blocks = attr.st_blocks
    out.st_atime_ns = attr.st_atime_ns
    out.st_mtime_ns = attr.st_mtime_ns
    out.st_ctime_ns = attr.st_ctime_ns
    return out


def file_info(opened: Opened) -> FileInfo:
    return FileInfo(fh=FileHandleT(opened.fh), keep_cache=opened.keep_cache, direct_io=opened.direct_io)


def set_attr(attr: EntryAttributes, fields: pyfuse3.SetattrFields) -> SetAttr:
    return SetAttr(
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        mode=attr.st_mode if fields.update_mode else None,
        size=attr.st_size if fields.update_size else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
    )


class OverlayOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: MergeEngine) -> None:
        super().__init__()
        self.engine = engine
        engine.kernel = FuseKernelCaches()

    @fuse_errors
    async def lookup(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(self.engine.lookup(parent_inode, name))

    async def forget(self, inode_list: list[tuple[InodeT, int]]) -> None:
        try:  # forget has no reply: a failure is logged, never raised
            self.engine.forget(inode_list)  # type: ignore[arg-type]
        except Exception:
            log.exception("forget failed")

    @fuse_errors
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(self.engine.getattr(inode))

    @fuse_errors
    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(await self.engine.setattr(inode, set_attr(attr, fields), fh))

    @fuse_errors
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return FileNameT(self.engine.readlink(inode))

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        return FileHandleT(self.engine.opendir(inode))

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attr, offset in self.engine.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, FileNameT(name), entry_attributes(attr), offset):
                if name not in (b".", b".."):
                    self.engine.forget([(attr.st_ino, 1)])  # not sent: not a reference
                break

    @fuse_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        self.engine.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self.engine.fsyncdir(fh, datasync)

    @fuse_errors
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        return file_info(await self.engine.open(inode, flags))

    @fuse_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return await self.engine.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return self.engine.write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: FileHandleT) -> None:
        pass

    @fuse_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.engine.fsync(fh, datasync)

    @fuse_errors
    async def release(self, fh: FileHandleT) -> None:
        self.engine.release(fh)

    @fuse_errors
    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        return self.engine.getxattr(inode, name)

    @fuse_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> list[bytes]:
        return self.engine.listxattr(inode)

    @fuse_errors
    async def setxattr(self, inode: InodeT, name: bytes, value: bytes, ctx: RequestContext) -> None:
        await self.engine.setxattr(inode, name, value)

    @fuse_errors
    async def removexattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        await self.engine.removexattr(inode, name)

    @fuse_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        sv = self.engine.statfs()
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(sv, name))
        return data

    @fuse_errors
    async def access(self, inode: InodeT, mode: ModeT, ctx: RequestContext) -> bool:
        # default_permissions makes the kernel check modes itself; an access()
        # that still arrives only needs the node to exist.
        self.engine.getattr(inode)
        return True

    @fuse_errors
    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        opened, attr = await self.engine.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid, ctx.umask)
        return file_info(opened), entry_attributes(attr)

    @fuse_errors
    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(await self.engine.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid, ctx.umask))

    @fuse_errors
    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(await self.engine.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid,
                                                        ctx.umask))

    @fuse_errors
    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(await self.engine.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @fuse_errors
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(await self.engine.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.engine.unlink(parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.engine.rmdir(parent_inode, name)

    @fuse_errors
    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT, parent_inode_new: InodeT,
                     name_new: FileNameT, flags: FlagT, ctx: RequestContext) -> None:
        await self.engine.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)


