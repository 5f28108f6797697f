"""Tar streams read strictly: one header at a time, extended headers bounded, every name checked.

An archive is hostile input.  Python's ``tarfile`` reads a PAX or GNU
long-name header whole into memory whatever size it claims, and accepts
names that climb out of the tree; this reader parses each 512-byte block
with ``tarfile.TarInfo.frombuf`` (ustar, GNU and base-256 numbers, the
checksum), and handles the extended headers itself: at most
``MAX_EXTENDED`` bytes each, as Go's ``archive/tar`` (Docker's, podman's)
allows.  Names are normalised to relative byte paths; an absolute path, a
``..`` component, a NUL byte or an over-long name is refused with the
entry's name.  Content is streamed in chunks, never held whole.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ovlfuse.errors import OvlError

BLOCK = 512
MAX_EXTENDED = 1 << 20  # bytes of one PAX or GNU long-name header (Go's archive/tar limit)
MAX_PATH = 4095  # PATH_MAX less the terminating NUL
NAME_MAX = 255
CHUNK = 1 << 20

REG, LNK, SYM, CHR, BLK, DIR, FIFO = "file", "hardlink", "symlink", "char", "block", "dir", "fifo"
_TYPES = {tarfile.REGTYPE: REG, tarfile.AREGTYPE: REG, tarfile.CONTTYPE: REG, tarfile.LNKTYPE: LNK,
          tarfile.SYMTYPE: SYM, tarfile.CHRTYPE: CHR, tarfile.BLKTYPE: BLK, tarfile.DIRTYPE: DIR,
          tarfile.FIFOTYPE: FIFO}
_NAMES = {b"S": "GNU sparse file", b"V": "GNU volume header", b"M": "GNU multi-volume continuation",
          b"N": "GNU old long name", b"D": "GNU dump directory"}


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class ArchiveError(OvlError):
    """The archive is malformed or hostile; nothing of it may be kept."""


@dataclass
class Member:
    """One entry of a tar stream, its name already checked and normalised."""

    path: bytes  # relative, b"" for the root, no "." or ".." components, no trailing "/"
    kind: str  # REG, LNK, SYM, CHR, BLK, DIR, FIFO
    mode: int  # permission bits with setuid, setgid and sticky
    uid: int
    gid: int
    size: int  # bytes of content (0 for all but regular files)
    mtime_ns: int
    atime_ns: int | None = None
    linkname: bytes = b""  # symlink target as stored; hard link target normalised like path
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def shown(self) -> str:
        """The name for messages."""
        return "/" + self.path.decode("utf-8", "backslashreplace")


def check_path(raw: bytes, what: str = "entry") -> bytes:
    """A member name as a relative path inside the tree, or ArchiveError.

    ``./a//b/`` becomes ``a/b``; ``/a``, ``a/../b``, a NUL byte, a component
    over 255 bytes or a path over 4095 bytes are refused: tools that make
    layers (Docker, podman, umoci) never write them, and each one is a way
    out of the tree being built.
    """
    shown = raw.decode("utf-8", "backslashreplace")
    if b"\0" in raw:
        raise ArchiveError(f"{what} {shown!r} has a NUL byte in its name")
    if raw.startswith(b"/"):
        raise ArchiveError(f"{what} {shown!r} has an absolute path; a layer holds only relative paths")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ArchiveError(f"{what} {shown!r} has a '..' component, which could climb out of the layer")
    if any(len(p) > NAME_MAX for p in parts):
        raise ArchiveError(f"{what} {shown[:80]!r}... has a name component over {NAME_MAX} bytes")
    path = b"/".join(parts)
    if len(path) > MAX_PATH:
        raise ArchiveError(f"{what} {shown[:80]!r}... has a path over {MAX_PATH} bytes")
    return path


def _pax_records(data: bytes, shown: str) -> dict[bytes, bytes]:
    """``LEN KEY=VALUE\\n`` records; a malformed one is an error, as in Go's reader."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the data with NULs
            break
        space = data.find(b" ", pos)
        length = data[pos:space]
        if space < 0 or not length.isdigit() or int(length) < len(length) + 3:
            raise ArchiveError(f"malformed PAX header before {shown}")
        end = pos + int(length)
        record = data[space + 1:end]
        if end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError(f"malformed PAX header before {shown}")
        key, _, value = record[:-1].partition(b"=")
        out[key] = value
        pos = end
    return out


def _int(value: bytes, key: str, shown: str) -> int:
    if not value.isdigit():
        raise ArchiveError(f"PAX {key}={value[:40]!r} of {shown} is not a number")
    return int(value)


def _time_ns(value: bytes, key: str, shown: str) -> int:
    text = value.decode("ascii", "replace")
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ArchiveError(f"PAX {key}={text[:40]!r} of {shown} is not a time")
    return sign * (int(whole) * 1_000_000_000 + int((frac + "000000000")[:9]))


class TarReader:
    """Iterate a tar stream's members; read each one's content with ``chunks()`` before the next."""

    def __init__(self, stream: Readable, what: str) -> None:
        self.stream = stream
        self.what = what  # "layer sha256:ab12..." for messages
        self._left = 0  # content bytes of the current member not yet read
        self._pad = 0
        self.ended = False

    def _read_exact(self, n: int, during: str) -> bytes:
        parts, got = [], 0
        while got < n:
            piece = self.stream.read(n - got)
            if not piece:
                raise ArchiveError(f"{self.what} ends in the middle of {during}: the archive is truncated")
            parts.append(piece)
            got += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _skip(self, n: int, during: str) -> None:
        skip = getattr(self.stream, "skip", None)
        if skip is not None:  # a window into a file: seek, do not read
            if not skip(n):
                raise ArchiveError(f"{self.what} ends in the middle of {during}: the archive is truncated")
            return
        while n:
            step = min(n, CHUNK)
            self._read_exact(step, during)
            n -= step

    def chunks(self) -> Iterator[bytes]:
        """The current member's content, in pieces of at most 1 MiB."""
        while self._left:
            step = min(self._left, CHUNK)
            piece = self.stream.read(step)
            if not piece:
                raise ArchiveError(f"{self.what} ends in the middle of a file: the archive is truncated")
            self._left -= len(piece)
            yield piece

    def _extended(self, info: tarfile.TarInfo, shown: str) -> bytes:
        if info.size > MAX_EXTENDED:
            raise ArchiveError(f"{self.what}: an extended header of {info.size} bytes before {shown} "
                               f"(more than {MAX_EXTENDED}); refusing a hostile archive")
        data = self._read_exact(info.size, "an extended header")
        self._skip(-info.size % BLOCK, "an extended header")
        return data

    def __iter__(self) -> Iterator[Member]:
        global_pax: dict[bytes, bytes] = {}
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        count = 0
        while True:
            if self._left or self._pad:
                self._skip(self._left + self._pad, "a file")
                self._left = self._pad = 0
            block = self.stream.read(BLOCK)
            if 0 < len(block) < BLOCK:
                block += self._read_exact(BLOCK - len(block), "a header")
            if not block or block == bytes(BLOCK):
                if pax or long_name is not None or long_link is not None:
                    raise ArchiveError(f"{self.what} ends after an extended header with no entry")
                self.ended = True
                return
            where = f"entry {count + 1}"
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise ArchiveError(f"{self.what}: bad tar header at {where} ({e}); the archive is corrupt") from None
            if info.size < 0:
                raise ArchiveError(f"{self.what}: negative size at {where}")
            typ = info.type
            if typ in (tarfile.XHDTYPE, tarfile.XGLTYPE, b"X"):
                records = _pax_records(self._extended(info, where), where)
                (global_pax if typ == tarfile.XGLTYPE else pax).update(records)
                continue
            if typ in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                value = self._extended(info, where).split(b"\0", 1)[0]
                if typ == tarfile.GNUTYPE_LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            count += 1
            records = {**global_pax, **pax}
            raw_name = records.get(b"path", long_name if long_name is not None else
                                   info.name.encode("utf-8", "surrogateescape"))
            raw_link = records.get(b"linkpath", long_link if long_link is not None else
                                   info.linkname.encode("utf-8", "surrogateescape"))
            pax, long_name, long_link = {}, None, None
            shown = raw_name.decode("utf-8", "backslashreplace")
            kind = _TYPES.get(typ)
            if kind is None or any(k.startswith(b"GNU.sparse.") for k in records):
                what = _NAMES.get(typ, "GNU sparse file" if kind else f"entry type {typ!r}")
                raise ArchiveError(f"{self.what}: {shown!r} is a {what}, which a layer never holds")
            member = self._member(info, kind, records, raw_name, raw_link, shown)
            if kind == REG:
                self._left, self._pad = member.size, -member.size % BLOCK
            else:
                member.size = 0  # header-only types carry no content whatever their size field says, as in Go
            yield member

    def _member(self, info: tarfile.TarInfo, kind: str, records: dict[bytes, bytes], raw_name: bytes,
                raw_link: bytes, shown: str) -> Member:
        size, uid, gid = info.size, info.uid, info.gid
        mtime_ns, atime_ns = int(info.mtime) * 1_000_000_000, None
        xattrs: dict[str, bytes] = {}
        for key, value in records.items():
            if key == b"size":
                size = _int(value, "size", shown)
            elif key == b"uid":
                uid = _int(value, "uid", shown)
            elif key == b"gid":
                gid = _int(value, "gid", shown)
            elif key == b"mtime":
                mtime_ns = _time_ns(value, "mtime", shown)
            elif key == b"atime":
                atime_ns = _time_ns(value, "atime", shown)
            elif key.startswith(b"SCHILY.xattr."):
                name = key[len(b"SCHILY.xattr."):].decode("utf-8", "surrogateescape")
                if not name or "\0" in name:
                    raise ArchiveError(f"{self.what}: {shown!r} has an xattr with a bad name")
                xattrs[name] = value
        if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
            raise ArchiveError(f"{self.what}: {shown!r} has owner {uid}:{gid}, beyond the 32-bit ids Linux has")
        path = check_path(raw_name)
        link = b""
        if kind == LNK:
            link = check_path(raw_link, "hard link target")
            if not link:
                raise ArchiveError(f"{self.what}: hard link {shown!r} points at the layer's root")
        elif kind == SYM:
            if not raw_link or b"\0" in raw_link:
                raise ArchiveError(f"{self.what}: symlink {shown!r} has an empty or NUL-bearing target")
            link = raw_link
        if not path and kind != DIR:
            raise ArchiveError(f"{self.what}: the layer's root {shown!r} is not a directory")
        return Member(path, kind, info.mode & 0o7777, uid, gid, size, mtime_ns, atime_ns, link,
                      info.devmajor, info.devminor, xattrs)

    def drain(self) -> None:
        """Read the rest of the stream (after the end blocks), so digests cover every byte."""
        while self.stream.read(CHUNK):
            pass
