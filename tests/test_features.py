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
