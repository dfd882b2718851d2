r"""What compilation costs ``fit`` and a rerun of a script, measured in one run.

    python benchmarks/compile_reuse.py     # width 8, 32x32, 512 images, 2 epochs

1. ``bnjax.train.fit`` twice in one process with the same model, shapes and
   optimisation settings (another seed): the first call compiles its
   initialiser, step and evaluation, the second reuses them.
2. The same ``fit`` in two fresh processes sharing a persistent compilation
   cache (``bnjax.compiler.enable_persistent_cache``) in a new temporary
   folder: the first process compiles and writes the cache, the second loads it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import sys, time
t0 = time.perf_counter()
import jax
from bnjax import compiler, data, models, train
compiler.enable_persistent_cache(sys.argv[1])
width, size, n, epochs = map(int, sys.argv[2:6])
x, y = data.make_dataset(jax.random.key(0), data.Domain(90, 50, 170, 50), n, size=size)
t1 = time.perf_counter()
train.fit(models.UNet(features=width), x, y, train.TrainConfig(
    epochs=epochs, batch_size=32, learning_rate=3e-3, patience=None, verbose=False))
print(f"{time.perf_counter() - t1:.3f} {t1 - t0:.3f}")
"""


def in_process(width: int, size: int, n: int, epochs: int) -> tuple[float, float]:
  import jax
  from bnjax import data, models, train
  x, y = data.make_dataset(jax.random.key(0), data.Domain(90, 50, 170, 50), n, size=size)
  times = []
  for seed in (0, 1):
    cfg = train.TrainConfig(epochs=epochs, batch_size=32, learning_rate=3e-3, patience=None,
                            verbose=False, seed=seed)
    t0 = time.perf_counter()
    train.fit(models.UNet(features=width), x, y, cfg)
    times.append(time.perf_counter() - t0)
  return times[0], times[1]


def across_processes(width: int, size: int, n: int, epochs: int) -> tuple[float, float]:
  env = {**os.environ, "PYTHONPATH": ROOT}
  with tempfile.TemporaryDirectory() as cache:
    out = []
    for _ in range(2):
      proc = subprocess.run([sys.executable, "-c", _CHILD, cache, str(width), str(size), str(n),
                             str(epochs)], capture_output=True, text=True, env=env, check=True)
      out.append(float(proc.stdout.split()[0]))
  return out[0], out[1]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--n", type=int, default=512)
  p.add_argument("--epochs", type=int, default=2)
  a = p.parse_args()
  shape = (a.width, a.size, a.n, a.epochs)
  first, second = in_process(*shape)
  print(f"fit in one process: first call {first:.2f} s, second call {second:.2f} s "
        f"(compilation saved: {first - second:.2f} s)")
  cold, warm = across_processes(*shape)
  print(f"fit in a fresh process: empty persistent cache {cold:.2f} s, warm cache {warm:.2f} s "
        f"(saved: {cold - warm:.2f} s)")


if __name__ == "__main__":
  main()
