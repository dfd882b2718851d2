"""bnjax.progress: quiet away from a terminal, a line at the end, the rate
counted from restored work on."""

import io

from bnjax.progress import Progress


class _Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_quiet_off_a_terminal_with_a_line_at_the_end(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr("bnjax.progress.time.perf_counter", clock)
  out = io.StringIO()
  bar = Progress(4, "pairs", stream=out, interval=30.0)
  assert not bar.terminal  # a StringIO is not a terminal
  clock.t += 1
  bar.update(1)            # the first line is printed
  clock.t += 1
  bar.update(2)            # within 30 s of the last: quiet
  clock.t += 40
  bar.update(3, "note")    # 30 s later: a line
  clock.t += 1
  bar.update(4)            # the end: a line
  lines = out.getvalue().splitlines()
  assert len(lines) == 3, lines
  bar2 = Progress(3, "models", stream=out, interval=30.0)
  bar2.update(1, "1 restored", restored=True)   # restored work: always a line
  bar2.update(2, "2 restored", restored=True)
  assert out.getvalue().splitlines()[3:] and len(out.getvalue().splitlines()) == 5
  assert lines[0].startswith("pairs") and "1/4" in lines[0]
  assert "3/4" in lines[1] and "note" in lines[1]
  assert "4/4" in lines[2]


def test_restored_work_is_not_timed(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr("bnjax.progress.time.perf_counter", clock)
  bar = Progress(10, "models", stream=io.StringIO(), interval=0.0)
  clock.t += 50
  bar.update(6, restored=True)  # six models came from disk after 50 s of loading
  clock.t += 2
  line = bar.update(8)          # two models in 2 s: 1 model/s, 2 s left
  assert "1.00it/s" in line, line
  assert "00:02<00:02" in line or "<00:02" in line, line
