"""The benchmarks of splitting work (pairs over processes and calls, K
translators in one program) end to end at toy sizes (no timing is asserted)."""

import pytest
from timed import check_times


@pytest.mark.slow
def test_pairs_split_benchmark_counts_each_processes_share():
  """benchmarks/pairs_split.py at toy sizes: 1 x 1, 1 x 2 and 2 x 1 adapt the
  same 3 pairs (the first statistics' checksum agrees to float32 rounding),
  and 2 processes split them 2 + 1, as counted by the pair function."""
  import pairs_split

  # chunk = images: exact statistics in one pass (one program per process, where
  # chunks would compile a pass per BatchNorm layer; what is tested is the split).
  results = pairs_split.run(pairs=3, width=2, size=16, images=8, chunk=8, rounds=1)
  (one,), (two_devices,), (two_processes,) = results.values()
  assert one["pairs_per_process"] == two_devices["pairs_per_process"] == [3]
  assert two_processes["pairs_per_process"] == [2, 1]
  for r in (one, two_devices, two_processes):
    assert r["first_s"] > 0 and r["second_s"] > 0
    # A sum of statistics of order 1: another program shape may round the
    # float32 moments differently by a few ulps.
    assert abs(r["checksum"] - one["checksum"]) <= 1e-5 * max(1.0, abs(one["checksum"]))


@pytest.mark.e2e
def test_pair_chunk_benchmark_runs():
  import pair_chunk

  rows = pair_chunk.run(pairs=(1, 2), width=2, size=16, images=8, steps=2)
  assert [r["pairs"] for r in rows] == [1, 2]
  assert all(r["first_s"] > 0 and r["second_s"] > 0 for r in rows)


@pytest.mark.e2e
def test_cyclegan_benchmark_both_sides_train_the_same_translators():
  """benchmarks/cyclegan_many.py at toy sizes: K translators in one program
  and one at a time end with the same cycle loss (unrolled: the same
  arithmetic), and the AdaBN comparison row is there."""
  import cyclegan_many

  rows = cyclegan_many.run(k=2, steps=2, size=16, features=2, n_blocks=1, disc_features=2,
                           disc_layers=1, batch=2, n=8, unet_features=2, reps=1,
                           strategy="unroll")
  check_times(rows)
  assert [r["benchmark"] for r in rows] == ["cyclegan_many", "cyclegan_cost"]
  assert rows[0]["value"] == pytest.approx(rows[0]["reference_value"], rel=1e-6)
  assert rows[0]["translator_images_per_s"] > 0
