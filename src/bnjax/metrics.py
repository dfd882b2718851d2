"""Segmentation metrics on boolean masks (or integers in {0, 1}; floats are
refused: threshold scores first).

``iou`` is the study's metric: foreground intersection over union computed per
image and averaged over images. An image whose prediction and mask are both
empty has an undefined IoU; ``empty`` sets its score. The default, 1.0 (a
correct empty prediction is perfect), is the usual convention; the original
study's code scored such images 0 (``empty=0.0``). With the study's masks
(foreground fraction about 0.2) empty masks are rare, so the two agree closely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bnjax import _checks

__all__ = ["iou", "iou_per_image", "dice", "pixel_accuracy", "micro_iou", "foreground_fraction",
           "logits_to_masks"]


def logits_to_masks(logits: jax.Array) -> jax.Array:
  """bool[n, H, W]: foreground where class 1 wins (or the single logit > 0)."""
  if logits.shape[-1] == 1:
    return logits[..., 0] > 0
  return jnp.argmax(logits, axis=-1) == 1


def _check(pred, masks):
  pred, masks = jnp.asarray(pred), jnp.asarray(masks)
  if pred.shape != masks.shape:
    raise ValueError(
        f"pred and masks must have the same shape, got {pred.shape} and {masks.shape}")
  if pred.ndim < 3 or 0 in pred.shape[:-2]:
    raise ValueError(f"pred and masks must be non-empty bool[n, H, W] (or with more leading "
                     f"axes, e.g. a stream's [T, B, H, W]), got {pred.shape}")
  return _checks.mask_array(pred, "pred"), _checks.mask_array(masks, "masks")


def _check_empty(empty):
  return _checks.unit_interval("empty", empty)


def _counts(pred, masks):
  inter = jnp.sum(pred & masks, axis=(-2, -1))
  union = jnp.sum(pred | masks, axis=(-2, -1))
  total = jnp.sum(pred, axis=(-2, -1)) + jnp.sum(masks, axis=(-2, -1))
  return inter, union, total


def iou_per_image(pred, masks, empty: float = 1.0) -> jax.Array:
  """float[n] (float[...] for masks [..., H, W]): foreground IoU of each image
  (``empty`` where the union is empty). A stream's ``[T, B, H, W]`` gives
  float[T, B]: ``.mean(1)`` is each batch's IoU."""
  pred, masks = _check(pred, masks)
  inter, union, _ = _counts(pred, masks)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), _check_empty(empty))


def iou(pred, masks, empty: float = 1.0) -> float:
  """Per-image foreground IoU averaged over images (the study's metric).

  Args:
    pred: the predicted masks, bool[n, H, W] (or integers in {0, 1}; float
      scores are refused: threshold them first, e.g. ``probs > 0.5``), or
      with more leading axes (a stream's ``[T, B, H, W]``: every image of it).
    masks: the true masks, the same shape and types.
    empty: the score of an image whose prediction and mask are both empty
      (IoU 0 / 0), in [0, 1]: 1.0 (default: a correct empty prediction is
      perfect) or 0.0 (the original study's code).

  Returns:
    The mean over the images of ``sum(pred & mask) / sum(pred | mask)``, a float.
  """
  return float(jnp.mean(iou_per_image(pred, masks, empty)))


def dice(pred, masks, empty: float = 1.0) -> float:
  """Per-image foreground Dice, ``2 |P ∩ M| / (|P| + |M|)``, averaged over images."""
  pred, masks = _check(pred, masks)
  inter, _, total = _counts(pred, masks)
  per_image = jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1),
                        _check_empty(empty))
  return float(jnp.mean(per_image))


def pixel_accuracy(pred, masks) -> float:
  """Fraction of pixels whose class is right, over all images."""
  pred, masks = _check(pred, masks)
  return float(jnp.mean(pred == masks))


def micro_iou(pred, masks, empty: float = 1.0) -> float:
  """Dataset-level IoU: all intersections over all unions (pixels pooled)."""
  pred, masks = _check(pred, masks)
  inter, union, _ = _counts(pred, masks)
  total_union = int(jnp.sum(union))
  if total_union == 0:
    return _check_empty(empty)
  return float(jnp.sum(inter) / total_union)


def foreground_fraction(masks) -> float:
  """Mean fraction of foreground pixels."""
  return float(jnp.mean(_checks.mask_array(masks).astype(jnp.float32)))
