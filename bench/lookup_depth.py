"""How path lookup scales with layer depth: kernel overlay vs fuse-overlayfs vs ovlfuse.

Run from the repository root, as root:

    python -m bench.lookup_depth [--depths 1,8,32,128] [--files 2000]
                                 [--missing 10000] [--runs 3] [--json FILE]

For each depth N a tree of N layers is built under a temporary directory.
Every layer has a directory ``d/`` holding one small file of its own, so ``d/``
is a merged directory across all N layers; the bottom layer's ``d/`` also holds
FILES files.  Each filesystem is mounted fresh for every run, the page, dentry
and inode caches are dropped, and then:

* cold:      os.stat() of each of the FILES bottom-layer files, once
* warm:      the same again
* neg cold:  os.stat() of MISSING names that exist in no layer (first pass)
* neg warm:  the same names again (second pass)

Times are reported in microseconds per lookup, as the median over --runs.
Nothing here asserts a timing; the numbers are for reading.

The kernel refuses a mount with a single lowerdir and no upperdir, so at
depth 1 the kernel row uses an empty upperdir (plus workdir) over the one
layer; that row is marked with ``*``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ovlfuse.sys import daemons
from ovlfuse.sys.mountinfo import is_mounted

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
FS_NAMES = ("kernel", "fuse-overlayfs", "ovlfuse")
MOUNT_TIMEOUT = 60.0


# --------------------------------------------------------------------------
# tree building


def build_tree(root: Path, depth: int, files: int) -> list[str]:
    """Create DEPTH layer dirs under ROOT; return their names, top first.

    Names are short (``0``, ``1``, ...) so a deep lowerdir option stays short
    when the mount runs with ROOT as its working directory.
    """
    names = []
    for i in range(depth):
        name = str(i)
        d = root / name / "d"
        d.mkdir(parents=True)
        (d / f"own{i}").write_bytes(b"x\n")
        names.append(name)
    bottom = root / names[-1] / "d"
    for j in range(files):
        (bottom / f"f{j:06d}").write_bytes(b"")
    # index 0 is the top layer, the last one is the bottom
    return names


def lowerdir_option(names: list[str], base: Path | None = None) -> str:
    if base is None:
        return ":".join(names)
    return ":".join(str(base / n).replace("\\", "\\\\").replace(":", "\\:") for n in names)


# --------------------------------------------------------------------------
# mount helpers


class Mount:
    """One mounted filesystem; ``close()`` unmounts it and ends its daemon."""

    def __init__(self, kind: str, root: Path, names: list[str], mnt: Path,
                 upper: str | None = None, work: str | None = None):
        """Mount NAMES (dirs under ROOT, top first) at MNT.

        With UPPER and WORK (dirs under ROOT too) the mount is writable.
        """
        self.kind = kind
        self.mnt = mnt
        self.proc: subprocess.Popen | None = None
        self.log: Path = root / f"{kind}.log"
        self.note = ""
        rw = ""
        if upper is not None:
            rw = f",upperdir={lowerdir_option([upper], root)},workdir={lowerdir_option([work], root)}"
        if kind == "kernel":
            self._mount_kernel(root, names, upper, work)
        elif kind in ("fuse-overlayfs", "ovlfuse"):
            opt = "lowerdir=" + lowerdir_option(names, root) + rw
            # ovlfuse's own spawner: started by PID, waited for, unmounted and ended by PID on close()
            self.daemon = daemons.start(["-o", opt, str(mnt)], str(mnt), timeout=MOUNT_TIMEOUT,
                                        program=[FUSE_OVERLAYFS] if kind == "fuse-overlayfs" else None,
                                        log_path=str(self.log))
            self.proc = self.daemon.proc
        else:
            raise ValueError(kind)

    @property
    def pid(self) -> int | None:
        """The FUSE daemon's PID (None for the kernel's overlay)."""
        return self.proc.pid if self.proc is not None else None

    def _mount_kernel(self, root: Path, names: list[str], upper: str | None = None,
                      work: str | None = None) -> None:
        if upper is not None:
            opt = f"lowerdir={lowerdir_option(names)},upperdir={upper},workdir={work}"
        elif len(names) >= 2:
            opt = "lowerdir=" + lowerdir_option(names)
        else:
            # the kernel needs >= 2 lowers without an upper: add an empty upper
            (root / "ku").mkdir(exist_ok=True)
            (root / "kw").mkdir(exist_ok=True)
            opt = "lowerdir=" + lowerdir_option(names) + ",upperdir=ku,workdir=kw"
            self.note = "*"
        if len(opt) >= 4096:
            raise RuntimeError(f"kernel option string too long ({len(opt)} bytes)")
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opt, str(self.mnt)],
                           cwd=root, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"kernel overlay mount failed: {r.stderr.strip()}")

    def close(self) -> None:
        if self.proc is None:
            if is_mounted(self.mnt):
                r = subprocess.run(["umount", str(self.mnt)], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
            return
        self.daemon.stop()


# --------------------------------------------------------------------------
# measurement


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def time_stats(paths: list[str], expect_missing: bool) -> float:
    """Stat every path once; return microseconds per lookup."""
    stat = os.stat
    t0 = time.perf_counter_ns()
    if expect_missing:
        for p in paths:
            try:
                stat(p)
            except FileNotFoundError:
                pass
            else:
                raise RuntimeError(f"{p} exists but should not")
    else:
        for p in paths:
            stat(p)
    t1 = time.perf_counter_ns()
    return (t1 - t0) / 1000.0 / max(1, len(paths))


def measure_once(kind: str, root: Path, names: list[str], files: int,
                 missing: int) -> tuple[dict, str, bool]:
    mnt = root / f"mnt-{kind}"
    mnt.mkdir(exist_ok=True)
    m = Mount(kind, root, names, mnt)
    try:
        d = str(mnt / "d")
        present = [f"{d}/f{j:06d}" for j in range(files)]
        absent = [f"{d}/nope{j:06d}" for j in range(missing)]
        dropped = drop_caches()
        res = {
            "cold": time_stats(present, False),
            "warm": time_stats(present, False),
            "neg_cold": time_stats(absent, True),
            "neg_warm": time_stats(absent, True),
        }
        return res, m.note, dropped
    finally:
        m.close()


# --------------------------------------------------------------------------
# reporting


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.1f}x"


def print_table(results: dict, depths: list[int], fss: list[str]) -> None:
    head = ["depth", "fs", "cold µs", "warm µs", "neg cold µs", "neg warm µs",
            "cold ovlfuse/kernel", "warm ovlfuse/kernel",
            "cold ovlfuse/fuse-overlayfs", "warm ovlfuse/fuse-overlayfs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for n in depths:
        row_set = results[str(n)]
        for fs in fss:
            r = row_set.get(fs)
            if r is None or "median" not in r:
                err = r.get("error", "failed") if r else "skipped"
                print(f"| {n} | {fs} | {err} | | | | | | | |")
                continue
            med = r["median"]
            cells = [str(n), fs + r.get("note", ""), fmt(med["cold"]), fmt(med["warm"]),
                     fmt(med["neg_cold"]), fmt(med["neg_warm"])]
            if fs == "ovlfuse":
                k = row_set.get("kernel", {}).get("median")
                f = row_set.get("fuse-overlayfs", {}).get("median")
                cells += [ratio(med["cold"], k and k["cold"]), ratio(med["warm"], k and k["warm"]),
                          ratio(med["cold"], f and f["cold"]), ratio(med["warm"], f and f["warm"])]
            else:
                cells += ["", "", "", ""]
            print("| " + " | ".join(cells) + " |")


def parse_depths(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError("depths must be positive integers")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lookup_depth",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=parse_depths, default=[1, 8, 32, 128],
                    help="comma separated layer counts (default 1,8,32,128)")
    ap.add_argument("--files", type=int, default=2000,
                    help="files in the bottom layer's d/ (default 2000)")
    ap.add_argument("--missing", type=int, default=10000,
                    help="missing names looked up per negative pass (default 10000)")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell; median reported")
    ap.add_argument("--fs", default=",".join(FS_NAMES),
                    help="comma separated subset of " + ",".join(FS_NAMES))
    ap.add_argument("--json", metavar="FILE", help="write the raw numbers here")
    ap.add_argument("--tmpdir", help="where to build the layer trees (default: system temp)")
    args = ap.parse_args(argv)

    fss = [f for f in args.fs.split(",") if f]
    bad = [f for f in fss if f not in FS_NAMES]
    if bad:
        ap.error(f"unknown fs: {', '.join(bad)}")
    if os.geteuid() != 0:
        print("warning: not root; kernel overlay mounts and drop_caches will fail",
              file=sys.stderr)

    results: dict = {}
    all_dropped = True
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="ovlb-", dir=args.tmpdir))
    try:
        for n in args.depths:
            root = tmp / f"n{n}"
            root.mkdir()
            names = build_tree(root, n, args.files)
            results[str(n)] = {}
            for fs in fss:
                runs, note, err = [], "", None
                for _ in range(args.runs):
                    try:
                        r, note, dropped = measure_once(fs, root, names, args.files, args.missing)
                    except Exception as e:  # report and carry on with the others
                        err = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
                        break
                    all_dropped &= dropped
                    runs.append(r)
                cell: dict = {"runs": runs}
                if note:
                    cell["note"] = note
                if err:
                    cell["error"] = err
                if runs:
                    cell["median"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                results[str(n)][fs] = cell
                print(f"depth {n:>4} {fs:<15} "
                      + (f"cold {fmt(cell['median']['cold'])} µs" if runs else f"error: {err}"),
                      file=sys.stderr, flush=True)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - started
    print()
    print(f"files={args.files} missing={args.missing} runs={args.runs} (median), "
          f"kernel {platform.release()}, {elapsed:.0f}s total")
    print()
    print_table(results, args.depths, fss)
    if any(results[str(n)].get("kernel", {}).get("note") for n in args.depths):
        print()
        print("\\* kernel at depth 1: one lowerdir plus an empty upperdir "
              "(the kernel refuses a single lowerdir without one)")
    if not all_dropped:
        print()
        print("note: could not write /proc/sys/vm/drop_caches; 'cold' is only a fresh mount")

    if args.json:
        meta = {"files": args.files, "missing": args.missing, "runs": args.runs,
                "depths": args.depths, "fs": fss, "kernel": platform.release(),
                "caches_dropped": all_dropped, "elapsed_s": elapsed,
                "unit": "microseconds per lookup"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
