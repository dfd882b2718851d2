"""Label-free scores of a (model, adaptation, unlabelled target set): signals
that might tell, without target masks, whether adapting helps.

:func:`scores` gives, for a segmentation model called as
``model.apply(variables, x, train=False) -> logits[n, H, W, classes]``:

* mean max-softmax confidence before and after adaptation and its change,
  and the mean per-pixel prediction entropy (nats) before and after (means
  over all pixels of all images; Guillory et al. 2021, "Predicting with
  confidence on unseen distributions", use the average confidence);
* ``atc``: average thresholded confidence (Garg et al., ICLR 2022): the
  threshold ``t`` is fitted on held-out *labelled source* data so that the
  fraction of source pixels whose confidence exceeds it equals the source
  model's pixel accuracy there, ``t`` = the ``1 - accuracy`` quantile of the
  source confidences (linear interpolation, as ``np.quantile``); ``atc`` is
  the fraction of target pixels above ``t`` under the unadapted model (its
  predicted target pixel accuracy), ``atc_after`` the same under the adapted
  model;
* ``doc``: difference of confidences (Guillory et al.): source mean
  confidence minus target mean confidence, both of the unadapted model;
* ``agreement``: per-image mean IoU between the unadapted and the adapted
  predicted masks (an image where both are empty counts 1) (Baek et al.,
  NeurIPS 2022, use agreement between models); ``foreground_change``: the
  adapted minus the unadapted predicted foreground fraction;
* ``bn_w2``: the squared W2 between the diagonal Gaussians of the source and
  the adapted BatchNorm statistics, summed over layers
  (:func:`bnjax.distances.diag_w2`; NaN without ``batch_stats``).

Scores that need ``source_inputs`` are NaN without them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _batching
from bnjax import _checks
from bnjax import _modules as _m
from bnjax import compiler
from bnjax import distances
from bnjax.inference import logits_to_masks

__all__ = ["scores", "KEYS", "pixel_maps"]

KEYS = ("confidence_before", "confidence_after", "confidence_change", "entropy_before",
        "entropy_after", "atc", "atc_after", "doc", "agreement", "foreground_change", "bn_w2")


def _maps_of(model, variables, images, batch_size):
  def one(x):
    logits = model.apply(variables, x, train=False).astype(jnp.float32)
    if logits.shape[-1] == 1:
      z = logits[..., 0]
      p = jax.nn.sigmoid(z)
      conf = jnp.maximum(p, 1 - p)
      ent = -p * jax.nn.log_sigmoid(z) - (1 - p) * jax.nn.log_sigmoid(-z)
    else:
      logp = jax.nn.log_softmax(logits, axis=-1)
      conf = jnp.exp(jnp.max(logp, axis=-1))
      ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return conf, ent, logits_to_masks(logits)
  return _batching.padded_map(one, images, batch_size)


def pixel_maps(model, variables, images, batch_size: int = 64):
  """(confidence float32[n, H, W], entropy float32[n, H, W], predicted
  foreground bool[n, H, W]) of ``model`` in eval mode on float images in [0, 1]."""
  images = _checks.images(images)
  batch_size = min(_checks.positive_int("batch_size", batch_size), images.shape[0])
  run = _m.cached(model, ("selection_maps",), lambda: compiler.jit(
      lambda v, x, b: _maps_of(model, v, x, b), static_argnums=(2,)))
  return tuple(np.asarray(a) for a in run(variables, images, batch_size))


def _agreement(a, b) -> float:
  inter = np.sum(a & b, axis=(1, 2))
  union = np.sum(a | b, axis=(1, 2))
  return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def scores(model, variables, adapted_variables, inputs, *, source_inputs=None,
           batch_size: int = 64) -> dict[str, float]:
  """The label-free scores of the module docstring, as floats keyed by :data:`KEYS`.

  Args:
    model: a segmentation model (``apply(v, x, train=False) -> logits``).
    variables: the source model's variables.
    adapted_variables: the same model after adaptation (any method).
    inputs: the unlabelled target images, float[n, H, W, C] in [0, 1].
    source_inputs: optional (images, masks) of held-out source data, for
      ``atc``, ``atc_after`` and ``doc``.
    batch_size: images per forward pass.
  """
  conf0, ent0, pred0 = pixel_maps(model, variables, inputs, batch_size)
  conf1, ent1, pred1 = pixel_maps(model, adapted_variables, inputs, batch_size)
  out = {"confidence_before": float(conf0.mean()), "confidence_after": float(conf1.mean()),
         "entropy_before": float(ent0.mean()), "entropy_after": float(ent1.mean()),
         "agreement": _agreement(pred0, pred1),
         "foreground_change": float(pred1.mean() - pred0.mean())}
  out["confidence_change"] = out["confidence_after"] - out["confidence_before"]
  out["atc"] = out["atc_after"] = out["doc"] = math.nan
  if source_inputs is not None:
    if not isinstance(source_inputs, (tuple, list)) or len(source_inputs) != 2:
      raise ValueError("source_inputs must be a tuple (images, masks) of held-out source data")
    src_x, src_y = _checks.images(*source_inputs)
    conf_s, _, pred_s = pixel_maps(model, variables, src_x, batch_size)
    accuracy = float(np.mean(pred_s == np.asarray(src_y)))
    threshold = float(np.quantile(conf_s.astype(np.float64), 1.0 - accuracy))
    out["atc"] = float(np.mean(conf0 > threshold))
    out["atc_after"] = float(np.mean(conf1 > threshold))
    out["doc"] = float(conf_s.mean()) - out["confidence_before"]
  bs0, bs1 = variables.get("batch_stats"), adapted_variables.get("batch_stats")
  out["bn_w2"] = (float(sum(distances.diag_w2(bs0, bs1).values())) if bs0 and bs1
                  else math.nan)
  return {k: out[k] for k in KEYS}
