"""An image store in Docker's own layout: overlay2 layers beside the records that name them.

A store is a Docker data root: ``overlay2/`` holds the layers as the
overlay2 driver lays them out (``<id>/diff``, ``link``, ``lower``,
``work/``, ``committed`` in a layer once a child is built on it, and the
``l/<LINK>`` short links), and ``image/overlay2/`` the records
``store/containers.py`` reads to turn a name into a layer: ``layerdb``
(chain id -> ``cache-id``, ``diff``, ``size``, ``parent``), ``imagedb``
(image configs by id), ``repositories.json`` (names and tags), and for a
writable layer made by ``import --container`` the container records
(``containers/<id>/config.v2.json``, ``layerdb/mounts/<id>/mount-id``).
Docker's ``tar-split.json.gz`` is not written, so the store is not one
dockerd could ``docker save`` from; ovlfuse refuses to import into a root
where dockerd keeps its own records.

Every layer is built in a ``.import-*`` directory of the store and renamed
into place whole; its records are written the same way, last.  Imports
into one store take turns under ``.ovlfuse-import.lock``, and the leftovers
of a killed import are removed by the next.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ovlfuse.errors import OvlError
from ovlfuse.image import marks
from ovlfuse.store import containers

TEMP_PREFIX = ".import-"
LINK_LENGTH = 26
_NAME = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                   r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?$")


def default_docker_root() -> str:
    """Where ``ovlfuse import`` keeps images when no root is given (and where names are looked up)."""
    return containers.default_import_root()


def split_reference(name: str) -> tuple[str, str]:
    """``repo[:tag]`` as (repo, "repo:tag"), Docker's short form (``docker.io/library/`` dropped)."""
    if not _NAME.match(name):
        raise OvlError(f"{name!r} is not an image name: use lower-case repo[/path][:tag], as docker tag does")
    repo, tag = name, "latest"
    last = name.rpartition("/")[2]
    if ":" in last:
        repo, _, tag = name.rpartition(":")
    for prefix in ("docker.io/library/", "docker.io/"):
        if repo.startswith(prefix):
            repo = repo[len(prefix):]
            break
    return repo, f"{repo}:{tag}"


def _write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it)."""
    temp = f"{path}{TEMP_PREFIX}{secrets.token_hex(4)}"
    _write_file(temp, data, mode)
    os.rename(temp, path)


def remove_tree(path: str) -> None:
    """Remove a half-built layer, even one holding directories without write permission."""
    def retry(func, target, _exc) -> None:
        parent = os.path.dirname(target)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | 0o700)
        func(target)
    if os.path.lexists(path):
        shutil.rmtree(path, onerror=retry)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass
class PendingLayer:
    """A layer being built in a temporary directory of the store."""

    id: str  # its cache id once in place
    link: str
    temp: str
    parent: str | None  # parent layer's id

    @property
    def diff(self) -> str:
        return os.path.join(self.temp, "diff")


class Store:
    def __init__(self, docker_root: str) -> None:
        self.root = os.path.abspath(docker_root)
        self.layers = os.path.join(self.root, "overlay2")
        self.meta = os.path.join(self.root, "image", "overlay2")
        self.layerdb = os.path.join(self.meta, "layerdb")

    # --- set-up and locking --------------------------------------------------

    def _check_not_dockers(self) -> None:
        if os.path.isdir(os.path.join(self.root, "containers")) and not os.path.exists(
                os.path.join(self.root, ".ovlfuse-store")):
            raise OvlError(f"{self.root} is a Docker data root (it has containers/): dockerd keeps its image "
                           "records in memory and overwrites them, and needs tar-split metadata ovlfuse does not "
                           "write; use 'docker load' there, or import into a root of ovlfuse's (--docker-root DIR)")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Create the store if needed, take the import lock, and clear what a killed import left."""
        self._check_not_dockers()
        try:
            os.makedirs(self.root, exist_ok=True)
            if not os.path.exists(os.path.join(self.root, ".ovlfuse-store")):
                _write_file(os.path.join(self.root, ".ovlfuse-store"), b"written by ovlfuse import\n")
            for path, mode in ((self.layers, 0o710), (os.path.join(self.layers, "l"), 0o700),
                               (os.path.join(self.layerdb, "sha256"), 0o700), (os.path.join(self.layerdb, "tmp"), 0o700),
                               (os.path.join(self.meta, "imagedb", "content", "sha256"), 0o700),
                               (os.path.join(self.layerdb, "mounts"), 0o700), (os.path.join(self.root, "containers"), 0o710)):
                if not os.path.isdir(path):
                    os.makedirs(path, mode=mode)
            lock = os.open(os.path.join(self.root, ".ovlfuse-import.lock"),
                           os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise OvlError(f"cannot create the image store {self.root}: {e.strerror}; give a directory you may "
                           "write with --docker-root DIR") from None
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"ovlfuse: waiting for another import into {self.root}", flush=True, file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._clear_leftovers()
            yield
        finally:
            os.close(lock)

    def _clear_leftovers(self) -> None:
        for base in (self.layers, os.path.join(self.layerdb, "tmp")):
            for name in os.listdir(base):
                path = os.path.join(base, name)
                if name.startswith(TEMP_PREFIX):
                    remove_tree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        for base in (self.meta,):
            for name in os.listdir(base):
                if TEMP_PREFIX in name:
                    os.unlink(os.path.join(base, name))

    # --- layers --------------------------------------------------------------

    def layer_for_chain(self, chain: str) -> str | None:
        """The id of the layer of chain id ``chain``, if the store holds it whole."""
        cache = _read(os.path.join(self.layerdb, "sha256", chain.removeprefix("sha256:"), "cache-id"))
        if cache and os.path.isdir(os.path.join(self.layers, cache, "diff")):
            return cache
        return None

    def new_layer(self, parent: str | None) -> PendingLayer:
        layer_id = secrets.token_hex(32)
        while True:
            link = base64.b32encode(secrets.token_bytes(20)).decode()[:LINK_LENGTH]
            if not os.path.lexists(os.path.join(self.layers, "l", link)):
                break
        temp = os.path.join(self.layers, TEMP_PREFIX + layer_id)
        os.mkdir(temp, 0o701)
        os.mkdir(os.path.join(temp, "diff"), 0o755)
        return PendingLayer(layer_id, link, temp, parent)

    def _place(self, pending: PendingLayer) -> None:
        """Rename a built layer into place with its link, lower chain and workdir, as the driver has them."""
        _write_file(os.path.join(pending.temp, "link"), pending.link.encode())
        if pending.parent is not None:
            parent_dir = os.path.join(self.layers, pending.parent)
            parent_link = _read(os.path.join(parent_dir, "link"))
            parent_lower = _read(os.path.join(parent_dir, "lower"))
            if not parent_link:
                raise OvlError(f"layer {pending.parent} of the store has no link file; the store is damaged")
            lower = f"l/{parent_link}" + (f":{parent_lower}" if parent_lower else "")
            _write_file(os.path.join(pending.temp, "lower"), lower.encode())
            os.mkdir(os.path.join(pending.temp, "work"), 0o700)
            committed = os.path.join(parent_dir, "committed")
            if not os.path.exists(committed):
                _write_file(committed, b"", 0o600)
        os.symlink(f"../{pending.id}/diff", os.path.join(self.layers, "l", pending.link))
        os.rename(pending.temp, os.path.join(self.layers, pending.id))

    def commit_layer(self, pending: PendingLayer, chain: str, diff_id: str, parent_chain: str | None,
                     size: int) -> str:
        """Put a built image layer in place and record it under its chain id; returns its id."""
        self._place(pending)
        records = {"cache-id": pending.id, "diff": diff_id, "size": str(size)}
        if parent_chain is not None:
            records["parent"] = parent_chain
        try:
            self._record_dir(os.path.join(self.layerdb, "sha256", chain.removeprefix("sha256:")), records)
        except BaseException:  # a layer no record names would only take space
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.layers, "l", pending.link))
            remove_tree(os.path.join(self.layers, pending.id))
            raise
        return pending.id

    def _record_dir(self, final: str, records: dict[str, str]) -> None:
        temp = os.path.join(self.layerdb, "tmp", TEMP_PREFIX + secrets.token_hex(8))
        os.mkdir(temp, 0o700)
        for name, value in records.items():
            _write_file(os.path.join(temp, name), value.encode())
        try:
            os.rename(temp, final)
        except OSError as e:
            remove_tree(temp)
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise

    # --- images, names and containers ----------------------------------------

    def add_image(self, config: bytes, image_id: str) -> None:
        path = os.path.join(self.meta, "imagedb", "content", "sha256", image_id.removeprefix("sha256:"))
        if not os.path.exists(path):
            _replace_file(path, config)

    def tag(self, name: str, image_id: str) -> str:
        """Point ``name`` at ``image_id`` in repositories.json; returns the reference as stored."""
        repo, ref = split_reference(name)
        path = os.path.join(self.meta, "repositories.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as e:
            raise OvlError(f"cannot read {path}: {e}; the store's names are damaged") from None
        data.setdefault("Repositories", {}).setdefault(repo, {})[ref] = image_id
        _replace_file(path, json.dumps(data, sort_keys=True).encode())
        return ref

    def image_config(self, name: str) -> tuple[str, bytes] | None:
        """(image id, config) of an image of this store named ``name`` (name, id or id prefix)."""
        image_id = containers.docker_image_id(self.root, name)
        if image_id is None:
            return None
        with open(os.path.join(self.meta, "imagedb", "content", "sha256", image_id), "rb") as f:
            return "sha256:" + image_id, f.read()

    def check_container_name(self, name: str) -> None:
        """A name ``docker create`` would take, and one the store does not hold yet."""
        if not re.match(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", name):
            raise OvlError(f"{name!r} is not a container name: use letters, digits and _.- as docker create does")
        if containers.docker_container(self.root, name) is not None:
            raise OvlError(f"the store {self.root} already has a container named {name!r}; choose another name")

    def add_container(self, name: str, image_id: str, parent: str, parent_chain: str) -> str:
        """An empty writable layer on an image, recorded as Docker records a created container."""
        self.check_container_name(name)
        container_id = secrets.token_hex(32)
        pending = self.new_layer(parent)
        if os.geteuid() != 0:  # an ordinary user's layer keeps owners in records, as its image's layers do
            marks.Writer.record_path(pending.diff, 0, 0, stat.S_IFDIR | 0o755)
        self._place(pending)
        self._record_dir(os.path.join(self.layerdb, "mounts", container_id),
                         {"mount-id": pending.id, "parent": parent_chain})
        config = {"ID": container_id, "Name": "/" + name, "Image": image_id, "Driver": "overlay2",
                  "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        directory = os.path.join(self.root, "containers", container_id)
        os.mkdir(directory, 0o700)
        _write_file(os.path.join(directory, "config.v2.json"), json.dumps(config).encode(), 0o600)
        return pending.id
