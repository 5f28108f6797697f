"""The load test's model checker: threads of seeded calls, each call checked against its thread's own model.

Each of THREADS threads owns its names in the shared directories of a store
(``load_store``: plain, overridden, whited-out and merged names spread over
three layers), so whatever the other threads do, every result of its calls
is known in advance from its own model of its names (``Obj`` trees).  An
``Agent`` draws calls with a seeded generator, predicts each one's result
from its model, makes the call, fails on a different result, and moves its
model on.  Run one agent after another on the kernel's overlay, the same
calls give the expected final tree; run all at once on ovlfuse, they must
give the same one.  ``run_threads`` runs agents (or any workers) at once
with a watchdog that turns a hang into a failure with stacks.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import random
import re
import stat
import sys
import threading
import traceback
from collections.abc import Callable

import pytest

from ovlfuse.tools.demo import LayerRef, StoreWriter
from stores import device_whiteout, write

# --- running threads under a watchdog --------------------------------------------------------

# Hang guards, never timings: a run this late is stuck and fails with stacks (before
# pytest's own 300 s timeout, which gives none of the daemon's).  Each run takes seconds.
WATCHDOG_S = 240


def _stacks_of(pid: int) -> str:
    """Kernel stacks of every thread of ``pid``: where a stuck daemon waits."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/stack") as f:
                out.append(f"-- {pid}/{tid}\n{f.read()}")
        except OSError as e:
            out.append(f"-- {pid}/{tid}: {e}")
    return "\n".join(out)


def _python_stacks(threads: list[threading.Thread]) -> str:
    frames = sys._current_frames()
    return "\n".join(f"-- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                     for t in threads if t.ident in frames)


def run_threads(targets: list[Callable[[], None]], daemon_pid: int | None) -> list[str]:
    """Run ``targets`` concurrently; the errors they raised, or a failure with stacks if they hang."""
    errors: list[str] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(f"{threading.current_thread().name}: {e!r}")

    threads = [threading.Thread(target=guarded, args=(t,), name=f"worker-{i}", daemon=True)
               for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WATCHDOG_S)
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        daemon = _stacks_of(daemon_pid) if daemon_pid else ""
        pytest.fail(f"{len(stuck)} threads still running after {WATCHDOG_S}s: a deadlock?\n"
                    f"{_python_stacks(stuck)}\n{daemon}")
    return errors


# --- the store and the model ---------------------------------------------------------------

THREADS = 8
SHARED = ("s0", "s1", "s2", "s3")
# s0: base layer only; s1: base and middle; s2: base, middle and the container layer; s3: container only.
OWN_NAMES = ("L0", "L1", "D", "W", "V", "U", "n0", "n1", "n2", "n3")
NESTED = ("a", "b", "c", "old")
MODES = (0o600, 0o640, 0o755, 0o700, 0o444)


def load_store(root: str) -> tuple[str, LayerRef]:
    """Every thread's lower names in every shared dir: plain, overridden, whited out, merged dirs."""
    sw = StoreWriter(root, link_length=6)
    base = sw.layer(seed="base")
    middle = sw.layer(base, seed="middle")
    top = sw.layer(middle, seed="top")
    for t in range(THREADS):
        for s in SHARED[:3]:
            d = f"{base.diff}/{s}"
            os.makedirs(f"{d}/t{t}.D", exist_ok=True)
            os.makedirs(f"{d}/t{t}.V", exist_ok=True)
            write(f"{d}/t{t}.L0", f"base {s} {t} L0\n")
            write(f"{d}/t{t}.L1", f"base {s} {t} L1\n" * 50)
            os.setxattr(f"{d}/t{t}.L1", "user.orig", f"{t}".encode())
            write(f"{d}/t{t}.W", "whited out above\n")
            write(f"{d}/t{t}.D/a", "a\n")
            write(f"{d}/t{t}.D/b", "b\n", 0o600)
            write(f"{d}/t{t}.V/old", "old\n")
        for s in SHARED[1:3]:
            d = f"{middle.diff}/{s}"
            os.makedirs(f"{d}/t{t}.D", exist_ok=True)
            write(f"{d}/t{t}.L1", f"middle {s} {t} L1\n", 0o640)
            write(f"{d}/t{t}.D/c", "c\n")
            device_whiteout(f"{d}/t{t}.W")
            device_whiteout(f"{d}/t{t}.V")
        for s in SHARED[2:]:
            os.makedirs(f"{top.diff}/{s}", exist_ok=True)
            write(f"{top.diff}/{s}/t{t}.U", f"upper {s} {t}\n")
    sw.commit(base)
    sw.commit(middle)
    return sw.root, top


@dataclasses.dataclass(eq=False)
class Obj:
    """One object of a thread's model; hard links are one Obj under several names."""

    kind: str  # "file", "dir" or "symlink"
    mode: int = 0
    data: bytes = b""  # a file's content or a symlink's target
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    children: dict[str, Obj] = dataclasses.field(default_factory=dict)
    has_lower: bool = False  # a directory with lower parts: renaming it gives EXDEV
    nlink: int = 1


def _scan(path: str) -> Obj:
    """The model of one object as a mount shows it (the kernel's mount: the oracle)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return Obj("symlink", data=os.fsencode(os.readlink(path)))
    xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path) if n.startswith("user.")}
    if stat.S_ISDIR(st.st_mode):
        return Obj("dir", stat.S_IMODE(st.st_mode), xattrs=xattrs, has_lower=True,
                   children={n: _scan(f"{path}/{n}") for n in os.listdir(path)})
    with open(path, "rb") as f:
        return Obj("file", stat.S_IMODE(st.st_mode), f.read(), xattrs)


def initial_model(mnt: str, t: int) -> Obj:
    """Thread ``t``'s part of the shared dirs: a root whose children are the shared dirs."""
    prefix = f"t{t}."
    return Obj("dir", children={s: Obj("dir", children={n: _scan(f"{mnt}/{s}/{n}") for n in os.listdir(f"{mnt}/{s}")
                                                          if n.startswith(prefix)})
                                for s in SHARED})


Result = tuple[str, object]
ERR = "error"


def _err(code: int) -> Result:
    return ERR, errno.errorcode[code]


def _short(result: Result) -> str:
    text = repr(result)
    return text if len(text) < 200 else f"{text[:150]}... ({len(text)} chars)"


class Agent:
    """One thread's seeded calls, each checked against the thread's own model before the model moves on."""

    WEIGHTS = {"write": 10, "append": 8, "pwrite": 4, "read": 10, "stat": 12, "listdir": 8, "rename": 8,
               "unlink": 6, "mkdir": 5, "rmdir": 4, "chmod": 5, "truncate": 4, "link": 4, "symlink": 4,
               "setxattr": 4, "peek": 4}

    def __init__(self, t: int, model: Obj) -> None:
        self.t = t
        self.model = model
        self.rng = random.Random(f"load-{t}")
        self.pool = [f"{s}/t{t}.{n}" for s in SHARED for n in OWN_NAMES]
        self.pool += [f"{s}/t{t}.{n}/{m}" for s in SHARED for n in ("D", "V", "n0", "n1") for m in NESTED]
        self.others = [p.replace(f"t{t}.", f"t{u}.") for u in range(THREADS) if u != t for p in self.pool[:40]]
        self.kinds = list(self.WEIGHTS)
        self.weights = list(self.WEIGHTS.values())
        self.done = 0
        self.history: collections.deque[str] = collections.deque(maxlen=12)
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()

    # model lookups: (parent dir, name) or an errno
    def _parent(self, path: str) -> tuple[Obj, str] | int:
        *dirs, name = path.split("/")
        cur = self.model
        for comp in dirs:
            child = cur.children.get(comp)
            if child is None or child.kind == "symlink":  # every symlink dangles
                return errno.ENOENT
            if child.kind != "dir":
                return errno.ENOTDIR
            cur = child
        return cur, name

    def _get(self, path: str) -> tuple[Obj, str, Obj | None] | int:
        found = self._parent(path)
        if isinstance(found, int):
            return found
        parent, name = found
        return parent, name, parent.children.get(name)

    def run(self, root: str, ops: int) -> None:
        for self.done in range(ops):
            kind = self.rng.choices(self.kinds, self.weights)[0]
            name, action, expected, commit = getattr(self, f"_{kind}")()
            try:
                actual: Result = "ok", action(root)
            except OSError as e:
                actual = _err(e.errno)
            if actual != expected:
                raise AssertionError(f"thread {self.t} call {self.done} {name}: expected {_short(expected)}, "
                                     f"got {_short(actual)}; before it: {list(self.history)}")
            self.history.append(name)
            self.outcomes[kind, actual[0]] += 1
            if actual[0] == "ok" and commit is not None:
                commit()

    def _pick(self) -> str:
        return self.rng.choice(self.pool)

    def _data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 17, 100, 700, 5000)))

    # --- each call: (description, action on a mount root, expected result or None, model update)
    def _open_write(self, how: str) -> tuple:
        path, data = self._pick(), self._data()
        at = self.rng.randrange(0, 3000)
        flags = {"write": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "append": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 "pwrite": os.O_RDWR}[how]
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is None:
                expected = _err(errno.ENOENT) if how == "pwrite" else ("ok", len(data))
                if how != "pwrite":
                    def commit() -> None:
                        parent.children[name] = Obj("file", 0o644, data)
            elif obj.kind == "dir":
                expected = _err(errno.EISDIR)
            elif obj.kind == "symlink":
                expected = _err(errno.ENOENT)
            else:
                expected = "ok", len(data)

                def commit() -> None:
                    if how == "write":
                        obj.data = data
                    elif how == "append":
                        obj.data += data
                    elif data:  # an empty write at an offset extends nothing
                        obj.data = obj.data[:at].ljust(at, b"\0") + data + obj.data[at + len(data):]

        def action(root: str) -> int:
            fd = os.open(f"{root}/{path}", flags, 0o644)
            try:
                return os.pwrite(fd, data, at) if how == "pwrite" else os.write(fd, data)
            finally:
                os.close(fd)
        return f"{how} {path} ({len(data)} bytes)", action, expected, commit

    def _write(self) -> tuple:
        return self._open_write("write")

    def _append(self) -> tuple:
        return self._open_write("append")

    def _pwrite(self) -> tuple:
        return self._open_write("pwrite")

    def _target(self, path: str) -> Obj | int:
        """The object ``path`` names with the last symlink followed (every symlink dangles: ENOENT)."""
        got = self._get(path)
        if isinstance(got, int):
            return got
        obj = got[2]
        return errno.ENOENT if obj is None or obj.kind == "symlink" else obj

    def _read(self) -> tuple:
        path = self._pick()
        obj = self._target(path)
        if isinstance(obj, int):
            expected = _err(obj)
        else:
            expected = _err(errno.EISDIR) if obj.kind == "dir" else ("ok", obj.data)

        def action(root: str) -> bytes:
            with open(f"{root}/{path}", "rb") as f:
                return f.read()
        return f"read {path}", action, expected, None

    @staticmethod
    def _stat_of(root: str, path: str) -> tuple:
        full = f"{root}/{path}"
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            return "symlink", os.fsencode(os.readlink(full)), st.st_nlink
        xattrs = sorted((n, os.getxattr(full, n)) for n in os.listxattr(full) if n.startswith("user."))
        if stat.S_ISDIR(st.st_mode):
            return "dir", stat.S_IMODE(st.st_mode), xattrs
        return "file", stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, xattrs

    @staticmethod
    def _model_stat(obj: Obj) -> tuple:
        if obj.kind == "symlink":
            return "symlink", obj.data, obj.nlink
        xattrs = sorted(obj.xattrs.items())
        if obj.kind == "dir":
            return "dir", obj.mode, xattrs
        return "file", obj.mode, len(obj.data), obj.nlink, xattrs

    def _stat(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        if isinstance(got, int):
            expected = _err(got)
        else:
            obj = got[2]
            expected = _err(errno.ENOENT) if obj is None else ("ok", self._model_stat(obj))
        return f"stat {path}", lambda root: self._stat_of(root, path), expected, None

    def _listdir(self) -> tuple:
        if self.rng.random() < 0.5:
            path = self.rng.choice(SHARED)
        else:
            path = self._pick()
        obj = self._target(path)
        if isinstance(obj, int):
            expected = _err(obj)
        else:
            expected = _err(errno.ENOTDIR) if obj.kind != "dir" else ("ok", sorted(obj.children))
        prefix = f"t{self.t}."
        shared = path in SHARED

        def action(root: str) -> list[str] | str:
            names = os.listdir(f"{root}/{path}")
            if len(set(names)) != len(names):
                return f"duplicates in {names}"
            if shared:
                strangers = [n for n in names if not re.fullmatch(r"t\d\..*", n)]
                if strangers:
                    return f"names of no thread: {strangers}"
                names = [n for n in names if n.startswith(prefix)]
            return sorted(names)
        return f"listdir {path}", action, expected, None

    def _rename(self) -> tuple:
        src, dst = self._pick(), self._pick()
        a, b = self._get(src), self._get(dst)
        commit = None
        if isinstance(a, int):
            expected = _err(a)
        elif isinstance(b, int):
            expected = _err(b)
        else:
            (sp, sn, obj), (dp, dn, victim) = a, b
            if obj is None:
                expected = _err(errno.ENOENT)
            elif obj is victim:  # the same name, or two names of one object: nothing happens
                expected = "ok", None
            elif obj.kind == "dir" and dst.startswith(src + "/"):
                expected = _err(errno.EINVAL)
            elif src.startswith(dst + "/"):
                expected = _err(errno.ENOTEMPTY)  # onto its own ancestor
            elif obj.kind == "dir" and victim is not None and victim.kind != "dir":
                expected = _err(errno.ENOTDIR)
            elif obj.kind == "dir" and victim is not None:
                return self._stat()  # dir over dir: not modelled
            elif obj.kind != "dir" and victim is not None and victim.kind == "dir":
                expected = _err(errno.EISDIR)
            elif obj.kind == "dir" and obj.has_lower:
                expected = _err(errno.EXDEV)  # the kernel's default (no redirect_dir)
            else:
                expected = "ok", None

                def commit() -> None:
                    if victim is not None:
                        victim.nlink -= 1
                    del sp.children[sn]
                    dp.children[dn] = obj
        return f"rename {src} {dst}", lambda root: os.rename(f"{root}/{src}", f"{root}/{dst}"), expected, commit

    def _unlink(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is None:
                expected = _err(errno.ENOENT)
            elif obj.kind == "dir":
                expected = _err(errno.EISDIR)
            else:
                expected = "ok", None

                def commit() -> None:
                    obj.nlink -= 1
                    del parent.children[name]
        return f"unlink {path}", lambda root: os.unlink(f"{root}/{path}"), expected, commit

    def _mkdir(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is not None:
                expected = _err(errno.EEXIST)
            else:
                expected = "ok", None

                def commit() -> None:
                    parent.children[name] = Obj("dir", 0o750)
        return f"mkdir {path}", lambda root: os.mkdir(f"{root}/{path}", 0o750), expected, commit

    def _rmdir(self) -> tuple:
        path = self._pick()
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        else:
            parent, name, obj = got
            if obj is None:
                expected = _err(errno.ENOENT)
            elif obj.kind != "dir":
                expected = _err(errno.ENOTDIR)
            elif obj.children:
                expected = _err(errno.ENOTEMPTY)
            else:
                expected = "ok", None

                def commit() -> None:
                    del parent.children[name]
        return f"rmdir {path}", lambda root: os.rmdir(f"{root}/{path}"), expected, commit

    def _chmod(self) -> tuple:
        path, mode = self._pick(), self.rng.choice(MODES)
        obj = self._target(path)
        commit = None
        if isinstance(obj, int):
            expected = _err(obj)
        else:
            expected = "ok", None

            def commit() -> None:
                obj.mode = mode
        return f"chmod {path} {mode:o}", lambda root: os.chmod(f"{root}/{path}", mode), expected, commit

    def _truncate(self) -> tuple:
        path, size = self._pick(), self.rng.choice((0, 1, 50, 300, 10000))
        obj = self._target(path)
        commit = None
        if isinstance(obj, int):
            expected = _err(obj)
        elif obj.kind == "dir":
            expected = _err(errno.EISDIR)
        else:
            expected = "ok", None

            def commit() -> None:
                obj.data = obj.data[:size].ljust(size, b"\0")
        return f"truncate {path} {size}", lambda root: os.truncate(f"{root}/{path}", size), expected, commit

    def _link(self) -> tuple:
        src, dst = self._pick(), self._pick()
        a, b = self._get(src), self._get(dst)
        commit = None
        if isinstance(a, int):
            expected = _err(a)
        elif a[2] is None:
            expected = _err(errno.ENOENT)
        elif isinstance(b, int):
            expected = _err(b)
        elif b[2] is not None:
            expected = _err(errno.EEXIST)
        elif a[2].kind == "dir":
            expected = _err(errno.EPERM)
        else:
            obj, (dp, dn, _) = a[2], b
            expected = "ok", None

            def commit() -> None:
                obj.nlink += 1
                dp.children[dn] = obj
        return (f"link {src} {dst}", lambda root: os.link(f"{root}/{src}", f"{root}/{dst}", follow_symlinks=False),
                expected, commit)

    def _symlink(self) -> tuple:
        path = self._pick()
        target = f"/nonexistent-ovlfuse/{self.t}/{self.done}"  # dangles everywhere
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        elif got[2] is not None:
            expected = _err(errno.EEXIST)
        else:
            parent, name, _ = got
            expected = "ok", None

            def commit() -> None:
                parent.children[name] = Obj("symlink", data=target.encode())
        return f"symlink {path}", lambda root: os.symlink(target, f"{root}/{path}"), expected, commit

    def _setxattr(self) -> tuple:
        path = self._pick()
        key, value = f"user.k{self.rng.randrange(3)}", self.rng.randbytes(self.rng.randrange(1, 20))
        got = self._get(path)
        commit = None
        if isinstance(got, int):
            expected = _err(got)
        elif got[2] is None:
            expected = _err(errno.ENOENT)
        elif got[2].kind == "symlink":
            expected = _err(errno.EPERM)  # no user.* xattrs on symlinks
        else:
            obj = got[2]
            expected = "ok", None

            def commit() -> None:
                obj.xattrs[key] = value
        return (f"setxattr {path} {key}",
                lambda root: os.setxattr(f"{root}/{path}", key, value, follow_symlinks=False), expected, commit)

    def _peek(self) -> tuple:
        """Another thread's name: whatever it is at this instant, only "no such name" may fail."""
        path = self.rng.choice(self.others)

        def action(root: str) -> None:
            try:
                os.lstat(f"{root}/{path}")
            except (FileNotFoundError, NotADirectoryError):
                pass
        return f"peek {path}", action, ("ok", None), None

