"""The marker vocabulary: what each whiteout and opaque form means, and the overlay xattr names."""

from __future__ import annotations

import os
import stat

import pytest

from ovlfuse.fs import markers
from ovlfuse.fs.markers import Marker, OvlXattr


@pytest.fixture
def layer(tmp_path):
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def test_xattr_names_per_mount():
    assert OvlXattr.OPAQUE.name_for(userxattr=False) == "trusted.overlay.opaque"
    assert OvlXattr.REDIRECT.name_for(userxattr=True) == "user.overlay.redirect"
    assert OvlXattr.METACOPY.forms == ("trusted.overlay.metacopy", "user.overlay.metacopy")
    assert markers.BOOKKEEPING == {"trusted.overlay.origin", "user.overlay.origin", "trusted.overlay.impure",
                                   "user.overlay.impure", "trusted.overlay.uuid", "user.overlay.uuid"}


@pytest.mark.parametrize("name, expected", [
    (b".wh..wh..opq", (Marker.OPAQUE, b"")),
    (b".wh.file", (Marker.WHITEOUT, b"file")),
    (b".wh..hidden", (Marker.WHITEOUT, b".hidden")),
    (b"file", None),
    (b"x.wh.y", None),
])
def test_marker_names(name, expected):
    assert markers.marker_name(name) == expected
    assert markers.is_reserved(name) == (expected is not None)


def test_classify_every_form(layer):
    path, fd = layer
    markers.make_whiteout(fd, b"dev")
    (path / "plain").write_bytes(b"")
    (path / "xwh").write_bytes(b"")
    os.setxattr(path / "xwh", "user.overlay.whiteout", b"")
    (path / "full").write_bytes(b"data")
    os.setxattr(path / "full", "user.overlay.whiteout", b"")

    def kind(name: bytes, xattr_whiteouts: bool = True) -> tuple[Marker, bytes]:
        return markers.classify(fd, name, os.stat(name, dir_fd=fd, follow_symlinks=False), xattr_whiteouts)

    assert kind(b"dev") == (Marker.WHITEOUT, b"dev")
    assert kind(b"plain") == (Marker.OBJECT, b"plain")
    assert kind(b"xwh") == (Marker.WHITEOUT, b"xwh")
    assert kind(b"xwh", xattr_whiteouts=False) == (Marker.OBJECT, b"xwh"), "only in a directory marked opaque=x"
    assert kind(b"full") == (Marker.OBJECT, b"full"), "an xattr whiteout is an empty file"
    assert markers.is_device_whiteout(os.stat(path / "dev"))
    os.mknod(path / "null", stat.S_IFIFO | 0o600)
    assert kind(b"null") == (Marker.OBJECT, b"null")


def test_opaque_forms(layer):
    path, fd = layer
    for name in ("y", "x", "oci", "plain", "n"):
        (path / name).mkdir()
    os.setxattr(path / "y", "user.overlay.opaque", b"y")
    os.setxattr(path / "x", "user.overlay.opaque", b"x")
    os.setxattr(path / "n", "user.overlay.opaque", b"n")
    (path / "oci" / ".wh..wh..opq").write_bytes(b"")
    assert [markers.is_opaque_dir(fd, n) for n in (b"y", b"x", b"oci", b"plain", b"n")] == \
        [True, False, True, False, False]
    assert markers.opaque_value(fd, b"x") == b"x"
    x = os.open(path / "x", os.O_PATH | os.O_DIRECTORY)
    try:
        assert markers.holds_xattr_whiteouts(x)
    finally:
        os.close(x)
    markers.set_opaque(fd, b"plain", userxattr=True)
    assert os.getxattr(path / "plain", "user.overlay.opaque") == b"y"


def test_merged_view_xattr_names():
    assert markers.stored_xattr("user.color") == "user.color"
    assert markers.stored_xattr("trusted.overlay.opaque") == "trusted.overlay.overlay.opaque"
    assert markers.stored_xattr("user.overlay.opaque") is None
    assert markers.shown_xattr("trusted.overlay.overlay.x") == "trusted.overlay.x"
    assert markers.shown_xattr("trusted.overlay.origin") is None
    assert markers.shown_xattr("user.overlay.redirect") is None
    assert markers.shown_xattr("security.capability") == "security.capability"


def test_whiteout_files(layer):
    path, fd = layer
    markers.make_whiteout_file(fd, b"gone")
    assert markers.whiteout_file_exists(fd, b"gone")
    assert not markers.whiteout_file_exists(fd, b"x" * 252), "no .wh. name fits: the marker cannot exist"
    markers.remove_whiteout_file(fd, b"gone")
    markers.remove_whiteout_file(fd, b"gone")  # already gone: nothing to do
    assert os.listdir(path) == []
