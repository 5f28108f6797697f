"""Real Docker stores: a private dockerd builds images and runs containers, and ovlfuse mounts them by name.

One dockerd (Debian's 20.10, overlay2 driver) with its own containerd serves
the whole module from a private directory: an image imported offline from a
busybox rootfs, an image built from it whose RUN steps delete files, swap
files and directories, make opaque dirs, hard links, symlinks, a fifo and a
device, and a container whose command changes the tree again, committed to
a third image.  Each view ovlfuse gives by name is compared with the kernel's
view of the same layers: dockerd's own mount of a running container, and a
kernel mount of the chain ``docker inspect`` reports for an image.  Changes
ovlfuse writes into a stopped container's layer are what ``docker diff``
reports and what dockerd mounts at the container's next start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mounts import is_mounted, ovlfuse_mount, run_ovlfuse
from overlaypair import Layers, mount
from ovlfuse.sys.mountinfo import mount_points
from stores import fingerprint, write
from treesnap import Snapshot, differences, snapshot

DOCKERD, CONTAINERD, DOCKER, BUSYBOX = "/usr/sbin/dockerd", "/usr/bin/containerd", "/usr/bin/docker", "/usr/bin/busybox"
START_TIMEOUT = 60
# Made at fixed places by dockerd (plugin sockets) and containerd's shims; removed again if the test made them.
RUNTIME_DIRS = ("/run/docker/plugins", "/run/docker", "/run/containerd/s", "/run/containerd")

DOCKERFILE = """\
FROM base:v1
RUN mkdir -p /data/keep /data/gone/deep /data/opq/sub /data/dir2file \\
 && echo a > /data/keep/a && echo g > /data/gone/deep/g && echo o > /data/opq/old && echo x > /data/opq/sub/x \\
 && echo f > /data/file2dir && echo d > /data/dir2file/inner && echo hl > /data/hl \\
 && ln -s ../keep/a /data/link && chown 1000:1000 /data/keep/a && chmod 1777 /data/keep \\
 && mkfifo /data/fifo && mknod /data/null c 1 3
RUN rm -rf /data/gone /data/dir2file && echo file > /data/dir2file \\
 && rm /data/file2dir && mkdir /data/file2dir && echo in > /data/file2dir/in \\
 && rm -rf /data/opq && mkdir /data/opq && echo new > /data/opq/new \\
 && ln /data/hl /data/hl2 && ln -s /nowhere /data/dangling && chmod 600 /etc/x/attr && rm /bin/touch
"""

# The container's first run changes its layer and leaves /ran; later runs only sleep, so a
# started container is one that dockerd keeps mounted.
CHANGES = ("if [ -e /ran ]; then exec sleep 1000000; fi; "
           "echo w > /data/keep/new && rm /data/keep/a && echo more >> /data/hl && ln /data/hl2 /data/hl3 "
           "&& rm -rf /data/file2dir && mkdir /data/file2dir && echo c > /data/file2dir/c "
           "&& rm -rf /data/dir2file && mkdir /data/dir2file && rm /data/link && echo was-link > /data/link "
           "&& mv /data/opq/new /data/moved && chown -R 7:7 /data/opq && chmod 700 /etc/x "
           "&& ln -s moved /data/to-moved && rm /bin/ln && touch /ran")


@dataclass
class Docker:
    """Debian's docker client, talking to the module's private dockerd."""

    data_root: str
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()

    def graph(self, kind: str, name: str, field: str) -> str:
        """A GraphDriver path dockerd reports for a container or an image."""
        return self(kind, "inspect", "-f", "{{.GraphDriver.Data.%s}}" % field, name)

    def chain(self, kind: str, name: str) -> list[str]:
        """A container's or image's layer diff dirs, topmost first, as dockerd reports them."""
        lower = self.graph(kind, name, "LowerDir")
        return [self.graph(kind, name, "UpperDir")] + (lower.split(":") if lower and lower != "<no value>" else [])


def _wait_for(what: str, ready, procs: list[subprocess.Popen], logs: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        ended = [p for p in procs if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            tails = "\n".join(open(log, errors="replace").read()[-3000:] for log in logs)
            why = f"exited with {ended[0].returncode}" if ended else f"not ready after {START_TIMEOUT}s"
            raise RuntimeError(f"{what} {why}:\n{tails}")
        time.sleep(0.1)


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, then SIGKILL if it does not end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _end_left_containers(state: str) -> None:
    """Containers left running, by the PIDs in containerd's private state dir, and their shims (the parents)."""
    for dirpath, _, files in os.walk(state):
        if "init.pid" not in files:
            continue
        try:
            pid = int(open(os.path.join(dirpath, "init.pid")).read())
            shim = int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1])
        except (ValueError, OSError):
            continue
        for victim in (pid, shim) if shim > 1 else (pid,):
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass
        try:  # a killed shim leaves its socket under /run/containerd/s
            os.unlink(open(os.path.join(dirpath, "address")).read().strip().removeprefix("unix://"))
        except OSError:
            pass


def _unmount_under(path: str) -> list[str]:
    """Unmount everything at or below ``path``, deepest first; returns what stayed mounted."""
    def under() -> list[str]:
        return sorted((p for p in mount_points() if p == path or p.startswith(path + "/")), key=len, reverse=True)
    for point in under():
        for cmd in (["umount", point], ["umount", "-l", point]):
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                break
    return under()


def _rootfs_tar(tmp: str) -> str:
    """A busybox rootfs with xattrs, owners, a setuid file and hard links, as a tarball."""
    rootfs = os.path.join(tmp, "rootfs")
    os.makedirs(f"{rootfs}/bin")
    shutil.copy2(BUSYBOX, f"{rootfs}/bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", f"{rootfs}/bin/{applet}")
    write(f"{rootfs}/etc/x/attr", "xa\n")
    os.setxattr(f"{rootfs}/etc/x/attr", "user.color", b"blue")
    os.setxattr(f"{rootfs}/etc/x", "user.dir", b"d")
    write(f"{rootfs}/etc/untouched", "u\n")  # copy-ups below lose user.* xattrs: Docker's layer tars keep
    os.setxattr(f"{rootfs}/etc/untouched", "user.color", b"green")  # only security.capability
    os.setxattr(f"{rootfs}/bin/busybox", "security.capability", bytes.fromhex("0100000200200000" + "00" * 12))
    write(f"{rootfs}/etc/hard-a", "h\n")  # not busybox: unpacking a hard link chowns it, which drops capabilities
    os.link(f"{rootfs}/etc/hard-a", f"{rootfs}/etc/hard-b")
    write(f"{rootfs}/etc/owned", "o\n", 0o4750)
    os.chown(f"{rootfs}/etc/owned", 1234, 5678)
    for d in ("proc", "sys", "dev", "tmp"):
        os.makedirs(f"{rootfs}/{d}")
    tar = os.path.join(tmp, "rootfs.tar")
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", rootfs, "-cf", tar, "."], check=True)
    return tar


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    for tool in (DOCKERD, CONTAINERD, DOCKER, BUSYBOX, shutil.which("runc")):
        if not tool or not os.access(tool, os.X_OK):
            pytest.skip(f"{tool or 'runc'} is missing: install docker.io and busybox-static (./dev test does)")
    tmp = tempfile.mkdtemp(prefix="ovlfuse-docker.")  # short: socket paths must fit in 108 bytes
    data_root, state = os.path.join(tmp, "data"), os.path.join(tmp, "containerd", "state")
    ctr_sock = os.path.join(tmp, "containerd", "containerd.sock")
    config = os.path.join(tmp, "containerd.toml")
    with open(config, "w") as f:
        f.write(f'version = 2\nroot = "{tmp}/containerd/root"\nstate = "{state}"\n'
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{ctr_sock}"\n'
                f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{tmp}/containerd/opt"\n')
    daemon_json = os.path.join(tmp, "daemon.json")
    write(daemon_json, json.dumps({"deprecated-key-path": f"{tmp}/key.json"}))  # nothing read or written in /etc/docker
    env = {"PATH": os.environ["PATH"], "HOME": tmp, "DOCKER_HOST": f"unix://{tmp}/docker.sock",
           "DOCKER_CONFIG": os.path.join(tmp, "client"), "DOCKER_BUILDKIT": "0"}
    logs = [os.path.join(tmp, "containerd.log"), os.path.join(tmp, "dockerd.log")]
    procs: list[subprocess.Popen] = []
    made = [d for d in RUNTIME_DIRS if not os.path.exists(d)]
    client = Docker(data_root, env)
    try:
        with open(logs[0], "w") as log:
            procs.append(subprocess.Popen([CONTAINERD, "--config", config], stdout=log, stderr=log,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        _wait_for("containerd", lambda: os.path.exists(ctr_sock), procs, logs[:1])
        with open(logs[1], "w") as log:
            procs.append(subprocess.Popen(
                [DOCKERD, "--storage-driver=overlay2", "--iptables=false", "--ip-masq=false", "--bridge=none",
                 "--userland-proxy=false", f"--data-root={data_root}", f"--exec-root={tmp}/exec",
                 f"--pidfile={tmp}/docker.pid", f"--containerd={ctr_sock}", "-H", env["DOCKER_HOST"],
                 f"--config-file={daemon_json}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True))

        def answers() -> bool:
            return subprocess.run([DOCKER, "version"], capture_output=True, env=env).returncode == 0
        _wait_for("dockerd", answers, procs, logs)
        client("import", _rootfs_tar(tmp), "base:v1")
        write(f"{tmp}/context/Dockerfile", DOCKERFILE)
        client("build", "--network=none", "-q", "-t", "built:v1", f"{tmp}/context")
        client("run", "--name", "changer", "--network=none", "built:v1", "sh", "-c", CHANGES)
        client("commit", "changer", "committed:v1")
        client("tag", "committed:v1", "registry.example:5000/team/app:v2")
        client("tag", "built:v1", "plain")  # :latest
        yield client
    finally:
        if len(procs) == 2 and procs[1].poll() is None:
            containers = subprocess.run([DOCKER, "ps", "-aq"], capture_output=True, text=True, env=env,
                                        timeout=60).stdout.split()
            if containers:
                subprocess.run([DOCKER, "rm", "-f", *containers], capture_output=True, env=env, timeout=120)
        for proc in reversed(procs):
            _end(proc)
        _end_left_containers(state)
        for path in made:
            try:
                os.rmdir(path)
            except OSError:
                pass  # not made here, or in use by another engine by now
        left = _unmount_under(tmp)
        if left:
            raise RuntimeError(f"still mounted after dockerd ended, {tmp} kept: {left}")
        shutil.rmtree(tmp)


def _ovlfuse_view(docker: Docker, name: str, mnt: str, *extra: str) -> Snapshot:
    with ovlfuse_mount(["--docker-root", docker.data_root, *extra, name, mnt], mnt):
        return snapshot(mnt)


def _kernel_image_view(docker: Docker, image: str, mnt: str) -> Snapshot:
    with mount("kernel", Layers.dirs(docker.chain("image", image)), mnt, ["ro"]):
        return snapshot(mnt)


@pytest.fixture
def mnt(tmp_path) -> str:
    path = str(tmp_path / "mnt")
    os.mkdir(path)
    return path


def _wait_unmounted(path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while is_mounted(path):
        assert time.monotonic() < deadline, f"dockerd did not unmount {path}"
        time.sleep(0.05)


def test_container_by_name_equals_dockerds_own_mount(docker, mnt):
    upper = docker.graph("container", "changer", "UpperDir")
    merged = docker.graph("container", "changer", "MergedDir")
    changed = fingerprint(upper)
    docker("start", "changer")
    try:
        assert is_mounted(merged)
        expected = snapshot(merged)
        assert {b"data/moved", b"data/file2dir/c", b"data/hl3"} <= expected.records.keys()
        assert not {b"data/keep/a", b"data/file2dir/in", b"data/opq/new", b"bin/ln"} & expected.records.keys()
        assert dict(expected.records[b"etc/untouched"].xattrs) == {"user.color": b"green"}
        assert "security.capability" in dict(expected.records[b"bin/busybox"].xattrs)
        # read-only while dockerd's kernel mount of the same layer is live; writable is refused
        assert differences(expected, _ovlfuse_view(docker, "changer", mnt, "--read-only")) == []
        try:
            refused = run_ovlfuse("--docker-root", docker.data_root, "changer", mnt)
        finally:
            if is_mounted(mnt):  # only where the refusal failed; the daemon ends with its mount
                subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and f"{merged} is mounted" in refused.stderr, refused.stderr
    finally:
        docker("kill", "changer", check=False)  # the error that matters is the one above
        docker("wait", "changer", check=False)
    _wait_unmounted(merged)
    container_id = docker("container", "inspect", "-f", "{{.Id}}", "changer")
    for name in ("changer", container_id, container_id[:12]):
        assert differences(expected, _ovlfuse_view(docker, name, mnt)) == [], name
    assert fingerprint(upper) == changed
    # the store holds what the test is about: the kernel's opaque dir and whiteouts, made by dockerd
    assert os.getxattr(f"{upper}/data/file2dir", "trusted.overlay.opaque") == b"y"
    assert os.stat(f"{upper}/data/keep/a", follow_symlinks=False).st_rdev == 0


OVLFUSE_CHANGES = """set -e
rm data/keep/a
rm -rf data/opq && mkdir data/opq && echo fresh > data/opq/fresh
rm data/dir2file && mkdir data/dir2file && echo inner > data/dir2file/inner
rm -rf data/file2dir
echo more >> data/hl
mv data/dangling data/renamed-link
chmod 700 data/keep
echo new > data/new-file
"""


def test_dockerd_runs_a_container_on_what_ovlfuse_wrote(docker, mnt):
    """ovlfuse changes a stopped container's layer; dockerd's diff and its own mount at the next start agree."""
    docker("create", "--name", "edited", "--network=none", "built:v1", "sleep", "1000000")
    try:
        with ovlfuse_mount(["--docker-root", docker.data_root, "edited", mnt], mnt):
            subprocess.run(["sh", "-c", OVLFUSE_CHANGES], cwd=mnt, check=True)
            os.setxattr(f"{mnt}/data/new-file", "user.note", b"by ovlfuse")
            ours = snapshot(mnt)
        # Docker reads the whiteouts and the opaque dir ("D /data/opq/new") in the upper dir ovlfuse wrote
        assert set(docker("diff", "edited").splitlines()) == {
            "C /data", "C /data/keep", "D /data/keep/a", "C /data/opq", "D /data/opq/new", "A /data/opq/fresh",
            "C /data/dir2file", "A /data/dir2file/inner", "D /data/file2dir", "C /data/hl", "D /data/dangling",
            "A /data/renamed-link", "A /data/new-file"}
        docker("start", "edited")
        merged = docker.graph("container", "edited", "MergedDir")
        assert is_mounted(merged)
        assert differences(snapshot(merged), ours) == []
    finally:
        docker("rm", "-f", "edited", check=False)


@pytest.mark.parametrize("image", ["built:v1", "committed:v1", "base:v1"])
def test_image_by_name_equals_the_kernels_view(docker, mnt, image):
    expected = _kernel_image_view(docker, image, mnt)
    with ovlfuse_mount(["--docker-root", docker.data_root, image, mnt], mnt):
        assert differences(expected, snapshot(mnt)) == []
        assert any(line.split()[1] == mnt and line.split()[3].startswith("ro") for line in open("/proc/self/mounts"))


def _resolved_chain(docker: Docker, name: str) -> list[str]:
    result = run_ovlfuse("layers", "--json", "--docker-root", docker.data_root, name)
    assert result.returncode == 0, result.stderr
    return [layer["path"] for layer in json.loads(result.stdout)["layers"]]


@pytest.mark.parametrize("kind, name", [("container", "changer"), ("image", "built:v1"), ("image", "committed:v1"),
                                        ("image", "base:v1"), ("image", "docker.io/library/built:v1"),
                                        ("image", "registry.example:5000/team/app:v2"), ("image", "plain"),
                                        ("image", "plain:latest")])
def test_names_resolve_to_the_chain_dockerd_reports(docker, kind, name):
    assert _resolved_chain(docker, name) == docker.chain(kind, name)


def test_an_image_by_id(docker):
    image_id = docker("image", "inspect", "-f", "{{.Id}}", "committed:v1")  # sha256:<64 hex>
    bare = image_id.removeprefix("sha256:")
    for name in (image_id, bare, bare[:12], f"sha256:{bare[:12]}"):
        assert _resolved_chain(docker, name) == docker.chain("image", "committed:v1"), name


def test_a_name_wins_over_an_id_prefix(docker):
    """Docker's order: a full id, then a name, then a unique id prefix."""
    container_id = docker("container", "inspect", "-f", "{{.Id}}", "changer")
    docker("create", "--name", container_id[:12], "built:v1", "true")
    try:
        assert _resolved_chain(docker, container_id[:12]) == docker.chain("container", container_id[:12])
        assert _resolved_chain(docker, container_id[:13]) == docker.chain("container", "changer")
    finally:
        docker("rm", container_id[:12])


@pytest.mark.parametrize("name", ["changer", "built:v1", "committed:v1", "base:v1"])
def test_verify_finds_no_difference(docker, name):
    result = run_ovlfuse("verify", "--docker-root", docker.data_root, name, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_verify_the_init_layer_by_id_prefix(docker):
    """dockerd's <id>-init layer (/etc/hosts, /dev, /.dockerenv, ...) under its short name."""
    layer = os.path.basename(os.path.dirname(docker.graph("container", "changer", "UpperDir")))
    result = run_ovlfuse("verify", "--root", os.path.join(docker.data_root, "overlay2"), f"{layer[:12]}-init",
                         timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
