"""Shifts: each checked against what its docstring says, computed independently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from bnjax import data, shifts
from bnjax.shifts import _rotate, _zoom

KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def pairs():
  return data.make_dataset(jax.random.key(0), data.Domain(90, 40, 160, 40), 6, 32)


@pytest.mark.parametrize("shift", shifts.SHIFTS)
def test_severity_zero_is_the_identity(pairs, shift):
  x, y = shifts.apply(KEY, *pairs, shift, 0)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(pairs[0]))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(pairs[1]))


@pytest.mark.parametrize("shift", shifts.SHIFTS)
def test_every_shift_keeps_shapes_and_range_and_changes_something(pairs, shift):
  x, y = shifts.apply(KEY, *pairs, shift, 3)
  assert x.shape == pairs[0].shape and x.dtype == jnp.float32
  assert y.shape == pairs[1].shape and y.dtype == jnp.bool_
  assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
  assert not np.array_equal(np.asarray(x), np.asarray(pairs[0]))
  again = shifts.apply(KEY, *pairs, shift, 3)
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(x))  # keyed: reproducible


def test_brightness_moves_the_mean_by_the_stated_amount():
  # Mid-grey images, no clipping: the mean moves by exactly 12 s / 255.
  images = np.asarray(jax.random.uniform(KEY, (4, 16, 16, 1), minval=0.3, maxval=0.6))
  masks = np.zeros((4, 16, 16), bool)
  for s in (1, 5):
    x, _ = shifts.apply(KEY, images, masks, "brightness", s)
    np.testing.assert_allclose(np.asarray(x).mean() - images.mean(), 12 * s / 255, atol=1e-6)


def test_contrast_scales_the_standard_deviation_about_the_mean(pairs):
  images = np.asarray(pairs[0])
  for s in (2, 4):
    x = np.asarray(shifts.apply(KEY, *pairs, "contrast", s)[0])
    f = 1 - 0.15 * s
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), f * images.std(axis=(1, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), atol=1e-6)


def test_gamma_and_noise_levels(pairs):
  images = np.asarray(pairs[0])
  x = np.asarray(shifts.apply(KEY, *pairs, "gamma", 2)[0])
  np.testing.assert_allclose(x, images ** 1.6, rtol=1e-5, atol=1e-7)
  flat = np.full((50, 32, 32, 1), 0.5, np.float32)
  noisy = np.asarray(shifts.apply(KEY, flat, np.zeros((50, 32, 32), bool), "noise", 4)[0])
  np.testing.assert_allclose((noisy - 0.5).std(), 40 / 255, rtol=0.02)


def test_blur_equals_scipy_and_attenuates_frequencies_as_its_gaussian(pairs):
  images = np.asarray(pairs[0])
  sigma = 0.6 * 3
  x = np.asarray(shifts.apply(KEY, *pairs, "blur", 3)[0])
  want = np.stack([ndimage.gaussian_filter(im[..., 0].astype(np.float64), sigma, mode="reflect",
                                           truncate=4.0) for im in images])[..., None]
  np.testing.assert_allclose(x, want, atol=1e-5)
  # A cosine that is symmetric about the half-pixel borders is an eigenvector
  # of the reflected blur; its gain is the Gaussian's transfer function
  # exp(-sigma^2 w^2 / 2) at w = pi k / H.
  h = 32
  i = np.arange(h)
  for k in (2, 5, 9):
    wave = np.cos(np.pi * k * (i + 0.5) / h)
    image = (0.5 + 0.4 * np.outer(wave, np.ones(h)))[None, :, :, None].astype(np.float32)
    out = np.asarray(shifts.apply(KEY, image, np.zeros((1, h, h), bool), "blur", 3)[0])
    gain = ((out - 0.5) / (image - 0.5))[0, :, 0, 0]
    np.testing.assert_allclose(gain, np.exp(-0.5 * (sigma * np.pi * k / h) ** 2), atol=2e-3)


@pytest.mark.parametrize("shift", shifts.FAMILIES["geometry"])
def test_geometric_shifts_carry_the_mask_with_the_image(pairs, shift):
  masks = pairs[1]
  image = np.asarray(masks, np.float32)[..., None]
  for s in (1, 5):
    x, y = shifts.apply(KEY, image, masks, shift, s)
    np.testing.assert_array_equal(np.asarray(x)[..., 0], np.asarray(y, np.float32))
    assert not np.array_equal(np.asarray(y), np.asarray(masks))


def test_rotation_and_zoom_geometry_against_numpy():
  x = np.asarray(jax.random.uniform(KEY, (2, 8, 8, 1)))
  m = x[..., 0] > 0.5
  # 90 degrees counter-clockwise (as displayed) is np.rot90.
  rx, rm = _rotate(jnp.asarray(x), jnp.asarray(m), 90.0)
  np.testing.assert_array_equal(np.asarray(rx), np.rot90(x, 1, axes=(1, 2)))
  np.testing.assert_array_equal(np.asarray(rm), np.rot90(m, 1, axes=(1, 2)))
  # Zoom x2 about the centre: the central 4x4 block, each pixel repeated 2x2.
  zx, _ = _zoom(jnp.asarray(x), jnp.asarray(m), 2.0)
  want = np.repeat(np.repeat(x[:, 2:6, 2:6], 2, axis=1), 2, axis=2)
  np.testing.assert_array_equal(np.asarray(zx), want)


def test_elastic_displacement_is_bounded_by_its_amplitude():
  # An image whose pixel value encodes its row: the displacement is readable.
  h = 32
  rows = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, h)) / 64 + 0.1
  image = np.broadcast_to(rows[None, :, :, None], (3, h, h, 1))
  x, _ = shifts.apply(KEY, image, np.zeros((3, h, h), bool), "elastic", 2)
  moved = np.asarray(x)[..., 0] * 64 - 0.1 * 64 - np.arange(h)[:, None]
  inner = moved[:, 4:-4, 4:-4]  # away from the reflected borders
  assert np.abs(inner).max() <= 3.0 + 0.5 + 1e-4  # amplitude 1.5 * 2 px, then rounded
  assert np.abs(inner).max() >= 1.0


def test_texture_shift_blends_toward_the_other_renderer(pairs):
  images, masks = pairs
  x = np.asarray(shifts.apply(KEY, images, masks, "edges", 5)[0])
  np.testing.assert_allclose(x, np.asarray(data.render(KEY, masks, kind="edges")), atol=1e-6)
  half = np.asarray(shifts.apply(KEY, images, masks, "edges", 2)[0])
  np.testing.assert_allclose(half, 0.6 * np.asarray(images) + 0.4 * x, atol=1e-6)


def test_shape_shifts_change_object_size_and_foreground_fraction():
  domain = data.Domain(90, 30, 170, 30)
  images, masks = data.make_dataset(jax.random.key(1), domain, 200, 32)
  x, y = shifts.apply(KEY, images, masks, "threshold", 5)
  assert float(jnp.mean(y)) > 2 * float(jnp.mean(masks))  # |noise| > 0.15
  # Re-rendered from the set's class statistics: the class means are kept.
  fg = np.asarray(x)[..., 0][np.asarray(y)] * 255
  assert abs(fg.mean() - np.asarray(images)[..., 0][np.asarray(masks)].mean() * 255) < 3
  # More lattice cells: more, smaller objects (more mask/background boundary).
  _, small = shifts.apply(KEY, images, masks, "res", 5)
  edges = lambda m: np.mean(np.asarray(m)[:, 1:] != np.asarray(m)[:, :-1])
  assert edges(small) > 2 * edges(masks)


def test_bad_arguments_are_value_errors(pairs):
  with pytest.raises(ValueError, match="shift must be one of"):
    shifts.apply(KEY, *pairs, "sepia", 1)
  for bad in (6, -1, 2.5, True):
    with pytest.raises(ValueError, match="severity must be an integer in 0..5"):
      shifts.apply(KEY, *pairs, "blur", bad)
  with pytest.raises(ValueError, match="one-channel"):
    shifts.apply(KEY, jnp.concatenate([pairs[0]] * 2, -1), pairs[1], "edges", 1)
  with pytest.raises(ValueError, match="must lie in"):
    shifts.apply(KEY, pairs[0] * 255, pairs[1], "blur", 1)


def test_level_table():
  assert shifts.level("brightness", 5) == pytest.approx(60 / 255)
  assert shifts.level("rotation", 3) == 27.0
  assert shifts.family_of("elastic") == "geometry"
  assert set(shifts.SHIFTS) == {s for f in shifts.FAMILIES.values() for s in f}


def test_relabel_draws_new_masks_in_the_sets_own_appearance():
  x, y = data.make_dataset(jax.random.key(0), data.Domain(60, 20, 200, 30), 24, size=16)
  key = jax.random.key(4)
  lo, lo_masks = shifts.relabel(key, x, y, 0.15)
  hi, hi_masks = shifts.relabel(key, x, y, 0.4)
  # One noise field per key: |noise| > 0.4 implies |noise| > 0.15.
  assert np.all(np.asarray(lo_masks) | ~np.asarray(hi_masks))
  assert np.mean(lo_masks) > 2.5 * np.mean(hi_masks)
  pix, m = np.asarray(x)[..., 0] * 255, np.asarray(y)
  new, nm = np.asarray(lo)[..., 0] * 255, np.asarray(lo_masks)
  for sel, new_sel in ((m, nm), (~m, ~nm)):  # each class's mean and spread, NumPy
    assert abs(new[new_sel].mean() - pix[sel].mean()) < 3.0
    assert abs(new[new_sel].std() - pix[sel].std()) < 3.0
  per_image = np.linspace(0.15, 0.4, 24)
  _, masks = shifts.relabel(key, x, y, per_image)
  frac = np.asarray(masks).mean((1, 2))
  assert frac[:6].mean() > frac[-6:].mean() + 0.3
  with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
    shifts.relabel(key, x, y, 1.2)
  with pytest.raises(ValueError, match="square one-channel"):
    shifts.relabel(key, np.repeat(np.asarray(x), 3, -1), y, 0.3)
