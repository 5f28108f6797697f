"""Directory operations of the merged view: new objects, removals, renames, whiteouts.

Rules (the shared spec's section 3, checked against the kernel's overlay):
- a new object is created in the upper part of its parent (copied up
  first); over an upper whiteout it is built in the workdir and renamed over
  it, and a new directory there is made opaque so the lower one stays hidden;
- removing a name through which a lower object shows (the lookup's own rule,
  ``Namei.lower_positive``) leaves a whiteout, built in the workdir and
  renamed into place; no data is copied to delete a file;
- a directory is removed only when its merged view is empty;
- a directory with lower parts cannot be renamed (EXDEV, redirect_dir off);
- a renamed object leaves a whiteout behind if a lower object shows through
  its old name.
Whiteouts are char 0:0 devices; only where those cannot be made is the OCI
``.wh.NAME`` file written instead (the kernel's overlay does not read it), each
change ordered so that a crash shows the old state or the new, never neither.
All of it runs under the engine's write lock, so each step sees the last.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ovlfuse.fs.copyup import CopyUp
from ovlfuse.fs.inode import Attrs, Inode, fail, set_owner
from ovlfuse.fs.layers import LayerStack
from ovlfuse.fs.markers import (
    is_reserved,
    is_xattr_whiteout,
    make_whiteout_file,
    opaque_value,
    remove_whiteout_file,
    set_opaque,
    whiteout_file_exists,
)
from ovlfuse.fs.namei import Entry, Namei
from ovlfuse.fs.statoverride import Stored
from ovlfuse.fs.workdir import Workdir, lstat_at
from ovlfuse.sys.safeio import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, open_beneath, renameat2

CopyUpFn = Callable[[Inode], Awaitable[Inode]]


@dataclass(frozen=True)
class NewObject:
    """What a create, mkdir, mknod, symlink or link asks for (the kernel's ``ovl_cattr``).

    ``owner``'s mode carries the type bits; ``link`` is the upper object a
    hard link names (already copied up); ``flags`` are a create's open flags.
    """

    owner: Stored
    target: bytes = b""  # a symlink's
    link: Inode | None = None
    flags: int = os.O_RDONLY

    @property
    def is_dir(self) -> bool:
        return self.link is None and stat.S_ISDIR(self.owner.mode)


class DirOps:
    def __init__(self, stack: LayerStack, namei: Namei, copyup: CopyUp, work: Workdir) -> None:
        assert stack.upper is not None
        self.stack = stack
        self.upper = stack.upper
        self.namei = namei
        self.copyup = copyup
        self.work = work

    def existing(self, parent: Inode, name: bytes) -> Entry:
        entry = self.namei.lookup(parent, name)
        if entry is None:
            raise fail(errno.ENOENT)
        return entry

    def is_empty(self, directory: Inode) -> bool:
        """Empty in the merged view, as the kernel decides before removing a directory.

        The kernel's check counts the xattr whiteouts of lower parts marked
        ``opaque=x`` as entries although readdir hides them, so such a
        directory cannot be removed through the kernel's overlay either.
        """
        if self.namei.children(directory):
            return False
        path = directory.path
        for layer in directory.parts:
            if layer.is_upper or path is None:
                continue
            try:
                fd = open_beneath(layer.fd, path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                if opaque_value(fd) == b"x" and any(
                        is_xattr_whiteout(fd, os.fsencode(de.name), de.stat(follow_symlinks=False))
                        for de in os.scandir(fd) if de.is_file(follow_symlinks=False)):
                    return False
            finally:
                os.close(fd)
        return True

    @staticmethod
    def _alias(directory: Inode) -> Entry:
        """The name of a directory a change happens in; a removed one takes no new names (ENOENT)."""
        if not directory.aliases:
            raise fail(errno.ENOENT)
        return directory.aliases[0]

    # --- new objects (the kernel's ovl_create_object) ---------------------------------------
    def check_new(self, parent: Inode, name: bytes) -> None:
        """Refuse a new name before anything is written (a failed call changes nothing)."""
        if is_reserved(name):
            raise fail(errno.EINVAL)  # would read back as a marker, not as this name
        if self.namei.lookup(parent, name) is not None:
            raise fail(errno.EEXIST)

    def create(self, parent: Inode, name: bytes, new: NewObject) -> tuple[Entry, int | None]:
        """Make ``new`` at ``name`` in the upper part of ``parent``; (its entry, a create's open fd)."""
        self.check_new(parent, name)
        parent_entry = self._alias(parent)
        opened: list[int] = []

        def build(dirfd: int, at: bytes) -> None:
            if new.link is not None:
                link_path = new.link.path
                assert link_path is not None
                os.link(link_path, at, src_dir_fd=self.upper.fd, dst_dir_fd=dirfd, follow_symlinks=False)
                return
            mode = new.owner.mode
            if stat.S_ISDIR(mode):
                os.mkdir(at, 0o700, dir_fd=dirfd)
            elif stat.S_ISREG(mode):
                flags = (new.flags & os.O_ACCMODE) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                opened.append(os.open(at, flags, 0o600, dir_fd=dirfd))
            elif stat.S_ISLNK(mode):
                os.symlink(new.target, at, dir_fd=dirfd)
            else:
                os.mknod(at, stat.S_IFMT(mode) | 0o600, new.owner.rdev, dir_fd=dirfd)
            set_owner(dirfd, at, self.upper.override, new.owner)

        upper_parent = self.copyup.upper_dir(parent_entry)
        try:
            old = lstat_at(upper_parent, name)
            marker = not self.work.device_whiteouts and whiteout_file_exists(upper_parent, name)
            if old is None and not marker:
                build(upper_parent, name)
            else:  # over a whiteout: build a copy aside, then move it in
                def build_marked(dirfd: int, at: bytes) -> None:
                    build(dirfd, at)
                    if new.is_dir:
                        set_opaque(dirfd, at, self.stack.userxattr)
                self.work.swap_in(build_marked, upper_parent, name, exchange=new.is_dir and old is not None)
                if marker:
                    remove_whiteout_file(upper_parent, name)
            st = os.stat(name, dir_fd=upper_parent, follow_symlinks=False)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        finally:
            os.close(upper_parent)
        parent.stale = True
        if new.link is not None:
            inode = new.link
            inode.st = Attrs(st)
            self.namei.shared(inode)
        else:
            inode = Inode(self.stack.ino(self.upper, st.st_ino), self.upper, st,
                          parts=(self.upper,) if new.is_dir else ())
            if new.is_dir:  # nothing below it shows
                self.namei.known_empty(inode)
        return self.namei.add(parent, name, inode), opened[0] if opened else None

    # --- removals ---------------------------------------------------------------------------
    def _whiteout_over(self, upper_parent: int, name: bytes, exchange: bool) -> None:
        """Put a whiteout at ``name``: renamed over a file, exchanged with a directory, or new."""
        if self.work.device_whiteouts:
            self.work.swap_in(self.work.linked_whiteout, upper_parent, name, exchange)
            return
        make_whiteout_file(upper_parent, name)  # first: until the object goes, it is still what shows
        old = lstat_at(upper_parent, name)
        if old is None:
            return
        if stat.S_ISDIR(old.st_mode):
            self._remove_upper_dir(upper_parent, name)
        else:
            os.unlink(name, dir_fd=upper_parent)

    def _remove(self, parent: Inode, entry: Entry, remove: Callable[[int, bool], None]) -> Inode:
        """Take ``entry`` out of ``parent``: ``remove(upper parent fd, whiteout needed)`` does it in the upper."""
        below = self.namei.lower_positive(parent, entry.name)
        upper_parent = self.copyup.upper_dir(self._alias(parent))
        try:
            self._losing(entry)
            remove(upper_parent, below)
        finally:
            os.close(upper_parent)
        self.namei.discard(parent, entry.name)
        self._lost(entry)
        parent.stale = True
        return entry.inode

    def _losing(self, entry: Entry) -> None:
        """Before a name goes: its object's link count now, and a pin if the kernel still holds it."""
        entry.inode.refresh()
        entry.inode.before_losing(entry)

    def _lost(self, entry: Entry) -> None:
        """After a name went: an upper object left with no link and no pin is gone, and its number with it."""
        inode = entry.inode
        inode.drop_alias(entry)
        if not inode.is_upper:
            return
        if inode.pin is not None:
            inode.refresh()  # nlink 0 when that was its last link
        elif not inode.aliases and inode.st.st_nlink <= 1:
            self.stack.copied_inos.pop(inode.st.st_ino, None)
            inode.st.st_nlink = 0
        else:
            inode.stale = True

    def unlink(self, parent: Inode, name: bytes) -> Inode:
        entry = self.existing(parent, name)
        if entry.inode.parts:
            raise fail(errno.EISDIR)

        def remove(upper_parent: int, below: bool) -> None:
            if below:
                self._whiteout_over(upper_parent, name, exchange=False)
            else:
                os.unlink(name, dir_fd=upper_parent)
        return self._remove(parent, entry, remove)

    def rmdir(self, parent: Inode, name: bytes) -> Inode:
        entry = self.existing(parent, name)
        directory = entry.inode
        if not directory.parts:
            raise fail(errno.ENOTDIR)
        if not self.is_empty(directory):
            raise fail(errno.ENOTEMPTY)

        def remove(upper_parent: int, below: bool) -> None:
            if below:
                self._whiteout_over(upper_parent, name, exchange=directory.is_upper)
            else:
                self._remove_upper_dir(upper_parent, name)
        self._remove(parent, entry, remove)
        self.namei.known_empty(directory)
        return directory

    def _remove_upper_dir(self, upper_parent: int, name: bytes) -> None:
        """Remove an upper dir that holds nothing but whiteouts (moved aside first)."""
        try:
            os.rmdir(name, dir_fd=upper_parent)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            tmp = self.work.tmpname()
            os.rename(name, tmp, src_dir_fd=upper_parent, dst_dir_fd=self.work.fd)
            self.work.remove(tmp)

    def _clear(self, upper_parent: int, name: bytes) -> None:
        """Empty an upper dir that is empty in the merged view (it holds only whiteouts)."""
        fd = open_beneath(upper_parent, name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for child in os.listdir(fd):
                os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)

    # --- rename -----------------------------------------------------------------------------
    def _mark_moved_dir(self, entry: Entry, upper_parent: int, name: bytes, into: Inode) -> None:
        """A directory moved into a merged directory is made opaque first, as the kernel does
        (before the rename itself, so the mark stays if the rename then fails)."""
        if entry.inode.parts and into.merged and opaque_value(upper_parent, name) != b"y":
            set_opaque(upper_parent, name, self.stack.userxattr)

    async def rename(self, p1: Inode, n1: bytes, p2: Inode, n2: bytes, flags: int,
                     copy_up: CopyUpFn) -> Inode | None:
        """Move ``n1`` to ``n2`` (``copy_up`` brings the source up); returns the inode it replaced, if any."""
        if is_reserved(n2):
            raise fail(errno.EINVAL)
        src = self.existing(p1, n1)
        dst = self.namei.lookup(p2, n2)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise fail(errno.EEXIST)
        moving = src.inode
        if moving.parts and (not moving.is_upper or moving.merged):
            raise fail(errno.EXDEV)
        replaced_dir = dst is not None and bool(dst.inode.parts)
        if replaced_dir and (dst.inode.merged or not dst.inode.is_upper) and not self.is_empty(dst.inode):
            raise fail(errno.ENOTEMPTY)
        await copy_up(moving)
        src_below = self.namei.lower_positive(p1, n1)
        e1, e2 = self._alias(p1), self._alias(p2)
        up1 = self.copyup.upper_dir(e1)
        try:
            up2 = self.copyup.upper_dir(e2)
            try:
                self._mark_moved_dir(src, up1, n1, p2)
                if replaced_dir and not self.is_empty(dst.inode):
                    raise fail(errno.ENOTEMPTY)  # the upper rename's own refusal, after the mark
                if dst is not None:
                    self._losing(dst)
                self._move(src.inode, up1, n1, up2, n2, src_below)
            finally:
                os.close(up2)
        finally:
            os.close(up1)
        p1.stale = p2.stale = src.inode.stale = True
        self.namei.discard(p1, n1)
        if dst is not None:
            self.namei.discard(p2, n2)
            self._lost(dst)
        self._relink(src, p2, n2)
        return dst.inode if dst is not None else None

    def _relink(self, entry: Entry, directory: Inode, name: bytes) -> None:
        """Give ``entry`` its new place: everything below a moved directory follows with it."""
        entry.parent = self._alias(directory)
        entry.name = name
        if directory.children is not None:
            directory.children[name] = entry
            self.namei.cached_entries += 1

    async def exchange(self, p1: Inode, n1: bytes, p2: Inode, n2: bytes, copy_up: CopyUpFn) -> None:
        """Swap two names (RENAME_EXCHANGE); no whiteouts are needed since both names stay."""
        first, second = self.existing(p1, n1), self.existing(p2, n2)
        for entry in (first, second):
            if entry.inode.parts and (not entry.inode.is_upper or entry.inode.merged):
                raise fail(errno.EXDEV)
        await copy_up(first.inode)
        await copy_up(second.inode)
        up1 = self.copyup.upper_dir(self._alias(p1))
        try:
            up2 = self.copyup.upper_dir(self._alias(p2))
            try:
                self._mark_moved_dir(first, up1, n1, p2)
                self._mark_moved_dir(second, up2, n2, p1)
                renameat2(up1, n1, up2, n2, RENAME_EXCHANGE)
            finally:
                os.close(up2)
        finally:
            os.close(up1)
        p1.stale = p2.stale = first.inode.stale = second.inode.stale = True
        self.namei.discard(p1, n1)
        self.namei.discard(p2, n2)
        self._relink(first, p2, n2)
        self._relink(second, p1, n1)

    def _move(self, moving: Inode, up1: int, n1: bytes, up2: int, n2: bytes, src_below: bool) -> None:
        """Rename in the upper layer, leaving a whiteout at the old name where a lower object shows through it."""
        target = lstat_at(up2, n2)
        if moving.parts and target is not None and not stat.S_ISDIR(target.st_mode):
            # a directory cannot replace the whiteout: swap them, keep it at n1 if needed
            renameat2(up1, n1, up2, n2, RENAME_EXCHANGE)
            if not src_below:
                os.unlink(n1, dir_fd=up1)
            return
        if target is not None and stat.S_ISDIR(target.st_mode):
            self._clear(up2, n2)
        if not self.work.device_whiteouts:
            if src_below:
                make_whiteout_file(up1, n1)  # the old name shows the object until it moves
            os.rename(n1, n2, src_dir_fd=up1, dst_dir_fd=up2)
            remove_whiteout_file(up2, n2)
            return
        if not src_below:
            os.rename(n1, n2, src_dir_fd=up1, dst_dir_fd=up2)
            return
        try:
            renameat2(up1, n1, up2, n2, RENAME_WHITEOUT)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EINVAL):
                raise
            os.rename(n1, n2, src_dir_fd=up1, dst_dir_fd=up2)
            self._whiteout_over(up1, n1, exchange=False)
