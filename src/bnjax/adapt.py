"""Batch-Norm adaptation ("AdaBN", :cite:t:`li2017adabn`, arXiv:1603.04779): keep every
weight of a trained model and recompute the statistics of its BatchNorm layers
on unlabelled target inputs.

:func:`recompute_batch_stats` is a pure function ``variables -> variables`` for
any Flax linen model, and :func:`recompute_batch_stats_nnx` its counterpart for
Flax NNX modules. A BatchNorm layer is any module that owns ``batch_stats``
variables ``mean`` and ``var`` (NNX: ``nnx.BatchStat`` attributes ``mean`` and
``var``): ``nn.BatchNorm``, its subclasses and forks with that layout
(``is_batch_norm=`` overrides the test). bnjax never re-implements the layer's
arithmetic. It intercepts each call, computes the moments of the layer's
input (honouring ``mask=``, any ``axis`` and any rank), puts the statistics a
mode needs into the layer's ``mean``/``var`` and lets the layer normalise
itself in eval mode, so custom epsilons, dtypes and forks behave as their
authors wrote them, and lifted transforms (``nn.remat``, ``nn.scan``) work
because the moments travel through the ``batch_stats`` collection, not Python
state. A layer that nevertheless updates its statistics (it ran in train
mode) is an error.

The model runs as ``model.apply(variables, *inputs, **apply_kwargs)``;
``apply_kwargs`` defaults to ``{"train": False}`` when the model's
``__call__`` has a ``train`` parameter and to ``{}`` otherwise.

Modes (``n`` target examples):

``"exact"``
  Self-consistent population statistics: every layer's stored mean and biased
  variance are those of its input over all ``n`` examples when the model runs
  in eval mode with the adapted statistics. When the inputs fit in one chunk
  (``batch_size >= n``) this takes one forward pass (each layer normalises
  with the whole-set moments of its input, which are then stored). Otherwise
  the layers are estimated one at a time in the order the forward pass calls
  them (a layer's input depends only on the layers called before it, whose
  statistics are final by then): one pass over the chunks per layer, each
  compiled to stop at its layer, so the set costs about the sum of the
  forward prefixes (8.5 forward passes for the width-8 U-Net, 18 layers, in
  chunks of 64) instead of a full pass per layer. Under ``jax.jit`` and for
  layers with several statistics vectors (``nn.scan``) the full passes are
  repeated instead, every pass using the previous pass's statistics, until
  nothing changes (a layer whose upstream BatchNorm chain is ``d`` layers long
  is exact after ``d + 1`` passes).
``"train_pass"``
  One pass in train mode (each mini-batch normalised with its own moments)
  over mini-batches of ``batch_size``; per-batch moments are combined exactly
  by the law of total variance, so it equals ``"exact"`` when
  ``batch_size >= n``.
``"ema"``
  The original protocol with PyTorch's semantics: batches of ``batch_size``
  (default 1) in the given order, each normalised with its own moments, and
  ``running = (1 - momentum) * running + momentum * batch`` starting from the
  source statistics, the running variance updated with the *unbiased* batch
  variance (``momentum=0.1`` is PyTorch's default; Flax's equivalent would be
  ``nn.BatchNorm(momentum=0.9)``).

Options: ``alpha`` mixes ``alpha * target + (1 - alpha) * source``;
``prior=N`` sets ``alpha = n / (n + N)`` for ``n`` target examples, the source
statistics acting as ``N`` prior examples (:cite:t:`schneider2020covariate`,
"Improving robustness against common corruptions by covariate shift
adaptation", eq. 2: ``N = 0`` is full adaptation, large ``N`` keeps the source);
``layers`` restricts adaptation to the BatchNorm layers whose path
(``"enc0/bn1"``) matches; ``stats`` replaces the ``"mean"``, the ``"var"`` or
``"both"``. In ``"exact"`` mode the mixed statistics are the ones used
downstream (the fixed point includes the mixing); in ``"train_pass"`` and
``"ema"`` the selected layers run in train mode and the others in eval mode,
and the mixing is applied to the result.

Under ``jax.jit`` every mode traces; input checks that need values (NaN) are
skipped, and chunked ``"exact"`` runs its worst-case number of full passes.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Literal

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
from bnjax._modules import layer_stats
from bnjax._modules import stats_of as _stats_of

__all__ = ["recompute_batch_stats", "recompute_batch_stats_nnx",
           "recompute_batch_stats_stacked", "batch_stats_paths", "layer_stats",
           "add_class_stats", "recompute_balanced_stats", "class_weights", "appearance_gap",
           "MODES", "STATS", "CLASS_STATS"]

Mode = Literal["exact", "train_pass", "ema"]
Stats = Literal["mean", "var", "both"]
#: How the target statistics are computed (``mode=``): exact population statistics, one
#: train-mode pass, or an EMA.
MODES: tuple[str, ...] = ("exact", "train_pass", "ema")
#: Which statistics are replaced (``stats=``).
STATS: tuple[str, ...] = ("mean", "var", "both")
DEFAULT_BATCH_SIZE = {"exact": 256, "train_pass": 32, "ema": 1}

# While set (a list), every BatchNorm call appends its layer's name: the call
# order of a traced forward pass (exact adaptation in chunks, layer by layer).
_CALL_ORDER: contextvars.ContextVar = contextvars.ContextVar("bnjax_call_order", default=None)

# Where a pass leaves each layer's input moments: extra batch_stats variables
# beside the layer's mean/var, so lifted transforms carry them like the stats.
_RECORD = ("bnjax_mean", "bnjax_var", "bnjax_count")


# --------------------------------------------------------------------------
# One BatchNorm call: moments of the input, statistics put, the layer's own call


@dataclasses.dataclass(frozen=True)
class _Policy:
  """What the layers of one forward pass normalise with.

  ``"record"``: their stored statistics; ``"choose"``: selected layers their
  input moments mixed with their stored statistics; ``"batch"``: selected
  layers their input moments (train mode). Every layer records its input moments.
  """

  kind: str
  selected: frozenset
  alpha: float = 1.0
  stats: str = "both"


def _policies(selected, alpha: float, stats: str) -> dict[str, _Policy]:
  """The policy of each kind of pass for one adaptation."""
  chosen = frozenset(selected)
  return {"choose": _Policy("choose", chosen, float(alpha), stats),
          "record": _Policy("record", chosen), "batch": _Policy("batch", chosen)}


def _moments(x, reduction, mask):
  """Mean, biased variance (two-pass, at least float32) and count of the
  values over ``reduction`` axes, only where ``mask`` (broadcast to ``x``)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if mask is None:
    count = math.prod(x.shape[i] for i in reduction)
    mean = jnp.mean(x, axis=reduction)
    var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, reduction)), axis=reduction)
    return mean, var, jnp.full(mean.shape, count, jnp.int32)
  w = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
  count = jnp.sum(w, axis=reduction, dtype=jnp.int32)
  mean = jnp.sum(jnp.where(w, x, 0), axis=reduction) / count
  dev = jnp.where(w, jnp.square(x - jnp.expand_dims(mean, reduction)), 0)
  return mean, jnp.sum(dev, axis=reduction) / count, count


def _mix(mean, var, src_mean, src_var, alpha: float, stats: str):
  """The statistics to store: ``alpha`` target + (1 - alpha) source, per ``stats``."""
  mean = alpha * mean + (1 - alpha) * src_mean if stats in ("mean", "both") else src_mean
  var = alpha * var + (1 - alpha) * src_var if stats in ("var", "both") else src_var
  return mean, var


def _adapting_call(layer, module, fn, args, kwargs, policy: _Policy):
  """Calls BatchNorm ``module`` through ``fn(*args, **kwargs)`` with the
  statistics ``policy`` asks for and records its input moments (``layer``
  reads and writes the module's variables, linen or NNX)."""
  x, mask = _m.first_argument(fn, args, kwargs, "mask")
  order = _CALL_ORDER.get()
  if order is not None:
    order.append(layer.name)
  src_mean, src_var = layer.stored()
  _, reduction = _m.feature_axes(module, x.ndim)
  mean, var, count = _moments(x, reduction, mask)
  if mean.shape != src_mean.shape:
    raise ValueError(
        f"BatchNorm layer {layer.name}: the moments of its input {x.shape} over the "
        f"non-feature axes {reduction} have shape {mean.shape}, but its stored mean has "
        f"shape {src_mean.shape}; a layer without an 'axis' attribute is read as "
        "normalising over all axes but the last")
  if layer.recorded():
    raise ValueError(
        f"BatchNorm layer {layer.name} is called more than once per forward pass; "
        "shared BatchNorm layers cannot be adapted")
  chosen = layer.name in policy.selected
  if chosen and policy.kind == "choose":
    use = _mix(mean, var, src_mean, src_var, policy.alpha, policy.stats)
  elif chosen and policy.kind == "batch":
    use = (mean, var)
  else:
    use = (src_mean, src_var)
  layer.put(jnp.asarray(use[0], src_mean.dtype), jnp.asarray(use[1], src_var.dtype))
  out = fn(*args, **kwargs)
  if layer.updated():
    raise ValueError(
        f"BatchNorm layer {layer.name} updated its statistics: it ran in train mode. "
        "Adaptation runs the model in eval mode: pass the flag that selects it in "
        "apply_kwargs (linen, e.g. {'train': False}) or call_kwargs (NNX), or build the "
        "model in eval mode")
  layer.record(mean, var, count)
  return out


# --------------------------------------------------------------------------
# Linen: an interceptor over every BatchNorm call


class _LinenLayer:
  def __init__(self, module):
    self.module = module
    self.name = "/".join(module.scope.path)
    self._put = None

  def stored(self):
    return (self.module.get_variable("batch_stats", "mean"),
            self.module.get_variable("batch_stats", "var"))

  def put(self, mean, var):
    self.module.put_variable("batch_stats", "mean", mean)
    self.module.put_variable("batch_stats", "var", var)
    self._put = self.stored()

  def updated(self) -> bool:
    return any(a is not b for a, b in zip(self.stored(), self._put))

  def record(self, mean, var, count):
    for name, value in zip(_RECORD, (mean, var, count)):
      self.module.put_variable("batch_stats", name, value)

  def recorded(self) -> bool:
    return self.module.has_variable("batch_stats", _RECORD[0])


def _linen_interceptor(policy: _Policy, is_batch_norm):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or getattr(module, "scope", None) is None:
      return next_fun(*args, **kwargs)
    owns = _m.owns_stats(module)
    if is_batch_norm is not None:
      if not is_batch_norm(module):
        return next_fun(*args, **kwargs)
      if not owns:
        raise ValueError(
            f"is_batch_norm accepted {type(module).__name__} at "
            f"{'/'.join(module.scope.path)}, which owns no batch_stats 'mean' and 'var'")
    elif not owns:
      return next_fun(*args, **kwargs)
    if policy.kind in _CLASS_KINDS:
      return _class_call(_LinenLayer(module), module, next_fun, args, kwargs, policy.kind)
    return _adapting_call(_LinenLayer(module), module, next_fun, args, kwargs, policy)
  return interceptor


def _records(tree) -> dict[str, tuple]:
  """``{layer name: (mean, var, count)}`` of the records left in a stats tree."""
  flat = traverse_util.flatten_dict(tree) if tree else {}
  return {"/".join(map(str, k[:-1])): tuple(flat[k[:-1] + (r,)] for r in _RECORD)
          for k in flat if k[-1] == _RECORD[0]}


def _linen_runner(model, kind: str, policy: _Policy, kw: _m.Kwargs, is_batch_norm, strategy):
  """The jitted forward pass of ``kind`` (``"record"``, ``"choose"``,
  ``"batch"``: mapped over mini-batches), cached across calls: over stacked
  pairs mapped by ``strategy``, or (None) one model, its inputs and records
  with a pair axis of 1."""
  return _m.cached(model, ("linen", kind, policy, kw.key(), is_batch_norm, strategy),
                   lambda: compiler.jit(_linen_pass(model, kind, policy, kw, is_batch_norm,
                                                    strategy)))


def _linen_pass(model, kind: str, policy: _Policy, kw: _m.Kwargs, is_batch_norm, strategy):
  """The forward pass of :func:`_linen_runner`, not compiled."""
  interceptor = _linen_interceptor(policy, is_batch_norm)

  def one(variables, inputs, arrays):
    with nn.intercept_methods(interceptor):
      _, state = model.apply(variables, *inputs, mutable=["batch_stats"], **kw.join(arrays))
    return _records(state["batch_stats"])

  fn = one if kind != "batch" else (
      lambda v, x, a: jax.vmap(lambda xb: one(v, xb, a))(x))
  if strategy is not None:
    return stacking.stacked(fn, strategy, in_axes=(0, 0, None))
  pair = lambda t, f: jax.tree_util.tree_map(f, t)
  return lambda v, x, a: pair(fn(v, pair(x, lambda b: b[0]), a), lambda b: b[None])


def _policy_apply(model, variables, inputs, kwargs, policy: _Policy, is_batch_norm=None):
  """``(output, {layer: (mean, var, count)})``: ``model.apply(variables,
  *inputs, **kwargs)`` with the BatchNorm layers normalising as ``policy``
  says, and the moments of each layer's input (traceable; for the online
  methods of :mod:`bnjax.streams`)."""
  with nn.intercept_methods(_linen_interceptor(policy, is_batch_norm)):
    out, state = model.apply(variables, *inputs, mutable=["batch_stats"], **kwargs)
  return out, _records(state["batch_stats"])


def _batch_normalised_apply(model, variables, inputs, kwargs, is_batch_norm=None):
  """``model.apply(variables, *inputs, **kwargs)`` with every BatchNorm layer
  normalising with the moments of its input (as in train mode, gradients
  flowing through them) while the model runs as ``kwargs`` say (eval mode:
  no dropout); the stored statistics are not changed. For methods that
  optimise through batch statistics (TENT)."""
  names = _m.stats_paths(variables["batch_stats"])
  policy = _Policy("batch", frozenset(names))
  return _policy_apply(model, variables, inputs, kwargs, policy, is_batch_norm)[0]


# --------------------------------------------------------------------------
# Class-balanced statistics: each class's moments at every BatchNorm layer,
# weighted by the model's masks pooled to the layer's resolution

#: The collection of the class statistics kept with the variables
#: (:func:`add_class_stats`).
CLASS_STATS = "class_stats"
_CLASS_KINDS = ("class_record", "balanced")
# Per layer, what a "class_record" pass leaves in batch_stats: the classes'
# weights, weighted sums and weighted sums of squares.
_CLASS_SUMS = ("bnjax_class_w", "bnjax_class_wx", "bnjax_class_wxx")
# What a "balanced" pass leaves per layer: the gap between the batch's
# normalised class means and the source's.
_CLASS_GAP = "bnjax_class_gap"
# A class is present in a batch at a layer when its pooled weight reaches this
# (pixels at the layer's resolution).
_PRESENT = 0.5
# The per-call arrays of a class pass: weights float[B, H, W, K] (the masks),
# and for "balanced" the momentum of the running class moments.
_CLASS_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("bnjax_class_context",
                                                               default=None)


def class_weights(logits) -> jax.Array:
  """float[..., K]: the one-hot masks of ``logits[..., K]`` (argmax; one
  sigmoid logit is two classes, foreground where it is > 0)."""
  logits = jnp.asarray(logits)
  if logits.shape[-1] == 1:
    fg = (logits[..., 0] > 0).astype(jnp.float32)
    return jnp.stack([1.0 - fg, fg], axis=-1)
  return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


def _pooled(weights, x, name: str):
  """``weights`` [B, H, W, K] at the resolution of a layer input ``x`` [B, h,
  w, C] (average pooling when h and w divide H and W, a linear resize else),
  or per-example class shares for ``x`` [B, C]."""
  b, height, width, k = weights.shape
  if x.shape[0] != b:
    raise ValueError(f"BatchNorm layer {name}: its input {x.shape} does not start with the "
                     f"batch axis of the model's output ({b}); class-balanced statistics need it")
  if x.ndim == 2:
    return jnp.mean(weights, axis=(1, 2))
  if x.ndim != 4:
    raise ValueError(f"BatchNorm layer {name}: class-balanced statistics take inputs [B, h, w, "
                     f"C] or [B, C], got {x.shape}")
  h, w = x.shape[1], x.shape[2]
  if height % h == 0 and width % w == 0:
    return weights.reshape(b, h, height // h, w, width // w, k).mean(axis=(2, 4))
  resized = jax.image.resize(weights, (b, h, w, k), "linear")
  return resized / jnp.maximum(jnp.sum(resized, axis=-1, keepdims=True), 1e-12)


def _class_moments(x, w):
  """(weight float[K], mean float[K, C], biased variance float[K, C]) of the
  rows of ``x`` [..., C] weighted by ``w`` [..., K] (two-pass)."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.promote_types(x.dtype, jnp.float32))
  w = w.reshape(-1, w.shape[-1]).astype(x.dtype)
  weight = jnp.sum(w, axis=0)
  mean = (w.T @ x) / jnp.maximum(weight, 1e-12)[:, None]
  var = jnp.einsum("nk,nkc->kc", w, jnp.square(x[:, None, :] - mean[None])) / jnp.maximum(
      weight, 1e-12)[:, None]
  return weight, mean, var


def _class_sums(x, w):
  """(sum w float[K], sum w x float[K, C], sum w x^2 float[K, C]) of the rows
  of ``x`` [..., C] weighted by ``w`` [..., K]: what a chunk adds to a
  class's moments."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  w = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
  return jnp.sum(w, axis=0), w.T @ x, w.T @ jnp.square(x)


def _moments_of_sums(w, wx, wxx, mean_else, var_else):
  """Each class's mean and biased variance from its summed weights (NumPy);
  a class of weight 0 gets ``mean_else`` and ``var_else``."""
  safe = np.maximum(w, 1e-12)[:, None]
  mean = np.where(w[:, None] > 0, wx / safe, mean_else)
  return mean, np.where(w[:, None] > 0, np.maximum(wxx / safe - mean ** 2, 0.0), var_else)


def _recombine(mean, var, proportions):
  """The mixture's mean and variance: the classes' moments weighted by
  ``proportions``."""
  p = proportions[:, None]
  mu = jnp.sum(p * mean, axis=0)
  return mu, jnp.maximum(jnp.sum(p * (var + jnp.square(mean)), axis=0) - jnp.square(mu), 0.0)


def _class_call(layer, module, fn, args, kwargs, kind: str):
  """One BatchNorm call of a class pass. ``"class_record"``: the layer
  normalises with its stored statistics and records its input's per-class
  weighted sums. ``"balanced"``: its running class moments (from
  ``class_stats``, the source's at first) move towards the batch's by the
  momentum (classes absent from the batch stay), are recombined with the
  source's class proportions, and the layer normalises with the result;
  the new running moments and the gap between the batch's normalised class
  means and the source's are recorded."""
  x, mask = _m.first_argument(fn, args, kwargs, "mask")
  features, _ = _m.feature_axes(module, x.ndim)
  if features != (x.ndim - 1,) or mask is not None:
    raise ValueError(f"BatchNorm layer {layer.name}: class-balanced statistics need the "
                     "features on the last axis and no mask=")
  if layer.recorded():
    raise ValueError(f"BatchNorm layer {layer.name} is called more than once per forward pass; "
                     "shared BatchNorm layers cannot be adapted")
  ctx = _CLASS_CONTEXT.get()
  w = _pooled(ctx["weights"], x, layer.name)
  src_mean, src_var = layer.stored()
  if kind == "class_record":
    out = fn(*args, **kwargs)
    for name, value in zip(_CLASS_SUMS, _class_sums(x, w)):
      module.put_variable("batch_stats", name, value)
    layer.record(src_mean, src_var, jnp.zeros(src_mean.shape, jnp.int32))
    return out
  weight, mean, var = _class_moments(x, w)
  if not module.has_variable(CLASS_STATS, "class_mean"):
    raise ValueError(f"BatchNorm layer {layer.name} has no class statistics; measure them once "
                     "on source images: variables = bnjax.adapt.add_class_stats(model, "
                     "variables, source_images)")
  get = lambda n: module.get_variable(CLASS_STATS, n)
  run_mean = get("running_mean") if module.has_variable(CLASS_STATS, "running_mean") else get(
      "class_mean")
  run_var = get("running_var") if module.has_variable(CLASS_STATS, "running_var") else get(
      "class_var")
  present = weight >= _PRESENT
  a = jnp.where(present, ctx["momentum"], 0.0)[:, None]
  new_mean = (1 - a) * run_mean + a * mean
  second = (1 - a) * (run_var + jnp.square(run_mean)) + a * (var + jnp.square(mean))
  new_var = jnp.maximum(second - jnp.square(new_mean), 0.0)
  mu, sigma2 = _recombine(new_mean, new_var, ctx["proportions"])
  layer.put(jnp.asarray(mu, src_mean.dtype), jnp.asarray(sigma2, src_var.dtype))
  out = fn(*args, **kwargs)
  if layer.updated():
    raise ValueError(f"BatchNorm layer {layer.name} updated its statistics: it ran in train "
                     "mode; pass the flag that selects eval mode in apply_kwargs")
  eps = float(getattr(module, "epsilon", 1e-5))
  z = (mean - mu) / jnp.sqrt(sigma2 + eps)
  z_src = (get("class_mean") - get("mean")) / jnp.sqrt(get("var") + eps)
  p = ctx["proportions"] * present
  gap = jnp.sum(p * jnp.mean(jnp.square(z - z_src), axis=-1)) / jnp.maximum(jnp.sum(p), 1e-12)
  module.put_variable(CLASS_STATS, "running_mean", new_mean)
  module.put_variable(CLASS_STATS, "running_var", new_var)
  module.put_variable("batch_stats", _CLASS_GAP, gap)
  layer.record(mu, sigma2, jnp.zeros(src_mean.shape, jnp.int32))
  return out


def _class_apply(model, variables, inputs, kwargs, kind: str, weights, momentum=None,
                 is_batch_norm=None):
  """``(output, state)`` of a class pass (``kind`` in ``_CLASS_KINDS``):
  ``model.apply`` with the pass's interceptor, ``weights`` [B, H, W, K] the
  masks, and ``state`` the mutated ``batch_stats`` (records) and
  ``class_stats`` (running moments). Traceable."""
  proportions = None
  if kind == "balanced":
    proportions = variables[CLASS_STATS]["proportions"]
    if proportions.shape[-1] != weights.shape[-1]:
      raise ValueError(f"the class statistics are of {proportions.shape[-1]} classes, the "
                       f"model's output of {weights.shape[-1]}")
  token = _CLASS_CONTEXT.set({"weights": weights, "momentum": momentum,
                              "proportions": proportions})
  try:
    with nn.intercept_methods(_linen_interceptor(_Policy(kind, frozenset()), is_batch_norm)):
      return model.apply(variables, *inputs, mutable=["batch_stats", CLASS_STATS], **kwargs)
  finally:
    _CLASS_CONTEXT.reset(token)


def _layer_values(tree, name: str) -> dict[str, Any]:
  """``{layer path: value}`` of the variable ``name`` left in a stats tree."""
  flat = traverse_util.flatten_dict(tree) if tree else {}
  return {"/".join(map(str, k[:-1])): v for k, v in flat.items() if k[-1] == name}


def _balanced(model, variables, inputs, kwargs, logits, momentum, is_batch_norm=None):
  """One balanced pass from the masks of ``logits``: (its logits, the new
  ``class_stats``, the mean gap over the layers, the statistics each layer
  normalised with ``{name: (mean, var)}``)."""
  out, state = _class_apply(model, variables, inputs, kwargs, "balanced", class_weights(logits),
                            momentum, is_batch_norm)
  gaps = _layer_values(state["batch_stats"], _CLASS_GAP)
  used = {name: rec[:2] for name, rec in _records(state["batch_stats"]).items()}
  classes = {**variables[CLASS_STATS], **state[CLASS_STATS]}
  return out, classes, sum(gaps.values()) / max(len(gaps), 1), used


def _balanced_choice(model, variables, inputs, kwargs, momentum, is_batch_norm=None):
  """The class-balanced step: two balanced passes, one from the source
  model's masks (its stored statistics) and one from test-time BN's (the
  batch's own moments), and the one whose normalised class means are closer
  to the source's (the smaller gap). Returns (logits, class_stats,
  used statistics, whether the source's masks were chosen)."""
  names = frozenset(_m.stats_paths(variables["batch_stats"]))
  stats_only = _stats_only(variables)
  src_logits = model.apply(stats_only, *inputs, **kwargs)
  bn_logits, _ = _policy_apply(model, stats_only, inputs, kwargs, _Policy("choose", names),
                               is_batch_norm)
  a = _balanced(model, variables, inputs, kwargs, src_logits, momentum, is_batch_norm)
  b = _balanced(model, variables, inputs, kwargs, bn_logits, momentum, is_batch_norm)
  first = a[2] <= b[2]
  pick = lambda u, v: jax.tree_util.tree_map(lambda p, q: jnp.where(first, p, q), u, v)
  return pick(a[0], b[0]), pick(a[1], b[1]), pick(a[3], b[3]), first


# --------------------------------------------------------------------------
# Statistics as flat {name: (mean, var)} dicts; arrays carry a leading pair axis


def _nest_stats(template, paths, flat: dict[str, tuple], index: int | None = None) -> Any:
  """``template`` (a batch_stats tree) with the given layers' mean/var replaced
  (by entry ``index`` of the pair axis, if given)."""
  out = traverse_util.flatten_dict(template)
  for name, (mean, var) in flat.items():
    for leaf, value in (("mean", mean), ("var", var)):
      old = out[paths[name] + (leaf,)]
      out[paths[name] + (leaf,)] = jnp.asarray(value if index is None else value[index],
                                               old.dtype)
  return traverse_util.unflatten_dict(out)


def _combine(counts, means, variances, xp):
  """Whole-set mean and biased variance from per-part ones along axis 0
  (law of total variance); parts with no values are skipped."""
  dt = np.float64 if xp is np else jnp.float32
  c, m, v = (xp.asarray(a, dt) for a in (counts, means, variances))
  total = c.sum(0)
  has = c > 0
  mean = xp.where(has, c * m, 0).sum(0) / total
  var = xp.where(has, c * (v + (m - mean) ** 2), 0).sum(0) / total
  return mean, var


def _ema(src_mean, src_var, counts, means, variances, momentum: float, xp):
  """PyTorch's running averages after the batches along axis 1 (in order):
  closed form of ``r = (1 - m) r + m b`` with unbiased batch variances."""
  dt = np.float64 if xp is np else jnp.float32
  c, m, v = (xp.asarray(a, dt) for a in (counts, means, variances))
  steps = m.shape[1]
  w = momentum * (1 - momentum) ** xp.arange(steps - 1, -1, -1, dtype=dt)
  w = w.reshape(1, steps, *[1] * (m.ndim - 2))
  keep = (1 - momentum) ** steps
  mean = keep * xp.asarray(src_mean, dt) + (w * m).sum(1)
  var = keep * xp.asarray(src_var, dt) + (w * v * c / (c - 1)).sum(1)
  return mean, var


# --------------------------------------------------------------------------
# Option and input handling


def _selector(layers) -> Callable[[str], bool]:
  if layers is None:
    return lambda name: True
  if callable(layers):
    return lambda name: bool(layers(name))
  patterns = [layers] if isinstance(layers, str) else list(layers)
  if not patterns or not all(isinstance(p, str) for p in patterns):
    raise ValueError(
        f"layers must be a regex, a list of regexes or a callable, got {layers!r}")
  compiled = [re.compile(p) for p in patterns]
  return lambda name: any(c.search(name) for c in compiled)


def _prior_alpha(alpha, prior, n: int) -> float:
  """``alpha``, or ``n / (n + prior)`` when a prior strength is given."""
  if prior is None:
    return alpha
  prior = _checks.number("prior", prior,
                         what=", the source statistics' weight in examples, or None")
  if float(alpha) != 1.0:
    raise ValueError(f"pass alpha or prior, not both (got alpha={alpha}, prior={prior})")
  return n / (n + prior)


def _check_options(mode, batch_size, momentum, alpha, stats):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if stats not in STATS:
    raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if not 0.0 < float(momentum) <= 1.0:
    raise ValueError(f"momentum must be in (0, 1], got {momentum}")
  if batch_size is not None and (
      isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size < 1):
    raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")


def _no_layer_error(model, variables, inputs, kwargs):
  """The ValueError for variables without BatchNorm statistics: either the
  model has no BatchNorm layer or its ``batch_stats`` were left out."""
  if not isinstance(variables, Mapping):
    return ValueError(f"variables must be a dict of collections, got {type(variables).__name__}")
  try:
    rngs = {"params": jax.random.key(0), **dict(kwargs.get("rngs", {}))}
    call = {k: v for k, v in kwargs.items() if k != "rngs"}
    example = tuple(a[:1] for a in inputs)
    shapes = jax.eval_shape(lambda: model.init(rngs, *example, **call))
    has_bn = bool(_m.stats_paths(shapes.get("batch_stats")))
  except Exception:  # the model cannot be initialised this way: say both
    return ValueError(
        "variables have no 'batch_stats' with BatchNorm 'mean'/'var': the model has no "
        "BatchNorm layer, or the variables lack their 'batch_stats' collection")
  if has_bn:
    return ValueError(
        f"variables have no BatchNorm statistics (collections: {sorted(variables)}), but "
        "the model has BatchNorm layers: pass the whole variables dict "
        "{'params': ..., 'batch_stats': ...}, not the params alone")
  return ValueError("the model has no BatchNorm layer (no 'batch_stats' with 'mean' and 'var')")


# --------------------------------------------------------------------------
# The modes, on P (model, input set) pairs, for linen or NNX


@dataclasses.dataclass
class _Target:
  """What the modes need of a model: ``run(kind)`` is a forward pass
  ``(state, inputs [P, m, ...], arrays) -> {name: (mean, var, count)}`` with a
  leading P axis (``raw(kind)`` the same, not compiled, to trace);
  ``with_stats(state, {name: (mean, var)})`` a state whose layers use those
  statistics; ``source`` the given statistics."""

  run: Callable[[str], Callable]
  with_stats: Callable
  state: Any
  source: dict
  arrays: list
  raw: Callable[[str], Callable] | None = None


def _take(inputs, s: slice):
  return tuple(a[:, s] for a in inputs)


def _pass(target, kind, state, inputs, xp):
  out = target.run(kind)(state, inputs, target.arrays)
  return out if xp is jnp else jax.device_get(out)


def _check_called(records, selected):
  missing = sorted(set(selected) - set(records))
  if len(missing) == len(selected):
    raise ValueError(
        f"none of the BatchNorm layers {sorted(selected)} was called as one in a forward "
        "pass (is_batch_norm rejected them, or the model does not use them)")
  if missing:
    warnings.warn(f"BatchNorm layers {missing} did not run as BatchNorm layers in the "
                  "forward pass (not called, or rejected by is_batch_norm); their statistics "
                  "are kept", stacklevel=4)
  return [p for p in selected if p in records]


def _exact(target, inputs, n, chunk, selected, mix, xp):
  if chunk >= n:  # one pass: each layer normalises with its whole-set statistics
    records = _pass(target, "choose", target.state, inputs, xp)
    return {p: mix(p, *records[p][:2]) for p in _check_called(records, selected)}
  nested = any(math.prod(target.source[p][0].shape[1:-1]) > 1 for p in selected)
  if xp is np and target.raw is not None and not nested:
    return _exact_by_layer(target, inputs, n, chunk, selected, mix)

  # At most one pass per BatchNorm statistics vector (a scanned layer holds several).
  passes = sum(max(1, math.prod(target.source[p][0].shape[1:-1])) for p in selected)
  current = {p: target.source[p] for p in selected}
  called = None
  for _ in range(passes):
    state = target.with_stats(target.state, current)
    parts = [_pass(target, "record", state, _take(inputs, s), xp) for s in _batching.slices(n, chunk)]
    called = called or _check_called(parts[0], selected)
    new = dict(current)
    for p in called:
      counts, means, variances = ([part[p][i] for part in parts] for i in (2, 0, 1))
      new[p] = mix(p, *_combine(counts, means, variances, xp))
    # Stored statistics are float32: compare at that precision.
    unchanged = xp is np and all(
        np.array_equal(np.float32(new[p][i]), np.float32(current[p][i]))
        for p in called for i in (0, 1))
    current = new
    if unchanged:
      break
  return current


def _exact_by_layer(target, inputs, n, chunk, selected, mix):
  """Chunked ``"exact"``, one layer at a time in call order: a layer's input
  depends only on the layers called before it, whose statistics are final by
  then, so its moments over all chunks are exact at once. Each pass returns
  only that layer's moments, and the compiled program stops there (the rest
  of the network is dead code to XLA): about half the work of the repeated
  full passes, at one compiled program per layer."""
  order = _call_order(target, _take(inputs, slice(0, chunk)))
  called = _check_called(dict.fromkeys(order), selected)
  current = {p: target.source[p] for p in selected}
  run = target.run("record")
  for p in (q for q in order if q in called):
    state = target.with_stats(target.state, current)
    layer = _layer_pass(run, p)
    parts = [jax.device_get(layer(state, _take(inputs, s), target.arrays))
             for s in _batching.slices(n, chunk)]
    counts, means, variances = ([part[i] for part in parts] for i in (2, 0, 1))
    current[p] = mix(p, *_combine(counts, means, variances, np))
  return current


_ORDERS: dict = {}


def _call_order(target, inputs) -> list[str]:
  """The BatchNorm layers in the order a forward pass calls them (traced,
  not run; remembered per compiled pass and argument shapes, so a second
  call with the same shapes traces nothing)."""
  args = (target.state, inputs, target.arrays)
  key = (target.run("record"), jax.tree_util.tree_structure(args),
         tuple((tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", type(a))))
               for a in jax.tree_util.tree_leaves(args)))
  if key not in _ORDERS:
    if len(_ORDERS) >= 1024:
      _ORDERS.clear()
    _ORDERS[key] = _trace_order(target, inputs)
  return _ORDERS[key]


def _trace_order(target, inputs) -> list[str]:
  names: list[str] = []
  token = _CALL_ORDER.set(names)
  try:
    jax.eval_shape(target.raw("record"), target.state, inputs, target.arrays)
  finally:
    _CALL_ORDER.reset(token)
  return list(dict.fromkeys(names))  # unrolled pairs trace the model once per pair


@functools.lru_cache(maxsize=1024)
def _layer_pass(run, name: str):
  """``run`` (a compiled pass of every layer's moments) returning only layer
  ``name``'s: compiled, it computes nothing downstream of that layer."""
  return compiler.jit(lambda state, inputs, arrays: run(state, inputs, arrays)[name])


def _batch_records(target, inputs, n, batch_size, xp):
  """Per-mini-batch records of every layer, batches in order along axis 1."""
  full = n // batch_size
  pieces = []
  group = max(1, 256 // batch_size)  # mini-batches per forward call
  for s in _batching.slices(full, group):
    x = tuple(a[:, s.start * batch_size:s.stop * batch_size] for a in inputs)
    x = tuple(a.reshape(a.shape[0], s.stop - s.start, batch_size, *a.shape[2:]) for a in x)
    pieces.append(_pass(target, "batch", target.state, x, xp))
  if n % batch_size:
    x = tuple(a[:, full * batch_size:, None].swapaxes(1, 2) for a in inputs)
    pieces.append(_pass(target, "batch", target.state, x, xp))
  return {p: tuple(xp.concatenate([r[p][i] for r in pieces], axis=1) for i in range(3))
          for p in pieces[0]}


def _adapt(target: _Target, inputs, mode, batch_size, momentum, alpha, stats, selected):
  """The adapted ``{name: (mean, var)}`` of the selected layers (leading P axis)."""
  xp = jnp if _checks.is_traced((target.state, inputs, target.arrays)) else np
  if xp is np:  # combine on the host in float64
    target = dataclasses.replace(target, source={
        p: tuple(np.asarray(a, np.float64) for a in s)
        for p, s in jax.device_get(target.source).items()})
  n = inputs[0].shape[1]
  batch_size = int(batch_size or DEFAULT_BATCH_SIZE[mode])
  mix = lambda p, mean, var: _mix(mean, var, *target.source[p], alpha, stats)
  if mode == "exact":
    return _exact(target, inputs, n, batch_size, selected, mix, xp)

  records = _batch_records(target, inputs, n, batch_size, xp)
  result = {}
  for p in _check_called(records, selected):
    means, variances, counts = records[p]  # [P, batches, ...]
    if mode == "train_pass":
      result[p] = mix(p, *_combine(*(a.swapaxes(0, 1) for a in (counts, means, variances)), xp))
      continue
    if xp is np and np.any(counts < 2):
      raise ValueError(
          f"mode='ema' needs at least 2 values per channel per batch for the unbiased "
          f"variance; layer {p} sees {int(counts.min())}: raise batch_size")
    result[p] = mix(p, *_ema(*target.source[p], counts, means, variances, momentum, xp))
  return result


def _selected(names, layers) -> list[str]:
  keep = _selector(layers)
  selected = [p for p in names if keep(p)]
  if not selected:
    raise ValueError(f"layers={layers!r} matches no BatchNorm layer; the layers are "
                     f"{sorted(names)}")
  return selected


# --------------------------------------------------------------------------
# Public functions


def recompute_batch_stats(model: nn.Module, variables: Mapping, inputs, mode: Mode = "exact",
                          batch_size: int | None = None, momentum: float = 0.1,
                          alpha: float = 1.0,
                          layers: str | Iterable[str] | Callable | None = None,
                          stats: Stats = "both", apply_kwargs: Mapping | None = None,
                          is_batch_norm: Callable[[nn.Module], bool] | None = None,
                          prior: float | None = None, image_range="auto") -> dict:
  """Adapts the BatchNorm statistics of ``variables`` to ``inputs``.

  Args:
    model: any linen model with BatchNorm layers (see the module docstring).
    variables: ``{"params": ..., "batch_stats": ..., ...}``.
    inputs: the target inputs, never their labels: an array ``[n, ...]`` of any
      rank, or a tuple of arrays sharing the leading axis ``n`` (the model is
      called as ``model.apply(variables, *chunk, **apply_kwargs)``, every array
      sliced alike).
    mode: ``"exact"``, ``"train_pass"`` or ``"ema"`` (see the module docstring).
    batch_size: examples per forward pass. For ``"exact"`` only memory depends
      on it (default 256); for ``"train_pass"`` (default 32) and ``"ema"``
      (default 1) it is the mini-batch size and changes the result.
    momentum: ``"ema"`` only: weight of the new batch (PyTorch convention).
    alpha: weight of the target statistics, in [0, 1].
    prior: the source statistics' weight in examples ``N`` (Schneider et al.
      2020): ``alpha = n / (n + N)`` for ``n`` target examples; excludes ``alpha``.
    layers: regex (or list of regexes, or predicate on the path string such as
      ``"enc0/bn1"``) selecting the layers to adapt; default all.
    stats: ``"mean"``, ``"var"`` or ``"both"``.
    apply_kwargs: keyword arguments of ``model.apply`` (any pytree: arrays,
      ``rngs``, flags; default ``{"train": False}`` if the model's ``__call__``
      takes ``train``, else ``{}``).
    is_batch_norm: predicate on a bound module overriding which modules are
      BatchNorm layers (default: those owning ``batch_stats`` mean and var).
    image_range: ``"auto"``: a model whose class declares ``IMAGE_RANGE``
      (bnjax's :class:`~bnjax.models.UNet`: [0, 1]) gets its inputs checked
      as one set of images, as :func:`bnjax.inference.predict` checks them (float, in
      that range, ``[n, H, W]`` given a channel, one image or an
      ``(images, masks)`` tuple refused); other models take inputs of any
      kind except 8-bit images (an image-shaped ``[n, H, W, C]`` input, at
      most 4 channels, of integers or of floats in [0, 255] with values
      above 2 is refused: the one rule of :ref:`image-scale`).
      ``(low, high)`` checks images against that range, None checks no
      range (say so for a model that takes 0-255 values).

  Returns:
    New variables: the same ``params`` object (untouched) and a new
    ``batch_stats`` collection.
  """
  _check_options(mode, batch_size, momentum, alpha, stats)
  inputs = _checks.inputs(inputs, lead=1, image_range=_checks.image_range_of(model, image_range))
  alpha = _prior_alpha(alpha, prior, inputs[0].shape[0])
  kwargs = _m.apply_kwargs(model, apply_kwargs, len(inputs))
  paths = _m.stats_paths(variables.get("batch_stats") if isinstance(variables, Mapping) else None)
  if not paths:
    raise _no_layer_error(model, variables, inputs, kwargs)
  with _m.inputs_fit("inputs", inputs):
    return _adapt_linen(model, variables, tuple(a[None] for a in inputs), mode, batch_size,
                        momentum, alpha, layers, stats, kwargs, is_batch_norm, None)


def recompute_batch_stats_stacked(model: nn.Module, variables: Mapping, inputs, *,
                                  mode: Mode = "exact", batch_size: int | None = None,
                                  momentum: float = 0.1, alpha: float = 1.0,
                                  layers=None, stats: Stats = "both",
                                  apply_kwargs: Mapping | None = None,
                                  is_batch_norm=None, strategy: str = "auto",
                                  prior: float | None = None, image_range="auto") -> dict:
  """:func:`recompute_batch_stats` for P pairs at once: every leaf of
  ``variables`` and of ``inputs`` (``[P, n, ...]``, or a tuple of such) has a
  leading axis P; pair i adapts model i to input set i. ``strategy`` is how
  the pairs are mapped (:mod:`bnjax.stacking`)."""
  _check_options(mode, batch_size, momentum, alpha, stats)
  inputs = _checks.inputs(inputs, lead=2, image_range=_checks.image_range_of(model, image_range))
  alpha = _prior_alpha(alpha, prior, inputs[0].shape[1])
  kwargs = _m.apply_kwargs(model, apply_kwargs, len(inputs))
  if not _m.stats_paths(variables.get("batch_stats") if isinstance(variables, Mapping) else None):
    raise _no_layer_error(model, jax.tree_util.tree_map(lambda a: a[0], variables),
                          tuple(a[0] for a in inputs), kwargs)
  return _adapt_linen(model, variables, inputs, mode, batch_size, momentum, alpha, layers,
                      stats, kwargs, is_batch_norm, stacking.resolve(strategy))


def _adapt_linen(model, variables, inputs, mode, batch_size, momentum, alpha, layers, stats,
                 kwargs, is_batch_norm, strategy):
  """Both linen functions' work, on checked arguments: stacked variables
  mapped by ``strategy``, or (``strategy=None``) one model's variables, with
  ``inputs`` carrying a pair axis of 1 either way."""
  paths = _m.stats_paths(variables["batch_stats"])
  selected = _selected(paths, layers)
  source = _stats_of(variables["batch_stats"])
  index = None
  if strategy is None:  # the pair axis is added inside the compiled passes
    index = 0
    if not _checks.is_traced(source):
      source = jax.device_get(source)
    source = {p: (m[None], v[None]) for p, (m, v) in source.items()}
  kw, arrays = _m.Kwargs.split(kwargs)
  policies = _policies(selected, alpha, stats)

  def with_stats(v, current):
    return {**v, "batch_stats": _nest_stats(v["batch_stats"], paths, current, index)}

  target = _Target(
      run=lambda kind: _linen_runner(model, kind, policies[kind], kw, is_batch_norm, strategy),
      raw=lambda kind: _linen_pass(model, kind, policies[kind], kw, is_batch_norm, strategy),
      with_stats=with_stats, state=variables, source=source, arrays=arrays)
  result = _adapt(target, inputs, mode, batch_size, float(momentum), float(alpha), stats,
                  selected)
  return with_stats(variables, result)


def batch_stats_paths(variables: Mapping) -> list[str]:
  """Paths (``"enc0/bn1"``) of the BatchNorm layers in ``variables``."""
  return list(_m.stats_paths(variables.get("batch_stats", {})))


# --------------------------------------------------------------------------
# Class-balanced statistics: the public functions


def _stats_only(variables):
  return {k: v for k, v in variables.items() if k != CLASS_STATS}


def add_class_stats(model: nn.Module, variables: Mapping, images, *, batch_size: int = 64,
                    apply_kwargs: Mapping | None = None, is_batch_norm=None,
                    image_range="auto") -> dict:
  """The variables with the source's class statistics kept beside them, in a
  ``class_stats`` collection, measured once on unlabelled source images: the
  class proportions of the model's own masks (argmax of its output, at the
  output's resolution) and, at every BatchNorm layer, each class's mean and
  biased variance of the layer's input, the masks average-pooled to the
  layer's resolution as weights, with the model in eval mode (its stored
  statistics). What class-balanced adaptation needs
  (:func:`recompute_balanced_stats`, the ``"balanced"`` method of
  :mod:`bnjax.streams`); the model's output must keep the input's spatial
  layout ``[B, H, W, K]`` (a segmentation model).

  Args:
    model: a linen model whose BatchNorm inputs are ``[B, h, w, C]`` (or
      ``[B, C]``), features on the last axis.
    variables: its ``{"params": ..., "batch_stats": ...}``.
    images: unlabelled source images ``[n, H, W, C]``, checked as
      :func:`recompute_batch_stats` checks its inputs.
    batch_size: images per forward pass.

  Returns:
    ``{**variables, "class_stats": ...}``: per layer ``class_mean`` and
    ``class_var`` float[K, C] and the stored ``mean`` and ``var`` they were
    measured with; ``proportions`` float[K] at the top.
  """
  batch_size = _checks.positive_int("batch_size", batch_size)
  inputs = _checks.inputs(images, lead=1, name="images",
                          image_range=_checks.image_range_of(model, image_range))
  if len(inputs) != 1:
    raise ValueError("images must be one array of images [n, H, W, C]")
  variables = _stats_only(variables)
  paths = _m.stats_paths(variables.get("batch_stats"))
  kwargs = _m.apply_kwargs(model, apply_kwargs, 1)
  if not paths:
    raise _no_layer_error(model, variables, inputs, kwargs)
  kw, arrays = _m.Kwargs.split(kwargs)

  def build():
    def one(v, x, arrays):
      logits = model.apply(v, x, **kw.join(arrays))
      if logits.ndim != 4 or logits.shape[1:3] != x.shape[1:3]:
        raise ValueError(f"class statistics need a segmentation model: its output "
                         f"{logits.shape} must be [B, H, W, K] for inputs {x.shape}")
      w = class_weights(logits)
      _, state = _class_apply(model, v, (x,), kw.join(arrays), "class_record", w,
                              is_batch_norm=is_batch_norm)
      sums = {n: _layer_values(state["batch_stats"], n) for n in _CLASS_SUMS}
      sums["input"] = {"": _class_sums(x, _interior(w))}
      return jnp.sum(w, axis=(0, 1, 2)), sums
    return compiler.jit(one)

  fn = _m.cached(model, ("class_record", kw.key(), is_batch_norm), build)
  x = inputs[0]
  totals, sums = None, None
  for start in range(0, x.shape[0], batch_size):
    chunk = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), jax.device_get(
        fn(variables, x[start:start + batch_size], arrays)))
    totals, sums = chunk if sums is None else jax.tree_util.tree_map(
        np.add, (totals, sums), chunk)
  stored = _stats_of(variables["batch_stats"])
  tree = {}
  for name, path in paths.items():
    mean_all, var_all = (np.asarray(a, np.float64) for a in stored[name])
    cm, cv = _moments_of_sums(*(sums[n][name] for n in _CLASS_SUMS), mean_all, var_all)
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node.update(class_mean=jnp.asarray(cm, jnp.float32), class_var=jnp.asarray(cv, jnp.float32),
                mean=jnp.asarray(mean_all, jnp.float32), var=jnp.asarray(var_all, jnp.float32))
  tree["proportions"] = jnp.asarray(totals / totals.sum(), jnp.float32)
  # The input's own per-class moments (what an appearance shift moves and a
  # label shift does not: appearance_gap).
  mean_in, var_in = _moments_of_sums(*sums["input"][""], 0.0, 0.0)
  tree["input_mean"] = jnp.asarray(mean_in, jnp.float32)
  tree["input_var"] = jnp.asarray(var_in, jnp.float32)
  return {**variables, CLASS_STATS: tree}


# A class counts in appearance_gap when it has this many interior pixels in
# the batch: a variance from fewer is noise (one image at batch 1 with a few
# interior foreground pixels gave a gap of 6 against at most 0.04 else).
_APPEARANCE_PIXELS = 32


def _interior(w):
  """The masks ``w`` [B, H, W, K] kept only where a pixel's whole 3x3
  neighbourhood (inside the image) has its class: away from the boundaries,
  where a model's mistakes are."""
  neg = jax.lax.reduce_window(-w, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
  return -neg


def appearance_gap(images, logits, class_stats) -> jax.Array:
  """How far the appearance of each class moved from the source's: under the
  masks of ``logits`` (argmax), each class's mean and variance of the input
  ``images`` [B, H, W, C] over the class's interior pixels (its whole 3x3
  neighbourhood of that class: a model's mistakes lie at boundaries) against
  the source's (``class_stats`` of :func:`add_class_stats`), ``sum_k p_k
  mean_c[(m_k - m_k^src)^2 / v_k^src + (log(v_k / v_k^src) / 2)^2]`` over the
  classes present with at least 32 interior pixels (``p`` the source's
  proportions, renormalised; 0 where none is). Pixel
  values carry no context, so a change of class balance with the same
  appearance leaves it near 0 (the masks are the source's, right under a
  label shift), while a change of appearance moves it (and makes the
  source's masks wrong, which moves it further). A scalar, traceable."""
  x = jnp.asarray(images, jnp.float32)
  if not (isinstance(class_stats, Mapping) and "input_mean" in class_stats):
    raise ValueError("class_stats must be the 'class_stats' collection of add_class_stats "
                     "(with the input's per-class moments)")
  if x.ndim != 4 or jnp.ndim(logits) != 4 or jnp.shape(logits)[:3] != x.shape[:3]:
    raise ValueError(f"images must be [B, H, W, C] and logits [B, H, W, K] of the same B, H, W; "
                     f"got {x.shape} and {jnp.shape(logits)}")
  if x.shape[-1] != class_stats["input_mean"].shape[-1]:
    raise ValueError(f"images have {x.shape[-1]} channels, the class statistics "
                     f"{class_stats['input_mean'].shape[-1]}")
  w = _interior(class_weights(logits))
  weight, mean, var = _class_moments(x, w.reshape(x.shape[:-1] + (w.shape[-1],)))
  src_mean, src_var = class_stats["input_mean"], class_stats["input_var"]
  eps = 1e-6
  z = jnp.square(mean - src_mean) / (src_var + eps)
  ratio = jnp.square(0.5 * jnp.log((var + eps) / (src_var + eps)))
  present = (weight >= _APPEARANCE_PIXELS) * class_stats["proportions"]
  per_class = jnp.mean(z + ratio, axis=-1)
  return jnp.sum(present * per_class) / jnp.maximum(jnp.sum(present), 1e-12)


def _with_running(class_stats) -> dict:
  """``class_stats`` with running class moments at every layer (the
  source's where there are none yet), so that a scan's carry keeps its
  structure."""
  flat = traverse_util.flatten_dict(dict(class_stats))
  for k in [k for k in flat if k[-1] == "class_mean"]:
    flat.setdefault(k[:-1] + ("running_mean",), flat[k])
    flat.setdefault(k[:-1] + ("running_var",), flat[k[:-1] + ("class_var",)])
  return traverse_util.unflatten_dict(flat)


def _class_stats_of(variables, what: str):
  if not isinstance(variables, Mapping) or CLASS_STATS not in variables:
    raise ValueError(f"{what} needs the source's class statistics beside the variables; "
                     "measure them once on unlabelled source images: variables = "
                     "bnjax.adapt.add_class_stats(model, variables, source_images)")
  return variables[CLASS_STATS]


def recompute_balanced_stats(model: nn.Module, variables: Mapping, inputs, *,
                             apply_kwargs: Mapping | None = None, is_batch_norm=None,
                             image_range="auto") -> dict:
  """Class-balanced BatchNorm statistics of a target set: at every layer each
  class's mean and variance of the layer's input, weighted by the masks
  pooled to the layer's resolution, recombined with the *source's* class
  proportions (``class_stats``, :func:`add_class_stats`), so that a change of
  class balance does not move the statistics as an appearance change does
  (the idea of TRIBE's balanced BN, :cite:t:`su2024tribe`, and RoTTA's
  category-balanced memory, :cite:t:`yuan2023rotta`, made per pixel: a
  segmentation model labels every pixel, so each class's moments come from
  its own pixels at every layer). Classes the set lacks keep the source's
  moments.

  The masks come from two starts, the source model's (its stored
  statistics: right under a label shift) and test-time BN's (the set's own
  moments: right under an appearance shift); one balanced pass from each,
  every layer normalising with the recombined moments of its input, and the
  result whose normalised class means (each class's mean less the layer's
  mean, over its standard deviation) are closer to the source's is kept.
  One pass per start, not iterated: iterating masks -> statistics -> masks
  lets mislabelled pixels pull the statistics further (docs/deviations.md).

  The set is one forward pass (one batch of all ``inputs``).

  Returns:
    The variables with the chosen balanced statistics as ``batch_stats``
    (``params`` and ``class_stats`` unchanged).
  """
  _class_stats_of(variables, "recompute_balanced_stats")
  inputs = _checks.inputs(inputs, lead=1, image_range=_checks.image_range_of(model, image_range))
  kwargs = _m.apply_kwargs(model, apply_kwargs, len(inputs))
  kw, arrays = _m.Kwargs.split(kwargs)
  paths = _m.stats_paths(variables.get("batch_stats"))
  if not paths:
    raise _no_layer_error(model, _stats_only(variables), inputs, kwargs)

  def build():
    def one(v, x, arrays):
      return _balanced_choice(model, v, x, kw.join(arrays), 1.0, is_batch_norm)[2]
    return compiler.jit(one)

  fn = _m.cached(model, ("balanced_set", kw.key(), is_batch_norm), build)
  v = {**variables, CLASS_STATS: _with_running(variables[CLASS_STATS])}
  with _m.inputs_fit("inputs", inputs):
    used = fn(v, inputs, arrays)
  return {**variables, "batch_stats": _nest_stats(variables["batch_stats"], paths, used)}


# --------------------------------------------------------------------------
# NNX: the module's BatchNorm layers, on a private copy, call through a subclass


_NNX_POLICY: contextvars.ContextVar = contextvars.ContextVar("bnjax_nnx_policy", default=None)


class _NnxLayer:
  def __init__(self, module, seen: set):
    self.module = module
    self.name = module.bnjax_name
    self._seen = seen
    self._put = None

  def stored(self):
    return self.module.mean.get_value(), self.module.var.get_value()

  def put(self, mean, var):
    self.module.mean.set_value(mean)
    self.module.var.set_value(var)
    self._put = self.stored()

  def updated(self) -> bool:
    return any(a is not b for a, b in zip(self.stored(), self._put))

  def record(self, mean, var, count):
    for name, value in zip(_RECORD, (mean, var, count)):
      getattr(self.module, name).set_value(value)

  def recorded(self) -> bool:
    if id(self.module) in self._seen:
      return True
    self._seen.add(id(self.module))
    return False


@functools.cache
def _adapting_class(cls):
  """A subclass of an NNX BatchNorm class whose calls go through
  :func:`_adapting_call` while a pass is active."""
  def __call__(self, *args, **kwargs):
    active = _NNX_POLICY.get()
    call = functools.partial(cls.__call__, self)
    if active is None:
      return call(*args, **kwargs)
    policy, seen = active
    return _adapting_call(_NnxLayer(self, seen), self, call, args, kwargs, policy)
  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                     "__qualname__": cls.__qualname__})


def _nnx_owns_stats(module) -> bool:
  from flax import nnx
  return all(isinstance(getattr(module, a, None), nnx.BatchStat) for a in ("mean", "var"))


def _nnx_layers(module, is_batch_norm) -> dict[str, Any]:
  """``{name: submodule}`` of the BatchNorm layers of an NNX module."""
  from flax import nnx
  out = {}
  for path, sub in nnx.iter_modules(module):
    owns = _nnx_owns_stats(sub)
    if is_batch_norm is not None:
      if not is_batch_norm(sub):
        continue
      if not owns:
        raise ValueError(f"is_batch_norm accepted {type(sub).__name__} at "
                         f"{'/'.join(map(str, path))}, which has no nnx.BatchStat 'mean' and 'var'")
    elif not owns:
      continue
    out["/".join(map(str, path))] = sub
  return out


def _nnx_pass(graphdef, kind, policy, kw: _m.Kwargs):
  return _m.cached(graphdef, ("nnx", kind, policy, kw.key()),
                   lambda: compiler.jit(_nnx_raw(graphdef, kind, policy, kw)))


def _nnx_raw(graphdef, kind, policy, kw: _m.Kwargs):
  """The forward pass of :func:`_nnx_pass`, not compiled."""
  from flax import nnx

  def one(state, stats, inputs, arrays):
    # Fresh Variables in this trace (the state's own belong to the caller's).
    module = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a, state))
    adapting = {name: sub for name, sub in _nnx_layers(module, None).items()
                if hasattr(sub, "bnjax_name")}
    for name, sub in adapting.items():
      sub.mean.set_value(stats[name][0])
      sub.var.set_value(stats[name][1])
    token = _NNX_POLICY.set((policy, set()))
    try:
      module(*inputs, **kw.join(arrays))
    finally:
      _NNX_POLICY.reset(token)
    return {name: tuple(getattr(sub, r).get_value() for r in _RECORD)
            for name, sub in adapting.items()}

  def unstacked(state_stats, inputs, arrays):  # P = 1
    state, stats = state_stats
    first = lambda t: jax.tree_util.tree_map(lambda a: a[0], t)
    if kind == "batch":
      fn = jax.vmap(lambda xb: one(state, first(stats), xb, arrays))
      out = fn(first(inputs))
    else:
      out = one(state, first(stats), first(inputs), arrays)
    return jax.tree_util.tree_map(lambda a: a[None], out)

  return unstacked


def recompute_batch_stats_nnx(module, inputs, mode: Mode = "exact",
                              batch_size: int | None = None, momentum: float = 0.1,
                              alpha: float = 1.0,
                              layers: str | Iterable[str] | Callable | None = None,
                              stats: Stats = "both", call_kwargs: Mapping | None = None,
                              is_batch_norm: Callable | None = None,
                              prior: float | None = None, image_range="auto"):
  """:func:`recompute_batch_stats` for a Flax NNX module.

  Returns a new module whose ``nnx.BatchStat`` ``mean``/``var`` are adapted and
  whose other state equals the given module's bit for bit; ``module`` itself
  is left unchanged. The passes run a private copy in eval mode
  (``module.eval()``: ``use_running_average=True``, ``deterministic=True``)
  as ``copy(*inputs, **call_kwargs)``. Layers are the submodules with
  ``nnx.BatchStat`` attributes ``mean`` and ``var`` (or those
  ``is_batch_norm`` accepts); names are their paths (``"blocks/1/bn"``).
  Every other argument is as in :func:`recompute_batch_stats`.
  """
  from flax import nnx

  if not isinstance(module, nnx.Module):
    raise ValueError(f"module must be an nnx.Module, got {type(module).__name__}")
  _check_options(mode, batch_size, momentum, alpha, stats)
  inputs = _checks.inputs(inputs, lead=1, image_range=_checks.image_range_of(module, image_range))
  alpha = _prior_alpha(alpha, prior, inputs[0].shape[0])
  if call_kwargs is not None and not isinstance(call_kwargs, Mapping):
    raise ValueError(f"call_kwargs must be a dict, got {type(call_kwargs).__name__}")
  call_kwargs = dict(call_kwargs or {})
  _m.check_call(type(module).__call__, module, len(inputs), call_kwargs, "call_kwargs")

  copy = nnx.clone(module)
  copy.eval()
  found = _nnx_layers(copy, is_batch_norm)
  if not found:
    raise ValueError("the module has no BatchNorm layer (no submodule with nnx.BatchStat "
                     "'mean' and 'var')")
  selected = _selected(found, layers)
  for name, sub in found.items():
    sub.__class__ = _adapting_class(type(sub))
    sub.bnjax_name = name
    shape = sub.mean.get_value().shape  # with a scanned layer's leading axes
    for record, dtype in zip(_RECORD, (jnp.float32, jnp.float32, jnp.int32)):
      setattr(sub, record, nnx.BatchStat(jnp.zeros(shape, dtype)))
  graphdef, state = nnx.split(copy)
  source = {p: tuple(jnp.asarray(getattr(found[p], a).get_value())[None] for a in ("mean", "var"))
            for p in found}
  kw, arrays = _m.Kwargs.split(call_kwargs)
  policies = _policies(selected, alpha, stats)
  target = _Target(
      run=lambda kind: _nnx_pass(graphdef, kind, policies[kind], kw),
      raw=lambda kind: _nnx_raw(graphdef, kind, policies[kind], kw),
      with_stats=lambda st, current: (st[0], {**st[1], **current}),
      state=(state, source), source=source, arrays=arrays)
  result = _adapt(target, tuple(a[None] for a in inputs), mode, batch_size, float(momentum),
                  float(alpha), stats, selected)

  out = nnx.clone(module)
  layers_out = _nnx_layers(out, is_batch_norm)
  for name, (mean, var) in result.items():
    for attr, value in (("mean", mean), ("var", var)):
      variable = getattr(layers_out[name], attr)
      variable.set_value(jnp.asarray(value[0], variable.get_value().dtype))
  return out
