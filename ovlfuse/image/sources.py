"""What an archive holds: images (config, layer blobs, names), or one layer tarball.

Three inputs, told apart by their contents:

- a ``docker save`` archive (``manifest.json``: each image's config file,
  layer files and ``RepoTags``; what podman writes by default too);
- an OCI image layout (``index.json`` and ``blobs/<alg>/<hex>``), as a
  directory or a tar of one (``podman save --format oci-archive``); an index
  of several platforms gives the image of this machine's;
- anything else is a single layer tarball (plain, gzip, zstd, bzip2 or xz).

An uncompressed archive is indexed once, headers only, and each blob is
then read in place (``streams.Window``); a compressed one is first
decompressed to a temporary file beside the store.  Configs and manifests
are checked against the digests that name them as they are read; layer
blobs are checked while they are unpacked (``importer``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import platform
import stat
from dataclasses import dataclass, field
from typing import Any

from ovlfuse.errors import OvlError
from ovlfuse.image.streams import Digesting, Window, decompressed, sniff, split_digest
from ovlfuse.image.tarstream import LNK, REG, SYM, ArchiveError, TarReader, check_path
from ovlfuse.sys.safeio import open_beneath

MAX_JSON = 16 << 20  # a manifest, index or config larger than this is hostile
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
_MACHINES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
             "s390x": "s390x", "riscv64": "riscv64"}


@dataclass
class Blob:
    """A blob to read front to back: where it is, and the digest and size it must have."""

    fd: int
    offset: int
    size: int
    what: str  # for messages: "layer 2 of busybox:latest"
    digest: str | None = None  # of the raw bytes, when the archive names one

    def open(self) -> Window:
        return Window(self.fd, self.offset, self.size)


@dataclass
class ImageSpec:
    config: bytes
    config_digest: str  # the image id
    layers: list[Blob]  # bottom first
    names: list[str] = field(default_factory=list)

    def parsed_config(self) -> dict[str, Any]:
        return json.loads(self.config)


@dataclass
class Source:
    images: list[ImageSpec]
    layer: Blob | None = None  # a single layer tarball
    temp: str | None = None  # a decompressed copy to remove afterwards
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if self.temp is not None:
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass


class _Files:
    """Files of an archive by name: an OCI layout directory, or an uncompressed tar indexed in place."""

    def __init__(self, fd: int, is_dir: bool, label: str, opened: list[int]) -> None:
        self.fd, self.is_dir, self.label = fd, is_dir, label
        self.index: dict[bytes, tuple[str, int, int, bytes]] = {}  # path -> (kind, offset, size, link)
        self.opened = opened  # descriptors of blobs, closed with the source
        if not is_dir:
            window = Window(fd, 0, os.fstat(fd).st_size)
            reader = TarReader(window, label)
            for member in reader:
                if member.kind in (REG, SYM, LNK):
                    self.index.setdefault(member.path, (member.kind, window.pos, member.size, member.linkname))

    def has(self, name: str) -> bool:
        if self.is_dir:
            try:
                os.stat(name, dir_fd=self.fd, follow_symlinks=False)
                return True
            except OSError:
                return False
        return name.encode() in self.index

    def blob(self, name: str, what: str, digest: str | None = None) -> Blob:
        if self.is_dir:
            try:
                fd = open_beneath(self.fd, check_path(name.encode(), "blob"), os.O_RDONLY)
            except (OSError, ArchiveError) as e:
                raise OvlError(f"{self.label}: cannot open {name} ({getattr(e, 'strerror', e)}); "
                               "the image layout is incomplete") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise OvlError(f"{self.label}: {name} is not a regular file")
            self.opened.append(fd)
            return Blob(fd, 0, st.st_size, what, digest)
        path = check_path(name.encode(), "blob")
        for _ in range(8):  # docker save links a layer shared by two images to one copy
            entry = self.index.get(path)
            if entry is None:
                raise OvlError(f"{self.label}: {name} is missing from the archive; it is incomplete")
            kind, offset, size, link = entry
            if kind == REG:
                return Blob(self.fd, offset, size, what, digest)
            if kind == SYM:
                head = path.rpartition(b"/")[0]
                link = os.path.normpath(b"/" + head + b"/" + link).lstrip(b"/") if not link.startswith(b"/") \
                    else link
                link = check_path(link, "link in the archive")
            path = link
        raise OvlError(f"{self.label}: {name} is a chain of links that does not end; the archive is damaged")

    def json(self, name: str, what: str, digest: str | None = None, size: int | None = None) -> tuple[bytes, Any]:
        blob = self.blob(name, what, digest)
        if blob.size > MAX_JSON:
            raise ArchiveError(f"{self.label}: {what} is {blob.size} bytes; refusing a hostile archive")
        if size is not None and blob.size != size:
            raise ArchiveError(f"{self.label}: {what} is {blob.size} bytes, its descriptor says {size}; "
                               "the archive is corrupt")
        data = blob.open().read()
        if len(data) != blob.size:
            raise ArchiveError(f"{self.label}: {what} is truncated")
        if digest is not None:
            algorithm, _ = split_digest(digest, what)
            check = Digesting(_Bytes(data), algorithm)
            check.read()
            if check.digest() != digest:
                raise ArchiveError(f"{self.label}: {what} has digest {check.digest()}, the archive names "
                                   f"{digest}; it is corrupt or was changed")
        try:
            return data, json.loads(data)
        except ValueError as e:
            raise ArchiveError(f"{self.label}: {what} is not valid JSON ({e})") from None


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out


def _blob_name(digest: str, what: str) -> str:
    algorithm, hexpart = split_digest(digest, what)
    return f"blobs/{algorithm}/{hexpart}"


def _digest_from_name(name: str) -> str | None:
    """``<hex>.json`` or ``blobs/sha256/<hex>``: a file named by its own sha256 digest."""
    base = name.rpartition("/")[2].removesuffix(".json")
    if len(base) == 64 and all(c in "0123456789abcdef" for c in base):
        return "sha256:" + base
    return None


def _docker_archive(files: _Files, label: str) -> list[ImageSpec]:
    _, manifest = files.json("manifest.json", "manifest.json")
    if not isinstance(manifest, list):
        raise ArchiveError(f"{label}: manifest.json is not a list of images")
    images = []
    for n, entry in enumerate(manifest, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                or not isinstance(entry.get("Layers"), list):
            raise ArchiveError(f"{label}: image {n} of manifest.json lacks Config or Layers")
        names = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
        what = names[0] if names else f"image {n}"
        config_digest = _digest_from_name(entry["Config"])
        config, _ = files.json(entry["Config"], f"the config of {what}", config_digest)
        if config_digest is None:
            config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        layers = [files.blob(path, f"layer {i} of {what}", _digest_from_name(path) if path.startswith("blobs/")
                             else None) for i, path in enumerate(entry["Layers"], 1)]
        images.append(ImageSpec(config, config_digest, layers, names))
    return images


def _platform_matches(descriptor: dict) -> bool:
    wanted = _MACHINES.get(platform.machine(), platform.machine())
    plat = descriptor.get("platform") or {}
    return plat.get("os", "linux") == "linux" and plat.get("architecture", wanted) == wanted


def _oci_layout(files: _Files, label: str) -> list[ImageSpec]:
    _, index = files.json("index.json", "index.json")
    images = []
    for descriptor in (index.get("manifests") or []) if isinstance(index, dict) else []:
        images += _oci_descriptor(files, label, descriptor, [], depth=0)
    if not images:
        raise ArchiveError(f"{label}: index.json names no image for linux/"
                           f"{_MACHINES.get(platform.machine(), platform.machine())}")
    return images


def _oci_descriptor(files: _Files, label: str, descriptor: Any, names: list[str], depth: int) -> list[ImageSpec]:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise ArchiveError(f"{label}: a descriptor in index.json has no digest")
    annotations = descriptor.get("annotations") or {}
    name = annotations.get("io.containerd.image.name") or annotations.get("org.opencontainers.image.ref.name")
    names = names + ([name] if isinstance(name, str) and name else [])
    media = descriptor.get("mediaType", "")
    digest = descriptor["digest"]
    data, parsed = files.json(_blob_name(digest, label), f"manifest {digest[:19]}", digest, descriptor.get("size"))
    media = media or parsed.get("mediaType", "")
    if media in INDEX_TYPES or "manifests" in parsed:
        if depth > 4:
            raise ArchiveError(f"{label}: image indexes nest too deep")
        out = []
        for child in parsed.get("manifests") or []:
            if _platform_matches(child):
                out += _oci_descriptor(files, label, child, names, depth + 1)
                break
        return out
    what = names[0] if names else digest[:19]
    config_desc = parsed.get("config") or {}
    if not isinstance(config_desc.get("digest"), str):
        raise ArchiveError(f"{label}: the manifest of {what} has no config")
    config, _ = files.json(_blob_name(config_desc["digest"], label), f"the config of {what}",
                           config_desc["digest"], config_desc.get("size"))
    layers = []
    for i, layer in enumerate(parsed.get("layers") or [], 1):
        if not isinstance(layer, dict) or not isinstance(layer.get("digest"), str):
            raise ArchiveError(f"{label}: layer {i} of {what} has no digest")
        blob = files.blob(_blob_name(layer["digest"], label), f"layer {i} of {what}", layer["digest"])
        if isinstance(layer.get("size"), int) and layer["size"] != blob.size:
            raise ArchiveError(f"{label}: layer {i} of {what} is {blob.size} bytes, its manifest says "
                               f"{layer['size']}; the archive is corrupt")
        layers.append(blob)
    return [ImageSpec(config, config_desc["digest"], layers, names)]


def _looks_like_archive(stream, label: str) -> bool:
    """Whether a (decompressed) tar holds an image archive rather than a layer: stops at the first telling name."""
    reader = TarReader(stream, label)
    for member in reader:
        top = member.path.split(b"/", 1)[0]
        if member.path in (b"manifest.json", b"index.json", b"oci-layout"):
            return True
        if not (top in (b"blobs", b"repositories", b"") or (len(top.removesuffix(b".json")) == 64
                                                             and all(c in b"0123456789abcdef" for c in
                                                                     top.removesuffix(b".json")))):
            return False
    return False


def open_source(path: str, temp_dir: str) -> Source:
    """Read what ``path`` holds (a file or an OCI layout directory); compressed archives go to ``temp_dir``."""
    label = path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OvlError(f"cannot open {path}: {e.strerror}") from None
    source = Source([], fds=[fd])
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            files = _Files(fd, True, label, source.fds)
            if not files.has("index.json"):
                raise OvlError(f"{path} is a directory without index.json; give an OCI image layout, "
                               "a docker save archive or a layer tarball")
            source.images = _oci_layout(files, label)
            return source
        if not stat.S_ISREG(st.st_mode):
            raise OvlError(f"{path} is not a regular file; save the archive to a file first")
        if sniff(os.pread(fd, 6, 0)) is not None:
            plain, _ = decompressed(Window(fd, 0, st.st_size), label)
            if not _looks_like_archive(plain, label):
                source.layer = Blob(fd, 0, st.st_size, "the layer")
                return source
            fd = _decompress_to(fd, st.st_size, temp_dir, label, source)
        files = _Files(fd, False, label, source.fds)
        if files.has("manifest.json"):
            source.images = _docker_archive(files, label)
        elif files.has("index.json"):
            source.images = _oci_layout(files, label)
        else:
            source.layer = Blob(fd, 0, os.fstat(fd).st_size, "the layer")
        return source
    except BaseException:
        source.close()
        raise


def _decompress_to(fd: int, size: int, temp_dir: str, label: str, source: Source) -> int:
    source.temp = os.path.join(temp_dir, f".import-archive-{secrets.token_hex(8)}.tar")
    out = os.open(source.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    source.fds.append(out)
    plain, _ = decompressed(Window(fd, 0, size), label)
    while True:
        piece = plain.read(1 << 20)
        if not piece:
            break
        view = memoryview(piece)
        while view:
            view = view[os.write(out, view):]
    return out
