"""Objects of the merged view: ``Inode``, the kernel's node table, attributes and xattrs.

Names and objects are kept apart, as the kernel keeps ``ovl_entry`` apart
from ``ovl_inode``: an ``Entry`` (``namei``) is one name in a directory and
points to an ``Inode``, the object itself: the layer it lives in, its
attributes, its stat override record and symlink target, and, for a
directory, the layer parts that merge into it and its merged index.  Copy-up,
link, rename and unlink change the ``Inode`` once, and every name of it sees
the change.  An object whose last name goes while the kernel still holds it
(an open descriptor, a cwd) keeps an ``O_PATH`` descriptor of its upper
object (``pin``), or the path of its lower one, so calls on it act on that
object and never on whatever takes the name later.

The node id the kernel knows an inode by is the inode number the merged view
reports (pyfuse3 uses ``st_ino`` for both), so names of one object share a
node.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ovlfuse.fs import statoverride
from ovlfuse.fs.idmap import IdMap
from ovlfuse.fs.layers import Layer
from ovlfuse.fs.markers import shown_xattr, stored_xattr
from ovlfuse.fs.statoverride import Stored
from ovlfuse.sys.safeio import fd_path, get_xattr, list_xattrs, open_beneath

if TYPE_CHECKING:
    from ovlfuse.fs.namei import Entry

ROOT = 1  # the FUSE root node id
# Layers do not change under a mount, and the write path invalidates what it
# changes, so the kernel may keep entries and attributes for a long time.
CACHE_TIMEOUT = 86400.0


def fail(code: int) -> OSError:
    """The engine's one way to answer a request with an errno."""
    return OSError(code, os.strerror(code))


class Attrs:
    """The lstat fields the merged view reports: a third of an os.stat_result's memory."""

    __slots__ = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                 "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")

    def __init__(self, st: os.stat_result) -> None:
        self.st_mode, self.st_ino, self.st_nlink = st.st_mode, st.st_ino, st.st_nlink
        self.st_uid, self.st_gid, self.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        self.st_size, self.st_blksize, self.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


class Inode:
    """One object of the merged view (see the module docstring)."""

    __slots__ = ("ino", "generation", "layer", "st", "aliases", "pin", "lowerpath", "nlookup", "parts",
                 "children", "complete", "record", "symlink", "stale", "__weakref__")

    def __init__(self, ino: int, layer: Layer, st: os.stat_result | Attrs, parts: tuple[Layer, ...] = ()) -> None:
        self.ino = ino  # the number reported to the kernel, and the node id
        self.generation = 0
        self.layer = layer  # where the object lives (for a directory: its topmost part)
        self.st = st if isinstance(st, Attrs) else Attrs(st)
        self.aliases: list[Entry] = []  # names in the merged tree, the one looked up last first
        self.pin: int | None = None  # O_PATH fd of an upper object that lost its last name while held
        self.lowerpath: bytes | None = None  # path of a lower object that lost its last name
        self.nlookup = 0  # the kernel's references
        self.parts = parts  # directories: every layer whose part merges in, top first
        self.children: dict[bytes, Entry] | None = None  # directories: the merged index, once built
        self.complete = False  # children lists every name (False: names probed one by one)
        self.record: tuple[int, Stored | None] | None = None  # a lower object's stat override record
        self.symlink: bytes | None = None  # the target, read once
        self.stale = False  # the upper object changed (a write) since st was read

    def __repr__(self) -> str:
        return f"<Inode {self.ino} {self.path!r} in layer {self.layer.index}>"

    @property
    def is_dir(self) -> bool:
        return bool(self.parts)

    @property
    def is_root(self) -> bool:
        return bool(self.aliases) and self.aliases[0].parent is None

    @property
    def merged(self) -> bool:
        return len(self.parts) > 1

    @property
    def is_upper(self) -> bool:
        return self.layer.is_upper

    @property
    def path(self) -> bytes | None:
        """A path of the object in its layer: a name's, or a lower object's last one; None if only ``pin`` reaches it."""
        if self.aliases:
            return self.aliases[0].path
        return self.lowerpath

    def add_alias(self, entry: Entry) -> None:
        """``entry`` names this object, and is the name to use first (the kernel's last lookup)."""
        aliases = self.aliases
        if aliases and aliases[0] is entry:
            return
        aliases[:] = [entry] + [a for a in aliases if a is not entry and
                                (a.parent is not entry.parent or a.name != entry.name)]

    def before_losing(self, entry: Entry) -> None:
        """Call before ``entry``, the last name of a held upper object, is removed: pin the object.

        The kernel may still send calls for it (an open descriptor, an
        ``O_PATH`` one, a cwd); the pin reaches the object, and keeps its
        inode number from going to a new object while the kernel holds it.
        """
        if self.is_upper and self.nlookup > 0 and self.pin is None and self.aliases == [entry]:
            self.pin = open_beneath(self.layer.fd, entry.path, os.O_PATH | os.O_NOFOLLOW)

    def drop_alias(self, entry: Entry) -> None:
        """``entry`` no longer names this object (it was removed, or now names another)."""
        if not self.is_upper and self.aliases == [entry]:
            self.lowerpath = entry.path  # lower objects never move
        self.aliases = [a for a in self.aliases if a is not entry]

    def unpin(self) -> None:
        if self.pin is not None:
            os.close(self.pin)
            self.pin = None

    def open(self, flags: int) -> int:
        """A new descriptor of the object itself (never following a symlink in a layer)."""
        path = self.path
        if path is not None:
            return open_beneath(self.layer.fd, path, flags | os.O_NOFOLLOW)
        if self.pin is None:
            raise fail(errno.ESTALE)
        return os.open(fd_path(self.pin), (flags | os.O_CLOEXEC) & ~os.O_NOFOLLOW)

    @contextlib.contextmanager
    def handle(self) -> Iterator[tuple[int, bytes | None]]:
        """(dirfd, name) reaching the object for calls with no ``*at`` form (xattrs, chmod); name None: dirfd itself.

        With a name, callers never follow it; without one, ``fd_path(dirfd)``
        is the object itself (a layer root, or the magic link of ``pin``).
        """
        path = self.path
        if path is None:
            if self.pin is None:
                raise fail(errno.ESTALE)
            yield self.pin, None
            return
        if not path:
            yield self.layer.fd, None
            return
        parent, _, name = path.rpartition(b"/")
        fd = open_beneath(self.layer.fd, parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def lstat(self) -> os.stat_result:
        """The object's attributes now."""
        if self.pin is not None and not self.aliases:
            return os.fstat(self.pin)
        fd = self.open(os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def refresh(self) -> None:
        """Re-read an upper object's attributes: writes, links and renames change them behind ``st``."""
        if self.is_upper:
            try:
                st = self.lstat()
            except OSError:
                return  # gone: the kernel keeps what it was told last
            if st.st_ino == self.st.st_ino:  # still the same object
                self.st = Attrs(st)
        self.stale = False


# --- what the kernel is told ------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """How stored attributes are shown: the owner mapping, and fuse-overlayfs's static_nlink."""

    ids: IdMap = field(default_factory=IdMap)
    static_nlink: bool = False  # every directory reports nlink 1


class Attributes:
    """What the kernel is told about an inode (the FUSE adapter copies it into pyfuse3's type)."""

    __slots__ = ("st_ino", "generation", "entry_timeout", "attr_timeout", "st_mode", "st_nlink", "st_uid",
                 "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns",
                 "st_ctime_ns")


def negative_entry() -> Attributes:
    """A cacheable "no such name" (st_ino 0): the kernel remembers it for CACHE_TIMEOUT."""
    attr = Attributes()
    for name in Attributes.__slots__:
        setattr(attr, name, 0)
    attr.entry_timeout = attr.attr_timeout = CACHE_TIMEOUT
    return attr


def stored_attributes(inode: Inode) -> Stored:
    """Owner, mode and rdev as the inode's layer keeps them: its stat override record where the layer uses them.

    A lower object's record is read once (lower layers do not change).  An
    upper one is read on every call, as its ``lstat`` is: a ctime cannot tell
    two changes within one clock tick apart.
    """
    st = inode.st
    real = Stored(st.st_uid, st.st_gid, st.st_mode, st.st_rdev)
    name = inode.layer.override
    if name is None:
        return real
    if inode.is_upper or inode.record is None or inode.record[0] != st.st_ino:
        try:
            with inode.handle() as (dirfd, entry_name):
                value = get_xattr(dirfd, entry_name, name)
        except OSError:
            return real
        inode.record = (st.st_ino, statoverride.parse(value, real) if value is not None else None)
    return inode.record[1] or real


def attributes(inode: Inode, view: View) -> Attributes:
    """What the kernel is told about ``inode``."""
    st = inode.st
    stored = stored_attributes(inode)
    attr = Attributes()
    attr.st_ino = inode.ino
    attr.generation = inode.generation
    attr.entry_timeout = attr.attr_timeout = CACHE_TIMEOUT
    if st.st_nlink > 1 and not inode.is_upper and not inode.parts:
        # One node serves every name of a lower hard link, but a copy-up breaks
        # the link for one name only: look the name up on each use, so an open
        # for writing knows which name it came through.
        attr.entry_timeout = 0
    attr.st_mode = stored.mode
    # Merged directories, and the root (which always merges), report 1 as the kernel does.
    one = inode.merged or inode.is_root or (view.static_nlink and stat.S_ISDIR(stored.mode))
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


class NodeTable:
    """Node id -> the Inode the kernel holds under it, with the kernel's lookup counts."""

    def __init__(self, root: Inode) -> None:
        self.root = root
        root.nlookup = 1
        self._nodes: dict[int, Inode] = {ROOT: root}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, nodeid: int) -> Inode:
        try:
            return self._nodes[nodeid]
        except KeyError:
            raise fail(errno.ESTALE) from None

    def find(self, nodeid: int) -> Inode | None:
        return self._nodes.get(nodeid)

    def nodeid(self, inode: Inode) -> int:
        return ROOT if inode is self.root else inode.ino

    def held(self, ino: int) -> Inode | None:
        """The inode the kernel holds under the number ``ino`` (a new index shares it), if any."""
        inode = self._nodes.get(ino)
        if inode is None or inode is self.root:
            return None
        return inode

    def remember(self, entry: Entry) -> Inode:
        """Count one kernel reference to ``entry``'s inode (the one the kernel already holds for its number)."""
        inode = entry.inode
        nodeid = self.nodeid(inode)
        held = self._nodes.get(nodeid)
        if held is not None and held is not inode:
            if same_object(held, inode):
                held.add_alias(entry)
                inode.aliases = [a for a in inode.aliases if a is not entry]
                entry.inode = inode = held
            else:
                # The upper filesystem gave a new object the number of one the kernel still
                # holds: a new generation makes the kernel drop its old inode instead of
                # taking the new object for it; its references carry over to this number.
                inode.generation = held.generation + 1
                inode.nlookup = held.nlookup
                held.unpin()
                self._nodes[nodeid] = inode
        elif held is None:
            self._nodes[nodeid] = inode
        inode.add_alias(entry)
        inode.nlookup += 1
        return inode

    def forget(self, nodeid: int, count: int) -> Inode | None:
        """Drop ``count`` references; the inode if the kernel holds it no more."""
        inode = self._nodes.get(nodeid)
        if inode is None or inode is self.root:
            return None
        inode.nlookup -= count
        if inode.nlookup > 0:
            return None
        del self._nodes[nodeid]
        inode.unpin()
        return inode

    def close(self) -> None:
        for inode in self._nodes.values():
            inode.unpin()


def same_object(a: Inode, b: Inode) -> bool:
    """Two inodes built for one object of one layer (two names of a hard link, or an index built again)."""
    return a.layer.dev == b.layer.dev and a.st.st_ino == b.st.st_ino and a.is_upper == b.is_upper


# --- xattrs ---------------------------------------------------------------------------------

def getxattr(inode: Inode, name: str) -> bytes:
    stored = stored_xattr(name)
    if stored is None or stored == inode.layer.override:
        raise fail(errno.ENODATA)
    with inode.handle() as (dirfd, name_):
        value = get_xattr(dirfd, name_, stored)
    if value is None:
        raise fail(errno.ENODATA)
    return value


def listxattr(inode: Inode) -> list[bytes]:
    with inode.handle() as (dirfd, name):
        names = list_xattrs(dirfd, name)
    return [os.fsencode(shown) for n in names
            if n != inode.layer.override and (shown := shown_xattr(n)) is not None]


def readlink(inode: Inode) -> bytes:
    if stat.S_ISREG(inode.st.st_mode) and stat.S_ISLNK(stored_attributes(inode).mode):
        # A symlink kept as a file whose record gives the type: the file holds the target.
        fd = inode.open(os.O_RDONLY)
        try:
            return os.read(fd, 4096)
        finally:
            os.close(fd)
    if not stat.S_ISLNK(inode.st.st_mode):
        raise fail(errno.EINVAL)
    path = inode.path
    if path is None:
        assert inode.pin is not None
        return os.readlink(fd_path(inode.pin))
    parent, _, name = path.rpartition(b"/")
    fd = open_beneath(inode.layer.fd, parent, os.O_PATH | os.O_DIRECTORY)
    try:
        return os.readlink(name, dir_fd=fd)
    finally:
        os.close(fd)


# --- changes (the object is in the upper layer: callers copy it up first) -------------------

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


@dataclass(frozen=True)
class SetAttr:
    """A setattr request in the engine's terms: the fields to change (None: leave as it is)."""

    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


def set_attributes(inode: Inode, change: SetAttr, ids: IdMap, fd: int | None = None) -> None:
    """Apply a setattr in the order the kernel's filesystems do: owner, mode, size, times.

    ``fd``: an open descriptor of the object (an ftruncate's), used for the size.
    """
    if change.mode is not None and stat.S_ISLNK(inode.st.st_mode):
        raise fail(errno.EOPNOTSUPP)
    with inode.handle() as (dirfd, name):
        path, follow = fd_path(dirfd, name), name is None
        if change.uid is not None or change.gid is not None or change.mode is not None:
            uid, gid = ids.stored(-1 if change.uid is None else change.uid, -1 if change.gid is None else change.gid)
            if inode.layer.override is not None:
                now = stored_attributes(inode)
                mode = now.mode if change.mode is None else stat.S_IFMT(now.mode) | stat.S_IMODE(change.mode)
                set_owner(dirfd, name, inode.layer.override,
                          Stored(now.uid if uid == -1 else uid, now.gid if gid == -1 else gid, mode, now.rdev))
            else:
                if uid != -1 or gid != -1:
                    os.chown(path, uid, gid, follow_symlinks=follow)
                if change.mode is not None:
                    os.chmod(path, stat.S_IMODE(change.mode), follow_symlinks=follow)
        if change.size is not None:
            wfd = fd if fd is not None else inode.open(os.O_WRONLY)
            try:
                os.ftruncate(wfd, change.size)
            finally:
                if fd is None:
                    os.close(wfd)
        if change.atime_ns is not None or change.mtime_ns is not None:
            now_st = os.stat(path, follow_symlinks=follow)
            atime = now_st.st_atime_ns if change.atime_ns is None else change.atime_ns
            mtime = now_st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=follow)
    inode.refresh()


def setxattr(inode: Inode, name: str, value: bytes) -> None:
    """Set a merged-view xattr (``name`` as ``markers.stored_xattr`` gives it)."""
    with inode.handle() as (dirfd, entry_name):
        os.setxattr(fd_path(dirfd, entry_name), name, value, follow_symlinks=entry_name is None)
    inode.refresh()


def removexattr(inode: Inode, name: str) -> None:
    with inode.handle() as (dirfd, entry_name):
        os.removexattr(fd_path(dirfd, entry_name), name, follow_symlinks=entry_name is None)
    inode.refresh()
