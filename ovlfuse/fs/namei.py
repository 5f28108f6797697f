"""Lookup: names of the merged view, and the merged index of a directory.

A directory's merged index is built once, from one listing of each layer
part of the directory, and then answers every lookup, negative lookup and
readdir in that directory with a dictionary hit.  The index lives on the
directory's ``Inode`` and maps each name to an ``Entry``: the name, its
parent's entry, and the ``Inode`` of the object it names.  Paths are never
stored; they follow from the parent chain, so renaming a directory moves
everything below it at once.

Merge rules (the shared spec's section 2, checked against the kernel):
- layers are searched top-down; the first object or whiteout for a name decides;
- a directory keeps merging with same-named directories below it until a
  whiteout, a non-directory, or an opaque directory ends the chain;
- a whiteout hides names in the layers below it, never in its own layer;
- the mount root merges every layer and ignores opaque markers;
- a merged directory reports nlink 1 and, when it has an upper part, the inode
  number of its topmost lower directory.

The indexes of directories the kernel has forgotten are kept in a bounded
LRU and dropped beyond it; those the kernel holds stay, since it may ask for
any name in them at any time.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref
from collections import OrderedDict
from collections.abc import Iterable

from ovlfuse.fs import origin
from ovlfuse.fs.inode import Inode, NodeTable, fail, same_object
from ovlfuse.fs.layers import Layer, LayerStack
from ovlfuse.fs.markers import (
    NAME_MAX,
    OPAQUE_FILE,
    WH_PREFIX,
    Marker,
    is_opaque_dir,
    is_reserved,
    is_whiteout,
    marker_name,
    opaque_value,
)
from ovlfuse.sys.safeio import open_beneath


class Entry:
    """One name of the merged view (the kernel's dentry): it points to the object it names."""

    __slots__ = ("name", "parent", "inode")

    def __init__(self, name: bytes, parent: Entry | None, inode: Inode) -> None:
        self.name = name
        self.parent = parent  # None for the root
        self.inode = inode

    def __repr__(self) -> str:
        return f"<Entry {self.path!r} -> {self.inode.ino}>"

    @property
    def path(self) -> bytes:
        """The merged path from the mount root (b"" for the root); the same in every layer."""
        names = []
        entry: Entry | None = self
        while entry is not None and entry.parent is not None:
            names.append(entry.name)
            entry = entry.parent
        names.reverse()
        return b"/".join(names)


def child_path(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class _Build:
    """State of one index build: names decided so far and names hidden from below."""

    def __init__(self, stack: LayerStack, path: bytes, is_root: bool) -> None:
        self.stack = stack
        self.path = path
        self.is_root = is_root
        self.found: dict[bytes, Inode] = {}
        self.hidden: set[bytes] = set()  # whited out above: lower objects of this name are ignored
        self.closed: set[bytes] = set()  # directory chains that no longer merge
        self.second_part_ino: dict[bytes, int] = {}  # real inode of a merged dir's second part
        self.listed = 0  # parts listed before an opaque one ended the directory

    def add_layer(self, layer: Layer, only: bytes | None = None) -> bool:
        """Merge one layer's part of the directory (or just the name ``only``); False if it is opaque (stop)."""
        self.listed += 1
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
        found, hidden, closed = self.found, self.hidden, self.closed
        for de in listing:
            name = os.fsencode(de.name)
            by_name = marker_name(name)
            if by_name is not None:
                kind, target = by_name
                if kind is Marker.OPAQUE:
                    opaque = opaque or not self.is_root
                else:
                    whiteouts.append(target)
                continue
            if name in hidden:
                continue
            is_dir = de.is_dir(follow_symlinks=False)
            known = found.get(name)
            if known is not None:
                if name not in closed:
                    if is_dir:
                        if len(known.parts) == 1:
                            self.second_part_ino[name] = de.inode()
                        known.parts += (layer,)
                    else:  # a whiteout or non-directory below a directory ends its chain
                        closed.add(name)
                continue
            st = de.stat(follow_symlinks=False)
            if is_dir:
                found[name] = Inode(0, layer, st, parts=(layer,))
                continue
            if is_whiteout(fd, name, st, xattr_whiteouts):
                whiteouts.append(name)
                continue
            closed.add(name)
            inode = found[name] = Inode(0, layer, st)
            if layer.is_upper:  # a copy-up keeps its lower number (0: none)
                inode.ino = (self.stack.copied_inos.get(st.st_ino)
                             or origin.lower_ino(self.stack, fd, name, st) or 0)
        for name in whiteouts:
            if name in found:
                closed.add(name)
            else:
                hidden.add(name)
        return not opaque

    def finish(self) -> dict[bytes, Inode]:
        """Cut merged subdirectories at an opaque top part, and settle inode numbers."""
        by_layer: dict[int, list[tuple[bytes, Inode]]] = {}
        for name, inode in self.found.items():
            if len(inode.parts) > 1:
                by_layer.setdefault(inode.layer.index, []).append((name, inode))
        for index, group in by_layer.items():
            layer = self.stack.layers[index]
            fd = open_beneath(layer.fd, self.path, os.O_PATH | os.O_DIRECTORY)
            try:
                for name, inode in group:
                    if is_opaque_dir(fd, name):
                        inode.parts = inode.parts[:1]
            finally:
                os.close(fd)
        for name, inode in self.found.items():
            if inode.ino:
                continue  # settled by its origin
            if inode.merged and inode.is_upper:
                # topmost lower part, as the kernel reports
                inode.ino = self.stack.ino(inode.parts[1], self.second_part_ino[name])
            else:
                inode.ino = self.stack.ino(inode.layer, inode.st.st_ino)
        return self.found


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


def merge(stack: LayerStack, path: bytes, parts: Iterable[Layer], is_root: bool,
          only: bytes | None = None) -> tuple[dict[bytes, Inode], int]:
    """The merged names of the directory at ``path`` from its ``parts`` (or the name ``only``), and the parts used.

    The lookup's one merge rule: the index, a single name of a directory that
    cannot be listed, and the question whether a lower object shows through
    a name (``Namei.lower_positive``) all come from here.
    """
    build = _Build(stack, path, is_root)
    for layer in parts:
        if not build.add_layer(layer, only):
            break
    return build.finish(), build.listed


def root_inode(stack: LayerStack) -> tuple[Entry, Inode]:
    """The mount root: every layer's root merged, opaque markers ignored (as the kernel does)."""
    top = stack.layers[0]
    st = os.fstat(top.fd)
    inode = Inode(stack.ino(top, st.st_ino), top, st, parts=tuple(stack.layers))
    entry = Entry(b"", None, inode)
    inode.add_alias(entry)
    return entry, inode


class Namei:
    """Merged indexes on directory inodes; those of directories the kernel forgot are an LRU bounded by entries."""

    def __init__(self, stack: LayerStack, max_entries: int = 400_000) -> None:
        self.stack = stack
        self.root_entry, root = root_inode(stack)
        self.nodes = NodeTable(root)
        self.max_entries = max_entries
        self.cached_entries = 0  # names in all built indexes
        self.indexed_dirs = 0  # directories with an index
        self._idle: OrderedDict[Inode, None] = OrderedDict()  # forgotten directories with an index
        # objects with more than one link, by (device, real inode): all their names share one Inode
        self._links: weakref.WeakValueDictionary[tuple[int, int], Inode] = weakref.WeakValueDictionary()

    @property
    def root(self) -> Inode:
        return self.nodes.root

    # --- the index of a directory -------------------------------------------------------
    def children(self, directory: Inode) -> dict[bytes, Entry]:
        """The merged index of ``directory``, built on first use (OSError EIO: it cannot be listed)."""
        children = directory.children
        if children is not None and directory.complete:
            if directory in self._idle:
                self._idle.move_to_end(directory)
            return children
        path = directory.path
        if path is None:  # removed: nothing can be in it
            found: dict[bytes, Inode] = {}
            listed = len(directory.parts)
        else:
            found, listed = merge(self.stack, path, directory.parts, directory.is_root)
        directory.parts = directory.parts[:listed]  # an opaque part ends the directory
        entries = children if children is not None else {}
        for name, inode in found.items():
            if name not in entries:
                entries[name] = self._entry(directory, name, inode)
        self._indexed(directory, entries, complete=True)
        return entries

    def _entry(self, directory: Inode, name: bytes, inode: Inode) -> Entry:
        """A new name in ``directory``'s index, naming the inode already known for the same object, if any."""
        parent = directory.aliases[0] if directory.aliases else None
        held = self.nodes.held(inode.ino)
        if held is not None and same_object(held, inode):
            inode = held
        inode = self.shared(inode)
        entry = Entry(name, parent, inode)
        inode.aliases.append(entry)
        return entry

    def shared(self, inode: Inode) -> Inode:
        """The one Inode of a hard-linked object: a link count or a change seen through one name is seen by all."""
        if inode.parts or inode.st.st_nlink < 2:
            return inode
        key = (inode.layer.dev, inode.st.st_ino)
        known = self._links.get(key)
        if known is not None and same_object(known, inode):
            return known
        self._links[key] = inode
        return inode

    def _indexed(self, directory: Inode, entries: dict[bytes, Entry], complete: bool) -> None:
        before = 0 if directory.children is None else len(directory.children)
        self.indexed_dirs += directory.children is None
        directory.children = entries
        directory.complete = complete
        self.cached_entries += len(entries) - before
        if directory.nlookup == 0 and not directory.is_root:
            self._idle[directory] = None
            self._idle.move_to_end(directory)
        self._shrink()

    def _shrink(self) -> None:
        while self.cached_entries > self.max_entries and self._idle:
            directory, _ = self._idle.popitem(last=False)
            self._evict(directory)

    def _evict(self, directory: Inode) -> None:
        """Drop the index of a forgotten directory, and the indexes below it."""
        children = directory.children
        if children is None:
            return
        directory.children = None
        directory.complete = False
        self._idle.pop(directory, None)
        self.cached_entries -= len(children)
        self.indexed_dirs -= 1
        for entry in children.values():
            entry.inode.aliases = [a for a in entry.inode.aliases if a is not entry]
            if entry.inode.children is not None and entry.inode.nlookup == 0:
                self._evict(entry.inode)

    def held(self, inode: Inode) -> None:
        """The kernel took its first reference to ``inode``: its index is no longer evictable."""
        self._idle.pop(inode, None)

    def released(self, inode: Inode) -> None:
        """The kernel dropped its last reference to ``inode``: its index may go when the cache is full."""
        if inode.children is not None:
            self._idle[inode] = None
            self._shrink()

    # --- changes made through the merged view -------------------------------------------------
    def known_empty(self, directory: Inode) -> None:
        """``directory`` holds nothing (new, or just removed): its index is empty, no listing needed."""
        for entry in (directory.children or {}).values():
            entry.inode.drop_alias(entry)
        self._indexed(directory, {}, complete=True)

    def add(self, directory: Inode, name: bytes, inode: Inode) -> Entry:
        """Record a new name in ``directory`` (its index gets it, if built)."""
        entry = Entry(name, directory.aliases[0] if directory.aliases else None, inode)
        inode.add_alias(entry)
        if directory.children is not None:
            old = directory.children.get(name)
            if old is not None:
                old.inode.drop_alias(old)
            else:
                self.cached_entries += 1
            directory.children[name] = entry
        return entry

    def discard(self, directory: Inode, name: bytes) -> None:
        """A name removed from ``directory``."""
        if directory.children is not None and directory.children.pop(name, None) is not None:
            self.cached_entries -= 1

    # --- lookups ---------------------------------------------------------------------------
    def lookup(self, directory: Inode, name: bytes) -> Entry | None:
        """The entry for ``name`` in ``directory``, or None if the merged view has no such name."""
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if is_reserved(name):
            return None  # markers are never names of the merged view
        if not directory.parts:
            raise fail(errno.ENOTDIR)
        try:
            return self.children(directory).get(name)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
        return self._lookup_one(directory, name)

    def _lookup_one(self, directory: Inode, name: bytes) -> Entry | None:
        """``name`` merged from an lstat in each part, for a directory that cannot be listed.

        A bad block can fail a layer's listing while single names are still
        found, as the kernel's overlay finds them; the same merge rules apply.
        Names found are kept, so a name is probed once.
        """
        entries = directory.children if directory.children is not None else {}
        entry = entries.get(name)
        if entry is not None:
            return entry
        path = directory.path
        if path is None:
            return None
        found, _ = merge(self.stack, path, directory.parts, directory.is_root, only=name)
        inode = found.get(name)
        if inode is None:
            return None
        entry = entries[name] = self._entry(directory, name, inode)
        self._indexed(directory, entries, complete=False)
        return entry

    def lower_positive(self, directory: Inode, name: bytes) -> bool:
        """Whether a lower object shows through ``name`` in ``directory``: removing the name then needs a whiteout.

        The lookup's own merge over the directory's lower parts, as the
        kernel asks ``ovl_lower_positive``: an object hidden by a whiteout, an
        opaque part or a non-directory above it needs none.
        """
        lower = [layer for layer in directory.parts if not layer.is_upper]
        path = directory.path
        if not lower or path is None:
            return False
        found, _ = merge(self.stack, path, lower, directory.is_root, only=name)
        return name in found

    def resolve(self, path: bytes) -> Entry | None:
        """The entry of a merged path, walking indexes from the root."""
        entry: Entry | None = self.root_entry
        for name in path.split(b"/") if path else ():
            if entry is None or not entry.inode.parts:
                return None
            entry = self.lookup(entry.inode, name)
        return entry
