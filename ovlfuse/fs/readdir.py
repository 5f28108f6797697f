"""Directory merging as the kernel lists it: the union of names, each once.

An open directory handle holds a snapshot of the merged index, taken when
the listing starts (at offset 0: the first read, or again after rewinddir),
so a listing resumed at any offset stays consistent and a rewound one sees
the directory as it is now.
"""

from __future__ import annotations

import errno
import itertools

import pyfuse3

from ovlfuse.fs.namei import Entry


class DirHandles:
    """fh -> the directory and the snapshot of its (name, entry) pairs being listed."""

    def __init__(self) -> None:
        self._handles: dict[int, tuple[Entry, list[tuple[bytes, Entry]] | None]] = {}
        self._next = itertools.count(1)

    def open(self, directory: Entry) -> int:
        fh = next(self._next)
        self._handles[fh] = (directory, None)
        return fh

    def _get(self, fh: int) -> tuple[Entry, list[tuple[bytes, Entry]] | None]:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def directory(self, fh: int) -> Entry:
        return self._get(fh)[0]

    def has_snapshot(self, fh: int) -> bool:
        return self._get(fh)[1] is not None

    def snapshot(self, fh: int, listing: list[tuple[bytes, Entry]]) -> None:
        self._handles[fh] = (self.directory(fh), listing)

    def entries(self, fh: int, start: int) -> list[tuple[bytes, Entry]]:
        """Entries from offset ``start``; the offset of entry i is i + 1."""
        return (self._get(fh)[1] or [])[start:]

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
