"""Batch-Norm adaptation ("AdaBN", Li et al. 2016, arXiv:1603.04779): keep every
weight of a trained model and recompute the statistics of its BatchNorm layers
on unlabelled target images.

:func:`recompute_batch_stats` is a pure function ``variables -> variables``
that works on any linen model whose normalisation layers are ``nn.BatchNorm``:
it intercepts every BatchNorm call (``flax.linen.intercept_methods``) to read
the layer's input and, where needed, to normalise it with statistics of its
own choosing. The model is always run as ``model.apply(variables, x,
**apply_kwargs)`` with ``apply_kwargs={"train": False}`` by default, so
dropout and other train-time behaviour stay off.

Modes (``n`` target images):

``"exact"``
  Self-consistent population statistics: every layer's stored mean and biased
  variance are those of its input over all ``n`` images when the model runs in
  eval mode with the adapted statistics. When the images fit in one chunk
  (``batch_size >= n``) this takes one forward pass (each layer normalises with
  the whole-set moments of its input, which are then stored). Otherwise the
  moments are accumulated over chunks and the passes are repeated, every pass
  using the previous pass's statistics, until nothing changes: a layer whose
  upstream BatchNorm chain is ``d`` layers long is exact after ``d + 1`` passes.
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
``layers`` restricts adaptation to the BatchNorm layers whose path
(``"enc0/bn1"``) matches; ``stats`` replaces the ``"mean"``, the ``"var"`` or
``"both"``. In ``"exact"`` mode the mixed statistics are the ones used
downstream (the fixed point includes the mixing); in ``"train_pass"`` and
``"ema"`` the selected layers run in train mode and the others in eval mode,
and the mixing is applied to the result.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen import dtypes as flax_dtypes

from bnjax import compiler
from bnjax import data as _data
from bnjax import stacking

MODES = ("exact", "train_pass", "ema")
STATS = ("mean", "var", "both")
DEFAULT_BATCH_SIZE = {"exact": 256, "train_pass": 32, "ema": 1}

Path = tuple[str, ...]


# --------------------------------------------------------------------------
# Reading and normalising inside BatchNorm calls


def _axes(module: nn.BatchNorm, ndim: int):
  axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  features = tuple(sorted({a % ndim for a in axis}))
  return features, tuple(i for i in range(ndim) if i not in features)


def _moments(x: jax.Array, reduction) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance (two-pass, float32) over ``reduction`` axes."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=reduction)
  var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, reduction)), axis=reduction)
  return mean, var


def _normalize(module: nn.BatchNorm, x, mean, var, reduction):
  """What ``nn.BatchNorm`` computes with the given statistics (same op order)."""
  mean = jnp.expand_dims(mean, reduction)
  var = jnp.expand_dims(var, reduction)
  shape = mean.shape
  y = x - mean
  mul = jax.lax.rsqrt(var + module.epsilon)
  args = [x]
  if module.use_scale:
    scale = module.get_variable("params", "scale").reshape(shape)
    mul = mul * scale
    args.append(scale)
  y = y * mul
  if module.use_bias:
    bias = module.get_variable("params", "bias").reshape(shape)
    y = y + bias
    args.append(bias)
  return jnp.asarray(y, flax_dtypes.canonicalize_dtype(*args, dtype=module.dtype))


def _run(model, apply_kwargs, variables, x, choose: Callable):
  """Forward pass recording ``{path: (mean, var)}`` of every BatchNorm input.

  ``choose(path, mean, var, module)`` returns the (mean, var) that layer normalises
  with, or None to let the layer use its stored statistics.
  """
  records: dict[Path, tuple] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(module.scope.path)
    if path in records:
      raise ValueError(
          f"BatchNorm layer {'/'.join(path)} is called more than once per forward "
          "pass; shared BatchNorm layers cannot be adapted")
    x_in = args[0] if args else kwargs["x"]
    _, reduction = _axes(module, x_in.ndim)
    mean, var = _moments(x_in, reduction)
    records[path] = (mean, var)
    stats = choose(path, mean, var, module)
    if stats is None:
      return next_fun(*args, **kwargs)
    return _normalize(module, x_in, *stats, reduction)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, **apply_kwargs)
  return records


def _count_per_channel(model, apply_kwargs, variables, x_shape) -> dict[Path, int]:
  """Samples per channel each BatchNorm layer sees for an input of ``x_shape``."""
  counts = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
      x_in = args[0] if args else kwargs["x"]
      _, reduction = _axes(module, x_in.ndim)
      counts[tuple(module.scope.path)] = int(np.prod([x_in.shape[i] for i in reduction]))
    return next_fun(*args, **kwargs)

  def f(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, **apply_kwargs)

  jax.eval_shape(f, variables, jax.ShapeDtypeStruct(x_shape, jnp.float32))
  return counts


# --------------------------------------------------------------------------
# Statistics as flat {path: (mean, var)} dicts; arrays carry a leading pair axis


def _flat_stats(batch_stats) -> dict[Path, tuple[np.ndarray, np.ndarray]]:
  flat = traverse_util.flatten_dict(jax.device_get(batch_stats))
  paths = sorted({k[:-1] for k in flat if k[-1] in ("mean", "var")})
  return {p: (np.asarray(flat[p + ("mean",)], np.float64),
              np.asarray(flat[p + ("var",)], np.float64)) for p in paths}


def _nest_stats(template, flat: dict[Path, tuple]) -> Any:
  """``template`` (a batch_stats tree) with the given layers' mean/var replaced."""
  out = traverse_util.flatten_dict(template)
  for path, (mean, var) in flat.items():
    for name, value in (("mean", mean), ("var", var)):
      old = out[path + (name,)]
      out[path + (name,)] = jnp.asarray(value, old.dtype)
  return traverse_util.unflatten_dict(out)


def _combine(counts, means, variances):
  """Whole-set mean and biased variance from per-part ones along axis 0
  (law of total variance); ``counts`` has one entry per part."""
  means = np.asarray(means, np.float64)
  variances = np.asarray(variances, np.float64)
  counts = np.asarray(counts, np.float64).reshape(-1, *[1] * (means.ndim - 1))
  total = counts.sum()
  mean = (counts * means).sum(0) / total
  var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
  return mean, var


def _mix(mean, var, src_mean, src_var, alpha: float, stats: str):
  """The statistics to store: ``alpha`` target + (1 - alpha) source, per ``stats``."""
  mean = alpha * mean + (1 - alpha) * src_mean if stats in ("mean", "both") else src_mean
  var = alpha * var + (1 - alpha) * src_var if stats in ("var", "both") else src_var
  return mean, var


# --------------------------------------------------------------------------
# Option handling


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


def _check_variables(variables):
  if not isinstance(variables, dict) or "params" not in variables:
    raise ValueError("variables must be a dict with a 'params' collection")
  if "batch_stats" not in variables or not variables["batch_stats"]:
    raise ValueError("variables have no 'batch_stats': the model has no BatchNorm layer")


# --------------------------------------------------------------------------
# The modes, on a stack of P (model, image set) pairs


def _chunks(n: int, size: int) -> Iterable[slice]:
  for start in range(0, n, size):
    yield slice(start, min(start + size, n))


def _exact(run_record, run_choose, variables, images, chunk, selected, mix, n_layers):
  n = images.shape[1]
  source = _flat_stats(variables["batch_stats"])
  if chunk >= n:  # one pass: each layer normalises with its whole-set statistics
    records = jax.device_get(run_choose(variables, images))
    return {p: mix(p, *records[p]) for p in selected}

  current = {p: source[p] for p in selected}
  for _ in range(n_layers):
    v = {**variables, "batch_stats": _nest_stats(variables["batch_stats"], current)}
    parts = [(s.stop - s.start, jax.device_get(run_record(v, images[:, s])))
             for s in _chunks(n, chunk)]
    new = {}
    for p in selected:
      mean, var = _combine([c for c, _ in parts], [r[p][0] for _, r in parts],
                           [r[p][1] for _, r in parts])
      new[p] = mix(p, mean, var)
    # Stored statistics are float32: compare at that precision.
    unchanged = all(
        np.array_equal(np.float32(new[p][i]), np.float32(current[p][i]))
        for p in selected for i in (0, 1))
    current = new
    if unchanged:
      break
  return current


def _batch_moments(run_batches, variables, images, batch_size):
  """Per-mini-batch moments of every layer, batches in order along axis 1,
  and the number of images in each batch."""
  n = images.shape[1]
  full = n // batch_size
  pieces, sizes = [], []
  group = max(1, 256 // batch_size)  # mini-batches per forward call
  for s in _chunks(full, group):
    x = images[:, s.start * batch_size:s.stop * batch_size]
    x = x.reshape(x.shape[0], s.stop - s.start, batch_size, *images.shape[2:])
    pieces.append(jax.device_get(run_batches(variables, x)))
    sizes += [batch_size] * (s.stop - s.start)
  if n % batch_size:
    pieces.append(jax.device_get(run_batches(variables, images[:, full * batch_size:, None]
                                             .swapaxes(1, 2))))
    sizes.append(n % batch_size)
  merged = {p: tuple(np.concatenate([r[p][i] for r in pieces], axis=1) for i in (0, 1))
            for p in pieces[0]}
  return merged, np.asarray(sizes)


@functools.lru_cache(maxsize=64)
def _runner(model, apply_items, kind, *, selected_set, alpha, stats, strategy):
  """The jitted stacked forward pass of one kind, cached across calls:
  ``"record"`` (eval mode), ``"choose"`` (selected layers normalise with their
  mixed input moments) or ``"train_batches"`` (selected layers in train mode,
  mapped over mini-batches)."""
  apply_kwargs = dict(apply_items)

  def choose(path, mean, var, module):
    if path not in selected_set:
      return None
    return _mix(mean, var, module.get_variable("batch_stats", "mean"),
                module.get_variable("batch_stats", "var"), alpha, stats)

  train_mode = lambda path, mean, var, module: (mean, var) if path in selected_set else None
  if kind == "record":
    fn = lambda v, x: _run(model, apply_kwargs, v, x, lambda *a: None)
  elif kind == "choose":
    fn = lambda v, x: _run(model, apply_kwargs, v, x, choose)
  else:
    fn = lambda v, x: jax.vmap(lambda xb: _run(model, apply_kwargs, v, xb, train_mode))(x)
  return compiler.jit(stacking.stacked(fn, strategy))


def recompute_batch_stats(model: nn.Module, variables: dict, images,
                          mode: str = "exact", batch_size: int | None = None,
                          momentum: float = 0.1, alpha: float = 1.0,
                          layers: str | Iterable[str] | Callable | None = None,
                          stats: str = "both", apply_kwargs: dict | None = None) -> dict:
  """Adapts the BatchNorm statistics of ``variables`` to ``images``.

  Args:
    model: any linen model using ``nn.BatchNorm``.
    variables: ``{"params": ..., "batch_stats": ..., ...}``.
    images: float[n, H, W, C] (or [n, H, W]) target images; their labels are
      never needed.
    mode: ``"exact"``, ``"train_pass"`` or ``"ema"`` (see the module docstring).
    batch_size: images per forward pass. For ``"exact"`` only memory depends on
      it (default 256); for ``"train_pass"`` (default 32) and ``"ema"``
      (default 1) it is the mini-batch size and changes the result.
    momentum: ``"ema"`` only: weight of the new batch (PyTorch convention).
    alpha: weight of the target statistics, in [0, 1].
    layers: regex (or list of regexes, or predicate on the path string such as
      ``"enc0/bn1"``) selecting the layers to adapt; default all.
    stats: ``"mean"``, ``"var"`` or ``"both"``.
    apply_kwargs: keyword arguments of ``model.apply`` (default
      ``{"train": False}``).

  Returns:
    New variables: the same ``params`` object (untouched) and a new
    ``batch_stats`` collection.
  """
  _check_variables(variables)
  _check_options(mode, batch_size, momentum, alpha, stats)
  images = _data.check_images_masks(images)
  stack = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], variables)
  out = _adapt_stacked(model, stack, images[None], mode, batch_size, momentum, alpha,
                       layers, stats, apply_kwargs, "unroll")
  return {**variables,
          "batch_stats": jax.tree_util.tree_map(lambda a: a[0], out["batch_stats"])}


def recompute_batch_stats_stacked(model: nn.Module, variables: dict, images, *,
                                  mode: str = "exact", batch_size: int | None = None,
                                  momentum: float = 0.1, alpha: float = 1.0,
                                  layers=None, stats: str = "both",
                                  apply_kwargs: dict | None = None,
                                  strategy: str = "auto") -> dict:
  """:func:`recompute_batch_stats` for P pairs at once: every leaf of
  ``variables`` and ``images`` (float[P, n, H, W, C]) has a leading axis P;
  pair i adapts model i to image set i. ``strategy`` is how the pairs are
  mapped (:mod:`bnjax.stacking`)."""
  _check_variables(variables)
  _check_options(mode, batch_size, momentum, alpha, stats)
  images = _data.check_image_stack(images)
  return _adapt_stacked(model, variables, images, mode, batch_size, momentum, alpha,
                        layers, stats, apply_kwargs, strategy)


def _adapt_stacked(model, variables, images, mode, batch_size, momentum, alpha, layers,
                   stats, apply_kwargs, strategy):
  """The work of both public functions, on checked arguments."""
  apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
  batch_size = int(batch_size or DEFAULT_BATCH_SIZE[mode])
  alpha, momentum = float(alpha), float(momentum)

  source = _flat_stats(variables["batch_stats"])
  names = {p: "/".join(p) for p in source}
  keep = _selector(layers)
  selected = [p for p in source if keep(names[p])]
  if not selected:
    raise ValueError(
        f"layers={layers!r} matches no BatchNorm layer; the layers are "
        f"{sorted(names.values())}")
  selected_set = frozenset(selected)
  mix = lambda p, mean, var: _mix(mean, var, *source[p], alpha, stats)
  runner = functools.partial(_runner, model, tuple(sorted(apply_kwargs.items())),
                             selected_set=selected_set, alpha=alpha, stats=stats,
                             strategy=stacking.resolve(strategy))

  if mode == "exact":
    result = _exact(runner("record"), runner("choose"), variables, images, batch_size,
                    selected, mix, len(source))
  else:
    run_batches = runner("train_batches")
    moments, sizes = _batch_moments(run_batches, variables, images, batch_size)
    first = stacking.tree_index(variables, 0)
    counts = _count_per_channel(model, apply_kwargs, first, (1, *images.shape[2:]))
    result = {}
    for p in selected:
      values = sizes * counts[p]
      means, variances = moments[p]  # [P, batches, C]
      if mode == "train_pass":
        result[p] = mix(p, *_combine(values, means.swapaxes(0, 1), variances.swapaxes(0, 1)))
        continue
      if np.any(values < 2):
        raise ValueError(
            f"mode='ema' needs at least 2 values per channel per batch for the "
            f"unbiased variance; layer {names[p]} sees {int(values.min())}: "
            "raise batch_size")
      run_mean, run_var = source[p]
      for b, c in enumerate(values):
        run_mean = (1 - momentum) * run_mean + momentum * means[:, b]
        run_var = (1 - momentum) * run_var + momentum * variances[:, b] * c / (c - 1)
      result[p] = mix(p, run_mean, run_var)

  return {**variables, "batch_stats": _nest_stats(variables["batch_stats"], result)}


def batch_stats_paths(variables: dict) -> list[str]:
  """Paths (``"enc0/bn1"``) of the BatchNorm layers in ``variables``."""
  return ["/".join(p) for p in _flat_stats(variables.get("batch_stats", {}))]
