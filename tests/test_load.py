"""Load, races, a big directory and repeated mounts: the daemon stays correct and bounded.

- Eight threads run thousands of seeded mixed calls on shared directories of
  one mount.  Each thread owns its names (and its share of the lower names),
  so every result is checked against that thread's own model, and the final
  tree and upper dir must equal the same calls replayed one thread after
  another on the kernel's overlay.
- A name pair is renamed back and forth while other threads open and list it.
- A 100,000-entry directory split across layers is listed and looked up with
  the daemon's memory bounded.
- One process mounts, writes and unmounts many times with no fd, thread or
  memory growth, and nothing is left behind system-wide.
- Focused checks of what the load found: a hard link removed after its
  directory moved, and a name removed in the middle of a listing.

Nothing here asserts a time: the watchdogs only turn a hang into a failure
with stacks.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import errno
import functools
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

from mounts import is_mounted, kernel_mount, ovlfuse_mount
from ovlfuse.sys.mountinfo import mount_points
from ovlfuse.tools.demo import LayerRef, StoreWriter
from ovlfuse.sys.safeio import RENAME_EXCHANGE, renameat2
from test_write_path import normalized, upper_snapshot
from treesnap import differences, snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
AT_FDCWD = -100
# Hang guards, never timings: a run this late is stuck and fails with stacks (before
# pytest's own 300 s timeout, which gives none of the daemon's).  Each run takes seconds.
WATCHDOG_S = 240


def _whiteout(path: str) -> None:
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def _file(path: str, data: bytes | str, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def _stacks_of(pid: int) -> str:
    """Kernel stacks of every thread of ``pid``: where a stuck daemon waits."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/stack") as f:
                out.append(f"-- {pid}/{tid}\n{f.read()}")
        except OSError as e:
            out.append(f"-- {pid}/{tid}: {e}")
    return "\n".join(out)


def _python_stacks(threads: list[threading.Thread]) -> str:
    frames = sys._current_frames()
    return "\n".join(f"-- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                     for t in threads if t.ident in frames)


def run_threads(targets: list[Callable[[], None]], daemon_pid: int | None) -> list[str]:
    """Run ``targets`` concurrently; the errors they raised, or a failure with stacks if they hang."""
    errors: list[str] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(f"{threading.current_thread().name}: {e!r}")

    threads = [threading.Thread(target=guarded, args=(t,), name=f"worker-{i}", daemon=True)
               for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WATCHDOG_S)
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        daemon = _stacks_of(daemon_pid) if daemon_pid else ""
        pytest.fail(f"{len(stuck)} threads still running after {WATCHDOG_S}s: a deadlock?\n"
                    f"{_python_stacks(stuck)}\n{daemon}")
    return errors


# --- mount cycles ------------------------------------------------------------------

CYCLES = int(os.environ.get("OVLFUSE_MOUNT_CYCLES", "1000"))
# A leak of a quarter kilobyte per mount shows over the measured half of the cycles;
# after the first half, a leak-free process measured +0 to +24 KiB in 500 cycles.
LEAK_BUDGET_PER_CYCLE = 256


def _fuse_connections() -> set[str]:
    return set(os.listdir("/sys/fs/fuse/connections"))


def _allocated_files() -> int:
    with open("/proc/sys/fs/file-nr") as f:
        return int(f.read().split()[0])


def _holders_of(prefix: str) -> list[str]:
    """Processes with a cwd, root or open file under ``prefix``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
            found += [f"{pid}: {target}" for link in links
                      if (target := os.readlink(link)).startswith(prefix)]
        except OSError:
            continue  # the process or fd went away meanwhile
    return found


def test_mount_cycles_leak_nothing(tmp_path):
    """One process mounts, writes and unmounts CYCLES times: no fd, thread, memory or mount is left.

    The cycles run ``daemon.serve`` in one child process (see mountcycles.py),
    which reports its fd count, threads and VmRSS as it goes.  Known limit of
    the method: pyfuse3 3.5 starts its entry-invalidation thread once per
    process and ends it with the first ``main()``, so a later session in the
    same process never sends ``invalidate_entry_async``; these cycles do not
    depend on it (no lower hard links), and the daemon itself serves one
    session per process.
    """
    def fill(diff: str) -> None:
        _file(f"{diff}/lower.txt", "lower\n")
        _file(f"{diff}/gone.txt", "gone\n")

    root, _, top = _two_layers(str(tmp_path / "store"), fill)
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    connections, files = _fuse_connections(), _allocated_files()
    warmup = CYCLES // 2
    try:
        done = subprocess.run([sys.executable, os.path.join(HERE, "mountcycles.py"), root, top.id, mnt,
                               str(CYCLES), str(warmup)], capture_output=True, text=True, timeout=WATCHDOG_S)
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    print(f"mount cycles: {report}")
    assert report["intact"] == CYCLES, "some cycle's writes did not read back"
    samples = report["samples"]
    assert {s["fds"] for s in samples} == {samples[0]["fds"]}, f"fd count changed: {samples}"
    assert max(s["threads"] for s in samples) <= samples[0]["threads"] + 2, f"threads grew: {samples}"
    growth = (samples[-1]["rss_kb"] - samples[0]["rss_kb"]) * 1024
    assert growth <= LEAK_BUDGET_PER_CYCLE * (CYCLES - warmup), f"RSS grew {growth} bytes: {samples}"
    # Nothing left system-wide: no mount, no process holding the tree, no FUSE connection or
    # file handle per cycle (other processes may open a few files meanwhile).
    assert not any(p.startswith(str(tmp_path)) for p in mount_points())
    assert _holders_of(str(tmp_path)) == []
    assert len(_fuse_connections() - connections) < CYCLES // 10
    assert _allocated_files() - files < CYCLES // 2


# --- renames racing with lookups -------------------------------------------------------

RACE_SWAPS = int(os.environ.get("OVLFUSE_RACE_SWAPS", "2000"))
X_DATA = b"X" * 4000  # the lower file that is swapped


def _two_layers(root: str, fill: Callable[[str], None]) -> tuple[str, LayerRef, LayerRef]:
    """A store of one committed lower layer (filled by ``fill``) and an empty container layer."""
    sw = StoreWriter(root, link_length=6)
    base = sw.layer(seed="base")
    fill(base.diff)
    sw.commit(base)
    return sw.root, base, sw.layer(base, seed="top")


@contextlib.contextmanager
def mounted(fs: str, root: str, base: LayerRef, top: LayerRef, mnt: str) -> Iterator[int | None]:
    """The container layer mounted by ``fs``; yields the daemon's PID (None for the kernel)."""
    os.makedirs(mnt, exist_ok=True)
    if fs == "kernel":
        with kernel_mount([base.diff], mnt, upper=top.diff, work=os.path.join(top.dir, "work")):
            yield None
    else:
        with ovlfuse_mount(["--root", root, top.id, mnt], mnt) as proc:
            yield proc.pid


def _observe(path: str, known: dict[int, str]) -> str:
    """What one open of ``path`` shows: "file", "dir", "ENOENT", or a description of a wrong answer."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "ENOENT"
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            data = os.pread(fd, len(X_DATA) + 1, 0)
            kind = "file" if data == X_DATA else f"file with {len(data)} wrong bytes"
        elif stat.S_ISDIR(st.st_mode):
            kind = "dir" if os.listdir(fd) == ["inside"] else f"dir listing {os.listdir(fd)}"
        else:
            kind = f"mode {st.st_mode:o}"
    finally:
        os.close(fd)
    return kind if known.get(st.st_ino) == kind else f"{kind} with ino {st.st_ino}, expected {known}"


def _race(race: str, exchange: bool, daemon_pid: int | None) -> dict[str, int]:
    """Swap a (a lower file) and b (a directory), or rename a <-> b, while readers open and list them."""
    if exchange:
        os.mkdir(f"{race}/b")
        os.mkdir(f"{race}/b/inside")
    known = {os.lstat(f"{race}/a").st_ino: "file"}
    if exchange:
        known[os.lstat(f"{race}/b").st_ino] = "dir"
    a, b = (os.fsencode(f"{race}/{n}") for n in "ab")
    stop = threading.Event()
    tallies: dict[str, int] = {}
    lock = threading.Lock()

    def swapper() -> None:
        try:
            for i in range(RACE_SWAPS):
                if exchange:
                    renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
                else:
                    src, dst = (a, b) if i % 2 == 0 else (b, a)
                    renameat2(AT_FDCWD, src, AT_FDCWD, dst, 0)
        finally:
            stop.set()

    def reader() -> None:
        seen: dict[str, int] = {}
        while not stop.is_set():
            for name in "ab":
                what = _observe(f"{race}/{name}", known)
                seen[what] = seen.get(what, 0) + 1
            listing = sorted(os.listdir(race))
            ok = listing == ["a", "b"] if exchange else listing in (["a"], ["b"])
            key = "listing ok" if ok else f"listing {listing}"
            seen[key] = seen.get(key, 0) + 1
        with lock:
            for k, v in seen.items():
                tallies[k] = tallies.get(k, 0) + v

    assert run_threads([swapper, reader, reader, reader], daemon_pid) == []
    return tallies


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename"])
def test_rename_races_with_lookups(tmp_path, exchange):
    """Never a wrong type or content; with RENAME_EXCHANGE never ENOENT, since both names always exist.

    The same race runs on the kernel's overlay first: what it shows is what ovlfuse must show.
    """
    def fill(diff: str) -> None:
        os.mkdir(f"{diff}/race")
        _file(f"{diff}/race/a", X_DATA)

    tallies = {}
    for fs in ("kernel", "ovlfuse"):
        root, base, top = _two_layers(str(tmp_path / fs), fill)
        mnt = str(tmp_path / f"{fs}-mnt")
        with mounted(fs, root, base, top, mnt) as pid:
            tallies[fs] = _race(f"{mnt}/race", exchange, pid)
    print(f"race tallies: {tallies}")
    allowed = {"file", "dir", "listing ok"} | (set() if exchange else {"ENOENT"})
    for fs in ("kernel", "ovlfuse"):
        assert set(tallies[fs]) <= allowed, f"{fs}: {tallies[fs]}"
        assert tallies[fs].get("file", 0) > 0, f"{fs}: the readers never saw the file: {tallies[fs]}"


# --- load: eight threads of mixed calls on shared directories ----------------------------

THREADS = 8
LOAD_OPS = int(os.environ.get("OVLFUSE_LOAD_OPS", "10000"))
SHARED = ("s0", "s1", "s2", "s3")
# s0: base layer only; s1: base and middle; s2: base, middle and the container layer; s3: container only.
OWN_NAMES = ("L0", "L1", "D", "W", "V", "U", "n0", "n1", "n2", "n3")
NESTED = ("a", "b", "c", "old")
MODES = (0o600, 0o640, 0o755, 0o700, 0o444)


def _load_store(root: str) -> tuple[str, LayerRef]:
    """Every thread's lower names in every shared dir: plain, overridden, whited out, merged dirs."""
    sw = StoreWriter(root, link_length=6)
    base = sw.layer(seed="base")
    middle = sw.layer(base, seed="middle")
    top = sw.layer(middle, seed="top")
    for t in range(THREADS):
        for s in SHARED[:3]:
            d = f"{base.diff}/{s}"
            os.makedirs(f"{d}/t{t}.D", exist_ok=True)
            os.makedirs(f"{d}/t{t}.V", exist_ok=True)
            _file(f"{d}/t{t}.L0", f"base {s} {t} L0\n")
            _file(f"{d}/t{t}.L1", f"base {s} {t} L1\n" * 50)
            os.setxattr(f"{d}/t{t}.L1", "user.orig", f"{t}".encode())
            _file(f"{d}/t{t}.W", "whited out above\n")
            _file(f"{d}/t{t}.D/a", "a\n")
            _file(f"{d}/t{t}.D/b", "b\n", 0o600)
            _file(f"{d}/t{t}.V/old", "old\n")
        for s in SHARED[1:3]:
            d = f"{middle.diff}/{s}"
            os.makedirs(f"{d}/t{t}.D", exist_ok=True)
            _file(f"{d}/t{t}.L1", f"middle {s} {t} L1\n", 0o640)
            _file(f"{d}/t{t}.D/c", "c\n")
            _whiteout(f"{d}/t{t}.W")
            _whiteout(f"{d}/t{t}.V")
        for s in SHARED[2:]:
            os.makedirs(f"{top.diff}/{s}", exist_ok=True)
            _file(f"{top.diff}/{s}/t{t}.U", f"upper {s} {t}\n")
    sw.commit(base)
    sw.commit(middle)
    return sw.root, top


@dataclasses.dataclass(eq=False)
class Obj:
    """One object of a thread's model; hard links are one Obj under several names."""

    kind: str  # "file", "dir" or "symlink"
    mode: int = 0
    data: bytes = b""  # a file's content or a symlink's target
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    children: dict[str, Obj] = dataclasses.field(default_factory=dict)
    has_lower: bool = False  # a directory with lower parts: renaming it gives EXDEV
    nlink: int = 1


def _scan(path: str) -> Obj:
    """The model of one object as a mount shows it (the kernel's mount: the oracle)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return Obj("symlink", data=os.fsencode(os.readlink(path)))
    xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path) if n.startswith("user.")}
    if stat.S_ISDIR(st.st_mode):
        return Obj("dir", stat.S_IMODE(st.st_mode), xattrs=xattrs, has_lower=True,
                   children={n: _scan(f"{path}/{n}") for n in os.listdir(path)})
    with open(path, "rb") as f:
        return Obj("file", stat.S_IMODE(st.st_mode), f.read(), xattrs)


def initial_model(mnt: str, t: int) -> Obj:
    """Thread ``t``'s part of the shared dirs: a root whose children are the shared dirs."""
    prefix = f"t{t}."
    return Obj("dir", children={s: Obj("dir", children={n: _scan(f"{mnt}/{s}/{n}") for n in os.listdir(f"{mnt}/{s}")
                                                          if n.startswith(prefix)})
                                for s in SHARED})


Result = tuple[str, object]
ERR = "error"


def _err(code: int) -> Result:
    return ERR, errno.errorcode[code]


def _short(result: Result) -> str:
    text = repr(result)
    return text if len(text) < 200 else f"{text[:150]}... ({len(text)} chars)"


class Agent:
    """One thread's seeded calls, each checked against the thread's own model before the model moves on."""

    WEIGHTS = {"write": 10, "append": 8, "pwrite": 4, "read": 10, "stat": 12, "listdir": 8, "rename": 8,
               "unlink": 6, "mkdir": 5, "rmdir": 4, "chmod": 5, "truncate": 4, "link": 4, "symlink": 4,
               "setxattr": 4, "peek": 4}

    def __init__(self, t: int, model: Obj) -> None:
        self.t = t
        self.model = model
        self.rng = random.Random(f"load-{t}")
        self.pool = [f"{s}/t{t}.{n}" for s in SHARED for n in OWN_NAMES]
        self.pool += [f"{s}/t{t}.{n}/{m}" for s in SHARED for n in ("D", "V", "n0", "n1") for m in NESTED]
        self.others = [p.replace(f"t{t}.", f"t{u}.") for u in range(THREADS) if u != t for p in self.pool[:40]]
        self.kinds = list(self.WEIGHTS)
        self.weights = list(self.WEIGHTS.values())
        self.done = 0
        self.history: collections.deque[str] = collections.deque(maxlen=12)
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()

    # model lookups: (parent dir, name) or an errno
    def _parent(self, path: str) -> tuple[Obj, str] | int:
        *dirs, name = path.split("/")
        cur = self.model
        for comp in dirs:
            child = cur.children.get(comp)
            if child is None or child.kind == "symlink":  # every symlink dangles
                return errno.ENOENT
            if child.kind != "dir":
                return errno.ENOTDIR
            cur = child
        return cur, name

    def _get(self, path: str) -> tuple[Obj, str, Obj | None] | int:
        found = self._parent(path)
        if isinstance(found, int):
            return found
        parent, name = found
        return parent, name, parent.children.get(name)

    def run(self, root: str, ops: int) -> None:
        for self.done in range(ops):
            kind = self.rng.choices(self.kinds, self.weights)[0]
            name, action, expected, commit = getattr(self, f"_{kind}")()
            try:
                actual: Result = "ok", action(root)
            except OSError as e:
                actual = _err(e.errno)
            if actual != expected:
                raise AssertionError(f"thread {self.t} call {self.done} {name}: expected {_short(expected)}, "
                                     f"got {_short(actual)}; before it: {list(self.history)}")
            self.history.append(name)
            self.outcomes[kind, actual[0]] += 1
            if actual[0] == "ok" and commit is not None:
                commit()

    def _pick(self) -> str:
        return self.rng.choice(self.pool)

    def _data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 17, 100, 700, 5000)))

    # --- each call: (description, action on a mount root, expected result or None, model update)
    def _open_write(self, how: str) -> tuple:
        path, data = self._pick(), self._data()
        at = self.rng.randrange(0, 3000)
        flags = {"write": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "append": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 "pwrite": os.O_RDWR}[how]
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is None:
                expected = _err(errno.ENOENT) if how == "pwrite" else ("ok", len(data))
                if how != "pwrite":
                    def commit() -> None:
                        parent.children[name] = Obj("file", 0o644, data)
            elif obj.kind == "dir":
                expected = _err(errno.EISDIR)
            elif obj.kind == "symlink":
                expected = _err(errno.ENOENT)
            else:
                expected = "ok", len(data)

                def commit() -> None:
                    if how == "write":
                        obj.data = data
                    elif how == "append":
                        obj.data += data
                    elif data:  # an empty write at an offset extends nothing
                        obj.data = obj.data[:at].ljust(at, b"\0") + data + obj.data[at + len(data):]

        def action(root: str) -> int:
            fd = os.open(f"{root}/{path}", flags, 0o644)
            try:
                return os.pwrite(fd, data, at) if how == "pwrite" else os.write(fd, data)
            finally:
                os.close(fd)
        return f"{how} {path} ({len(data)} bytes)", action, expected, commit

    def _write(self) -> tuple:
        return self._open_write("write")

    def _append(self) -> tuple:
        return self._open_write("append")

    def _pwrite(self) -> tuple:
        return self._open_write("pwrite")

    def _target(self, path: str) -> Obj | int:
        """The object ``path`` names with the last symlink followed (every symlink dangles: ENOENT)."""
        got = self._get(path)
        if isinstance(got, int):
            return got
        obj = got[2]
        return errno.ENOENT if obj is None or obj.kind == "symlink" else obj

    def _read(self) -> tuple:
        path = self._pick()
        obj = self._target(path)
        if isinstance(obj, int):
            expected = _err(obj)
        else:
            expected = _err(errno.EISDIR) if obj.kind == "dir" else ("ok", obj.data)

        def action(root: str) -> bytes:
            with open(f"{root}/{path}", "rb") as f:
                return f.read()
        return f"read {path}", action, expected, None

    @staticmethod
    def _stat_of(root: str, path: str) -> tuple:
        full = f"{root}/{path}"
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            return "symlink", os.fsencode(os.readlink(full)), st.st_nlink
        xattrs = sorted((n, os.getxattr(full, n)) for n in os.listxattr(full) if n.startswith("user."))
        if stat.S_ISDIR(st.st_mode):
            return "dir", stat.S_IMODE(st.st_mode), xattrs
        return "file", stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, xattrs

    @staticmethod
    def _model_stat(obj: Obj) -> tuple:
        if obj.kind == "symlink":
            return "symlink", obj.data, obj.nlink
        xattrs = sorted(obj.xattrs.items())
        if obj.kind == "dir":
            return "dir", obj.mode, xattrs
        return "file", obj.mode, len(obj.data), obj.nlink, xattrs

    def _stat(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        if isinstance(got, int):
            expected = _err(got)
        else:
            obj = got[2]
            expected = _err(errno.ENOENT) if obj is None else ("ok", self._model_stat(obj))
        return f"stat {path}", lambda root: self._stat_of(root, path), expected, None

    def _listdir(self) -> tuple:
        if self.rng.random() < 0.5:
            path = self.rng.choice(SHARED)
        else:
            path = self._pick()
        obj = self._target(path)
        if isinstance(obj, int):
            expected = _err(obj)
        else:
            expected = _err(errno.ENOTDIR) if obj.kind != "dir" else ("ok", sorted(obj.children))
        prefix = f"t{self.t}."
        shared = path in SHARED

        def action(root: str) -> list[str] | str:
            names = os.listdir(f"{root}/{path}")
            if len(set(names)) != len(names):
                return f"duplicates in {names}"
            if shared:
                strangers = [n for n in names if not re.fullmatch(r"t\d\..*", n)]
                if strangers:
                    return f"names of no thread: {strangers}"
                names = [n for n in names if n.startswith(prefix)]
            return sorted(names)
        return f"listdir {path}", action, expected, None

    def _rename(self) -> tuple:
        src, dst = self._pick(), self._pick()
        a, b = self._get(src), self._get(dst)
        commit = None
        if isinstance(a, int):
            expected = _err(a)
        elif isinstance(b, int):
            expected = _err(b)
        else:
            (sp, sn, obj), (dp, dn, victim) = a, b
            if obj is None:
                expected = _err(errno.ENOENT)
            elif obj is victim:  # the same name, or two names of one object: nothing happens
                expected = "ok", None
            elif obj.kind == "dir" and dst.startswith(src + "/"):
                expected = _err(errno.EINVAL)
            elif src.startswith(dst + "/"):
                expected = _err(errno.ENOTEMPTY)  # onto its own ancestor
            elif obj.kind == "dir" and victim is not None and victim.kind != "dir":
                expected = _err(errno.ENOTDIR)
            elif obj.kind == "dir" and victim is not None:
                return self._stat()  # dir over dir: not modelled
            elif obj.kind != "dir" and victim is not None and victim.kind == "dir":
                expected = _err(errno.EISDIR)
            elif obj.kind == "dir" and obj.has_lower:
                expected = _err(errno.EXDEV)  # the kernel's default (no redirect_dir)
            else:
                expected = "ok", None

                def commit() -> None:
                    if victim is not None:
                        victim.nlink -= 1
                    del sp.children[sn]
                    dp.children[dn] = obj
        return f"rename {src} {dst}", lambda root: os.rename(f"{root}/{src}", f"{root}/{dst}"), expected, commit

    def _unlink(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is None:
                expected = _err(errno.ENOENT)
            elif obj.kind == "dir":
                expected = _err(errno.EISDIR)
            else:
                expected = "ok", None

                def commit() -> None:
                    obj.nlink -= 1
                    del parent.children[name]
        return f"unlink {path}", lambda root: os.unlink(f"{root}/{path}"), expected, commit

    def _mkdir(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is not None:
                expected = _err(errno.EEXIST)
            else:
                expected = "ok", None

                def commit() -> None:
                    parent.children[name] = Obj("dir", 0o750)
        return f"mkdir {path}", lambda root: os.mkdir(f"{root}/{path}", 0o750), expected, commit

    def _rmdir(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is None:
                expected = _err(errno.ENOENT)
            elif obj.kind != "dir":
                expected = _err(errno.ENOTDIR)
            elif obj.children:
                expected = _err(errno.ENOTEMPTY)
            else:
                expected = "ok", None

                def commit() -> None:
                    del parent.children[name]
        return f"rmdir {path}", lambda root: os.rmdir(f"{root}/{path}"), expected, commit

    def _chmod(self) -> tuple:
        path, mode = self._pick(), self.rng.choice(MODES)
        obj = self._target(path)
        commit = None
        if isinstance(obj, int):
            expected = _err(obj)
        else:
            expected = "ok", None

            def commit() -> None:
                obj.mode = mode
        return f"chmod {path} {mode:o}", lambda root: os.chmod(f"{root}/{path}", mode), expected, commit

    def _truncate(self) -> tuple:
        path, size = self._pick(), self.rng.choice((0, 1, 50, 300, 10000))
        obj = self._target(path)
        commit = None
        if isinstance(obj, int):
            expected = _err(obj)
        elif obj.kind == "dir":
            expected = _err(errno.EISDIR)
        else:
            expected = "ok", None

            def commit() -> None:
                obj.data = obj.data[:size].ljust(size, b"\0")
        return f"truncate {path} {size}", lambda root: os.truncate(f"{root}/{path}", size), expected, commit

    def _link(self) -> tuple:
        src, dst = self._pick(), self._pick()
        a, b = self._get(src), self._get(dst)
        commit = None
        if isinstance(a, int):
            expected = _err(a)
        elif a[2] is None:
            expected = _err(errno.ENOENT)
        elif isinstance(b, int):
            expected = _err(b)
        elif b[2] is not None:
            expected = _err(errno.EEXIST)
        elif a[2].kind == "dir":
            expected = _err(errno.EPERM)
        else:
            obj, (dp, dn, _) = a[2], b
            expected = "ok", None

            def commit() -> None:
                obj.nlink += 1
                dp.children[dn] = obj
        return (f"link {src} {dst}", lambda root: os.link(f"{root}/{src}", f"{root}/{dst}", follow_symlinks=False),
                expected, commit)

    def _symlink(self) -> tuple:
        path = self._pick()
        target = f"/nonexistent-ovlfuse/{self.t}/{self.done}"  # dangles everywhere
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        elif got[2] is not None:
            expected = _err(errno.EEXIST)
        else:
            parent, name, _ = got
            expected = "ok", None

            def commit() -> None:
                parent.children[name] = Obj("symlink", data=target.encode())
        return f"symlink {path}", lambda root: os.symlink(target, f"{root}/{path}"), expected, commit

    def _setxattr(self) -> tuple:
        path = self._pick()
        key, value = f"user.k{self.rng.randrange(3)}", self.rng.randbytes(self.rng.randrange(1, 20))
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        elif got[2] is None:
            expected = _err(errno.ENOENT)
        elif got[2].kind == "symlink":
            expected = _err(errno.EPERM)  # no user.* xattrs on symlinks
        else:
            obj = got[2]
            expected = "ok", None

            def commit() -> None:
                obj.xattrs[key] = value
        return (f"setxattr {path} {key}",
                lambda root: os.setxattr(f"{root}/{path}", key, value, follow_symlinks=False), expected, commit)

    def _peek(self) -> tuple:
        """Another thread's name: whatever it is at this instant, only "no such name" may fail."""
        path = self.rng.choice(self.others)

        def action(root: str) -> None:
            try:
                os.lstat(f"{root}/{path}")
            except (FileNotFoundError, NotADirectoryError):
                pass
        return f"peek {path}", action, ("ok", None), None


@contextlib.contextmanager
def _kernel_view(root: str, top: LayerRef, mnt: str) -> Iterator[None]:
    """The container layer of a copy of a store at ``root``, through the kernel (short relative paths)."""
    own = f"../{os.path.basename(top.dir)}"
    with kernel_mount(top.chain, mnt, upper=f"{own}/diff", work=f"{own}/work", cwd=os.path.join(root, "l")):
        yield


def test_eight_threads_of_mixed_calls_match_kernel(tmp_path):
    """8 x LOAD_OPS seeded calls at once: each as the thread's model expects, the end as on the kernel."""
    source, top = _load_store(str(tmp_path / "source"))
    roots = {fs: str(tmp_path / fs) for fs in ("kernel", "ours")}
    for dest in roots.values():
        subprocess.run(["cp", "-a", source, dest], check=True)
    kmnt, omnt = str(tmp_path / "kmnt"), str(tmp_path / "omnt")
    os.mkdir(kmnt)
    os.mkdir(omnt)
    umask = os.umask(0o022)
    try:
        started = time.time_ns()
        with _kernel_view(roots["kernel"], top, kmnt):
            models = [initial_model(kmnt, t) for t in range(THREADS)]
            fresh = copy.deepcopy(models)
            began = time.monotonic()
            for t in range(THREADS):  # one thread after another: the same calls, no interleaving
                Agent(t, models[t]).run(kmnt, LOAD_OPS)
            kernel_elapsed = time.monotonic() - began
            kernel_tree = normalized(snapshot(kmnt), started)
        with ovlfuse_mount(["--root", roots["ours"], top.id, omnt], omnt) as daemon:
            agents = [Agent(t, fresh[t]) for t in range(THREADS)]
            began = time.monotonic()
            errors = run_threads([functools.partial(a.run, omnt, LOAD_OPS) for a in agents], daemon.pid)
            elapsed = time.monotonic() - began
            ours_tree = normalized(snapshot(omnt), started)
    finally:
        os.umask(umask)
    calls = THREADS * LOAD_OPS
    print(f"load: {THREADS} x {LOAD_OPS} calls in {elapsed:.1f}s, {calls / elapsed:.0f} calls/s "
          f"(kernel, one thread: {calls / kernel_elapsed:.0f} calls/s)")
    assert "\n".join(errors) == ""
    outcomes = sum((a.outcomes for a in agents), collections.Counter())
    print(f"load outcomes: {dict(sorted(outcomes.items()))}")
    assert {kind for kind, status in outcomes if status == "ok"} == set(Agent.WEIGHTS), "some call never succeeded"
    assert "\n".join(differences(kernel_tree, ours_tree)) == ""
    upper = os.path.basename(top.dir)
    assert "\n".join(differences(upper_snapshot(f"{roots['kernel']}/{upper}/diff", started),
                                 upper_snapshot(f"{roots['ours']}/{upper}/diff", started))) == ""


def test_hard_link_removed_after_its_directory_moved(tmp_path):
    """A name removed after a rename moved it leaves the object's node on a name that still exists.

    The load test found this: the node kept the removed name, so the other name's
    stat reported the old link count and its chmod and xattr calls failed with ENOENT.
    """
    def fill(diff: str) -> None:
        os.makedirs(f"{diff}/s0/D")
        _file(f"{diff}/s0/D/old", "old\n")

    def calls(m: str) -> list[object]:
        os.mkdir(f"{m}/s0/n0")
        os.link(f"{m}/s0/D/old", f"{m}/s0/n0/a")
        os.lstat(f"{m}/s0/D/old")
        os.lstat(f"{m}/s0/n0/a")  # the node now serves this name
        os.rename(f"{m}/s0/n0", f"{m}/V")
        os.unlink(f"{m}/V/a")
        os.chmod(f"{m}/s0/D/old", 0o600)
        os.setxattr(f"{m}/s0/D/old", "user.x", b"1")
        st = os.lstat(f"{m}/s0/D/old")
        return [st.st_nlink, stat.filemode(st.st_mode), os.listxattr(f"{m}/s0/D/old")]

    seen = {}
    for fs in ("kernel", "ovlfuse"):
        root, base, top = _two_layers(str(tmp_path / fs), fill)
        with mounted(fs, root, base, top, str(tmp_path / f"{fs}-mnt")):
            seen[fs] = calls(str(tmp_path / f"{fs}-mnt"))
    assert seen["ovlfuse"] == seen["kernel"] == [1, "-rw-------", ["user.x"]]


# --- a 100,000-entry directory ------------------------------------------------------------

BIG = int(os.environ.get("OVLFUSE_BIG_DIR", "100000"))
# Memory the daemon may add per visible name once every name is looked up and listed:
# its Entry with path and Attrs, the index's dict slot and name, a node, and the listing's
# snapshot.  Measured 831 bytes (1,118 while entries kept whole stat_results); the budget
# leaves room for allocator slack, not for a second copy of anything.
BYTES_PER_ENTRY = 1024


def _big_store(root: str) -> tuple[str, LayerRef, LayerRef, list[str]]:
    """BIG visible names in big/: 50% in the base layer (after whiteouts), 20% in the middle, 30% on top."""
    sw = StoreWriter(root, link_length=6)
    layers = [sw.layer(seed="base")]
    layers.append(sw.layer(layers[0], seed="middle"))
    layers.append(sw.layer(layers[1], seed="top"))
    base, middle, top = (f"{layer.diff}/big" for layer in layers)
    for d in (base, middle, top):
        os.mkdir(d)
    whited = BIG // 10
    plan = [(base, "b", BIG // 2 + whited), (middle, "m", BIG // 5), (top, "u", BIG - BIG // 2 - BIG // 5)]
    for d, prefix, count in plan:
        for i in range(count):
            os.close(os.open(f"{d}/{prefix}{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    for i in range(whited):
        _whiteout(f"{middle}/b{i * 6:06d}")
    for layer in layers[:2]:
        sw.commit(layer)
    return sw.root, layers[1], layers[2], [layer.diff for layer in reversed(layers)]  # topmost first


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _listing(big: str) -> dict[str, tuple[int, bool]]:
    """name -> (inode, is a file) from one scandir, with every entry's lstat compared to it."""
    out = {}
    with os.scandir(big) as it:
        for de in it:
            st = de.stat(follow_symlinks=False)
            assert st.st_ino == de.inode(), de.name
            out[de.name] = (de.inode(), de.is_file(follow_symlinks=False))
    return out


def test_big_directory_is_listed_with_bounded_memory(tmp_path):
    """Every name of a BIG-entry merged directory looked up, listed and stat'ed as the kernel shows it.

    Both mounts are read-only views of the same store (the container layer
    as the topmost lower), so the kernel's inode numbers must match exactly.
    """
    root, _, top, lowers = _big_store(str(tmp_path / "store"))
    kmnt, omnt = str(tmp_path / "kmnt"), str(tmp_path / "omnt")
    os.mkdir(kmnt)
    os.mkdir(omnt)
    with kernel_mount(lowers, kmnt):
        expected = _listing(f"{kmnt}/big")
    assert len(expected) == BIG
    with ovlfuse_mount(["--read-only", "--root", root, top.id, omnt], omnt) as daemon:
        os.stat(omnt)
        baseline = _status_kb(daemon.pid, "VmRSS")
        looked_up = {}
        for name in sorted(expected):  # lookups first: each one reaches the daemon
            st = os.lstat(f"{omnt}/big/{name}")
            looked_up[name] = (st.st_ino, stat.S_ISREG(st.st_mode))
        names = subprocess.run(["ls", "-f", f"{omnt}/big"], capture_output=True, check=True).stdout.split(b"\n")
        listed = _listing(f"{omnt}/big")
        peak = _status_kb(daemon.pid, "VmHWM")
    per_entry = (peak - baseline) * 1024 / BIG
    print(f"big dir: {BIG} entries, RSS {baseline} kB after mount, peak {peak} kB: {per_entry:.0f} bytes per entry")
    assert looked_up == expected
    assert sorted(names) == sorted([b"", b".", b".."] + [os.fsencode(n) for n in expected])
    assert listed == expected
    assert per_entry <= BYTES_PER_ENTRY


def test_name_removed_during_a_listing_is_gone_afterwards(tmp_path):
    """A listing that goes on after a name was removed must not bring the name back.

    readdirplus sends attributes with each name: sent from a snapshot taken
    before the removal, they made the kernel cache the removed name again.
    """
    def fill(diff: str) -> None:
        os.mkdir(f"{diff}/d")
        for i in range(400):
            _file(f"{diff}/d/f{i:03d}", "")

    seen = {}
    for fs in ("kernel", "ovlfuse"):
        root, base, top = _two_layers(str(tmp_path / fs), fill)
        mnt = str(tmp_path / f"{fs}-mnt")
        with mounted(fs, root, base, top, mnt):
            with os.scandir(f"{mnt}/d") as it:
                first = next(it).name
                doomed = [f"f{i:03d}" for i in range(400) if f"f{i:03d}" != first]
                for name in doomed:
                    os.unlink(f"{mnt}/d/{name}")
                list(it)
            seen[fs] = sorted(n for n in doomed if os.path.lexists(f"{mnt}/d/{n}"))
            os.mkdir(f"{mnt}/d/{doomed[-1]}")
    assert seen["ovlfuse"] == seen["kernel"] == []


def test_new_symlink_under_a_reused_inode_number(tmp_path):
    """A symlink made under the inode number of a removed one reads its own target.

    The upper filesystem hands a freed inode number to the next new object;
    while the kernel still holds the old node (an O_PATH descriptor here, the
    load test's concurrency there), the new object must not be served as that
    inode: it comes with a new generation, and the old inode goes bad (EIO)
    where the kernel's overlay, which pins the upper inode, keeps showing it.
    """
    def fill(diff: str) -> None:
        os.mkdir(f"{diff}/d")

    wrong = {}
    for fs in ("kernel", "ovlfuse"):
        root, base, top = _two_layers(str(tmp_path / fs), fill)
        d = str(tmp_path / f"{fs}-mnt")
        with mounted(fs, root, base, top, d):
            reused = 0
            mismatches = []
            for i in range(200):
                os.symlink(f"old-{i}", f"{d}/d/old")
                assert os.readlink(f"{d}/d/old") == f"old-{i}"
                held = os.open(f"{d}/d/old", os.O_PATH | os.O_NOFOLLOW)
                old_ino = os.fstat(held).st_ino
                os.unlink(f"{d}/d/old")
                os.symlink(f"new-target-{i}", f"{d}/d/new")
                reused += os.lstat(f"{d}/d/new").st_ino == old_ino
                if os.readlink(f"{d}/d/new") != f"new-target-{i}":
                    mismatches.append(i)
                try:  # the old inode: its attributes (the kernel) or EIO (ovlfuse), never the new one's
                    if os.fstat(held).st_size == len(f"new-target-{i}"):
                        mismatches.append(f"held {i}")
                except OSError as e:
                    assert e.errno == errno.EIO, e
                os.unlink(f"{d}/d/new")
                os.close(held)
            wrong[fs] = mismatches
            print(f"{fs}: inode number reused {reused} times of 200")
    assert wrong == {"kernel": [], "ovlfuse": []}
