"""Many mount/write/unmount cycles of one layer in ONE process, which reports its own fds and memory.

A leak per mount (an fd, a thread, a buffer) only shows when one process
mounts many times, so this runs ``daemon.serve`` in the foreground again and
again.  Each cycle a writer thread waits for the mount, copies a lower file
up, creates, writes, reads back, removes a lower name (a whiteout) and
unmounts with ``fusermount3 -u``, which ends ``serve``.  The upper dir is
emptied between cycles, so every cycle does the same work.

    python mountcycles.py STORE_ROOT LAYER_ID MOUNTPOINT CYCLES WARMUP

prints one JSON object: the fd count, VmRSS and thread count sampled from
cycle WARMUP on, VmHWM, how often an unmount was retried because another
process held the mount busy, and the number of cycles whose writes read back
intact.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from ovlfuse.fuse.daemon import ServeOptions, serve
from ovlfuse.sys.mountinfo import mount_points
from ovlfuse.store.plan import plan_from_store


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def status_field(field: str) -> int:
    """A number from /proc/self/status (kB for the Vm* fields)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _write_once(mnt: str, cycle: int) -> bool:
    """One cycle's writes through the mount; True when everything read back as written."""
    data = f"cycle {cycle}\n".encode() * 100
    with open(os.path.join(mnt, "lower.txt"), "ab") as f:  # copy-up: the upper dir is empty
        f.write(data)
    with open(os.path.join(mnt, "new.txt"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    os.unlink(os.path.join(mnt, "gone.txt"))  # a whiteout over a lower file
    with open(os.path.join(mnt, "new.txt"), "rb") as f:
        new_ok = f.read() == data
    with open(os.path.join(mnt, "lower.txt"), "rb") as f:
        lower_ok = f.read() == b"lower\n" + data
    return new_ok and lower_ok and not os.path.lexists(os.path.join(mnt, "gone.txt"))


def _unmount(mnt: str, busy: list[int]) -> bool:
    """``fusermount3 -u``, retried while another process briefly holds the mount busy (counted in ``busy``)."""
    for _ in range(100):
        if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode == 0:
            return True
        busy[0] += 1
        time.sleep(0.05)
    return False


def _cycle(mnt: str, cycle: int, busy: list[int]) -> bool:
    """Wait for the mount, write, unmount; if unmounting fails, SIGTERM makes ``serve`` return anyway."""
    deadline = time.monotonic() + 30
    while mnt not in mount_points():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    try:
        ok = _write_once(mnt, cycle)
    except OSError:
        ok = False
    if not _unmount(mnt, busy):
        os.kill(os.getpid(), signal.SIGTERM)
        return False
    return ok


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def run(root: str, layer: str, mnt: str, cycles: int, warmup: int) -> dict[str, object]:
    plan = plan_from_store(root, layer, read_only=False)
    assert plan.upper is not None
    intact = 0
    step = max(1, (cycles - warmup) // 10)
    samples: list[dict[str, int]] = []
    busy = [0]  # unmounts retried because the mount was busy
    for cycle in range(1, cycles + 1):
        _empty(plan.upper)
        result: list[bool] = []
        writer = threading.Thread(target=lambda: result.append(_cycle(mnt, cycle, busy)))
        writer.start()
        status = serve(plan, mnt, ServeOptions(foreground=True))
        writer.join()
        intact += status == 0 and result == [True]
        if cycle >= warmup and (cycle - warmup) % step == 0 or cycle == cycles:
            gc.collect()
            samples.append({"cycle": cycle, "fds": fd_count(), "rss_kb": status_field("VmRSS"),
                            "threads": status_field("Threads")})
    return {"cycles": cycles, "intact": intact, "busy_retries": busy[0], "hwm_kb": status_field("VmHWM"),
            "samples": samples}


if __name__ == "__main__":
    root_, layer_, mnt_, cycles_, warmup_ = sys.argv[1:]
    print(json.dumps(run(root_, layer_, os.path.realpath(mnt_), int(cycles_), int(warmup_))))
