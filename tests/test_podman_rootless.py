"""An ordinary user's rootless podman with ovlfuse as ``mount_program``, against fuse-overlayfs and the kernel.

The test user gets ``/etc/subuid`` and ``/etc/subgid`` ranges for the
module, and runs three rootless podmans, each with its own ``--root``,
``--runroot`` and ``--tmpdir`` in the user's home: one mounts through an
ovlfuse launcher the user can run, one through fuse-overlayfs, and one with
the kernel's overlay (``userxattr``, in podman's user namespace), where an
ordinary user may mount it.  Containers that change files, one that runs as
another user of the namespace, and builds with RUN steps must leave the
kernel driver's trees, and fuse-overlayfs's but for the two points where it
differs from the kernel (named where they are checked).  Each podman's
containers, images, daemons and pause process are ended by their PIDs, the
ranges removed, and no process of the user is left, even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_podman import CHANGES, CONTAINERFILE, _differences, _missing, _rootfs_tar, _tree, _ulimits
from users import OrdinaryUser, ordinary_user

FUSE_OVERLAYFS = shutil.which("fuse-overlayfs")


def _missing_rootless() -> str | None:
    for tool in ("newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install uidmap); rootless podman needs it"
    if FUSE_OVERLAYFS is None:
        return "fuse-overlayfs is not installed (apt-get install fuse-overlayfs), the reference mount program"
    return _missing()


pytestmark = pytest.mark.skipif(_missing_rootless() is not None, reason=_missing_rootless() or "")

RANGE = 65536


def _add_range(user: str, path: str) -> str:
    """Give ``user`` a range above every range in ``path``; returns the line added."""
    with open(path) as f:
        lines = f.read().splitlines()
    end = 100000
    for line in lines:
        fields = line.split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            end = max(end, int(fields[1]) + int(fields[2]))
    entry = f"{user}:{end}:{RANGE}"
    with open(path, "a") as f:
        f.write(entry + "\n")
    return entry


def _remove_line(path: str, entry: str) -> None:
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    with open(path, "w") as f:
        f.writelines(line for line in lines if line.rstrip("\n") != entry)


class UserPodman:
    """One rootless podman of the user: its own storage, run, tmp and runtime directories."""

    def __init__(self, user: OrdinaryUser, base: Path, mount_program: str | None) -> None:
        self.user, self.base = user, base
        self.root, self.runroot, self.tmp, self.xdg = (str(base / n) for n in ("root", "run", "tmp", "xdg"))
        for d in (self.tmp, self.xdg):
            os.makedirs(d, mode=0o700)
        user.own(str(base))
        self.options = ["--root", self.root, "--runroot", self.runroot, "--tmpdir", os.path.join(self.tmp, "libpod"),
                        "--runtime", "runc", "--cgroup-manager=cgroupfs", "--events-backend=file",
                        "--storage-driver", "overlay"]
        if mount_program:
            self.options += ["--storage-opt", f"overlay.mount_program={mount_program}"]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {"HOME": self.user.home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": self.tmp,
               "XDG_RUNTIME_DIR": self.xdg}
        result = subprocess.run(["setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--init-groups",
                                 "env", "-i", *(f"{k}={v}" for k, v in env.items()), "podman", *self.options, *args],
                                capture_output=True, timeout=timeout, cwd=self.user.home)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def cleanup(self) -> list[str]:
        """Containers and images by podman; then its daemons and its pause process (holding the
        user namespace and the mounts made in it) by their PIDs.  Returns the mounts podman left."""
        self("rm", "-af", "-t", "0", check=False)
        self("rmi", "-af", check=False)
        left = self.mounts()
        mine = [pid for pid in _user_pids(self.user) if os.fsencode(str(self.base) + "/") in _cmdline(pid)]
        pause = self.pause_pid()
        _end(self.user, mine + ([pause] if pause else []))
        return left

    def export(self, container: str) -> bytes:
        """``podman export`` to a file of the user's (podman opens /dev/stdout, root's pipe, again)."""
        out = os.path.join(self.tmp, "export.tar")
        self("export", "-o", out, container)
        try:
            return Path(out).read_bytes()
        finally:
            os.unlink(out)

    def pause_pid(self) -> int | None:
        """The process holding podman's user namespace (and its mounts) between commands."""
        try:
            return int(Path(self.tmp, "libpod", "pause.pid").read_text())
        except (OSError, ValueError):
            return None

    def mounts(self) -> list[str]:
        """Mounts under this podman's directories, as its pause process sees them."""
        try:
            with open(f"/proc/{self.pause_pid()}/mountinfo") as f:
                points = [line.split()[4] for line in f]
        except OSError:
            return []
        return [p for p in points if p.startswith(str(self.base) + "/")]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _user_pids(user: OrdinaryUser) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid == user.uid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _end(user: OrdinaryUser, pids: list[int]) -> None:
    """SIGTERM, then SIGKILL after 10 s, to each of ``pids`` that is still the user's."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if pid in _user_pids(user):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while any(pid in _user_pids(user) and not _zombie(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _launcher(user: OrdinaryUser) -> str:
    """An executable ovlfuse for containers/storage: the user's python with the user's copy of ovlfuse."""
    path = os.path.join(user.home, "ovlfuse-launcher")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nPYTHONPATH={user.pythonpath} exec {user.python} -m ovlfuse "$@"\n')
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def sides() -> Iterator[dict[str, UserPodman]]:
    """{"ovlfuse", "fuse-overlayfs"[, "kernel"]}: the user's podmans, each with the base image imported."""
    with ordinary_user() as user:
        added = []
        sides: dict[str, UserPodman] = {}
        try:
            for path in ("/etc/subuid", "/etc/subgid"):
                added.append((path, _add_range(user.name, path)))
            home = Path(user.home)
            tar = _rootfs_tar(home)
            user.own(str(tar))
            sides["ovlfuse"] = UserPodman(user, home / "ovlfuse", _launcher(user))
            sides["fuse-overlayfs"] = UserPodman(user, home / "fuse-overlayfs", FUSE_OVERLAYFS)
            for side in sides.values():
                side("import", str(tar), "localhost/base:latest")
            kernel = UserPodman(user, home / "kernel", None)
            sides["kernel"] = kernel
            if kernel("import", str(tar), "localhost/base:latest", check=False).returncode != 0:
                kernel.cleanup()
                del sides["kernel"]  # an ordinary user may not mount the kernel's overlay here
            yield sides
        finally:
            mounts_left = [p for side in sides.values() for p in side.cleanup()]
            for path, entry in added:
                _remove_line(path, entry)
            left = [f"{pid}: {_cmdline(pid)!r}" for pid in _user_pids(user) if not _zombie(pid)]
            _end(user, _user_pids(user))
            assert left == [] and mounts_left == []


def _run(side: UserPodman, *args: str) -> subprocess.CompletedProcess:
    return side("run", "--network=none", *_ulimits(), *args)


def _outside(lines: list[str], directory: str) -> list[str]:
    return [line for line in lines if not line.split()[1].startswith(directory)]


def test_a_rootless_container_changes_files_as_with_fuse_overlayfs_and_the_kernel(sides):
    outputs, diffs, trees = {}, {}, {}
    for name, side in sides.items():
        run = _run(side, "--name", "changer", "localhost/base", "sh", "-c", CHANGES)
        *outputs[name], fstype = run.stdout.decode().splitlines()
        diffs[name] = sorted(side("diff", "changer").stdout.decode().splitlines())
        trees[name] = _tree(side.export("changer"))
        side("rm", "changer")
        assert fstype == {"ovlfuse": "fuse.ovlfuse", "fuse-overlayfs": "fuse.fuse-overlayfs"}.get(name, "overlay")
    if "fuse-overlayfs" in trees:
        # fuse-overlayfs (1.10) drops the set-group-ID bit of /opt/tree when it copies it up; the kernel keeps it.
        kind, mode, *rest = trees["fuse-overlayfs"]["opt/tree"]
        trees["fuse-overlayfs"]["opt/tree"] = (kind, mode | 0o2000, *rest)
    for other in sides.keys() - {"ovlfuse"}:
        assert outputs["ovlfuse"] == outputs[other], other
        assert _differences(trees["ovlfuse"], trees[other]) == [], other
        # The replaced directory is listed three ways: ovlfuse's as rootful (two mounted trees diffed),
        # fuse-overlayfs's without "D /data/sub/deeper", the kernel driver's as one opaque "D /data/sub".
        assert _outside(diffs["ovlfuse"], "/data/sub") == _outside(diffs[other], "/data/sub"), other
    assert [line for line in diffs["ovlfuse"] if line.split()[1].startswith("/data/sub")] == \
        ["A /data/sub/g", "C /data/sub", "D /data/sub/deeper", "D /data/sub/f"]
    assert {"D /data/keep", "A /new", "C /etc/greeting", "D /opt/tree/b"} <= set(diffs["ovlfuse"])
    tree = trees["ovlfuse"]
    assert "data/sub/f" not in tree and "data/sub/g" in tree and tree["data/other"][0] == tarfile.REGTYPE
    assert (tree["data/owned"][1] & 0o7777, *tree["data/owned"][2:4]) == (0o640, 1, 2)  # as the namespace shows them
    assert tree["opt/tree"][1] & 0o7777 == 0o2750


def test_a_rootless_container_of_another_user_gets_what_fuse_overlayfs_gives(sides):
    """Another user of the namespace reaches the mount: as the namespace's root, ovlfuse sets allow_other."""
    script = "{ id; cat /etc/greeting; cat /etc/secret; echo mine > /tmp/mine; stat -c '%u %g %a %s' /tmp/mine; " \
             "echo no > /data/keep; rm /data/keep; ls -n /data; } 2>&1"
    outputs = {name: _run(side, "--rm", "--user", "1000:1000", "localhost/base", "sh", "-c", script).stdout.decode()
               for name, side in sides.items()}
    assert outputs["ovlfuse"] == outputs["fuse-overlayfs"] == outputs.get("kernel", outputs["ovlfuse"])
    assert all(s in outputs["ovlfuse"] for s in ("uid=1000", "hello", "Permission denied"))


def test_a_rootless_build_gives_the_kernels_image(sides):
    context = Path(sides["ovlfuse"].user.home) / "context"
    context.mkdir()
    (context / "Containerfile").write_text(CONTAINERFILE)
    sides["ovlfuse"].user.own(str(context))
    trees = {}
    for name, side in sides.items():
        side("build", "--network=none", "--pull=never", *_ulimits(), "-t", "localhost/built", str(context))
        side("create", "--name", "built", "localhost/built", "true")
        trees[name] = _tree(side.export("built"))
        side("rm", "built")
    if "kernel" in trees:
        assert _differences(trees["ovlfuse"], trees["kernel"]) == []
    # fuse-overlayfs (1.10) marks a replaced directory opaque with user.fuseoverlayfs.opaque, which
    # containers/storage does not turn into the layer's .wh..wh..opq: its image shows data/sub/deeper
    # again.  ovlfuse writes user.overlay.opaque, as the kernel with userxattr does.
    outside = [{p: r for p, r in tree.items() if not p.startswith("data/sub/")} for tree in trees.values()]
    assert all(_differences(outside[0], other) == [] for other in outside[1:])
    tree = trees["ovlfuse"]
    assert [p for p in tree if p.startswith("data/sub/")] == ["data/sub/h"]
    assert [p for p in tree if p.startswith("opt/x/")] == ["opt/x/two"]
    assert not any(p.startswith("opt/tree/") for p in tree) and "bin/vi" not in tree and "data/keep" not in tree


def test_a_saved_and_loaded_image_shows_the_tree_it_was_built_with(sides):
    """``podman load`` with a mount program keeps a layer's OCI whiteouts as ``.wh.NAME`` files, which ovlfuse reads."""
    side = sides["ovlfuse"]
    context = Path(side.user.home) / "reloaded"
    context.mkdir()
    (context / "Containerfile").write_text(CONTAINERFILE)
    side.user.own(str(context))
    archive = os.path.join(side.tmp, "image.tar")
    trees = []
    for step in ("built", "loaded"):
        if step == "built":
            side("build", "--network=none", "--pull=never", *_ulimits(), "-t", "localhost/reloaded", str(context))
        else:
            side("save", "-o", archive, "localhost/reloaded")
            side("rmi", "-af")
            side("load", "-i", archive)
        side("create", "--name", "reloaded", "localhost/reloaded", "true")
        trees.append(_tree(side.export("reloaded")))
        side("rm", "reloaded")
    markers = [p for p in Path(side.root, "overlay").glob("*/diff/**/.wh.*")]
    # The layers' own diffs (two mounted trees compared) name each removed file: .wh.keep, .wh.f, ...
    assert {p.name for p in markers} >= {".wh.keep", ".wh.vi", ".wh.f", ".wh.deeper"}
    assert _differences(trees[1], trees[0]) == []
    assert [p for p in trees[1] if p.startswith("data/sub/")] == ["data/sub/h"]
