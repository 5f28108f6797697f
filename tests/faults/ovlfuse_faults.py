"""A planted fault, so a test can prove ``verify`` finds a wrong view: ovlfuse serves its layers without the bottom one.

Imported into a process (by ``sitecustomize`` from PYTHONPATH), it wraps
``ovlfuse.fuse.daemon.serve`` to drop the bottom lower layer, and wraps the
spawner's ``command`` so every ovlfuse process this one starts (verify's
daemon, verify again in a user namespace) imports this module first too.
Production code knows nothing of it.
"""

from __future__ import annotations

import dataclasses

from ovlfuse.fuse import daemon
from ovlfuse.sys import daemons

_serve = daemon.serve
_command = daemons.command
_MAIN = "from ovlfuse.cli import main"


def serve(plan, mountpoint, opts):
    if len(plan.lowers) > 1:
        plan = dataclasses.replace(plan, lowers=plan.lowers[:-1])
    return _serve(plan, mountpoint, opts)


def command() -> list[str]:
    argv = _command()
    assert _MAIN in argv[-1], "the spawner's start-up line changed: update the fault"
    argv[-1] = argv[-1].replace(_MAIN, "import ovlfuse_faults; " + _MAIN)
    return argv


daemon.serve = serve
daemons.command = command
