"""experiments/sweep.py across processes: 2 processes x 2 CPU devices,
killed and resumed, give what 1 process x 4 devices gives (one file per
script: the test runner spreads files over its workers)."""

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


SWEEP = ["experiments/sweep.py", "--config=experiments/configs/sweep.py:custom",
         "--config.custom.mu1=30,60,90,120", "--config.custom.delta=80",
         "--config.data.size=16", "--config.data.n_train=24", "--config.data.n_eval=8",
         "--config.data.n_adapt=8", "--config.model.features=4", "--config.model.depth=2",
         "--config.train.epochs=2", "--config.train.batch_size=8", "--config.chunk=2"]


@pytest.mark.slow
def test_sweep_across_two_processes_equals_one_and_resumes_after_a_kill(root, tmp_path):
  """The 2-process run is killed once its first stack is saved and launched
  again: the resumed run splits the grid's pairs between the processes,
  writes every file once, and gives the 1-process run's scores and models
  up to float32 rounding. (That a resumed run equals an uninterrupted one
  exactly is tests/scripts/test_sweep_script.py's, in one process: the
  same checkpoint and restore code.)"""
  os.chdir(root)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  r = processes.run([PY, *SWEEP, f"--workdir={one}"], devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  launcher = [PY, "-m", "bnjax.launch", "--processes=2", "--devices_per_process=2"]
  # Kill both processes (and the launcher) once the first stack is saved, relaunch.
  p = subprocess.Popen([*launcher, *SWEEP, f"--workdir={two}"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True)
  first = os.path.join(two, "checkpoints", "chunk_0000", checkpoint.MANIFEST)
  deadline = time.time() + 400
  while not os.path.exists(first) and p.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert p.poll() is None, "the run ended before it could be killed"
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  assert not os.path.exists(os.path.join(two, "results", "custom.json"))
  r = processes.run([*launcher, *SWEEP, f"--workdir={two}"])
  assert r.returncode == 0, r.stdout[-3000:]
  assert "models 1-2 of 4 restored" in r.stdout, r.stdout[-3000:]
  # The 4 x 4 grid's pairs adapted and scored once: half in each process.
  assert "[p0] [custom] process 0 of 2: 8 of 16 pairs (pairs 0..7) on 2 device(s)" in r.stdout
  assert "[p1] [custom] process 1 of 2: 8 of 16 pairs (pairs 8..15) on 2 device(s)" in r.stdout
  # Every file once, as one process writes them: the same files as the
  # 1-process run outside orbax's own layout, and no per-process copies in it.
  outside = lambda d: [f for f in processes.files(d) if "/variables/" not in f]
  assert outside(two) == outside(one) and "results/custom.json" in outside(two)
  assert not [f for f in processes.files(two) if "process_1" in f]
  read = lambda d: json.load(open(os.path.join(d, "results", "custom.json")))
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
