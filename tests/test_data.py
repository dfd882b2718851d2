import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from bnjax import data


def numpy_perlin(angles, offsets, size, res):
  """Classical Perlin noise on the whole (res+1)-cell lattice, then cropped."""
  cell = size // res
  full = (res + 1) * cell
  grads = np.stack([np.cos(angles), np.sin(angles)], -1)
  out = np.zeros((full, full))
  fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3
  for i in range(full):
    for j in range(full):
      y, x = i / cell, j / cell
      y0, x0 = int(y), int(x)
      fy, fx = y - y0, x - x0
      dots = {}
      for di in (0, 1):
        for dj in (0, 1):
          g = grads[y0 + di, x0 + dj]
          dots[di, dj] = g[0] * (fy - di) + g[1] * (fx - dj)
      ty, tx = fade(fy), fade(fx)
      top = dots[0, 0] * (1 - tx) + dots[0, 1] * tx
      bottom = dots[1, 0] * (1 - tx) + dots[1, 1] * tx
      out[i, j] = math.sqrt(2) * (top * (1 - ty) + bottom * ty)
  oy, ox = offsets
  return out[oy:oy + size, ox:ox + size]


@pytest.mark.parametrize("size,res,offsets", [(16, 2, (0, 0)), (16, 2, (5, 2)), (12, 3, (3, 1))])
def test_perlin_matches_numpy_reference(size, res, offsets):
  rng = np.random.default_rng(0)
  angles = rng.uniform(0, 2 * np.pi, (res + 2, res + 2))
  got = data.perlin_from_gradients(jnp.asarray(angles, jnp.float32),
                                   jnp.asarray(offsets), size, res)
  np.testing.assert_allclose(got, numpy_perlin(angles, offsets, size, res), atol=1e-5)


def test_perlin_vanishes_on_lattice_points():
  noise = data.perlin_from_gradients(jnp.linspace(0, 6, 16).reshape(4, 4),
                                     jnp.array([0, 0]), 16, 2)
  np.testing.assert_allclose(noise[::8, ::8], 0.0, atol=1e-6)
  assert float(jnp.abs(noise).max()) > 0.1


def test_mask_fraction_matches_original_generator():
  masks = data.perlin_masks(jax.random.key(0), 2000)
  assert masks.shape == (2000, 64, 64) and masks.dtype == jnp.bool_
  assert 0.19 <= float(masks.mean()) <= 0.22


def test_masks_are_random_offsets_and_deterministic():
  a = data.perlin_masks(jax.random.key(1), 64, size=32)
  b = data.perlin_masks(jax.random.key(1), 64, size=32)
  c = data.perlin_masks(jax.random.key(2), 64, size=32)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # The lattice crop is random: the zero set of the noise is not at fixed pixels.
  noise = np.abs(np.asarray(data.perlin_noise(jax.random.key(3), 200, 32, 2)))
  assert noise.min(axis=0).max() > 1e-3


def test_lattice_errors():
  with pytest.raises(ValueError, match="multiple of res"):
    data.perlin_masks(jax.random.key(0), 2, size=30, res=4)
  with pytest.raises(ValueError, match="n must be"):
    data.perlin_masks(jax.random.key(0), 0)
  with pytest.raises(ValueError, match="threshold"):
    data.perlin_masks(jax.random.key(0), 2, threshold=-1)
  with pytest.raises(ValueError, match="key"):
    data.perlin_masks(0, 2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(mu1=-1, sigma1=1, mu2=2, sigma2=1), "mu1"),
    (dict(mu1=1, sigma1=1, mu2=256, sigma2=1), "mu2"),
    (dict(mu1=1, sigma1=-0.5, mu2=2, sigma2=1), "sigma1"),
    (dict(mu1=1, sigma1=1, mu2=2, sigma2=float("nan")), "sigma2"),
    (dict(mu1="a", sigma1=1, mu2=2, sigma2=1), "mu1"),
])
def test_domain_validation(kwargs, field):
  with pytest.raises(ValueError, match=f"Domain.{field}"):
    data.Domain(**kwargs)


def test_domain_parse():
  assert data.Domain.parse("90, 50,170,50") == data.Domain(90, 50, 170, 50)
  with pytest.raises(ValueError, match="four numbers"):
    data.Domain.parse("1,2,3")


def test_white_noise_statistics():
  masks = data.perlin_masks(jax.random.key(0), 400, size=32)
  images = data.render(jax.random.key(1), masks, data.Domain(60, 10, 190, 20))
  assert images.shape == (400, 32, 32, 1) and images.dtype == jnp.float32
  px, m = np.asarray(images[..., 0]) * 255, np.asarray(masks)
  np.testing.assert_allclose([px[~m].mean(), px[~m].std()], [60, 10], rtol=0.01)
  np.testing.assert_allclose([px[m].mean(), px[m].std()], [190, 20], rtol=0.01)


def test_white_noise_clipping_and_quantize():
  masks = data.perlin_masks(jax.random.key(0), 50, size=16)
  images = np.asarray(data.render(jax.random.key(1), masks, data.Domain(5, 80, 250, 80)))
  assert images.min() == 0.0 and images.max() == 1.0
  # Clipped mass equals the normal tail: P(N(5, 80) < 0) ~ 0.475 of background pixels.
  frac = (images[..., 0][~np.asarray(masks)] == 0).mean()
  assert abs(frac - 0.4751) < 0.02
  q = np.asarray(data.render(jax.random.key(1), masks, data.Domain(5, 80, 250, 80),
                             quantize=True))
  np.testing.assert_allclose(q * 255, np.round(q * 255), atol=1e-4)
  gap = images * 255 - q * 255  # truncation drops the fractional part
  inside = (images > 0) & (images < 1)
  assert gap.min() > -1e-3 and gap.max() < 1 + 1e-3 and 0.4 < gap[inside].mean() < 0.6


def test_edges_match_scipy_convolution():
  masks = data.perlin_masks(jax.random.key(0), 5, size=16)
  got = np.asarray(data.render(jax.random.key(1), masks, kind="edges"))[..., 0] * 255
  for m, g in zip(np.asarray(masks), got):
    lap = ndimage.convolve(m.astype(float), data.LAPLACIAN.astype(float), mode="constant")
    np.testing.assert_allclose(g, np.clip((lap + 8) * 16, 0, 255), atol=1e-3)


def test_gradient_render_uses_two_textures():
  masks = data.perlin_masks(jax.random.key(0), 20, size=32)
  images = np.asarray(data.render(jax.random.key(1), masks, kind="gradient"))[..., 0]
  assert 0.0 <= images.min() and images.max() <= 1.0
  # Pixels are 128 + 128 clip(p, -1, 1) of smooth Perlin textures: neighbours are close
  # inside a class, and the two classes are independent textures.
  m = np.asarray(masks)
  same = (m[:, :, 1:] == m[:, :, :-1])
  step = np.abs(np.diff(images, axis=2))
  assert step[same].mean() < 0.05
  with pytest.raises(ValueError, match="kind must be"):
    data.render(jax.random.key(1), masks, kind="stripes")
  with pytest.raises(ValueError, match="needs a Domain"):
    data.render(jax.random.key(1), masks)


def test_make_dataset_and_folder_roundtrip(tmp_path):
  images, masks = data.make_dataset(jax.random.key(0), data.Domain(90, 50, 170, 50), 6,
                                    size=16, quantize=True)
  data.save_folder(tmp_path, images, masks)
  assert sorted(os.listdir(tmp_path / "images")) == [f"{i:06d}.png" for i in range(6)]
  x, y = data.load_folder(tmp_path / "images", tmp_path / "masks")
  np.testing.assert_allclose(x, images, atol=1e-6)
  np.testing.assert_array_equal(y, masks)


def test_load_folder_errors(tmp_path):
  images, masks = data.make_dataset(jax.random.key(0), data.Domain(90, 50, 170, 50), 3, size=16)
  data.save_folder(tmp_path, images, masks)
  os.remove(tmp_path / "masks" / "000001.png")
  with pytest.raises(ValueError, match="no mask"):
    data.load_folder(tmp_path / "images", tmp_path / "masks")
  data.save_folder(tmp_path, images, masks)
  (tmp_path / "images" / "000002.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="cannot read image file"):
    data.load_folder(tmp_path / "images", tmp_path / "masks")
  small, small_masks = data.make_dataset(jax.random.key(0), data.Domain(9, 5, 17, 5), 3, size=8)
  data.save_folder(tmp_path / "b", small, small_masks)
  data.save_folder(tmp_path, images, masks)
  os.replace(tmp_path / "b" / "masks" / "000000.png", tmp_path / "masks" / "000000.png")
  with pytest.raises(ValueError, match="mask .* is 8x8 but its image is 16x16"):
    data.load_folder(tmp_path / "images", tmp_path / "masks")
  with pytest.raises(ValueError, match="does not exist"):
    data.load_folder(tmp_path / "nope", tmp_path / "masks")


def test_image_checks():
  from bnjax import _checks
  with pytest.raises(ValueError, match="non-empty"):
    _checks.images(np.zeros((0, 8, 8, 1)))
  with pytest.raises(ValueError, match="NaN"):
    _checks.images(np.full((2, 8, 8, 1), np.nan))
  with pytest.raises(ValueError, match="masks must have shape"):
    _checks.images(np.zeros((2, 8, 8, 1)), np.zeros((2, 8, 7), bool))
  with pytest.raises(ValueError, match="uint8 \\(integers\\); convert them to float in \\[0, 1\\]"):
    _checks.images(np.zeros((2, 8, 8, 1), np.uint8))
  x = np.linspace(0, 255, 2 * 64).reshape(2, 8, 8, 1)
  with pytest.raises(ValueError, match=r"\[0, 1\] \(image_range\), got values in \[0, 255\].*divide by 255"):
    _checks.images(x)
  assert _checks.images(x, image_range=None).dtype == np.float32  # the opt-out
  assert _checks.images(x / 255 + 0.005).shape == (2, 8, 8, 1)     # within the tolerance
  with pytest.raises(ValueError, match="got values in \\[-0.5"):
    _checks.images(x / 255 - 0.5)
  with pytest.raises(ValueError, match="masks must be boolean"):
    _checks.images(x / 255, np.zeros((2, 8, 8), np.float32))


def test_named_key_folds_each_name_by_its_crc32():
  import zlib
  want = jax.random.key(3)
  for name in ("brightness", 5, "eval"):
    want = jax.random.fold_in(want, zlib.crc32(str(name).encode()) >> 1)
  got = data.named_key(3, "brightness", 5, "eval")
  np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
  other = data.named_key(3, "brightness", 5, "adapt")
  assert not np.array_equal(jax.random.key_data(got), jax.random.key_data(other))


def _nuclei_folder(tmp_path, image, labels):
  from PIL import Image
  Image.fromarray(image.astype(np.uint16)).save(tmp_path / "img2d.tif")
  Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "mask2d.tif")
  return tmp_path


def test_nuclei_reads_16_bit_tiffs_as_the_8_bit_image_and_its_nuclei(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 48))
  labels = np.zeros((40, 48), np.int64)
  labels[5:9, 7:12], labels[20:30, 30:33] = 1, 183  # two nuclei, labels 1 and 183
  x, y = data.nuclei(_nuclei_folder(tmp_path, image, labels))
  assert x.dtype == np.float32 and x.shape == (40, 48)
  np.testing.assert_allclose(x, image / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, labels != 0)
  (tmp_path / "mask2d.tif").unlink()
  with pytest.raises(ValueError, match="holds no mask2d.tif"):
    data.nuclei(tmp_path)
  _nuclei_folder(tmp_path, image * 2, labels)  # values up to 510: not an 8-bit image
  with pytest.raises(ValueError, match=r"values must lie in 0..255"):
    data.nuclei(tmp_path)


def test_nuclei_without_stardist_names_the_extra(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "stardist" else real(name, *a))
  with pytest.raises(ImportError, match=r"pip install 'bnjax\[nuclei\]'"):
    data.nuclei()


def test_tiles_are_the_windows_of_the_image():
  rng = np.random.default_rng(1)
  image = rng.random((20, 26)).astype(np.float32)
  mask = rng.random((20, 26)) > 0.5
  x, y, corners = data.tiles(image, mask, 8, stride=5, rows=(2, 20))
  # Every window of numpy's sliding view whose corner lies on the stride grid.
  view = np.lib.stride_tricks.sliding_window_view(image, (8, 8))
  mview = np.lib.stride_tricks.sliding_window_view(mask, (8, 8))
  want = [(r, c) for r in range(2, 20 - 8 + 1, 5) for c in range(0, 26 - 8 + 1, 5)]
  np.testing.assert_array_equal(corners, want)
  np.testing.assert_array_equal(x[..., 0], np.stack([view[r, c] for r, c in want]))
  np.testing.assert_array_equal(y, np.stack([mview[r, c] for r, c in want]))
  assert x.shape == (len(want), 8, 8, 1)
  # Disjoint rows give tiles that share no pixel.
  top = data.tiles(image, mask, 8, rows=(0, 10))[2]
  bottom = data.tiles(image, mask, 8, rows=(10, 20))[2]
  assert top[:, 0].max() + 8 <= bottom[:, 0].min()
  with pytest.raises(ValueError, match=r"size must be in 1..10"):
    data.tiles(image, mask, 12, rows=(10, 20))
  with pytest.raises(ValueError, match=r"rows must be \(start, stop\)"):
    data.tiles(image, mask, 4, rows=(10, 30))
  with pytest.raises(ValueError, match=r"mask \[H, W\] of the same"):
    data.tiles(image, mask[:, :-1], 4)
