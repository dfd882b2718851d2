"""A stack of models (pytrees with a leading model axis): how a per-model
function is mapped over it, and how the model axis is split over devices.

``"vmap"`` is ``jax.vmap``. ``"unroll"`` places one copy of the function per
model in the same program, so each model keeps the single-model lowering.
On XLA:CPU a ``vmap`` over models whose convolution kernels differ lowers to
grouped convolutions that ran 3.2x slower per model than one model at a time
(U-Net width 8, 32x32, batch 32: 236 vs 73 ms per model-step), while
``"unroll"`` ran at 71 ms per model-step (docs/measured.md). ``"auto"`` picks
``"unroll"`` on CPU and ``"vmap"`` on accelerators.

Past one device the model axis is sharded over a one-axis
``jax.sharding.Mesh`` named ``"model"`` with ``jax.shard_map``: K is padded to
a multiple of the device count (repeating the last model) and the padding
dropped by the caller.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnjax import compiler
from bnjax import distributed

__all__ = ["Strategy", "STRATEGIES", "AXIS", "resolve", "stacked", "tree_index", "tree_stack",
           "make_mesh", "padded_size", "pad", "place", "sharded_jit"]

#: How a stack of models is run: ``vmap``, unrolled, or chosen by the backend
#: (``auto``).
Strategy = Literal["auto", "vmap", "unroll"]
#: The values of :data:`Strategy`.
STRATEGIES: tuple[str, ...] = get_args(Strategy)
#: The name of the model axis of the device mesh.
AXIS = "model"


def resolve(strategy: Strategy) -> str:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "auto":
    return "unroll" if jax.default_backend() == "cpu" else "vmap"
  return strategy


def tree_index(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def tree_stack(trees):
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def stacked(fn: Callable, strategy: str, in_axes=0, sequential: bool = True) -> Callable:
  """``fn`` mapped over the leading axis of its arguments (``in_axes`` as in vmap:
  0 or None per positional argument). With ``"unroll"`` and ``sequential``,
  each copy's inputs wait for the previous copy's outputs."""
  strategy = resolve(strategy)
  if strategy == "vmap":
    return jax.vmap(fn, in_axes=in_axes)

  def unrolled(*args):
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    size = {jax.tree_util.tree_leaves(a)[0].shape[0]
            for a, ax in zip(args, axes) if ax == 0 and jax.tree_util.tree_leaves(a)}
    if len(size) != 1:
      raise ValueError(f"stacked arguments disagree on the leading axis: {size}")
    outs = []
    for i in range(size.pop()):
      model_args = [tree_index(a, i) if ax == 0 else a for a, ax in zip(args, axes)]
      if outs and sequential:
        # Order model i after model i-1, so the copies run one after another
        # instead of competing for the same cores.
        _, model_args = jax.lax.optimization_barrier((outs[-1], model_args))
      outs.append(fn(*model_args))
    return tree_stack(outs)

  return unrolled


# --------------------------------------------------------------------------
# Devices


def make_mesh(devices=None) -> Mesh | None:
  """A one-axis mesh over ``devices`` (default: all), or None for one device."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) <= 1:
    return None
  return Mesh(np.array(devices), (AXIS,))


def padded_size(k: int, mesh: Mesh | None) -> int:
  """K rounded up to a multiple of the mesh's device count."""
  return k if mesh is None else -(-k // mesh.size) * mesh.size


def pad(tree, k_pad: int):
  """Pads the leading axis to ``k_pad`` by repeating the last entry."""
  def one(a):
    a = jnp.asarray(a)
    extra = k_pad - a.shape[0]
    return a if not extra else jnp.concatenate([a, jnp.repeat(a[-1:], extra, 0)])
  return jax.tree_util.tree_map(one, tree)


def place(tree, mesh: Mesh | None):
  """Every leaf sharded along its leading axis over ``mesh`` (None: as is).
  With several processes each builds its own shards from its full copy of
  the leaf (:func:`bnjax.distributed.global_array`)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P(AXIS))
  if jax.process_count() > 1:
    return jax.tree_util.tree_map(lambda a: distributed.global_array(a, sharding), tree)
  return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)


def sharded_jit(fn: Callable, mesh: Mesh | None, donate=(), xla_defaults: bool = False):
  """``compiler.jit(fn)`` with every argument and result sharded along the
  model axis of ``mesh`` (``xla_defaults``: as in :func:`bnjax.compiler.jit`)."""
  if mesh is not None:
    fn = jax.shard_map(fn, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
  return compiler.jit(fn, donate_argnums=donate, xla_defaults=xla_defaults)
