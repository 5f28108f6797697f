"""Progress bars for import and export: bytes and layers on a terminal, nothing otherwise."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


class Progress:
    """Two bars on stderr (layers, bytes) when it is a terminal; every call is free when it is not."""

    def __init__(self, action: str, layers: int | None, total_bytes: int | None, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        try:  # a terminal that reports no size (a bare pty) gets 80 columns rather than empty bars
            sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
        except OSError:
            sized = False
        width = {"dynamic_ncols": True} if sized else {"ncols": 80, "nrows": 24}
        self._layers = tqdm(total=layers, desc=f"{action} layers", unit=" layer", position=0, leave=True,
                            disable=not self.enabled, file=sys.stderr, **width)
        self._bytes = tqdm(total=total_bytes, desc=f"{action} bytes ", unit="B", unit_scale=True,
                           unit_divisor=1024, position=1, leave=True, disable=not self.enabled, file=sys.stderr,
                           miniters=1, mininterval=0.2, **width)

    def advance(self, n: int) -> None:
        """``n`` more bytes read or written."""
        if self.enabled:
            self._bytes.update(n)

    def layer_done(self, skipped_bytes: int = 0) -> None:
        """One more layer; ``skipped_bytes`` of input that a layer already in the store spared reading."""
        if self.enabled:
            if skipped_bytes:
                self._bytes.update(skipped_bytes)
            self._layers.update(1)

    def close(self) -> None:
        self._bytes.close()
        self._layers.close()
