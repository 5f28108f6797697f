"""Command line: ``ovlfuse [--root DIR] LAYER MNT``, ``ovlfuse -o lowerdir=... [SOURCE] MNT``, ``ovlfuse demo DIR``."""

from __future__ import annotations

import argparse
import os
import sys

from ovlfuse import __version__
from ovlfuse.errors import OvlError

USAGE = """\
  ovlfuse [--root DIR] [--read-only] LAYER MOUNTPOINT
  ovlfuse -o lowerdir=A:B[,upperdir=U,workdir=W] [SOURCE] MOUNTPOINT
  ovlfuse demo DIR"""

EPILOG = """\
LAYER is a layer id (64 hex digits, or a unique prefix of at least 12, as
Docker prints them) under --root, or the path of a layer directory.  The
layer's diff/ is the upper dir and its 'lower' file names the lower chain;
a layer holding a 'committed' file (or --read-only) mounts read-only.

-o accepts lowerdir, upperdir, workdir (\\: escapes a colon in a path),
ro, rw, allow_other, userxattr, the generic options dev, nodev, suid,
nosuid, exec, noexec, sync, async, dirsync and the atime family, fstab-only
options (defaults, noauto, user, nofail, _netdev, x-*), and index=off,
redirect_dir=off, metacopy=off, xino=off|auto as Docker passes them.

Unmount with 'fusermount3 -u MOUNTPOINT', 'umount MOUNTPOINT', or by sending
the daemon SIGTERM."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovlfuse",
        usage=USAGE,
        description="Mount the merged view of overlay2 layers with FUSE.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("args", nargs="*", metavar="LAYER|SOURCE MOUNTPOINT", help=argparse.SUPPRESS)
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="mount options, comma separated (see below)")
    parser.add_argument("--root", default=None,
                        help="overlay2 store root (default: $OVLFUSE_ROOT or /var/lib/docker/overlay2)")
    parser.add_argument("--read-only", action="store_true", help="mount read-only: the layer's diff joins the lowers")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay attached instead of daemonizing")
    parser.add_argument("-d", "--debug", action="store_true", help="log every request (implies --foreground unless --log-file)")
    parser.add_argument("--pid-file", help="write the daemon's PID here while it runs")
    parser.add_argument("--log-file", help="where the daemon writes its log (default: nowhere)")
    parser.add_argument("-V", "--version", action="version", version=f"ovlfuse {__version__}")
    return parser


def _mount(argv: list[str]) -> int:
    from ovlfuse.daemon import ServeOptions, serve
    from ovlfuse.options import parse_options
    from ovlfuse.store import DEFAULT_ROOT, plan_from_options, plan_from_store

    parser = _parser()
    ns = parser.parse_intermixed_args(argv)
    opts = parse_options(ns.options)
    if opts.has_layers:
        if len(ns.args) not in (1, 2):
            parser.error("with -o lowerdir=..., give [SOURCE] MOUNTPOINT")
        label = ns.args[0] if len(ns.args) == 2 else None
        plan = plan_from_options(opts, label)
        if ns.read_only:
            plan = plan.as_read_only()
    else:
        if len(ns.args) != 2:
            parser.error("give LAYER MOUNTPOINT, or -o lowerdir=... MOUNTPOINT")
        root = ns.root or os.environ.get("OVLFUSE_ROOT") or DEFAULT_ROOT
        plan = plan_from_store(root, ns.args[0], ns.read_only or opts.read_only)
    serve_opts = ServeOptions(
        foreground=ns.foreground or (ns.debug and not ns.log_file),
        debug=ns.debug,
        allow_other=opts.allow_other,
        read_only=opts.read_only or ns.read_only,
        vfs_flags=opts.vfs_flags,
        pid_file=os.path.abspath(ns.pid_file) if ns.pid_file else None,
        log_file=os.path.abspath(ns.log_file) if ns.log_file else None,
    )
    return serve(plan, ns.args[-1], serve_opts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["demo"]:
            from ovlfuse.demo import demo_main

            return demo_main(argv[1:])
        return _mount(argv)
    except OvlError as e:
        print(f"ovlfuse: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
