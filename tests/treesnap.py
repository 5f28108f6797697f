"""Snapshots of a directory tree, path by path, for comparing two merged views."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ovlfuse.tools.diff import content_hash, file_type


@dataclass(frozen=True)
class Record:
    kind: str
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    digest: str | None
    target: bytes | None
    rdev: int
    xattrs: tuple[tuple[str, bytes], ...]
    mtime_ns: int | None


def _xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


@dataclass
class Snapshot:
    records: dict[bytes, Record]
    inos: dict[bytes, int]
    dino_mismatch: list[bytes]  # entries whose readdir d_ino differs from st_ino

    def ino_groups(self) -> set[frozenset[bytes]]:
        by_ino: dict[int, set[bytes]] = {}
        for path, ino in self.inos.items():
            by_ino.setdefault(ino, set()).add(path)
        return {frozenset(paths) for paths in by_ino.values()}


def snapshot(root: str, with_times: bool = True) -> Snapshot:
    """Walk ``root`` (not following symlinks); names readdir lists but lstat cannot find are skipped."""
    base = os.fsencode(root)
    records: dict[bytes, Record] = {}
    inos: dict[bytes, int] = {}
    mismatch: list[bytes] = []
    st = os.lstat(base)
    stack = [b""]
    records[b""] = _record(base, st, with_times)
    inos[b""] = st.st_ino
    while stack:
        rel = stack.pop()
        with os.scandir(base + b"/" + rel if rel else base) as it:
            entries = list(it)
        for de in entries:
            sub = rel + b"/" + de.name if rel else de.name
            path = base + b"/" + sub
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            records[sub] = _record(path, st, with_times)
            inos[sub] = st.st_ino
            if de.inode() != st.st_ino:
                mismatch.append(sub)
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)
    return Snapshot(records, inos, mismatch)


def _record(path: bytes, st: os.stat_result, with_times: bool) -> Record:
    kind = file_type(st.st_mode)
    return Record(
        kind=kind,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
        size=st.st_size,
        digest=content_hash(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
        xattrs=_xattrs(path),
        mtime_ns=st.st_mtime_ns if with_times and kind != "dir" else None,
    )


def differences(expected: Snapshot, actual: Snapshot, limit: int = 30) -> list[str]:
    """Human-readable differences, empty when the trees are equal."""
    out: list[str] = []
    for path in sorted(expected.records.keys() - actual.records.keys()):
        out.append(f"missing: {path!r}")
    for path in sorted(actual.records.keys() - expected.records.keys()):
        out.append(f"extra: {path!r}")
    for path in sorted(expected.records.keys() & actual.records.keys()):
        a, b = expected.records[path], actual.records[path]
        if a != b:
            fields = [f for f in Record.__dataclass_fields__ if getattr(a, f) != getattr(b, f)]
            out.append(f"differs: {path!r}: " + ", ".join(
                f"{f} {getattr(a, f)!r} != {getattr(b, f)!r}" for f in fields))
    if expected.ino_groups() != actual.ino_groups():
        exp = {g for g in expected.ino_groups() if len(g) > 1}
        act = {g for g in actual.ino_groups() if len(g) > 1}
        out.append(f"inode sharing differs: expected {sorted(map(sorted, exp - act))} got {sorted(map(sorted, act - exp))}")
    return out[:limit]
