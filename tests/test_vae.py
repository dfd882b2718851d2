"""bnjax.vae: the KL term against the closed form of two Gaussians and a
Monte-Carlo estimate, the reconstruction loss against NumPy, label
corruption, the losses recomposed by hand, training, the given-label rate,
BatchNorm adaptation of the VAE; bnjax.data.digits."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import compiles
from bnjax import adapt
from bnjax import data
from bnjax import vae




def test_kl_against_the_gaussian_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 1, (3, 5))
  log_var = rng.normal(0, 0.5, (3, 5))
  got = np.asarray(vae.kl_divergence(jnp.asarray(mean), jnp.asarray(log_var)))
  for i in range(3):
    # KL(N(m, S) || N(0, I)) = (tr S + m'm - d - log det S) / 2, with S a full (diagonal) matrix
    cov = np.diag(np.exp(log_var[i]))
    want = 0.5 * (np.trace(cov) + mean[i] @ mean[i] - 5 - np.linalg.slogdet(cov)[1])
    assert got[i] == pytest.approx(want, rel=1e-5)
    # Monte Carlo: E_q[log q(z) - log p(z)]
    z = mean[i] + np.exp(0.5 * log_var[i]) * rng.standard_normal((200_000, 5))
    diff = (sps.norm.logpdf(z, mean[i], np.exp(0.5 * log_var[i])).sum(1)
            - sps.norm.logpdf(z).sum(1))
    se = diff.std() / math.sqrt(len(diff))
    assert abs(diff.mean() - got[i]) < 4 * se + 1e-3


def test_bernoulli_nll_against_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (2, 4, 4, 1))
  x = rng.uniform(0, 1, (2, 4, 4, 1))
  p = 1 / (1 + np.exp(-logits))
  want = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(2, -1).sum(1)
  np.testing.assert_allclose(vae.bernoulli_nll(jnp.asarray(logits, jnp.float32),
                                               jnp.asarray(x, jnp.float32)), want, rtol=1e-5)


def test_corrupt_labels():
  labels = np.arange(20_000) % 10
  given, wrong = vae.corrupt_labels(jax.random.key(0), labels, 0.1, 10)
  given, wrong = np.asarray(given), np.asarray(wrong)
  np.testing.assert_array_equal(given != labels, wrong)
  assert wrong.mean() == pytest.approx(0.1, abs=0.01)
  # a wrong label is one of the other 9 classes, uniformly
  offsets = (given[wrong] - labels[wrong]) % 10
  counts = np.bincount(offsets, minlength=10)
  assert counts[0] == 0
  assert sps.chisquare(counts[1:]).pvalue > 1e-3
  same, none = vae.corrupt_labels(jax.random.key(1), labels, 0.0, 10)
  np.testing.assert_array_equal(same, labels)
  assert not np.any(none)
  with pytest.raises(ValueError, match="rate must"):
    vae.corrupt_labels(jax.random.key(0), labels, 1.5, 10)


@pytest.fixture(scope="module")
def tiny():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 96).astype(np.int32)
  images = np.zeros((96, 8, 8, 1), np.float32)
  for c in range(3):  # class c: a bright horizontal band at rows 2c..2c+1, plus noise
    images[labels == c, 2 * c: 2 * c + 2] = 1.0
  images = np.clip(images + rng.uniform(0, 0.2, images.shape), 0, 1).astype(np.float32)
  clf = vae.Classifier(num_classes=3, features=4)
  cfg = vae.VAEConfig(steps=60, batch_size=16, learning_rate=1e-2, check_every=30)
  clf_vars, hist = vae.fit_classifier(jax.random.key(0), clf, images, labels, cfg, verbose=False)
  return images, labels, (clf, clf_vars), hist


def test_classifier_learns(tiny):
  images, labels, classifier, hist = tiny
  assert hist["loss"][-5:].mean() < 0.2 * hist["loss"][:3].mean()
  assert np.mean(vae.classify(classifier, images) == labels) > 0.95
  # The learning rate is an argument of the compiled step: another one traces
  # and lowers nothing, and is used (the first 10 steps of the fixture's run:
  # same batches).
  with compiles.lowered() as lowered:
    _, h = vae.fit_classifier(jax.random.key(0), classifier[0], images, labels,
                              vae.VAEConfig(steps=10, batch_size=16, learning_rate=3e-3),
                              verbose=False)
  assert lowered == []
  assert h["loss"][0] == hist["loss"][0] and not np.array_equal(h["loss"], hist["loss"][:10])


def test_losses_recomposed_by_hand(tiny):
  images, labels, classifier, _ = tiny
  model = vae.ConditionalVAE((8, 8, 1), latent=3, num_classes=3, features=4)
  v = model.init(jax.random.key(1), images[:4], labels[:4])
  got = vae.losses(model, v, images[:10], labels[:10], classifier, lambda_label=7.0)
  logits, mean, log_var = model.apply(v, images[:10], labels[:10])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  x = images[:10].astype(np.float64)
  rec = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(10, -1).sum(1)
  m, lv = np.asarray(mean, np.float64), np.asarray(log_var, np.float64)
  kl = 0.5 * (m ** 2 + np.exp(lv) - 1 - lv).sum(1)
  clf_logits = np.asarray(classifier[0].apply(classifier[1], jnp.asarray(p, jnp.float32)),
                          np.float64)
  ce = -(clf_logits[np.arange(10), labels[:10]] - np.log(np.exp(clf_logits).sum(1)))
  assert got["reconstruction"] == pytest.approx(rec.mean(), rel=1e-4)
  assert got["kl"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-6)
  assert got["label"] == pytest.approx(7.0 * ce.mean(), rel=1e-4)
  assert got["total"] == pytest.approx(rec.mean() + kl.mean() + 7.0 * ce.mean(), rel=1e-4)
  zero = vae.losses(model, v, images[:10], labels[:10], None, lambda_label=0.0)
  assert zero["label"] == 0.0 and zero["reconstruction"] == pytest.approx(got["reconstruction"])


def test_the_label_moves_the_posterior_only_when_conditional():
  x = jnp.full((2, 8, 8, 1), 0.5)
  for conditional in (True, False):
    model = vae.ConditionalVAE((8, 8, 1), latent=3, num_classes=3, features=4,
                               conditional=conditional)
    v = model.init(jax.random.key(0), x, jnp.array([0, 1]))
    assert ("embed" in v["params"]) == conditional
    v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # a non-zero embedding
    m0, _ = model.apply(v, x, jnp.array([0, 0]), method="encode")
    m1, _ = model.apply(v, x, jnp.array([1, 1]), method="encode")
    emb = v["params"]["embed"]["embedding"] if conditional else None
    if conditional:  # the embeddings' difference, added to the mean
      np.testing.assert_allclose(m1 - m0, np.broadcast_to(emb[1, :3] - emb[0, :3], (2, 3)),
                                 rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(m0, m1)


def test_fit_learns_is_seeded_and_needs_its_classifier(tiny):
  images, labels, classifier, _ = tiny
  model = vae.ConditionalVAE((8, 8, 1), latent=3, num_classes=3, features=4)
  cfg = vae.VAEConfig(steps=60, batch_size=16, learning_rate=1e-2, lambda_label=10.0,
                      check_every=30)
  v1, h1 = vae.fit(jax.random.key(2), model, images, labels, classifier, cfg, verbose=False)
  # The float settings are arguments of the compiled step: another value of
  # each traces and lowers nothing, and changes the training (its first 10
  # steps, those of the 60-step run: same batches, same keys).
  with compiles.lowered() as lowered:
    for change in (dict(learning_rate=3e-3), dict(lambda_label=3.0),
                   dict(wrong_label_rate=0.5)):
      _, h = vae.fit(jax.random.key(2), model, images, labels, classifier,
                     dataclasses.replace(cfg, steps=10, **change), verbose=False)
      assert not np.array_equal(h["losses"], h1["losses"][:10]), change
    v2, h2 = vae.fit(jax.random.key(2), model, images, labels, classifier, cfg, verbose=False)
  assert lowered == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, v1, v2)  # seeded
  losses = h1["losses"]
  assert losses.shape == (60, 4)
  np.testing.assert_allclose(losses[:, 0], losses[:, 1:].sum(1), rtol=1e-5)
  assert losses[-10:, 0].mean() < 0.7 * losses[:3, 0].mean()
  rate = vae.given_label_rate(model, v1, classifier, images, labels)
  assert 0.0 <= rate <= 1.0
  with pytest.raises(ValueError, match="classifier must be"):
    vae.fit(jax.random.key(2), model, images, labels, None, cfg, verbose=False)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
    vae.fit(jax.random.key(2), model, images, labels + 5, classifier, cfg, verbose=False)
  with pytest.raises(ValueError, match="VAEConfig.wrong_label_rate must"):
    vae.VAEConfig(wrong_label_rate=2.0)
  for bad in (0.0, -1e-3, float("nan")):
    with pytest.raises(ValueError, match=r"VAEConfig.learning_rate must be a finite number > 0"):
      vae.VAEConfig(learning_rate=bad)
  # Images that do not match the model's image_shape: named before any work
  # (they failed after compiling, in a broadcast).
  other = np.zeros((images.shape[0], images.shape[1] + 4, images.shape[2], images.shape[3]),
                   np.float32)
  with pytest.raises(ValueError, match=r"images must have shape \[n, .*image_shape"):
    vae.fit(jax.random.key(2), model, other, labels, classifier, cfg, verbose=False)
  # The range error names what the VAE's user can do (fit has no image_range).
  with pytest.raises(ValueError, match=r"images must lie in .*Bernoulli") as e:
    vae.fit(jax.random.key(2), model, images * 255, labels, classifier, cfg, verbose=False)
  assert "image_range" not in str(e.value)


def test_given_label_rate_counts_agreement(tiny):
  # a classifier that ignores its input and always answers class 1
  images, labels, (clf, clf_vars), _ = tiny
  bias = np.array([0.0, 50.0, 0.0], np.float32)
  fixed = jax.tree_util.tree_map(jnp.zeros_like, clf_vars)
  fixed["params"]["Dense_0"]["bias"] = jnp.asarray(bias)
  model = vae.ConditionalVAE((8, 8, 1), latent=3, num_classes=3, features=4)
  v = model.init(jax.random.key(0), images[:4], labels[:4])
  given = np.asarray(labels)
  assert vae.given_label_rate(model, v, (clf, fixed), images, given) == pytest.approx(
      np.mean(given == 1))


def test_vae_batch_stats_adapt_like_any_model(tiny):
  images, labels, _, _ = tiny
  model = vae.ConditionalVAE((8, 8, 1), latent=3, num_classes=3, features=4)
  v = model.init(jax.random.key(0), images[:4], labels[:4])
  adapted = adapt.recompute_batch_stats(model, v, (images[:40], labels[:40]))
  # eval mode with exact statistics = train mode on the whole set (posterior mean)
  got = model.apply(adapted, images[:40], labels[:40])
  want, _ = model.apply(v, images[:40], labels[:40], train=True, mutable=["batch_stats"])
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_digits():
  pytest.importorskip("sklearn")
  images, labels = data.digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))
  # 17 grey levels k / 16
  np.testing.assert_array_equal(np.unique(images * 16), np.arange(17))
  np.testing.assert_array_equal(np.bincount(labels).min() >= 170, True)
  small = data.downsample(np.arange(32, dtype=np.float32).reshape(2, 4, 4, 1) / 31, 2)
  want = np.array([[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]]) / 4 / 31
  np.testing.assert_allclose(small[0, ..., 0], want[0], rtol=1e-6)
