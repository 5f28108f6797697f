"""Layer set-up: from what the user names to the directories of one mount.

Two ways in, as the kernel's and Docker's tools have them:
- a layer of an overlay2 store (by id, unique id prefix, or directory), whose
  ``lower`` file names the whole chain through the store's ``l/`` links;
- explicit ``-o lowerdir=...,upperdir=...,workdir=...``.

Everything is validated here, before anything is mounted or written: the
result holds real (symlink-free) absolute paths, each checked to lie where it
must.  Nothing in this module writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ovlfuse.errors import OvlError
from ovlfuse.store.options import MountOptions

DEFAULT_ROOT = "/var/lib/docker/overlay2"
MIN_PREFIX = 12
_ID = re.compile(r"^[0-9a-f]+(-init)?$")
_LINK = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class MountPlan:
    """The directories of one mount, topmost lower first."""

    lowers: list[str]
    upper: str | None = None
    workdir: str | None = None
    label: str = "ovlfuse"

    @property
    def read_only(self) -> bool:
        return self.upper is None

    def as_read_only(self) -> "MountPlan":
        """The same stack with the upper dir as the topmost lower, as a committed layer mounts."""
        if self.upper is None:
            return self
        return MountPlan(lowers=[self.upper] + self.lowers, label=self.label)


class LayerNotFound(OvlError):
    """No layer of that id in the store (an engine may still know the name)."""


def _is_path(layer: str) -> bool:
    """A directory rather than an id or name (image names like ``repo/name:tag`` hold slashes too)."""
    return layer.startswith(("/", "./", "../")) or layer in (".", "..") or ("/" in layer and os.path.isdir(layer))


def find_layer(root: str, layer: str) -> str:
    """The directory of ``layer`` (id, unique prefix, or path) in the store at ``root``."""
    if _is_path(layer):
        path = os.path.abspath(layer)
        if not os.path.isdir(path):
            raise OvlError(f"layer directory {layer} does not exist")
        return path
    try:
        os.stat(root)
    except PermissionError:
        raise OvlError(f"cannot reach store root {root}: permission denied; run as a user who may read it "
                       "(an engine's own store is root's)") from None
    except OSError:
        pass
    if not os.path.isdir(root):  # an engine or an import store may still know the name
        raise LayerNotFound(f"store root {root} does not exist or is not a directory; "
                            "pass --root DIR or set OVLFUSE_ROOT to your overlay2 directory")
    if layer != "l" and os.path.isdir(os.path.join(root, layer)):
        return os.path.join(root, layer)
    if not _ID.match(layer):
        raise LayerNotFound(f"no layer {layer!r} in {root}: a layer is named by its id "
                            f"(64 hex digits or a unique prefix of at least {MIN_PREFIX}), its directory, "
                            "or a container or image name")
    if len(layer.partition("-")[0]) < MIN_PREFIX:
        raise OvlError(f"layer id prefix {layer!r} is too short: give at least {MIN_PREFIX} hex digits")
    try:
        names = os.listdir(root)
    except OSError as e:
        raise OvlError(f"cannot read store root {root}: {e.strerror}") from None
    prefix, _, init = layer.partition("-")  # "<prefix>-init" names an -init layer
    matches = sorted(n for n in names
                     if n.startswith(prefix) and n.partition("-")[2] == init and n != "l")
    if not matches:
        raise LayerNotFound(f"no layer {layer!r} in {root}; list the store with 'ls {root}'")
    if len(matches) > 1:
        shown = ", ".join(m[:16] for m in matches[:3])
        raise OvlError(f"layer id prefix {layer!r} is ambiguous in {root} ({len(matches)} layers: {shown}...); "
                       "give more characters")
    return os.path.join(root, matches[0])


def _real_dir(path: str, what: str) -> str:
    """``path`` itself must be a directory, not a symlink to one."""
    if os.path.islink(path):
        raise OvlError(f"{what} {path} is a symlink; refusing to follow it out of the layer")
    if not os.path.isdir(path):
        raise OvlError(f"{what} {path} is missing or not a directory; is this an overlay2 layer?")
    return path


def resolve_link(root: str, real_root: str, entry: str, layer_name: str) -> str:
    """The diff directory behind one ``l/<LINK>`` entry of a ``lower`` file."""
    head, _, link = entry.partition("/")
    if head != "l" or not _LINK.match(link):
        raise OvlError(f"layer {layer_name}: lower entry {entry!r} is not of the form l/<LINK>; the store is damaged")
    link_path = os.path.join(root, "l", link)
    if not os.path.lexists(link_path):
        raise OvlError(f"layer {layer_name}: lower names {entry}, but {link_path} does not exist "
                       "(a parent layer is missing; pull or rebuild the image)")
    if not os.path.islink(link_path):
        raise OvlError(f"{link_path} is not a symlink; the store's l/ directory is damaged")
    target = os.readlink(link_path)
    real = os.path.realpath(link_path)
    rel = os.path.relpath(real, real_root)
    parts = rel.split(os.sep)
    if rel.startswith(os.pardir) or os.path.isabs(rel):
        raise OvlError(f"{link_path} points outside the store root ({target}); refusing to use it")
    if not os.path.isdir(real):
        raise OvlError(f"{link_path} dangles: {target} does not exist (a parent layer was removed)")
    if len(parts) != 2 or parts[1] != "diff" or parts[0] == "l":
        raise OvlError(f"{link_path} points to {target}, which is not a layer's diff directory")
    return real


def lower_entries(layer_dir: str) -> list[str]:
    """The ``l/<LINK>`` entries of ``layer_dir/lower``, nearest first ([] for a base layer)."""
    lower_file = os.path.join(layer_dir, "lower")
    if not os.path.lexists(lower_file):
        return []
    if os.path.islink(lower_file):
        raise OvlError(f"{lower_file} is a symlink; refusing to follow it out of the layer (the store is damaged)")
    try:
        with open(lower_file, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise OvlError(f"cannot read {lower_file}: {e}") from None
    if not text:
        raise OvlError(f"{lower_file} is empty; the layer's chain is damaged")
    return text.split(":")


def read_chain(root: str, layer_dir: str) -> list[str]:
    """The diff directories named by ``layer_dir/lower``, nearest first ([] for a base layer)."""
    name = os.path.basename(layer_dir)
    real_root = os.path.realpath(root)
    own_diff = os.path.realpath(os.path.join(layer_dir, "diff"))
    chain: list[str] = []
    for entry in lower_entries(layer_dir):
        diff = resolve_link(root, real_root, entry, name)
        if diff == own_diff:
            raise OvlError(f"layer {name}: its lower chain lists {entry}, its own diff; the store is damaged")
        if diff in chain:
            raise OvlError(f"layer {name}: its lower chain lists {entry} twice; the store is damaged")
        chain.append(diff)
    return chain


def _check_markers_readable(diffs: list[str]) -> None:
    """An ordinary user cannot read ``trusted.overlay.*``: a root-written store would look wrong."""
    uid = os.geteuid()
    if uid == 0:
        return
    for diff in diffs:
        if os.stat(diff).st_uid == 0:
            raise OvlError(f"{diff} was written by root: its trusted.overlay.* markers (opaque directories) "
                           f"are invisible to uid {uid}, so the merged view would be wrong; mount it as root")


def plan_from_store(root: str, layer: str, read_only: bool) -> MountPlan:
    layer_dir = find_layer(root, layer)
    store_root = os.path.dirname(layer_dir) if _is_path(layer) else root
    diff = os.path.realpath(_real_dir(os.path.join(layer_dir, "diff"), "layer diff"))
    lowers = read_chain(store_root, layer_dir)
    _check_markers_readable([diff] + lowers)
    work = os.path.realpath(os.path.join(layer_dir, "work"))
    plan = MountPlan(lowers=lowers, upper=diff, workdir=work, label=os.path.basename(layer_dir))
    if read_only or os.path.exists(os.path.join(layer_dir, "committed")):
        return plan.as_read_only()
    return plan


def check_upper_free(plan: MountPlan) -> None:
    """Refuse a writable mount of a layer that an engine has mounted (Docker and podman mount at ``merged``).

    Two writers of one upper dir corrupt it, and ovlfuse empties ``work/work``
    when it mounts, under the other mount's feet.
    """
    if plan.upper is None:
        return
    merged = os.path.join(os.path.dirname(plan.upper), "merged")
    if os.path.ismount(merged):
        raise OvlError(f"{merged} is mounted, so the layer is in use (a running container?); two mounts writing "
                       "one upper dir corrupt it: mount it --read-only, or stop the container first")


def _existing_dir(path: str, option: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise OvlError(f"{option} {path} does not exist or is not a directory")
    return real


def _overlap(a: str, b: str) -> bool:
    """Whether real paths ``a`` and ``b`` are one directory or one lies inside the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _check_separate(named: list[tuple[str, str, str]]) -> None:
    """Layers must not overlap, as the kernel's overlay requires: a write through the upper would change a lower.

    ``named``: (option, path as given, real path) of each layer directory.
    """
    for i, (opt_a, given_a, a) in enumerate(named):
        for opt_b, given_b, b in named[i + 1:]:
            if _overlap(a, b):
                same = "are the same directory" if a == b else "overlap (one is inside the other)"
                raise OvlError(f"{opt_a} {given_a} and {opt_b} {given_b} {same}; "
                               "give separate directories, as for the kernel's overlay")


def plan_from_options(opts: MountOptions, label: str | None) -> MountPlan:
    if not opts.lowerdir:
        raise OvlError("-o needs lowerdir=DIR[:DIR...] (and upperdir=, workdir= for a writable mount)")
    lowers = [_existing_dir(p, "lowerdir") for p in opts.lowerdir]
    named = [("lowerdir", given, real) for given, real in zip(opts.lowerdir, lowers)]
    name = label or opts.fsname or "ovlfuse"
    if opts.upperdir is None:
        _check_separate(named)
        return MountPlan(lowers=lowers, label=name)
    if opts.workdir is None:
        raise OvlError("upperdir needs workdir=DIR on the same filesystem, as for the kernel's overlay")
    upper = _existing_dir(opts.upperdir, "upperdir")
    work = _existing_dir(opts.workdir, "workdir")
    if os.stat(upper).st_dev != os.stat(work).st_dev:
        raise OvlError(f"workdir {opts.workdir} must be on the same filesystem as upperdir {opts.upperdir}")
    _check_separate([("upperdir", opts.upperdir, upper), ("workdir", opts.workdir, work), *named])
    plan = MountPlan(lowers=lowers, upper=upper, workdir=work, label=name)
    return plan.as_read_only() if opts.read_only else plan
