r"""Controlled shifts of a segmentation set: ``apply(key, images, masks, shift,
severity) -> (images, masks)``.

Every shift takes float32 images ``[n, H, W, C]`` in [0, 1] and bool masks
``[n, H, W]`` and returns the same shapes; severity 0 returns its inputs
unchanged and severities 1..5 are the levels below (``level(shift, s)`` gives
the number). Random shifts draw from ``key``; every shift is one jitted
function of (key, images, masks) for a given (shift, severity), so it can be
``jax.vmap``-ed over keys and sets.

The shifts and their levels::

    ==========  ===========================================================  ====================
    shift       what it does (``s`` = severity)                              level at s = 1..5
    ==========  ===========================================================  ====================
    intensity (the mask is unchanged)
    -------------------------------------------------------------------------------------------------
    brightness  ``clip(x + d)``, ``d = 12 s / 255`` (12 s on the 0-255 scale)   12, 24, 36, 48, 60
    contrast    ``m + f (x - m)``, ``m`` each image's mean, ``f = 1 - 0.15 s``  .85, .7, .55, .4, .25
    gamma       ``x ** g``, ``g = 1 + 0.3 s`` (darkens mid-tones)               1.3 .. 2.5
    noise       ``clip(x + sigma z)``, z ~ N(0, 1) per pixel, sigma = 10 s/255  10 .. 50 (0-255)
    blur        Gaussian blur of std ``0.6 s`` pixels, radius ``int(4 sigma +    0.6 .. 3.0 px
                0.5)``, borders reflected (``scipy.ndimage.gaussian_filter``
                with ``mode="reflect"``)
    texture (the mask is unchanged; needs C = 1)
    -------------------------------------------------------------------------------------------------
    gradient    ``(1 - w) x + w r``, ``r`` the study's "gradient" rendering of   w = s / 5
                the masks (two Perlin textures, :func:`bnjax.data.render`)
    edges       the same with the "edges" rendering (the mask's Laplacian)    w = s / 5
    geometry (image and mask moved alike, nearest-neighbour, borders reflected)
    -------------------------------------------------------------------------------------------------
    zoom        zoom in about the centre by ``z = 1 + 0.1 s``                   1.1 .. 1.5
    rotation    rotate about the centre by ``9 s`` degrees (counter-clockwise)  9 .. 45 degrees
    elastic     displace every pixel by a smooth random field (Simard et al.    1.5 .. 7.5 px
                2003): uniform noise blurred with std 4 px, scaled to a
                largest displacement of ``1.5 s`` pixels per axis
    shape (new masks; images re-rendered; needs C = 1 and square images)
    -------------------------------------------------------------------------------------------------
    res         Perlin masks with ``res = 2 + s`` lattice cells (smaller         3 .. 7
                objects; the study's default is 2)
    threshold   Perlin masks ``|noise| > 0.4 - 0.05 s`` (more foreground; the    .35 .. .15
                study's default is 0.4)
    ==========  ===========================================================  ====================

Nearest-neighbour sampling keeps the intensity distribution of the pixels
(only their positions change), so a geometric shift is not also an intensity
shift, and an image equal to its mask stays equal to it. The shape shifts
re-render white-noise images from the set's own class statistics: the mean
and standard deviation of the background and of the foreground pixels, pooled
over the set, on the 0-255 scale.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _checks
from bnjax import data

__all__ = ["SHIFTS", "FAMILIES", "SEVERITIES", "apply", "level", "family_of", "relabel"]

#: The shifts by family: intensity, texture, geometry, shape.
FAMILIES: dict[str, tuple[str, ...]] = {
    "intensity": ("brightness", "contrast", "gamma", "noise", "blur"),
    "texture": ("gradient", "edges"),
    "geometry": ("zoom", "rotation", "elastic"),
    "shape": ("res", "threshold"),
}
#: Every shift name, family by family.
SHIFTS: tuple[str, ...] = tuple(s for names in FAMILIES.values() for s in names)
#: The severities; 0 leaves the set unchanged.
SEVERITIES: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
_ELASTIC_SMOOTH = 4.0


def family_of(shift: str) -> str:
  """The family (``"intensity"``, ``"texture"``, ``"geometry"``, ``"shape"``)."""
  _checks.choice("shift", shift, SHIFTS)
  return next(f for f, names in FAMILIES.items() if shift in names)


def level(shift: str, severity: int) -> float:
  """The parameter of ``shift`` at ``severity`` (see the module table)."""
  _checks.choice("shift", shift, SHIFTS)
  s = _severity(severity)
  return {"brightness": 12.0 * s / 255.0, "contrast": 1.0 - 0.15 * s, "gamma": 1.0 + 0.3 * s,
          "noise": 10.0 * s / 255.0, "blur": 0.6 * s, "gradient": s / 5.0, "edges": s / 5.0,
          "zoom": 1.0 + 0.1 * s, "rotation": 9.0 * s, "elastic": 1.5 * s,
          "res": float(2 + s), "threshold": 0.4 - 0.05 * s}[shift]


def _severity(severity) -> int:
  if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not (
      0 <= severity <= 5):
    raise ValueError(f"severity must be an integer in 0..5, got {severity!r}")
  return int(severity)


# --------------------------------------------------------------------------
# Pieces


def _reflect(index, size: int, xp=jnp):
  """Integer indices folded into [0, size) by half-sample symmetric reflection
  (..., 1, 0 | 0, 1, ..., size - 1 | size - 1, ...), as scipy's "reflect"."""
  index = xp.mod(index, 2 * size)
  return xp.where(index >= size, 2 * size - 1 - index, index)


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
  """float32[size, size] ``A`` with ``A @ v`` the 1-D Gaussian blur of ``v``
  (std ``sigma``, radius ``int(4 sigma + 0.5)``, reflected borders)."""
  radius = int(4.0 * sigma + 0.5)
  taps = np.arange(-radius, radius + 1)
  weights = np.exp(-0.5 * (taps / sigma) ** 2)
  weights /= weights.sum()
  a = np.zeros((size, size), np.float64)
  rows = np.arange(size)
  for t, w in zip(taps, weights):
    np.add.at(a, (rows, _reflect(rows + t, size, np)), w)
  return a.astype(np.float32)


def _blur(images, sigma: float):
  """Separable Gaussian blur of float[n, H, W, C] (two matrix products)."""
  ah = jnp.asarray(_blur_matrix(images.shape[1], sigma))
  aw = jnp.asarray(_blur_matrix(images.shape[2], sigma))
  return jnp.einsum("ij,njkc,lk->nilc", ah, images, aw)


def _sample(images, masks, rows, cols):
  """Nearest-neighbour gather of images and masks at float coordinates
  ``rows, cols`` (float[n, H, W]), borders reflected."""
  h, w = masks.shape[1:]
  r = _reflect(jnp.round(rows).astype(jnp.int32), h)
  c = _reflect(jnp.round(cols).astype(jnp.int32), w)
  gather = jax.vmap(lambda a, i, j: a[i, j])
  return gather(images, r, c), gather(masks, r, c)


def _grid(n, h, w):
  """Pixel coordinates relative to the centre, float[n, H, W] each."""
  rows = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) / 2.0
  cols = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) / 2.0
  return (jnp.broadcast_to(rows, (n, h, w)), jnp.broadcast_to(cols, (n, h, w)))


def _zoom(images, masks, factor: float):
  n, h, w = masks.shape
  rows, cols = _grid(n, h, w)
  return _sample(images, masks, rows / factor + (h - 1) / 2.0, cols / factor + (w - 1) / 2.0)


def _rotate(images, masks, degrees: float):
  """Counter-clockwise as displayed (row 0 at the top)."""
  n, h, w = masks.shape
  rows, cols = _grid(n, h, w)
  t = math.radians(degrees)
  # The output pixel at (row, col) shows the input at the position rotated back.
  src_r = math.cos(t) * rows + math.sin(t) * cols
  src_c = -math.sin(t) * rows + math.cos(t) * cols
  return _sample(images, masks, src_r + (h - 1) / 2.0, src_c + (w - 1) / 2.0)


def _elastic(key, images, masks, amplitude: float):
  n, h, w = masks.shape
  noise = jax.random.uniform(key, (n, h, w, 2), minval=-1.0, maxval=1.0)
  field = _blur(noise, _ELASTIC_SMOOTH)
  field = field / jnp.max(jnp.abs(field), axis=(1, 2), keepdims=True) * amplitude
  rows = jnp.arange(h, dtype=jnp.float32)[:, None] + field[..., 0]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :] + field[..., 1]
  return _sample(images, masks, rows, cols)


def _class_params(images, masks):
  """float32[4] (mu1, sigma1, mu2, sigma2) of the set on the 0-255 scale
  (a class with no pixel gets the other's)."""
  x = images[..., 0] * 255.0
  stats = []
  for sel in (~masks, masks):
    count = jnp.maximum(jnp.sum(sel), 1)
    mean = jnp.sum(jnp.where(sel, x, 0.0)) / count
    std = jnp.sqrt(jnp.sum(jnp.where(sel, (x - mean) ** 2, 0.0)) / count)
    stats.append((mean, std, jnp.sum(sel) > 0))
  (m1, s1, any1), (m2, s2, any2) = stats
  m1, s1 = jnp.where(any1, m1, m2), jnp.where(any1, s1, s2)
  m2, s2 = jnp.where(any2, m2, m1), jnp.where(any2, s2, s1)
  return jnp.stack([m1, s1, m2, s2]).astype(jnp.float32)


def _new_masks(key, n, size, res, threshold):
  """Perlin masks of ``res`` cells per side; a lattice that does not divide
  ``size`` is generated on the next multiple and cropped."""
  big = res * -(-size // res)
  noise = data.perlin_noise(key, n, big, res)[:, :size, :size]
  return jnp.abs(noise) > threshold


@functools.partial(jax.jit, static_argnums=(3, 4))
def _apply(key, images, masks, shift: str, severity: int):
  value = level(shift, severity)
  k1, k2 = jax.random.split(key)
  n = images.shape[0]
  if shift == "brightness":
    return jnp.clip(images + value, 0.0, 1.0), masks
  if shift == "contrast":
    mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
    return jnp.clip(mean + value * (images - mean), 0.0, 1.0), masks
  if shift == "gamma":
    return jnp.power(images, value), masks
  if shift == "noise":
    return jnp.clip(images + value * jax.random.normal(k1, images.shape), 0.0, 1.0), masks
  if shift == "blur":
    return jnp.clip(_blur(images, value), 0.0, 1.0), masks
  if shift in ("gradient", "edges"):
    other = data.render(k1, masks, kind=shift)
    return (1.0 - value) * images + value * other, masks
  if shift == "zoom":
    return _zoom(images, masks, value)
  if shift == "rotation":
    return _rotate(images, masks, value)
  if shift == "elastic":
    return _elastic(k1, images, masks, value)
  res, threshold = (int(value), 0.4) if shift == "res" else (2, value)
  new = _new_masks(k1, n, masks.shape[1], res, threshold)
  return data.render_white_noise(k2, new, _class_params(images, masks)), new


@jax.jit
def _relabel(key, images, masks, threshold):
  k1, k2 = jax.random.split(key)
  new = _new_masks(k1, masks.shape[0], masks.shape[1], 2, threshold[:, None, None])
  return data.render_white_noise(k2, new, _class_params(images, masks)), new


def relabel(key: jax.Array, images, masks, threshold):
  """A label shift without an appearance shift: new Perlin masks
  ``|noise| > threshold`` (:func:`bnjax.data.perlin_masks`' generator, the
  study's res = 2) and white-noise images re-rendered from the set's own
  class statistics (the mean and standard deviation of its background and
  foreground pixels on the 0-255 scale, pooled over the set), as the
  ``"threshold"`` shift does at its five levels.

  Args:
    key: PRNG key.
    images: float[n, H, W, 1] (or [n, H, W]) in [0, 1], square.
    masks: bool[n, H, W].
    threshold: in (0, 1): one for the set or float[n], one per image (0.4 is
      the study's, a foreground fraction of about 0.20; lower: more
      foreground).

  Returns:
    (float32[n, H, W, 1] in [0, 1], bool[n, H, W]).
  """
  _checks.key(key)
  images, masks = _checks.images(images, masks)
  if images.shape[-1] != 1 or masks.shape[1] != masks.shape[2]:
    raise ValueError(f"relabel renders square one-channel images; got images of shape "
                     f"{images.shape}")
  t = np.broadcast_to(np.asarray(threshold, np.float32), (images.shape[0],))
  if not np.all(np.isfinite(t)) or np.any(t <= 0) or np.any(t >= 1):
    raise ValueError(f"threshold must be in (0, 1) (one, or one per image), got {threshold!r}")
  return _relabel(key, images, masks, jnp.asarray(t))


def apply(key: jax.Array, images, masks, shift: str, severity: int):
  """``(images, masks)`` under ``shift`` at ``severity`` (0..5; 0 is the identity).

  Args:
    key: PRNG key (used by noise, texture, elastic and shape shifts).
    images: float[n, H, W, C] (or [n, H, W]) in [0, 1].
    masks: bool[n, H, W].
    shift: one of :data:`SHIFTS` (the module docstring says what each does).
    severity: an integer in 0..5.

  Returns:
    (float32[n, H, W, C] in [0, 1], bool[n, H, W]).
  """
  _checks.choice("shift", shift, SHIFTS)
  severity = _severity(severity)
  _checks.key(key)
  images, masks = _checks.images(images, masks)
  if severity == 0:
    return images, masks
  family = family_of(shift)
  if family in ("texture", "shape") and images.shape[-1] != 1:
    raise ValueError(f"shift {shift!r} renders one-channel images; got {images.shape[-1]} "
                     "channels")
  if family == "shape" and masks.shape[1] != masks.shape[2]:
    raise ValueError(f"shift {shift!r} needs square images, got {masks.shape[1]}x"
                     f"{masks.shape[2]}")
  return _apply(key, images, masks, shift, severity)
