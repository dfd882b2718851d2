import jax
import numpy as np
import pytest

from bnjax import features, models


@pytest.fixture(scope="module")
def setup():
  model = models.UNet(features=4, depth=2)
  v = models.init(model, jax.random.key(0), (16, 16, 1))
  x = np.asarray(jax.random.uniform(jax.random.key(1), (5, 16, 16, 1)))
  return model, v, x


def test_extract_shapes_and_relu(setup):
  model, v, x = setup
  assert features.available_taps(model, v, (16, 16, 1)) == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
  pre = features.extract(model, v, x, tap="enc1", pre_activation=True, batch_size=2)
  post = features.extract(model, v, x, tap="enc1", batch_size=3)
  assert pre.shape == (5 * 8 * 8, 8)
  np.testing.assert_allclose(post, np.maximum(pre, 0), atol=1e-6)
  per = features.extract(model, v, x, tap="bottleneck", per_image=True)
  assert per.shape == (5, 4 * 4 * 16)
  # Rows are positions: the per-image vector is the same numbers.
  flat = features.extract(model, v, x, tap="bottleneck")
  np.testing.assert_allclose(per.reshape(5, 16, 16).reshape(-1, 16), flat, atol=1e-6)
  with pytest.raises(ValueError, match="tap must be one of"):
    features.extract(model, v, x, tap="enc7")


def test_extract_stacked(setup):
  model, v, x = setup
  v2 = models.init(model, jax.random.key(5), (16, 16, 1))
  stack = jax.tree_util.tree_map(lambda a, b: np.stack([a, b]), v, v2)
  both = features.extract(model, stack, x, tap="dec1", stacked=True)
  assert both.shape[0] == 2
  np.testing.assert_allclose(both[1], features.extract(model, v2, x, tap="dec1"), atol=1e-5)


def test_collapse_fraction():
  f = np.random.default_rng(0).normal(size=(10, 6))
  f[:, :2] = 3.0
  assert features.collapse_fraction(f) == pytest.approx(2 / 6)


def test_extract_all_taps_in_one_pass(setup):
  model, v, x = setup
  every = features.extract_all(model, v, x, batch_size=2)
  assert list(every) == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
  # Independent read-out: the model's own sown intermediates.
  _, state = model.apply(v, x, train=False, mutable=["intermediates"])
  for tap in every:
    sown = np.asarray(state["intermediates"][tap][f"{tap}_post"][0])
    np.testing.assert_allclose(every[tap], sown.reshape(-1, sown.shape[-1]), atol=1e-5)
  with pytest.raises(ValueError, match="tap must be one of"):
    features.extract_all(model, v, x, taps=["enc0", "nope"])


# ---------------------------------------------------------------- models bnjax did not write

import jax.numpy as jnp  # noqa: E402

import foreign_models as fm  # noqa: E402


@pytest.fixture(scope="module")
def resnet():
  model = fm.ResNet(stage_sizes=[1, 1])
  x = jax.random.normal(jax.random.key(2), (6, 8, 8, 2))
  return model, model.init(jax.random.key(0), x, train=False), x


def test_module_path_taps_equal_flax_captured_outputs(resnet):
  model, v, x = resnet
  paths = features.module_paths(model, v, x)
  assert "ResNetBlock_1/Conv_0" in paths and "bn_init" in paths
  # Independent read-out: Flax's own capture of every module's output.
  _, state = model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])
  want = np.asarray(state["intermediates"]["ResNetBlock_1"]["Conv_0"]["__call__"][0])
  got = features.extract(model, v, x, tap="ResNetBlock_1/Conv_0", batch_size=4)
  np.testing.assert_allclose(got, want.reshape(-1, want.shape[-1]), atol=1e-5)
  per = features.extract(model, v, x, tap="ResNetBlock_1/Conv_0", per_image=True)
  np.testing.assert_allclose(per, want.reshape(6, -1), atol=1e-5)
  convs = features.extract_all(model, v, x, taps=[r"ResNetBlock_\d/Conv_\d$"])
  assert sorted(convs) == ["ResNetBlock_0/Conv_0", "ResNetBlock_0/Conv_1",
                           "ResNetBlock_1/Conv_0", "ResNetBlock_1/Conv_1"]
  with pytest.raises(ValueError, match="matches 4 modules"):
    features.extract(model, v, x, tap=r"ResNetBlock_\d/Conv_\d$")
  with pytest.raises(ValueError, match="tap must be one of"):
    features.extract(model, v, x, tap="layer9")


def test_bn_input_taps_equal_recorded_inputs(resnet):
  model, v, x = resnet
  every = features.extract_all(model, v, x, batch_size=4)  # no sown taps: BN inputs
  records = fm.bn_inputs(model, v, (x,), {"train": False})
  assert sorted(every) == sorted(f"{p}:input" for p in records)
  for path, (a, _) in records.items():
    np.testing.assert_allclose(every[f"{path}:input"], a.reshape(-1, a.shape[-1]), atol=1e-5)


def test_bn_inputs_of_channels_first_and_two_input_models():
  model = fm.ChannelsFirst()
  x = jax.random.normal(jax.random.key(3), (4, 2, 6, 6))
  v = model.init(jax.random.key(0), x)
  got = features.extract_all(model, v, x, taps=["bn_inputs"])
  for path, (a, _) in fm.bn_inputs(model, v, (x,), {"train": False}).items():
    np.testing.assert_allclose(got[f"{path}:input"],
                               np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]), atol=1e-5)
  model = fm.Conditioned()
  inputs = (jax.random.normal(jax.random.key(4), (5, 6, 6, 1)), jnp.ones((5, 4)))
  v = model.init(jax.random.key(0), *inputs)
  got = features.extract(model, v, inputs, tap="BatchNorm_1", batch_size=2)
  _, state = model.apply(v, *inputs, capture_intermediates=True, mutable=["intermediates"])
  want = np.asarray(state["intermediates"]["BatchNorm_1"]["__call__"][0])
  np.testing.assert_allclose(got, want.reshape(-1, want.shape[-1]), atol=1e-5)
