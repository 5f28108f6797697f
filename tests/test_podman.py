"""podman with ovlfuse as containers/storage's ``mount_program``, against podman's kernel overlay driver.

Each side is a rootful podman with its own private ``--root``, ``--runroot``
and ``--tmpdir`` in a temporary directory; one mounts through
``overlay.mount_program=.venv/bin/ovlfuse``, the other with the kernel's
overlay.  Containers and builds that create, modify, delete and replace
files and directories must leave the same trees on both.  Everything podman
made (containers, images, mounts, ovlfuse daemons) is removed by each side's
own root, even when a test fails.
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mounts import is_mounted

OVLFUSE = os.path.join(os.path.dirname(sys.executable), "ovlfuse")
BUSYBOX = shutil.which("busybox")


def _missing() -> str | None:
    for tool in ("podman", "runc", "conmon"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/libexec/podman/{tool}"):
            return f"{tool} is not installed (apt-get install podman runc)"
    if BUSYBOX is None:
        return "busybox is not installed (apt-get install busybox-static), the base image is built from it"
    if subprocess.run(["ldd", BUSYBOX], capture_output=True).returncode == 0:
        return f"{BUSYBOX} is dynamically linked; the base image needs busybox-static"
    if not os.access(OVLFUSE, os.X_OK):
        return f"no ovlfuse executable next to {sys.executable} (install the package into the venv)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _ulimits() -> list[str]:
    """Limits runc can set without CAP_SYS_RESOURCE: podman's defaults (1048576) cannot be raised to here."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[0])
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


class Podman:
    """One private podman: its own storage, run and tmp directories, cleaned up by them alone."""

    def __init__(self, base: Path, mount_program: str | None, *storage_opts: str) -> None:
        self.base = base
        self.root, self.runroot, self.tmp = (str(base / n) for n in ("root", "run", "tmp"))
        os.makedirs(self.tmp)
        self.options = ["--root", self.root, "--runroot", self.runroot, "--tmpdir", os.path.join(self.tmp, "libpod"),
                        "--runtime", "runc", "--cgroup-manager=cgroupfs", "--events-backend=file",
                        "--storage-driver", "overlay"]
        if mount_program:
            self.options += ["--storage-opt", f"overlay.mount_program={mount_program}"]
        for opt in storage_opts:
            self.options += ["--storage-opt", opt]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *self.options, *args], capture_output=True, timeout=timeout,
                                env=dict(os.environ, TMPDIR=self.tmp))
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def cleanup(self) -> None:
        self("rm", "-af", "-t", "0", check=False)
        self("rmi", "-af", check=False)
        for mountpoint in sorted(self._mounts(), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        self._end_daemons()
        shutil.rmtree(self.base, ignore_errors=True)

    def _mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return [p for p in points if p.startswith(str(self.base) + "/")]

    def _end_daemons(self) -> None:
        """ovlfuse daemons still serving a mount of this root, found by the root in their command line."""
        mine = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if b"ovlfuse" in cmdline and os.fsencode(self.root) in cmdline:
                mine.append(int(pid))
        for pid in mine:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in mine:
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)


def _rootfs_tar(path: Path) -> Path:
    """A small base image: static busybox with its applet links, and files to change."""
    rootfs = path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
    files = {"etc/greeting": "hello\n", "etc/secret": "s\n", "data/keep": "keep\n", "data/sub/f": "f\n", "data/sub/deeper/x": "x\n",
             "data/moved-from": "moving\n", "data/owned": "owned\n", "data/other/inside": "i\n",
             "opt/tree/a": "a\n", "opt/tree/b/c": "c\n"}
    for name, text in files.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_text(text)
    (rootfs / "tmp").mkdir()
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "etc" / "secret", 0o600)
    os.chown(rootfs / "data" / "owned", 7, 8)
    os.chmod(rootfs / "opt" / "tree", 0o2750)
    tar = path / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(rootfs, arcname=".")
    return tar


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("podman")


@pytest.fixture(scope="module")
def pair(base):
    """(ovlfuse podman, kernel podman), each with the same base image imported.

    No ``mountopt``: a root mount of ovlfuse serves every user by itself (as
    fuse-overlayfs's does), as containers that run as another user need.
    """
    yield from _sides(base, [Podman(base / "ovlfuse", OVLFUSE), Podman(base / "kernel", None)])


def _sides(base: Path, sides: list[Podman]):
    tar = base / "rootfs.tar" if (base / "rootfs.tar").exists() else _rootfs_tar(base)
    try:
        for side in sides:
            side("import", str(tar), "localhost/base:latest")
        yield sides
    finally:
        for side in sides:
            side.cleanup()
        assert not any(is_mounted(p) for side in sides for p in side._mounts())


def _tree(tar_bytes: bytes) -> dict[str, tuple]:
    """A container export, path by path: type, mode, owner, size, link target, content hash (no times)."""
    tree = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        for m in t:
            digest = hashlib.sha256(t.extractfile(m).read()).hexdigest() if m.isfile() else None
            tree[m.name.lstrip("./") or "."] = (m.type, m.mode, m.uid, m.gid, m.size, m.linkname, digest)
    return tree


def _differences(a: dict, b: dict) -> list[str]:
    out = [f"only with ovlfuse: {p}" for p in sorted(a.keys() - b.keys())]
    out += [f"only with the kernel: {p}" for p in sorted(b.keys() - a.keys())]
    out += [f"differs: {p}: {a[p]} != {b[p]}" for p in sorted(a.keys() & b.keys()) if a[p] != b[p]]
    return out


CHANGES = """
set -e
cat /etc/greeting
echo new > /new
echo appended >> /etc/greeting
rm /data/keep
rm -r /data/sub && mkdir /data/sub && echo g > /data/sub/g
rm -r /data/other && echo now-a-file > /data/other
mv /data/moved-from /data/moved-to
chown 1:2 /data/owned && chmod 640 /data/owned
mkdir -p /opt/deep/er && ln -s ../new /opt/link && chmod 700 /opt/deep
rm /opt/tree/b/c && rmdir /opt/tree/b
ls -a /data /data/sub /opt
grep ' / ' /proc/mounts | cut -d' ' -f3
"""


def test_a_container_changes_files_as_on_the_kernel_driver(pair):
    outputs, diffs, trees = [], [], []
    for side in pair:
        run = side("run", "--name", "changer", "--network=none", *_ulimits(), "localhost/base", "sh", "-c", CHANGES)
        *lines, fstype = run.stdout.decode().splitlines()
        outputs.append(lines)
        diffs.append(sorted(side("diff", "changer").stdout.decode().splitlines()))
        trees.append(_tree(side("export", "changer").stdout))
        side("rm", "changer")
        assert fstype == ("fuse.ovlfuse" if side is pair[0] else "overlay")
    assert outputs[0] == outputs[1]
    # With a mount program containers/storage diffs the two mounted trees; the
    # kernel driver reads the upper dir, where a replaced directory is one
    # opaque "D /data/sub".  Everything outside the replaced directory is listed alike.
    replaced = [line for line in diffs[0] if line.split()[1].startswith("/data/sub")]
    assert replaced == ["A /data/sub/g", "C /data/sub", "D /data/sub/deeper", "D /data/sub/f"]
    assert [line for line in diffs[0] if line not in replaced] == \
        [line for line in diffs[1] if not line.split()[1].startswith("/data/sub")]
    assert "D /data/keep" in diffs[0] and "A /new" in diffs[0] and "C /etc/greeting" in diffs[0]
    assert _differences(trees[0], trees[1]) == []
    assert "data/sub/f" not in trees[0] and "data/sub/g" in trees[0] and trees[0]["data/other"][0] == tarfile.REGTYPE


def test_a_container_of_another_user_gets_what_the_kernel_driver_gives(pair):
    script = "{ id; cat /etc/greeting; cat /etc/secret; echo mine > /tmp/mine; stat -c '%u %g %a %s' /tmp/mine; " \
             "echo no > /data/keep; rm /data/keep; ls /data; } 2>&1"
    outputs = [side("run", "--rm", "--network=none", "--user", "1000:1000", *_ulimits(), "localhost/base",
                    "sh", "-c", script).stdout.decode() for side in pair]
    assert outputs[0] == outputs[1]
    assert "uid=1000" in outputs[0] and "hello" in outputs[0] and "Permission denied" in outputs[0]


CONTAINERFILE = """\
FROM localhost/base
RUN rm /data/keep && rm -r /data/sub && mkdir /data/sub && echo g > /data/sub/g && echo changed > /etc/greeting
RUN rm -r /data/other && echo now-a-file > /data/other && mkdir -p /opt/x && echo 1 > /opt/x/one && rm /bin/vi
RUN rm -r /opt/x /opt/tree && mkdir /opt/x /opt/tree && echo 2 > /opt/x/two && rm /data/sub/g && touch /data/sub/h
"""


def test_a_build_that_deletes_and_replaces_gives_the_kernel_drivers_image(pair, tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    (context / "Containerfile").write_text(CONTAINERFILE)
    trees = []
    for side in pair:
        side("build", "--network=none", "--pull=never", *_ulimits(), "-t", "localhost/built", str(context))
        side("create", "--name", "built", "localhost/built", "true")
        trees.append(_tree(side("export", "built").stdout))
        side("rm", "built")
    assert _differences(trees[0], trees[1]) == []
    tree = trees[0]
    assert [p for p in tree if p.startswith("data/sub/")] == ["data/sub/h"]
    assert [p for p in tree if p.startswith("opt/x/")] == ["opt/x/two"]
    assert not any(p.startswith("opt/tree/") for p in tree) and "bin/vi" not in tree and "data/keep" not in tree


def test_force_mask_keeps_the_images_owners_and_modes_in_records(pair, base):
    """``overlay.force_mask``: layers are stored with mode 0755 and the image's owner and mode in
    ``user.containers.override_stat``; containers/storage mounts them with ``xattr_permissions=2``."""
    kernel = pair[1]
    for masked in _sides(base, [Podman(base / "masked", OVLFUSE, "overlay.force_mask=shared")]):
        trees = []
        for side in (masked[0], kernel):
            side("run", "--name", "changer", "--network=none", *_ulimits(), "localhost/base", "sh", "-c", CHANGES)
            trees.append(_tree(side("export", "changer").stdout))
            side("rm", "changer")
        # containers/storage (podman 4.3) writes its records without the setuid, setgid and sticky bits.
        plain = [{p: (r[0], r[1] & 0o777, *r[2:]) for p, r in tree.items()} for tree in trees]
        assert _differences(plain[0], plain[1]) == []
        shown = {p: (trees[0][p][1] & 0o7777, *trees[0][p][2:4]) for p in ("etc/secret", "data/owned")}
        assert shown == {"etc/secret": (0o600, 0, 0), "data/owned": (0o640, 1, 2)}
        stored = [p for p in Path(masked[0].root, "overlay").glob("*/diff/etc/secret")]
        assert stored and all(stat.S_IMODE(p.stat().st_mode) == 0o755 for p in stored)  # the mask, for real
        assert os.getxattr(stored[0], "user.containers.override_stat").startswith(b"0:0:")
