"""Generated Docker-layout stores with every marker form, and their kernel twins.

``rich_store`` builds layers that exercise the merge rules: every whiteout and
opaque form, type changes across layers, symlinks of every kind, hard links,
fifos, devices, setuid/setgid/sticky modes, xattrs, unicode and 255-byte names.
``deep_store`` stacks it under N layers.  ``kernel_twin`` copies a store and
rewrites the OCI and user-namespace markers (which the kernel does not read
without ``userxattr``) into the kernel's own forms, so both mounts must show
the same merged view.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass

from ovlfuse.tools.demo import LayerRef, StoreWriter
from ovlfuse.tools.layerinfo import to_kernel_forms

LONG_NAME = "L" * 250 + ".long"  # 255 bytes
UNICODE_NAMES = ["üñí©ødé", "日本語のファイル", "emoji-🙂", "sp ace", "tab\tname"]


def write(path: str, data: bytes | str = b"", mode: int = 0o644, mtime: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime))


def mkdirs(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)


def device_whiteout(path: str) -> None:
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def oci_whiteout(path: str) -> None:
    parent, name = os.path.split(path)
    open(os.path.join(parent, ".wh." + name), "w").close()


def xattr_whiteout(parent: str, name: str) -> None:
    """Kernel >= 6.7 whiteout: empty file with overlay.whiteout, parent marked opaque=x."""
    path = os.path.join(parent, name)
    open(path, "w").close()
    os.setxattr(path, "trusted.overlay.whiteout", b"")
    os.setxattr(parent, "trusted.overlay.opaque", b"x")


@dataclass
class Store:
    root: str
    top: LayerRef  # the container layer (rw)
    image_top: LayerRef  # the topmost committed layer
    layers: list[LayerRef]  # top first


def _base_content(d: str) -> None:
    mkdirs(f"{d}/a/b/c/d/e", 0o755)
    write(f"{d}/a/file1", "base file1\n", mtime=1_000_000_000_123_456_789)
    write(f"{d}/a/file2", "base file2\n")
    write(f"{d}/a/shadow", "base shadow\n")
    write(f"{d}/a/b/c/d/e/deep", "deep\n")
    write(f"{d}/big", os.urandom(1 << 20))
    write(f"{d}/empty")
    write(f"{d}/setuid", "#!/bin/true\n", 0o4755)
    write(f"{d}/setgid", "#!/bin/true\n", 0o2711)
    mkdirs(f"{d}/sticky", 0o1777)
    mkdirs(f"{d}/sgid-dir", 0o2775)
    write(f"{d}/readonly", "r\n", 0o400)
    os.chown(f"{d}/readonly", 1234, 5678)
    os.symlink("a/file1", f"{d}/rel-link")
    os.symlink("/etc/passwd", f"{d}/abs-link")
    os.symlink("does/not/exist", f"{d}/dangling")
    os.symlink("loop2", f"{d}/loop1")
    os.symlink("loop1", f"{d}/loop2")
    os.symlink("../..", f"{d}/a/up-link")
    os.mkfifo(f"{d}/fifo")
    os.mknod(f"{d}/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(f"{d}/loopdev", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    write(f"{d}/hard1", "hard\n")
    os.link(f"{d}/hard1", f"{d}/hard2")
    os.link(f"{d}/hard1", f"{d}/a/hard3")
    write(f"{d}/xattr-file", "x\n")
    os.setxattr(f"{d}/xattr-file", "user.color", b"blue")
    os.setxattr(f"{d}/xattr-file", "trusted.secret", b"s")
    os.setxattr(f"{d}/a", "user.dir", b"base")
    for name in UNICODE_NAMES:
        write(f"{d}/names/{name}", name)
    write(f"{d}/names/{LONG_NAME}", "long\n")
    with open(os.fsencode(f"{d}/names/") + b"latin1-\xe9-not-utf8", "wb") as f:
        f.write(b"bytes name\n")
    mkdirs(f"{d}/dir-becomes-file/sub")
    write(f"{d}/dir-becomes-file/sub/x", "x\n")
    write(f"{d}/file-becomes-dir", "file\n")
    for name in ("opq-dev", "opq-oci", "opq-user", "xw", "wdir", "oci-wdir"):
        write(f"{d}/{name}/old", f"{name} old\n")
        write(f"{d}/{name}/keep", f"{name} keep\n")
    write(f"{d}/wdir/sub/deeper", "gone\n")
    write(f"{d}/comeback", "first life\n")
    mkdirs(f"{d}/only-low/inner")
    write(f"{d}/only-low/inner/f", "low\n")
    write(f"{d}/stray/plain", "p\n")


def _middle_content(d: str) -> None:
    mkdirs(f"{d}/a", 0o750)
    os.setxattr(f"{d}/a", "user.dir", b"middle")
    device_whiteout(f"{d}/a/file1")
    oci_whiteout(f"{d}/a/file2")
    write(f"{d}/a/shadow", "middle shadow, longer\n", 0o600)
    write(f"{d}/a/b/new-in-middle", "m\n")
    write(f"{d}/dir-becomes-file", "now a file\n")
    write(f"{d}/file-becomes-dir/inside", "now a dir\n")
    mkdirs(f"{d}/opq-dev")
    os.setxattr(f"{d}/opq-dev", "trusted.overlay.opaque", b"y")
    write(f"{d}/opq-dev/new", "fresh\n")
    mkdirs(f"{d}/opq-oci")
    open(f"{d}/opq-oci/.wh..wh..opq", "w").close()
    write(f"{d}/opq-oci/new", "fresh\n")
    mkdirs(f"{d}/opq-user")
    os.setxattr(f"{d}/opq-user", "user.overlay.opaque", b"y")
    write(f"{d}/opq-user/new", "fresh\n")
    mkdirs(f"{d}/xw")
    xattr_whiteout(f"{d}/xw", "old")
    device_whiteout(f"{d}/wdir")
    oci_whiteout(f"{d}/oci-wdir")
    device_whiteout(f"{d}/comeback")
    mkdirs(f"{d}/stray")
    device_whiteout(f"{d}/stray/never-existed")  # whites out nothing


def _upper_image_content(d: str) -> None:
    write(f"{d}/comeback", "second life\n")
    write(f"{d}/a/b/c/from-image-top", "t\n")
    os.symlink("file-becomes-dir/inside", f"{d}/link-to-new-dir")
    write(f"{d}/names/{UNICODE_NAMES[0]}", "replaced\n")


def _container_content(d: str) -> None:
    write(f"{d}/a/shadow", "container shadow\n")
    device_whiteout(f"{d}/hard2")
    write(f"{d}/container-new", "c\n")
    os.link(f"{d}/container-new", f"{d}/container-link")
    mkdirs(f"{d}/only-upper/x")
    write(f"{d}/only-upper/x/y", "y\n")
    mkdirs(f"{d}/opq-upper")
    os.setxattr(f"{d}/opq-upper", "trusted.overlay.opaque", b"y")
    mkdirs(f"{d}/a/b/c/d")


def rich_store(root: str, extra_layers: int = 0, link_length: int = 26) -> Store:
    """base, middle, [extra_layers fillers], image top (committed), container (rw)."""
    sw = StoreWriter(root, link_length=link_length)
    base = sw.layer(seed="base")
    _base_content(base.diff)
    sw.commit(base)
    middle = sw.layer(base, seed="middle")
    _middle_content(middle.diff)
    sw.commit(middle)
    below = middle
    layers = [middle, base]
    for i in range(extra_layers):
        filler = sw.layer(below, seed=f"filler{i}")
        d = filler.diff
        write(f"{d}/fill/f{i}", f"{i}\n")
        if i % 3 == 0:
            write(f"{d}/a/b/c/d/e/deep{i}", f"{i}\n")
        if i % 7 == 1 and i > 1:
            device_whiteout(f"{d}/fill/f{i - 1}")
        if i % 50 == 49:
            mkdirs(f"{d}/fill")
            os.setxattr(f"{d}/fill", "trusted.overlay.opaque", b"y")
        sw.commit(filler)
        layers.insert(0, filler)
        below = filler
    image_top = sw.layer(below, seed="image-top")
    _upper_image_content(image_top.diff)
    sw.commit(image_top)
    layers.insert(0, image_top)
    container = sw.layer(image_top, seed="container")
    _container_content(container.diff)
    layers.insert(0, container)
    return Store(sw.root, container, image_top, layers)


def kernel_twin(store: Store, dest: str) -> Store:
    """A copy of ``store`` with every marker in the form a privileged kernel mount reads."""
    subprocess.run(["cp", "-a", store.root, dest], check=True)
    for layer in store.layers:
        to_kernel_forms(os.path.join(dest, os.path.basename(layer.dir), "diff"))
    def moved(ref: LayerRef) -> LayerRef:
        return LayerRef(ref.id, ref.link, os.path.join(dest, os.path.basename(ref.dir)), ref.chain)
    return Store(dest, moved(store.top), moved(store.image_top), [moved(layer) for layer in store.layers])


def real_origins(diffs: list[str]) -> dict[int, tuple[int, frozenset[bytes]]]:
    """Real inode number -> (layer index, paths in that layer): where a reported inode comes from."""
    found: dict[int, tuple[int, set[bytes]]] = {}
    for index, diff in enumerate(diffs):
        base = os.fsencode(diff)
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            if dirpath == base:
                found.setdefault(os.lstat(base).st_ino, (index, set()))[1].add(b"")
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                relpath = os.path.normpath(os.path.join(rel, name))
                found.setdefault(os.lstat(path).st_ino, (index, set()))[1].add(relpath)
    return {ino: (index, frozenset(paths)) for ino, (index, paths) in found.items()}


def fingerprint(root: str) -> list[tuple]:
    """Everything a write would change in a raw store: names, types, sizes, times, xattrs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in [b""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            try:
                xattrs = sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                for n in os.listxattr(path, follow_symlinks=False))
            except OSError:
                xattrs = []
            out.append((path, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, xattrs))
    return sorted(out)
