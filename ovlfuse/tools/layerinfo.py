"""``ovlfuse layers``: what a layer chain is made of, without mounting it.

Also the marker census that ``verify`` uses to decide whether the kernel can
read a store as it is: the kernel reads only char 0:0 whiteouts, xattr
whiteouts and the opaque xattr of its own namespace, never the OCI ``.wh.``
files.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from dataclasses import asdict, dataclass, field

from ovlfuse.errors import OvlError
from ovlfuse.fs.markers import OPAQUE_FILE, WH_PREFIX, OvlXattr
from ovlfuse.store.plan import find_layer, lower_entries, resolve_link

WHITEOUT_XATTRS = OvlXattr.WHITEOUT.forms

MARKER_FORMS = ("whiteout-device", "whiteout-xattr", "whiteout-oci",
                "opaque-trusted", "opaque-user", "opaque-oci", "xwhiteout-dir")


def _xattr(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


@dataclass
class LayerInfo:
    index: int
    id: str
    link: str
    path: str
    writable: bool
    size: int = 0
    files: int = 0
    markers: dict[str, int] = field(default_factory=dict)
    missing: str | None = None  # why this layer of a damaged chain cannot be read


def _fail(error: OSError) -> None:
    raise error


def census(diff: str) -> tuple[int, int, Counter]:
    """(bytes, entries, marker forms) of one layer directory."""
    size = count = 0
    forms: Counter = Counter()
    base = os.fsencode(diff)
    for dirpath, dirnames, filenames in os.walk(base, onerror=_fail):
        opaque = _xattr(dirpath, "trusted.overlay.opaque") or b""
        uopaque = _xattr(dirpath, "user.overlay.opaque") or b""
        if opaque[:1] == b"y":
            forms["opaque-trusted"] += 1
        if uopaque[:1] == b"y":
            forms["opaque-user"] += 1
        if b"x" in (opaque[:1], uopaque[:1]):
            forms["xwhiteout-dir"] += 1
        for name in dirnames + filenames:
            count += 1
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if name == OPAQUE_FILE:
                forms["opaque-oci"] += 1
            elif name.startswith(WH_PREFIX):
                forms["whiteout-oci"] += 1
            elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                forms["whiteout-device"] += 1
            elif stat.S_ISREG(st.st_mode):
                size += st.st_size
                if st.st_size == 0 and any(_xattr(path, x) is not None for x in WHITEOUT_XATTRS):
                    forms["whiteout-xattr"] += 1
    return size, count, forms


def layer_info(index: int, diff: str, writable: bool) -> LayerInfo:
    """What one diff directory holds; a directory that cannot be read whole is marked, not fatal."""
    layer_dir = os.path.dirname(diff)
    try:
        with open(os.path.join(layer_dir, "link")) as f:
            link = f.read().strip()
    except OSError:
        link = ""
    info = LayerInfo(index, os.path.basename(layer_dir), link, diff, writable)
    try:
        info.size, info.files, forms = census(diff)
    except OSError as e:
        info.missing = f"cannot read {e.filename or diff}: {e.strerror}"
        return info
    info.markers = {k: forms[k] for k in MARKER_FORMS if forms[k]}
    return info


def chain_info(layer_dirs: list[str], writable_top: bool) -> list[LayerInfo]:
    """One LayerInfo per diff directory, top first."""
    return [layer_info(index, diff, writable_top and index == 0) for index, diff in enumerate(layer_dirs)]


def damaged_chain(root: str, layer: str, read_only: bool) -> list[LayerInfo] | None:
    """As much of a layer's chain as can be read, each part that cannot marked; None if the layer is not found."""
    try:
        layer_dir = find_layer(root, layer)
    except OvlError:
        return None
    diff = os.path.join(layer_dir, "diff")
    writable = not read_only and not os.path.exists(os.path.join(layer_dir, "committed"))
    infos = [layer_info(0, diff, writable) if os.path.isdir(diff) and not os.path.islink(diff) else
             LayerInfo(0, os.path.basename(layer_dir), "", diff, writable, missing=f"{diff} is not a directory")]
    try:
        entries = lower_entries(layer_dir)
    except OvlError as e:
        infos.append(LayerInfo(1, "", "", "", False, missing=str(e)))
        return infos
    real_root = os.path.realpath(root)
    for index, entry in enumerate(entries, 1):
        try:
            lower = resolve_link(root, real_root, entry, os.path.basename(layer_dir))
        except OvlError as e:
            infos.append(LayerInfo(index, "", entry.partition("/")[2], "", False, missing=str(e)))
            continue
        infos.append(layer_info(index, lower, False))
    return infos


def short_id(layer_id: str) -> str:
    """Docker's 12-character short id, keeping an -init suffix visible."""
    return layer_id[:12] + ("-init" if layer_id.endswith("-init") else "")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(infos: list[LayerInfo], as_json: bool) -> str:
    if as_json:
        return json.dumps({"schema": "ovlfuse-layers/1", "layers": [asdict(i) for i in infos]}, indent=2)
    lines = [f"{'#':>3}  {'id':17} {'link':28} {'mode':4} {'size':>10} {'entries':>8}  markers"]
    for i in infos:
        if i.missing:
            lines.append(f"{i.index:>3}  {short_id(i.id) or '?':17} {i.link or '?':28} {'--':4} {'-':>10} "
                         f"{'-':>8}  MISSING: {i.missing}")
            continue
        markers = ", ".join(f"{k} {v}" for k, v in i.markers.items()) or "-"
        lines.append(f"{i.index:>3}  {short_id(i.id):17} {i.link:28} {'rw' if i.writable else 'ro':4} "
                     f"{_human(i.size):>10} {i.files:>8}  {markers}")
    return "\n".join(lines)


def to_kernel_forms(diff: str, userxattr: bool = False) -> None:
    """Rewrite a layer directory's markers into the forms a kernel mount reads.

    Privileged mounts read ``trusted.overlay.*``, ``-o userxattr`` mounts
    ``user.overlay.*``; neither reads OCI ``.wh.`` files.  Used on a private
    copy only (``verify``), never on a store.
    """
    ours, other = ("user", "trusted") if userxattr else ("trusted", "user")

    def move(path: str, attr: str) -> None:
        value = _xattr(os.fsencode(path), f"{other}.overlay.{attr}")
        if value is not None:
            os.removexattr(path, f"{other}.overlay.{attr}")
            os.setxattr(path, f"{ours}.overlay.{attr}", value)

    for dirpath, dirnames, filenames in os.walk(diff):
        move(dirpath, "opaque")
        for name in filenames:
            path = os.path.join(dirpath, name)
            move(path, "whiteout")
            if name == os.fsdecode(OPAQUE_FILE):
                os.unlink(path)
                os.setxattr(dirpath, f"{ours}.overlay.opaque", b"y")
            elif name.startswith(os.fsdecode(WH_PREFIX)):
                os.unlink(path)
                os.mknod(os.path.join(dirpath, name[len(WH_PREFIX):]), stat.S_IFCHR, os.makedev(0, 0))
