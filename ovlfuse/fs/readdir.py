"""Directory merging as the kernel lists it: the union of names, each once.

An open directory handle holds a snapshot of the merged index, taken when
the listing starts (at offset 0: the first read, or again after rewinddir),
so a listing resumed at any offset stays consistent and a rewound one sees
the directory as it is now.  Each name is checked against the index again as
it is sent: readdirplus puts every entry it sends into the kernel's dentry
cache, so a name removed or replaced since the snapshot must not go out as
it was.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator

from ovlfuse.fs.inode import Inode, fail
from ovlfuse.fs.namei import Entry, Namei


class DirHandles:
    """fh -> the directory and the snapshot of its (name, entry) pairs being listed."""

    def __len__(self) -> int:
        return len(self._handles)

    def __init__(self) -> None:
        self._handles: dict[int, tuple[Inode, list[tuple[bytes, Entry]] | None]] = {}
        self._next = itertools.count(1)

    def open(self, directory: Inode) -> int:
        fh = next(self._next)
        self._handles[fh] = (directory, None)
        return fh

    def _get(self, fh: int) -> tuple[Inode, list[tuple[bytes, Entry]] | None]:
        try:
            return self._handles[fh]
        except KeyError:
            raise fail(errno.EBADF) from None

    def directory(self, fh: int) -> Inode:
        return self._get(fh)[0]

    def listing(self, fh: int, start: int, namei: Namei) -> Iterator[tuple[bytes, Entry, int, bool]]:
        """(name, entry, next offset, counts) from offset ``start``; the offset of entry i is i + 1.

        ``counts``: the kernel takes a reference to the entry when it is sent
        (readdirplus); "." and ".." are not counted.
        """
        directory, snapshot = self._get(fh)
        if start == 0 or snapshot is None:  # a first read, or after rewinddir()
            this = directory.aliases[0] if directory.aliases else None
            parent = this.parent if this is not None and this.parent is not None else this
            snapshot = [(b".", this), (b"..", parent)] if this is not None else []
            snapshot += list(namei.children(directory).items())
            self._handles[fh] = (directory, snapshot)
        current = namei.children(directory)
        for offset, (name, entry) in enumerate(snapshot[start:], start + 1):
            counts = name not in (b".", b"..")
            if counts:
                now = current.get(name)
                if now is None:
                    continue
                entry = now
            yield name, entry, offset, counts

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
