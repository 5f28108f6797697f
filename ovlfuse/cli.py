"""Command line: ``ovlfuse [--root DIR] LAYER MNT``, ``ovlfuse -o lowerdir=... [SOURCE] MNT`` and the subcommands."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ovlfuse import __version__
from ovlfuse.errors import OvlError

USAGE = """\
  ovlfuse [--root DIR] [--read-only] [-f] [-d] [-o OPTIONS] LAYER MOUNTPOINT
  ovlfuse -o lowerdir=A:B[,upperdir=U,workdir=W] [SOURCE] MOUNTPOINT
  ovlfuse status [--json] MOUNTPOINT
  ovlfuse demo DIR
  ovlfuse diff [--upper] [--no-times] [--json] A B
  ovlfuse verify [--root DIR] [--no-times] [--json] LAYER | -o lowerdir=...
  ovlfuse layers [--root DIR] [--json] LAYER | -o lowerdir=...
  ovlfuse which [--root DIR] [--json] LAYER PATH | -o lowerdir=... PATH
  ovlfuse import [--docker-root DIR] [--name NAME[:TAG]] [--container NAME] ARCHIVE
  ovlfuse export [--root DIR] LAYER -O OUT.tar [--compress gzip|zstd] [--tag NAME:TAG [--from IMAGE]]"""

EPILOG = """\
LAYER is a layer id (64 hex digits, or a unique prefix of at least 12, as
Docker prints them) under --root, the path of a layer directory, or the name
or id of a Docker container, a Docker image (name:tag or id, read-only), or a
containers/storage container, image or layer.  The
layer's diff/ is the upper dir and its 'lower' file names the lower chain;
a layer holding a 'committed' file (or --read-only) mounts read-only.

-o accepts lowerdir, upperdir, workdir (\\: escapes a colon in a path),
ro, rw, userxattr, the generic options dev, nodev, suid, nosuid, exec,
noexec, sync, async, dirsync, atime, noatime, fstab-only options (defaults,
noauto, user, nofail, _netdev, x-*), and index=off, redirect_dir=off,
metacopy=off, xino=off|auto, uuid=off|null as Docker passes them.
Sharing: as root a mount serves every user, the kernel checking modes, and
runs set-user-ID programs, as the kernel's overlay does (-o noallow_other
keeps it root's alone, nosuid turns set-user-ID off); an ordinary user's
mount is theirs alone unless -o allow_other or allow_root, which
/etc/fuse.conf must allow (user_allow_other).
libfuse's conventions: debug (as -d), auto_unmount (a killed daemon's mount
goes away), fsname=, subtype=; accepted and ignored, with the reason in the
log: relatime, strictatime, diratime, lazytime and their no- forms,
max_threads=, max_idle_threads=, clone_fd (one loop serves every request).
As a drop-in for fuse-overlayfs (containers/storage's mount_program) it also
takes uidmapping=C:H:N[:C:H:N...], gidmapping=..., squash_to_root,
squash_to_uid=N, squash_to_gid=N, static_nlink, noacl, volatile, fsync=0|1
and xattr_permissions=0|1|2 (owners and modes kept in stat override records).

Unmount with 'fusermount3 -u MOUNTPOINT', 'umount MOUNTPOINT', or by sending
the daemon SIGTERM.  'ovlfuse status MOUNTPOINT' shows what a mount is doing."""


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--docker-root", default=None, metavar="DIR",
                        help="Docker's data root, for container and image names (default /var/lib/docker)")
    parser.add_argument("--storage-root", default=None, metavar="DIR",
                        help="containers/storage root, for podman names (default /var/lib/containers/storage, "
                             "or ~/.local/share/containers/storage for an ordinary user)")


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
    _engine_options(parser)
    parser.add_argument("--read-only", action="store_true", help="mount read-only: the layer's diff joins the lowers")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay attached instead of daemonizing")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="log every request with its path and its reply or errno (implies --foreground "
                             "unless --log-file)")
    parser.add_argument("-s", dest="single_threaded", action="store_true",
                        help="single-threaded, as libfuse's -s: accepted, ovlfuse always serves on one loop")
    parser.add_argument("--pid-file", help="write the daemon's PID here while it runs")
    parser.add_argument("--log-file", help="where the daemon writes its log: mount, unmount, errors, big copy-ups "
                        "(default: stderr in the foreground, nowhere for a daemon)")
    parser.add_argument("-V", "--version", action="version", version=f"ovlfuse {__version__}")
    return parser


def _plan(ns: argparse.Namespace, parser: argparse.ArgumentParser, positionals: int):
    """The mount plan named by LAYER (with --root) or by -o lowerdir=...; ``positionals`` after it."""
    from ovlfuse.store.options import parse_options
    from ovlfuse.store.plan import plan_from_options

    opts = parse_options(ns.options)
    if opts.has_layers:
        if len(ns.args) not in (positionals, positionals + 1):
            parser.error("with -o lowerdir=..., give [SOURCE] " + " ".join(["MOUNTPOINT", "PATH"][:positionals]))
        label = ns.args[0] if len(ns.args) == positionals + 1 else None
        plan = plan_from_options(opts, label)
        if ns.read_only:
            plan = plan.as_read_only()
    else:
        if len(ns.args) != positionals + 1:
            parser.error("give LAYER MOUNTPOINT, or -o lowerdir=... MOUNTPOINT" if positionals
                         else "give LAYER, or -o lowerdir=...")
        plan = _plan_from_names(ns, ns.read_only or opts.read_only)
    return plan, opts


def _plan_from_names(ns: argparse.Namespace, read_only: bool):
    """LAYER as a layer id or directory, else as a container, image or layer name an engine knows."""
    from ovlfuse.store import containers
    from ovlfuse.store.plan import LayerNotFound, plan_from_store

    docker_root = ns.docker_root or containers.DOCKER_ROOT
    storage_root = ns.storage_root or containers.default_storage_root()
    root = _store_root(ns)
    name = ns.args[0]
    try:
        return plan_from_store(root, name, read_only)
    except LayerNotFound as missing:
        found = containers.find(name, docker_root, storage_root)
        if found is None:
            raise LayerNotFound(f"{missing}; no container or image of that name either (looked in "
                                f"{docker_root} and {storage_root}: give --docker-root or --storage-root "
                                "to look elsewhere)") from None
    return plan_from_store(found.store_root, found.layer_id, read_only or found.read_only)


def _mount(argv: list[str]) -> int:
    from ovlfuse.fs.inode import View
    from ovlfuse.fuse.daemon import ServeOptions, serve
    from ovlfuse.store.plan import check_upper_free

    parser = _parser()
    ns = parser.parse_intermixed_args(argv)
    plan, opts = _plan(ns, parser, 1)
    if not (opts.read_only or ns.read_only):
        check_upper_free(plan)
    debug = ns.debug or opts.debug
    serve_opts = ServeOptions(
        foreground=ns.foreground or (debug and not ns.log_file),
        debug=debug,
        allow_other=opts.allow_other,
        allow_root=opts.allow_root,
        auto_unmount=opts.auto_unmount,
        read_only=opts.read_only or ns.read_only,
        userxattr=opts.userxattr,
        vfs_flags=opts.vfs_flags,
        fsname=opts.fsname,
        subtype=opts.subtype,
        ignored=opts.ignored + (["-s: ovlfuse always serves on one loop"] if ns.single_threaded else []),
        view=View(opts.ids(), opts.static_nlink),
        xattr_permissions=opts.xattr_permissions,
        volatile=opts.volatile,
        pid_file=os.path.abspath(ns.pid_file) if ns.pid_file else None,
        log_file=os.path.abspath(ns.log_file) if ns.log_file else None,
    )
    return serve(plan, ns.args[-1], serve_opts)


def _layer_parser(prog: str, usage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"ovlfuse {prog}", usage=usage, description=description)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="lowerdir=...[,upperdir=...] instead of LAYER")
    parser.add_argument("--root", default=None, help="overlay2 store root (default: $OVLFUSE_ROOT or "
                        "/var/lib/docker/overlay2)")
    _engine_options(parser)
    parser.add_argument("--read-only", action="store_true", help="treat the layer as committed")
    parser.add_argument("--json", action="store_true", help="machine-readable output (see docs/json.md)")
    return parser


def _verify(argv: list[str]) -> int:
    from ovlfuse.tools.verify import KernelUnavailable, Stopped, stop_signals_unwind, verify

    parser = _layer_parser("verify", "ovlfuse verify [--root DIR] [--no-times] [--json] LAYER | -o lowerdir=...",
                           "Mount LAYER read-only with ovlfuse and with the kernel's overlay, and diff the two "
                           "views. Exit 0 equal, 1 different, 2 error.")
    parser.add_argument("--no-times", action="store_true", help="do not compare mtimes")
    parser.add_argument("--in-user-namespace", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_intermixed_args(argv)
    try:
        with stop_signals_unwind():
            plan, _ = _plan(ns, parser, 0)
            return verify(plan, times=not ns.no_times, as_json=ns.json, userxattr=ns.in_user_namespace)
    except KernelUnavailable as e:
        print(f"ovlfuse: {e}", file=sys.stderr)
        return 2
    except Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        if not ns.in_user_namespace:
            print(f"ovlfuse verify: stopped by {name}; both mounts and the daemon are gone", file=sys.stderr)
        return 128 + stopped.signum


def _layers(argv: list[str]) -> int:
    from ovlfuse.tools.layerinfo import chain_info, damaged_chain, render

    parser = _layer_parser("layers", "ovlfuse layers [--root DIR] [--json] LAYER | -o lowerdir=...",
                           "Show LAYER's chain top to bottom: ids, links, sizes, marker forms. A damaged "
                           "chain is shown as far as it can be read, the missing parts marked (exit 1).")
    ns = parser.parse_intermixed_args(argv)
    try:
        plan, _ = _plan(ns, parser, 0)
    except OvlError as e:
        infos = damaged_chain(_store_root(ns), ns.args[0], ns.read_only) if len(ns.args) == 1 and not ns.options \
            else None
        if infos is None:
            raise
        print(f"ovlfuse: {e}", file=sys.stderr)
    else:
        infos = chain_info(([plan.upper] if plan.upper else []) + plan.lowers, writable_top=plan.upper is not None)
    print(render(infos, ns.json))
    return 1 if any(info.missing for info in infos) else 0


def _store_root(ns: argparse.Namespace) -> str:
    from ovlfuse.store.plan import DEFAULT_ROOT

    return (ns.root or os.environ.get("OVLFUSE_ROOT")
            or (os.path.join(ns.docker_root, "overlay2") if ns.docker_root else None)
            or (os.path.join(ns.storage_root, "overlay") if ns.storage_root else None) or DEFAULT_ROOT)


def _which(argv: list[str]) -> int:
    from ovlfuse.fs.layers import LayerStack
    from ovlfuse.tools.which import explain, render

    parser = _layer_parser("which", "ovlfuse which [--root DIR] [--json] LAYER PATH | -o lowerdir=... PATH",
                           "Tell which layer provides PATH in LAYER's merged view, what it shadows, or which "
                           "whiteout or opaque dir hides it. Nothing is mounted. Exit 0 when PATH is in the "
                           "merged view, 1 when it is not, 2 on error.")
    ns = parser.parse_intermixed_args(argv)
    plan, _ = _plan(ns, parser, 1)
    stack = LayerStack.open(plan.upper, plan.workdir, plan.lowers)
    try:
        answer = explain(stack, ns.args[-1])
    finally:
        stack.close()
    print(render(answer, ns.json))
    return 0 if answer["visible"] else 1


def _diff(argv: list[str]) -> int:
    from ovlfuse.tools.diff import run_diff

    parser = argparse.ArgumentParser(prog="ovlfuse diff", description="Compare two directory trees. "
                                     "Exit 0 equal, 1 different, 2 error.")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--upper", action="store_true",
                        help="compare upper/diff dirs: equivalent whiteout and opaque forms are equal, "
                        "kernel bookkeeping xattrs are ignored")
    parser.add_argument("--no-times", action="store_true", help="do not compare mtimes")
    parser.add_argument("--json", action="store_true", help="machine-readable output (see docs/json.md)")
    ns = parser.parse_args(argv)
    return run_diff(ns.a, ns.b, upper=ns.upper, times=not ns.no_times, as_json=ns.json)


def _import(argv: list[str]) -> int:
    from ovlfuse.image import importer

    parser = argparse.ArgumentParser(
        prog="ovlfuse import", description="Import a docker save archive, an OCI image layout (directory or "
        "tar) or a layer tarball (plain, gzip, zstd, bzip2, xz) into an overlay2 store, with its names.")
    parser.add_argument("archive")
    parser.add_argument("--docker-root", metavar="DIR", help="the store: layers in DIR/overlay2, names in "
                        "DIR/image (default /var/lib/ovlfuse, or ~/.local/share/ovlfuse for an ordinary user)")
    parser.add_argument("--root", metavar="DIR", help="the store's overlay2 directory instead (DIR/.. keeps the names)")
    parser.add_argument("--name", action="append", default=[], metavar="NAME[:TAG]",
                        help="name the image so (repeatable); default: the archive's own names")
    parser.add_argument("--parent", metavar="IMAGE", help="a layer tarball goes on top of this image of the store")
    parser.add_argument("--container", metavar="NAME", help="also make an empty writable layer on the image, "
                        "mounted and exported by NAME (as docker create does)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ns = parser.parse_args(argv)
    if ns.root and os.path.basename(os.path.normpath(ns.root)) != "overlay2":
        parser.error("--root names a store's overlay2 directory (DIR/overlay2); or give --docker-root DIR")
    return importer.main(ns.archive, ns.docker_root, ns.root, ns.name, ns.parent, ns.container, ns.quiet)


def _export(argv: list[str]) -> int:
    from ovlfuse.image import exporter

    parser = _layer_parser("export", "ovlfuse export [--root DIR] LAYER -O OUT.tar [--compress gzip|zstd] "
                           "[--tag NAME:TAG [--from IMAGE]]", "Write LAYER's own changes (its diff/) as an OCI layer tarball, or with "
                           "--tag the whole image as a docker save archive for docker load and podman load.")
    parser.add_argument("-O", "--output", required=True, metavar="OUT", help="file to write ('-': stdout)")
    parser.add_argument("--compress", choices=("none", "gzip", "zstd"), default="none")
    parser.add_argument("--tag", metavar="NAME:TAG", help="write the whole image (all layers but -init ones)")
    parser.add_argument("--from", dest="base", metavar="IMAGE", help="with --tag: keep this image's config "
                        "(command, environment, ...)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ns = parser.parse_intermixed_args(argv)
    plan, _ = _plan(ns, parser, 0)
    return exporter.main(plan, ns.output, None if ns.compress == "none" else ns.compress, ns.tag, ns.base,
                         ns.docker_root, ns.quiet)


def _status(argv: list[str]) -> int:
    from ovlfuse.tools.status import read_status, render

    parser = argparse.ArgumentParser(prog="ovlfuse status", description="Show what a running ovlfuse mount is "
                                     "doing: its layers and options, requests served by type, errors, copy-ups "
                                     "done and in progress, cache sizes and memory. Exit 0, or 1 when "
                                     "MOUNTPOINT is not a live ovlfuse mount.")
    parser.add_argument("mountpoint")
    parser.add_argument("--json", action="store_true", help="machine-readable output (see docs/json.md)")
    ns = parser.parse_args(argv)
    print(render(read_status(ns.mountpoint), ns.json))
    return 0


COMMANDS = {"diff": _diff, "verify": _verify, "layers": _layers, "which": _which, "status": _status,
            "import": _import, "export": _export}
EXIT_ON_ERROR = {"diff": 2, "verify": 2, "which": 2}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    try:
        status = _dispatch(command, argv)
        sys.stdout.flush()  # a reader gone away shows here, not as a traceback at exit
        return status
    except OvlError as e:
        print(f"ovlfuse: {e}", file=sys.stderr)
        return EXIT_ON_ERROR.get(command, 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``ovlfuse layers | head``): stop quietly, as ls does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _dispatch(command: str, argv: list[str]) -> int:
    if command == "demo":
        from ovlfuse.tools.demo import demo_main

        return demo_main(argv[1:])
    if command in COMMANDS:
        return COMMANDS[command](argv[1:])
    return _mount(argv)
