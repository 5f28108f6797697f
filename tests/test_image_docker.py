"""ovlfuse import and export against a real dockerd (the module's private one, from test_docker).

``docker save`` -> ``ovlfuse import`` -> an ovlfuse mount by name shows
what dockerd's own layers show through the kernel's overlay; a container's
changes -> ``ovlfuse export --tag`` -> ``docker load`` gives the tree of
``docker commit`` of the same container.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest

from mounts import kernel_mount, ovlfuse_mount, run_ovlfuse
from test_docker import Docker, _kernel_image_view, docker  # noqa: F401  (the module's dockerd, reused)
from treesnap import differences, snapshot

IMAGES = ["built:v1", "committed:v1", "base:v1"]


@pytest.fixture(scope="module")
def saved(docker, tmp_path_factory):
    """(docker save archive of three images, the ovlfuse store it was imported into, import's output)."""
    base = tmp_path_factory.mktemp("saved")
    archive, store = str(base / "images.tar"), str(base / "store")
    docker("save", "-o", archive, *IMAGES)
    result = run_ovlfuse("import", "--docker-root", store, archive, timeout=300)
    assert result.returncode == 0, result.stderr
    return archive, store, result.stdout


def _kernel_and_ovlfuse(docker: Docker, store: str, image: str, tmp_path):
    kernel, ours = tmp_path / "kernel", tmp_path / "ours"
    kernel.mkdir()
    ours.mkdir()
    chain = docker.chain("image", image)
    if len(chain) == 1:
        (tmp_path / "empty").mkdir()
        chain.append(str(tmp_path / "empty"))
    return chain, str(kernel), str(ours)


@pytest.mark.parametrize("image", IMAGES)
def test_a_saved_image_imported_shows_what_dockerd_shows(docker, saved, tmp_path, image):
    _, store, _ = saved
    chain, kernel, ours = _kernel_and_ovlfuse(docker, store, image, tmp_path)
    with kernel_mount(chain, kernel, extra="ro"), ovlfuse_mount(["--docker-root", store, image, ours], ours):
        result = run_ovlfuse("diff", kernel, ours, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert differences(snapshot(kernel), snapshot(ours)) == []


def test_the_store_is_laid_out_as_dockers_driver_lays_it_out(docker, saved):
    archive, store, output = saved
    layers = os.path.join(store, "overlay2")
    result = run_ovlfuse("layers", "--json", "--docker-root", store, "committed:v1")
    assert result.returncode == 0, result.stderr
    chain = [layer["path"] for layer in json.loads(result.stdout)["layers"]]
    assert len(chain) == len(docker.chain("image", "committed:v1")) == 4
    links = {}
    theirs = docker.chain("image", "committed:v1")
    for n, (diff, docker_diff) in enumerate(zip(chain, theirs)):
        layer = os.path.dirname(diff)
        for name in ("committed", "work", "lower", "link"):  # what dockerd's own layers hold, ours hold
            assert os.path.exists(os.path.join(layer, name)) == \
                os.path.exists(os.path.join(os.path.dirname(docker_diff), name)), (n, name)
        assert os.path.dirname(layer) == layers and len(os.path.basename(layer)) == 64
        link = open(os.path.join(layer, "link")).read()
        assert len(link) == 26 and os.readlink(os.path.join(layers, "l", link)) == f"../{os.path.basename(layer)}/diff"
        links[diff] = link
        has_child, has_parent = n > 0, n < len(chain) - 1
        assert os.path.exists(os.path.join(layer, "committed")) == has_child
        assert os.path.isdir(os.path.join(layer, "work")) == has_parent
    for n, diff in enumerate(chain[:-1]):
        lower = open(os.path.join(os.path.dirname(diff), "lower")).read()
        assert lower == ":".join(f"l/{links[d]}" for d in chain[n + 1:])
    # the kernel's own markers, as dockerd's driver writes them
    top_of_built = os.path.dirname(chain[1])
    diff = os.path.join(top_of_built, "diff")
    assert os.getxattr(os.path.join(diff, "data", "opq"), "trusted.overlay.opaque") == b"y"
    assert os.stat(os.path.join(diff, "data", "gone"), follow_symlinks=False).st_rdev == 0
    # a second import reuses every layer and reads none
    again = run_ovlfuse("import", "-q", "--docker-root", store, archive, timeout=300)
    assert again.returncode == 0 and again.stdout.count("(0 new)") == 3, again.stdout
    assert len(os.listdir(layers)) == 1 + 4  # l/ and the four layers


def test_a_containers_changes_exported_load_as_dockers_commit_of_it(docker, tmp_path):
    """``changer``'s layer (committed:v1 is its ``docker commit``) exported with its image, loaded back."""
    out = str(tmp_path / "exported.tar")
    result = run_ovlfuse("export", "-q", "--docker-root", docker.data_root, "changer", "--tag", "exported:v1",
                         "--from", "built:v1", "-O", out, timeout=300)
    assert result.returncode == 0, result.stderr
    docker("load", "-i", out)
    try:
        mnt = tmp_path / "m"
        mnt.mkdir()
        committed = _kernel_image_view(docker, "committed:v1", str(mnt))
        exported = _kernel_image_view(docker, "exported:v1", str(mnt))
        assert differences(committed, exported) == []
        assert docker("image", "inspect", "-f", "{{json .Config.Cmd}} {{.Config.WorkingDir}}", "exported:v1") == \
            docker("image", "inspect", "-f", "{{json .Config.Cmd}} {{.Config.WorkingDir}}", "built:v1")
    finally:
        docker("rmi", "exported:v1", check=False)


def test_a_layer_export_is_byte_stable_and_in_the_oci_form(docker, tmp_path):
    outs = [str(tmp_path / f"layer{n}.tar") for n in range(2)]
    for out in outs:
        result = run_ovlfuse("export", "-q", "--docker-root", docker.data_root, "changer", "-O", out, timeout=120)
        assert result.returncode == 0, result.stderr
    data = [open(out, "rb").read() for out in outs]
    assert data[0] == data[1]
    with tarfile.open(outs[0]) as t:
        members = {m.name: m for m in t}
    # changer removed /data/keep/a and /bin/ln, and replaced /data/file2dir with a new directory
    assert {"data/keep/.wh.a", "bin/.wh.ln", "data/file2dir/.wh..wh..opq", "data/file2dir/c"} <= members.keys()
    assert members["data/hl3"].islnk() or members["data/hl"].islnk()
    assert (members["data/opq"].uid, members["data/opq"].gid) == (7, 7)
    gz = str(tmp_path / "layer.tar.gz")
    assert run_ovlfuse("export", "-q", "--docker-root", docker.data_root, "changer", "-O", gz,
                       "--compress", "gzip").returncode == 0
    assert subprocess.run(["gzip", "-dc", gz], capture_output=True).stdout == data[0]
