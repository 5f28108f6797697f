"""Copy-up and file data through an ovlfuse mount: holes, big files, crashes, integrity."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import time

import pytest

from mounts import ovlfuse_mount
from overlaypair import Layers, Mounted, on_both

GiB = 1 << 30


@pytest.fixture
def layers(tmp_path):
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    return dirs


def _args(layers) -> list[str]:
    return ["-o", f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}",
            str(layers["mnt"])]


def test_sparse_gigabyte_copies_up_and_stays_sparse(layers):
    """Only the data is copied: the copy allocates a few blocks, not 1 GiB (bench/ reports the time)."""
    path = layers["lower"] / "sparse"
    with open(path, "wb") as f:
        f.truncate(GiB)
        f.seek(GiB // 2)
        f.write(b"x")
    with ovlfuse_mount(_args(layers), str(layers["mnt"])):
        with open(layers["mnt"] / "sparse", "r+b") as f:
            f.write(b"y")
        with open(layers["mnt"] / "sparse", "rb") as f:
            f.seek(GiB // 2)
            assert f.read(1) == b"x"
    upper = os.stat(layers["upper"] / "sparse")
    assert upper.st_size == GiB
    assert upper.st_blocks * 512 <= 1 << 20, f"the copy allocated {upper.st_blocks * 512} bytes"


def test_deleting_a_big_lower_file_copies_nothing(layers):
    with open(layers["lower"] / "big", "wb") as f:
        f.truncate(GiB)
    with ovlfuse_mount(_args(layers), str(layers["mnt"])):
        os.unlink(layers["mnt"] / "big")
        assert not os.path.exists(layers["mnt"] / "big")
    st = os.lstat(layers["upper"] / "big")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # just a whiteout
    assert os.listdir(layers["upper"]) == ["big"]
    assert os.listdir(layers["work"] / "work") == []


def _bytes_read(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("how", ["O_TRUNC", "truncate"])
def test_truncating_a_big_lower_file_copies_only_what_is_kept(layers, how):
    """A copy-up for a truncate copies the head that stays, not the whole file."""
    size = 64 << 20
    data = random.Random(7).randbytes(size)
    (layers["lower"] / "big").write_bytes(data)
    with ovlfuse_mount(_args(layers), str(layers["mnt"])) as daemon:
        before = _bytes_read(daemon.pid)
        if how == "O_TRUNC":
            fd = os.open(layers["mnt"] / "big", os.O_WRONLY | os.O_TRUNC)
            os.write(fd, b"new")
            os.close(fd)
            expected = b"new"
        else:
            os.truncate(layers["mnt"] / "big", 1000)
            expected = data[:1000]
        read = _bytes_read(daemon.pid) - before  # FUSE requests themselves count a little
        assert (layers["mnt"] / "big").read_bytes() == expected
    assert read < 1 << 20, f"the copy-up read {read} bytes of a {size}-byte file to keep {len(expected)}"
    assert (layers["upper"] / "big").read_bytes() == expected
    assert (layers["lower"] / "big").read_bytes() == data
    assert os.listdir(layers["work"] / "work") == []


def _fill(path, size: int) -> bytes:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
    return chunk


def test_killed_during_copy_up_leaves_nothing_partial(layers):
    """kill -9 mid-copy: the name keeps its old data, and the half copy is removed at the next mount."""
    size = GiB  # the size: long enough to be caught mid-copy
    chunk = _fill(layers["lower"] / "huge", size)
    (layers["lower"] / "small").write_bytes(b"small\n")
    work = layers["work"] / "work"
    mnt = layers["mnt"]
    with ovlfuse_mount(_args(layers), str(mnt)) as daemon:
        writer = subprocess.Popen([sys.executable, "-c", f"open({str(mnt / 'huge')!r}, 'ab').write(b'z')"],
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not any(os.stat(work / n).st_size > 0 for n in os.listdir(work)):
            assert time.monotonic() < deadline and writer.poll() is None, "the copy-up was not caught running"
            time.sleep(0.001)
        # the copy runs on a worker thread: other requests are still served meanwhile
        assert (mnt / "small").read_bytes() == b"small\n"
        copying = [os.stat(work / n).st_size for n in os.listdir(work)]
        assert copying and max(copying) < size, "the read waited for the copy-up to finish"
        daemon.kill()
        daemon.wait()
        writer.wait(timeout=30)
    assert not (layers["upper"] / "huge").exists(), "a partial copy became visible"
    assert os.listdir(work), "expected the interrupted copy in work/"
    with ovlfuse_mount(_args(layers), str(mnt)):
        assert os.listdir(work) == [], "work/ is cleaned at mount"
        st = os.stat(mnt / "huge")
        assert st.st_size == size
        with open(mnt / "huge", "rb") as f:
            assert f.read(len(chunk)) == chunk
            f.seek(size - len(chunk))
            assert f.read() == chunk


def test_random_io_matches_a_model(layers):
    """fsx style: seeded random writes, truncates, appends and reads on new and copied-up files."""
    rng = random.Random(1234)
    models = {"new": bytearray(), "old": bytearray(rng.randbytes(300_000))}
    (layers["lower"] / "old").write_bytes(models["old"])
    mnt = layers["mnt"]
    with ovlfuse_mount(_args(layers), str(mnt)):
        (mnt / "new").write_bytes(b"")
        fds = {name: os.open(mnt / name, os.O_RDWR) for name in models}
        try:
            for step in range(3000):
                name = rng.choice(list(models))
                model, fd = models[name], fds[name]
                action = rng.random()
                if action < 0.4:
                    offset = rng.randrange(0, len(model) + 50_000)
                    data = rng.randbytes(rng.randrange(1, 70_000))
                    assert os.pwrite(fd, data, offset) == len(data)
                    if offset > len(model):
                        model.extend(bytes(offset - len(model)))
                    model[offset:offset + len(data)] = data
                elif action < 0.55:
                    length = rng.randrange(0, len(model) + 100_000)
                    os.ftruncate(fd, length)
                    del model[length:]
                    model.extend(bytes(length - len(model)))
                elif action < 0.65:
                    data = rng.randbytes(rng.randrange(1, 10_000))
                    with open(mnt / name, "ab") as f:
                        f.write(data)
                    model.extend(data)
                else:
                    offset = rng.randrange(0, len(model) + 1)
                    size = rng.randrange(0, 200_000)
                    assert os.pread(fd, size, offset) == bytes(model[offset:offset + size]), f"step {step}"
                    assert os.fstat(fd).st_size == len(model), f"step {step}"
        finally:
            for fd in fds.values():
                os.close(fd)
        for name, model in models.items():
            assert (mnt / name).read_bytes() == model
    for name, model in models.items():
        assert (layers["upper"] / name).read_bytes() == model
    with ovlfuse_mount(_args(layers), str(mnt)):
        for name, model in models.items():
            assert (mnt / name).read_bytes() == model


def test_killed_during_renames_leaves_each_file_whole_under_one_name(layers):
    """kill -9 in a stream of renames of lower files: each file is whole under its old or its new name."""
    count = 300
    for i in range(count):
        (layers["lower"] / f"f{i}").write_bytes(b"%d\n" % i * 100)
    mnt = layers["mnt"]
    script = (f"import os\nfor i in range({count}):\n"
              f"    os.rename('{mnt}/f%d' % i, '{mnt}/g%d' % i)\n")
    with ovlfuse_mount(_args(layers), str(mnt)) as daemon:
        renamer = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while sum(n.startswith("g") for n in os.listdir(layers["upper"])) < count // 3:
            assert time.monotonic() < deadline and renamer.poll() is None, "renames did not get going"
            time.sleep(0.001)
        daemon.kill()
        daemon.wait()
        renamer.wait(timeout=30)
    with ovlfuse_mount(_args(layers), str(mnt)):
        names = set(os.listdir(mnt))
        moved = 0
        for i in range(count):
            assert (f"f{i}" in names) != (f"g{i}" in names), f"file {i} is under {'both' if f'f{i}' in names else 'no'} names"
            name = f"g{i}" if f"g{i}" in names else f"f{i}"
            moved += name.startswith("g")
            assert (mnt / name).read_bytes() == b"%d\n" % i * 100
        assert os.listdir(layers["work"] / "work") == []
    assert count // 3 <= moved < count, "the kill did not land in the middle of the renames"


# security.capability v2: CAP_NET_BIND_SERVICE permitted and effective
CAPABILITY = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


def test_file_capability_survives_copy_up_as_on_the_kernel(tmp_path):
    """A copy-up by chmod, utimes or a user xattr keeps security.capability; the kernel's upper gets the same."""
    def make_layers(base) -> Layers:
        lower, upper, work = (base / n for n in ("lower", "upper", "work"))
        for d in (lower, upper, work):
            d.mkdir(parents=True)
        for name in ("chmod", "utime", "xattr"):
            (lower / name).write_bytes(b"\x7fELF")
            os.chmod(lower / name, 0o755)
            os.setxattr(lower / name, "security.capability", CAPABILITY)
        return Layers.dirs([lower], upper, work)

    def scenario(m: Mounted) -> dict[str, tuple[bytes, bytes]]:
        mnt = m.path
        os.chmod(mnt / "chmod", 0o750)
        os.utime(mnt / "utime", (1, 1))
        os.setxattr(mnt / "xattr", "user.note", b"x")
        return {name: (os.getxattr(mnt / name, "security.capability"),
                       os.getxattr(os.path.join(m.layers.upper, name), "security.capability"))
                for name in ("chmod", "utime", "xattr")}

    seen = on_both(tmp_path, make_layers, scenario)
    assert seen["ovlfuse"] == seen["kernel"]
    assert all(merged == stored == CAPABILITY for merged, stored in seen["ovlfuse"].values())
