"""Batched passes over a set of examples, in one place (private).

``padded_map`` is the in-graph form (one compiled shape: the set padded to a
multiple of the batch, ``lax.map`` over the batches, the padding dropped);
``slices`` the host-side form for passes whose batches are separate calls;
``epoch_batches`` the batches of training passes, epoch after epoch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np


def slices(n: int, size: int) -> Iterator[slice]:
  """``slice``s of at most ``size`` consecutive examples covering ``range(n)``."""
  for start in range(0, n, size):
    yield slice(start, min(start + size, n))


def padded_map(fn: Callable, arrays, batch_size: int):
  """``fn`` on batches of ``batch_size`` examples (the leading axis of every leaf
  of ``arrays``); returns ``fn``'s per-example outputs (leading axis = examples,
  in order), as if ``fn`` had seen the whole set at once. The last batch is
  padded with copies of example 0, whose outputs are dropped. Traceable."""
  leaves = jax.tree_util.tree_leaves(arrays)
  n = leaves[0].shape[0]
  chunks = -(-n // batch_size)
  pad = chunks * batch_size - n

  def split(a):
    if pad:
      a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))])
    return a.reshape(chunks, batch_size, *a.shape[1:])

  out = jax.lax.map(fn, jax.tree_util.tree_map(split, arrays))
  return jax.tree_util.tree_map(lambda o: o.reshape(chunks * batch_size, *o.shape[2:])[:n], out)


def epoch_batches(permutation: Callable[[int], Any], n: int, batch_size: int, steps: int,
                  xp=np):
  """int[steps, batch_size]: the batches of consecutive epochs over ``n``
  examples, epoch ``e`` in the order ``permutation(e)`` (called for e = 0, 1,
  ... in turn), the tail of an epoch that does not fill a batch dropped."""
  per_epoch = n // batch_size
  orders = [permutation(e)[: per_epoch * batch_size] for e in range(-(-steps // per_epoch))]
  return xp.concatenate(orders).reshape(-1, batch_size)[:steps]
