"""Export and import undo each other: every layer of the rich store (every marker form, type changes,
hard links, devices, xattrs, unicode and 255-byte names) exported and imported again on its parent gives
the same merged view; progress bars show on a terminal and nowhere else."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from mounts import ovlfuse_mount, run_ovlfuse
from stores import rich_store
from treesnap import differences, snapshot


def test_every_layer_exported_and_imported_again_gives_the_same_view(tmp_path):
    store = rich_store(str(tmp_path / "rich"))
    target = str(tmp_path / "imported")
    parent = None
    for n, layer in enumerate(reversed(store.layers)):
        out = str(tmp_path / f"layer{n}.tar.zst")
        result = run_ovlfuse("export", "-q", "--root", store.root, layer.id, "-O", out, "--compress", "zstd")
        assert result.returncode == 0, result.stderr
        args = ["--parent", parent] if parent else []
        result = run_ovlfuse("import", "-q", "--docker-root", target, "--name", f"layer:{n}", *args, out)
        assert result.returncode == 0, result.stderr
        parent = f"layer:{n}"
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.mkdir(a)
    os.mkdir(b)
    with ovlfuse_mount(["--root", store.root, "--read-only", store.top.id, a], a), \
            ovlfuse_mount(["--docker-root", target, parent, b], b):
        # single layers are exported with whole-second times, as Docker's Diff writes them
        assert differences(snapshot(a, with_times=False), snapshot(b, with_times=False)) == []


def _import_on(tty: bool, archive: str, target: str) -> str:
    """What ``ovlfuse import`` writes to stderr, on a terminal or a pipe."""
    command = [sys.executable, "-m", "ovlfuse", "import", "--docker-root", target, "--name", "x:v1", archive]
    if not tty:
        return subprocess.run(command, capture_output=True, text=True, timeout=120).stderr
    parent, child = pty.openpty()
    proc = subprocess.Popen(command, stdin=child, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            piece = os.read(parent, 4096)
        except OSError:
            break
        if not piece:
            break
        out += piece
    os.close(parent)
    assert proc.wait(timeout=120) == 0
    return out.decode(errors="replace")


def test_progress_bars_on_a_terminal_and_quiet_otherwise(tmp_path):
    store = rich_store(str(tmp_path / "rich"))
    archive = str(tmp_path / "image.tar")
    assert run_ovlfuse("export", "-q", "--root", store.root, store.top.id, "--tag", "x:v1", "-O", archive).returncode == 0
    shown = _import_on(True, archive, str(tmp_path / "t1"))
    assert "import layers" in shown and "4/4" in shown and "import bytes" in shown
    assert _import_on(False, archive, str(tmp_path / "t2")) == ""
