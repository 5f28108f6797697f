"""Container engines' names: Docker's and containers/storage's own files, written into a temporary directory."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from ovlfuse.store.containers import DOCKER_ROOT, STORAGE_ROOT, EngineLayer, chain_id, default_storage_root, \
    docker_container, docker_image, find, storage_layer

CONTAINER_ID = "c0ffee" * 10 + "abcd"
IMAGE_ID = "1abe1" * 12 + "1234"
DIFF_IDS = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]


def _json(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def _text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def docker(tmp_path) -> str:
    """A Docker data root: container "web" on layer "rwlayer", image "app:v2" whose top layer is "imagetop"."""
    root = str(tmp_path / "docker")
    _json(f"{root}/containers/{CONTAINER_ID}/config.v2.json", {"Name": "/web", "ID": CONTAINER_ID})
    _text(f"{root}/image/overlay2/layerdb/mounts/{CONTAINER_ID}/mount-id", "rwlayer")
    image_dir = f"{root}/image/overlay2"
    _json(f"{image_dir}/imagedb/content/sha256/{IMAGE_ID}", {"rootfs": {"type": "layers", "diff_ids": DIFF_IDS}})
    _json(f"{image_dir}/repositories.json", {"Repositories": {
        "app": {"app:v2": f"sha256:{IMAGE_ID}"},
        "registry.example:5000/team/app": {"registry.example:5000/team/app:v2": f"sha256:{IMAGE_ID}"},
        "busybox": {"busybox:latest": f"sha256:{IMAGE_ID}"},
    }})
    _text(f"{image_dir}/layerdb/sha256/{chain_id(DIFF_IDS).removeprefix('sha256:')}/cache-id", "imagetop\n")
    return root


@pytest.fixture
def storage(tmp_path) -> str:
    """A containers/storage root: container "box" on "rw", image "localhost/img:1" on "top" above "bottom"."""
    root = str(tmp_path / "storage")
    _json(f"{root}/overlay-containers/containers.json",
          [{"id": "c" * 64, "names": ["box"], "image": "i" * 64, "layer": "rw"}])
    _json(f"{root}/overlay-images/images.json", [{"id": "i" * 64, "names": ["localhost/img:1"], "layer": "top"}])
    _json(f"{root}/overlay-layers/layers.json",
          [{"id": "bottom"}, {"id": "top", "parent": "bottom", "names": ["named-layer"]},
           {"id": "rw", "parent": "top"}])
    return root


def test_chain_id():
    assert chain_id(["sha256:x"]) == "sha256:x"
    first = "sha256:" + hashlib.sha256(f"{DIFF_IDS[0]} {DIFF_IDS[1]}".encode()).hexdigest()
    assert chain_id(DIFF_IDS) == first
    assert chain_id([*DIFF_IDS, "sha256:c"]) == "sha256:" + hashlib.sha256(f"{first} sha256:c".encode()).hexdigest()


@pytest.mark.parametrize("name", ["web", "/web", CONTAINER_ID, CONTAINER_ID[:12], CONTAINER_ID[:20]])
def test_docker_container(docker, name):
    assert docker_container(docker, name) == EngineLayer(f"{docker}/overlay2", "rwlayer", False,
                                                         f"docker container {name}")


@pytest.mark.parametrize("name", ["db", CONTAINER_ID[:11], "c0ffee", CONTAINER_ID + "0"])
def test_docker_container_not_found(docker, name):
    assert docker_container(docker, name) is None


def test_docker_container_prefix_of_two_ids_is_none(docker):
    _json(f"{docker}/containers/{CONTAINER_ID[:12]}ffff/config.v2.json", {"Name": "/other"})
    assert docker_container(docker, CONTAINER_ID[:12]) is None
    assert docker_container(docker, CONTAINER_ID[:13]).layer_id == "rwlayer"


def test_docker_container_without_a_mount_id(docker):
    os.unlink(f"{docker}/image/overlay2/layerdb/mounts/{CONTAINER_ID}/mount-id")
    assert docker_container(docker, "web") is None


@pytest.mark.parametrize("name", ["app:v2", "docker.io/library/app:v2", "docker.io/app:v2", "localhost/app:v2",
                                  "registry.example:5000/team/app:v2", "busybox", "docker.io/library/busybox",
                                  IMAGE_ID, f"sha256:{IMAGE_ID}", IMAGE_ID[:12], f"sha256:{IMAGE_ID[:12]}"])
def test_docker_image(docker, name):
    assert docker_image(docker, name) == EngineLayer(f"{docker}/overlay2", "imagetop", True, f"docker image {name}")


@pytest.mark.parametrize("name", ["app", "app:v3", "registry.example:5000/team/app", "busybox:1", IMAGE_ID[:11],
                                  "other"])
def test_docker_image_not_found(docker, name):
    """A name without a tag means :latest; app has only v2."""
    assert docker_image(docker, name) is None


def test_docker_image_with_a_missing_cache_id_or_config(docker):
    chain = chain_id(DIFF_IDS).removeprefix("sha256:")
    os.unlink(f"{docker}/image/overlay2/layerdb/sha256/{chain}/cache-id")
    assert docker_image(docker, "app:v2") is None
    _json(f"{docker}/image/overlay2/imagedb/content/sha256/{IMAGE_ID}", {"rootfs": {"diff_ids": []}})
    assert docker_image(docker, "app:v2") is None


@pytest.mark.parametrize("file, content", [
    ("containers/{cid}/config.v2.json", [1]),
    ("containers/{cid}/config.v2.json", {"Name": 5}),
    ("containers/{cid}/config.v2.json", "{not json"),
    ("image/overlay2/repositories.json", []),
    ("image/overlay2/repositories.json", {"Repositories": []}),
    ("image/overlay2/repositories.json", {"Repositories": {"app": ["x"]}}),
    ("image/overlay2/repositories.json", {"Repositories": {"app": {"app:v2": 5}}}),
    ("image/overlay2/imagedb/content/sha256/{iid}", {"rootfs": []}),
    ("image/overlay2/imagedb/content/sha256/{iid}", {"rootfs": {"diff_ids": "sha256:x"}}),
    ("image/overlay2/imagedb/content/sha256/{iid}", {"rootfs": {"diff_ids": [1, 2]}}),
    ("image/overlay2/imagedb/content/sha256/{iid}", [1]),
])
def test_docker_files_of_the_wrong_shape_find_nothing(docker, file, content):
    """Valid JSON of another shape counts as unreadable (it ended in a traceback)."""
    path = f"{docker}/{file.format(cid=CONTAINER_ID, iid=IMAGE_ID)}"
    if isinstance(content, str):
        _text(path, content)
    else:
        _json(path, content)
    assert docker_container(docker, "web" if "containers/" in file else "nope") is None
    assert docker_image(docker, "app:v2" if "image/" in file else "nope") is None


@pytest.mark.parametrize("name, layer, ro, kind", [
    ("box", "rw", False, "container"),
    ("c" * 64, "rw", False, "container"),
    ("c" * 12, "rw", False, "container"),
    ("localhost/img:1", "top", True, "image"),
    ("img:1", "top", True, "image"),
    ("i" * 12, "top", True, "image"),
    ("top", "top", True, "layer"),  # a layer with children is read-only
    ("named-layer", "top", True, "layer"),
    ("rw", "rw", False, "layer"),  # a layer without children is writable
    ("bottom", "bottom", True, "layer"),
])
def test_storage_layer(storage, name, layer, ro, kind):
    assert storage_layer(storage, name) == EngineLayer(f"{storage}/overlay", layer, ro,
                                                       f"containers/storage {kind} {name}")


@pytest.mark.parametrize("name", ["nobox", "c" * 11, "img", "img:2", "t"])
def test_storage_layer_not_found(storage, name):
    assert storage_layer(storage, name) is None


def test_storage_full_ids_before_names_before_prefixes(storage):
    """As containers/storage looks a name up: a layer named like an image's id prefix is found by its name."""
    _json(f"{storage}/overlay-layers/layers.json", [{"id": "x" * 64, "names": ["i" * 12]}])
    assert storage_layer(storage, "i" * 12).layer_id == "x" * 64
    assert storage_layer(storage, "i" * 64).layer_id == "top"


def test_a_storage_record_without_a_layer(storage):
    _json(f"{storage}/overlay-containers/containers.json", [{"id": "c" * 64, "names": ["box"]}])
    assert storage_layer(storage, "box") is None


@pytest.mark.parametrize("file, content", [
    ("overlay-layers/layers.json", {"id": "rw"}),
    ("overlay-layers/layers.json", [1, "rw", None]),
    ("overlay-layers/layers.json", [{"id": 5, "names": ["rw"]}]),
    ("overlay-layers/layers.json", [{"id": "rw", "parent": ["top"], "names": [["x"]]}]),
    ("overlay-containers/containers.json", [{"id": "c" * 64, "names": ["box"], "layer": 7}]),
    ("overlay-containers/containers.json", [{"id": "c" * 64, "names": "box", "layer": "rw"}]),
])
def test_storage_files_of_the_wrong_shape_are_skipped(storage, file, content):
    _json(f"{storage}/{file}", content)
    found = [storage_layer(storage, name) for name in ("box", "5", "rw", "x")]
    assert all(f is None or isinstance(f.layer_id, str) for f in found)
    assert storage_layer(storage, "img:1") == EngineLayer(f"{storage}/overlay", "top",
                                                          True, "containers/storage image img:1")
    if file.startswith("overlay-containers"):
        assert found[0] is None


def test_find_asks_docker_containers_then_images_then_storage(docker, storage, tmp_path):
    assert find("web", docker, storage).what == "docker container web"
    assert find("app:v2", docker, storage).what == "docker image app:v2"
    assert find("box", docker, storage).what == "containers/storage container box"
    _json(f"{storage}/overlay-containers/containers.json", [{"id": "c" * 64, "names": ["web"], "layer": "rw"}])
    assert find("web", docker, storage).what == "docker container web"
    assert find("web", str(tmp_path / "no-docker"), storage).what == "containers/storage container web"
    assert find("nothing", docker, storage) is None
    assert find("web", str(tmp_path / "a"), str(tmp_path / "b")) is None


def test_default_storage_root(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_storage_root() == STORAGE_ROOT == "/var/lib/containers/storage"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_storage_root() == f"{tmp_path}/data/containers/storage"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_storage_root() == f"{tmp_path}/home/.local/share/containers/storage"
    monkeypatch.setenv("XDG_DATA_HOME", "")
    assert default_storage_root() == f"{tmp_path}/home/.local/share/containers/storage"
    assert DOCKER_ROOT == "/var/lib/docker"
