"""Containers, images and layers addressed by the names their engines give them.

The engines' records are written here in their on-disk formats; test_docker.py
reads the ones a real dockerd writes.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from mounts import ovlfuse_mount, run_ovlfuse
from ovlfuse.store.containers import chain_id
from stores import rich_store
from treesnap import differences, snapshot


def _dump(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f) if not isinstance(data, str) else f.write(data)


@pytest.fixture
def docker(tmp_path):
    root = tmp_path / "docker"
    store = rich_store(str(root / "overlay2"))
    image_layers = store.layers[1:][::-1]  # base first, as an image lists them
    diff_ids = ["sha256:" + hashlib.sha256(layer.id.encode()).hexdigest() for layer in image_layers]
    layerdb = root / "image" / "overlay2" / "layerdb"
    for n, layer in enumerate(image_layers):
        _dump(str(layerdb / "sha256" / chain_id(diff_ids[: n + 1]).removeprefix("sha256:") / "cache-id"), layer.id)
    image_id = hashlib.sha256(b"image").hexdigest()
    _dump(str(root / "image" / "overlay2" / "imagedb" / "content" / "sha256" / image_id),
          {"rootfs": {"type": "layers", "diff_ids": diff_ids}})
    _dump(str(root / "image" / "overlay2" / "repositories.json"),
          {"Repositories": {"myimage": {"myimage:v1": f"sha256:{image_id}"},
                            "busybox": {"busybox:latest": f"sha256:{image_id}"}}})
    container_id = hashlib.sha256(b"container").hexdigest()
    _dump(str(root / "containers" / container_id / "config.v2.json"), {"ID": container_id, "Name": "/web"})
    _dump(str(layerdb / "mounts" / container_id / "mount-id"), store.top.id)
    return root, store, container_id


def _view(args: list[str], mnt: str):
    with ovlfuse_mount(args, mnt):
        return snapshot(mnt)


def test_docker_container_by_name_and_id(docker, tmp_path):
    root, store, container_id = docker
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    by_layer = _view(["--root", str(root / "overlay2"), store.top.id, mnt], mnt)
    for name in ("web", container_id, container_id[:12]):
        assert differences(by_layer, _view(["--docker-root", str(root), name, mnt], mnt)) == []


@pytest.mark.parametrize("name", ["myimage:v1", "busybox", "docker.io/library/busybox:latest"])
def test_docker_image_by_name_mounts_read_only(docker, tmp_path, name):
    root, store, _ = docker
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    expected = _view(["--root", str(root / "overlay2"), store.image_top.id, mnt], mnt)
    with ovlfuse_mount(["--docker-root", str(root), name, mnt], mnt):
        assert differences(expected, snapshot(mnt)) == []
        assert any(line.split()[1] == mnt and line.split()[3].startswith("ro")
                   for line in open("/proc/self/mounts"))


def test_containers_storage_names(tmp_path):
    root = tmp_path / "storage"
    store = rich_store(str(root / "overlay"))
    chain = store.layers[::-1]
    _dump(str(root / "overlay-layers" / "layers.json"),
          [{"id": layer.id, "parent": below.id if below else "", "names": [f"layer-{i}"]}
           for i, (layer, below) in enumerate(zip(chain, [None] + chain[:-1]))])
    _dump(str(root / "overlay-images" / "images.json"),
          [{"id": "f" * 64, "names": ["localhost/myimage:v1"], "layer": store.image_top.id},
           {"id": "d" * 64, "names": ["localhost/" + "e" * 12 + ":latest"], "layer": store.image_top.id}])
    _dump(str(root / "overlay-containers" / "containers.json"),
          [{"id": "e" * 64, "names": ["podc"], "layer": store.top.id}])
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    top = _view(["--root", str(root / "overlay"), store.top.id, mnt], mnt)
    image = _view(["--root", str(root / "overlay"), "--read-only", store.image_top.id, mnt], mnt)
    # a full id, then a name, then an id prefix: "eeeeeeeeeeee" names an image before it prefixes the container
    for name, expected in (("podc", top), ("e" * 13, top), ("e" * 12, image), ("myimage:v1", image),
                           ("localhost/myimage:v1", image), (f"layer-{len(chain) - 2}", image)):
        assert differences(expected, _view(["--storage-root", str(root), name, mnt], mnt)) == [], name


def test_ordinary_users_default_storage_root(monkeypatch):
    """An ordinary user's podman keeps its store under the user's data dir, as containers/storage does."""
    from ovlfuse.store import containers
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.data")
    assert containers.default_storage_root() == "/home/u/.data/containers/storage"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert containers.default_storage_root() == "/home/u/.local/share/containers/storage"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert containers.default_storage_root() == "/var/lib/containers/storage"


def test_unknown_name_says_where_it_looked(docker, tmp_path):
    root, _, _ = docker
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_ovlfuse("--docker-root", str(root), "no-such-container", str(mnt))
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "no container or image" in line and str(root) in line
