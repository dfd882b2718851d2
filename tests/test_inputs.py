"""Every entry point that takes images checks them alike: 0-255 floats and
integers refused, ``[n, H, W]`` given a channel, one image ``[H, W, C]`` or an
``(images, masks)`` tuple refused with what was expected; models written
elsewhere keep inputs of any kind, and get a clear error for a tuple too long
for their call."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import bnjax
from bnjax import adapt, data, features, inference, methods, models, selection, streams, train

TINY = models.UNet(features=2, depth=2)


@pytest.fixture(scope="module")
def setup():
  x, y = data.make_dataset(jax.random.key(0), data.Domain(60, 30, 200, 30), 16, size=16)
  v = models.init(TINY, jax.random.key(1), (16, 16, 1))
  return np.asarray(x), np.asarray(y), v


def _entry_points(y, v):
  """name -> a call of one entry point on a set of single-channel images."""
  cfg = train.TrainConfig(epochs=1, batch_size=8, verbose=False)
  key = jax.random.key(0)
  return {
      "predict": lambda imgs: bnjax.predict(TINY, v, imgs),
      "fit": lambda imgs: train.fit(TINY, imgs, y, cfg),
      "recompute_batch_stats": lambda imgs: adapt.recompute_batch_stats(TINY, v, imgs),
      "tent": lambda imgs: methods.tent(TINY, v, imgs, steps=1, batch_size=8, key=key),
      "features.extract": lambda imgs: features.extract(TINY, v, imgs),
      "selection.scores": lambda imgs: selection.scores(TINY, v, v, imgs),
      "stacked_predict": lambda imgs: inference.stacked_predict(
          TINY, jax.tree_util.tree_map(lambda a: a[None], v), np.asarray(imgs)[None]
          if not isinstance(imgs, tuple) else imgs),
  }


ENTRY_POINTS = ["predict", "fit", "recompute_batch_stats", "tent", "features.extract",
                "selection.scores", "stacked_predict"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_checks_images_alike(setup, name):
  x, y, v = setup
  call = _entry_points(y, v)[name]
  with pytest.raises(ValueError, match=r"got values in \[0, 255\].*divide by 255"):
    call(x * 255)
  with pytest.raises(ValueError, match=r"uint8 \(integers\); convert them to float in \[0, 1\]"):
    call(np.rint(x * 255).astype(np.uint8))
  call(x[..., 0])  # [n, H, W]: a channel is added, as for [n, H, W, 1]
  if name != "stacked_predict":
    with pytest.raises(ValueError, match=r"looks like one image \[H, W, C\]: pass .*\[None\]"):
      call(x[0])
    with pytest.raises(ValueError, match="got a tuple of 2; pass the images alone"):
      call((x, y))


def test_a_list_of_images_is_a_set(setup):
  x, _, v = setup
  want = bnjax.predict(TINY, v, x[:3])
  np.testing.assert_array_equal(bnjax.predict(TINY, v, [x[0], x[1], x[2]]), want)
  a = adapt.recompute_batch_stats(TINY, v, list(x))
  b = adapt.recompute_batch_stats(TINY, v, x)
  for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(p, q)
  with pytest.raises(ValueError, match="list of arrays of different shapes"):
    bnjax.predict(TINY, v, [x[0], x[1, :8]])


def test_an_explicit_range_and_its_opt_out(setup):
  x, _, v = setup
  adapt.recompute_batch_stats(TINY, v, x * 255, image_range=None)
  adapt.recompute_batch_stats(TINY, v, x * 2 - 1, image_range=(-1, 1))
  with pytest.raises(ValueError, match="image_range must be 'auto', None or"):
    adapt.recompute_batch_stats(TINY, v, x, image_range="unit")


class _Dense(nn.Module):
  """A model of one non-image input, written elsewhere: no IMAGE_RANGE."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))


def test_models_written_elsewhere_take_any_values_and_get_a_clear_tuple_error():
  model = _Dense()
  v = model.init(jax.random.key(0), np.ones((2, 5)))
  x = np.random.default_rng(0).normal(300.0, 50.0, (12, 5)).astype(np.float32)
  out = adapt.recompute_batch_stats(model, v, x)  # any scale: not images
  h = x @ np.asarray(v["params"]["Dense_0"]["kernel"]) + np.asarray(v["params"]["Dense_0"]["bias"])
  np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], h.mean(0), rtol=1e-5)
  with pytest.raises(ValueError, match=r"the inputs hold 2 arrays .* takes 1 besides"):
    adapt.recompute_batch_stats(model, v, (x, np.ones(12)))


def test_domain_refuses_the_0_1_scale():
  with pytest.raises(ValueError, match=r"0-255 scale.*multiply by 255, Domain\(89.25, 51"):
    data.Domain(0.35, 0.2, 0.67, 0.2)
  assert data.Domain(0, 0, 0, 0).mu2 == 0.0  # nothing to rescale
  assert data.Domain(0.5, 0.5, 2, 0.5).mu2 == 2.0  # one value beyond 1: the 0-255 scale


class _Conv(nn.Module):
  """A model of images written elsewhere: no IMAGE_RANGE, a 2-class head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    return nn.Conv(2, (1, 1))(x)


class _Conv255(_Conv):
  IMAGE_RANGE = (0, 255)


def _conv_entry_points(model, v):
  """name -> a call on images [n, H, W, C] (streams: as one batch of T = 1)."""
  key = jax.random.key(0)
  return {
      "recompute_batch_stats": lambda x, **kw: adapt.recompute_batch_stats(model, v, x, **kw),
      "tent": lambda x, **kw: methods.tent(model, v, x, steps=1, batch_size=4, key=key, **kw),
      "features.extract": lambda x, **kw: features.extract(model, v, x, tap="bn_inputs", **kw),
      "streams.run": lambda x, **kw: streams.run(model, v, np.asarray(x)[None], "tent", **kw),
      "streams.run_many": lambda x, **kw: streams.run_many(
          model, jax.tree_util.tree_map(lambda a: a[None], v), np.asarray(x)[None, None],
          "ema_bn", **kw),
  }


@pytest.mark.parametrize("name", ["recompute_batch_stats", "tent", "features.extract",
                                  "streams.run", "streams.run_many"])
def test_models_that_declare_no_range_refuse_8_bit_images_unless_told(setup, name):
  x = setup[0][:4]
  v = _Conv().init(jax.random.key(0), x)
  call = _conv_entry_points(_Conv(), v)[name]
  with pytest.raises(ValueError, match=r"look like 8-bit images \(values in \[0, 255\]\).*"
                                       r"declares no image range: divide by 255.*"
                                       r"image_range=\(0, 255\)"):
    call(x * 255)
  with pytest.raises(ValueError, match=r"images of uint8 \(integers\).*declares no image range"):
    call(np.rint(x * 255).astype(np.uint8))
  for ok in (x, x * 2 - 1, (x - x.mean()) / x.std(), x * 1.9):  # [0, 1], [-1, 1], standardised
    call(ok)
  call(x * 255, image_range=(0, 255))  # the caller says the model takes that scale
  call(x * 255, image_range=None)
  call(np.rint(x * 255).astype(np.uint8), image_range=None)
  declared = _Conv255()
  _conv_entry_points(declared, v)[name](x * 255)  # or the model's class does


def test_the_8_bit_rule_looks_only_at_image_shaped_inputs(setup):
  x = setup[0][:4]
  wide = np.repeat(x, 5, axis=-1) * 255  # [n, H, W, 5]: a feature map, not images
  model = _Conv()
  v = model.init(jax.random.key(0), wide)
  adapt.recompute_batch_stats(model, v, wide)


def test_a_stream_without_its_batch_axis_is_refused(setup):
  x = setup[0][:6]
  model = _Conv()
  v = model.init(jax.random.key(0), x)
  for m, layout in ((model, None), (TINY, models.init(TINY, jax.random.key(1), (16, 16, 1)))):
    variables = v if layout is None else layout
    with pytest.raises(ValueError, match=r"reads as \[T, H, W, C\]: one image per step, without "
                                         r"the batch axis.*stream\[:, None\]"):
      streams.run(m, variables, x, "tent")  # [T, H, W, C]
    out = streams.run(m, variables, x[:, None], "tent")  # what the message says to pass
    assert out.masks.shape == (6, 1, 16, 16)
  with pytest.raises(ValueError, match=r"reads as \[M, T, H, W, C\]"):
    streams.run_many(model, jax.tree_util.tree_map(lambda a: a[None], v), x[None], "tent")


def test_a_channel_mismatch_is_named(setup):
  x = setup[0][:4]
  model = _Conv()
  v = model.init(jax.random.key(0), x)  # built for 1 channel
  rgb = np.repeat(x, 3, axis=-1)
  with pytest.raises(ValueError, match=r"stream images of shape \(4, 16, 16, 3\) do not fit the "
                                       r"model's parameters: 3 channel\(s\)"):
    streams.run(model, v, rgb[None], "tent")
  with pytest.raises(ValueError, match=r"inputs of shape \(4, 16, 16, 3\) do not fit the model's "
                                       r"parameters: 3 channel\(s\)"):
    adapt.recompute_batch_stats(model, v, rgb)
