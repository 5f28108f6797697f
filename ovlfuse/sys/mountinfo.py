"""The mount table as this process sees it (``/proc/self/mountinfo``): one reader for the daemon, tools, tests and bench."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: where, what, and with which options."""

    point: str
    device: str  # "major:minor"
    fstype: str  # "fuse.ovlfuse", "overlay", ...
    source: str
    options: frozenset[str]  # per-mount and superblock options together


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as three octal digits."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1: i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(pid: str = "self") -> list[MountEntry]:
    """Every mount process ``pid`` can see, in mount order (a later mount on the same point covers an earlier one)."""
    found = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            tail = fields.index("-")
            options = set(fields[5].split(",")) | set(fields[tail + 3].split(","))
            found.append(MountEntry(unescape(fields[4]), fields[2], fields[tail + 1], unescape(fields[tail + 2]),
                                    frozenset(options)))
    return found


def mount_points(pid: str = "self") -> dict[str, str]:
    """Mount point -> "major:minor" for every mount process ``pid`` can see."""
    return {entry.point: entry.device for entry in mounts(pid)}


def is_mounted(path: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks resolved) is a mount point."""
    return os.path.realpath(path) in mount_points()


def find(path: str | os.PathLike) -> MountEntry | None:
    """The mount on ``path`` itself (symlinks resolved; the topmost one), or None."""
    real = os.path.realpath(path)
    on_it = [entry for entry in mounts() if entry.point == real]
    return on_it[-1] if on_it else None
