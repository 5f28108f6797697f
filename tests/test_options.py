"""Mount options that change what ovlfuse writes."""

from __future__ import annotations

import os

from mounts import ovlfuse_mount


def _stack(tmp_path):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "d", upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "d" / "old").write_text("old")
    return f"lowerdir={lower},upperdir={upper},workdir={work}", upper, mnt


def _replace_dir(mnt) -> None:
    os.unlink(mnt / "d" / "old")
    os.rmdir(mnt / "d")
    os.mkdir(mnt / "d")


def test_userxattr_writes_user_namespace_opaque_markers(tmp_path):
    opts, upper, mnt = _stack(tmp_path)
    with ovlfuse_mount(["-o", opts + ",userxattr", str(mnt)], str(mnt)):
        _replace_dir(mnt)
        assert os.listdir(mnt / "d") == []
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "d")


def test_root_writes_trusted_opaque_markers_by_default(tmp_path):
    opts, upper, mnt = _stack(tmp_path)
    with ovlfuse_mount(["-o", opts, str(mnt)], str(mnt)):
        _replace_dir(mnt)
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert "user.overlay.opaque" not in os.listxattr(upper / "d")
