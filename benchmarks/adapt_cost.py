r"""Cost of BN adaptation relative to one eval-mode forward pass over the same images.

    python benchmarks/adapt_cost.py              # width 8, 64x64, 256 target images

Times, side by side: one jitted eval-mode forward pass over the target set
(in one batch), and ``bnjax.adapt.recompute_batch_stats`` with
``"exact"`` (one chunk: a single pass; and in chunks of n/4, which needs a
pass per BN layer in the worst case), ``"train_pass"`` (batch 32) and
``"ema"`` (batch 1, momentum 0.1: the original protocol). Ratios are
adaptation time / forward time (lower is cheaper).
"""

from __future__ import annotations

import argparse

import jax

from bnjax import adapt, compiler, models

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:  # run as a script
  from common import print_table, row, side_by_side


def run(width: int = 8, size: int = 64, n: int = 256, reps: int = 3) -> list[dict]:
  model = models.UNet(features=width)
  v = models.init(model, jax.random.key(0), (size, size, 1))
  x = jax.random.uniform(jax.random.key(1), (n, size, size, 1))
  forward = compiler.jit(lambda v, x: model.apply(v, x, train=False))
  modes = {
      "exact (one chunk)": dict(mode="exact", batch_size=n),
      f"exact (chunks of {n // 4})": dict(mode="exact", batch_size=n // 4),
      "train_pass (batch 32)": dict(mode="train_pass", batch_size=32),
      "ema (batch 1)": dict(mode="ema", batch_size=1),
  }
  fns = [lambda: forward(v, x)] + [
      (lambda o=o: adapt.recompute_batch_stats(model, v, x, **o)["batch_stats"]) for o in modes.values()]
  for f in fns:
    jax.block_until_ready(f())
  times = side_by_side(fns, reps)
  print(f"eval forward over {n} images (width {width}, {size}x{size}): {times[0]:.3f} s")
  out = []
  for (name, _), t in zip(modes.items(), times[1:]):
    print(f"  {name}: {t:.3f} s = {t / times[0]:.2f} forward passes")
    out.append(row("adapt", f"{name}, {n} img", t, times[0], "1 eval forward", "ratio = forward / adapt"))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--n", type=int, default=256)
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()
  print_table(run(a.width, a.size, a.n, a.reps))


if __name__ == "__main__":
  main()
