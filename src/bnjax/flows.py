"""Normalising flows with BatchNorm: RealNVP (Dinh et al., ICLR 2017,
:cite:`dinh2017realnvp`) on small grey images, a BatchNorm bijector whose
statistics live in ``batch_stats`` and ActNorm (Glow, Kingma & Dhariwal,
NeurIPS 2018, :cite:`kingma2018glow`) as its data-initialised alternative.

Every bijector is a linen module called as ``layer(x, train=False,
inverse=False) -> (y, log_det)``: ``log_det[n]`` is ``log |det dy/dx|`` of
each example's map (forward), or of the inverse map (``inverse=True``,
``log |det dx/dy|``), summed over the example's elements.

:class:`BatchNormBijector` in training mode normalises with the batch's mean
and biased variance and moves its running statistics as PyTorch does
(``running = momentum * running + (1 - momentum) * batch`` in Flax's
convention, ``momentum=0.9`` being PyTorch's 0.1; the running variance takes
the *unbiased* batch variance, as PyTorch's). Its training-mode log-determinant
is the Jacobian of each example's map **with the batch statistics held fixed**:
``positions * sum_c (log gamma_c - log(var_B,c + eps) / 2)``, the same for every
example of the batch (RealNVP's, Dinh et al., sec. 3.7). It is not the Jacobian
of the whole batch's map, in which the statistics depend on every example.
In evaluation mode it normalises with the stored statistics (an elementwise
affine map; forward and inverse are exact inverses), so
:func:`bnjax.adapt.recompute_batch_stats` replaces them like any other
BatchNorm layer's: the flow's ``__call__`` is :meth:`RealNVP.forward`.

Pixels in [0, 1] are pre-processed as RealNVP's: ``y = logit(alpha + (1 - 2
alpha) x)``, and that map's log-determinant is counted in ``forward`` and
``log_prob``, so that :meth:`RealNVP.log_prob` is the log-density of ``x``
itself (positive for a good model of pixels in [0, 1]). Discrete pixels are
dequantised first (:func:`dequantize`, uniform noise, Theis et al., ICLR 2016,
:cite:`theis2016note`); :func:`bits_per_dim` turns the density of the
dequantised images into bits per dimension of the discrete ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import _checks
from bnjax import _fitting
from bnjax import _modules as _m
from bnjax import adapt
from bnjax import compiler

__all__ = ["MaskKind", "MASKS", "Norm", "NORMS", "NormAxes", "NORM_AXES", "checkerboard_mask",
           "channel_mask", "squeeze", "unsqueeze", "Logit", "Squeeze", "AffineCoupling", "BatchNormBijector", "ActNorm",
           "RealNVP", "standard_normal_log_prob", "dequantize", "bits_per_dim", "FlowConfig",
           "fit", "inpaint", "variance_ratios"]

#: How a coupling layer splits its input: a spatial checkerboard or the channels' halves.
MaskKind = Literal["checkerboard", "channel"]
#: The values of :data:`MaskKind`.
MASKS: tuple[str, ...] = get_args(MaskKind)
#: The normalising bijector after each coupling layer.
Norm = Literal["batch", "actnorm", "none"]
#: The values of :data:`Norm`.
NORMS: tuple[str, ...] = get_args(Norm)
#: What the normalising bijectors keep one statistic for: a channel or an element.
NormAxes = Literal["channel", "dimension"]
#: The values of :data:`NormAxes`.
NORM_AXES: tuple[str, ...] = get_args(NormAxes)

_LOG_2PI = math.log(2 * math.pi)


def _per_example(v):
  """Sum over every axis but the first."""
  return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def _feature_axes(x, axis) -> tuple[int, ...]:
  axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  return tuple(sorted({int(a) % x.ndim for a in axes}))


def _feature_layout(x, axis):
  """(the feature shape, the axes reduced over, the shape a per-feature array
  broadcasts as) for ``axis`` one axis or a tuple of them (``(1, 2, 3)`` on
  NHWC: every element of an example its own feature)."""
  axes = _feature_axes(x, axis)
  shape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
  return (tuple(x.shape[i] for i in axes), tuple(i for i in range(x.ndim) if i not in axes),
          shape)


def _positions(x, axis=-1) -> int:
  """Elements of one example per feature (e.g. H * W for NHWC, feature axis
  last; 1 when every element is a feature)."""
  return math.prod(x.shape[1:]) // math.prod(x.shape[i] for i in _feature_axes(x, axis))


# --------------------------------------------------------------------------
# Masks and squeezing


def checkerboard_mask(height: int, width: int, channels: int, parity: int = 0) -> np.ndarray:
  """float32[height, width, channels]: 1 where ``(i + j) % 2 == parity`` (the
  elements a coupling layer passes unchanged and conditions on)."""
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  m = ((i + j) % 2 == parity).astype(np.float32)
  return np.repeat(m[:, :, None], channels, axis=2)


def channel_mask(height: int, width: int, channels: int, parity: int = 0) -> np.ndarray:
  """float32[height, width, channels]: 1 on the first half of the channels
  (``parity=0``) or on the second (``parity=1``)."""
  if channels < 2 or channels % 2:
    raise ValueError(f"a channel mask needs an even number of channels >= 2, got {channels}")
  first = np.arange(channels) < channels // 2
  keep = first if parity == 0 else ~first
  return np.broadcast_to(keep.astype(np.float32), (height, width, channels)).copy()


def squeeze(x):
  """[n, h, w, c] -> [n, h/2, w/2, 4c]: each 2x2 block of pixels into channels
  (RealNVP's squeezing; a permutation, log-determinant 0)."""
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"squeeze needs an even height and width, got {h}x{w}")
  x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // 2, w // 2, 4 * c)


def unsqueeze(x):
  """The inverse of :func:`squeeze`: [n, h, w, 4c] -> [n, 2h, 2w, c]."""
  n, h, w, c4 = x.shape
  if c4 % 4:
    raise ValueError(f"unsqueeze needs a multiple of 4 channels, got {c4}")
  c = c4 // 4
  x = x.reshape(n, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, 2 * h, 2 * w, c)


# --------------------------------------------------------------------------
# Bijectors: layer(x, train=False, inverse=False) -> (y, log_det[n])


class Logit(nn.Module):
  """RealNVP's pre-processing of pixels in [0, 1]: ``y = logit(alpha + (1 - 2
  alpha) x)``; ``log |dy/dx| = log(1 - 2 alpha) - log p - log(1 - p)`` per
  pixel, ``p = alpha + (1 - 2 alpha) x``."""

  alpha: float = 0.05

  def __call__(self, x, train: bool = False, inverse: bool = False):
    a = self.alpha
    if inverse:
      x_out = (jax.nn.sigmoid(x) - a) / (1 - 2 * a)
      _, ld = self(x_out)
      return x_out, -ld
    p = a + (1 - 2 * a) * x
    y = jnp.log(p) - jnp.log1p(-p)
    ld = math.log(1 - 2 * a) - jnp.log(p) - jnp.log1p(-p)
    return y, _per_example(ld)


class Squeeze(nn.Module):
  """:func:`squeeze` as a bijector (``inverse=True``: :func:`unsqueeze`)."""

  def __call__(self, x, train: bool = False, inverse: bool = False):
    y = unsqueeze(x) if inverse else squeeze(x)
    return y, jnp.zeros(x.shape[:1], x.dtype)


class _ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, h):
    r = nn.Conv(self.features, (3, 3))(nn.relu(h))
    r = nn.Conv(self.features, (3, 3))(nn.relu(r))
    return h + r


class AffineCoupling(nn.Module):
  """Affine coupling (RealNVP): with mask ``m``, ``y = m x + (1 - m)(x exp(s) +
  t)`` where ``(s, t)`` = a residual convolutional net of ``m x`` (and ``m``),
  ``s = scale * tanh(.)`` bounded (a per-channel learnt ``scale``, 1 at
  initialisation; ``bounded=False``: the net's output itself, unbounded),
  the last convolution zero-initialised (the layer starts as the identity).
  ``log |det dy/dx| = sum (1 - m) s`` per example."""

  mask: MaskKind = "checkerboard"
  parity: int = 0
  features: int = 32
  blocks: int = 2
  bounded: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False, inverse: bool = False):
    _, h, w, c = x.shape
    make = checkerboard_mask if self.mask == "checkerboard" else channel_mask
    m = jnp.asarray(make(h, w, c, self.parity), x.dtype)
    kept = x * m
    net = nn.Conv(self.features, (3, 3))(jnp.concatenate(
        [kept, jnp.broadcast_to(m, x.shape)], axis=-1))
    for _ in range(self.blocks):
      net = _ResBlock(self.features)(net)
    out = nn.Conv(2 * c, (3, 3), kernel_init=nn.initializers.zeros)(nn.relu(net))
    raw_s, t = jnp.split(out, 2, axis=-1)
    if self.bounded:
      scale = self.param("scale", nn.initializers.ones, (c,))
      raw_s = scale * jnp.tanh(raw_s)
    s = raw_s * (1 - m)
    t = t * (1 - m)
    if inverse:
      return kept + (1 - m) * ((x - t) * jnp.exp(-s)), -_per_example(s)
    return kept + (1 - m) * (x * jnp.exp(s) + t), _per_example(s)


class BatchNormBijector(nn.Module):
  """BatchNorm as a bijector (RealNVP, sec. 3.7): ``y = gamma (x - mean) /
  sqrt(var + epsilon) + beta``, ``gamma = exp(log_gamma)``, over the feature
  ``axis`` (the last: one statistic per channel, pooled over the positions;
  a tuple of axes, e.g. ``(1, 2, 3)``: one per element, over the batch
  alone, as a BatchNorm of the flattened example).

  ``train=True``: ``mean``/``var`` are the batch's (biased variance), the
  running statistics in ``batch_stats`` move by ``momentum`` (Flax's
  convention; the running variance takes the unbiased batch variance, as
  PyTorch's), and ``log_det`` is each example's Jacobian with the batch
  statistics held fixed: ``positions * sum_c (log_gamma_c - log(var_c +
  epsilon) / 2)``. ``train=False``: the stored ``mean``/``var``.
  ``inverse=True`` always uses the stored statistics (an inverse of a batch's
  training-mode map needs the statistics of the input it never saw).
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  axis: int | tuple = -1

  @nn.compact
  def __call__(self, x, train: bool = False, inverse: bool = False):
    c, reduction, shape = _feature_layout(x, self.axis)
    log_gamma = self.param("log_gamma", nn.initializers.zeros, c)
    beta = self.param("beta", nn.initializers.zeros, c)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(c, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(c, jnp.float32))
    if train and not inverse:
      mean = jnp.mean(x, axis=reduction)
      var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=reduction)
      if not self.is_initializing():
        n = math.prod(x.shape[i] for i in reduction)
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    log_std = 0.5 * jnp.log(var + self.epsilon)
    ld = _positions(x, self.axis) * jnp.sum(log_gamma - log_std)
    ld = jnp.full(x.shape[:1], ld, x.dtype)
    mean, log_std = mean.reshape(shape), log_std.reshape(shape)
    g, b = log_gamma.reshape(shape), beta.reshape(shape)
    if inverse:
      return (x - b) * jnp.exp(log_std - g) + mean, -ld
    return (x - mean) * jnp.exp(g - log_std) + b, ld


class ActNorm(nn.Module):
  """ActNorm (Glow): ``y = (x + bias) exp(log_scale)`` per feature, both
  initialised from the first batch the layer sees at ``init`` so that its
  output has zero mean and unit variance per channel; no statistics to
  adapt. ``log |det dy/dx| = positions * sum log_scale``."""

  epsilon: float = 1e-6
  axis: int | tuple = -1

  @nn.compact
  def __call__(self, x, train: bool = False, inverse: bool = False):
    c, reduction, shape = _feature_layout(x, self.axis)
    bias = self.param("bias", lambda _, s: -jnp.mean(x, axis=reduction).reshape(s), c)
    log_scale = self.param(
        "log_scale",
        lambda _, s: -0.5 * jnp.log(jnp.var(x, axis=reduction) + self.epsilon).reshape(s), c)
    ld = jnp.full(x.shape[:1], _positions(x, self.axis) * jnp.sum(log_scale), x.dtype)
    b, ls = bias.reshape(shape), log_scale.reshape(shape)
    if inverse:
      return x * jnp.exp(-ls) - b, -ld
    return (x + b) * jnp.exp(ls), ld


class _Identity(nn.Module):
  def __call__(self, x, train: bool = False, inverse: bool = False):
    return x, jnp.zeros(x.shape[:1], x.dtype)


# --------------------------------------------------------------------------
# The flow


def standard_normal_log_prob(z):
  """Log-density of a standard normal, summed per example: float[n]."""
  return _per_example(-0.5 * (jnp.square(z) + _LOG_2PI))


class RealNVP(nn.Module):
  """RealNVP on images ``[n, h, w, c]`` in [0, 1].

  The layers: the :class:`Logit` pre-processing, then for each of ``scales``
  scales ``couplings`` checkerboard couplings, a squeeze and ``couplings``
  channel couplings, then ``couplings`` final couplings (``final_mask``), each
  coupling followed by a ``norm`` bijector (:class:`BatchNormBijector`,
  :class:`ActNorm` or none) whose statistics are per channel (``norm_axes
  ="channel"``, pooled over positions) or per element (``"dimension"``: a
  BatchNorm of the flattened example, as MLP flows have it; a pixel that is
  nearly constant over the data gets a nearly zero variance). The couplings'
  log-scales are tanh-bounded unless ``bounded_scales=False``. Every
  dimension passes through every layer (no multi-scale factoring out); the latent is unsqueezed back to the image's
  shape, so ``z`` has the shape of ``x``.

  Methods (through ``apply(..., method=...)``): :meth:`forward` (also
  ``__call__``), :meth:`inverse`, :meth:`log_prob`, :meth:`sample`,
  :meth:`layer_log_dets`.
  """

  image_shape: Sequence[int]
  features: int = 32
  blocks: int = 2
  scales: int = 1
  couplings: int = 3
  final_mask: MaskKind = "checkerboard"
  norm: Norm = "batch"
  momentum: float = 0.9
  epsilon: float = 1e-5
  alpha: float = 0.05
  norm_axes: NormAxes = "channel"
  bounded_scales: bool = True

  def setup(self):
    """Builds the layers from the attributes (checked here)."""
    h, w, c = self._shape()
    _checks.choice("RealNVP.norm", self.norm, NORMS)
    _checks.choice("RealNVP.final_mask", self.final_mask, MASKS)
    _checks.choice("RealNVP.norm_axes", self.norm_axes, NORM_AXES)
    axis = -1 if self.norm_axes == "channel" else (1, 2, 3)
    _checks.positive_int("RealNVP.couplings", self.couplings)
    _checks.positive_int("RealNVP.scales", self.scales, 0)
    if not 0 <= _checks.number("RealNVP.alpha", self.alpha) < 0.5:
      raise ValueError(f"RealNVP.alpha must be in [0, 0.5), got {self.alpha}")
    if h % (2 ** self.scales) or w % (2 ** self.scales):
      raise ValueError(f"RealNVP.image_shape {h}x{w} must be divisible by 2**scales = "
                       f"{2 ** self.scales}")
    if self.final_mask == "channel" and (c * 4 ** self.scales) % 2:
      raise ValueError("RealNVP.final_mask='channel' needs an even number of channels at the "
                       f"last scale, got {c * 4 ** self.scales}")
    layers, parity = [], 0

    def coupling(mask):
      nonlocal parity
      layers.append(AffineCoupling(mask, parity, self.features, self.blocks,
                                   self.bounded_scales))
      parity = 1 - parity
      if self.norm == "batch":
        layers.append(BatchNormBijector(self.momentum, self.epsilon, axis))
      elif self.norm == "actnorm":
        layers.append(ActNorm(axis=axis))

    for _ in range(self.scales):
      for _ in range(self.couplings):
        coupling("checkerboard")
      layers.append(Squeeze())
      parity = 0
      for _ in range(self.couplings):
        coupling("channel")
      parity = 0
    for _ in range(self.couplings):
      coupling(self.final_mask)
    self.layers = layers
    self.logit = Logit(self.alpha)

  def _shape(self) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in self.image_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f"RealNVP.image_shape must be (height, width, channels), got "
                       f"{self.image_shape!r}")
    return shape

  def _check(self, x, name: str):
    if x.ndim != 4 or tuple(x.shape[1:]) != self._shape():
      raise ValueError(f"{name} must have shape [n, {', '.join(map(str, self._shape()))}], "
                       f"got {tuple(x.shape)}")

  def _check_pixels(self, x):
    """Pixels the pre-processing maps to finite values: ``alpha + (1 - 2 alpha)
    x`` in (0, 1) (so [0, 1] with a margin). Concrete values only (not under jit)."""
    if _checks.is_traced(x):
      return
    lo = -self.alpha / (1 - 2 * self.alpha)
    hi = 1 - lo
    seen_lo, seen_hi = float(jnp.min(x)), float(jnp.max(x))
    if not (lo < seen_lo and seen_hi < hi):  # also false for NaN
      raise ValueError(f"x must be pixels in [0, 1] (the logit pre-processing is finite on "
                       f"({lo:.4g}, {hi:.4g})), got values in [{seen_lo:.4g}, {seen_hi:.4g}]; "
                       "pass preprocessed=True for logit-space values")

  def __call__(self, x, train: bool = False, preprocessed: bool = False):
    return self.forward(x, train, preprocessed)

  def forward(self, x, train: bool = False, preprocessed: bool = False):
    """Image to latent: ``(z, log_det)``, ``z`` shaped like ``x`` and
    ``log_det[n]`` every bijector's log-determinant summed per image, the
    pre-processing's included (``preprocessed=True``: ``x`` is already
    ``logit``-space and that layer is skipped)."""
    x, shares = self._through(x, train, preprocessed)
    log_det = jnp.zeros(x.shape[:1], x.dtype)
    for ld in shares.values():
      log_det = log_det + ld
    for _ in range(self.scales):
      x = unsqueeze(x)
    return x, log_det

  def _through(self, x, train: bool, preprocessed: bool):
    """The pre-processing (unless ``preprocessed``) and every bijector in
    turn: (the last one's output, before unsqueezing; ``{name: log_det[n]}``
    of each layer, in order, named as :meth:`layer_log_dets` says)."""
    self._check(x, "x")
    shares = {}
    if not preprocessed:
      self._check_pixels(x)
      x, shares["logit"] = self.logit(x)
    kinds = {AffineCoupling: "coupling", BatchNormBijector: "batchnorm", ActNorm: "actnorm",
             Squeeze: "squeeze"}
    for i, layer in enumerate(self.layers):
      x, shares[f"{i} {kinds[type(layer)]}"] = layer(x, train=train)
    return x, shares

  def layer_log_dets(self, x, train: bool = False):
    """Each layer's share of :meth:`forward`'s ``log_det``: ``{name:
    float[n]}`` in the order of the layers (``"logit"``, then
    ``"<i> <kind>"`` for the i-th bijector: ``coupling``, ``batchnorm``,
    ``actnorm``, ``squeeze``); the values sum to ``forward``'s."""
    return self._through(x, train, preprocessed=False)[1]

  def inverse(self, z, preprocessed: bool = False):
    """Latent to image (evaluation mode: stored statistics); ``preprocessed``:
    return the ``logit``-space values instead of pixels."""
    self._check(z, "z")
    for _ in range(self.scales):
      z = squeeze(z)
    for layer in reversed(self.layers):
      z, _ = layer(z, inverse=True)
    if not preprocessed:
      z, _ = self.logit(z, inverse=True)
    return z

  def log_prob(self, x, train: bool = False, preprocessed: bool = False):
    """Log-density of each image in nats: ``float[n]`` (of ``x`` in [0, 1]^d,
    or of the ``logit``-space values when ``preprocessed``)."""
    z, log_det = self.forward(x, train, preprocessed)
    return standard_normal_log_prob(z) + log_det

  def sample(self, key, n: int, temperature: float = 1.0):
    """``n`` images from ``z ~ N(0, temperature**2 I)``."""
    z = temperature * jax.random.normal(key, (n, *self._shape()))
    return self.inverse(z)


# --------------------------------------------------------------------------
# Data and units


def dequantize(key, images, levels: int):
  """Uniform dequantisation: images with values ``k / (levels - 1)`` (``k`` in
  0..levels-1) to ``(k + u) / levels``, ``u ~ U[0, 1)``: float in [0, 1)."""
  levels = _checks.positive_int("levels", levels, 2)
  k = jnp.round(jnp.asarray(images, jnp.float32) * (levels - 1))
  return (k + jax.random.uniform(key, k.shape)) / levels


def bits_per_dim(log_prob, dims: int, levels: int):
  """Bits per dimension of discrete images from the log-density (nats) of
  their dequantised versions in [0, 1]^dims: ``(-log_prob / dims + log
  levels) / log 2`` (the cell of a discrete image has volume
  ``levels**-dims``)."""
  dims = _checks.positive_int("dims", dims)
  levels = _checks.positive_int("levels", levels, 2)
  return (-jnp.asarray(log_prob) / dims + math.log(levels)) / math.log(2)


def variance_ratios(model: RealNVP, variables, reference) -> dict[str, np.ndarray]:
  """How far each BatchNorm bijector's stored statistics in ``variables`` are
  from those of ``reference`` (typically the exact statistics of a set,
  ``bnjax.adapt.recompute_batch_stats(model, variables, images)``):
  ``{layer: float64[features]}``, per feature ``(stored var + eps) /
  (reference var + eps)``, eps the layer's ``epsilon``. It is the square of
  the factor by which the stored statistics over-scale a feature (< 1: the
  stored variance is too small, a deviation is amplified). Layers are named
  as in ``batch_stats``."""
  if not isinstance(model, RealNVP):
    raise ValueError(f"model must be a RealNVP, got {type(model).__name__}")
  if model.norm != "batch":
    raise ValueError(f"model.norm must be 'batch' (BatchNorm bijectors keep statistics), got "
                     f"{model.norm!r}")
  stored, fresh = (adapt.layer_stats(v.get("batch_stats", {})) for v in (variables, reference))
  if set(stored) != set(fresh) or any(np.shape(stored[k][1]) != np.shape(fresh[k][1])
                                      for k in stored):
    raise ValueError("variables and reference must hold the same BatchNorm layers and shapes, "
                     f"got {sorted(stored)} and {sorted(fresh)}")
  eps = float(model.epsilon)
  return {name: (stored[name][1] + eps) / (fresh[name][1] + eps) for name in stored}


# --------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Maximum-likelihood training of a flow on discrete images.

  ``steps`` Adam steps (``learning_rate``, gradient norm clipped at
  ``clip``) on batches of ``batch_size`` drawn epoch by epoch without
  replacement; every batch dequantised afresh (``levels`` discrete values;
  ``dequantize=False``: the discrete values themselves, a density on a set
  of volume zero that grows without bound, kept to reproduce flows trained
  that way). ``dtype``: ``"float32"`` or ``"float64"`` (images, parameters
  and statistics; needs ``jax.config.update("jax_enable_x64", True)`` or
  ``with jax.enable_x64(True)``).
  """

  steps: int = 1000
  batch_size: int = 64
  learning_rate: float = 1e-3
  clip: float = 100.0
  weight_decay: float = 0.0
  levels: int = 256
  seed: int = 0
  check_every: int = 50
  dequantize: bool = True
  dtype: str = "float32"

  def __post_init__(self):
    _checks.positive_int("FlowConfig.steps", self.steps)
    _checks.positive_int("FlowConfig.batch_size", self.batch_size)
    _checks.positive_int("FlowConfig.levels", self.levels, 2)
    _checks.positive_int("FlowConfig.check_every", self.check_every)
    _checks.positive_int("FlowConfig.seed", self.seed, 0)
    _checks.positive_number("FlowConfig.learning_rate", self.learning_rate)
    _checks.number("FlowConfig.clip", self.clip)
    _checks.number("FlowConfig.weight_decay", self.weight_decay)
    _checks.choice("FlowConfig.dtype", self.dtype, ("float32", "float64"))
    if not isinstance(self.dequantize, bool):
      raise ValueError(f"FlowConfig.dequantize must be True or False, got {self.dequantize!r}")


def _hyperparameters(config: FlowConfig) -> dict[str, np.float32]:
  """The float settings of the optimiser: arguments of the compiled step (another
  value compiles nothing)."""
  return {name: np.float32(getattr(config, name))
          for name in ("learning_rate", "clip", "weight_decay")}


def _chain(clipped: bool, hyper):
  """Adam with decoupled weight decay, the gradient's global norm clipped first
  (``clipped``); ``hyper``: floats, or scalars traced inside a compiled step."""
  clip = optax.clip_by_global_norm(hyper["clip"]) if clipped else optax.identity()
  return optax.chain(clip, optax.adamw(hyper["learning_rate"],
                                       weight_decay=hyper["weight_decay"]))


def _optimizer(config: FlowConfig):
  """The optimiser of :func:`fit` (the gradient clipped when ``clip > 0``)."""
  return _chain(config.clip > 0, _hyperparameters(config))


def _compiled_train_step(model: RealNVP, config: FlowConfig):
  """``step(carry, index, t, images, noise_key, hyper)``, compiled once per
  model, ``levels`` and whether the gradient is clipped."""
  levels, clipped, noise = config.levels, config.clip > 0, config.dequantize

  def build():
    def loss_fn(p, s, x):
      if s:
        lp, upd = model.apply({"params": p, "batch_stats": s}, x, train=True,
                              method="log_prob", mutable=["batch_stats"])
        s = upd["batch_stats"]
      else:
        lp = model.apply({"params": p}, x, train=True, method="log_prob")
      return -jnp.mean(lp) / math.prod(x.shape[1:]), s

    @compiler.jit
    def step(carry, index, t, images, noise_key, hyper):
      p, s, o = carry
      tx = _chain(clipped, hyper)
      x = images[index]
      if noise:
        x = dequantize(jax.random.fold_in(noise_key, t), x, levels).astype(images.dtype)
      (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x)
      updates, o = tx.update(grads, o, p)
      bpd = (loss + math.log(levels)) / math.log(2)
      return (optax.apply_updates(p, updates), s, o), bpd

    return step

  return _m.cached(model, ("flows.fit", levels, clipped, noise), build)


def _train_step(model: RealNVP, config: FlowConfig):
  """The compiled training step with the config's float settings bound:
  ``step(carry, index, t, images, noise_key)``."""
  step = _compiled_train_step(model, config)
  hyper = jax.device_put(_hyperparameters(config))
  return lambda carry, index, t, images, noise_key: step(carry, index, t, images, noise_key,
                                                         hyper)


def _grid_of(values) -> int | None:
  """The m of the grid k / (m - 1) (m <= 65536) that holds every one of the
  sorted distinct ``values``, from their smallest gap; None for values on no
  such grid (continuous data)."""
  if values.size < 2:
    return None
  m = int(round(1.0 / float(np.min(np.diff(values))))) + 1
  if m > 65536 or not _on_grid(values, m):
    return None
  return m


def _on_grid(values, levels: int) -> bool:
  # float32 pixels k / (levels - 1) are within 1e-4 of the grid (levels <= 65536).
  scaled = values * (levels - 1)
  return bool(np.all(np.abs(scaled - np.round(scaled)) <= 1e-4))


def _check_levels(images, levels: int) -> None:
  """Discrete images on a grid of other levels than ``levels`` are refused:
  dequantizing 17-level data with 256-level noise gives a density, and
  bits/dim, of nothing the data hold. Continuous data (on no grid) pass."""
  if _on_grid(images.astype(np.float64), levels):  # the usual case, without sorting
    return
  m = _grid_of(np.unique(images.astype(np.float64)))
  if m is not None:
    raise ValueError(
        f"images are {m}-level data (pixels k / {m - 1}), but FlowConfig.levels is {levels}: "
        f"pass FlowConfig(levels={m}) so that dequantization and bits/dim count the data's "
        "levels")


# The flows' images: grey levels k / (levels - 1) in [0, 1] (what a range error says).
_OTHER_SCALE = ("a flow models images in [0, 1]: k / (levels - 1) for grey levels "
                "k = 0..levels - 1 (FlowConfig.levels)")


def fit(key, model: RealNVP, images, config: FlowConfig = FlowConfig(), *, verbose: bool = True):
  """Trains ``model`` by maximum likelihood on ``images`` (``[n, h, w, c]``,
  values ``k / (levels - 1)``): ``(variables, history)``.

  ``history``: ``bits_per_dim[steps]`` (training batches, training mode),
  ``seconds``, ``steps``. A non-finite loss stops with a ``FloatingPointError``
  naming the step.
  """
  if not isinstance(config, FlowConfig):
    raise ValueError(f"config must be a FlowConfig, got {type(config).__name__}")
  _checks.key(key)
  if not isinstance(model, RealNVP):
    raise ValueError(f"model must be a RealNVP, got {type(model).__name__}")
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("FlowConfig.dtype='float64' needs 64-bit JAX: jax.config.update("
                     "'jax_enable_x64', True), or train inside `with jax.enable_x64(True):`")
  images = jnp.asarray(_checks.images(images, name="images", other_scale=_OTHER_SCALE),
                       config.dtype)
  if tuple(images.shape[1:]) != tuple(model.image_shape):
    raise ValueError(f"images must have shape [n, {', '.join(map(str, model.image_shape))}], "
                     f"got {tuple(images.shape)}")
  n = images.shape[0]
  if config.batch_size > n:
    raise ValueError(f"FlowConfig.batch_size must be <= the number of images ({n}), "
                     f"got {config.batch_size}")
  _check_levels(np.asarray(images), config.levels)
  init_key, first_key, noise_key = jax.random.split(key, 3)
  first = images[: config.batch_size]
  if config.dequantize:
    first = dequantize(first_key, first, config.levels).astype(images.dtype)
  variables = _m.init(model, init_key, first, train=True)
  if config.dtype == "float64":
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
  params, stats = variables["params"], variables.get("batch_stats", {})
  opt = _optimizer(config).init(params)
  order = _fitting.batches(config.seed, n, config.batch_size, config.steps)
  step = _train_step(model, config)
  carry, bpd, seconds = _fitting.run(
      lambda c, index, t: step(c, index, t, images, noise_key), (params, stats, opt), order,
      check_every=config.check_every, what="flow", loss_names=("bits/dim",),
      hint="lower FlowConfig.learning_rate or clip", verbose=verbose)
  params, stats, _ = carry
  variables = {"params": params, **({"batch_stats": stats} if stats else {})}
  history = {"bits_per_dim": bpd[:, 0], "steps": config.steps, "seconds": seconds}
  return variables, history


# --------------------------------------------------------------------------
# Inpainting


def _inpaint_step(model: RealNVP):
  """One compiled Adam step of :func:`inpaint`, built once per model (the
  learning rate is an argument)."""
  def build():
    def objective(y, variables, known, y0):
      y = jnp.where(known, y0, y)
      return -jnp.mean(model.apply(variables, y, preprocessed=True, method="log_prob"))

    @compiler.jit
    def step(y, o, variables, known, y0, learning_rate):
      loss, g = jax.value_and_grad(objective)(y, variables, known, y0)
      u, o = optax.adam(learning_rate).update(g, o, y)
      return optax.apply_updates(y, u), o, -loss

    return step

  return _m.cached(model, ("flows.inpaint",), build)


def inpaint(model: RealNVP, variables, images, known, *, steps: int = 300,
            learning_rate: float = 0.05):
  """Fills the unknown pixels of ``images`` (``known`` bool, broadcast to
  them) by Adam steps on their ``logit``-space values, maximising the flow's
  log-density of the ``logit``-space image (evaluation mode), the known
  pixels fixed: ``(filled images, log_prob[steps])`` (the mean per step).
  The unknown pixels start from their given values."""
  steps = _checks.positive_int("steps", steps)
  _checks.positive_number("learning_rate", learning_rate)
  images = jnp.asarray(_checks.images(images, name="images", other_scale=_OTHER_SCALE),
                       jnp.float32)
  try:
    known = jnp.broadcast_to(jnp.asarray(known, bool), images.shape)
  except ValueError:
    raise ValueError(f"known must broadcast to the images' shape {tuple(images.shape)}, got "
                     f"{np.shape(known)}") from None
  logit = Logit(model.alpha)
  y0, _ = logit.apply({}, jnp.clip(images, 0, 1))
  step, rate = _inpaint_step(model), np.float32(learning_rate)
  y, o, lp = y0, optax.adam(learning_rate).init(y0), []
  for _ in range(steps):  # not scanned: see bnjax._fitting on gradients inside loops
    y, o, value = step(y, o, variables, known, y0, rate)
    lp.append(value)
  lp = np.asarray(jax.device_get(lp))
  filled, _ = logit.apply({}, jnp.where(known, y0, y), inverse=True)
  return jnp.where(known, images, jnp.clip(filled, 0, 1)), lp
