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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "none")
DOWNS = ("maxpool", "strided")
UPS = ("transpose", "resize_conv")

# PyTorch's BatchNorm2d defaults, in Flax's convention (ra = m ra + (1-m) batch).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def level_names(depth: int) -> list[str]:
  """Names of the levels of a U-Net of this depth, in forward order."""
  return ([f"enc{i}" for i in range(depth)] + ["bottleneck"]
          + [f"dec{i}" for i in reversed(range(depth))])


class DoubleConv(nn.Module):
  """(3x3 conv -> norm -> ReLU) x 2; sows the last pre-activation."""

  features: int
  norm: str = "batch"
  tap: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    use_bn = self.norm == "batch"
    for i in range(2):
      x = nn.Conv(self.features, (3, 3), padding=1, use_bias=not use_bn,
                  name=f"conv{i}")(x)
      if use_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, name=f"bn{i}")(x)
      if i == 1 and self.tap:
        self.sow("intermediates", f"{self.tap}_pre", x)
      x = nn.relu(x)
    if self.tap:
      self.sow("intermediates", f"{self.tap}_post", x)
    return x


class UNet(nn.Module):
  """U-Net; ``model.apply(variables, x, train=...)`` maps float[n, H, W, C] to logits.

  Attributes:
    features: width of the first level; level i has ``features * 2**i``.
    depth: number of down-sampling steps (4 in the reference network).
    norm: ``"batch"`` (BatchNorm after every 3x3 conv) or ``"none"`` (convs
      get a bias instead).
    down: ``"maxpool"`` (2x2 max-pool) or ``"strided"`` (2x2 stride-2 conv).
    up: ``"transpose"`` (2x2 stride-2 transposed conv) or ``"resize_conv"``
      (nearest-neighbour x2 then 3x3 conv).
    skip: concatenate the encoder features into the decoder.
    num_classes: output channels (2: background / foreground logits).
  """

  features: int = 64
  depth: int = 4
  norm: str = "batch"
  down: str = "maxpool"
  up: str = "transpose"
  skip: bool = True
  num_classes: int = 2

  @classmethod
  def paper(cls, **overrides: Any) -> "UNet":
    """The study's reference network (31.0 M parameters)."""
    return cls(**{"features": 64, "depth": 4, **overrides})

  def _check(self, x):
    for name, value, allowed in (("norm", self.norm, NORMS),
                                 ("down", self.down, DOWNS),
                                 ("up", self.up, UPS)):
      if value not in allowed:
        raise ValueError(f"UNet.{name} must be one of {allowed}, got {value!r}")
    for name in ("features", "depth", "num_classes"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"UNet.{name} must be an integer >= 1, got {value!r}")
    if x.ndim != 4:
      raise ValueError(f"input must be float[n, H, W, C], got shape {x.shape}")
    step = 2 ** self.depth
    if x.shape[1] % step or x.shape[2] % step:
      raise ValueError(
          f"input sides {x.shape[1]}x{x.shape[2]} must be divisible by "
          f"2**depth = {step} (depth={self.depth})")

  @nn.compact
  def __call__(self, x, train: bool = False):
    self._check(x)
    names = level_names(self.depth)
    skips = []
    for i in range(self.depth):
      x = DoubleConv(self.features * 2**i, self.norm, names[i], name=names[i])(x, train)
      skips.append(x)
      if self.down == "maxpool":
        x = nn.max_pool(x, (2, 2), (2, 2))
      else:
        x = nn.Conv(x.shape[-1], (2, 2), strides=(2, 2), name=f"down{i}")(x)
    x = DoubleConv(self.features * 2**self.depth, self.norm, "bottleneck",
                   name="bottleneck")(x, train)
    for i in reversed(range(self.depth)):
      width = self.features * 2**i
      if self.up == "transpose":
        x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), name=f"up{i}")(x)
      else:
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "nearest")
        x = nn.Conv(width, (3, 3), padding=1, name=f"up{i}")(x)
      if self.skip:
        x = jnp.concatenate([skips[i], x], axis=-1)
      x = DoubleConv(width, self.norm, f"dec{i}", name=f"dec{i}")(x, train)
    return nn.Conv(self.num_classes, (1, 1), name="head")(x)


def count_params(params) -> int:
  """Number of scalars in a pytree of parameters."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def init(model: nn.Module, key: jax.Array, image_shape) -> dict:
  """Initial ``{"params", "batch_stats"}`` for images of shape (H, W, C)."""
  from bnjax.train import _init_variables
  return dict(_init_variables(model, key, tuple(image_shape)))
