"""The write path driven through the engine directly: marker forms and failed calls."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from ovlfuse.fs.engine import ROOT, MergeEngine
from ovlfuse.sys.safeio import RENAME_NOREPLACE
from ovlfuse.errors import OvlError
from ovlfuse.fs.layers import LayerStack
from stores import device_whiteout, fingerprint, write

CTX = (0, 0, 0o022)  # uid, gid, umask of the caller


@pytest.fixture
def layers(tmp_path):
    lower, upper, work = (str(tmp_path / n) for n in ("lower", "upper", "work"))
    write(f"{lower}/d/f", "f\n")
    write(f"{lower}/w/old", "old\n")
    write(f"{lower}/plain", "p\n")
    os.makedirs(upper)
    os.makedirs(work)
    device_whiteout(f"{upper}/w")
    return lower, upper, work


def _engine(layers, userxattr: bool) -> MergeEngine:
    lower, upper, work = layers
    stack = LayerStack.open(upper, work, [lower])
    stack.userxattr = userxattr
    return MergeEngine(stack)


def _xattrs(path: str) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}


@pytest.mark.parametrize("userxattr", [False, True])
async def test_opaque_marker_form(layers, userxattr):
    """Root writes trusted.overlay.opaque; a userxattr mount writes user.overlay.opaque (as the kernel reads)."""
    lower, upper, work = layers
    engine = _engine(layers, userxattr)
    try:
        await engine.mkdir(ROOT, b"w", 0o755, *CTX)
        d = engine.lookup(ROOT, b"d").st_ino
        await engine.mkdir(ROOT, b"n", 0o755, *CTX)
        await engine.rename(ROOT, b"n", d, b"n", 0)
    finally:
        engine.close()
    want = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
    for path in (f"{upper}/w", f"{upper}/d/n"):
        markers = {n: v for n, v in _xattrs(path).items() if n.endswith("overlay.opaque")}
        assert markers == {want: b"y"}, path
    assert stat.S_ISDIR(os.lstat(f"{upper}/w").st_mode)


async def test_failed_calls_change_nothing(layers):
    lower, upper, work = layers
    engine = _engine(layers, False)
    before = fingerprint(upper)
    d = engine.lookup(ROOT, b"d").st_ino
    calls = [
        (engine.rmdir(ROOT, b"d"), errno.ENOTEMPTY),
        (engine.rename(ROOT, b"d", ROOT, b"d2", 0), errno.EXDEV),
        (engine.rename(ROOT, b"plain", d, b"f", RENAME_NOREPLACE), errno.EEXIST),
        (engine.unlink(d, b"missing"), errno.ENOENT),
        (engine.mknod(d, b"wh", stat.S_IFCHR | 0o600, 0, *CTX), errno.EPERM),
        (engine.mkdir(d, b".wh.x", 0o755, *CTX), errno.EINVAL),
        (engine.mkdir(d, b"f", 0o755, *CTX), errno.EEXIST),
        (engine.removexattr(d, b"user.none"), errno.ENODATA),
        (engine.setxattr(d, b"user.overlay.opaque", b"y"), errno.EPERM),
        (engine.link(engine.lookup(ROOT, b"plain").st_ino, d, b"f"), errno.EEXIST),
        (engine.link(engine.lookup(ROOT, b"plain").st_ino, d, b".wh.f"), errno.EINVAL),
    ]
    try:
        for call, code in calls:
            with pytest.raises(OSError) as exc:
                await call
            assert exc.value.errno == code
    finally:
        engine.close()
    assert fingerprint(upper) == before


async def test_work_dir_is_cleaned_and_used_for_whiteouts(layers):
    lower, upper, work = layers
    os.makedirs(f"{work}/work/left-over/deep")
    engine = _engine(layers, False)
    try:
        assert os.listdir(f"{work}/work") == []
        d = engine.lookup(ROOT, b"d").st_ino
        await engine.unlink(d, b"f")
        await engine.rmdir(ROOT, b"d")
    finally:
        engine.close()
    st = os.lstat(f"{upper}/d")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.listdir(f"{work}/work") == []


def test_unusable_workdir_is_a_clear_error(layers):
    lower, upper, work = layers
    os.rmdir(work)
    with pytest.raises(OvlError, match="cannot use workdir"):
        MergeEngine(LayerStack.open(upper, work, [lower]))
