"""Lookup: the merged index of one directory.

A directory's merged index is built once, from one listing of each layer that
contributes to it, and then answers every lookup, negative lookup and readdir
in that directory with a dictionary hit.  Indexes are cached by merged path,
not by FUSE node id, so a FORGET from the kernel can never invalidate them;
the cache is bounded (LRU by entry count) and an evicted index is rebuilt on
demand from the directory's own entry.

Merge rules (shared spec section 2, checked against the kernel):
- layers are searched top-down; the first object or whiteout for a name decides;
- a directory keeps merging with same-named directories below it until a
  whiteout, a non-directory, or an opaque directory ends the chain;
- a whiteout hides names in the layers below it, never in its own layer;
- the mount root merges every layer and ignores opaque markers;
- a merged directory reports nlink 1 and, when it has an upper part, the inode
  number of its topmost lower directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ovlfuse.fs import origin
from ovlfuse.fs.layers import Layer, LayerStack
from ovlfuse.fs.markers import (
    NAME_MAX,
    OPAQUE_FILE,
    WH_PREFIX,
    is_device_whiteout,
    is_xattr_whiteout,
    opaque_value,
)
from ovlfuse.sys.safeio import open_beneath
from ovlfuse.fs.statoverride import Stored



class Attrs:
    """The lstat fields the merged view reports: a third of an os.stat_result's memory, kept per name."""

    __slots__ = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                 "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")

    def __init__(self, st: os.stat_result) -> None:
        self.st_mode, self.st_ino, self.st_nlink = st.st_mode, st.st_ino, st.st_nlink
        self.st_uid, self.st_gid, self.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        self.st_size, self.st_blksize, self.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


@dataclass(slots=True, eq=False)
class Entry:
    """One visible name of the merged view: where its object lives and what it is."""

    path: bytes  # merged path from the mount root (b"" for the root); the same in every layer
    layer: Layer  # the layer that provides the object (for directories: the topmost part)
    st: Attrs  # lstat of that object (an os.stat_result assigned here is cut down to Attrs)
    ino: int = 0  # inode number reported to the kernel
    dirs: tuple[Layer, ...] = ()  # for directories: every layer whose part is merged in
    record: tuple[int, Stored | None] | None = None  # a lower object's stat override record, by its inode

    def __setattr__(self, name: str, value: object) -> None:
        if name == "st" and isinstance(value, os.stat_result):
            value = Attrs(value)
        object.__setattr__(self, name, value)

    @property
    def merged(self) -> bool:
        return len(self.dirs) > 1

    @property
    def name(self) -> bytes:
        return self.path.rpartition(b"/")[2]

    def parent_path(self) -> bytes:
        return self.path.rpartition(b"/")[0]


def child_path(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class _Build:
    """State of one index build: names decided so far and names hidden from below."""

    def __init__(self, stack: LayerStack, path: bytes, is_root: bool) -> None:
        self.stack = stack
        self.path = path
        self.is_root = is_root
        self.entries: dict[bytes, Entry] = {}
        self.hidden: set[bytes] = set()  # whited out above: lower objects of this name are ignored
        self.closed: set[bytes] = set()  # directory chains that no longer merge
        self.second_part_ino: dict[bytes, int] = {}  # real inode of a merged dir's second part

    def add_layer(self, layer: Layer, only: bytes | None = None) -> bool:
        """Merge one layer's part of the directory (or just the name ``only``); False if it is opaque (stop)."""
        # O_PATH for single names: a directory whose listing fails may not open for reading at all
        flags = os.O_DIRECTORY | (os.O_RDONLY if only is None else os.O_PATH)
        try:
            fd = open_beneath(layer.fd, self.path, flags)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return True  # the part vanished; nothing to merge from this layer
            raise
        try:
            if only is not None:
                return self._merge_listing(layer, fd, _probe(fd, only))
            with os.scandir(fd) as listing:
                return self._merge_listing(layer, fd, listing)
        finally:
            os.close(fd)

    def _merge_listing(self, layer: Layer, fd: int, listing: Iterable[os.DirEntry | _Probe]) -> bool:
        marker = opaque_value(fd)
        opaque = marker == b"y" and not self.is_root
        xattr_whiteouts = marker == b"x" and not layer.is_upper
        whiteouts: list[bytes] = []
        entries, hidden, closed = self.entries, self.hidden, self.closed
        for de in listing:
            name = os.fsencode(de.name)
            if name.startswith(WH_PREFIX):
                if name == OPAQUE_FILE:
                    opaque = opaque or not self.is_root
                else:
                    whiteouts.append(name[len(WH_PREFIX):])
                continue
            if name in hidden:
                continue
            is_dir = de.is_dir(follow_symlinks=False)
            known = entries.get(name)
            if known is not None:
                if name not in closed:
                    if is_dir:
                        if len(known.dirs) == 1:
                            self.second_part_ino[name] = de.inode()
                        known.dirs += (layer,)
                    else:  # a whiteout or non-directory below a directory ends its chain
                        closed.add(name)
                continue
            st = de.stat(follow_symlinks=False)
            if not is_dir:
                if is_device_whiteout(st) or (xattr_whiteouts and is_xattr_whiteout(fd, name, st)):
                    whiteouts.append(name)
                    continue
                closed.add(name)
                entry = entries[name] = Entry(child_path(self.path, name), layer, st)
                if layer.is_upper:  # a copy-up keeps its lower number (0: none)
                    entry.ino = (self.stack.copied_inos.get(st.st_ino)
                                 or origin.lower_ino(self.stack, fd, name, st) or 0)
            else:
                entries[name] = Entry(child_path(self.path, name), layer, st, dirs=(layer,))
        for name in whiteouts:
            if name in entries:
                closed.add(name)
            else:
                hidden.add(name)
        return not opaque

    def finish(self) -> dict[bytes, Entry]:
        """Cut merged subdirectories at an opaque top part, and settle inode numbers."""
        by_layer: dict[int, list[Entry]] = {}
        for entry in self.entries.values():
            if len(entry.dirs) > 1:
                by_layer.setdefault(entry.layer.index, []).append(entry)
        for index, group in by_layer.items():
            layer = self.stack.layers[index]
            fd = open_beneath(layer.fd, self.path, os.O_PATH | os.O_DIRECTORY)
            try:
                for entry in group:
                    if _is_opaque_dir(fd, entry.name):
                        entry.dirs = entry.dirs[:1]
            finally:
                os.close(fd)
        for entry in self.entries.values():
            if entry.ino:
                continue  # settled by its origin
            real = entry.st.st_ino
            if entry.merged and entry.layer.is_upper:
                real = self.second_part_ino[entry.name]  # topmost lower part, as the kernel reports
                entry.ino = self.stack.ino(entry.dirs[1], real)
            else:
                entry.ino = self.stack.ino(entry.layer, real)
        return self.entries


class _Probe:
    """One name of a directory found by lstat, standing in for a listing's DirEntry."""

    __slots__ = ("name", "_st")

    def __init__(self, name: bytes, st: os.stat_result) -> None:
        self.name = os.fsdecode(name)
        self._st = st

    def is_dir(self, follow_symlinks: bool = False) -> bool:
        return stat.S_ISDIR(self._st.st_mode)

    def stat(self, follow_symlinks: bool = False) -> os.stat_result:
        return self._st

    def inode(self) -> int:
        return self._st.st_ino


def _probe(fd: int, name: bytes) -> list[_Probe]:
    """What a listing of ``fd`` would say about ``name``: the name, its OCI whiteout, the OCI opaque marker."""
    found = []
    for candidate in (name, WH_PREFIX + name, OPAQUE_FILE):
        if len(candidate) > NAME_MAX:
            continue
        try:
            found.append(_Probe(candidate, os.stat(candidate, dir_fd=fd, follow_symlinks=False)))
        except FileNotFoundError:
            pass
    return found


def _is_opaque_dir(parent_fd: int, name: bytes) -> bool:
    if opaque_value(parent_fd, name) == b"y":
        return True
    try:
        os.stat(name + b"/" + OPAQUE_FILE, dir_fd=parent_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def build_index(stack: LayerStack, directory: Entry, is_root: bool) -> dict[bytes, Entry]:
    """The merged entries of ``directory`` from one listing of each of its parts."""
    build = _Build(stack, directory.path, is_root)
    for layer in directory.dirs:
        if not build.add_layer(layer):
            break
    return build.finish()


def lookup_one(stack: LayerStack, directory: Entry, name: bytes, is_root: bool) -> Entry | None:
    """``name`` merged from an lstat in each part, for a directory that cannot be listed.

    A bad block can fail a layer's listing while single names are still
    found, as the kernel's overlay finds them; the same merge rules apply.
    """
    build = _Build(stack, directory.path, is_root)
    for layer in directory.dirs:
        if not build.add_layer(layer, name):
            break
    return build.finish().get(name)


def root_entry(stack: LayerStack) -> Entry:
    """The mount root: every layer's root merged, opaque markers ignored (as the kernel does)."""
    top = stack.layers[0]
    st = os.fstat(top.fd)
    return Entry(b"", top, st, ino=stack.ino(top, st.st_ino), dirs=tuple(stack.layers))


class Namei:
    """Merged-index cache: path -> {name: Entry}, bounded by total entries."""

    def __init__(self, stack: LayerStack, max_entries: int = 400_000) -> None:
        self.stack = stack
        self.root = root_entry(stack)
        self.max_entries = max_entries
        self._cache: OrderedDict[bytes, dict[bytes, Entry]] = OrderedDict()
        self._cached_entries = 0

    def index(self, directory: Entry) -> dict[bytes, Entry]:
        entries = self._cache.get(directory.path)
        if entries is not None:
            self._cache.move_to_end(directory.path)
            return entries
        entries = build_index(self.stack, directory, directory is self.root)
        self._cache[directory.path] = entries
        self._cached_entries += len(entries)
        while self._cached_entries > self.max_entries and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_entries -= len(evicted)
        return entries

    def parent(self, directory: Entry) -> Entry:
        """The entry of ``directory``'s parent (the root is its own parent)."""
        entry = self.root
        if b"/" in directory.path:
            for name in directory.parent_path().split(b"/"):
                child = self.child(entry, name)
                if child is None:
                    raise KeyError(directory.path)
                entry = child
        return entry

    def drop(self, path: bytes, subtree: bool = False) -> None:
        """Forget the cached index of ``path`` (and of everything below it)."""
        doomed = [path] if not subtree else [p for p in self._cache
                                            if p == path or p.startswith(path + b"/") or not path]
        for p in doomed:
            entries = self._cache.pop(p, None)
            if entries is not None:
                self._cached_entries -= len(entries)

    def put(self, path: bytes, name: bytes, entry: Entry) -> None:
        """Record a new name in the cached index of ``path`` (if cached)."""
        entries = self._cache.get(path)
        if entries is not None:
            self._cached_entries += name not in entries
            entries[name] = entry

    def remove(self, path: bytes, name: bytes) -> None:
        """Forget a removed name in the cached index of ``path`` (if cached)."""
        entries = self._cache.get(path)
        if entries is not None and entries.pop(name, None) is not None:
            self._cached_entries -= 1

    def find_ino(self, ino: int, besides: Entry) -> Entry | None:
        """Another cached name of the object ``ino`` (a hard link), if one is cached."""
        for entries in self._cache.values():
            for entry in entries.values():
                if entry.ino == ino and entry is not besides:
                    return entry
        return None

    def resolve(self, path: bytes) -> Entry | None:
        """The entry of a merged path, walking cached indexes from the root."""
        entry: Entry | None = self.root
        for name in path.split(b"/") if path else ():
            if entry is None or not entry.dirs:
                return None
            entry = self.child(entry, name)
        return entry

    def child(self, directory: Entry, name: bytes) -> Entry | None:
        """``name`` in ``directory``: from its index, or probed alone where the directory cannot be listed."""
        try:
            return self.index(directory).get(name)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            return lookup_one(self.stack, directory, name, directory is self.root)

    def lookup(self, directory: Entry, name: bytes) -> Entry | None:
        """The entry for ``name`` in ``directory``, or None if the merged view has no such name."""
        if len(name) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if name.startswith(WH_PREFIX):
            return None  # markers are never names of the merged view
        return self.child(directory, name)
