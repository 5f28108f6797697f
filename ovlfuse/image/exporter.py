"""``ovlfuse export``: a layer's changes as an OCI layer tarball, or a whole image ``docker load`` takes.

A layer's ``diff/`` (the upper dir of its mounts) becomes the tar stream
Docker's overlay2 ``Diff`` gives: a whiteout (char 0:0 device, xattr
whiteout or ``.wh.`` file) becomes an empty ``.wh.NAME``, an opaque
directory (``overlay.opaque`` = ``y``, or ``.wh..wh..opq``) gets a
``.wh..wh..opq`` entry after its own, hard links within the layer are tar
hard links, xattrs are PAX records (the overlay's own markers and stat
records left out), and owners, modes and device types come from the
layer's stat override records where it keeps them.  Entries are sorted by
name and carry nothing of the moment or the machine (no user names, no
atime or ctime, modification times in whole seconds as Docker's ``Diff``
writes them), so the same layer always gives the same bytes.

A whole image (``--tag``) is a ``docker save`` archive: every layer of the
chain but Docker's ``-init`` layers, each exported as above (the layers
below the top with their times to the nanosecond, as they were stored), a config with
their diff ids (the base image's config where one is known) and a
``manifest.json`` naming the tag.  ``docker load`` and ``podman load``
take it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import stat
import sys
from dataclasses import dataclass
from typing import BinaryIO

from ovlfuse.errors import OvlError
from ovlfuse.image import marks
from ovlfuse.image.progress import Progress
from ovlfuse.image.streams import compressor
from ovlfuse.image.tarwrite import TarWriter
from ovlfuse.sys.safeio import get_xattr, list_xattrs

CHUNK = 1 << 20
_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}


class _Hashing:
    """A writer that hashes and counts what passes through."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.hash, self.count = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.count += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


@dataclass
class LayerTar:
    diff_id: str  # sha256 of the tar stream
    digest: str  # sha256 of what was written (the same when uncompressed)
    size: int  # bytes written
    newest_mtime: int


class _Walker:
    """Writes one layer directory's entries as tar members."""

    def __init__(self, diff: str, tar: TarWriter, progress: Progress, whole_seconds: bool) -> None:
        self.diff, self.tar, self.progress, self.whole_seconds = diff, tar, progress, whole_seconds
        self.links: dict[tuple[int, int], bytes] = {}
        self.newest = 0

    def run(self) -> None:
        root = os.open(self.diff, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.records = marks.Records(root)
            self._directory(root, b"")
        finally:
            os.close(root)

    def _directory(self, fd: int, prefix: bytes) -> None:
        xattr_whiteouts = marks.holds_xattr_whiteouts(fd)
        names = sorted(os.listdir(fd))
        for name in (os.fsencode(n) for n in names):
            path = prefix + name
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if marks.is_whiteout_device(st) or (xattr_whiteouts and marks.is_xattr_whiteout(fd, name, st)):
                self._marker(prefix + marks.WH_PREFIX + name)
                continue
            if name == marks.OPAQUE_FILE or (name.startswith(marks.WH_PREFIX) and stat.S_ISREG(st.st_mode)):
                self._marker(path)  # already in the OCI form (a store written where devices were refused)
                continue
            self._entry(fd, name, path, st)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    if marks.is_opaque(sub, None) and not os.path.lexists(f"/proc/self/fd/{sub}/.wh..wh..opq"):
                        self._marker(path + b"/" + marks.OPAQUE_FILE)
                    self._directory(sub, path + b"/")
                finally:
                    os.close(sub)

    def _marker(self, path: bytes) -> None:
        self.tar.add(path, "file", 0, 0, 0, 0)

    def _xattrs(self, fd: int, name: bytes) -> dict[str, bytes]:
        out = {}
        for key in list_xattrs(fd, name):
            if marks.is_bookkeeping_xattr(key):
                continue
            value = get_xattr(fd, name, key)
            if value is not None:
                out[key] = value
        return out

    def _entry(self, fd: int, name: bytes, path: bytes, st: os.stat_result) -> None:
        uid, gid, mode, rdev = self.records.apply(fd, name, st)
        kind = _KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            print(f"ovlfuse: leaving out /{path.decode(errors='replace')}: a socket has no tar form",
                  file=sys.stderr)
            return
        mtime = st.st_mtime_ns - st.st_mtime_ns % 1_000_000_000 if self.whole_seconds else st.st_mtime_ns
        self.newest = max(self.newest, mtime // 1_000_000_000)
        xattrs = self._xattrs(fd, name)
        perm = stat.S_IMODE(mode)
        name_out = path + b"/" if kind == "dir" else path
        if kind == "file" and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first = self.links.setdefault((st.st_dev, st.st_ino), path)
            if first != path:
                self.tar.add(name_out, "hardlink", perm, uid, gid, mtime, link=first, xattrs=xattrs)
                return
        if kind == "symlink":
            self.tar.add(name_out, kind, perm, uid, gid, mtime, link=os.readlink(name, dir_fd=fd), xattrs=xattrs)
        elif kind in ("char", "block"):
            self.tar.add(name_out, kind, perm, uid, gid, mtime, devmajor=os.major(rdev), devminor=os.minor(rdev),
                         xattrs=xattrs)
        elif kind == "file" and stat.S_ISREG(st.st_mode):
            self._file(fd, name, name_out, perm, uid, gid, mtime, st.st_size, xattrs)
        else:  # a directory, a fifo, or a file a record says is a device (handled above)
            self.tar.add(name_out, kind, perm, uid, gid, mtime, xattrs=xattrs)

    def _file(self, fd: int, name: bytes, path: bytes, perm: int, uid: int, gid: int, mtime: int, size: int,
              xattrs: dict[str, bytes]) -> None:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            self.tar.add(path, "file", perm, uid, gid, mtime, size=size, xattrs=xattrs)
            left = size
            while left:
                piece = os.read(src, min(CHUNK, left))
                if not piece:
                    raise OvlError(f"/{path.decode(errors='replace')} shrank while it was exported; export a "
                                   "layer nothing writes to (unmount it first)")
                self.tar.data(piece)
                self.progress.advance(len(piece))
                left -= len(piece)
            self.tar.pad(size)
        finally:
            os.close(src)


def write_layer(diff: str, out: BinaryIO, compression: str | None, progress: Progress,
                whole_seconds: bool = True) -> LayerTar:
    """The tar stream of layer directory ``diff`` into ``out``.

    ``whole_seconds``: modification times cut to the second, as Docker's
    ``Diff`` (``docker commit``, ``docker build``) writes a layer's changes;
    otherwise to the nanosecond, as the files have them, which gives back an
    image layer stored from a tar that kept them.
    """
    written = _Hashing(out)
    packed = compressor(compression, written)
    plain = _Hashing(packed)
    tar = TarWriter(plain)
    walker = _Walker(diff, tar, progress, whole_seconds)
    walker.run()
    tar.close()
    if packed is not written:
        packed.close()
    return LayerTar(plain.digest(), written.digest(), written.count, walker.newest)


class _Output:
    """``path`` written whole or not at all: a temporary file beside it, renamed over it at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stdout = path == "-"
        if self.stdout:
            self.file = sys.stdout.buffer
            return
        self.temp = f"{os.path.abspath(path)}.ovlfuse-{secrets.token_hex(4)}"
        try:
            self.file = open(self.temp, "xb")
        except OSError as e:
            raise OvlError(f"cannot write {path}: {e.strerror}") from None

    def commit(self) -> None:
        self.file.flush()
        if not self.stdout:
            os.fsync(self.file.fileno())
            self.file.close()
            os.rename(self.temp, self.path)

    def abort(self) -> None:
        if not self.stdout:
            self.file.close()
            os.unlink(self.temp)


def export_layer(diff: str, path: str, compression: str | None, quiet: bool) -> LayerTar:
    bars = Progress("export", 1, None, False if quiet else None)
    out = _Output(path)
    try:
        result = write_layer(diff, out.file, compression, bars)
        bars.layer_done()
        out.commit()
        return result
    except BaseException:
        out.abort()
        raise
    finally:
        bars.close()


def _base_config(config: bytes | None) -> dict:
    if config is not None:
        return json.loads(config)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {"architecture": arch, "os": "linux", "config": {}}


def export_image(diffs: list[str], path: str, tag: str, base_config: bytes | None, compression: str | None,
                 quiet: bool) -> tuple[str, list[LayerTar]]:
    """A ``docker save`` archive of the layers ``diffs`` (bottom first); returns (image id, layer tars)."""
    from ovlfuse.image.store import split_reference

    _, ref = split_reference(tag)
    bars = Progress("export", len(diffs), None, False if quiet else None)
    out = _Output(path)
    temps: list[str] = []
    try:
        layers: list[LayerTar] = []
        for n, diff in enumerate(diffs):
            temp = f"{out.temp if not out.stdout else os.path.abspath('.ovlfuse-export')}.layer{len(temps)}"
            temps.append(temp)
            with open(temp, "xb") as f:
                layers.append(write_layer(diff, f, compression, bars, whole_seconds=n == len(diffs) - 1))
            bars.layer_done()
        config = _base_config(base_config)
        config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
        history = [h for h in config.get("history") or [] if h.get("empty_layer")]
        history += [{"created_by": "ovlfuse export"} for _ in layers]
        config["history"] = history
        config.pop("container", None)
        config.pop("container_config", None)
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image_id = hashlib.sha256(config_bytes).hexdigest()
        names = [f"{layer.digest.removeprefix('sha256:')}/layer.tar" for layer in layers]
        manifest = [{"Config": f"{image_id}.json", "RepoTags": [ref], "Layers": names}]
        tar = TarWriter(out.file)
        for layer, name, temp in zip(layers, names, temps):
            tar.add(name.rpartition("/")[0].encode() + b"/", "dir", 0o755, 0, 0, 0)
            tar.add(name.encode(), "file", 0o644, 0, 0, 0, size=layer.size)
            with open(temp, "rb") as f:
                while piece := f.read(CHUNK):
                    tar.data(piece)
            tar.pad(layer.size)
        for name, data in ((f"{image_id}.json", config_bytes),
                           ("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())):
            tar.add(name.encode(), "file", 0o644, 0, 0, 0, size=len(data))
            tar.data(data)
            tar.pad(len(data))
        tar.close()
        out.commit()
        return "sha256:" + image_id, layers
    except BaseException:
        out.abort()
        raise
    finally:
        for temp in temps:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        bars.close()


def _is_init_layer(diff: str) -> bool:
    """Docker's ``<id>-init`` layer: /etc/hosts and the like, never part of an image."""
    return os.path.basename(os.path.dirname(diff)).endswith("-init")


def _find_config(name: str, docker_root: str | None) -> bytes:
    from ovlfuse.image.store import Store, default_docker_root
    from ovlfuse.store.containers import DOCKER_ROOT

    roots = [docker_root] if docker_root else [default_docker_root(), DOCKER_ROOT]
    for root in roots:
        found = Store(root).image_config(name)
        if found is not None:
            return found[1]
    raise OvlError(f"no image {name!r} for --from in {' or '.join(roots)}; give --docker-root DIR")


def main(plan, output: str, compression: str | None, tag: str | None, base: str | None,
         docker_root: str | None, quiet: bool) -> int:
    """Export the layer of ``plan`` (its upper dir, or its topmost lower for a read-only one)."""
    top = plan.upper or plan.lowers[0]
    if base and not tag:
        raise OvlError("--from goes with --tag: it gives the whole image's config")
    if tag is None:
        result = export_layer(top, output, compression, quiet)
        print(f"exported layer {os.path.basename(os.path.dirname(top))[:12]}: diff id {result.diff_id}"
              + (f", digest {result.digest}" if result.digest != result.diff_id else "")
              + f", {result.size} bytes", file=sys.stderr if output == "-" else sys.stdout)
        return 0
    chain = [top] + [d for d in (plan.lowers if plan.upper else plan.lowers[1:]) if not _is_init_layer(d)]
    config = _find_config(base, docker_root) if base else None
    image_id, layers = export_image(list(reversed(chain)), output, tag, config, compression, quiet)
    print(f"exported image {tag} ({image_id.removeprefix('sha256:')[:12]}), {len(layers)} layers; "
          f"load it with: docker load -i {output}", file=sys.stderr if output == "-" else sys.stdout)
    return 0
