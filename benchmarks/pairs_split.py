r"""Exact AdaBN of P (model, target set) pairs split by
``bnjax.distributed.map_pairs``: 1 process x 1 device, 1 process x 2 devices
and 2 processes x 1 device (``python -m bnjax.launch``), each run in its own
fresh interpreter, alternating over rounds.

    python benchmarks/pairs_split.py                    # P = 16, width 8, 32x32, 128 images in chunks of 32, a pair per call
    python benchmarks/pairs_split.py --pairs=4 --images=16 --rounds=1   # CI-size

Each run adapts the pairs twice in one process: the first call includes the
compiles, the second is the steady state. Prints both per setting, and the
ratios to 1 x 1 (> 1: faster than one device), plus how many pairs each
process computed (counted by the pair function).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"1 process x 1 device": (1, 1), "1 process x 2 devices": (1, 2),
            "2 processes x 1 device": (2, 1)}


def child(args) -> None:
  """One run: adapt the pairs twice, time both, process 0 writes the JSON."""
  from bnjax import distributed
  distributed.initialize()
  import jax
  import numpy as np
  from bnjax import adapt, data, models

  model = models.UNet(features=args.width, depth=4)
  variables = jax.tree_util.tree_map(
      lambda *a: np.stack(a), *[models.init(model, jax.random.key(p), (args.size, args.size, 1))
                                for p in range(args.pairs)])
  images = np.stack([np.asarray(data.make_dataset(
      jax.random.key(p), data.Domain(60 + 10 * (p % 8), 50, 170, 50), args.images, args.size)[0])
      for p in range(args.pairs)])
  handed = []

  def pairs(index, v, x):
    handed.extend(np.asarray(index).tolist())
    stats = adapt.recompute_batch_stats_stacked(model, v, x, mode="exact",
                                                batch_size=args.chunk)["batch_stats"]
    return jax.block_until_ready(stats)

  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    out = distributed.map_pairs(pairs, np.arange(args.pairs), variables, images,
                                chunk=args.pair_chunk)
    times.append(time.perf_counter() - t0)
  counts = np.asarray([len(set(handed))])  # pairs this process computed, counted
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    counts = multihost_utils.process_allgather(counts, tiled=True)
  if distributed.is_primary():
    leaf = jax.tree_util.tree_leaves(out)[0]
    with open(args.out, "w") as f:
      json.dump({"first_s": times[0], "second_s": times[1], "pairs_per_process":
                 np.asarray(counts).ravel().tolist(), "checksum": float(np.sum(leaf))}, f)


def _run(setting, args, out) -> dict:
  processes, devices = SETTINGS[setting]
  env = dict(os.environ, BNJAX_COMPILATION_CACHE="off",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  me = [os.path.abspath(__file__), "--child", f"--out={out}",
        *(f"--{k}={getattr(args, k)}"
          for k in ("pairs", "width", "size", "images", "chunk", "pair_chunk"))]
  command = ([sys.executable, "-m", "bnjax.launch", f"--processes={processes}",
              f"--devices_per_process={devices}", *me] if processes > 1
             else [sys.executable, *me])
  r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{setting} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
  with open(out) as f:
    return json.load(f)


def run(pairs: int = 16, width: int = 8, size: int = 32, images: int = 128, chunk: int = 32,
        rounds: int = 2, pair_chunk: int = 1) -> dict:
  args = argparse.Namespace(pairs=pairs, width=width, size=size, images=images, chunk=chunk,
                            pair_chunk=pair_chunk)
  results = {s: [] for s in SETTINGS}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      for s in SETTINGS:
        results[s].append(_run(s, args, os.path.join(tmp, f"{r}.json")))
  return results


def main():
  parser = argparse.ArgumentParser()
  for name, default in (("pairs", 16), ("width", 8), ("size", 32), ("images", 128),
                        ("chunk", 32), ("rounds", 2), ("pair_chunk", 1)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--child", action="store_true")
  parser.add_argument("--out")
  args = parser.parse_args()
  if args.child:
    return child(args)
  results = run(args.pairs, args.width, args.size, args.images, args.chunk, args.rounds,
                args.pair_chunk)
  median = lambda s, k: sorted(r[k] for r in results[s])[len(results[s]) // 2]
  base = {k: median("1 process x 1 device", k) for k in ("first_s", "second_s")}
  print(f"exact AdaBN of {args.pairs} pairs ({args.images} images {args.size}x{args.size} in "
        f"chunks of {args.chunk}, U-Net width {args.width}, {args.pair_chunk} pair(s) per call), "
        f"median of {args.rounds} round(s)")
  print(f"{'setting':<24} {'first s':>8} {'second s':>9} {'ratio 1st':>9} {'ratio 2nd':>9}  "
        "pairs per process")
  for s in SETTINGS:
    f, t = median(s, "first_s"), median(s, "second_s")
    print(f"{s:<24} {f:8.2f} {t:9.2f} {base['first_s'] / f:9.2f} {base['second_s'] / t:9.2f}  "
          f"{results[s][-1]['pairs_per_process']}")
  sums = {round(r["checksum"], 3) for rs in results.values() for r in rs}
  print(f"checksum of the first statistics in every run: {sorted(sums)}")


if __name__ == "__main__":
  main()
