"""Timing helpers shared by the benchmarks: medians of alternating calls, one table format."""

from __future__ import annotations

import time

import jax
import numpy as np


def first_call(fn, *args):
  """Seconds of one call (compile + run for a fresh jitted function)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def side_by_side(fns, reps: int = 5) -> list[float]:
  """Median seconds of each zero-argument callable, their calls alternating,
  so that drift on a noisy machine hits all of them alike."""
  times = [[] for _ in fns]
  for _ in range(reps):
    for fn, out in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      out.append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in times]


def per_call_blocks(fns, calls, rounds: int) -> list[np.ndarray]:
  """Seconds per call of each zero-argument callable in each of ``rounds``
  rounds, where a round runs a block of ``calls`` calls (one count for all, or
  one per callable) of each callable in turn. Long blocks keep one
  framework's worker threads, still spinning after its block, off all but
  the first call of the next."""
  calls = [calls] * len(fns) if isinstance(calls, int) else list(calls)
  out = [[] for _ in fns]
  for _ in range(rounds):
    for fn, k, times in zip(fns, calls, out):
      t0 = time.perf_counter()
      for _ in range(k):
        jax.block_until_ready(fn())
      times.append((time.perf_counter() - t0) / k)
  return [np.asarray(t) for t in out]


def row(benchmark: str, case: str, ours_s: float, ref_s: float, reference: str, goal: str = "",
        values: tuple[float, float] | None = None) -> dict:
  """One result: ``ratio`` = reference time / bnjax time (> 1: bnjax is faster);
  ``values``: what the two timed computations returned (bnjax, reference),
  kept so that a run shows they computed the same thing."""
  out = {"benchmark": benchmark, "case": case, "bnjax_s": ours_s, "reference": reference,
         "reference_s": ref_s, "ratio": ref_s / ours_s, "goal": goal}
  if values is not None:
    out["value"], out["reference_value"] = (float(v) for v in values)
  return out


def print_table(rows: list[dict]) -> None:
  head = f"{'benchmark':<14} {'case':<34} {'bnjax s':>9} {'reference':<22} {'ref s':>9} {'ratio':>7}  goal"
  print(head)
  print("-" * len(head))
  for r in rows:
    print(f"{r['benchmark']:<14} {r['case']:<34} {r['bnjax_s']:>9.4f} {r['reference']:<22} "
          f"{r['reference_s']:>9.4f} {r['ratio']:>6.2f}x  {r['goal']}", flush=True)
