"""An ordinary user imports, mounts, changes and exports, with no root at any step.

Root only writes the archives and reads the results.  The user imports a
base image and a layer tarball on it with a writable layer (``--container``)
into a store of their own; the owners, set-id modes and devices the user
may not give are kept in stat override records, so a mount by name shows
them as the archive has them.  Mounted with the image's root mapped to
the user, the user changes the tree; ``ovlfuse export`` then gives the
changes as a layer, owners from the records (root's), and a whole image
that imports again to the changed tree.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

from users import OrdinaryUser, ordinary_user


def _add(t: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
         uid: int = 0, gid: int = 0, **extra) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.uid, info.gid, info.mtime = kind, len(data), mode, uid, gid, 1_700_000_000
    for key, value in extra.items():
        setattr(info, key, value)
    t.addfile(info, io.BytesIO(data) if data else None)


def _archives(home: str) -> tuple[str, str]:
    base, layer = os.path.join(home, "base.tar"), os.path.join(home, "layer.tar.gz")
    with tarfile.open(base, "w", format=tarfile.PAX_FORMAT) as t:
        for d in ("etc", "opt", "opt/tree", "dev", "bin"):
            _add(t, d, tarfile.DIRTYPE, mode=0o755)
        _add(t, "etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")
        _add(t, "etc/motd", data=b"hi\n")
        _add(t, "etc/shadow", data=b"s\n", mode=0o600, gid=42)
        _add(t, "bin/su", data=b"#!/bin/true\n", mode=0o4755)
        _add(t, "opt/owned", data=b"o\n", uid=1234, gid=5678, mode=0o640)
        _add(t, "opt/tree/a", data=b"a\n")
        _add(t, "dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        _add(t, "bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox")
    with tarfile.open(layer, "w:gz", format=tarfile.PAX_FORMAT) as t:
        _add(t, "opt", tarfile.DIRTYPE, mode=0o755)
        _add(t, "opt/.wh.owned")
        _add(t, "etc", tarfile.DIRTYPE, mode=0o755)
        _add(t, "etc/app", data=b"app\n")
    return base, layer


def _as_user(user: OrdinaryUser, script: str, cwd: str | None = None) -> str:
    """``sh -ec SCRIPT`` as the user, in ``cwd`` (entered as the user: root may not enter the user's mount)."""
    done = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "sh", "-ec",
                           f'cd "$0"; {script}', cwd or user.home], capture_output=True, text=True, cwd=user.home,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _ovlfuse(user: OrdinaryUser, *args: str) -> str:
    result = user.run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


LISTING = "find . -path ./proc -prune -o -printf '%p %U:%G %#m %y %s\\n' | sort"


def test_an_ordinary_user_imports_mounts_changes_and_exports():
    with ordinary_user() as user:
        base, layer = _archives(user.home)
        user.own(user.home)
        mnt = os.path.join(user.home, "mnt")
        store = os.path.join(user.home, ".local", "share", "ovlfuse")  # the user's default store
        _ovlfuse(user, "import", "-q", "--name", "base:v1", base)
        _ovlfuse(user, "import", "-q", "--parent", "base:v1", "--name", "app:v1", "--container", "box", layer)
        assert os.path.isdir(os.path.join(store, "overlay2", "l"))
        os.mkdir(mnt)
        user.own(mnt)

        # the image as the archives say, through the records; found by name in the default store
        _ovlfuse(user, "app:v1", mnt)
        try:
            shown = _as_user(user, "stat -c '%n %u:%g %a %F %t:%T' bin/su etc/shadow dev/null etc/app; "
                             "ls opt", cwd=mnt)
        finally:
            _as_user(user, f"fusermount3 -u {mnt}")
        assert shown.splitlines() == ["bin/su 0:0 4755 regular file 0:0", "etc/shadow 0:42 600 regular file 0:0",
                                      "dev/null 0:0 666 character special file 1:3", "etc/app 0:0 644 regular file 0:0",
                                      "tree"]

        # changed as the image's root, mapped to the user
        _ovlfuse(user, "-o", f"uidmapping=0:{user.uid}:1,gidmapping=0:{user.gid}:1", "box", mnt)
        try:
            _as_user(user, "echo new > etc/new; rm etc/motd; rm -r opt/tree; mkdir opt/tree; echo n > opt/tree/n; "
                     "echo more >> etc/passwd", cwd=mnt)
        finally:
            _as_user(user, f"fusermount3 -u {mnt}")

        out, image = os.path.join(user.home, "changes.tar"), os.path.join(user.home, "image.tar")
        _ovlfuse(user, "export", "-q", "box", "-O", out)
        _ovlfuse(user, "export", "-q", "box", "--tag", "app:v2", "-O", image)
        with tarfile.open(out) as t:
            members = {m.name: (m.type, m.uid, m.gid, m.mode) for m in t}
        assert members == {
            "etc": (tarfile.DIRTYPE, 0, 0, 0o755), "etc/.wh.motd": (tarfile.REGTYPE, 0, 0, 0),
            "etc/new": (tarfile.REGTYPE, 0, 0, 0o644), "etc/passwd": (tarfile.REGTYPE, 0, 0, 0o644),
            "opt": (tarfile.DIRTYPE, 0, 0, 0o755), "opt/tree": (tarfile.DIRTYPE, 0, 0, 0o755),
            "opt/tree/.wh..wh..opq": (tarfile.REGTYPE, 0, 0, 0), "opt/tree/n": (tarfile.REGTYPE, 0, 0, 0o644)}

        # the whole image, imported again into a second store of the user's, shows the changed tree
        again = os.path.join(user.home, "again")
        _ovlfuse(user, "import", "-q", "--docker-root", again, image)
        _ovlfuse(user, "--docker-root", again, "app:v2", mnt)
        try:
            tree = _as_user(user, LISTING + "; cat etc/passwd", cwd=mnt)
        finally:
            _as_user(user, f"fusermount3 -u {mnt}")
        assert "./etc/new 0:0 0644 f 4" in tree and "./etc/motd" not in tree and "./opt/tree/a" not in tree
        assert "./opt/tree/n 0:0 0644 f 2" in tree and "./bin/su 0:0 04755 f" in tree and "./opt/owned" not in tree
        assert "./dev/null 0:0 0666 c 0" in tree and tree.endswith("root:x:0:0::/root:/bin/sh\nmore\n")
        # nothing of the user's store is root's
        for top, dirs, files in os.walk(user.home):
            for name in dirs + files:
                assert os.lstat(os.path.join(top, name)).st_uid == user.uid, os.path.join(top, name)
