"""The benchmark scripts run end to end at tiny sizes (no timing is asserted)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks"))

import adapt_cost  # noqa: E402
import conv_parts  # noqa: E402
import data_gen  # noqa: E402
import frechet  # noqa: E402
import sliced_wasserstein  # noqa: E402
import streams_many  # noqa: E402
import train_step  # noqa: E402


def check_times(rows):
  """Every timed call ran (a positive median); the ratios are what the table
  prints, not checked here: speed is never asserted in a test."""
  for r in rows:
    assert r["bnjax_s"] > 0 and r["reference_s"] > 0


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
def test_gpu_summary_at_toy_sizes(tmp_path):
  """benchmarks/gpu.py (what gpu.sh runs on the accelerator) at toy sizes:
  the summary holds the environment, a row per case and a status per
  benchmark, and an unknown name is refused before anything runs."""
  import json

  import gpu

  summary = gpu.main(["--out", str(tmp_path), "--quick", "--only", "train_step,adapt_cost"])
  assert summary["status"] == {"train_step": "ok", "adapt_cost": "ok"}
  saved = json.loads((tmp_path / "gpu_summary.json").read_text())
  assert saved["environment"]["missing"] == [] and saved["environment"]["jax"]
  assert {r["benchmark"] for r in saved["rows"]} == {"train_step", "adapt"}
  step = next(r for r in saved["rows"] if r["benchmark"] == "train_step")
  assert abs(step["images_per_s"] - 2 / step["bnjax_s"]) < 1e-6 * step["images_per_s"]
  md = (tmp_path / "gpu_summary.md").read_text()
  assert md.startswith("# bnjax on the accelerator") and "| train_step |" in md
  with pytest.raises(SystemExit):
    gpu.main(["--out", str(tmp_path / "x"), "--only", "train_steps"])
  assert not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_methods_benchmark_both_sides_compute_the_same():
  """benchmarks/methods_many.py at toy sizes: the one-call methods and the
  per-pair loop return the same numbers (unroll: bit for bit)."""
  import methods_many

  rows = methods_many.run(pairs=2, width=2, size=16, n=8, steps=2, reps=1, strategy="unroll")
  check_times(rows)
  assert [r["case"].split()[0] for r in rows] == ["tent", "histogram_match", "scores"]
  assert all(r["value"] == 0.0 for r in rows)


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


@pytest.mark.e2e
def test_loop_vs_scan_benchmark_computes_the_same_steps():
  """benchmarks/loop_vs_scan.py at 3 steps: the loop and the scan of one step
  give the same weights (convolution) and step losses (flow), to float32
  rounding."""
  import loop_vs_scan

  rows = loop_vs_scan.run(steps=3)
  check_times(rows)
  assert [r["benchmark"] for r in rows] == ["loop_vs_scan"] * 2
  for r in rows:
    assert r["value"] <= 1e-4, r["case"]
