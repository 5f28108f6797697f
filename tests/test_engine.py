"""The merge engine driven directly, and the kernel caching it is designed for."""

from __future__ import annotations

import errno
import os
import re
import subprocess

import pytest

from mounts import ovlfuse_mount
from ovlfuse.fs import namei
from ovlfuse.sys import safeio
from ovlfuse.fs.engine import ROOT, MergeEngine
from ovlfuse.fs.layers import LayerStack
from ovlfuse.store.plan import plan_from_store
from stores import rich_store
from treesnap import differences, snapshot


def _engine(store, layer) -> MergeEngine:
    plan = plan_from_store(store.root, layer.id, read_only=False)
    return MergeEngine(LayerStack.open(plan.upper, plan.workdir, plan.lowers))


def _walk_to(engine: MergeEngine, path: str) -> int:
    ino = ROOT
    for part in path.split("/"):
        ino = engine.lookup(ino, part.encode()).st_ino
    return ino


@pytest.fixture
def deep(tmp_path):
    return rich_store(str(tmp_path / "store"), extra_layers=124)


def test_lookups_after_the_first_touch_no_layer(deep, monkeypatch):
    engine = _engine(deep, deep.top)
    opened = []
    real_open = safeio.open_beneath
    monkeypatch.setattr(namei, "open_beneath", lambda *a: opened.append(a) or real_open(*a))
    deep_dir = _walk_to(engine, "a/b/c/d/e")
    engine.lookup(deep_dir, b"deep0")
    first = len(opened)
    assert first <= 4 * len(deep.layers), "building an index lists each layer about once"
    for round_ in range(3):
        for i in range(200):
            engine.lookup(deep_dir, f"deep{i}".encode())  # positive and negative
            engine.lookup(deep_dir, f"missing{i}".encode())
    assert len(opened) == first, "warm lookups must be dictionary hits"


def test_negative_lookup_is_cacheable(deep):
    engine = _engine(deep, deep.top)
    attr = engine.lookup(ROOT, b"no-such-name")
    assert attr.st_ino == 0 and attr.entry_timeout > 60
    assert engine.lookup(ROOT, b".wh.anything").st_ino == 0


def test_forget_never_breaks_later_requests(deep):
    engine = _engine(deep, deep.top)
    ino = _walk_to(engine, "a/b/c/d/e")
    before = engine.getattr(ino).st_mtime_ns
    engine.forget([(node_ino, node.nlookup) for node_ino, node in list(engine.nodes._nodes.items())])
    assert len(engine.nodes) == 1  # only the root is left
    again = _walk_to(engine, "a/b/c/d/e")
    assert again == ino and engine.getattr(again).st_mtime_ns == before
    with pytest.raises(OSError):
        engine.getattr(_walk_to(engine, "a/b") + 10**12)


def test_name_too_long(deep):
    engine = _engine(deep, deep.top)
    with pytest.raises(OSError) as exc:
        engine.lookup(ROOT, b"x" * 256)
    assert exc.value.errno == errno.ENAMETOOLONG


def _listing(engine: MergeEngine, path: str) -> list[bytes]:
    fh = engine.opendir(_walk_to(engine, path))
    try:
        return sorted(name for name, _, _ in engine.readdir(fh, 0))
    finally:
        engine.releasedir(fh)


def _forget_all(engine: MergeEngine) -> None:
    engine.forget([(nodeid, inode.nlookup) for nodeid, inode in list(engine.nodes._nodes.items())
                   if nodeid != ROOT])


def test_indexes_of_forgotten_directories_are_bounded_and_rebuilt(deep):
    """Indexes the kernel may still ask for stay; those of forgotten directories go beyond the bound."""
    engine = _engine(deep, deep.top)
    engine.namei.max_entries = 10
    paths = ("a", "a/b", "a/b/c", "names", "fill")
    listed = {path: _listing(engine, path) for path in paths}
    held = engine.namei.cached_entries
    assert held > 10, "directories the kernel holds keep their indexes"
    _forget_all(engine)
    root_index = len(engine.namei.children(engine.nodes.root))
    assert engine.namei.cached_entries <= max(10, root_index) < held
    for path in paths:
        assert _listing(engine, path) == listed[path]


def test_open_beneath_refuses_to_leave_a_layer(tmp_path):
    layer = tmp_path / "layer"
    (layer / "real").mkdir(parents=True)
    (tmp_path / "secret").write_text("s")
    os.symlink(str(tmp_path), layer / "escape")
    os.symlink("../", layer / "real" / "up")
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in (b"escape/secret", b"real/up/escape", b"../secret", b"escape"):
            with pytest.raises(OSError) as exc:
                os.close(safeio.open_beneath(fd, path, os.O_RDONLY))
            assert exc.value.errno in (errno.ELOOP, errno.EXDEV)
        os.close(safeio.open_beneath(fd, b"real", os.O_RDONLY | os.O_DIRECTORY))
    finally:
        os.close(fd)


def test_symlinked_directory_in_a_layer_is_not_followed(tmp_path):
    """A lower symlink where the upper has a directory never merges what it points to."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    upper, lower, mnt = tmp_path / "upper", tmp_path / "lower", tmp_path / "mnt"
    for d in (upper / "dir", lower, mnt):
        d.mkdir(parents=True)
    os.symlink(str(outside), lower / "dir")
    with ovlfuse_mount(["-o", f"lowerdir={upper}:{lower}", str(mnt)], str(mnt)):
        assert os.listdir(mnt / "dir") == []
        assert not os.path.exists(mnt / "dir" / "secret")


def _requests(log_file: str, pattern: str) -> int:
    with open(log_file) as f:
        return sum(1 for line in f if re.search(pattern, line))


def test_kernel_caches_entries_negatives_and_pages(tmp_path):
    store = rich_store(str(tmp_path / "store"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = str(tmp_path / "requests.log")
    with ovlfuse_mount(["--debug", "--log-file", log, "--root", store.root, store.top.id, str(mnt)], str(mnt)):
        for _ in range(3):
            assert not os.path.exists(mnt / "a" / "no-such-file")
            os.stat(mnt / "a" / "shadow")
            assert (mnt / "big").read_bytes()[:1] is not None
        subprocess.run(["sync"])
    assert _requests(log, r"trace DEBUG lookup /a/no-such-file ") == 1, "negative entries must be cached"
    assert _requests(log, r"trace DEBUG lookup /a/shadow ") == 1
    assert _requests(log, r"trace DEBUG lookup /big ") == 1
    assert 0 < _requests(log, r"trace DEBUG read /big \(fh \d+\) offset 0 ") <= 1, \
        "keep_cache: a second open reads from the page cache"


def test_walk_survives_forgets(tmp_path):
    """Dropping the kernel's caches sends FORGETs mid-walk; the view stays the same."""
    store = rich_store(str(tmp_path / "store"), extra_layers=20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ovlfuse_mount(["--root", store.root, store.top.id, str(mnt)], str(mnt)):
        first = snapshot(str(mnt))
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        second = snapshot(str(mnt))
    assert differences(first, second) == []
    assert first.inos == second.inos


def test_listing_has_dot_and_dotdot_like_the_kernel(tmp_path):
    store = rich_store(str(tmp_path / "store"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ovlfuse_mount(["--root", store.root, store.top.id, str(mnt)], str(mnt)):
        for sub, parent in (("a/b", "a"), ("a", ""), ("", "")):
            out = subprocess.run(["ls", "-ai", str(mnt / sub)], capture_output=True, text=True, check=True)
            inos = {line.split()[1]: int(line.split()[0]) for line in out.stdout.splitlines()}
            assert inos["."] == os.stat(mnt / sub).st_ino
            if sub:
                assert inos[".."] == os.stat(mnt / parent).st_ino


def test_statfs_reports_the_upper_filesystem(tmp_path):
    store = rich_store(str(tmp_path / "store"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ovlfuse_mount(["--root", store.root, store.top.id, str(mnt)], str(mnt)):
        ours, real = os.statvfs(mnt), os.statvfs(store.top.diff)
    assert ours.f_namemax == real.f_namemax == 255
    assert ours.f_blocks == real.f_blocks and ours.f_bsize == real.f_bsize
