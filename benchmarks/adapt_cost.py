r"""Cost of BN adaptation relative to one eval-mode forward pass over the same images.

    python benchmarks/adapt_cost.py              # width 8, 64x64, 256 target images
    git show REV:src/bnjax/adapt.py > /tmp/adapt_rev.py
    python benchmarks/adapt_cost.py --compare_with=/tmp/adapt_rev.py   # two versions side by side

Times, side by side: one jitted eval-mode forward pass over the target set
(in one batch), and ``bnjax.adapt.recompute_batch_stats`` with
``"exact"`` (one chunk: a single pass; and in chunks of n/4 and n/16, a
pass per BN layer that stops at that layer), ``"train_pass"`` (batch 32) and
``"ema"`` (batch 1, momentum 0.1: the original protocol). Ratios are
adaptation time / forward time (lower is cheaper). ``--compare_with`` loads
another version of ``src/bnjax/adapt.py`` from a file and times its calls
alternating with this version's (ratio = other / this: > 1, this one faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import jax
import numpy as np

from bnjax import adapt, compiler, models

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:  # run as a script
  from common import print_table, row, side_by_side


def _load(path: str):
  name = "bnjax._adapt_compared"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def run(width: int = 8, size: int = 64, n: int = 256, reps: int = 3,
        compare_with: str | None = None) -> list[dict]:
  model = models.UNet(features=width)
  v = models.init(model, jax.random.key(0), (size, size, 1))
  x = jax.random.uniform(jax.random.key(1), (n, size, size, 1))
  forward = compiler.jit(lambda v, x: model.apply(v, x, train=False))
  modes = {
      "exact (one chunk)": dict(mode="exact", batch_size=n),
      f"exact (chunks of {n // 4})": dict(mode="exact", batch_size=n // 4),
      f"exact (chunks of {max(1, n // 16)})": dict(mode="exact", batch_size=max(1, n // 16)),
      "train_pass (batch 32)": dict(mode="train_pass", batch_size=32),
      "ema (batch 1)": dict(mode="ema", batch_size=1),
  }
  versions = [adapt] + ([_load(compare_with)] if compare_with else [])
  fns = [lambda: forward(v, x)] + [
      (lambda o=o, m=m: m.recompute_batch_stats(model, v, x, **o)["batch_stats"])
      for o in modes.values() for m in versions]
  for f in fns:
    jax.block_until_ready(f())
  times = side_by_side(fns, reps)
  print(f"eval forward over {n} images (width {width}, {size}x{size}): {times[0]:.3f} s")
  out = []
  k = len(versions)
  for i, name in enumerate(modes):
    t = times[1 + k * i]
    print(f"  {name}: {t:.3f} s = {t / times[0]:.2f} forward passes")
    out.append(row("adapt", f"{name}, {n} img", t, times[0], "1 eval forward", "ratio = forward / adapt"))
    if compare_with:
      other = times[2 + k * i]
      # The largest difference of the two versions' statistics (both sides'
      # "value": 0 and the difference).
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
          jax.tree_util.tree_leaves(fns[1 + k * i]()), jax.tree_util.tree_leaves(fns[2 + k * i]())))
      print(f"    {compare_with}: {other:.3f} s ({other / t:.2f}x this version's time); "
            f"largest difference of the statistics {diff:.1e}")
      out.append(row("adapt", f"{name} vs other", t, other, "--compare_with", "ratio >= 1",
                     values=(0.0, diff)))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--n", type=int, default=256)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--compare_with", default=None,
                 help="a file holding another version of src/bnjax/adapt.py, timed side by side")
  a = p.parse_args()
  print_table(run(a.width, a.size, a.n, a.reps, a.compare_with))


if __name__ == "__main__":
  main()
