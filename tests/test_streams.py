"""bnjax.streams: each setting's construction, each online method's first
steps against a forward pass written here in NumPy (and an optax loop for
TENT), the scan against a Python loop, run_many against separate runs, a
model written elsewhere through every method, and the errors."""


import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiles
import foreign_models as fm
from bnjax import adapt, data, streams

EPS = 1e-5


class PixNet(nn.Module):
  """Per-pixel: dense 1 -> 3, BatchNorm, ReLU, dense 3 -> 2 logits."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(3, name="d1")(x)
    h = nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="bn")(h)
    return nn.Dense(2, name="d2")(nn.relu(h))


@pytest.fixture(scope="module")
def pixnet():
  model = PixNet()
  v = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1))))
  rng = np.random.default_rng(0)
  v["params"]["d1"]["kernel"] = rng.normal(size=(1, 3)).astype(np.float32) * 3
  v["params"]["bn"]["scale"] = rng.uniform(0.5, 2, 3).astype(np.float32)
  v["params"]["bn"]["bias"] = rng.normal(size=3).astype(np.float32)
  v["batch_stats"]["bn"]["mean"] = rng.normal(size=3).astype(np.float32)
  v["batch_stats"]["bn"]["var"] = rng.uniform(0.5, 2, 3).astype(np.float32)
  # Logits spread enough that about 60 % of the pixels are below the entropy
  # threshold of the filtering methods (0.4 ln 2) and the rest above it.
  v["params"]["d2"]["kernel"] = v["params"]["d2"]["kernel"] * 3
  batches = rng.uniform(0, 1, (5, 3, 4, 4, 1)).astype(np.float32)  # T = 5 batches of B = 3
  return model, v, batches


def np_logits(v, x, mean, var, scale=None, bias=None):
  """PixNet's logits in float64 NumPy, BatchNorm with the given statistics."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  h = x.astype(np.float64) @ p["d1"]["kernel"] + p["d1"]["bias"]
  scale = p["bn"]["scale"] if scale is None else scale
  bias = p["bn"]["bias"] if bias is None else bias
  y = np.maximum((h - mean) / np.sqrt(var + EPS) * scale + bias, 0)
  return y @ p["d2"]["kernel"] + p["d2"]["bias"]


def np_moments(v, x):
  """Mean and biased variance of PixNet's BatchNorm input over a batch."""
  p = v["params"]
  h = x.astype(np.float64) @ np.asarray(p["d1"]["kernel"], np.float64) + np.asarray(
      p["d1"]["bias"], np.float64)
  h = h.reshape(-1, 3)
  return h.mean(0), h.var(0)


def _source(v):
  return (np.asarray(v["batch_stats"]["bn"]["mean"], np.float64),
          np.asarray(v["batch_stats"]["bn"]["var"], np.float64))


def _run_logits(model, v, batches, method, **options):
  out = streams.run(model, v, batches, method, return_logits=True, image_range=None, **options)
  assert out.masks.shape == batches.shape[:4]
  np.testing.assert_array_equal(out.masks, out.logits[..., 1] > out.logits[..., 0])
  return out.logits


# --------------------------------------------------------------------------
# The methods' first steps by hand


def test_source_bn_test_and_bn_alpha_against_numpy(pixnet):
  model, v, batches = pixnet
  sm, sv = _source(v)
  source = _run_logits(model, v, batches, "source")
  test = _run_logits(model, v, batches, "bn_test")
  alpha = _run_logits(model, v, batches, "bn_alpha", alpha=0.3)
  prior = _run_logits(model, v, batches, "bn_alpha", prior=6.0)  # B = 3: alpha = 3 / 9
  default = _run_logits(model, v, batches, "bn_alpha")  # BN-alpha's 0.1
  for t, x in enumerate(batches[:3]):
    bm, bv = np_moments(v, x)
    np.testing.assert_allclose(source[t], np_logits(v, x, sm, sv), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(test[t], np_logits(v, x, bm, bv), rtol=1e-5, atol=1e-5)
    for got, a in ((alpha, 0.3), (prior, 1 / 3), (default, 0.1)):
      np.testing.assert_allclose(got[t], np_logits(v, x, a * bm + (1 - a) * sm,
                                                   a * bv + (1 - a) * sv), rtol=1e-5, atol=1e-5)


@pytest.mark.wheel
def test_ema_bn_follows_every_batch(pixnet):
  """Running statistics from the source's, updated by each batch before it is
  normalised with them: (1 - m) running + m batch."""
  model, v, batches = pixnet
  got = _run_logits(model, v, batches, "ema_bn", momentum=0.2)
  rm, rv = _source(v)
  for t, x in enumerate(batches[:3]):
    bm, bv = np_moments(v, x)
    rm, rv = 0.8 * rm + 0.2 * bm, 0.8 * rv + 0.2 * bv
    np.testing.assert_allclose(got[t], np_logits(v, x, rm, rv), rtol=1e-5, atol=1e-5)
  out = streams.run(model, v, batches[:3], "ema_bn", momentum=0.2, image_range=None)
  np.testing.assert_allclose(out.state["variables"]["batch_stats"]["bn"]["mean"], rm, rtol=1e-5)
  np.testing.assert_allclose(out.state["variables"]["batch_stats"]["bn"]["var"], rv, rtol=1e-5)


def test_ema_bn_per_image_momentum(pixnet):
  """per_image: a batch of B images moves the statistics by 1 - (1 - m)^B."""
  model, v, batches = pixnet
  got = _run_logits(model, v, batches, "ema_bn", momentum=0.2, per_image=True)
  rm, rv = _source(v)
  m = 1 - 0.8 ** 3  # B = 3
  for t, x in enumerate(batches[:3]):
    bm, bv = np_moments(v, x)
    rm, rv = (1 - m) * rm + m * bm, (1 - m) * rv + m * bv
    np.testing.assert_allclose(got[t], np_logits(v, x, rm, rv), rtol=1e-5, atol=1e-5)


def test_tent_online_against_an_optax_loop(pixnet):
  """Each batch: the prediction of the current scale and bias with the
  batch's moments (before the update), then one Adam step on the mean
  per-pixel entropy; written here with jnp and optax."""
  model, v, batches = pixnet
  got = _run_logits(model, v, batches, "tent", learning_rate=0.05)
  p = v["params"]
  w1, b1 = jnp.asarray(p["d1"]["kernel"]), jnp.asarray(p["d1"]["bias"])
  w2, b2 = jnp.asarray(p["d2"]["kernel"]), jnp.asarray(p["d2"]["bias"])

  def forward(theta, x):
    h = x @ w1 + b1
    mean = h.mean((0, 1, 2))
    var = ((h - mean) ** 2).mean((0, 1, 2))
    y = jax.nn.relu((h - mean) / jnp.sqrt(var + EPS) * theta["scale"] + theta["bias"])
    return y @ w2 + b2

  def entropy(theta, x):
    logp = jax.nn.log_softmax(forward(theta, x))
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, -1))

  theta = {"scale": jnp.asarray(p["bn"]["scale"]), "bias": jnp.asarray(p["bn"]["bias"])}
  tx = optax.adam(0.05)
  opt = tx.init(theta)
  for t, x in enumerate(batches[:3]):
    np.testing.assert_allclose(got[t], forward(theta, x), rtol=1e-4, atol=1e-5)
    updates, opt = tx.update(jax.grad(entropy)(theta, x), opt, theta)
    theta = optax.apply_updates(theta, updates)
  out = streams.run(model, v, batches[:3], "tent", learning_rate=0.05, image_range=None)
  np.testing.assert_allclose(out.state["variables"]["params"]["bn"]["scale"], theta["scale"],
                             rtol=1e-4, atol=1e-6)
  for k in ("d1", "d2"):  # only the BatchNorm affine moves
    np.testing.assert_array_equal(out.state["variables"]["params"][k]["kernel"],
                                  p[k]["kernel"])


class ConvNet(nn.Module):
  """3x3 conv, BatchNorm, ReLU, 1x1 conv: statistics that flips change."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(3, (3, 3), use_bias=False, name="c1")(x)
    h = nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="bn")(h)
    return nn.Conv(2, (1, 1), name="c2")(nn.relu(h))


@pytest.mark.parametrize("augment,copies", [("flips", 4), ("dihedral", 8)])
def test_augbn_pools_the_flipped_copies(augment, copies):
  """The statistics of the batch and its flipped (and transposed) copies,
  written here with lax.conv and NumPy, mixed with the source by the prior;
  the logits are the original images'."""
  model = ConvNet()
  rng = np.random.default_rng(2)
  x = rng.uniform(0, 1, (2, 2, 6, 6, 1)).astype(np.float32)
  x[:, :, :, :3] *= 0.3  # left/right asymmetric: flips change the conv's output statistics
  v = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(1), x[0]))
  v["batch_stats"]["bn"]["mean"] = rng.normal(size=3).astype(np.float32)
  got = _run_logits(model, v, x, "augbn", augment=augment, prior=8.0)
  p = v["params"]
  conv = lambda a: np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(a), jnp.asarray(p["c1"]["kernel"]), (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)
  sm, sv = _source(v)
  for t, b in enumerate(x):
    pool = [b, b[:, :, ::-1], b[:, ::-1], b[:, ::-1, ::-1]]
    pool += [np.swapaxes(a, 1, 2) for a in pool] if augment == "dihedral" else []
    h = conv(np.concatenate(pool)).reshape(-1, 3)
    a = 2 * copies / (2 * copies + 8.0)
    mean, var = a * h.mean(0) + (1 - a) * sm, a * h.var(0) + (1 - a) * sv
    y = np.maximum((conv(b) - mean) / np.sqrt(var + EPS) * p["bn"]["scale"] + p["bn"]["bias"], 0)
    want = y @ np.asarray(p["c2"]["kernel"][0, 0], np.float64) + p["c2"]["bias"]
    np.testing.assert_allclose(got[t], want, rtol=1e-4, atol=1e-5)
    plain = conv(b).reshape(-1, 3)
    assert not np.allclose(plain.mean(0), h.mean(0), atol=1e-3)  # the copies mattered


def _hand_forward(v):
  """PixNet's logits written here with jnp, BatchNorm on the batch's moments,
  as a function of its scale and bias."""
  p = v["params"]
  w1, b1 = jnp.asarray(p["d1"]["kernel"]), jnp.asarray(p["d1"]["bias"])
  w2, b2 = jnp.asarray(p["d2"]["kernel"]), jnp.asarray(p["d2"]["bias"])

  def forward(theta, x):
    h = x @ w1 + b1
    mean = h.mean((0, 1, 2))
    var = ((h - mean) ** 2).mean((0, 1, 2))
    return jax.nn.relu((h - mean) / jnp.sqrt(var + EPS) * theta["scale"] + theta["bias"]) @ w2 + b2
  return forward


def _entropy(logits):
  logp = jax.nn.log_softmax(logits)
  return -jnp.sum(jnp.exp(logp) * logp, -1)


def _theta(v):
  return {"scale": jnp.asarray(v["params"]["bn"]["scale"]),
          "bias": jnp.asarray(v["params"]["bn"]["bias"])}


E0 = 0.4 * np.log(2)  # 0.4 ln C, C = 2


@pytest.mark.parametrize("d_margin", [None, 0.99])
def test_eta_filters_and_weights_pixels_and_images(pixnet, d_margin):
  """ETA per pixel and per image, by hand: pixels with entropy below 0.4 ln 2
  count, weighted by 1 / exp(E - E0); with d_margin, an image whose mean
  class probabilities over its reliable pixels have |cosine| >= d_margin with
  the moving average (0.9 old + 0.1 the kept images' mean) is left out."""
  model, v, batches = pixnet
  options = {"learning_rate": 0.05} if d_margin is None else {"learning_rate": 0.05,
                                                              "d_margin": d_margin}
  got = _run_logits(model, v, batches, "eta", **options)
  forward = _hand_forward(v)
  theta, tx = _theta(v), optax.adam(0.05)
  opt, m, filtered, mixed = tx.init(theta), None, 0, 0
  for t, x in enumerate(batches[:3]):
    np.testing.assert_allclose(got[t], forward(theta, x), rtol=1e-4, atol=1e-5)
    ent = np.asarray(_entropy(forward(theta, x)), np.float64)
    probs = np.asarray(jax.nn.softmax(forward(theta, x)), np.float64)
    keep = []
    for i in range(len(x)):
      rel = ent[i] < E0
      mixed += 0 < rel.mean() < 1
      p_img = probs[i][rel].mean(0) if rel.any() else None
      ok = rel.any() and (d_margin is None or m is None or abs(
          p_img @ m / (np.linalg.norm(p_img) * np.linalg.norm(m))) < d_margin)
      filtered += rel.any() and not ok
      keep.append(ok)
    keep = np.array(keep)

    def loss(theta):
      e = _entropy(forward(theta, x))
      mask = jnp.asarray((ent < E0) & keep[:, None, None])
      w = jnp.asarray(np.exp(E0 - ent))
      return jnp.sum(w * e * mask) / max(mask.sum(), 1)

    if keep.any():
      mean = np.mean([probs[i][ent[i] < E0].mean(0) for i in np.flatnonzero(keep)], 0)
      m = mean if m is None else 0.9 * m + 0.1 * mean
      # No pixel left by the filters: no step (EATA's code).
      updates, opt = tx.update(jax.grad(loss)(theta), opt, theta)
      theta = optax.apply_updates(theta, updates)
  assert mixed > 0  # images with reliable and unreliable pixels: the filter is exercised
  if d_margin is not None:
    assert filtered > 0  # and the redundancy filter left an image out


def test_eata_fisher_anchor(pixnet):
  """EATA = ETA + fisher_alpha sum F (theta - theta0)^2, F the squared gradient
  of the cross-entropy against the model's own argmax on unlabelled source
  images, per batch of fisher_batch_size, averaged (the last incomplete
  batch dropped)."""
  model, v, batches = pixnet
  source = np.random.default_rng(1).uniform(0, 1, (7, 4, 4, 1)).astype(np.float32)
  got = _run_logits(model, v, batches, "eata", learning_rate=0.05, fisher_alpha=50.0,
                    source_images=source, fisher_batch_size=3)
  forward = _hand_forward(v)
  theta0 = _theta(v)

  def ce(theta, xb):
    z = forward(theta, xb)
    labels = jax.lax.stop_gradient(jnp.argmax(z, -1))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), labels[..., None], -1))

  grads = [jax.grad(ce)(theta0, source[i:i + 3]) for i in (0, 3)]  # 7 images: 2 batches of 3
  fisher = {k: (grads[0][k] ** 2 + grads[1][k] ** 2) / 2 for k in theta0}
  online = streams.online(model, "eata", source_images=source, fisher_batch_size=3)
  state = online.init(v, (jnp.asarray(batches[0]),))
  for k, name in (("scale", "bn/scale"), ("bias", "bn/bias")):
    np.testing.assert_allclose(state["fisher"][name], fisher[k], rtol=1e-4, atol=1e-10)
  theta, tx = dict(theta0), optax.adam(0.05)
  opt = tx.init(theta)
  for t, x in enumerate(batches[:3]):
    np.testing.assert_allclose(got[t], forward(theta, x), rtol=1e-4, atol=1e-5)
    ent = np.asarray(_entropy(forward(theta, x)))

    def loss(theta):
      e = _entropy(forward(theta, x))
      mask = jnp.asarray(ent < E0)
      value = jnp.sum(jnp.asarray(np.exp(E0 - ent)) * e * mask) / max(mask.sum(), 1)
      return value + 50.0 * sum(jnp.sum(fisher[k] * (theta[k] - theta0[k]) ** 2) for k in theta)

    updates, opt = tx.update(jax.grad(loss)(theta), opt, theta)
    theta = optax.apply_updates(theta, updates)


@pytest.mark.parametrize("method", ["eta", "eata"])
def test_eta_and_eata_make_no_step_when_no_pixel_survives(pixnet, method):
  """As EATA's code (``if x[ids1][ids2].size(0) != 0: loss.backward();
  optimizer.step()``): a batch of which no pixel survives the filters
  leaves the weights and the optimizer's state (Adam's moments and count)
  as they were, even where EATA's Fisher anchor has a gradient. A grey
  batch (every pixel normalised to 0 by the batch's moments, all with one
  entropy above E0) between ordinary ones, against a hand loop."""
  model, v, batches = pixnet
  grey = np.full_like(batches[0], 0.5)
  x = np.stack([batches[0], grey, batches[1], grey])
  options = {"learning_rate": 0.05}
  if method == "eata":
    source = np.random.default_rng(1).uniform(0, 1, (6, 4, 4, 1)).astype(np.float32)
    options.update(source_images=source, fisher_batch_size=3, fisher_alpha=50.0)
  out = streams.run(model, v, x, method, return_logits=True, image_range=None, **options)
  got = out.logits
  # The pure step: the grey batch changes neither the weights nor the optimizer.
  online = streams.online(model, method, **options)
  state = online.init(v, (jnp.asarray(x[0]),))
  state, _ = online.step(state, (jnp.asarray(x[0]),))
  after, _ = online.step(state, (jnp.asarray(grey),))
  for a, b in zip(jax.tree_util.tree_leaves((state["variables"]["params"], state["opt"])),
                  jax.tree_util.tree_leaves((after["variables"]["params"], after["opt"]))):
    np.testing.assert_array_equal(a, b)
  if method == "eata":
    fisher = {k: state["fisher"]["bn/" + k] for k in ("scale", "bias")}
  forward = _hand_forward(v)
  theta0 = _theta(v)
  theta, tx = dict(theta0), optax.adam(0.05)
  opt, stepped = tx.init(theta), []
  for t, xb in enumerate(x):
    np.testing.assert_allclose(got[t], forward(theta, xb), rtol=1e-4, atol=1e-5)
    ent = np.asarray(_entropy(forward(theta, xb)))
    mask = jnp.asarray(ent < E0)
    stepped.append(bool(mask.any()))

    def loss(theta):
      value = jnp.sum(jnp.asarray(np.exp(E0 - ent)) * _entropy(forward(theta, xb)) * mask) / max(
          mask.sum(), 1)
      if method == "eata":
        value += 50.0 * sum(jnp.sum(fisher[k] * (theta[k] - theta0[k]) ** 2) for k in theta)
      return value

    if stepped[-1]:
      updates, opt = tx.update(jax.grad(loss)(theta), opt, theta)
      theta = optax.apply_updates(theta, updates)
  assert stepped == [True, False, True, False]
  adam = out.state["opt"][0]
  assert int(adam.count) == 2  # two steps, not four
  for k in ("scale", "bias"):
    np.testing.assert_allclose(out.state["variables"]["params"]["bn"][k], theta[k], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(adam.mu["bn/" + k], opt[0].mu[k], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(adam.nu["bn/" + k], opt[0].nu[k], rtol=1e-3, atol=1e-9)


def _sar_by_hand(v, batches, learning_rate, rho, reset_constant, keep_average=True):
  """SAR written here: per batch the current weights' logits, the reliable
  pixels' mean entropy, its gradient g1, the weights moved by rho g1 / |g1|,
  there the entropy of the pixels reliable in both passes, whose gradient
  Adam applies at the original weights; the moving average 0.9 old + 0.1 that
  loss below reset_constant sends the weights and Adam's state back to the
  source, the average itself kept (SAR's code: ``self.reset()``, then
  ``self.ema = ema``), or cleared if not keep_average. Returns (logits per
  batch, the averages after each batch, the reset flags, the last average)."""
  forward = _hand_forward(v)
  theta0 = _theta(v)
  theta, tx = dict(theta0), optax.adam(learning_rate)
  opt, ema, logits, averages, flags = tx.init(theta), None, [], [], []
  for x in batches:
    logits.append(forward(theta, x))
    rel1 = np.asarray(_entropy(forward(theta, x))) < E0
    mean_ent = lambda th, keep: jnp.sum(_entropy(forward(th, x)) * keep) / max(keep.sum(), 1)
    g1 = jax.grad(mean_ent)(theta, jnp.asarray(rel1))
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in g1.values()))
    moved = {k: theta[k] + rho * g1[k] / (norm + 1e-12) for k in theta}
    keep2 = rel1 & (np.asarray(_entropy(forward(moved, x))) < E0)
    loss2 = float(mean_ent(moved, jnp.asarray(keep2)))
    updates, opt = tx.update(jax.grad(mean_ent)(moved, jnp.asarray(keep2)), opt, theta)
    theta = optax.apply_updates(theta, updates)
    if keep2.any():
      ema = loss2 if ema is None else 0.9 * ema + 0.1 * loss2
    averages.append(ema)
    flags.append(ema is not None and ema < reset_constant)
    if flags[-1]:
      theta, opt = dict(theta0), tx.init(theta0)
      ema = ema if keep_average else None
  return logits, averages, np.array(flags), ema


@pytest.mark.parametrize("reset_constant", [0.0, 10.0])
def test_sar_two_steps_and_recovery(pixnet, reset_constant):
  """SAR against :func:`_sar_by_hand` (10: a reset after every batch; 0:
  never); the moving average is kept across the resets."""
  model, v, batches = pixnet
  got = _run_logits(model, v, batches, "sar", learning_rate=0.05, rho=0.5,
                    reset_constant=reset_constant)
  logits, _, flags, ema = _sar_by_hand(v, batches[:4], 0.05, 0.5, reset_constant)
  for t in range(4):
    np.testing.assert_allclose(got[t], logits[t], rtol=1e-4, atol=1e-5)
  out = streams.run(model, v, batches[:4], "sar", learning_rate=0.05, rho=0.5,
                    reset_constant=reset_constant, image_range=None)
  assert int(out.state["resets"]) == flags.sum()
  assert (flags.sum() >= 2) if reset_constant else not flags.any()
  assert bool(out.state["ema_set"])
  np.testing.assert_allclose(out.state["ema"], ema, rtol=1e-4)


def test_sar_default_reset_constant_and_kept_average(pixnet):
  """The default reset threshold, 0.2 ln C / ln 1000 (0.0201 for C = 2), on
  logits sharp enough that the moving average wanders around it: the resets
  are the hand loop's, some batches and not others; the hand loop at half
  or twice the threshold, or clearing the average at a reset (as bnjax did
  before following SAR's code), resets after other batches, so the test
  tells these apart."""
  model, v, batches = pixnet
  v = jax.tree_util.tree_map(np.copy, v)
  v["params"]["d2"]["kernel"] = v["params"]["d2"]["kernel"] * np.float32(10 / 3)
  x = np.concatenate([batches, batches[::-1]])  # T = 10
  c = 0.2 * np.log(2) / np.log(1000)
  out = streams.run(model, v, x, "sar", learning_rate=0.2, rho=0.5, return_logits=True,
                    image_range=None)
  logits, averages, flags, ema = _sar_by_hand(v, x, 0.2, 0.5, c)
  assert 0 < flags.sum() < len(x)
  # Far enough from the threshold that float32 rounding cannot flip a reset.
  assert min(abs(a - c) for a in averages if a is not None) > 2e-5
  for t in range(len(x)):
    np.testing.assert_allclose(out.logits[t], logits[t], rtol=1e-4, atol=1e-4)
  assert int(out.state["resets"]) == flags.sum()
  np.testing.assert_allclose(out.state["ema"], ema, rtol=1e-4)
  for other in (dict(reset_constant=c / 2), dict(reset_constant=2 * c),
                dict(reset_constant=c, keep_average=False)):
    assert (_sar_by_hand(v, x, 0.2, 0.5, **other)[2] != flags).any(), other


@pytest.mark.parametrize("inner_options,m,gain", [
    ({"momentum": 0.9}, 0.9, 1.0),
    # The default inner method: ema_bn, momentum 0.1 per image (B = 3 images);
    # inputs doubled, a shift that its slower statistics follow far enough to
    # change some masks.
    (None, 1 - (1 - 0.1) ** 3, 2.0)])
def test_gated_chooses_by_agreement(pixnet, inner_options, m, gain):
  """gated (inner ema_bn), by hand: per batch the inner method's logits
  (NumPy, its running statistics following every batch, (1 - m) running +
  m batch) against the source's; the inner ones are used iff the IoU of the
  two masks over the batch is below the threshold (set between the batches'
  agreements, so that both choices are made)."""
  model, v, batches = pixnet
  batches = batches * np.float32(gain)
  sm, sv = _source(v)
  rm, rv = sm, sv
  inner, src, agreement = [], [], []
  for x in batches:
    bm, bv = np_moments(v, x)
    rm, rv = (1 - m) * rm + m * bm, (1 - m) * rv + m * bv
    inner.append(np_logits(v, x, rm, rv))
    src.append(np_logits(v, x, sm, sv))
    a, b = inner[-1][..., 1] > inner[-1][..., 0], src[-1][..., 1] > src[-1][..., 0]
    agreement.append((a & b).sum() / max((a | b).sum(), 1))
  threshold = (min(agreement) + max(agreement)) / 2
  options = {"signal": "agreement"}
  if inner_options is not None:
    options["inner_options"] = inner_options
  got = _run_logits(model, v, batches, "gated", threshold=threshold, **options)
  use = np.array(agreement) < threshold
  assert 0 < use.sum() < len(batches)
  for t in range(len(batches)):
    np.testing.assert_allclose(got[t], inner[t] if use[t] else src[t], rtol=1e-5, atol=1e-5)
  out = streams.run(model, v, batches, "gated", threshold=threshold, image_range=None,
                    **options)
  assert int(out.state["adapted"]) == use.sum() and int(out.state["resets"]) == 0
  # The inner state's statistics are the hand loop's (every batch inner, used or not).
  np.testing.assert_allclose(out.state["inner"]["variables"]["batch_stats"]["bn"]["mean"], rm,
                             rtol=1e-5, atol=1e-6)


def test_gated_resets_a_collapsed_inner_state(pixnet):
  """An inner state whose statistics predict one class everywhere (the
  stored mean pushed far off) while the source predicts both: the source's
  logits are used and the inner state starts again."""
  model, v, batches = pixnet
  sm, sv = _source(v)
  # The second class's bias moved so that the source splits the batch's pixels.
  v = jax.tree_util.tree_map(np.copy, v)
  v["params"]["d2"]["bias"][1] -= np.median(np.diff(np_logits(v, batches[0], sm, sv), axis=-1))
  t = 0
  assert 0 < np.mean(np.diff(np_logits(v, batches[t], sm, sv), axis=-1) > 0) < 1
  gated = streams.online(model, "gated", signal="agreement", inner="ema_bn",
                         inner_options={"momentum": 0.01})
  x = (jnp.asarray(batches[t]),)
  state = gated.init(v, x)
  broken = jax.tree_util.tree_map(lambda a: a, state["inner"])
  broken["variables"]["batch_stats"]["bn"]["mean"] = jnp.full(3, 1e3)
  new, logits = gated.step({**state, "inner": broken}, x)
  np.testing.assert_allclose(logits, np_logits(v, batches[t], sm, sv), rtol=1e-5, atol=1e-5)
  assert int(new["resets"]) == 1 and int(new["adapted"]) == 0
  np.testing.assert_array_equal(new["inner"]["variables"]["batch_stats"]["bn"]["mean"],
                                state["inner"]["variables"]["batch_stats"]["bn"]["mean"])


@pytest.mark.parametrize("method,options", [("source", {}), ("bn_test", {}),
                                            ("bn_alpha", {"prior": 4.0}),
                                            ("ema_bn", {"momentum": 0.3}),
                                            ("tent", {"learning_rate": 0.01}),
                                            ("eta", {"learning_rate": 0.01, "d_margin": 0.99}),
                                            ("sar", {"learning_rate": 0.01,
                                                     "reset_constant": 0.1})])
@pytest.mark.parametrize("loop", ["scan", "loop"])
def test_scan_equals_a_python_loop_and_resets(pixnet, method, options, loop):
  """run (one scan, or the compiled step called per batch) against the pure
  step called batch by batch; with resets the state starts again from the
  source before the flagged batches."""
  model, v, batches = pixnet
  method_ = streams.online(model, method, **options)
  reset = np.array([False, False, True, False, True])
  for flags in (None, reset):
    out = streams.run(model, v, batches, method, return_logits=True, reset=flags,
                      image_range=None, loop=loop, **options)
    first = (jnp.asarray(batches[0]),)
    state = method_.init(v, first)
    for t, x in enumerate(batches):
      if flags is not None and flags[t]:
        state = method_.init(v, first)
      state, logits = method_.step(state, (jnp.asarray(x),))
      np.testing.assert_allclose(out.logits[t], logits, rtol=1e-5, atol=1e-6)


def test_float_options_compile_nothing_new(pixnet):
  """The float options are arrays of the method's state, not constants of
  its compiled step: a second run with another learning rate (tent),
  momentum (ema_bn) or threshold (gated) compiles nothing, and uses the new
  value."""
  model, v, batches = pixnet
  with compiles.lowered() as canary:
    jax.jit(lambda a: a * 3.25 + 1)(jnp.zeros(7))
  assert canary, "the listener sees no compilation: was jax's event renamed?"
  for method, a, b in (("tent", {"learning_rate": 0.05}, {"learning_rate": 0.01}),
                       ("ema_bn", {"momentum": 0.2}, {"momentum": 0.3}),
                       ("gated", {"threshold": 0.0, "signal": "agreement"},
                        {"threshold": 1.0, "signal": "agreement"}),
                       ("balanced", {"momentum": 0.2}, {"momentum": 0.9}),
                       ("lame", {"bound_lambda": 1.0}, {"bound_lambda": 3.0})):
    vm = adapt.add_class_stats(model, v, batches[0], image_range=None) if (
        method == "balanced") else v
    one = streams.run(model, vm, batches * 2, method, return_logits=True, image_range=None,
                      **a)
    with compiles.lowered() as events:
      two = streams.run(model, vm, batches * 2, method, return_logits=True, image_range=None,
                        **b)
    assert not events, f"{method} {b}: traced again: {events}"
    assert not np.allclose(one.logits, two.logits), method
    if method == "gated":
      # threshold 0 never uses the inner prediction, 1 wherever the masks differ.
      assert int(one.state["adapted"]) == 0 < int(two.state["adapted"])


def test_run_many_equals_separate_runs(pixnet):
  model, v, batches = pixnet
  second = jax.tree_util.tree_map(lambda a: a * 1.1 if a.dtype == np.float32 else a, v)
  stacked = jax.tree_util.tree_map(lambda a, b: np.stack([a, b]), v, second)
  many_batches = np.stack([batches, batches[::-1], batches * 0.5])
  # Stream 1 starts again from the source before its batches 2 and 4.
  resets = np.zeros((3, 5), bool)
  resets[1, [2, 4]] = True
  for (method, options), loop, reset in itertools.product(
      (("ema_bn", {"momentum": 0.3}), ("tent", {"learning_rate": 0.01}), ("bn_test", {})),
      ("scan", "loop"), (None, resets)):
    many = streams.run_many(model, stacked, many_batches, method, return_logits=True,
                            image_range=None, loop=loop, reset=reset, **options)
    assert many.masks.shape == (2, 3, 5, 3, 4, 4)
    for k, vk in enumerate((v, second)):
      for m in range(3):
        one = streams.run(model, vk, many_batches[m], method, return_logits=True,
                          image_range=None, reset=None if reset is None else reset[m],
                          **options)
        np.testing.assert_allclose(many.logits[k, m], one.logits, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Settings


@pytest.fixture(scope="module")
def pool():
  x, y = data.make_dataset(jax.random.key(3), data.Domain(90, 50, 170, 50), 24, size=16)
  return np.asarray(x), np.asarray(y)


def _pool_index(pool_masks, masks):
  """The pool image each streamed image came from, found by its mask (brightness
  and contrast leave masks alone; the pool's 24 masks are distinct)."""
  flat = pool_masks.reshape(len(pool_masks), -1)
  assert len({m.tobytes() for m in flat}) == len(flat)
  lookup = {m.tobytes(): i for i, m in enumerate(flat)}
  return np.array([lookup[m.tobytes()] for m in masks.reshape(len(masks), -1)])


def test_iid_and_episodic(pool):
  x, y = pool
  s = streams.make(jax.random.key(0), x, y, setting="iid", batch_size=4)
  assert s.images.shape == (6, 4, 16, 16, 1) and s.masks.shape == (6, 4, 16, 16)
  assert (s.shift == 0).all() and (s.severity == 5).all() and s.shifts == ("brightness",)
  assert not s.reset.any() and (s.block == 0).all()
  # Every pool image once, brightened by 12 x 5 / 255 and clipped (the shift's level 5).
  idx = _pool_index(y, np.asarray(s.masks).reshape(-1, 16, 16))
  assert sorted(idx) == list(range(24))
  np.testing.assert_allclose(np.asarray(s.images).reshape(-1, 16, 16, 1),
                             np.clip(x[idx] + 60 / 255, 0, 1), atol=1e-6)
  e = streams.make(jax.random.key(0), x, y, setting="episodic", batch_size=4)
  np.testing.assert_array_equal(e.images, s.images)
  assert e.reset.all()


def test_continual_and_gradual_blocks(pool):
  x, y = pool
  names = ("brightness", "contrast", "zoom")
  s = streams.make(jax.random.key(0), x, y, setting="continual", batch_size=4, shifts=names,
                   severity=3, block_steps=2)
  assert s.images.shape[0] == 6 and s.shifts == names
  np.testing.assert_array_equal(s.block, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(s.shift[:, 0], [0, 0, 1, 1, 2, 2])
  assert (s.severity == 3).all()
  # The brightness block is the pool brightened by 36 / 255, in a fresh order.
  idx = _pool_index(y, np.asarray(s.masks[:2]).reshape(-1, 16, 16))
  np.testing.assert_allclose(np.asarray(s.images[:2]).reshape(-1, 16, 16, 1),
                             np.clip(x[idx] + 36 / 255, 0, 1), atol=1e-6)
  g = streams.make(jax.random.key(0), x, y, setting="gradual", batch_size=8,
                   shifts=("brightness", "contrast"), block_steps=1)
  assert g.images.shape[0] == 18
  np.testing.assert_array_equal(g.severity[:, 0], [1, 2, 3, 4, 5, 4, 3, 2, 1] * 2)
  np.testing.assert_array_equal(g.shift[:, 0], [0] * 9 + [1] * 9)
  np.testing.assert_array_equal(g.block, np.arange(18))


def test_mixed_batches_mix_domains(pool):
  x, y = pool
  names = ("brightness", "contrast", "gamma")
  s = streams.make(jax.random.key(1), x, y, setting="mixed", batch_size=6, shifts=names,
                   severity=(2, 5), block_steps=8)
  assert set(np.unique(s.shift)) == {0, 1, 2} and set(np.unique(s.severity)) == {2, 5}
  assert max(len(set(b)) for b in s.shift.tolist()) >= 2  # a batch of several domains
  # Each brightness image is its pool image brightened by 12 x its severity / 255.
  images = np.asarray(s.images).reshape(-1, 16, 16, 1)
  masks = np.asarray(s.masks).reshape(-1, 16, 16)
  shift, severity = s.shift.ravel(), s.severity.ravel()
  bright = np.flatnonzero(shift == 0)
  assert len(bright) > 3
  idx = _pool_index(y, masks[bright])
  np.testing.assert_allclose(images[bright],
                             np.clip(x[idx] + 12 * severity[bright, None, None, None] / 255, 0, 1),
                             atol=1e-6)


def test_correlated_is_iid_reordered_by_foreground(pool):
  x, y = pool
  iid = streams.make(jax.random.key(2), x, y, setting="iid", batch_size=4)
  cor = streams.make(jax.random.key(2), x, y, setting="correlated", batch_size=4)
  fraction = np.asarray(cor.masks).reshape(24, -1).mean(1)
  assert np.all(np.diff(fraction) >= 0)
  key = lambda s: sorted(a.tobytes() for a in np.asarray(s.images).reshape(24, -1))
  assert key(cor) == key(iid)


def test_errors_name_the_argument(pool, pixnet):
  x, y = pool
  k = jax.random.key(0)
  for kwargs, match in ((dict(setting="shuffled", batch_size=4), "setting must be one of"),
                        (dict(setting="iid", batch_size=2.5), "batch_size must be an integer"),
                        (dict(setting="iid", batch_size=25), r"batch_size must be in 1..24"),
                        (dict(setting="iid", batch_size=4, shifts="sepia"), "shifts must be one"),
                        (dict(setting="iid", batch_size=4, shifts=("zoom", "blur")),
                         "streams one shift"),
                        (dict(setting="continual", batch_size=4, severity=6), "severity must be")):
    with pytest.raises(ValueError, match=match):
      streams.make(k, x, y, **kwargs)
  with pytest.raises(ValueError, match="NaN"):
    streams.make(k, np.where(x > 0.9, np.nan, x), y, setting="iid", batch_size=4)
  model, v, batches = pixnet
  with pytest.raises(ValueError, match="method must be one of"):
    streams.run(model, v, batches, "norm")
  with pytest.raises(ValueError, match=r"method 'ema_bn' takes the options \['momentum', 'per_image'\], got \['alpha'\]"):
    streams.run(model, v, batches, "ema_bn", alpha=0.5)
  with pytest.raises(ValueError, match="momentum must be in"):
    streams.run(model, v, batches, "ema_bn", momentum=0.0)
  with pytest.raises(ValueError, match="alpha or prior, not both"):
    streams.run(model, v, batches, "bn_alpha", alpha=0.2, prior=3.0)
  with pytest.raises(ValueError, match="augment must be one of"):
    streams.run(model, v, batches, "augbn", augment="crops")
  with pytest.raises(ValueError, match="method 'eata' needs source_images"):
    streams.run(model, v, batches, "eata")
  with pytest.raises(ValueError, match="NaN"):
    streams.run(model, v, np.full_like(batches, np.nan), "bn_test")
  with pytest.raises(ValueError, match=r"reset must be bool\[5\]"):
    streams.run(model, v, batches, "bn_test", reset=np.zeros(4, bool))
  plain = {"params": v["params"]}
  with pytest.raises(ValueError, match="method 'tent' adapts BatchNorm layers, and the model has"):
    streams.run(model, plain, batches, "tent")


def test_a_model_written_elsewhere_runs_every_method():
  """The ResNet in Flax's example style (a list attribute, train=True by
  default, partial BatchNorm): every method runs, source equals its own
  eval-mode argmax, and bn_test normalises each batch by itself."""
  model = fm.ResNet(stage_sizes=[1, 1], num_classes=2)
  x = np.random.default_rng(0).uniform(0, 1, (4, 2, 8, 8, 1)).astype(np.float32)
  v = model.init(jax.random.key(0), x[0], train=False)
  for method in streams.METHODS:
    if method == "balanced":  # a classifier: no masks, no class statistics
      with pytest.raises(ValueError, match=r"measure them once on unlabelled source images"):
        streams.run(model, v, x, method)
      with pytest.raises(ValueError, match=r"need a segmentation model: its output \(2, 2\)"):
        adapt.add_class_stats(model, v, x[0])
      continue
    if method == "lame":  # output-only on masks: a classifier has none
      with pytest.raises(ValueError, match=r"method 'lame' needs a segmentation model"):
        streams.run(model, v, x, method)
      continue
    options = {"source_images": x[0], "fisher_batch_size": 2} if method == "eata" else {}
    if method == "gated":  # its appearance signal needs class statistics: masks
      with pytest.raises(ValueError, match=r"gated's appearance signal needs the source's class"):
        streams.run(model, v, x, method)
      options = {"signal": "agreement"}
    out = streams.run(model, v, x, method, return_logits=True, **options)
    assert out.logits.shape == (4, 2, 2) and np.isfinite(out.logits).all(), method
    if method == "source":
      want = np.stack([np.asarray(model.apply(v, b, train=False)) for b in x])
      np.testing.assert_allclose(out.logits, want, rtol=1e-5, atol=1e-5)


def _iou_loop(pred, truth):
  """Per-image IoU by hand (1 where both are empty), over the leading axes."""
  pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
  out = np.empty(pred.shape[:-2])
  for idx in np.ndindex(*pred.shape[:-2]):
    union = np.logical_or(pred[idx], truth[idx]).sum()
    out[idx] = np.logical_and(pred[idx], truth[idx]).sum() / union if union else 1.0
  return out


def test_a_stream_result_is_scored_per_batch_and_overall():
  rng = np.random.default_rng(0)
  x, y = data.make_dataset(jax.random.key(0), data.Domain(60, 30, 200, 30), 24, size=16)
  from bnjax import metrics, models
  unet = models.UNet(features=2, depth=2)
  v = models.init(unet, jax.random.key(1), (16, 16, 1))
  stream = streams.make(jax.random.key(2), np.asarray(x), np.asarray(y), setting="iid",
                        batch_size=4, shifts=("gamma",), severity=3)
  out = streams.run(unet, v, stream, "bn_test")
  want = _iou_loop(out.masks, stream.masks)  # [T, B]
  np.testing.assert_allclose(out.iou_per_batch(stream), want.mean(1), rtol=1e-6)
  np.testing.assert_allclose(out.iou(stream), want.mean(), rtol=1e-6)
  np.testing.assert_allclose(out.iou(np.asarray(stream.masks)), want.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics.iou(out.masks, stream.masks), want.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics.iou_per_image(out.masks, stream.masks), want, rtol=1e-6)
  with pytest.raises(ValueError, match=r"masks must have the shape of the predictions"):
    out.iou(np.asarray(stream.masks)[0])
  pred = rng.random((2, 3, 4, 8, 8)) > 0.5  # a run_many layout [K, M, T, B, H, W] less one axis
  truth = rng.random((2, 3, 4, 8, 8)) > 0.5
  np.testing.assert_allclose(metrics.iou_per_image(pred, truth), _iou_loop(pred, truth),
                             rtol=1e-6)


def _pool(n=32, size=16):
  x, y = data.make_dataset(jax.random.key(3), data.Domain(60, 30, 200, 30), n, size=size)
  return np.asarray(x), np.asarray(y)


def _class_means(x, y):
  x = np.asarray(x)[..., 0]
  return x[np.asarray(y)].mean(), x[~np.asarray(y)].mean()


def test_correlated_is_iid_with_its_labels_sorted():
  x, y = _pool()
  a = streams.make(jax.random.key(1), x, y, setting="correlated", batch_size=4)
  b = streams.make(jax.random.key(1), x, y, setting="iid", batch_size=4, labels="sorted")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.masks, b.masks)
  frac = np.asarray(a.masks).reshape(-1, 16 * 16).mean(1)
  assert np.all(np.diff(frac) >= 0)  # ascending foreground fraction, image by image
  with pytest.raises(ValueError, match="setting 'correlated' is setting='iid', labels='sorted'"):
    streams.make(jax.random.key(1), x, y, setting="correlated", batch_size=4, labels="shift")


def test_a_label_shift_keeps_the_source_appearance():
  x, y = _pool()
  s = streams.make(jax.random.key(1), x, y, setting="iid", shifts=(), batch_size=4,
                   labels="shift", label_severity=5)
  assert s.shifts == () and np.all(s.shift == -1) and np.all(s.severity == 0)
  np.testing.assert_array_equal(s.label_severity, 5.0)
  fg, bg = _class_means(s.images.reshape((-1,) + s.images.shape[2:]),
                        s.masks.reshape((-1,) + s.masks.shape[2:]))
  fg0, bg0 = _class_means(x, y)
  assert abs(fg - fg0) < 4 / 255 and abs(bg - bg0) < 4 / 255  # the pool's appearance
  assert np.mean(s.masks) > 2.5 * np.mean(y)  # and far more foreground (0.65 against 0.2)
  plain = streams.make(jax.random.key(1), x, y, setting="iid", shifts=(), batch_size=4)
  np.testing.assert_allclose(np.mean(plain.masks), np.mean(y))  # labels="iid": the pool's


def test_alternate_gives_appearance_and_label_shifts_turns():
  x, y = _pool()
  s = streams.make(jax.random.key(4), x, y, setting="continual", batch_size=4,
                   shifts=("brightness", "rotation"), severity=3, labels="alternate",
                   label_severity=5, block_steps=2)
  assert s.steps == 8
  np.testing.assert_array_equal(s.block, [0, 0, 1, 1, 2, 2, 3, 3])
  # Blocks 0 and 2: the setting's shifts, the pool's masks (every mask one of
  # the pool's, up to rotation for block 2 counted by foreground); blocks 1
  # and 3: the source's appearance, new masks at severity 5.
  np.testing.assert_array_equal(s.shift[:, 0], [0, 0, -1, -1, 1, 1, -1, -1])
  np.testing.assert_array_equal(s.severity[:, 0], [3, 3, 0, 0, 3, 3, 0, 0])
  np.testing.assert_array_equal(s.label_severity, [0, 0, 5, 5, 0, 0, 5, 5])
  pool = {np.asarray(m).tobytes() for m in y}
  first = np.asarray(s.masks[:2]).reshape(-1, 16, 16)
  assert all(m.tobytes() in pool for m in first)  # brightness keeps the masks
  labelled = np.asarray(s.masks[2:4]).reshape(-1, 16, 16)
  assert not any(m.tobytes() in pool for m in labelled)
  assert labelled.mean() > 2.5 * np.mean(y)
  fg, bg = _class_means(np.asarray(s.images[2:4]).reshape(-1, 16, 16, 1), labelled)
  fg0, bg0 = _class_means(x, y)
  assert abs(fg - fg0) < 4 / 255 and abs(bg - bg0) < 4 / 255  # the pool's appearance
  # Brightness moved block 0's images away from the pool's class means.
  fg1, _ = _class_means(np.asarray(s.images[:2]).reshape(-1, 16, 16, 1), first)
  assert abs(fg1 - fg0) > 10 / 255
  with pytest.raises(ValueError, match=r"square and one-channel"):
    streams.make(jax.random.key(2), np.repeat(x, 3, -1), y, setting="iid", batch_size=4,
                 labels="alternate")


def test_a_label_drift_composes_with_mixed_domains():
  x, y = _pool(48)
  s = streams.make(jax.random.key(2), x, y, setting="mixed", batch_size=4, labels="drift",
                   label_severity=5, shifts=("brightness", "contrast"), severity=(3, 5))
  t = s.steps
  want = 5 * np.sin(np.pi * (np.arange(t) + 0.5) / t) ** 2
  np.testing.assert_allclose(s.label_severity, want, rtol=1e-6)
  frac = np.asarray(s.masks).mean((1, 2, 3))
  middle, ends = frac[t // 3: 2 * t // 3].mean(), np.r_[frac[:t // 6], frac[-(t // 6):]].mean()
  assert middle > ends + 0.2, (middle, ends)  # the class balance drifts up and back
  assert set(np.unique(s.shift)) == {0, 1} and set(np.unique(s.severity)) == {3, 5}
  # The appearance shifts act on the relabelled images: brightness raised some of them.
  with pytest.raises(ValueError, match=r"labels must be one of"):
    streams.make(jax.random.key(2), x, y, setting="iid", batch_size=4, labels="balanced")
  with pytest.raises(ValueError, match=r"label_severity must be in \[0, 5\]"):
    streams.make(jax.random.key(2), x, y, setting="iid", batch_size=4, labels="shift",
                 label_severity=6)
  with pytest.raises(ValueError, match=r"square and one-channel"):
    streams.make(jax.random.key(2), np.repeat(x, 3, -1), y, setting="iid", batch_size=4,
                 labels="drift")
  with pytest.raises(ValueError, match=r"no appearance shift, shifts=\(\), is for 'iid'"):
    streams.make(jax.random.key(2), x, y, setting="continual", batch_size=4, shifts=())
