"""A live mount one can see into: its log, the ``-d`` request log, and ``ovlfuse status``."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time

import pytest

from mounts import OVLFUSE, decoy_cwd, ovlfuse_mount, run_ovlfuse
from ovlfuse.sys import daemons

STATUS = "user.ovlfuse.status"


@pytest.fixture
def layers(tmp_path):
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "d").mkdir()
    (dirs["lower"] / "d" / "f").write_text("lower f\n")
    (dirs["lower"] / "small").write_text("small\n")
    return dirs


def _opts(layers) -> str:
    return f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"


def _log_lines(path) -> list[str]:
    """Log lines without their time stamps."""
    with open(path) as f:
        return [line.rstrip("\n").split(" ", 2)[2] for line in f if line.strip()]


def test_the_log_records_mount_unmount_and_errors_without_debug(layers, tmp_path):
    log = tmp_path / "ovlfuse.log"
    mnt = layers["mnt"]
    assert run_ovlfuse("-o", _opts(layers), "--log-file", str(log), "--pid-file", str(tmp_path / "pid"),
                       str(mnt)).returncode == 0
    pid = int((tmp_path / "pid").read_text())
    try:
        assert (mnt / "d" / "f").read_text() == "lower f\n"
        assert not (mnt / "missing").exists()  # ordinary errors are not worth a line
        # A layer changed under the mount: d is now a symlink, which a layer must never hold on the way.
        os.rename(layers["lower"] / "d", layers["lower"] / "d.real")
        os.symlink("d.real", layers["lower"] / "d")
        with pytest.raises(OSError) as failed:
            open(mnt / "d" / "f").read()
        assert failed.value.errno == errno.ELOOP
    finally:
        daemons.unmount(str(mnt))
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = _log_lines(log)
    assert lines[0].startswith(f"ovlfuse INFO mounted ovlfuse on {mnt}: 1 lower layers, upper {layers['upper']}, "
                               "read-write; options allow_other,default_permissions,"), lines
    assert "ovlfuse WARNING open /d/f flags 0o100000 [uid 0 gid 0 pid " in "\n".join(lines)
    warning = next(line for line in lines if "WARNING" in line)
    assert warning.endswith("] -> ELOOP"), warning
    assert not any("ENOENT" in line for line in lines)
    assert re.fullmatch(rf"ovlfuse INFO unmounted {mnt}: \d+ requests served \(\d+ answered with an error\), "
                        r"0 copy-ups \(0 bytes\)", lines[-1]), lines[-1]


def test_debug_logs_each_request_with_its_path_and_reply(layers, tmp_path):
    mnt = layers["mnt"]
    for flag in (["-d"], ["-o", "debug"]):
        name = f"small{len(flag)}"
        (layers["lower"] / name).write_text("small\n")
        log = tmp_path / f"debug{len(flag)}.log"
        with ovlfuse_mount([*flag, "-o", _opts(layers), "--log-file", str(log), str(mnt)], str(mnt)):
            assert (mnt / "d" / "f").read_text() == "lower f\n"
            assert not (mnt / "d" / "nope").exists()
            with pytest.raises(OSError):
                os.getxattr(mnt / name, "user.none")
            with open(mnt / name, "a") as f:
                f.write("more\n")
        lines = "\n".join(_log_lines(log))
        me = f"[uid 0 gid 0 pid {os.getpid()}]"
        for expected in (f"lookup /d {me} -> ino ", f"lookup /d/f {me} -> ino ",
                         f"lookup /d/nope {me} -> no such name (negative entry)",
                         f"getxattr /{name} user.none {me} -> ENODATA",
                         "read /d/f (fh ", f"copy-up of /{name}: 6 bytes in ",
                         f"write /{name} (fh "):
            assert expected in lines, (expected, lines)
        assert re.search(r"open /d/f flags 0o100000 \[uid 0 gid 0 pid \d+\] -> fh \d+", lines)
        assert re.search(r"-> ino \d+ -rw-r--r-- 0:0 8 bytes", lines)


def _status(mnt) -> dict:
    return json.loads(os.getxattr(mnt, STATUS))


def test_status_shows_layers_options_requests_caches_and_memory(layers, tmp_path):
    mnt = layers["mnt"]
    with ovlfuse_mount(["-o", _opts(layers) + ",noatime,relatime", str(mnt)], str(mnt)) as daemon:
        for _ in range(3):
            assert (mnt / "d" / "f").read_text() == "lower f\n"
        (mnt / "small").write_text("changed\n")
        result = run_ovlfuse("status", "--json", str(mnt))
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["schema"] == "ovlfuse-status/1" and status["pid"] == daemon.pid
        assert status["mountpoint"] == str(mnt) and status["upper"] == str(layers["upper"])
        assert status["lowers"] == [str(layers["lower"])] and status["lower_count"] == 1
        assert "noatime" in status["fuse_options"] and "allow_other" in status["fuse_options"]
        assert status["ignored_options"] == ["relatime: the layers' own filesystems keep the access times, "
                                             "as their mounts say"]
        assert status["requests"]["lookup"] >= 2 and status["requests"]["open"] >= 1
        assert "getxattr" not in status["requests"] or status["requests"]["getxattr"] < 5  # asks are not counted
        assert status["copy_ups"]["done"] == 1 and status["copy_ups"]["bytes"] == 0  # O_TRUNC: nothing to copy
        assert status["copy_ups"]["in_progress"] == []
        assert status["caches"]["nodes"] >= 3 and status["caches"]["index_dirs"] >= 1
        assert status["memory"]["rss_bytes"] > 1 << 20 and status["memory"]["threads"] >= 1
        text = run_ovlfuse("status", str(mnt))
        assert text.returncode == 0
        lines = text.stdout.splitlines()
        assert lines[0].startswith(f"{mnt}: ovlfuse ") and f"pid {daemon.pid}" in lines[0]
        for label in ("source", "upper", "lowers", "options", "requests", "errors", "copy-ups", "caches", "memory"):
            assert any(line.strip().startswith(label) for line in lines), (label, lines)
        assert "copy-ups     1 done, 0 B in" in text.stdout
        # the name is the mount root's alone: never listed, not settable
        assert STATUS not in os.listxattr(mnt)
        with pytest.raises(PermissionError):
            os.setxattr(mnt, STATUS, b"x")
        with pytest.raises(OSError) as other:
            os.getxattr(mnt / "small", STATUS)
        assert other.value.errno == errno.ENODATA
        # the status is for root and the mount's owner
        denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *OVLFUSE,
                                 "status", str(mnt)], capture_output=True, text=True, cwd="/")
        assert denied.returncode == 1
        assert denied.stderr.strip() == f"ovlfuse: the mount on {mnt} answers only its owner (uid 0) and root; " \
                                        "run status as one of them"


def test_status_refuses_what_is_not_a_live_ovlfuse_mount(layers, tmp_path):
    mnt = layers["mnt"]
    result = run_ovlfuse("status", str(mnt))
    assert result.returncode == 1 and result.stderr.strip() == f"ovlfuse: {mnt} is not a mount point"
    with ovlfuse_mount(["-o", _opts(layers), str(mnt)], str(mnt)) as daemon:
        daemon.kill()
        daemon.wait()
        dead = run_ovlfuse("status", str(mnt))
        assert dead.returncode == 1
        assert dead.stderr.strip() == f"ovlfuse: {mnt} is a dead mount (its daemon is gone); clear it with " \
                                      f"'fusermount3 -u {mnt}'"


def test_a_big_copy_up_shows_in_progress_and_is_logged(layers, tmp_path):
    """A 512 MiB copy-up: ``status`` shows its bytes as it goes; the log has its path, bytes and time."""
    size = 512 << 20
    chunk = os.urandom(1 << 20)
    with open(layers["lower"] / "big", "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    mnt = layers["mnt"]
    log = tmp_path / "ovlfuse.log"
    with ovlfuse_mount(["-o", _opts(layers), "--log-file", str(log), str(mnt)], str(mnt)):
        writer = subprocess.Popen([sys.executable, "-c", f"open({str(mnt / 'big')!r}, 'ab').write(b'z')"])
        seen = []
        while writer.poll() is None:
            seen += _status(mnt)["copy_ups"]["in_progress"]
            time.sleep(0.002)
        assert writer.wait() == 0
        assert seen, "the copy-up was not caught running"
        assert all(item["path"] == "/big" and item["total"] == size for item in seen), seen[:3]
        assert any(0 < item["done"] < size for item in seen), "no bytes reported while copying"
        done = _status(mnt)["copy_ups"]
        assert done["done"] == 1 and done["bytes"] == size and done["in_progress"] == []
    copied = [line for line in _log_lines(log) if "copy-up of /big" in line]
    assert len(copied) == 1 and re.fullmatch(rf"ovlfuse INFO copy-up of /big: {size} bytes in \d+\.\d\d s",
                                              copied[0]), copied


def test_sigusr1_writes_the_status_to_the_log(layers, tmp_path):
    mnt = layers["mnt"]
    log = tmp_path / "ovlfuse.log"
    with ovlfuse_mount(["-o", _opts(layers), "--log-file", str(log), str(mnt)], str(mnt)) as daemon:
        os.listdir(mnt)
        os.kill(daemon.pid, 10)  # SIGUSR1
        deadline = time.monotonic() + 10
        while not any("status: " in line for line in _log_lines(log)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert daemon.poll() is None
    line = next(line for line in _log_lines(log) if "status: " in line)
    assert json.loads(line.partition("status: ")[2])["requests"]["opendir"] >= 1


def test_the_status_command_runs_from_a_directory_holding_an_ovlfuse_folder(layers):
    mnt = layers["mnt"]
    with ovlfuse_mount(["-o", _opts(layers), str(mnt)], str(mnt)):
        result = subprocess.run([*OVLFUSE, "status", str(mnt)], capture_output=True, text=True, cwd=decoy_cwd())
        assert result.returncode == 0, result.stderr
