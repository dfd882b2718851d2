"""Checks of arguments and inputs, in one place (private).

Every public function validates what it is given here, so that bad input is a
``ValueError`` naming the argument and what is allowed, raised where the
mistake was made and not as a NaN or a shape error three functions later.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Float images on the U-Net path must lie in [0, 1] up to this much.
RANGE_TOLERANCE = 1e-2
UNIT_RANGE = (0.0, 1.0)


class _Undeclared:
  """The range of a model that declares none (``image_range="auto"`` on a
  class without ``IMAGE_RANGE``): inputs of any kind, but image-shaped
  inputs on the 8-bit scale are refused (:func:`eight_bit_images`)."""

  def __repr__(self):
    return "UNDECLARED"


UNDECLARED = _Undeclared()
# The values of 8-bit images converted to float without rescaling: nothing
# below 0, a maximum above this and at most 255.
_EIGHT_BIT_ABOVE = 2.0
_EIGHT_BIT_HIGH = 255.0
# What a caller passes when the model does take that scale.
_DECLARE = ("if the model takes this scale, say so: image_range=(0, 255) (or None: any values, "
            "unchecked), or IMAGE_RANGE = (0, 255) on the model's class")


def is_traced(tree) -> bool:
  return any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(tree))


def key(value) -> None:
  if not isinstance(value, jax.Array) or not (
      jnp.issubdtype(value.dtype, jax.dtypes.prng_key)
      or (value.dtype == jnp.uint32 and value.shape[-1:] == (2,))):
    raise ValueError(
        "key must be a JAX PRNG key (jax.random.key(seed) or "
        f"jax.random.PRNGKey(seed)), got {type(value).__name__}")


def positive_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
  return int(value)


def _finite_real(value) -> bool:
  """A finite real number (int, float or their NumPy scalars; not a bool)."""
  return (not isinstance(value, bool)
          and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value))


def number(name: str, value, minimum: float = 0.0, what: str = "") -> float:
  """``value`` as a float when it is a finite real number >= ``minimum``
  (booleans refused); ``what`` adds a word on its meaning to the error."""
  if not _finite_real(value) or value < minimum:
    raise ValueError(f"{name} must be a number >= {minimum:g} (finite){what}, got {value!r}")
  return float(value)


def positive_number(name: str, value, what: str = "") -> float:
  """``value`` as a float when it is a finite real number > 0 (booleans
  refused): one rule and one message for every wrong value (negative, 0, NaN,
  not a number)."""
  if not _finite_real(value) or value <= 0:
    raise ValueError(f"{name} must be a finite number > 0{what}, got {value!r}")
  return float(value)


def unit_interval(name: str, value) -> float:
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")
  return value


def choice(name: str, value, allowed: Sequence[Any]):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
  return value


# --------------------------------------------------------------------------
# Images and masks of the U-Net path


def model_axis(variables, size: int, name: str = "variables") -> None:
  """Every leaf of stacked ``variables`` has the leading (model) axis ``size``."""
  leads = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None
           for leaf in jax.tree_util.tree_leaves(variables)}
  if leads != {size}:
    raise ValueError(f"{name} must carry a leading model axis of size {size} (one model per "
                     f"image set), got leaves with leading sizes "
                     f"{sorted(leads, key=lambda v: -1 if v is None else v)}")


# What the range error suggests for another scale: the option of the entry
# points that have ``image_range``; others pass what their user can do.
OTHER_SCALE = "pass image_range=None to use another scale"


def _image_values(images, name: str, image_range, other_scale: str = OTHER_SCALE) -> None:
  """Integer images are refused; float images outside ``image_range`` (with a
  small tolerance) too, unless ``image_range`` is None (any values) or
  :data:`UNDECLARED` (any but 8-bit values). Only concrete values
  are checked. ``other_scale``: the error's last words, what the caller can
  do about another scale."""
  if not jnp.issubdtype(images.dtype, jnp.floating):
    if jnp.issubdtype(images.dtype, jnp.integer) or images.dtype == jnp.bool_:
      raise ValueError(
          f"{name} are {images.dtype} (integers); convert them to float in [0, 1] "
          f"first, e.g. {name}.astype(np.float32) / 255 for 8-bit images")
    raise ValueError(f"{name} must be a float array, got dtype {images.dtype}")
  if is_traced(images):
    return
  if not bool(jnp.all(jnp.isfinite(images))):
    raise ValueError(f"{name} contain NaN or infinite pixels")
  if image_range is None:
    return
  if image_range is UNDECLARED:
    _not_eight_bit(images, name)
    return
  lo, hi = (float(v) for v in image_range)
  seen_lo, seen_hi = float(jnp.min(images)), float(jnp.max(images))
  if seen_lo < lo - RANGE_TOLERANCE or seen_hi > hi + RANGE_TOLERANCE:
    hint = (" (they look like 0-255 values: divide by 255)" if seen_hi > 2.0 and seen_lo >= 0
            else "")
    raise ValueError(
        f"{name} must lie in [{lo:g}, {hi:g}]"
        f"{' (image_range)' if other_scale == OTHER_SCALE else ''}, got values in "
        f"[{seen_lo:.4g}, {seen_hi:.4g}]{hint}; {other_scale}")


# A rank-3 array whose last axis is at most this long is taken for one image
# [H, W, C], not for n images [n, H, W] of that width.
_MAX_CHANNELS = 4


def looks_like_images(shape, lead: int) -> bool:
  """Whether an input of ``shape`` is a set of images ``[..., n, H, W, C]``
  (``lead`` leading axes, then rank 3 with at most 4 channels)."""
  return len(shape) == lead + 3 and 0 < shape[-1] <= _MAX_CHANNELS


def eight_bit_images(arrays, lead: int, name: str) -> None:
  """The one rule for models that declare no image range: an image-shaped
  input (:func:`looks_like_images`) of an integer dtype, or of floats that
  look like 8-bit values (none below 0, the largest in (2, 255]), is
  refused; every other input passes. Only concrete values are checked."""
  for i, a in enumerate(arrays):
    if looks_like_images(np.shape(a), lead):
      _not_eight_bit(jnp.asarray(a), name if len(arrays) == 1 else f"{name}[{i}]")


def _not_eight_bit(a, which: str) -> None:
  if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
    raise ValueError(
        f"{which} are images of {a.dtype} (integers), and the model declares no image range: "
        f"convert them to float in [0, 1] first, e.g. {which}.astype(np.float32) / 255; "
        f"{_DECLARE}")
  if is_traced(a) or not jnp.issubdtype(a.dtype, jnp.floating) or not a.size:
    return
  lo, hi = float(jnp.min(a)), float(jnp.max(a))
  if lo >= 0 and _EIGHT_BIT_ABOVE < hi <= _EIGHT_BIT_HIGH * (1 + 1e-6):
    raise ValueError(
        f"{which} look like 8-bit images (values in [{lo:.4g}, {hi:.4g}]) and the model "
        f"declares no image range: divide by 255 for [0, 1]; {_DECLARE}")


def _one_array(values, name: str, want: str):
  """``values`` as one array: a tuple is refused (it is what several model
  inputs, or images and masks, look like); a list of equal-shape arrays is
  stacked, as ``np.stack`` would."""
  if isinstance(values, tuple):
    raise ValueError(
        f"{name} must be one {want}, got a tuple of {len(values)}; pass the images "
        "alone (never their masks), or np.stack a sequence of images into one array")
  if isinstance(values, list) and values and all(hasattr(v, "shape") for v in values):
    shapes = sorted({tuple(np.shape(v)) for v in values})
    if len(shapes) != 1:
      raise ValueError(f"{name} is a list of arrays of different shapes {shapes}: stack "
                       f"images of one shape into one array {want}")
  return jnp.asarray(values)


def images(images, masks=None, *, name: str = "images", image_range=UNIT_RANGE,
           stacked: bool = False, other_scale: str = OTHER_SCALE):
  """Validates ``float[n, H, W, C]`` images (``[n, H, W]`` gets a channel),
  or with ``stacked`` a ``float[K, n, H, W, C]`` stack, and optional masks of
  the same ``n, H, W``. Returns float32 images and bool masks (jax arrays).

  A list of equal-shape arrays is stacked; a tuple is refused (images and
  masks passed together look like that); one image ``[H, W, C]`` (a rank-3
  array whose last axis has at most 4 entries) is refused with the hint to
  pass ``images[None]``."""
  rank = 5 if stacked else 4
  want = "float[K, n, H, W, C] stack" if stacked else "float[n, H, W, C] (or [n, H, W]) array"
  images = _one_array(images, name, want)
  if not stacked and images.ndim == 3 and images.shape[-1] <= _MAX_CHANNELS:
    raise ValueError(
        f"{name} must be a set of images, one {want}; shape {images.shape} looks like one image "
        f"[H, W, C]: pass {name}[None] for a set of one")
  if images.ndim == rank - 1:
    images = images[..., None]
  if images.ndim != rank or 0 in images.shape[:rank - 3]:
    raise ValueError(f"{name} must be a non-empty {want}, got shape {images.shape}")
  _image_values(images, name, image_range, other_scale)
  images = images.astype(jnp.float32)
  if masks is None:
    return images
  masks = jnp.asarray(masks)
  if masks.shape != images.shape[:rank - 1]:
    raise ValueError(
        f"masks must have shape {images.shape[:rank - 1]} (the leading axes of {name}), "
        f"got {masks.shape}")
  return images, mask_array(masks, "masks")


def mask_array(masks, name: str = "masks") -> jax.Array:
  """Boolean masks, or integers in {0, 1}, as bool; floats are refused (a
  probability map would count every nonzero pixel as foreground)."""
  masks = jnp.asarray(masks)
  if masks.dtype == jnp.bool_:
    return masks
  if not jnp.issubdtype(masks.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be boolean (or integers in {{0, 1}}), got {masks.dtype}; "
        f"threshold scores first, e.g. {name} > 0.5")
  if not is_traced(masks) and masks.size and not bool(jnp.all((masks == 0) | (masks == 1))):
    raise ValueError(f"{name} are integers but not all in {{0, 1}}: got values in "
                     f"[{int(jnp.min(masks))}, {int(jnp.max(masks))}]")
  return masks.astype(bool)


def image_range_of(model, image_range):
  """The range a model's inputs are checked against: ``image_range``, or with
  ``"auto"`` the range the model's class declares as ``IMAGE_RANGE`` (bnjax's
  U-Net: [0, 1]), :data:`UNDECLARED` (inputs of any kind, but no 8-bit
  images: :func:`eight_bit_images`) for models that declare none."""
  if isinstance(image_range, str):
    if image_range != "auto":
      raise ValueError(f"image_range must be 'auto', None or (low, high), got {image_range!r}")
    declared = getattr(type(model), "IMAGE_RANGE", None)
    return UNDECLARED if declared is None else declared
  if image_range is not None and (isinstance(image_range, _Undeclared)
                                  or len(tuple(image_range)) != 2
                                  or not float(image_range[0]) < float(image_range[1])):
    raise ValueError(f"image_range must be 'auto', None or (low, high) with low < high, got "
                     f"{image_range!r}")
  return image_range


def is_range(image_range) -> bool:
  """Whether ``image_range`` (from :func:`image_range_of`) is a ``(low, high)``
  range: the model takes one set of images, checked as :func:`images` does."""
  return image_range is not None and image_range is not UNDECLARED


def inputs(values, lead: int = 1, name: str = "inputs", image_range=None) -> tuple:
  """``values`` (an array or a tuple of arrays) as a tuple of arrays sharing
  their ``lead`` leading axes, none of them empty, without NaN or infinite
  values (checked only where the values are concrete). For models of any
  kind: integer inputs (token ids) are allowed, a list is a tuple of inputs.

  With ``image_range`` (a model of images, :func:`image_range_of`) the inputs
  are one set of images checked as every image entry point checks them
  (:func:`images`: float, in range, a channel added to ``[n, H, W]``, one
  image or a tuple refused); with :data:`UNDECLARED` image-shaped inputs
  must not be 8-bit images (:func:`eight_bit_images`)."""
  if is_range(image_range):
    return (images(values, name=name, image_range=image_range, stacked=lead == 2),)
  arrays = tuple(values) if isinstance(values, (tuple, list)) else (values,)
  if not arrays:
    raise ValueError(f"{name} must be an array or a non-empty tuple of arrays")
  arrays = tuple(jnp.asarray(a) for a in arrays)
  want = "[P, n, ...]" if lead == 2 else "[n, ...]"
  shapes = [a.shape for a in arrays]
  if any(a.ndim < lead for a in arrays) or len({s[:lead] for s in shapes}) != 1:
    raise ValueError(f"{name} must be arrays {want} sharing their leading "
                     f"ax{'es' if lead > 1 else 'is'}, got shapes {shapes}")
  if 0 in shapes[0][:lead]:
    raise ValueError(f"{name} must be a non-empty set {want}, got shapes {shapes}")
  for i, a in enumerate(arrays):
    if (not isinstance(a, jax.core.Tracer) and jnp.issubdtype(a.dtype, jnp.inexact)
        and not bool(jnp.all(jnp.isfinite(a)))):
      which = name if len(arrays) == 1 else f"{name}[{i}]"
      raise ValueError(f"{which} contain NaN or infinite values")
  if image_range is UNDECLARED:
    eight_bit_images(arrays, lead, name)
  return arrays
