"""experiments/sweep.py killed and resumed, in one process and across two:
the resumed run equals an uninterrupted one exactly in one process, and the
2-process run (one CPU device each) gives the 1-process run's numbers up to
float32 rounding (one file per script: the test runner spreads files over its
workers; map_pairs' split over several devices of several processes is
tests/test_distributed.py's)."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

import processes
import tolerance
from bnjax import checkpoint, data, inference, models, workdir
from experiments import sweep

PY = sys.executable

# Its slow or e2e tests run for minutes: scheduled first (tests/conftest.py).
RUNS_FOR_MINUTES = True


SWEEP = ["experiments/sweep.py", "--config=experiments/configs/sweep.py:custom",
         "--config.custom.mu1=30,60,90,120", "--config.custom.delta=80",
         "--config.data.size=16", "--config.data.n_train=24", "--config.data.n_eval=8",
         "--config.data.n_adapt=8", "--config.model.features=4", "--config.model.depth=2",
         "--config.train.epochs=2", "--config.train.batch_size=8", "--config.chunk=2",
         "--config.pair_chunk=4"]


def killed_then_resumed(command, out):
  """``command`` (writing into ``out``) killed with its process group once
  its first stack of models is saved, then run again to the end."""
  p = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True)
  first = os.path.join(out, "checkpoints", "chunk_0000", checkpoint.MANIFEST)
  deadline = time.time() + 400
  while not os.path.exists(first) and p.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert p.poll() is None, "the run ended before it could be killed"
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  assert os.path.exists(first), "the first stack was never saved"
  assert not os.path.exists(os.path.join(out, "results", "custom.json"))
  r = processes.run(command)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  return r


@pytest.mark.slow
def test_sweep_killed_and_resumed_in_one_process_and_across_two(root, tmp_path):
  """One process: killed once its first stack is saved and run again, it
  restores that stack, trains the rest and gives an uninterrupted run's
  scores exactly (the same programs on the same machine; the restored stack is
  the saved one bit for bit); a third run restores everything; another config
  into the same workdir is refused. Two processes: the resumed run splits the
  grid's pairs between them, writes every file once, and gives the 1-process
  run's scores and models up to float32 rounding."""
  os.chdir(root)
  resumed, one, two = (str(tmp_path / n) for n in ("resumed", "one", "two"))
  # (The interrupted run first: cold, it is still compiling when its first stack is saved.)
  r = killed_then_resumed([PY, *SWEEP, f"--workdir={resumed}"], resumed)
  assert "models 1-2 of 4 restored" in r.stderr, r.stderr[-3000:]
  r = processes.run([PY, *SWEEP, f"--workdir={one}"])
  assert r.returncode == 0, r.stderr[-3000:]
  read = lambda d: json.load(open(os.path.join(d, "results", "custom.json")))
  for key in ("source_iou", "iou_no_adapt", "iou_adapted"):
    np.testing.assert_array_equal(read(resumed)[key], read(one)[key], err_msg=key)
  for name in ("custom_heatmaps.png", "custom_surface.png", "histories.png", "summary.md",
               "custom_heatmaps_adapted.csv"):
    assert os.path.exists(os.path.join(resumed, name)), name
  # Everything done is reused; another config into the same workdir is refused.
  again = processes.run([PY, *SWEEP, f"--workdir={resumed}"])
  assert "scores restored" in again.stdout and again.stderr.count("restored") >= 2, again.stderr
  other = processes.run([PY, *SWEEP, f"--workdir={resumed}", "--config.seed=1"])
  assert other.returncode == 2 and "seed: 0 -> 1" in other.stderr, other.stderr[-3000:]

  launcher = [PY, "-m", "bnjax.launch", "--processes=2", "--devices_per_process=1"]
  r = killed_then_resumed([*launcher, *SWEEP, f"--workdir={two}"], two)
  assert "models 1-2 of 4 restored" in r.stdout, r.stdout[-3000:]
  # The 4 x 4 grid's pairs adapted and scored once: half in each process.
  assert "[p0] [custom] process 0 of 2: 8 of 16 pairs (pairs 0..7) on 1 device(s)" in r.stdout
  assert "[p1] [custom] process 1 of 2: 8 of 16 pairs (pairs 8..15) on 1 device(s)" in r.stdout
  # Every file once, as one process writes them: the same files as the
  # 1-process run outside orbax's own layout, and no per-process copies in it.
  outside = lambda d: [f for f in processes.files(d) if "/variables/" not in f]
  assert outside(two) == outside(one) and "results/custom.json" in outside(two)
  assert not [f for f in processes.files(two) if "process_1" in f]
  # The target evaluation sets of the grid, regenerated from the run's config.
  config = ml_collections.ConfigDict(workdir.Workdir.read(one).config)
  (group,) = sweep.groups_of(config)
  # each target's evaluation split, drawn as the sweep draws it (data.split_dataset)
  evals = [data.split_dataset(config.seed, d, "eval", config.data.n_eval, config.data.size)
           for d in group.targets]
  eval_masks = [m for _, m in evals]
  # Each score within what the flip budget of one target set can move it.
  for key in ("source_iou", "iou_no_adapt", "iou_adapted"):
    got, want = np.asarray(read(two)[key]), np.asarray(read(one)[key])
    for m, masks in enumerate(np.asarray(eval_masks)):
      tol = tolerance.iou_tolerance(masks, tolerance.flip_budget(masks))
      np.testing.assert_allclose(got[:, m], want[:, m], rtol=0, atol=tol, err_msg=key)
  # The checkpoints of both runs (the restored stack and the one trained
  # after the restart) compared by what they predict.
  x = np.asarray(evals[0][0])
  model = models.UNet(**config.model)
  for chunk in ("chunk_0000", "chunk_0001"):
    a, b = (inference.stacked_predict(model, checkpoint.restore(f"{d}/checkpoints/{chunk}"),
                                      np.broadcast_to(x, (2, *x.shape)), strategy="unroll")
            for d in (two, one))
    assert tolerance.pixel_disagreement(a, b) <= 2 * tolerance.flip_budget(x[..., 0]), chunk
