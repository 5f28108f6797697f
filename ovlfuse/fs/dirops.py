"""Directory operations of the merged view: new names, removals, renames, whiteouts.

Rules (shared spec section 3, checked against the kernel's overlay):
- a new name is created in the upper part of its parent (copied up first);
  over an upper whiteout it is built in the workdir and renamed over it, and a
  new directory there is made opaque so the lower one stays hidden;
- removing a name that still exists below leaves a whiteout, built in the
  workdir and renamed into place; no data is copied to delete a file;
- a directory is removed only when its merged view is empty;
- a directory with lower parts cannot be renamed (EXDEV, redirect_dir off);
- a renamed object leaves a whiteout behind if its old name exists below.
Whiteouts are char 0:0 devices; only where those cannot be made is the OCI
``.wh.NAME`` file written instead (the kernel's overlay does not read it), each
change ordered so that a crash shows the old state or the new, never neither.
All of it runs under the engine's write lock, so each step sees the last.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable

import pyfuse3

from ovlfuse.fs.copyup import SHARED_WHITEOUT, CopyUp, Workdir
from ovlfuse.fs.layers import LayerStack
from ovlfuse.fs.markers import (
    WH_PREFIX,
    is_device_whiteout,
    is_xattr_whiteout,
    make_whiteout,
    make_whiteout_file,
    opaque_value,
    remove_whiteout_file,
    set_opaque,
    try_make_whiteout,
    whiteout_file_exists,
)
from ovlfuse.fs.namei import Entry, Namei, child_path
from ovlfuse.sys.safeio import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    open_beneath,
    renameat2,
)


log = logging.getLogger(__name__)


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _lstat(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class DirOps:
    def __init__(self, stack: LayerStack, namei: Namei, copyup: CopyUp, work: Workdir) -> None:
        assert stack.upper is not None
        self.stack = stack
        self.upper = stack.upper
        self.namei = namei
        self.copyup = copyup
        self.work = work
        self.share_whiteouts = True
        self.shared_whiteout = False  # whether work/ holds it now (work/ is emptied at mount)

    @functools.cached_property
    def device_whiteouts(self) -> bool:
        """Whether whiteouts can be char 0:0 devices.

        Found out at the first change, so a mount alone writes nothing, by
        making the shared whiteout that later whiteouts are links of.
        """
        works = self.shared_whiteout = try_make_whiteout(self.work.fd, SHARED_WHITEOUT)
        if not works:
            log.warning("char 0:0 whiteouts cannot be made on the upper filesystem; writing .wh. files "
                        "instead, which the kernel's overlay does not read")
        return works

    def existing(self, parent: Entry, name: bytes) -> Entry:
        entry = self.namei.lookup(parent, name)
        if entry is None:
            raise _fail(errno.ENOENT)
        return entry

    def lower_has(self, parent: Entry, name: bytes) -> bool:
        """Whether ``name`` exists in a lower part of ``parent`` (so removing it needs a whiteout)."""
        for layer in parent.dirs:
            if layer.is_upper:
                continue
            try:
                fd = open_beneath(layer.fd, parent.path, os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                raise
            try:
                st = _lstat(fd, name)
                if st is None:
                    if whiteout_file_exists(fd, name):
                        return False
                    continue
                if is_device_whiteout(st):
                    return False
                if opaque_value(fd) == b"x" and is_xattr_whiteout(fd, name, st):
                    return False
                return True
            finally:
                os.close(fd)
        return False

    def is_empty(self, directory: Entry) -> bool:
        """Empty in the merged view, as the kernel decides before removing a directory.

        The kernel's check counts the xattr whiteouts of lower parts marked
        ``opaque=x`` as entries although readdir hides them, so such a
        directory cannot be removed through the kernel's overlay either.
        """
        if self.namei.index(directory):
            return False
        for layer in directory.dirs:
            if layer.is_upper:
                continue
            try:
                fd = open_beneath(layer.fd, directory.path, os.O_RDONLY | os.O_DIRECTORY)
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

    # --- new names ------------------------------------------------------------
    def check_new(self, parent: Entry, name: bytes) -> None:
        """Refuse a new name before anything is written (a failed call changes nothing)."""
        if name.startswith(WH_PREFIX):
            raise _fail(errno.EINVAL)  # would read back as a marker, not as this name
        if self.namei.lookup(parent, name) is not None:
            raise _fail(errno.EEXIST)

    def place(self, parent: Entry, name: bytes, build: Callable[[int, bytes], None], is_dir: bool) -> Entry:
        """Create ``name`` with ``build(dirfd, name)`` in the upper part of ``parent``."""
        self.check_new(parent, name)
        upper_parent = self.copyup.upper_dir(parent)
        try:
            old = _lstat(upper_parent, name)
            marker = not self.device_whiteouts and whiteout_file_exists(upper_parent, name)
            if old is None and not marker:
                build(upper_parent, name)
            else:  # over a whiteout: build a copy aside, then move it in
                def build_marked(dirfd: int, new: bytes) -> None:
                    build(dirfd, new)
                    if is_dir:
                        set_opaque(dirfd, new, self.stack.userxattr)
                self._swap_in(build_marked, upper_parent, name, exchange=is_dir and old is not None)
                if marker:
                    remove_whiteout_file(upper_parent, name)
            st = os.stat(name, dir_fd=upper_parent, follow_symlinks=False)
        finally:
            os.close(upper_parent)
        entry = Entry(child_path(parent.path, name), self.upper, st, ino=self.stack.ino(self.upper, st.st_ino),
                      dirs=(self.upper,) if is_dir else ())
        self.namei.put(parent.path, name, entry)
        return entry

    async def link(self, entry: Entry, parent: Entry, name: bytes) -> Entry:
        """A new name for ``entry``'s object, copying the object up first."""
        self.check_new(parent, name)
        await self.copyup.copy_up(entry)
        source_parent = open_beneath(self.upper.fd, entry.parent_path(), os.O_PATH | os.O_DIRECTORY)
        try:
            def build(dirfd: int, new: bytes) -> None:
                os.link(entry.name, new, src_dir_fd=source_parent, dst_dir_fd=dirfd, follow_symlinks=False)
            new_entry = self.place(parent, name, build, is_dir=False)
        finally:
            os.close(source_parent)
        new_entry.ino = entry.ino
        entry.st = new_entry.st
        return new_entry

    # --- removals ---------------------------------------------------------------
    def _swap_in(self, build: Callable[[int, bytes], None], upper_parent: int, name: bytes, exchange: bool) -> None:
        """Build an object in work/ and move it to ``name``: exchanged with what is there, or renamed over it.

        Nothing is left in work/ either way: not a half-built object, nor what an exchange moved out.
        """
        tmp = self.work.tmpname()
        try:
            build(self.work.fd, tmp)
            if exchange:
                renameat2(self.work.fd, tmp, upper_parent, name, RENAME_EXCHANGE)
            else:
                os.rename(tmp, name, src_dir_fd=self.work.fd, dst_dir_fd=upper_parent)
        finally:
            if _lstat(self.work.fd, tmp) is not None:
                self.work.remove(tmp)

    def _linked_whiteout(self, dirfd: int, name: bytes) -> None:
        """A whiteout made the kernel's way: a link of one shared whiteout in work/, no inode each.

        Where a link fails, the shared whiteout itself becomes this one (so a
        lower name can still be removed when the upper is out of inodes), and
        a failure other than too many links ends the sharing for this mount.
        """
        work = self.work.fd
        if not self.shared_whiteout:
            make_whiteout(work, SHARED_WHITEOUT)
            self.shared_whiteout = True
        if self.share_whiteouts:
            try:
                os.link(SHARED_WHITEOUT, name, src_dir_fd=work, dst_dir_fd=dirfd, follow_symlinks=False)
                return
            except OSError as e:
                if e.errno != errno.EMLINK:
                    log.warning("whiteouts are no longer shared: %s", os.strerror(e.errno or errno.EIO))
                    self.share_whiteouts = False
        os.rename(SHARED_WHITEOUT, name, src_dir_fd=work, dst_dir_fd=dirfd)
        self.shared_whiteout = False

    def _whiteout_over(self, upper_parent: int, name: bytes, exchange: bool) -> None:
        """Put a whiteout at ``name``: renamed over a file, exchanged with a directory, or new."""
        if self.device_whiteouts:
            self._swap_in(self._linked_whiteout, upper_parent, name, exchange)
            return
        make_whiteout_file(upper_parent, name)  # first: until the object goes, it is still what shows
        old = _lstat(upper_parent, name)
        if old is None:
            return
        if stat.S_ISDIR(old.st_mode):
            self._remove_upper_dir(upper_parent, name)
        else:
            os.unlink(name, dir_fd=upper_parent)

    def unlink(self, parent: Entry, name: bytes) -> Entry:
        entry = self.existing(parent, name)
        if entry.dirs:
            raise _fail(errno.EISDIR)
        below = self.lower_has(parent, name)
        upper_parent = self.copyup.upper_dir(parent)
        try:
            if below:
                self._whiteout_over(upper_parent, name, exchange=False)
            else:
                os.unlink(name, dir_fd=upper_parent)
        finally:
            os.close(upper_parent)
        self.namei.remove(parent.path, name)
        return entry

    def rmdir(self, parent: Entry, name: bytes) -> Entry:
        entry = self.existing(parent, name)
        if not entry.dirs:
            raise _fail(errno.ENOTDIR)
        if not self.is_empty(entry):
            raise _fail(errno.ENOTEMPTY)
        below = self.lower_has(parent, name)
        upper_parent = self.copyup.upper_dir(parent)
        try:
            if below:
                self._whiteout_over(upper_parent, name, exchange=entry.layer.is_upper)
            else:
                self._remove_upper_dir(upper_parent, name)
        finally:
            os.close(upper_parent)
        self.namei.remove(parent.path, name)
        self.namei.drop(entry.path, subtree=True)
        return entry

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

    # --- rename ---------------------------------------------------------------------
    async def rename(self, p1: Entry, n1: bytes, p2: Entry, n2: bytes, flags: int,
                     copy_up: Callable[[Entry], Awaitable[object]]) -> tuple[Entry, Entry | None]:
        """Move ``n1`` to ``n2`` (``copy_up`` brings the source up); returns (moved, replaced or None)."""
        if n2.startswith(WH_PREFIX):
            raise _fail(errno.EINVAL)
        src = self.existing(p1, n1)
        dst = self.namei.lookup(p2, n2)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise _fail(errno.EEXIST)
        if src.dirs and (not src.layer.is_upper or src.merged):
            raise _fail(errno.EXDEV)
        if dst is not None and dst.dirs and not self.is_empty(dst):
            raise _fail(errno.ENOTEMPTY)
        await copy_up(src)
        src_below = self.lower_has(p1, n1)
        up1 = self.copyup.upper_dir(p1)
        try:
            up2 = self.copyup.upper_dir(p2)
            try:
                self._move(src, up1, n1, up2, n2, src_below, p2.merged)
            finally:
                os.close(up2)
        finally:
            os.close(up1)
        self.namei.remove(p1.path, n1)
        self.namei.put(p2.path, n2, src)
        old_path = src.path
        src.path = child_path(p2.path, n2)
        if src.dirs:
            self.namei.drop(old_path, subtree=True)
            self.namei.drop(src.path, subtree=True)
        return src, dst

    async def exchange(self, p1: Entry, n1: bytes, p2: Entry, n2: bytes,
                       copy_up: Callable[[Entry], Awaitable[object]]) -> tuple[Entry, Entry]:
        """Swap two names (RENAME_EXCHANGE); no whiteouts are needed since both names stay."""
        first, second = self.existing(p1, n1), self.existing(p2, n2)
        for entry in (first, second):
            if entry.dirs and (not entry.layer.is_upper or entry.merged):
                raise _fail(errno.EXDEV)
        await copy_up(first)
        await copy_up(second)
        up1 = self.copyup.upper_dir(p1)
        try:
            up2 = self.copyup.upper_dir(p2)
            try:
                for entry, fd, name, into in ((first, up1, n1, p2), (second, up2, n2, p1)):
                    if entry.dirs and into.merged and opaque_value(fd, name) != b"y":
                        set_opaque(fd, name, self.stack.userxattr)
                renameat2(up1, n1, up2, n2, RENAME_EXCHANGE)
            finally:
                os.close(up2)
        finally:
            os.close(up1)
        self.namei.put(p1.path, n1, second)
        self.namei.put(p2.path, n2, first)
        for entry in (first, second):
            if entry.dirs:
                self.namei.drop(entry.path, subtree=True)
        first.path, second.path = child_path(p2.path, n2), child_path(p1.path, n1)
        return first, second

    def _move(self, src: Entry, up1: int, n1: bytes, up2: int, n2: bytes, src_below: bool, into_merged: bool) -> None:
        """Rename in the upper layer; a directory moved into a merged place is made opaque (as the kernel)."""
        is_dir = bool(src.dirs)
        if is_dir and into_merged and opaque_value(up1, n1) != b"y":
            set_opaque(up1, n1, self.stack.userxattr)
        target = _lstat(up2, n2)
        if is_dir and target is not None and not stat.S_ISDIR(target.st_mode):
            # a directory cannot replace the whiteout: swap them, keep it at n1 if needed
            renameat2(up1, n1, up2, n2, RENAME_EXCHANGE)
            if not src_below:
                os.unlink(n1, dir_fd=up1)
            return
        if target is not None and stat.S_ISDIR(target.st_mode):
            self._clear(up2, n2)
        if not self.device_whiteouts:
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
