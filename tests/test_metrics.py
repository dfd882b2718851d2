import numpy as np
import pytest

from bnjax import metrics


def reference_iou(pred, masks, empty):
  scores = []
  for p, m in zip(pred, masks):
    union = np.logical_or(p, m).sum()
    scores.append(empty if union == 0 else np.logical_and(p, m).sum() / union)
  return float(np.mean(scores))


@pytest.fixture
def pair():
  rng = np.random.default_rng(0)
  pred = rng.random((7, 9, 9)) < 0.3
  masks = rng.random((7, 9, 9)) < 0.25
  pred[0] = masks[0] = False  # an empty image
  return pred, masks


@pytest.mark.parametrize("empty", [0.0, 1.0])
def test_iou_against_loop(pair, empty):
  pred, masks = pair
  assert metrics.iou(pred, masks, empty=empty) == pytest.approx(
      reference_iou(pred, masks, empty), rel=1e-6)


def test_dice_accuracy_micro(pair):
  pred, masks = pair
  per = [(2 * (p & m).sum() / (p.sum() + m.sum())) if (p.sum() + m.sum()) else 1.0
         for p, m in zip(pred, masks)]
  assert metrics.dice(pred, masks) == pytest.approx(np.mean(per), rel=1e-6)
  assert metrics.pixel_accuracy(pred, masks) == pytest.approx((pred == masks).mean())
  assert metrics.micro_iou(pred, masks) == pytest.approx((pred & masks).sum() / (pred | masks).sum())


def test_all_foreground_scores_mask_fraction():
  masks = np.zeros((2, 10, 10), bool)
  masks[:, :2] = True
  assert metrics.iou(np.ones_like(masks), masks) == pytest.approx(0.2)
  assert metrics.iou(np.zeros_like(masks), masks) == 0.0


def test_errors():
  with pytest.raises(ValueError, match="same shape"):
    metrics.iou(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match="empty must be in"):
    metrics.iou(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), bool), empty=2)


def test_masks_must_be_boolean_or_0_1_integers(pair):
  pred, masks = pair
  assert metrics.iou(pred.astype(np.int32), masks.astype(np.uint8)) == metrics.iou(pred, masks)
  for fn in (metrics.iou, metrics.dice, metrics.pixel_accuracy, metrics.micro_iou):
    with pytest.raises(ValueError, match="pred must be boolean .*threshold scores first"):
      fn(pred.astype(np.float32) * 0.7, masks)
    with pytest.raises(ValueError, match="masks are integers but not all in \\{0, 1\\}"):
      fn(pred, masks.astype(np.int32) * 255)
  with pytest.raises(ValueError, match="masks must be boolean"):
    metrics.foreground_fraction(masks.astype(np.float64))
