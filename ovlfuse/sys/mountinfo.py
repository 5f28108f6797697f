"""The mount table as this process sees it (``/proc/self/mountinfo``)."""

from __future__ import annotations

import os


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


def mount_points(pid: str = "self") -> dict[str, str]:
    """Mount point -> "major:minor" for every mount process ``pid`` can see."""
    points: dict[str, str] = {}
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            points[unescape(fields[4])] = fields[2]
    return points


def is_mounted(path: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks resolved) is a mount point."""
    return os.path.realpath(path) in mount_points()
