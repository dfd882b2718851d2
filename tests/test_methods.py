"""TENT, histogram matching and the AdaBN prior, against independent computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from skimage.exposure import match_histograms

from bnjax import adapt, methods

KEY = jax.random.key(0)


class Tiny(nn.Module):
  """Written the way other projects write a small conv net (nn.Conv, auto names)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
    return nn.Conv(2, (1, 1))(x)


@pytest.fixture(scope="module")
def tiny():
  model = Tiny()
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1)) * 0.7 + 0.3
  return model, model.init(jax.random.key(2), x), x


def _entropy(logits):
  logp = jax.nn.log_softmax(logits)
  return float(jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1)))


def test_tent_equals_a_hand_written_optax_loop(tiny):
  model, v, x = tiny
  out = methods.tent(model, v, x, steps=3, learning_rate=1e-2, batch_size=8, key=KEY)
  # Three Adam steps on the train-mode entropy of the whole batch, by hand.
  flat = traverse_util.flatten_dict(v["params"])
  theta = {k: a for k, a in flat.items() if k[0].startswith("BatchNorm")}
  tx = optax.adam(1e-2)
  opt = tx.init(theta)

  def loss(theta):
    params = traverse_util.unflatten_dict({**flat, **theta})
    logits, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    logp = jax.nn.log_softmax(logits)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))

  for _ in range(3):
    updates, opt = tx.update(jax.grad(loss)(theta), opt, theta)
    theta = optax.apply_updates(theta, updates)
  got = traverse_util.flatten_dict(out["params"])
  assert len(theta) == 4
  for k, a in flat.items():
    if k in theta:
      np.testing.assert_allclose(got[k], theta[k], atol=2e-6)
      assert not np.array_equal(np.asarray(got[k]), np.asarray(a))
    else:  # every other leaf bit for bit
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(a))
  # batch_stats: the exact target statistics under the adapted scale and bias.
  want = adapt.recompute_batch_stats(model, {**v, "params": out["params"]}, x)
  for a, b in zip(jax.tree_util.tree_leaves(out["batch_stats"]),
                  jax.tree_util.tree_leaves(want["batch_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tent_minibatches_follow_the_documented_order(tiny):
  """7 inputs, batches of 3, 5 steps: 2 batches per pass (the 7th input of
  each pass left out), 3 passes; pass e in the order of
  permutation(fold_in(key, e), 7), as the docstring says. A plain loop of
  Adam steps on each batch's train-mode entropy, written here."""
  model, v, x = tiny
  x = x[:7]
  out = methods.tent(model, v, x, steps=5, learning_rate=1e-2, batch_size=3, key=KEY)
  batches = []
  for e in range(3):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(KEY, e), 7))
    batches += [order[0:3], order[3:6]]
  batches = batches[:5]
  assert len({tuple(sorted(b)) for b in batches}) == 5  # the passes differ
  flat = traverse_util.flatten_dict(v["params"])
  theta = {k: a for k, a in flat.items() if k[0].startswith("BatchNorm")}
  tx = optax.adam(1e-2)
  opt = tx.init(theta)

  def loss(theta, xb):
    params = traverse_util.unflatten_dict({**flat, **theta})
    logits, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, xb,
                            train=True, mutable=["batch_stats"])
    logp = jax.nn.log_softmax(logits)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))

  for b in batches:
    updates, opt = tx.update(jax.grad(loss)(theta, x[b]), opt, theta)
    theta = optax.apply_updates(theta, updates)
  got = traverse_util.flatten_dict(out["params"])
  for k, a in theta.items():
    np.testing.assert_allclose(got[k], a, atol=2e-6)


def _hand_tent(model, v, x, train_kwargs, steps=3, lr=1e-2):
  """Adam on the train-mode entropy over the parameters of every module with
  batch_stats, written out (no dropout in the models it is used on)."""
  flat = traverse_util.flatten_dict(v["params"])
  stats_layers = {k[:-1] for k in traverse_util.flatten_dict(v["batch_stats"])}
  theta = {k: a for k, a in flat.items() if k[:-1] in stats_layers}
  tx = optax.adam(lr)
  opt = tx.init(theta)

  def loss(theta):
    params = traverse_util.unflatten_dict({**flat, **theta})
    logits, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                            mutable=["batch_stats"], **train_kwargs)
    logp = jax.nn.log_softmax(logits)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))

  for _ in range(steps):
    updates, opt = tx.update(jax.grad(loss)(theta), opt, theta)
    theta = optax.apply_updates(theta, updates)
  return theta


def test_tent_on_models_written_elsewhere():
  import foreign_models as fm

  # A ResNet with a list attribute and train=True by default, forked BatchNorm
  # layers (bnjax reads them by their batch_stats), and a net with dropout
  # and a 'training' flag: only BatchNorm scale and bias move, dropout stays off.
  x4 = jax.random.normal(jax.random.key(3), (6, 8, 8, 2))
  cases = [(fm.ResNet(stage_sizes=[1, 1]), x4, {"train": False}, {"train": True}),
           (fm.SubclassAndFork(), x4, None, {"train": True}),
           (fm.TrainingFlagNet(), jax.random.normal(jax.random.key(4), (6, 7)),
            {"training": False}, None)]
  for model, x, kwargs, train_kwargs in cases:
    v = model.init(jax.random.key(0), x, **(kwargs or {"train": False}))
    out = methods.tent(model, v, x, steps=3, learning_rate=1e-2, batch_size=6, key=KEY,
                       apply_kwargs=kwargs)
    flat, got = (traverse_util.flatten_dict(t["params"]) for t in (v, out))
    moved = {k for k in flat if not np.array_equal(np.asarray(flat[k]), np.asarray(got[k]))}
    layers = {k[:-1] for k in traverse_util.flatten_dict(v["batch_stats"])}
    assert moved == {k for k in flat if k[:-1] in layers}, (type(model), moved)
    if train_kwargs is not None:
      want = _hand_tent(model, v, x, train_kwargs)
      assert set(want) == moved
      for k, a in want.items():
        np.testing.assert_allclose(got[k], a, atol=5e-6)
    before = methods.mean_entropy(model.apply(adapt.recompute_batch_stats(
        model, v, x, apply_kwargs=kwargs), x, **(kwargs or {"train": False})))
    after = methods.mean_entropy(model.apply(out, x, **(kwargs or {"train": False})))
    assert after < before


def test_tent_lowers_the_entropy_on_its_adaptation_set(tiny):
  model, v, x = tiny
  before = _entropy(model.apply(adapt.recompute_batch_stats(model, v, x), x))
  out = methods.tent(model, v, x, steps=10, learning_rate=1e-2, batch_size=4, key=KEY)
  after = _entropy(model.apply(out, x))
  assert after < before - 1e-3
  assert methods.mean_entropy(model.apply(out, x)) == pytest.approx(after, rel=1e-5)


def test_tent_is_reproducible_and_keyed(tiny):
  model, v, x = tiny
  a = methods.tent(model, v, x, steps=3, batch_size=4, key=KEY)
  b = methods.tent(model, v, x, steps=3, batch_size=4, key=KEY)
  c = methods.tent(model, v, x, steps=3, batch_size=4, key=jax.random.key(9))
  leaves = lambda t: [np.asarray(l) for l in jax.tree_util.tree_leaves(t)]
  assert all(np.array_equal(p, q) for p, q in zip(leaves(a), leaves(b)))
  assert not all(np.array_equal(p, q) for p, q in zip(leaves(a), leaves(c)))


def test_episodic_tent_adapts_each_batch_from_the_source(tiny):
  model, v, x = tiny
  out = methods.tent(model, v, x, steps=2, learning_rate=1e-2, batch_size=4, episodic=True,
                     key=KEY)
  for b in range(2):
    alone = methods.tent(model, v, x[4 * b:4 * b + 4], steps=2, learning_rate=1e-2,
                         batch_size=4, key=KEY)
    for p, q in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(alone)):
      np.testing.assert_allclose(np.asarray(p)[b], np.asarray(q), atol=1e-6)


def test_tent_bad_arguments(tiny):
  model, v, x = tiny
  with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.8"):
    methods.tent(model, v, x, batch_size=9, key=KEY)
  with pytest.raises(ValueError, match="does not divide"):
    methods.tent(model, v, x, batch_size=3, episodic=True, key=KEY)
  with pytest.raises(ValueError, match="steps"):
    methods.tent(model, v, x, steps=0, key=KEY)
  with pytest.raises(ValueError, match="learning_rate"):
    methods.tent(model, v, x, learning_rate=float("nan"), key=KEY)
  with pytest.raises(ValueError, match="BatchNorm"):
    methods.tent(model, {"params": v["params"]}, x, key=KEY)


def test_histogram_match_agrees_with_skimage():
  rng = np.random.default_rng(0)
  images = (rng.uniform(size=(3, 16, 16, 1)) ** 2).astype(np.float32)
  reference = np.clip(rng.normal(0.5, 0.1, (5, 16, 16, 1)), 0, 1)
  reference = (np.round(reference * 255) / 255).astype(np.float32)  # ties, as 8-bit data
  for imgs in (images, np.round(images * 255).astype(np.float32) / 255):
    got = np.asarray(methods.histogram_match(imgs, reference))
    want = np.stack([match_histograms(im, reference.reshape(-1, 16, 1), channel_axis=-1)
                     for im in imgs])
    np.testing.assert_allclose(got, want, atol=1 / 255)
    assert np.abs(got - want).max() < 1e-5
  with pytest.raises(ValueError, match="channels"):
    methods.histogram_match(images, np.concatenate([reference] * 2, -1))


class FirstBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))


def test_adabn_prior_on_a_worked_example():
  # n = 6 target examples, prior N = 18: alpha = 6 / 24 = 0.25, so the stored
  # statistics are 0.25 target + 0.75 source (source mean 0, var 1 at init).
  x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(6, 2))
  model = FirstBN()
  v = model.init(KEY, x)
  out = adapt.recompute_batch_stats(model, v, x, prior=18)
  mean, var = x.mean(0), x.var(0)  # 2.5/3.5 and 35/3 per feature
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], 0.25 * mean, rtol=1e-6)
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], 0.25 * var + 0.75,
                             rtol=1e-6)
  zero = adapt.recompute_batch_stats(model, v, x, prior=0)
  np.testing.assert_allclose(zero["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-6)
  with pytest.raises(ValueError, match="not both"):
    adapt.recompute_batch_stats(model, v, x, prior=4, alpha=0.5)
  with pytest.raises(ValueError, match="prior must be a number >= 0"):
    adapt.recompute_batch_stats(model, v, x, prior=-1)


@pytest.mark.parametrize("strategy", ["vmap", "unroll"])
def test_tent_stacked_equals_tent_pair_by_pair(tiny, strategy):
  """tent_stacked over P = 3 (model, set) pairs against three tent calls with
  the same keys (tent itself is checked against a hand-written optax loop)."""
  model, _, x = tiny
  vs = [model.init(jax.random.key(10 + p), x) for p in range(3)]
  xs = jnp.stack([x * (1.0 + 0.3 * p) + 0.1 * p for p in range(3)])  # three shifted sets
  keys = jax.random.split(jax.random.key(5), 3)
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *vs)
  out = methods.tent_stacked(model, stacked, xs, keys=keys, steps=3, learning_rate=1e-2,
                             batch_size=4, strategy=strategy, image_range=None)
  for p in range(3):
    one = methods.tent(model, vs[p], xs[p], steps=3, learning_rate=1e-2, batch_size=4,
                       key=keys[p], image_range=None)
    # The same three Adam steps per pair; the stacked program agrees with the
    # single one to float32 rounding of the gradients (~1e-7 relative), which
    # three steps of lr 1e-2 cannot grow near 1e-5 (Adam divides by
    # sqrt(v) + 1e-8, so a gradient's rounding moves its step by at most
    # lr x (its relative rounding) unless the gradient is below ~1e-8).
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(one)):
      np.testing.assert_allclose(np.asarray(a[p]), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="keys must hold one PRNG key per pair"):
    methods.tent_stacked(model, stacked, xs, keys=keys[:2], image_range=None)
  with pytest.raises(ValueError, match="leading model axis of size 3"):
    methods.tent_stacked(model, vs[0], xs, keys=keys, image_range=None)  # one model, unstacked


def test_histogram_match_stacked_equals_pair_by_pair():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, 4, 8, 8, 1)).astype(np.float32) ** np.array([1, 2, 3])[:, None, None, None, None]
  reference = rng.uniform(size=(3, 5, 8, 8, 1)).astype(np.float32)
  out = methods.histogram_match_stacked(images, reference)
  for p in range(3):
    np.testing.assert_array_equal(np.asarray(out[p]),
                                  np.asarray(methods.histogram_match(images[p], reference[p])))
  with pytest.raises(ValueError, match="same number of pairs"):
    methods.histogram_match_stacked(images, reference[:2])
