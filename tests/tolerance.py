"""Tolerances that follow from the arithmetic, for comparing two computations
that are equal up to float32 rounding (a stack against one model, 4 devices
against 1, two processes against one, a stacked program against a per-pair
loop).

Such computations agree to rounding in every parameter and logit, so their
masks differ only in pixels whose two class logits are within rounding of
each other: a few pixels of a set, never a shifted or swapped result. The
scores of a set are then compared allowing that many flipped pixels (these
bounds), and trained models by what they predict (pixel agreement), never by
an absolute tolerance on parameters after many steps, which training
amplifies differently on every CPU.
"""

import numpy as np


def _areas(masks):
  masks = np.asarray(masks, bool)
  return masks.reshape(masks.shape[0], -1).sum(1), masks.shape[0]


def iou_tolerance(masks, flips: int) -> float:
  """The most the per-image mean IoU over ``masks`` [n, H, W] can move when
  ``flips`` predicted pixels of the set change, placed in the image where
  they move it most. One image's IoU = I / U, and k flips change I and U by
  at most k each (the union is at least the mask area A):
  |I'/U' - I/U| <= (k U + k I) / (U (U - k)) <= 2 k / (A - k), or 1 (IoU
  lies in [0, 1]) when A <= k."""
  areas, n = _areas(masks)
  worst = np.where(areas > flips, 2.0 * flips / np.maximum(areas - flips, 1), 1.0)
  return float(np.minimum(worst, 1.0).max() / n)


def dice_tolerance(masks, flips: int) -> float:
  """The same for the per-image mean Dice 2 I / (|P| + |M|): k flips change
  2 I by at most 2 k and |P| + |M| (>= A) by at most k, so one image moves by
  at most (2 k + k) / (A - k), or 1."""
  areas, n = _areas(masks)
  worst = np.where(areas > flips, 3.0 * flips / np.maximum(areas - flips, 1), 1.0)
  return float(np.minimum(worst, 1.0).max() / n)


def pixel_disagreement(a, b) -> int:
  """How many pixels two boolean mask sets [..., H, W] disagree on."""
  return int(np.sum(np.asarray(a, bool) != np.asarray(b, bool)))


# The float32 rounding between two programs evaluating one model (a stacked
# or sharded program against one model's): |dz| <= 2.6e-7 max|z| measured
# on the logits of these tests' U-Nets, unadapted and adapted. A pixel can
# flip only if its two class logits are closer than that; NEAR takes 40x
# the measured rounding.
NEAR = 1e-5


def near_boundary(logits, rel: float = NEAR) -> np.ndarray:
  """bool[n, H, W]: the pixels of ``logits`` [n, H, W, 2] whose two class
  logits differ by less than ``rel`` times the set's largest |logit|: the
  only pixels another evaluation of the same model can flip."""
  z = np.asarray(logits, np.float64)
  return np.abs(z[..., 1] - z[..., 0]) < rel * np.abs(z).max()


def iou_tolerance_at(pred, masks, flippable) -> float:
  """The most the per-image mean IoU of ``pred`` can move when any of the
  ``flippable`` pixels flip: per image, k flippable pixels move I / U by at
  most 2 k / (U - k) (1 when U <= k), 0 when k = 0; then the mean."""
  pred, masks, flippable = (np.asarray(a, bool) for a in (pred, masks, flippable))
  n = pred.shape[0]
  k = flippable.reshape(n, -1).sum(1)
  union = (pred | masks).reshape(n, -1).sum(1)
  bound = np.where(k == 0, 0.0, np.where(union > k, 2.0 * k / np.maximum(union - k, 1), 1.0))
  return float(np.minimum(bound, 1.0).mean())


def flip_budget(masks) -> int:
  """Pixels of a set that two computations equal up to float32 rounding
  (two trainings, a stack against one model, several devices or processes
  against one) may predict differently: 0.2 % of its pixels (measured: 0;
  a model of another seed disagrees on 3-44 %)."""
  return int(0.002 * np.asarray(masks).size)
