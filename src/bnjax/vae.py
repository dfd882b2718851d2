"""A label-conditioned VAE with BatchNorm, and the classifier that judges its
reconstructions.

:class:`ConditionalVAE` (Kingma & Welling, ICLR 2014, :cite:`kingma2014vae`;
conditioned as Sohn et al., NeurIPS 2015, :cite:`sohn2015cvae`): a
convolutional encoder (BatchNorm) gives the posterior's mean and log-variance,
to which a learnt embedding of the *given* label is added; a decoder
(BatchNorm) turns a latent into Bernoulli logits of the pixels. The
reconstruction goes through a :class:`Classifier` pretrained on the images
(:func:`fit_classifier`; frozen, in evaluation mode) whose cross-entropy
against the given label is added with weight ``lambda_label``; the given label
is wrong ``wrong_label_rate`` of the time (:func:`corrupt_labels`), so that,
handed a wrong label, the VAE learns to redraw the image as the given class.
``lambda_label=0`` drops the classifier; ``conditional=False`` drops the
embedding too (the unconditional VAE).

Per image: ``total = reconstruction + kl + lambda_label * label``, the
reconstruction the Bernoulli negative log-likelihood of the pixels (values in
[0, 1], summed), ``kl`` :func:`kl_divergence` from the standard normal prior
(closed form).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import _checks
from bnjax import _fitting
from bnjax import _modules as _m
from bnjax import compiler

__all__ = ["Encoder", "Classifier", "ConditionalVAE", "kl_divergence", "bernoulli_nll",
           "corrupt_labels", "VAEConfig", "fit_classifier", "fit", "losses", "LOSS_NAMES",
           "classify", "given_label_rate"]

#: The losses :func:`fit` records and :func:`losses` returns, in this order.
LOSS_NAMES: tuple[str, ...] = ("total", "reconstruction", "kl", "label")


class Encoder(nn.Module):
  """Two stages of (3x3 conv -> BatchNorm -> ReLU, stride-2 3x3 conv ->
  BatchNorm -> ReLU), widths ``features`` and ``2 features``; the flattened
  features."""

  features: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x
    for width in (self.features, 2 * self.features):
      for stride in (1, 2):
        h = nn.Conv(width, (3, 3), strides=stride, use_bias=False)(h)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
    return h.reshape(h.shape[0], -1)


class Classifier(nn.Module):
  """:class:`Encoder` and a linear head: class logits."""

  num_classes: int = 10
  features: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(Encoder(self.features)(x, train))


class ConditionalVAE(nn.Module):
  """The label-conditioned VAE of images ``[n, h, w, c]`` in [0, 1] (``h``,
  ``w`` divisible by 4).

  ``__call__(x, labels, key=None, train=False) -> (logits, mean, log_var)``:
  ``z = mean + exp(log_var / 2) * eps`` with ``eps`` drawn from ``key`` (the
  mean without a key). Methods ``encode(x, labels, train)`` and
  ``decode(z, train)`` (Bernoulli logits).
  """

  image_shape: Sequence[int]
  latent: int = 10
  num_classes: int = 10
  features: int = 16
  conditional: bool = True

  def setup(self):
    """Builds the encoder, the label embedding and the decoder."""
    h, w, c = (int(s) for s in self.image_shape)
    if h % 4 or w % 4:
      raise ValueError(f"ConditionalVAE.image_shape {h}x{w} must be divisible by 4")
    self.encoder = Encoder(self.features)
    self.to_latent = nn.Dense(2 * self.latent)
    if self.conditional:
      self.embed = nn.Embed(self.num_classes, 2 * self.latent)
    self.from_latent = nn.Dense((h // 4) * (w // 4) * 2 * self.features, use_bias=False)
    self.bn_latent = nn.BatchNorm(momentum=0.9)
    self.up = [nn.Conv(f, (3, 3), use_bias=False) for f in (2 * self.features, self.features)]
    self.bn_up = [nn.BatchNorm(momentum=0.9) for _ in range(2)]
    self.out = nn.Conv(c, (3, 3))

  def encode(self, x, labels, train: bool = False):
    """``(mean, log_var)`` of the posterior, the given label's embedding added."""
    stats = self.to_latent(self.encoder(x, train))
    if self.conditional:
      stats = stats + self.embed(labels)
    mean, log_var = jnp.split(stats, 2, axis=-1)
    return mean, log_var

  def decode(self, z, train: bool = False):
    """Bernoulli logits ``[n, h, w, c]`` of a latent ``[n, latent]``."""
    h, w, _ = (int(s) for s in self.image_shape)
    y = self.from_latent(z)
    y = nn.relu(self.bn_latent(y, use_running_average=not train))
    y = y.reshape(z.shape[0], h // 4, w // 4, 2 * self.features)
    for conv, bn in zip(self.up, self.bn_up):
      y = jax.image.resize(y, (y.shape[0], 2 * y.shape[1], 2 * y.shape[2], y.shape[3]), "nearest")
      y = nn.relu(bn(conv(y), use_running_average=not train))
    return self.out(y)

  def __call__(self, x, labels, key=None, train: bool = False):
    mean, log_var = self.encode(x, labels, train)
    z = mean
    if key is not None:
      z = z + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.decode(z, train), mean, log_var


# --------------------------------------------------------------------------
# Losses


def kl_divergence(mean, log_var):
  """KL(N(mean, exp(log_var)) || N(0, I)) per example, closed form:
  ``sum (mean**2 + exp(log_var) - 1 - log_var) / 2``."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)


def bernoulli_nll(logits, x):
  """``-sum [x log sigmoid(l) + (1 - x) log sigmoid(-l)]`` per example (nats;
  ``x`` in [0, 1])."""
  nll = optax.sigmoid_binary_cross_entropy(logits, x)
  return jnp.sum(nll.reshape(nll.shape[0], -1), axis=-1)


def corrupt_labels(key, labels, rate: float, num_classes: int):
  """``(given, wrong)``: each label replaced, with probability ``rate``, by
  one of the other ``num_classes - 1`` classes drawn uniformly; ``wrong``
  marks the replaced ones."""
  rate = _checks.unit_interval("rate", rate)
  num_classes = _checks.positive_int("num_classes", num_classes, 2)
  return _corrupt(key, jnp.asarray(labels, jnp.int32), rate, num_classes)


def _corrupt(key, labels, rate, num_classes: int):
  """:func:`corrupt_labels` unchecked: ``rate`` may be traced."""
  k1, k2 = jax.random.split(key)
  wrong = jax.random.uniform(k1, labels.shape) < rate
  shift = jax.random.randint(k2, labels.shape, 1, num_classes)
  return jnp.where(wrong, (labels + shift) % num_classes, labels), wrong


def _parts(model, variables, classifier, x, given, key, lambda_label, train):
  """Per-image losses ``[n, 4]`` (total, reconstruction, kl, weighted
  label) and the VAE's updated statistics (``train``). The label loss is 0
  without a ``classifier``; ``lambda_label`` may be traced."""
  if train:
    (logits, mean, log_var), upd = model.apply(variables, x, given, key, train=True,
                                               mutable=["batch_stats"])
  else:
    logits, mean, log_var = model.apply(variables, x, given, key)
    upd = {}
  rec = bernoulli_nll(logits, x)
  kl = kl_divergence(mean, log_var)
  label = jnp.zeros_like(rec)
  if classifier is not None:
    clf_model, clf_vars = classifier
    clf_logits = clf_model.apply(clf_vars, jax.nn.sigmoid(logits))
    label = lambda_label * optax.softmax_cross_entropy_with_integer_labels(clf_logits, given)
  return jnp.stack([rec + kl + label, rec, kl, label], axis=-1), upd.get("batch_stats")


# --------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Training of a :class:`ConditionalVAE` (or, for :func:`fit_classifier`,
  of a :class:`Classifier`: only ``steps``, ``batch_size``,
  ``learning_rate``, ``seed`` and ``check_every`` apply).

  The original (MNIST): latent 10, ``lambda_label`` 100, a wrong label 10 %
  of the time, 30 epochs.
  """

  steps: int = 2000
  batch_size: int = 64
  learning_rate: float = 1e-3
  lambda_label: float = 100.0
  wrong_label_rate: float = 0.1
  seed: int = 0
  check_every: int = 100

  def __post_init__(self):
    _checks.positive_int("VAEConfig.steps", self.steps)
    _checks.positive_int("VAEConfig.batch_size", self.batch_size)
    _checks.positive_int("VAEConfig.check_every", self.check_every)
    _checks.positive_int("VAEConfig.seed", self.seed, 0)
    _checks.positive_number("VAEConfig.learning_rate", self.learning_rate)
    _checks.number("VAEConfig.lambda_label", self.lambda_label)
    _checks.unit_interval("VAEConfig.wrong_label_rate", self.wrong_label_rate)


# What a range error says (the VAE's likelihood is Bernoulli per pixel).
_OTHER_SCALE = "the VAE models pixel intensities in [0, 1] (a Bernoulli likelihood per pixel)"


def _data(images, labels, num_classes: int):
  images = jnp.asarray(_checks.images(images, name="images", other_scale=_OTHER_SCALE),
                       jnp.float32)
  labels = np.asarray(labels)
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape ({images.shape[0]},), got "
                     f"{labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes - 1}] (num_classes), got "
                     f"[{labels.min()}, {labels.max()}]")
  return images, jnp.asarray(labels, jnp.int32)


def _check_config(config):
  if not isinstance(config, VAEConfig):
    raise ValueError(f"config must be a VAEConfig, got {type(config).__name__}")


def _classifier_step(model: Classifier):
  """``step(carry, index, t, images, labels, learning_rate)``, compiled once
  per model (the learning rate is an argument)."""
  def build():
    def loss_fn(p, s, x, y):
      logits, upd = model.apply({"params": p, "batch_stats": s}, x, train=True,
                                mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.mean(ce), upd["batch_stats"]

    @compiler.jit
    def step(carry, index, t, images, labels, learning_rate):
      p, s, o = carry
      (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, images[index],
                                                              labels[index])
      u, o = optax.adam(learning_rate).update(g, o, p)
      return (optax.apply_updates(p, u), s, o), loss[None]

    return step

  return _m.cached(model, ("vae.fit_classifier",), build)


def fit_classifier(key, model: Classifier, images, labels, config: VAEConfig = VAEConfig(), *,
                   verbose: bool = True):
  """Trains ``model`` with cross-entropy (Adam): ``(variables, history)``,
  ``history["loss"][steps]``."""
  _check_config(config)
  _checks.key(key)
  images, labels = _data(images, labels, model.num_classes)
  order = _fitting.batches(config.seed, images.shape[0], config.batch_size, config.steps)
  variables = _m.init(model, key, images[: config.batch_size], train=True)
  step, rate = _classifier_step(model), jax.device_put(np.float32(config.learning_rate))
  carry = (variables["params"], variables["batch_stats"],
           optax.adam(config.learning_rate).init(variables["params"]))
  (p, s, _), hist, seconds = _fitting.run(
      lambda c, index, t: step(c, index, t, images, labels, rate), carry, order,
      check_every=config.check_every, what="classifier", loss_names=("cross-entropy",),
      hint="lower VAEConfig.learning_rate", verbose=verbose)
  return {"params": p, "batch_stats": s}, {"loss": hist[:, 0], "seconds": seconds}


def _hyperparameters(config: VAEConfig) -> dict:
  """The float settings of :func:`fit`: arguments of the compiled step (another
  value compiles nothing)."""
  return {name: np.float32(getattr(config, name))
          for name in ("learning_rate", "lambda_label", "wrong_label_rate")}


def _vae_step(model: ConditionalVAE, clf_model):
  """``step(carry, index, t, images, labels, step_key, clf_vars, hyper)``,
  compiled once per model and classifier model (None: no label loss)."""

  def build():
    def loss_fn(p, s, x, given, k, clf_vars, lam):
      classifier = None if clf_model is None else (clf_model, clf_vars)
      parts, s = _parts(model, {"params": p, "batch_stats": s}, classifier, x, given, k, lam,
                        True)
      means = jnp.mean(parts, axis=0)
      return means[0], (s, means)

    @compiler.jit
    def step(carry, index, t, images, labels, step_key, clf_vars, hyper):
      p, s, o = carry
      k_label, k_z = jax.random.split(jax.random.fold_in(step_key, t))
      given, _ = _corrupt(k_label, labels[index], hyper["wrong_label_rate"], model.num_classes)
      (_, (s, means)), g = jax.value_and_grad(loss_fn, has_aux=True)(
          p, s, images[index], given, k_z, clf_vars, hyper["lambda_label"])
      u, o = optax.adam(hyper["learning_rate"]).update(g, o, p)
      return (optax.apply_updates(p, u), s, o), means

    return step

  return _m.cached(model, ("vae.fit", clf_model), build)


def fit(key, model: ConditionalVAE, images, labels, classifier=None,
        config: VAEConfig = VAEConfig(), *, verbose: bool = True):
  """Trains the VAE (Adam) on ``images`` with their true ``labels``, each
  batch's labels corrupted afresh (``config.wrong_label_rate``):
  ``(variables, history)``, ``history["losses"][steps, 4]`` (batch means of
  :data:`LOSS_NAMES`).

  ``classifier``: ``(Classifier, variables)``, frozen and in evaluation mode;
  needed when ``config.lambda_label > 0``.
  """
  _check_config(config)
  _checks.key(key)
  if config.lambda_label > 0 and classifier is None:
    raise ValueError("classifier must be (Classifier, variables) when "
                     f"VAEConfig.lambda_label > 0 (got {config.lambda_label}); "
                     "pass lambda_label=0 for a VAE without the label loss")
  images, labels = _data(images, labels, model.num_classes)
  if tuple(images.shape[1:]) != tuple(int(s) for s in model.image_shape):
    raise ValueError(f"images must have shape [n, {', '.join(map(str, model.image_shape))}] "
                     f"(ConditionalVAE.image_shape), got {tuple(images.shape)}")
  order = _fitting.batches(config.seed, images.shape[0], config.batch_size, config.steps)
  init_key, step_key = jax.random.split(key)
  variables = _m.init(model, init_key, images[: config.batch_size], labels[: config.batch_size],
                      train=True)
  clf_model, clf_vars = classifier if config.lambda_label > 0 else (None, {})
  step, hyper = _vae_step(model, clf_model), jax.device_put(_hyperparameters(config))
  carry = (variables["params"], variables["batch_stats"],
           optax.adam(config.learning_rate).init(variables["params"]))
  (p, s, _), hist, seconds = _fitting.run(
      lambda c, index, t: step(c, index, t, images, labels, step_key, clf_vars, hyper),
      carry, order, check_every=config.check_every, what="VAE", loss_names=LOSS_NAMES,
      hint="lower VAEConfig.learning_rate", verbose=verbose)
  return {"params": p, "batch_stats": s}, {"losses": hist, "seconds": seconds}


# --------------------------------------------------------------------------
# Evaluation


def losses(model: ConditionalVAE, variables, images, labels, classifier=None, *,
           lambda_label: float = 100.0, key=None) -> dict[str, float]:
  """Mean per-image losses (:data:`LOSS_NAMES`) in evaluation mode under the
  given ``labels`` (``z`` drawn from ``key``; the posterior mean without one)."""
  if _checks.number("lambda_label", lambda_label) > 0 and classifier is None:
    raise ValueError("classifier must be (Classifier, variables) when lambda_label > 0")
  images, labels = _data(images, labels, model.num_classes)
  classifier = classifier if lambda_label > 0 else None
  parts, _ = _parts(model, variables, classifier, images, labels, key, lambda_label, False)
  return dict(zip(LOSS_NAMES, (float(v) for v in jnp.mean(parts, axis=0))))


def classify(classifier, images) -> np.ndarray:
  """The classifier's predicted class of each image (evaluation mode): int[n]."""
  clf_model, clf_vars = classifier
  images = jnp.asarray(_checks.images(images, name="images", other_scale=_OTHER_SCALE),
                       jnp.float32)
  return np.asarray(jnp.argmax(clf_model.apply(clf_vars, images), axis=-1))


def given_label_rate(model: ConditionalVAE, variables, classifier, images, given) -> float:
  """The fraction of reconstructions (posterior mean, evaluation mode) under
  the ``given`` labels that the classifier assigns to the given label; with
  wrong given labels, how often the VAE redraws an image as the class it
  was told."""
  images, given = _data(images, given, model.num_classes)
  logits, _, _ = model.apply(variables, images, given)
  pred = classify(classifier, jax.nn.sigmoid(logits))
  return float(np.mean(pred == np.asarray(given)))

