"""The benchmark scripts that time bnjax against a reference computation, end
to end at tiny sizes: both sides compute the same (no timing is asserted)."""

import os

import pytest

import adapt_cost
import conv_parts
import data_gen
import frechet
import sliced_wasserstein
import streams_many
import train_step
from timed import check_times

# Its slow or e2e tests run for minutes: scheduled first (tests/conftest.py).
RUNS_FOR_MINUTES = True


@pytest.mark.e2e
def test_small_benchmarks_run_and_compute_what_their_references_compute(root):
  """Each benchmark times bnjax against a reference computation; at tiny
  sizes, what the two return agrees (float64 Frechet vs SciPy's sqrtm
  formula to 1e-6 as the benchmark's docstring requires; sliced W2 vs POT
  on the same projections, float32 sums: 1e-4)."""
  (f,) = frechet.run(n=300, d=8, reps=1)
  check_times([f])
  assert f["value"] == pytest.approx(f["reference_value"], rel=1e-6)
  rows = sliced_wasserstein.run(n=400, d=8, p=4, reps=1)
  check_times(rows)
  (sw,) = [r for r in rows if r["benchmark"] == "sliced_w2"]
  assert sw["value"] == pytest.approx(sw["reference_value"], rel=1e-4)
  check_times(data_gen.run(n=20, size=16, ref_n=4, reps=1))
  # This version of adapt.py against itself loaded from its file, side by
  # side: the same statistics, bit for bit.
  rows = adapt_cost.run(width=2, size=32, n=8, reps=1,
                        compare_with=os.path.join(root, "src", "bnjax", "adapt.py"))
  assert [r["case"].endswith("vs other") for r in rows] == [False, True] * 5
  check_times(rows)
  assert all(r["reference_value"] == 0.0 for r in rows if "reference_value" in r)


@pytest.mark.e2e
def test_train_step_benchmark_runs(capsys):
  """Runs end to end without PyTorch (a smoke test: no row without the
  reference, the bnjax time printed)."""
  rows = train_step.run("2x16x4", blocks=1, block_s=0.01, torch_reference=False)
  assert rows == [] and "bnjax" in capsys.readouterr().out


@pytest.mark.e2e
def test_conv_parts_layers_and_run(capsys):
  # The 3x3 convolutions of UNet(features=4, depth=2) on 16x16 inputs, read
  # off the model's own parameters: (side, in, out) in forward order.
  import jax
  from bnjax import models

  variables = models.init(models.UNet(features=4, depth=2), jax.random.key(0), (16, 16, 1))
  kernels = [variables["params"][name][f"conv{i}"]["kernel"].shape
             for name in models.level_names(2) for i in range(2)]
  sides = [16, 16, 8, 8, 4, 4, 8, 8, 16, 16]
  assert conv_parts.layers(4, 16, depth=2) == [(s, k[2], k[3]) for s, k in zip(sides, kernels)]
  assert conv_parts.run("2x16x2", reps=1, block_s=0.001, torch_reference=False) == []
  assert "kernel grad" in capsys.readouterr().out
  for bad in ("16x64", "16x60x16", "0x64x16"):
    with pytest.raises(ValueError, match="shape"):
      conv_parts.run(bad, torch_reference=False)


def test_numpy_perlin_reference_matches_bnjax_statistics():
  """The reference generator is a faithful one: same foreground fraction."""
  import numpy as np

  rng = np.random.default_rng(0)
  fraction = np.mean([np.mean(np.abs(data_gen.numpy_perlin(rng)) > 0.4) for _ in range(400)])
  assert 0.17 < fraction < 0.24


@pytest.mark.e2e
def test_streams_benchmark_runs_both_sides_to_the_same_masks():
  """run_many against a loop of run: the same masks (ema_bn: every step's
  statistics are the same sums either way)."""
  rows = streams_many.run(m=2, batch_sizes="1,2", images=4, features=2, size=16, reps=1)
  check_times(rows)
  assert [r["value"] for r in rows] == [0.0, 0.0]


@pytest.mark.e2e
def test_methods_benchmark_both_sides_compute_the_same():
  """benchmarks/methods_many.py at toy sizes: the one-call methods and the
  per-pair loop return the same numbers (unroll: bit for bit)."""
  import methods_many

  rows = methods_many.run(pairs=2, width=2, size=16, n=8, steps=2, reps=1, strategy="unroll")
  check_times(rows)
  assert [r["case"].split()[0] for r in rows] == ["tent", "histogram_match", "scores"]
  assert all(r["value"] == 0.0 for r in rows)
