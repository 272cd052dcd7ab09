"""A plain carriage-return progress bar on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from interscope._audit import AuditProgress


class ProgressBar:
    """`update(done, total)` redraws one line; silent when the stream is not a TTY (piped)."""

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool | None = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # Redraw at most ~10 times a second, and always on completion.
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {note}".rstrip() + " ")
        self.stream.flush()
        self._drawn = True

    def audit_progress(self, progress: AuditProgress) -> None:
        """An `on_progress` callback for audits."""
        note = f"({progress.failed} failed)" if progress.failed else ""
        self.update(progress.done, progress.total, note)

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
