"""Features of a model at any level, for latent-space diagnostics and distances.

A tap is one of:

- a level a model sows into ``"intermediates"`` as :class:`bnjax.models.UNet`
  does (``<tap>_pre`` before the level's last ReLU, ``<tap>_post`` after it;
  taps ``enc0..``, ``bottleneck``, ``dec..``; see :func:`available_taps`);
- ``"bn_inputs"``: the input of every BatchNorm layer (any module owning
  ``batch_stats`` ``mean`` and ``var``), one feature set per layer, keyed
  ``"<layer path>:input"``, its feature axes moved last;
- a module path of any linen model (``"ResNetBlock_1/Conv_0"``; see
  :func:`module_paths`) or a regex matching module paths: the output of those
  modules' ``__call__``, read with Flax's ``capture_intermediates``.

Feature vectors are the last axis (channels-last); a lifted transform
(``nn.scan``) must carry the ``"intermediates"`` collection for taps inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bnjax import _batching
from bnjax import _checks
from bnjax import _modules as _m
from bnjax import compiler
from bnjax import stacking
from bnjax.models import level_names
from bnjax.stats import constant_dims

__all__ = ["BN_INPUTS", "available_taps", "module_paths", "extract", "extract_all",
           "collapse_fraction"]

#: The tap that reads the input of every BatchNorm layer.
BN_INPUTS = "bn_inputs"
_BN_INPUT = "bnjax_bn_input"  # the name BatchNorm inputs are sown under


def _one_example(inputs) -> tuple:
  return tuple(jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype) for a in inputs)


def _intermediates_shapes(model, variables, inputs, kwargs, capture) -> dict:
  """The shapes of the model's intermediates (traced once per model, call
  flags and shapes: a trace of a U-Net costs more than its forward pass)."""
  kw, arrays = _m.Kwargs.split(kwargs)
  shapes = lambda tree: (jax.tree_util.tree_structure(tree), tuple(
      (jnp.shape(a), jnp.result_type(a)) for a in jax.tree_util.tree_leaves(tree)))

  def build():
    def fn(v, x, a):
      return model.apply(v, *x, mutable=["intermediates"], capture_intermediates=capture,
                         **kw.join(a))[1]
    found = jax.eval_shape(fn, variables, inputs, arrays).get("intermediates", {})
    return lambda: found

  return _m.cached(model, ("intermediates_shapes", kw.key(), capture, shapes(variables),
                           shapes(inputs), shapes(arrays)), build)()


def _sown_taps(model, variables, inputs, kwargs) -> list[str]:
  inter = _intermediates_shapes(model, variables, inputs, kwargs, False)
  names = [k[-1] for k in traverse_util.flatten_dict(inter)] if inter else []
  taps = list(dict.fromkeys(n.rsplit("_", 1)[0] for n in names if n.endswith(("_pre", "_post"))))
  order = level_names(getattr(model, "depth", 0) or 0)
  return sorted(taps, key=lambda t: (order.index(t) if t in order else len(order), t))


def available_taps(model: nn.Module, variables, image_shape, apply_kwargs=None) -> list[str]:
  """The levels a model sows (``<tap>_pre`` / ``<tap>_post``), in forward
  order, for inputs of one example of ``image_shape``."""
  example = (jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),)
  return _sown_taps(model, variables, example, _m.apply_kwargs(model, apply_kwargs, 1))


def module_paths(model: nn.Module, variables, inputs, apply_kwargs=None) -> list[str]:
  """Paths (``"Block_0/Conv_1"``) of every submodule called in a forward pass
  on ``inputs`` (an array ``[n, ...]`` or a tuple of them), in call order."""
  inputs = _checks.inputs(inputs)
  kwargs = _m.apply_kwargs(model, apply_kwargs, len(inputs))
  return _module_paths(model, variables, _one_example(inputs), kwargs)


def _module_paths(model, variables, example, kwargs) -> list[str]:
  inter = _intermediates_shapes(model, variables, example, kwargs, True)
  flat = traverse_util.flatten_dict(inter) if inter else {}
  return ["/".join(k[:-1]) for k in flat if k[-1] == "__call__" and len(k) > 1]


# --------------------------------------------------------------------------
# What to read, and the forward pass that reads it


@dataclasses.dataclass(frozen=True)
class _Read:
  key: str     # the name in the result
  kind: str    # "sown", "bn" or "module"
  path: tuple  # where in "intermediates"


def _resolve(model, variables, example, kwargs, taps, pre_activation) -> list[_Read]:
  sown = _sown_taps(model, variables, example, kwargs)
  if taps is None:
    taps = sown or [BN_INPUTS]
  elif isinstance(taps, str):
    raise ValueError(f"taps must be a list of taps, got the string {taps!r}")
  layers = _m.stats_paths(variables.get("batch_stats"))
  modules = None
  reads = []
  for tap in taps:
    if tap in sown:
      reads.append(_Read(tap, "sown", (f"{tap}_{'pre' if pre_activation else 'post'}",)))
      continue
    if tap == BN_INPUTS:
      if not layers:
        raise ValueError("tap 'bn_inputs': the variables have no BatchNorm layer")
      reads += [_Read(f"{name}:input", "bn", path) for name, path in layers.items()]
      continue
    modules = modules if modules is not None else _module_paths(model, variables, example, kwargs)
    matches = [m for m in modules if m == tap] or (
        [m for m in modules if re.search(tap, m)] if isinstance(tap, str) else [])
    if not matches:
      raise ValueError(
          f"tap must be one of the sown taps {sown}, {BN_INPUTS!r}, or a module path or "
          f"regex matching one of {modules}; got {tap!r}")
    reads += [_Read(m, "module", tuple(m.split("/"))) for m in matches]
  return reads


def _bn_input_sower(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name == "__call__" and _m.owns_stats(module):
    x = _m.first_argument(next_fun, args, kwargs)
    features, _ = _m.feature_axes(module, x.ndim)
    moved = jnp.moveaxis(x, features, tuple(range(x.ndim - len(features), x.ndim)))
    module.sow("intermediates", _BN_INPUT,
               moved.reshape(*moved.shape[:x.ndim - len(features)], -1))
  return next_fun(*args, **kwargs)


def _leaf(value, where: str):
  leaves = [a for a in jax.tree_util.tree_leaves(value) if hasattr(a, "shape")]
  if not leaves:
    raise ValueError(f"tap {where!r} returned no array")
  return leaves[0]


def _runner(model, reads: tuple, kw: _m.Kwargs, per_image: bool, stacked: bool, strategy):
  def build():
    want = {r.path for r in reads if r.kind == "module"}
    capture = ((lambda mdl, method: method == "__call__" and tuple(mdl.scope.path) in want)
               if want else False)
    sow_bn = any(r.kind == "bn" for r in reads)

    def one(variables, inputs, arrays):
      context = nn.intercept_methods(_bn_input_sower) if sow_bn else contextlib.nullcontext()
      with context:
        _, state = model.apply(variables, *inputs, mutable=["intermediates"],
                               capture_intermediates=capture, **kw.join(arrays))
      flat = traverse_util.flatten_dict(state["intermediates"])
      by_name = {k[-1]: v for k, v in flat.items()}
      out = []
      for r in reads:
        if r.kind == "sown":
          a = by_name[r.path[0]][0]
        elif r.kind == "bn":
          a = flat[r.path + (_BN_INPUT,)][0]
        else:
          a = _leaf(flat[r.path + ("__call__",)][0], r.key)
        out.append(a.reshape(a.shape[0], -1) if per_image else a.reshape(-1, a.shape[-1]))
      return tuple(out)

    if not stacked:
      return compiler.jit(one)
    return compiler.jit(stacking.stacked(one, strategy, in_axes=(0, 0, None)))

  return _m.cached(model, ("features", reads, kw.key(), per_image, stacked, strategy), build)


def extract(model: nn.Module, variables, images, tap: str = "bottleneck",
            pre_activation: bool = False, per_image: bool = False,
            batch_size: int = 64, stacked: bool = False, strategy: str = "auto",
            apply_kwargs=None, image_range="auto") -> np.ndarray:
  """Features at ``tap`` (a sown level, before (``pre_activation=True``) or
  after its last ReLU; or one module path; see the module docstring).

  Returns float32[N, C] with one row per position of every example (N = n h w
  for images), or with ``per_image=True`` one row per example. With
  ``stacked=True``, ``variables`` carry a leading model axis K, ``images`` are
  shared [n, H, W, C] or per model [K, n, H, W, C], and the result is
  [K, N, C]. ``images`` may be any inputs (an array ``[n, ...]`` or a tuple)
  and ``apply_kwargs`` and ``image_range`` are as in
  :func:`bnjax.adapt.recompute_batch_stats`.
  """
  out = extract_all(model, variables, images, [tap], pre_activation, per_image,
                    batch_size, stacked, strategy, apply_kwargs, image_range)
  if len(out) != 1:
    raise ValueError(f"tap={tap!r} matches {len(out)} modules {list(out)}; pass one path, "
                     "or use extract_all for several")
  return next(iter(out.values()))


def extract_all(model: nn.Module, variables, images, taps=None, pre_activation: bool = False,
                per_image: bool = False, batch_size: int = 64, stacked: bool = False,
                strategy: str = "auto", apply_kwargs=None,
                image_range="auto") -> dict[str, np.ndarray]:
  """``{name: features}`` for several taps from one forward pass per batch.

  ``taps`` defaults to every sown level, or ``["bn_inputs"]`` for a model
  that sows none; a regex tap gives one entry per matching module path.
  """
  _checks.positive_int("batch_size", batch_size)
  first = stacking.tree_index(variables, 0) if stacked else variables
  image_range = _checks.image_range_of(model, image_range)
  if _checks.is_range(image_range):  # one set of images, checked as every image entry point does
    per_model_set = stacked and not isinstance(images, (tuple, list)) and np.ndim(images) == 5
    images = _checks.images(images, image_range=image_range, stacked=per_model_set)
  inputs = tuple(images) if isinstance(images, (tuple, list)) else (images,)
  per_model = stacked and len(inputs) == 1 and jnp.ndim(inputs[0]) == 5
  check = _checks.inputs(tuple(a[0] for a in inputs) if per_model else inputs, name="images",
                         image_range=None if _checks.is_range(image_range) else image_range)
  if not per_model:
    inputs = check
  else:
    inputs = tuple(jnp.asarray(a) for a in inputs)
  kwargs = _m.apply_kwargs(model, apply_kwargs, len(inputs))
  kw, arrays = _m.Kwargs.split(kwargs)
  reads = tuple(_resolve(model, first, _one_example(check), kwargs, taps, pre_activation))
  run = _runner(model, reads, kw, bool(per_image), bool(stacked), stacking.resolve(strategy))
  n = check[0].shape[0]
  k = jax.tree_util.tree_leaves(variables)[0].shape[0] if stacked else None
  parts = []
  for s in _batching.slices(n, batch_size):
    if per_model:
      x = tuple(a[:, s] for a in inputs)
    elif stacked:
      x = tuple(jnp.broadcast_to(a[s], (k, *a[s].shape)) for a in inputs)
    else:
      x = tuple(a[s] for a in inputs)
    parts.append([np.asarray(f) for f in run(variables, x, arrays)])
  axis = 1 if stacked else 0
  return {r.key: np.concatenate([p[i] for p in parts], axis=axis) for i, r in enumerate(reads)}


def collapse_fraction(per_image_features: np.ndarray, tol: float = 1e-6) -> float:
  """Fraction of dimensions that are constant across images
  (:func:`bnjax.stats.constant_dims`): the bottleneck "collapse" of easy tasks. Input:
  ``extract(..., per_image=True)``, or per-position features reshaped to
  [n, h w C]."""
  f = np.asarray(per_image_features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need per-image features [n >= 2, D], got {f.shape}")
  return float(np.mean(constant_dims(f, tol)))
