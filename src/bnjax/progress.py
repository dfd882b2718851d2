"""A one-line progress bar with elapsed time and ETA, on stderr."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """``Progress(total, label)``; call ``update(done)``. The ETA counts only the
  work done since the bar started (work restored from disk is not timed)."""

  def __init__(self, total: int, label: str = "", stream=None, width: int = 24):
    self.total, self.label, self.width = max(int(total), 1), label, width
    self.stream = stream or sys.stderr
    self.start = time.perf_counter()
    self.first = (0, self.start)

  def update(self, done: int, note: str = "", restored: bool = False) -> str:
    """Prints the bar at ``done`` of ``total``; ``restored``: that work came
    from disk, so the ETA restarts from here."""
    if restored:
      self.first = (done, time.perf_counter())
    elapsed = time.perf_counter() - self.start
    base, t0 = self.first
    rate_done = done - base
    eta = ((time.perf_counter() - t0) / rate_done * (self.total - done)) if rate_done > 0 else None
    filled = int(self.width * done / self.total)
    line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
            f"elapsed {_clock(elapsed)} ETA {_clock(eta) if eta is not None else '?'}"
            f"{'  ' + note if note else ''}")
    print(line, file=self.stream, flush=True)
    return line
