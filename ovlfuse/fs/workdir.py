"""The workdir: scratch space on the upper filesystem, where changes are built before they appear.

Everything that must appear whole in the upper dir (a copy-up, a whiteout, a
new object over a whiteout) is built in ``<workdir>/work`` and renamed into
place, so a crash leaves the old state or the new one.  It also holds the
one shared whiteout that every whiteout is a hard link of, as the kernel
keeps one there.  ``work/`` is emptied at mount and on unmount.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import shutil
import stat
from collections.abc import Callable

from ovlfuse.fs.markers import make_whiteout, try_make_whiteout
from ovlfuse.sys.safeio import RENAME_EXCHANGE, open_beneath, renameat2

log = logging.getLogger(__name__)

# The whiteout every new whiteout is a hard link of, as the kernel keeps one in work/.
SHARED_WHITEOUT = b"whiteout"


def _open_up(base: int) -> None:
    """Give ``work`` back to its unprivileged owner: a kernel mount in a user namespace leaves it at mode 0."""
    if os.geteuid() == 0:
        return
    try:
        fd = open_beneath(base, b"work", os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return  # not a directory of its own: the open that follows says so
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o700 != 0o700:
            os.chmod(f"/proc/self/fd/{fd}", 0o700)
    finally:
        os.close(fd)


def lstat_at(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class Workdir:
    """``<workdir>/work`` and the shared whiteout in it."""

    def __init__(self, workdir: str) -> None:
        base = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                os.mkdir("work", 0o700, dir_fd=base)  # the kernel's mode 0 would lock out an unprivileged daemon
            except FileExistsError:
                _open_up(base)
            self.fd = open_beneath(base, b"work", os.O_RDONLY | os.O_DIRECTORY)
        finally:
            os.close(base)
        self._names = itertools.count()
        self.share_whiteouts = True
        self.shared_whiteout = False  # whether work/ holds it now
        self.clean()

    def clean(self) -> None:
        """Remove whatever an interrupted operation left behind."""
        for name in os.listdir(self.fd):
            self.remove(os.fsencode(name))

    def tmpname(self) -> bytes:
        return b"tmp.%d.%d" % (os.getpid(), next(self._names))

    def remove(self, name: bytes) -> None:
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=self.fd)
        else:
            os.unlink(name, dir_fd=self.fd)

    def discard(self, name: bytes) -> None:
        """Remove ``name`` if a failed change left it."""
        if lstat_at(self.fd, name) is not None:
            self.remove(name)

    def close(self) -> None:
        """Unmount: drop the shared whiteout too, so work/ is left empty."""
        try:
            os.unlink(SHARED_WHITEOUT, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        os.close(self.fd)

    @functools.cached_property
    def device_whiteouts(self) -> bool:
        """Whether whiteouts can be char 0:0 devices.

        Found out at the first change, so a mount alone writes nothing, by
        making the shared whiteout that later whiteouts are links of.
        """
        works = self.shared_whiteout = try_make_whiteout(self.fd, SHARED_WHITEOUT)
        if not works:
            log.warning("char 0:0 whiteouts cannot be made on the upper filesystem; writing .wh. files "
                        "instead, which the kernel's overlay does not read")
        return works

    def swap_in(self, build: Callable[[int, bytes], None], upper_parent: int, name: bytes, exchange: bool) -> None:
        """Build an object in work/ and move it to ``name``: exchanged with what is there, or renamed over it.

        Nothing is left in work/ either way: not a half-built object, nor what an exchange moved out.
        """
        tmp = self.tmpname()
        try:
            build(self.fd, tmp)
            if exchange:
                renameat2(self.fd, tmp, upper_parent, name, RENAME_EXCHANGE)
            else:
                os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=upper_parent)
        finally:
            self.discard(tmp)

    def linked_whiteout(self, dirfd: int, name: bytes) -> None:
        """A whiteout made the kernel's way: a link of one shared whiteout in work/, no inode each.

        Where a link fails, the shared whiteout itself becomes this one (so a
        lower name can still be removed when the upper is out of inodes), and
        a failure other than too many links ends the sharing for this mount.
        """
        if not self.shared_whiteout:
            make_whiteout(self.fd, SHARED_WHITEOUT)
            self.shared_whiteout = True
        if self.share_whiteouts:
            try:
                os.link(SHARED_WHITEOUT, name, src_dir_fd=self.fd, dst_dir_fd=dirfd, follow_symlinks=False)
                return
            except OSError as e:
                if e.errno != errno.EMLINK:
                    log.warning("whiteouts are no longer shared: %s", os.strerror(e.errno or errno.EIO))
                    self.share_whiteouts = False
        os.rename(SHARED_WHITEOUT, name, src_dir_fd=self.fd, dst_dir_fd=dirfd)
        self.shared_whiteout = False
