r"""Every side-by-side benchmark in one table (CPU: under 15 minutes on 2 cores).

    python benchmarks/run_all.py
    python benchmarks/run_all.py --only=train_step,data_gen --json=runs/bench.json

Ratios are reference time / bnjax time, measured in this process with the
calls alternating: > 1 means bnjax is faster. The references: PyTorch 2.13
(train step, and its convolutions by part; skipped if torch is absent), a
per-image NumPy + PIL generator and ``jax.random.normal`` (data), one eval
forward pass (adaptation), SciPy ``sqrtm`` (Fréchet), POT (sliced W2;
skipped if absent), and K single-model steps (the vectorised sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adapt_cost  # noqa: E402
import common  # noqa: E402
import conv_parts  # noqa: E402
import data_gen  # noqa: E402
import frechet  # noqa: E402
import loop_vs_scan  # noqa: E402
import methods_many  # noqa: E402
import sliced_wasserstein  # noqa: E402
import streams_many  # noqa: E402
import tent_online  # noqa: E402
import train_many  # noqa: E402
import train_step  # noqa: E402

BENCHMARKS = {
    "train_step": lambda: train_step.run(),
    "conv_parts": lambda: conv_parts.run(),
    "data_gen": lambda: data_gen.run(),
    "adapt_cost": lambda: adapt_cost.run(),
    "frechet": lambda: frechet.run(reps=2),
    "sliced_w2": lambda: sliced_wasserstein.run(reps=2),
    "train_many": lambda: train_many.run(ks="4,8", strategies="auto", reps=7),
    "streams": lambda: streams_many.run(),
    "tent_online": lambda: tent_online.run(reps=3, scan=False),
    "methods": lambda: methods_many.run(),
    "loop_vs_scan": lambda: loop_vs_scan.run(),
}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default=",".join(BENCHMARKS), help=f"Comma-separated subset of {list(BENCHMARKS)}.")
  p.add_argument("--json", default=None, help="Also write the rows here.")
  a = p.parse_args()
  names = [n for n in a.only.split(",") if n]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    p.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
  rows, start = [], time.perf_counter()
  for name in names:
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    rows += BENCHMARKS[name]()
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
  print(f"\nAll ratios (reference time / bnjax time; > 1: bnjax faster), {time.perf_counter() - start:.0f} s:\n")
  common.print_table(rows)
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
