"""BN adaptation against independent NumPy computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import adapt, data, models

EPS = 1e-5


class PixelNet(nn.Module):
  """Not a U-Net: per-pixel Dense -> BN -> ReLU -> Dense -> BN (channels-last)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(3, name="d1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
    x = nn.relu(x)
    x = nn.Dense(2, name="d2")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(x)


@pytest.fixture(scope="module")
def pixelnet():
  model = PixelNet()
  v = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  v = jax.tree_util.tree_map(np.asarray, v)
  rng = np.random.default_rng(0)
  v["params"]["bn1"]["scale"] = rng.uniform(0.5, 2, 3).astype(np.float32)
  v["params"]["bn1"]["bias"] = rng.normal(size=3).astype(np.float32)
  v["batch_stats"]["bn1"]["mean"] = rng.normal(size=3).astype(np.float32)
  v["batch_stats"]["bn1"]["var"] = rng.uniform(0.5, 2, 3).astype(np.float32)
  v["batch_stats"]["bn2"]["var"] = rng.uniform(0.5, 2, 2).astype(np.float32)
  images = rng.uniform(0, 1, (13, 4, 4, 1)).astype(np.float32)
  return model, v, images


def np_layers(v, x):
  """The two pre-BN activations of PixelNet as functions of layer-1 statistics."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  h1 = x.astype(np.float64) @ p["d1"]["kernel"] + p["d1"]["bias"]

  def h2(mean1, var1):
    y = (h1 - mean1) / np.sqrt(var1 + EPS) * p["bn1"]["scale"] + p["bn1"]["bias"]
    return np.maximum(y, 0) @ p["d2"]["kernel"] + p["d2"]["bias"]

  return h1, h2


def moments(a):
  a = a.reshape(-1, a.shape[-1])
  return a.mean(0), a.var(0)


def stats_of(v):
  bs = v["batch_stats"]
  return {k: (np.asarray(bs[k]["mean"]), np.asarray(bs[k]["var"])) for k in ("bn1", "bn2")}


def reference_exact(v, x, alpha=1.0, stats="both", adapt_bn1=True, adapt_bn2=True):
  src = stats_of(v)
  h1, h2 = np_layers(v, x)

  def mix(name, m, s):
    sm, ss = src[name]
    m = alpha * m + (1 - alpha) * sm if stats in ("mean", "both") else sm
    s = alpha * s + (1 - alpha) * ss if stats in ("var", "both") else ss
    return m, s

  s1 = mix("bn1", *moments(h1)) if adapt_bn1 else src["bn1"]
  s2 = mix("bn2", *moments(h2(*s1))) if adapt_bn2 else src["bn2"]
  return {"bn1": s1, "bn2": s2}


def assert_stats(got, want, rtol=2e-5):
  for k in want:
    for g, w in zip(got[k], want[k]):
      np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("batch_size", [None, 13, 5, 1])
def test_exact_matches_numpy(pixelnet, batch_size):
  model, v, x = pixelnet
  out = adapt.recompute_batch_stats(model, v, x, mode="exact", batch_size=batch_size)
  assert_stats(stats_of(out), reference_exact(v, x))
  assert out["params"] is v["params"]


@pytest.mark.parametrize("opts,ref", [
    (dict(alpha=0.3), dict(alpha=0.3)),
    (dict(stats="mean"), dict(stats="mean")),
    (dict(stats="var", alpha=0.5), dict(stats="var", alpha=0.5)),
    (dict(layers="bn2"), dict(adapt_bn1=False)),
    (dict(layers=["bn1"]), dict(adapt_bn2=False)),
    (dict(alpha=0.0), dict(alpha=0.0)),
])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_exact_options_match_numpy(pixelnet, opts, ref, batch_size):
  model, v, x = pixelnet
  out = adapt.recompute_batch_stats(model, v, x, batch_size=batch_size, **opts)
  assert_stats(stats_of(out), reference_exact(v, x, **ref))


def train_mode_batches(v, x, batch_size):
  """Per-batch (count, moments) in train mode: every BN uses its batch moments."""
  out = []
  for start in range(0, len(x), batch_size):
    xb = x[start:start + batch_size]
    h1, h2 = np_layers(v, xb)
    m1, s1 = moments(h1)
    out.append((xb.shape[0] * 16, (m1, s1), moments(h2(m1, s1))))
  return out


@pytest.mark.parametrize("batch_size", [1, 4, 13, 20])
def test_train_pass_matches_numpy(pixelnet, batch_size):
  model, v, x = pixelnet
  out = adapt.recompute_batch_stats(model, v, x, mode="train_pass", batch_size=batch_size)
  batches = train_mode_batches(v, x, batch_size)
  want = {}
  for i, name in enumerate(("bn1", "bn2")):
    c = np.array([b[0] for b in batches], float)[:, None]
    m = np.stack([b[1 + i][0] for b in batches])
    s = np.stack([b[1 + i][1] for b in batches])
    mean = (c * m).sum(0) / c.sum()
    want[name] = (mean, (c * (s + (m - mean) ** 2)).sum(0) / c.sum())
  assert_stats(stats_of(out), want)
  if batch_size >= len(x):
    assert_stats(stats_of(out), reference_exact(v, x))


@pytest.mark.parametrize("batch_size,momentum", [(1, 0.1), (4, 0.3)])
def test_ema_matches_pytorch_semantics(pixelnet, batch_size, momentum):
  model, v, x = pixelnet
  out = adapt.recompute_batch_stats(model, v, x, mode="ema", batch_size=batch_size,
                                    momentum=momentum)
  run = {k: [a.astype(np.float64) for a in s] for k, s in stats_of(v).items()}
  for count, *layer_moments in train_mode_batches(v, x, batch_size):
    for name, (m, s) in zip(("bn1", "bn2"), layer_moments):
      run[name][0] = (1 - momentum) * run[name][0] + momentum * m
      run[name][1] = (1 - momentum) * run[name][1] + momentum * s * count / (count - 1)
  assert_stats(stats_of(out), run)


def test_unet_exact_is_self_consistent():
  """Eval-mode BN inputs have exactly the stored mean and biased variance."""
  model = models.UNet(features=4, depth=2)
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  x, _ = data.make_dataset(jax.random.key(1), data.Domain(150, 50, 230, 50), 24, size=16)
  for batch_size in (None, 10):
    out = adapt.recompute_batch_stats(model, v, x, batch_size=batch_size)
    inputs = {}

    def grab(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.BatchNorm):
        inputs["/".join(context.module.scope.path)] = np.asarray(args[0], np.float64)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      model.apply(out, x, train=False)
    assert len(inputs) == 2 * 5
    for path, a in inputs.items():
      node = out["batch_stats"]
      for part in path.split("/"):
        node = node[part]
      mean, var = a.reshape(-1, a.shape[-1]).mean(0), a.reshape(-1, a.shape[-1]).var(0)
      np.testing.assert_allclose(node["mean"], mean, atol=1e-5 * np.sqrt(var).max())
      np.testing.assert_allclose(node["var"], var, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(out["params"]),
                    jax.tree_util.tree_leaves(v["params"])):
      assert a is b


def test_adaptation_repairs_brightness_shift():
  """A brightness shift moves the first BN's input mean by the kernel sum times the
  shift; exact adaptation recovers the outputs of the source model on the source."""
  model = PixelNet()
  v = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  src = jax.random.uniform(jax.random.key(1), (20, 4, 4, 1))
  v = adapt.recompute_batch_stats(model, v, src)
  out_src = model.apply(v, src)
  shifted = src + 0.3
  v_t = adapt.recompute_batch_stats(model, v, shifted)
  np.testing.assert_allclose(model.apply(v_t, shifted), out_src, atol=1e-4)
  assert not np.allclose(model.apply(v, shifted), out_src, atol=1e-2)


def test_errors(pixelnet):
  model, v, x = pixelnet
  with pytest.raises(ValueError, match="mode must be one of"):
    adapt.recompute_batch_stats(model, v, x, mode="adabn")
  with pytest.raises(ValueError, match="non-empty"):
    adapt.recompute_batch_stats(model, v, x[:0])
  with pytest.raises(ValueError, match="NaN"):
    adapt.recompute_batch_stats(model, v, np.full_like(x, np.nan))
  with pytest.raises(ValueError, match="alpha must be in"):
    adapt.recompute_batch_stats(model, v, x, alpha=1.5)
  with pytest.raises(ValueError, match="stats must be one of"):
    adapt.recompute_batch_stats(model, v, x, stats="std")
  with pytest.raises(ValueError, match="matches no BatchNorm layer"):
    adapt.recompute_batch_stats(model, v, x, layers="enc")
  with pytest.raises(ValueError, match="batch_size"):
    adapt.recompute_batch_stats(model, v, x, batch_size=0)
  with pytest.raises(ValueError, match="momentum"):
    adapt.recompute_batch_stats(model, v, x, mode="ema", momentum=0)
  nobn = models.UNet(features=2, depth=1, norm="none")
  vn = models.init(nobn, jax.random.key(0), (4, 4, 1))
  with pytest.raises(ValueError, match="no BatchNorm"):
    adapt.recompute_batch_stats(nobn, vn, x)


def test_shared_batchnorm_is_refused():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      bn = nn.BatchNorm(use_running_average=not train)
      return bn(bn(x))

  model = Shared()
  v = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
  with pytest.raises(ValueError, match="called more than once"):
    adapt.recompute_batch_stats(model, v, np.ones((2, 2, 2, 1), np.float32))
