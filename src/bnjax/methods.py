"""Unsupervised fixes for a shifted target besides BN adaptation, each a pure function.

* :func:`tent` (:cite:t:`wang2021tent`, "Tent: Fully Test-Time Adaptation by Entropy
  Minimization", ICLR 2021): minimise the mean per-pixel softmax entropy of
  the predictions on the unlabelled target inputs with respect to the
  BatchNorm scale and bias only, the BatchNorm layers normalising with the
  statistics of each batch.
* :func:`histogram_match`: every target image's intensities mapped onto the
  pooled source distribution (the cumulative-distribution matching of
  ``skimage.exposure.match_histograms``); changes no weight.
* AdaBN with a prior (Schneider et al., NeurIPS 2020) is the ``prior=`` option
  of :func:`bnjax.adapt.recompute_batch_stats`; per-image normalisations and
  input standardisation are options of :class:`bnjax.models.UNet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bnjax import _batching
from bnjax import _checks
from bnjax import _modules as _m
from bnjax import adapt as _adapt
from bnjax import compiler
from bnjax import stacking

__all__ = ["tent", "tent_stacked", "mean_entropy", "histogram_match",
           "histogram_match_stacked", "bn_affine_paths"]


def mean_entropy(logits: jax.Array) -> jax.Array:
  """Mean over all positions of the prediction entropy (nats) of
  ``logits[..., classes]``: softmax entropy, or the binary entropy of a
  sigmoid when there is one class."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.shape[-1] == 1:
    z = logits[..., 0]
    p = jax.nn.sigmoid(z)
    # -p log p - (1 - p) log (1 - p), with log sigmoid for stability.
    return jnp.mean(-p * jax.nn.log_sigmoid(z) - (1 - p) * jax.nn.log_sigmoid(-z))
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def bn_affine_paths(variables: Mapping) -> list[tuple]:
  """The ``params`` paths (tuples) of the affine parameters of every
  BatchNorm layer: the ``params`` leaves owned by a module that owns
  ``batch_stats`` mean and var (``scale`` and ``bias`` of ``nn.BatchNorm``;
  whatever a fork names them, e.g. ``gamma``/``beta``)."""
  layers = set(_m.stats_paths(variables.get("batch_stats")).values())
  flat = traverse_util.flatten_dict(variables.get("params") or {})
  return [p for p in flat if p[:-1] in layers]


def _tent_parts(model, kw: _m.Kwargs, is_batch_norm, optimizer, paths):
  """TENT's optimisation as ``(init, step)``: ``init(variables, lr) ->
  (theta, optimizer state)``, ``step((theta, opt), (variables, inputs,
  arrays, idx, lr), t)`` one step on the batch ``idx[t]``."""

  def transform(lr):
    return optimizer if optimizer is not None else optax.adam(lr)

  def init(variables, lr):
    flat = traverse_util.flatten_dict(variables["params"])
    theta0 = {p: flat[p] for p in paths}
    return theta0, transform(lr).init(theta0)

  def step(carry, consts, t):
    theta, opt = carry
    variables, inputs, arrays, idx, lr = consts
    flat = traverse_util.flatten_dict(variables["params"])
    index = jax.lax.dynamic_index_in_dim(idx, t, 0, keepdims=False)

    def loss(theta):
      params = traverse_util.unflatten_dict({**flat, **theta})
      out = _adapt._batch_normalised_apply(model, {**variables, "params": params},
                                           tuple(a[index] for a in inputs), kw.join(arrays),
                                           is_batch_norm)
      return mean_entropy(out)

    grads = jax.grad(loss)(theta)
    updates, opt = transform(lr).update(grads, opt, theta)
    return (optax.apply_updates(theta, updates), opt), None

  return init, step


def _tent_run(model, kw: _m.Kwargs, is_batch_norm, optimizer, paths, episodic: bool,
              form: str = "auto"):
  """The optimisation: ``(variables, inputs, arrays, idx, lr) -> adapted
  affine leaves`` (``idx`` int[steps, batch]; with ``episodic`` a leading
  episode axis on ``idx`` and on the result), its steps driven as
  :func:`bnjax.compiler.driven` (``form``)."""

  def build():
    init, step = _tent_parts(model, kw, is_batch_norm, optimizer, paths)
    if episodic:  # the episodes side by side, each from the source's leaves
      def one(carry, consts, t):
        variables, inputs, arrays, idx, lr = consts
        return jax.vmap(lambda c, i: step(c, (variables, inputs, arrays, i, lr), t))(carry, idx)
    else:
      one = step
    loop = compiler.driven(one, form)
    first = compiler.jit(init)

    def run(variables, inputs, arrays, idx, lr):
      carry = first(variables, lr)
      if episodic:
        carry = jax.tree_util.tree_map(
            lambda a: jnp.broadcast_to(a, (idx.shape[0],) + a.shape), carry)
      (theta, _), _ = loop(carry, (variables, inputs, arrays, idx, lr), idx.shape[-2])
      return theta

    return run

  return _m.cached(model, ("tent", kw.key(), is_batch_norm, optimizer, tuple(paths), episodic,
                           compiler.loop_form(form)), build)


def _tent_model(model, variables, apply_kwargs, n_inputs: int):
  """(keyword arguments, their arrays, BatchNorm affine paths) of a model TENT
  can adapt; a ValueError for one it cannot."""
  kwargs = _m.apply_kwargs(model, apply_kwargs, n_inputs)
  if not isinstance(variables, Mapping) or not _m.stats_paths(variables.get("batch_stats")):
    raise ValueError("tent needs a model with BatchNorm layers: variables have no "
                     "'batch_stats' mean/var")
  paths = bn_affine_paths(variables)
  if not paths:
    raise ValueError("tent optimises the BatchNorm scale and bias, and no BatchNorm layer "
                     "of this model has either (use_scale=False, use_bias=False)")
  return (*_m.Kwargs.split(kwargs), paths)


def _tent_batch_size(batch_size, n: int, what: str) -> int:
  """TENT's batch size: ``min(64, n)`` by default, else an integer in 1..n."""
  if batch_size is None:
    return min(64, n)
  batch_size = _checks.positive_int("batch_size", batch_size)
  if batch_size > n:
    raise ValueError(f"batch_size must be in 1..{n} ({what}), got {batch_size}")
  return batch_size


def _batch_order(key, n: int, batch_size: int, steps: int) -> jax.Array:
  """int[steps, batch_size]: TENT's online batches, a new permutation of the
  ``n`` inputs every pass (the last incomplete batch of a pass dropped)."""
  return _batching.epoch_batches(lambda e: jax.random.permutation(jax.random.fold_in(key, e), n),
                                 n, batch_size, steps, jnp)


def tent(model: nn.Module, variables: Mapping, inputs, *, steps: int = 1,
         learning_rate: float = 1e-3, batch_size: int | None = None, episodic: bool = False,
         key: jax.Array, optimizer: optax.GradientTransformation | None = None,
         apply_kwargs: Mapping | None = None, is_batch_norm: Callable | None = None,
         stats_batch_size: int | None = None, image_range="auto") -> dict:
  """TENT: entropy minimisation on unlabelled inputs over the BatchNorm scale and bias.

  Every step takes a batch of ``batch_size`` inputs, runs the model with each
  BatchNorm layer normalising with that batch's moments (the model itself in
  eval mode, as :func:`bnjax.adapt.recompute_batch_stats` runs it: no
  dropout), and takes one ``optimizer`` step (default ``optax.adam
  (learning_rate)``) on the mean per-pixel prediction entropy
  (:func:`mean_entropy`) with respect to the scale and bias of the BatchNorm
  layers only (:func:`bn_affine_paths`: the parameters the layers own).

  * ``episodic=False`` (TENT's online setting): ``steps`` steps in one
    trajectory, the batches drawn from ``key``: pass ``e`` = 0, 1, ... over
    the inputs takes them in the order ``jax.random.permutation(
    jax.random.fold_in(key, e), n)``, cut into consecutive batches of
    ``batch_size`` (the last incomplete batch of a pass is dropped).
  * ``episodic=True``: the inputs are cut in order into ``n / batch_size``
    batches (``batch_size`` must divide ``n``) and each batch is an episode
    that starts from the source weights and a fresh optimizer state and takes
    ``steps`` steps on that batch. The result has a leading episode axis:
    entry ``b`` is the model for ``inputs[b * batch_size:(b + 1) * batch_size]``.

  Then the ``batch_stats`` are recomputed on the inputs (each episode's own
  batch) under the adapted scale and bias (:func:`bnjax.adapt.recompute_batch_stats`,
  ``"exact"``), so that the returned variables predict in eval mode without
  depending on the evaluation batch. Every other leaf is returned bit for bit.

  Args:
    model: a linen model with BatchNorm layers, called as
      ``model.apply(variables, *inputs, **apply_kwargs)``; its output is
      logits ``[..., classes]`` (one class: a sigmoid).
    variables: ``{"params": ..., "batch_stats": ...}``.
    inputs: the unlabelled target inputs, an array ``[n, ...]`` or a tuple of them.
    steps: optimizer steps (per episode with ``episodic``), >= 1.
    learning_rate: Adam's step size (ignored with ``optimizer``), >= 0.
    batch_size: inputs per step, in 1..n (default ``min(64, n)``).
    key: PRNG key of the batch order.
    optimizer: an optax transformation instead of Adam.
    apply_kwargs, is_batch_norm: as in :func:`bnjax.adapt.recompute_batch_stats`.
    stats_batch_size: inputs per forward pass of the final statistics.
    image_range: as in :func:`bnjax.adapt.recompute_batch_stats` (``"auto"``:
      the images of bnjax's U-Net must lie in [0, 1]).
  """
  _checks.key(key)
  steps = _checks.positive_int("steps", steps)
  lr = _checks.number("learning_rate", learning_rate)
  image_range = _checks.image_range_of(model, image_range)
  inputs = _checks.inputs(inputs, lead=1, image_range=image_range)
  n = inputs[0].shape[0]
  batch_size = _tent_batch_size(batch_size, n, "the number of inputs")
  if episodic and n % batch_size:
    raise ValueError(f"episodic=True cuts the {n} inputs into episodes of batch_size; "
                     f"batch_size={batch_size} does not divide {n}")
  kw, arrays, paths = _tent_model(model, variables, apply_kwargs, len(inputs))
  run = _tent_run(model, kw, is_batch_norm, optimizer, paths, bool(episodic))
  if episodic:
    episodes = np.arange(n).reshape(n // batch_size, 1, batch_size)
    idx = jnp.asarray(np.broadcast_to(episodes, (n // batch_size, steps, batch_size)))
  else:
    idx = _batch_order(key, n, batch_size, steps)
  theta = run(dict(variables), inputs, arrays, idx, jnp.float32(lr))
  flat = traverse_util.flatten_dict(variables["params"])
  options = dict(mode="exact", batch_size=stats_batch_size, apply_kwargs=apply_kwargs,
                 is_batch_norm=is_batch_norm, image_range=None)  # inputs checked above
  if not episodic:
    params = traverse_util.unflatten_dict({**flat, **theta})
    return _adapt.recompute_batch_stats(model, {**variables, "params": params}, inputs,
                                        **options)
  b = n // batch_size
  stacked = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (b, *jnp.shape(a))),
                                   {k: v for k, v in variables.items() if k != "params"})
  params = traverse_util.unflatten_dict(
      {p: (theta[p] if p in theta else jnp.broadcast_to(v, (b, *jnp.shape(v))))
       for p, v in flat.items()})
  chunks = tuple(a.reshape(b, batch_size, *a.shape[1:]) for a in inputs)
  return _adapt.recompute_batch_stats_stacked(model, {**stacked, "params": params}, chunks,
                                              **options)


def tent_stacked(model: nn.Module, variables: Mapping, inputs, *, keys, steps: int = 1,
                 learning_rate: float = 1e-3, batch_size: int | None = None,
                 optimizer: optax.GradientTransformation | None = None,
                 apply_kwargs: Mapping | None = None, is_batch_norm: Callable | None = None,
                 stats_batch_size: int | None = None, strategy: str = "auto",
                 image_range="auto") -> dict:
  """:func:`tent` (online, ``episodic=False``) for P (model, input set) pairs
  in one compiled call: every leaf of ``variables`` and of ``inputs``
  (``[P, n, ...]``, or a tuple of such) has a leading axis P, ``keys`` holds
  P keys (``jax.random.split``), and entry ``p`` of the result is
  ``tent(model, variables[p], inputs[p], key=keys[p], ...)`` (the same batch
  orders; the numbers agree up to float32 rounding of the mapped program).
  ``strategy`` is how the pairs are mapped (:mod:`bnjax.stacking`); the final
  statistics come from :func:`bnjax.adapt.recompute_batch_stats_stacked`."""
  steps = _checks.positive_int("steps", steps)
  lr = _checks.number("learning_rate", learning_rate)
  image_range = _checks.image_range_of(model, image_range)
  inputs = _checks.inputs(inputs, lead=2, image_range=image_range)
  pairs, n = inputs[0].shape[:2]
  if not isinstance(keys, jax.Array) or keys.shape[:1] != (pairs,):
    raise ValueError(f"keys must hold one PRNG key per pair ({pairs}, e.g. "
                     f"jax.random.split(key, {pairs})), got "
                     f"{getattr(keys, 'shape', type(keys).__name__)}")
  _checks.key(keys[0])
  _checks.model_axis(variables, pairs)
  batch_size = _tent_batch_size(batch_size, n, "the inputs per pair")
  kw, arrays, paths = _tent_model(model, variables, apply_kwargs, len(inputs))
  idx = jnp.stack([_batch_order(keys[p], n, batch_size, steps) for p in range(pairs)])
  run = _tent_stacked_run(model, kw, is_batch_norm, optimizer, tuple(paths),
                          stacking.resolve(strategy))
  theta = run(dict(variables), inputs, arrays, idx, jnp.float32(lr))
  flat = traverse_util.flatten_dict(variables["params"])
  params = traverse_util.unflatten_dict({**flat, **theta})
  return _adapt.recompute_batch_stats_stacked(
      model, {**variables, "params": params}, inputs, mode="exact", batch_size=stats_batch_size,
      apply_kwargs=apply_kwargs, is_batch_norm=is_batch_norm, strategy=strategy,
      image_range=None)  # inputs checked above


def _tent_stacked_run(model, kw, is_batch_norm, optimizer, paths, strategy, form="auto"):
  """TENT's optimisation mapped over the pair axis (every pair's step side
  by side), compiled once per model, options and strategy."""
  def build():
    init, step = _tent_parts(model, kw, is_batch_norm, optimizer, paths)

    def step_all(carry, consts, t):
      variables, inputs, arrays, idx, lr = consts
      return stacking.stacked(
          lambda c, v, x, i: step(c, (v, x, arrays, i, lr), t), strategy)(
              carry, variables, inputs, idx)

    loop = compiler.driven(step_all, form)
    first = compiler.jit(stacking.stacked(init, strategy, in_axes=(0, None)))

    def run(variables, inputs, arrays, idx, lr):
      carry = first(variables, lr)
      (theta, _), _ = loop(carry, (variables, inputs, arrays, idx, lr), idx.shape[1])
      return theta

    return run

  return _m.cached(model, ("tent_stacked", kw.key(), is_batch_norm, optimizer, paths, strategy,
                           compiler.loop_form(form)), build)


def histogram_match_stacked(images, reference_images) -> jax.Array:
  """:func:`histogram_match` for P (images, reference) pairs in one compiled
  call: ``images`` ``[P, n, H, W, C]``, ``reference_images`` ``[P, m, H', W',
  C]``; entry ``p`` is ``histogram_match(images[p], reference_images[p])``."""
  images, reference = jnp.asarray(images), jnp.asarray(reference_images)
  if images.ndim not in (4, 5) or reference.ndim not in (4, 5):
    raise ValueError(f"images and reference_images must be [P, n, H, W, C] (or [P, n, H, W]), "
                     f"got {images.shape} and {reference.shape}")
  if images.shape[0] != reference.shape[0]:
    raise ValueError(f"images and reference_images must have the same number of pairs P, "
                     f"got {images.shape[0]} and {reference.shape[0]}")
  pairs = [_match_inputs(x, r) for x, r in zip(images, reference)]  # histogram_match's checks
  return _match_stacked(jnp.stack([x for x, _ in pairs]), jnp.stack([r for _, r in pairs]))


@jax.jit
def _match_stacked(images, reference):
  return jax.vmap(_match)(images, reference)


@jax.jit
def _match(images, reference):
  """Per channel: each image's values through its own empirical CDF and the
  inverse CDF of the pooled reference (linear between reference values)."""
  c = images.shape[-1]
  ref = reference.reshape(-1, c).T  # [C, M]
  ref_sorted = jnp.sort(ref, axis=-1)
  m = ref_sorted.shape[-1]
  # The quantile of each reference value: the fraction of values <= it (ties
  # share the quantile of their last occurrence, as np.unique's counts give).
  ref_q = jax.vmap(lambda r: jnp.searchsorted(r, r, side="right"))(ref_sorted) / m

  def one(image):
    x = image.reshape(-1, c).T  # [C, P]
    q = jax.vmap(lambda v: jnp.searchsorted(jnp.sort(v), v, side="right"))(x) / x.shape[-1]
    out = jax.vmap(jnp.interp)(q, ref_q, ref_sorted)
    return out.T.reshape(image.shape)

  return jax.lax.map(one, images).astype(jnp.float32)


def histogram_match(images, reference_images) -> jax.Array:
  """Each image's intensities mapped onto the distribution of the pooled
  ``reference_images`` (per channel), e.g. target images onto source ones.

  A pixel with value ``v`` in an image of ``P`` pixels gets the reference
  value at quantile ``#{pixels <= v} / P`` of the image, by linear
  interpolation of the reference's empirical quantile function (each
  reference value at the fraction of reference pixels ``<=`` it): the
  matching of ``skimage.exposure.match_histograms`` (Gonzalez & Woods,
  "Digital Image Processing", histogram specification), applied to every
  image against the same pooled reference.

  Args:
    images: float[n, H, W, C] (or [n, H, W]).
    reference_images: float[m, H', W', C] (or [m, H', W']), the same channels.

  Returns:
    float32 images of the shape of ``images``, values within the reference's range.
  """
  return _match(*_match_inputs(images, reference_images))


def _match_inputs(images, reference_images):
  """The checked (images, reference) of :func:`histogram_match`."""
  images = _checks.images(images, image_range=None)
  reference = _checks.images(reference_images, name="reference_images", image_range=None)
  if reference.shape[-1] != images.shape[-1]:
    raise ValueError(f"reference_images must have the channels of images "
                     f"({images.shape[-1]}), got {reference.shape[-1]}")
  return images, reference
