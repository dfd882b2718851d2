r"""What a call over P pairs costs against P calls of one pair: TENT
(10 steps), exact AdaBN and the label-free scores of both, stacked
(``tent_stacked``, ``recompute_batch_stats_stacked``, ``scores_stacked``),
first call (compiles included) and second call, for each P.

    python benchmarks/pair_chunk.py                  # P = 1, 4, 8; width 8, 32x32, 64 images
    python benchmarks/pair_chunk.py --pairs=1,2 --width=2 --size=16 --images=8   # toy

Sets the experiments' ``pair_chunk`` (pairs per compiled call): where the
per-pair time of the second call does not fall with P and the first call
grows with it (XLA:CPU with the unrolled stacks), 1 is the right chunk.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bnjax import adapt, data, methods, models, selection


def run(pairs=(1, 4, 8), width: int = 8, size: int = 32, images: int = 64, steps: int = 10,
        strategy: str = "auto") -> list[dict]:
  model = models.UNet(features=width, depth=4)
  v = models.init(model, jax.random.key(0), (size, size, 1))
  x_all = jnp.stack([data.make_dataset(jax.random.key(p), data.Domain(90 + 10 * p, 50, 170, 50),
                                       images, size)[0] for p in range(max(pairs))])
  rows = []
  for p in pairs:
    vs = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (p, *a.shape)), v)
    x, keys = x_all[:p], jax.random.split(jax.random.key(1), p)

    def call():
      tent = methods.tent_stacked(model, vs, x, keys=keys, steps=steps, learning_rate=1e-3,
                                  batch_size=min(32, images), strategy=strategy)
      adabn = adapt.recompute_batch_stats_stacked(model, vs, x, mode="exact", strategy=strategy)
      scores = selection.scores_stacked(model, vs, [tent, adabn], x,
                                        source_inputs=(x, x[..., 0] > 0.5), strategy=strategy)
      return jax.block_until_ready((tent, adabn, scores))

    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    call()
    t2 = time.perf_counter()
    rows.append({"pairs": p, "first_s": t1 - t0, "second_s": t2 - t1,
                 "second_s_per_pair": (t2 - t1) / p})
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--pairs", default="1,4,8")
  for name, default in (("width", 8), ("size", 32), ("images", 64), ("steps", 10)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--strategy", default="auto")
  a = parser.parse_args()
  rows = run(tuple(int(p) for p in a.pairs.split(",")), a.width, a.size, a.images, a.steps,
             a.strategy)
  print(f"TENT ({a.steps} steps) + exact AdaBN + scores of both, width {a.width}, "
        f"{a.size}x{a.size}, {a.images} images, strategy {a.strategy} ({jax.default_backend()})")
  print(f"{'pairs':>5} {'first s':>8} {'second s':>9} {'s/pair':>7} {'vs P=1':>7}")
  for r in rows:
    print(f"{r['pairs']:>5} {r['first_s']:8.1f} {r['second_s']:9.2f} "
          f"{r['second_s_per_pair']:7.2f} {rows[0]['second_s_per_pair'] / r['second_s_per_pair']:7.2f}")


if __name__ == "__main__":
  main()
