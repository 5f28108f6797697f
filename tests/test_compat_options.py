"""fuse-overlayfs's options and stat override records, as containers/storage uses them.

The kernel has no owner mapping: ovlfuse's ``uidmapping``/``squash_to_*``
and ``static_nlink`` are compared with fuse-overlayfs itself.  Changes made
with ``xattr_permissions`` must leave the same view as the kernel's overlay
gives for the same calls with real owners.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from mounts import is_mounted, ovlfuse_mount, run_ovlfuse
from overlaypair import Layers, mount
from treesnap import differences, snapshot

CONTAINERS = "user.containers.override_stat"
PRIVILEGED = "security.fuseoverlayfs.override_stat"


def _dirs(tmp_path, tag: str) -> tuple[str, str, str]:
    upper, work, mnt = (tmp_path / f"{tag}-{n}" for n in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        d.mkdir()
    return str(upper), str(work), str(mnt)


def _owned_lower(tmp_path) -> str:
    lower = tmp_path / "lower"
    (lower / "dir" / "sub").mkdir(parents=True)
    for name, owner in (("root", 0), ("one", 1), ("mid", 5000), ("far", 70000), ("dir/f", 3)):
        (lower / name).write_text(name)
        os.chown(lower / name, owner, owner + 1)
    os.chown(lower / "dir", 2, 2)
    return str(lower)


def _owners(mnt: str, nlink: bool) -> dict[str, tuple[int, int, int]]:
    """Owners, and with ``nlink`` the link counts of directories (else ovlfuse keeps the kernel's, not fuse-overlayfs's)."""
    out = {}
    for root, dirs, files in os.walk(mnt):
        for name in ["", *dirs, *files]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            out[os.path.relpath(path, mnt)] = (st.st_uid, st.st_gid, st.st_nlink if nlink and stat.S_ISDIR(st.st_mode) else 0)
    return out


def _change(mnt: str) -> None:
    os.chown(os.path.join(mnt, "root"), 110005, 1000)
    os.chown(os.path.join(mnt, "one"), 0, 0)
    open(os.path.join(mnt, "new"), "w").close()
    os.mkdir(os.path.join(mnt, "dir", "newdir"))


MAPPINGS = [
    "uidmapping=0:1000:1:1:110000:65536,gidmapping=0:2000:1:1:120000:65536",
    "squash_to_root",
    "squash_to_uid=7,squash_to_root",
    "squash_to_gid=9,uidmapping=0:1000:70001",
    "static_nlink",
]


@pytest.mark.parametrize("options", MAPPINGS)
def test_owner_mapping_and_static_nlink_match_fuse_overlayfs(tmp_path, options):
    lower = _owned_lower(tmp_path)
    results = []
    for tag, fs in (("fo", "fuse-overlayfs"), ("ovl", "ovlfuse")):
        upper, work, mnt = _dirs(tmp_path, tag)
        with mount(fs, Layers.dirs([lower], upper, work), mnt, [options]):
            before = _owners(mnt, "static_nlink" in options)
            _change(mnt)
            after = _owners(mnt, "static_nlink" in options)
        stored = {n: (os.lstat(os.path.join(upper, n)).st_uid, os.lstat(os.path.join(upper, n)).st_gid)
                  for n in ("root", "one", "new", "dir/newdir")}
        results.append((before, after, stored))
    assert results[0] == results[1]
    if "static_nlink" in options:
        assert {n for _, _, n in results[1][1].values()} == {0, 1}


def test_mapped_owners_reach_the_mount_as_root_gives_it_allow_other():
    """containers/storage writes ``uidmapping=:C:H:N`` (podman 4); the mapped users are others than root."""
    base = tempfile.mkdtemp(prefix="ovlfuse-map.")
    try:
        os.chmod(base, 0o755)
        lower, upper, work, mnt = (os.path.join(base, n) for n in ("lower", "upper", "work", "mnt"))
        for d in (lower, upper, work, mnt):
            os.mkdir(d, 0o755)
        with open(os.path.join(lower, "mine"), "w") as f:
            f.write("for the namespace's root\n")
        os.chmod(os.path.join(lower, "mine"), 0o600)
        opts = f"lowerdir={lower},upperdir={upper},workdir={work},uidmapping=:0:100000:65536,gidmapping=:0:100000:65536"
        with ovlfuse_mount(["-o", opts, mnt], mnt):
            as_mapped_root = ["setpriv", "--reuid=100000", "--regid=100000", "--clear-groups"]
            read = subprocess.run([*as_mapped_root, "cat", os.path.join(mnt, "mine")], capture_output=True, text=True)
            assert read.stdout == "for the namespace's root\n", read.stderr
            other = subprocess.run(["setpriv", "--reuid=100001", "--regid=100001", "--clear-groups",
                                    "cat", os.path.join(mnt, "mine")], capture_output=True, text=True)
            assert "Permission denied" in other.stderr  # the modes still count (default_permissions)
    finally:
        shutil.rmtree(base)


def test_bad_and_unsupported_options_are_refused_in_one_line(tmp_path):
    lower = _owned_lower(tmp_path)
    upper, work, mnt = _dirs(tmp_path, "bad")
    base = f"lowerdir={lower},upperdir={upper},workdir={work}"
    for option, says in (("uidmapping=0:1000", "STORED:SHOWN:COUNT"),
                         ("uidmapping=0:1000:1,1:2000:5", "join uidmapping/gidmapping triples with ':'"),
                         ("uidmapping=0:1000:10:5:3000:1", "overlapping stored ranges"),
                         ("xattr_permissions=3", "xattr_permissions takes 0"),
                         ("squash_to_uid=root", "needs a numeric id"),
                         ('context="system_u:object_r:container_file_t:s0"', "SELinux"),
                         ("threaded=1", "not supported")):
        result = run_ovlfuse("-o", f"{base},{option}", mnt)
        assert result.returncode == 1, option
        assert says in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not is_mounted(mnt)


def test_the_containers_storage_form_with_volatile_mounts(tmp_path):
    """containers/storage runs ``PROGRAM -o lowerdir=...,upperdir=...,workdir=...,,volatile MERGED``."""
    lower = _owned_lower(tmp_path)
    upper, work, mnt = _dirs(tmp_path, "cs")
    assert run_ovlfuse("-o", f"lowerdir={lower},upperdir={upper},workdir={work},,volatile", mnt).returncode == 0
    try:
        with open(os.path.join(mnt, "written"), "w") as f:
            f.write("data")
            f.flush()
            os.fsync(f.fileno())  # volatile: answered without syncing
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(lower) + ["written"])
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=True)
    assert open(os.path.join(upper, "written")).read() == "data"


# --- stat override records -------------------------------------------------------

def _recorded_lower(tmp_path, name: str = CONTAINERS) -> str:
    """A layer that keeps owners and modes in records, as a rootless or force_mask pull writes it."""
    lower = tmp_path / "rec-lower"
    (lower / "d").mkdir(parents=True)
    for f in ("f", "dev", "fifo", "plain", "d/inner", "link"):
        (lower / f).write_text(f if f != "link" else "d/inner")
    records = {"": "0:0:0755:dir", "f": "1234:5678:0600:file", "dev": "1:2:0640:char-1-3", "fifo": "3:4:0600:pipe",
               "link": "5:5:0777:symlink",
               "d": "7:8:02750:dir", "d/inner": "9:9:100640"}  # the last: fuse-overlayfs's own form
    for path, value in records.items():
        os.setxattr(lower / path, name, value.encode())
    os.setxattr(lower / "plain", "user.other", b"kept")
    return str(lower)


def test_records_in_a_marked_layer_give_owner_mode_and_type(tmp_path):
    lower = _recorded_lower(tmp_path)
    upper, work, mnt = _dirs(tmp_path, "rec")
    plain = os.lstat(os.path.join(lower, "plain"))
    with ovlfuse_mount(["-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt], mnt):
        def shown(path):
            st = os.lstat(os.path.join(mnt, path))
            return st.st_uid, st.st_gid, oct(st.st_mode), st.st_rdev
        assert shown("f") == (1234, 5678, oct(stat.S_IFREG | 0o600), 0)
        assert shown("dev") == (1, 2, oct(stat.S_IFCHR | 0o640), os.makedev(1, 3))
        assert shown("fifo") == (3, 4, oct(stat.S_IFIFO | 0o600), 0)
        assert shown("d") == (7, 8, oct(stat.S_IFDIR | 0o2750), 0)
        assert shown("d/inner") == (9, 9, oct(stat.S_IFREG | 0o640), 0)
        assert shown("plain") == (plain.st_uid, plain.st_gid, oct(plain.st_mode), 0)  # no record: real
        assert shown("link") == (5, 5, oct(stat.S_IFLNK | 0o777), 0)
        assert os.readlink(os.path.join(mnt, "link")) == "d/inner"  # a symlink kept as a file holds its target
        assert os.listxattr(os.path.join(mnt, "f")) == []  # records are bookkeeping
        assert os.listxattr(os.path.join(mnt, "plain")) == ["user.other"]
        with pytest.raises(OSError):
            os.getxattr(os.path.join(mnt, "f"), CONTAINERS)
        # A copy-up into an upper without records keeps what the record said, for real.
        os.chmod(os.path.join(mnt, "f"), 0o640)
        assert shown("f") == (1234, 5678, oct(stat.S_IFREG | 0o640), 0)
        with open(os.path.join(mnt, "d", "inner"), "a") as f:
            f.write("more")
    for path, owner in (("f", (1234, 5678, 0o640)), ("d/inner", (9, 9, 0o640)), ("d", (7, 8, 0o2750))):
        st = os.lstat(os.path.join(upper, path))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == owner, path
        assert CONTAINERS not in os.listxattr(os.path.join(upper, path))


def test_records_in_an_unmarked_layer_are_plain_xattrs(tmp_path):
    lower = _recorded_lower(tmp_path)
    os.removexattr(lower, CONTAINERS)
    upper, work, mnt = _dirs(tmp_path, "unmarked")
    real = os.lstat(os.path.join(lower, "f"))
    with ovlfuse_mount(["-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt], mnt):
        st = os.lstat(os.path.join(mnt, "f"))
        assert (st.st_uid, st.st_gid, st.st_mode) == (real.st_uid, real.st_gid, real.st_mode)
        assert os.getxattr(os.path.join(mnt, "f"), CONTAINERS) == b"1234:5678:0600:file"


def _calls(mnt: str) -> None:
    """Owner and mode changes of every kind an unprivileged container engine needs records for."""
    j = lambda *p: os.path.join(mnt, *p)  # noqa: E731
    os.chown(j("a"), 1000, 1001)
    os.chmod(j("b"), 0o4750)
    os.mkdir(j("nd"), 0o755)
    os.chown(j("nd"), 5, 6)
    os.chmod(j("nd"), 0o2775)
    with open(j("nd", "created"), "w") as f:
        f.write("x")
    os.chown(j("nd", "created"), 11, 12)
    os.mknod(j("dev"), stat.S_IFCHR | 0o620, os.makedev(1, 5))
    os.chown(j("dev"), 0, 5)
    os.mkfifo(j("fifo"), 0o600)
    os.symlink("a", j("link"))
    os.lchown(j("link"), 44, 45)
    os.chown(j("sub"), 21, 22)
    os.chown(j("sub", "deep"), 23, 24)


def _base_lower(tmp_path) -> str:
    lower = tmp_path / "base"
    (lower / "sub").mkdir(parents=True)
    for f in ("a", "b", "sub/deep"):
        (lower / f).write_text(f)
    return str(lower)


@pytest.mark.parametrize("level,record", [(1, PRIVILEGED), (2, CONTAINERS)])
def test_xattr_permissions_keep_changes_in_records_with_the_kernels_view(tmp_path, level, record):
    lower = _base_lower(tmp_path)
    upper, work, mnt = _dirs(tmp_path, "k")
    with mount("kernel", Layers.dirs([lower], upper, work), mnt):
        _calls(mnt)
        expected = snapshot(mnt, with_times=False)
    upper, work, mnt = _dirs(tmp_path, f"x{level}")
    layers = Layers.dirs([lower], upper, work)
    with mount("ovlfuse", layers, mnt, [f"xattr_permissions={level}"]):
        _calls(mnt)
        assert differences(expected, snapshot(mnt, with_times=False)) == []
    # Real owners and modes stay the daemon's; the records hold what was asked.
    for path in ("a", "nd", "nd/created", "sub", "sub/deep"):
        st = os.lstat(os.path.join(upper, path))
        assert (st.st_uid, st.st_gid) == (0, 0), path
    assert os.getxattr(os.path.join(upper, "a"), record) == b"1000:1001:0644:file"
    assert os.getxattr(os.path.join(upper, "b"), record) == b"0:0:4750:file"
    assert os.getxattr(os.path.join(upper, "nd"), record) == b"5:6:2775:dir"
    assert os.getxattr(upper, record).endswith(b":dir")  # the upper is marked as a record layer
    # A second mount, without the option, reads the records back.
    with mount("ovlfuse", layers, mnt):
        assert differences(expected, snapshot(mnt, with_times=False)) == []
        with pytest.raises(PermissionError):
            os.setxattr(os.path.join(mnt, "a"), record, b"0:0:0777:file")


def test_record_changes_show_at_once(tmp_path):
    """Changes within one clock tick leave the ctime as it was: each must still show."""
    lower = _base_lower(tmp_path)
    upper, work, mnt = _dirs(tmp_path, "tick")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},xattr_permissions=2"
    with ovlfuse_mount(["-o", opts, mnt], mnt):
        path = os.path.join(mnt, "a")
        for i in range(1, 200):
            os.chown(path, i, 2 * i)
            os.chmod(path, 0o600 | (i & 0o77))
            st = os.lstat(path)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (i, 2 * i, 0o600 | (i & 0o77))
