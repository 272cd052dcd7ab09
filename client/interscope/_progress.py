"""Progress on stderr: a redrawn bar with rate and ETA on a terminal, plain lines at every 10%
when piped (logs, CI), so long work is never silent."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from interscope._audit import AuditProgress


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short enough for a progress line."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, whole = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{whole:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressBar:
    """`update(done, total)` reports how far a job is: count, rate, elapsed time and ETA.

    On a terminal it redraws one line (at most ten times a second); on anything else it writes a
    plain line each time another tenth of the work is done, and at the end. The rate counts only
    work done in this run, so a resumed audit's ETA is not flattered by its checkpoint.
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        enabled: bool = True,
        unit: str = "",
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _isatty(self.stream) if terminal is None else terminal
        self.enabled = enabled
        self.unit = unit
        self._started = time.monotonic()
        self._first_done: int | None = None
        self._last_draw = 0.0
        self._last_tenth = -1
        self._drawn = False

    def update(self, done: int, total: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._first_done is None:
            self._first_done = done  # what was done before this run (a checkpoint) is no rate
        finished = total > 0 and done >= total
        if self.terminal:
            if not finished and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 24
            filled = int(width * done / total) if total else width
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self._status(done, total, now, note)} ")
            self._drawn = True
        else:
            tenth = int(10 * done / total) if total else 10
            if tenth <= self._last_tenth and not (finished and self._last_tenth < 10):
                return
            self._last_tenth = 10 if finished else tenth
            self.stream.write(f"{self.label}: {self._status(done, total, now, note)}\n")
        self.stream.flush()

    def _status(self, done: int, total: int, now: float, note: str) -> str:
        elapsed = now - self._started
        fresh = done - (self._first_done or 0)
        rate = fresh / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{done}/{total}{unit}"]
        if total:
            parts[0] += f" ({100 * done / total:.0f}%)"
        parts.append(f"{rate:.1f}/s" if rate < 100 else f"{rate:,.0f}/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if 0 < done < total and rate > 0:
            parts.append(f"eta {format_duration((total - done) / rate)}")
        if note:
            parts.append(note)
        return ", ".join(parts)

    def audit_progress(self, progress: AuditProgress) -> None:
        """An `on_progress` callback for audits."""
        note = f"{progress.failed} failed" if progress.failed else ""
        self.update(progress.done, progress.total, note)

    def close(self) -> None:
        if self.enabled and self.terminal and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or wrapped stream
        return False
