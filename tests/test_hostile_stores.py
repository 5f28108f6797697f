"""Stores that are huge or odd are served correctly (broken ones are refused: see test_cli)."""

from __future__ import annotations

import os
import resource
import subprocess

from mounts import OVLFUSE, is_mounted, ovlfuse_mount
from ovlfuse.tools.demo import StoreWriter


def test_chain_of_ten_thousand_layers(tmp_path):
    """Far past the kernel's 500, and past a default soft fd limit of 1024."""
    sw = StoreWriter(str(tmp_path / "overlay2"), link_length=8)
    layer = sw.layer(seed="base")
    (tmp_path / "overlay2" / layer.id / "diff" / "base").write_text("bottom")
    for i in range(10_000):
        layer = sw.layer(layer, seed=str(i))
        with open(os.path.join(layer.diff, f"f{i % 50}"), "w") as f:
            f.write(str(i))
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen([*OVLFUSE, "-f", "--root", sw.root, layer.id, str(mnt)], preexec_fn=low_fd_limit,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if is_mounted(str(mnt)) or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        assert is_mounted(str(mnt)), proc.stderr.read() if proc.poll() is not None else "not mounted"
        assert sorted(os.listdir(mnt)) == ["base"] + sorted(f"f{i}" for i in range(50))
        assert (mnt / "base").read_text() == "bottom"
        assert (mnt / "f7").read_text() == "9957"  # the topmost of the layers that wrote f7
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(timeout=30)


def test_large_xattrs_and_many_names(tmp_path):
    lower, other, mnt = tmp_path / "lower", tmp_path / "other", tmp_path / "mnt"
    for d in (lower, other, mnt):
        d.mkdir()
    (lower / "f").write_text("x")
    (lower / "g").write_text("y")
    big = _largest_xattr(lower / "f", "trusted.big")
    for i in range(40):
        os.setxattr(lower / "g", f"user.n{i:03d}", b"v" * 50)
    assert len(big) > 3000
    with ovlfuse_mount(["-o", f"lowerdir={lower}:{other}", str(mnt)], str(mnt)):
        assert os.getxattr(mnt / "f", "trusted.big") == big
        assert sorted(os.listxattr(mnt / "g")) == [f"user.n{i:03d}" for i in range(40)]


def _largest_xattr(path, name: str) -> bytes:
    """The largest value the layer's filesystem accepts (ext4 without ea_inode: about a block)."""
    size = 65536
    while size > 256:
        value = os.urandom(size)
        try:
            os.setxattr(path, name, value)
            return value
        except OSError:
            size -= 256
    raise AssertionError("the filesystem takes no xattr of 256 bytes")
