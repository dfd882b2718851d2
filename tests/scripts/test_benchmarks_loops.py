"""benchmarks/gpu.py and benchmarks/loop_vs_scan.py end to end at toy sizes
(no timing is asserted)."""

import pytest
from timed import check_times


@pytest.mark.e2e
def test_gpu_summary_at_toy_sizes(tmp_path):
  """benchmarks/gpu.py (what gpu.sh runs on the accelerator) at toy sizes:
  the summary holds the environment, a row per case and a status per
  benchmark, and an unknown name is refused before anything runs."""
  import json

  import gpu

  # data_gen, not adapt_cost, beside train_step: the summary's machinery is
  # the same for every benchmark, and adapt_cost's many per-layer programs run
  # in test_benchmarks.py already (its quick size here compiled them again).
  summary = gpu.main(["--out", str(tmp_path), "--quick", "--only", "train_step,data_gen"])
  assert summary["status"] == {"train_step": "ok", "data_gen": "ok"}
  saved = json.loads((tmp_path / "gpu_summary.json").read_text())
  assert saved["environment"]["missing"] == [] and saved["environment"]["jax"]
  assert {r["benchmark"] for r in saved["rows"]} == {"train_step", "data_gen"}
  step = next(r for r in saved["rows"] if r["benchmark"] == "train_step")
  assert abs(step["images_per_s"] - 2 / step["bnjax_s"]) < 1e-6 * step["images_per_s"]
  md = (tmp_path / "gpu_summary.md").read_text()
  assert md.startswith("# bnjax on the accelerator") and "| train_step |" in md
  with pytest.raises(SystemExit):
    gpu.main(["--out", str(tmp_path / "x"), "--only", "train_steps"])
  assert not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_loop_vs_scan_benchmark_computes_the_same_steps():
  """benchmarks/loop_vs_scan.py at 3 steps: the loop, the scan and
  bnjax.compiler.driven of one step give the same weights (convolution) and
  step losses (flow), to float32 rounding."""
  import loop_vs_scan

  rows = loop_vs_scan.run(steps=3)
  check_times(rows)
  assert [r["benchmark"] for r in rows] == ["loop_vs_scan"] * 3
  assert rows[2]["reference"].startswith("compiler.driven")
  for r in rows:
    assert r["value"] <= 1e-4, r["case"]


@pytest.mark.e2e
def test_tent_online_benchmark_runs_both_sides_and_both_forms():
  """benchmarks/tent_online.py at a toy shape: a row per method against
  PyTorch (where installed) and against bnjax's other loop form, set-wise
  TENT; the two sides compute predictions of the same shape."""
  import tent_online

  rows = tent_online.run(shapes="4x32x1", methods_="tent,sar", steps=2, reps=1)
  check_times(rows)
  cases = {(r["benchmark"], r["reference"]) for r in rows}
  assert ("online tent", "bnjax lax.scan") in cases
  try:
    import torch  # noqa: F401
  except ImportError:
    return
  assert {("online tent", "PyTorch 2.13 CPU"), ("online sar", "PyTorch 2.13 CPU"),
          ("set-wise tent", "PyTorch 2.13 CPU")} <= cases
  ours = tent_online.bnjax_stream(4, 32, 1, 2, "tent")()
  theirs = tent_online.torch_stream(4, 32, 1, 2, "tent")()
  assert ours.shape == tuple(theirs.shape) == (2, 1, 32, 32)
