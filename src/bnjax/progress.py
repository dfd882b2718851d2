"""Progress of a long run, with rate and ETA (tqdm).

On a terminal, a tqdm bar on stderr. Elsewhere (CI logs, a file, ``nohup``)
tqdm's bar would be written as carriage-return frames, so the same line is
printed at most once every ``interval`` seconds, for every piece of work
restored from disk (what a resumed run reused), and at the end: a log stays
short and still says how far a run has come.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
  """``Progress(total, label)``; call ``update(done)`` with the work done so
  far. Work restored from disk (``restored=True``) is not timed: the rate and
  ETA count only the work done since."""

  def __init__(self, total: int, label: str = "", stream=None, interval: float = 30.0,
               terminal: bool | None = None):
    self.stream = stream or sys.stderr
    if terminal is None:
      terminal = bool(getattr(self.stream, "isatty", lambda: False)())
    self.terminal, self.interval = terminal, float(interval)
    self.total, self.label = max(int(total), 1), label
    self._start = self._t0 = time.perf_counter()
    self._n0, self._last = 0, -float("inf")
    self._bar = tqdm(total=self.total, desc=label, file=self.stream, dynamic_ncols=True,
                     smoothing=0.0) if terminal else None

  def update(self, done: int, note: str = "", restored: bool = False) -> str:
    """Moves the bar to ``done`` of ``total`` and returns its line."""
    done, now = int(done), time.perf_counter()
    if restored:
      self._t0, self._n0 = now, done
    rate = (done - self._n0) / (now - self._t0) if done > self._n0 and now > self._t0 else None
    line = tqdm.format_meter(done, self.total, now - self._start, prefix=self.label, rate=rate,
                             postfix=note or None, ncols=100)
    finished = done >= self.total
    if self._bar is not None:
      if restored:
        self._bar.reset(total=self.total)
        self._bar.initial = done
      self._bar.n = done
      self._bar.set_postfix_str(note, refresh=True)
      if finished:
        self._bar.close()
    elif restored or now - self._last >= self.interval or finished:
      print(line, file=self.stream, flush=True)
      self._last = now
    return line
