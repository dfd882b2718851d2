"""experiments/benchmark.py across processes: 2 processes (one CPU device
each) give what 1 process gives (map_pairs' split over several devices of
several processes is tests/test_distributed.py's: here the script's rows,
files and translators)."""

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

import processes
import tolerance
from bnjax import data, shifts, workdir
from experiments import benchmark

PY = sys.executable

# Its slow or e2e tests run for minutes: scheduled first (tests/conftest.py).
RUNS_FOR_MINUTES = True


BENCH = ["experiments/benchmark.py", "--config=experiments/configs/benchmark.py",
         "--config.seeds=2", "--config.variants=reference", "--config.shifts=brightness,zoom",
         "--config.severities=5", "--config.data.size=16", "--config.data.n_train=24",
         "--config.data.n_eval=8", "--config.data.n_adapt=8", "--config.model.features=4",
         "--config.model.depth=2", "--config.train.epochs=1", "--config.train.batch_size=8",
         "--config.tent.steps=2",
         # one translation method (its translators read back by every process),
         # at toy size: the CPU preset's 300 steps per translator cost minutes
         "--config.methods=none,adabn,tent,histogram_match,cyclegan_transpose",
         "--config.cyclegan.shifts=brightness", "--config.cyclegan.severities=5",
         "--config.cyclegan.train.steps=4", "--config.cyclegan.train.features=4",
         "--config.cyclegan.train.n_blocks=1", "--config.cyclegan.train.disc_features=4",
         "--config.cyclegan.train.disc_layers=1", "--config.cyclegan.train.steps_per_call=2",
         "--config.cyclegan.train.pool_size=3"]


@pytest.mark.slow
def test_benchmark_across_two_processes_equals_one(root, tmp_path):
  os.chdir(root)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  r = processes.run([PY, *BENCH, f"--workdir={one}"])
  assert r.returncode == 0, r.stderr[-3000:]
  r = processes.run([PY, "-m", "bnjax.launch", "--processes=2", "--devices_per_process=1", *BENCH,
            f"--workdir={two}"])
  assert r.returncode == 0, r.stdout[-3000:]
  # The pairs of every cell split between the processes (2 seeds: one pair each).
  for p in (0, 1):
    assert f"[p{p}] [reference brightness] process {p} of 2: 1 of 2 pairs (pairs {p}..{p}) " \
        "on 1 device(s)" in r.stdout, r.stdout[-3000:]
  rows = lambda d: json.load(open(os.path.join(d, "benchmark.json")))["rows"]
  a, b = rows(two), rows(one)
  assert [r_[k] for r_ in a for k in ("variant", "shift", "severity", "method", "seed")] == [
      r_[k] for r_ in b for k in ("variant", "shift", "severity", "method", "seed")]
  # Each row within what the flip budget can move its IoU, on its own
  # evaluation masks (regenerated from the run's config: geometry shifts
  # move the masks).
  config = ml_collections.ConfigDict(workdir.Workdir.read(one).config)
  plan = benchmark.plan_of(config)
  # Seed i's evaluation set (data.split_dataset with seed + i) and its shifted
  # copies (shifts.apply keyed by data.named_key), as the benchmark draws them.
  src = [data.split_dataset(config.seed + i, plan.source, "eval", config.data.n_eval,
                            config.data.size) for i in range(config.seeds)]
  masks = {("source", 0, i): np.asarray(m) for i, (_, m) in enumerate(src)}
  for shift in plan.shifts:
    for sev in plan.severities:
      for i, (x, m) in enumerate(src):
        key = data.named_key(config.seed + i, shift, sev, "eval")
        masks[(shift, sev, i)] = np.asarray(shifts.apply(key, x, m, shift, sev)[1])
  for r_, q in zip(a, b):
    m = masks[(r_["shift"], r_["severity"], r_["seed"])]
    assert abs(r_["iou"] - q["iou"]) <= tolerance.iou_tolerance(m, tolerance.flip_budget(m)), r_
  outside = lambda d: [f for f in processes.files(d) if "/variables/" not in f]
  assert outside(two) == outside(one)
