"""Label-free scores against hand-written NumPy versions on a toy model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerance

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


def test_adapted_inputs_score_an_input_space_method(setup):
  # Histogram matching keeps the variables and changes the images: the
  # "after" scores are the model's on the matched images.
  from bnjax import methods
  model, v, _, src, src_masks, tgt = setup
  matched = methods.histogram_match(tgt, src)
  got = selection.scores(model, v, v, tgt, adapted_inputs=matched)
  c0, _, p0 = _numpy_maps(model, v, tgt)
  c1, e1, p1 = _numpy_maps(model, v, np.asarray(matched))
  assert got["confidence_after"] == pytest.approx(c1.mean(), abs=2e-6)
  assert got["entropy_after"] == pytest.approx(e1.mean(), abs=2e-6)
  assert got["foreground_change"] == pytest.approx(p1.mean() - p0.mean(), abs=1e-9)
  with pytest.raises(ValueError, match="adapted_inputs must have the shape"):
    selection.scores(model, v, v, tgt, adapted_inputs=matched[:2])


def test_rule_decides_by_the_sign_of_the_fitted_gain(tmp_path):
  # gain = 0.4 * (x - 0.31) on x = 0, 0.05, ..., 1: a monotone relation is its
  # own isotonic fit, and a new score takes the gain of the next grid point,
  # so the rule adapts exactly when the score is above 0.3.
  x = np.arange(21) / 20
  gain = 0.4 * (x - 0.31)
  rule = selection.fit_rule(x, gain, score="atc", method="adabn",
                            provenance={"pairs": 21, "grid": "toy"})
  assert rule.increasing
  for value in (-1.0, 0.0, 0.25, 0.3, 0.301, 0.35, 0.9, 1.5):
    d = selection.should_adapt(rule, {"atc": value, "doc": 0.0})
    assert d.adapt == (value > 0.3), value
    assert d.score == "atc" and d.method == "adabn" and d.value == value
    nxt = x[min(np.searchsorted(x, value), len(x) - 1)]
    assert d.predicted_gain == pytest.approx(0.4 * (nxt - 0.31), abs=1e-12)
  # Decreasing relations are found from the data's own direction.
  down = selection.fit_rule(-x, gain, score="entropy_after", method="tent")
  assert not down.increasing
  assert selection.should_adapt(down, {"entropy_after": -0.9}).adapt
  assert not selection.should_adapt(down, {"entropy_after": -0.1}).adapt
  # Saved and loaded: the same decisions, the provenance kept.
  path = tmp_path / "rule.json"
  rule.save(path)
  again = selection.Rule.load(path)
  assert again == rule and again.provenance["grid"] == "toy"
  # A margin asks for more.
  strict = selection.fit_rule(x, gain, score="atc", method="adabn", margin=0.1)
  assert not selection.should_adapt(strict, {"atc": 0.5}).adapt
  assert selection.should_adapt(strict, {"atc": 0.6}).adapt


def test_rule_errors_name_the_problem(tmp_path):
  x = np.linspace(0, 1, 5)
  rule = selection.fit_rule(x, x - 0.5, score="atc", method="adabn")
  with pytest.raises(ValueError, match="lacks"):
    selection.should_adapt(rule, {"doc": 0.1})
  with pytest.raises(ValueError, match="pass source_inputs"):
    selection.should_adapt(rule, {"atc": float("nan")})
  with pytest.raises(ValueError, match="must be finite"):
    selection.fit_rule([0.0, np.nan, 1.0], [0.1, 0.2, 0.3], score="atc", method="adabn")
  with pytest.raises(ValueError, match="same length"):
    selection.fit_rule([0.0, 1.0], [0.1], score="atc", method="adabn")
  with pytest.raises(ValueError, match="must be a bnjax.selection.Rule"):
    selection.should_adapt({"score": "atc"}, {"atc": 0.1})
  (tmp_path / "bad.json").write_text('{"format": "other"}')
  with pytest.raises(ValueError, match="not a bnjax rule"):
    selection.Rule.load(tmp_path / "bad.json")
  d = rule.to_json()
  del d["edges"]
  with pytest.raises(ValueError, match="lacks its field 'edges'"):
    selection.Rule.from_json(d)


@pytest.mark.parametrize("strategy", ["vmap", "unroll"])
def test_scores_stacked_equals_scores_pair_by_pair(setup, strategy):
  """scores_stacked over P = 2 pairs and two methods (one an input-space
  method) against scores pair by pair (checked against NumPy above)."""
  model, v, v_ad, src, src_masks, tgt = setup
  tgt2 = jnp.clip(tgt * 0.8 + 0.1, 0, 1)
  v2 = adapt.recompute_batch_stats(model, v, tgt2)
  stack = lambda *t: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *t)
  variables, adapted = stack(v, v), stack(v_ad, v2)
  inputs, other = jnp.stack([tgt, tgt2]), jnp.stack([tgt2, tgt])
  source = (jnp.stack([src, src]), np.stack([src_masks, src_masks]))
  got = selection.scores_stacked(model, variables, [adapted, variables], inputs,
                                 source_inputs=source, adapted_inputs=[None, other],
                                 strategy=strategy)
  # The two programs agree to float32 rounding in every logit (|dz| ~ 1e-7),
  # so the masks and the ATC comparisons can differ only for pixels within
  # rounding of the decision boundary or of the ATC threshold. In these toy
  # sets the only pixels within 1e-5 of the boundary are exact ties of two
  # zero logits (every ReLU input below 0; bias 0), which every program
  # computes exactly, and no confidence is within 1e-5 of the threshold
  # (checked here, independently of bnjax): every score agrees to rounding,
  # so the tolerance below holds on any CPU.
  def rounding_sensitive(vv, xx):
    z = np.asarray(model.apply(vv, xx), np.float64)
    return tolerance.near_boundary(z) & (np.abs(z).max(-1) > 0)

  cs, _, ps = _numpy_maps(model, v, src)
  t = _quantile(cs, 1 - np.mean(ps == src_masks))
  assert not rounding_sensitive(v, src).any()
  for p, (x, va) in enumerate([(tgt, v_ad), (tgt2, v2)]):
    for m, (adapted_p, x_ad) in enumerate([(va, None), (v, other[p])]):
      for vv, xx in ((v, x), (adapted_p, x if x_ad is None else x_ad)):
        assert not rounding_sensitive(vv, xx).any()
        assert np.min(np.abs(_numpy_maps(model, vv, np.asarray(xx))[0] - t)) > 1e-5
      want = selection.scores(model, v, adapted_p, x, source_inputs=(src, src_masks),
                              adapted_inputs=x_ad)
      for k in selection.KEYS:
        np.testing.assert_allclose(got[m][k][p], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="as long as adapted_variables"):
    selection.scores_stacked(model, variables, [adapted], inputs, adapted_inputs=[None, None])
