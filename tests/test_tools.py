"""ovlfuse diff / verify / layers / which."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from mounts import OVLFUSE, decoy_cwd, run_ovlfuse
from stores import fingerprint, rich_store

HERE = os.path.dirname(os.path.abspath(__file__))
FAULTS = os.path.join(HERE, "faults")  # PYTHONPATH: ovlfuse daemons serve without the bottom layer
DOCS = os.path.join(os.path.dirname(HERE), "docs")

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


def documented_kinds() -> dict[str, tuple[str, str]]:
    """The difference kinds docs/json.md lists, with the shape of ``a`` and ``b`` for each."""
    with open(os.path.join(DOCS, "json.md")) as f:
        rows = re.findall(r"^\| `([a-z-]+)` \| ([a-z]+) \| ([a-z]+) \|", f.read(), re.MULTILINE)
    return {kind: (a, b) for kind, a, b in rows}


TYPES = {"file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket", "whiteout"}
SHAPES = {
    "type": lambda v: v in TYPES, "null": lambda v: v is None,
    "octal": lambda v: isinstance(v, str) and re.fullmatch(r"0o[0-7]+", v) is not None,
    "owner": lambda v: isinstance(v, str) and re.fullmatch(r"\d+:\d+", v) is not None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool), "text": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict), "boolean": lambda v: isinstance(v, bool),
    "hash": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v) is not None,
    "paths": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
}


def test_the_documented_kinds_are_the_kinds_reported():
    documented = documented_kinds()
    assert set(documented) == set(PLANTS) | {"opaque"}, "docs/json.md and the kinds diff reports disagree"
    assert all(a in SHAPES and b in SHAPES for a, b in documented.values()), documented


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_each_kind_of_difference_is_reported_as_documented(trees, kind):
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
    shapes = documented_kinds()
    for d in report["differences"]:
        assert set(d) == {"path", "kind", "a", "b"}
        a_shape, b_shape = shapes[d["kind"]]
        assert SHAPES[a_shape](d["a"]) and SHAPES[b_shape](d["b"]), (d, a_shape, b_shape)
    text = run_ovlfuse("diff", str(a), str(b))
    assert text.returncode == 1 and kind in text.stdout


def test_only_in_b_is_reported_on_the_b_side(trees):
    a, b = trees
    (b / "new").write_text("n")
    os.unlink(b / "d" / "f")
    report = json.loads(run_ovlfuse("diff", "--json", str(a), str(b)).stdout)
    found = {d["kind"]: d for d in report["differences"] if d["kind"].startswith("only")}
    assert found["only-in-b"] == {"path": "new", "kind": "only-in-b", "a": None, "b": "file"}
    assert found["only-in-a"] == {"path": "d/f", "kind": "only-in-a", "a": "file", "b": None}
    text = run_ovlfuse("diff", str(a), str(b)).stdout
    assert "+ new (file)" in text and "- d/f (file)" in text and "None" not in text


def test_text_shows_times_and_hard_links_for_people(trees):
    a, b = trees
    PLANTS["mtime"](b)
    PLANTS["hardlink"](b)
    text = run_ovlfuse("diff", str(a), str(b)).stdout
    assert "timed: 2001-09-09T01:46:40.000000000Z -> 2001-09-09T01:46:40.000000001Z" in text, text
    assert "h2: hard-linked with h1 -> hard-linked with h3" in text, text
    assert "h1: hard-linked with h2 -> not hard-linked" in text, text
    assert "[" not in text  # no Python lists
    report = json.loads(run_ovlfuse("diff", "--json", str(a), str(b)).stdout)
    mtime = next(d for d in report["differences"] if d["kind"] == "mtime" and d["path"] == "timed")
    assert (mtime["a"], mtime["b"]) == (10**18, 10**18 + 1)  # JSON keeps the exact integers


def test_no_times_and_errors(trees, tmp_path):
    a, b = trees
    PLANTS["mtime"](b)
    assert run_ovlfuse("diff", str(a), str(b)).returncode == 1
    assert run_ovlfuse("diff", "--no-times", str(a), str(b)).returncode == 0
    missing = run_ovlfuse("diff", str(a), str(tmp_path / "missing"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "does not exist" in missing.stderr


def test_an_unreadable_tree_is_an_error_not_a_difference(trees):
    """An ordinary user who cannot list part of a tree gets exit 2 naming it, never a report."""
    from users import ordinary_user

    a, b = trees
    with ordinary_user() as user:
        for root in (a, b):
            shutil.copytree(root, os.path.join(user.home, root.name), symlinks=True)
        ua, ub = os.path.join(user.home, "a"), os.path.join(user.home, "b")
        user.own(ua)
        user.own(ub)
        os.chmod(os.path.join(ub, "d"), 0o000)  # the user's own directory, closed to the user
        result = user.run("diff", ua, ub)
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert result.stderr.strip() == f"ovlfuse: cannot read {ub}/d: permission denied; " \
                                        "compare as a user who may read both trees"
        os.chmod(ub, 0o000)
        result = user.run("diff", ua, ub)
        assert result.returncode == 2 and "permission denied" in result.stderr and result.stderr.count("\n") == 1


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
    """The daemon verify starts serves the layers without the bottom one (planted from the test's PYTHONPATH)."""
    result = run_ovlfuse("verify", "--root", store.root, store.top.id, env=dict(os.environ, PYTHONPATH=FAULTS),
                         timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "only-in-a" in result.stdout
    assert re.match(rf"\d+ differences: kernel's and ovlfuse's views of layer {store.top.id[:12]} \(4 layers\), "
                    "61 entries\n", result.stdout), result.stdout


def test_verify_without_kernel_overlay_says_why(store, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "mount").write_text("#!/bin/sh\necho 'mount: unknown filesystem type overlay' >&2\nexit 32\n")
    os.chmod(fake_bin / "mount", 0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    result = run_ovlfuse("verify", "--root", store.root, store.top.id, env=env, timeout=120)
    assert result.returncode == 2
    assert "could not be mounted" in result.stderr and "unknown filesystem type" in result.stderr
    _nothing_left(result)


def test_verify_is_independent_of_the_current_directory_and_pythonpath(store, tmp_path):
    """A folder named ovlfuse in the current directory (a clone in one's home), and one on PYTHONPATH."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("ovlfuse").__file__)))
    launcher = f"import sys; sys.path.insert(0, {src!r}); from ovlfuse.cli import main; sys.exit(main())"
    env = dict(os.environ, PYTHONPATH=decoy_cwd())  # the decoy first on the import path too
    result = subprocess.run([sys.executable, "-c", launcher, "verify", "--root", store.root, store.top.id],
                            capture_output=True, text=True, timeout=300, cwd=decoy_cwd(), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"equal: kernel's and ovlfuse's views of layer {store.top.id[:12]} (4 layers), " \
                            "61 entries\n"
    result = run_ovlfuse("verify", "-o", f"lowerdir={store.layers[1].diff}:{store.layers[2].diff}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"equal: kernel's and ovlfuse's views of {store.layers[1].diff} (2 layers)")
    assert "view of ovlfuse" not in result.stdout


def _verify_children(pid: int) -> list[int]:
    """The processes a verify started (its daemon runs in a session of its own: found by parent PID)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _tmpdirs() -> set[str]:
    return {n for n in os.listdir("/tmp") if n.startswith(("ovlfuse-verify.", "ovlfuse-daemon."))}


def _nothing_left(result=None, before: set[str] | None = None) -> None:
    mounts = [line for line in open("/proc/self/mountinfo") if "ovlfuse-verify." in line]
    assert mounts == [], mounts
    if before is not None:
        assert _tmpdirs() <= before, _tmpdirs() - before


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A store whose verify has time to be interrupted once both mounts are up: 4,000 files to scan."""
    store = rich_store(str(tmp_path_factory.mktemp("slow") / "overlay2"), extra_layers=8)
    for i in range(4000):
        with open(os.path.join(store.layers[-1].diff, f"f{i:04d}"), "w") as f:
            f.write(str(i))
    return store


def _verify_mounts() -> set[str]:
    """Which of verify's two mounts are up: "kernel", "ovlfuse"."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if "/ovlfuse-verify." in line]
    return {os.path.basename(p) for p in points}


def _interrupt_when(verify_pid: int, stage: set[str], signum: int, target: int) -> set[int]:
    """Send ``signum`` to ``target`` once ``stage`` mounts are up; the children of verify seen meanwhile."""
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while not stage <= _verify_mounts():
        assert os.path.exists(f"/proc/{verify_pid}"), "verify ended before it could be interrupted"
        assert time.monotonic() < deadline, "verify did not reach the stage"
        children.update(_verify_children(verify_pid))
        time.sleep(0.005)
    children.update(_verify_children(verify_pid))
    os.kill(target, signum)
    return children


@pytest.mark.parametrize("how, stage", [("SIGTERM", {"kernel"}), ("SIGTERM", {"kernel", "ovlfuse"}),
                                        ("SIGHUP", {"kernel", "ovlfuse"}), ("SIGINT", {"kernel", "ovlfuse"})])
def test_a_stop_signal_mid_verify_leaves_nothing_behind(slow, how, stage):
    before = _tmpdirs()
    proc = subprocess.Popen([*OVLFUSE, "verify", "--root", slow.root, slow.top.id], cwd=decoy_cwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = _interrupt_when(proc.pid, stage, getattr(signal, how), proc.pid)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, how), (out, err)
    assert err.strip() == f"ovlfuse verify: stopped by {how}; both mounts and the daemon are gone", err
    assert out == ""
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} of verify is left"
    _nothing_left(before=before)


def test_a_ci_timeout_leaves_nothing_behind(slow):
    """``timeout`` firing (SIGTERM to verify and its process group, as CI runners send it) mid-scan."""
    before = _tmpdirs()
    runner = subprocess.Popen(["timeout", "600", *OVLFUSE, "verify", "--root", slow.root, slow.top.id],
                              cwd=decoy_cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (verify := _verify_children(runner.pid)):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    children = _interrupt_when(verify[0], {"kernel", "ovlfuse"}, signal.SIGTERM, runner.pid)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signal.SIGTERM, (out, err)
    assert "Traceback" not in err and out == ""
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} of verify is left"
    _nothing_left(before=before)


def _run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (stdout a pipe); its exit status, stdout and what the terminal got."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, cwd=decoy_cwd(), text=True)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read()
    return proc.wait(timeout=60), out, seen.decode(errors="replace")


def test_verify_shows_progress_on_a_terminal_and_is_quiet_otherwise(store):
    status, out, terminal = _run_on_a_terminal([*OVLFUSE, "verify", "--root", store.root, store.top.id])
    assert status == 0, out + terminal
    for stage in ("mounting the kernel's overlay of layer", "mounting ovlfuse's view", "scanning the kernel's view",
                  "scanning ovlfuse's view (61 entries in the kernel's)", "comparing 61 entries"):
        assert stage in terminal, terminal
    assert out.startswith("equal: ")
    quiet = run_ovlfuse("verify", "--root", store.root, store.top.id)
    assert quiet.returncode == 0 and quiet.stderr == ""


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
    ("a/shadow", {"visible": True, "type": "file", "provided_by": [(0, "file")],
                  "shadows": [(2, "file"), (3, "file")]}),
    ("a/file1", {"visible": False, "hidden_by": {"kind": "whiteout", "path": "/a/file1", "form": "char 0:0",
                                                 "layer": 2}, "shadows": [(3, "file")]}),
    ("a/file2", {"visible": False, "hidden_by": {"kind": "whiteout", "form": ".wh. file", "layer": 2}}),
    ("xw/old", {"visible": False, "hidden_by": {"kind": "whiteout", "form": "xattr", "layer": 2}}),
    ("opq-dev/old", {"visible": False, "hidden_by": {"kind": "opaque", "path": "/opq-dev", "form": "xattr",
                                                     "layer": 2}}),
    ("opq-oci/keep", {"visible": False, "hidden_by": {"kind": "opaque", "path": "/opq-oci",
                                                      "form": ".wh..wh..opq", "layer": 2}}),
    ("a/b", {"visible": True, "type": "dir", "provided_by": [(0, "dir"), (1, "dir"), (2, "dir"), (3, "dir")]}),
    ("dir-becomes-file/sub/x", {"visible": False, "hidden_by": {"kind": "non-directory", "path": "/dir-becomes-file",
                                                                "holds": "file", "layer": 2}}),
    ("nowhere", {"visible": False, "hidden_by": {"kind": "nothing", "layer": None}, "shadows": []}),
])
def test_which_explains_paths(store, path, expect):
    result = run_ovlfuse("which", "--json", "--root", store.root, store.top.id, "/" + path)
    assert result.returncode == (0 if expect["visible"] else 1), result.stderr
    answer = json.loads(result.stdout)
    assert answer["schema"] == "ovlfuse-which/2" and answer["visible"] == expect["visible"]
    layers = {i: layer for i, layer in enumerate(store.layers)}
    for key in ("provided_by", "shadows"):
        for ref in answer[key]:
            layer = layers[ref["index"]]
            assert (ref["id"], ref["link"], ref["path"]) == (layer.id, layer.link, os.path.realpath(layer.diff))
        if key in expect:
            assert [(r["index"], r["holds"]) for r in answer[key]] == expect[key], answer
    if "type" in expect:
        assert answer["type"] == expect["type"]
    if "hidden_by" in expect:
        hidden = dict(answer["hidden_by"])
        if isinstance(hidden.get("layer"), dict):
            hidden["layer"] = hidden["layer"]["index"]
        assert {k: hidden.get(k) for k in expect["hidden_by"]} == expect["hidden_by"], answer


def test_which_text_and_exit_status(store):
    shown = run_ovlfuse("which", "--root", store.root, store.top.id, "/a/shadow")
    assert shown.returncode == 0
    assert shown.stdout.splitlines() == [
        f"/a/shadow: file from layer 0 ({store.top.id[:12]})",
        f"  shadows layer 2 ({store.layers[2].id[:12]}): file",
        f"  shadows layer 3 ({store.layers[3].id[:12]}): file",
    ]
    missing = run_ovlfuse("which", "--root", store.root, store.top.id, "/nowhere")
    assert missing.returncode == 1
    assert missing.stdout.strip() == "/nowhere: not in the merged view: no layer has it"
    assert "hidden by no layer" not in missing.stdout
    broken = run_ovlfuse("which", "--root", store.root, "0123456789abcdef", "/x")
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1


def test_which_follows_symlinked_directories_as_the_mount_does(tmp_path):
    """The demo's /sbin -> usr/bin: ls lists /sbin/tool, so which finds it; an absolute target leaves the view."""
    assert run_ovlfuse("demo", str(tmp_path / "demo")).returncode == 0
    root = str(tmp_path / "demo" / "overlay2")
    container = next(n for n in os.listdir(root) if n + "-init" in os.listdir(root))
    os.symlink("/usr", os.path.join(root, container, "diff", "abs-dir"))
    mnt = tmp_path / "demo" / "merged"
    from mounts import ovlfuse_mount
    with ovlfuse_mount(["--root", root, container, str(mnt)], str(mnt)):
        assert "tool" in os.listdir(mnt / "sbin")
    result = run_ovlfuse("which", "--json", "--root", root, container, "/sbin/tool")
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert answer["visible"] and answer["type"] == "file" and answer["resolved"] == "/usr/bin/tool"
    assert answer["via"] == [{"path": "/sbin", "target": "usr/bin"}]
    assert [r["index"] for r in answer["provided_by"]] == [3]
    text = run_ovlfuse("which", "--root", root, container, "/sbin/tool").stdout
    assert text.startswith("/sbin/tool: file from layer 3 (") and "(through /sbin -> usr/bin)" in text, text
    assert ", as /usr/bin/tool" in text
    out = run_ovlfuse("which", "--json", "--root", root, container, "/abs-dir/bin")
    assert out.returncode == 1
    assert json.loads(out.stdout)["hidden_by"]["kind"] == "leaves-view"
    assert "leads out of the merged view" in run_ovlfuse("which", "--root", root, container, "/abs-dir/bin").stdout


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
        faults = os.path.join(user.home, "faults")
        shutil.copytree(FAULTS, faults)
        user.own(faults)
        faulty = user.run("verify", "--root", store.root, store.top.id,
                          env={"PYTHONPATH": f"{faults}:{user.pythonpath}"})
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


def test_layers_shows_a_damaged_chain_and_marks_what_is_missing(store, tmp_path):
    damaged = rich_store(str(tmp_path / "overlay2"))
    missing_link = damaged.top.chain[1]
    os.unlink(os.path.join(damaged.root, "l", missing_link))
    result = run_ovlfuse("layers", "--root", damaged.root, damaged.top.id)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and missing_link in result.stderr
    rows = result.stdout.splitlines()[1:]
    assert len(rows) == 4
    assert "MISSING" in rows[2] and missing_link in rows[2]
    assert all("MISSING" not in row for row in rows[:2] + rows[3:])
    infos = json.loads(run_ovlfuse("layers", "--json", "--root", damaged.root, damaged.top.id).stdout)["layers"]
    assert [bool(i["missing"]) for i in infos] == [False, False, True, False]
    assert infos[2]["link"] == missing_link and "does not exist" in infos[2]["missing"]
    whole = json.loads(run_ovlfuse("layers", "--json", "--root", store.root, store.top.id).stdout)["layers"]
    assert all(i["missing"] is None for i in whole)


def test_piped_output_cut_short_exits_quietly(deep):
    """``ovlfuse layers --json | head -1``: no BrokenPipeError traceback, as with ls."""
    result = subprocess.run(f"{OVLFUSE[0]} layers --json --root {deep.root} {deep.top.id} | head -1",
                            shell=True, capture_output=True, text=True, cwd=decoy_cwd(), timeout=120)
    assert result.stdout == "{\n"
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize("command, positionals", [("verify", "LAYER"), ("layers", "LAYER"), ("which", "LAYER PATH"),
                                                  ("diff", "a b"), ("status", "mountpoint")])
def test_usage_lines_name_the_arguments(command, positionals):
    result = run_ovlfuse(command, "--help")
    assert result.returncode == 0
    usage = result.stdout.split("\n\n")[0]
    assert usage.startswith(f"usage: ovlfuse {command}"), usage
    for word in positionals.split():
        assert word in usage
    for link in re.findall(r"docs/[\w./-]+\.md", result.stdout):
        assert os.path.exists(os.path.join(os.path.dirname(HERE), link)), link


def test_the_demo_prints_a_command_that_runs_as_printed(tmp_path):
    """Printed from the venv's ovlfuse, which is not on PATH: the line names it by its path."""
    env = dict(os.environ, PATH="/usr/bin:/bin")
    result = run_ovlfuse("demo", str(tmp_path / "demo"), env=env)
    assert result.returncode == 0
    command = result.stdout.splitlines()[-1].strip()
    mnt = tmp_path / "demo" / "merged"
    done = subprocess.run(["sh", "-c", command + " --pid-file " + str(tmp_path / "pid")], env=env, cwd="/",
                          capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, command + ": " + done.stderr
        assert (mnt / "etc" / "motd").read_text() == "Welcome to the demo container.\n"
    finally:
        from ovlfuse.sys import daemons
        daemons.unmount(str(mnt))
