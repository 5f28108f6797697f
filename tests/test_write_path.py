"""The write path, call by call against the kernel's overlay.

A differential harness: the same operations (small functions of a mount root)
run on a kernel overlay mount of one copy of a store and on an ovlfuse mount
of another copy.  Every call's result or errno must match, the merged trees
must match after the sequence, and so must the two upper dirs, apart from the
kernel's bookkeeping xattrs (origin, impure, uuid) and its habit of
hard-linking all whiteouts to one inode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable

import pytest

from differential import (Op, dir_times, fs, listing, mounted_pair, named, normalized, p, read, rename2, same_file,
                          shell, stat_of, store_pair, write_file, xattrs_of)
from overlaypair import mount
from ovlfuse.sys.safeio import RENAME_EXCHANGE, RENAME_NOREPLACE
from stores import LONG_NAME
from treesnap import differences, snapshot


def changes(observed: str, action: Op) -> Op:
    """Which attributes of ``observed`` an action changes, as seen through the (caching) mount."""
    fields = ("st_ino", "st_mode", "st_nlink", "st_size", "st_mtime_ns", "st_ctime_ns")

    def op(root: str) -> list[str]:
        before = os.lstat(p(root, observed))
        action(root)
        after = os.lstat(p(root, observed))
        return [f for f in fields if getattr(before, f) != getattr(after, f)]
    return named(f"changes of {observed} by {action.__name__}", op)


def read_across_copy_up(rel: str) -> Op:
    """A file opened before its copy-up reads the copy afterwards."""
    def op(root: str) -> tuple[bytes, bytes]:
        with open(p(root, rel), "rb", buffering=0) as reader:
            first = reader.read(4)
            with open(p(root, rel), "r+b") as writer:
                writer.write(b"NEW!")
            reader.seek(0)
            return first, reader.read()
    return named(f"read across copy-up {rel}", op)


def touch(rel: str, *args: str) -> Op:
    """touch(1): ``-a``/``-m`` leave the other time as it is (UTIME_OMIT)."""
    def op(root: str) -> None:
        subprocess.run(["touch", "-h", *args, p(root, rel)], check=True, capture_output=True)
    return named(f"touch {' '.join(args)} {rel}", op)


def times_of(rel: str, started_ns: int) -> Op:
    """(atime, mtime), with times from this run shown as "now"."""
    def op(root: str) -> tuple[object, object]:
        st = os.lstat(p(root, rel))
        return tuple("now" if t >= started_ns else t for t in (st.st_atime_ns, st.st_mtime_ns))
    return named(f"times {rel}", op)


SEQUENCE_STARTED = time.time_ns()
SEQUENCE: list[Op] = [
    touch("a/b/c/d/e/deep", "-m", "-d", "@5"), times_of("a/b/c/d/e/deep", SEQUENCE_STARTED),
    touch("a/b/c/d/e/deep", "-a", "-d", "@7"), times_of("a/b/c/d/e/deep", SEQUENCE_STARTED),
    touch("a/b/c/d/e/deep", "-m"), times_of("a/b/c/d/e/deep", SEQUENCE_STARTED),
    touch("a/up-link", "-d", "@9"), times_of("a/up-link", SEQUENCE_STARTED),
    touch("only-low/inner", "-a", "-d", "@11"), times_of("only-low/inner", SEQUENCE_STARTED),
    read_across_copy_up("a/b/c/from-image-top"), read_across_copy_up("names/emoji-🙂"),
    # what the kernel's caches must not hide: attributes changed by copy-up and by other names
    changes("names", fs("chmod", os.chmod, "names/sp ace", 0o600)),
    changes("names/sp ace", fs("chmod", os.chmod, "names/sp ace", 0o640)),
    changes("a/b/c/d/e/deep", fs("chown", os.chown, "a/b/c/d/e/deep", 3, 3)),
    changes("a/b/c/d", write_file("a/b/c/d/fresh", b"f")),
    changes("only-low", fs("mkdir", os.mkdir, "only-low/sub")),
    changes("only-low/inner", fs("mkdir", os.mkdir, "only-low/inner/sub")),
    changes("only-upper", fs("mkdir", os.mkdir, "only-upper/sub")),
    changes("container-link", fs("link", os.link, ("container-new", "container-new2"))),
    changes("container-new2", fs("unlink", os.unlink, "container-new2")),
    changes("a/hard3", write_file("a/up-link/../../hard1", b"", "ab")),
    changes("hard1", write_file("hard1", b"", "ab")),
    # files: new, lower (copy-up), appends, truncates, writes in the middle
    write_file("new1", b"hello"), read("new1"), stat_of("new1"),
    write_file("a/b/c/d/e/deep", b"more\n", "ab"), read("a/b/c/d/e/deep"),
    fs("truncate", os.truncate, "comeback", length=3), read("comeback"),
    write_file("stray/plain", b"replaced"), read("stray/plain"),
    write_file("big", b"X" * 10, "r+b", at=4096), read("big"), stat_of("big"),
    write_file("only-low/inner/new", b"deep new"), listing("only-low/inner"), listing("only-low"),
    fs("truncate", os.truncate, "new1", length=100), read("new1"),
    # attributes of lower files and dirs
    fs("chmod", os.chmod, "setuid", 0o755), stat_of("setuid"),
    fs("chmod", os.chmod, "sticky", 0o1700), stat_of("sticky"),
    fs("chown", os.chown, "readonly", 42, 43), stat_of("readonly"),
    fs("chown", os.chown, "setgid", 7, 8), stat_of("setgid"),
    fs("chown", os.chown, "sgid-dir", 7, 8), stat_of("sgid-dir"),
    fs("utime", os.utime, "xattr-file", ns=(1_000_000_000, 2_000_000_000)),
    fs("utime", os.utime, "only-low", ns=(3_000_000_000, 4_000_000_000)), dir_times("only-low"),
    fs("lchown", os.chown, "rel-link", 5, 6, follow_symlinks=False), stat_of("rel-link"),
    # xattrs
    fs("setxattr", os.setxattr, "names/sp ace", "user.new", b"v"), xattrs_of("names/sp ace"),
    fs("removexattr", os.removexattr, "xattr-file", "user.color"), xattrs_of("xattr-file"),
    fs("removexattr", os.removexattr, "a/b", "user.none"),
    fs("setxattr", os.setxattr, "a", "user.dir", b"upper"), xattrs_of("a"),
    fs("setxattr", os.setxattr, "empty", "trusted.overlay.opaque", b"y"),
    # unlink: lower, upper over lower, upper only (with another link)
    fs("unlink", os.unlink, "empty"), listing(""),
    fs("unlink", os.unlink, "a/shadow"), listing("a"),
    fs("unlink", os.unlink, "container-new"), stat_of("container-link"),
    fs("unlink", os.unlink, "no-such"),
    # rmdir: non-empty, lower, merged, upper-only opaque
    fs("rmdir", os.rmdir, "only-low/inner"),
    fs("unlink", os.unlink, "only-low/inner/f"), fs("unlink", os.unlink, "only-low/inner/new"),
    fs("rmdir", os.rmdir, "only-low/inner"), listing("only-low"),
    fs("rmdir", os.rmdir, "opq-upper"),
    fs("rmdir", os.rmdir, "only-upper/x"),
    fs("rmdir", os.rmdir, "a/b/c/d"),
    fs("unlink", os.unlink, "xw/keep"), fs("rmdir", os.rmdir, "xw"),
    fs("unlink", os.unlink, "opq-dev/new"), fs("rmdir", os.rmdir, "opq-dev"),
    fs("rmdir", os.rmdir, "a/b/c/d/e"),
    # mkdir over whiteouts (opaque) and in plain places
    fs("mkdir", os.mkdir, "only-low/inner"), listing("only-low/inner"),
    fs("mkdir", os.mkdir, "xw"), listing("xw"),
    fs("mkdir", os.mkdir, "wdir"), listing("wdir"),
    fs("mkdir", os.mkdir, "newdir", 0o750), stat_of("newdir"),
    fs("mkdir", os.mkdir, "a"),
    write_file("newdir/f", b"f"), fs("mkdir", os.mkdir, "sgid-dir/sub"), stat_of("sgid-dir/sub"),
    # renames: lower file to a new name, over an existing name, across dirs, dirs
    fs("rename", os.rename, ("a/b/new-in-middle", "a/b/renamed")), listing("a/b"), read("a/b/renamed"),
    fs("rename", os.rename, ("dir-becomes-file", "comeback")), read("comeback"),
    fs("rename", os.rename, ("stray/plain", "only-upper/x/plain2")), listing("stray"),
    fs("rename", os.rename, ("only-low", "only-low-moved")),
    fs("rename", os.rename, ("a/b", "a/b2")),
    fs("rename", os.rename, ("only-upper", "moved-upper")), listing("moved-upper/x"),
    fs("rename", os.rename, ("newdir", "xw")), listing("xw"),
    fs("rename", os.rename, ("moved-upper", "wdir")), listing("wdir"),
    fs("rename", os.rename, ("new1", "fifo")), read("fifo"),
    fs("rename", os.rename, ("file-becomes-dir", "names")),
    # links, symlinks, special files
    fs("link", os.link, ("setgid", "setgid-link")), same_file("setgid", "setgid-link"), stat_of("setgid-link"),
    fs("link", os.link, ("readonly", "a/readonly-link")), stat_of("readonly"),
    fs("symlink", os.symlink, ("sym-new", "a")),
    named("symlink sym-new -> target", lambda root: os.symlink("target", p(root, "sym-new"))),
    named("readlink sym-new", lambda root: os.readlink(p(root, "sym-new"))),
    fs("mkfifo", os.mkfifo, "fifo2"), stat_of("fifo2"),
    fs("mknod 0:0", os.mknod, "zero", stat.S_IFCHR | 0o600, 0),
    fs("mknod 1:3", os.mknod, "null2", stat.S_IFCHR | 0o644, os.makedev(1, 3)), stat_of("null2"),
    fs("mknod sock", os.mknod, "sock", stat.S_IFSOCK | 0o640), stat_of("sock"),
    fs("mknod 7:1", os.mknod, "a/blk", stat.S_IFBLK | 0o600, os.makedev(7, 1)), stat_of("a/blk"),
    fs("chmod", os.chmod, "loopdev", 0o640), fs("chown", os.chown, "null", 1, 2), stat_of("null"),
    # hard links: a write through one name shows through the other
    write_file("container-link", b"via link"), read("container-link"),
    fs("link", os.link, ("container-link", "container-link2")),
    write_file("container-link2", b"second", "ab"), read("container-link"), stat_of("container-link"),
    # a lower hard link breaks on copy-up: the other names keep the lower data
    same_file("hard1", "a/hard3"),
    write_file("hard1", b"changed", "ab"), read("hard1"), read("a/hard3"),
    same_file("hard1", "a/hard3"), stat_of("a/hard3"), stat_of("hard1"),
    fs("link", os.link, ("a/hard3", "hard5")), same_file("a/hard3", "hard5"), read("hard5"),
    # renameat2 flags
    rename2("setuid", "setgid", RENAME_EXCHANGE), read("setuid"), read("setgid"), stat_of("setuid"),
    rename2("a/b/c/d/e/deep", "container-link", RENAME_EXCHANGE), read("container-link"), read("container-new"),
    rename2("only-low-moved", "stray", RENAME_EXCHANGE),
    rename2("only-low", "stray", RENAME_EXCHANGE),
    rename2("sgid-dir/sub", "a/b2", RENAME_EXCHANGE),
    rename2("sgid-dir/sub", "wdir/x", RENAME_EXCHANGE), listing("wdir/x"), listing("sgid-dir/sub"),
    rename2("fifo2", "no-such", RENAME_EXCHANGE),
    rename2("hard5", "comeback", RENAME_NOREPLACE), rename2("hard5", "hard6", RENAME_NOREPLACE),
    named("fsync dirs", lambda root: [os.fsync(fd) or os.close(fd) for fd in
                                     (os.open(p(root, d), os.O_RDONLY | os.O_DIRECTORY) for d in ("", "a", "sticky"))]),
    listing(""), listing("a"),
]


@pytest.mark.parametrize("layers", [4, 128])
def test_sequence_matches_kernel(tmp_path, layers):
    with mounted_pair(tmp_path, extra_layers=layers - 4) as pair:
        assert "\n".join(pair.apply(SEQUENCE)) == ""
        assert "\n".join(pair.tree_differences()) == ""
    assert "\n".join(pair.upper_differences()) == ""
    # the sequence reaches the interesting cases (not just the same failure on both sides)
    outcomes = [r for r, _ in pair.results.values()]
    assert outcomes.count("ok") > 0.8 * len(outcomes)
    assert pair.results["rename only-low only-low-moved  "] == ("error", "EXDEV")
    assert pair.results["mknod 0:0 zero (8576, 0) "] == ("error", "EPERM")
    assert pair.results["read a/hard3"] == ("ok", b"hard\n")


def test_whiteout_files_where_devices_cannot_be_made(tmp_path):
    """Where char 0:0 cannot be made, ``.wh.`` files give the same calls and views as the kernel's run.

    The fixed sequence runs against the kernel and against ovlfuse under a
    seccomp filter refusing 0:0 devices and RENAME_WHITEOUT, as older kernels
    do for ordinary users.  The kernel does not read ``.wh.`` files, so the
    upper dir is checked by form, and by a second ovlfuse mount showing the
    kernel's tree.
    """
    pair = store_pair(tmp_path)
    devices = {p for p, r in snapshot(pair.ours.upper).records.items() if r.kind == "chardev" and r.rdev == 0}
    with pair.mounted(whiteout_files=True):
        assert "\n".join(pair.apply(SEQUENCE)) == ""
        assert "\n".join(pair.tree_differences()) == ""
    upper = snapshot(pair.ours.upper)
    assert {p for p, r in upper.records.items() if r.kind == "chardev" and r.rdev == 0} <= devices
    markers = [p for p in upper.records if os.path.basename(p).startswith(b".wh.")]
    assert len(markers) >= 5, markers
    assert os.listdir(os.path.join(pair.ours.work, "work")) == []
    with pair.mounted():
        assert "\n".join(pair.tree_differences()) == ""


WORKLOAD = [
    shell("tar -xf {tar}"), shell("find . -path ./proc -prune -o -print | sort | md5sum"),
    shell("sed -i s/deep/DEEP/ a/b/c/d/e/deep && cat a/b/c/d/e/deep"),
    shell("cp -a big big.copy && cmp big big.copy"),
    shell("mv only-low moved-low && ls -R moved-low"),
    shell("mv opq-dev opq-dev-moved && ls opq-dev-moved"),
    shell("rm -rf a && ls"),
    shell("mkdir -p a/b/c && echo new > a/b/c/file && ls -R a"),
    shell("rm -rf stdlib/json && cp -a stdlib/email stdlib/json && ls stdlib"),
    shell("ln -s ../names stdlib/names && ln stdlib/email/__init__.py email-init && ls -l email-init | cut -c1-11"),
    shell("chmod -R go-w stdlib && chown -R 12:34 stdlib/email && find stdlib -perm -g+w | wc -l"),
    shell("touch -d @1000000000 stdlib/email/*.py && find stdlib -newer big | wc -l"),
    shell("rm -rf names wdir oci-wdir opq-oci && ls"),
    shell("for i in 1 2 3; do mv comeback c$i && mv c$i comeback; done; cat comeback"),
    shell("python3 -c 'import os; os.rename(\"hard1\", \"a/hard1\")' && cat a/hard1"),
]


def test_shell_workload_matches_kernel(tmp_path):
    """Everyday tools (tar, sed -i, cp -a, mv across EXDEV, rm -rf) leave the same trees and upper dirs."""
    tar = str(tmp_path / "stdlib.tar")
    lib = os.path.dirname(os.__file__)
    subprocess.run(["tar", "-cf", tar, "--transform", "s,^,stdlib/,", "-C", lib, "json", "email"], check=True)
    with mounted_pair(tmp_path) as pair:
        ops = [shell(op.__name__.removeprefix("sh: ").format(tar=tar)) for op in WORKLOAD]
        assert "\n".join(pair.apply(ops)) == ""
        assert "\n".join(pair.tree_differences()) == ""
    assert "\n".join(pair.upper_differences()) == ""
    failed = {name: out for name, (_, (status, out)) in pair.results.items() if status != 0}
    assert failed == {}


USER = 4321
# security.capability v2: CAP_NET_BIND_SERVICE permitted and effective
CAPABILITY = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


def as_user(action: Op) -> Op:
    """Run ``action`` in a child process with an ordinary uid and gid."""
    def op(root: str) -> None:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.setgroups([])
                os.setgid(USER)
                os.setuid(USER)
                action(root)
                code = 0
            except OSError as e:
                code = 100 + e.errno
            finally:
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code >= 100:
            raise OSError(code - 100, os.strerror(code - 100))
        assert code == 0
    return named(f"as user: {action.__name__}", op)


PRIVILEGE_SEQUENCE: list[Op] = [
    fs("chmod", os.chmod, "", 0o777), stat_of(""),
    fs("chmod", os.chmod, "setuid", 0o4777), stat_of("setuid"),
    as_user(write_file("setuid", b"user", "ab")), stat_of("setuid"),
    fs("chmod", os.chmod, "setgid", 0o2777), stat_of("setgid"),
    as_user(fs("truncate", os.truncate, "setgid", 1)), stat_of("setgid"),
    fs("chmod", os.chmod, "hard1", 0o6777), as_user(fs("truncate", os.truncate, "hard1", 0)), stat_of("hard1"),
    fs("setxattr", os.setxattr, "xattr-file", "security.capability", CAPABILITY), xattrs_of("xattr-file"),
    write_file("xattr-file", b"root writes", "ab"), xattrs_of("xattr-file"),
    fs("setxattr", os.setxattr, "empty", "security.capability", CAPABILITY),
    fs("chown", os.chown, "empty", 0, 0), xattrs_of("empty"),
    fs("chmod", os.chmod, "fifo", 0o4755), fs("chown", os.chown, "fifo", 1, 1), stat_of("fifo"),
    fs("chmod", os.chmod, "big", 0o4755), fs("chown", os.chown, "big", 1, 1), stat_of("big"),
    as_user(write_file("user-file", b"mine")), stat_of("user-file"),
    as_user(fs("mkdir", os.mkdir, "sticky/user-dir")), stat_of("sticky/user-dir"),
    as_user(fs("unlink", os.unlink, "a/b/c/d/e/deep")),
    as_user(write_file("readonly", b"no", "ab")),
]


def test_privileges_match_kernel(tmp_path):
    """set-user-ID bits, capabilities and ownership as an ordinary user's writes leave them."""
    mounts_in = tempfile.mkdtemp(prefix="ovlfuse-priv.")
    os.chmod(mounts_in, 0o755)
    try:
        with mounted_pair(tmp_path, mounts_in, fuse_options=["allow_other"]) as pair:
            assert "\n".join(pair.apply(PRIVILEGE_SEQUENCE)) == ""
            assert "\n".join(pair.tree_differences()) == ""
        assert "\n".join(pair.upper_differences()) == ""
        assert pair.results["as user: write user-file wb at None"] == ("ok", None)
    finally:
        shutil.rmtree(mounts_in, ignore_errors=True)


def test_upper_dir_round_trips_through_the_kernel(tmp_path):
    """What ovlfuse wrote is the kernel's own format: remounts keep the view and inode numbers."""
    pair = store_pair(tmp_path)
    kmnt, omnt, started = pair.kmnt, pair.omnt, pair.started_ns
    with pair.mounted():
        pair.apply(SEQUENCE)
        served = snapshot(omnt)
    with mount("kernel", pair.kernel, kmnt):
        kernel_snap = snapshot(kmnt)
        expected = normalized(kernel_snap, started)
    with mount("ovlfuse", pair.kernel, omnt):
        assert snapshot(omnt).inos == kernel_snap.inos, "ovlfuse reads the kernel's origin records"
    with mount("ovlfuse", pair.ours, omnt):
        remounted = snapshot(omnt)
    assert remounted.inos == served.inos, "inode numbers changed across a remount"
    assert differences(expected, normalized(remounted, started)) == []
    with mount("kernel", pair.ours, kmnt):
        taken_over = snapshot(kmnt)
    assert differences(expected, normalized(taken_over, started)) == []
    assert taken_over.inos == served.inos, "the kernel reports other inode numbers for ovlfuse's upper dir"


# --- generated sequences --------------------------------------------------------

POOL = [
    "a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e", "a/b/c/d/e/deep", "a/shadow", "a/hard3", "a/b/new-in-middle",
    "hard1", "big", "empty", "setuid", "sticky", "readonly", "rel-link", "dangling", "fifo", "xattr-file",
    "opq-dev", "opq-dev/new", "opq-upper", "only-low", "only-low/inner", "only-low/inner/f", "only-upper",
    "only-upper/x", "only-upper/x/y", "container-new", "container-link", "xw", "xw/keep", "wdir", "comeback",
    "stray", "stray/plain", "dir-becomes-file", "file-becomes-dir", "file-becomes-dir/inside",
    "n1", "n2", "a/n3", "a/b/c/n4", "only-low/inner/n5", "wdir/n6", "xw/n7", "opq-upper/n8",
    "names", f"names/{LONG_NAME}", "names/日本語のファイル", "N" * 255, "a/" + "M" * 252,
]


def same_lower_hard_link(root: str, a: str, b: str) -> bool:
    """Two names of one object (upper hard links included: a rename between them is a no-op anyway)."""
    try:
        sa, sb = os.lstat(p(root, a)), os.lstat(p(root, b))
    except OSError:
        return False
    return a != b and sa.st_ino == sb.st_ino and not stat.S_ISDIR(sa.st_mode)


def _result(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)


def _fd_state(fd: int, started_ns: int) -> tuple:
    st = os.fstat(fd)
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_size,
            "now" if st.st_mtime_ns >= started_ns else st.st_mtime_ns)


# Calls through an open descriptor, each a function of the descriptor (and when the run started).
FD_CALLS: dict[str, Callable[[int, int], object]] = {
    "fstat": _fd_state,
    "pread": lambda fd, _: os.pread(fd, 64, 0),
    "pwrite": lambda fd, _: os.pwrite(fd, b"fd", 3),
    "ftruncate": lambda fd, _: os.ftruncate(fd, 5),
    "fchmod": lambda fd, _: os.fchmod(fd, 0o640),
    "fchown": lambda fd, _: os.fchown(fd, 7, 8),
    "fsetxattr": lambda fd, _: os.setxattr(fd, "user.fd", b"v"),
    "fgetxattr": lambda fd, _: os.getxattr(fd, "user.fd"),
    "futimens": lambda fd, _: os.utime(fd, ns=(3_000_000_000, 4_000_000_000)),
    "fsync": lambda fd, _: os.fsync(fd),
    "fchdir listing": lambda fd, _: sorted(os.listdir(fd)),
}


def _machine(whiteout_files: bool = False):
    """The machine; ``whiteout_files``: ovlfuse runs where 0:0 devices cannot be made (see no_device_whiteouts.py)."""
    from hypothesis import strategies as st
    from hypothesis import assume
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    # a .wh. marker needs 4 bytes of the name's 255: longer lower names cannot be whited out that way
    paths = st.sampled_from([p for p in POOL if not whiteout_files or len(os.path.basename(p)) <= 251])
    class WritePathMachine(RuleBasedStateMachine):
        """Random calls on both mounts; every result, the trees and finally the upper dirs must match."""

        def __init__(self) -> None:
            super().__init__()
            self.tmp = tempfile.mkdtemp(prefix="ovlfuse-hyp.")
            self.mounts = contextlib.ExitStack()
            try:  # teardown() runs only once __init__ has returned
                self.pair = store_pair(pathlib.Path(self.tmp))
                self.mounts.enter_context(self.pair.mounted(whiteout_files=whiteout_files))
            except BaseException:
                self.mounts.close()
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            self.steps = 0
            self.fds: list[tuple[int, int]] = []  # descriptors open on both mounts: (kernel's, ovlfuse's)

        def run(self, op: Op) -> None:
            self.steps += 1
            assert self.pair.apply([op]) == []

        # Descriptors stay open across the other calls, which unlink, replace, rename and copy up
        # their names: every call through them must act on the opened object as the kernel's does.
        @rule(path=paths, flags=st.sampled_from([os.O_RDONLY, os.O_RDWR, os.O_PATH]))
        def open_fd(self, path, flags):
            assume(len(self.fds) < 6)
            # never a device (a write through it would reach the host's device) nor a blocking fifo open
            kind = _result(lambda: stat.S_IFMT(os.lstat(p(self.pair.kmnt, path)).st_mode))
            assume(kind not in (stat.S_IFCHR, stat.S_IFBLK))
            opened = [_result(lambda: os.open(p(root, path), flags | os.O_NOFOLLOW | os.O_NONBLOCK))
                      for root in (self.pair.kmnt, self.pair.omnt)]
            both_int = all(isinstance(fd, int) and not isinstance(fd, bool) for fd in opened)
            for fd in opened:
                if isinstance(fd, int) and not both_int:
                    os.close(fd)
            assert [fd if not isinstance(fd, int) else "fd" for fd in opened] == ["fd", "fd"] or \
                opened[0] == opened[1], f"open {path}: kernel {opened[0]!r} ovlfuse {opened[1]!r}"
            if both_int:
                self.fds.append((opened[0], opened[1]))

        @rule(which=st.integers(0, 5), call=st.sampled_from(sorted(FD_CALLS)))
        def fd_call(self, which, call):
            assume(self.fds)
            kfd, ofd = self.fds[which % len(self.fds)]
            self.steps += 1
            results = [_result(lambda: FD_CALLS[call](fd, self.pair.started_ns)) for fd in (kfd, ofd)]
            assert results[0] == results[1], f"{call}: kernel {results[0]!r} ovlfuse {results[1]!r}"

        @rule(which=st.integers(0, 5))
        def close_fd(self, which):
            assume(self.fds)
            for fd in self.fds.pop(which % len(self.fds)):
                os.close(fd)

        @rule(path=paths, data=st.binary(max_size=64), how=st.sampled_from(["wb", "ab", "r+b"]),
              at=st.integers(0, 5000))
        def write(self, path, data, how, at):
            self.run(write_file(path, data, how, at if how == "r+b" else None))

        @rule(path=paths, length=st.integers(0, 3000))
        def truncate(self, path, length):
            self.run(fs("truncate", os.truncate, path, length))

        @rule(path=paths, mode=st.sampled_from([0o644, 0o4755, 0o2750, 0o1777, 0o600, 0o000]))
        def chmod(self, path, mode):
            self.run(fs("chmod", os.chmod, path, mode))

        @rule(path=paths, uid=st.sampled_from([0, 7, 1234]), gid=st.sampled_from([-1, 0, 8]))
        def chown(self, path, uid, gid):
            self.run(fs("lchown", os.chown, path, uid, gid, follow_symlinks=False))

        @rule(path=paths, t=st.integers(0, 2**33))
        def utime(self, path, t):
            self.run(fs("utime", os.utime, path, ns=(t, t), follow_symlinks=False))

        @rule(path=paths, name=st.sampled_from(["user.a", "user.b", "trusted.t", "trusted.overlay.x"]),
              value=st.binary(max_size=8))
        def setxattr(self, path, name, value):
            self.run(fs("setxattr", os.setxattr, path, name, value, follow_symlinks=False))

        @rule(path=paths, name=st.sampled_from(["user.a", "user.color", "user.dir", "trusted.overlay.x"]))
        def removexattr(self, path, name):
            self.run(fs("removexattr", os.removexattr, path, name, follow_symlinks=False))

        @rule(path=paths)
        def unlink(self, path):
            self.run(fs("unlink", os.unlink, path))

        @rule(path=paths)
        def rmdir(self, path):
            self.run(fs("rmdir", os.rmdir, path))

        @rule(path=paths)
        def mkdir(self, path):
            self.run(fs("mkdir", os.mkdir, path))

        @rule(src=paths, dst=paths)
        def rename(self, src, dst):
            # Known difference: ovlfuse gives the names of a lower hard link one inode (the number
            # the kernel reports too), so the VFS turns a rename between them into a no-op.
            assume(not same_lower_hard_link(self.pair.kmnt, src, dst))
            self.run(fs("rename", os.rename, (src, dst)))

        @rule(src=paths, dst=paths, flags=st.sampled_from([RENAME_EXCHANGE, RENAME_NOREPLACE]))
        def rename_flags(self, src, dst, flags):
            assume(not same_lower_hard_link(self.pair.kmnt, src, dst))
            self.run(rename2(src, dst, flags))

        @rule(src=paths, dst=paths)
        def link(self, src, dst):
            self.run(fs("link", os.link, (src, dst), follow_symlinks=False))

        # An absolute target that cannot exist: calls through a link to a real host directory (chmod,
        # write, mkdir of names below it) would change the host, on the kernel's mount as on ovlfuse's.
        @rule(path=paths, dest=st.sampled_from(["x", "../a", "/nonexistent-ovlfuse-target/etc"]))
        def symlink(self, path, dest):
            self.run(named(f"symlink {path} -> {dest}", lambda root: os.symlink(dest, p(root, path))))

        @rule(path=paths)
        def mkfifo(self, path):
            self.run(fs("mkfifo", os.mkfifo, path))

        @rule(path=paths)
        def look(self, path):
            self.run(stat_of(path))
            self.run(xattrs_of(path))

        @rule(path=paths)
        def read_or_list(self, path):
            if os.path.isdir(p(self.pair.kmnt, path)):
                self.run(listing(path))
            elif os.path.isfile(p(self.pair.kmnt, path)):
                self.run(read(path))

        @invariant()
        def trees_match(self):
            if self.steps % 8 == 7:
                assert self.pair.tree_differences() == []

        def teardown(self):
            try:
                for pair in self.fds:
                    for fd in pair:
                        os.close(fd)
                if self.steps:
                    assert self.pair.tree_differences() == []
                self.mounts.close()
                if not whiteout_files:
                    assert self.pair.upper_differences() == []
                elif self.steps:  # the kernel does not read .wh. files: a plain remount must show its tree
                    with self.pair.mounted():
                        assert self.pair.tree_differences() == []
            finally:
                self.mounts.close()
                shutil.rmtree(self.tmp, ignore_errors=True)

    return WritePathMachine


@pytest.mark.parametrize("whiteouts", ["devices", "files"])
def test_generated_sequences_match_kernel(whiteouts):
    """Devices: the normal case, 75 x 40 calls.  Files: the .wh. fallback, a smaller run of 20 x 40."""
    from hypothesis import HealthCheck, settings

    machine = _machine(whiteout_files=whiteouts == "files")
    examples = int(os.environ.get("OVLFUSE_HYPOTHESIS_EXAMPLES", "75"))
    if whiteouts == "files":
        examples = max(1, examples * 4 // 15)
    machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=40, deadline=None, database=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()


def test_concurrent_writers_match_kernel(tmp_path):
    """Four writers at once (parents copied up under them concurrently) and a reader walking meanwhile."""
    tar = str(tmp_path / "stdlib.tar")
    lib = os.path.dirname(os.__file__)
    subprocess.run(["tar", "-cf", tar, "-C", lib, "json", "email", "xml"], check=True)
    workers = [
        f"mkdir w0 && tar -xf {tar} -C w0 && mv w0/email w0/e && chmod 600 names/* && echo 0 >> a/b/c/from-image-top",
        f"mkdir w1 && tar -xf {tar} -C w1 && rm -rf w1/json && chmod 700 a/b/c/d/e/deep a/b/new-in-middle",
        f"mkdir w2 && tar -xf {tar} -C w2 && echo x >> only-low/inner/f && rm -rf opq-dev && touch a/b/c/d/new",
        f"mkdir w3 && tar -xf {tar} -C w3 && sed -i s/p/P/ stray/plain && mv big big2 && ln a/hard3 a/b/c/hl",
    ]
    script = " & ".join(f"( {w} )" for w in workers) + " & (for i in 1 2 3 4 5; do find . >/dev/null; done) & wait"
    with mounted_pair(tmp_path) as pair:
        assert pair.apply([shell(script)]) == []
        assert pair.results[f"sh: {script}"] == ("ok", (0, ""))
        assert "\n".join(pair.tree_differences()) == ""
    assert "\n".join(pair.upper_differences()) == ""
