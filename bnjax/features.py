"""Features of a model at any level, for latent-space diagnostics and distances.

Works on models that sow their levels into the ``"intermediates"`` collection
as :class:`bnjax.models.UNet` does (``<tap>_pre`` before the level's last ReLU,
``<tap>_post`` after it; taps ``enc0..``, ``bottleneck``, ``dec..``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bnjax import compiler
from bnjax import data as _data
from bnjax import stacking
from bnjax.models import level_names


def available_taps(model: nn.Module, variables, image_shape) -> list[str]:
  """The taps a model sows, in forward order."""
  def fn(v):
    return model.apply(v, jnp.zeros((1, *image_shape), jnp.float32), train=False,
                       mutable=["intermediates"])[1]
  inter = jax.eval_shape(fn, variables)["intermediates"]
  names = [k[-1] for k in traverse_util.flatten_dict(inter)]
  taps = list(dict.fromkeys(n.rsplit("_", 1)[0] for n in names if n.endswith(("_pre", "_post"))))
  order = level_names(getattr(model, "depth", 0))
  return sorted(taps, key=lambda t: (order.index(t) if t in order else len(order), t))


@functools.lru_cache(maxsize=32)
def _runner(model, names, per_image, stacked, strategy):
  def one(variables, x):
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    flat = {k[-1]: v[0] for k, v in traverse_util.flatten_dict(state["intermediates"]).items()}
    return tuple(flat[n].reshape(flat[n].shape[0], -1) if per_image
                 else flat[n].reshape(-1, flat[n].shape[-1]) for n in names)
  return compiler.jit(stacking.stacked(one, strategy) if stacked else one)


def extract(model: nn.Module, variables, images, tap: str = "bottleneck",
            pre_activation: bool = False, per_image: bool = False,
            batch_size: int = 64, stacked: bool = False, strategy: str = "auto") -> np.ndarray:
  """Features at ``tap``, before (``pre_activation=True``) or after its last ReLU.

  Returns float32[N, C] with one row per spatial position of every image
  (N = n h w), or with ``per_image=True`` one h w C row per image. With
  ``stacked=True``, ``variables`` carry a leading model axis K, ``images`` are
  shared [n, ...] or per model [K, n, ...], and the result is [K, N, C].
  """
  return extract_all(model, variables, images, [tap], pre_activation, per_image,
                     batch_size, stacked, strategy)[tap]


def extract_all(model: nn.Module, variables, images, taps=None, pre_activation: bool = False,
                per_image: bool = False, batch_size: int = 64, stacked: bool = False,
                strategy: str = "auto") -> dict[str, np.ndarray]:
  """``{tap: extract(..., tap=tap, ...)}`` for several taps (default: all of
  them) from one forward pass per batch."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  first = stacking.tree_index(variables, 0) if stacked else variables
  images = jnp.asarray(images)
  per_model = stacked and images.ndim == 5
  check = images[0] if per_model else images
  _data.check_images_masks(check)
  if check.ndim == 3:
    images = images[..., None]
  available = available_taps(model, first, images.shape[-3:])
  taps = list(available if taps is None else taps)
  for tap in taps:
    if tap not in available:
      raise ValueError(f"tap must be one of {available}, got {tap!r}")
  names = tuple(f"{tap}_{'pre' if pre_activation else 'post'}" for tap in taps)
  run = _runner(model, names, bool(per_image), bool(stacked), stacking.resolve(strategy))
  n = images.shape[1] if per_model else images.shape[0]
  k = jax.tree_util.tree_leaves(variables)[0].shape[0] if stacked else None
  parts = []
  for s in range(0, n, batch_size):
    if stacked:
      x = images[:, s:s + batch_size] if per_model else jnp.broadcast_to(
          images[s:s + batch_size], (k, *images[s:s + batch_size].shape))
    else:
      x = images[s:s + batch_size]
    parts.append([np.asarray(f) for f in run(variables, x)])
  axis = 1 if stacked else 0
  return {tap: np.concatenate([p[i] for p in parts], axis=axis) for i, tap in enumerate(taps)}


def constant_dims(x, tol: float = 1e-6) -> np.ndarray:
  """bool[D]: the columns of ``x: [N, D]`` whose values are all equal
  (max - min <= ``tol`` x (1 + |mean|)), all-zero ReLU outputs included."""
  x = np.asarray(x, np.float64)
  return (x.max(0) - x.min(0)) <= tol * (1 + np.abs(x.mean(0)))


def collapse_fraction(per_image_features: np.ndarray, tol: float = 1e-6) -> float:
  """Fraction of dimensions that are constant across images
  (:func:`constant_dims`): the bottleneck "collapse" of easy tasks. Input:
  ``extract(..., per_image=True)``, or per-position features reshaped to
  [n, h w C]."""
  f = np.asarray(per_image_features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need per-image features [n >= 2, D], got {f.shape}")
  return float(np.mean(constant_dims(f, tol)))
