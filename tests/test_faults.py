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
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mounts import kernel_mount, ovlfuse_mount
from stores import fingerprint


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


def _overlay(kind: str, lowers: list[Path], upper: Path, work: Path, mnt: Path):
    """A kernel or an ovlfuse mount of the same layers."""
    if kind == "kernel":
        return kernel_mount([str(p) for p in lowers], str(mnt), upper=str(upper), work=str(work))
    return ovlfuse_mount(["-o", f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}", str(mnt)],
                         str(mnt))


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
            with _overlay(kind, [lower], upper, work, mnt):
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
        with _overlay("ovlfuse", [lower], upper, work, mnt) as daemon:
            stop = threading.Event()
            failures: list[str] = []
            counts = {"bad": 0, "good": 0}

            def hit_bad_blocks() -> None:
                while not stop.is_set():
                    for call in (lambda: _read(mnt / "big-bad"), lambda: open(mnt / "bad", "r+b").close()):
                        if _errno(call) != "EIO":
                            failures.append("a bad block did not give EIO")
                        counts["bad"] += 1

            def serve_others(n: int) -> None:
                for i in range(150):
                    if _read(mnt / "good") != contents["good"] or _read(mnt / "dir" / "ok") != contents["dir/ok"]:
                        failures.append("a good file read wrong")
                    if not {"bad2", "ok"} | {f"w{n}-{j}" for j in range(i)} <= set(os.listdir(mnt / "dir")):
                        failures.append("a listing was wrong")
                    (mnt / "dir" / f"w{n}-{i}").write_bytes(b"%d\n" % i)
                    os.stat(mnt / "bad")
                    counts["good"] += 1

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
            assert counts["bad"] > 0 and counts["good"] == 300
            assert daemon.poll() is None, "the daemon died"
            assert _read(mnt / "dir" / "w1-149") == b"149\n"
        assert os.listdir(work / "work") == []
        assert sorted(os.listdir(upper)) == ["dir"]


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
        for i in range(10):
            (lower / "names" / f"n{i}").write_text(f"{i}\n")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={UPPER_BYTES},nr_inodes={UPPER_INODES}", "tmpfs",
                        str(upper_fs)], check=True)
        try:
            upper, work = _dirs(upper_fs, "upper", "work")
            with _overlay(kind, [lower], upper, work, mnt) as daemon:
                results[kind] = _fill_upper(mnt, upper_fs, lower)
                # The kernel links its whiteouts to the one it made first, so once it has made one it can
                # still delete a lower file when the upper is out of inodes; ovlfuse makes a new whiteout
                # each time and gets ENOSPC (a rename's whiteout is new on both: ENOSPC above).
                count = 0
                while _write_all(mnt / f"fill{count}", b"") == "ok":
                    count += 1
                whiteouts[kind] = _errno(lambda: os.unlink(mnt / "names" / "n5"))
                if kind == "ovlfuse":
                    assert daemon.poll() is None
                    assert os.listdir(work / "work") == []
            uppers[kind] = [(path, type_) for path, type_ in _tree(upper)
                            if not path.startswith("fill") and path != "names/n5"]
        finally:
            subprocess.run(["umount", str(upper_fs)], check=True)
        assert (lower / "big").read_bytes() == big
    assert results["ovlfuse"] == results["kernel"]
    assert ("fill", "ENOSPC") in results["ovlfuse"] and ("mkdir", "ENOSPC") in results["ovlfuse"]
    assert uppers["ovlfuse"] == uppers["kernel"]
    assert whiteouts == {"kernel": "ok", "ovlfuse": "ENOSPC"}


# --- kill -9 in the middle of changes ---------------------------------------------------------------------
# (kill -9 during a copy-up and during renames: see test_copyup.py)

def _layers(base: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = _dirs(base, "lower", "upper", "work", "mnt")
    return lower, upper, work, mnt


def _ovlfuse_args(lower: Path, upper: Path, work: Path, mnt: Path) -> list[str]:
    return ["-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)]


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
    with ovlfuse_mount(_ovlfuse_args(lower, upper, work, mnt), str(mnt)) as daemon:
        remover = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
        _kill_when(daemon, remover, lambda: len(os.listdir(upper)) >= len(names) // 3)
    whiteouts = set(os.listdir(upper))
    for name in whiteouts:
        st = os.lstat(upper / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, f"{name} in upper is not a whiteout"
    assert len(names) // 3 <= len(whiteouts) < len(names), "the kill did not land in the middle"
    with ovlfuse_mount(_ovlfuse_args(lower, upper, work, mnt), str(mnt)):
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
    with kernel_mount([str(lower)], str(mnt), upper=str(upper), work=str(kernel_work)):
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
for i in range({start}, {stop}):
    os.pwrite(fd, _chunk(i, {flip}), i * CHUNK)
    if i % 8 == 7:
        os.fsync(fd)
        print("synced", (i + 1) * CHUNK, flush=True)
    print("acked", (i + 1) * CHUNK, flush=True)
"""


def _write_in_a_child(path: Path, stop: int, flip: bool) -> tuple[subprocess.Popen, dict[str, int], threading.Thread]:
    """A process that writes chunks 0..stop to ``path``, fsyncing every 8; the dict follows its reports
    (until the thread ends)."""
    code = _WRITER.format(tests=os.path.dirname(__file__), path=str(path), start=0, stop=stop, flip=flip)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    progress = {"acked": 0, "synced": 0}

    def follow() -> None:
        for line in writer.stdout:
            what, count = line.split()
            progress[what] = int(count)

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


def test_killed_while_writing_a_new_file_keeps_every_acknowledged_byte(tmp_path):
    """kill -9 mid-stream: the file is the stream up to at least what write() acknowledged, at most one write more.

    A kill of the daemon loses nothing it has written: its writes are in the
    upper filesystem (in its page cache until that flushes them).  fsync
    through the mount is an fsync of the upper file, for a power cut.
    """
    lower, upper, work, mnt = _layers(tmp_path)
    (lower / "other").write_text("other\n")
    stop = 256
    with ovlfuse_mount(_ovlfuse_args(lower, upper, work, mnt), str(mnt)) as daemon:
        writer, progress, reader = _write_in_a_child(mnt / "new", stop, flip=False)
        _kill_when(daemon, writer, lambda: progress["acked"] >= 32 * CHUNK)
        reader.join()
    acked = progress["acked"]
    assert progress["synced"] <= acked < stop * CHUNK, "the kill did not land in the middle"
    assert sorted(os.listdir(upper)) == ["new"]
    with ovlfuse_mount(_ovlfuse_args(lower, upper, work, mnt), str(mnt)):
        size = os.stat(mnt / "new").st_size
        assert acked <= size <= acked + CHUNK
        assert _common_prefix(mnt / "new", flip=False) == size
        assert sorted(os.listdir(mnt)) == ["new", "other"]
        assert os.listdir(work / "work") == []


def test_killed_while_overwriting_a_copied_up_file_keeps_the_rest_of_the_old_data(tmp_path):
    """kill -9 while a lower file is overwritten: new data up to at least what was acknowledged, old data after."""
    lower, upper, work, mnt = _layers(tmp_path)
    stop = 128
    with open(lower / "old", "wb") as f:
        for i in range(stop):
            f.write(_chunk(i))
    before = fingerprint(str(lower))
    with ovlfuse_mount(_ovlfuse_args(lower, upper, work, mnt), str(mnt)) as daemon:
        writer, progress, reader = _write_in_a_child(mnt / "old", stop, flip=True)
        _kill_when(daemon, writer, lambda: progress["acked"] >= 16 * CHUNK)
        reader.join()
    acked = progress["acked"]
    assert acked < stop * CHUNK, "the kill did not land in the middle"
    assert sorted(os.listdir(upper)) == ["old"]
    with ovlfuse_mount(_ovlfuse_args(lower, upper, work, mnt), str(mnt)):
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
