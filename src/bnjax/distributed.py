"""Several JAX processes (hosts) running one sweep: start-up, and moving
stacks between process-local host data and global sharded arrays.

Every process runs the same script and generates the same data from the seed
(so every process holds every model's inputs); a stack is sharded over the
devices of all processes along its model axis, each process building its own
shards from its copy (:func:`global_array`), and results are gathered back
into every process (:func:`gather`). One process (:func:`is_primary`) writes
the files.

:func:`initialize` starts ``jax.distributed`` from arguments or from the
environment that ``python -m bnjax.launch`` sets (``BNJAX_COORDINATOR``,
``BNJAX_NUM_PROCESSES``, ``BNJAX_PROCESS_ID``); on a cluster, call
``jax.distributed.initialize()`` itself (SLURM and TPU runtimes are detected by
JAX) or pass the three values.
"""

from __future__ import annotations

import os
import sys
import zlib

import jax
import numpy as np

__all__ = ["initialize", "is_primary", "barrier", "global_array", "gather", "check_same", "ENV"]

#: The environment variables that start a multi-process run: coordinator address,
#: process count, this process's id.
ENV = ("BNJAX_COORDINATOR", "BNJAX_NUM_PROCESSES", "BNJAX_PROCESS_ID")
_STARTED: dict = {}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 120) -> bool:
  """Starts ``jax.distributed`` (CPU collectives over gloo) when a coordinator
  is given or set in the environment; returns whether this is a multi-process
  run. Call it before anything else uses JAX. Idempotent."""
  if _STARTED:
    return _STARTED["multi"]
  env = dict(zip(("coordinator", "num_processes", "process_id"),
                 (os.environ.get(name) for name in ENV)))
  coordinator = coordinator or env["coordinator"]
  if coordinator is None:
    _STARTED["multi"] = False
    return False
  try:
    num_processes = int(num_processes if num_processes is not None else env["num_processes"])
    process_id = int(process_id if process_id is not None else env["process_id"])
  except (TypeError, ValueError):
    raise ValueError(f"a multi-process run needs the number of processes and this process's "
                     f"id ({ENV[1]}, {ENV[2]}), got {num_processes!r} and {process_id!r}") from None
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in 0..{num_processes - 1}, got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # If the processes never all arrive (a wrong count, a dead peer) JAX's
  # client ends the process after timeout_s with DEADLINE_EXCEEDED; this line
  # says what it was waiting for.
  print(f"process {process_id} of {num_processes}: joining the coordinator at {coordinator} "
        f"(waits up to {timeout_s} s for all {num_processes} processes)", file=sys.stderr,
        flush=True)
  try:
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
  except Exception as e:  # the coordinator's errors, or a timeout instead of a hang
    raise RuntimeError(
        f"process {process_id} of {num_processes} could not join the coordinator at "
        f"{coordinator} within {timeout_s} s (do all processes give the same "
        f"num_processes?): {e}") from None
  if jax.process_count() != num_processes:
    raise RuntimeError(f"the coordinator reports {jax.process_count()} processes, this "
                       f"process was told {num_processes}")
  _STARTED["multi"] = num_processes > 1
  return _STARTED["multi"]


def is_primary() -> bool:
  """Whether this process writes the files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def global_array(a, sharding):
  """A global array with ``sharding`` from this process's full copy ``a``
  (every process holds the same values); PRNG key arrays included."""
  if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    data = np.asarray(jax.random.key_data(a))
    raw = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
    return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(a))
  host = np.asarray(a)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def gather(tree):
  """Every leaf as a NumPy array holding all of its values, in every process
  (a global array spread over processes is all-gathered)."""
  from jax.experimental import multihost_utils

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree_util.tree_map(one, tree)


def check_same(name: str, tree) -> None:
  """ValueError unless every process holds the same values in ``tree`` (a
  CRC32 of each process's bytes, compared across processes)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  crc = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  sums = np.asarray(multihost_utils.process_allgather(np.asarray([crc >> 1], np.int64)))
  if len(set(sums.ravel().tolist())) != 1:
    raise ValueError(f"{name} differ between processes (checksums {sums.ravel().tolist()}): "
                     "every process must generate the same data from the same seed and config")
