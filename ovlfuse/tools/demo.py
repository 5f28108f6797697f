"""``ovlfuse demo DIR``: a small, realistic Docker overlay2 store to mount.

``StoreWriter`` lays layers out exactly as Docker's overlay2 driver does
(``<id>/diff``, ``link``, ``lower``, ``work/``, ``committed``, ``l/<LINK>``);
the test suite builds its stores with it too.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shlex
import shutil
import stat
import sys
from dataclasses import dataclass, field

from ovlfuse.errors import OvlError


@dataclass
class LayerRef:
    id: str
    link: str
    dir: str
    chain: list[str] = field(default_factory=list)  # links of the lower chain, nearest first

    @property
    def diff(self) -> str:
        return os.path.join(self.dir, "diff")


class StoreWriter:
    """Creates layers in an overlay2 store root, the way Docker lays them out."""

    def __init__(self, root: str, link_length: int = 26) -> None:
        self.root = os.path.abspath(root)
        self.link_length = link_length
        os.makedirs(os.path.join(self.root, "l"), exist_ok=True)
        os.chmod(self.root, 0o710)
        os.chmod(os.path.join(self.root, "l"), 0o700)
        self._serial = 0

    def new_id(self, seed: str) -> str:
        self._serial += 1
        return hashlib.sha256(f"{self.root}:{seed}:{self._serial}".encode()).hexdigest()

    def _new_link(self, layer_id: str) -> str:
        digest = hashlib.sha256(layer_id.encode()).digest() * 2
        return base64.b32encode(digest).decode()[: self.link_length]

    def layer(self, parent: LayerRef | None = None, layer_id: str | None = None, link: str | None = None,
              seed: str = "") -> LayerRef:
        layer_id = layer_id or self.new_id(seed)
        link = link or self._new_link(layer_id)
        layer_dir = os.path.join(self.root, layer_id)
        os.makedirs(os.path.join(layer_dir, "diff"))
        with open(os.path.join(layer_dir, "link"), "w") as f:
            f.write(link)
        os.symlink(f"../{layer_id}/diff", os.path.join(self.root, "l", link))
        chain: list[str] = []
        if parent is not None:
            chain = [parent.link] + parent.chain
            with open(os.path.join(layer_dir, "lower"), "w") as f:
                f.write(":".join(f"l/{c}" for c in chain))
            os.makedirs(os.path.join(layer_dir, "work", "work"))
        return LayerRef(layer_id, link, layer_dir, chain)

    @staticmethod
    def commit(layer: LayerRef) -> None:
        open(os.path.join(layer.dir, "committed"), "w").close()


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _whiteout(path: str) -> None:
    """A kernel whiteout (char 0:0); the OCI .wh. file where mknod is refused."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    except PermissionError:
        parent, name = os.path.split(path)
        open(os.path.join(parent, ".wh." + name), "w").close()


def _opaque(path: str) -> None:
    """Mark a directory opaque: trusted xattr as root, user xattr otherwise, .wh..wh..opq as last resort."""
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            os.setxattr(path, attr, b"y")
            return
        except OSError:
            continue
    open(os.path.join(path, ".wh..wh..opq"), "w").close()


def write_demo_store(root: str) -> tuple[LayerRef, list[LayerRef]]:
    """An image of three layers, a container's -init layer, and the container layer on top."""
    store = StoreWriter(root)
    base = store.layer(seed="base")
    d = base.diff
    for sub in ("bin", "etc/apt", "usr/bin", "usr/share/doc/base", "var/cache/apt/archives", "tmp", "root"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    os.chmod(os.path.join(d, "tmp"), 0o1777)
    os.chmod(os.path.join(d, "root"), 0o700)
    _write(f"{d}/etc/os-release", 'PRETTY_NAME="Demo Linux 1.0"\nID=demo\n')
    _write(f"{d}/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(f"{d}/etc/issue", "Demo Linux \\n \\l\n")
    _write(f"{d}/etc/apt/sources.list", "deb http://deb.example/demo stable main\n")
    _write(f"{d}/bin/sh", "#!/bin/true\n", 0o755)
    _write(f"{d}/usr/share/doc/base/README", "The base layer of the demo image.\n")
    for pkg in ("libfoo_1.0_amd64.deb", "libbar_2.1_amd64.deb"):
        _write(f"{d}/var/cache/apt/archives/{pkg}", "!<arch>\n" + "x" * 4096)
    os.symlink("usr/bin", os.path.join(d, "sbin"))
    os.link(f"{d}/bin/sh", f"{d}/bin/dash")
    store.commit(base)

    # RUN apt-get install tool && apt-get clean
    install = store.layer(base, seed="install")
    d = install.diff
    os.makedirs(f"{d}/var/cache/apt/archives")
    _write(f"{d}/usr/bin/tool", "#!/bin/sh\necho tool 2.0\n", 0o4755)
    _write(f"{d}/etc/passwd", "root:x:0:0:root:/root:/bin/sh\ntool:x:100:100::/nonexistent:/bin/false\n")
    for pkg in ("libfoo_1.0_amd64.deb", "libbar_2.1_amd64.deb"):
        _whiteout(f"{d}/var/cache/apt/archives/{pkg}")
    store.commit(install)

    # RUN rm -rf /etc/apt && mkdir /etc/apt && echo ... > /etc/apt/sources.list
    config = store.layer(install, seed="config")
    d = config.diff
    os.makedirs(f"{d}/etc/apt")
    _opaque(f"{d}/etc/apt")
    _write(f"{d}/etc/apt/sources.list", "deb http://mirror.example/demo testing main\n")
    _write(f"{d}/etc/motd", "Welcome to the demo image.\n")
    store.commit(config)

    container_id = store.new_id("container")
    init = store.layer(config, layer_id=container_id + "-init")
    d = init.diff
    os.makedirs(f"{d}/dev")
    _write(f"{d}/.dockerenv", "")
    _write(f"{d}/etc/hosts", "127.0.0.1 localhost\n")
    _write(f"{d}/etc/hostname", "demo\n")
    _write(f"{d}/etc/resolv.conf", "nameserver 127.0.0.53\n")
    _write(f"{d}/dev/console", "")
    store.commit(init)

    container = store.layer(init, layer_id=container_id)
    d = container.diff
    _write(f"{d}/root/.bash_history", "tool\nrm /etc/issue\n", 0o600)
    os.chmod(f"{d}/root", 0o700)
    _write(f"{d}/etc/motd", "Welcome to the demo container.\n")
    _whiteout(f"{d}/etc/issue")
    return container, [init, config, install, base]


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ovlfuse demo",
                                     description="Write a small Docker overlay2 store to DIR and print how to mount it.")
    parser.add_argument("dir", help="directory to create (must not exist or be empty)")
    ns = parser.parse_args(argv)
    target = os.path.abspath(ns.dir)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise OvlError(f"{ns.dir} is not empty; give a new directory for the demo store")
    root = os.path.join(target, "overlay2")
    container, below = write_demo_store(root)
    mnt = os.path.join(target, "merged")
    os.makedirs(mnt, exist_ok=True)
    print(f"demo store written to {root}")
    print(f"  container layer {container.id} over {len(below)} layers: "
          + ", ".join(layer.id[:12] for layer in below))
    print("mount its merged view with:")
    print(f"  {shlex.join([*invocation(), '--root', root, container.id[:12], mnt])}")
    return 0


def invocation() -> list[str]:
    """How a shell runs this very ovlfuse: ``ovlfuse`` if that is what PATH finds, else the program's path."""
    script = os.path.join(os.path.dirname(sys.executable), "ovlfuse")
    on_path = shutil.which("ovlfuse")
    if on_path and os.path.realpath(on_path) == os.path.realpath(script):
        return ["ovlfuse"]
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "ovlfuse"]
