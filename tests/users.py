"""An ordinary user for tests, with what Debian gives one: a usable /dev/fuse.

The test suite runs as root from a checkout that other users may not be able
to read (and its venv may point at an interpreter under /root), so the user
gets a private, world-readable copy of the installed packages and of the
ovlfuse source, run with the system's python3 of the same version.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import ovlfuse
from mounts import decoy_cwd

USER = "ovlfuse-test"
# Held while the user exists and /dev/fuse is opened up, so that two test runs on
# one machine neither delete the user under each other nor restore the mode early.
LOCK = "/run/ovlfuse-test-user.lock"


@dataclass
class OrdinaryUser:
    name: str
    uid: int
    gid: int
    home: str  # world-readable scratch directory the user owns
    python: str
    pythonpath: str

    def run(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """``python -P -m ovlfuse ARGS`` as this user, from a directory holding a folder ``ovlfuse`` never to import.

        ``-P`` keeps that directory off the import path, as a console script does;
        what ovlfuse itself starts (verify's daemon, its user namespace) must too.
        """
        return self.python_run("-P", "-m", "ovlfuse", *args, env=env, timeout=timeout, cwd=decoy_cwd())

    def python_run(self, *args: str, env: dict | None = None, timeout: float = 300,
                   cwd: str | None = None) -> subprocess.CompletedProcess:
        """``python ARGS`` as this user (from its home), with ovlfuse and its dependencies importable."""
        return self.command("env", f"PYTHONPATH={self.pythonpath}", f"HOME={self.home}",
                            *(f"{k}={v}" for k, v in (env or {}).items()), self.python, *args, timeout=timeout,
                            cwd=cwd)

    def command(self, *args: str, timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
        """``ARGS`` run as this user (and the user's groups), in the user's home unless ``cwd``."""
        return subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *args],
                              capture_output=True, text=True, timeout=timeout, cwd=cwd or self.home)

    def own(self, path: str) -> None:
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", path], check=True)


def _system_python() -> str:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"no system {version} for an ordinary user (the venv's interpreter is {sys.executable})")


@contextlib.contextmanager
def ordinary_user() -> Iterator[OrdinaryUser]:
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with _ordinary_user() as user:
            yield user


@contextlib.contextmanager
def _ordinary_user() -> Iterator[OrdinaryUser]:
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True)
        created = True
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
    home = tempfile.mkdtemp(prefix="ovlfuse-user.")
    try:
        os.chmod("/dev/fuse", 0o666)  # as Debian's fuse3 package sets it
        os.chmod(home, 0o755)
        site = os.path.join(home, "site")
        shutil.copytree(sysconfig.get_paths()["purelib"], site, symlinks=True)
        src = os.path.join(home, "src")
        shutil.copytree(os.path.dirname(ovlfuse.__file__), os.path.join(src, "ovlfuse"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        entry = pwd.getpwnam(USER)
        user = OrdinaryUser(USER, entry.pw_uid, entry.pw_gid, home, _system_python(), f"{src}:{site}")
        user.own(home)
        yield user
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        shutil.rmtree(home, ignore_errors=True)
        if created:
            subprocess.run(["userdel", USER], capture_output=True)
