"""Several JAX processes (hosts) running one sweep: start-up, and moving
stacks between process-local host data and global sharded arrays.

Every process runs the same script and generates the same data from the seed
(so every process holds every model's inputs); a stack is sharded over the
devices of all processes along its model axis, each process building its own
shards from its copy (:func:`global_array`), and results are gathered back
into every process (:func:`gather`). One process (:func:`is_primary`) writes
the files.

Work on independent pairs (adapting model i to target set i, scoring it,
extracting its features) is split with :func:`map_pairs`: the pair axis is cut
into equal shares, one per device of every process; each process runs the
pair function on its own devices' shares (one thread per local device), so
every pair is computed once, and the results are gathered once, into every
process. A pair function may be a host loop of compiled calls (exact
adaptation in chunks is one), which a single sharded program could not hold.

:func:`initialize` starts ``jax.distributed`` from arguments or from the
environment that ``python -m bnjax.launch`` sets (``BNJAX_COORDINATOR``,
``BNJAX_NUM_PROCESSES``, ``BNJAX_PROCESS_ID``); on a cluster, call
``jax.distributed.initialize()`` itself (SLURM and TPU runtimes are detected by
JAX) or pass the three values.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
import zlib

import jax
import numpy as np

from bnjax import _checks

__all__ = ["initialize", "is_primary", "barrier", "global_array", "gather", "check_same",
           "map_pairs", "workers", "ENV"]

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


# --------------------------------------------------------------------------
# Independent pairs split over every process's devices


def workers(devices=None) -> list:
  """The devices :func:`map_pairs` splits pairs over, in share order: by
  process, then by device id (default: every device of every process).
  ValueError unless every process contributes the same number of devices."""
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  if not devices:
    raise ValueError("devices is empty: give at least one device")
  per_process = collections.Counter(d.process_index for d in devices)
  if len(set(per_process.values())) != 1 or (
      jax.process_count() > 1 and len(per_process) != jax.process_count()):
    raise ValueError(f"devices must hold the same number of devices of every process "
                     f"(processes 0..{jax.process_count() - 1}), got {dict(per_process)}")
  return devices


def _pair_count(args, axes) -> int:
  sizes = {getattr(leaf, "shape", (None,))[0] if getattr(leaf, "ndim", 0) else None
           for a, ax in zip(args, axes) if ax == 0 for leaf in jax.tree_util.tree_leaves(a)}
  if not sizes:
    raise ValueError("in_axes maps no argument: give at least one with a leading pair axis")
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"the mapped arguments must share one leading pair axis, got leading "
                     f"sizes {sorted(s for s in sizes if s is not None)}"
                     f"{' and a scalar' if None in sizes else ''}")
  n = sizes.pop()
  if n < 1:
    raise ValueError("the pair axis is empty: give at least one pair")
  return n


def map_pairs(fn, *args, in_axes=0, devices=None, chunk: int | None = None,
              name: str | None = None):
  """``fn`` over the pairs (the leading axis of the arguments that ``in_axes``
  maps, 0 or None per argument as in ``jax.vmap``), every pair computed once
  on one device of one process; the results gathered into every process.

  The P pairs are cut into ``len(devices)`` = D equal contiguous shares, in
  the order of :func:`workers`, and each share into calls of
  ``min(chunk, ceil(P / D))`` pairs (default: the whole share); the last pair
  is repeated to fill the last call, and the repeats are dropped. Every call
  of ``fn`` thus sees the same number of pairs: a compiled pair function
  compiles once per P (once for every P >= D x ``chunk``). Each process
  calls ``fn`` on its own devices' shares (the array arguments placed on the
  device, the unmapped ones whole; the device is also the default device of
  the call; several local devices run in threads), and ``fn`` returns a
  pytree whose leaves have the call's pair count as leading axis. Every
  process must hold the same arguments (checked, as :func:`check_same`).
  With one device and no ``chunk``, ``fn`` gets every pair in one call.

  Args:
    fn: the pair function: arguments with a leading axis of this call's
      pairs (unmapped ones whole) -> pytree of arrays, one row per pair.
    *args: pytrees; the mapped ones with leading axis P.
    in_axes: 0 or None, or one of them per argument.
    devices: the devices to split over (default: every device of every
      process; :func:`workers` orders them).
    chunk: pairs per call of ``fn`` (a positive int; None: a device's share).
    name: when given and the work is split, a line per process saying
      which pairs it computed (counted from the calls ``fn`` was given).

  Returns:
    ``fn``'s pytree with NumPy leaves of leading axis P, in every process.
  """
  axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
  if len(axes) != len(args) or any(ax not in (0, None) for ax in axes):
    raise ValueError(f"in_axes must be 0 or None, or one of them per argument ({len(args)}), "
                     f"got {in_axes!r}")
  if chunk is not None:
    chunk = _checks.positive_int("chunk", chunk)
  n = _pair_count(args, axes)
  devices = workers(devices)
  split = len(devices) > 1 or jax.process_count() > 1
  if not split and chunk is None:
    with jax.default_device(devices[0]):
      return jax.tree_util.tree_map(np.asarray, fn(*args))
  is_array = lambda a: isinstance(a, (np.ndarray, jax.Array))
  if split:
    check_same(f"the arguments given to map_pairs{f' ({name})' if name else ''}",
               [leaf for leaf in jax.tree_util.tree_leaves(args) if is_array(leaf)])
  share = -(-n // len(devices))
  per_call = share if chunk is None else min(chunk, share)
  share = -(-share // per_call) * per_call
  me = jax.process_index()
  local = [(g, d) for g, d in enumerate(devices) if d.process_index == me]

  def run(g, device):
    put = lambda tree, pick=lambda a: a: jax.tree_util.tree_map(
        lambda a: jax.device_put(pick(a), device) if is_array(a) else a, tree)
    whole = [None if ax == 0 else put(a) for a, ax in zip(args, axes)]  # placed once
    outs = []
    for start in range(g * share, (g + 1) * share, per_call):
      rows = np.minimum(np.arange(start, start + per_call), n - 1)
      part = [put(a, lambda b: b[rows]) if ax == 0 else w for a, ax, w in zip(args, axes, whole)]
      with jax.default_device(device):
        out = jax.tree_util.tree_map(np.asarray, fn(*part))
      for leaf in jax.tree_util.tree_leaves(out):
        if leaf.ndim == 0 or leaf.shape[0] != per_call:
          raise ValueError(f"map_pairs: fn must return leaves with a leading axis of its "
                           f"{per_call} pairs, got shape {leaf.shape}")
      outs.append(out)
    return (jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs),
            list(range(g * share, min((g + 1) * share, n))))

  if len(local) == 1:
    results = [run(*local[0])]
  else:
    with concurrent.futures.ThreadPoolExecutor(len(local)) as pool:
      results = list(pool.map(lambda gd: run(*gd), local))
  block = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *(out for out, _ in results))
  if name is not None and split:
    done = sorted(i for _, pairs in results for i in pairs)
    span = f"pairs {done[0]}..{done[-1]}" if done else "no pairs"
    print(f"[{name}] process {me} of {jax.process_count()}: {len(done)} of {n} pairs "
          f"({span}) on {len(local)} device(s)", flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    block = jax.tree_util.tree_map(
        np.asarray, multihost_utils.process_allgather(block, tiled=True))
  return jax.tree_util.tree_map(lambda a: a[:n], block)
