"""The command line: every addressing form, daemon life cycle, and bad input."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from mounts import is_mounted, kernel_mount, ovlfuse_mount, run_ovlfuse
from ovlfuse.sys import mountinfo
from ovlfuse.tools.demo import StoreWriter
from stores import fingerprint, rich_store
from treesnap import differences, snapshot


@pytest.fixture
def store(tmp_path):
    return rich_store(str(tmp_path / "overlay2"))


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    return str(path)


def _wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class Daemon:
    """A daemonized ovlfuse, known by the PID it wrote; ended by that PID if a test fails."""

    def __init__(self, tmp_path, args: list[str], mountpoint: str) -> None:
        self.pid_file = str(tmp_path / "ovlfuse.pid")
        self.mountpoint = mountpoint
        self.result = run_ovlfuse("--pid-file", self.pid_file, *args)
        self.pid = int(open(self.pid_file).read()) if self.result.returncode == 0 else None

    def reap(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        if self.pid is not None and not _wait_gone(self.pid, 5):
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def daemon(tmp_path):
    started: list[Daemon] = []

    def start(args: list[str], mountpoint: str) -> Daemon:
        d = Daemon(tmp_path, args, mountpoint)
        started.append(d)
        return d

    yield start
    for d in started:
        d.reap()


# --- addressing forms ----------------------------------------------------------

def test_full_id_prefix_and_path_give_the_same_view(store, mnt, tmp_path):
    views = []
    for layer_arg in (store.top.id, store.top.id[:12], store.top.dir):
        with ovlfuse_mount(["--root", store.root, layer_arg, mnt], mnt):
            views.append(snapshot(mnt))
    assert differences(views[0], views[1]) == []
    assert differences(views[0], views[2]) == []
    assert (b"container-new" in views[0].records) and (b"a/file2" not in views[0].records)


def test_root_from_environment(store, mnt):
    env = dict(os.environ, OVLFUSE_ROOT=store.root)
    proc = subprocess.Popen([sys.executable, "-m", "ovlfuse", "-f", store.top.id[:16], mnt], env=env)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert is_mounted(mnt)
        assert open(os.path.join(mnt, "container-new")).read() == "c\n"
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        proc.wait(timeout=20)


def test_explicit_options_match_the_store_form(store, mnt, tmp_path):
    lowers = [os.path.join(store.root, "l", link) for link in store.top.chain]
    with ovlfuse_mount(["--root", store.root, store.top.id, mnt], mnt):
        by_id = snapshot(mnt)
    opts = f"lowerdir={':'.join(lowers)},upperdir={store.top.diff},workdir={store.top.dir}/work"
    with ovlfuse_mount(["-o", opts, mnt], mnt):
        by_options = snapshot(mnt)
    with ovlfuse_mount(["mysource", mnt, "-o", "rw," + opts + ",dev,suid,noatime"], mnt):
        by_source = snapshot(mnt)
        assert any(line.split()[1] == mnt and line.split()[0] == "mysource"
                   for line in open("/proc/self/mounts"))
    assert differences(by_id, by_options) == []
    assert differences(by_id, by_source) == []


def test_escaped_colon_in_lowerdir(tmp_path, mnt):
    odd = tmp_path / "with:colon"
    other = tmp_path / "plain"
    for d, name in ((odd, "a"), (other, "b")):
        d.mkdir()
        (d / name).write_text(name)
    opts = f"lowerdir={str(odd).replace(':', chr(92) + ':')}:{other}"
    with ovlfuse_mount(["-o", opts, mnt], mnt):
        assert sorted(os.listdir(mnt)) == ["a", "b"]


def test_committed_and_read_only_layers_refuse_writes(store, mnt):
    for args in (["--root", store.root, store.image_top.id, mnt],
                 ["--root", store.root, "--read-only", store.top.id, mnt]):
        with ovlfuse_mount(args, mnt):
            for attempt in (lambda: open(os.path.join(mnt, "new"), "w"),
                            lambda: os.mkdir(os.path.join(mnt, "newdir")),
                            lambda: open(os.path.join(mnt, "a", "shadow"), "a"),
                            lambda: os.unlink(os.path.join(mnt, "empty"))):
                with pytest.raises(OSError) as exc:
                    attempt()
                assert exc.value.errno == errno.EROFS


def test_read_only_view_includes_the_layers_own_diff(store, mnt):
    with ovlfuse_mount(["--root", store.root, "--read-only", store.top.id, mnt], mnt):
        ro = snapshot(mnt)
    with ovlfuse_mount(["--root", store.root, store.top.id, mnt], mnt):
        rw = snapshot(mnt)
    assert differences(rw, ro) == []


def test_init_layer_by_id(store, tmp_path, mnt):
    sw = StoreWriter(store.root)
    init = sw.layer(store.image_top, layer_id=store.top.id + "-init")
    (tmp_path / "overlay2" / init.id / "diff" / ".dockerenv").write_text("")
    with ovlfuse_mount(["--root", store.root, store.top.id[:12] + "-init", mnt], mnt):
        assert os.path.exists(os.path.join(mnt, ".dockerenv"))
        assert not os.path.exists(os.path.join(mnt, "container-new"))
    with ovlfuse_mount(["--root", store.root, store.top.id[:12], mnt], mnt):
        assert os.path.exists(os.path.join(mnt, "container-new"))


# --- daemon life cycle -----------------------------------------------------------

@pytest.mark.parametrize("how", ["fusermount3", "umount", "SIGTERM", "SIGINT"])
def test_daemon_is_live_on_return_and_ends_cleanly(store, mnt, tmp_path, daemon, how):
    d = daemon(["--root", store.root, store.top.id, mnt], mnt)
    assert d.result.returncode == 0, d.result.stderr
    assert is_mounted(mnt)
    assert open(os.path.join(mnt, "a", "shadow")).read() == "container shadow\n"
    if how == "fusermount3":
        subprocess.run(["fusermount3", "-u", mnt], check=True)
    elif how == "umount":
        subprocess.run(["umount", mnt], check=True)
    else:
        os.kill(d.pid, getattr(signal, how))
    assert _wait_gone(d.pid), "the daemon did not exit"
    assert not is_mounted(mnt)
    assert not os.path.exists(d.pid_file)


def test_mount_helper_form(store, mnt, tmp_path):
    """mount(8) runs 'ovlfuse SOURCE MNT -o OPTS' through mount.fuse3 and returns once it is live.

    ``-t fuse.ovlfuse`` finds ovlfuse on mount's own PATH; ``-t fuse PROG#SOURCE``
    is the same call with the program named by path, which needs no install.
    """
    program = os.path.join(os.path.dirname(sys.executable), "ovlfuse")
    if not os.path.exists(program):
        pytest.fail(f"the ovlfuse console script is not installed next to {sys.executable}")
    lowers = ":".join(os.path.join(store.root, "l", link) for link in store.top.chain)
    subprocess.run(["mount", "-t", "fuse", f"{program}#demo-src", mnt, "-o",
                    f"lowerdir={lowers},upperdir={store.top.diff},workdir={store.top.dir}/work"],
                   check=True, capture_output=True, timeout=60)
    try:
        assert open(os.path.join(mnt, "container-new")).read() == "c\n"
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(int(p), mnt)]
        assert pids
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
    for pid in pids:
        if not _wait_gone(pid, 10):
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"daemon {pid} did not exit after umount")


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read().split(b"\0")
    except OSError:
        return False


# --- bad input -------------------------------------------------------------------

def _fails_cleanly(args: list[str], store_root: str | None, mountpoint: str, *words: str) -> str:
    before = fingerprint(store_root) if store_root else None
    was_mounted = is_mounted(mountpoint)
    mnt_before = sorted(os.listdir(mountpoint)) if os.path.isdir(mountpoint) else None
    result = run_ovlfuse(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(("ovlfuse: ", "usage:")) or "error:" in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    if store_root:
        assert fingerprint(store_root) == before
    if mnt_before is not None:
        assert sorted(os.listdir(mountpoint)) == mnt_before
        assert is_mounted(mountpoint) == was_mounted
    return lines[0]


def test_missing_store_root(tmp_path, mnt):
    _fails_cleanly(["--root", str(tmp_path / "nope"), "a" * 64, mnt], None, mnt, "store root", "does not exist")


def test_unknown_layer(store, mnt):
    _fails_cleanly(["--root", store.root, "0123456789ab", mnt], store.root, mnt, "no layer", "0123456789ab")


def test_short_prefix(store, mnt):
    _fails_cleanly(["--root", store.root, store.top.id[:5], mnt], store.root, mnt, "too short")
    _fails_cleanly(["--root", store.root, store.top.id[:7] + "-init", mnt], store.root, mnt, "too short")


def test_ambiguous_prefix(store, tmp_path, mnt):
    sw = StoreWriter(store.root)
    sw.layer(layer_id=store.top.id[:20] + "0" * 44)
    _fails_cleanly(["--root", store.root, store.top.id[:14], mnt], store.root, mnt, "ambiguous")


def test_lower_names_missing_link(store, mnt):
    os.unlink(os.path.join(store.root, "l", store.top.chain[1]))
    _fails_cleanly(["--root", store.root, store.top.id, mnt], store.root, mnt, "does not exist",
                   store.top.chain[1])


def test_dangling_link(store, mnt):
    link = os.path.join(store.root, "l", store.top.chain[0])
    os.unlink(link)
    os.symlink("../" + "f" * 64 + "/diff", link)
    _fails_cleanly(["--root", store.root, store.top.id, mnt], store.root, mnt, "dangles")


def test_link_outside_store(store, tmp_path, mnt):
    outside = tmp_path / "outside" / "diff"
    outside.mkdir(parents=True)
    link = os.path.join(store.root, "l", store.top.chain[0])
    os.unlink(link)
    os.symlink(str(outside), link)
    _fails_cleanly(["--root", store.root, store.top.id, mnt], store.root, mnt, "outside the store root")


def test_lower_entry_with_dotdot(store, mnt):
    with open(os.path.join(store.top.dir, "lower"), "w") as f:
        f.write("l/../../etc")
    _fails_cleanly(["--root", store.root, store.top.id, mnt], store.root, mnt, "not of the form")


def test_chain_repeating_a_layer(store, mnt):
    with open(os.path.join(store.top.dir, "lower"), "w") as f:
        f.write(f"l/{store.top.chain[0]}:l/{store.top.chain[0]}")
    _fails_cleanly(["--root", store.root, store.top.id, mnt], store.root, mnt, "twice")


def test_diff_that_is_a_symlink(store, tmp_path, mnt):
    diff = store.top.diff
    os.rename(diff, diff + ".real")
    os.symlink(diff + ".real", diff)
    _fails_cleanly(["--root", store.root, store.top.id, mnt], store.root, mnt, "symlink")


def test_mountpoint_missing(store, tmp_path):
    missing = str(tmp_path / "no-such-dir")
    _fails_cleanly(["--root", store.root, store.top.id, missing], store.root, missing, "does not exist")
    assert not os.path.exists(missing)


def test_mountpoint_not_a_directory(store, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    _fails_cleanly(["--root", store.root, store.top.id, str(path)], store.root, str(path), "not a directory")
    assert path.read_text() == "x"


def test_mountpoint_already_mounted(store, tmp_path, mnt):
    lower_a, lower_b = tmp_path / "ka", tmp_path / "kb"
    lower_a.mkdir()
    lower_b.mkdir()
    with kernel_mount([str(lower_a), str(lower_b)], mnt):
        _fails_cleanly(["--root", store.root, store.top.id, mnt], store.root, mnt, "already a mount point")


@pytest.mark.parametrize("option", ["bogus", "index=on", "metacopy=on", "redirect_dir=on", "lowerdir=a::b",
                                    "uuid=on", "uuid=auto", "max_threads=many", "subtype="])
def test_unknown_or_unsupported_options(store, mnt, option):
    lowers = os.path.join(store.root, "l", store.top.chain[0])
    opts = option if option.startswith("lowerdir") else f"lowerdir={lowers},{option}"
    _fails_cleanly(["-o", opts, mnt], store.root, mnt, option.split("=")[0] if option != "bogus" else "bogus")


def test_missing_lowerdir_and_workdir(store, tmp_path, mnt):
    _fails_cleanly(["-o", f"lowerdir={tmp_path}/absent", mnt], None, mnt, "lowerdir", "does not exist")
    _fails_cleanly(["-o", f"lowerdir={store.layers[1].diff},upperdir={store.top.diff}", mnt],
                   store.root, mnt, "workdir")


def test_usage_errors_are_one_line(mnt):
    result = run_ovlfuse(mnt)
    assert result.returncode == 2
    assert "give LAYER MOUNTPOINT" in result.stderr


# --- libfuse's and fuse-overlayfs's conventions ----------------------------------------

@pytest.mark.parametrize("option, ignored", [
    ("relatime", True), ("norelatime", True), ("strictatime", True), ("nostrictatime", True),
    ("diratime", True), ("nodiratime", True), ("lazytime", True), ("nolazytime", True),
    ("max_threads=4", True), ("max_idle_threads=2", True), ("clone_fd", True),
    ("uuid=off", False), ("uuid=null", False), ("atime", False), ("noatime", False),
    ("allow_root", False), ("auto_unmount", False), ("noallow_other", False), ("default_permissions", False),
])
def test_conventions_mount_and_say_what_they_ignore(store, mnt, tmp_path, option, ignored):
    log = tmp_path / "ovlfuse.log"
    with ovlfuse_mount(["-o", option, "--log-file", str(log), "--root", store.root, store.top.id, mnt], mnt):
        assert open(os.path.join(mnt, "container-new")).read() == "c\n"
    said = [line for line in log.read_text().splitlines() if " INFO option " in line]
    if ignored:
        assert len(said) == 1 and said[0].split(" INFO option ")[1].startswith(option + ": "), said
    else:
        assert said == []


def test_single_threaded_flag_and_debug_option(store, mnt, tmp_path):
    log = tmp_path / "ovlfuse.log"
    with ovlfuse_mount(["-s", "-o", "debug", "--log-file", str(log), "--root", store.root, store.top.id, mnt], mnt):
        os.listdir(mnt)
    text = log.read_text()
    assert "option -s: ovlfuse always serves on one loop" in text
    assert "ovlfuse.trace DEBUG opendir / [uid 0" in text


def test_fsname_and_subtype_show_in_the_mount_table(store, mnt):
    with ovlfuse_mount(["-o", "fsname=mylayers,subtype=layerfs", "--root", store.root, store.top.id, mnt], mnt):
        entry = mountinfo.find(mnt)
        assert (entry.fstype, entry.source) == ("fuse.layerfs", "mylayers")
    with ovlfuse_mount(["--root", store.root, store.top.id, mnt], mnt):
        entry = mountinfo.find(mnt)
        assert (entry.fstype, entry.source) == ("fuse.ovlfuse", store.top.id)


def test_root_mounts_serve_every_user_and_run_set_user_id_programs(store, mnt):
    """As the kernel's overlay (and fuse-overlayfs as root): allow_other, and suid unless nosuid."""
    with ovlfuse_mount(["--root", store.root, store.top.id, mnt], mnt):
        entry = mountinfo.find(mnt)
        assert "allow_other" in entry.options and "nosuid" not in entry.options
    with ovlfuse_mount(["-o", "nosuid,noallow_other", "--root", store.root, store.top.id, mnt], mnt):
        entry = mountinfo.find(mnt)
        assert "allow_other" not in entry.options and "nosuid" in entry.options


def test_auto_unmount_takes_a_killed_daemons_mount_away(store, mnt, daemon):
    d = daemon(["-o", "auto_unmount", "--root", store.root, store.top.id, mnt], mnt)
    assert d.result.returncode == 0, d.result.stderr
    assert open(os.path.join(mnt, "container-new")).read() == "c\n"
    os.kill(d.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_mounted(mnt):
        assert time.monotonic() < deadline, "the killed daemon's mount stayed"
        time.sleep(0.02)
    assert os.listdir(mnt) == []
    again = daemon(["--root", store.root, store.top.id, mnt], mnt)  # and the mount point is free again
    assert again.result.returncode == 0, again.result.stderr


def test_a_dead_mount_is_named_with_its_cure(store, mnt, daemon):
    d = daemon(["--root", store.root, store.top.id, mnt], mnt)
    assert d.result.returncode == 0
    os.kill(d.pid, signal.SIGKILL)
    assert _wait_gone(d.pid)
    assert is_mounted(mnt)
    result = run_ovlfuse("--root", store.root, store.top.id, mnt)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"ovlfuse: {mnt} is a dead FUSE mount (its daemon is gone); clear it with "
                                     f"'fusermount3 -u {mnt}' (or 'umount -l {mnt}' as root), then mount again")
    subprocess.run(["fusermount3", "-u", mnt], check=True)  # the cure, as told
    again = daemon(["--root", store.root, store.top.id, mnt], mnt)
    assert again.result.returncode == 0, again.result.stderr


def test_pid_files_go_on_every_exit_path(store, mnt, tmp_path):
    pid_file = tmp_path / "ovlfuse.pid"
    pid_file.write_text("999999\n")  # a killed daemon's stale file is replaced
    with ovlfuse_mount(["--pid-file", str(pid_file), "--root", store.root, store.top.id, mnt], mnt) as d:
        assert pid_file.read_text() == f"{d.pid}\n"
    assert not pid_file.exists()  # unmounted from outside
    with ovlfuse_mount(["--pid-file", str(pid_file), "--root", store.root, store.top.id, mnt], mnt) as d:
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait(timeout=20) == 0
    assert not pid_file.exists()  # a signal
    pid_file.write_text("stale\n")
    failed = run_ovlfuse("--pid-file", str(pid_file), "-o", "lowerdir=/nonexistent", mnt)
    assert failed.returncode == 1
    assert pid_file.read_text() == "stale\n"  # a failed mount writes none, and takes no one else's


def test_a_mount_fusermount3_refuses_says_why_without_wrong_hints(store, tmp_path):
    """An ordinary user who may not write the mount point: fusermount3's own reason, and no /dev/fuse hint."""
    from users import ordinary_user

    with ordinary_user() as user:
        lower = os.path.join(user.home, "lower")
        os.mkdir(lower)
        user.own(lower)
        root_owned = os.path.join(user.home, "rootmnt")
        os.mkdir(root_owned, 0o755)
        result = user.run("-o", f"lowerdir={lower}", root_owned)
        assert result.returncode == 1
        line = result.stderr.strip()
        assert "\n" not in line and "no write access to mountpoint" in line, line
        assert "/dev/fuse" not in line and "is installed" not in line, line
        assert not is_mounted(root_owned)
