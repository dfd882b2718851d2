"""Synthetic domains: Perlin-noise masks rendered with per-class intensities.

Everything here is a pure function of a PRNG key; generation is vectorised and
jitted over the number of images (no Python loop per image).

The generator follows the study being reproduced (see DESIGN.md):

* Masks are single-octave 2-D Perlin noise (Perlin 2002, "Improving noise":
  quintic fade 6t^5 - 15t^4 + 10t^3, random unit gradients on an integer
  lattice, the interpolated value scaled by sqrt(2)) thresholded as
  ``|noise| > threshold``. The lattice has ``res + 1`` cells of ``size / res``
  pixels and the image is cropped from it at a random integer offset in
  ``[0, size / res)`` on each axis, so that the lattice points (where Perlin
  noise is exactly zero) do not sit at fixed pixels.
* A :class:`Domain` ``(mu1, sigma1, mu2, sigma2)`` renders background pixels as
  N(mu1, sigma1) and foreground pixels as N(mu2, sigma2) on the 0-255 scale,
  clipped to [0, 255] and returned as float32 in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import zlib
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _checks

__all__ = ["Domain", "perlin_masks", "perlin_noise", "perlin_from_gradients", "render", "render_white_noise", "make_dataset", "split_key", "split_dataset", "named_key", "save_folder", "load_folder", "RenderKind", "RENDER_KINDS", "Split", "SPLITS", "LAPLACIAN", "digits", "DIGITS_LEVELS", "downsample", "nuclei", "tiles"]

#: How masks are rendered as images: ``"white_noise"`` (the domain's intensities),
#: ``"gradient"`` or ``"edges"`` (the study's textures).
RenderKind = Literal["white_noise", "gradient", "edges"]
#: The values of :data:`RenderKind`.
RENDER_KINDS: tuple[str, ...] = get_args(RenderKind)
#: The data splits a domain's images are drawn for, each from its own key.
Split = Literal["train", "eval", "adapt"]
#: The 3x3 Laplacian kernel of the ``"edges"`` rendering.
LAPLACIAN = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Domain:
  """Intensity model of a domain, on the 0-255 scale.

  Attributes:
    mu1, sigma1: mean and standard deviation of background (class 0) pixels.
    mu2, sigma2: mean and standard deviation of foreground (mask) pixels.

  Means lie in [0, 255], standard deviations are >= 0; four values that all
  lie in (0, 1] are refused as the 0-1 scale given by mistake.
  """

  mu1: float
  sigma1: float
  mu2: float
  sigma2: float

  def __post_init__(self):
    for name in ("mu1", "sigma1", "mu2", "sigma2"):
      value = getattr(self, name)
      try:
        value = float(value)
      except (TypeError, ValueError):
        raise ValueError(f"Domain.{name} must be a number, got {value!r}") from None
      if not math.isfinite(value):
        raise ValueError(f"Domain.{name} must be finite, got {value}")
      if name.startswith("mu") and not 0.0 <= value <= 255.0:
        raise ValueError(f"Domain.{name} must be in [0, 255], got {value}")
      if name.startswith("sigma") and value < 0.0:
        raise ValueError(f"Domain.{name} must be >= 0, got {value}")
      object.__setattr__(self, name, value)
    values = (self.mu1, self.sigma1, self.mu2, self.sigma2)
    if 0.0 < max(values) <= 1.0:
      scaled = ", ".join(f"{255 * v:g}" for v in values)
      raise ValueError(
          f"Domain values are on the 0-255 scale; {values} all lie in [0, 1] (the 0-1 "
          f"scale?), which renders nearly black images: multiply by 255, Domain({scaled})")

  def to_json(self) -> dict[str, float]:
    """``{"mu1": ..., "sigma1": ..., "mu2": ..., "sigma2": ...}``, as run
    directories store domains."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: Any) -> "Domain":
    """The inverse of :meth:`to_json`; also takes four numbers in order."""
    if isinstance(value, dict):
      names = [f.name for f in dataclasses.fields(cls)]
      if sorted(value) != sorted(names):
        raise ValueError(f"a domain needs exactly the keys {names}, got {sorted(value)}")
      return cls(**value)
    values = list(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != 4:
      raise ValueError(f"a domain is a dict {{mu1, sigma1, mu2, sigma2}} or four numbers, "
                       f"got {value!r}")
    return cls(*values)

  @classmethod
  def parse(cls, text: str) -> "Domain":
    """Parses ``"mu1,sigma1,mu2,sigma2"`` (as given on a command line)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 4:
      raise ValueError(
          f"a domain is four numbers 'mu1,sigma1,mu2,sigma2', got {text!r}")
    try:
      values = [float(p) for p in parts]
    except ValueError:
      raise ValueError(f"a domain is four numbers, got {text!r}") from None
    return cls(*values)

  def as_array(self) -> jax.Array:
    """float32[4] ``(mu1, sigma1, mu2, sigma2)``, for vectorised rendering."""
    return jnp.asarray([self.mu1, self.sigma1, self.mu2, self.sigma2], jnp.float32)

  def __str__(self) -> str:
    return f"({self.mu1:g},{self.sigma1:g},{self.mu2:g},{self.sigma2:g})"


def _check_lattice(size: int, res: int) -> None:
  _checks.positive_int("size", size)
  _checks.positive_int("res", res)
  if size % res:
    raise ValueError(
        f"size ({size}) must be a multiple of res ({res}): the lattice cells "
        "are size / res pixels wide")


def _fade(t):
  return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_from_gradients(angles: jax.Array, offsets: jax.Array, size: int,
                          res: int) -> jax.Array:
  """Perlin noise of one image from its lattice gradients and crop offset.

  Args:
    angles: float[res + 2, res + 2], gradient angles at the lattice points.
    offsets: int[2], crop offset (rows, columns) in pixels, in [0, size / res).
    size: image side in pixels.
    res: number of lattice cells across the image.

  Returns:
    float32[size, size]: sqrt(2) times the interpolated noise, in about [-1, 1].
  """
  cell = size // res
  coords = (jnp.arange(size)[None, :] + offsets[:, None]) / cell  # [2, size]
  t = coords[:, :, None] - jnp.arange(angles.shape[-1])  # [2, size, L]: offset from lattice point
  # Interpolation weight of lattice point a for coordinate y: 1 - fade(|y - a|)
  # within one cell, else 0 (fade(1 - s) = 1 - fade(s) makes this the usual
  # fade-weighted blend of the two nearest points). The noise is then
  # separable: sum_ab (g0[a, b] (y - a) + g1[a, b] (x - b)) w(y - a) w(x - b).
  w = jnp.where(jnp.abs(t) < 1, 1 - _fade(jnp.abs(t)), 0.0)
  wy, wx, uy, ux = w[0], w[1], t[0] * w[0], t[1] * w[1]
  a = uy @ jnp.cos(angles)  # [size, L]
  b = wy @ jnp.sin(angles)
  # The outer contraction over the few lattice columns, unrolled into
  # elementwise products: XLA:CPU fuses them into one pass over the pixels,
  # where a batched [size, L] x [L, size] product was 10x slower.
  noise = sum(a[:, None, j] * wx[None, :, j] + b[:, None, j] * ux[None, :, j]
              for j in range(angles.shape[-1]))
  return (math.sqrt(2.0) * noise).astype(jnp.float32)


def _perlin_inputs(key, n, size, res):
  k_angle, k_off = jax.random.split(key)
  angles = jax.random.uniform(k_angle, (n, res + 2, res + 2),
                              maxval=2 * math.pi)
  offsets = jax.random.randint(k_off, (n, 2), 0, size // res)
  return angles, offsets


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _perlin_noise(key, n, size, res):
  angles, offsets = _perlin_inputs(key, n, size, res)
  return jax.vmap(perlin_from_gradients, in_axes=(0, 0, None, None))(
      angles, offsets, size, res)


def perlin_noise(key: jax.Array, n: int, size: int = 64, res: int = 2) -> jax.Array:
  """``n`` independent single-octave Perlin noise images, float32[n, size, size].

  See the module docstring for the algorithm; values lie in about [-1, 1].
  """
  return _perlin_noise(*_perlin_args(key, n, size, res))


def _perlin_args(key, n, size, res):
  """Checked (key, n, size, res) of the Perlin generators, as static ints."""
  _checks.key(key)
  _checks.positive_int("n", n)
  _check_lattice(size, res)
  return key, int(n), int(size), int(res)


def perlin_masks(key: jax.Array, n: int, size: int = 64, res: int = 2,
                 threshold: float = 0.4) -> jax.Array:
  """``n`` binary masks ``|perlin noise| > threshold``, bool[n, size, size].

  With the defaults the mean foreground fraction is about 0.20, as in the
  study's generator.
  """
  threshold = float(threshold)
  if not 0.0 <= threshold < 1.5:
    raise ValueError(f"threshold must be in [0, 1.5), got {threshold}")
  return _perlin_masks(*_perlin_args(key, n, size, res), jnp.float32(threshold))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _perlin_masks(key, n, size, res, threshold):
  return jnp.abs(_perlin_noise(key, n, size, res)) > threshold


@functools.partial(jax.jit, static_argnames=("quantize",))
def render_white_noise(key: jax.Array, masks: jax.Array, params: jax.Array,
                       quantize: bool = False) -> jax.Array:
  """White-noise rendering from a float[4] ``(mu1, sigma1, mu2, sigma2)``.

  The array form of :func:`render` (``kind="white_noise"``), jittable and
  vmappable over ``params`` and keys.
  """
  mu1, s1, mu2, s2 = params[0], params[1], params[2], params[3]
  z = jax.random.normal(key, masks.shape, jnp.float32)
  pixels = jnp.where(masks, mu2 + s2 * z, mu1 + s1 * z)
  return _to_unit(pixels, quantize)


def _to_unit(pixels, quantize):
  pixels = jnp.clip(pixels, 0.0, 255.0)
  if quantize:  # the original cast to uint8, which truncates toward zero
    pixels = jnp.floor(pixels)
  return (pixels * (1.0 / 255.0))[..., None].astype(jnp.float32)


def _render_edges(masks):
  x = masks.astype(jnp.float32)[:, None]  # [n, 1, H, W]
  kernel = jnp.asarray(LAPLACIAN)[None, None]
  lap = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME")[:, 0]
  return (lap + 8.0) * 16.0


def _check_masks(masks) -> jax.Array:
  masks = jnp.asarray(masks)
  if masks.ndim != 3 or masks.shape[0] == 0:
    raise ValueError(
        f"masks must be a non-empty bool[n, H, W] array, got shape {masks.shape}")
  return _checks.mask_array(masks)


def render(key: jax.Array, masks: jax.Array, domain: Domain | None = None,
           kind: RenderKind = "white_noise", quantize: bool = False,
           texture_res: int = 2) -> jax.Array:
  """Renders masks as images, float32[n, size, size, 1] in [0, 1].

  Args:
    key: PRNG key.
    masks: bool[n, H, W].
    domain: the class intensities; required for ``"white_noise"``. The study's
      ``"gradient"`` and ``"edges"`` renderers do not use intensities.
    kind: ``"white_noise"`` (background ~ N(mu1, sigma1), mask ~ N(mu2,
      sigma2)); ``"gradient"`` (two independent Perlin textures
      128 + 128 clip(p, -1, 1), one per class); ``"edges"`` (the mask convolved
      with the 3x3 Laplacian, (x + 8) * 16).
    quantize: truncate to integers before scaling to [0, 1], as the original
      uint8 storage did (default False: keep float precision).
    texture_res: lattice cells across the image for the ``"gradient"``
      textures.
  """
  _checks.key(key)
  masks = _check_masks(masks)
  if kind == "white_noise":
    if not isinstance(domain, Domain):
      raise ValueError(f"kind='white_noise' needs a Domain, got {domain!r}")
    return render_white_noise(key, masks, domain.as_array(), quantize=bool(quantize))
  if kind == "gradient":
    n, h, w = masks.shape
    if h != w:
      raise ValueError(f"kind='gradient' needs square masks, got {h}x{w}")
    k1, k2 = jax.random.split(key)
    tex = [128.0 + 128.0 * jnp.clip(perlin_noise(k, n, h, texture_res), -1, 1)
           for k in (k1, k2)]
    return _to_unit(jnp.where(masks, tex[1], tex[0]), quantize)
  if kind == "edges":
    return _to_unit(_render_edges(masks), quantize)
  raise ValueError(f"kind must be one of {RENDER_KINDS}, got {kind!r}")


#: The values of :data:`Split`.
SPLITS: tuple[str, ...] = get_args(Split)


def split_key(seed: int, domain: Domain, split: Split) -> jax.Array:
  """The key of one split of one domain in an experiment with this seed.

  Depends only on the domain's values (not on its position in a list), so a
  domain gets the same images in every experiment and grid that uses it.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  digest = hashlib.sha256(repr(dataclasses.astuple(domain)).encode()).digest()
  key = jax.random.fold_in(jax.random.key(seed), int.from_bytes(digest[:4], "little") >> 1)
  return jax.random.fold_in(key, SPLITS.index(split))


def split_dataset(seed: int, domain: Domain, split: Split, n: int, size: int = 64,
                  **kwargs) -> tuple[jax.Array, jax.Array]:
  """``make_dataset(split_key(seed, domain, split), domain, n, size, **kwargs)``:
  the images and masks of one split of one domain in an experiment with this
  seed (the same images wherever the domain appears)."""
  return make_dataset(split_key(seed, domain, split), domain, n, size, **kwargs)


def named_key(seed: int, *names) -> jax.Array:
  """A key of ``seed`` and a path of names (``named_key(0, "brightness", 5,
  "eval")``): each name folded in by its CRC32, so the key depends on the
  names and not on where they stand in a list."""
  key = jax.random.key(seed)
  for name in names:
    key = jax.random.fold_in(key, zlib.crc32(str(name).encode()) >> 1)
  return key


def make_dataset(key: jax.Array, domain: Domain, n: int, size: int = 64,
                 kind: RenderKind = "white_noise", res: int = 2,
                 threshold: float = 0.4, quantize: bool = False):
  """``n`` images and masks of a domain: (float32[n, size, size, 1], bool[n, size, size]).

  Args:
    key: PRNG key; the same key gives the same set (split into a mask key and
      a rendering key).
    domain: the class intensities (:class:`Domain`, 0-255 scale).
    n: number of images, >= 1.
    size: image side in pixels; a multiple of ``res``.
    kind: the renderer (:func:`render`): ``"white_noise"`` (the study's
      default: background ~ N(mu1, sigma1), mask ~ N(mu2, sigma2)),
      ``"gradient"`` or ``"edges"`` (these two ignore the intensities).
    res: Perlin lattice cells across the image (:func:`perlin_masks`); larger
      values give smaller, more numerous foreground blobs (2: the study's).
    threshold: the mask is ``|noise| > threshold``, in [0, 1.5); a higher
      threshold gives less foreground (0.4: the study's, about 20 %).
    quantize: truncate pixels to integers before scaling, as the original
      uint8 storage did.

  Returns:
    The pair ``(images, masks)``: images float32 in [0, 1] (clipped at 0 and 255, then
    divided by 255), masks bool.
  """
  _checks.key(key)
  k_mask, k_render = jax.random.split(key)
  masks = perlin_masks(k_mask, n, size, res, threshold)
  return render(k_render, masks, domain, kind, quantize), masks


# --------------------------------------------------------------------------
# PNG folders


def save_folder(directory: str | os.PathLike, images, masks) -> tuple[str, str]:
  """Writes ``images/NNNNNN.png`` (8-bit grey) and ``masks/NNNNNN.png`` (0/255).

  Images are rounded to 8 bits. Returns the two folder paths.
  """
  from PIL import Image

  images, masks = _checks.images(images, masks)
  images_dir = os.path.join(os.fspath(directory), "images")
  masks_dir = os.path.join(os.fspath(directory), "masks")
  os.makedirs(images_dir, exist_ok=True)
  os.makedirs(masks_dir, exist_ok=True)
  pixels = np.rint(np.asarray(images)[..., 0] * 255.0).astype(np.uint8)
  mask_pixels = np.asarray(masks).astype(np.uint8) * 255
  width = max(6, len(str(len(pixels) - 1)))
  for i, (img, msk) in enumerate(zip(pixels, mask_pixels)):
    name = f"{i:0{width}d}.png"
    Image.fromarray(img, mode="L").save(os.path.join(images_dir, name))
    Image.fromarray(msk, mode="L").save(os.path.join(masks_dir, name))
  return images_dir, masks_dir


def _image_files(directory: str, what: str) -> dict[str, str]:
  if not os.path.isdir(directory):
    raise ValueError(f"{what} folder {directory!r} does not exist")
  files = {}
  for name in sorted(os.listdir(directory)):
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in _IMAGE_SUFFIXES:
      files[stem] = os.path.join(directory, name)
  if not files:
    raise ValueError(
        f"{what} folder {directory!r} holds no image files {_IMAGE_SUFFIXES}")
  return files


def _read_grey(path: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("L"))
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read image file {path!r}: {e}") from None


def load_folder(images_dir: str | os.PathLike, masks_dir: str | os.PathLike):
  """Reads a domain from PNG (or JPEG/BMP/TIFF) folders.

  Images are converted to grey and scaled to [0, 1]; a mask pixel is
  foreground when it is non-zero. Images and masks are paired by file name
  without extension; every image needs a mask of the same size.

  Returns:
    (float32[n, H, W, 1], bool[n, H, W]), in file-name order.
  """
  images = _image_files(os.fspath(images_dir), "images")
  masks = _image_files(os.fspath(masks_dir), "masks")
  missing = [s for s in images if s not in masks]
  if missing:
    raise ValueError(
        f"{len(missing)} image(s) have no mask in {os.fspath(masks_dir)!r}, "
        f"e.g. {missing[:3]}")
  out_images, out_masks, shape = [], [], None
  for stem, path in images.items():
    img = _read_grey(path)
    msk = _read_grey(masks[stem])
    if shape is None:
      shape = img.shape
    if img.shape != shape:
      raise ValueError(
          f"image {path!r} is {img.shape[0]}x{img.shape[1]}, the others "
          f"{shape[0]}x{shape[1]}: all images must have one size")
    if msk.shape != img.shape:
      raise ValueError(
          f"mask {masks[stem]!r} is {msk.shape[0]}x{msk.shape[1]} but its "
          f"image is {img.shape[0]}x{img.shape[1]}")
    out_images.append(img)
    out_masks.append(msk > 0)
  images_arr = (np.stack(out_images).astype(np.float32) / 255.0)[..., None]
  return images_arr, np.stack(out_masks)


#: Grey levels of scikit-learn's bundled digits (pixel values 0..16).
DIGITS_LEVELS = 17


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled handwritten digits (UCI optical recognition set,
  1 797 images of 8x8 pixels with values 0..16, labels 0..9; shipped inside
  the package, nothing downloaded), in file order.

  Returns:
    (float32[1797, 8, 8, 1] with values ``k / 16`` in [0, 1], int32[1797] labels).

  Raises:
    ImportError: scikit-learn is not installed (``pip install 'bnjax[generative]'``).
  """
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise ImportError("bnjax.data.digits needs scikit-learn, an optional dependency: "
                      "pip install 'bnjax[generative]'") from e
  bunch = load_digits()
  images = (np.asarray(bunch.images, np.float32) / (DIGITS_LEVELS - 1))[..., None]
  return images, np.asarray(bunch.target, np.int32)


def downsample(images, factor: int) -> np.ndarray:
  """Mean of each ``factor x factor`` block: float32[n, H/factor, W/factor, C]."""
  images = np.asarray(_checks.images(images, image_range=None))
  factor = _checks.positive_int("factor", factor)
  n, h, w, c = images.shape
  if h % factor or w % factor:
    raise ValueError(f"factor must divide the image size {h}x{w}, got {factor}")
  return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


# The real image set: stardist's 2-D nuclei test image and its label image.
_NUCLEI_FILES = ("img2d.tif", "mask2d.tif")


def _nuclei_folder() -> str:
  """The installed stardist package's ``data/images`` folder, found without
  importing the package (its code, and TensorFlow's, is never run)."""
  import importlib.util

  spec = importlib.util.find_spec("stardist")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("bnjax.data.nuclei reads the image shipped inside the stardist package, "
                      "an optional dependency: pip install 'bnjax[nuclei]' (or pass folder=)")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", "images")


def _read_raw(path: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as img:
      return np.asarray(img)
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read image file {path!r}: {e}") from None


def nuclei(folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A real image with a natural label drift: the 2-D nuclei test image that
  ships inside the stardist package (a fluorescence-microscopy image of the
  2018 Data Science Bowl, Caicedo et al. 2019: 512x512, 183 labelled nuclei,
  about 20 % foreground; tiles of it range from none to three quarters).

  The two files (``img2d.tif``, 8-bit values stored as 16-bit, and
  ``mask2d.tif``, one integer label per nucleus) are read with Pillow from
  the installed package's ``data/images`` folder; stardist itself is never
  imported.

  Args:
    folder: a folder holding ``img2d.tif`` and ``mask2d.tif`` (default: the
      installed stardist package's).

  Returns:
    (float32[512, 512] in [0, 1] (the values / 255), bool[512, 512]: the
    nuclei, every label > 0).

  Raises:
    ImportError: stardist is not installed and no folder is given
      (``pip install 'bnjax[nuclei]'``).
    ValueError: a file is missing or unreadable, the two differ in shape, or
      the image's values leave 0..255.
  """
  folder = _nuclei_folder() if folder is None else os.fspath(folder)
  paths = [os.path.join(folder, f) for f in _NUCLEI_FILES]
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"folder {folder!r} holds no {os.path.basename(path)} (the nuclei image "
                       f"set is {_NUCLEI_FILES})")
  image, labels = (_read_raw(p) for p in paths)
  if image.ndim != 2 or image.shape != labels.shape:
    raise ValueError(f"the nuclei image and its labels must be two 2-D arrays of one shape, got "
                     f"{image.shape} and {labels.shape}")
  if image.min() < 0 or image.max() > 255:
    raise ValueError(f"the nuclei image's values must lie in 0..255 (8-bit), got "
                     f"{image.min()}..{image.max()}")
  return image.astype(np.float32) / 255.0, labels > 0


def tiles(image, mask, size: int, stride: int | None = None, rows=None):
  """Square tiles of one large image and its mask, in raster order.

  Args:
    image: float[H, W] or [H, W, C].
    mask: bool[H, W].
    size: the tiles' side, in 1..min(H, W) (of the rows kept).
    stride: pixels between tiles' corners (default ``size``: no overlap).
    rows: ``(start, stop)``, the image rows tiles are cut from (default: all),
      so that two calls on disjoint rows give tiles that share no pixel.

  Returns:
    (float32[n, size, size, C], bool[n, size, size], int[n, 2] each tile's
    top-left (row, column) in the whole image).
  """
  image = np.asarray(image, np.float32)
  image = image[..., None] if image.ndim == 2 else image
  mask = np.asarray(mask)
  if image.ndim != 3 or mask.shape != image.shape[:2]:
    raise ValueError(f"image must be [H, W] or [H, W, C] and mask [H, W] of the same H, W; got "
                     f"{image.shape} and {mask.shape}")
  h = image.shape[0]
  start, stop = (0, h) if rows is None else (int(rows[0]), int(rows[1]))
  if not 0 <= start < stop <= h:
    raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= {h}, got {rows!r}")
  size = _checks.positive_int("size", size)
  if size > min(stop - start, image.shape[1]):
    raise ValueError(f"size must be in 1..{min(stop - start, image.shape[1])} (the rows' "
                     f"height and the image's width), got {size}")
  stride = size if stride is None else _checks.positive_int("stride", stride)
  tops = np.arange(start, stop - size + 1, stride)
  lefts = np.arange(0, image.shape[1] - size + 1, stride)
  corners = np.array([(r, c) for r in tops for c in lefts], np.int64)
  out_x = np.stack([image[r:r + size, c:c + size] for r, c in corners])
  out_y = np.stack([mask[r:r + size, c:c + size] for r, c in corners]).astype(bool)
  return out_x, out_y, corners
