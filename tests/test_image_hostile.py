"""Hostile and broken archives: each is refused with a one-line error (or given its documented treatment),
nothing is written outside the store, and no partial layer is left behind.

The archives are written byte by byte here (tarfile would refuse to write
most of them): a name with ``..``, an absolute path, a symlink and then a
file through it, hard links out of the layer, a device node an ordinary
user may not make, the same name twice, extended headers that claim
gigabytes, truncated and corrupt streams, and archives whose digests do
not match their content.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from mounts import run_ovlfuse
from users import ordinary_user


def _tar(*members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes], end: bool = True) -> bytes:
    out = io.BytesIO()
    for member in members:
        info, data = member if isinstance(member, tuple) else (member, b"")
        out.write(info.tobuf(tarfile.PAX_FORMAT))
        if data:
            out.write(data + bytes(-len(data) % 512))
    if end:
        out.write(bytes(1024))
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "", mode: int = 0o644,
          **extra) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode, info.mtime = kind, size, link, mode, 1_700_000_000
    for key, value in extra.items():
        setattr(info, key, value)
    return info


def _file(name: str, data: bytes = b"x\n") -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, size=len(data)), data


def _raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """A header with any size, written by hand (tarfile checks what it writes)."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_700_000_000
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.fixture
def place(tmp_path):
    """(store root, a directory outside it that must stay untouched)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    return str(tmp_path / "store"), outside


def _import(store: str, archive: bytes, tmp_path, *args: str, name: str = "layer.tar"):
    path = tmp_path / name
    path.write_bytes(archive)
    return run_ovlfuse("import", "-q", "--docker-root", store, *args, str(path))


def _layers(store: str) -> list[str]:
    """Layer directories and leftovers of the store (temporary ones included)."""
    base = os.path.join(store, "overlay2")
    return sorted(n for n in os.listdir(base) if n != "l") if os.path.isdir(base) else []


def _refused(result, *words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ovlfuse: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def _untouched(store: str, outside) -> None:
    assert _layers(store) == []
    assert sorted(os.listdir(outside)) == ["keep"] and (outside / "keep").read_text() == "keep\n"
    assert not os.path.exists(os.path.join(store, "image", "overlay2", "repositories.json"))


def test_dot_dot_is_refused(place, tmp_path):
    store, outside = place
    result = _import(store, _tar(_file("a"), _file(f"x/../../../{outside.name}/evil")), tmp_path, "--name", "x")
    _refused(result, "'..'")
    _untouched(store, outside)


def test_an_absolute_path_is_refused(place, tmp_path):
    store, outside = place
    _refused(_import(store, _tar(_file(f"{outside}/evil")), tmp_path), "absolute path")
    _untouched(store, outside)


def test_a_file_through_a_symlink_out_of_the_layer_is_refused(place, tmp_path):
    store, outside = place
    archive = _tar(_info("esc", tarfile.SYMTYPE, link=str(outside)), _file("esc/evil"))
    _refused(_import(store, archive, tmp_path), "/esc/evil", "symlink")
    _untouched(store, outside)


@pytest.mark.parametrize("target", ["../outside/keep", "esc/keep", "missing"])
def test_hard_links_out_of_the_layer_are_refused(place, tmp_path, target):
    store, outside = place
    archive = _tar(_info("esc", tarfile.SYMTYPE, link=str(outside)), _info("h", tarfile.LNKTYPE, link=target))
    result = _import(store, archive, tmp_path)
    _refused(result, {"../outside/keep": "'..'", "esc/keep": "symlink", "missing": "does not hold"}[target])
    _untouched(store, outside)
    assert os.stat(outside / "keep").st_nlink == 1


def test_the_same_name_twice_is_refused(place, tmp_path):
    store, outside = place
    archive = _tar(_file("etc/passwd", b"one\n"), _file("etc/passwd", b"two\n"))
    _refused(_import(store, archive, tmp_path), "/etc/passwd appears twice")
    _untouched(store, outside)


def test_a_directory_given_twice_takes_the_later_metadata(place, tmp_path):
    store, _ = place
    archive = _tar(_info("d", tarfile.DIRTYPE, mode=0o755), _file("d/f"), _info("d", tarfile.DIRTYPE, mode=0o700))
    assert _import(store, archive, tmp_path, "--name", "twice").returncode == 0
    (layer,) = _layers(store)
    assert os.stat(os.path.join(store, "overlay2", layer, "diff", "d")).st_mode & 0o7777 == 0o700


@pytest.mark.parametrize("kind", [b"x", b"L", b"K"])
def test_an_extended_header_claiming_gigabytes_is_refused_unread(place, tmp_path, kind):
    store, outside = place
    archive = _raw_header(b"././@LongLink" if kind != b"x" else b"PaxHeaders/a", kind, 3 << 30) + bytes(4096)
    started = time.monotonic()
    _refused(_import(store, archive, tmp_path), "extended header of 3221225472 bytes")
    assert time.monotonic() - started < 20
    _untouched(store, outside)


def test_a_pax_header_within_the_limit_still_names_a_long_path(place, tmp_path):
    store, _ = place
    long = "/".join(["d" * 200] * 10) + "/f"
    assert _import(store, _tar(_file(long)), tmp_path, "--name", "long").returncode == 0
    (layer,) = _layers(store)
    assert os.path.isfile(os.path.join(store, "overlay2", layer, "diff", long))


def test_a_truncated_layer_leaves_no_partial_layer(place, tmp_path):
    store, outside = place
    whole = _tar(*(_file(f"f{i}", os.urandom(5000)) for i in range(20)))
    _refused(_import(store, whole[: len(whole) // 2], tmp_path), "truncated")
    _untouched(store, outside)


def test_corrupt_gzip_is_refused(place, tmp_path):
    store, outside = place
    rng = random.Random(7)
    packed = bytearray(gzip.compress(_tar(*(_file(f"f{i}", rng.randbytes(3000)) for i in range(10))), mtime=0))
    packed[len(packed) // 2] ^= 0xFF
    _refused(_import(store, bytes(packed), tmp_path, name="layer.tar.gz"), "corrupt")
    _untouched(store, outside)


def _docker_archive(layer: bytes, diff_id: str | None = None) -> bytes:
    """A docker save archive of one image of one layer."""
    diff_id = diff_id or "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["hostile:v1"], "Layers": ["l1/layer.tar"]}]).encode()
    return _tar(_info("l1", tarfile.DIRTYPE, mode=0o755), (_info("l1/layer.tar", size=len(layer)), layer),
                (_info(config_name, size=len(config)), config), (_info("manifest.json", size=len(manifest)), manifest))


def test_a_layer_whose_content_does_not_match_its_diff_id_is_refused(place, tmp_path):
    store, outside = place
    layer = _tar(_file("etc/file", b"good\n"))
    tampered = layer.replace(b"good", b"evil")
    _refused(_import(store, _docker_archive(tampered, "sha256:" + hashlib.sha256(layer).hexdigest()), tmp_path,
                     name="image.tar"), "diff id", "corrupt")
    _untouched(store, outside)


def test_a_config_whose_name_is_not_its_digest_is_refused(place, tmp_path):
    store, outside = place
    archive = _docker_archive(_tar(_file("a"))).replace(b'"amd64"', b'"arm64"')
    _refused(_import(store, archive, tmp_path, name="image.tar"), "digest")
    _untouched(store, outside)


def test_devices_an_ordinary_user_may_not_make_become_records(tmp_path):
    archive = _tar(_info("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
                   _info("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6))
    with ordinary_user() as user:
        path = os.path.join(user.home, "dev.tar")
        with open(path, "wb") as f:
            f.write(archive)
        store = os.path.join(user.home, "store")
        result = user.run("import", "-q", "--docker-root", store, "--name", "dev:v1", path)
        assert result.returncode == 0, result.stderr
        (layer,) = _layers(store)
        diff = os.path.join(store, "overlay2", layer, "diff")
        for name, record in (("null", b"0:0:0666:char-1-3"), ("sda", b"0:6:0660:block-8-0")):
            st = os.lstat(os.path.join(diff, "dev", name))
            assert os.path.isfile(os.path.join(diff, "dev", name)) and st.st_uid == user.uid
            assert os.getxattr(os.path.join(diff, "dev", name), "user.containers.override_stat") == record


def test_a_killed_import_leaves_no_partial_layer_and_the_next_one_clears_it(place, tmp_path):
    store, _ = place
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:  # 1.5 GiB of data: the import is still unpacking when it is killed
        for i in range(6):
            f.write(_info(f"f{i}", size=256 << 20).tobuf(tarfile.PAX_FORMAT))
            chunk = os.urandom(1 << 20)
            for _ in range(256):
                f.write(chunk)
        f.write(bytes(1024))
    proc = subprocess.Popen([sys.executable, "-m", "ovlfuse", "import", "-q", "--docker-root", store,
                             "--name", "big:v1", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(".import-") for n in _layers(store)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert all(n.startswith(".import-") for n in _layers(store))  # nothing in place, a temporary left
    assert not os.listdir(os.path.join(store, "image", "overlay2", "layerdb", "sha256"))
    path.unlink()
    result = _import(store, _tar(_file("small")), tmp_path, "--name", "small:v1")
    assert result.returncode == 0, result.stderr
    assert not any(n.startswith(".import-") for n in _layers(store))


def test_a_taken_container_name_is_refused_before_anything_is_written(place, tmp_path):
    store, _ = place
    assert _import(store, _tar(_file("a")), tmp_path, "--name", "one:v1", "--container", "box").returncode == 0
    before = _layers(store)
    result = _import(store, _tar(_file("b")), tmp_path, "--name", "two:v1", "--container", "box")
    _refused(result, "already has a container named 'box'")
    assert _layers(store) == before
