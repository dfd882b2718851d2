"""U-Net for binary segmentation (Flax linen).

The reference network of the study is the "milesial" PyTorch U-Net
(Ronneberger et al. 2015, as implemented in github.com/milesial/Pytorch-UNet):
DoubleConv = (3x3 conv without bias -> BatchNorm -> ReLU) x 2, widths
64-128-256-512-1024, 2x2 max-pool down, 2x2 stride-2 transposed conv up (to half
the channels), skip concatenation, 1x1 output conv. ``UNet.paper()`` builds it:
31,036,546 parameters for one input channel and two classes, 18 BatchNorm
layers.

Every level sows its output before and after its last ReLU into the
``"intermediates"`` collection under ``<level>_pre`` and ``<level>_post``, with
levels named ``enc0 .. enc{depth-1}``, ``bottleneck``, ``dec{depth-1} .. dec0``
(``dec{i}`` has the resolution of ``enc{i}``). ``TAPS`` lists them in order.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import _modules as _m

__all__ = ["UNet", "DoubleConv", "Conv", "UpConv", "batch_norm_relu", "max_pool2",
           "level_names", "standardize", "count_params", "init", "init_variables", "Norm", "NORMS", "Down",
           "DOWNS", "Up", "UPS", "ConvImpl", "CONV_IMPLS", "BnImpl", "BN_IMPLS"]

#: The U-Net's normalisation layer.
Norm = Literal["batch", "instance", "group", "layer", "none"]
#: The values of :data:`Norm`.
NORMS: tuple[str, ...] = get_args(Norm)
#: How the U-Net's convolutions are computed (the same numbers; speed differs by
#: backend).
ConvImpl = Literal["auto", "xla", "matmul"]
#: The values of :data:`ConvImpl`.
CONV_IMPLS: tuple[str, ...] = get_args(ConvImpl)
# "auto": the matmul form on inputs of at most this many pixels (the 2x2
# bottleneck of a 32x32 U-Net), where XLA:CPU's kernel-gradient convolutions
# fall off its fast path (8.9 of 58 ms of a width-8 32x32 step); XLA elsewhere.
AUTO_MATMUL_PIXELS = 4
#: The U-Net's BatchNorm + ReLU: ``"fused"`` (a written-out gradient) or Flax's layers.
BnImpl = Literal["fused", "flax"]
#: The values of :data:`BnImpl`.
BN_IMPLS: tuple[str, ...] = get_args(BnImpl)
#: How the U-Net downsamples: max pooling or a strided convolution.
Down = Literal["maxpool", "strided"]
#: The values of :data:`Down`.
DOWNS: tuple[str, ...] = get_args(Down)
#: How the U-Net upsamples: a transposed convolution or resize then convolution.
Up = Literal["transpose", "resize_conv"]
#: The values of :data:`Up`.
UPS: tuple[str, ...] = get_args(Up)

# PyTorch's BatchNorm2d defaults, in Flax's convention (ra = m ra + (1-m) batch).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# Groups of ``norm="group"`` (Wu & He 2018 use 32; the CPU widths start at 8).
GROUPS = 8


def level_names(depth: int) -> list[str]:
  """Names of the levels of a U-Net of this depth, in forward order."""
  return ([f"enc{i}" for i in range(depth)] + ["bottleneck"]
          + [f"dec{i}" for i in reversed(range(depth))])


class Conv(nn.Module):
  """Convolution with ``nn.Conv``'s parameters (same names, shapes, initialiser).

  ``stride == 1``: a k x k convolution with 'SAME' zero padding (k odd);
  ``stride == kernel``: non-overlapping k x k patches (down-sampling).
  ``impl="xla"`` calls ``lax.conv_general_dilated``; ``impl="matmul"`` gathers
  the k*k shifted views and contracts them with one matrix product; ``"auto"``
  picks matmul for inputs of at most ``AUTO_MATMUL_PIXELS`` pixels. All are
  the same function; under ``jax.vmap`` over a stack of models the
  matmul form lowers to a batched GEMM, where XLA:CPU turns a convolution with
  a batched kernel into a slow grouped convolution.
  """

  features: int
  kernel: int = 3
  stride: int = 1
  use_bias: bool = True
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel, self.stride
    w = self.param("kernel", nn.initializers.lecun_normal(),
                   (k, k, x.shape[-1], self.features), jnp.float32)
    if s == 1:
      pad = [(k // 2, k // 2)] * 2
    elif s == k:
      pad = [(0, 0)] * 2
    else:
      raise ValueError(f"Conv supports stride 1 or stride == kernel, got {k}x{k}/{s}")
    impl = self.impl
    if impl == "auto":
      impl = "matmul" if x.shape[1] * x.shape[2] <= AUTO_MATMUL_PIXELS else "xla"
    if impl == "xla":
      y = jax.lax.conv_general_dilated(x, w, (s, s), pad,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = _matmul_conv(x, w, s, pad)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return y


def _matmul_conv(x, w, stride, pad):
  k = w.shape[0]
  n, h, wd, c = x.shape
  if stride == 1:
    xp = jnp.pad(x, ((0, 0), *pad, (0, 0)))
    patches = jnp.concatenate(
        [xp[:, i:i + h, j:j + wd, :] for i in range(k) for j in range(k)], axis=-1)
  else:  # space-to-depth
    patches = x.reshape(n, h // k, k, wd // k, k, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, h // k, wd // k, k * k * c)
  return jax.lax.dot_general(patches, w.reshape(k * k * c, -1), (((3,), (0,)), ((), ())))


class UpConv(nn.Module):
  """2x2 stride-2 transposed convolution with ``nn.ConvTranspose``'s parameters.

  ``impl="matmul"`` computes it as a 1x1 convolution to 4 * features channels
  followed by depth-to-space (the same function; see :class:`Conv`).
  """

  features: int
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(),
                   (2, 2, x.shape[-1], self.features), jnp.float32)
    b = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    if self.impl == "xla":
      y = jax.lax.conv_transpose(x, w, (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      n, h, wd, c = x.shape
      # out[2i + a, 2j + b] = x[i, j] @ w[1 - a, 1 - b] (lax.conv_transpose flips)
      y = jax.lax.dot_general(x, w[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, -1),
                              (((3,), (0,)), ((), ())))
      y = y.reshape(n, h, wd, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
      y = y.reshape(n, 2 * h, 2 * wd, self.features)
    return y + b


@jax.custom_vjp
def max_pool2(x):
  """2x2 stride-2 max-pool of float[n, H, W, C] (H, W even): ``nn.max_pool(x,
  (2, 2), (2, 2))`` with a cheaper gradient.

  The gradient is ``g`` (upsampled) where ``x`` equals its window's maximum:
  the same as ``nn.max_pool``'s except on exact ties inside a window, where
  every tied element receives it (``nn.max_pool`` picks one). In the U-Net the
  pooled values are ReLU outputs, whose ties are zeros that get no gradient
  through the ReLU, so training is unchanged (tested). On XLA:CPU the
  window-with-indices reduction behind ``nn.max_pool``'s gradient cost 42 of
  280 ms of a train step (width 16, 64x64); this is elementwise.
  """
  if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"x must be float[n, H, W, C] with H and W even, got shape {x.shape}")
  return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                     jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def _upsample2(a):
  n, h, w, c = a.shape
  return jnp.broadcast_to(a[:, :, None, :, None], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)


def _max_pool2_fwd(x):
  y = max_pool2(x)
  return y, (x, y)


def _max_pool2_bwd(res, g):
  x, y = res
  return (jnp.where(x == _upsample2(y), _upsample2(g), jnp.zeros((), g.dtype)),)


max_pool2.defvjp(_max_pool2_fwd, _max_pool2_bwd)


def _bn_relu_stats(x):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  # nn.BatchNorm's default (use_fast_variance): E[x^2] - E[x]^2, clipped at 0.
  var = jnp.maximum(0.0, jnp.mean(x * x, axes) - mean * mean)
  return mean, var


def batch_norm_relu(x, scale, bias, epsilon: float = BN_EPSILON):
  """``relu(BatchNorm(x))`` in train mode, with the batch's (mean, var).

  The same function as ``nn.BatchNorm(use_running_average=False)`` (default
  ``use_fast_variance``) followed by ``nn.relu``, over every axis but the last
  of ``x``; returns ``(y, mean, var)`` (``var`` biased, as Flax stores it).
  The gradient is written out (Ioffe & Szegedy 2015, section 3) from ``x``,
  ``y`` and the incoming gradient alone, without the intermediates (``x -
  mean``, the normalised input, the ReLU mask) that autodiff of the unfused
  layers writes out: a train step at width 16, 64x64 went 250 -> 224 ms on
  XLA:CPU (docs/measured.md).
  """
  x, scale, bias = jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)
  if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float array [..., C] with ndim >= 2, got "
                     f"{x.dtype} {x.shape}")
  c = x.shape[-1]
  if scale.shape != (c,) or bias.shape != (c,):
    raise ValueError(f"scale and bias must have shape ({c},) (the channels of x), got "
                     f"{scale.shape} and {bias.shape}")
  if not float(epsilon) > 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon}")
  return _batch_norm_relu(x, scale, bias, float(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_relu(x, scale, bias, epsilon):
  mean, var = _bn_relu_stats(x)
  y = jnp.maximum((x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias, 0.0)
  return y, mean, var


def _batch_norm_relu_fwd(x, scale, bias, epsilon):
  y, mean, var = _batch_norm_relu(x, scale, bias, epsilon)
  return (y, mean, var), (x, y, mean, jax.lax.rsqrt(var + epsilon), scale)


def _batch_norm_relu_bwd(epsilon, res, cts):
  x, y, mean, rstd, scale = res
  gy, gmean, gvar = cts
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  g = jnp.where(y > 0, gy, jnp.zeros((), gy.dtype))
  dbias = jnp.sum(g, axes)
  # sum(g * (x - mean)) without materialising x - mean (XLA would share it
  # with the forward pass and write it out): one reduction pass over (g, x).
  gc = jnp.sum(g * x, axes) - mean * dbias
  dscale = gc * rstd
  # d/dx of relu((x - m) r s + b) through m and r = (var + eps)^-1/2, plus the
  # (usually zero) cotangents of the returned statistics; affine in (g, x).
  a = scale * rstd
  kx = a * rstd * dscale / n - 2.0 * gvar / n
  dx = a * g - kx * x + (kx * mean - a * dbias / n + gmean / n)
  return dx, dscale, dbias


_batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd)


class BatchNormReLU(nn.Module):
  """Train-mode ``nn.BatchNorm`` + ReLU through :func:`batch_norm_relu`.

  Owns the same variables as ``nn.BatchNorm`` (``params``: scale, bias;
  ``batch_stats``: mean, var) and updates the running averages the same way,
  so a model can use it for training and ``nn.BatchNorm`` for evaluation
  under one name (BN adaptation intercepts ``nn.BatchNorm`` calls, which
  run in eval mode).
  """

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    y, mean, var = batch_norm_relu(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def _norm_layer(norm: str, channels: int, name: str) -> nn.Module:
  """The per-sample normalisation layer of ``norm`` (every one with a learned
  scale and bias, epsilon 1e-5): ``"instance"`` normalises each channel of
  each image over its pixels (Ulyanov et al. 2016), ``"group"`` groups of
  channels of each image (Wu & He 2018; ``gcd(channels, GROUPS)`` groups),
  ``"layer"`` all pixels and channels of each image (Ba et al. 2016)."""
  if norm == "instance":
    return nn.InstanceNorm(epsilon=BN_EPSILON, name=name)
  if norm == "group":
    return nn.GroupNorm(num_groups=math.gcd(channels, GROUPS), epsilon=BN_EPSILON, name=name)
  return nn.LayerNorm(epsilon=BN_EPSILON, reduction_axes=(-3, -2, -1),
                      feature_axes=-1, name=name)


class DoubleConv(nn.Module):
  """(3x3 conv -> norm -> ReLU) x 2; sows the last pre-activation."""

  features: int
  norm: str = "batch"
  tap: str | None = None
  impl: str = "xla"
  bn_impl: str = "fused"

  @nn.compact
  def __call__(self, x, train: bool):
    use_bn = self.norm == "batch"
    # The fused layer never materialises the pre-activation, so a pass that
    # collects intermediates takes the unfused one.
    fused = (use_bn and train and self.bn_impl == "fused"
             and not (self.tap and self.is_mutable_collection("intermediates")))
    for i in range(2):
      x = Conv(self.features, 3, use_bias=self.norm == "none", impl=self.impl,
               name=f"conv{i}")(x)
      if fused:
        x = BatchNormReLU(BN_MOMENTUM, BN_EPSILON, name=f"bn{i}")(x)
        continue
      if use_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, name=f"bn{i}")(x)
      elif self.norm != "none":
        x = _norm_layer(self.norm, self.features, f"norm{i}")(x)
      if i == 1 and self.tap:
        self.sow("intermediates", f"{self.tap}_pre", x)
      x = nn.relu(x)
    if self.tap:
      self.sow("intermediates", f"{self.tap}_post", x)
    return x


def standardize(x, epsilon: float = 1e-5):
  """Per-image standardisation: each image (over its pixels and channels) to
  mean 0 and standard deviation 1, ``(x - mean) / sqrt(var + epsilon)``."""
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  var = jnp.var(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon)


class UNet(nn.Module):
  """U-Net; ``model.apply(variables, x, train=...)`` maps float[n, H, W, C] to logits.

  Attributes:
    features: width of the first level; level i has ``features * 2**i``.
    depth: number of down-sampling steps (4 in the reference network).
    norm: the layer after every 3x3 conv: ``"batch"`` (BatchNorm),
      ``"instance"``, ``"group"`` or ``"layer"`` (per-image normalisations, no
      ``batch_stats``: nothing for BN adaptation to change), or ``"none"``
      (the convs get a bias instead).
    standardize: standardise each input image to mean 0 and standard
      deviation 1 before the first layer (:func:`standardize`): a property of
      the trained model, so training, prediction and adaptation all apply it.
    down: ``"maxpool"`` (2x2 max-pool) or ``"strided"`` (2x2 stride-2 conv).
    up: ``"transpose"`` (2x2 stride-2 transposed conv) or ``"resize_conv"``
      (nearest-neighbour x2 then 3x3 conv).
    skip: concatenate the encoder features into the decoder.
    num_classes: output channels (2: background / foreground logits).
    conv_impl: ``"xla"``, ``"matmul"`` or ``"auto"`` (matmul on inputs of at
      most 2x2 pixels, XLA elsewhere): how the 3x3 (and strided) convolutions
      are lowered (the same function and parameters; see :class:`Conv`).
    up_impl: the same for the transposed convolutions (:class:`UpConv`;
      ``"auto"`` means ``"matmul"`` there). Default ``"matmul"``: a 1x1 product to 4 x features channels then
      depth-to-space, 1.2-1.3x faster per training step on XLA:CPU than the
      lhs-dilated convolution (docs/measured.md).
    bn_impl: ``"fused"`` (train-mode BatchNorm + ReLU through
      :func:`batch_norm_relu`, one custom gradient) or ``"flax"``
      (``nn.BatchNorm`` then ``nn.relu``): the same function, variables and
      running-average updates; evaluation always uses ``nn.BatchNorm``.

  ``IMAGE_RANGE`` (a class constant, not a field): the range its input images
  are checked against by every bnjax entry point (training, prediction,
  adaptation, TENT, features).
  """

  IMAGE_RANGE = (0.0, 1.0)

  features: int = 64
  depth: int = 4
  norm: Norm = "batch"
  down: Down = "maxpool"
  up: Up = "transpose"
  skip: bool = True
  num_classes: int = 2
  standardize: bool = False
  conv_impl: ConvImpl = "auto"
  up_impl: ConvImpl = "matmul"
  bn_impl: BnImpl = "fused"

  @classmethod
  def paper(cls, **overrides: Any) -> "UNet":
    """The study's reference network (31.0 M parameters)."""
    return cls(**{"features": 64, "depth": 4, **overrides})

  def check(self, image_shape=None) -> None:
    """ValueError naming the attribute for an option outside its allowed
    values, or, given ``image_shape`` (H, W, C) or (H, W), for image sides
    that the ``depth`` down-samplings cannot halve. Called on every forward
    pass; callable up front (a config, before any data or training)."""
    for name, value, allowed in (("norm", self.norm, NORMS),
                                 ("down", self.down, DOWNS),
                                 ("up", self.up, UPS),
                                 ("conv_impl", self.conv_impl, CONV_IMPLS),
                                 ("up_impl", self.up_impl, CONV_IMPLS),
                                 ("bn_impl", self.bn_impl, BN_IMPLS)):
      if value not in allowed:
        raise ValueError(f"UNet.{name} must be one of {allowed}, got {value!r}")
    for name in ("features", "depth", "num_classes"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"UNet.{name} must be an integer >= 1, got {value!r}")
    if image_shape is not None:
      step = 2 ** self.depth
      h, w = image_shape[:2]
      if h % step or w % step:
        raise ValueError(
            f"input sides {h}x{w} must be divisible by 2**depth = {step} (depth={self.depth})")

  def _check(self, x):
    self.check()
    if x.ndim != 4:
      raise ValueError(f"input must be float[n, H, W, C], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
          f"input must be float images in [0, 1], got {x.dtype}; convert first, e.g. "
          "x.astype(np.float32) / 255 for 8-bit images")
    self.check(x.shape[1:])

  @nn.compact
  def __call__(self, x, train: bool = False):
    self._check(x)
    if self.standardize:
      x = standardize(x)
    names = level_names(self.depth)
    impl = self.conv_impl
    skips = []
    for i in range(self.depth):
      x = DoubleConv(self.features * 2**i, self.norm, names[i], impl,
                     self.bn_impl, name=names[i])(x, train)
      skips.append(x)
      if self.down == "maxpool":
        x = max_pool2(x)
      else:
        x = Conv(x.shape[-1], 2, stride=2, impl=impl, name=f"down{i}")(x)
    x = DoubleConv(self.features * 2**self.depth, self.norm, "bottleneck", impl,
                   self.bn_impl, name="bottleneck")(x, train)
    for i in reversed(range(self.depth)):
      width = self.features * 2**i
      if self.up == "transpose":
        x = UpConv(width, self.up_impl, name=f"up{i}")(x)
      else:
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "nearest")
        x = Conv(width, 3, impl=impl, name=f"up{i}")(x)
      if self.skip:
        x = jnp.concatenate([skips[i], x], axis=-1)
      x = DoubleConv(width, self.norm, f"dec{i}", impl, self.bn_impl,
                     name=f"dec{i}")(x, train)
    return Conv(self.num_classes, 1, impl=impl, name="head")(x)


def count_params(params) -> int:
  """Number of scalars in a pytree of parameters."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def init_variables(model: nn.Module, key: jax.Array, image_shape):
  """``model.init`` on a zero image of ``image_shape`` (H, W, C), jitted.

  Compiled at XLA's lowest backend optimisation level: an eager ``model.init``
  dispatches op by op (~20 s for a small U-Net on CPU) and a fully optimised
  compile of its random initialisers takes ~12 s; this one ~2 s, once per
  model and shape (the model need not be hashable).
  """
  image_shape = tuple(image_shape)

  def build():
    def init_fn(key):
      return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return jax.jit(init_fn, compiler_options={"xla_backend_optimization_level": 0})

  return _m.cached(model, ("init_variables", image_shape), build)(key)


def init(model: nn.Module, key: jax.Array, image_shape) -> dict:
  """Initial ``{"params", "batch_stats"}`` for images of shape (H, W, C)."""
  return dict(init_variables(model, key, tuple(image_shape)))
