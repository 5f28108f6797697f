"""The upper dir byte for byte as the kernel writes it, in the corners where the two once differed.

- A whiteout is written only where a lower object would show through the
  name, by the lookup's own rule: a lower object hidden by an opaque part of
  the parent, or by a whiteout above it, needs none.
- A directory moved into a merged directory is marked opaque before the
  rename runs, so the mark stays when the rename then fails.
Each sequence runs on a kernel overlay and on ovlfuse over copies of the
same layers; every result and the upper dirs must match.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable

from mounts import kernel_mount, ovlfuse_mount
from stores import device_whiteout, write
from differential import upper_snapshot
from treesnap import differences


def _layers(base: str) -> None:
    """L1 over L2; L1's parts of p and q are opaque, so L2's names in them never show (q has an upper part too)."""
    l1, l2 = f"{base}/l1", f"{base}/l2"
    for d in (f"{l1}/p", f"{l2}/p", f"{l2}/p/zdir", f"{base}/upper/q", f"{l1}/q", f"{l2}/q", f"{base}/work",
              f"{l1}/m", f"{l2}/m"):
        os.makedirs(d, exist_ok=True)
    for opaque in (f"{l1}/p", f"{l1}/q"):
        os.setxattr(opaque, "trusted.overlay.opaque", b"y")
    write(f"{l2}/q/z", "hidden below an opaque middle part\n")
    write(f"{l1}/p/seen", "seen\n")
    for name in ("z", "z2", "z3"):
        write(f"{l2}/p/{name}", "hidden below an opaque part\n")
    write(f"{l2}/p/zdir/inner", "hidden\n")
    write(f"{l2}/m/gone", "whited out in l1\n")
    device_whiteout(f"{l1}/m/gone")
    write(f"{l2}/m/kept", "shows through\n")
    for d in (l1, l2, f"{base}/upper"):
        for sub in ("p", "q", "m", ""):
            if os.path.isdir(f"{d}/{sub}"):
                os.utime(f"{d}/{sub}", ns=(10**9, 10**9))


def _opts(base: str) -> str:
    return f"lowerdir={base}/l1:{base}/l2,upperdir={base}/upper,workdir={base}/work"


def _call(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)


def _whiteouts_and_marks(m: str) -> list[object]:
    def new(path: str) -> None:
        with open(f"{m}/{path}", "w") as f:
            f.write("new\n")
    steps: list[Callable[[], object]] = [
        # names whose only lower objects are hidden by the opaque part of p: no whiteout
        lambda: new("p/z"), lambda: os.unlink(f"{m}/p/z"),
        lambda: new("p/z2"), lambda: os.rename(f"{m}/p/z2", f"{m}/p/moved"),
        lambda: os.mkdir(f"{m}/p/zdir"), lambda: os.rmdir(f"{m}/p/zdir"),
        lambda: new("q/z"), lambda: os.unlink(f"{m}/q/z"),
        # a name whited out in a higher lower layer: no whiteout either
        lambda: new("m/gone"), lambda: os.unlink(f"{m}/m/gone"),
        # a lower object that shows through: a whiteout
        lambda: os.unlink(f"{m}/m/kept"), lambda: os.unlink(f"{m}/p/seen"),
        lambda: sorted(os.listdir(f"{m}/p")), lambda: sorted(os.listdir(f"{m}/m")),
        # a directory moved into a merged directory over a non-empty upper-only one: refused, but marked
        lambda: os.mkdir(f"{m}/n"), lambda: os.mkdir(f"{m}/m/x"), lambda: new("m/x/f"),
        lambda: os.rename(f"{m}/n", f"{m}/m/x"),
        lambda: os.mkdir(f"{m}/n2"), lambda: os.rename(f"{m}/n2", f"{m}/m/y"),
    ]
    return [_call(step) for step in steps]


def test_whiteouts_and_opaque_marks_as_the_kernel_writes_them(tmp_path):
    kbase, obase = str(tmp_path / "kernel"), str(tmp_path / "ours")
    _layers(kbase)
    subprocess.run(["cp", "-a", kbase, obase], check=True)  # devices, xattrs and links too
    kmnt, omnt = str(tmp_path / "kmnt"), str(tmp_path / "omnt")
    os.mkdir(kmnt)
    os.mkdir(omnt)
    started = time.time_ns() - 10**9  # file times come from a coarser clock
    with kernel_mount([f"{kbase}/l1", f"{kbase}/l2"], kmnt, upper=f"{kbase}/upper", work=f"{kbase}/work"):
        kernel = _whiteouts_and_marks(kmnt)
    with ovlfuse_mount(["-o", _opts(obase), omnt], omnt):
        ours = _whiteouts_and_marks(omnt)
    assert ours == kernel
    assert differences(upper_snapshot(f"{kbase}/upper", started), upper_snapshot(f"{obase}/upper", started)) == []
    assert os.getxattr(f"{obase}/upper/n", "trusted.overlay.opaque") == b"y"
    for needless in ("p/z", "q/z", "m/gone"):
        assert not os.path.lexists(f"{obase}/upper/{needless}")
