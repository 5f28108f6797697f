"""Run ovlfuse where char 0:0 whiteouts cannot be made, as on Linux before 5.8 for an ordinary user.

A seccomp filter makes the kernel refuse, with EPERM, every mknod of a char
device 0:0 and every rename with RENAME_WHITEOUT; everything else runs as usual.
Usage: ``python no_device_whiteouts.py OVLFUSE-ARGS...`` (x86_64 and aarch64).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import runpy
import stat
import struct
import sys

# From <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>.
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JSET_K, BPF_AND_K, BPF_RET_K = 0x20, 0x15, 0x45, 0x54, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RENAME_WHITEOUT = 4

# arch, and syscall numbers: (mknod or None, mknodat, renameat2, renameat or None)
ARCHES = {
    "x86_64": (0xC000003E, 133, 259, 316),
    "aarch64": (0xC00000B7, None, 33, 276),
}


def _arg(i: int) -> int:
    """Offset of the low 32 bits of syscall argument ``i`` in struct seccomp_data (little-endian)."""
    return 16 + 8 * i


def program() -> list[tuple[int, int, int, int]]:
    arch, mknod, mknodat, renameat2 = ARCHES[platform.machine()]
    deny = (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)
    allow = (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)

    def device_check(mode_arg: int) -> list[tuple[int, int, int, int]]:
        """mode & S_IFMT == S_IFCHR and dev == 0: EPERM."""
        return [(BPF_LD_W_ABS, 0, 0, _arg(mode_arg)), (BPF_AND_K, 0, 0, 0o170000),
                (BPF_JEQ_K, 0, 3, stat.S_IFCHR), (BPF_LD_W_ABS, 0, 0, _arg(mode_arg + 1)),
                (BPF_JEQ_K, 0, 1, 0), deny, allow]

    blocks = [(renameat2, [(BPF_LD_W_ABS, 0, 0, _arg(4)), (BPF_JSET_K, 0, 1, RENAME_WHITEOUT), deny, allow]),
              (mknodat, device_check(2))]
    if mknod is not None:
        blocks.append((mknod, device_check(1)))
    # another architecture's calls pass; then one jump per call to its block, past the others
    insns = [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ_K, 1, 0, arch), allow, (BPF_LD_W_ABS, 0, 0, 0)]
    body: list[tuple[int, int, int, int]] = []
    for i, (nr, block) in enumerate(blocks):
        insns.append((BPF_JEQ_K, len(blocks) - i + len(body), 0, nr))
        body += block
    return insns + [allow] + body


def install() -> None:
    """Load the filter for this process and its children (daemon forks included)."""
    insns = program()
    filt = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
    prog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(insns), ctypes.addressof(filt)))
    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, ulong(SECCOMP_MODE_FILTER), ulong(ctypes.addressof(prog)), ulong(0), ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install()
    sys.argv = ["ovlfuse", *sys.argv[1:]]
    runpy.run_module("ovlfuse", run_name="__main__", alter_sys=True)
