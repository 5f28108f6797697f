"""A tar writer whose bytes depend on its input alone.

USTAR headers, with a PAX extended header only where USTAR cannot say it
(a long or non-ASCII name or link, an id or size out of range, xattrs as
``SCHILY.xattr.NAME``, as Go's ``archive/tar`` writes them for Docker);
no user or group names (they would come from this machine's passwd),
modification times to the nanosecond (as Docker's layer tars keep them), no
atime or ctime.  The end is two zero blocks, without padding to a 10 KiB record
(Go's writer pads none either).
"""

from __future__ import annotations

from typing import BinaryIO

BLOCK = 512
TYPES = {"file": b"0", "hardlink": b"1", "symlink": b"2", "char": b"3", "block": b"4", "dir": b"5", "fifo": b"6"}
_OCTAL_MAX = {8: 0o7777777, 12: 0o77777777777}


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _fits(value: int, width: int) -> bool:
    return 0 <= value <= _OCTAL_MAX[width]


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d" % length + body


class TarWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def _header(self, name: bytes, kind: str, mode: int, uid: int, gid: int, size: int, mtime: int,
                link: bytes = b"", devmajor: int = 0, devminor: int = 0) -> bytes:
        block = bytearray(BLOCK)
        block[0:len(name)] = name
        block[100:108] = _octal(mode, 8)
        block[108:116] = _octal(uid, 8)
        block[116:124] = _octal(gid, 8)
        block[124:136] = _octal(size, 12)
        block[136:148] = _octal(mtime, 12)
        block[148:156] = b" " * 8
        block[156:157] = TYPES[kind] if kind in TYPES else kind.encode()
        block[157:157 + len(link)] = link
        block[257:265] = b"ustar\x0000"
        block[329:337] = _octal(devmajor, 8)
        block[337:345] = _octal(devminor, 8)
        block[148:156] = b"%06o\0 " % sum(block)
        return bytes(block)

    def add(self, name: bytes, kind: str, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0,
            link: bytes = b"", devmajor: int = 0, devminor: int = 0,
            xattrs: dict[str, bytes] | None = None) -> None:
        """Write one header (and a PAX header before it if needed); content follows with ``data``/``pad``."""
        pax: list[bytes] = []
        short_name, short_link = name, link
        if len(name) > 100 or not name.isascii():
            pax.append(_pax_record(b"path", name))
            short_name = name[:100].decode("ascii", "replace").encode("ascii", "replace")[:100]
        if len(link) > 100 or not link.isascii():
            pax.append(_pax_record(b"linkpath", link))
            short_link = b""
        values = {"uid": uid, "gid": gid}
        for key, value in values.items():
            if not _fits(value, 8):
                pax.append(_pax_record(key.encode(), b"%d" % value))
        if not _fits(size, 12):
            pax.append(_pax_record(b"size", b"%d" % size))
        seconds, fraction = divmod(mtime_ns, 1_000_000_000)
        if fraction or not _fits(seconds, 12):  # Docker's layer tars keep nanoseconds too
            pax.append(_pax_record(b"mtime", (b"%d.%09d" % (seconds, fraction)).rstrip(b"0").rstrip(b".")))
        mtime = seconds if _fits(seconds, 12) else 0
        for key in sorted(xattrs or {}):
            pax.append(_pax_record(b"SCHILY.xattr." + key.encode("utf-8", "surrogateescape"), xattrs[key]))
        if pax:
            data = b"".join(sorted(pax, key=lambda r: r.split(b" ", 1)[1]))
            pax_name = b"PaxHeaders/" + short_name.rpartition(b"/")[2][:80]
            self.out.write(self._header(pax_name, "x", 0o644, 0, 0, len(data), 0))
            self.out.write(data + bytes(-len(data) % BLOCK))
        self.out.write(self._header(short_name, kind, mode, min(uid, 0o7777777), min(gid, 0o7777777),
                                    size if _fits(size, 12) else 0, mtime, short_link, devmajor, devminor))

    def data(self, piece: bytes) -> None:
        self.out.write(piece)

    def pad(self, size: int) -> None:
        self.out.write(bytes(-size % BLOCK))

    def close(self) -> None:
        self.out.write(bytes(2 * BLOCK))
