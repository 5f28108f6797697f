"""``ovlfuse verify``: mount a layer read-only with ovlfuse and with the kernel, and diff the views.

Nothing is written to the store.  The kernel reads only its own marker forms,
so when a chain holds OCI ``.wh.`` files or markers of the other xattr
namespace, the kernel is given a private converted copy of those layers
(reflinked where the filesystem allows) in a temporary directory.  Deep chains
are mounted through short symlinks so the kernel's option string stays under
one page.  An ordinary user verifies inside a user namespace (``unshare
-Urm``), where both mounts are possible and the kernel reads ``user.overlay.*``
markers (``-o userxattr``); both views then show the same owner mapping.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from collections.abc import Iterator

from ovlfuse.sys.mountinfo import mount_points
from ovlfuse.tools.diff import compare, report, scan, to_json
from ovlfuse.errors import OvlError
from ovlfuse.tools.layerinfo import census, to_kernel_forms
from ovlfuse.store.plan import MountPlan

def _needs_conversion(userxattr: bool) -> set[str]:
    return {"whiteout-oci", "opaque-oci", "opaque-trusted" if userxattr else "opaque-user"}


class KernelUnavailable(OvlError):
    """No kernel overlay mount can be made here; verify exits 2."""


def _unmount(path: str) -> None:
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if os.path.realpath(path) not in mount_points():
            return
        subprocess.run(cmd, capture_output=True)


@contextmanager
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
    result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, mnt],
                            cwd=links, capture_output=True, text=True)
    if result.returncode != 0:
        why = result.stderr.strip().splitlines()[0] if result.stderr.strip() else f"exit {result.returncode}"
        raise KernelUnavailable(f"the kernel's overlay could not be mounted ({why}); is the overlay module available?")
    try:
        yield mnt
    finally:
        _unmount(mnt)


@contextmanager
def ovlfuse_view(lowers: list[str], tmp: str) -> Iterator[str]:
    """ovlfuse's read-only view of ``lowers``, as a daemon ended by its PID."""
    mnt = os.path.join(tmp, "ovlfuse")
    os.mkdir(mnt)
    pid_file = os.path.join(tmp, "ovlfuse.pid")
    result = subprocess.run([sys.executable, "-m", "ovlfuse", "--pid-file", pid_file, "-o",
                             "lowerdir=" + escape_layers(lowers), mnt], capture_output=True, text=True)
    if result.returncode != 0:
        raise OvlError(result.stderr.strip().removeprefix("ovlfuse: ") or "ovlfuse could not mount the layer")
    pid = int(open(pid_file).read())
    try:
        yield mnt
    finally:
        _unmount(mnt)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)


def _kernel_readable(lowers: list[str], tmp: str, userxattr: bool) -> list[str]:
    """The layers as the kernel must see them: converted private copies where needed."""
    out = []
    for i, diff in enumerate(lowers):
        if not _needs_conversion(userxattr) & set(census(diff)[2]):
            out.append(diff)
            continue
        copy = os.path.join(tmp, f"converted-{i}")
        subprocess.run(["cp", "-a", "--reflink=auto", diff, copy], check=True)
        to_kernel_forms(copy, userxattr)
        out.append(copy)
    return out


def escape_layers(paths: list[str]) -> str:
    """A lowerdir= value: the kernel's escapes for ':' , ',' and '\\'."""
    return ":".join(p.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,") for p in paths)


def _in_user_namespace(plan: MountPlan, times: bool, as_json: bool) -> int:
    """Run verify again as root of a new user and mount namespace."""
    if shutil.which("unshare") is None:
        raise KernelUnavailable("verify needs root, or unshare(1) (util-linux) to use a user namespace")
    command = ["unshare", "-Urm", sys.executable, "-m", "ovlfuse", "verify", "--in-user-namespace",
               plan.label, "-o", "lowerdir=" + escape_layers(plan.as_read_only().lowers)]
    command += ([] if times else ["--no-times"]) + (["--json"] if as_json else [])
    status = subprocess.run(command).returncode
    if status not in (0, 1, 2):
        raise KernelUnavailable(f"could not verify in a user namespace (unshare exit {status}); "
                                "are unprivileged user namespaces enabled?")
    return status


def verify(plan: MountPlan, times: bool = True, as_json: bool = False, userxattr: bool = False) -> int:
    if os.geteuid() != 0:
        return _in_user_namespace(plan, times, as_json)
    lowers = plan.as_read_only().lowers
    with tempfile.TemporaryDirectory(prefix="ovlfuse-verify.") as tmp, ExitStack() as mounts:
        kernel = mounts.enter_context(kernel_view(_kernel_readable(lowers, tmp, userxattr), tmp, userxattr))
        ours = mounts.enter_context(ovlfuse_view(lowers, tmp))
        expected, actual = scan(kernel), scan(ours)
        diffs = compare(kernel, ours, expected, actual, times=times)
        label = f"kernel view of {plan.label}", f"ovlfuse view of {plan.label}"
        if as_json:
            print(to_json(*label, diffs, (len(expected), len(actual))))
        else:
            print(report(*label, diffs, colour=sys.stdout.isatty()))
    return 1 if diffs else 0
