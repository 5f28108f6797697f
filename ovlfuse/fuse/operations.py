"""The pyfuse3 face of the merge engine: one line per request, no logic."""

from __future__ import annotations

import errno
import functools
import inspect
import logging

import pyfuse3

from ovlfuse.fs.engine import FuseKernelCaches, MergeEngine

log = logging.getLogger("ovlfuse.requests")


class OverlayOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: MergeEngine) -> None:
        super().__init__()
        self.engine = engine
        engine.kernel = FuseKernelCaches()

    async def lookup(self, parent_inode, name, ctx=None):
        log.debug("lookup %d %r", parent_inode, name)
        return self.engine.lookup(parent_inode, name)

    async def forget(self, inode_list):
        self.engine.forget(inode_list)

    async def getattr(self, inode, ctx=None):
        log.debug("getattr %d", inode)
        return self.engine.getattr(inode)

    async def readlink(self, inode, ctx):
        log.debug("readlink %d", inode)
        return self.engine.readlink(inode)

    async def opendir(self, inode, ctx):
        log.debug("opendir %d", inode)
        return self.engine.opendir(inode)

    async def readdir(self, fh, start_id, token):
        log.debug("readdir %d from %d", fh, start_id)
        nodes = self.engine.nodes
        for name, entry, offset, counts in self.engine.readdir(fh, start_id):
            attr = nodes.remember(entry) if counts else self.engine.attributes(entry)
            if not pyfuse3.readdir_reply(token, name, attr, offset):
                if counts:
                    nodes.forget(entry.ino, 1)  # not sent: not a reference
                break

    async def releasedir(self, fh):
        self.engine.releasedir(fh)

    async def open(self, inode, flags, ctx):
        log.debug("open %d flags %#o", inode, flags)
        return await self.engine.open(inode, flags)

    async def read(self, fh, off, size):
        log.debug("read %d at %d size %d", fh, off, size)
        return await self.engine.read(fh, off, size)

    async def release(self, fh):
        self.engine.release(fh)

    async def getxattr(self, inode, name, ctx):
        log.debug("getxattr %d %r", inode, name)
        return self.engine.getxattr(inode, name)

    async def listxattr(self, inode, ctx):
        log.debug("listxattr %d", inode)
        return self.engine.listxattr(inode)

    async def statfs(self, ctx):
        return self.engine.statfs()

    async def access(self, inode, mode, ctx):
        # default_permissions makes the kernel check modes itself; an access()
        # that still arrives only needs the node to exist.
        self.engine.getattr(inode)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        log.debug("fsync %d", fh)
        await self.engine.fsync(fh, datasync)

    async def fsyncdir(self, fh, datasync):
        log.debug("fsyncdir %d", fh)
        await self.engine.fsyncdir(fh, datasync)

    async def write(self, fh, off, buf):
        log.debug("write %d at %d size %d", fh, off, len(buf))
        return self.engine.write(fh, off, buf)

    async def create(self, parent_inode, name, mode, flags, ctx):
        log.debug("create %d %r mode %#o flags %#o", parent_inode, name, mode, flags)
        return await self.engine.create(parent_inode, name, mode, flags, ctx)

    async def mkdir(self, parent_inode, name, mode, ctx):
        log.debug("mkdir %d %r mode %#o", parent_inode, name, mode)
        return await self.engine.mkdir(parent_inode, name, mode, ctx)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        log.debug("mknod %d %r mode %#o rdev %d", parent_inode, name, mode, rdev)
        return await self.engine.mknod(parent_inode, name, mode, rdev, ctx)

    async def symlink(self, parent_inode, name, target, ctx):
        log.debug("symlink %d %r -> %r", parent_inode, name, target)
        return await self.engine.symlink(parent_inode, name, target, ctx)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        log.debug("link %d to %d %r", inode, new_parent_inode, new_name)
        return await self.engine.link(inode, new_parent_inode, new_name)

    async def unlink(self, parent_inode, name, ctx):
        log.debug("unlink %d %r", parent_inode, name)
        await self.engine.unlink(parent_inode, name)

    async def rmdir(self, parent_inode, name, ctx):
        log.debug("rmdir %d %r", parent_inode, name)
        await self.engine.rmdir(parent_inode, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        log.debug("rename %d %r to %d %r flags %d", parent_inode_old, name_old, parent_inode_new, name_new, flags)
        await self.engine.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    async def setattr(self, inode, attr, fields, fh, ctx):
        log.debug("setattr %d", inode)
        return await self.engine.setattr(inode, attr, fields, fh)

    async def setxattr(self, inode, name, value, ctx):
        log.debug("setxattr %d %r", inode, name)
        await self.engine.setxattr(inode, name, value)

    async def removexattr(self, inode, name, ctx):
        log.debug("removexattr %d %r", inode, name)
        await self.engine.removexattr(inode, name)


def _guarded(handler):
    """Turn any failure of one request into an errno for that caller; the daemon serves on.

    pyfuse3 ends the whole session on an exception that is not a FUSEError,
    so an unexpected OSError (a path past PATH_MAX, an I/O error in a layer)
    must never escape a handler.
    """

    @functools.wraps(handler)
    async def guarded(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            log.debug("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


def _never_fails(handler):
    """forget has no reply: a failure is logged, never raised."""

    @functools.wraps(handler)
    async def quiet(self, *args):
        try:
            await handler(self, *args)
        except Exception:
            log.exception("%s failed", handler.__name__)

    return quiet


for _name, _handler in list(vars(OverlayOperations).items()):
    if inspect.iscoroutinefunction(_handler):
        setattr(OverlayOperations, _name, (_never_fails if _name == "forget" else _guarded)(_handler))
