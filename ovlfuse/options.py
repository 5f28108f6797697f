"""Mount options: the ``-o`` string, accepted the way the kernel's overlay does.

Layer options (``lowerdir``, ``upperdir``, ``workdir``) use the kernel's
escapes (``\\:`` inside a layer path, ``\\,`` inside an option).  Generic VFS
options are passed to the FUSE mount; overlay feature switches are accepted
only with the values ovlfuse implements (those Docker mounts with), anything
else is refused rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ovlfuse.errors import OvlError

# Generic options the FUSE mount itself applies (libfuse passes them to mount(2)).
_VFS_FLAGS = {
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync",
    "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime",
    "strictatime", "nostrictatime", "lazytime", "nolazytime",
}
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
    "uuid": {"on", "off", "null", "auto"},
}


@dataclass
class MountOptions:
    lowerdir: list[str] = field(default_factory=list)
    upperdir: str | None = None
    workdir: str | None = None
    read_only: bool = False
    allow_other: bool = False
    userxattr: bool = False
    fsname: str | None = None
    vfs_flags: list[str] = field(default_factory=list)

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
    elif key == "allow_other" and not has_value:
        opts.allow_other = True
    elif key == "default_permissions" and not has_value:
        pass  # always on
    elif key in ("fsname", "subtype") and has_value:
        if key == "fsname":
            opts.fsname = value
    elif key in _VFS_FLAGS and not has_value:
        opts.vfs_flags.append(key)
    elif key in _USERSPACE_ONLY or key.startswith("x-"):
        pass
    elif key in _OVERLAY_SWITCHES:
        allowed = _OVERLAY_SWITCHES[key]
        if value not in allowed:
            raise OvlError(
                f"option {option!r} is not supported: ovlfuse implements {key}={'|'.join(sorted(allowed))} only"
            )
    else:
        raise OvlError(f"unknown mount option {option!r}; see 'ovlfuse --help' for the accepted options")
