"""Start a FUSE daemon as a child process, wait until its mount is live, and end it by its PID.

One way for ``verify``, the tests and the benchmarks to run ovlfuse (or
fuse-overlayfs) beside themselves.  The child runs in the foreground in a
session of its own, so a signal meant for the caller (a terminal's Ctrl-C, a
CI timeout's SIGTERM to the process group) does not unmount the view the
caller is still reading; the caller ends it with ``Daemon.stop``.

An ovlfuse child runs the very package this process imported, whatever the
current directory or ``PYTHONPATH`` holds: it is started with ``python -I``
(no script or current directory, no ``PYTHON*`` variables, no user site) and
given this process's import path explicitly.  ``python -m ovlfuse`` would put
the current directory first, and a folder named ``ovlfuse`` there (a clone
in one's home) would be imported instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import ovlfuse
from ovlfuse.errors import OvlError
from ovlfuse.sys.mountinfo import find

_BOOT = "import sys; sys.path[:] = {paths!r}; from ovlfuse.cli import main; sys.exit(main(sys.argv[1:]))"


def import_path() -> list[str]:
    """This process's import path as absolute directories, the one holding this ovlfuse first."""
    paths = [os.path.dirname(os.path.dirname(os.path.abspath(ovlfuse.__file__)))]
    for path in sys.path:
        if path and os.path.isabs(path) and path not in paths:
            paths.append(path)
    return paths


def command() -> list[str]:
    """The argv prefix that runs this ovlfuse as a command: ``command() + ["verify", ...]``."""
    return [sys.executable, "-I", "-c", _BOOT.format(paths=import_path())]


def unmount(path: str, device: str | None = None, busy_for: float = 5.0) -> None:
    """Unmount the mount on ``path`` (only if its device is ``device``, when given): retried while busy, lazily last.

    ``fusermount3 -u`` serves an ordinary user's FUSE mounts, ``umount`` root's
    and a user namespace's; a mount still busy after ``busy_for`` seconds is
    detached lazily.  One mount is removed at most, never one beneath it.
    """
    deadline = time.monotonic() + busy_for
    while True:
        entry = find(path)
        if entry is None or (device is not None and entry.device != device):
            return
        fuse = entry.fstype.startswith("fuse")
        for cmd in ([["fusermount3", "-u", path]] if fuse else []) + [["umount", path]]:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
        if time.monotonic() >= deadline:
            for cmd in [["umount", "-l", path]] + ([["fusermount3", "-uz", path]] if fuse else []):
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    return
            return
        time.sleep(0.05)


class Daemon:
    """A daemon running in the foreground of a child process, known by its PID and its mount's device."""

    def __init__(self, proc: subprocess.Popen, mountpoint: str, log_path: str, own_log: bool) -> None:
        self.proc = proc
        self.mountpoint = mountpoint
        self.device: str | None = None  # set once mounted: unmount that mount only
        self.log_path = log_path
        self._own_log = own_log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL by its PID: its mount stays, dead, until ``stop`` (or ``unmount``) clears it."""
        self.proc.kill()

    def log(self) -> str:
        """What the daemon wrote to stdout and stderr so far."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> int | None:
        """Unmount, then wait for the daemon to exit (SIGTERM, then SIGKILL, by its PID); its exit status."""
        try:
            if self.device is not None:
                unmount(self.mountpoint, self.device)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
                if self.proc.poll() is None:
                    self.proc.send_signal(sig)  # this child's PID only
                try:
                    return self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
            return None
        finally:
            if self.device is not None:  # a daemon killed leaves its mount dead: clear it
                unmount(self.mountpoint, self.device, busy_for=1)
            if self._own_log:
                with contextlib.suppress(OSError):
                    os.unlink(self.log_path)


def start(args: list[str], mountpoint: str, *, program: list[str] | None = None, timeout: float = 60,
          env: dict[str, str] | None = None, cwd: str | None = None, log_path: str | None = None) -> Daemon:
    """Run ``PROGRAM -f ARGS`` (ovlfuse by default); return once ``mountpoint`` is a new mount that answers.

    The daemon's output goes to ``log_path`` (a temporary file removed by
    ``stop`` if not given).  If it exits or does not mount within
    ``timeout`` seconds, it is ended and ``OvlError`` gives its last words.
    """
    own_log = log_path is None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="ovlfuse-daemon.", suffix=".log")
        os.close(fd)
    before = find(mountpoint)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*(program or command()), "-f", *args], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)
    daemon = Daemon(proc, mountpoint, log_path, own_log)
    deadline = time.monotonic() + timeout
    try:
        while (now := find(mountpoint)) is None or now == before:
            if proc.poll() is not None:
                raise OvlError(_last_words(daemon.log()) or f"{os.path.basename(proc.args[0])} exited with "
                               f"status {proc.returncode} before mounting {mountpoint}")
            if time.monotonic() > deadline:
                raise OvlError(f"the daemon did not mount {mountpoint} within {timeout:.0f} s")
            time.sleep(0.01)
        daemon.device = now.device
        if not _answers(mountpoint, deadline - time.monotonic()):
            raise OvlError(f"the daemon mounted {mountpoint} but does not answer (within {timeout:.0f} s)")
    except BaseException:
        if daemon.device is None and (late := find(mountpoint)) is not None and late != before:
            daemon.device = late.device  # mounted just now: unmount it too
        daemon.stop(timeout=5)
        raise
    return daemon


def _answers(mountpoint: str, within: float) -> bool:
    """Whether a stat through the mount is answered in time (the kernel sends requests only after INIT).

    Asked from a thread, so a daemon that hangs does not hang the caller.
    """
    answered = threading.Event()

    def ask() -> None:
        try:
            os.stat(mountpoint)
        except OSError:
            pass
        answered.set()

    threading.Thread(target=ask, daemon=True).start()
    return answered.wait(max(within, 1.0))


def _last_words(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1].removeprefix("ovlfuse: ") if lines else ""


@contextlib.contextmanager
def mounted(args: list[str], mountpoint: str, **kwargs) -> Iterator[Daemon]:
    """``start`` as a context: the mount is gone and the daemon ended on the way out, whatever happened."""
    daemon = start(args, mountpoint, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()
