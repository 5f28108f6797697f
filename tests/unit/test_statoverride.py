"""Stat override records (``UID:GID:MODE[:TYPE]``): what a record gives, what is no record, and the written form."""

from __future__ import annotations

import os
import stat

import pytest

from ovlfuse.fs.statoverride import CONTAINERS, LEGACY, NAMES, PRIVILEGED, WRITTEN, Stored, format_record, \
    layer_marker, parse

FILE = Stored(1000, 1000, stat.S_IFREG | 0o644, 0)
DIR = Stored(1000, 1000, stat.S_IFDIR | 0o755, 0)
DEV = Stored(0, 0, stat.S_IFCHR | 0o600, os.makedev(4, 5))


@pytest.mark.parametrize("value, real, expected", [
    # containers/storage's form: a four-digit octal mode and a type
    (b"1234:5678:0600:file", FILE, Stored(1234, 5678, stat.S_IFREG | 0o600, 0)),
    (b"0:0:4755:file", FILE, Stored(0, 0, stat.S_IFREG | 0o4755, 0)),
    (b"7:8:02750:dir", DIR, Stored(7, 8, stat.S_IFDIR | 0o2750, 0)),
    (b"5:5:0777:symlink", FILE, Stored(5, 5, stat.S_IFLNK | 0o777, 0)),  # a symlink kept as a file
    (b"3:4:0600:pipe", FILE, Stored(3, 4, stat.S_IFIFO | 0o600, 0)),
    (b"3:4:0600:socket", FILE, Stored(3, 4, stat.S_IFSOCK | 0o600, 0)),
    (b"1:2:0640:char-1-3", FILE, Stored(1, 2, stat.S_IFCHR | 0o640, os.makedev(1, 3))),
    (b"1:2:0660:block-7-0", FILE, Stored(1, 2, stat.S_IFBLK | 0o660, os.makedev(7, 0))),
    (b"1:2:0660:block-4095-1048575", FILE, Stored(1, 2, stat.S_IFBLK | 0o660, os.makedev(4095, 1048575))),
    # fuse-overlayfs's own form: the mode with its type bits, no TYPE
    (b"9:9:100640", FILE, Stored(9, 9, stat.S_IFREG | 0o640, 0)),
    (b"9:9:040700", FILE, Stored(9, 9, stat.S_IFDIR | 0o700, 0)),
    # no type at all: the object's own
    (b"1:2:0755", DIR, Stored(1, 2, stat.S_IFDIR | 0o755, 0)),
    (b"1:2:0640", DEV, Stored(1, 2, stat.S_IFCHR | 0o640, os.makedev(4, 5))),  # the real device number stays
    # a TYPE wins over the mode's type bits; a type that changes drops the real device number
    (b"1:2:100640:dir", FILE, Stored(1, 2, stat.S_IFDIR | 0o640, 0)),
    (b"1:2:0640:file", DEV, Stored(1, 2, stat.S_IFREG | 0o640, 0)),
    # the padding and terminators writers leave
    (b"1:2:0644:file\0", FILE, Stored(1, 2, stat.S_IFREG | 0o644, 0)),
    (b"1:2:0644:file\n", FILE, Stored(1, 2, stat.S_IFREG | 0o644, 0)),
    (b" 1:2:0644 ", FILE, Stored(1, 2, stat.S_IFREG | 0o644, 0)),
    (b"4294967294:0:0644", FILE, Stored(4294967294, 0, stat.S_IFREG | 0o644, 0)),
])
def test_records(value, real, expected):
    assert parse(value, real) == expected


@pytest.mark.parametrize("value", [
    b"", b"1:2", b"1", b"::", b"1:2:", b"a:2:0644", b"1:b:0644", b"-1:2:0644", b"1:2:0648", b"1:2:x",
    b"\xff:1:0644", b"1:2:0644:weird", b"1:2:0644:", b"1:2:0644:char", b"1:2:0644:char-1", b"1:2:0644:block-8-x",
    b"1:2:0644:char--3",
    # values no object can have
    b"4294967295:0:0644", b"99999999999:0:0644", b"0:99999999999:0644",
    b"1:2:170644", b"1:2:077777777", b"1:2:-755",
    b"1:2:0640:char-4096-0", b"1:2:0640:char-0-1048576", b"1:2:0640:char-4294967295-0",
])
def test_not_records(value):
    assert parse(value, FILE) is None


@pytest.mark.parametrize("stored, record", [
    (Stored(1, 2, stat.S_IFREG | 0o644), b"1:2:0644:file"),
    (Stored(0, 0, stat.S_IFREG | 0o4755), b"0:0:4755:file"),
    (Stored(7, 8, stat.S_IFDIR | 0o2750), b"7:8:2750:dir"),
    (Stored(7, 8, stat.S_IFLNK | 0o777), b"7:8:0777:symlink"),
    (Stored(7, 8, stat.S_IFIFO | 0o600), b"7:8:0600:pipe"),
    (Stored(7, 8, stat.S_IFSOCK | 0o600), b"7:8:0600:socket"),
    (Stored(1, 2, stat.S_IFCHR | 0o640, os.makedev(1, 3)), b"1:2:0640:char-1-3"),
    (Stored(1, 2, stat.S_IFBLK | 0o660, os.makedev(259, 70000)), b"1:2:0660:block-259-70000"),
])
def test_format_record_and_back(stored, record):
    """What ovlfuse writes reads back as what it stored, whatever the real object is (a plain file here)."""
    assert format_record(stored) == record
    assert parse(record, FILE) == stored


def test_format_record_without_type_bits_writes_a_file():
    assert format_record(Stored(4294967294, 0, 0o1777)) == b"4294967294:0:1777:file"


def test_stored_of_a_stat_result(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    os.chmod(path, 0o640)
    st = os.lstat(path)
    assert Stored.of(st) == Stored(st.st_uid, st.st_gid, stat.S_IFREG | 0o640, 0)


def test_names():
    assert NAMES == (PRIVILEGED, CONTAINERS, LEGACY)
    assert (PRIVILEGED, CONTAINERS, LEGACY) == ("security.fuseoverlayfs.override_stat",
                                                "user.containers.override_stat", "user.fuseoverlayfs.override_stat")
    assert WRITTEN == {1: PRIVILEGED, 2: CONTAINERS}


def _marker_of(path) -> str | None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return layer_marker(fd)
    finally:
        os.close(fd)


def test_layer_marker_is_the_first_name_on_the_layers_root(tmp_path):
    """As in fuse-overlayfs, a layer uses records only when its root carries one (user.* names: any user can set)."""
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "f").write_text("x")
    os.setxattr(layer / "f", CONTAINERS, b"1:1:0644:file")
    assert _marker_of(layer) is None  # a record below the root does not mark the layer
    os.setxattr(layer, LEGACY, b"0:0:0755:dir")
    assert _marker_of(layer) == LEGACY
    os.setxattr(layer, CONTAINERS, b"0:0:0755:dir")
    assert _marker_of(layer) == CONTAINERS  # before LEGACY in NAMES
    os.removexattr(layer, CONTAINERS)
    os.removexattr(layer, LEGACY)
    os.setxattr(layer, "user.other", b"0:0:0755:dir")
    assert _marker_of(layer) is None
