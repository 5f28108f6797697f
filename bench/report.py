"""Turn results.json into docs/benchmarks.md and PNG plots."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

FS = ("kernel", "fuse-overlayfs", "ovlfuse")
COLORS = {"kernel": "#555555", "fuse-overlayfs": "#1f77b4", "ovlfuse": "#ff7f0e"}
DAEMON = ("daemon_cpu_s", "daemon_rss_MB")


def num(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def med(cell: dict | None, metric: str):
    """Median of METRIC in CELL, the n/a text, or None."""
    if not cell or "summary" not in cell:
        return None
    s = cell["summary"].get(metric)
    if s is None:
        return None
    return s.get("median", s.get("na"))


def cell_text(cell: dict | None, metric: str) -> str:
    if cell is None:
        return "—"
    if "skipped" in cell:
        return "—"
    if "error" in cell and "summary" not in cell:
        return "error"
    s = cell.get("summary", {}).get(metric)
    if s is None:
        return "—"
    if "na" in s:
        return s["na"]
    if s["n"] == 1 or s["min"] == s["max"]:
        return num(s["median"])
    return f"{num(s['median'])} ({num(s['min'])}–{num(s['max'])})"


def ratio_text(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return f"{a / b:.2f}x" if a / b >= 0.1 else f"{a / b:.2g}x"
    return "—"


def headline(res: dict, case: str, fs: str) -> str:
    cell = res["cases"][case][fs]
    if "skipped" in cell:
        return "skipped"
    if "summary" not in cell:
        return "error"
    k = next(iter(res["metrics"]))
    v = med(cell, k)
    return f"{k} {num(v) if isinstance(v, (int, float)) else v}"


# --------------------------------------------------------------------------
# targets


def isnum(*xs) -> bool:
    return all(isinstance(x, (int, float)) for x in xs)


def _against_peer(rows: list[tuple[str, object, object, Callable[[float, float], str]]],
                  holds: Callable[[float, float], bool]) -> tuple[list[str], bool]:
    """One text per (label, ovlfuse, fuse-overlayfs, text) row, and whether ``holds`` was true of every pair.

    A row without both numbers fails the check; one without ovlfuse's is left out.
    """
    parts, ok, seen = [], True, False
    for label, o, f, text in rows:
        if isnum(o, f):
            seen = True
            parts.append(text(o, f))
            ok &= holds(o, f)
        elif o is not None:
            parts.append(f"{label}: ovlfuse {o}")
            ok = False
    return parts, ok and seen


def _targets(results: dict) -> list[str]:
    W = results["workloads"]
    out = []

    def m(wl, case, fs, metric):
        try:
            return med(W[wl]["cases"][case][fs], metric)
        except KeyError:
            return None

    def verdict(ok):
        return "**met**" if ok else "**not met**"

    if "lookup_depth" in W:
        cases = sorted(W["lookup_depth"]["cases"], key=int)
        one, deepest = m("lookup_depth", "1", "ovlfuse", "cold"), None
        for c in cases:
            if int(c) <= 500 and isnum(m("lookup_depth", c, "ovlfuse", "cold")):
                deepest = c
        if deepest and deepest != "1" and isnum(one):
            r = m("lookup_depth", deepest, "ovlfuse", "cold") / one
            out.append(f"- *Cold lookup flat in depth ({deepest} layers within 1.5x of 1 "
                       f"layer):* ovlfuse {num(one)} µs at 1 layer, "
                       f"{num(m('lookup_depth', deepest, 'ovlfuse', 'cold'))} µs at {deepest}: "
                       f"{r:.2f}x — {verdict(r <= 1.5)}.")
        parts, ok = [], True
        for c in cases:
            if int(c) < 32:
                continue
            k, f, o = (m("lookup_depth", c, fs, "cold") for fs in FS)
            if not isnum(o):
                continue
            bits = []
            if isnum(k):
                bits.append(f"kernel {num(k)}")
                ok &= o < k
            if isnum(f):
                bits.append(f"fuse-overlayfs {num(f)}")
                ok &= o < f
            parts.append(f"{c} layers: ovlfuse {num(o)} µs against {', '.join(bits)}")
        if parts:
            out.append("- *Cold lookup faster than both from 32 layers up:* "
                       + "; ".join(parts) + f" — {verdict(ok)}.")
        warm = []
        worst = 0.0
        for metric, label in (("warm", "warm stat"), ("neg_warm", "warm negative lookup")):
            rs = [m("lookup_depth", c, "ovlfuse", metric) / m("lookup_depth", c, "kernel", metric)
                  for c in cases
                  if isnum(m("lookup_depth", c, "ovlfuse", metric), m("lookup_depth", c, "kernel", metric))]
            if rs:
                warm.append(f"{label} {min(rs):.2f}x–{max(rs):.2f}x of the kernel (over depths)")
                worst = max(worst, max(rs))
        o, k = m("seq_read", "", "ovlfuse", "seq_warm_MBps"), m("seq_read", "", "kernel", "seq_warm_MBps")
        if isnum(o, k):
            warm.append(f"warm sequential read {num(o)} MB/s against {num(k)} "
                        f"(time {k / o:.2f}x of the kernel's)")
            worst = max(worst, k / o)
        o, k = m("seq_read", "", "ovlfuse", "rand_warm_us"), m("seq_read", "", "kernel", "rand_warm_us")
        if isnum(o, k):
            warm.append(f"warm 4 KiB random read {num(o)} µs against {num(k)} ({o / k:.2f}x)")
            worst = max(worst, o / k)
        if warm:
            out.append("- *What the kernel serves from its caches within 1.2x of the kernel "
                       "overlay:* " + "; ".join(warm) + f" — {verdict(worst <= 1.2)}.")
    if "metadata_walk" in W:
        parts, ok = [], True
        for metric, label in (("find_cold_s", "find"), ("walk_cold_s", "lstat walk")):
            o, f = m("metadata_walk", "", "ovlfuse", metric), m("metadata_walk", "", "fuse-overlayfs", metric)
            if isnum(o, f):
                parts.append(f"cold {label} {num(o)} s against {num(f)} s ({o / f:.2f}x)")
                ok &= o <= f
        if parts:
            out.append("- *Cold metadata walk and find no slower than fuse-overlayfs:* "
                       + "; ".join(parts) + f" — {verdict(ok)}.")
    parts, ok = _against_peer(
        [(label, m(wl, "", "ovlfuse", metric), m(wl, "", "fuse-overlayfs", metric),
          lambda o, f, label=label: f"{label} {num(o)} MB/s against {num(f)} ({o / f:.2f}x)")
         for wl, metric, label in (("seq_read", "seq_cold_MBps", "cold sequential read"),
                                   ("seq_read", "seq_warm_MBps", "warm sequential read"),
                                   ("writes", "new_file_MBps", "new-file write"))],
        lambda o, f: o >= f)
    if parts:
        out.append("- *Sequential reads and new-file writes at least fuse-overlayfs's "
                   "throughput:* " + "; ".join(parts) + f" — {verdict(ok)}.")
    if "writes" in W:
        mets = [k for k in W["writes"]["metrics"] if k.startswith("append_")]
        parts, ok = _against_peer(
            [(label, m("writes", "", "ovlfuse", k), m("writes", "", "fuse-overlayfs", k),
              lambda o, f, label=label: f"{label}: {num(o)} ms against {num(f)} ms ({ratio_text(o, f)})")
             for k in mets[-2:] for label in (k[len("append_"):-3].replace("_", " "),)],
            lambda o, f: o <= f)
        if parts:
            out.append("- *Copy-up of large files no slower than fuse-overlayfs, sparse files "
                       "far faster:* " + "; ".join(parts) + f" — {verdict(ok)}.")
    parts, ok, full = [], True, True
    for wl, label, target in (("memory_walk", "tree walk", 1_000_000),
                              ("readdir", "directory", 100_000)):
        if wl in W:
            c = W[wl]["cases"][""].get("ovlfuse")
            r, n = med(c, "daemon_rss_MB"), med(c, "entries")
            if isnum(r, n):
                parts.append(f"{label} of {n:,.0f} entries: {num(r)} MB")
                ok &= r < 300
                full &= n >= target
    if parts:
        out.append("- *Peak RSS under 300 MB on a 1,000,000-file tree walk and a "
                   "100,000-entry directory:* ovlfuse " + "; ".join(parts) + " — "
                   + (verdict(ok) if full else
                      f"{verdict(ok)} at these sizes, which are smaller than the target's "
                      "(run --full)") + ".")
    return out


# --------------------------------------------------------------------------
# markdown

INTRO = """\
# Benchmarks

The same workloads on the kernel's overlay, fuse-overlayfs and ovlfuse, in one
run, on one machine.  This page is written by `python -m bench` (the text
lives in `bench/report.py`, the numbers in [{img}/results.json]({img}/results.json)):
edit the generator, not this file.  Image import and export against `docker load`
and `docker save` have their own page, [bench/image.md](bench/image.md), written by
`python -m bench.image`.

## How to reproduce

As root, from the repository root, after `./dev test` (or any set-up that
gives `.venv`), with `fuse-overlayfs` installed:

```sh
.venv/bin/python -m bench --quick     # small sizes, a few minutes
.venv/bin/python -m bench --full      # the sizes of the issue
.venv/bin/python -m bench --smoke --out /tmp/b   # seconds; what the test runs
```

Options: `--fs kernel,fuse-overlayfs,ovlfuse` (a subset), `--runs N` (default
5), `--only WORKLOAD,...`, `--out DIR` (default `docs/bench`; this page is
rewritten only for the default), `--tmpdir DIR`, `--from-json FILE` (redraw
this page and the plots from a results.json, measuring nothing).  matplotlib
is installed into the venv on first use; without it the tables are still
written.

Every workload mounts each filesystem fresh, for every run: the kernel's
overlay with `mount -t overlay`, fuse-overlayfs (`/usr/bin/fuse-overlayfs -f`)
and ovlfuse (`.venv/bin/python -m ovlfuse -f`) as children of the benchmark,
each with its default options.  ovlfuse means to raise its own mount's
`read_ahead_kb` to 1024 when it starts; the read-ahead each FUSE mount really
had is recorded under "This run" (runs from before this was recorded lack it).
The filesystems take turns run by run, so drift on the machine spreads over
all three.  "Cold" means `sync; echo 3 > /proc/sys/vm/drop_caches` right
before the measurement on a fresh mount: page cache, dentries and inodes are
gone, for the overlay and for the disk filesystem under it.  "Warm" is the
same thing again right after.  Nothing is fsync'ed.

## How to read the tables

Each cell is the median over the runs, with the minimum–maximum in brackets.
The ratio columns divide ovlfuse's median by the kernel's and by
fuse-overlayfs's, for the number as shown: for times (s, ms, µs) below 1 means
ovlfuse is faster; for MB/s above 1 means ovlfuse is faster.  `n/a: ERRNO` is
the error a filesystem answered to that step (a read-only or unfinished write
path), `—` means not run (the kernel stacks at most 500 layers).
`daemon_cpu_s` is the FUSE daemon's user+system CPU time while the run's
mounts were live (start-up excluded), `daemon_rss_MB` its peak resident memory
(VmHWM); the kernel has no daemon.  Absolute times on a virtual machine are
inflated; the ratios are what carry over.
"""


def markdown(results: dict, img: str) -> str:
    meta = results["meta"]
    mach = meta["machine"]
    lines = [INTRO.format(img=img)]
    lines.append("## This run\n")
    lines.append(f"- Command: `{meta['command'].strip()}` ({meta['mode']} sizes), "
                 f"{meta['runs']} runs per cell, started {meta['started']}, "
                 f"took {meta['elapsed_s'] / 60:.1f} min.")
    lines.append(f"- Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_GiB']} GiB "
                 f"memory; Linux {mach['kernel']}; trees on {mach['root_fs'] or '?'}"
                 + (f"; load average {' '.join(mach['loadavg_at_end'])} when the run ended "
                    "(other work on the machine inflates the numbers)"
                    if mach.get("loadavg_at_end") else "") + ".")
    lines.append(f"- {mach['fuse_overlayfs']}, libfuse {mach['libfuse']}; Python "
                 f"{mach['python']}, pyfuse3 {mach['pyfuse3']}; ovlfuse at "
                 f"{mach['ovlfuse_commit']}"
                 + (" with uncommitted changes in ovlfuse/ (work in progress by then)"
                    if mach["ovlfuse_tree_dirty"] else "") + ".")
    if meta.get("read_ahead_kb"):
        lines.append("- `read_ahead_kb` of the FUSE mounts, read just before unmounting: "
                     + ", ".join(f"{fs} {'/'.join(map(str, v))}"
                                 for fs, v in meta["read_ahead_kb"].items()) + ".")
    if not meta["caches_dropped"]:
        lines.append("- **Caches could not be dropped**: cold numbers are only fresh mounts.")
    if meta.get("plots_skipped"):
        lines.append(f"- Plots skipped: {meta['plots_skipped']}.")
    lines.append("")
    t = _targets(results)
    if t:
        lines.append("## Where ovlfuse stands against the targets\n")
        lines.append("The targets of issue 6, with this run's medians.\n")
        lines += t
        lines.append("")
    plots = set(meta.get("plots") or [])
    for n, (name, w) in enumerate(results["workloads"].items(), 1):
        lines.append(f"## {n}. {w['title']}\n")
        lines.append(w["about"] + "\n")
        if f"{name}.png" in plots:
            lines.append(f"![{w['title']}]({img}/{name}.png)\n")
        lines.append("| metric | meaning |")
        lines.append("|---|---|")
        for k, d in w["metrics"].items():
            lines.append(f"| `{k}` | {d['meaning']} ({d['unit']}"
                         + (f", {d['better']} is better" if d["better"] else "") + ") |")
        lines.append("")
        fss = [fs for fs in FS if fs in meta["fs"]]
        lead = [w["case_label"]] if w["case_label"] else []
        head = lead + ["metric", "unit"] + fss
        if "ovlfuse" in fss:
            head += [f"ovlfuse/{fs}" for fs in fss if fs != "ovlfuse"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for case, cells in w["cases"].items():
            for k, d in w["metrics"].items():
                if not any(k in c.get("summary", {}) for c in cells.values()):
                    continue
                row = ([case] if lead else []) + [f"`{k}`", d["unit"]]
                row += [cell_text(cells.get(fs), k) for fs in fss]
                if "ovlfuse" in fss:
                    o = med(cells.get("ovlfuse"), k)
                    row += [ratio_text(o, med(cells.get(fs), k)) for fs in fss if fs != "ovlfuse"]
                lines.append("| " + " | ".join(row) + " |")
        errs = [f"{case} {fs}: {c['error']}" for case, cells in w["cases"].items()
                for fs, c in cells.items() if "error" in c]
        if errs:
            lines.append("")
            lines.append("Errors: " + "; ".join(errs))
        lines.append("")
    lines.append("## 6. Daemon CPU time and peak memory, all workloads\n")
    lines.append("The `daemon_cpu_s` and `daemon_rss_MB` rows above, gathered.\n")
    head = ["workload", "case", "fuse-overlayfs CPU s", "ovlfuse CPU s",
            "fuse-overlayfs peak RSS MB", "ovlfuse peak RSS MB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for name, w in results["workloads"].items():
        for case, cells in w["cases"].items():
            row = [name, case or "—"]
            row += [cell_text(cells.get(fs), "daemon_cpu_s") for fs in ("fuse-overlayfs", "ovlfuse")]
            row += [cell_text(cells.get(fs), "daemon_rss_MB") for fs in ("fuse-overlayfs", "ovlfuse")]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# plots


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fss = [fs for fs in FS if fs in results["meta"]["fs"]]
    for name, w in results["workloads"].items():
        if name == "lookup_depth":
            fig = _plot_depth(plt, w, fss)
        else:
            fig = _plot_bars(plt, w, fss)
        if fig is None:
            continue
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}.png")
    return made


def _plot_depth(plt, w, fss):
    from matplotlib import ticker

    metrics = [k for k in ("cold", "warm", "neg_cold", "neg_warm") if k in w["metrics"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    titles = {"cold": "cold stat (first lookup)", "warm": "warm stat (repeat)",
              "neg_cold": "negative lookup, first pass", "neg_warm": "negative lookup, repeat"}
    for ax, k in zip(axes.flat, metrics):
        for fs in fss:
            xs, ys, lo, hi = [], [], [], []
            for case, cells in sorted(w["cases"].items(), key=lambda kv: int(kv[0])):
                s = cells.get(fs, {}).get("summary", {}).get(k)
                if s and "median" in s:
                    xs.append(int(case))
                    ys.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=fs,
                            color=COLORS[fs])
        ax.set_xscale("log")
        ax.set_yscale("log")
        depths = sorted(int(c) for c in w["cases"])
        ax.set_xticks(depths)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        lo, hi = ax.get_ylim()
        subs = (1, 2, 5) if hi / lo >= 8 else (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(titles[k])
        ax.set_xlabel("layers")
        ax.set_ylabel("µs per lookup")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Lookup cost against layer depth (median, min–max bars)")
    fig.tight_layout()
    return fig


def _plot_bars(plt, w, fss):
    cells = w["cases"].get("")
    if cells is None:
        return None
    metrics = [k for k in w["metrics"] if k != "entries"
               and any(k in c.get("summary", {}) for c in cells.values())]
    if not metrics:
        return None
    ncol = min(4, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, metrics):
        d = w["metrics"][k]
        for i, fs in enumerate(fss):
            s = cells.get(fs, {}).get("summary", {}).get(k)
            if s and "median" in s:
                ax.bar(i, s["median"], color=COLORS[fs],
                       yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], capsize=3)
            elif s and "na" in s:
                ax.text(i, 0.05, s["na"].replace("n/a: ", "n/a\n"), ha="center",
                        va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
            elif fs == "kernel" and k in DAEMON:
                ax.text(i, 0.05, "no\ndaemon", ha="center", va="bottom", fontsize=8,
                        transform=ax.get_xaxis_transform())
        ax.set_xlim(-0.6, len(fss) - 0.4)
        ax.set_xticks(range(len(fss)))
        ax.set_xticklabels([fs.replace("fuse-overlayfs", "fuse-\noverlayfs") for fs in fss],
                           fontsize=8)
        better = {"lower": " ↓", "higher": " ↑"}.get(d["better"], "")
        ax.set_title(f"{k}\n{d['unit']}{better}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{w['title']} (median, min–max bars; ↓ lower / ↑ higher is better)",
                 fontsize=10)
    fig.tight_layout()
    return fig
