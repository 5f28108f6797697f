"""Benchmarks: the kernel's overlay, fuse-overlayfs and ovlfuse, side by side.

Run from the repository root, as root:

    .venv/bin/python -m bench --quick          # a few minutes
    .venv/bin/python -m bench --full           # the sizes of the issue
    .venv/bin/python -m bench --smoke --out DIR

Writes DIR/results.json and PNG plots to DIR (default docs/bench), and the
report docs/benchmarks.md when DIR is the default (DIR/benchmarks.md
otherwise).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from . import report
from .lookup_depth import FS_NAMES
from .workloads import DAEMON_METRICS, SIZES, WORKLOADS, Bench, Meter

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "bench"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def summarize(runs: list[dict]) -> dict:
    """Per metric: median, min and max over the runs, or the n/a reason."""
    out = {}
    keys = [k for r in runs for k in r]
    for k in dict.fromkeys(keys):
        vals = [r[k] for r in runs if k in r]
        nums = [v for v in vals if isinstance(v, (int, float))]
        if len(nums) == len(vals) and nums:
            out[k] = {"median": statistics.median(nums), "min": min(nums), "max": max(nums),
                      "n": len(nums)}
        else:
            na = next(v for v in vals if not isinstance(v, (int, float)))
            out[k] = {"na": na, "n": len(nums)}
    return out


def run_workload(wl, fss: list[str], runs: int) -> dict:
    res = {"title": wl.title, "about": wl.about, "case_label": wl.case_label,
           "metrics": {k: {"unit": u, "better": b, "meaning": m}
                       for k, (u, b, m) in {**wl.metrics, **DAEMON_METRICS}.items()},
           "cases": {}}
    with closing(wl.cases()) as cases:
        for case, state in cases:
            cells: dict = {}
            for fs in fss:
                why = wl.applies(case, fs)
                cells[fs] = {"skipped": why} if why else {"runs": []}
            t0 = time.monotonic()
            for i in range(min(runs, wl.max_runs or runs)):  # the filesystems take turns
                for fs in fss:
                    cell = cells[fs]
                    if "skipped" in cell or "error" in cell:
                        continue
                    meter = Meter()
                    try:
                        m = wl.run(state, case, fs, meter, i)
                    except Exception as e:  # report it and go on with the others
                        msg = str(e).strip().splitlines()
                        cell["error"] = (msg[0] if msg else type(e).__name__)[:200]
                        log(f"{wl.name} {case} {fs}: error: {cell['error']}")
                        continue
                    m.update(meter.metrics())
                    cell["runs"].append(m)
            for fs in fss:
                cell = cells[fs]
                if cell.get("runs"):
                    cell["summary"] = summarize(cell["runs"])
            res["cases"][case] = cells
            log(f"{wl.name}{' ' + wl.case_label + '=' + case if case else ''}: "
                f"{time.monotonic() - t0:.1f}s  "
                + "  ".join(f"{fs}: {report.headline(res, case, fs)}" for fs in fss))
    return res


def machine() -> dict:
    def cmd(*argv: str) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout + r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemTotal:"):
                mem = int(ln.split()[1]) * 1024
    try:
        import pyfuse3
        pyfuse3_v = pyfuse3.__version__
    except Exception:
        pyfuse3_v = "?"
    fo = cmd("/usr/bin/fuse-overlayfs", "--version").splitlines()
    dirty = cmd("git", "-C", str(REPO), "status", "--porcelain", "--", "ovlfuse")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_GiB": round(mem / (1 << 30), 1),
        "kernel": os.uname().release,
        "fuse_overlayfs": next((ln for ln in fo if "fuse-overlayfs" in ln), "?"),
        "libfuse": next((ln.split(":")[-1].strip() for ln in fo if "FUSE library" in ln), "?"),
        "python": sys.version.split()[0], "pyfuse3": pyfuse3_v,
        "ovlfuse_commit": cmd("git", "-C", str(REPO), "rev-parse", "--short", "HEAD"),
        "ovlfuse_tree_dirty": bool(dirty),
        "loadavg_at_end": open("/proc/loadavg").read().split()[:3],
        "root_fs": cmd("findmnt", "-no", "FSTYPE", "--target", tempfile.gettempdir()),
    }


def ensure_matplotlib(install: bool) -> str | None:
    """None when matplotlib imports (installing it first if allowed), else why not."""
    if importlib.util.find_spec("matplotlib") is not None:
        return None
    if not install:
        return "matplotlib is not installed"
    log("matplotlib missing: pip install matplotlib")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                       capture_output=True, text=True)
    importlib.invalidate_caches()
    if r.returncode != 0 or importlib.util.find_spec("matplotlib") is None:
        return "matplotlib could not be installed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def check_numbers(results: dict) -> list[str]:
    """Values that are not finite and positive (a sanity check, not timing)."""
    bad = []
    for wname, w in results["workloads"].items():
        for case, cells in w["cases"].items():
            for fs, cell in cells.items():
                for r in cell.get("runs", []):
                    for k, v in r.items():
                        if isinstance(v, float) and not (math.isfinite(v) and
                                                         (v > 0 or k == "daemon_cpu_s")):
                            bad.append(f"{wname} {case} {fs} {k}={v}")
    return bad


def write_outputs(results: dict, out: Path, no_plots: str | None) -> Path:
    """results.json, the plots and the markdown report; returns the report's path."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results["meta"]["plots_skipped"] = no_plots
    results["meta"]["plots"] = None if no_plots else report.plots(results, out)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
        f.write("\n")
    md = out.parent / "benchmarks.md" if out == DEFAULT_OUT.resolve() else out / "benchmarks.md"
    md.write_text(report.markdown(results, os.path.relpath(out, md.parent)))
    return md


def rerender(src: Path, out: Path) -> int:
    results = json.loads(src.read_text())
    md = write_outputs(results, out, ensure_matplotlib(install=True))
    log(f"rewrote {md} and the plots from {src}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes, a few minutes (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the sizes of the issue (1 GiB files, 100,000-entry dir, ...)")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="tiny sizes, seconds: checks that the suite runs")
    ap.add_argument("--fs", default=",".join(FS_NAMES),
                    help="comma separated subset of " + ",".join(FS_NAMES))
    ap.add_argument("--runs", type=int, help="runs per cell (default 5; 1 with --smoke)")
    ap.add_argument("--only", help="comma separated subset of the workloads: "
                    + ",".join(w.name for w in WORKLOADS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default docs/bench)")
    ap.add_argument("--tmpdir", help="where to build the trees (default: system temp)")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="measure nothing: rewrite the report and plots from FILE "
                         "(a results.json) into --out")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out)
    args.mode = args.mode or "quick"
    runs = args.runs or (1 if args.mode == "smoke" else 5)
    if runs < 1:
        ap.error("--runs must be at least 1")
    fss = [f for f in args.fs.split(",") if f]
    bad = [f for f in fss if f not in FS_NAMES]
    if bad:
        ap.error(f"unknown fs: {', '.join(bad)}")
    wls = WORKLOADS
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {w.name for w in WORKLOADS}
        if unknown:
            ap.error(f"unknown workload: {', '.join(sorted(unknown))}")
        wls = [w for w in WORKLOADS if w.name in names]
    if os.geteuid() != 0:
        ap.error("must run as root (kernel overlay mounts, drop_caches)")
    out = args.out.resolve()
    no_plots = ensure_matplotlib(install=args.mode != "smoke")

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally below runs
    def _stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)

    sizes = SIZES[args.mode]
    started = time.time()
    t0 = time.monotonic()
    results = {"meta": {}, "workloads": {}}
    tmp = Path(tempfile.mkdtemp(prefix="ovlbench-", dir=args.tmpdir))
    log(f"mode {args.mode}, runs {runs}, fs {','.join(fss)}, trees in {tmp}")
    try:
        b = Bench(tmp, sizes, log)
        for W in wls:
            wl = W(b)
            log(f"workload {wl.name}")
            results["workloads"][wl.name] = run_workload(wl, fss, runs)
        caches_dropped = b.caches_dropped
        read_ahead = {fs: sorted(v) for fs, v in b.read_ahead.items()}
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"] = {
        "mode": args.mode, "runs": runs, "fs": fss,
        "sizes": vars(sizes), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "elapsed_s": round(time.monotonic() - t0, 1), "caches_dropped": caches_dropped,
        "read_ahead_kb": read_ahead,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
    }
    md = write_outputs(results, out, no_plots)
    log(f"wrote {out / 'results.json'}, {md}"
        + (f"; plots skipped: {no_plots}" if no_plots else f", {len(results['meta']['plots'])} plots"))
    bad_numbers = check_numbers(results)
    for line in bad_numbers:
        log(f"not a positive finite number: {line}")
    return 1 if bad_numbers else 0


if __name__ == "__main__":
    sys.exit(main())
