r"""Vectorised training of K models vs the same K trained one after another.

    python benchmarks/train_many.py                       # CPU: K = 1, 2, 4, 8, width 8, 32x32, batch 32
    python benchmarks/train_many.py --ks=1,32,128,256 --strategies=vmap   # on a GPU

Times the train step ``bnjax.train.train_many`` runs (a stack of K models,
mapped by a strategy) against K calls of the single-model step ``fit`` runs,
side by side in one process: model-images per second for each and the ratio
(vectorised / one at a time; > 1 means the stack is faster per model).
Compile time is reported separately.
"""

from __future__ import annotations

import argparse
import functools

import jax

from bnjax import compiler, models, stacking, train

try:
  from benchmarks.common import first_call, row, side_by_side
except ImportError:  # run as a script
  from common import first_call, row, side_by_side


def run(ks="1,2,4,8", strategies="auto,vmap", features=8, size=32, batch=32, reps=5,
        conv_impl="auto") -> list[dict]:
  model = models.UNet(features=features, depth=4, conv_impl=conv_impl)
  tx = train.make_optimizer(train.TrainConfig(batch_size=batch))
  step1 = functools.partial(train.train_step, model, tx, "ce+dice")
  print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; U-Net width "
        f"{features}, {size}x{size}, batch {batch}, conv_impl {conv_impl}")
  print(f"{'K':>4} {'strategy':>8} {'stack img/s':>12} {'1-by-1 img/s':>13} {'ratio':>6} "
        f"{'compile stack':>14} {'compile 1':>10}")
  single = compiler.jit(step1)
  rows = []
  for k in [int(v) for v in str(ks).split(",")]:
    keys = jax.random.split(jax.random.key(0), k)
    states = [train.init_state(model, tx, kk, (size, size, 1)) for kk in keys]
    x = jax.random.uniform(jax.random.key(1), (k, batch, size, size, 1))
    y = x[..., 0] > 0.5

    def one_by_one(states, x, y):
      return [single(s, x[i], y[i]) for i, s in enumerate(states)]

    c_seq = first_call(one_by_one, states, x, y)
    stacked_state = stacking.tree_stack(states)
    for strategy in strategies.split(","):
      name = stacking.resolve(strategy)
      # Compiled as train_many compiles it.
      fn = compiler.jit(stacking.stacked(step1, strategy),
                        xla_defaults=compiler.unrolled_stack(name, k))
      c_vec = first_call(fn, stacked_state, x, y)
      t_vec, t_seq = side_by_side([lambda: fn(stacked_state, x, y), lambda: one_by_one(states, x, y)], reps)
      images = k * batch
      print(f"{k:>4} {name:>8} {images / t_vec:>12.1f} {images / t_seq:>13.1f} "
            f"{t_seq / t_vec:>6.2f} {c_vec:>13.1f}s {c_seq:>9.1f}s", flush=True)
      rows.append(row("train_many", f"K={k} {name}, width {features} {size}x{size}", t_vec, t_seq,
                      "K steps one by one", ">= 1x at K=4, 8 (CPU)"))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ks", default="1,2,4,8")
  p.add_argument("--strategies", default="auto,vmap")
  p.add_argument("--features", type=int, default=8)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--conv_impl", default="auto", choices=models.CONV_IMPLS)
  a = p.parse_args()
  run(a.ks, a.strategies, a.features, a.size, a.batch, a.reps, a.conv_impl)


if __name__ == "__main__":
  main()
