r"""Fréchet distance: bnjax (symmetric eigh form) vs the SciPy ``sqrtm`` formula.

    python benchmarks/frechet.py                 # 16 000 x 1024, float64

The reference is the formula of pytorch-fid's ``calculate_frechet_distance``
(written here from the formula, not copied): moments with ``np.cov``, then
|mu1 - mu2|² + tr S1 + tr S2 - 2 tr Re sqrtm(S1 S2). Both sides start from the
raw samples, in float64; the values must agree to 1e-6 relative.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import scipy.linalg

from bnjax import distances

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:  # run as a script
  from common import print_table, row, side_by_side


def scipy_frechet(x, y):
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def run(n: int = 16_000, d: int = 1024, reps: int = 3) -> list[dict]:
  x = np.asarray(jax.random.normal(jax.random.key(0), (n, d)), np.float64)
  y = np.asarray(jax.random.normal(jax.random.key(1), (n, d)), np.float64)
  ours = lambda: distances.frechet(x, y, dtype=np.float64)
  ref = lambda: scipy_frechet(x, y)
  v_ours, v_ref = ours(), ref()  # warm-up (compiles)
  rel = abs(v_ours - v_ref) / abs(v_ref)
  t_ours, t_ref = side_by_side([ours, ref], reps)
  print(f"frechet {n}x{d} float64: bnjax {v_ours:.9f}, SciPy sqrtm {v_ref:.9f}, "
        f"relative difference {rel:.1e} (goal <= 1e-6)")
  return [row("frechet", f"{n}x{d} float64 (rel {rel:.0e})", t_ours, t_ref, "SciPy sqrtm", ">= 2x",
              values=(v_ours, v_ref))]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=16_000)
  p.add_argument("--d", type=int, default=1024)
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()
  print_table(run(a.n, a.d, a.reps))


if __name__ == "__main__":
  main()
