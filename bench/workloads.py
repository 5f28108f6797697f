"""The benchmark workloads: what is mounted, what is timed, what is reported.

Every ``run`` mounts the filesystem fresh (through ``lookup_depth.Mount``, the
one way this package mounts anything), drops the caches before each cold
measurement and unmounts before it returns.  A run returns a dict of metric
name -> number, or -> ``"n/a: ERRNO"`` where the filesystem refused the
operation.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import trees
from .lookup_depth import Mount, build_tree, drop_caches, time_stats

CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
KERNEL_MAX_DEPTH = 500  # the kernel's overlay stacks at most 500 lowers


@dataclass
class Sizes:
    depths: list[int]           # lookup depth, every filesystem
    fuse_depths: list[int]      # lookup depth, the FUSE filesystems only
    files: int                  # bottom-layer files stat'ed per lookup run
    missing: int                # negative lookups per pass
    rootfs_files: int
    rootfs_layers: int
    bigdir_entries: int
    bigdir_layers: int
    seq_size: int
    rand_reads: int
    new_file: int
    append_sizes: list[int]
    sparse_size: int
    create_files: int
    untar_files: int
    wide_files: int             # files in the memory walk tree


SIZES = {
    "smoke": Sizes(depths=[1, 4], fuse_depths=[], files=20, missing=50,
                   rootfs_files=300, rootfs_layers=3, bigdir_entries=600, bigdir_layers=3,
                   seq_size=4 * MiB, rand_reads=100, new_file=4 * MiB,
                   append_sizes=[4096, 64 << 10, MiB], sparse_size=16 * MiB,
                   create_files=100, untar_files=200, wide_files=2000),
    "quick": Sizes(depths=[1, 8, 32, 128, 500], fuse_depths=[], files=2000, missing=2000,
                   rootfs_files=5000, rootfs_layers=4, bigdir_entries=20000, bigdir_layers=4,
                   seq_size=256 * MiB, rand_reads=2000, new_file=64 * MiB,
                   append_sizes=[4096, MiB, 16 * MiB, 64 * MiB], sparse_size=256 * MiB,
                   create_files=2000, untar_files=2000, wide_files=50000),
    "full": Sizes(depths=[1, 8, 32, 128, 500], fuse_depths=[1000], files=2000, missing=10000,
                  rootfs_files=20000, rootfs_layers=5, bigdir_entries=100000, bigdir_layers=4,
                  seq_size=1024 * MiB, rand_reads=5000, new_file=256 * MiB,
                  append_sizes=[4096, MiB, 64 * MiB, 1024 * MiB], sparse_size=1024 * MiB,
                  create_files=10000, untar_files=10000, wide_files=1000000),
}


def size_label(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n}B"


# --------------------------------------------------------------------------
# daemon accounting


class Meter:
    """CPU time and peak RSS of the FUSE daemons mounted during one run.

    CPU is utime+stime from /proc/PID/stat, counted from the moment the mount
    is live to just before it is unmounted (start-up is not counted); RSS is
    VmHWM from /proc/PID/status, the daemon's lifetime peak, sampled just
    before unmounting.  The kernel's overlay has no daemon: no numbers.
    """

    def __init__(self) -> None:
        self.cpu = 0.0
        self.rss = 0
        self.seen = False

    @staticmethod
    def cpu_of(pid: int) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    @staticmethod
    def hwm_of(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def metrics(self) -> dict:
        if not self.seen:
            return {}
        return {"daemon_cpu_s": self.cpu, "daemon_rss_MB": self.rss / 1e6}


DAEMON_METRICS = {
    "daemon_cpu_s": ("s", "lower", "FUSE daemon CPU time (user+system) while the run's "
                     "mounts were live"),
    "daemon_rss_MB": ("MB", "lower", "FUSE daemon peak resident memory (VmHWM)"),
}


class Bench:
    """Shared state of one benchmark invocation."""

    def __init__(self, tmp: Path, sizes: Sizes, log) -> None:
        self.tmp = tmp
        self.sizes = sizes
        self.log = log
        self.caches_dropped = True
        self._data: tuple[Path, list[str]] | None = None
        self._tarball: Path | None = None
        self.read_ahead: dict[str, set[int]] = {}  # fs -> read_ahead_kb seen on its mounts

    def drop(self) -> None:
        self.caches_dropped &= drop_caches()

    @contextmanager
    def mount(self, fs: str, root: Path, lowers: list[str], meter: Meter,
              upper: str | None = None, work: str | None = None) -> Iterator[Path]:
        mnt = root / f"mnt-{fs}"
        mnt.mkdir(exist_ok=True)
        m = Mount(fs, root, lowers, mnt, upper, work)
        try:
            start = Meter.cpu_of(m.pid) if m.pid else 0.0
            yield mnt
            if m.pid and m.proc.poll() is None:
                st = os.stat(mnt)
                try:
                    with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
                              "/read_ahead_kb") as f:
                        self.read_ahead.setdefault(fs, set()).add(int(f.read()))
                except (OSError, ValueError):
                    pass
                meter.cpu += Meter.cpu_of(m.pid) - start
                meter.rss = max(meter.rss, Meter.hwm_of(m.pid))
                meter.seen = True
        finally:
            m.close()

    def data(self) -> tuple[Path, list[str]]:
        """The big-file layers (built once, shared by seq_read and writes)."""
        if self._data is None:
            root = self.tmp / "data"
            s = self.sizes
            self.log(f"building data layers ({size_label(s.seq_size)} file, appends "
                     f"{', '.join(size_label(a) for a in s.append_sizes)})")
            self._data = (root, trees.build_data(root, s.seq_size, s.append_sizes,
                                                 s.sparse_size))
        return self._data

    def tarball(self) -> Path:
        if self._tarball is None:
            p = self.tmp / "rootfs.tar"
            trees.write_tarball(p, self.sizes.untar_files)
            self._tarball = p
        return self._tarball


def now() -> float:
    return time.perf_counter()


def errno_name(e: OSError) -> str:
    return "n/a: " + errno.errorcode.get(e.errno, str(e.errno))


_STRERROR = {os.strerror(c): n for c, n in errno.errorcode.items()}


def errno_from_message(text: str) -> str:
    """The errno name behind a tool's 'Cannot open: <strerror>' message."""
    for msg, name in sorted(_STRERROR.items(), key=lambda kv: -len(kv[0])):
        if msg in text:
            return "n/a: " + name
    first = text.strip().splitlines()[0] if text.strip() else "failed"
    return "n/a: " + first[:60]


# --------------------------------------------------------------------------
# workloads


class Workload:
    name = ""
    title = ""
    about = ""            # one paragraph for docs/benchmarks.md
    case_label = ""       # what a case key means ("" = one case only)
    metrics: dict = {}    # name -> (unit, "lower"/"higher"/None, meaning)
    max_runs = 0          # > 0: at most this many runs, whatever --runs says

    def __init__(self, b: Bench) -> None:
        self.b = b

    def cases(self) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def applies(self, case: str, fs: str) -> str | None:
        """None, or why FS does not run CASE."""
        return None

    def run(self, state, case: str, fs: str, meter: Meter, i: int) -> dict:
        raise NotImplementedError


class LookupDepth(Workload):
    name = "lookup_depth"
    title = "Lookup depth"
    case_label = "layers"

    def __init__(self, b: Bench) -> None:
        super().__init__(b)
        s = b.sizes
        self.about = (
            f"A chain of N layers; every layer has `d/` with one file of its own, so `d/` is "
            f"merged across all N layers, and only the bottom layer's `d/` holds the "
            f"{s.files} files that are looked up.  One `os.stat` per name, microseconds "
            f"per lookup.  The kernel stacks at most {KERNEL_MAX_DEPTH} layers; at 1 layer "
            f"it is given an empty upper dir (it refuses a single lower without one).")
        self.metrics = {
            "cold": ("µs/lookup", "lower", f"first stat of each of {s.files} bottom-layer "
                     "files, fresh mount, caches dropped"),
            "warm": ("µs/lookup", "lower", "the same stats again"),
            "neg_cold": ("µs/lookup", "lower", f"stat of {s.missing} names that exist in no "
                         "layer, first pass"),
            "neg_warm": ("µs/lookup", "lower", "the same missing names again"),
        }

    def cases(self):
        s = self.b.sizes
        for n in sorted(set(s.depths) | set(s.fuse_depths)):
            root = self.b.tmp / f"depth{n}"
            root.mkdir()
            try:
                names = build_tree(root, n, s.files)
                yield str(n), (root, names)
            finally:
                shutil.rmtree(root, ignore_errors=True)

    def applies(self, case, fs):
        if fs == "kernel" and (int(case) > KERNEL_MAX_DEPTH
                               or int(case) not in self.b.sizes.depths):
            return f"the kernel stacks at most {KERNEL_MAX_DEPTH} layers"
        return None

    def run(self, state, case, fs, meter, i):
        root, names = state
        s = self.b.sizes
        with self.b.mount(fs, root, names, meter) as mnt:
            d = str(mnt / "d")
            present = [f"{d}/f{j:06d}" for j in range(s.files)]
            absent = [f"{d}/nope{j:06d}" for j in range(s.missing)]
            self.b.drop()
            return {
                "cold": time_stats(present, False),
                "warm": time_stats(present, False),
                "neg_cold": time_stats(absent, True),
                "neg_warm": time_stats(absent, True),
            }


def count_find(top: Path) -> int:
    r = subprocess.run(["find", str(top)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError("find failed: " + r.stderr.decode(errors="replace")[:200])
    return r.stdout.count(b"\n")


def lstat_walk(top: Path) -> int:
    """lstat every entry under TOP (TOP included); return the count."""
    n, stack, lstat = 1, [str(top)], os.lstat
    lstat(top)
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = lstat(e.path)
                n += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
    return n


class MetadataWalk(Workload):
    name = "metadata_walk"
    title = "Metadata walk of a root filesystem"

    def __init__(self, b):
        super().__init__(b)
        s = b.sizes
        self.about = (
            f"A generated Debian-like root filesystem of about {s.rootfs_files} files "
            f"(usr/lib, usr/share/doc, locale, man pages, headers, dpkg lists, symlinks, "
            f"sizes mostly under 4 KiB), spread over {s.rootfs_layers} layers; the upper "
            f"layers rewrite 2% of the lower files and delete 1% with whiteouts.  `find "
            f"MNT` and a Python walk (`os.scandir` + `os.lstat` of every entry) each get a "
            f"fresh mount with caches dropped (cold), then run again (warm).")
        self.metrics = {
            "find_cold_s": ("s", "lower", "`find MNT`, fresh mount, caches dropped"),
            "find_warm_s": ("s", "lower", "`find MNT` again"),
            "walk_cold_s": ("s", "lower", "scandir + lstat of everything, fresh mount, "
                            "caches dropped"),
            "walk_warm_s": ("s", "lower", "the same walk again"),
            "entries": ("entries", None, "entries find printed (a check: the same on all "
                        "three)"),
        }

    def cases(self):
        root = self.b.tmp / "rootfs"
        try:
            names = trees.build_rootfs(root, self.b.sizes.rootfs_files, self.b.sizes.rootfs_layers)
            yield "", (root, names)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def run(self, state, case, fs, meter, i):
        root, names = state
        out = {}
        with self.b.mount(fs, root, names, meter) as mnt:
            self.b.drop()
            t = now()
            n = count_find(mnt)
            out["find_cold_s"] = now() - t
            t = now()
            count_find(mnt)
            out["find_warm_s"] = now() - t
        with self.b.mount(fs, root, names, meter) as mnt:
            self.b.drop()
            t = now()
            lstat_walk(mnt)
            out["walk_cold_s"] = now() - t
            t = now()
            lstat_walk(mnt)
            out["walk_warm_s"] = now() - t
        out["entries"] = float(n)
        return out


class Readdir(Workload):
    name = "readdir"
    title = "readdir of a big merged directory"

    def __init__(self, b):
        super().__init__(b)
        s = b.sizes
        self.about = (
            f"One directory `big/` of {s.bigdir_entries} entries, its names spread over "
            f"{s.bigdir_layers} layers.  `os.listdir` (getdents64 until the end) on a "
            f"fresh mount with caches dropped, then again.")
        self.metrics = {
            "listdir_cold_ms": ("ms", "lower", "os.listdir of big/, fresh mount, caches dropped"),
            "listdir_warm_ms": ("ms", "lower", "os.listdir of big/ again"),
            "entries": ("entries", None, "names listed (a check)"),
        }

    def cases(self):
        root = self.b.tmp / "bigdir"
        try:
            names = trees.build_bigdir(root, self.b.sizes.bigdir_entries, self.b.sizes.bigdir_layers)
            yield "", (root, names)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def run(self, state, case, fs, meter, i):
        root, names = state
        with self.b.mount(fs, root, names, meter) as mnt:
            self.b.drop()
            t = now()
            n = len(os.listdir(mnt / "big"))
            cold = now() - t
            t = now()
            os.listdir(mnt / "big")
            warm = now() - t
        return {"listdir_cold_ms": cold * 1e3, "listdir_warm_ms": warm * 1e3,
                "entries": float(n)}


def read_all(path: Path) -> float:
    """Read PATH start to end in 1 MiB reads; return MB/s."""
    buf = bytearray(MiB)
    total = 0
    t = now()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    return total / (now() - t) / 1e6


def rand_reads(path: Path, offsets: list[int]) -> float:
    """4 KiB preads at OFFSETS; return µs per read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pread = os.pread
        t = now()
        for off in offsets:
            pread(fd, 4096, off)
        return (now() - t) * 1e6 / len(offsets)
    finally:
        os.close(fd)


class SeqRead(Workload):
    name = "seq_read"
    title = "Sequential and random reads of a lower file"

    def __init__(self, b):
        super().__init__(b)
        s = b.sizes
        self.about = (
            f"A {size_label(s.seq_size)} file in the lower of two layers.  Sequential: read "
            f"start to end in 1 MiB `read`s, on a fresh mount with caches dropped (cold), "
            f"then again (warm).  Random: {s.rand_reads} 4 KiB `pread`s at random "
            f"4 KiB-aligned offsets after dropping caches again (cold), then the same "
            f"offsets again (warm).")
        self.metrics = {
            "seq_cold_MBps": ("MB/s", "higher", "sequential read, caches dropped"),
            "seq_warm_MBps": ("MB/s", "higher", "sequential read again"),
            "rand_cold_us": ("µs/read", "lower", "4 KiB random pread, caches dropped"),
            "rand_warm_us": ("µs/read", "lower", "the same preads again"),
        }

    def cases(self):
        yield "", self.b.data()

    def run(self, state, case, fs, meter, i):
        root, names = state
        s = self.b.sizes
        rng = random.Random(3)
        offsets = [rng.randrange(s.seq_size // 4096) * 4096 for _ in range(s.rand_reads)]
        with self.b.mount(fs, root, names, meter) as mnt:
            p = mnt / "seq.bin"
            self.b.drop()
            out = {"seq_cold_MBps": read_all(p), "seq_warm_MBps": read_all(p)}
            self.b.drop()
            out["rand_cold_us"] = rand_reads(p, offsets)
            out["rand_warm_us"] = rand_reads(p, offsets)
        return out


def _guard(fn):
    try:
        return fn()
    except OSError as e:
        return errno_name(e)


def write_new(path: Path, size: int) -> float:
    chunk = memoryview(trees._content(MiB))
    t = now()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = size
        while left > 0:
            n = os.write(fd, chunk[:min(left, MiB)])
            left -= n
    finally:
        os.close(fd)
    return size / (now() - t) / 1e6


def append_4k(path: Path) -> float:
    data = trees._content(4096)
    t = now()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        if os.write(fd, data) != 4096:
            raise OSError(errno.EIO, "short write")
    finally:
        os.close(fd)
    return (now() - t) * 1e3


class Writes(Workload):
    name = "writes"
    title = "Writes and copy-up"

    def __init__(self, b):
        super().__init__(b)
        s = b.sizes
        sizes = ", ".join(size_label(a) for a in s.append_sizes)
        self.about = (
            f"A writable mount (a fresh, empty upper dir for every run) over the two layers "
            f"of the read workload, caches dropped first.  In order: write a new "
            f"{size_label(s.new_file)} file in 1 MiB `write`s (open to close, no fsync); "
            f"append 4 KiB to lower files of {sizes} and to a sparse "
            f"{size_label(s.sparse_size)} lower file (4 KiB of data, the rest a hole) — "
            f"open(O_APPEND) + write + close, which is the copy-up; create {s.create_files} "
            f"files of 100 bytes in a new directory, then delete them; `tar -xf` of an "
            f"uncompressed root filesystem tarball of about {s.untar_files} entries into a "
            f"new directory.  A step the filesystem refuses shows `n/a: ERRNO`.")
        self.metrics = {"new_file_MBps": ("MB/s", "higher",
                                          f"writing a new {size_label(s.new_file)} file")}
        for a in s.append_sizes:
            self.metrics[f"append_{size_label(a)}_ms"] = (
                "ms", "lower", f"4 KiB append to a {size_label(a)} lower file (copy-up)")
        self.metrics[f"append_sparse_{size_label(s.sparse_size)}_ms"] = (
            "ms", "lower", f"4 KiB append to a sparse {size_label(s.sparse_size)} lower file")
        self.metrics.update({
            "create_us": ("µs/file", "lower", f"create + write 100 B + close, {s.create_files} files"),
            "delete_us": ("µs/file", "lower", "unlink of each of those files"),
            "untar_s": ("s", "lower", f"tar -xf of a {s.untar_files}-entry rootfs tarball"),
        })

    def cases(self):
        self.b.tarball()
        yield "", self.b.data()

    def run(self, state, case, fs, meter, i):
        root, names = state
        s = self.b.sizes
        upper, work = f"up-{fs}-{i}", f"wk-{fs}-{i}"
        (root / upper).mkdir()
        (root / work).mkdir()
        out: dict = {}
        try:
            with self.b.mount(fs, root, names, meter, upper, work) as mnt:
                self.b.drop()
                out["new_file_MBps"] = _guard(lambda: write_new(mnt / "new.bin", s.new_file))
                for a in s.append_sizes:
                    out[f"append_{size_label(a)}_ms"] = _guard(
                        lambda a=a: append_4k(mnt / f"a{a}.bin"))
                out[f"append_sparse_{size_label(s.sparse_size)}_ms"] = _guard(
                    lambda: append_4k(mnt / "sparse.bin"))
                out.update(self._create_delete(mnt / "many", s.create_files))
                out["untar_s"] = self._untar(mnt / "untar")
        finally:
            shutil.rmtree(root / upper, ignore_errors=True)
            shutil.rmtree(root / work, ignore_errors=True)
        return out

    @staticmethod
    def _create_delete(d: Path, n: int) -> dict:
        try:
            os.mkdir(d)
        except OSError as e:
            return {"create_us": errno_name(e), "delete_us": errno_name(e)}
        names = [f"{d}/f{j:06d}" for j in range(n)]
        data = b"x" * 100
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            t = now()
            for p in names:
                fd = os.open(p, flags, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            create = (now() - t) * 1e6 / n
        except OSError as e:
            return {"create_us": errno_name(e), "delete_us": errno_name(e)}
        try:
            t = now()
            for p in names:
                os.unlink(p)
            delete = (now() - t) * 1e6 / n
        except OSError as e:
            return {"create_us": create, "delete_us": errno_name(e)}
        return {"create_us": create, "delete_us": delete}

    def _untar(self, d: Path):
        try:
            os.mkdir(d)
        except OSError as e:
            return errno_name(e)
        t = now()
        r = subprocess.run(["tar", "-xf", str(self.b.tarball()), "-C", str(d)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        if r.returncode != 0:
            return errno_from_message(r.stderr.decode(errors="replace"))
        return now() - t


class MemoryWalk(Workload):
    name = "memory_walk"
    title = "Memory on a huge tree walk"
    max_runs = 1

    def __init__(self, b):
        super().__init__(b)
        s = b.sizes
        self.about = (
            f"How much memory a daemon needs while the kernel holds a whole tree in its "
            f"caches: {s.wide_files:,} empty files in directories of 1,000, each directory "
            f"merged from 2 layers.  One cold scandir + lstat walk of everything on a fresh "
            f"mount (caches dropped); one run only, whatever `--runs` says, since it is "
            f"about peak memory (`daemon_rss_MB`), not time.")
        self.metrics = {
            "walk_cold_s": ("s", "lower", "scandir + lstat of everything, caches dropped"),
            "entries": ("entries", None, "entries walked (a check)"),
        }

    def cases(self):
        root = self.b.tmp / "wide"
        try:
            names = trees.build_wide(root, self.b.sizes.wide_files, 2)
            yield "", (root, names)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def run(self, state, case, fs, meter, i):
        root, names = state
        with self.b.mount(fs, root, names, meter) as mnt:
            self.b.drop()
            t = now()
            n = lstat_walk(mnt)
            return {"walk_cold_s": now() - t, "entries": float(n)}


WORKLOADS = [LookupDepth, MetadataWalk, Readdir, SeqRead, Writes, MemoryWalk]
