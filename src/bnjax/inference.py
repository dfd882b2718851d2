"""Inference: predictions of one model, and scores of stacks of models.

:func:`predict` runs one model in eval mode over a set in batches (one
compiled shape per set size). :func:`stacked_iou` scores P (model, set) pairs
in one compiled call, and :func:`evaluate_grid` scores K source models on M
target sets without and with BN adaptation (stacks mapped as in
:mod:`bnjax.stacking`).
"""

from __future__ import annotations

import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _batching
from bnjax import _checks
from bnjax import _modules as _m
from bnjax import adapt as _adapt
from bnjax import compiler
from bnjax import distributed
from bnjax import metrics as _metrics
from bnjax import stacking
from bnjax.metrics import logits_to_masks

__all__ = ["predict", "stacked_predict", "stacked_iou", "evaluate_grid"]


def _masks_of(model, variables, images, batch_size):
  return _batching.padded_map(
      lambda x: logits_to_masks(model.apply(variables, x, train=False)), images, batch_size)


def predict(model: nn.Module, variables, images, batch_size: int = 64, *,
            image_range=_checks.UNIT_RANGE) -> np.ndarray:
  """bool[n, H, W] foreground predictions in eval mode, in batches.

  ``images``: float[n, H, W, C] (or [n, H, W]) in ``image_range`` (None: any
  float values; integer images are refused).
  """
  images = _checks.images(images, image_range=image_range)
  batch_size = min(_checks.positive_int("batch_size", batch_size), images.shape[0])
  run = _m.cached(model, ("predict",), lambda: compiler.jit(
      functools.partial(_masks_of, model), static_argnums=(2,)))
  return np.asarray(run(variables, images, batch_size))


def stacked_predict(model: nn.Module, variables, images, *,
                    strategy: stacking.Strategy = "auto", batch_size: int = 64,
                    image_range=_checks.UNIT_RANGE) -> np.ndarray:
  """bool[P, n, H, W]: the predictions of model p on set p, for stacked
  ``variables`` (leading axis P) and ``images`` float[P, n, H, W, C]; one
  compiled call."""
  images = _checks.images(images, image_range=image_range, stacked=True)
  _checks.model_axis(variables, images.shape[0])
  batch_size = min(_checks.positive_int("batch_size", batch_size), images.shape[1])
  strategy = stacking.resolve(strategy)

  def build():
    return compiler.jit(
        lambda v, x, b: stacking.stacked(
            functools.partial(_masks_of, model, batch_size=b), strategy)(v, x),
        static_argnums=(2,))

  run = _m.cached(model, ("stacked_predict", strategy), build)
  return np.asarray(run(variables, images, batch_size))


def stacked_iou(model: nn.Module, variables, images, masks, *,
                strategy: stacking.Strategy = "auto", empty: float = 1.0,
                batch_size: int = 64, image_range=_checks.UNIT_RANGE) -> np.ndarray:
  """float[P]: the per-image mean IoU of model p on set p, for stacked
  ``variables`` (leading axis P), ``images`` float[P, n, H, W, C] and ``masks``
  bool[P, n, H, W]; one compiled call."""
  images, masks = _checks.images(images, masks, image_range=image_range, stacked=True)
  _checks.model_axis(variables, images.shape[0])
  return _stacked_iou(model, variables, images, masks, strategy,
                      _checks.unit_interval("empty", empty),
                      _checks.positive_int("batch_size", batch_size))


def _stacked_iou(model, variables, images, masks, strategy, empty: float, batch_size: int,
                 with_masks: bool = False):
  """:func:`stacked_iou` on checked arguments; with ``with_masks`` also the
  predicted masks: ``(iou float[P], masks bool[P, n, H, W])``."""
  strategy = stacking.resolve(strategy)

  def build():
    def one(v, x, y, batch_size, empty):
      pred = _masks_of(model, v, x, batch_size)
      iou = jnp.mean(_metrics.iou_per_image(pred, y, empty))
      return (iou, pred) if with_masks else iou
    return compiler.jit(
        lambda v, x, y, b, e: stacking.stacked(
            functools.partial(one, batch_size=b, empty=e), strategy)(v, x, y),
        static_argnums=(3, 4))

  run = _m.cached(model, ("stacked_iou", strategy, with_masks), build)
  out = run(variables, images, masks, min(batch_size, images.shape[1]), empty)
  return jax.tree_util.tree_map(np.asarray, out)


def evaluate_grid(model: nn.Module, variables, source_eval, targets_adapt, targets_eval,
                  mode: _adapt.Mode = "exact", oracle=None, *,
                  strategy: stacking.Strategy = "auto", pair_chunk: int = 8,
                  empty: float = 1.0, eval_batch_size: int = 64, progress=None,
                  image_range=_checks.UNIT_RANGE, devices=None, name: str | None = None,
                  return_masks: bool = False, **adapt_options) -> dict:
  """Scores K stacked source models on M target sets, without and with BN adaptation.

  Args:
    model: the linen model.
    variables: stacked source variables (leading axis K).
    source_eval: (images float[K, n, H, W, C], masks bool[K, n, H, W]): each
      source model's own held-out data.
    targets_adapt: float[M, n_a, H, W, C]: the unlabelled images each target's
      adaptation uses (pass the evaluation images for the transductive protocol).
    targets_eval: (images float[M, n_e, H, W, C], masks bool[M, n_e, H, W]).
    mode, ``**adapt_options``: as :func:`bnjax.adapt.recompute_batch_stats`.
    oracle: optional stacked variables of M target-trained models.
    pair_chunk: (source, target) pairs adapted per call (the last call of a
      device filled by repeating its last pair: one compiled shape).
    eval_batch_size: images per forward pass when scoring.
    progress: optional callable(done_pairs, total_pairs) (several processes:
      this process's pairs times the process count).
    image_range: the range every image must lie in (None: any float values).
    devices, name: the pairs are split over ``devices`` (default: every
      device of every process) by :func:`bnjax.distributed.map_pairs`, each
      pair adapted and scored once; with ``name`` each process says which
      pairs it computed.
    return_masks: also return the predicted masks the scores were computed
      from (every pair's: ``K x M x n_e x H x W`` booleans).

  Returns:
    float[K, M] arrays ``source_iou`` (model k on its own source, repeated
    along M), ``iou_no_adapt``, ``iou_adapted`` and, with ``oracle``,
    ``iou_oracle`` (oracle m on target m, repeated along K). With
    ``return_masks``: ``masks_source`` bool[K, n, H, W], ``masks_no_adapt``
    and ``masks_adapted`` bool[K, M, n_e, H, W] and, with ``oracle``,
    ``masks_oracle`` bool[M, n_e, H, W].
  """
  checked = functools.partial(_checks.images, image_range=image_range, stacked=True)
  src_x, src_y = checked(*source_eval)
  tgt_x, tgt_y = checked(*targets_eval)
  tgt_a = checked(targets_adapt, name="targets_adapt")
  k, m = src_x.shape[0], tgt_x.shape[0]
  if tgt_a.shape[0] != m:
    raise ValueError(f"targets_adapt must be float[{m}, n, H, W, C], got {tgt_a.shape}")
  pair_chunk = _checks.positive_int("pair_chunk", pair_chunk)
  # Checked once here, not again for every chunk of pairs.
  iou = functools.partial(_stacked_iou, model, strategy=strategy,
                          empty=_checks.unit_interval("empty", empty),
                          batch_size=_checks.positive_int("eval_batch_size", eval_batch_size),
                          with_masks=bool(return_masks))
  # Every source model on its own set, and every (source, target) pair, split
  # over the devices of every process (each pair scored and adapted once).
  source_iou = distributed.map_pairs(iou, variables, src_x, src_y, devices=devices)
  ks, ms = np.divmod(np.arange(k * m), m)
  lock, done = threading.Lock(), [0]

  def pairs(a, b, variables, tgt_x, tgt_y, tgt_a):  # pair_chunk pairs (a[i], b[i])
    v = stacking.tree_index(variables, a)
    none = iou(v, tgt_x[b], tgt_y[b])
    v_ad = _adapt.recompute_batch_stats_stacked(model, v, tgt_a[b], mode=mode,
                                                strategy=strategy, **adapt_options)
    adapted = iou(v_ad, tgt_x[b], tgt_y[b])
    if progress is not None:
      with lock:  # this process's pairs, scaled to all processes'
        done[0] += len(a)
        progress(min(done[0] * jax.process_count(), k * m), k * m)
    return none, adapted

  none, adapted = distributed.map_pairs(pairs, ks, ms, variables, tgt_x, tgt_y, tgt_a,
                                        in_axes=(0, 0, None, None, None, None),
                                        devices=devices, chunk=pair_chunk, name=name)
  out, masks = {}, {}
  if return_masks:
    (source_iou, masks["source"]), (none, masks["no_adapt"]), (adapted, masks["adapted"]) = (
        source_iou, none, adapted)
    for name_ in ("no_adapt", "adapted"):
      masks[name_] = masks[name_].reshape(k, m, *masks[name_].shape[1:])
  out.update({"source_iou": np.repeat(source_iou[:, None], m, 1),
              "iou_no_adapt": none.reshape(k, m), "iou_adapted": adapted.reshape(k, m)})
  if oracle is not None:
    scored = distributed.map_pairs(iou, oracle, tgt_x, tgt_y, devices=devices)
    if return_masks:
      scored, masks["oracle"] = scored
    out["iou_oracle"] = np.repeat(scored[None], k, 0)
  out.update({f"masks_{key}": value for key, value in masks.items()})
  return out
