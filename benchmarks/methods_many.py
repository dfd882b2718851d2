r"""TENT, histogram matching and the label-free scores over P pairs: one
compiled call (``tent_stacked``, ``histogram_match_stacked``,
``scores_stacked``) against a loop of P per-pair calls, side by side.

    python benchmarks/methods_many.py                 # P = 12 pairs, width 8, 32x32, 64 images
    python benchmarks/methods_many.py --pairs=64 --width=16

The when-to-adapt experiment adapts every pair of a source model this way
(12 shifts x severities per source on the CPU preset).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import adapt, data, methods, models, selection

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:
  from common import print_table, row, side_by_side


def run(pairs: int = 12, width: int = 8, size: int = 32, n: int = 64, steps: int = 10,
        reps: int = 3, strategy: str = "auto") -> list[dict]:
  model = models.UNet(features=width, depth=4)
  v = models.init(model, jax.random.key(0), (size, size, 1))
  vs = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (pairs, *a.shape)), v)
  domains = [data.Domain(90 + 10 * (p % 8), 50, 170 + 10 * (p % 8), 50) for p in range(pairs)]
  x = jnp.stack([data.make_dataset(jax.random.key(p), d, n, size)[0]
                 for p, d in enumerate(domains)])
  ref = jnp.broadcast_to(data.make_dataset(jax.random.key(99), data.Domain(90, 50, 170, 50), n,
                                           size)[0], x.shape)
  keys = jax.random.split(jax.random.key(1), pairs)
  opts = dict(steps=steps, learning_rate=1e-3, batch_size=min(32, n))
  v_ad = adapt.recompute_batch_stats_stacked(model, vs, x)
  cases = {
      "tent": (lambda: [methods.tent(model, v, x[p], key=keys[p], **opts)["batch_stats"]
                        for p in range(pairs)],
               lambda: methods.tent_stacked(model, vs, x, keys=keys, strategy=strategy,
                                            **opts)["batch_stats"]),
      "histogram_match": (lambda: [methods.histogram_match(x[p], ref[p]) for p in range(pairs)],
                          lambda: methods.histogram_match_stacked(x, ref)),
      "scores": (lambda: [selection.scores(model, v, jax.tree_util.tree_map(lambda a: a[p], v_ad),
                                           x[p])["agreement"] for p in range(pairs)],
                 lambda: selection.scores_stacked(model, vs, v_ad, x,
                                                  strategy=strategy)["agreement"]),
  }
  out = []
  for name, (loop, together) in cases.items():
    a, b = loop(), together()  # compiled, and the same numbers
    diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(w))))
               for p in range(pairs)
               for u, w in zip(jax.tree_util.tree_leaves(a[p]),
                               jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                                   lambda t: t[p], b))))
    t_loop, t_many = side_by_side([loop, together], reps)
    print(f"{name}, P = {pairs} pairs of {n} images {size}x{size}, width {width}: loop "
          f"{t_loop:.3f} s, one call {t_many:.3f} s, ratio {t_loop / t_many:.2f}; largest "
          f"difference {diff:.1e}", flush=True)
    out.append(row("methods", f"{name} P={pairs} n={n} w{width} {strategy}", t_many, t_loop,
                   f"{pairs} per-pair calls", "", values=(diff, 0.0)))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pairs", type=int, default=12)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--n", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--strategy", default="auto", help="How the pairs are mapped: auto | vmap | unroll.")
  a = p.parse_args()
  print_table(run(a.pairs, a.width, a.size, a.n, a.steps, a.reps, a.strategy))


if __name__ == "__main__":
  main()
