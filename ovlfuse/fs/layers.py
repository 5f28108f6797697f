"""The opened layer stack: one directory file descriptor per layer.

This is the single source of truth for where a layer lives.  Everything after
set-up reaches layer contents through ``Layer.fd`` (see ``safeio``); the path
is kept only for messages.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ovlfuse.fs import statoverride
from ovlfuse.errors import OvlError
from ovlfuse.sys.safeio import fd_path, get_xattr

# Inode numbers of layers on different filesystems are spread over disjoint
# ranges, as the kernel's xino does: the filesystem's index goes in the top bits.
_XINO_SHIFT = 48


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one (which maps every id to itself)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


@dataclass(frozen=True)
class Layer:
    index: int  # 0 is the topmost layer
    path: str
    fd: int  # O_PATH directory descriptor of the layer root
    dev: int
    is_upper: bool
    override: str | None = None  # the stat override record name this layer uses (see statoverride)


class LayerStack:
    """The layers of one mount, topmost first, plus the upper's workdir."""

    def __init__(self, layers: list[Layer], workdir: str | None) -> None:
        self.layers = layers
        self.workdir = workdir
        devs: list[int] = []
        for layer in layers:
            if layer.dev not in devs:
                devs.append(layer.dev)
        self._dev_index = {dev: i for i, dev in enumerate(devs)}
        self._samefs = len(devs) == 1
        # upper inode -> number reported since its copy-up (the origin record persists it)
        self.copied_inos: dict[int, int] = {}
        # Opaque markers in ``user.`` (as the kernel reads with -o userxattr) when not root, or root
        # of a user namespace (a rootless podman's), where trusted.* cannot be set (EPERM).
        self.userxattr = os.geteuid() != 0 or in_user_namespace()

    @property
    def upper(self) -> Layer | None:
        return self.layers[0] if self.layers and self.layers[0].is_upper else None

    @property
    def read_only(self) -> bool:
        return self.upper is None

    @property
    def samefs(self) -> bool:
        """All layers on one filesystem: real inode numbers are reported unchanged."""
        return self._samefs

    @classmethod
    def open(cls, upper: str | None, workdir: str | None, lowers: list[str]) -> "LayerStack":
        """Open every layer root; paths must already be resolved (no symlinks)."""
        paths = ([upper] if upper else []) + lowers
        if not paths:
            raise OvlError("no layers to mount: give a layer id or -o lowerdir=DIR")
        layers: list[Layer] = []
        try:
            for index, path in enumerate(paths):
                try:
                    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as e:
                    raise OvlError(f"cannot open layer directory {path}: {e.strerror}") from None
                st = os.fstat(fd)
                layers.append(Layer(index, path, fd, st.st_dev, index == 0 and upper is not None,
                                    statoverride.layer_marker(fd)))
        except OvlError:
            for layer in layers:
                os.close(layer.fd)
            raise
        return cls(layers, workdir)

    def mark_upper(self, name: str) -> None:
        """Make the upper layer keep owners and modes in ``name`` records (fuse-overlayfs's xattr_permissions).

        An upper that is marked already keeps its name.  The root gets the
        record the merged root shows: the topmost layer root's record, else
        the upper root's own attributes.
        """
        upper = self.upper
        if upper is None or upper.override is not None:
            return
        root = statoverride.Stored.of(os.fstat(upper.fd))
        for layer in self.layers:
            value = get_xattr(layer.fd, None, layer.override) if layer.override else None
            if value is not None:
                root = statoverride.parse(value, root) or root
                break
        try:
            os.setxattr(fd_path(upper.fd), name, statoverride.format_record(root))
        except OSError as e:
            raise OvlError(f"cannot write {name} on upper dir {upper.path}: {e.strerror}") from None
        self.layers[0] = dataclasses.replace(upper, override=name)

    def close(self) -> None:
        for layer in self.layers:
            os.close(layer.fd)
        self.layers = []

    def ino(self, layer: Layer, real_ino: int) -> int:
        """The inode number the merged view reports for ``real_ino`` in ``layer``."""
        if self._samefs:
            return real_ino
        return (self._dev_index[layer.dev] << _XINO_SHIFT) | (real_ino & ((1 << _XINO_SHIFT) - 1))
