"""The mount table reader: mountinfo's octal escapes, and the table as this process sees it."""

from __future__ import annotations

import os
import re

import pytest

from ovlfuse.sys.mountinfo import find, is_mounted, mount_points, mounts, unescape


@pytest.mark.parametrize("field, path", [
    ("/mnt/plain", "/mnt/plain"),
    (r"/mnt/with\040space", "/mnt/with space"),
    (r"/mnt/tab\011and\012newline", "/mnt/tab\tand\nnewline"),
    (r"/mnt/back\134slash", "/mnt/back\\slash"),
    (r"\040\040", "  "),
    (r"/mnt/\134040", "/mnt/\\040"),  # an escaped backslash followed by digits: the digits stay
    (r"/mnt/x\1345", "/mnt/x\\5"),  # three digits at most
    (r"/mnt/short\04", r"/mnt/short\04"),  # fewer than three digits: no escape
    ("/mnt/end\\", "/mnt/end\\"),
    ("/mnt/ünï/日本", "/mnt/ünï/日本"),
    ("/mnt/latin1-\udce9", "/mnt/latin1-\udce9"),  # a non-UTF-8 byte, as surrogateescape reads it
    ("", ""),
])
def test_unescape(field, path):
    assert unescape(field) == path


def test_the_mount_table_of_this_process():
    points = mount_points()
    assert "/" in points and "/proc" in points
    assert all(re.fullmatch(r"\d+:\d+", dev) for dev in points.values())
    assert points == mount_points(str(os.getpid()))
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    assert set(points) == {unescape(line.split()[4]) for line in lines}
    root_dev = next(line.split()[2] for line in reversed(lines) if line.split()[4] == "/")
    assert points["/"] == root_dev  # the last mount on a point is the one in effect


def test_is_mounted(tmp_path):
    assert is_mounted("/") and is_mounted("/proc")
    assert not is_mounted(tmp_path)
    link = tmp_path / "link-to-proc"
    os.symlink("/proc", link)
    assert is_mounted(link)  # symlinks are resolved
    assert not is_mounted(tmp_path / "missing")


def test_entries_carry_type_source_and_options():
    proc = find("/proc")
    assert proc is not None and proc.fstype == "proc" and proc.source == "proc"
    assert "rw" in proc.options or "ro" in proc.options
    assert re.fullmatch(r"\d+:\d+", proc.device)
    assert find("/proc") == [entry for entry in mounts() if entry.point == "/proc"][-1]
    assert find(os.path.join("/proc", "self", "..")) == proc  # resolved like the path
    assert find("/proc/self") is None
