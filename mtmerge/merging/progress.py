"""The merge's progress line (stderr, updated in place) and its peak-memory reading."""

from __future__ import annotations

import resource
import sys
import time
from typing import TextIO

from mtmerge.merging.writer import format_bytes

_MIN_INTERVAL = 0.2  # seconds between two redraws of the line


def peak_rss() -> int:
    """Peak resident memory of this process so far.

    ``VmHWM`` from ``/proc/self/status`` on Linux, not ``ru_maxrss``: the latter keeps the RSS
    of a process image replaced by ``exec`` (e.g. a big parent's forked copy). Elsewhere
    ``ru_maxrss``.

    Returns
    -------
    int
        Bytes.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Progress:
    """One stderr line updated in place: pass, tensors, bytes, rate, ETA.

    Parameters
    ----------
    total_bytes : int
        Bytes the whole run reads (every pass); the percentage and ETA refer to it.
    total_tensors : int
        Tensors per pass.
    enabled : bool
        Draw the line (False: every method is a no-op).
    stream : TextIO, optional
        Where to draw (default ``sys.stderr``).
    """

    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total_bytes = max(1, total_bytes)
        self.total_tensors = total_tensors
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done_bytes = 0
        self.done_tensors = 0
        self.label = ""
        self.start = time.perf_counter()
        self._last = 0.0
        self._width = 0

    def start_pass(self, label: str) -> None:
        """Begin a pass called ``label`` (its tensor count restarts at 0)."""
        self.label = label
        self.done_tensors = 0
        self._render(force=True)

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more bytes read."""
        self.done_bytes += nbytes
        self._render()

    def tensor_done(self) -> None:
        """Count one more tensor done in this pass."""
        self.done_tensors += 1
        self._render()

    def _render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < _MIN_INTERVAL and self.done_tensors < self.total_tensors:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done_bytes / elapsed
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("inf")
        eta = "--:--" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(max(0.0, left)))
        pct = 100.0 * self.done_bytes / self.total_bytes
        line = (f"mtmerge {self.label}: {pct:5.1f}% | {self.done_tensors}/{self.total_tensors} tensors | "
                f"{format_bytes(self.done_bytes)}/{format_bytes(self.total_bytes)} | {format_bytes(rate)}/s | "
                f"ETA {eta}")
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (nothing if nothing was drawn)."""
        if self.enabled and self._width:
            self._render(force=True)
            self.stream.write("\n")
            self.stream.flush()
