"""``ovlfuse which LAYER PATH``: which layer provides PATH, what it shadows, or what hides it.

The answer comes from the same merged index the mount serves (``namei``),
and PATH is resolved as it is through the mount: a symlinked directory on the
way is followed inside the merged view (a relative target), or leaves it (an
absolute target, or ``..`` above the root, which the kernel would resolve on
the host).  Each layer is then probed at the resolved path only to explain
the answer.  Nothing is mounted.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections import deque

from ovlfuse.errors import OvlError
from ovlfuse.fs import inode
from ovlfuse.fs.layers import Layer, LayerStack
from ovlfuse.fs.markers import OPAQUE_FILE, WH_PREFIX, is_device_whiteout, is_xattr_whiteout, opaque_value
from ovlfuse.fs.namei import Entry, Namei
from ovlfuse.sys.safeio import open_beneath
from ovlfuse.tools.layerinfo import short_id

SCHEMA = "ovlfuse-which/2"
MAX_SYMLINKS = 40  # the kernel's limit on links followed in one path walk


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


def layer_ref(layer: Layer) -> dict:
    """A layer as scripts address it: index (0 topmost), store id and l/ link where it is a store layer, path."""
    layer_dir = os.path.dirname(layer.path)
    link = None
    if os.path.basename(layer.path) == "diff":
        try:
            with open(os.path.join(layer_dir, "link")) as f:
                link = f.read().strip() or None
        except OSError:
            pass
    return {"index": layer.index, "id": os.path.basename(layer_dir) if link else None, "link": link,
            "path": layer.path}


def _text(path: bytes) -> str:
    return "/" + path.decode("utf-8", "backslashreplace")


class _Walk:
    """PATH resolved through the merged view as the mount resolves it."""

    def __init__(self, namei: Namei, path: str) -> None:
        self.namei = namei
        self.resolved: list[bytes] = []  # merged path of the deepest directory reached
        self.via: list[dict] = []  # symlinks followed on the way
        self.entry: Entry | None = None
        self.stop: bytes = b""  # where the walk ended: the path found, or where it broke off
        self.leaves: str | None = None  # the target that left the merged view
        self.complete = False  # the whole of PATH was found
        self._walk(os.fsencode(path))

    def _walk(self, path: bytes) -> None:
        parts = deque(p for p in path.split(b"/") if p)
        directory = self.namei.root_entry
        followed = 0
        self.entry = directory
        while parts:
            part = parts.popleft()
            if part == b".":
                continue
            if part == b"..":
                if not self.resolved:
                    self.leaves, self.entry = "..", None
                    return
                self.resolved.pop()
                directory = self.namei.resolve(b"/".join(self.resolved)) or self.namei.root_entry
                self.entry, self.stop = directory, b"/".join(self.resolved)
                continue
            here = b"/".join([*self.resolved, part])
            try:
                entry = self.namei.lookup(directory.inode, part)
            except OSError as e:
                raise OvlError(f"{_text(here)}: {os.strerror(e.errno or errno.EINVAL)}") from None
            self.entry, self.stop = entry, here
            if entry is None:
                return
            if not parts:
                break  # the last name is what is asked about, a symlink too
            shown = inode.stored_attributes(entry.inode).mode
            if stat.S_ISLNK(shown):
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise OvlError(f"{_text(here)}: too many levels of symbolic links")
                target = inode.readlink(entry.inode)
                self.via.append({"path": _text(here), "target": target.decode("utf-8", "backslashreplace")})
                if target.startswith(b"/"):
                    self.leaves, self.entry = target.decode("utf-8", "backslashreplace"), None
                    return
                parts.extendleft(reversed([p for p in target.split(b"/") if p]))
                continue
            if not stat.S_ISDIR(shown):
                return  # a non-directory where the path goes on: the caller explains it
            self.resolved.append(part)
            directory = entry
        self.complete = True


def explain(stack: LayerStack, path: str) -> dict:
    """The answer as data: the providing and shadowed layers, or what hides the path."""
    walk = _Walk(Namei(stack), path)
    answer: dict = {"schema": SCHEMA, "path": path, "resolved": _text(walk.stop), "via": walk.via,
                    "visible": False, "type": None, "provided_by": [], "shadows": [], "hidden_by": None}
    if walk.leaves is not None:
        answer["resolved"] = None
        answer["hidden_by"] = {"kind": "leaves-view", "path": walk.via[-1]["path"] if walk.via else _text(b""),
                               "target": walk.leaves, "layer": None, "form": None}
        return answer
    if walk.complete:
        assert walk.entry is not None
        return _visible(stack, answer, walk.entry, walk.stop)
    return _hidden(stack, answer, walk.entry, walk.stop)


def _holds(stack: LayerStack, rel: bytes) -> dict[int, str | None]:
    return {layer.index: probe(layer, rel) for layer in stack.layers}


def _visible(stack: LayerStack, answer: dict, entry: Entry, rel: bytes) -> dict:
    provided = entry.inode.parts or (entry.inode.layer,)
    if rel == b"":
        provided = tuple(stack.layers)
    holds = _holds(stack, rel)
    used = {layer.index for layer in provided}
    answer.update(
        visible=True,
        type=_kind(inode.stored_attributes(entry.inode).mode),
        provided_by=[{**layer_ref(layer), "holds": holds.get(layer.index) or "dir"} for layer in provided],
        shadows=[{**layer_ref(layer), "holds": holds[layer.index]} for layer in stack.layers
                 if layer.index > provided[0].index and layer.index not in used and holds[layer.index]],
    )
    return answer


def _hidden(stack: LayerStack, answer: dict, entry: Entry | None, stop: bytes) -> dict:
    """Why the path is not visible: the merge stopped at ``stop`` (missing, or not a directory)."""
    if entry is not None:  # a non-directory where the path goes on
        layer = entry.inode.layer
        answer["hidden_by"] = {"kind": "non-directory", "path": _text(stop), "holds": _kind(entry.inode.st.st_mode),
                               "layer": layer_ref(layer), "form": None}
        return answer
    holds = _holds(stack, stop)
    for layer in stack.layers:
        what = holds[layer.index]
        if what and what.startswith("whiteout"):
            answer["hidden_by"] = {"kind": "whiteout", "path": _text(stop), "layer": layer_ref(layer),
                                   "form": what.partition("(")[2].rstrip(")")}
            break
        if what:
            break
    parent = stop.rpartition(b"/")[0]
    if answer["hidden_by"] is None and parent:
        for layer in stack.layers:
            what = probe(layer, parent)
            if what and what.startswith("opaque dir"):
                answer["hidden_by"] = {"kind": "opaque", "path": _text(parent), "layer": layer_ref(layer),
                                       "form": what.partition("(")[2].rstrip(")")}
                break
    answer["shadows"] = [{**layer_ref(layer), "holds": what} for layer in stack.layers
                         if (what := holds[layer.index]) and not what.startswith("whiteout")]
    if answer["hidden_by"] is None:
        answer["hidden_by"] = {"kind": "nothing" if not answer["shadows"] else "unmerged-parent",
                               "path": _text(stop), "layer": None, "form": None}
    return answer


def _name(ref: dict) -> str:
    if ref.get("id"):
        return f"layer {ref['index']} ({short_id(ref['id'])})"
    return f"layer {ref['index']} ({ref['path']})"


def _reason(hidden: dict) -> str:
    kind = hidden["kind"]
    if kind == "whiteout":
        return f"a whiteout ({hidden['form']}) of {hidden['path']} in {_name(hidden['layer'])}"
    if kind == "opaque":
        return f"the opaque directory {hidden['path']} ({hidden['form']}) in {_name(hidden['layer'])}"
    if kind == "non-directory":
        return f"{hidden['path']} is a {hidden['holds']} in {_name(hidden['layer'])}, not a directory"
    if kind == "leaves-view":
        return f"the symlink {hidden['path']} -> {hidden['target']} leads out of the merged view"
    if kind == "unmerged-parent":
        return f"a directory above {hidden['path']} does not merge the layers that hold it"
    return "no layer has it"


def render(answer: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(answer, indent=2)
    through = "".join(f" (through {v['path']} -> {v['target']})" for v in answer["via"])
    if answer["visible"]:
        where = f", as {answer['resolved']}" if answer["via"] else ""
        lines = [f"{answer['path']}: {answer['type']} from " + ", ".join(_name(r) for r in answer["provided_by"])
                 + where + through]
        lines += [f"  shadows {_name(r)}: {r['holds']}" for r in answer["shadows"]]
    else:
        lines = [f"{answer['path']}: not in the merged view: {_reason(answer['hidden_by'])}{through}"]
        lines += [f"  still held below by {_name(r)}: {r['holds']}" for r in answer["shadows"]]
    return "\n".join(lines)
