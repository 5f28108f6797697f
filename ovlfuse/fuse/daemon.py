"""Mounting and serving: mountpoint checks, FUSE options, daemonizing, the trio main loop, signals.

The parent process validates everything, forks, and exits only once the child
reports that the FUSE mount is live (or why it is not).  The child serves
until the filesystem is unmounted (``fusermount3 -u``, ``umount``) or it gets
SIGTERM/SIGINT/SIGHUP, and then unmounts and exits cleanly.  SIGUSR1 writes
the mount's status to the log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyfuse3
import trio

from ovlfuse.errors import OvlError
from ovlfuse.fs import statoverride
from ovlfuse.fs.engine import MergeEngine
from ovlfuse.fs.idmap import IdMap
from ovlfuse.fs.inode import View
from ovlfuse.fs.layers import LayerStack
from ovlfuse.fuse.monitor import Monitor
from ovlfuse.fuse.operations import OverlayOperations
from ovlfuse.store.plan import MountPlan
from ovlfuse.sys import mountinfo

log = logging.getLogger("ovlfuse")
FUSE_CONF = "/etc/fuse.conf"


@dataclass
class ServeOptions:
    foreground: bool = False
    debug: bool = False
    allow_other: bool | None = None  # None: yes as root (the kernel checks modes), no for an ordinary user
    allow_root: bool = False
    auto_unmount: bool = False
    read_only: bool = False
    userxattr: bool = False  # write user.overlay.* markers, as the kernel's -o userxattr reads them
    vfs_flags: list[str] = field(default_factory=list)
    fsname: str | None = None
    subtype: str | None = None
    ignored: list[str] = field(default_factory=list)  # accepted options that change nothing, and why
    view: View = field(default_factory=View)  # owner mapping and static_nlink
    xattr_permissions: int = 0  # keep owners and modes in stat override records (statoverride.WRITTEN)
    volatile: bool = False
    pid_file: str | None = None
    log_file: str | None = None


def _is_dead(mountpoint: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN (stat may still be served from the kernel's cache).

    Asked from a thread given a second, so a mount whose daemon hangs does not hang this command too.
    """
    answer: list[int] = []

    def ask() -> None:
        try:
            os.statvfs(mountpoint)
            answer.append(0)
        except OSError as e:
            answer.append(e.errno or 0)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(1.0)
    return answer == [errno.ENOTCONN]


def check_mountpoint(path: str) -> str:
    """The real path of a directory fit to mount on; a dead mount there is named as such, with the cure."""
    mountpoint = os.path.abspath(path)
    if mountinfo.find(mountpoint) is not None and os.path.realpath(mountpoint) != "/":
        if _is_dead(mountpoint):
            raise OvlError(f"{path} is a dead FUSE mount (its daemon is gone); clear it with "
                           f"'fusermount3 -u {path}' (or 'umount -l {path}' as root), then mount again")
        raise OvlError(f"{path} is already a mount point; unmount it first (fusermount3 -u {path})")
    if not os.path.lexists(mountpoint):
        raise OvlError(f"mountpoint {path} does not exist; create it with 'mkdir -p {path}'")
    if not os.path.isdir(mountpoint):
        raise OvlError(f"mountpoint {path} is not a directory")
    return os.path.realpath(mountpoint)


def _fuse_conf_allows_other() -> bool:
    try:
        with open(FUSE_CONF) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def sharing(opts: ServeOptions) -> str | None:
    """``allow_other``, ``allow_root`` or None (the mount's owner alone).

    As root (of the machine or of a user namespace) a mount serves every user,
    as the kernel's overlay does, the kernel checking modes
    (``default_permissions``); ``noallow_other`` makes it root's alone.  An
    ordinary user's mount is theirs alone unless they ask, and fusermount3
    grants that only where /etc/fuse.conf has ``user_allow_other``.
    """
    if opts.allow_root and opts.allow_other:
        raise OvlError("allow_other and allow_root exclude each other: allow_other already admits root")
    wanted = "allow_root" if opts.allow_root else "allow_other" if opts.allow_other else None
    if os.geteuid() == 0:
        return wanted or (None if opts.allow_other is False else "allow_other")
    if wanted and not _fuse_conf_allows_other():
        raise OvlError(f"{wanted} needs 'user_allow_other' in {FUSE_CONF} for an ordinary user (root can add it); "
                       "without it the mount serves you alone")
    return wanted


def fuse_options(plan: MountPlan, opts: ServeOptions) -> set[str]:
    label = opts.fsname or plan.label
    options = {"default_permissions", f"fsname={label.replace(',', '_')}", f"subtype={opts.subtype or 'ovlfuse'}"}
    if os.geteuid() == 0 and "nosuid" not in opts.vfs_flags:
        options.add("suid")  # set-user-ID programs of a root mount work, as on the kernel's overlay and fuse-overlayfs
    options.update(opts.vfs_flags)
    shared = sharing(opts)
    if shared:
        options.add(shared)
    if opts.auto_unmount:
        options.add("auto_unmount")
    if plan.read_only or opts.read_only:
        options.add("ro")
    return options


def _raise_fd_limit() -> None:
    """Every layer keeps a directory fd open: allow as many fds as the system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """What libfuse and fusermount3 print to fd 2 meanwhile, as lines, instead of on the terminal."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(line.strip() for line in capture.read().decode(errors="replace").splitlines() if line.strip())


def _mount_failure(mountpoint: str, said: list[str]) -> str:
    """Why the mount failed: what fusermount3 or libfuse said, and a hint only where its cause applies."""
    why = "; ".join(line.removeprefix("fuse: ") for line in said) or "libfuse gave no reason"
    hints = []
    if not os.path.exists("/dev/fuse"):
        hints.append("/dev/fuse is missing (load the fuse module, or give the container the device)")
    elif os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        hints.append("/dev/fuse is not open to you (Debian's fuse3 package makes it mode 0666)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        hints.append("fusermount3 is not installed (Debian package fuse3)")
    return f"could not mount on {mountpoint}: {why}" + (f"; {'; '.join(hints)}" if hints else "")


def _describe(plan: MountPlan, mountpoint: str, options: set[str], opts: ServeOptions) -> dict:
    """What the status shows of the mount: fixed for its whole life."""
    lowers = plan.lowers
    return {
        "mountpoint": mountpoint,
        "source": plan.label,
        "read_only": plan.read_only or opts.read_only,
        "upper": plan.upper,
        "workdir": plan.workdir,
        "lower_count": len(lowers),
        "lowers": lowers[:100],
        "fuse_options": sorted(options),
        "overlay_options": [name for name, on in (("userxattr", opts.userxattr), ("volatile", opts.volatile),
                                                  ("static_nlink", opts.view.static_nlink),
                                                  (f"xattr_permissions={opts.xattr_permissions}",
                                                   bool(opts.xattr_permissions)),
                                                  ("owner mapping", _maps_owners(opts.view.ids))) if on],
        "ignored_options": opts.ignored,
    }


def _maps_owners(ids: IdMap) -> bool:
    return bool(ids.uids or ids.gids) or ids.squash_uid is not None or ids.squash_gid is not None


async def _serve_until_unmounted(mountpoint: str, ready_fd: int | None, monitor: Monitor) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        log.info("status: %s", monitor.status_bytes().decode())
                        continue
                    log.info("signal %s: unmounting %s", signal.Signals(signum).name, mountpoint)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(_once_answering, mountpoint, ready_fd, monitor)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _once_answering(mountpoint: str, ready_fd: int | None, monitor: Monitor) -> None:
    """Report the mount ready once a stat through it is answered (the kernel sends requests only after INIT).

    The mount keeps the kernel's 128 KiB read-ahead: measured with dd on a cold
    1 GiB file, 1 MiB read-ahead made ovlfuse's reads slower (0.5-1.0 GB/s
    against 1.5-2.2 GB/s), as each larger request waits longer on its worker thread.
    """
    await trio.to_thread.run_sync(os.stat, mountpoint)
    d = monitor.description
    log.info("mounted %s on %s: %d lower layers%s, %s; options %s", d["source"], mountpoint, d["lower_count"],
             f", upper {d['upper']}" if d["upper"] else "", "read-only" if d["read_only"] else "read-write",
             ",".join(d["fuse_options"]))
    for note in d["ignored_options"]:
        log.info("option %s", note)
    if ready_fd is not None:
        os.chdir("/")
        _detach_stdio()
        os.write(ready_fd, b"ok")
        os.close(ready_fd)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _configure_logging(opts: ServeOptions, daemon: bool) -> None:
    """To --log-file; else to stderr in the foreground, and nowhere for a daemon (whose stderr is the caller's)."""
    level = logging.DEBUG if opts.debug else logging.INFO
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    if opts.log_file:
        logging.basicConfig(level=level, format=fmt, filename=opts.log_file)
    elif daemon:
        logging.basicConfig(level=level, handlers=[logging.NullHandler()])
    else:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    # The request log is the monitor's (ovlfuse.trace); pyfuse3's own messages only with -d.
    logging.getLogger("ovlfuse.requests").setLevel(logging.WARNING)
    if not opts.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def _write_pid_file(path: str) -> None:
    """Written whole or not at all (a stale file of a killed daemon is replaced)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def serve(plan: MountPlan, mountpoint: str, opts: ServeOptions) -> int:
    """Mount ``plan`` on ``mountpoint`` and serve it; returns the exit status."""
    mountpoint = check_mountpoint(mountpoint)
    options = fuse_options(plan, opts)
    _raise_fd_limit()
    stack = LayerStack.open(plan.upper, plan.workdir, plan.lowers)
    stack.userxattr = stack.userxattr or opts.userxattr
    if opts.xattr_permissions:
        try:
            stack.mark_upper(statoverride.WRITTEN[opts.xattr_permissions])
        except OvlError:
            stack.close()
            raise
    engine = MergeEngine(stack, opts.view, opts.volatile)
    monitor = Monitor(engine, _describe(plan, mountpoint, options, opts), opts.debug)
    if opts.foreground:
        return _run(engine, monitor, mountpoint, options, opts, ready_fd=None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        try:
            status = _run(engine, monitor, mountpoint, options, opts, ready_fd=write_fd)
        except BaseException:  # noqa: BLE001 - the daemon must never return into the parent's code
            log.exception("the daemon failed")
            status = 1
        os._exit(status)
    os.close(write_fd)
    engine.close()
    with os.fdopen(read_fd, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message == "ok":
        return 0
    if not message:
        _, wait_status = os.waitpid(pid, 0)
        message = f"the daemon exited before the mount was ready (status {wait_status})"
    raise OvlError(message)


def _run(engine: MergeEngine, monitor: Monitor, mountpoint: str, options: set[str], opts: ServeOptions,
         ready_fd: int | None) -> int:
    ops = OverlayOperations(engine)
    monitor.instrument(ops)
    if engine.copyup is not None:
        engine.copyup.progress = monitor.copy_progress
        engine.copyup.finished = monitor.copy_finished
    with _stderr_captured() as said:
        try:
            pyfuse3.init(ops, mountpoint, options)
            mounted = True
        except RuntimeError:
            mounted = False
    if not mounted:
        message = _mount_failure(mountpoint, said)
        engine.close()
        if ready_fd is None:
            raise OvlError(message)
        os.write(ready_fd, message.encode())
        return 1
    try:
        if opts.pid_file:
            _write_pid_file(opts.pid_file)
        _configure_logging(opts, daemon=ready_fd is not None)
        trio.run(_serve_until_unmounted, mountpoint, ready_fd, monitor)
    finally:
        still_mounted = mountinfo.find(mountpoint) is not None
        with _stderr_captured() as said:  # fusermount3's complaints on the way out are for the log
            pyfuse3.close(unmount=still_mounted)
        for line in said:
            if line.startswith(("fusermount3:", "fuse:")):
                log.debug("at unmount: %s", line)
        engine.close()
        log.info("unmounted %s: %s", mountpoint, monitor.summary())
        if opts.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(opts.pid_file)
    return 0
