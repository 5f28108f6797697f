"""Names the container engines give: containers, images and layers, read from their own files.

No engine daemon is asked.  Docker keeps a container's name in
``containers/<id>/config.v2.json`` and its layer in
``image/overlay2/layerdb/mounts/<id>/mount-id``; an image's layers are found
from ``image/overlay2/repositories.json`` through the image config's diff ids,
their chain id and ``layerdb/sha256/<chain>/cache-id`` (an image id names its
``imagedb/content/sha256/<id>`` config directly).  containers/storage
(podman) lists containers, images and layers in ``overlay-containers/``,
``overlay-images/`` and ``overlay-layers/`` JSON files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

DOCKER_ROOT = "/var/lib/docker"
STORAGE_ROOT = "/var/lib/containers/storage"
IMPORT_ROOT = "/var/lib/ovlfuse"


def default_storage_root() -> str:
    """containers/storage's own default: the system store for root, the user's store otherwise."""
    if os.geteuid() == 0:
        return STORAGE_ROOT
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "containers", "storage")


def default_import_root() -> str:
    """Where ``ovlfuse import`` keeps images by default, a Docker-layout root of ovlfuse's own."""
    if os.geteuid() == 0:
        return IMPORT_ROOT
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "ovlfuse")


_REGISTRY_PREFIXES = ("docker.io/library/", "docker.io/", "localhost/")


@dataclass(frozen=True)
class EngineLayer:
    """A layer found through an engine's records."""

    store_root: str  # the overlay store holding the layer
    layer_id: str
    read_only: bool  # image layers are never written
    what: str  # for messages: "docker container web"


def _load(path: str) -> dict:
    """A JSON object from ``path``; {} if the file is missing, unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _records(path: str) -> list[dict]:
    """The objects of a JSON list in ``path`` (containers/storage's record files); anything else is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _text(value: object) -> str:
    """A string field of a record ("" if it is missing or of another type)."""
    return value if isinstance(value, str) else ""


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _image_names(name: str) -> set[str]:
    """The spellings an image reference may be stored under."""
    bare = name
    for prefix in _REGISTRY_PREFIXES:
        bare = bare.removeprefix(prefix)
    names = {name, bare} | {p + bare for p in _REGISTRY_PREFIXES}
    if ":" not in name.rpartition("/")[2] and "@" not in name:
        names |= {n + ":latest" for n in names}
    return names


def chain_id(diff_ids: list[str]) -> str:
    """The OCI chain id of a layer stack (``sha256:...``)."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def docker_container(docker_root: str, name: str) -> EngineLayer | None:
    """A Docker container's read-write layer (the ``mount-id`` dockerd recorded for it)."""
    containers = os.path.join(docker_root, "containers")
    try:
        ids = os.listdir(containers)
    except OSError:
        return None
    wanted = name.removeprefix("/")
    # Docker's order: a full id, then a name, then a unique id prefix.
    found = [cid for cid in ids if cid == wanted]
    if not found:
        found = [cid for cid in ids
                 if _text(_load(os.path.join(containers, cid, "config.v2.json")).get("Name")).removeprefix("/")
                 == wanted]
    if not found and len(wanted) >= 12:
        found = [cid for cid in ids if cid.startswith(wanted)]
    if len(found) != 1:
        return None
    layer = _read(os.path.join(docker_root, "image", "overlay2", "layerdb", "mounts", found[0], "mount-id"))
    if not layer:
        return None
    return EngineLayer(os.path.join(docker_root, "overlay2"), layer, False, f"docker container {name}")


def _docker_image_id(image_dir: str, name: str) -> str | None:
    """Docker's order: a full id, then a name, then a unique id prefix (``sha256:`` optional)."""
    try:
        ids = os.listdir(os.path.join(image_dir, "imagedb", "content", "sha256"))
    except OSError:
        ids = []
    bare = name.removeprefix("sha256:")
    if bare in ids:
        return bare
    repositories = _dict(_load(os.path.join(image_dir, "repositories.json")).get("Repositories"))
    names = _image_names(name)
    by_name = next((_text(ref_id) for refs in repositories.values() for ref, ref_id in _dict(refs).items()
                    if ref in names), None)
    if by_name:
        return by_name.removeprefix("sha256:")
    by_prefix = [image_id for image_id in ids if len(bare) >= 12 and image_id.startswith(bare)]
    return by_prefix[0] if len(by_prefix) == 1 else None


def docker_image_id(docker_root: str, name: str) -> str | None:
    """The id (64 hex digits) of the image ``name`` names in a Docker-layout root."""
    return _docker_image_id(os.path.join(docker_root, "image", "overlay2"), name)


def docker_image(docker_root: str, name: str) -> EngineLayer | None:
    """A Docker image's topmost layer: the ``cache-id`` of the chain of its config's diff ids."""
    image_dir = os.path.join(docker_root, "image", "overlay2")
    image_id = _docker_image_id(image_dir, name)
    if image_id is None:
        return None
    config = _load(os.path.join(image_dir, "imagedb", "content", "sha256", image_id))
    diff_ids = _dict(config.get("rootfs")).get("diff_ids")
    if not diff_ids or not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        return None
    cache_id = _read(os.path.join(image_dir, "layerdb", "sha256", chain_id(diff_ids).removeprefix("sha256:"),
                                  "cache-id"))
    if not cache_id:
        return None
    return EngineLayer(os.path.join(docker_root, "overlay2"), cache_id, True, f"docker image {name}")


def storage_layer(storage_root: str, name: str) -> EngineLayer | None:
    """A containers/storage container, image or layer, by id (or unique prefix) or name."""
    store = os.path.join(storage_root, "overlay")
    records = (
        ("overlay-containers/containers.json", "container", False),
        ("overlay-images/images.json", "image", True),
        ("overlay-layers/layers.json", "layer", None),
    )
    parents = {_text(layer.get("parent")) for layer in _records(os.path.join(storage_root, "overlay-layers",
                                                                               "layers.json"))}
    loaded = [(kind, read_only, _records(os.path.join(storage_root, path))) for path, kind, read_only in records]
    wanted = _image_names(name)
    # as containers/storage looks a name up: a full id, then a name, then an id prefix
    matches: tuple[Callable[[str, set[str]], bool], ...] = (
        lambda rid, names: rid == name,
        lambda rid, names: bool(names & wanted),
        lambda rid, names: len(name) >= 12 and rid.startswith(name),
    )
    for match in matches:
        for kind, read_only, found in loaded:
            for record in found:
                names = record.get("names")
                if match(_text(record.get("id")), {_text(n) for n in names} if isinstance(names, list) else set()):
                    layer = _text(record.get("id") if kind == "layer" else record.get("layer"))
                    if not layer:
                        return None
                    ro = layer in parents if read_only is None else read_only
                    return EngineLayer(store, layer, ro, f"containers/storage {kind} {name}")
    return None


def find(name: str, docker_root: str, storage_root: str) -> EngineLayer | None:
    """The layer an engine knows by ``name``: Docker containers, Docker images, then containers/storage,
    then what ``ovlfuse import`` keeps in its default root."""
    imported = default_import_root()
    for lookup, root in ((docker_container, docker_root), (docker_image, docker_root),
                         (storage_layer, storage_root), (docker_container, imported), (docker_image, imported)):
        if os.path.isdir(root):
            found = lookup(root, name)
            if found is not None:
                return found
    return None
