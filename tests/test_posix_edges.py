"""POSIX corners users hit, each done on the kernel's overlay and on ovlfuse and compared."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from overlaypair import Layers, on_both


def _layers(base) -> Layers:
    lower, lower2, upper, work = (base / n for n in ("lower", "lower2", "upper", "work"))
    for d in (lower / "dir", lower2, upper, work):
        d.mkdir(parents=True)
    (lower / "dir" / "old").write_text("lower old\n")
    (lower / "dir" / "other").write_text("lower other\n")
    return Layers.dirs([lower, lower2], upper, work)


def _on_both(tmp_path, scenario) -> None:
    """Run ``scenario(mnt)`` on a kernel mount and an ovlfuse mount; results must match."""
    results = on_both(tmp_path, _layers, lambda m: scenario(m.path))
    assert results["ovlfuse"] == results["kernel"]


def _errno(call) -> str:
    try:
        call()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


def test_names_over_255_bytes(tmp_path):
    def scenario(mnt):
        long = "n" * 256
        return [_errno(lambda: os.stat(mnt / long)), _errno(lambda: open(mnt / long, "w")),
                _errno(lambda: os.mkdir(mnt / "dir" / long)), _errno(lambda: os.stat(mnt / ("n" * 255)))]
    _on_both(tmp_path, scenario)


def test_paths_longer_than_path_max(tmp_path):
    """Reached one directory at a time with *at calls, as tools like rm -rf do."""
    def scenario(mnt):
        fd = os.open(mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
        depth = 0
        try:
            for depth in range(1, 25):  # 24 x 201 bytes: far past 4096
                name = f"{depth:03d}" + "d" * 197
                os.mkdir(name, dir_fd=fd)
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            wfd = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(wfd, b"deep\n")
            os.close(wfd)
            rfd = os.open("leaf", os.O_RDONLY, dir_fd=fd)
            data = os.read(rfd, 100)
            os.close(rfd)
            return [depth, data, sorted(os.listdir(fd))]
        finally:
            os.close(fd)
    _on_both(tmp_path, scenario)


def test_unlinked_open_file_keeps_working(tmp_path):
    def scenario(mnt):
        out = []
        for name in ("old", "fresh"):
            path = mnt / "dir" / name
            if name == "fresh":
                path.write_text("new file\n")
            fd = os.open(path, os.O_RDWR)
            os.unlink(path)
            out.append(os.fstat(fd).st_nlink)
            os.pwrite(fd, b"written after unlink\n", 0)
            out.append(os.pread(fd, 100, 0))
            out.append(os.path.exists(path))
            os.close(fd)
        return out
    _on_both(tmp_path, scenario)


def test_rename_over_an_open_file(tmp_path):
    def scenario(mnt):
        target = mnt / "dir" / "old"
        rfd = os.open(target, os.O_RDONLY)
        os.rename(mnt / "dir" / "other", target)
        out = [os.pread(rfd, 100, 0), target.read_text(), sorted(os.listdir(mnt / "dir"))]
        os.close(rfd)
        return out
    _on_both(tmp_path, scenario)


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_files_through_the_mount(tmp_path, kind):
    def scenario(mnt):
        path = mnt / "dir" / kind
        if kind == "fifo":
            os.mkfifo(path)
        else:
            os.mknod(path, stat.S_IFSOCK | 0o644)
        return [stat.S_IFMT(os.lstat(path).st_mode), _errno(lambda: os.mknod(mnt / "dir" / "wh", stat.S_IFCHR,
                                                                              os.makedev(0, 0)))]
    _on_both(tmp_path, scenario)
