"""Another user is allowed and denied exactly what the kernel's overlay allows and denies.

ovlfuse mounts with ``allow_other`` and ``default_permissions``; the same calls,
made by an ordinary user on a kernel overlay of a copy of the same layers,
are the oracle.  Results are compared call by call, errno for errno.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from overlaypair import Layers, Mounted, mount, on_both
from users import ordinary_user

PROBE = r'''
import errno, json, os, sys
root = sys.argv[1]
def p(*parts): return os.path.join(root, *parts)
calls = [
    ("read 0600 root file", lambda: open(p("r600")).read()),
    ("read 0644 root file", lambda: open(p("r644")).read()),
    ("write 0644 root file", lambda: open(p("r644"), "a").write("x")),
    ("write 0666 lower file", lambda: open(p("w666"), "a").write("x")),
    ("write own lower file", lambda: open(p("mine"), "a").write("x")),
    ("list 0700 root dir", lambda: os.listdir(p("priv"))),
    ("stat in 0700 root dir", lambda: os.stat(p("priv", "f"))),
    ("list 0711 dir", lambda: os.listdir(p("x711"))),
    ("stat in 0711 dir", lambda: os.stat(p("x711", "f"))),
    ("exec 0744 file", lambda: os.access(p("prog"), os.X_OK) or (_ for _ in ()).throw(PermissionError(errno.EACCES, "x"))),
    ("create in 0777 dir", lambda: open(p("pub", "new"), "w").close()),
    ("create in 0755 root dir", lambda: open(p("r755", "new"), "w").close()),
    ("mkdir in 0755 root dir", lambda: os.mkdir(p("r755", "d"))),
    ("unlink root file in sticky dir", lambda: os.unlink(p("tmp", "rootfile"))),
    ("unlink own file in sticky dir", lambda: os.unlink(p("tmp", "userfile"))),
    ("rename root file in sticky dir", lambda: os.rename(p("tmp", "rootfile2"), p("tmp", "moved"))),
    ("unlink in 0777 dir", lambda: os.unlink(p("pub", "rootfile"))),
    ("chmod root file", lambda: os.chmod(p("r644"), 0o777)),
    ("chmod own file", lambda: os.chmod(p("mine"), 0o600)),
    ("chown own file to root", lambda: os.chown(p("mine"), 0, 0)),
    ("utime root file (explicit)", lambda: os.utime(p("w666"), (1, 1))),
    ("utime root 0666 file (now)", lambda: os.utime(p("w666"))),
    ("utime own file (explicit)", lambda: os.utime(p("mine2"), (1, 1))),
    ("setxattr on root file", lambda: os.setxattr(p("w666"), "user.k", b"v")),
    ("setxattr on own file", lambda: os.setxattr(p("mine2"), "user.k", b"v")),
    ("truncate 0644 root file", lambda: os.truncate(p("r644"), 0)),
    ("rmdir root dir in 0777 dir", lambda: os.rmdir(p("pub", "rootdir"))),
    ("symlink in 0755 root dir", lambda: os.symlink("x", p("r755", "l"))),
    ("hard link root file into 0777 dir", lambda: os.link(p("r644"), p("pub", "hl"))),
]
out = []
for name, call in calls:
    try:
        call()
        out.append([name, "ok"])
    except OSError as e:
        out.append([name, errno.errorcode.get(e.errno, str(e.errno))])
print(json.dumps(out))
'''


def _layers(base: str, uid: int, gid: int) -> tuple[str, str]:
    lower, lower2 = os.path.join(base, "lower"), os.path.join(base, "lower2")
    for d in ("priv", "x711", "pub/rootdir", "r755", "tmp"):
        os.makedirs(os.path.join(lower, d), exist_ok=True)
    os.makedirs(lower2)
    modes = {"priv": 0o700, "x711": 0o711, "pub": 0o777, "r755": 0o755, "tmp": 0o1777}
    files = {"r600": 0o600, "r644": 0o644, "w666": 0o666, "mine": 0o644, "mine2": 0o644, "prog": 0o744,
             "priv/f": 0o644, "x711/f": 0o644, "tmp/rootfile": 0o666, "tmp/rootfile2": 0o666,
             "tmp/userfile": 0o644, "pub/rootfile": 0o644}
    for path, mode in files.items():
        with open(os.path.join(lower, path), "w") as f:
            f.write("data\n")
        os.chmod(os.path.join(lower, path), mode)
    for path in ("mine", "mine2", "tmp/userfile"):
        os.chown(os.path.join(lower, path), uid, gid)
    for d, mode in modes.items():
        os.chmod(os.path.join(lower, d), mode)
    os.chmod(lower, 0o755)
    return lower, lower2


def _probe(user, root: str) -> list:
    script = os.path.join(user.home, "probe.py")
    with open(script, "w") as f:
        f.write(PROBE)
    result = user.python_run(script, root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def user():
    with ordinary_user() as u:
        yield u


def test_another_user_gets_what_the_kernel_gives(user):
    def make_layers(base) -> Layers:
        os.chmod(base, 0o755)
        lower, lower2 = _layers(str(base), user.uid, user.gid)
        upper, work = (os.path.join(base, n) for n in ("upper", "work"))
        for d in (upper, work):
            os.mkdir(d)
        os.chmod(upper, 0o755)
        return Layers.dirs([lower, lower2], upper, work)

    def probe(m: Mounted) -> list:
        return _probe(user, str(m.path))

    results = on_both(user.home, make_layers, probe, fuse_options=["allow_other"])
    kernel, ours = dict(results["kernel"]), dict(results["ovlfuse"])
    assert "ok" in kernel.values() and "EACCES" in kernel.values() and "EPERM" in kernel.values()
    assert ours == kernel, {k: (kernel[k], ours[k]) for k in kernel if kernel[k] != ours[k]}


def test_without_allow_other_other_users_are_shut_out(user):
    base = os.path.join(user.home, "private")
    os.mkdir(base)
    os.chmod(base, 0o755)
    lower, lower2 = _layers(base, user.uid, user.gid)
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    with mount("ovlfuse", Layers.dirs([lower, lower2]), mnt):
        result = user.python_run("-c", f"import os; os.listdir({mnt!r})")
        assert result.returncode != 0 and "PermissionError" in result.stderr
        assert subprocess.run(["ls", mnt], capture_output=True).returncode == 0
