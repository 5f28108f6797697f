"""Faults and hostile layers: bad blocks in a lower layer, a full upper, kill -9 mid-change, planted symlinks.

Each fault is made real: a btrfs lower whose data checksums fail (the kernel
answers EIO), an upper dir on a small tmpfs, a daemon killed by SIGKILL, a
layer holding symlinks that lead out of the store.  Where the kernel's
overlay can take the same fault, it does, and the answers are compared.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from overlaypair import Layers, mount
from stores import fingerprint
from treesnap import differences, snapshot


def _errno(call: Callable[[], object]) -> str:
    try:
        call()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _pread(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _tree(root: Path) -> list[tuple[str, str]]:
    """(relative path, file type) of everything under ``root``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out.append((os.path.relpath(path, root), stat.filemode(os.lstat(path).st_mode)[0]))
    return sorted(out)


def _dirs(base: Path, *names: str) -> list[Path]:
    paths = [base / name for name in names]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
    return paths


# --- EIO from a lower layer ---------------------------------------------------------------------------

@contextlib.contextmanager
def _loop_mount(image: Path, mnt: Path, options: str = "rw") -> Iterator[None]:
    """``image`` on a loop device mounted at ``mnt``; the device is detached whatever happens."""
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", options, dev, str(mnt)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True, capture_output=True)


BLOCK = 4096
BAD_FILES = {"bad": 256 << 10, "big-bad": 3 << 20, "dir/bad2": 2 * BLOCK}  # the second block of each rots
GOOD_FILES = {"good": 256 << 10, "dir/ok": 5000, "small": 100}


@contextlib.contextmanager
def _rotten_btrfs(base: Path) -> Iterator[tuple[Path, dict[str, bytes]]]:
    """A read-only btrfs lower in which one data block of each BAD_FILES file fails its checksum.

    Reads of that block get EIO from btrfs itself; metadata (stat, readdir)
    and every other block stay readable.
    """
    image, mnt = base / "btrfs.img", base / "btrfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "--mixed", str(image)], check=True, capture_output=True)
    contents = {name: os.urandom(size) for name, size in (BAD_FILES | GOOD_FILES).items()}
    with _loop_mount(image, mnt):
        for name, data in contents.items():
            os.makedirs(os.path.dirname(mnt / name), exist_ok=True)
            (mnt / name).write_bytes(data)
    with open(image, "r+b") as f:
        raw = f.read()
        for name in BAD_FILES:
            block = contents[name][BLOCK:2 * BLOCK]
            at = raw.find(block)
            assert at >= 0 and raw.find(block, at + 1) < 0, f"{name}'s second block is not in the image once"
            f.seek(at + 100)
            f.write(bytes([raw[at + 100] ^ 0xFF]))
    with _loop_mount(image, mnt, "ro"):
        yield mnt, contents


def _bad_block_calls(mnt: Path, contents: dict[str, bytes]) -> list:
    """What callers get from files with a bad block, and from their neighbours."""
    good = [_read(mnt / name) == data for name, data in contents.items() if name in GOOD_FILES]
    return [
        ("read", _errno(lambda: _read(mnt / "bad"))),
        ("read block 0", _pread(mnt / "bad", BLOCK, 0) == contents["bad"][:BLOCK]),
        ("read block 1", _errno(lambda: _pread(mnt / "bad", BLOCK, BLOCK))),
        ("read block 2", _pread(mnt / "bad", BLOCK, 2 * BLOCK) == contents["bad"][2 * BLOCK:3 * BLOCK]),
        ("read big", _errno(lambda: _read(mnt / "big-bad"))),
        ("stat", os.stat(mnt / "bad").st_size, os.stat(mnt / "big-bad").st_size),
        ("open for write", _errno(lambda: open(mnt / "bad", "r+b").close())),
        ("open big for write", _errno(lambda: open(mnt / "big-bad", "ab").close())),
        ("chmod", _errno(lambda: os.chmod(mnt / "dir" / "bad2", 0o600))),
        ("setxattr", _errno(lambda: os.setxattr(mnt / "bad", "user.x", b"1"))),
        ("rename", _errno(lambda: os.rename(mnt / "big-bad", mnt / "moved"))),
        ("link", _errno(lambda: os.link(mnt / "bad", mnt / "dir" / "link"))),
        ("still", _errno(lambda: _read(mnt / "bad")), oct(os.stat(mnt / "dir" / "bad2").st_mode)),
        ("good files", good),
        ("listing", sorted(os.listdir(mnt)), sorted(os.listdir(mnt / "dir"))),
        ("write elsewhere", _errno(lambda: (mnt / "dir" / "new").write_bytes(b"new\n"))),
        ("copy-up of a good file", _errno(lambda: os.chmod(mnt / "good", 0o600))),
        ("unlink needs no data", _errno(lambda: os.unlink(mnt / "bad"))),
    ]


def test_bad_block_in_a_lower_file_fails_only_the_calls_that_need_it(tmp_path):
    """EIO for reads and copy-ups of the bad file, as on the kernel; nothing half-made is left; all else works."""
    with _rotten_btrfs(tmp_path) as (lower, contents):
        results, uppers = {}, {}
        for kind in ("kernel", "ovlfuse"):
            upper, work, mnt = _dirs(tmp_path / kind, "upper", "work", "mnt")
            with mount(kind, Layers.dirs([lower], upper, work), mnt):
                results[kind] = _bad_block_calls(mnt, contents)
            uppers[kind] = _tree(upper)
            if kind == "ovlfuse":
                assert os.listdir(work / "work") == [], "a failed copy-up left its partial copy in work/"
    assert results["ovlfuse"] == results["kernel"]
    assert results["ovlfuse"][0] == ("read", "EIO")
    assert uppers["ovlfuse"] == uppers["kernel"]
    # the failed copy-ups left nothing: only the new file, the good file's copy, and the whiteout
    assert uppers["ovlfuse"] == [("bad", "c"), ("dir", "d"), ("dir/new", "-"), ("good", "-")]


def test_callers_keep_being_served_while_others_hit_bad_blocks(tmp_path):
    """Threads that keep hitting EIO run next to readers, listers and writers, who never fail."""
    with _rotten_btrfs(tmp_path) as (lower, contents):
        upper, work, mnt = _dirs(tmp_path, "upper", "work", "mnt")
        with mount("ovlfuse", Layers.dirs([lower], upper, work), mnt) as daemon:
            stop = threading.Event()
            failures: list[str] = []
            served: dict[str, list[int]] = {"bad": [], "good": []}  # list.append is atomic; += is not

            def hit_bad_blocks() -> None:
                while not stop.is_set():
                    for call in (lambda: _read(mnt / "big-bad"), lambda: open(mnt / "bad", "r+b").close()):
                        if _errno(call) != "EIO":
                            failures.append("a bad block did not give EIO")
                        served["bad"].append(1)

            def serve_others(n: int) -> None:
                for i in range(150):
                    if _read(mnt / "good") != contents["good"] or _read(mnt / "dir" / "ok") != contents["dir/ok"]:
                        failures.append("a good file read wrong")
                    if not {"bad2", "ok"} | {f"w{n}-{j}" for j in range(i)} <= set(os.listdir(mnt / "dir")):
                        failures.append("a listing was wrong")
                    (mnt / "dir" / f"w{n}-{i}").write_bytes(b"%d\n" % i)
                    os.stat(mnt / "bad")
                    served["good"].append(i)

            bad = [threading.Thread(target=hit_bad_blocks) for _ in range(2)]
            for t in bad:
                t.start()
            try:
                good = [threading.Thread(target=serve_others, args=(n,)) for n in range(2)]
                for t in good:
                    t.start()
                for t in good:
                    t.join()
            finally:
                stop.set()
                for t in bad:
                    t.join()
            assert failures == []
            assert served["bad"] and len(served["good"]) == 300
            assert daemon.poll() is None, "the daemon died"
            assert _read(mnt / "dir" / "w1-149") == b"149\n"
        assert os.listdir(work / "work") == []
        assert sorted(os.listdir(upper)) == ["dir"]


NEEDLE = "needle-" + "n" * 60


def _leaf_holding(image: Path, item_type: str, name: str) -> int:
    """Logical address of the btrfs leaf that holds the ``item_type`` item of ``name`` (fs tree)."""
    dump = subprocess.run(["btrfs", "inspect-internal", "dump-tree", "-t", "5", str(image)], check=True,
                          capture_output=True, text=True).stdout
    leaf, kind = None, None
    for line in dump.splitlines():
        if m := re.match(r"leaf (\d+) items", line):
            leaf = int(m.group(1))
        elif m := re.match(r"\s*item \d+ key \(\d+ (\w+) \d+\)", line):
            kind = m.group(1)
        elif kind == item_type and line.strip().endswith("name: " + name):
            assert leaf is not None
            return leaf
    raise AssertionError(f"no {item_type} item for {name} in {image}")


@contextlib.contextmanager
def _btrfs_with_a_bad_directory_block(base: Path) -> Iterator[Path]:
    """A read-only btrfs lower in which the metadata block holding part of ``big``'s listing fails its checksum."""
    image, mnt = base / "btrfs.img", base / "btrfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "--mixed", str(image)], check=True, capture_output=True)
    with _loop_mount(image, mnt):
        (mnt / "good").mkdir()  # first, so its items sort before big's
        for i in range(5):
            (mnt / "good" / f"g{i}").write_text(f"{i}\n")
        (mnt / "big").mkdir()
        for i in range(600):  # a listing of many leaves
            (mnt / "big" / (f"entry-{i:04d}-" + "p" * 80)).touch()
        (mnt / "big" / NEEDLE).touch()
    leaf = _leaf_holding(image, "DIR_INDEX", NEEDLE)
    mirrors = subprocess.run(["btrfs-map-logical", "-l", str(leaf), str(image)], check=True, capture_output=True,
                             text=True).stdout
    with open(image, "r+b") as f:
        for physical in re.findall(r"physical (\d+)", mirrors):
            f.seek(int(physical) + 2000)
            byte = f.read(1)
            f.seek(int(physical) + 2000)
            f.write(bytes([byte[0] ^ 0xFF]))
    with _loop_mount(image, mnt, "ro"):
        yield mnt


def test_bad_metadata_block_in_a_lower_directory_fails_that_directory_alone(tmp_path):
    """Listing the directory gives EIO, as on the kernel; other directories are listed, read and written.

    The merged index of that directory cannot be built, so ovlfuse looks its
    names up one by one, as the kernel still can: a name in an unhurt block
    is found, and can be changed.
    """
    with _btrfs_with_a_bad_directory_block(tmp_path) as lower:
        results, lookups = {}, {}
        for kind in ("kernel", "ovlfuse"):
            upper, work, mnt = _dirs(tmp_path / kind, "upper", "work", "mnt")
            with mount(kind, Layers.dirs([lower], upper, work), mnt) as daemon:
                results[kind] = [
                    ("list", _errno(lambda: os.listdir(mnt / "big"))),
                    ("list another", sorted(os.listdir(mnt / "good")), sorted(os.listdir(mnt))),
                    ("read another", (mnt / "good" / "g3").read_text()),
                    ("write another", _errno(lambda: (mnt / "good" / "new").write_text("new\n"))),
                    ("list again", _errno(lambda: os.listdir(mnt / "big"))),
                ]
                lookups[kind] = [_errno(lambda: os.stat(mnt / "big" / NEEDLE).st_size),
                                 _errno(lambda: os.stat(mnt / "big" / "no-such-name")),
                                 _errno(lambda: (mnt / "big" / NEEDLE).write_text("changed\n")),
                                 _errno(lambda: (mnt / "big" / NEEDLE).read_text()),
                                 _errno(lambda: os.unlink(mnt / "big" / NEEDLE)),
                                 _errno(lambda: os.stat(mnt / "big" / NEEDLE))]
                if kind == "ovlfuse":
                    assert daemon.poll() is None
    assert results["ovlfuse"] == results["kernel"]
    assert results["ovlfuse"][0] == ("list", "EIO")
    assert lookups["ovlfuse"] == lookups["kernel"]
    assert lookups["kernel"][0] == "ok"


# --- a full upper filesystem ----------------------------------------------------------------------------

MiB = 1 << 20
UPPER_BYTES = 8 * MiB
UPPER_INODES = 64


def _write_all(path: Path, data: bytes, flags: int = os.O_CREAT | os.O_TRUNC) -> str:
    """Write with plain syscalls (a buffered file would lose a failed flush at close)."""
    try:
        fd = os.open(path, os.O_WRONLY | flags, 0o644)
    except OSError as e:
        return errno.errorcode[e.errno]
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:MiB]):]
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)


def _digests(root: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256(_read(root / name)).hexdigest() for name in names}


def _free(path: Path) -> tuple[int, int]:
    sv = os.statvfs(path)
    return sv.f_bfree, sv.f_ffree


def _fill_upper(mnt: Path, upper_fs: Path, lower: Path) -> list:
    """Run the upper out of blocks, then out of inodes; record what each caller gets."""
    out: list = []
    kept = ["keep/a", "keep/b", "copied"]
    os.mkdir(mnt / "keep")
    for name in kept[:2]:
        out.append((f"write {name}", _write_all(mnt / name, os.urandom(512 << 10))))
    out.append(("copy-up before", _errno(lambda: os.chmod(mnt / "copied", 0o600))))
    before = _digests(mnt, kept)

    out.append(("fill", _write_all(mnt / "fill", b"f" * (2 * UPPER_BYTES))))
    out.append(("no block left", _free(upper_fs)[0] == 0))
    out.append(("append", _write_all(mnt / "keep" / "a", b"x", os.O_APPEND)))
    out.append(("create", _write_all(mnt / "empty", b"")))
    out.append(("write to it", _write_all(mnt / "empty", b"x")))
    out.append(("small copy-up", _errno(lambda: os.chmod(mnt / "small", 0o600)),
                sorted(os.listdir(upper_fs / "upper"))))
    os.truncate(mnt / "fill", os.stat(mnt / "fill").st_size - 2 * MiB)  # 2 MiB free, the lower file is 3
    free = _free(upper_fs)
    out.append(("copy-up by open", _errno(lambda: open(mnt / "big", "r+b").close())))
    out.append(("copy-up by chmod", _errno(lambda: os.chmod(mnt / "big", 0o600))))
    out.append(("copy-up freed what it took", _free(upper_fs) == free))
    out.append(("copy-up left", sorted(os.listdir(upper_fs / "upper"))))
    out.append(("lower unchanged", _read(lower / "big") == _read(mnt / "big"),
                stat.filemode(os.stat(mnt / "big").st_mode)))

    out.append(("whiteout", _errno(lambda: os.unlink(mnt / "names" / "n0"))))
    os.mkdir(mnt / "many")
    count = 0
    while (result := _write_all(mnt / "many" / str(count), b"")) == "ok":
        count += 1
    out.append(("out of inodes", result, count > UPPER_INODES // 2))
    out.append(("mkdir", _errno(lambda: os.mkdir(mnt / "dir"))))
    out.append(("symlink", _errno(lambda: os.symlink("target", mnt / "link"))))
    out.append(("whiteout for rename", _errno(lambda: os.rename(mnt / "names" / "n2", mnt / "names" / "m2"))))
    out.append(("create over a whiteout", _write_all(mnt / "names" / "n0", b"")))
    out.append(("mkdir over a whiteout", _errno(lambda: os.mkdir(mnt / "names" / "n0"))))
    out.append(("listing", sorted(os.listdir(mnt / "names")), sorted(os.listdir(mnt))))
    out.append(("reads", _digests(mnt, kept) == before, _read(mnt / "big") == _read(lower / "big")))

    os.unlink(mnt / "fill")
    for i in range(count):
        os.unlink(mnt / "many" / str(i))
    out.append(("write after freeing", _write_all(mnt / "empty", b"x" * MiB)))
    out.append(("copy-up after freeing", _errno(lambda: os.chmod(mnt / "big", 0o600))))
    out.append(("whiteout after freeing", _errno(lambda: os.rename(mnt / "names" / "n2", mnt / "names" / "m2"))))
    out.append(("kept", _digests(mnt, kept) == before, _read(mnt / "big") == _read(lower / "big")))
    return out


def test_full_upper_gives_enospc_and_the_mount_serves_on(tmp_path):
    """Out of blocks, then out of inodes, on an 8 MiB tmpfs upper: the kernel's errnos, nothing half-made left."""
    big = os.urandom(3 * MiB)
    results, whiteouts, uppers = {}, {}, {}
    for kind in ("kernel", "ovlfuse"):
        names, upper_fs, mnt = _dirs(tmp_path / kind, "lower/names", "up", "mnt")
        lower = names.parent
        (lower / "big").write_bytes(big)
        (lower / "copied").write_bytes(os.urandom(100 << 10))
        (lower / "small").write_text("small\n")
        for i in range(10):
            (lower / "names" / f"n{i}").write_text(f"{i}\n")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={UPPER_BYTES},nr_inodes={UPPER_INODES}", "tmpfs",
                        str(upper_fs)], check=True)
        try:
            upper, work = _dirs(upper_fs, "upper", "work")
            with mount(kind, Layers.dirs([lower], upper, work), mnt) as daemon:
                results[kind] = _fill_upper(mnt, upper_fs, lower)
                # Whiteouts are links of the one made first (on both), so once one is made a lower file
                # can still be deleted when the upper is out of inodes (a rename's whiteout is new: ENOSPC above).
                count = 0
                while _write_all(mnt / f"fill{count}", b"") == "ok":
                    count += 1
                whiteouts[kind] = _errno(lambda: os.unlink(mnt / "names" / "n5"))
                if kind == "ovlfuse":
                    assert daemon.poll() is None
                    assert set(os.listdir(work / "work")) <= {"whiteout"}  # the shared whiteout at most
            uppers[kind] = [(path, type_) for path, type_ in _tree(upper)
                            if not path.startswith("fill") and path != "names/n5"]
        finally:
            subprocess.run(["umount", str(upper_fs)], check=True)
        assert (lower / "big").read_bytes() == big
    assert results["ovlfuse"] == results["kernel"]
    assert ("fill", "ENOSPC") in results["ovlfuse"] and ("mkdir", "ENOSPC") in results["ovlfuse"]
    assert uppers["ovlfuse"] == uppers["kernel"]
    assert whiteouts == {"kernel": "ok", "ovlfuse": "ok"}


# --- kill -9 in the middle of changes ---------------------------------------------------------------------
# (kill -9 during a copy-up and during renames: see test_copyup.py)

def _layers(base: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = _dirs(base, "lower", "upper", "work", "mnt")
    return lower, upper, work, mnt


def _kill_when(daemon: subprocess.Popen, worker: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """SIGKILL the daemon once ``ready()`` holds while ``worker`` is still running."""
    deadline = time.monotonic() + 60
    while not ready():
        assert worker.poll() is None, "the work ended before the kill"
        assert time.monotonic() < deadline, "the work did not get going"
        time.sleep(0.001)
    daemon.kill()
    daemon.wait()
    worker.wait(timeout=60)


def test_killed_while_removing_lower_names_leaves_each_name_whole_or_whited_out(tmp_path):
    """kill -9 in a stream of unlinks and rmdirs of lower names: each name is there or whited out, nothing else."""
    lower, upper, work, mnt = _layers(tmp_path)
    names = [f"f{i}" if i % 4 else f"d{i}" for i in range(1200)]
    for name in names:
        if name.startswith("d"):
            (lower / name).mkdir()
        else:
            (lower / name).write_text(f"{name}\n")
    before = fingerprint(str(lower))
    script = (f"import os\nfor name in {names!r}:\n"
              f"    (os.rmdir if name.startswith('d') else os.unlink)(os.path.join({str(mnt)!r}, name))\n")
    with mount("ovlfuse", Layers.dirs([lower], upper, work), mnt) as daemon:
        remover = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
        _kill_when(daemon, remover, lambda: len(os.listdir(upper)) >= len(names) // 3)
    whiteouts = set(os.listdir(upper))
    for name in whiteouts:
        st = os.lstat(upper / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, f"{name} in upper is not a whiteout"
    assert len(names) // 3 <= len(whiteouts) < len(names), "the kill did not land in the middle"
    with mount("ovlfuse", Layers.dirs([lower], upper, work), mnt):
        assert os.listdir(work / "work") == [], "work/ is cleaned at mount"
        seen = set(os.listdir(mnt))
        assert seen == set(names) - whiteouts
        for name in seen:
            if name.startswith("d"):
                assert os.listdir(mnt / name) == []
            else:
                assert (mnt / name).read_text() == f"{name}\n"
    kernel_work = tmp_path / "kernel-work"
    kernel_work.mkdir()
    with mount("kernel", Layers.dirs([lower], upper, kernel_work), mnt):
        assert set(os.listdir(mnt)) == seen, "the kernel reads the upper dir the same way"
    assert fingerprint(str(lower)) == before


CHUNK = MiB


def _chunk(i: int, flip: bool = False) -> bytes:
    """Chunk ``i`` of a stream; ``flip`` gives a chunk that differs from it in every byte."""
    data = i.to_bytes(8, "little") * (CHUNK // 8)
    return data.translate(_FLIP) if flip else data


_FLIP = bytes(255 - b for b in range(256))

_WRITER = """
import os, sys
sys.path.insert(0, {tests!r})
from test_faults import CHUNK, _chunk
fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT, 0o644)
for i in range({stop}):
    os.pwrite(fd, _chunk(i, {flip}), i * CHUNK)
    if i % 8 == 7:
        os.fsync(fd)  # so the kill may also land in an fsync
    print((i + 1) * CHUNK, flush=True)
"""


def _write_in_a_child(path: Path, stop: int, flip: bool) -> tuple[subprocess.Popen, dict[str, int], threading.Thread]:
    """A process that writes chunks 0..stop to ``path``; the dict holds how many bytes its writes
    acknowledged (final once the thread has ended)."""
    code = _WRITER.format(tests=os.path.dirname(__file__), path=str(path), stop=stop, flip=flip)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    progress = {"acked": 0}

    def follow() -> None:
        for line in writer.stdout:
            progress["acked"] = int(line)

    reader = threading.Thread(target=follow)
    reader.start()
    return writer, progress, reader


def _common_prefix(path: Path, flip: bool) -> int:
    """How many leading bytes of ``path`` are the writer's stream."""
    done = 0
    with open(path, "rb") as f:
        i = 0
        while chunk := f.read(CHUNK):
            expected = _chunk(i, flip)
            if chunk != expected[:len(chunk)]:
                return done + next(n for n, (a, b) in enumerate(zip(chunk, expected)) if a != b)
            done += len(chunk)
            i += 1
    return done


def _kill_mid_write(lower: Path, upper: Path, work: Path, mnt: Path, name: str, stop: int, flip: bool,
                    kill_at: int) -> int:
    """Write ``stop`` chunks to ``name`` through a mount, kill -9 the daemon after ``kill_at``; the bytes acknowledged."""
    with mount("ovlfuse", Layers.dirs([lower], upper, work), mnt) as daemon:
        writer, progress, reader = _write_in_a_child(mnt / name, stop, flip=flip)
        _kill_when(daemon, writer, lambda: progress["acked"] >= kill_at * CHUNK)
        reader.join()
    acked = progress["acked"]
    assert acked < stop * CHUNK, "the kill did not land in the middle"
    assert sorted(os.listdir(upper)) == [name]
    return acked


def test_killed_while_writing_a_new_file_keeps_every_acknowledged_byte(tmp_path):
    """kill -9 mid-stream: the file is the stream up to at least what write() acknowledged, at most one write more.

    A kill of the daemon loses nothing it has written: its writes are in the
    upper filesystem (in its page cache until that flushes them).  fsync
    through the mount is an fsync of the upper file, for a power cut.
    """
    lower, upper, work, mnt = _layers(tmp_path)
    (lower / "other").write_text("other\n")
    before = fingerprint(str(lower))
    acked = _kill_mid_write(lower, upper, work, mnt, "new", stop=256, flip=False, kill_at=32)
    with mount("ovlfuse", Layers.dirs([lower], upper, work), mnt):
        size = os.stat(mnt / "new").st_size
        assert acked <= size <= acked + CHUNK
        assert _common_prefix(mnt / "new", flip=False) == size
        assert sorted(os.listdir(mnt)) == ["new", "other"]
        assert os.listdir(work / "work") == []
    assert fingerprint(str(lower)) == before


def test_killed_while_overwriting_a_copied_up_file_keeps_the_rest_of_the_old_data(tmp_path):
    """kill -9 while a lower file is overwritten: new data up to at least what was acknowledged, old data after."""
    lower, upper, work, mnt = _layers(tmp_path)
    stop = 128
    with open(lower / "old", "wb") as f:
        for i in range(stop):
            f.write(_chunk(i))
    before = fingerprint(str(lower))
    acked = _kill_mid_write(lower, upper, work, mnt, "old", stop=stop, flip=True, kill_at=16)
    with mount("ovlfuse", Layers.dirs([lower], upper, work), mnt):
        assert os.stat(mnt / "old").st_size == stop * CHUNK
        written = _common_prefix(mnt / "old", flip=True)
        assert acked <= written <= acked + CHUNK
        with open(mnt / "old", "rb") as f:
            f.seek(written)
            rest = f.read()
        old = b"".join(_chunk(i) for i in range(stop))
        assert rest == old[written:], "past the new data the old data is whole"
        assert os.listdir(work / "work") == []
    assert fingerprint(str(lower)) == before


# --- symlinks planted in layers --------------------------------------------------------------------------
# Layers sit one level deeper than the mount point, so a relative link that climbs out of its layer to
# <base>/protected climbs, seen from the mount, to a place that does not exist: a caller who follows it
# through the mount gets ENOENT, and only a daemon that followed it inside the layer could reach
# <base>/protected.

def _planted(base: Path) -> tuple[list[Path], Path, Path, Path, Path]:
    """(lowers, upper, work, mnt, protected): two lowers full of links that lead to ``protected``."""
    protected = base / "protected"
    (protected / "sub").mkdir(parents=True)
    (protected / "file").write_text("protected\n")
    (protected / "secret").write_text("secret\n")
    (protected / "sub" / "inner").write_text("inner\n")
    os.setxattr(protected / "file", "user.mark", b"protected")
    top, bottom, upper, work, mnt = _dirs(base, "layers/top", "layers/bottom", "layers/upper", "layers/work", "mnt")
    os.symlink(str(protected), top / "abs-dir")
    os.symlink(str(protected / "file"), top / "abs-file")
    os.symlink("../../../protected", top / "rel-dir")
    os.symlink("../../../protected/file", top / "rel-file")
    (top / "a").mkdir()
    (top / "a" / "plain").write_text("plain\n")
    os.symlink("../../../../protected", top / "a" / "rel-dir")
    os.symlink(str(protected), top / "a" / "abs-dir")
    # a symlink where the layer below has a directory, and a directory where the layer below has a symlink
    os.symlink("../../../protected", top / "dirlink")
    (bottom / "dirlink").mkdir()
    (bottom / "dirlink" / "x").write_text("x\n")
    (top / "realdir").mkdir()
    (top / "realdir" / "f").write_text("f\n")
    os.symlink("../../../protected", bottom / "realdir")
    return [top, bottom], upper, work, mnt, protected


def _through_planted_links(mnt: Path) -> list[tuple[str, str]]:
    """Every kind of change through, on and next to the planted links."""
    def wopen(path: Path, flags: int = os.O_WRONLY) -> None:
        os.close(os.open(path, flags, 0o644))

    def write(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"new\n")
        os.close(fd)

    m = mnt
    calls: list[tuple[str, Callable[[], object]]] = [
        # followed by the caller: the targets do not exist as seen from the mount
        ("open for write through", lambda: wopen(m / "rel-file")),
        ("chmod through", lambda: os.chmod(m / "rel-file", 0o600)),
        ("chown through", lambda: os.chown(m / "rel-dir" / "file", 1234, 1234)),
        ("utime through", lambda: os.utime(m / "rel-dir" / "file", ns=(1, 1))),
        ("setxattr through", lambda: os.setxattr(m / "rel-file", "user.x", b"1")),
        ("truncate through", lambda: os.truncate(m / "a" / "rel-dir" / "file", 0)),
        ("create through", lambda: wopen(m / "rel-dir" / "new", os.O_WRONLY | os.O_CREAT)),
        ("mkdir through", lambda: os.mkdir(m / "rel-dir" / "newdir")),
        ("mkdir through a link over a dir", lambda: os.mkdir(m / "dirlink" / "newdir")),
        ("list through a link over a dir", lambda: os.listdir(m / "dirlink")),
        ("rename through", lambda: os.rename(m / "rel-dir" / "file", m / "moved")),
        ("unlink through", lambda: os.unlink(m / "a" / "rel-dir" / "secret")),
        ("rmdir through", lambda: os.rmdir(m / "rel-dir" / "sub")),
        # on the links themselves: copy-up of the link, never of what it points to
        ("lchown", lambda: os.chown(m / "abs-file", 1234, 1234, follow_symlinks=False)),
        ("lutimes", lambda: os.utime(m / "abs-dir", ns=(5, 5), follow_symlinks=False)),
        ("lsetxattr", lambda: os.setxattr(m / "rel-dir", "trusted.t", b"1", follow_symlinks=False)),
        ("lchown in a copied-up parent", lambda: os.chown(m / "a" / "abs-dir", 7, 7, follow_symlinks=False)),
        ("link to a link", lambda: os.link(m / "abs-file", m / "hard", follow_symlinks=False)),
        ("rename a link", lambda: os.rename(m / "rel-file", m / "a" / "moved")),
        ("rename a link over a dir below", lambda: os.rename(m / "dirlink", m / "dl2")),
        ("unlink a link", lambda: os.unlink(m / "abs-dir")),
        ("rmdir a link", lambda: os.rmdir(m / "a" / "rel-dir")),
        ("mkdir over a link", lambda: os.mkdir(m / "abs-file")),
        ("exclusive create over a link", lambda: wopen(m / "a" / "abs-dir", os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
        ("new link next to them", lambda: os.symlink("../../../protected", m / "a" / "new-link")),
        # next to the links
        ("write next to", lambda: write(m / "a" / "plain")),
        ("chown next to", lambda: os.chown(m / "a" / "plain", 99, 99)),
        ("truncate next to", lambda: os.truncate(m / "a" / "plain", 2)),
        # a directory whose lower part below is a link
        ("list", lambda: sorted(os.listdir(m / "realdir"))),
        ("stat what the link below has", lambda: os.stat(m / "realdir" / "secret")),
        ("create in it", lambda: write(m / "realdir" / "new")),
        ("chmod it", lambda: os.chmod(m / "realdir", 0o700)),
        ("setxattr on it", lambda: os.setxattr(m / "realdir", "user.y", b"2")),
        ("unlink in it", lambda: os.unlink(m / "realdir" / "f")),
        ("mkdir in it", lambda: os.mkdir(m / "realdir" / "sub")),
        ("rename in it", lambda: os.rename(m / "realdir" / "new", m / "realdir" / "new2")),
        ("rmdir in it", lambda: os.rmdir(m / "realdir" / "sub")),
        ("unlink the rest", lambda: os.unlink(m / "realdir" / "new2")),
        ("rmdir it", lambda: os.rmdir(m / "realdir")),
        ("mkdir it again", lambda: os.mkdir(m / "realdir")),
        ("list it again", lambda: os.listdir(m / "realdir")),
    ]
    out = []
    for name, call in calls:
        try:
            result = call()
            out.append((name, "ok" if result is None else repr(result)))
        except OSError as e:
            out.append((name, errno.errorcode[e.errno]))
    return out


def test_planted_symlinks_are_never_followed_out_of_the_store(tmp_path):
    """Copy-up, create, mkdir, rename, unlink and setattr through, on and next to planted links: the kernel's
    results, errno for errno, and the directories they point to stay byte for byte as they were."""
    results, views, uppers = {}, {}, {}
    base = tmp_path / "base"  # the same path for both: absolute links read the same
    for kind in ("kernel", "ovlfuse"):
        lowers, upper, work, mnt, protected = _planted(base)
        before = (fingerprint(str(protected)), snapshot(str(protected)))
        lower_before = [fingerprint(str(lower)) for lower in lowers]
        with mount(kind, Layers.dirs(lowers, upper, work), mnt):
            results[kind] = _through_planted_links(mnt)
            views[kind] = snapshot(str(mnt), with_times=False)
        uppers[kind] = _tree(upper)
        after = (fingerprint(str(protected)), snapshot(str(protected)))
        assert after[0] == before[0] and differences(before[1], after[1]) == [], f"{kind} changed {protected}"
        assert [fingerprint(str(lower)) for lower in lowers] == lower_before
        base.rename(tmp_path / kind)
    assert results["ovlfuse"] == results["kernel"]
    assert differences(views["kernel"], views["ovlfuse"]) == []
    assert uppers["ovlfuse"] == uppers["kernel"]
    assert not (tmp_path / "protected").exists(), "a caller followed a link to where the test says nothing is"


def _swap_for_link(path: Path, target: Path) -> None:
    path.rename(path.with_name(path.name + ".moved"))
    os.symlink(str(target), path)


def test_directories_swapped_for_links_under_the_mount_lead_nowhere(tmp_path):
    """A layer directory replaced by a link to outside while mounted (a hostile store): calls through it
    fail or act on the old directory, and what the link points to stays as it was, on the kernel and ovlfuse."""
    for kind in ("kernel", "ovlfuse"):
        base = tmp_path / kind
        lower, upper, work, mnt, protected = _dirs(base, "layers/lower", "layers/upper", "layers/work", "mnt",
                                                   "protected")
        for name in ("f", "g", "new"):
            (protected / name).write_text(f"protected {name}\n")
        (lower / "low").mkdir()
        (lower / "low" / "f").write_text("lower f\n")
        (upper / "up").mkdir()
        (upper / "up" / "g").write_text("upper g\n")
        before = (fingerprint(str(protected)), snapshot(str(protected)))
        with mount(kind, Layers.dirs([lower], upper, work), mnt) as daemon:
            assert sorted(os.listdir(mnt)) == ["low", "up"] and os.listdir(mnt / "low") == ["f"]
            assert os.listdir(mnt / "up") == ["g"]
            _swap_for_link(lower / "low", protected)
            _swap_for_link(upper / "up", protected)
            calls = [
                lambda: _read(mnt / "low" / "f"),
                lambda: open(mnt / "low" / "f", "r+b").close(),
                lambda: os.chmod(mnt / "low" / "f", 0o600),
                lambda: os.setxattr(mnt / "low" / "f", "user.x", b"1"),
                lambda: os.unlink(mnt / "low" / "f"),
                lambda: (mnt / "low" / "new").write_text("new\n"),
                lambda: (mnt / "up" / "g").write_text("through\n"),
                lambda: os.chmod(mnt / "up" / "g", 0o600),
                lambda: os.utime(mnt / "up" / "g", ns=(1, 1)),
                lambda: os.truncate(mnt / "up" / "g", 0),
                lambda: (mnt / "up" / "new").write_text("new\n"),
                lambda: os.mkdir(mnt / "up" / "d"),
                lambda: os.rename(mnt / "up" / "g", mnt / "up" / "h"),
                lambda: os.unlink(mnt / "up" / "g"),
                lambda: os.listdir(mnt / "up"),
            ]
            for call in calls:
                _errno(call)  # the results differ: the kernel keeps using the directories it had looked up
            if kind == "ovlfuse":
                assert daemon.poll() is None
        after = (fingerprint(str(protected)), snapshot(str(protected)))
        assert after[0] == before[0] and differences(before[1], after[1]) == [], f"{kind} wrote through a link"


def test_links_planted_in_the_workdir_are_removed_not_followed(tmp_path):
    """work/ is emptied at mount: links left there go, and what they point to stays, as on the kernel."""
    for kind in ("kernel", "ovlfuse"):
        lower, upper, work, mnt, protected = _dirs(tmp_path / kind, "lower", "upper", "work", "mnt", "protected")
        (protected / "sub").mkdir()
        (protected / "file").write_text("protected\n")
        (protected / "sub" / "inner").write_text("inner\n")
        (lower / "f").write_text("f\n")
        planted = work / "work"
        (planted / "dir").mkdir(parents=True)  # the kernel empties work/ two levels deep, else mounts read-only
        os.symlink(str(protected), planted / "link")
        os.symlink(str(protected / "file"), planted / "dir" / "file-link")
        os.symlink("../../../protected", planted / "dir" / "rel-link")
        os.symlink(str(protected / "sub"), planted / "dir" / "sub")
        before = (fingerprint(str(protected)), snapshot(str(protected)))
        with mount(kind, Layers.dirs([lower], upper, work), mnt):
            os.unlink(mnt / "f")  # a whiteout made in work/ and moved into place
            assert os.listdir(mnt) == []
            if kind == "ovlfuse":
                assert os.listdir(planted) == ["whiteout"]  # the shared whiteout, as the kernel keeps one
        after = (fingerprint(str(protected)), snapshot(str(protected)))
        assert after[0] == before[0] and differences(before[1], after[1]) == [], f"{kind} followed a link in work/"


def test_data_acknowledged_by_fsync_survives_a_power_cut(tmp_path):
    """The upper ext4's device as it is right after the daemon dies stands for a power cut: every byte that
    fsync through the mount acknowledged is in it, for a new file and for a copied-up one.

    Bytes written but not fsynced may be there or not: that is the kernel's
    page cache, which ovlfuse writes through, not holds.
    """
    image, crashed, fs = tmp_path / "upper.img", tmp_path / "crashed.img", tmp_path / "upperfs"
    lower, mnt = _dirs(tmp_path, "lower", "mnt")
    fs.mkdir()
    old = b"".join(_chunk(i) for i in range(8))
    (lower / "old").write_bytes(old)
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    with _loop_mount(image, fs, "rw,commit=600"):  # no periodic journal commit while the image is copied
        upper, work = _dirs(fs, "upper", "work")
        with mount("ovlfuse", Layers.dirs([lower], upper, work), mnt) as daemon:
            new = os.open(mnt / "new", os.O_WRONLY | os.O_CREAT, 0o644)
            copied = os.open(mnt / "old", os.O_WRONLY)
            for i in range(16):
                os.write(new, _chunk(i))
            os.pwrite(copied, _chunk(0, flip=True), 0)
            os.fsync(new)
            os.fsync(copied)
            for i in range(16, 24):
                os.write(new, _chunk(i))  # not fsynced
            os.pwrite(copied, _chunk(1, flip=True), CHUNK)
            daemon.kill()
            daemon.wait()
            subprocess.run(["cp", "--sparse=always", str(image), str(crashed)], check=True)
            for fd in (new, copied):
                with contextlib.suppress(OSError):
                    os.close(fd)
    with _loop_mount(crashed, fs):  # replays the journal, as after a reboot
        data = (fs / "upper" / "new").read_bytes()
        assert len(data) >= 16 * CHUNK and data[:16 * CHUNK] == b"".join(_chunk(i) for i in range(16))
        data = (fs / "upper" / "old").read_bytes()
        assert len(data) == len(old) and data[:CHUNK] == _chunk(0, flip=True) and data[2 * CHUNK:] == old[2 * CHUNK:]
    assert (lower / "old").read_bytes() == old
