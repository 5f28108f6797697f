"""ovlfuse diff / verify / layers / which."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from mounts import OVLFUSE, run_ovlfuse
from stores import fingerprint, rich_store

# --- diff ---------------------------------------------------------------------


def _tree(root) -> None:
    os.makedirs(root / "d" / "sub")
    (root / "d" / "f").write_text("hello")
    (root / "same-size").write_text("aaaa")
    (root / "mode").write_text("m")
    (root / "owner").write_text("o")
    (root / "xattr").write_text("x")
    (root / "timed").write_text("t")
    os.utime(root / "timed", ns=(10**18, 10**18))
    os.symlink("target", root / "link")
    os.mknod(root / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    (root / "h1").write_text("h")
    os.link(root / "h1", root / "h2")
    (root / "h3").write_text("h")
    (root / "typed").write_text("file")


PLANTS = {
    "only-in-a": lambda b: os.unlink(b / "d" / "f"),
    "only-in-b": lambda b: (b / "new").write_text("n"),
    "type": lambda b: (os.unlink(b / "typed"), os.mkdir(b / "typed")),
    "mode": lambda b: os.chmod(b / "mode", 0o600),
    "owner": lambda b: os.chown(b / "owner", 1000, 1000),
    "size": lambda b: (b / "d" / "f").write_text("hello world"),
    "content": lambda b: ((b / "same-size").write_text("bbbb"), os.utime(b / "same-size", ns=(0, 0)),
                          os.utime(b.parent / "a" / "same-size", ns=(0, 0))),
    "symlink": lambda b: (os.unlink(b / "link"), os.symlink("elsewhere", b / "link")),
    "rdev": lambda b: (os.unlink(b / "dev"), os.mknod(b / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 5))),
    "xattrs": lambda b: os.setxattr(b / "xattr", "user.k", b"v"),
    "mtime": lambda b: os.utime(b / "timed", ns=(10**18, 10**18 + 1)),
    "hardlink": lambda b: (os.unlink(b / "h2"), os.link(b / "h3", b / "h2")),
}


@pytest.fixture
def trees(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    _tree(a)
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    return a, b


def test_equal_trees(trees):
    a, b = trees
    result = run_ovlfuse("diff", str(a), str(b))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("equal")


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_each_kind_of_difference_is_reported(trees, kind):
    a, b = trees
    PLANTS[kind](b)
    result = run_ovlfuse("diff", "--json", str(a), str(b))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "ovlfuse-diff/1" and report["equal"] is False
    assert set(report) == {"schema", "a", "b", "equal", "entries", "counts", "differences"}
    kinds = {d["kind"] for d in report["differences"]}
    assert kind in kinds, report["differences"]
    assert kinds <= {kind, "size", "mtime"}, report["differences"]  # nothing unrelated
    for d in report["differences"]:
        assert set(d) == {"path", "kind", "a", "b"}
    text = run_ovlfuse("diff", str(a), str(b))
    assert text.returncode == 1 and kind in text.stdout


def test_no_times_and_errors(trees, tmp_path):
    a, b = trees
    PLANTS["mtime"](b)
    assert run_ovlfuse("diff", str(a), str(b)).returncode == 1
    assert run_ovlfuse("diff", "--no-times", str(a), str(b)).returncode == 0
    missing = run_ovlfuse("diff", str(a), str(tmp_path / "missing"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_upper_mode_equates_marker_forms(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "opq").mkdir(parents=True)
        (root / "opq" / "f").write_text("f")
        (root / "plain").mkdir()
    os.mknod(a / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (b / ".wh.gone").write_text("")
    (b / "plain" / "xgone").write_text("")
    os.setxattr(b / "plain" / "xgone", "trusted.overlay.whiteout", b"")
    os.mknod(a / "plain" / "xgone", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(a / "opq", "trusted.overlay.opaque", b"y")
    (b / "opq" / ".wh..wh..opq").write_text("")
    os.setxattr(a / "plain", "trusted.overlay.impure", b"y")
    os.setxattr(b / "plain", "trusted.overlay.opaque", b"x")
    for root in (a, b):  # the markers above changed directory times; only compare the forms
        for path in (root, root / "opq", root / "plain", root / "opq" / "f"):
            os.utime(path, ns=(0, 0))
    assert run_ovlfuse("diff", "--upper", str(a), str(b)).returncode == 0
    assert run_ovlfuse("diff", str(a), str(b)).returncode == 1
    os.removexattr(a / "opq", "trusted.overlay.opaque")
    result = run_ovlfuse("diff", "--upper", "--json", str(a), str(b))
    assert result.returncode == 1
    assert [d["kind"] for d in json.loads(result.stdout)["differences"]] == ["opaque"]


# --- verify ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return rich_store(str(tmp_path_factory.mktemp("verify") / "overlay2"))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return rich_store(str(tmp_path_factory.mktemp("deep") / "overlay2"), extra_layers=124)


@pytest.mark.parametrize("which", ["top", "image_top"])
def test_verify_equal_on_every_marker_form(store, which):
    before = fingerprint(store.root)
    result = run_ovlfuse("verify", "--root", store.root, getattr(store, which).id, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert fingerprint(store.root) == before, "verify wrote into the store"


def test_verify_deep_chain_and_explicit_options(deep):
    assert run_ovlfuse("verify", "--root", deep.root, deep.top.id[:12], timeout=300).returncode == 0
    lowers = ":".join(os.path.join(deep.root, "l", link) for link in deep.top.chain)
    result = run_ovlfuse("verify", "--json", "-o", f"lowerdir={deep.top.diff}:{lowers}", timeout=300)
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["equal"] is True


def test_verify_finds_a_planted_fault(store):
    env = dict(os.environ, OVLFUSE_TEST_FAULT="drop-bottom-layer")
    result = subprocess.run([*OVLFUSE, "verify", "--root", store.root, store.top.id],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "only-in-a" in result.stdout


def test_verify_without_kernel_overlay_says_why(store, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "mount").write_text("#!/bin/sh\necho 'mount: unknown filesystem type overlay' >&2\nexit 32\n")
    os.chmod(fake_bin / "mount", 0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    result = subprocess.run([*OVLFUSE, "verify", "--root", store.root, store.top.id],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "could not be mounted" in result.stderr and "unknown filesystem type" in result.stderr


# --- layers and which ---------------------------------------------------------------


def test_layers_lists_the_chain_with_marker_forms(store, deep):
    result = run_ovlfuse("layers", "--json", "--root", store.root, store.top.id)
    assert result.returncode == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    assert [layer["id"] for layer in layers] == [os.path.basename(layer.dir) for layer in store.layers]
    assert layers[0]["writable"] and not any(layer["writable"] for layer in layers[1:])
    middle = layers[-2]["markers"]
    for form in ("whiteout-device", "whiteout-xattr", "whiteout-oci", "opaque-trusted", "opaque-user",
                 "opaque-oci", "xwhiteout-dir"):
        assert middle.get(form, 0) >= 1, (form, middle)
    assert layers[0]["markers"] == {"whiteout-device": 1, "opaque-trusted": 1}
    deep_layers = json.loads(run_ovlfuse("layers", "--json", "--root", deep.root, deep.top.id).stdout)["layers"]
    assert len(deep_layers) == 128
    text = run_ovlfuse("layers", "--root", deep.root, deep.image_top.id)
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 128  # header + 127 read-only layers


@pytest.mark.parametrize("path, expect", [
    ("a/shadow", {"visible": True, "provided_by": [0], "shadows": [2, 3]}),
    ("a/file1", {"visible": False, "hidden_by": "whiteout (char 0:0)"}),
    ("a/file2", {"visible": False, "hidden_by": "whiteout (.wh. file)"}),
    ("xw/old", {"visible": False, "hidden_by": "whiteout (xattr)"}),
    ("opq-dev/old", {"visible": False, "hidden_by": "opaque dir opq-dev"}),
    ("opq-oci/keep", {"visible": False, "hidden_by": "opaque dir opq-oci"}),
    ("a/b", {"visible": True, "provided_by": [0, 1, 2, 3]}),
    ("dir-becomes-file/sub/x", {"visible": False, "hidden_by": "dir-becomes-file is a file"}),
    ("nowhere", {"visible": False, "hidden_by": "no layer has it"}),
])
def test_which_explains_paths(store, path, expect):
    result = run_ovlfuse("which", "--json", "--root", store.root, store.top.id, "/" + path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["visible"] == expect["visible"]
    if "provided_by" in expect:
        assert [int(p.split()[1]) for p in answer["provided_by"]] == expect["provided_by"]
    if "shadows" in expect:
        assert [int(s.split()[1]) for s in answer["shadows"]] == expect["shadows"]
    if "hidden_by" in expect:
        assert expect["hidden_by"] in answer["hidden_by"], answer


def test_which_on_a_deep_chain(deep):
    result = run_ovlfuse("which", "--root", deep.root, deep.top.id, "/a/b/c/d/e/deep0")
    assert result.returncode == 0
    assert result.stdout.startswith("/a/b/c/d/e/deep0: file from layer 125")


def test_verify_the_demo_store(tmp_path):
    assert run_ovlfuse("demo", str(tmp_path / "demo")).returncode == 0
    root = str(tmp_path / "demo" / "overlay2")
    for name in sorted(os.listdir(root)):
        if name != "l":
            result = run_ovlfuse("verify", "--root", root, name, timeout=300)
            assert result.returncode == 0, (name, result.stdout, result.stderr)


def test_verify_as_an_ordinary_user(tmp_path):
    """An ordinary user verifies inside a user namespace, with user.overlay.* markers."""
    from users import ordinary_user

    with ordinary_user() as user:
        store = rich_store(os.path.join(user.home, "overlay2"))
        for layer in store.layers:
            for dirpath, dirnames, filenames in os.walk(layer.diff):
                for path in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
                    for attr in ("opaque", "whiteout"):
                        try:
                            value = os.getxattr(path, f"trusted.overlay.{attr}", follow_symlinks=False)
                        except OSError:
                            continue
                        os.removexattr(path, f"trusted.overlay.{attr}", follow_symlinks=False)
                        os.setxattr(path, f"user.overlay.{attr}", value, follow_symlinks=False)
        user.own(store.root)
        before = fingerprint(store.root)
        result = user.run("verify", "--root", store.root, store.top.id)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("equal")
        faulty = user.run("verify", "--root", store.root, store.top.id, env={"OVLFUSE_TEST_FAULT": "drop-bottom-layer"})
        assert faulty.returncode == 1, faulty.stdout + faulty.stderr
        assert fingerprint(store.root) == before


def test_ordinary_user_is_refused_a_root_written_store(tmp_path):
    """trusted.overlay.* markers are invisible to an ordinary user: say so instead of serving a wrong view."""
    from users import ordinary_user

    with ordinary_user() as user:
        store = rich_store(os.path.join(user.home, "overlay2"))
        subprocess.run(["chmod", "-R", "a+rX", store.root], check=True)
        mnt = os.path.join(user.home, "mnt")
        os.mkdir(mnt)
        user.own(mnt)
        result = user.run("--root", store.root, store.image_top.id, mnt)
        assert result.returncode == 1
        assert "written by root" in result.stderr and result.stderr.count("\n") == 1
        assert not os.listdir(mnt)
