"""The benchmark suite runs end to end at tiny sizes (no timing is asserted)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FS = ("kernel", "fuse-overlayfs", "ovlfuse")
WORKLOADS = ("lookup_depth", "metadata_walk", "readdir", "seq_read", "writes", "memory_walk")


def _mounts() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


@pytest.mark.timeout(240)
@pytest.mark.skipif(not os.path.exists("/usr/bin/fuse-overlayfs"),
                    reason="fuse-overlayfs is not installed")
def test_bench_smoke(tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "trees"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out),
                        "--fs", ",".join(FS), "--tmpdir", str(work)],
                       cwd=REPO, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-4000:]
    # nothing left behind: no mount under the trees, no tree
    assert str(work) not in _mounts()
    assert list(work.iterdir()) == []

    res = json.loads((out / "results.json").read_text())
    assert (out / "benchmarks.md").is_file()
    assert res["meta"]["runs"] == 1
    assert set(res["workloads"]) == set(WORKLOADS)
    for name, w in res["workloads"].items():
        assert w["cases"], name
        for case, cells in w["cases"].items():
            for fs in FS:
                cell = cells[fs]
                where = f"{name} {case} {fs}"
                assert "error" not in cell, f"{where}: {cell.get('error')}"
                assert len(cell["runs"]) == 1, where
                summary = cell["summary"]
                for metric in w["metrics"]:
                    if metric.startswith("daemon_") and fs == "kernel":
                        assert metric not in summary, where
                        continue
                    assert metric in summary, f"{where} {metric}"
                    s = summary[metric]
                    if "na" in s:  # a refused write: "n/a: ERRNO"
                        assert s["na"].startswith("n/a: "), f"{where} {metric}: {s}"
                        continue
                    for key in ("median", "min", "max"):
                        v = s[key]
                        assert isinstance(v, (int, float)) and math.isfinite(v), \
                            f"{where} {metric} {key}={v}"
                        if metric == "daemon_cpu_s":
                            assert v >= 0, f"{where} {metric}={v}"
                        else:
                            assert v > 0, f"{where} {metric}={v}"
        # the three filesystems saw the same tree
        counts = {fs: cells[fs]["summary"]["entries"]["median"]
                  for cells in w["cases"].values() for fs in FS
                  if "entries" in cells[fs]["summary"]}
        assert len(set(counts.values())) <= 1, (name, counts)
