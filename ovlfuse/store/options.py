"""Mount options: the ``-o`` string, accepted the way the kernel's overlay does.

Layer options (``lowerdir``, ``upperdir``, ``workdir``) use the kernel's
escapes (``\\:`` inside a layer path, ``\\,`` inside an option).  Generic VFS
options are passed to the FUSE mount; overlay feature switches are accepted
only with the values ovlfuse implements (those Docker mounts with), anything
else is refused rather than silently ignored.  fuse-overlayfs's own options
are accepted too, as containers/storage passes them to a mount program
(owner mapping, ``static_nlink``, ``xattr_permissions``, ``noacl``,
``volatile``), so ovlfuse can stand in for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ovlfuse.errors import OvlError
from ovlfuse.fs.idmap import MAX_ID, IdMap, IdRange, parse_id, parse_mapping

# Generic options the FUSE mount itself applies (libfuse passes them to mount(2)).
_VFS_FLAGS = {
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync", "atime", "noatime",
}
# Generic options libfuse cannot pass on: accepted, as fuse-overlayfs accepts them, and explained.
_IGNORED_VFS = {name: "the layers' own filesystems keep the access times, as their mounts say"
                for name in ("diratime", "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime")}
_IGNORED_VFS.update({name: "FUSE keeps no timestamps of its own to write back lazily"
                     for name in ("lazytime", "nolazytime")})
# libfuse's options for its multi-threaded loop: ovlfuse serves on one trio loop, as fuse-overlayfs does
# unless told threaded=1.
_LOOP_OPTIONS = {"max_threads", "max_idle_threads", "clone_fd"}
# Options mount(8) and fstab use for themselves; they mean nothing to the filesystem.
_USERSPACE_ONLY = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
                   "nofail", "_netdev", "silent", "loud", "nosymfollow", "symfollow"}
# Overlay feature switches: the values ovlfuse implements (Docker's choices).
_OVERLAY_SWITCHES = {
    "index": {"off"},
    "redirect_dir": {"off", "nofollow"},
    "metacopy": {"off"},
    "xino": {"off", "auto"},
    "nfs_export": {"off"},
    # ovlfuse writes no trusted.overlay.uuid, as the kernel with uuid=null or off (its default "auto" writes
    # one on a new upper dir and "on" always does); origin records carry a null uuid, as the kernel's do
    # with every layer on one filesystem.
    "uuid": {"off", "null"},
}
# fuse-overlayfs options ovlfuse does not implement, and why.
_REFUSED = {
    "context": "SELinux mount labels are not implemented",
    "plugins": "fuse-overlayfs layer plugins do not exist in ovlfuse",
    "threaded": "ovlfuse serves requests on one trio loop",
    "fast_ino": "ovlfuse always reports the kernel's inode numbers",
    "writeback": "ovlfuse keeps the kernel's writeback cache off",
    "noxattrs": "xattrs are always served",
    "timeout": "ovlfuse sets its own cache timeouts",
}


@dataclass
class MountOptions:
    lowerdir: list[str] = field(default_factory=list)
    upperdir: str | None = None
    workdir: str | None = None
    read_only: bool = False
    allow_other: bool | None = None  # None: the default (yes as root, no for an ordinary user)
    allow_root: bool = False
    auto_unmount: bool = False
    debug: bool = False
    userxattr: bool = False
    fsname: str | None = None
    subtype: str | None = None
    vfs_flags: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # accepted options that change nothing, with the reason
    uidmapping: tuple[IdRange, ...] = ()
    gidmapping: tuple[IdRange, ...] = ()
    squash_to_root: bool = False
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    static_nlink: bool = False
    xattr_permissions: int = 0  # 1: security.* stat override records, 2: user.containers.* ones
    volatile: bool = False  # fsync and fsyncdir do nothing (the kernel's volatile, fuse-overlayfs's fsync=0)

    def ids(self) -> IdMap:
        """The owner mapping the options ask for (squash_to_uid/gid win over squash_to_root)."""
        root = 0 if self.squash_to_root else None
        return IdMap.create(self.uidmapping, self.gidmapping,
                            self.squash_to_uid if self.squash_to_uid is not None else root,
                            self.squash_to_gid if self.squash_to_gid is not None else root)

    @property
    def has_layers(self) -> bool:
        return bool(self.lowerdir or self.upperdir or self.workdir)


def split_unescaped(text: str, sep: str) -> list[str]:
    """Split at ``sep`` not preceded by a backslash, removing one level of escapes."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current.append(nxt)
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _split_options(text: str) -> list[str]:
    """Split an option string at commas, keeping escapes for the layer lists."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch if ch == "," else "\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return [p for p in parts if p]


def parse_options(option_strings: list[str]) -> MountOptions:
    opts = MountOptions()
    for text in option_strings:
        for option in _split_options(text):
            _apply(opts, option)
    return opts


def _apply(opts: MountOptions, option: str) -> None:
    key, has_value, value = option.partition("=")
    if key == "lowerdir":
        layers = split_unescaped(value, ":")
        if "" in layers:
            raise OvlError(f"lowerdir={value!r} has an empty layer (data-only '::' layers are not supported)")
        opts.lowerdir = layers
    elif key in ("upperdir", "workdir"):
        if not value:
            raise OvlError(f"option {key}= needs a directory")
        setattr(opts, key, "".join(split_unescaped(value, "\0")))
    elif key == "ro" and not has_value:
        opts.read_only = True
    elif key == "rw" and not has_value:
        opts.read_only = False
    elif key == "userxattr" and not has_value:
        opts.userxattr = True
    elif key in ("allow_other", "noallow_other") and not has_value:
        opts.allow_other = key == "allow_other"
    elif key == "allow_root" and not has_value:
        opts.allow_root = True
    elif key in ("auto_unmount", "debug") and not has_value:
        setattr(opts, key, True)
    elif key == "default_permissions" and not has_value:
        pass  # always on
    elif key in ("fsname", "subtype") and has_value:
        if not value or "," in value:
            raise OvlError(f"option {option!r} needs a name without commas")
        setattr(opts, key, value)
    elif key in _VFS_FLAGS and not has_value:
        opts.vfs_flags.append(key)
    elif key in _IGNORED_VFS and not has_value:
        opts.ignored.append(f"{key}: {_IGNORED_VFS[key]}")
    elif key in _LOOP_OPTIONS:
        if key != "clone_fd" and not value.isdigit():
            raise OvlError(f"option {option!r} needs a number of threads")
        opts.ignored.append(f"{option}: ovlfuse serves every request on one loop, without threads")
    elif key in _USERSPACE_ONLY or key.startswith("x-"):
        pass
    elif key in ("uidmapping", "gidmapping") and has_value:
        setattr(opts, key, parse_mapping(key, value))
    elif key in ("squash_to_uid", "squash_to_gid") and has_value:
        ident = parse_id(value)
        if ident is None:
            raise OvlError(f"option {option!r} needs a numeric id, 0 to {MAX_ID}")
        setattr(opts, key, ident)
    elif key in ("squash_to_root", "static_nlink", "volatile") and not has_value:
        setattr(opts, key, True)
    elif key == "noacl" and not has_value:
        pass  # ovlfuse never enables POSIX ACL checks: ACL xattrs are stored, the kernel checks modes
    elif key == "xattr_permissions":
        if value not in ("0", "1", "2"):
            raise OvlError(f"option {option!r}: xattr_permissions takes 0 (off), 1 (security.* records) "
                           "or 2 (user.* records)")
        opts.xattr_permissions = int(value)
    elif key == "fsync":
        if value not in ("0", "1"):
            raise OvlError(f"option {option!r}: fsync takes 0 (skip syncs, like volatile) or 1")
        opts.volatile = value == "0"
    elif key in _REFUSED:
        raise OvlError(f"option {option!r} is not supported: {_REFUSED[key]}")
    elif _looks_like_mapping(option):
        raise OvlError(f"unknown mount option {option!r}; join uidmapping/gidmapping triples with ':', not ','")
    elif key in _OVERLAY_SWITCHES:
        allowed = _OVERLAY_SWITCHES[key]
        if value not in allowed:
            raise OvlError(
                f"option {option!r} is not supported: ovlfuse implements {key}={'|'.join(sorted(allowed))} only"
                + (" (it writes no trusted.overlay.uuid)" if key == "uuid" else "")
            )
    else:
        raise OvlError(f"unknown mount option {option!r}; see 'ovlfuse --help' for the accepted options")


def _looks_like_mapping(option: str) -> bool:
    """A stray ``1:100000:65536`` is the tail of a mapping written with commas."""
    fields = option.split(":")
    return len(fields) % 3 == 0 and all(f.isascii() and f.isdigit() for f in fields)
