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
from dataclasses import dataclass, field

import pyfuse3

from ovlfuse.fs import statoverride
from ovlfuse.fs.idmap import IdMap
from ovlfuse.fs.markers import shown_xattr, stored_xattr
from ovlfuse.fs.namei import Entry
from ovlfuse.sys.safeio import fd_path, get_xattr, list_xattrs, open_beneath
from ovlfuse.fs.statoverride import Stored

# Layers do not change under a mount, and the write path invalidates what it
# changes, so the kernel may keep entries and attributes for a long time.
CACHE_TIMEOUT = 86400.0


@dataclass(frozen=True)
class View:
    """How stored attributes are shown: the owner mapping, and fuse-overlayfs's static_nlink."""

    ids: IdMap = field(default_factory=IdMap)
    static_nlink: bool = False  # every directory reports nlink 1


def stored_attributes(entry: Entry) -> Stored:
    """Owner, mode and rdev as the entry's layer keeps them: its stat override record where the layer uses them.

    A lower object's record is read once (lower layers do not change).  An
    upper one is read on every call, as its ``lstat`` is: a ctime cannot tell
    two changes within one clock tick apart.
    """
    st = entry.st
    real = Stored.of(st)
    name = entry.layer.override
    if name is None:
        return real
    if entry.layer.is_upper or entry.record is None or entry.record[0] != st.st_ino:
        try:
            fd = _parent_fd(entry)
        except OSError:
            return real
        try:
            value = get_xattr(*_object_args(entry, fd), name)
        finally:
            os.close(fd)
        entry.record = (st.st_ino, statoverride.parse(value, real) if value is not None else None)
    return entry.record[1] or real


def entry_attributes(entry: Entry, view: View) -> pyfuse3.EntryAttributes:
    """What the kernel is told about ``entry``."""
    st = entry.st
    stored = stored_attributes(entry)
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = entry.ino
    attr.generation = 0
    attr.entry_timeout = CACHE_TIMEOUT
    if st.st_nlink > 1 and not entry.layer.is_upper and not entry.dirs:
        # One node serves every name of a lower hard link, but a copy-up breaks
        # the link for one name only: look the name up on each use, so an open
        # for writing knows which name it came through.
        attr.entry_timeout = 0
    attr.attr_timeout = CACHE_TIMEOUT
    attr.st_mode = stored.mode
    # The kernel's root always merges at least two layers, so it reports 1 too.
    one = entry.merged or not entry.path or (view.static_nlink and stat.S_ISDIR(stored.mode))
    attr.st_nlink = 1 if one else st.st_nlink
    attr.st_uid, attr.st_gid = view.ids.shown(stored.uid, stored.gid)
    attr.st_rdev = stored.rdev
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

    def __init__(self, root: Entry, view: View) -> None:
        self.view = view
        self.root = Node(root, nlookup=1)
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: self.root}
        self._generations: dict[int, int] = {}  # numbers whose object went while the kernel held it

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
            node.entry = entry  # another name of a hard link, a rebuilt index, or a new object
            node.symlink = None  # under a reused inode number: read the target again
        node.nlookup += 1
        refresh(entry)
        attr = entry_attributes(entry, self.view)
        attr.generation = self._generations.get(entry.ino, 0)
        return attr

    def retire(self, ino: int) -> None:
        """The object reported as ``ino`` is gone: a new object given its number is another inode.

        The upper filesystem hands a freed inode number to its next object.  If
        the kernel still holds the old inode, a new generation makes it drop
        that inode instead of taking the new object for it (the kernel's own
        overlay pins upper inodes, so it never sees a number reused).
        """
        if ino in self._nodes:
            self._generations[ino] = self._generations.get(ino, 0) + 1

    def find(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or node is self.root:
            return
        node.nlookup -= count
        if node.nlookup <= 0:
            del self._nodes[ino]
            self._generations.pop(ino, None)  # the kernel holds no inode of this number any more


def _parent_fd(entry: Entry) -> int:
    return open_beneath(entry.layer.fd, entry.parent_path(), os.O_PATH | os.O_DIRECTORY)


def _object_args(entry: Entry, parent_fd: int) -> tuple[int, bytes | None]:
    """(dirfd, name) that reach the entry's object for safeio's xattr calls."""
    if entry.path == b"":
        return entry.layer.fd, None
    return parent_fd, entry.name


def getxattr(entry: Entry, name: str) -> bytes:
    stored = stored_xattr(name)
    if stored is None or stored == entry.layer.override:
        raise pyfuse3.FUSEError(errno.ENODATA)
    fd = _parent_fd(entry)
    try:
        value = get_xattr(*_object_args(entry, fd), stored)
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
    return [os.fsencode(shown) for n in names
            if n != entry.layer.override and (shown := shown_xattr(n)) is not None]


def readlink(entry: Entry) -> bytes:
    if stat.S_ISREG(entry.st.st_mode) and stat.S_ISLNK(stored_attributes(entry).mode):
        # A symlink kept as a file whose record gives the type: the file holds the target.
        fd = open_beneath(entry.layer.fd, entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return os.read(fd, 4096)
        finally:
            os.close(fd)
    if not stat.S_ISLNK(entry.st.st_mode):
        raise pyfuse3.FUSEError(errno.EINVAL)
    fd = _parent_fd(entry)
    try:
        return os.readlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)


# --- changes (the object is in the upper layer: callers copy it up first) -------

def _target(entry: Entry, parent_fd: int) -> tuple[bytes, bool]:
    """(path, follow) reaching the object itself, never following a symlink in the layer."""
    dirfd, name = _object_args(entry, parent_fd)
    return fd_path(dirfd, name), name is None


def refresh(entry: Entry, open_fd: int | None = None) -> None:
    """Re-read an upper object's attributes: writes, links and renames change them behind the entry.

    An open descriptor of the object is asked first: it still reaches the
    object once its last name is gone (nlink 0, data still there).
    """
    if not entry.layer.is_upper:
        return
    if open_fd is not None:
        entry.st = os.fstat(open_fd)
        return
    try:
        fd = open_beneath(entry.layer.fd, entry.path, os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_ino == entry.st.st_ino:  # still the same object
        entry.st = st


def set_owner(dirfd: int, name: bytes | None, layer_record: str | None, stored: Stored) -> None:
    """Give an upper object the owner and mode ``stored``: in its stat override record if its layer keeps them there.

    Only files and directories can carry a ``user.`` record: a device, fifo
    or socket is then kept as an empty file whose record gives its type (as
    containers/storage stores them rootless), and a symlink gets its owner
    for real.
    """
    path = fd_path(dirfd, name)
    follow = name is None
    record = statoverride.format_record(stored)
    if layer_record is not None:
        try:
            os.setxattr(path, layer_record, record, follow_symlinks=follow)
            return
        except OSError as e:
            if e.errno != errno.EPERM or name is None or stat.S_ISREG(stored.mode) or stat.S_ISDIR(stored.mode):
                raise
        if not stat.S_ISLNK(stored.mode):
            os.unlink(name, dir_fd=dirfd)
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dirfd))
            os.setxattr(path, layer_record, record, follow_symlinks=False)
            return
    os.chown(path, stored.uid, stored.gid, follow_symlinks=follow)
    if not stat.S_ISLNK(stored.mode):
        os.chmod(path, stat.S_IMODE(stored.mode))  # not a symlink: following the name is harmless


def set_attributes(entry: Entry, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, ids: IdMap) -> None:
    """Apply a setattr in the order the kernel's filesystems do: owner, mode, size, times."""
    fd = _parent_fd(entry)
    try:
        path, follow = _target(entry, fd)
        if fields.update_mode and stat.S_ISLNK(entry.st.st_mode):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if fields.update_uid or fields.update_gid or fields.update_mode:
            uid, gid = ids.stored(attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
            if entry.layer.override is not None:
                now = stored_attributes(entry)
                mode = stat.S_IFMT(now.mode) | stat.S_IMODE(attr.st_mode) if fields.update_mode else now.mode
                set_owner(*_object_args(entry, fd), entry.layer.override,
                          Stored(now.uid if uid == -1 else uid, now.gid if gid == -1 else gid, mode, now.rdev))
            else:
                if uid != -1 or gid != -1:
                    os.chown(path, uid, gid, follow_symlinks=follow)
                if fields.update_mode:
                    os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            wfd = open_beneath(entry.layer.fd, entry.path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.ftruncate(wfd, attr.st_size)
            finally:
                os.close(wfd)
        if fields.update_atime or fields.update_mtime:
            now = os.stat(path, follow_symlinks=follow)
            atime = attr.st_atime_ns if fields.update_atime else now.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=follow)
    finally:
        os.close(fd)
    refresh(entry)


def setxattr(entry: Entry, name: str, value: bytes) -> None:
    """Set a merged-view xattr (``name`` as ``markers.stored_xattr`` gives it)."""
    fd = _parent_fd(entry)
    try:
        path, follow = _target(entry, fd)
        os.setxattr(path, name, value, follow_symlinks=follow)
    finally:
        os.close(fd)
    refresh(entry)


def removexattr(entry: Entry, name: str) -> None:
    fd = _parent_fd(entry)
    try:
        path, follow = _target(entry, fd)
        os.removexattr(path, name, follow_symlinks=follow)
    finally:
        os.close(fd)
    refresh(entry)
