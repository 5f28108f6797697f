"""The README's set-up steps for an ordinary user, run as an ordinary user on a store that user owns."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from ovlfuse.sys import daemons, mountinfo
from users import ordinary_user

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's block for an ordinary user, line by line as the test runs it (the clone is a copy here).
STEPS = [
    "./dev system-packages",
    "git clone REPOSITORY ~/ovlfuse && cd ~/ovlfuse",
    "./dev demo",
    ".venv/bin/ovlfuse demo ~/layers",
    "fusermount3 -u ~/layers/merged",
]


def _checkout_copy(dest: str) -> None:
    """The repository's files as a clone has them: tracked files, current contents, nothing built."""
    try:
        listed = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], capture_output=True, check=True).stdout
        files = [f for f in listed.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info"))
        return
    for name in files:
        source = os.path.join(REPO, name)
        if os.path.lexists(source):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(dest, name), follow_symlinks=False)


def _daemons_of(mountpoint: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if os.fsencode(mountpoint) in args:
                found.append(int(entry))
    return found


def _end(pids: list[int]) -> None:
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, 9)


def test_the_readme_lists_the_ordinary_users_steps():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    block = readme[readme.index("### As an ordinary user"):]
    commands = [line.strip() for line in block[block.index("```sh"):].split("```")[1].splitlines()
                if line.strip() and not line.startswith("#") and line.strip() != "sh"]
    assert commands == STEPS


def test_the_readme_steps_work_for_an_ordinary_user_on_a_store_they_own():
    """As root once: the system packages (here already installed); then, as the user, no root at all."""
    assert open(os.path.join(sys.prefix, "pyvenv.cfg")).read().count("home = /usr/bin\n") == 1, \
        "the suite's own venv must run on Debian's python3, as ./dev makes it"
    assert subprocess.run(["./dev", "system-packages"], cwd=REPO, capture_output=True).returncode == 0
    with ordinary_user() as user:
        clone = os.path.join(user.home, "ovlfuse")
        _checkout_copy(clone)
        user.own(clone)
        env = {"HOME": user.home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "http_proxy", "https_proxy",
                                                                        "no_proxy", "HTTP", "NO_PROXY"))}}

        def as_user(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
            return subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                                   "bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                                  timeout=timeout)

        demo_mnt = None
        try:
            demo = as_user("./dev demo", timeout=900)
            assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
            assert "Welcome to the demo container." in demo.stdout
            demo_mnt = demo.stdout.strip().splitlines()[-1].rpartition("fusermount3 -u ")[2]
            assert mountinfo.find(demo_mnt) is not None
            with open(os.path.join(clone, ".venv", "pyvenv.cfg")) as f:
                assert "home = /usr/bin\n" in f.read()
            assert as_user(f"fusermount3 -u {demo_mnt}").returncode == 0

            store = as_user(".venv/bin/ovlfuse demo ~/layers")
            assert store.returncode == 0, store.stderr
            merged = os.path.join(user.home, "layers", "merged")
            mount = as_user(store.stdout.strip().splitlines()[-1])  # the command its last line prints
            assert mount.returncode == 0, mount.stderr
            entry = mountinfo.find(merged)
            assert entry is not None and "allow_other" not in entry.options  # the user's alone
            work = as_user("cat ~/layers/merged/etc/motd && echo mine > ~/layers/merged/etc/greeting && "
                           "rm ~/layers/merged/etc/os-release && ls ~/layers/merged/etc")
            assert work.returncode == 0, work.stderr
            assert work.stdout.startswith("Welcome to the demo container.\n")
            assert "greeting" in work.stdout and "os-release" not in work.stdout
            pids = _daemons_of(merged)
            done = as_user("fusermount3 -u ~/layers/merged")
            assert done.returncode == 0, done.stderr
            _end(pids)
            assert mountinfo.find(merged) is None
            overlay2 = os.path.join(user.home, "layers", "overlay2")
            container = next(n for n in os.listdir(overlay2) if n + "-init" in os.listdir(overlay2))
            greeting = os.path.join(overlay2, container, "diff", "etc", "greeting")
            assert open(greeting).read() == "mine\n" and os.stat(greeting).st_uid == user.uid
            assert re.search(r"\.venv/bin/ovlfuse --root \S+/layers/overlay2 [0-9a-f]{12} \S+/layers/merged$",
                             store.stdout.strip())
        finally:
            for mnt in (demo_mnt, os.path.join(user.home, "layers", "merged")):
                if mnt and mountinfo.find(mnt) is not None:
                    pids = _daemons_of(mnt)
                    daemons.unmount(mnt)
                    _end(pids)
            if demo_mnt:
                shutil.rmtree(os.path.dirname(demo_mnt), ignore_errors=True)
