"""What the benchmark scripts' tests check of their rows."""


def check_times(rows):
  """Every timed call ran (a positive median); the ratios are what the table
  prints, not checked here: speed is never asserted in a test."""
  for r in rows:
    assert r["bnjax_s"] > 0 and r["reference_s"] > 0
