"""ovlfuse import and export against a real podman (rootful, the kernel's overlay driver, private storage).

``podman save`` (OCI archive, OCI directory and docker-archive) -> ``ovlfuse
import`` -> an ovlfuse mount by name shows what ``podman image mount``
shows; a container's changes -> ``ovlfuse export --tag`` -> ``podman load``
gives the tree of ``podman commit`` of the same container.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from mounts import ovlfuse_mount, run_ovlfuse
from test_podman import CHANGES, CONTAINERFILE, Podman, _missing, _rootfs_tar, _ulimits
from treesnap import differences, snapshot

pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def podman():
    base = Path(tempfile.mkdtemp(prefix="ovl-pi."))  # short: podman refuses a runroot over 50 characters
    side = Podman(base / "k", None)
    try:
        side("import", str(_rootfs_tar(base)), "localhost/base:latest")
        context = base / "context"
        context.mkdir()
        (context / "Containerfile").write_text(CONTAINERFILE)
        side("build", "--network=none", "--pull=never", *_ulimits(), "-t", "localhost/built:v1", str(context))
        side("run", "--name", "changer", "--network=none", *_ulimits(), "localhost/base", "sh", "-c", CHANGES)
        side("commit", "changer", "localhost/committed:v1")
        yield side
    finally:
        side.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _image_mount(side: Podman, image: str) -> str:
    return side("image", "mount", image).stdout.decode().strip()


@pytest.mark.parametrize("fmt", ["oci-archive", "oci-dir", "docker-archive"])
def test_a_saved_image_imported_shows_what_podman_shows(podman, tmp_path, fmt):
    saved = str(tmp_path / "saved")
    podman("save", "--format", fmt, "-o", saved, "localhost/built:v1")
    store, mnt = str(tmp_path / "store"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    result = run_ovlfuse("import", "-q", "--docker-root", store, "--name", "built:v1", saved, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs = _image_mount(podman, "localhost/built:v1")
    try:
        with ovlfuse_mount(["--docker-root", store, "built:v1", mnt], mnt):
            expected, ours = snapshot(theirs), snapshot(mnt)
        # containers/storage makes every layer's root 0555 whatever the tar says; Docker's driver (and
        # ovlfuse, laying the store out as Docker does) 0755.  Everything below the root is the same.
        assert stat.S_IMODE(expected.records[b""].mode) == 0o555
        assert stat.S_IMODE(ours.records[b""].mode) == 0o755
        expected.records[b""] = ours.records[b""]
        assert differences(expected, ours) == []
    finally:
        podman("image", "unmount", "localhost/built:v1")


def test_an_oci_archive_keeps_its_own_name(podman, tmp_path):
    saved = str(tmp_path / "saved.tar")
    podman("save", "--format", "oci-archive", "-o", saved, "localhost/built:v1")
    store = str(tmp_path / "store")
    result = run_ovlfuse("import", "-q", "--docker-root", store, saved, timeout=300)
    assert result.returncode == 0, result.stderr
    layers = run_ovlfuse("layers", "--json", "--docker-root", store, "localhost/built:v1")
    assert layers.returncode == 0, layers.stderr
    assert len(json.loads(layers.stdout)["layers"]) == 4


def test_a_containers_changes_exported_load_as_podmans_commit_of_it(podman, tmp_path):
    out = str(tmp_path / "exported.tar")
    result = run_ovlfuse("export", "-q", "--storage-root", podman.root, "changer", "--tag", "localhost/exported:v1",
                         "-O", out, timeout=300)
    assert result.returncode == 0, result.stderr
    podman("load", "-i", out)
    committed = _image_mount(podman, "localhost/committed:v1")
    exported = _image_mount(podman, "localhost/exported:v1")
    try:
        assert differences(snapshot(committed), snapshot(exported)) == []
        assert subprocess.run(["diff", "-r", "--no-dereference", committed, exported]).returncode == 0
    finally:
        podman("image", "unmount", "localhost/committed:v1", "localhost/exported:v1")
