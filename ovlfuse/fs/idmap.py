"""Owner mapping of the merged view: the ``uidmapping``/``gidmapping`` and ``squash_to_*`` options.

These are fuse-overlayfs's options, and containers/storage passes them to its
mount program for a container with a user namespace: a layer keeps the ids
the image was built with, and the mount shows them shifted to the host ids
the container's namespace maps, so nothing has to be chowned.

A mapping entry ``C:H:N`` shows stored ids ``C .. C+N-1`` as ``H .. H+N-1``
(containers/storage writes a container's map as container id, host id,
size).  A stored id no entry covers is shown as the kernel's overflow id
(65534).  Ids the kernel sends (the caller of a create, a chown) go the
other way before they are stored, the overflow id again for one no entry
covers.  ``squash_to_uid``/``squash_to_gid`` (and ``squash_to_root``, 0:0)
only change what is shown: every object shows that owner, and a chown still
stores the caller's choice.  Measured against fuse-overlayfs 1.10.
"""

from __future__ import annotations

from dataclasses import dataclass

from ovlfuse.errors import OvlError


# The largest uid or gid: (uid_t)-1 means "no id" to the kernel, and FUSE carries ids in 32 bits.
MAX_ID = 0xFFFFFFFE


def parse_id(text: str) -> int | None:
    """A uid or gid written in ASCII decimal digits, 0 to MAX_ID; None for anything else."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _overflow(kind: str) -> int:
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


@dataclass(frozen=True)
class IdRange:
    stored: int  # first id as a layer stores it
    shown: int  # the id the merged view shows for it
    count: int


def parse_mapping(option: str, value: str) -> tuple[IdRange, ...]:
    """``C:H:N[:C:H:N...]`` as fuse-overlayfs reads it; overlapping ranges are refused.

    Empty fields are skipped, as fuse-overlayfs's tokenizer does: containers/storage
    (podman 4) writes ``uidmapping=:0:100000:65536``.
    """
    fields = [f for f in value.split(":") if f]
    if not fields or len(fields) % 3 or not all(f.isascii() and f.isdigit() for f in fields):
        raise OvlError(f"{option}={value!r} is not a mapping: give STORED:SHOWN:COUNT triples "
                       f"joined by ':', e.g. {option}=0:100000:65536")
    numbers = [int(f) for f in fields]
    ranges = tuple(IdRange(*numbers[i:i + 3]) for i in range(0, len(numbers), 3))
    for r in ranges:
        if r.count == 0:
            raise OvlError(f"{option}={value!r} has an empty range (count 0)")
        if max(r.stored, r.shown) + r.count - 1 > MAX_ID:
            raise OvlError(f"{option}={value!r} reaches past the largest id, {MAX_ID}")
    for side in ("stored", "shown"):
        spans = sorted((getattr(r, side), getattr(r, side) + r.count) for r in ranges)
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise OvlError(f"{option}={value!r} has overlapping {side} ranges")
    return ranges


def _through(ranges: tuple[IdRange, ...], ident: int, forward: bool, overflow: int) -> int:
    if not ranges:
        return ident
    for r in ranges:
        start, target = (r.stored, r.shown) if forward else (r.shown, r.stored)
        if start <= ident < start + r.count:
            return target + ident - start
    return overflow


@dataclass(frozen=True)
class IdMap:
    uids: tuple[IdRange, ...] = ()
    gids: tuple[IdRange, ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None
    overflow_uid: int = 65534
    overflow_gid: int = 65534

    @classmethod
    def create(cls, uids: tuple[IdRange, ...] = (), gids: tuple[IdRange, ...] = (),
               squash_uid: int | None = None, squash_gid: int | None = None) -> "IdMap":
        """A map with this system's overflow ids (what an id no range covers becomes)."""
        return cls(uids, gids, squash_uid, squash_gid, _overflow("uid"), _overflow("gid"))

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner the merged view shows for a stored owner."""
        return (self.squash_uid if self.squash_uid is not None else _through(self.uids, uid, True, self.overflow_uid),
                self.squash_gid if self.squash_gid is not None else _through(self.gids, gid, True, self.overflow_gid))

    def stored(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner to store for one the kernel sends (-1, "unchanged", stays -1)."""
        return (uid if uid == -1 else _through(self.uids, uid, False, self.overflow_uid),
                gid if gid == -1 else _through(self.gids, gid, False, self.overflow_gid))
