"""``ovlfuse status MOUNTPOINT``: what a running mount is doing, read from the daemon through its root's status xattr."""

from __future__ import annotations

import errno
import json
import os
import re
import time

from ovlfuse.errors import OvlError
from ovlfuse.fuse.monitor import SCHEMA, STATUS_XATTR
from ovlfuse.sys import mountinfo
from ovlfuse.tools.layerinfo import short_id


def read_status(mountpoint: str) -> dict:
    """The daemon's status of the mount on ``mountpoint``; a one-line ``OvlError`` when there is none to read."""
    entry = mountinfo.find(mountpoint)
    if entry is None:
        raise OvlError(f"{mountpoint} is not a mount point")
    if not entry.fstype.startswith("fuse"):
        raise OvlError(f"{mountpoint} is a {entry.fstype} mount, not an ovlfuse one")
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise OvlError(f"{mountpoint} is a dead mount (its daemon is gone); clear it with "
                           f"'fusermount3 -u {mountpoint}'") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            owner = next((o.partition("=")[2] for o in entry.options if o.startswith("user_id=")), "?")
            raise OvlError(f"the mount on {mountpoint} answers only its owner (uid {owner}) and root; "
                           "run status as one of them") from None
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            raise OvlError(f"{mountpoint} is a {entry.fstype} mount that does not answer as ovlfuse does "
                           f"({entry.source})") from None
        raise OvlError(f"cannot read the status of {mountpoint}: {e.strerror}") from None
    try:
        status = json.loads(raw)
    except ValueError:
        status = None
    if not isinstance(status, dict) or status.get("schema") != SCHEMA:
        raise OvlError(f"{mountpoint} answered with a status this ovlfuse does not read")
    return status


def _short(name: str) -> str:
    """A store layer's id as Docker prints it; anything else as it is."""
    return short_id(name) if re.fullmatch(r"[0-9a-f]{64}(-init)?", name) else name


def _layer(path: str) -> str:
    """A store layer's diff directory by its short id, any other directory by its path."""
    if os.path.basename(path) == "diff" and re.fullmatch(r"[0-9a-f]{64}(-init)?", os.path.basename(os.path.dirname(path))):
        return short_id(os.path.basename(os.path.dirname(path)))
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{minutes} min" if minutes else "",
             f"{secs} s"]
    return " ".join(p for p in parts if p)


def render(status: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(status, indent=2)
    copy = status["copy_ups"]
    caches = status["caches"]
    memory = status["memory"]
    lowers = [_layer(path) for path in status["lowers"]]
    shown_lowers = f"{status['lower_count']}: " + ", ".join(lowers[:4]) + (", ..." if status["lower_count"] > 4 else "")
    requests = status["requests"]
    lines = [
        f"{status['mountpoint']}: ovlfuse {status['version']}, pid {status['pid']} (uid {status['uid']}), "
        f"up {_duration(status['uptime_seconds'])} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status['started']))}",
        f"  source     {_short(status['source'])} ({'read-only' if status['read_only'] else 'read-write'})",
        f"  upper      {status['upper'] or '-'}",
        f"  lowers     {shown_lowers}",
        f"  options    {','.join(status['fuse_options'])}"
        + (f"; {', '.join(status['overlay_options'])}" if status["overlay_options"] else ""),
        f"requests     {sum(requests.values())}: " + (", ".join(f"{k} {v}" for k, v in requests.items()) or "none"),
        "errors       " + (", ".join(f"{k} {v}" for k, v in status["errors"].items()) or "none"),
        f"copy-ups     {copy['done']} done, {_size(copy['bytes'])} in {copy['seconds']:.1f} s",
    ]
    for item in copy["in_progress"]:
        share = f" ({100 * item['done'] // item['total']}%)" if item["total"] else ""
        lines.append(f"  copying    {item['path']}: {_size(item['done'])} of {_size(item['total'])}{share}, "
                     f"{item['seconds']:.1f} s so far")
    lines += [
        f"caches       {caches.get('nodes', 0)} nodes, {caches.get('index_dirs', 0)} directories indexed "
        f"({caches.get('index_entries', 0)} of at most {caches.get('index_entries_max', 0)} entries), "
        f"{caches.get('open_files', 0)} open files, {caches.get('open_dirs', 0)} open directories",
        f"memory       {_size(memory.get('rss_bytes', 0))} resident (peak {_size(memory.get('peak_rss_bytes', 0))}), "
        f"{memory.get('threads', 0)} threads, {memory.get('open_fds', 0)} open descriptors",
    ]
    return "\n".join(lines)
