"""``ovlfuse diff A B``: compare two directory trees, optionally as overlay upper dirs.

A tree is scanned into one record per path (type, mode, owner, size, symlink
target, rdev, xattrs, mtime, inode for the hard-link structure).  Contents are
compared only where both sides have a regular file of the same size, in a
thread pool, and hashed only to report a difference.  ``upper`` mode first normalises overlay markers so equivalent
forms compare equal: a ``.wh.`` file, a char 0:0 device and an xattr
whiteout are all "whiteout"; ``.wh..wh..opq`` and the trusted/user opaque
xattrs are all "opaque"; the kernel's bookkeeping xattrs are dropped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from ovlfuse.errors import OvlError
from ovlfuse.fs.markers import OPAQUE_FILE, WH_PREFIX, OvlXattr
from ovlfuse.tools.progress import Progress

OPAQUE_XATTRS = OvlXattr.OPAQUE.forms
WHITEOUT_XATTRS = OvlXattr.WHITEOUT.forms

BOOKKEEPING_XATTRS = {f"{ns}.overlay.{name}" for ns in ("trusted", "user") for name in ("origin", "impure", "uuid")}
FIELDS = ("type", "mode", "owner", "size", "symlink", "rdev", "xattrs", "mtime", "content", "hardlink")


@dataclass
class Rec:
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ino: int
    target: str | None = None
    rdev: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    opaque: bool = False


def file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def _show(value: bytes) -> str:
    """xattr values as text when they are, hex otherwise (JSON-safe either way)."""
    try:
        text = value.decode()
        if text.isprintable():
            return text
    except UnicodeDecodeError:
        pass
    return "0x" + value.hex()


def _xattrs(path: bytes) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = _show(os.getxattr(path, name, follow_symlinks=False))
        except OSError:
            continue
    return out


def scan(root: str, progress: Callable[[int], None] | None = None) -> dict[str, Rec]:
    """One record per path below ``root`` (relative, "" for the root); symlinks are not followed."""
    base = os.fsencode(root)
    tree: dict[str, Rec] = {}
    pending = [b""]
    while pending:
        rel = pending.pop()
        path = os.path.join(base, rel) if rel else base
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # listed but gone (the kernel lists stray whiteouts it cannot stat)
        except OSError as e:
            raise _unreadable(root, rel, e) from None
        kind = file_type(st.st_mode)
        rec = Rec(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size if kind != "dir" else 0,
                  st.st_mtime_ns, st.st_ino, xattrs=_xattrs(path))
        if kind == "symlink":
            rec.target = os.fsdecode(os.readlink(path))
        elif kind in ("chardev", "blockdev"):
            rec.rdev = st.st_rdev
        elif kind == "dir":
            try:
                names = os.listdir(path)
            except FileNotFoundError:
                names = []  # removed while the tree was scanned
            except OSError as e:
                raise _unreadable(root, rel, e) from None
            pending.extend(os.path.join(rel, n) if rel else n for n in names)
        tree[os.fsdecode(rel)] = rec
        if progress and len(tree) % 2000 == 0:
            progress(len(tree))
    return tree


def _unreadable(root: str, rel: bytes, e: OSError) -> OvlError:
    """A tree that cannot be read whole is an error, never a difference (or an equality) to report."""
    where = os.path.join(root, os.fsdecode(rel)) if rel else root
    if e.errno in (errno.EACCES, errno.EPERM):
        return OvlError(f"cannot read {where}: permission denied; compare as a user who may read both trees")
    if e.errno == errno.ENOTCONN:
        return OvlError(f"cannot read {where}: the FUSE mount is dead (its daemon is gone)")
    return OvlError(f"cannot read {where}: {e.strerror}")


def normalise_upper(tree: dict[str, Rec]) -> dict[str, Rec]:
    """Rewrite every whiteout and opaque form into one, and drop kernel bookkeeping."""
    out: dict[str, Rec] = {}
    opaque_dirs = set()
    for path, rec in tree.items():
        parent, _, name = path.rpartition("/")
        if name == os.fsdecode(OPAQUE_FILE):
            opaque_dirs.add(parent)
            continue
        is_whiteout = (rec.type == "chardev" and rec.rdev == 0) or (
            rec.type == "file" and rec.size == 0 and any(x in rec.xattrs for x in WHITEOUT_XATTRS))
        if name.startswith(os.fsdecode(WH_PREFIX)):
            path = f"{parent}/{name[4:]}" if parent else name[4:]
            is_whiteout = True
        if is_whiteout:
            out[path] = Rec("whiteout", 0, 0, 0, 0, 0, 0)
            continue
        rec = Rec(**asdict(rec))
        if rec.type == "dir" and any(rec.xattrs.get(x, "")[:1] == "y" for x in OPAQUE_XATTRS):
            rec.opaque = True
        rec.xattrs = {k: v for k, v in rec.xattrs.items()
                      if k not in BOOKKEEPING_XATTRS and k not in OPAQUE_XATTRS}
        out[path] = rec
    for path in opaque_dirs:
        if path in out:
            out[path].opaque = True
    return out


def _same_content(a: bytes, b: bytes) -> bool:
    """Byte-for-byte comparison that stops at the first difference."""
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def content_hash(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Difference:
    path: str  # printable: bytes that are not UTF-8 appear as \\xNN
    kind: str  # one of FIELDS, or "only-in-a" / "only-in-b"
    a: object = None
    b: object = None

    def __post_init__(self) -> None:
        self.path = printable(self.path)


def printable(path: str) -> str:
    """A scanned path (surrogate-escaped bytes) as valid UTF-8 text for reports and JSON."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _hardlink_groups(tree: dict[str, Rec]) -> dict[str, frozenset[str]]:
    by_ino: dict[int, set[str]] = {}
    for path, rec in tree.items():
        if rec.type not in ("dir", "whiteout"):
            by_ino.setdefault(rec.ino, set()).add(path)
    return {p: frozenset(g) for g in by_ino.values() if len(g) > 1 for p in g}


def compare(a_root: str, b_root: str, a: dict[str, Rec], b: dict[str, Rec], times: bool = True,
            workers: int = 4) -> list[Difference]:
    diffs: list[Difference] = []
    for path in sorted(a.keys() - b.keys()):
        diffs.append(Difference(path, "only-in-a", a[path].type))
    for path in sorted(b.keys() - a.keys()):
        diffs.append(Difference(path, "only-in-b", None, b[path].type))
    to_hash: list[str] = []
    for path in sorted(a.keys() & b.keys()):
        x, y = a[path], b[path]
        if x.type != y.type:
            diffs.append(Difference(path, "type", x.type, y.type))
            continue
        checks = [("mode", oct(x.mode), oct(y.mode)), ("owner", f"{x.uid}:{x.gid}", f"{y.uid}:{y.gid}"),
                  ("size", x.size, y.size), ("symlink", x.target, y.target), ("rdev", x.rdev, y.rdev),
                  ("xattrs", x.xattrs, y.xattrs), ("opaque", x.opaque, y.opaque)]
        if times and x.type not in ("dir", "symlink", "whiteout"):
            checks.append(("mtime", x.mtime_ns, y.mtime_ns))
        diffs.extend(Difference(path, kind, u, v) for kind, u, v in checks if u != v)
        if x.type == "file" and x.size == y.size and x.size > 0:
            to_hash.append(path)
    ga, gb = _hardlink_groups(a), _hardlink_groups(b)
    for path in sorted(a.keys() & b.keys()):
        if ga.get(path, frozenset()) != gb.get(path, frozenset()):
            diffs.append(Difference(path, "hardlink", sorted(ga.get(path, [])), sorted(gb.get(path, []))))
    if to_hash:
        ab, bb = os.fsencode(a_root), os.fsencode(b_root)
        pairs = [(os.path.join(ab, os.fsencode(p)), os.path.join(bb, os.fsencode(p))) for p in to_hash]
        batches = [pairs[i:i + 256] for i in range(0, len(pairs), 256)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            same = [flag for batch in pool.map(lambda batch: [_same_content(*pair) for pair in batch], batches)
                    for flag in batch]
        for path, (pa, pb), equal in zip(to_hash, pairs, same):
            if not equal:
                diffs.append(Difference(path, "content", content_hash(pa)[:16], content_hash(pb)[:16]))
    return diffs


def iso_time(ns: int) -> str:
    """Nanoseconds since the epoch as ISO 8601 in UTC, to the nanosecond (what a person reads; JSON keeps the integer)."""
    seconds, frac = divmod(ns, 10**9)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{frac:09d}Z"


def _links(path: str, group: object) -> str:
    others = [p or "/" for p in group if p != path] if isinstance(group, list) else []
    return "hard-linked with " + ", ".join(others) if others else "not hard-linked"


def _xattr_change(a: object, b: object) -> str:
    a = a if isinstance(a, dict) else {}
    b = b if isinstance(b, dict) else {}
    return "; ".join(f"{name}: {a.get(name, '(none)')} -> {b.get(name, '(none)')}"
                     for name in sorted(a.keys() | b.keys()) if a.get(name) != b.get(name))


def describe(d: Difference, red: str = "", green: str = "", off: str = "") -> str:
    """One line of the text report for ``d``."""
    path = d.path or "/"
    if d.kind == "only-in-a":
        return f"{red}- {path}{off} ({d.a})"
    if d.kind == "only-in-b":
        return f"{green}+ {path}{off} ({d.b})"
    if d.kind == "xattrs":
        return f"{path}: {_xattr_change(d.a, d.b)}"
    a, b = d.a, d.b
    if d.kind == "mtime":
        a, b = iso_time(int(a)), iso_time(int(b))  # type: ignore[call-overload]
    elif d.kind == "hardlink":
        a, b = _links(d.path, a), _links(d.path, b)
    return f"{path}: {red}{a}{off} -> {green}{b}{off}"


def report(a_root: str, b_root: str, diffs: list[Difference], colour: bool, title: str | None = None) -> str:
    """The text report: ``title`` (default: the two roots) and the differences grouped by kind."""
    if not diffs:
        return f"equal: {title or f'{a_root} and {b_root}'}"
    red, green, bold, off = ("\033[31m", "\033[32m", "\033[1m", "\033[0m") if colour else ("",) * 4
    groups: dict[str, list[Difference]] = {}
    for d in diffs:
        groups.setdefault(d.kind, []).append(d)
    lines = [f"{bold}{len(diffs)} differences: {title or f'{a_root} (a) and {b_root} (b)'}{off}"]
    for kind, items in groups.items():
        lines.append(f"{bold}{kind}{off} ({len(items)})")
        lines.extend(f"  {describe(d, red, green, off)}" for d in items[:50])
        if len(items) > 50:
            lines.append(f"  ... {len(items) - 50} more")
    return "\n".join(lines)


def to_json(a_root: str, b_root: str, diffs: list[Difference], files: tuple[int, int]) -> str:
    counts: dict[str, int] = {}
    for d in diffs:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    return json.dumps({
        "schema": "ovlfuse-diff/1",
        "a": a_root,
        "b": b_root,
        "equal": not diffs,
        "entries": {"a": files[0], "b": files[1]},
        "counts": counts,
        "differences": [asdict(d) for d in diffs],
    }, indent=2, default=str)


def run_diff(a_root: str, b_root: str, upper: bool = False, times: bool = True, as_json: bool = False,
             out=None) -> int:
    """Scan, compare and print; returns 0 equal, 1 different (errors raise OvlError)."""
    out = out or sys.stdout
    for root in (a_root, b_root):
        check_tree(root)
    progress = Progress()
    a = scan(a_root, lambda n: progress.show(f"scanning {a_root}: {n} entries"))
    b = scan(b_root, lambda n: progress.show(f"scanning {b_root}: {n} entries"))
    if upper:
        a, b = normalise_upper(a), normalise_upper(b)
    progress.show(f"comparing {len(a)} and {len(b)} entries")
    diffs = compare(a_root, b_root, a, b, times=times)
    progress.done()
    if as_json:
        print(to_json(a_root, b_root, diffs, (len(a), len(b))), file=out)
    else:
        print(report(a_root, b_root, diffs, colour=out.isatty()), file=out)
    return 1 if diffs else 0


def check_tree(root: str) -> None:
    """A tree to compare must be a directory this user can list; say which of those it is not."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise OvlError(f"{root} does not exist") from None
    except OSError as e:
        raise _unreadable(root, b"", e) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OvlError(f"{root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise OvlError(f"cannot read {root}: permission denied; compare as a user who may read both trees")
