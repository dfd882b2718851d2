"""Why the sort layout matters for sliced Wasserstein on CPU.

    python benchmarks/sliced_sort.py     # 80 000 x 1024, 200 projections

Times, side by side in one process, the sort of the projected samples as
[n, P] columns (axis 0) and as [P, n] rows (axis 1, what
``bnjax.distances.sliced_wasserstein`` does), and the whole distance against
POT's ``ot.sliced_wasserstein_distance`` when POT is installed.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import distances


def best(fn, reps=3):
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return min(out)


def main(n=80_000, d=1024, p=200):
  x = np.asarray(jax.random.normal(jax.random.key(0), (n, d)))
  y = np.asarray(jax.random.normal(jax.random.key(1), (n, d))) + 0.1
  theta = np.array(jax.random.normal(jax.random.key(2), (d, p)))
  theta /= np.linalg.norm(theta, axis=0)
  xj, tj = jnp.asarray(x), jnp.asarray(theta)
  proj_cols = jax.jit(lambda a, t: a @ t)(xj, tj)            # [n, P]
  proj_rows = jax.jit(lambda a, t: t.T @ a.T)(xj, tj)        # [P, n]
  sort0 = jax.jit(lambda a: jnp.sort(a, axis=0))
  sort1 = jax.jit(lambda a: jnp.sort(a, axis=1))
  sort0(proj_cols).block_until_ready(), sort1(proj_rows).block_until_ready()
  t0 = best(lambda: sort0(proj_cols))
  t1 = best(lambda: sort1(proj_rows))
  print(f"sort [n, P] along axis 0: {t0:.3f} s; [P, n] along axis 1: {t1:.3f} s; ratio {t0 / t1:.1f}x")
  distances.sliced_wasserstein(x[:100], y[:100], projections=theta)  # compile small
  distances.sliced_wasserstein(x, y, projections=theta)
  t_ours = best(lambda: distances.sliced_wasserstein(x, y, projections=theta), reps=2)
  try:
    import ot
  except ImportError:
    print(f"bnjax sliced_wasserstein: {t_ours:.2f} s (POT not installed: pip install pot)")
    return
  t_pot = best(lambda: ot.sliced_wasserstein_distance(x, y, projections=theta, p=2), reps=1)
  print(f"bnjax sliced_wasserstein {t_ours:.2f} s, POT {t_pot:.2f} s: {t_pot / t_ours:.1f}x faster")


if __name__ == "__main__":
  main()
