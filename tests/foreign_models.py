"""Small models written the way other Flax projects write them, not the way bnjax
does: list attributes, ``partial(nn.BatchNorm, ...)``, flags of every name,
module-attribute flags, lifted transforms, masks, channels-first layouts, forks
of BatchNorm and extra inputs. Used by the adaptation tests as models bnjax did
not design for.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


class ResNetBlock(nn.Module):
  """As in Flax's ImageNet example: conv/norm/act callables passed in."""

  filters: int
  conv: Any
  norm: Any
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3))(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """A list attribute (unhashable module) and a ``train: bool = True`` flag."""

  stage_sizes: Sequence[int]
  num_filters: int = 4
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    for i, size in enumerate(self.stage_sizes):
      for _ in range(size):
        x = ResNetBlock(self.num_filters * 2 ** i, conv=conv, norm=norm)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class AttributeFlagNet(nn.Module):
  """The mode is a module attribute, not a call argument."""

  train: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not self.train)(x)
    x = nn.relu(x)
    x = nn.Conv(2, (3, 3))(x)
    return nn.BatchNorm(use_running_average=not self.train)(x)


class TrainingFlagNet(nn.Module):
  """``training`` without a default, with dropout."""

  @nn.compact
  def __call__(self, x, training: bool):
    x = nn.Dense(5)(x)
    x = nn.BatchNorm(use_running_average=not training)(x)
    x = nn.Dropout(0.5, deterministic=not training)(nn.relu(x))
    x = nn.Dense(3)(x)
    return nn.BatchNorm(use_running_average=not training)(x)


class IsTrainingNet(nn.Module):
  """``is_training`` with a default of True (train mode unless told)."""

  @nn.compact
  def __call__(self, x, is_training: bool = True):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not is_training)(x)
    x = nn.Dense(2)(nn.relu(x))
    return nn.BatchNorm(use_running_average=not is_training)(x)


class DeterministicNet(nn.Module):
  """A keyword-only ``deterministic`` flag, BatchNorm given it at call time."""

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm()(x, use_running_average=deterministic)
    x = nn.Dropout(0.3)(nn.relu(x), deterministic=deterministic)
    x = nn.Dense(3)(x)
    return nn.BatchNorm()(x, use_running_average=deterministic)


class MLP(nn.Module):
  """An MLP on [N, F] with setup-style submodules."""

  hidden: Sequence[int] = (6, 4)

  def setup(self):
    self.denses = [nn.Dense(h) for h in self.hidden]
    self.norms = [nn.BatchNorm(momentum=0.99) for _ in self.hidden]

  def __call__(self, x, train: bool = False):
    for dense, norm in zip(self.denses, self.norms):
      x = nn.relu(norm(dense(x), use_running_average=not train))
    return x


class Conv1D(nn.Module):
  """1-D convolutions on [N, L, C]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3,))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Conv(3, (3,), strides=2)(nn.relu(x))
    return nn.BatchNorm(use_running_average=not train)(x)


class Conv3D(nn.Module):
  """3-D convolutions on [N, D, H, W, C]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (3, 3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Conv(2, (2, 2, 2), strides=2)(nn.relu(x))
    return nn.BatchNorm(use_running_average=not train)(x)


class _Block(nn.Module):
  train: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    y = nn.Dense(x.shape[-1])(x)
    y = nn.BatchNorm(use_running_average=not self.train)(y)
    return x + nn.relu(y), None


class LiftedNet(nn.Module):
  """``nn.remat`` around one block and ``nn.scan`` over three more."""

  train: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4)(x)
    x, _ = nn.remat(_Block)(self.train, name="remat_block")(x)
    scan = nn.scan(_Block, variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
                   split_rngs={"params": True}, length=3)
    x, _ = scan(self.train, name="scanned")(x, None)
    return nn.BatchNorm(use_running_average=not self.train, name="head_bn")(x)


class MaskedNet(nn.Module):
  """Sequences [N, L, F] with padding: BatchNorm statistics only where the
  mask (from the second input, the lengths) is set."""

  @nn.compact
  def __call__(self, x, lengths, train: bool = False):
    mask = (jnp.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
    x = nn.Dense(3)(x)
    x = nn.BatchNorm(use_running_average=not train)(x, mask=mask)
    x = nn.Dense(2)(nn.relu(x))
    return nn.BatchNorm(use_running_average=not train)(x, mask=mask)


class ChannelsFirst(nn.Module):
  """[N, C, H, W] with ``BatchNorm(axis=1)``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.moveaxis(nn.Conv(3, (3, 3))(jnp.moveaxis(x, 1, -1)), -1, 1)
    x = nn.BatchNorm(use_running_average=not train, axis=1)(x)
    x = jnp.moveaxis(nn.Conv(2, (3, 3))(jnp.moveaxis(nn.relu(x), 1, -1)), -1, 1)
    return nn.BatchNorm(use_running_average=not train, axis=1)(x)


class MyBatchNorm(nn.BatchNorm):
  """A subclass with its own defaults, as model zoos ship."""

  epsilon: float = 1e-3
  momentum: float = 0.997


class ForkedBatchNorm(nn.Module):
  """A fork that is not an ``nn.BatchNorm``: its own arithmetic, ``mean`` and
  ``var`` in ``batch_stats``, epsilon 1e-2 inside the square root."""

  use_running_average: bool = False
  momentum: float = 0.9

  @nn.compact
  def __call__(self, inputs):
    c = inputs.shape[-1]
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    var = self.variable("batch_stats", "var", jnp.ones, (c,))
    gamma = self.param("gamma", nn.initializers.ones, (c,))
    beta = self.param("beta", nn.initializers.zeros, (c,))
    if self.use_running_average:
      m, v = mean.value, var.value
    else:
      axes = tuple(range(inputs.ndim - 1))
      m, v = inputs.mean(axes), inputs.var(axes)
      if not self.is_initializing():
        mean.value = self.momentum * mean.value + (1 - self.momentum) * m
        var.value = self.momentum * var.value + (1 - self.momentum) * v
    return (inputs - m) / jnp.sqrt(v + 1e-2) * gamma + beta


class SubclassAndFork(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (3, 3))(x)
    x = MyBatchNorm(use_running_average=not train, name="sub")(x)
    x = nn.Conv(2, (3, 3))(nn.relu(x))
    return ForkedBatchNorm(use_running_average=not train, name="fork")(x)


class Conditioned(nn.Module):
  """Two inputs: an image and a conditioning vector added after the first norm."""

  @nn.compact
  def __call__(self, image, cond, train: bool = False):
    x = nn.Conv(3, (3, 3))(image)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = x + nn.Dense(3)(cond)[:, None, None, :]
    x = nn.Conv(2, (3, 3))(nn.relu(x))
    return nn.BatchNorm(use_running_average=not train)(x)


# Every BatchNorm-like class above, for the tests' own recording of BN inputs.
BATCH_NORMS = (nn.BatchNorm, ForkedBatchNorm)


def _recorder(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name == "__call__" and isinstance(module, nn.Dropout):
    return args[0] if args else kwargs["inputs"]  # dropout off in every recording
  if context.method_name == "__call__" and isinstance(module, BATCH_NORMS):
    x = args[0] if args else next(iter(kwargs.values()))
    module.sow("intermediates", "bn_input", x)
    mask = kwargs.get("mask")
    module.sow("intermediates", "bn_mask",
               jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape))
  return next_fun(*args, **kwargs)


def bn_inputs(model, variables, inputs, kwargs, train=False):
  """{path: (input, mask)} of every BatchNorm call, float64, by this test's own
  interceptor in an ordinary model.apply."""
  mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
  with nn.intercept_methods(_recorder):
    _, state = model.apply(variables, *inputs, mutable=mutable, **kwargs)
  flat = traverse_util.flatten_dict(state["intermediates"])
  return {"/".join(k[:-1]): (np.asarray(v[0], np.float64), np.asarray(flat[k[:-1] + ("bn_mask",)][0]))
          for k, v in flat.items() if k[-1] == "bn_input"}


