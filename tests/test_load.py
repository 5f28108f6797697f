"""Load, races, a big directory and repeated mounts: the daemon stays correct and bounded.

- Eight threads run thousands of seeded mixed calls on shared directories of
  one mount.  Each thread owns its names (and its share of the lower names),
  so every result is checked against that thread's own model, and the final
  tree and upper dir must equal the same calls replayed one thread after
  another on the kernel's overlay (the model checker: loadmodel.py).
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
import copy
import errno
import functools
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from differential import normalized, upper_snapshot
from loadmodel import THREADS, WATCHDOG_S, Agent, initial_model, load_store, run_threads
from mounts import is_mounted
from overlaypair import Layers, Mounted, mount, on_both
from ovlfuse.sys.mountinfo import mount_points
from ovlfuse.tools.demo import StoreWriter
from ovlfuse.sys.safeio import RENAME_EXCHANGE, renameat2
from stores import device_whiteout, write
from treesnap import differences, snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
AT_FDCWD = -100
LOAD_OPS = int(os.environ.get("OVLFUSE_LOAD_OPS", "10000"))

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
        write(f"{diff}/lower.txt", "lower\n")
        write(f"{diff}/gone.txt", "gone\n")

    root, layer_id = _two_layers(tmp_path / "store", fill).store
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    connections, files = _fuse_connections(), _allocated_files()
    warmup = CYCLES // 2
    try:
        done = subprocess.run([sys.executable, os.path.join(HERE, "mountcycles.py"), root, layer_id, mnt,
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


def _two_layers(where: str | os.PathLike, fill: Callable[[str], None]) -> Layers:
    """A store in ``where/store`` of one committed lower layer (filled by ``fill``) and an empty container layer."""
    sw = StoreWriter(os.path.join(where, "store"), link_length=6)
    base = sw.layer(seed="base")
    fill(base.diff)
    sw.commit(base)
    return Layers.of_layer(sw.root, sw.layer(base, seed="top"))


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
        write(f"{diff}/race/a", X_DATA)

    tallies = on_both(tmp_path, lambda d: _two_layers(d, fill),
                      lambda m: _race(f"{m.path}/race", exchange, m.pid))
    print(f"race tallies: {tallies}")
    allowed = {"file", "dir", "listing ok"} | (set() if exchange else {"ENOENT"})
    for fs in ("kernel", "ovlfuse"):
        assert set(tallies[fs]) <= allowed, f"{fs}: {tallies[fs]}"
        assert tallies[fs].get("file", 0) > 0, f"{fs}: the readers never saw the file: {tallies[fs]}"


# --- load: eight threads of mixed calls on shared directories ----------------------------


def test_eight_threads_of_mixed_calls_match_kernel(tmp_path):
    """8 x LOAD_OPS seeded calls at once: each as the thread's model expects, the end as on the kernel."""
    source, top = load_store(str(tmp_path / "source"))
    roots = {fs: str(tmp_path / fs) for fs in ("kernel", "ours")}
    for dest in roots.values():
        subprocess.run(["cp", "-a", source, dest], check=True)
    layers = {fs: Layers.of_layer(root, top) for fs, root in roots.items()}
    kmnt, omnt = str(tmp_path / "kmnt"), str(tmp_path / "omnt")
    os.mkdir(kmnt)
    os.mkdir(omnt)
    umask = os.umask(0o022)
    try:
        started = time.time_ns()
        with mount("kernel", layers["kernel"], kmnt):
            models = [initial_model(kmnt, t) for t in range(THREADS)]
            fresh = copy.deepcopy(models)
            began = time.monotonic()
            for t in range(THREADS):  # one thread after another: the same calls, no interleaving
                Agent(t, models[t]).run(kmnt, LOAD_OPS)
            kernel_elapsed = time.monotonic() - began
            kernel_tree = normalized(snapshot(kmnt), started)
        with mount("ovlfuse", layers["ours"], omnt) as daemon:
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
    assert "\n".join(differences(upper_snapshot(layers["kernel"].upper, started),
                                 upper_snapshot(layers["ours"].upper, started))) == ""


def test_hard_link_removed_after_its_directory_moved(tmp_path):
    """A name removed after a rename moved it leaves the object's node on a name that still exists.

    The load test found this: the node kept the removed name, so the other name's
    stat reported the old link count and its chmod and xattr calls failed with ENOENT.
    """
    def fill(diff: str) -> None:
        os.makedirs(f"{diff}/s0/D")
        write(f"{diff}/s0/D/old", "old\n")

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

    seen = on_both(tmp_path, lambda d: _two_layers(d, fill), lambda m: calls(str(m.path)))
    assert seen["ovlfuse"] == seen["kernel"] == [1, "-rw-------", ["user.x"]]


# --- a 100,000-entry directory ------------------------------------------------------------

BIG = int(os.environ.get("OVLFUSE_BIG_DIR", "100000"))
# Memory the daemon may add per visible name once every name is looked up and listed:
# its Entry with path and Attrs, the index's dict slot and name, a node, and the listing's
# snapshot.  Measured 831 bytes (1,118 while entries kept whole stat_results); the budget
# leaves room for allocator slack, not for a second copy of anything.
BYTES_PER_ENTRY = 1024


def _big_store(root: str) -> Layers:
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
        device_whiteout(f"{middle}/b{i * 6:06d}")
    for layer in layers[:2]:
        sw.commit(layer)
    return Layers.of_layer(sw.root, layers[2], read_only=True)


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
    layers = _big_store(str(tmp_path / "store"))
    kmnt, omnt = str(tmp_path / "kmnt"), str(tmp_path / "omnt")
    os.mkdir(kmnt)
    os.mkdir(omnt)
    with mount("kernel", layers, kmnt):
        expected = _listing(f"{kmnt}/big")
    assert len(expected) == BIG
    with mount("ovlfuse", layers, omnt) as daemon:
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
            write(f"{diff}/d/f{i:03d}", "")

    def scenario(m: Mounted) -> list[str]:
        with os.scandir(f"{m.path}/d") as it:
            first = next(it).name
            doomed = [f"f{i:03d}" for i in range(400) if f"f{i:03d}" != first]
            for name in doomed:
                os.unlink(f"{m.path}/d/{name}")
            list(it)
        left = sorted(n for n in doomed if os.path.lexists(f"{m.path}/d/{n}"))
        os.mkdir(f"{m.path}/d/{doomed[-1]}")
        return left

    seen = on_both(tmp_path, lambda d: _two_layers(d, fill), scenario)
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

    def scenario(m: Mounted) -> list[object]:
        d = str(m.path)
        reused = 0
        mismatches: list[object] = []
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
        print(f"{m.fs}: inode number reused {reused} times of 200")
        return mismatches

    wrong = on_both(tmp_path, lambda d: _two_layers(d, fill), scenario)
    assert wrong == {"kernel": [], "ovlfuse": []}
