"""Label-free scores against hand-written NumPy versions on a toy model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import adapt, selection


class Toy(nn.Module):
  """A two-class per-pixel classifier with one BatchNorm layer."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Conv(2, (1, 1))(nn.relu(x))


@pytest.fixture(scope="module")
def setup():
  model = Toy()
  src = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
  src_masks = np.asarray(src[..., 0] > 0.5)
  tgt = jnp.clip(jax.random.uniform(jax.random.key(2), (5, 8, 8, 1)) * 0.6 + 0.4, 0, 1)
  v = model.init(jax.random.key(0), src)
  v = adapt.recompute_batch_stats(model, v, src)  # a "source" model
  v_ad = adapt.recompute_batch_stats(model, v, tgt)
  return model, v, v_ad, src, src_masks, tgt


def _numpy_maps(model, v, x):
  logits = np.asarray(model.apply(v, x), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return p.max(-1), -(p * np.log(p)).sum(-1), p[..., 1] > p[..., 0]


def _quantile(values, q):
  s = np.sort(values.ravel())
  h = (len(s) - 1) * q
  lo = int(np.floor(h))
  return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


def test_scores_equal_a_numpy_computation(setup):
  model, v, v_ad, src, src_masks, tgt = setup
  got = selection.scores(model, v, v_ad, tgt, source_inputs=(src, src_masks))
  assert tuple(got) == selection.KEYS
  c0, e0, p0 = _numpy_maps(model, v, tgt)
  c1, e1, p1 = _numpy_maps(model, v_ad, tgt)
  cs, _, ps = _numpy_maps(model, v, src)
  acc = np.mean(ps == src_masks)
  t = _quantile(cs, 1 - acc)
  # The threshold's defining property: the fraction of source pixels above it
  # is the source accuracy (up to one pixel).
  assert abs(np.mean(cs > t) - acc) <= 1 / cs.size + 1e-12
  inter, union = (p0 & p1).sum((1, 2)), (p0 | p1).sum((1, 2))
  want = {"confidence_before": c0.mean(), "confidence_after": c1.mean(),
          "confidence_change": c1.mean() - c0.mean(), "entropy_before": e0.mean(),
          "entropy_after": e1.mean(), "atc": np.mean(c0 > t), "atc_after": np.mean(c1 > t),
          "doc": cs.mean() - c0.mean(),
          "agreement": np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)),
          "foreground_change": p1.mean() - p0.mean()}
  for k, w in want.items():
    assert got[k] == pytest.approx(w, abs=2e-6), k
  m0, s0 = (np.asarray(v["batch_stats"]["BatchNorm_0"][k], np.float64) for k in ("mean", "var"))
  m1, s1 = (np.asarray(v_ad["batch_stats"]["BatchNorm_0"][k], np.float64) for k in ("mean", "var"))
  assert got["bn_w2"] == pytest.approx(np.sum((m0 - m1) ** 2 + (np.sqrt(s0) - np.sqrt(s1)) ** 2),
                                       rel=1e-6)


def test_scores_without_source_data_or_batch_norm(setup):
  model, v, v_ad, src, src_masks, tgt = setup
  got = selection.scores(model, v, v, tgt)
  assert np.isnan(got["atc"]) and np.isnan(got["doc"]) and np.isnan(got["atc_after"])
  assert got["agreement"] == 1.0 and got["foreground_change"] == 0.0
  assert got["confidence_change"] == 0.0 and got["bn_w2"] == 0.0
  with pytest.raises(ValueError, match="source_inputs must be a tuple"):
    selection.scores(model, v, v_ad, tgt, source_inputs=src)
