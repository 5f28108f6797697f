"""The pyfuse3 face of the merge engine: one line per request, no logic."""

from __future__ import annotations

import logging

import pyfuse3

from ovlfuse.engine import MergeEngine
from ovlfuse.inode import entry_attributes

log = logging.getLogger("ovlfuse.requests")


class OverlayOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: MergeEngine) -> None:
        super().__init__()
        self.engine = engine

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
            attr = nodes.remember(entry) if counts else entry_attributes(entry)
            if not pyfuse3.readdir_reply(token, name, attr, offset):
                if counts:
                    nodes.forget(entry.ino, 1)  # not sent: not a reference
                break

    async def releasedir(self, fh):
        self.engine.releasedir(fh)

    async def open(self, inode, flags, ctx):
        log.debug("open %d flags %#o", inode, flags)
        return self.engine.open(inode, flags)

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
        pass

    async def fsyncdir(self, fh, datasync):
        pass

