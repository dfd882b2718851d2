import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import models


def _unoptimised(fn, **kwargs):
  """``jax.jit`` with XLA's backend optimisation off, for the programs these
  tests compile to compare two implementations of one function: the same
  arithmetic, half the compile time of an optimised U-Net gradient (and far
  less than running it op by op, which compiles every primitive alone)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def milesial_param_count(features=64, depth=4, in_ch=1, classes=2):
  """Closed-form parameter count of the reference PyTorch U-Net (conv weights,
  BN scale+bias, transposed-conv weights+bias, 1x1 head with bias)."""
  def double_conv(cin, cout):
    return cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout
  total, cin = 0, in_ch
  for i in range(depth + 1):
    total += double_conv(cin, features * 2**i)
    cin = features * 2**i
  for i in reversed(range(depth)):
    w = features * 2**i
    total += cin * w * 4 + w          # ConvTranspose2d(cin, cin // 2, 2, 2)
    total += double_conv(2 * w, w)    # DoubleConv after concatenation
    cin = w
  return total + cin * classes + classes


def shapes(model, side=64):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 1)),
                                           train=False))


def test_paper_network_parameter_count():
  v = shapes(models.UNet.paper())
  count = models.count_params(v["params"])
  assert count == milesial_param_count() == 31_036_546
  assert len(jax.tree_util.tree_leaves(v["batch_stats"])) == 2 * 18


def test_paper_bottleneck_and_taps():
  model = models.UNet.paper()
  v = shapes(model)
  _, state = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 64, 64, 1)),
                                                  mutable=["intermediates"]), v)
  inter = state["intermediates"]
  assert inter["bottleneck"]["bottleneck_pre"][0].shape == (2, 4, 4, 1024)
  for i, name in enumerate(models.level_names(4)):
    assert f"{name}_pre" in inter[name] and f"{name}_post" in inter[name]


def test_taps_pre_and_post_relu():
  model = models.UNet(features=4, depth=2)
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  logits, state = model.apply(v, x, mutable=["intermediates"])
  assert logits.shape == (3, 16, 16, 2)
  pre = state["intermediates"]["enc1"]["enc1_pre"][0]
  post = state["intermediates"]["enc1"]["enc1_post"][0]
  assert pre.shape == (3, 8, 8, 8)
  np.testing.assert_allclose(post, np.maximum(pre, 0))
  assert (np.asarray(pre) < 0).any()


@pytest.mark.parametrize("kwargs", [
    dict(down="strided"), dict(up="resize_conv"), dict(skip=False), dict(norm="none"),
    dict(num_classes=1)])
def test_variants_run(kwargs):
  model = models.UNet(features=4, depth=2, **kwargs)
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  out = model.apply(v, jnp.ones((2, 16, 16, 1)), train=False)
  assert out.shape == (2, 16, 16, kwargs.get("num_classes", 2))
  assert ("batch_stats" in v) == (kwargs.get("norm", "batch") == "batch")


def test_skip_changes_decoder_width():
  with_skip = shapes(models.UNet(features=4, depth=2), 16)["params"]
  without = shapes(models.UNet(features=4, depth=2, skip=False), 16)["params"]
  assert with_skip["dec0"]["conv0"]["kernel"].shape == (3, 3, 8, 4)
  assert without["dec0"]["conv0"]["kernel"].shape == (3, 3, 4, 4)


def test_bad_input_errors():
  model = models.UNet(features=4, depth=3)
  with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
    models.init(model, jax.random.key(0), (12, 12, 1))
  with pytest.raises(ValueError, match="UNet.norm"):
    models.init(models.UNet(features=4, depth=1, norm="weight"), jax.random.key(0), (8, 8, 1))
  with pytest.raises(ValueError, match="UNet.features"):
    models.init(models.UNet(features=0, depth=1), jax.random.key(0), (8, 8, 1))


@pytest.mark.parametrize("kwargs,side", [(dict(), 16), (dict(), 8),
                                         (dict(down="strided", up="resize_conv"), 16)])
def test_matmul_convs_equal_xla_convs_and_flax_layers(kwargs, side):
  """Every conv_impl / up_impl is the same function with the same parameters
  (side 8: a 2x2 bottleneck, where "auto" switches to the matmul form)."""
  import flax.linen as nn

  model = models.UNet(features=4, depth=2, **kwargs)
  v = models.init(model, jax.random.key(0), (side, side, 1))
  x = jax.random.uniform(jax.random.key(1), (2, side, side, 1))
  out_and_grad = _unoptimised(lambda m, p: (m.apply({**v, "params": p}, x), jax.grad(
      lambda q: jnp.sum(m.apply({**v, "params": q}, x) ** 2))(p)), static_argnums=0)
  out, g = out_and_grad(model, v["params"])
  for other in (model.clone(conv_impl="matmul"), model.clone(conv_impl="xla"),
                model.clone(up_impl="xla")):
    v_other = models.init(other, jax.random.key(0), (side, side, 1))
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v_other)):
      np.testing.assert_array_equal(a, b)
    out_other, g_other = out_and_grad(other, v["params"])
    np.testing.assert_allclose(out_other, out, atol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(g_other), jax.tree_util.tree_leaves(g)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
  # Both match Flax's own layers (independent implementations).
  xs = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  for ours, ref in [(models.Conv(5, 3), nn.Conv(5, (3, 3), padding=1)),
                    (models.Conv(5, 2, stride=2), nn.Conv(5, (2, 2), strides=(2, 2))),
                    (models.UpConv(5), nn.ConvTranspose(5, (2, 2), strides=(2, 2)))]:
    w = ref.init(jax.random.key(3), xs)
    w = jax.tree_util.tree_map(lambda a: a + jax.random.normal(jax.random.key(4), a.shape), w)
    want = _unoptimised(ref.apply)(w, xs)
    for impl in models.CONV_IMPLS:
      np.testing.assert_allclose(_unoptimised(ours.clone(impl=impl).apply)(w, xs), want,
                                 atol=1e-4)


def test_max_pool2_equals_flax_max_pool_and_its_gradient_after_relu():
  import flax.linen as nn

  z = jax.random.normal(jax.random.key(0), (3, 8, 6, 4))
  ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))
  np.testing.assert_array_equal(models.max_pool2(z), ref(z))
  for pre in (lambda x: x, jax.nn.relu):  # no ties; ReLU ties at zero
    loss = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(3 * pool(pre(x)))))(z)
    np.testing.assert_allclose(loss(models.max_pool2), loss(ref), atol=1e-6)
  with pytest.raises(ValueError, match="H and W even"):
    models.max_pool2(jnp.zeros((1, 5, 4, 2)))


def test_batch_norm_relu_equals_flax_batchnorm_then_relu_with_gradients():
  """Values, batch moments and every gradient (including through the returned
  moments) against autodiff of nn.BatchNorm + nn.relu."""
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 5)) * 3 + 1
  scale = jax.random.normal(jax.random.key(1), (5,))
  bias = jax.random.normal(jax.random.key(2), (5,))
  w, wm, wv = (jax.random.normal(jax.random.key(k), s)
               for k, s in ((3, x.shape), (4, (5,)), (5, (5,))))

  def ref(x, scale, bias):
    y = nn.BatchNorm(use_running_average=False, epsilon=1e-5).apply(
        {"params": {"scale": scale, "bias": bias},
         "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)}}, x,
        mutable=["batch_stats"])[0]
    return nn.relu(y), jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))

  def fused(x, scale, bias):
    return models.batch_norm_relu(x, scale, bias, 1e-5)

  for a, b in zip(fused(x, scale, bias), ref(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def loss(f):
    def value(*args):
      y, m, v = f(*args)
      return jnp.sum(y * w) + jnp.sum(m * wm) + jnp.sum(v * wv)
    return jax.grad(value, argnums=(0, 1, 2))(x, scale, bias)

  for a, b in zip(loss(fused), loss(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.mean(fused(x, scale, bias)[0] == 0)) > 0.1  # the ReLU gates some
  with pytest.raises(ValueError, match=r"scale and bias must have shape \(5,\)"):
    models.batch_norm_relu(x, scale[:1], bias)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    models.batch_norm_relu(x, scale, bias, 0.0)
  with pytest.raises(ValueError, match="x must be a float array"):
    models.batch_norm_relu(jnp.ones((4, 5), jnp.int32), scale, bias)


def test_fused_bn_train_step_equals_flax_bn_train_step():
  """bn_impl="fused" and "flax": same variables, loss, gradients and running
  statistics; evaluation uses nn.BatchNorm either way."""
  from bnjax import train

  model = models.UNet(features=4, depth=2)
  flax_bn = model.clone(bn_impl="flax")
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  y = jax.random.uniform(jax.random.key(2), (3, 16, 16)) > 0.7

  @functools.partial(_unoptimised, static_argnums=0)
  def step(m):
    def f(params):
      logits, state = m.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
      return train.segmentation_loss(logits, y), state
    return jax.value_and_grad(f, has_aux=True)(v["params"])

  (l1, s1), g1 = step(model)
  (l2, s2), g2 = step(flax_bn)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves((s1, g1)), jax.tree_util.tree_leaves((s2, g2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Collecting intermediates in train mode takes the unfused path (pre-activations).
  _, state = model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"])
  assert "enc0_pre" in state["intermediates"]["enc0"]
  with pytest.raises(ValueError, match="UNet.bn_impl"):
    models.init(model.clone(bn_impl="nope"), jax.random.key(0), (16, 16, 1))


@pytest.mark.parametrize("norm", ["instance", "group", "layer"])
def test_per_image_norms_have_no_batch_stats_and_ignore_the_batch(norm):
  model = models.UNet(features=4, depth=2, norm=norm)
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  assert sorted(v) == ["params"]
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  # Each image's output depends on that image alone.
  np.testing.assert_allclose(model.apply(v, x)[1:], model.apply(v, x[1:]), atol=1e-5)


def test_instance_norm_unet_is_invariant_to_a_per_image_intensity_scale():
  # Convs without bias before every InstanceNorm: a.x gives the same output up
  # to float error and the epsilon (1e-5, small against these variances; a
  # darker a.x, whose variances are smaller, moves further). A model
  # without normalisation is not invariant (the control).
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1))
  a = jnp.asarray([0.7, 1.5, 2.0, 3.0]).reshape(4, 1, 1, 1)
  outs = {}
  for norm in ("instance", "none"):
    model = models.UNet(features=8, depth=2, norm=norm)
    v = models.init(model, jax.random.key(0), (32, 32, 1))
    y, ya = model.apply(v, x), model.apply(v, a * x)
    outs[norm] = float(jnp.abs(y - ya).max() / jnp.abs(y).max())
  assert outs["instance"] < 2e-3
  assert outs["none"] > 0.1


def test_standardize_makes_the_model_invariant_to_affine_intensity_changes():
  model = models.UNet(features=4, depth=2, standardize=True)
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  np.testing.assert_allclose(model.apply(v, 0.5 * x + 0.2), model.apply(v, x), atol=1e-3)
  z = models.standardize(x)
  np.testing.assert_allclose(np.asarray(z).mean(axis=(1, 2, 3)), 0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(z).std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_stacked_predict_equals_predict_per_model():
  from bnjax import inference
  model = models.UNet(features=4, depth=2)
  vs = [models.init(model, jax.random.key(i), (16, 16, 1)) for i in range(2)]
  x = jax.random.uniform(jax.random.key(5), (2, 5, 16, 16, 1))
  stack = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *vs)
  got = inference.stacked_predict(model, stack, x, batch_size=2)
  for i in range(2):
    np.testing.assert_array_equal(got[i], inference.predict(model, vs[i], x[i]))
  # A stack whose model axis does not match the image sets is refused, named.
  y = np.zeros(x.shape[:-1], bool)
  with pytest.raises(ValueError, match="leading model axis of size 3"):
    inference.stacked_predict(model, stack, jnp.concatenate([x, x[:1]]))
  with pytest.raises(ValueError, match=r"leading model axis of size 2 .* sizes \[None, 2\]"):
    inference.stacked_iou(model, {**stack, "extra": jnp.float32(0)}, x, y)
