"""What a long-running tool is doing, on one line of stderr, when stderr is a terminal (quiet otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One status line, rewritten in place at most ten times a second; nothing when ``stream`` is not a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._shown = 0.0
        self._width = 0

    def show(self, text: str, force: bool = False) -> None:
        """Replace the status line with ``text`` (``force``: even if the last one went out just now)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._shown < 0.1:
            return
        self._shown = now
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def step(self, text: str) -> None:
        """A new stage of the work (always shown)."""
        self.show(text + "...", force=True)

    def done(self) -> None:
        """Clear the status line before the result is printed."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
