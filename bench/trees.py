"""Generated layer trees for the benchmark workloads.

Everything is deterministic (seeded), so every filesystem and every run sees
the same tree.  Whiteouts use the kernel's form (a 0/0 character device),
which all three measured filesystems read.
"""

from __future__ import annotations

import io
import os
import random
import stat
import tarfile
from pathlib import Path

_BUF = random.Random(7).randbytes(1 << 20)  # file contents are slices of this


def _content(size: int) -> bytes:
    if size <= len(_BUF):
        return _BUF[:size]
    return (_BUF * (size // len(_BUF) + 1))[:size]


def _file_size(rng: random.Random) -> int:
    x = rng.random()
    if x < 0.80:
        return rng.randint(0, 4096)
    if x < 0.99:
        return rng.randint(4096, 32768)
    return rng.randint(32768, 524288)


# --------------------------------------------------------------------------
# a root filesystem

_LANGS = ["de", "fr", "es", "it", "ja", "pt_BR", "ru", "zh_CN", "pl", "sv"]


def rootfs_entries(nfiles: int, seed: int = 1) -> list[tuple]:
    """A Debian-like tree of about NFILES entries.

    Returns ``(path, kind, arg)`` tuples: ``("f", size)``, ``("l", target)``.
    Directories are implied by the paths.  Packages contribute files under
    usr/bin, usr/lib/x86_64-linux-gnu, usr/share/doc, usr/share/man,
    usr/share/locale, usr/include, etc and var/lib/dpkg/info.
    """
    rng = random.Random(seed)
    out: list[tuple] = [
        ("bin", "l", "usr/bin"), ("lib", "l", "usr/lib"), ("sbin", "l", "usr/sbin"),
        ("lib64", "l", "usr/lib64"), ("etc/hostname", "f", 8), ("etc/passwd", "f", 900),
    ]
    p = 0
    while len(out) < nfiles:
        pkg = f"pkg{p:04d}"
        p += 1
        mult = rng.choice([1, 1, 1, 2, 3, 6])
        for i in range(rng.randint(0, 3)):
            out.append((f"usr/bin/{pkg}-{i}", "f", rng.randint(4096, 65536)))
        lib = f"usr/lib/x86_64-linux-gnu/lib{pkg}.so"
        out.append((f"{lib}.1.2.{p % 7}", "f", rng.randint(4096, 200000)))
        out.append((f"{lib}.1", "l", f"lib{pkg}.so.1.2.{p % 7}"))
        for i in range(rng.randint(0, 12) * mult):
            sub = rng.choice(["", "plugins/", "modules/", "data/"])
            out.append((f"usr/lib/x86_64-linux-gnu/{pkg}/{sub}m{i:03d}.py", "f",
                        _file_size(rng)))
        doc = f"usr/share/doc/{pkg}"
        out += [(f"{doc}/copyright", "f", rng.randint(500, 20000)),
                (f"{doc}/changelog.Debian.gz", "f", rng.randint(300, 9000))]
        for i in range(rng.randint(0, 3)):
            out.append((f"usr/share/man/man{rng.choice('158')}/{pkg}-{i}.gz", "f",
                        rng.randint(400, 6000)))
        if rng.random() < 0.3:
            for lang in rng.sample(_LANGS, rng.randint(1, len(_LANGS))):
                out.append((f"usr/share/locale/{lang}/LC_MESSAGES/{pkg}.mo", "f",
                            rng.randint(2000, 40000)))
        if rng.random() < 0.25:
            for i in range(rng.randint(1, 20)):
                out.append((f"usr/include/{pkg}/h{i:02d}.h", "f", _file_size(rng)))
        if rng.random() < 0.3:
            out.append((f"etc/{pkg}/{pkg}.conf", "f", rng.randint(100, 4000)))
        for ext in ("list", "md5sums"):
            out.append((f"var/lib/dpkg/info/{pkg}.{ext}", "f", rng.randint(100, 3000)))
    return out[:max(nfiles, 6)]


def _write_entry(root: Path, path: str, kind: str, arg) -> None:
    full = root / path
    full.parent.mkdir(parents=True, exist_ok=True)
    if kind == "f":
        full.write_bytes(_content(arg))
    else:
        if full.is_symlink() or full.exists():
            full.unlink()
        os.symlink(arg, full)


def build_rootfs(base: Path, nfiles: int, nlayers: int, seed: int = 1) -> list[str]:
    """Spread a generated rootfs over NLAYERS layer dirs under BASE.

    Packages go to layers with the bottom (base image) layer the heaviest.
    Upper layers also rewrite 2% of the lower files, rewrite
    var/lib/dpkg/status, and delete 1% of the lower files with whiteouts.
    Returns the layer names relative to BASE, top first.
    """
    rng = random.Random(seed + 100)
    names = [f"l{i}" for i in range(nlayers)]  # l0 is the bottom
    for n in names:
        (base / n).mkdir(parents=True)
    weights = [3] + [1] * (nlayers - 1)
    placed: list[tuple[int, str]] = []
    for path, kind, arg in rootfs_entries(nfiles, seed):
        layer = rng.choices(range(nlayers), weights)[0]
        _write_entry(base / names[layer], path, kind, arg)
        if kind == "f":
            placed.append((layer, path))
    for i, n in enumerate(names):
        _write_entry(base / n, "var/lib/dpkg/status", "f", 20000 + 1000 * i)
        if i == 0:
            continue
        lower = [p for layer, p in placed if layer < i]
        for path in rng.sample(lower, len(lower) // 50):
            _write_entry(base / n, path, "f", _file_size(rng))
        for path in rng.sample(lower, len(lower) // 100):
            full = base / n / path
            if full.exists() or full.is_symlink():
                continue
            full.parent.mkdir(parents=True, exist_ok=True)
            os.mknod(full, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return list(reversed(names))


def write_tarball(path: Path, nfiles: int, seed: int = 2) -> None:
    """A tarball of a generated rootfs of about NFILES entries (uncompressed)."""
    entries = rootfs_entries(nfiles, seed)
    dirs: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for p, kind, arg in entries:
            parts = p.split("/")[:-1]
            for k in range(1, len(parts) + 1):
                d = "/".join(parts[:k])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                    tf.addfile(ti)
            ti = tarfile.TarInfo(p)
            ti.mtime = 1700000000
            if kind == "f":
                ti.size, ti.mode = arg, 0o644
                tf.addfile(ti, io.BytesIO(_content(arg)))
            else:
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, arg, 0o777
                tf.addfile(ti)


# --------------------------------------------------------------------------
# one big merged directory


def build_bigdir(base: Path, entries: int, nlayers: int) -> list[str]:
    """Layers whose ``big/`` dirs together hold ENTRIES distinct names.

    Returns the layer names, top first.
    """
    names = [f"b{i}" for i in range(nlayers)]
    per = -(-entries // nlayers)
    made = 0
    for i, n in enumerate(names):
        d = base / n / "big"
        d.mkdir(parents=True)
        for j in range(min(per, entries - made)):
            os.close(os.open(d / f"e{i}-{j:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
            made += 1
    return list(reversed(names))


def build_wide(base: Path, files: int, nlayers: int, per_dir: int = 1000) -> list[str]:
    """FILES empty files in dirs of PER_DIR, dealt round-robin over NLAYERS layers.

    Every layer has every directory (so each is merged), and each file lives
    in one layer.  Returns the layer names, top first.
    """
    names = [f"w{i}" for i in range(nlayers)]
    ndirs = -(-files // per_dir)
    made = 0
    for k in range(ndirs):
        dirs = []
        for n in names:
            d = base / n / f"d{k // 100:02d}" / f"d{k:05d}"
            d.mkdir(parents=True)
            dirs.append(str(d))
        for j in range(min(per_dir, files - made)):
            os.close(os.open(f"{dirs[j % nlayers]}/f{j:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
            made += 1
    return list(reversed(names))


# --------------------------------------------------------------------------
# big files: sequential/random reads and copy-up


def write_big(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(_BUF))
            f.write(_BUF[:n])
            left -= n


def build_data(base: Path, seq_size: int, append_sizes: list[int], sparse_size: int) -> list[str]:
    """Two layers: ``top`` (a small file) over ``data`` (the big files).

    data/seq.bin is SEQ_SIZE bytes; data/a<N>.bin hold APPEND_SIZES bytes
    each; data/sparse.bin is a hole of
    SPARSE_SIZE bytes with 4 KiB of data at its start.
    """
    top, data = base / "top", base / "data"
    top.mkdir(parents=True)
    data.mkdir(parents=True)
    (top / "hello").write_bytes(b"hi\n")
    write_big(data / "seq.bin", seq_size)
    for s in append_sizes:
        write_big(data / f"a{s}.bin", s)
    with open(data / "sparse.bin", "wb") as f:
        f.write(_BUF[:4096])
        f.truncate(sparse_size)
    return ["top", "data"]
