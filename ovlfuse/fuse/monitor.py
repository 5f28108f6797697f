"""A running mount seen from outside: requests by type, errors, copy-ups, caches, memory; and the ``-d`` request log.

``Monitor.instrument`` wraps every handler of the pyfuse3 ``Operations``
instance.  Always, it counts requests by type and error replies by errno,
and logs (as a warning) each reply with an errno that ordinary use does not
produce (EIO, ESTALE, EBADF, ...) with the request and its path.  With
``-d`` it also logs every request with its path, its caller and its reply or
errno.

The status of the mount is read through an xattr of its root directory,
``user.ovlfuse.status`` (JSON), which is how ``ovlfuse status MOUNTPOINT``
asks: no socket or file to find or clean up, and the kernel lets only those
who can reach the mount ask.  The daemon answers root and the mount's owner
(EACCES for others); the name is reserved on the root (EPERM to set or
remove it) and never listed.  SIGUSR1 writes the same status to the log.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pyfuse3

from ovlfuse import __version__
from ovlfuse.fs.engine import MergeEngine

STATUS_XATTR = "user.ovlfuse.status"
SCHEMA = "ovlfuse-status/1"
COPY_LOG_BYTES = 16 << 20  # copy-ups of at least this many bytes are logged with their time
_STATUS_NAME = STATUS_XATTR.encode()

log = logging.getLogger("ovlfuse")
trace = logging.getLogger("ovlfuse.trace")

# Errnos that callers get in ordinary use of a filesystem, from the kernel's overlay too; any other reply
# (EIO, ESTALE, EBADF, ELOOP: the kernel resolves symlinks itself, so a daemon's ELOOP means a layer holds
# one where none may be...) means something went wrong underneath or in ovlfuse, and is logged.
ORDINARY_ERRNOS = frozenset({
    errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
    errno.ENODATA, errno.ERANGE, errno.EXDEV, errno.EINVAL, errno.ENAMETOOLONG, errno.EROFS, errno.ENOSPC,
    errno.EDQUOT, errno.EOPNOTSUPP, errno.EMLINK, errno.EFBIG, errno.ETXTBSY, errno.EBUSY, errno.E2BIG,
    errno.ENOSYS, errno.EAGAIN, errno.EINTR,
})

# How each handler's positional arguments read in the log: an inode, a parent and name (joined to a path),
# a file handle, or a plain value; the request context is taken apart separately.
_ARGS: dict[str, tuple[str, ...]] = {
    "lookup": ("parent", "name", "ctx"), "forget": ("forgets",), "getattr": ("ino", "ctx"),
    "setattr": ("ino", "attr", "fields", "fh", "ctx"), "readlink": ("ino", "ctx"),
    "mknod": ("parent", "name", "mode", "rdev", "ctx"), "mkdir": ("parent", "name", "mode", "ctx"),
    "unlink": ("parent", "name", "ctx"), "rmdir": ("parent", "name", "ctx"),
    "symlink": ("parent", "name", "target", "ctx"),
    "rename": ("parent", "name", "parent", "name", "flags", "ctx"), "link": ("ino", "parent", "name", "ctx"),
    "open": ("ino", "flags", "ctx"), "read": ("fh", "offset", "size"), "write": ("fh", "offset", "data"),
    "flush": ("fh",), "release": ("fh",), "fsync": ("fh", "datasync"), "opendir": ("ino", "ctx"),
    "readdir": ("fh", "offset", "token"), "releasedir": ("fh",), "fsyncdir": ("fh", "datasync"),
    "statfs": ("ctx",), "setxattr": ("ino", "xattr", "value", "ctx"), "getxattr": ("ino", "xattr", "ctx"),
    "listxattr": ("ino", "ctx"), "removexattr": ("ino", "xattr", "ctx"), "access": ("ino", "mode", "ctx"),
    "create": ("parent", "name", "mode", "flags", "ctx"),
}


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number))


def _show_path(path: bytes | None) -> str:
    if path is None:
        return "(no path)"
    return "/" + path.decode("utf-8", "backslashreplace")


def _reply(result: object) -> str:
    """A handler's result, briefly."""
    if result is None:
        return "ok"
    if isinstance(result, tuple):
        return ", ".join(_reply(part) for part in result)
    if isinstance(result, pyfuse3.EntryAttributes):
        if result.st_ino == 0:
            return "no such name (negative entry)"
        return f"ino {result.st_ino} {stat.filemode(result.st_mode)} {result.st_uid}:{result.st_gid} {result.st_size} bytes"
    if isinstance(result, pyfuse3.FileInfo):
        return f"fh {result.fh}"
    if isinstance(result, bytes):
        return f"{len(result)} bytes"
    if isinstance(result, int):
        return str(result)
    if isinstance(result, list):
        return f"{len(result)} names"
    return "ok"


def _memory() -> dict[str, int]:
    """Resident and peak memory, threads and open descriptors of the daemon."""
    fields = {"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes", "Threads": "threads"}
    found: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                number = int(rest.split()[0])
                found[fields[key]] = number * 1024 if key.startswith("Vm") else number
    found["open_fds"] = len(os.listdir("/proc/self/fd"))
    return found


class Monitor:
    """Counts, copy-ups in flight and the request log of one mount."""

    def __init__(self, engine: MergeEngine, description: dict, debug: bool) -> None:
        self.engine = engine
        self.description = description  # layers, options, mount point: fixed for the mount's life
        self.debug = debug
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[int] = Counter()
        self.copying: dict[bytes, tuple[int, int, float]] = {}  # path -> (done, total, started)
        self.copies = 0
        self.copied_bytes = 0
        self.copy_seconds = 0.0
        self._handles: dict[int, bytes | None] = {}  # fh -> path, kept only for the -d log

    # --- copy-up hooks (CopyUp.progress and CopyUp.finished) ---------------------
    def copy_progress(self, path: bytes, done: int, total: int) -> None:
        """Called from a worker thread too: one dict item assignment, atomic under the GIL."""
        started = self.copying[path][2] if done and path in self.copying else time.monotonic()
        self.copying[path] = (done, total, started)

    def copy_finished(self, path: bytes, ok: bool) -> None:
        done, total, started = self.copying.pop(path, (0, 0, time.monotonic()))
        seconds = time.monotonic() - started
        if not ok:
            log.warning("copy-up of %s failed after %d of %d bytes, %.2f s", _show_path(path), done, total, seconds)
            return
        self.copies += 1
        self.copied_bytes += total
        self.copy_seconds += seconds
        if total >= COPY_LOG_BYTES:
            log.info("copy-up of %s: %d bytes in %.2f s", _show_path(path), total, seconds)
        elif self.debug:
            trace.debug("copy-up of %s: %d bytes in %.3f s", _show_path(path), total, seconds)

    # --- status ------------------------------------------------------------------
    def status(self) -> dict:
        now = time.monotonic()
        return {
            "schema": SCHEMA,
            "version": __version__,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "started": int(self.started),
            "uptime_seconds": round(time.time() - self.started, 1),
            **self.description,
            "requests": dict(self.requests.most_common()),
            "errors": {errno_name(e): n for e, n in self.errors.most_common()},
            "copy_ups": {
                "done": self.copies, "bytes": self.copied_bytes, "seconds": round(self.copy_seconds, 3),
                "in_progress": [{"path": _show_path(path), "done": done, "total": total,
                                 "seconds": round(now - started, 1)}
                                for path, (done, total, started) in list(self.copying.items())],
            },
            "caches": self.engine.stats(),
            "memory": _memory(),
        }

    def status_bytes(self) -> bytes:
        return json.dumps(self.status(), separators=(",", ":")).encode()

    # --- wrapping the handlers -------------------------------------------------------
    def instrument(self, ops: pyfuse3.Operations) -> None:
        """Wrap every request handler of ``ops`` (on the instance, so the class stays as it is)."""
        for name in _ARGS:
            setattr(ops, name, self._wrap(name, getattr(ops, name)))

    def _describe(self, name: str, args: tuple) -> str:
        kinds = _ARGS[name]
        parts: list[str] = []
        caller = ""
        parent: bytes | None = None
        for kind, value in zip(kinds, args):
            if kind == "ino":
                parts.append(_show_path(self.engine.path_of(value)))
            elif kind == "parent":
                parent = self.engine.path_of(value)
            elif kind == "name":
                joined = None if parent is None else (parent + b"/" + value if parent else value)
                parts.append(_show_path(joined) if joined is not None else f"(parent {value!r} unknown)")
            elif kind == "fh":
                parts.append(f"{_show_path(self._handles.get(value))} (fh {value})")
            elif kind == "ctx":
                caller = f" [uid {value.uid} gid {value.gid} pid {value.pid}]"
            elif kind in ("mode", "flags"):
                parts.append(f"{kind} {value:#o}")
            elif kind == "data":
                parts.append(f"{len(value)} bytes")
            elif kind == "xattr":
                parts.append(value.decode("utf-8", "backslashreplace"))
            elif kind == "fields":
                changed = [f for f in ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")
                           if getattr(value, f"update_{f}", False)]
                parts.append("set " + ",".join(changed))
            elif kind == "forgets":
                parts.append(f"{len(value)} nodes")
            elif kind in ("offset", "size", "datasync", "target", "rdev"):
                parts.append(f"{kind} {value!r}" if kind == "target" else f"{kind} {value}")
        return f"{name} {' '.join(parts)}{caller}"

    def _wrap(self, name: str, handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
        requests = self.requests
        errors = self.errors
        debug = self.debug
        status_request = name == "getxattr"
        reserved = name in ("setxattr", "removexattr")

        @functools.wraps(handler)
        async def counted(*args):
            if (status_request or reserved) and args[0] == pyfuse3.ROOT_INODE and args[1] == _STATUS_NAME:
                return self._status_request(name, args[-1])
            requests[name] += 1
            try:
                result = await handler(*args)
            except pyfuse3.FUSEError as e:
                errors[e.errno] += 1
                if e.errno not in ORDINARY_ERRNOS:
                    self._unusual(name, args, e.errno)
                elif debug:
                    trace.debug("%s -> %s", self._describe(name, args), errno_name(e.errno))
                raise
            if debug:
                self._traced(name, args, result)
            return result

        return counted

    def _status_request(self, name: str, ctx: pyfuse3.RequestContext) -> bytes:
        if name != "getxattr":
            raise pyfuse3.FUSEError(errno.EPERM)
        if ctx.uid not in (0, os.getuid()):
            raise pyfuse3.FUSEError(errno.EACCES)
        return self.status_bytes()

    def _traced(self, name: str, args: tuple, result: object) -> None:
        if name in ("open", "opendir"):
            self._handles[result.fh if isinstance(result, pyfuse3.FileInfo) else result] = self.engine.path_of(args[0])
        elif name == "create":
            parent = self.engine.path_of(args[0])
            self._handles[result[0].fh] = None if parent is None else (parent + b"/" + args[1] if parent else args[1])
        trace.debug("%s -> %s", self._describe(name, args), _reply(result))
        if name in ("release", "releasedir"):
            self._handles.pop(args[0], None)

    def _unusual(self, name: str, args: tuple, number: int) -> None:
        """Log an error reply ordinary use does not produce: the first ten of each errno, then every power of ten."""
        count = self.errors[number]
        if count <= 10 or (str(count)[0] == "1" and not str(count)[1:].strip("0")):
            log.warning("%s -> %s%s", self._describe(name, args), errno_name(number),
                        f" ({count} such replies so far)" if count > 10 else "")

    def summary(self) -> str:
        """One line for the log at unmount."""
        total = sum(self.requests.values())
        failed = sum(self.errors.values())
        return (f"{total} requests served ({failed} answered with an error), {self.copies} copy-ups "
                f"({self.copied_bytes} bytes)")

