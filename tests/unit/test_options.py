"""The ``-o`` option string: escapes, every option's value, and the one-line refusals."""

from __future__ import annotations

import pytest

from ovlfuse.errors import OvlError
from ovlfuse.fs.idmap import IdMap, IdRange
from ovlfuse.store.options import MountOptions, parse_options, split_unescaped


def refused(*option_strings: str) -> str:
    with pytest.raises(OvlError) as caught:
        parse_options(list(option_strings))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_layers_and_defaults():
    opts = parse_options(["lowerdir=/l1:/l2,upperdir=/u,workdir=/w"])
    assert opts == MountOptions(lowerdir=["/l1", "/l2"], upperdir="/u", workdir="/w")
    assert opts.has_layers and not opts.read_only and opts.allow_other is None
    assert not MountOptions().has_layers
    assert MountOptions(workdir="/w").has_layers


@pytest.mark.parametrize("text, lowers", [
    (r"lowerdir=/a\:b:/c", ["/a:b", "/c"]),  # an escaped ':' is part of the path
    (r"lowerdir=/a\,b:/c", ["/a,b", "/c"]),  # an escaped ',' does not end the option
    (r"lowerdir=/a\\:/b", ["/a\\", "/b"]),  # an escaped backslash, then a separator
    (r"lowerdir=/a\\,ro", ["/a\\"]),  # ... then the end of the option
    (r"lowerdir=/x\y", ["/xy"]),  # any other escaped character stands for itself
    ("lowerdir=/a\\", ["/a"]),  # a trailing backslash is dropped, as the kernel's unescape drops it
    ("lowerdir=/only", ["/only"]),
])
def test_lowerdir_escapes(text, lowers):
    assert parse_options([text]).lowerdir == lowers


def test_escapes_in_upperdir_and_workdir():
    opts = parse_options([r"lowerdir=/l,upperdir=/u\:1\,2\\3,workdir=/w\,x"])
    assert (opts.upperdir, opts.workdir) == ("/u:1,2\\3", "/w,x")


def test_split_unescaped():
    assert split_unescaped(r"a\:b:c", ":") == ["a:b", "c"]
    assert split_unescaped("", ":") == [""]
    assert split_unescaped("a::b", ":") == ["a", "", "b"]
    assert split_unescaped(r"a\\:b", ":") == ["a\\", "b"]


def test_several_option_strings_and_empty_options():
    """containers/storage passes ',,volatile'; later values win, as on the kernel's command line."""
    opts = parse_options(["lowerdir=/a,,volatile,", "lowerdir=/b", "ro", "rw", "ro"])
    assert opts.lowerdir == ["/b"] and opts.volatile and opts.read_only
    assert not parse_options(["ro,rw"]).read_only
    assert parse_options([""]) == MountOptions()


def test_flags():
    opts = parse_options(["userxattr,allow_other,default_permissions,noacl,static_nlink,squash_to_root"])
    assert opts.userxattr and opts.allow_other and opts.static_nlink and opts.squash_to_root


def test_vfs_flags_keep_their_order_and_userspace_options_are_dropped():
    opts = parse_options(["nodev,defaults,noatime,x-systemd.automount,nofail,nosuid,_netdev,users"])
    assert opts.vfs_flags == ["nodev", "noatime", "nosuid"]
    assert opts == MountOptions(vfs_flags=["nodev", "noatime", "nosuid"])


def test_fsname_and_subtype():
    opts = parse_options(["fsname=mysource,subtype=whatever"])
    assert opts.fsname == "mysource" and opts.subtype == "whatever"
    assert opts == MountOptions(fsname="mysource", subtype="whatever")


@pytest.mark.parametrize("text, allow_other, allow_root", [
    ("allow_other", True, False), ("noallow_other", False, False), ("allow_other,noallow_other", False, False),
    ("allow_root", None, True), ("rw", None, False),
])
def test_who_may_use_the_mount(text, allow_other, allow_root):
    opts = parse_options([text])
    assert (opts.allow_other, opts.allow_root) == (allow_other, allow_root)


def test_libfuse_conventions():
    opts = parse_options(["debug,auto_unmount,atime,relatime,lazytime,max_threads=4,clone_fd,max_idle_threads=1"])
    assert opts.debug and opts.auto_unmount and opts.vfs_flags == ["atime"]
    assert [note.split(":")[0] for note in opts.ignored] == ["relatime", "lazytime", "max_threads=4", "clone_fd",
                                                             "max_idle_threads=1"]
    assert all(": " in note for note in opts.ignored)


@pytest.mark.parametrize("text, volatile", [("fsync=0", True), ("fsync=1", False), ("volatile,fsync=1", False),
                                            ("fsync=0,volatile", True), ("volatile", True)])
def test_fsync_and_volatile(text, volatile):
    assert parse_options([text]).volatile is volatile


@pytest.mark.parametrize("level", [0, 1, 2])
def test_xattr_permissions(level):
    assert parse_options([f"xattr_permissions={level}"]).xattr_permissions == level


@pytest.mark.parametrize("text", ["index=off", "redirect_dir=off", "redirect_dir=nofollow", "metacopy=off",
                                  "xino=off", "xino=auto", "nfs_export=off", "uuid=off", "uuid=null"])
def test_overlay_switches_ovlfuse_implements(text):
    assert parse_options([text]) == MountOptions()


def test_owner_mapping():
    opts = parse_options(["uidmapping=0:1000:1:1:100000:65536,gidmapping=:0:2000:10,squash_to_gid=9"])
    assert opts.uidmapping == (IdRange(0, 1000, 1), IdRange(1, 100000, 65536))
    assert opts.gidmapping == (IdRange(0, 2000, 10),)
    assert opts.squash_to_gid == 9 and opts.squash_to_uid is None


@pytest.mark.parametrize("text, squash", [
    ("squash_to_root", (0, 0)),
    ("squash_to_root,squash_to_uid=7", (7, 0)),  # squash_to_uid/gid win over squash_to_root
    ("squash_to_gid=9,squash_to_root", (0, 9)),
    ("squash_to_uid=4294967294", (4294967294, None)),
    ("uidmapping=0:1:1", (None, None)),
])
def test_ids_follow_the_squash_options(text, squash):
    ids = parse_options([text]).ids()
    assert isinstance(ids, IdMap)
    assert (ids.squash_uid, ids.squash_gid) == squash


@pytest.mark.parametrize("text, says", [
    ("bogus", "unknown mount option 'bogus'; see 'ovlfuse --help' for the accepted options"),
    ("=x", "unknown mount option '=x'; see 'ovlfuse --help' for the accepted options"),
    ("ro=1", "unknown mount option 'ro=1'; see 'ovlfuse --help' for the accepted options"),
    ("allow_other=1", "unknown mount option 'allow_other=1'; see 'ovlfuse --help' for the accepted options"),
    ("nodev=1", "unknown mount option 'nodev=1'; see 'ovlfuse --help' for the accepted options"),
    ("fsname", "unknown mount option 'fsname'; see 'ovlfuse --help' for the accepted options"),
    ("subtype=", "option 'subtype=' needs a name without commas"),
    ("uuid=on", "option 'uuid=on' is not supported: ovlfuse implements uuid=null|off only (it writes no "
                "trusted.overlay.uuid)"),
    ("uuid=auto", "option 'uuid=auto' is not supported: ovlfuse implements uuid=null|off only (it writes no "
                  "trusted.overlay.uuid)"),
    ("max_threads=many", "option 'max_threads=many' needs a number of threads"),
    ("uidmapping", "unknown mount option 'uidmapping'; see 'ovlfuse --help' for the accepted options"),
    ("lowerdir=", "lowerdir='' has an empty layer (data-only '::' layers are not supported)"),
    ("lowerdir=/a::/b", "lowerdir='/a::/b' has an empty layer (data-only '::' layers are not supported)"),
    ("lowerdir=/a:", "lowerdir='/a:' has an empty layer (data-only '::' layers are not supported)"),
    ("upperdir=", "option upperdir= needs a directory"),
    ("workdir=", "option workdir= needs a directory"),
    ("squash_to_uid=root", "option 'squash_to_uid=root' needs a numeric id, 0 to 4294967294"),
    ("squash_to_gid=", "option 'squash_to_gid=' needs a numeric id, 0 to 4294967294"),
    ("squash_to_uid=-1", "option 'squash_to_uid=-1' needs a numeric id, 0 to 4294967294"),
    ("squash_to_uid=²", "option 'squash_to_uid=²' needs a numeric id, 0 to 4294967294"),
    ("squash_to_uid=٧", "option 'squash_to_uid=٧' needs a numeric id, 0 to 4294967294"),
    ("squash_to_uid=4294967295", "option 'squash_to_uid=4294967295' needs a numeric id, 0 to 4294967294"),
    ("squash_to_gid=99999999999", "option 'squash_to_gid=99999999999' needs a numeric id, 0 to 4294967294"),
    ("xattr_permissions=3", "option 'xattr_permissions=3': xattr_permissions takes 0 (off), "
                            "1 (security.* records) or 2 (user.* records)"),
    ("xattr_permissions", "option 'xattr_permissions': xattr_permissions takes 0 (off), "
                          "1 (security.* records) or 2 (user.* records)"),
    ("fsync=2", "option 'fsync=2': fsync takes 0 (skip syncs, like volatile) or 1"),
    ("fsync", "option 'fsync': fsync takes 0 (skip syncs, like volatile) or 1"),
    ("index=on", "option 'index=on' is not supported: ovlfuse implements index=off only"),
    ("index", "option 'index' is not supported: ovlfuse implements index=off only"),
    ("redirect_dir=on", "option 'redirect_dir=on' is not supported: ovlfuse implements redirect_dir=nofollow|off only"),
    ("metacopy=on", "option 'metacopy=on' is not supported: ovlfuse implements metacopy=off only"),
    ("xino=on", "option 'xino=on' is not supported: ovlfuse implements xino=auto|off only"),
    ("nfs_export=on", "option 'nfs_export=on' is not supported: ovlfuse implements nfs_export=off only"),
    ('context="system_u:object_r:container_file_t:s0"',
     """option 'context="system_u:object_r:container_file_t:s0"' is not supported: """
     "SELinux mount labels are not implemented"),
    ("plugins=/x.so", "option 'plugins=/x.so' is not supported: fuse-overlayfs layer plugins do not exist in ovlfuse"),
    ("threaded=1", "option 'threaded=1' is not supported: ovlfuse serves requests on one trio loop"),
    ("fast_ino=1", "option 'fast_ino=1' is not supported: ovlfuse always reports the kernel's inode numbers"),
    ("writeback=1", "option 'writeback=1' is not supported: ovlfuse keeps the kernel's writeback cache off"),
    ("noxattrs=1", "option 'noxattrs=1' is not supported: xattrs are always served"),
    ("timeout=5", "option 'timeout=5' is not supported: ovlfuse sets its own cache timeouts"),
])
def test_refusals_name_the_option_in_one_line(text, says):
    assert refused(text) == says


@pytest.mark.parametrize("text, stray", [
    ("uidmapping=0:1000:1,1:2000:5", "1:2000:5"),
    ("gidmapping=0:0:1,1:1:1,2:2:1", "1:1:1"),
    ("uidmapping=0:1000:1,1:2000:5:7:8:9", "1:2000:5:7:8:9"),
])
def test_a_mapping_joined_with_commas_says_how_to_join_it(text, stray):
    assert refused(text) == f"unknown mount option '{stray}'; join uidmapping/gidmapping triples with ':', not ','"


def test_a_stray_option_that_is_no_mapping_is_unknown():
    assert refused("uidmapping=0:1:1,1:2") == "unknown mount option '1:2'; see 'ovlfuse --help' for the accepted options"
    assert refused("uidmapping=0:1:1,١:٢:٣").startswith("unknown mount option '١:٢:٣'; see")


def test_the_first_bad_option_is_the_one_named():
    assert refused("ro", "bogus1,bogus2") == "unknown mount option 'bogus1'; see 'ovlfuse --help' for the accepted options"


def test_refused_mapping_values_come_from_the_mapping_parser():
    assert refused("uidmapping=0:1000") == ("uidmapping='0:1000' is not a mapping: give STORED:SHOWN:COUNT triples "
                                           "joined by ':', e.g. uidmapping=0:100000:65536")
    assert refused("gidmapping=0:1:1:0:5:1") == "gidmapping='0:1:1:0:5:1' has overlapping stored ranges"
