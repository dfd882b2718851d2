import json
import os
import subprocess
import sys

TINY = ["--size=16", "--n_train=48", "--n_eval=8", "--n_adapt=8", "--features=2",
        "--depth=2", "--epochs=1", "--batch_size=8",
        "--target=150,50,230,50", "--target=30,50,110,50"]


def run(root, out, *extra):
  return subprocess.run([sys.executable, os.path.join(root, "experiments", "adapt_pair.py"),
                         f"--out={out}", *TINY, *extra], capture_output=True, text=True,
                        cwd=root, timeout=600, env={**os.environ, "PYTHONPATH": root})


def test_adapt_pair_end_to_end_and_resume(root, tmp_path):
  proc = run(root, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert len(results["targets"]) == 2
  for entry in results["targets"]:
    for k in ("iou_no_adapt", "iou_adapted", "iou_oracle", "mask_fraction"):
      assert 0.0 <= entry[k] <= 1.0
  for name in ("results.md", "adapt_pair.png", "history.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert (tmp_path / "checkpoints" / "source" / "bnjax.json").exists()
  # A rerun with the same flags restores the trained models instead of training.
  again = run(root, tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("restored from") == 3
  rerun = json.loads((tmp_path / "results.json").read_text())
  for a, b in zip(rerun["targets"], results["targets"]):
    for k in ("iou_no_adapt", "iou_adapted", "iou_oracle"):
      assert a[k] == b[k]


def test_adapt_pair_bad_domain(root, tmp_path):
  proc = run(root, tmp_path, "--source=90,50,300,50")
  assert proc.returncode != 0
  assert "Domain.mu2 must be in [0, 255]" in proc.stderr
