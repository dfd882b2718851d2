"""Pixel-level adaptation: CycleGAN translators of target images into the
source style, trained many at once, and measures of what they do to images.

A translator is two ResNet generators (target -> source, source -> target)
and two PatchGAN discriminators trained with the least-squares adversarial
loss, the cycle loss and the identity loss (Zhu et al., ICCV 2017,
:cite:`zhu2017cyclegan`), optionally with the semantic-consistency loss of
CyCADA (Hoffman et al., ICML 2018, :cite:`hoffman2018cycada`) and Gaussian
noise on the discriminators' inputs annealed to 0. The target images,
translated into the source style, are segmented by the unchanged source model
(:func:`translate`): the alternative to BatchNorm adaptation.

:func:`train_translators` trains K translators (one per target domain, the
same source images) in one compiled program: a stack mapped as
:mod:`bnjax.stacking` maps models (``vmap``, or unrolled on CPU) and, past
one device, sharded over a mesh; translator i equals a training of K = 1 with
key ``keys[i]``, step for step. Training runs ``steps_per_call`` steps per
compiled call (``lax.scan``), checks every loss after each call (a
non-finite one stops with a ``FloatingPointError`` naming the step, the
translator and the loss) and, with a ``workdir``, saves a checkpoint that a
second call resumes from; a resumed training equals an uninterrupted one.
The program is compiled once per network shape and switch (what
:class:`CycleGANConfig` lists as structural); the loss weights, the noise,
the learning rate and its schedule, and the number of steps reach it as
arrays (as optax's ``inject_hyperparams`` carries them), so a training with
other values of them reuses it.

Images are float in [0, 1]; the networks see ``2 x - 1`` (CycleGAN's
[-1, 1]) and the generators return ``(tanh + 1) / 2``. The L1 losses are
measured on the [-1, 1] scale, as CycleGAN's, so that its weights carry over.

The measures (:func:`checkerboard`, :func:`sharpness`, :func:`edge_overlap`,
:func:`morphology`) are NumPy functions of finished images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
from typing import Any, Literal, NamedTuple, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import _batching
from bnjax import _checks
from bnjax import _modules as _m
from bnjax import checkpoint
from bnjax import compiler
from bnjax import distributed
from bnjax import inference
from bnjax import metrics
from bnjax import progress
from bnjax import stacking

__all__ = ["Up", "UPS", "Generator", "Discriminator", "init_params", "CycleGANConfig", "lsgan_loss",
           "cycle_loss", "identity_loss", "semantic_loss", "noise_sigma", "learning_rate",
           "pool_query", "LOSS_NAMES", "train_translators", "translate", "period2_energy",
           "radial_power", "checkerboard", "Checkerboard", "high_frequency_energy", "sharpness",
           "Sharpness", "edge_overlap", "morphology", "Morphology"]

#: How a generator upsamples: a 3x3 stride-2 transposed convolution (CycleGAN's), or
#: nearest-neighbour x2 then a 3x3 convolution (Odena et al., Distill 2016,
#: :cite:`odena2016deconvolution`).
Up = Literal["transpose", "resize_conv"]
#: The values of :data:`Up`.
UPS: tuple[str, ...] = get_args(Up)

#: The losses recorded at every step, in the order the guard checks them.
LOSS_NAMES: tuple[str, ...] = ("adversarial", "cycle", "identity", "semantic", "generator",
                               "source_critic", "target_critic")

_INIT = nn.initializers.normal(0.02)  # CycleGAN's weight initialisation
_EPS = 1e-5


def _reflect(x, p: int):
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")


def _instance_norm(name=None):
  # CycleGAN's InstanceNorm2d: no affine parameters, no running statistics.
  return nn.InstanceNorm(epsilon=_EPS, use_bias=False, use_scale=False, name=name)


class _ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), padding="VALID", kernel_init=_INIT)(_reflect(x, 1))
    y = nn.relu(_instance_norm()(y))
    y = nn.Conv(self.features, (3, 3), padding="VALID", kernel_init=_INIT)(_reflect(y, 1))
    return x + _instance_norm()(y)


class _Up(nn.Module):
  features: int
  up: str

  @nn.compact
  def __call__(self, x):
    if self.up == "transpose":
      # Kernel 3, stride 2: even and odd output positions receive 2 and 1 taps
      # of each input along an axis, the uneven overlap behind checkerboards.
      x = nn.ConvTranspose(self.features, (3, 3), strides=(2, 2), padding="SAME",
                           kernel_init=_INIT)(x)
    else:
      n, h, w, c = x.shape
      x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "nearest")
      x = nn.Conv(self.features, (3, 3), padding="VALID", kernel_init=_INIT)(_reflect(x, 1))
    return nn.relu(_instance_norm()(x))


class Generator(nn.Module):
  """CycleGAN's ResNet generator: c7s1-f, two stride-2 downsamplings (2f, 4f),
  ``n_blocks`` residual blocks (reflection padding), two upsamplings (2f, f),
  c7s1-channels, tanh; InstanceNorm without affine parameters.

  Attributes:
    features: f, the width of the first layer (CycleGAN: 64).
    n_blocks: residual blocks (CycleGAN: 9 at 256x256, 6 at 128x128).
    up: ``"transpose"`` or ``"resize_conv"`` (:data:`Up`).
    channels: channels of the output images (those of the input images).

  ``__call__(x)`` maps images float[n, H, W, C] in [0, 1] (H, W multiples of
  4) to images of the same shape in [0, 1]; ``encode(x)`` returns the
  features after the residual blocks, float[n, H/4, W/4, 4f], and
  ``decode(h)`` the images made from such features (the upsampling path).
  """

  features: int = 64
  n_blocks: int = 9
  up: Up = "transpose"
  channels: int = 1

  def setup(self):
    """The layers (``up`` checked first)."""
    _checks.choice("up", self.up, UPS)
    f = self.features
    self.stem = nn.Conv(f, (7, 7), padding="VALID", kernel_init=_INIT)
    self.downs = [nn.Conv(f * 2 ** (i + 1), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                          kernel_init=_INIT) for i in range(2)]
    self.blocks = [_ResBlock(4 * f) for _ in range(self.n_blocks)]
    self.ups = [_Up(f * 2 ** (1 - i), self.up) for i in range(2)]
    self.head = nn.Conv(self.channels, (7, 7), padding="VALID", kernel_init=_INIT)
    self.norms = [_instance_norm() for _ in range(3)]

  def encode(self, x):
    """Images float[n, H, W, C] in [0, 1] -> features float[n, H/4, W/4, 4f]."""
    x = 2.0 * x - 1.0
    x = nn.relu(self.norms[0](self.stem(_reflect(x, 3))))
    for down, norm in zip(self.downs, self.norms[1:]):
      x = nn.relu(norm(down(x)))
    for block in self.blocks:
      x = block(x)
    return x

  def decode(self, h):
    """Features float[n, h, w, 4f] -> images float[n, 4h, 4w, channels] in [0, 1]."""
    for up in self.ups:
      h = up(h)
    return (jnp.tanh(self.head(_reflect(h, 3))) + 1.0) / 2.0

  def __call__(self, x):
    return self.decode(self.encode(x))


class Discriminator(nn.Module):
  """PatchGAN discriminator (CycleGAN's ``n_layers`` = ``layers``): 4x4
  convolutions, f without normalisation then doubling widths (at most 8f) with
  InstanceNorm, LeakyReLU 0.2, stride 2 for ``layers`` convolutions then
  stride 1, and a 1-channel 4x4 output. ``__call__(x)``: images float[n, H,
  W, C] in [0, 1] -> float[n, h, w] patch scores (least squares: 1 real, 0
  fake). CycleGAN's 70x70 PatchGAN is ``Discriminator(64, 3)``."""

  features: int = 64
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    pad = ((1, 1), (1, 1))
    x = 2.0 * x - 1.0
    x = nn.leaky_relu(nn.Conv(self.features, (4, 4), strides=(2, 2), padding=pad,
                              kernel_init=_INIT)(x), 0.2)
    for i in range(1, self.layers + 1):
      stride = 2 if i < self.layers else 1
      x = nn.Conv(self.features * min(2 ** i, 8), (4, 4), strides=(stride, stride), padding=pad,
                  kernel_init=_INIT)(x)
      x = nn.leaky_relu(_instance_norm()(x), 0.2)
    return nn.Conv(1, (4, 4), padding=pad, kernel_init=_INIT)(x)[..., 0]


# --------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class CycleGANConfig:
  """Training settings of a translator (defaults: CycleGAN's, except the
  length, which is counted in steps).

  Runtime values: ``steps``, ``learning_rate``, ``beta1``,
  ``decay_fraction``, ``lambda_cycle``, ``lambda_identity``,
  ``lambda_semantic``, ``noise_sigma`` and ``noise_fraction`` reach the
  compiled training step as arrays, so changing them reuses a compiled
  program. Structural: ``batch_size``, ``pool_size``, the networks
  (``features``, ``n_blocks``, ``up``, ``disc_features``, ``disc_layers``),
  the length of a call (``steps_per_call``, and the shorter last call when it
  does not divide ``steps``) and three switches, whether the identity loss is
  computed (its weight is not 0: a weight of 0 skips two generator passes),
  whether a semantic loss exists (``lambda_semantic > 0``: it needs the
  segmenter inside the program) and whether noise is drawn (``noise_sigma >
  0``); changing one of these compiles another program.

  Attributes:
    steps: optimisation steps (one batch of source and one of target images,
      drawn independently, each step).
    batch_size: images of each domain per step (CycleGAN: 1).
    learning_rate: Adam's step size, constant for the first ``1 -
      decay_fraction`` of the steps, then linearly to 0 (CycleGAN: 2e-4, 100
      epochs constant then 100 decaying).
    beta1: Adam's beta1 (CycleGAN: 0.5; beta2 is 0.999).
    decay_fraction: the share of the steps over which the rate decays, [0, 1].
    lambda_cycle: weight of the cycle loss (CycleGAN: 10).
    lambda_identity: weight of the identity loss; None means ``0.5 *
      lambda_cycle`` (CycleGAN's ``lambda_identity = 0.5``), 0 turns it off.
    lambda_semantic: weight of CyCADA's semantic-consistency loss (0: off;
      > 0 needs a ``segmenter`` in :func:`train_translators`).
    pool_size: past fakes kept for the discriminators (0: none; CycleGAN: 50).
    noise_sigma: standard deviation (on the [0, 1] image scale) of Gaussian
      noise added to every discriminator input at step 0 (0: off).
    noise_fraction: the noise decays linearly to 0 over this share of the
      steps, (0, 1].
    features, n_blocks, up: the generators (:class:`Generator`).
    disc_features, disc_layers: the discriminators (:class:`Discriminator`).
    steps_per_call: steps in one compiled call; the non-finite-loss guard,
      the progress line and the checkpoints act between calls.
    verbose: progress on stderr.
  """

  steps: int = 1000
  batch_size: int = 1
  learning_rate: float = 2e-4
  beta1: float = 0.5
  decay_fraction: float = 0.5
  lambda_cycle: float = 10.0
  lambda_identity: float | None = None
  lambda_semantic: float = 0.0
  pool_size: int = 50
  noise_sigma: float = 0.0
  noise_fraction: float = 0.5
  features: int = 64
  n_blocks: int = 9
  up: Up = "transpose"
  disc_features: int = 64
  disc_layers: int = 3
  steps_per_call: int = 50
  verbose: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "features", "disc_features", "disc_layers",
                 "steps_per_call"):
      _checks.positive_int(f"CycleGANConfig.{name}", getattr(self, name))
    for name in ("n_blocks", "pool_size"):
      _checks.positive_int(f"CycleGANConfig.{name}", getattr(self, name), minimum=0)
    for name in ("learning_rate", "lambda_cycle", "lambda_semantic", "noise_sigma"):
      _checks.number(f"CycleGANConfig.{name}", getattr(self, name))
    if self.lambda_identity is not None:
      _checks.number("CycleGANConfig.lambda_identity", self.lambda_identity, what=" or None")
    if not 0.0 <= self.beta1 < 1.0:
      raise ValueError(f"CycleGANConfig.beta1 must be in [0, 1), got {self.beta1}")
    if not 0.0 <= self.decay_fraction <= 1.0:
      raise ValueError(
          f"CycleGANConfig.decay_fraction must be in [0, 1], got {self.decay_fraction}")
    if not 0.0 < self.noise_fraction <= 1.0:
      raise ValueError(
          f"CycleGANConfig.noise_fraction must be in (0, 1], got {self.noise_fraction}")
    if self.up not in UPS:
      raise ValueError(f"CycleGANConfig.up must be one of {UPS}, got {self.up!r}")

  @property
  def identity_weight(self) -> float:
    """The identity loss's weight: ``lambda_identity``, or ``0.5 * lambda_cycle``."""
    return 0.5 * self.lambda_cycle if self.lambda_identity is None else float(self.lambda_identity)

  def generator(self, channels: int = 1) -> Generator:
    return Generator(self.features, self.n_blocks, self.up, channels)

  def discriminator(self) -> Discriminator:
    return Discriminator(self.disc_features, self.disc_layers)

  def check_images(self, height: int, width: int) -> None:
    """ValueError unless images of ``height`` x ``width`` fit the networks:
    multiples of 4 (two stride-2 steps), larger than the generator's 7x7
    reflection padding at every scale, and leaving the discriminator at least
    one patch."""
    if height % 4 or width % 4:
      raise ValueError(f"images must have a height and width that are multiples of 4 (two "
                       f"stride-2 downsamplings), got {height}x{width}")
    if min(height, width) < 8:
      raise ValueError(f"images must be at least 8x8 for the generator, got {height}x{width}")
    side = min(height, width)
    for i in range(self.disc_layers + 1):
      side = side // 2 if i < self.disc_layers else side - 1
    if side - 1 < 1:
      raise ValueError(
          f"images of {height}x{width} leave no patch for a discriminator of "
          f"disc_layers={self.disc_layers}; use fewer layers or larger images")


# --------------------------------------------------------------------------
# Losses and schedules (pure functions)


def lsgan_loss(scores, real: bool):
  """Least-squares GAN loss (:cite:t:`mao2017lsgan`): ``mean((scores - 1)^2)`` for
  ``real``, ``mean(scores^2)`` for fake."""
  target = 1.0 if real else 0.0
  return jnp.mean(jnp.square(scores - target))


def cycle_loss(images, reconstructed):
  """L1 between images in [0, 1] and their reconstructions, on CycleGAN's
  [-1, 1] scale: ``mean |2 x - 2 x'|``."""
  return 2.0 * jnp.mean(jnp.abs(images - reconstructed))


def identity_loss(images, mapped):
  """L1 (on the [-1, 1] scale) between images of a domain and what the
  generator *into* that domain makes of them: a generator should leave
  images already in its output domain unchanged."""
  return cycle_loss(images, mapped)


def semantic_loss(logits_translated, logits_original):
  """CyCADA's semantic consistency: the cross-entropy of the segmenter's
  logits on translated images against its own hard predictions (argmax) on
  the originals, averaged over pixels; no gradient through the originals."""
  labels = jax.lax.stop_gradient(jnp.argmax(logits_original, axis=-1))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_translated, labels))


def _hyperparams(config: CycleGANConfig) -> dict[str, np.ndarray]:
  """The runtime values of ``config`` as the compiled step receives them:
  float32 scalars, int32 for the schedule's step counts, which are computed
  here in Python (``round`` of a double: 0.7 x 45 = 31.499999999999996 rounds
  to 31, where float32 arithmetic would give 31.5 and 32)."""
  decay = int(round(config.decay_fraction * config.steps))
  f32 = lambda v: np.asarray(v, np.float32)
  with np.errstate(over="ignore"):  # a rate beyond float32 is inf, as it was as a constant
    return {"learning_rate": f32(config.learning_rate), "beta1": f32(config.beta1),
            "decay_steps": np.asarray(decay, np.int32),
            "decay_begin": np.asarray(config.steps - decay, np.int32),
            "lambda_cycle": f32(config.lambda_cycle),
            "lambda_identity": f32(config.identity_weight),
            "lambda_semantic": f32(config.lambda_semantic),
            "noise_sigma": f32(config.noise_sigma),
            "noise_span": f32(config.noise_fraction * config.steps)}


def _learning_rate_at(hp, count):
  """The learning rate at ``count`` from :func:`_hyperparams` arrays: optax's
  ``linear_schedule(learning_rate, 0, decay_steps, transition_begin=
  decay_begin)`` written on arrays (constant when ``decay_steps`` is 0)."""
  decay = hp["decay_steps"]
  done = jnp.clip(count - hp["decay_begin"], 0, decay)
  return hp["learning_rate"] * (1 - done / jnp.maximum(decay, 1))


def _noise_at(hp, step):
  return hp["noise_sigma"] * jnp.maximum(
      0.0, 1.0 - jnp.asarray(step, jnp.float32) / hp["noise_span"])


def noise_sigma(config: CycleGANConfig, step):
  """The discriminators' input noise at ``step`` (0-based): ``noise_sigma *
  max(0, 1 - step / (noise_fraction * steps))`` (float32, as in training)."""
  return _noise_at(_hyperparams(config), step)


def learning_rate(config: CycleGANConfig):
  """The schedule (an optax schedule, ``count -> float32`` rate, the one
  training uses): ``learning_rate`` for ``steps - round(decay_fraction *
  steps)`` steps, then linearly to 0 at ``steps``."""
  hp = _hyperparams(config)
  return lambda count: _learning_rate_at(hp, jnp.asarray(count, jnp.int32))


def pool_query(pool, count, images, key):
  """CycleGAN's image pool, as a pure function: ``(pool, count, images, key)
  -> (pool, count, out)``. Image by image: while the pool holds fewer than
  its size, the image is stored and returned; then with probability 1/2 a
  stored image drawn at random is returned and replaced by the new one,
  otherwise the new image is returned. ``pool``: float[size, H, W, C]. The
  coins and slots come from ``uniform(key, (n, 2))``: image j swaps when
  ``u[j, 0] > 0.5``, with slot ``floor(u[j, 1] size)``."""
  size = pool.shape[0]
  if size == 0:
    return pool, count, images

  # One draw for the whole batch (each threefry call costs XLA:CPU about a
  # second of compile time): a swap coin and a slot per image.
  u = jax.random.uniform(key, (images.shape[0], 2))

  def one(carry, inputs):
    pool, count = carry
    image, (u_swap, u_idx) = inputs
    filling = count < size
    swap = u_swap > 0.5
    idx = jnp.minimum((u_idx * size).astype(jnp.int32), size - 1)
    old = pool[idx]
    out = jnp.where(filling | ~swap, image, old)
    slot = jnp.where(filling, jnp.minimum(count, size - 1), idx)
    pool = pool.at[slot].set(jnp.where(filling | swap, image, pool[slot]))
    return (pool, count + filling.astype(count.dtype)), out

  (pool, count), out = jax.lax.scan(one, (pool, count), (images, (u[:, 0], u[:, 1])))
  return pool, count, out


# --------------------------------------------------------------------------
# One translator's training state and step


class _State(NamedTuple):
  params: Any  # {"to_source", "to_target", "source_critic", "target_critic"}
  opt_g: Any
  opt_d: Any
  pool_s: Any
  count_s: Any
  pool_t: Any
  count_t: Any


class _Structure(NamedTuple):
  """What shapes the compiled training program (its compile key); every other
  setting reaches it as an array (:func:`_hyperparams`)."""

  batch_size: int
  pool_size: int
  features: int
  n_blocks: int
  up: str
  disc_features: int
  disc_layers: int
  identity: bool  # the identity loss is computed (its weight is not 0)
  semantic: bool  # the semantic loss exists (lambda_semantic > 0, a segmenter)
  noise: bool     # noise is drawn for the discriminators' inputs

  @classmethod
  def of(cls, config: CycleGANConfig) -> "_Structure":
    return cls(config.batch_size, config.pool_size, config.features, config.n_blocks, config.up,
               config.disc_features, config.disc_layers, config.identity_weight != 0,
               config.lambda_semantic > 0, config.noise_sigma > 0)

  def generator(self, channels: int) -> Generator:
    return Generator(self.features, self.n_blocks, self.up, channels)

  def discriminator(self) -> Discriminator:
    return Discriminator(self.disc_features, self.disc_layers)


def _optimizer(hp=None):
  """Adam (beta2 0.999) with the learning-rate schedule, its rate and beta1
  from the arrays ``hp``; without ``hp``, an optimizer good only for
  ``init`` (the state does not depend on the values)."""
  if hp is None:
    hp = _hyperparams(CycleGANConfig())
  return optax.adam(lambda count: _learning_rate_at(hp, count), b1=hp["beta1"], b2=0.999)


def init_params(module: nn.Module, key, x) -> dict:
  """``module``'s ``params`` (for inputs shaped like ``x``) as CycleGAN
  initialises them: every kernel from N(0, 0.02^2), every bias 0. The
  normals come from one draw, cut into the kernels in the order of the
  flattened tree (threefry calls are slow to compile on XLA:CPU, one per
  kernel cost seconds)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  is_kernel = [str(getattr(path[-1], "key", path[-1])) == "kernel" for path, _ in flat]
  sizes = [int(np.prod(leaf.shape)) for (_, leaf), k in zip(flat, is_kernel) if k]
  draw = 0.02 * jax.random.normal(key, (sum(sizes),), jnp.float32)
  pieces = iter(jnp.split(draw, np.cumsum(sizes)[:-1]))
  leaves = [next(pieces).reshape(leaf.shape) if k else jnp.zeros(leaf.shape, leaf.dtype)
            for (_, leaf), k in zip(flat, is_kernel)]
  return treedef.unflatten(leaves)


def _init(structure: _Structure, channels, image_shape, key) -> _State:
  gen, disc = structure.generator(channels), structure.discriminator()
  k = jax.random.split(key, 4)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = {"to_source": init_params(gen, k[0], x), "to_target": init_params(gen, k[1], x),
            "source_critic": init_params(disc, k[2], x),
            "target_critic": init_params(disc, k[3], x)}
  tx = _optimizer()
  gp = {n: params[n] for n in ("to_source", "to_target")}
  dp = {n: params[n] for n in ("source_critic", "target_critic")}
  pool = jnp.zeros((structure.pool_size, *image_shape), jnp.float32)
  zero = jnp.zeros((), jnp.int32)
  return _State(params, tx.init(gp), tx.init(dp), pool, zero, pool, zero)


def _step(structure: _Structure, channels, segmenter, hp, state: _State, source, target,
          seg_vars, key, step):
  """One step: both generators, then both discriminators (on pooled fakes
  made by the generators before their update, as CycleGAN does). ``hp``:
  the runtime values (:func:`_hyperparams`), arrays."""
  gen, disc, tx = structure.generator(channels), structure.discriminator(), _optimizer(hp)
  # Few random draws per step: each threefry call costs XLA:CPU about a second
  # of compile time.
  k_pick, k_ps, k_pt, k_noise = jax.random.split(key, 4)
  b = structure.batch_size
  u = jax.random.uniform(k_pick, (2, b))
  pick = lambda images, v: images[jnp.minimum((v * images.shape[0]).astype(jnp.int32),
                                              images.shape[0] - 1)]
  s, t = pick(source, u[0]), pick(target, u[1])
  if structure.noise:
    noise = _noise_at(hp, step) * jax.random.normal(k_noise, (6, *s.shape), s.dtype)
    noisy = lambda i, x: x + noise[i]
  else:
    noisy = lambda i, x: x
  g_apply = lambda p, x: gen.apply({"params": p}, x)
  d_apply = lambda p, x: disc.apply({"params": p}, x)
  dp = {n: state.params[n] for n in ("source_critic", "target_critic")}
  w_cyc, w_id, w_sem = hp["lambda_cycle"], hp["lambda_identity"], hp["lambda_semantic"]

  def g_loss(gp):
    fake_s, fake_t = g_apply(gp["to_source"], t), g_apply(gp["to_target"], s)
    adversarial = (lsgan_loss(d_apply(dp["source_critic"], noisy(0, fake_s)), True)
                   + lsgan_loss(d_apply(dp["target_critic"], noisy(1, fake_t)), True))
    cycle = (cycle_loss(t, g_apply(gp["to_target"], fake_s))
             + cycle_loss(s, g_apply(gp["to_source"], fake_t)))
    identity = (identity_loss(s, g_apply(gp["to_source"], s))
                + identity_loss(t, g_apply(gp["to_target"], t))) if structure.identity else (
                    jnp.zeros(()))
    if structure.semantic:
      seg = lambda x: segmenter.apply(seg_vars, x, train=False)
      semantic = semantic_loss(seg(fake_s), seg(t))
    else:
      semantic = jnp.zeros(())
    total = adversarial + w_cyc * cycle + w_id * identity + w_sem * semantic
    return total, (dict(adversarial=adversarial, cycle=cycle, identity=identity,
                        semantic=semantic, generator=total), fake_s, fake_t)

  gp = {n: state.params[n] for n in ("to_source", "to_target")}
  (_, (losses, fake_s, fake_t)), grads = jax.value_and_grad(g_loss, has_aux=True)(gp)
  updates, opt_g = tx.update(grads, state.opt_g, gp)
  gp = optax.apply_updates(gp, updates)

  pool_s, count_s, old_s = pool_query(state.pool_s, state.count_s,
                                      jax.lax.stop_gradient(fake_s), k_ps)
  pool_t, count_t, old_t = pool_query(state.pool_t, state.count_t,
                                      jax.lax.stop_gradient(fake_t), k_pt)

  def d_loss(dp):
    d_s = 0.5 * (lsgan_loss(d_apply(dp["source_critic"], noisy(2, s)), True)
                 + lsgan_loss(d_apply(dp["source_critic"], noisy(3, old_s)), False))
    d_t = 0.5 * (lsgan_loss(d_apply(dp["target_critic"], noisy(4, t)), True)
                 + lsgan_loss(d_apply(dp["target_critic"], noisy(5, old_t)), False))
    return d_s + d_t, (d_s, d_t)

  (_, (d_s, d_t)), grads = jax.value_and_grad(d_loss, has_aux=True)(dp)
  updates, opt_d = tx.update(grads, state.opt_d, dp)
  dp = optax.apply_updates(dp, updates)
  losses = dict(losses, source_critic=d_s, target_critic=d_t)
  new = _State({**gp, **dp}, opt_g, opt_d, pool_s, count_s, pool_t, count_t)
  return new, jnp.stack([losses[n] for n in LOSS_NAMES])


def _run_steps(structure: _Structure, channels, segmenter, n_steps, state, data_key, source,
               target, seg_vars, hp, start):
  """``n_steps`` steps from step ``start`` (traced) of one translator; the
  keys of step s are ``fold_in(data_key, s)``, whatever the chunking."""

  def body(state, i):
    step = start + i
    return _step(structure, channels, segmenter, hp, state, source, target, seg_vars,
                 jax.random.fold_in(data_key, step), step)

  return jax.lax.scan(body, state, jnp.arange(n_steps, dtype=jnp.int32))


# --------------------------------------------------------------------------
# K translators


def _keys_of(key, k: int):
  _checks.key(key)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    return jax.random.split(key, k)
  if key.shape != (k,):
    raise ValueError(f"key must be one PRNG key or {k} keys (one per target set), got a key "
                     f"array of shape {key.shape}")
  return key


def _fingerprint(config, keys, source, target, seg_vars, strategy) -> str:
  h = hashlib.sha256()
  settings = dataclasses.asdict(config)
  settings.pop("verbose")
  settings.pop("steps_per_call")
  h.update(repr(sorted(settings.items())).encode())
  h.update(strategy.encode())
  for leaf in jax.tree_util.tree_leaves((jax.random.key_data(keys), source, target, seg_vars)):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(repr((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _save(path, state, k: int, history, step, fingerprint):
  leaves = [a[:k] for a in jax.tree_util.tree_leaves(distributed.gather(state))]
  tree = {"state": {f"{i:05d}": np.asarray(a) for i, a in enumerate(leaves)},
          "history": {"losses": np.asarray(history)}}
  checkpoint.save(path, tree, step=int(step), fingerprint=fingerprint)


def _restore(path, fingerprint, template):
  """(state, history, step) from a checkpoint at ``path``, or None."""
  if not os.path.isfile(os.path.join(path, checkpoint.MANIFEST)):
    return None
  meta = checkpoint.metadata(path)
  if meta.get("fingerprint") != fingerprint:
    raise ValueError(
        f"the workdir's checkpoint {path!r} belongs to another training (other settings, "
        "keys or images); use another workdir or delete it to start again")
  tree = checkpoint.restore(path)
  flat = tree["state"]
  leaves, treedef = jax.tree_util.tree_flatten(template)
  restored = [jnp.asarray(flat[f"{i:05d}"], dtype=a.dtype) for i, a in enumerate(leaves)]
  return treedef.unflatten(restored), np.asarray(tree["history"]["losses"]), int(meta["step"])


def _log(config, text):
  if config.verbose:
    print(text, file=sys.stderr, flush=True)


def _diverged(losses, step0, k):
  """FloatingPointError for the first non-finite loss of ``losses[steps, K, L]``."""
  bad = ~np.isfinite(losses)
  s, i, l = (int(v[0]) for v in np.nonzero(bad))
  value = losses[s, i, l]
  also = [LOSS_NAMES[j] for j in np.flatnonzero(bad[s, i]) if j != l]
  return FloatingPointError(
      f"CycleGAN training diverged at step {step0 + s + 1}"
      + (f" (translator {i} of {k})" if k > 1 else "")
      + f": the {LOSS_NAMES[l]} loss is {value}"
      + (f" (also non-finite: {', '.join(also)})" if also else "")
      + "; lower learning_rate, or add noise_sigma to slow the discriminators early")


def train_translators(key, source_images, target_images_stack,
                      config: CycleGANConfig = CycleGANConfig(), *, segmenter=None,
                      strategy: stacking.Strategy = "auto", devices=None,
                      workdir: str | os.PathLike | None = None,
                      checkpoint_every: int | None = None):
  """Trains K CycleGAN translators at once, translator i between
  ``source_images`` and ``target_images_stack[i]`` (unpaired).

  Args:
    key: one PRNG key (split into K) or K keys (a key array of shape [K]);
      translator i is what a call with K = 1 and key ``keys[i:i + 1]`` trains.
    source_images: float[n_s, H, W, C] (or [n_s, H, W]) in [0, 1], shared by
      every translator, or float[K, n_s, H, W, C]: translator i's own.
    target_images_stack: float[K, n_t, H, W, C] in [0, 1].
    config: a :class:`CycleGANConfig`.
    segmenter: ``(model, variables)`` of the frozen source segmenter
      (``model.apply(variables, x, train=False) -> logits[n, H, W, classes]``);
      needed when ``config.lambda_semantic > 0``.
    strategy: ``"auto"``, ``"vmap"`` or ``"unroll"`` (:mod:`bnjax.stacking`).
    devices: devices to shard the translator axis over (default: all).
    workdir: a folder for the checkpoint (``workdir/cyclegan``); a call with a
      checkpoint of the same training there resumes from it.
    checkpoint_every: steps between checkpoints (rounded up to whole calls of
      ``steps_per_call``; default: every call). Needs ``workdir``.

  Returns:
    ``(translators, history)``: a dict ``{"to_source", "to_target",
    "source_critic", "target_critic"}`` of stacked ``params`` (leading axis K;
    apply ``config.generator(C)`` with ``{"params": translators["to_source"]
    [i]}``, or call :func:`translate`), and a history with ``losses``
    float[steps, K, 7] (the :data:`LOSS_NAMES`), ``seconds`` (training time
    of this call), ``steps_run`` (steps this call ran; fewer than ``steps``
    after a resume) and ``images_per_second`` (each translator's target
    images, ``steps_run x batch_size``, over ``seconds``: with K translators
    in one call, K times this many images went through in that time).

  Raises:
    ValueError: bad images, keys or settings (before anything is compiled).
    FloatingPointError: a loss went non-finite; names the step, translator
      and loss.
  """
  if not isinstance(config, CycleGANConfig):
    raise ValueError(f"config must be a CycleGANConfig, got {type(config).__name__}")
  per_translator = np.ndim(source_images) == 5
  if (not per_translator and np.ndim(target_images_stack) == np.ndim(source_images) >= 4
      and np.shape(target_images_stack)[-3:] == np.shape(source_images)[-3:]):
    # (one set [n, H, W, C] where a stack is wanted: named before a channel
    # axis is added and the shapes no longer say what was passed)
    raise ValueError(
        f"target_images_stack must be a stack of K target sets [K, n, H, W, C]; got one set "
        f"of shape {np.shape(target_images_stack)} (the K axis is missing): pass "
        "target_images_stack[None] for one translator, or np.stack(target_sets)")
  source = _checks.images(source_images, name="source_images", stacked=per_translator)
  target = _checks.images(target_images_stack, name="target_images_stack", stacked=True)
  if source.shape[-3:] != target.shape[2:]:
    raise ValueError(f"source_images [n, H, W, C] (or [K, n, H, W, C]) and target_images_stack "
                     f"[K, n, H, W, C] must share H, W, C: got {source.shape} and "
                     f"{target.shape}")
  k = target.shape[0]
  if per_translator and source.shape[0] != k:
    raise ValueError(f"source_images of shape {source.shape} hold {source.shape[0]} sets for "
                     f"{k} target sets: pass one source set [n, H, W, C] or one per target set")
  config.check_images(*source.shape[-3:-1])
  keys = _keys_of(key, k)
  if config.lambda_semantic > 0:
    if segmenter is None or len(segmenter) != 2:
      raise ValueError("segmenter must be (model, variables) when lambda_semantic > 0")
    seg_model, seg_vars = segmenter
  else:
    seg_model, seg_vars = None, {}
  if checkpoint_every is not None:
    checkpoint_every = _checks.positive_int("checkpoint_every", checkpoint_every)
    if workdir is None:
      raise ValueError("checkpoint_every needs a workdir to write the checkpoints to")
  strategy = stacking.resolve(strategy)
  distributed.check_same("the images given to train_translators", (source, target))
  channels = source.shape[-1]
  image_shape = tuple(source.shape[-3:])

  mesh = stacking.make_mesh(devices)
  k_pad = stacking.padded_size(k, mesh)
  per_device = k_pad // (1 if mesh is None else mesh.size)

  # The compile key holds only what shapes the program (_Structure); the
  # runtime values travel as arrays, so other weights, rates, noise or steps
  # reuse it. build() sees no config: nothing of one call's values can leak
  # into a program another call reuses.
  structure = _Structure.of(config)

  def build():
    def program(n_steps):
      def cyclegan_steps(state, dk, src, tgt, sv, hp, start):
        return _run_steps(structure, channels, seg_model, n_steps, state, dk, src, tgt, sv, hp,
                          start)
      return stacking.sharded_jit(
          stacking.stacked(cyclegan_steps, strategy,
                           in_axes=(0, 0, 0, 0, 0 if seg_model else None, 0, 0)),
          mesh, donate=(0,),
          xla_defaults=compiler.unrolled_stack(strategy, per_device))
    init = jax.jit(jax.vmap(lambda kk: _init(structure, channels, image_shape, kk)))
    return {"init": init, "programs": {}, "program": program}

  devices_id = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
  loop = _m.cached(seg_model, ("cyclegan", structure, channels, image_shape, strategy,
                               devices_id, k_pad), build)

  init_keys, data_keys = (jnp.stack(a) for a in zip(*[jax.random.split(kk) for kk in keys]))
  state = loop["init"](init_keys)
  history = np.zeros((0, k, len(LOSS_NAMES)), np.float32)
  done = 0
  path = None if workdir is None else os.path.join(os.fspath(workdir), "cyclegan")
  fingerprint = None
  if path is not None:
    fingerprint = _fingerprint(config, keys, source, target, seg_vars, strategy)
    restored = _restore(path, fingerprint, state)
    if restored is not None:
      state, history, done = restored
      _log(config, f"resuming CycleGAN training from {path} at step {done} of {config.steps}")

  # Every per-translator argument stacked (shared ones repeated) and padded.
  bcast = lambda tree: jax.tree_util.tree_map(
      lambda a: jnp.broadcast_to(a, (k, *jnp.shape(a))), tree)
  hp = {n: np.full((k,), v) for n, v in _hyperparams(config).items()}
  args = (state, data_keys, source if per_translator else bcast(source), target,
          bcast(seg_vars), hp)
  state, data_keys, src, tgt, sv, hp = stacking.place(stacking.pad(args, k_pad), mesh)
  every = checkpoint_every or config.steps_per_call
  bar = progress.Progress(config.steps, f"CycleGAN ({k} translator{'s' * (k > 1)})",
                          interval=30.0) if config.verbose else None
  if bar is not None and done:
    bar.update(done, restored=True)
  chunks = [history]
  start_time = time.perf_counter()
  last_saved = done
  while done < config.steps:
    n = min(config.steps_per_call, config.steps - done)
    if n not in loop["programs"]:
      loop["programs"][n] = loop["program"](n)
    starts = stacking.place(jnp.full((k_pad,), done, jnp.int32), mesh)
    state, losses = loop["programs"][n](state, data_keys, src, tgt, sv, hp, starts)
    losses = np.moveaxis(distributed.gather(losses)[:k], 0, 1)  # [n, K, L]
    if not np.all(np.isfinite(losses)):
      raise _diverged(losses, done, k)
    chunks.append(losses)
    done += n
    if bar is not None:
      bar.update(done, note=f"cycle {float(np.mean(losses[:, :, 1])):.3f}")
    if path is not None and (done - last_saved >= every or done == config.steps):
      _save(path, state, k, np.concatenate(chunks), done, fingerprint)
      last_saved = done
  seconds = time.perf_counter() - start_time
  ran = sum(c.shape[0] for c in chunks[1:])
  if jax.process_count() > 1:  # every process gets every translator, as host arrays
    state = distributed.gather(state)
  params = jax.tree_util.tree_map(lambda a: a[:k], state.params)
  return params, {"losses": np.concatenate(chunks), "seconds": seconds, "steps_run": ran,
                  "images_per_second": ran * config.batch_size / seconds if ran else float("nan")}


def translate(generator: Generator, params, images, batch_size: int = 64) -> np.ndarray:
  """``generator``'s translation of ``images`` (float[n, H, W, C] or [n, H,
  W] in [0, 1]; H, W multiples of 4) with ``params`` (one generator's
  parameters, as in ``translators["to_source"]`` indexed by translator, or
  ``{"params": ...}``); float32[n, H, W, C] in [0, 1], in batches."""
  images = _checks.images(images)
  if images.shape[1] % 4 or images.shape[2] % 4:
    raise ValueError(f"images must have a height and width that are multiples of 4, got "
                     f"{images.shape[1]}x{images.shape[2]}")
  if images.shape[-1] != generator.channels:
    raise ValueError(f"images have {images.shape[-1]} channels, the generator makes "
                     f"{generator.channels}")
  variables = params if isinstance(params, dict) and set(params) == {"params"} else {
      "params": params}
  batch_size = min(_checks.positive_int("batch_size", batch_size), images.shape[0])
  run = _m.cached(generator, ("translate",), lambda: compiler.jit(
      lambda v, x, bs: _batching.padded_map(lambda b: generator.apply(v, b), x, bs),
      static_argnums=(2,)))
  return np.asarray(run(variables, images, batch_size))


# --------------------------------------------------------------------------
# Measures of translated images (NumPy)


def _host_images(images, name: str) -> np.ndarray:
  a = np.asarray(images, np.float64)
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4 or a.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty float[n, H, W, C] (or [n, H, W]) array, got "
                     f"shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} contain NaN or infinite pixels")
  return a


def period2_energy(images) -> np.ndarray:
  """float[n]: the share of each image's energy (its mean removed) at the
  period-2 frequencies a stride-2 upsampling aliases into: with ``X`` the 2-D
  DFT of an image of even H x W, ``(|X(H/2, 0)|^2 + |X(0, W/2)|^2 + |X(H/2,
  W/2)|^2) / sum_{f != 0} |X(f)|^2``, summed over channels. The three
  coefficients are the alternating sums of the pixels (computed as sums of
  differences, exactly 0 on a constant image); the denominator is ``H W
  sum (x - mean)^2`` (Parseval). A constant image has share 0."""
  x = _host_images(images, "images")
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"images must have an even height and width, got {x.shape[1:3]}")
  rows = x[:, 0::2] - x[:, 1::2]
  vertical = rows.sum(axis=(1, 2))                                # X(H/2, 0)
  horizontal = (x[:, :, 0::2] - x[:, :, 1::2]).sum(axis=(1, 2))   # X(0, W/2)
  diagonal = (rows[:, :, 0::2] - rows[:, :, 1::2]).sum(axis=(1, 2))  # X(H/2, W/2)
  nyquist = (vertical ** 2 + horizontal ** 2 + diagonal ** 2).sum(axis=-1)
  h, w = x.shape[1:3]
  ac = h * w * ((x - x.mean(axis=(1, 2), keepdims=True)) ** 2).sum(axis=(1, 2, 3))
  return np.where(ac > 0, nyquist / np.where(ac > 0, ac, 1.0), 0.0)


def _power(x: np.ndarray) -> np.ndarray:
  """float[n, H, W]: ``|X(f)|^2`` of each image's 2-D DFT, summed over channels."""
  return (np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2).sum(axis=-1)


def _radius(h: int, w: int) -> np.ndarray:
  fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
  return np.sqrt(fy ** 2 + fx ** 2)  # cycles per pixel; 0.5 is Nyquist on an axis


def radial_power(images) -> np.ndarray:
  """float[n, R]: each image's power spectrum ``|X(f)|^2 / (H W)`` (summed
  over channels) averaged over the frequencies of each integer radius ``r =
  round(|f| max(H, W))``, r = 0 .. R - 1 with R = max(H, W) // 2 + 1 (the
  azimuthal average of Durall et al., CVPR 2020); radii beyond are dropped."""
  x = _host_images(images, "images")
  h, w = x.shape[1:3]
  power = _power(x) / (h * w)
  r = np.rint(_radius(h, w) * max(h, w)).astype(int).ravel()
  size = max(h, w) // 2 + 1
  keep = r < size
  counts = np.bincount(r[keep], minlength=size)
  flat = power.reshape(power.shape[0], -1)[:, keep]
  sums = np.stack([np.bincount(r[keep], weights=p, minlength=size) for p in flat])
  return sums / np.maximum(counts, 1)


class Checkerboard(NamedTuple):
  """What :func:`checkerboard` measures."""

  period2: float            # mean period-2 share of the images (period2_energy)
  reference_period2: float  # the same of the reference images
  ratio: float              # period2 / reference_period2 (inf when the reference has none)
  spectral_l1: float        # L1 distance of the mean log10 azimuthal power spectra


def checkerboard(images, reference_images) -> Checkerboard:
  """Checkerboard artefacts of translated ``images`` against
  ``reference_images`` (the inputs they were made from, or real images of
  the domain they were translated into): the mean :func:`period2_energy` of
  each and their ratio, and the mean over radii of ``|log10 P_images(r) -
  log10 P_reference(r)|`` where P is the mean over images of
  :func:`radial_power` normalised to sum 1 (the spectral distance of
  :cite:t:`durall2020watch`: up-convolutions distort the high-frequency
  spectrum)."""
  a, b = period2_energy(images), period2_energy(reference_images)
  pa, pb = radial_power(images).mean(axis=0), radial_power(reference_images).mean(axis=0)
  if pa.shape != pb.shape:
    raise ValueError(f"images and reference_images must have the same height and width to "
                     f"compare their spectra, got {np.shape(images)} and "
                     f"{np.shape(reference_images)}")
  tiny = 1e-30
  la = np.log10(pa / max(pa.sum(), tiny) + tiny)
  lb = np.log10(pb / max(pb.sum(), tiny) + tiny)
  ma, mb = float(a.mean()), float(b.mean())
  ratio = ma / mb if mb > 0 else (float("inf") if ma > 0 else 1.0)
  return Checkerboard(ma, mb, ratio, float(np.mean(np.abs(la - lb))))


def high_frequency_energy(images, cutoff: float = 0.25) -> np.ndarray:
  """float[n]: the share of each image's energy (mean removed) at spatial
  frequencies above ``cutoff`` cycles per pixel (``|f| > cutoff``; Nyquist
  is 0.5 on an axis); 0 for a constant image."""
  x = _host_images(images, "images")
  if not 0.0 < cutoff < 0.5 * math.sqrt(2):
    raise ValueError(f"cutoff must be in (0, 0.707) cycles per pixel, got {cutoff}")
  h, w = x.shape[1:3]
  power = _power(x)
  radius = _radius(h, w)
  ac = power.sum(axis=(1, 2)) - power[:, 0, 0]
  high = power[:, radius > cutoff].sum(axis=-1)
  return np.where(ac > 1e-12 * np.maximum(power[:, 0, 0], 1e-30), high / np.maximum(ac, 1e-30),
                  0.0)


class Sharpness(NamedTuple):
  """What :func:`sharpness` measures."""

  high_frequency: float            # mean high-frequency share of the images
  reference_high_frequency: float  # the same of the reference images
  ratio: float                     # high_frequency / reference_high_frequency


def sharpness(images, reference_images, cutoff: float = 0.25) -> Sharpness:
  """Sharpness of translated ``images`` against real images of the domain
  they were translated into: the mean :func:`high_frequency_energy` of each
  and their ratio (< 1: blurrier than the domain's images)."""
  a = float(high_frequency_energy(images, cutoff).mean())
  b = float(high_frequency_energy(reference_images, cutoff).mean())
  return Sharpness(a, b, a / b if b > 0 else float("inf") if a > 0 else 1.0)


def _mask_boundary(masks: np.ndarray) -> np.ndarray:
  """Pixels whose 4-neighbourhood (inside the image) holds the other class."""
  b = np.zeros_like(masks)
  dv = masks[:, 1:] != masks[:, :-1]
  dh = masks[:, :, 1:] != masks[:, :, :-1]
  b[:, 1:] |= dv
  b[:, :-1] |= dv
  b[:, :, 1:] |= dh
  b[:, :, :-1] |= dh
  return b


def _dilate(m: np.ndarray, radius: int) -> np.ndarray:
  out = m.copy()
  for _ in range(radius):  # a (2 radius + 1) square, one pixel at a time
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    out = grown
    grown = out.copy()
    grown[:, :, 1:] |= out[:, :, :-1]
    grown[:, :, :-1] |= out[:, :, 1:]
    out = grown
  return out


def _gradient_magnitude(x: np.ndarray) -> np.ndarray:
  """Sobel gradient magnitude of float[n, H, W] images (edge-replicated borders)."""
  p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
  gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]
        - p[:, :-2, :-2] - 2 * p[:, 1:-1, :-2] - p[:, 2:, :-2])
  gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]
        - p[:, :-2, :-2] - 2 * p[:, :-2, 1:-1] - p[:, :-2, 2:])
  return np.hypot(gx, gy)


def edge_overlap(images, masks, tolerance: int = 1) -> float:
  """How well the edges of ``images`` follow the boundaries of ``masks``:
  per image, the b pixels of largest Sobel gradient magnitude (channels
  averaged first; b = the mask's boundary pixels, those with a 4-neighbour of
  the other class; ties broken by position) and the share of them within
  ``tolerance`` pixels (a square) of that boundary; averaged over images with
  a boundary (NaN if none has one). 1: every strong edge lies on the mask's
  outline; a texture unrelated to the mask scores about the share of the
  image within the tolerance band."""
  x = _host_images(images, "images").mean(axis=-1)
  m = np.asarray(_checks.mask_array(masks))
  if m.shape != x.shape:
    raise ValueError(f"masks must have shape {x.shape} (the images' [n, H, W]), got {m.shape}")
  tolerance = _checks.positive_int("tolerance", tolerance, minimum=0)
  boundary = _mask_boundary(m)
  band = _dilate(boundary, tolerance)
  grad = _gradient_magnitude(x)
  shares = []
  for g, bnd, bd in zip(grad, boundary, band):
    b = int(bnd.sum())
    if b == 0:
      continue
    order = np.argsort(-g.ravel(), kind="stable")[:b]
    shares.append(bd.ravel()[order].mean())
  return float(np.mean(shares)) if shares else float("nan")


class Morphology(NamedTuple):
  """What :func:`morphology` measures."""

  iou: float           # the source model's mean per-image IoU on the translated images
  edge_overlap: float  # edge_overlap(translated images, target masks)


def morphology(model, variables, translated_images, masks, batch_size: int = 64) -> Morphology:
  """Whether translation kept the shapes: the segmenter ``model`` (with
  ``variables``, e.g. the source U-Net) on the translated images against the
  target images' masks (:func:`bnjax.metrics.iou`), and
  :func:`edge_overlap` of the translated images with those masks."""
  translated = _checks.images(translated_images, name="translated_images")
  masks = _checks.mask_array(masks)
  if masks.shape != translated.shape[:3]:
    raise ValueError(f"masks must have shape {translated.shape[:3]}, got {masks.shape}")
  pred = inference.predict(model, variables, translated, batch_size)
  return Morphology(metrics.iou(pred, masks), edge_overlap(translated, masks))
