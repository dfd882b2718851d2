r"""Many streams at once: ``bnjax.streams.run_many`` over M streams against a
loop of M ``bnjax.streams.run`` calls, side by side.

    python benchmarks/streams_many.py                    # M = 16, batch sizes 1 and 16, width 8, 32x32
    python benchmarks/streams_many.py --methods=ema_bn,tent --batch_sizes=1,4,16

One source model (K = 1), M streams of the same length (the pool of images
cut into batches: T = images / B steps). Both sides are compiled before they
are timed (the loop's ``run`` compiles once for all M calls); calls
alternate. The ratio is the loop's time over ``run_many``'s: > 1 means the
M streams side by side are faster (goal: >= 3x at batch size 1 on a CPU,
where one stream leaves the cores idle).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bnjax import data, models, streams

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:  # run as a script
  from common import print_table, row, side_by_side


def run(m: int = 16, batch_sizes: str = "1,16", methods: str = "ema_bn", images: int = 64,
        features: int = 8, size: int = 32, reps: int = 3) -> list[dict]:
  model = models.UNet(features=features, depth=4)
  v = models.init(model, jax.random.key(0), (size, size, 1))
  stacked = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], v)
  x, y = data.make_dataset(jax.random.key(1), data.Domain(90, 50, 170, 50), images, size)
  out = []
  for method in methods.split(","):
    for b in (int(s) for s in str(batch_sizes).split(",")):
      many = np.stack([np.asarray(streams.make(jax.random.key(i), x, y, setting="iid",
                                               batch_size=b).images) for i in range(m)])
      loop = lambda: [streams.run(model, v, many[i], method).masks for i in range(m)]
      together = lambda: streams.run_many(model, stacked, many, method).masks
      a, c = loop(), together()  # compiled, and the same masks
      mismatch = max(int(np.sum(a[i] != c[0, i])) for i in range(m))
      t_loop, t_many = side_by_side([loop, together], reps)
      print(f"{method}, M = {m} streams of {many.shape[1]} batches of {b}: loop of run "
            f"{t_loop:.3f} s, run_many {t_many:.3f} s, ratio {t_loop / t_many:.2f}; pixels "
            f"that differ in any stream: {mismatch}", flush=True)
      out.append(row("streams", f"{method} M={m} B={b} T={many.shape[1]}", t_many, t_loop,
                     f"{m} run calls", ">= 3x at B=1", values=(mismatch, 0)))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--m", type=int, default=16)
  p.add_argument("--batch_sizes", default="1,16")
  p.add_argument("--methods", default="ema_bn")
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--features", type=int, default=8)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()
  print_table(run(a.m, a.batch_sizes, a.methods, a.images, a.features, a.size, a.reps))


if __name__ == "__main__":
  main()
