r"""Sliced Wasserstein on CPU: where the time goes, and bnjax vs POT.

    python benchmarks/sliced_wasserstein.py      # 80 000 x 1024, 200 projections

Side by side in one process: the sort of the [P, n] projections with
``jnp.sort`` on float32 and with ``bnjax.distances.sort_floats`` (integer keys),
in both layouts ([n, P] along axis 0, [P, n] along axis 1); then the whole
``bnjax.distances.sliced_wasserstein`` against POT's
``ot.sliced_wasserstein_distance`` with the same projections (same value).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import distances

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:  # run as a script
  from common import print_table, row, side_by_side


def run(n: int = 80_000, d: int = 1024, p: int = 200, reps: int = 3) -> list[dict]:
  x = np.asarray(jax.random.normal(jax.random.key(0), (n, d)))
  y = np.asarray(jax.random.normal(jax.random.key(1), (n, d))) + 0.1
  theta = np.array(jax.random.normal(jax.random.key(2), (d, p)))
  theta /= np.linalg.norm(theta, axis=0)
  rows_ = jax.block_until_ready(jax.jit(lambda a, t: t.T @ a.T)(jnp.asarray(x), jnp.asarray(theta)))
  cols = rows_.T.copy()
  sorts = {
      "jnp.sort float [P,n] axis 1": jax.jit(lambda a: jnp.sort(a, axis=1)),
      "sort_floats [P,n] axis 1": jax.jit(lambda a: distances.sort_floats(a, axis=1)),
      "jnp.sort float [n,P] axis 0": jax.jit(lambda a: jnp.sort(a, axis=0)),
      "sort_floats [n,P] axis 0": jax.jit(lambda a: distances.sort_floats(a, axis=0)),
  }
  args = [rows_, rows_, cols, cols]
  for (name, fn), a in zip(sorts.items(), args):
    fn(a).block_until_ready()
  times = side_by_side([lambda f=f, a=a: f(a) for f, a in zip(sorts.values(), args)], reps)
  for name, t in zip(sorts, times):
    print(f"sort of {p}x{n} projections, {name}: {t:.3f} s")
  out = [row("sort", f"{p}x{n} int keys vs float, [P,n]", times[1], times[0], "jnp.sort float32", ""),
         row("sort", f"{p}x{n} int keys vs float, [n,P]", times[3], times[2], "jnp.sort float32", "")]
  ours = lambda: distances.sliced_wasserstein(x, y, projections=theta)
  v_ours = ours()
  try:
    import ot
  except ImportError:
    print("POT not installed (pip install pot): no reference for the whole distance")
    return out
  ref = lambda: ot.sliced_wasserstein_distance(x, y, projections=theta, p=2)
  v_ref = float(ref())
  print(f"sliced W2 {n}x{d}, {p} projections: bnjax {v_ours:.7f}, POT {v_ref:.7f}")
  t_ours, t_ref = side_by_side([ours, ref], max(1, reps - 1))
  out.append(row("sliced_w2", f"{n}x{d}, {p} proj", t_ours, t_ref, "POT", ">= 5x",
                 values=(v_ours, v_ref)))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=80_000)
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--p", type=int, default=200)
  ap.add_argument("--reps", type=int, default=3)
  a = ap.parse_args()
  print_table(run(a.n, a.d, a.p, a.reps))


if __name__ == "__main__":
  main()
