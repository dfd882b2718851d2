r"""The same small sweep in 1 process x 4 CPU devices and in 2 processes x 2
devices (``python -m bnjax.launch``), alternating, each into a fresh workdir:
the overhead of running across processes (no speed-up is expected on 2 cores).

    python benchmarks/multiprocess_sweep.py --rounds=2

Prints each run's wall time (start-up and compiles included) and the ratio
1-process time / 2-process time (> 1: the 2-process run was faster).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = ["experiments/sweep.py", "--config=experiments/configs/sweep.py:custom",
         "--config.custom.mu1=30,60,90,120", "--config.custom.delta=80",
         "--config.data.size=16", "--config.data.n_train=24", "--config.data.n_eval=8",
         "--config.data.n_adapt=8", "--config.model.features=4", "--config.model.depth=2",
         "--config.train.epochs=2", "--config.train.batch_size=8", "--config.chunk=2"]


def _time(args, env) -> float:
  start = time.perf_counter()
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{args[:4]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=2)
  rounds = parser.parse_args().rounds
  # No persistent compilation cache: every run compiles, as a first run does.
  env = dict(os.environ, BNJAX_COMPILATION_CACHE="off")
  one_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  launcher = [sys.executable, "-m", "bnjax.launch", "--processes=2", "--devices_per_process=2"]
  times = {"1 process x 4 devices": [], "2 processes x 2 devices": []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      times["1 process x 4 devices"].append(
          _time([sys.executable, *SWEEP, f"--workdir={tmp}/one{r}"], one_env))
      times["2 processes x 2 devices"].append(
          _time([*launcher, *SWEEP, f"--workdir={tmp}/two{r}"], env))
  for name, ts in times.items():
    print(f"{name:26s} " + "  ".join(f"{t:6.1f} s" for t in ts))
  one, two = (min(ts) for ts in times.values())
  print(f"ratio (1-process / 2-process, best of {rounds}): {one / two:.2f}")


if __name__ == "__main__":
  main()
