"""Directory merging as the kernel lists it: the union of names, each once.

An open directory handle holds a snapshot of the merged index taken at
opendir, so a listing resumed at any offset stays consistent.
"""

from __future__ import annotations

import errno
import itertools

import pyfuse3

from ovlfuse.namei import Entry


class DirHandles:
    """fh -> snapshot of (name, entry) pairs."""

    def __init__(self) -> None:
        self._handles: dict[int, list[tuple[bytes, Entry]]] = {}
        self._next = itertools.count(1)

    def open(self, directory: Entry, parent: Entry, index: dict[bytes, Entry]) -> int:
        fh = next(self._next)
        self._handles[fh] = [(b".", directory), (b"..", parent), *index.items()]
        return fh

    def entries(self, fh: int, start: int) -> list[tuple[bytes, Entry]]:
        """Entries from offset ``start``; the offset of entry i is i + 1."""
        try:
            return self._handles[fh][start:]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
