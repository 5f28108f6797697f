"""Apply one layer tarball to a new, empty ``diff`` directory, as Docker's overlay2 ``ApplyDiff`` does.

Everything is created relative to directory descriptors: each parent is
opened with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` from the
layer's root, and each name is made with an ``*at`` call that never
follows its last component.  A symlink the archive planted earlier can
therefore never lead a later entry (or a hard link's target) out of the
layer, and nothing outside it is ever written.

What the archive says and what is written:

- ``.wh.NAME`` hides NAME of the layers below: a whiteout in the forms of
  ``marks``; ``.wh..wh..opq`` makes its directory opaque; other
  ``.wh..wh.*`` names (AUFS bookkeeping) are skipped, as Docker skips them.
- A whiteout for a name the same layer also holds hides only the layers
  below: a directory of that name becomes opaque, a file stays.
- A name given twice is refused (the OCI layer format forbids it), except a
  directory given again, whose metadata the later entry sets.
- Missing parent directories are made (0755, root's), as Docker makes them;
  the layer's root keeps the store's own metadata (Docker skips ``./``).
- Owners, modes and xattrs are set as the archive says where the user may
  set them.  Where not, ``marks`` keeps them in stat override records:
  device nodes become empty files whose record names the device, and xattrs
  the user may not set are counted and left out.  The overlay's own markers
  and stat records are never taken from an archive.
- Directory modes and times are set last, deepest first, so creating their
  children neither fails nor changes them.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

from ovlfuse.errors import OvlError
from ovlfuse.image import marks
from ovlfuse.image.tarstream import (BLK, CHR, CHUNK, DIR, FIFO, LNK, REG, SYM, ArchiveError, Member,
                                     TarReader)
from ovlfuse.sys.safeio import fd_path, open_beneath

_ZERO = bytes(CHUNK)
_KIND_BITS = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYM: stat.S_IFLNK, CHR: stat.S_IFCHR,
              BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_PARENTS_CACHED = 64
_NOT_SETTABLE = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL)


@dataclass
class Stats:
    entries: int = 0
    size: int = 0  # bytes of regular files, each inode once (Docker's layer size)
    whiteouts: int = 0
    opaque: int = 0
    records: int = 0
    skipped_xattrs: Counter = field(default_factory=Counter)


@dataclass
class _Dir:
    path: bytes
    mode: int
    uid: int
    gid: int
    atime_ns: int | None
    mtime_ns: int


class Unpacker:
    """Builds one layer's ``diff`` directory (open as ``diff_fd``) from a tar stream."""

    def __init__(self, diff_fd: int, writer: marks.Writer, what: str) -> None:
        self.root = diff_fd
        self.writer = writer
        self.what = what
        self.privileged = writer.privileged
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.stats = Stats()
        self._parents: dict[bytes, int] = {}
        self._dirs: list[_Dir] = []

    # --- parents -------------------------------------------------------------

    def close(self) -> None:
        for fd in self._parents.values():
            os.close(fd)
        self._parents.clear()

    def _parent(self, path: bytes, member: Member, create: bool = True) -> int:
        """An O_PATH descriptor of directory ``path`` inside the layer (made, with its parents, if missing)."""
        fd = self._parents.get(path)
        if fd is not None:
            return fd
        if path:
            try:
                fd = open_beneath(self.root, path, os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                if e.errno != errno.ENOENT or not create:
                    raise self._path_error(e, path, member) from None
                fd = self._make_parents(path, member)
        else:
            fd = os.dup(self.root)
        if len(self._parents) >= _PARENTS_CACHED:
            os.close(self._parents.pop(next(iter(self._parents))))
        self._parents[path] = fd
        return fd

    def _make_parents(self, path: bytes, member: Member) -> int:
        fd = os.dup(self.root)
        done = b""
        try:
            for part in path.split(b"/"):
                done = done + b"/" + part if done else part
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._implicit_dir(fd, part, done)
                except FileExistsError:
                    pass
                nxt = open_beneath(fd, part, os.O_PATH | os.O_DIRECTORY)
                os.close(fd)
                fd = nxt
        except OSError as e:
            os.close(fd)
            raise self._path_error(e, done, member) from None
        return fd

    def _implicit_dir(self, fd: int, name: bytes, path: bytes) -> None:
        """A parent the archive does not list: 0755 and root's, as Docker makes it."""
        if self.privileged:
            os.chown(name, 0, 0, dir_fd=fd, follow_symlinks=False)
            os.chmod(name, 0o755, dir_fd=fd, follow_symlinks=False)
        else:
            self._record(fd, name, 0, 0, stat.S_IFDIR | 0o755)

    def _path_error(self, e: OSError, path: bytes, member: Member) -> OvlError:
        shown = "/" + path.decode("utf-8", "backslashreplace")
        if e.errno in (errno.ELOOP, errno.EXDEV):
            return ArchiveError(f"{self.what}: {member.shown} goes through {shown}, a symlink; "
                                "refusing to follow it out of the layer")
        if e.errno == errno.ENOTDIR:
            return ArchiveError(f"{self.what}: {member.shown} goes through {shown}, which is not a directory")
        if e.errno == errno.ENOENT:
            return ArchiveError(f"{self.what}: {member.shown} needs {shown}, which the layer does not hold")
        return OvlError(f"{self.what}: cannot write {shown}: {e.strerror}")

    # --- entries -------------------------------------------------------------

    def apply(self, reader: TarReader) -> Stats:
        for member in reader:
            self.stats.entries += 1
            try:
                self._entry(member, reader)
            except OSError as e:
                raise OvlError(f"{self.what}: cannot write {member.shown}: {e.strerror}") from None
        self._finish_dirs()
        return self.stats

    def _entry(self, member: Member, reader: TarReader) -> None:
        if not member.path:
            return  # the layer's root keeps the driver's own metadata: Docker skips "./" too

        head, _, leaf = member.path.rpartition(b"/")
        if leaf.startswith(marks.WH_PREFIX):
            self._marker(head, leaf, member)
            return
        parent = self._parent(head, member)
        if member.kind == CHR and member.devmajor == 0 and member.devminor == 0:
            self._hide(parent, leaf)  # the kernel's own whiteout form, as an upper dir's tar holds it
            return
        self._replace_whiteout(parent, leaf, member)
        if member.kind == DIR:
            self._directory(parent, leaf, member)
        elif member.kind == REG:
            self._regular(parent, leaf, member, reader)
        elif member.kind == LNK:
            self._hardlink(parent, leaf, member)
        else:
            self._create_special(parent, leaf, member)

    def _marker(self, head: bytes, leaf: bytes, member: Member) -> None:
        if leaf == marks.OPAQUE_FILE:
            if head:  # the root of a mount is never opaque, on the kernel either
                grand, _, name = head.rpartition(b"/")
                self.writer.opaque(self._parent(grand, member), name)
                self.stats.opaque += 1
            else:
                self._parent(head, member)
            return
        if leaf.startswith(marks.AUFS_META_PREFIX):
            return  # AUFS bookkeeping (.wh..wh.plnk, ...): never content, Docker skips it too
        name = leaf[len(marks.WH_PREFIX):]
        if name in (b".", b".."):
            raise ArchiveError(f"{self.what}: whiteout {member.shown} names {name.decode()!r}")
        self._hide(self._parent(head, member), name)

    def _hide(self, parent: int, name: bytes) -> None:
        """A whiteout of ``name``; if this layer holds ``name`` too, it hides only what is below."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            self.writer.whiteout(parent, name)
            self.stats.whiteouts += 1
            return
        if stat.S_ISDIR(st.st_mode):
            self.writer.opaque(parent, name)
            self.stats.opaque += 1

    def _replace_whiteout(self, parent: int, leaf: bytes, member: Member) -> None:
        """An entry after its own whiteout: the entry shows, and a directory hides what is below it."""
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if marks.is_whiteout_device(st):
            os.unlink(leaf, dir_fd=parent)
            if member.kind == DIR:
                os.mkdir(leaf, 0o700, dir_fd=parent)
                self.writer.opaque(parent, leaf)
                self.stats.opaque += 1
        elif not (stat.S_ISDIR(st.st_mode) and member.kind == DIR):
            raise ArchiveError(f"{self.what}: {member.shown} appears twice in the layer; an OCI layer holds "
                               "each name once, so the archive is ambiguous")

    def _directory(self, parent: int, leaf: bytes, member: Member) -> None:
        try:
            os.mkdir(leaf, 0o700, dir_fd=parent)
        except FileExistsError:
            pass  # made as a parent, or listed again: the entry's metadata wins
        self._owner(parent, leaf, member, stat.S_IFDIR)
        self._xattrs(parent, leaf, member)
        self._dirs.append(_Dir(member.path, member.mode, member.uid, member.gid, member.atime_ns, member.mtime_ns))

    def _regular(self, parent: int, leaf: bytes, member: Member, reader: TarReader) -> None:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            holes = False
            for piece in reader.chunks():
                if piece == (_ZERO if len(piece) == CHUNK else bytes(len(piece))):
                    os.lseek(fd, len(piece), os.SEEK_CUR)  # keep holes holes
                    holes = True
                    continue
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            if holes:
                os.ftruncate(fd, member.size)
            self.stats.size += member.size
            self._owner(fd, None, member, stat.S_IFREG)  # chown clears set-id bits and capabilities:
            self._xattrs(fd, None, member)  # xattrs come after it
            os.utime(fd, ns=self._times(member))
        finally:
            os.close(fd)

    def _hardlink(self, parent: int, leaf: bytes, member: Member) -> None:
        head, _, name = member.linkname.rpartition(b"/")
        target_parent = self._parent(head, member, create=False)
        try:
            os.link(name, leaf, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise ArchiveError(f"{self.what}: hard link {member.shown} points to /{member.linkname.decode(errors='replace')}, "
                               "which the layer does not hold (before it); a link may not leave its layer") from None
        except PermissionError:
            raise ArchiveError(f"{self.what}: hard link {member.shown} points to a directory") from None
        st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
            return
        if self.privileged:  # a record already on the target (a device's type among it) stays as it is
            self._owner(parent, leaf, member, stat.S_IFMT(st.st_mode), st.st_rdev)
        self._xattrs(parent, leaf, member)
        os.utime(leaf, ns=self._times(member), dir_fd=parent, follow_symlinks=False)

    def _create_special(self, parent: int, leaf: bytes, member: Member) -> None:
        kind = _KIND_BITS[member.kind]
        rdev = os.makedev(member.devmajor, member.devminor) if member.kind in (CHR, BLK) else 0
        if member.kind == SYM:
            os.symlink(member.linkname, leaf, dir_fd=parent)
        elif member.kind == FIFO:
            os.mkfifo(leaf, 0o600, dir_fd=parent)
        else:
            made = False
            if self.privileged:
                try:
                    os.mknod(leaf, kind | 0o600, rdev, dir_fd=parent)
                    made = True
                except PermissionError:
                    pass  # root of a user namespace: a record, as for an ordinary user
            if not made:
                os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=parent))
                self._record(parent, leaf, member.uid, member.gid, kind | member.mode, rdev)
                os.chmod(leaf, (member.mode & 0o777) | 0o600, dir_fd=parent, follow_symlinks=False)
                self._xattrs(parent, leaf, member)
                os.utime(leaf, ns=self._times(member), dir_fd=parent, follow_symlinks=False)
                return
        self._owner(parent, leaf, member, kind, rdev)
        self._xattrs(parent, leaf, member)
        os.utime(leaf, ns=self._times(member), dir_fd=parent, follow_symlinks=False)

    # --- metadata ------------------------------------------------------------

    @staticmethod
    def _times(member: Member) -> tuple[int, int]:
        atime = member.atime_ns if member.atime_ns is not None and member.atime_ns > member.mtime_ns \
            else member.mtime_ns
        return atime, member.mtime_ns

    def _record(self, dirfd: int, name: bytes | None, uid: int, gid: int, mode: int, rdev: int = 0) -> None:
        self.writer.record(dirfd, name, uid, gid, mode, rdev)
        self.stats.records += 1

    def _owner(self, dirfd: int, name: bytes | None, member: Member, kind: int, rdev: int = 0) -> None:
        """Owner and mode as the archive says (directories' modes are set last), else a record."""
        symlink = kind == stat.S_IFLNK
        directory = kind == stat.S_IFDIR
        if self.privileged:
            try:
                if (member.uid, member.gid) != (self.uid, self.gid):
                    os.chown(name if name is not None else dirfd, member.uid, member.gid,
                             **({"dir_fd": dirfd, "follow_symlinks": False} if name is not None else {}))
                if not symlink and not directory:
                    self._chmod(dirfd, name, member.mode)
                return
            except OSError as e:
                if e.errno not in _NOT_SETTABLE:
                    raise
        if symlink:
            return  # no user xattrs on symlinks: shown as the user's, as in rootless podman's stores
        kept = (member.mode & 0o777) | (0o700 if directory else 0o600)  # what the disk gets: the user's own rw(x)
        if (member.uid, member.gid) != (self.uid, self.gid) or kept != member.mode:
            self._record(dirfd, name, member.uid, member.gid, kind | member.mode, rdev)
        if not directory:
            self._chmod(dirfd, name, (member.mode & 0o777) | 0o600)

    @staticmethod
    def _chmod(dirfd: int, name: bytes | None, mode: int) -> None:
        if name is None:
            os.chmod(dirfd, mode)
        else:
            os.chmod(name, mode, dir_fd=dirfd, follow_symlinks=False)

    def _xattrs(self, dirfd: int, name: bytes | None, member: Member) -> None:
        for key, value in member.xattrs.items():
            if marks.is_bookkeeping_xattr(key):
                self.stats.skipped_xattrs[key] += 1
                continue
            try:
                os.setxattr(fd_path(dirfd, name) if name is not None else dirfd, key, value,
                            follow_symlinks=name is None)
            except OSError as e:
                if e.errno not in _NOT_SETTABLE:
                    raise
                self.stats.skipped_xattrs[key] += 1

    def _finish_dirs(self) -> None:
        """Directory modes and times, deepest first."""
        self.close()
        for d in sorted(self._dirs, key=lambda d: d.path.count(b"/"), reverse=True):
            head, _, leaf = d.path.rpartition(b"/")
            parent = open_beneath(self.root, head, os.O_PATH | os.O_DIRECTORY) if head else os.dup(self.root)
            try:
                self._dir_mode(parent, leaf, d)
            finally:
                os.close(parent)
        if not self.privileged or self.stats.records:
            # a layer keeps records only if its root has one (ovlfuse and fuse-overlayfs decide so)
            self._record(self.root, None, 0, 0, stat.S_IFDIR | 0o755)

    def _dir_mode(self, parent: int, leaf: bytes, d: _Dir) -> None:
        mode = d.mode if self.privileged else (d.mode & 0o777) | 0o700
        atime = d.atime_ns if d.atime_ns is not None and d.atime_ns > d.mtime_ns else d.mtime_ns
        os.chmod(leaf, mode, dir_fd=parent, follow_symlinks=False)
        os.utime(leaf, ns=(atime, d.mtime_ns), dir_fd=parent, follow_symlinks=False)
