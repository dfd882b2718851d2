r"""Data generation: bnjax vs a per-image NumPy + PIL pipeline, and vs the RNG floor.

    python benchmarks/data_gen.py                # 10 000 pairs, 64x64, white noise

Three ways to make ``n`` image + mask pairs of the domain (60,10,190,20):

* bnjax: ``bnjax.data.make_dataset`` (one jitted, vectorised call; on the device).
* reference: what the original pipeline did, one image at a time: a NumPy
  Perlin mask (lattice one cell larger, cropped at a random offset), rendered
  with NumPy normals, clipped, cast to uint8, both written as PNG files with
  PIL (``--ref_n`` pairs are timed and scaled to ``n``).
* floor: ``jax.random.normal`` for the same number of pixels, the random
  numbers any white-noise renderer must draw.

Reports the ratios reference / bnjax (goal >= 40) and bnjax / floor (goal <= 1.5).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import jax
import numpy as np

from bnjax import data

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:  # run as a script
  from common import print_table, row, side_by_side

DOMAIN = data.Domain(60, 10, 190, 20)


def numpy_perlin(rng, size=64, res=2):
  """One Perlin image: gradients on a (res+2)^2 lattice, noise over (res+1) cells, cropped."""
  cell = size // res
  full = (res + 1) * cell
  angles = rng.uniform(0, 2 * np.pi, (res + 2, res + 2))
  g = np.stack([np.cos(angles), np.sin(angles)], -1)
  coords = np.arange(full) / cell
  base = np.floor(coords).astype(int)
  f = coords - base
  fy, fx = f[:, None], f[None, :]
  r, c = base[:, None], base[None, :]
  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
  dot = lambda di, dj: g[r + di, c + dj, 0] * (fy - di) + g[r + di, c + dj, 1] * (fx - dj)
  ty, tx = fade(fy), fade(fx)
  noise = np.sqrt(2) * ((dot(0, 0) * (1 - tx) + dot(0, 1) * tx) * (1 - ty)
                        + (dot(1, 0) * (1 - tx) + dot(1, 1) * tx) * ty)
  oy, ox = rng.integers(0, cell, 2)
  return noise[oy:oy + size, ox:ox + size]


def reference(n, folder, size=64, seed=0):
  from PIL import Image

  rng = np.random.default_rng(seed)
  d = DOMAIN
  for i in range(n):
    mask = np.abs(numpy_perlin(rng, size)) > 0.4
    z = rng.standard_normal((size, size))
    img = np.where(mask, d.mu2 + d.sigma2 * z, d.mu1 + d.sigma1 * z)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"img_{i:05d}.png"))
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(folder, f"mask_{i:05d}.png"))


def run(n: int = 10_000, size: int = 64, ref_n: int = 1000, reps: int = 5) -> list[dict]:
  key = jax.random.key(0)
  ours = lambda: data.make_dataset(key, DOMAIN, n, size)
  floor_fn = jax.jit(functools.partial(jax.random.normal, shape=(n, size, size)))
  floor = lambda: floor_fn(key)
  jax.block_until_ready(ours()), jax.block_until_ready(floor())
  t_ours, t_floor = side_by_side([ours, floor], reps)
  with tempfile.TemporaryDirectory() as folder:
    t0 = time.perf_counter()
    reference(ref_n, folder, size)
    t_ref = (time.perf_counter() - t0) * n / ref_n
  print(f"{n} pairs {size}x{size}: bnjax {t_ours:.3f} s, RNG floor {t_floor:.3f} s, "
        f"per-image NumPy + PIL {t_ref:.1f} s (from {ref_n} pairs)")
  case = f"{n} pairs {size}x{size}"
  return [row("data_gen", case, t_ours, t_ref, "NumPy+PIL per image", ">= 40x"),
          row("data_gen", case + " (floor/bnjax)", t_ours, t_floor, "jax.random.normal", ">= 0.67x (<= 1.5x floor)")]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=10_000)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--ref_n", type=int, default=1000, help="Reference pairs actually generated.")
  p.add_argument("--reps", type=int, default=5)
  a = p.parse_args()
  print_table(run(a.n, a.size, a.ref_n, a.reps))


if __name__ == "__main__":
  main()
