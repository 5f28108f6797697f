"""Byte streams of an import: windows into an archive, digests taken while reading, decompression.

A layer blob is read once, front to back: its raw bytes through a
``Digesting`` reader (the blob digest a manifest names), then through the
decompressor its first bytes call for, then through another ``Digesting``
reader (the diff id a config names).  Compression is told from magic
numbers, as Docker does, not from media types or file names.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
from collections.abc import Callable
from typing import BinaryIO

from ovlfuse.errors import OvlError
from ovlfuse.image.tarstream import ArchiveError, Readable

try:  # the standard library's from Python 3.14 on
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
ALGORITHMS = ("sha256", "sha384", "sha512")


class Window:
    """``size`` bytes of a file from ``offset``: a blob inside an uncompressed archive."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.pos, self.end = fd, offset, offset + size

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Move ``n`` bytes on without reading them; False if the window ends first."""
        if self.pos + n > self.end:
            self.pos = self.end
            return False
        self.pos += n
        return True

    def readable(self) -> bool:
        return True


class Digesting:
    """Passes reads through, hashing them and counting bytes (and reporting them to ``progress``)."""

    def __init__(self, stream: Readable, algorithm: str = "sha256",
                 progress: Callable[[int], None] | None = None) -> None:
        self.stream = stream
        self.algorithm = algorithm
        self.hash = hashlib.new(algorithm)
        self.count = 0
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            self.hash.update(data)
            self.count += len(data)
            if self.progress is not None:
                self.progress(len(data))
        return data

    def readable(self) -> bool:
        return True

    def digest(self) -> str:
        return f"{self.algorithm}:{self.hash.hexdigest()}"


def split_digest(digest: str, what: str) -> tuple[str, str]:
    """``sha256:HEX`` as (algorithm, hex), checked."""
    algorithm, _, hexpart = digest.partition(":")
    size = {"sha256": 64, "sha384": 96, "sha512": 128}.get(algorithm)
    if size is None or len(hexpart) != size or any(c not in "0123456789abcdef" for c in hexpart):
        raise OvlError(f"{what} names digest {digest[:80]!r}, which is not sha256/sha384/sha512 in lower-case hex")
    return algorithm, hexpart


def sniff(head: bytes) -> str | None:
    """The compression a blob's first bytes show (None: plain)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


class _Peeked:
    """A stream whose first bytes were read to sniff its compression."""

    def __init__(self, head: bytes, stream: Readable) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head, b""
            return out + self.stream.read()
        out, self.head = self.head[:n], self.head[n:]
        return out

    def readable(self) -> bool:
        return True


class _Checked:
    """Turns a decompressor's errors into a clear message about the blob."""

    def __init__(self, stream: BinaryIO, what: str, kind: str) -> None:
        self.stream, self.what, self.kind = stream, what, kind

    def read(self, n: int = -1) -> bytes:
        try:
            return self.stream.read(n)
        except EOFError:
            raise ArchiveError(f"{self.what}: the {self.kind} stream ends early; the archive is truncated") from None
        except (OSError, lzma.LZMAError, zstd.ZstdError, ValueError) as e:
            raise ArchiveError(f"{self.what}: corrupt {self.kind} data ({e})") from None


def decompressed(stream: Readable, what: str) -> tuple[Readable, str | None]:
    """The plain bytes of ``stream`` and the compression found (gzip, zstd, bzip2, xz or None)."""
    head = b""
    while len(head) < 6:
        piece = stream.read(6 - len(head))
        if not piece:
            break
        head += piece
    kind = sniff(head)
    raw = _Peeked(head, stream)
    if kind is None:
        return raw, None
    opener = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
              "zstd": lambda f: zstd.ZstdFile(f, "rb"),
              "bzip2": lambda f: bz2.BZ2File(f, "rb"),
              "xz": lambda f: lzma.LZMAFile(f, "rb")}[kind]
    return _Checked(opener(raw), what, kind), kind


def compressor(kind: str | None, out: BinaryIO) -> BinaryIO:
    """A writer compressing into ``out``, byte-stable for the same input (gzip without name or time)."""
    if kind is None:
        return out
    if kind == "gzip":
        return gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6)
    if kind == "zstd":
        return zstd.ZstdFile(out, "wb", level=3)
    raise OvlError(f"unknown compression {kind!r}: give gzip, zstd or none")
