"""``ovlfuse import``: images and layer tarballs into an overlay2 store, as Docker's driver lays them out.

Each layer is read once: its blob digest and its diff id are taken while
it is unpacked into a new layer directory, and checked before that
directory is renamed into place; a layer whose chain id the store already
holds is not read at all.  Any failure (a bad digest, a truncated or
hostile archive, a full disk, a signal) removes the layer being built and
leaves the store as it was, but for the layers and images completed before.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field

from ovlfuse.errors import OvlError
from ovlfuse.image import marks
from ovlfuse.image.progress import Progress
from ovlfuse.image.sources import Blob, ImageSpec, open_source
from ovlfuse.image.store import PendingLayer, Store, remove_tree, split_reference
from ovlfuse.image.streams import Digesting, decompressed, split_digest
from ovlfuse.image.tarstream import CHUNK, ArchiveError, TarReader
from ovlfuse.image.unpack import Stats, Unpacker
from ovlfuse.store.containers import chain_id

_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass
class Imported:
    image_id: str
    names: list[str]
    layers: int
    new_layers: int
    top_layer: str  # id of its topmost layer in the store
    container_layer: str | None = None


@dataclass
class Report:
    images: list[Imported] = field(default_factory=list)
    skipped_xattrs: dict[str, int] = field(default_factory=dict)
    fallbacks: set[str] = field(default_factory=set)


class _Layers:
    """Builds the layers of one import, sharing the marker writer and the progress bars."""

    def __init__(self, store: Store, progress: Progress) -> None:
        self.store = store
        self.progress = progress
        self.writer = marks.Writer.for_this_process()
        self.report = Report()

    def build(self, blob: Blob, parent: str | None, expected_diff_id: str | None) -> tuple[PendingLayer, str, Stats]:
        """Unpack ``blob`` into a new pending layer; returns it with its diff id, checked if one is expected."""
        pending = self.store.new_layer(parent)
        try:
            diff_id, stats = self._unpack(blob, pending, expected_diff_id)
        except BaseException:
            remove_tree(pending.temp)
            raise
        for key, count in stats.skipped_xattrs.items():
            self.report.skipped_xattrs[key] = self.report.skipped_xattrs.get(key, 0) + count
        self.report.fallbacks |= self.writer.fallbacks
        return pending, diff_id, stats

    def _unpack(self, blob: Blob, pending: PendingLayer, expected: str | None) -> tuple[str, Stats]:
        raw_algorithm = split_digest(blob.digest, blob.what)[0] if blob.digest else "sha256"
        diff_algorithm = split_digest(expected, blob.what)[0] if expected else "sha256"
        raw = Digesting(blob.open(), raw_algorithm, self.progress.advance)
        plain, _ = decompressed(raw, blob.what)
        tar = Digesting(plain, diff_algorithm)
        reader = TarReader(tar, blob.what)
        diff_fd = os.open(pending.diff, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        unpacker = Unpacker(diff_fd, self.writer, blob.what)
        try:
            stats = unpacker.apply(reader)
        finally:
            unpacker.close()
            os.close(diff_fd)
        reader.drain()
        while raw.read(CHUNK):
            pass
        if raw.count != blob.size:
            raise ArchiveError(f"{blob.what}: read {raw.count} of {blob.size} bytes; the archive is truncated")
        if blob.digest is not None and raw.digest() != blob.digest:
            raise ArchiveError(f"{blob.what}: its content has digest {raw.digest()}, the archive names "
                               f"{blob.digest}; the archive is corrupt or was changed")
        if expected is not None and tar.digest() != expected:
            raise ArchiveError(f"{blob.what}: its tar stream has digest {tar.digest()}, the image config names "
                               f"diff id {expected}; the archive is corrupt or was changed")
        return tar.digest(), stats

    def image(self, spec: ImageSpec) -> tuple[str, int, int]:
        """The layers of ``spec``, reused or built; returns (top layer id, layers, new layers)."""
        diff_ids = _diff_ids(spec)
        if len(diff_ids) != len(spec.layers):
            raise ArchiveError(f"the config of {spec.names[0] if spec.names else spec.config_digest[:19]} "
                               f"names {len(diff_ids)} layers, its manifest {len(spec.layers)}")
        parent = parent_chain = None
        new = 0
        for i, (blob, diff_id) in enumerate(zip(spec.layers, diff_ids)):
            chain = chain_id(diff_ids[: i + 1])
            layer = self.store.layer_for_chain(chain)
            if layer is None:
                pending, _, stats = self.build(blob, parent, diff_id)
                layer = self.store.commit_layer(pending, chain, diff_id, parent_chain, stats.size)
                new += 1
                self.progress.layer_done()
            else:
                self.progress.layer_done(blob.size)
            parent, parent_chain = layer, chain
        if parent is None:
            raise ArchiveError("an image without layers cannot be mounted")
        return parent, len(diff_ids), new


def _diff_ids(spec: ImageSpec) -> list[str]:
    try:
        config = spec.parsed_config()
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise ArchiveError(f"the config {spec.config_digest[:19]} has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list):
        raise ArchiveError(f"the config {spec.config_digest[:19]} has no rootfs.diff_ids list")
    for diff_id in diff_ids:
        split_digest(diff_id if isinstance(diff_id, str) else "", f"the config {spec.config_digest[:19]}")
    return diff_ids


def _names(spec: ImageSpec, given: list[str]) -> list[str]:
    """The names to record: --name, else the archive's; an OCI ref.name alone is only a tag."""
    if given:
        return given
    return [n for n in spec.names if "/" in n or ":" in n]


def _layer_config(parent: bytes | None, diff_id: str) -> bytes:
    """The config of a single imported layer: its parent image's, with the layer added, or a bare one."""
    config = json.loads(parent) if parent else {
        "architecture": _ARCH.get(platform.machine(), platform.machine()), "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
    config["rootfs"]["diff_ids"] = list(config["rootfs"]["diff_ids"]) + [diff_id]
    config.setdefault("history", []).append({"created_by": "ovlfuse import", "comment": "layer tarball"})
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def import_archive(path: str, docker_root: str, names: list[str], parent: str | None = None,
                   container: str | None = None, progress: bool | None = None) -> Report:
    store = Store(docker_root)
    with store.locked():
        source = open_source(path, store.layers)
        try:
            if source.layer is not None:
                total, layers = source.layer.size, 1
            else:
                total, layers = sum(b.size for i in source.images for b in i.layers), \
                    sum(len(i.layers) for i in source.images)
                if parent is not None:
                    raise OvlError(f"--parent is for a single layer tarball; {path} holds whole images")
            if container is not None:
                store.check_container_name(container)
            if (names or container) and source.layer is None and len(source.images) != 1:
                raise OvlError(f"{path} holds {len(source.images)} images; --name and --container need "
                               "an archive of one (or import it without them)")
            bars = Progress("import", layers, total, progress)
            try:
                builder = _Layers(store, bars)
                if source.layer is not None:
                    result = _import_layer(store, builder, source.layer, names, parent)
                    builder.report.images.append(result)
                else:
                    for spec in source.images:
                        top, count, new = builder.image(spec)
                        image_id = "sha256:" + hashlib.sha256(spec.config).hexdigest()  # Docker's image id
                        store.add_image(spec.config, image_id)
                        tagged = [store.tag(n, image_id) for n in _names(spec, names)]
                        builder.report.images.append(Imported(image_id, tagged, count, new, top))
            finally:
                bars.close()
            if container is not None:
                image = builder.report.images[0]
                _, config = store.image_config(image.image_id) or ("", b"{}")
                chain = chain_id(json.loads(config)["rootfs"]["diff_ids"])
                image.container_layer = store.add_container(container, image.image_id, image.top_layer, chain)
            return builder.report
        finally:
            source.close()


def _import_layer(store: Store, builder: _Layers, blob: Blob, names: list[str], parent: str | None) -> Imported:
    parent_config = parent_layer = None
    parent_ids: list[str] = []
    if parent is not None:
        found = store.image_config(parent)
        if found is None:
            raise OvlError(f"no image {parent!r} in {store.root} to put the layer on; import it first")
        parent_config = found[1]
        parent_ids = json.loads(parent_config)["rootfs"]["diff_ids"]
        parent_layer = store.layer_for_chain(chain_id(parent_ids))
        if parent_layer is None:
            raise OvlError(f"image {parent!r} lacks its top layer in {store.root}; import it again")
    pending, diff_id, stats = builder.build(blob, parent_layer, None)
    chain = chain_id(parent_ids + [diff_id])
    layer = store.layer_for_chain(chain)
    if layer is None:
        layer = store.commit_layer(pending, chain, diff_id, chain_id(parent_ids) if parent_ids else None, stats.size)
        new = 1
    else:
        remove_tree(pending.temp)  # the same layer is there already
        new = 0
    builder.progress.layer_done()
    config = _layer_config(parent_config, diff_id)
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    store.add_image(config, image_id)
    tagged = [store.tag(n, image_id) for n in names]
    return Imported(image_id, tagged, len(parent_ids) + 1, new, layer)


def summary(report: Report, docker_root: str, default_root: bool) -> list[str]:
    """What the CLI prints: one line per image, notes, and how to mount."""
    lines = []
    for image in report.images:
        named = ", ".join(image.names) or "no name (mount it by id)"
        lines.append(f"imported {named}: image {image.image_id.removeprefix('sha256:')[:12]}, "
                     f"{image.layers} layer{'s' * (image.layers != 1)} ({image.new_layers} new), "
                     f"top layer {image.top_layer[:12]}")
        if image.container_layer:
            lines.append(f"  writable layer {image.container_layer[:12]} on top of it")
    for form in sorted(report.fallbacks):
        lines.append(f"note: wrote {form}; ovlfuse reads them, the kernel's overlay does not")
    if report.skipped_xattrs:
        shown = ", ".join(f"{k} ({v})" for k, v in sorted(report.skipped_xattrs.items()))
        lines.append(f"note: left out xattrs this user may not set, or overlay bookkeeping: {shown}")
    if report.images:
        image = report.images[-1]
        name = image.names[0] if image.names else image.image_id
        root = "" if default_root else f"--docker-root {docker_root} "
        lines.append(f"mount it with: ovlfuse {root}{name} MOUNTPOINT")
    return lines


def main(archive: str, docker_root: str | None, root: str | None, names: list[str], parent: str | None,
         container: str | None, quiet: bool) -> int:
    from ovlfuse.image.store import default_docker_root

    for name in names:
        split_reference(name)
    target = docker_root or (os.path.dirname(os.path.abspath(root)) if root else None)
    env_root = os.environ.get("OVLFUSE_ROOT")
    if target is None and env_root:
        target = os.path.dirname(os.path.abspath(env_root))
    chosen = target or default_docker_root()
    report = import_archive(archive, chosen, names, parent, container, progress=False if quiet else None)
    for line in summary(report, chosen, target is None):
        print(line, file=sys.stdout if not line.startswith("note:") else sys.stderr)
    return 0
