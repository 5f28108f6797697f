"""An ordinary user's mounts: the upper dir ovlfuse writes without root is one the kernel reads with userxattr.

The user mounts a layer of a store by id (``--root``) and explicit
directories (``-o lowerdir=...,upperdir=...,workdir=...``), changes the
merged view through the mount and unmounts it with ``fusermount3 -u``.  The
upper dir must then hold only the kernel's unprivileged forms: char 0:0
whiteouts and ``user.overlay.opaque=y``, no ``trusted.*`` xattr and no file of
ovlfuse's own.  The same user then mounts the kernel's overlay on the same
layers and upper dir inside ``unshare -Urm`` with ``-o userxattr``, and that
view must equal the one ovlfuse showed; and the other way round, ovlfuse
shows what the user's kernel mount wrote.  Both views are read from inside a
user namespace, so owners map the same way in each.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
from collections.abc import Iterator

import pytest

import treesnap
from overlaypair import Layers, kernel_command, user_mount
from ovlfuse.tools.demo import StoreWriter
from stores import device_whiteout, write
from treesnap import Snapshot, differences
from users import OrdinaryUser, ordinary_user

# Run by the user inside the mount: every kind of change that leaves a marker in the upper dir.
CHANGES = """set -e
echo created > created
rm gone
echo more >> keep
chmod 600 keep
rm -rf d
mkdir d
echo n > d/new
mv mv-src mv-dst
mv sub/deep/file sub/moved
rm ddir/x
rmdir ddir
rm img-file
mkdir newdir
echo z > newdir/z
ln -s created newlink
ln created created-link
"""

# What the upper dir holds afterwards: type, and for "d" its opaque marker.
EXPECTED_UPPER = {
    "created": "file", "created-link": "file", "gone": "whiteout", "keep": "file", "d": "opaque dir",
    "d/new": "file", "mv-src": "whiteout", "mv-dst": "file", "sub": "dir", "sub/deep": "dir",
    "sub/deep/file": "whiteout", "sub/moved": "file", "ddir": "whiteout", "img-file": "whiteout",
    "newdir": "dir", "newdir/z": "file", "newlink": "symlink",
}


def _lower_content(base: str, image: str) -> None:
    """A base layer, and an image layer above it with a whiteout and an opaque dir in the user's forms."""
    write(f"{base}/d/f", "f\n")
    write(f"{base}/d/g", "g\n")
    write(f"{base}/gone", "g\n")
    write(f"{base}/keep", "k\n")
    os.setxattr(f"{base}/keep", "user.color", b"blue")
    write(f"{base}/mv-src", "m\n")
    write(f"{base}/sub/deep/file", "deep\n")
    write(f"{base}/ddir/x", "x\n")
    write(f"{base}/hard1", "h\n")
    os.link(f"{base}/hard1", f"{base}/hard2")
    os.symlink("keep", f"{base}/link")
    write(f"{base}/old", "old\n")
    write(f"{base}/opq/hidden", "hidden\n")
    write(f"{image}/img-file", "i\n")
    device_whiteout(f"{image}/old")
    write(f"{image}/opq/shown", "shown\n")
    os.setxattr(f"{image}/opq", "user.overlay.opaque", b"y")


def _store_layers(base_dir: str) -> Layers:
    """A Docker-layout store: base and image layers (committed) and an empty container layer."""
    sw = StoreWriter(os.path.join(base_dir, "overlay2"))
    base = sw.layer(seed="base")
    image = sw.layer(base, seed="image")
    _lower_content(base.diff, image.diff)
    sw.commit(base)
    sw.commit(image)
    return Layers.of_layer(sw.root, sw.layer(image, seed="container"))


def _dir_layers(base_dir: str) -> Layers:
    lowers = [os.path.join(base_dir, n) for n in ("image", "base")]
    upper, work = os.path.join(base_dir, "upper"), os.path.join(base_dir, "work")
    _lower_content(lowers[1], lowers[0])
    os.makedirs(upper)
    os.makedirs(work)
    return Layers.dirs(lowers, upper, work)


def _snapshot_in_user_namespace(user: OrdinaryUser, root: str, mount_first: str = "") -> Snapshot:
    """The user's snapshot of ``root``, taken as root of a new user namespace (after ``mount_first``).

    A mount made there ends with the namespace, when the command exits.
    """
    out = os.path.join(user.home, "snapshot.pickle")
    take = f'{user.python} -c "import pickle, sys, treesnap; pickle.dump(treesnap.snapshot(sys.argv[1]), ' \
           f'open(sys.argv[2], \'wb\'))" {root} {out}'
    done = user.command("env", f"PYTHONPATH={user.pythonpath}:{user.home}/tests", "unshare", "-Urm",
                        "sh", "-c", f"{mount_first}{take}", timeout=120)
    assert done.returncode == 0, done.stderr
    with open(out, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def user() -> Iterator[OrdinaryUser]:
    with ordinary_user() as user:
        os.makedirs(f"{user.home}/tests")
        shutil.copy(treesnap.__file__, f"{user.home}/tests/treesnap.py")
        yield user


@pytest.fixture(scope="module")
def userns_user(user: OrdinaryUser) -> OrdinaryUser:
    """The user, where an ordinary user may make a user namespace (the kernel mounts are made in one)."""
    probe = user.command("unshare", "-Urm", "true", timeout=120)
    if probe.returncode != 0:
        pytest.skip("an ordinary user cannot make a user namespace here, so the kernel's userxattr view "
                    f"cannot be had (unshare -Urm: {probe.stderr.strip()})")
    return user


def _upper_census(upper: str) -> dict[str, str]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
            assert not [n for n in xattrs if n.startswith("trusted.")], path
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                kind = "whiteout"
            elif stat.S_ISDIR(st.st_mode):
                kind = "opaque dir" if xattrs.get("user.overlay.opaque") == b"y" else "dir"
            else:
                kind = {stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(stat.S_IFMT(st.st_mode), "other")
            found[os.path.relpath(path, upper)] = kind
    return found


@pytest.mark.parametrize("form", ["layer-id", "lowerdir"])
def test_ordinary_user_writes_an_upper_dir_the_kernel_reads_with_userxattr(userns_user, form):
    user = userns_user
    base_dir = os.path.join(user.home, form)
    layers = (_store_layers if form == "layer-id" else _dir_layers)(base_dir)
    write(f"{layers.lowers[-1]}/rootfile", "owned by root\n")  # shows as nobody in both views
    user.own(base_dir)
    os.chown(f"{layers.lowers[-1]}/rootfile", 0, 0)
    mnt = os.path.join(base_dir, "mnt")
    os.mkdir(mnt)
    user.own(mnt)
    with user_mount(user, layers, mnt):
        changed = user.command("sh", "-c", f"cd {mnt}\n{CHANGES}", timeout=120)  # root may not enter the mount
        assert changed.returncode == 0, changed.stderr
        ours = _snapshot_in_user_namespace(user, mnt)
        unmounted = user.command("fusermount3", "-u", mnt, timeout=120)
        assert unmounted.returncode == 0, unmounted.stderr
    assert {b"created", b"d/new", b"mv-dst", b"sub/moved", b"newlink"} <= ours.records.keys()
    assert not {b"gone", b"d/f", b"mv-src", b"ddir", b"img-file", b"old", b"opq/hidden"} & ours.records.keys()
    assert ours.records[b"rootfile"].uid == 65534 and ours.records[b"keep"].uid == 0
    assert _upper_census(layers.upper) == EXPECTED_UPPER
    assert os.getxattr(f"{layers.upper}/keep", "user.color") == b"blue"
    assert os.listdir(layers.work) == ["work"] and os.listdir(f"{layers.work}/work") == []
    kernel = _snapshot_in_user_namespace(user, mnt, kernel_command(layers, mnt) + " && ")
    assert differences(kernel, ours) == []
    verified = user.run("verify", *layers.ovlfuse_args())  # the user's verify: in a user namespace, with userxattr
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_ordinary_user_reads_the_upper_dir_the_kernel_wrote_with_userxattr(userns_user):
    """The other way round: the user's kernel mount makes the changes, ovlfuse shows what that mount showed."""
    user = userns_user
    base_dir = os.path.join(user.home, "kernel-wrote")
    layers = _dir_layers(base_dir)
    user.own(base_dir)
    mnt = os.path.join(base_dir, "mnt")
    os.mkdir(mnt)
    user.own(mnt)
    kernel = _snapshot_in_user_namespace(user, mnt, f"{kernel_command(layers, mnt)} && (cd {mnt}\n{CHANGES}) && ")
    assert _upper_census(layers.upper) == EXPECTED_UPPER
    with user_mount(user, layers, mnt):
        ours = _snapshot_in_user_namespace(user, mnt)
    assert differences(kernel, ours) == []


def test_a_store_the_user_may_not_read_is_a_clear_error(user):
    docker_root = os.path.join(user.home, "root-only")  # as /var/lib/docker is: root's, mode 0700
    os.makedirs(f"{docker_root}/overlay2")
    os.chmod(docker_root, 0o700)
    result = user.run("layers", "--docker-root", docker_root, "web")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "permission denied" in result.stderr, result.stderr
