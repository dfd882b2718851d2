r"""The accelerator benchmark set in one call, with one JSON and one Markdown
summary (run by ``bash benchmarks/gpu.sh``; under 8 minutes on one H200).

    OUT=runs/gpu bash benchmarks/gpu.sh
    python benchmarks/gpu.py --out=runs/gpu_quick --quick      # the same at toy sizes (CPU)

In order, each within what is left of ``--budget_s`` (a benchmark that would
start after it is recorded as skipped, one that fails is recorded with its
error, and the others still run):

1. K-model training (K = 1, 32, 128, 256): steps per second per model of the
   vectorised stack and its ratio to K single-model steps one by one;
2. the paper-shape train step (width 64, 64x64, batch 16) and width 16;
3. data generation (100 000 pairs 64x64) against ``jax.random.normal``;
4. exact adaptation (width 64, 256 images: one chunk, chunks of 64) in
   forward passes;
5. the streams runner: ``run_many`` over 16 streams against 16 ``run`` calls;
6. TENT, histogram matching and the scores over 64 pairs in one call against
   64 per-pair calls (the benchmark's and when-to-adapt's batched methods);
7. online TENT on one stream (``streams.run``) in the form chosen for the
   backend (one ``lax.scan``) against the step called per batch (CPU's
   choice), and set-wise TENT; PyTorch where it is installed.

The machine's environment comes first in the summary: versions, devices, and
which optional packages are missing (and what that skips).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NEEDED = ("jax", "flax", "optax", "orbax.checkpoint", "numpy", "tqdm")
OPTIONAL = {"PIL": "data_gen's per-image NumPy + PIL reference",
            "ott": "bnjax.distances.sinkhorn (not used here)",
            "ml_collections": "the experiment scripts (not used here)",
            "torch": "the PyTorch train-step reference (not used here)"}


def environment() -> dict:
  """Versions, devices and missing packages, without importing bnjax."""
  missing = [m for m in NEEDED if importlib.util.find_spec(m.split(".")[0]) is None]
  env = {"python": platform.python_version(), "missing": missing,
         "optional_missing": {m: why for m, why in OPTIONAL.items()
                              if importlib.util.find_spec(m) is None}}
  if "jax" not in missing:
    import jax
    env["jax"] = jax.__version__
    env["backend"] = jax.default_backend()
    env["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
  for m in ("flax", "optax", "numpy", "tqdm"):
    if m not in missing:
      env[m] = __import__(m).__version__
  return env


def _train_many(quick):
  import train_many
  rows = train_many.run(ks="1,2" if quick else "1,32,128,256", strategies="vmap",
                        features=8, size=16 if quick else 32, batch=4 if quick else 32,
                        reps=2 if quick else 3)
  for r in rows:  # bnjax_s: one step of the stack of K models
    r["steps_per_s_per_model"] = 1.0 / r["bnjax_s"]
  return rows


def _train_step(quick):
  import common
  import numpy as np
  import train_step
  rows = []
  for width, side, batch in ([(4, 16, 2)] if quick else [(64, 64, 16), (16, 64, 16)]):
    fn = train_step.bnjax_step(width, side, batch)
    t0 = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - t0
    per_call = common.per_call_blocks([fn], 2 if quick else 10, 3)[0]
    t = float(np.median(per_call))
    rows.append({"benchmark": "train_step", "case": f"width {width}, {side}x{side}, batch {batch}",
                 "bnjax_s": t, "images_per_s": batch / t, "compile_s": compile_s})
  return rows


def _data_gen(quick):
  import data_gen
  return data_gen.run(n=200 if quick else 100_000, size=16 if quick else 64,
                      ref_n=20 if quick else 200, reps=2 if quick else 3)


def _adapt_cost(quick):
  import adapt_cost
  return adapt_cost.run(width=4 if quick else 64, size=32 if quick else 64,
                        n=16 if quick else 256, reps=2 if quick else 3)


def _streams(quick):
  import streams_many
  return streams_many.run(m=2 if quick else 16, batch_sizes="1,4" if quick else "1,16",
                          methods="ema_bn" if quick else "ema_bn,tent",
                          images=8 if quick else 64, features=4 if quick else 8,
                          size=16 if quick else 32, reps=2 if quick else 3)


def _methods(quick):
  import methods_many
  return methods_many.run(pairs=2 if quick else 64, width=4 if quick else 8,
                          size=16 if quick else 32, n=8 if quick else 64, steps=2 if quick else 10,
                          reps=2 if quick else 3)


def _tent_online(quick):
  import tent_online
  return tent_online.run(shapes="4x32x1" if quick else "8x32x1,16x64x16",
                         methods_="tent", steps=2 if quick else 16, reps=2 if quick else 3)


def _cyclegan(quick):
  import cyclegan_many
  return cyclegan_many.run(k=2 if quick else 32, steps=2 if quick else 100,
                           size=16 if quick else 64, features=2 if quick else 32,
                           n_blocks=1 if quick else 6, disc_features=2 if quick else 32,
                           disc_layers=1 if quick else 3, batch=2 if quick else 1,
                           n=8 if quick else 64, unet_features=2 if quick else 16,
                           reps=1 if quick else 2)


BENCHMARKS = {"train_many": _train_many, "train_step": _train_step, "data_gen": _data_gen,
              "adapt_cost": _adapt_cost, "streams": _streams, "methods": _methods,
              "cyclegan": _cyclegan, "tent_online": _tent_online}
# A benchmark starts only if this many seconds are left (about its length on an H200).
NEEDS_S = {"train_many": 120, "train_step": 60, "data_gen": 40, "adapt_cost": 60, "streams": 60,
           "methods": 60, "cyclegan": 120, "tent_online": 60}


def _markdown(summary: dict) -> str:
  env = summary["environment"]
  lines = ["# bnjax on the accelerator", "",
           f"python {env['python']}, jax {env.get('jax', '?')} ({env.get('backend', '?')}: "
           f"{', '.join(env.get('devices', []))}), flax {env.get('flax', '?')}, "
           f"{summary['seconds']:.0f} s in all.", ""]
  if env["missing"]:
    lines += [f"**Missing (nothing ran)**: {', '.join(env['missing'])}", ""]
  for m, why in env["optional_missing"].items():
    lines.append(f"- optional `{m}` missing: {why}")
  lines += ["", "| benchmark | case | bnjax s | reference | reference s | ratio | other |",
            "|---|---|---|---|---|---|---|"]
  for r in summary["rows"]:
    other = {k: v for k, v in r.items() if k not in (
        "benchmark", "case", "bnjax_s", "reference", "reference_s", "ratio", "goal")}
    other_text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in other.items())
    ref_s = f"{r['reference_s']:.4g}" if "reference_s" in r else ""
    ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
    lines.append(f"| {r['benchmark']} | {r['case']} | {r['bnjax_s']:.4g} | "
                 f"{r.get('reference', '')} | {ref_s} | {ratio} | {other_text} |")
  for name, status in summary["status"].items():
    if status != "ok":
      lines.append(f"\n{name}: {status}")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="Folder of gpu_summary.json and gpu_summary.md.")
  p.add_argument("--only", default=",".join(BENCHMARKS), help=f"Subset of {list(BENCHMARKS)}.")
  p.add_argument("--budget_s", type=float, default=420.0,
                 help="No benchmark starts later than its expected length before this.")
  p.add_argument("--quick", action="store_true", help="Toy sizes: checks the script, on any machine.")
  a = p.parse_args(argv)
  names = [n for n in a.only.split(",") if n]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    p.error(f"--only: unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
  os.makedirs(a.out, exist_ok=True)
  start = time.perf_counter()
  env = environment()
  print(json.dumps(env, indent=1), flush=True)
  summary = {"environment": env, "quick": a.quick, "rows": [], "status": {}, "seconds": 0.0}

  def write():
    summary["seconds"] = time.perf_counter() - start
    with open(os.path.join(a.out, "gpu_summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(a.out, "gpu_summary.md"), "w") as f:
      f.write(_markdown(summary))

  if env["missing"]:
    summary["status"] = {n: f"not run: missing {env['missing']}" for n in names}
    write()
    print(f"missing {env['missing']}: nothing ran; see {a.out}/gpu_summary.md", flush=True)
    return summary
  for name in names:
    left = a.budget_s - (time.perf_counter() - start)
    if not a.quick and left < NEEDS_S[name]:
      summary["status"][name] = f"skipped: {left:.0f} s left of the budget, needs ~{NEEDS_S[name]} s"
      write()
      continue
    print(f"\n== {name} ({left:.0f} s left)", flush=True)
    t0 = time.perf_counter()
    try:
      rows = BENCHMARKS[name](a.quick)
      summary["rows"] += rows
      summary["status"][name] = "ok"
    except Exception as e:  # one failure must not lose the others' figures
      traceback.print_exc()
      summary["status"][name] = f"failed: {type(e).__name__}: {e}"[:500]
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    write()  # after every benchmark: an interrupted run keeps what it measured
  write()
  print(open(os.path.join(a.out, "gpu_summary.md")).read())
  return summary


if __name__ == "__main__":
  main()
