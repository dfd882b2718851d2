"""The training loop of the small generative models (private): seeded
batches, one compiled step called per batch, a guard on non-finite losses
every ``check_every`` steps, progress.

The steps are not scanned (``lax.scan``) on purpose: on XLA:CPU (jax 0.10) a
convolution's weight gradient inside a loop body runs ~28x slower than the
same operation compiled on its own (3x3, 16 -> 16 channels, 8x8, batch 64:
22.3 vs 0.80 ms; the input gradient 2.9 vs 0.50 ms; the forward pass is not
affected), so a scanned training step of these models was 13x slower than a
Python loop over one compiled step (docs/measured.md, "Convolution gradients
inside loops"; the mechanism: :func:`bnjax.compiler.loop_form`)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np

from bnjax import _batching
from bnjax import progress


def batches(seed: int, n: int, batch_size: int, steps: int) -> np.ndarray:
  """int32[steps, batch_size]: epochs of a seeded permutation of ``n``
  examples, batch by batch (an epoch's tail that does not fill a batch is
  dropped)."""
  if batch_size > n:
    raise ValueError(f"batch_size must be <= the number of examples ({n}), got {batch_size}")
  rng = np.random.default_rng(seed)
  return _batching.epoch_batches(lambda _: rng.permutation(n), n, batch_size, steps).astype(
      np.int32)


def run(step: Callable, carry, order: np.ndarray, *, check_every: int, what: str,
        loss_names: Sequence[str], hint: str, verbose: bool = True):
  """Runs ``step(carry, index[B], t) -> (carry, losses[L])`` (compiled once
  per model and settings by the caller, :func:`bnjax._modules.cached`) over
  the rows of ``order``: ``(carry, losses[steps, L], seconds)``. The losses
  are read every ``check_every`` steps; a non-finite one raises
  ``FloatingPointError`` naming ``what``, the step and the loss."""
  steps = len(order)
  out, done, start = [], 0, time.perf_counter()
  bar = progress.Progress(steps, what) if verbose else None
  while done < steps:
    size = min(check_every, steps - done)
    chunk = []
    for t in range(done, done + size):
      carry, losses = step(carry, order[t], np.int32(t))
      chunk.append(losses)
    losses = np.asarray(jax.device_get(chunk)).reshape(size, -1)
    bad = ~np.isfinite(losses)
    if bad.any():
      s, l = (int(v[0]) for v in np.nonzero(bad))
      raise FloatingPointError(
          f"{what} training diverged at step {done + s + 1}: the {loss_names[l]} loss is "
          f"{losses[s, l]}; {hint}")
    done += size
    out.append(losses)
    if bar is not None:
      bar.update(done, f"{loss_names[0]} {losses[-1, 0]:.4g}")
  return carry, np.concatenate(out), time.perf_counter() - start
