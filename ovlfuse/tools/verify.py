"""``ovlfuse verify``: mount a layer read-only with ovlfuse and with the kernel, and diff the views.

Nothing is written to the store.  The kernel reads only its own marker forms,
so when a chain holds OCI ``.wh.`` files or markers of the other xattr
namespace, the kernel is given a private converted copy of those layers
(reflinked where the filesystem allows) in a temporary directory.  Deep chains
are mounted through short symlinks so the kernel's option string stays under
one page.  An ordinary user verifies inside a user namespace (``unshare
-Urm``), where both mounts are possible and the kernel reads ``user.overlay.*``
markers (``-o userxattr``); both views then show the same owner mapping.

SIGTERM, SIGHUP and SIGINT (a CI timeout, a closed terminal, Ctrl-C) end a
run cleanly: both mounts are unmounted, the daemon is ended by its PID and the
temporary directory removed, and the exit status is 128 + the signal.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from ovlfuse.errors import OvlError
from ovlfuse.store.plan import MountPlan
from ovlfuse.sys import daemons
from ovlfuse.tools.diff import compare, report, scan, to_json
from ovlfuse.tools.layerinfo import census, short_id, to_kernel_forms
from ovlfuse.tools.progress import Progress

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _needs_conversion(userxattr: bool) -> set[str]:
    return {"whiteout-oci", "opaque-oci", "opaque-trusted" if userxattr else "opaque-user"}


class KernelUnavailable(OvlError):
    """No kernel overlay mount can be made here; verify exits 2."""


class Stopped(BaseException):
    """A stop signal arrived: unwind every mount and temporary directory, then exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """Turn SIGTERM, SIGHUP and SIGINT into ``Stopped`` so ``finally`` blocks run; later ones wait for the cleanup."""

    def stop(signum: int, frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # the cleanup itself must not be cut short
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def kernel_view(lowers: list[str], tmp: str, userxattr: bool = False) -> Iterator[str]:
    """A read-only kernel overlay of ``lowers`` (top first)."""
    links = os.path.join(tmp, "k-links")
    os.mkdir(links)
    for i, path in enumerate(lowers):
        os.symlink(path, os.path.join(links, str(i)))
    names = [str(i) for i in range(len(lowers))]
    if len(names) == 1:  # the kernel wants two lowers without an upper
        os.mkdir(os.path.join(links, "empty"))
        names.append("empty")
    mnt = os.path.join(tmp, "kernel")
    os.mkdir(mnt)
    options = ("ro,userxattr," if userxattr else "ro,") + "lowerdir=" + ":".join(names)
    try:  # a signal may cut the mount command short once the mount is made: unmount whatever is there
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, mnt],
                                cwd=links, capture_output=True, text=True)
        if result.returncode != 0:
            why = result.stderr.strip().splitlines()[0] if result.stderr.strip() else f"exit {result.returncode}"
            raise KernelUnavailable(f"the kernel's overlay could not be mounted ({why}); "
                                    "is the overlay module available?")
        yield mnt
    finally:
        daemons.unmount(mnt)


@contextlib.contextmanager
def ovlfuse_view(lowers: list[str], tmp: str) -> Iterator[daemons.Daemon]:
    """ovlfuse's read-only view of ``lowers``, served by a daemon of this very ovlfuse."""
    mnt = os.path.join(tmp, "ovlfuse")
    os.mkdir(mnt)
    with daemons.mounted(["-o", "lowerdir=" + escape_layers(lowers), mnt], mnt,
                         log_path=os.path.join(tmp, "ovlfuse.log")) as daemon:
        yield daemon


def _kernel_readable(lowers: list[str], tmp: str, userxattr: bool, progress: Progress) -> list[str]:
    """The layers as the kernel must see them: converted private copies where needed."""
    out = []
    for i, diff in enumerate(lowers):
        progress.show(f"checking layer {i + 1} of {len(lowers)} for markers the kernel does not read")
        if not _needs_conversion(userxattr) & set(census(diff)[2]):
            out.append(diff)
            continue
        progress.step(f"copying layer {i + 1} of {len(lowers)} with its markers in the kernel's forms")
        copy = os.path.join(tmp, f"converted-{i}")
        subprocess.run(["cp", "-a", "--reflink=auto", diff, copy], check=True)
        to_kernel_forms(copy, userxattr)
        out.append(copy)
    return out


def escape_layers(paths: list[str]) -> str:
    """A lowerdir= value: the kernel's escapes for ':' , ',' and '\\'."""
    return ":".join(p.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,") for p in paths)


def describe(plan: MountPlan) -> str:
    """The layer verified, briefly: a store layer's short id, else the topmost directory; and the depth."""
    lowers = plan.as_read_only().lowers
    depth = f"{len(lowers)} layer{'s' if len(lowers) != 1 else ''}"
    if re.fullmatch(r"[0-9a-f]{12,64}(-init)?", plan.label):
        return f"layer {short_id(plan.label)} ({depth})"
    if plan.label != "ovlfuse":
        return f"{plan.label} ({depth})"
    return f"{lowers[0]} ({depth})"


def _in_user_namespace(plan: MountPlan, times: bool, as_json: bool) -> int:
    """Run verify again as root of a new user and mount namespace; a stop signal is passed on to it."""
    if shutil.which("unshare") is None:
        raise KernelUnavailable("verify needs root, or unshare(1) (util-linux) to use a user namespace")
    command = ["unshare", "-Urm", *daemons.command(), "verify", "--in-user-namespace",
               plan.label, "-o", "lowerdir=" + escape_layers(plan.as_read_only().lowers)]
    command += ([] if times else ["--no-times"]) + (["--json"] if as_json else [])
    child = subprocess.Popen(command, start_new_session=True)
    try:
        status = child.wait()
    except Stopped as stopped:
        child.send_signal(stopped.signum)  # it unmounts, ends its daemon and removes its directory
        child.wait()
        raise
    if status not in (0, 1, 2) and status < 128:
        raise KernelUnavailable(f"could not verify in a user namespace (unshare exit {status}); "
                                "are unprivileged user namespaces enabled?")
    return status


def verify(plan: MountPlan, times: bool = True, as_json: bool = False, userxattr: bool = False) -> int:
    """Exit status: 0 the views are equal, 1 they differ (2, and errors, through ``OvlError``)."""
    if os.geteuid() != 0:
        return _in_user_namespace(plan, times, as_json)
    lowers = plan.as_read_only().lowers
    what = describe(plan)
    progress = Progress()
    with contextlib.ExitStack() as cleanup:
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ovlfuse-verify."))
        cleanup.callback(progress.done)
        readable = _kernel_readable(lowers, tmp, userxattr, progress)
        progress.step(f"mounting the kernel's overlay of {what}")
        kernel = cleanup.enter_context(kernel_view(readable, tmp, userxattr))
        progress.step(f"mounting ovlfuse's view of {what}")
        daemon = cleanup.enter_context(ovlfuse_view(lowers, tmp))
        progress.step("scanning the kernel's view")
        expected = scan(kernel, lambda n: progress.show(f"scanning the kernel's view: {n} entries"))
        progress.step(f"scanning ovlfuse's view ({len(expected)} entries in the kernel's)")
        actual = scan(daemon.mountpoint, lambda n: progress.show(f"scanning ovlfuse's view: {n} entries"))
        progress.step(f"comparing {len(expected)} entries")
        diffs = compare(kernel, daemon.mountpoint, expected, actual, times=times)
        if daemon.proc.poll() is not None:
            raise OvlError(f"the ovlfuse daemon exited (status {daemon.proc.returncode}) while its view was read; "
                           f"its log: {daemon.log().strip()[-300:] or 'empty'}")
    title = f"kernel's and ovlfuse's views of {what}, {len(expected)} entries"
    if as_json:
        print(to_json(f"kernel view of {what}", f"ovlfuse view of {what}", diffs, (len(expected), len(actual))))
    else:
        print(report("kernel", "ovlfuse", diffs, colour=sys.stdout.isatty(), title=title))
    return 1 if diffs else 0
