"""Class-balanced BatchNorm statistics (bnjax.adapt.add_class_stats,
recompute_balanced_stats, the streams method "balanced") against NumPy: each
stage of a small model computed with Flax's own modules, the class moments,
pooling, recombination and choice written here."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import adapt, data, metrics, models, streams, train

EPS = 1e-5


class _Seg(nn.Module):
  """conv -> BN -> relu -> 2x2 average pool -> conv -> BN -> relu -> x2 -> 1x1 conv (2 classes)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(3, (3, 3))(x)))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(3, (3, 3))(x)))
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(2, (1, 1))(x)


def _setup(seed=0, n=6, size=8):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (n, size, size, 1)).astype(np.float32)
  model = _Seg()
  v = model.init(jax.random.key(seed), x)
  # Stored statistics that are not the initial 0 / 1, and a head that predicts both classes.
  v = jax.tree_util.tree_map(lambda a: a, v)
  bs = v["batch_stats"]
  bs = {k: {"mean": jnp.asarray(rng.normal(0, 0.3, 3), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32)} for k in bs}
  params = jax.tree_util.tree_map(jnp.asarray, v["params"])
  kernel = np.zeros((1, 1, 3, 2), np.float32)
  kernel[0, 0, :, 1] = rng.normal(0, 1, 3)
  params["Conv_2"] = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(2)}
  v = {"params": params, "batch_stats": bs}
  logit = np.asarray(model.apply(v, x))[..., 1]  # a threshold at the median: both classes
  params["Conv_2"]["bias"] = jnp.asarray([0.0, -float(np.median(logit))])
  return model, v, x


def _stages(params):
  """The model's pieces as Flax modules, so that each BN input is seen."""
  conv0 = lambda x: nn.Conv(3, (3, 3)).apply({"params": params["Conv_0"]}, x)
  conv1 = lambda x: nn.Conv(3, (3, 3)).apply({"params": params["Conv_1"]}, x)
  head = lambda x: nn.Conv(2, (1, 1)).apply({"params": params["Conv_2"]}, x)
  return conv0, conv1, head


def _bn(h, mean, var, p):
  return (h - mean) / np.sqrt(var + EPS) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _pool(a):
  n, h, w = a.shape[:3]
  return a.reshape(n, h // 2, 2, w // 2, 2, *a.shape[3:]).mean((2, 4))


def _forward(params, x, stats):
  """Logits with ``stats(layer index, its input) -> (mean, var)`` deciding each layer's."""
  conv0, conv1, head = _stages(params)
  h0 = np.asarray(conv0(x), np.float64)
  m, v = stats(0, h0)
  a0 = np.maximum(_bn(h0, m, v, params["BatchNorm_0"]), 0)
  h1 = np.asarray(conv1(_pool(a0).astype(np.float32)), np.float64)
  m, v = stats(1, h1)
  a1 = np.maximum(_bn(h1, m, v, params["BatchNorm_1"]), 0)
  up = np.repeat(np.repeat(a1, 2, 1), 2, 2)
  return np.asarray(head(up.astype(np.float32)), np.float64), (h0, h1)


def _class_moments(h, onehot):
  """float[K], float[K, C] x 2: weights, means and biased variances."""
  h2, w2 = h.reshape(-1, h.shape[-1]), onehot.reshape(-1, onehot.shape[-1])
  weight = w2.sum(0)
  mean = (w2.T @ h2) / weight[:, None]
  var = np.stack([(w2[:, k, None] * (h2 - mean[k]) ** 2).sum(0) / weight[k]
                  for k in range(w2.shape[1])])
  return weight, mean, var


def _weights(logits):
  return np.eye(logits.shape[-1])[np.argmax(logits, -1)]


def _interior_np(w):
  """1 where a pixel's whole 3x3 neighbourhood inside the image has its class."""
  n, h, width, _ = w.shape
  out = np.zeros_like(w)
  for r in range(h):
    for c in range(width):
      window = w[:, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
      out[:, r, c] = window.min(axis=(1, 2))
  return out


def _stored(v, i):
  s = v["batch_stats"][f"BatchNorm_{i}"]
  return np.asarray(s["mean"], np.float64), np.asarray(s["var"], np.float64)


def test_class_stats_against_numpy():
  model, v, x = _setup()
  out = adapt.add_class_stats(model, v, x, batch_size=4)  # two chunks, summed
  logits, hs = _forward(v["params"], x, lambda i, h: _stored(v, i))
  np.testing.assert_allclose(logits, model.apply(v, x), atol=1e-4)  # the NumPy model is the model
  w = _weights(logits)
  np.testing.assert_allclose(out["class_stats"]["proportions"], w.reshape(-1, 2).mean(0),
                             rtol=1e-6)
  assert 0 < float(out["class_stats"]["proportions"][1]) < 1
  for i, (h, weights) in enumerate(zip(hs, (w, _pool(w)))):
    _, mean, var = _class_moments(h, weights)
    got = out["class_stats"][f"BatchNorm_{i}"]
    np.testing.assert_allclose(got["class_mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["class_var"], var, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["mean"], _stored(v, i)[0], rtol=1e-6)
  np.testing.assert_array_equal(out["params"]["Conv_0"]["kernel"], v["params"]["Conv_0"]["kernel"])
  # The input's own class moments over interior pixels (appearance_gap's reference).
  _, mean, var = _class_moments(x.astype(np.float64), _interior_np(w))
  np.testing.assert_allclose(out["class_stats"]["input_mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(out["class_stats"]["input_var"], var, rtol=1e-4)


def _appearance_numpy(x, logits, classes):
  weight, mean, var = _class_moments(np.asarray(x, np.float64), _interior_np(_weights(logits)))
  sm, sv = np.asarray(classes["input_mean"]), np.asarray(classes["input_var"])
  per = ((mean - sm) ** 2 / (sv + 1e-6) + (0.5 * np.log((var + 1e-6) / (sv + 1e-6))) ** 2).mean(-1)
  p = np.asarray(classes["proportions"]) * (weight >= 32)
  return float((p * per).sum() / max(p.sum(), 1e-12))


def test_appearance_gap_against_numpy():
  model, v, x = _setup(4)
  vc = adapt.add_class_stats(model, v, x)
  for shifted in (x, np.clip(x + 0.3, 0, 1), x ** 2):
    logits = model.apply(v, shifted)
    want = _appearance_numpy(shifted, np.asarray(logits), vc["class_stats"])
    got = adapt.appearance_gap(shifted, logits, vc["class_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert adapt.appearance_gap(x, model.apply(v, x), vc["class_stats"]) < 1e-6  # itself: 0
  logits = model.apply(v, x)
  with pytest.raises(ValueError, match=r"images must be \[B, H, W, C\] and logits"):
    adapt.appearance_gap(x[..., 0], logits, vc["class_stats"])
  with pytest.raises(ValueError, match=r"images have 3 channels, the class statistics 1"):
    adapt.appearance_gap(np.repeat(x, 3, -1), logits, vc["class_stats"])
  with pytest.raises(ValueError, match=r"class_stats must be the 'class_stats' collection"):
    adapt.appearance_gap(x, logits, vc)


def test_gated_decides_by_the_appearance_signal():
  """gated's default, by hand: the appearance signal of each batch (NumPy)
  under the source's masks, its moving average (0.2 per image), and the
  inner method's logits (balanced, run alone) used where the average reaches
  the threshold, the source's elsewhere."""
  model, v, x = _setup(5, n=12)
  vc = adapt.add_class_stats(model, v, x[:6])
  rng = np.random.default_rng(6)
  base = rng.uniform(0, 1, (6, 2, 8, 8, 1)).astype(np.float32)
  batches = np.stack([base[0], base[1], np.clip(base[2] + 0.4, 0, 1), np.clip(base[3] + 0.4, 0, 1),
                      base[4], base[5]])
  a = 1 - (1 - 0.2) ** 2
  signal, values = None, []
  for xb in batches:
    value = _appearance_numpy(xb, np.asarray(model.apply(v, xb)), vc["class_stats"])
    signal = value if signal is None else (1 - a) * signal + a * value
    values.append(signal)
  threshold = float(np.median(values))
  inner = streams.run(model, vc, batches, "balanced", return_logits=True)
  out = streams.run(model, vc, batches, "gated", threshold=threshold, return_logits=True)
  use = np.asarray(values) >= threshold
  assert 0 < use.sum() < len(batches) and int(out.state["resets"]) == 0
  for t, xb in enumerate(batches):
    want = inner.logits[t] if use[t] else np.asarray(model.apply(v, xb))
    np.testing.assert_allclose(out.logits[t], want, rtol=1e-4, atol=1e-4)
  assert int(out.state["adapted"]) == use.sum()
  np.testing.assert_allclose(out.state["signal"], values[-1], rtol=1e-4)
  with pytest.raises(ValueError, match=r"signal must be one of"):
    streams.run(model, vc, batches, "gated", signal="entropy")


def _balanced_numpy(v, classes, x, start_logits, running=None, momentum=1.0):
  """One balanced pass from the masks of ``start_logits``: (logits, gap,
  used statistics, new running moments)."""
  w = _weights(start_logits)
  pi = np.asarray(classes["proportions"], np.float64)
  gaps, used, new = [], [], []

  def stats(i, h):
    weights = w if i == 0 else _pool(w)
    c = classes[f"BatchNorm_{i}"]
    weight, mean, var = _class_moments(h, weights)
    run_m, run_v = (np.asarray(c["class_mean"], np.float64),
                    np.asarray(c["class_var"], np.float64)) if running is None else running[i]
    present = weight >= 0.5
    a = np.where(present, momentum, 0.0)[:, None]
    safe_mean = np.where(present[:, None], mean, 0)
    safe_var = np.where(present[:, None], var, 0)
    m = (1 - a) * run_m + a * safe_mean
    v2 = np.maximum((1 - a) * (run_v + run_m ** 2) + a * (safe_var + safe_mean ** 2) - m ** 2, 0)
    mu = (pi[:, None] * m).sum(0)
    sigma2 = np.maximum((pi[:, None] * (v2 + m ** 2)).sum(0) - mu ** 2, 0)
    z = (safe_mean - mu) / np.sqrt(sigma2 + EPS)
    z_src = ((np.asarray(c["class_mean"]) - np.asarray(c["mean"]))
             / np.sqrt(np.asarray(c["var"]) + EPS))
    p = pi * present
    gaps.append((p * ((z - z_src) ** 2).mean(-1)).sum() / p.sum())
    used.append((mu, sigma2))
    new.append((m, v2))
    return mu, sigma2

  logits, _ = _forward(v["params"], x, stats)
  return logits, float(np.mean(gaps)), used, new


def _starts(model, v, x):
  """The source's logits (stored statistics) and test-time BN's (Flax's train mode)."""
  src = np.asarray(model.apply(v, x), np.float64)
  bn, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
  return src, np.asarray(bn, np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_statistics_against_numpy(seed):
  model, v, x = _setup(seed)
  source_images = np.random.default_rng(10 + seed).uniform(0, 1, (6, 8, 8, 1)).astype(np.float32)
  vc = adapt.add_class_stats(model, v, source_images)
  target = np.clip(x * 0.5 + 0.4, 0, 1).astype(np.float32)
  got = adapt.recompute_balanced_stats(model, vc, target)
  results = [_balanced_numpy(v, vc["class_stats"], target, s) for s in _starts(model, v, target)]
  best = min(results, key=lambda r: r[1])
  assert abs(results[0][1] - results[1][1]) > 1e-4  # the choice is not a tie
  for i, (mu, sigma2) in enumerate(best[2]):
    np.testing.assert_allclose(got["batch_stats"][f"BatchNorm_{i}"]["mean"], mu, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got["batch_stats"][f"BatchNorm_{i}"]["var"], sigma2, rtol=1e-3,
                               atol=1e-5)
  np.testing.assert_allclose(model.apply(got, target), best[0], atol=1e-3)
  assert got["class_stats"] is vc["class_stats"] and got["params"] is vc["params"]


def test_online_balanced_against_a_numpy_loop():
  model, v, x = _setup(3, n=12)
  vc = adapt.add_class_stats(model, v, x[:6])
  rng = np.random.default_rng(4)
  batches = np.clip(rng.uniform(0, 1, (3, 2, 8, 8, 1)) * 0.6 + 0.3, 0, 1).astype(np.float32)
  momentum = 0.3
  out = streams.run(model, vc, batches, "balanced", momentum=momentum, return_logits=True)
  running, chosen = None, 0
  for t, xb in enumerate(batches):
    a = 1 - (1 - momentum) ** xb.shape[0]  # per image
    results = [_balanced_numpy(v, vc["class_stats"], xb, s, running, a)
               for s in _starts(model, v, xb)]
    first = results[0][1] <= results[1][1]
    best = results[0] if first else results[1]
    chosen += first
    running = best[3]
    np.testing.assert_allclose(out.logits[t], best[0], atol=2e-3)
  assert int(out.state["source_masks"]) == chosen
  # Without the class statistics: a clear error naming what to do.
  with pytest.raises(ValueError, match=r"bnjax.adapt.add_class_stats\(model, variables, "
                                       r"source_images\)"):
    streams.run(model, v, batches, "balanced")
  with pytest.raises(ValueError, match=r"bnjax.adapt.add_class_stats"):
    adapt.recompute_balanced_stats(model, v, x)


def test_class_stats_refuse_what_they_cannot_measure():
  dense = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True), nn.Dense(2)])
  x = np.ones((4, 3), np.float32)
  v = dense.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"need a segmentation model: its output \(4, 2\)"):
    adapt.add_class_stats(dense, v, x)
  model, v, x = _setup()
  with pytest.raises(ValueError, match="batch_size must be"):
    adapt.add_class_stats(model, v, x, batch_size=0)


# At 16x16 the label shift changes what a pixel's neighbourhood holds too much
# for any per-class statistic (a 0.12 loss measured): 32x32, depth 3.
SIZE = 32


@pytest.fixture(scope="module")
def trained():
  """A small U-Net trained on the source domain, and its class statistics."""
  src = data.Domain(90, 50, 170, 50)
  x, y = data.make_dataset(jax.random.key(0), src, 256, size=SIZE)
  model = models.UNet(features=4, depth=3)
  v, _ = train.fit(model, x, y, train.TrainConfig(epochs=8, batch_size=16, learning_rate=3e-3,
                                                  verbose=False, patience=None))
  unlabelled, _ = data.make_dataset(jax.random.key(1), src, 48, size=SIZE)
  return model, adapt.add_class_stats(model, v, unlabelled), src


def test_a_label_shift_built_here_keeps_the_source_iou(trained):
  """Source appearance, masks with about three times the foreground (the
  data module's generator at threshold 0.15), built without bnjax.streams:
  balanced statistics keep the source's IoU where test-time BN loses it;
  a brightness shift of the source masks keeps test-time BN's gain."""
  model, vc, src = trained
  masks = data.perlin_masks(jax.random.key(7), 64, size=SIZE, threshold=0.15)
  images = data.render(jax.random.key(8), masks, src)
  assert float(jnp.mean(masks)) > 0.5
  plain, plain_masks = data.make_dataset(jax.random.key(9), src, 64, size=SIZE)
  bright = jnp.clip(plain + 40 / 255, 0, 1)
  iou = lambda v, x, y: metrics.iou(np.asarray(jnp.argmax(model.apply(v, x), -1) == 1),
                                    np.asarray(y))
  for b in (16, 4):
    rows = {"source": [], "bn": [], "balanced": [], "src_b": [], "bn_b": [], "bal_b": []}
    for i in range(0, 64, b):
      x, y = images[i:i + b], masks[i:i + b]
      rows["source"].append(iou(vc, x, y))
      rows["bn"].append(iou(adapt.recompute_batch_stats(model, vc, x), x, y))
      rows["balanced"].append(iou(adapt.recompute_balanced_stats(model, vc, x), x, y))
      x, y = bright[i:i + b], plain_masks[i:i + b]
      rows["src_b"].append(iou(vc, x, y))
      rows["bn_b"].append(iou(adapt.recompute_batch_stats(model, vc, x), x, y))
      rows["bal_b"].append(iou(adapt.recompute_balanced_stats(model, vc, x), x, y))
    r = {k: float(np.mean(a)) for k, a in rows.items()}
    assert r["bn"] < r["source"] - 0.1, r  # the failure being repaired
    assert r["balanced"] >= r["source"] - 0.06, r
    assert r["bn_b"] > r["src_b"] + 0.1, r  # the appearance shift adaptation repairs
    assert r["bal_b"] >= r["bn_b"] - 0.02, r


def test_gated_holds_the_source_under_label_shift_and_adapts_under_appearance(trained):
  """Streams built here at batch 4: a pure label shift (source appearance,
  threshold-0.15 masks), brightness on the source's masks, and the two
  alternating block by block. gated ends within 0.02 of the source on the
  first, of test-time BN on the second, and above both on the third."""
  model, vc, src = trained
  b, steps = 4, 6
  masks = data.perlin_masks(jax.random.key(11), b * steps, size=SIZE, threshold=0.15)
  label = (np.asarray(data.render(jax.random.key(12), masks, src)).reshape(steps, b, SIZE, SIZE, 1),
           np.asarray(masks).reshape(steps, b, SIZE, SIZE))
  plain, plain_masks = data.make_dataset(jax.random.key(13), src, b * steps, size=SIZE)
  bright = (np.asarray(jnp.clip(plain + 40 / 255, 0, 1)).reshape(steps, b, SIZE, SIZE, 1),
            np.asarray(plain_masks).reshape(steps, b, SIZE, SIZE))
  both = tuple(np.concatenate([label[i], bright[i], label[i], bright[i]]) for i in (0, 1))
  score = {}
  for name, (x, y) in (("label", label), ("bright", bright), ("both", both)):
    for method in ("source", "bn_test", "gated"):
      score[name, method] = streams.run(model, vc, x, method).iou(y)
  assert score["label", "bn_test"] < score["label", "source"] - 0.1, score  # what breaks
  assert score["label", "gated"] >= score["label", "source"] - 0.02, score
  assert score["bright", "source"] < score["bright", "bn_test"] - 0.1, score
  assert score["bright", "gated"] >= score["bright", "bn_test"] - 0.02, score
  assert score["both", "gated"] > max(score["both", "source"], score["both", "bn_test"]), score
