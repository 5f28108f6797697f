"""Owner mapping: ``C:H:N`` triples, ids shown and stored through them, squash, overflow ids."""

from __future__ import annotations

import pytest

from ovlfuse.errors import OvlError
from ovlfuse.fs.idmap import MAX_ID, IdMap, IdRange, parse_id, parse_mapping

PODMAN = "0:1000:1:1:100000:65536"  # root to the user, 1.. to the user's subordinate ids


def test_parse_mapping():
    assert parse_mapping("uidmapping", PODMAN) == (IdRange(0, 1000, 1), IdRange(1, 100000, 65536))
    assert parse_mapping("uidmapping", "5:5:1") == (IdRange(5, 5, 1),)


@pytest.mark.parametrize("value", [":0:100000:65536", "0::100000:65536", "0:100000:65536:", "::0:100000:65536::"])
def test_empty_fields_are_skipped_as_fuse_overlayfs_does(value):
    """containers/storage (podman 4) writes uidmapping=:0:100000:65536."""
    assert parse_mapping("uidmapping", value) == (IdRange(0, 100000, 65536),)


@pytest.mark.parametrize("value", ["", ":", "0", "0:1", "0:1:2:3", "0:1:x", "0:-1:5", "0:1:5.0", " 0:1:5", "0:1:²",
                                   "٠:١:٢", "0,1,5"])
def test_not_a_mapping(value):
    with pytest.raises(OvlError) as caught:
        parse_mapping("gidmapping", value)
    assert str(caught.value) == (f"gidmapping={value!r} is not a mapping: give STORED:SHOWN:COUNT triples joined by "
                                 "':', e.g. gidmapping=0:100000:65536")


@pytest.mark.parametrize("value, says", [
    ("0:0:0", "has an empty range (count 0)"),
    ("0:100:5:10:200:0", "has an empty range (count 0)"),
    ("0:100:10:5:300:1", "has overlapping stored ranges"),
    ("0:100:10:9:200:1", "has overlapping stored ranges"),
    ("5:100:10:0:200:6", "has overlapping stored ranges"),
    ("0:100:10:20:105:1", "has overlapping shown ranges"),
    ("0:0:4294967296", "reaches past the largest id, 4294967294"),
    ("0:4294967290:6", "reaches past the largest id, 4294967294"),
    ("4294967290:0:6", "reaches past the largest id, 4294967294"),
    ("99999999999:0:1", "reaches past the largest id, 4294967294"),
])
def test_refused_mappings(value, says):
    with pytest.raises(OvlError) as caught:
        parse_mapping("uidmapping", value)
    assert str(caught.value) == f"uidmapping={value!r} {says}"


def test_ranges_that_touch_do_not_overlap():
    assert len(parse_mapping("uidmapping", "0:100:10:10:110:10")) == 2
    assert parse_mapping("uidmapping", "0:4294967290:5") == (IdRange(0, 4294967290, 5),)  # up to MAX_ID itself
    assert parse_mapping("uidmapping", f"{MAX_ID}:0:1") == (IdRange(MAX_ID, 0, 1),)


@pytest.mark.parametrize("text, ident", [("0", 0), ("65534", 65534), ("007", 7), (str(MAX_ID), MAX_ID),
                                         (str(MAX_ID + 1), None), ("", None), ("-1", None), ("+1", None),
                                         ("1 ", None), ("²", None), ("١", None), ("0x10", None)])
def test_parse_id(text, ident):
    assert parse_id(text) == ident


def test_shown_and_stored_through_ranges_with_a_gap():
    ids = IdMap((IdRange(0, 1000, 1), IdRange(10, 2000, 5)), (IdRange(0, 500, 100),),
                overflow_uid=65534, overflow_gid=65533)
    assert ids.shown(0, 0) == (1000, 500)
    assert ids.shown(10, 99) == (2000, 599)
    assert ids.shown(14, 42) == (2004, 542)
    # stored ids no range covers (the gap 1..9, past the ends) show as the overflow ids
    assert ids.shown(1, 100) == (65534, 65533)
    assert ids.shown(9, 100) == (65534, 65533)
    assert ids.shown(15, 0) == (65534, 500)
    # the other way: ids the kernel sends are stored through the same ranges
    assert ids.stored(1000, 500) == (0, 0)
    assert ids.stored(2004, 599) == (14, 99)
    assert ids.stored(2005, 600) == (65534, 65533)
    assert ids.stored(1001, 499) == (65534, 65533)
    assert ids.stored(-1, -1) == (-1, -1)  # "unchanged" stays unchanged
    assert ids.stored(-1, 500) == (-1, 0)


def test_no_ranges_is_the_identity():
    ids = IdMap(gids=(IdRange(0, 100, 1),))
    assert ids.shown(4242, 0) == (4242, 100)
    assert ids.stored(4242, 100) == (4242, 0)
    assert IdMap().shown(MAX_ID, 0) == (MAX_ID, 0)


def test_squash_changes_only_what_is_shown():
    ids = IdMap((IdRange(0, 1000, 10),), (), squash_uid=7, squash_gid=None)
    assert ids.shown(3, 4) == (7, 4)
    assert ids.shown(99, 4) == (7, 4)
    assert ids.stored(1003, 4) == (3, 4)  # a chown still stores the caller's choice, through the mapping
    root = IdMap(squash_uid=0, squash_gid=0)
    assert root.shown(1234, 5678) == (0, 0) and root.stored(1234, 5678) == (1234, 5678)


def test_create_takes_this_systems_overflow_ids():
    with open("/proc/sys/kernel/overflowuid") as f:
        overflow_uid = int(f.read())
    with open("/proc/sys/kernel/overflowgid") as f:
        overflow_gid = int(f.read())
    ids = IdMap.create((IdRange(0, 1, 1),), (IdRange(0, 1, 1),), 5, None)
    assert (ids.overflow_uid, ids.overflow_gid, ids.squash_uid, ids.squash_gid) == (overflow_uid, overflow_gid, 5, None)
    assert ids.shown(0, 2) == (5, overflow_gid)
