"""``ovlfuse which LAYER PATH``: which layer provides PATH, what it shadows, or what hides it.

The answer comes from the same merged index the mount serves (``namei``);
each layer is then probed at PATH only to explain it.  Nothing is mounted.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from ovlfuse.errors import OvlError
from ovlfuse.tools.layerinfo import short_id
from ovlfuse.fs.layers import Layer, LayerStack
from ovlfuse.fs.markers import OPAQUE_FILE, WH_PREFIX, is_device_whiteout, is_xattr_whiteout, opaque_value
from ovlfuse.fs.namei import Entry, Namei
from ovlfuse.sys.safeio import open_beneath


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "special"


def probe(layer: Layer, path: bytes) -> str | None:
    """What ``layer`` holds at ``path``: None, a kind, "whiteout (<form>)" or "opaque dir (<form>)"."""
    parent, _, name = path.rpartition(b"/")
    try:
        fd = open_beneath(layer.fd, parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        if _exists(fd, WH_PREFIX + name):
            return "whiteout (.wh. file)"
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        if is_device_whiteout(st):
            return "whiteout (char 0:0)"
        if opaque_value(fd) == b"x" and is_xattr_whiteout(fd, name, st):
            return "whiteout (xattr)"
        if stat.S_ISDIR(st.st_mode):
            if opaque_value(fd, name) == b"y":
                return "opaque dir (xattr)"
            if _exists(fd, name + b"/" + OPAQUE_FILE):
                return "opaque dir (.wh..wh..opq)"
        return _kind(st.st_mode)
    finally:
        os.close(fd)


def _exists(fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def _layer_name(layer: Layer) -> str:
    return f"layer {layer.index} ({short_id(os.path.basename(os.path.dirname(layer.path)))})"


def explain(stack: LayerStack, path: str) -> dict:
    """The answer as data: provider and shadowed layers, or what hides the path."""
    rel = os.fsencode(path.strip("/"))
    if not rel:
        return {"path": "/", "visible": True, "provided_by": [_layer_name(l) for l in stack.layers],
                "shadows": [], "hidden_by": None}
    namei = Namei(stack)
    probes = {layer.index: probe(layer, rel) for layer in stack.layers}
    directory: Entry = namei.root_entry
    parts = rel.split(b"/")
    entry = None
    for i, part in enumerate(parts):
        try:
            entry = namei.lookup(directory.inode, part)
        except OSError as e:
            raise OvlError(f"{path}: {os.strerror(e.errno or errno.EINVAL)}") from None
        if entry is None or (i < len(parts) - 1 and not stat.S_ISDIR(entry.inode.st.st_mode)):
            return _hidden(stack, path, rel, b"/".join(parts[: i + 1]), entry, probes)
        directory = entry
    assert entry is not None
    provided = entry.inode.parts or (entry.inode.layer,)
    used = {layer.index for layer in provided}
    shadows = [f"{_layer_name(layer)}: {probes[layer.index]}" for layer in stack.layers
               if layer.index > provided[0].index and layer.index not in used and probes[layer.index]]
    return {"path": path, "visible": True, "type": _kind(entry.inode.st.st_mode),
            "provided_by": [_layer_name(layer) for layer in provided], "shadows": shadows, "hidden_by": None}


def _hidden(stack: LayerStack, path: str, rel: bytes, stop: bytes, entry: Entry | None, probes: dict) -> dict:
    """Why ``rel`` is not visible: the merge stopped at ``stop`` (missing, or not a directory)."""
    result = {"path": path, "visible": False, "provided_by": [], "shadows": [], "hidden_by": None}
    if entry is not None:
        result["hidden_by"] = f"{stop.decode(errors='replace')} is a {_kind(entry.inode.st.st_mode)} in {_layer_name(entry.inode.layer)}"
        return result
    stop_probes = {layer.index: probe(layer, stop) for layer in stack.layers}
    for layer in stack.layers:
        what = stop_probes[layer.index]
        if what and what.startswith("whiteout"):
            result["hidden_by"] = f"{what} of {stop.decode(errors='replace')} in {_layer_name(layer)}"
            break
        if what:
            break
    if result["hidden_by"] is None:
        parent = stop.rpartition(b"/")[0]
        for layer in stack.layers:
            if parent and probe(layer, parent) in ("opaque dir (xattr)", "opaque dir (.wh..wh..opq)"):
                result["hidden_by"] = f"opaque dir {parent.decode(errors='replace')} in {_layer_name(layer)}"
                break
    result["shadows"] = [f"{_layer_name(layer)}: {what}" for layer in stack.layers
                         if (what := probes[layer.index]) and not what.startswith("whiteout")]
    if result["hidden_by"] is None:
        result["hidden_by"] = "no layer has it" if not result["shadows"] else "a directory above it does not merge"
    return result


def render(answer: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps({"schema": "ovlfuse-which/1", **answer}, indent=2)
    if answer["visible"]:
        lines = [f"{answer['path']}: {answer.get('type', 'dir')} from " + ", ".join(answer["provided_by"])]
        lines += [f"  shadows {s}" for s in answer["shadows"]]
    else:
        lines = [f"{answer['path']}: not in the merged view; hidden by {answer['hidden_by']}"]
        lines += [f"  present below in {s}" for s in answer["shadows"]]
    return "\n".join(lines)
