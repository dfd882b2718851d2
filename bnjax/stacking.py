"""Applying a per-model function to a stack of models (a leading axis).

``"vmap"`` is ``jax.vmap``. ``"unroll"`` places one copy of the function per
model in the same program, so each model keeps the single-model lowering.
On XLA:CPU a ``vmap`` over models whose convolution kernels differ lowers to
grouped convolutions that ran 3.2x slower per model than one model at a time
(U-Net width 8, 32x32, batch 32: 236 vs 73 ms per model-step), while
``"unroll"`` ran at 71 ms per model-step (BUILD_NOTES.md). ``"auto"`` picks
``"unroll"`` on CPU and ``"vmap"`` on accelerators.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

STRATEGIES = ("auto", "vmap", "unroll")


def resolve(strategy: str) -> str:
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
            for a, ax in zip(args, axes) if ax == 0}
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
