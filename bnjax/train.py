"""Supervised training of a segmentation model (any linen model called as
``model.apply(variables, x, train=...)`` that returns logits ``[n, H, W, classes]``).

The training set stays on the device; a step is one jitted function that
gathers its batch by index (no host-to-device copy per step, no recompilation
between epochs, the state buffers donated). The pieces (``init_state``,
``train_epoch``, ``evaluate``) are pure functions of pytrees so that a stack of
models can be trained by mapping them over a leading axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import _modules as _m
from bnjax import compiler
from bnjax import data as _data

OPTIMIZERS = ("adam", "rmsprop", "sgd")
LOSSES = ("ce", "dice", "ce+dice")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training settings.

  Attributes:
    epochs: maximum number of passes over the training split.
    batch_size: images per step; the last incomplete batch of an epoch is
      dropped (the split is reshuffled every epoch).
    learning_rate: step size.
    optimizer: ``"adam"``, ``"rmsprop"`` (PyTorch semantics: decay 0.99, eps
      outside the square root) or ``"sgd"``.
    momentum: momentum of ``"rmsprop"`` and ``"sgd"``.
    weight_decay: L2 penalty added to the gradient (PyTorch's
      ``weight_decay``), applied after clipping.
    loss: ``"ce"`` (cross-entropy), ``"dice"`` (soft Dice) or ``"ce+dice"``.
    grad_clip: clip the gradient to this global norm (None: no clipping).
    val_fraction: fraction of the images held out for validation, in [0, 1).
    patience: stop after this many epochs without a better validation Dice
      (None: never stop early). The best epoch's variables are returned.
    eval_batch_size: images per forward pass when evaluating.
    seed: seeds initialisation, the validation split and the batch order.
    verbose: print one line per epoch to stderr.
  """

  epochs: int = 10
  batch_size: int = 16
  learning_rate: float = 1e-3
  optimizer: str = "adam"
  momentum: float = 0.9
  weight_decay: float = 0.0
  loss: str = "ce+dice"
  grad_clip: float | None = 1.0
  val_fraction: float = 0.1
  patience: int | None = 5
  eval_batch_size: int = 64
  seed: int = 0
  verbose: bool = True

  def __post_init__(self):
    for name in ("epochs", "batch_size", "eval_batch_size"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(self.seed, int) and self.seed >= 0):
      raise ValueError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
    if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
      raise ValueError(
          f"TrainConfig.learning_rate must be finite and >= 0, got {self.learning_rate}")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
          f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.loss not in LOSSES:
      raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
    if self.grad_clip is not None and not self.grad_clip > 0:
      raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
    if not 0.0 <= self.val_fraction < 1.0:
      raise ValueError(
          f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
    if self.patience is not None and (
        not isinstance(self.patience, int) or self.patience < 1):
      raise ValueError(
          f"TrainConfig.patience must be an integer >= 1 or None, got {self.patience!r}")

  @classmethod
  def paper(cls, **overrides: Any) -> "TrainConfig":
    """The original study's settings: RMSprop lr 1e-5, momentum 0.999, weight
    decay 1e-8, batch 1, CE + Dice, gradient-norm clip 1.0, 5 epochs, 10 %
    validation, early stopping."""
    settings = dict(epochs=5, batch_size=1, learning_rate=1e-5, optimizer="rmsprop",
                    momentum=0.999, weight_decay=1e-8, loss="ce+dice", grad_clip=1.0,
                    val_fraction=0.1, patience=2)
    return cls(**{**settings, **overrides})


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """clip -> L2 weight decay -> optimizer, as PyTorch applies them."""
  parts = []
  if config.grad_clip is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  if config.optimizer == "adam":
    parts.append(optax.adam(config.learning_rate))
  elif config.optimizer == "rmsprop":
    parts.append(optax.rmsprop(config.learning_rate, decay=0.99, eps=1e-8,
                               eps_in_sqrt=False, momentum=config.momentum or None))
  else:
    parts.append(optax.sgd(config.learning_rate, momentum=config.momentum or None))
  return optax.chain(*parts)


# --------------------------------------------------------------------------
# Losses


def soft_dice(probs: jax.Array, onehot: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Soft Dice per image and class, (2 Σ p t + eps) / (Σ p + Σ t + eps), averaged."""
  inter = jnp.sum(probs * onehot, axis=(1, 2))
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  return jnp.mean((2 * inter + eps) / (total + eps))


def segmentation_loss(logits: jax.Array, masks: jax.Array, loss: str = "ce+dice"):
  """Mean loss of ``logits[n, H, W, C]`` (C = 2, or 1 for a sigmoid) against masks."""
  labels = masks.astype(jnp.int32)
  if logits.shape[-1] == 1:
    z = logits[..., 0]
    ce = jnp.mean(optax.sigmoid_binary_cross_entropy(z, masks.astype(z.dtype)))
    probs = jax.nn.sigmoid(z)[..., None]
    onehot = masks[..., None].astype(probs.dtype)
  else:
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    probs = jax.nn.softmax(logits)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  if loss == "ce":
    return ce
  dice_loss = 1.0 - soft_dice(probs, onehot)
  return dice_loss if loss == "dice" else ce + dice_loss


def logits_to_masks(logits: jax.Array) -> jax.Array:
  """bool[n, H, W]: foreground where class 1 wins (or the single logit > 0)."""
  if logits.shape[-1] == 1:
    return logits[..., 0] > 0
  return jnp.argmax(logits, axis=-1) == 1


# --------------------------------------------------------------------------
# Pure training pieces


class TrainState(NamedTuple):
  params: Any
  model_state: Any  # every collection but params, e.g. {"batch_stats": ...}
  opt_state: Any


def variables_of(state: TrainState) -> dict:
  return {"params": state.params, **state.model_state}


def seed_keys(seed: int):
  """(init, split, shuffle) keys of a seed; shared by ``fit`` and sweeps."""
  return jax.random.split(jax.random.key(seed), 3)


def init_state(model: nn.Module, tx: optax.GradientTransformation, key,
               image_shape, variables=None) -> TrainState:
  if variables is None:
    variables = init_variables(model, key, tuple(image_shape))
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(params, variables, tx.init(params))


def init_variables(model, key, image_shape):
  """``model.init`` on a zero image of ``image_shape`` (H, W, C), jitted.

  Compiled at XLA's lowest backend optimisation level: an eager ``model.init``
  dispatches op by op (~20 s for a small U-Net on CPU) and a fully optimised
  compile of its random initialisers takes ~12 s; this one ~2 s, once per
  model and shape (the model need not be hashable).
  """
  image_shape = tuple(image_shape)

  def build():
    def init(key):
      return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})

  return _m.cached(model, ("init_variables", image_shape), build)(key)


def train_step(model, tx, loss, state: TrainState, x, y):
  """One optimisation step; returns (new state, loss)."""

  def loss_fn(params):
    logits, new_model_state = model.apply(
        {"params": params, **state.model_state}, x, train=True,
        mutable=list(state.model_state))
    return segmentation_loss(logits, y, loss), new_model_state

  (value, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params, dict(model_state), opt_state), value


def train_batch(model, tx, loss, state: TrainState, images, masks, idx):
  """``train_step`` on the images at indices ``idx`` (gathered on the device)."""
  return train_step(model, tx, loss, state, images[idx], masks[idx])


def train_epoch(step_fn, state: TrainState, images, masks, batches):
  """Runs a jitted ``train_batch`` over ``batches`` (int[steps, batch] indices).

  A Python loop over a jitted step rather than one ``lax.scan``: XLA:CPU runs
  convolutions inside a while loop about 9x slower (measured, BUILD_NOTES.md).
  """
  losses = []
  for idx in batches:
    state, value = step_fn(state, images, masks, idx)
    losses.append(value)
  return state, jnp.mean(jnp.stack(losses))


def evaluate(model, loss, variables, images, masks, batch_size: int):
  """(mean loss, mean per-image foreground Dice) over a set, in chunks."""
  n = images.shape[0]
  chunks = -(-n // batch_size)
  pad = chunks * batch_size - n
  weight = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(chunks, batch_size)
  xs = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)).reshape(
      chunks, batch_size, *images.shape[1:])
  ys = jnp.pad(masks, ((0, pad), (0, 0), (0, 0))).reshape(chunks, batch_size,
                                                          *masks.shape[1:])

  def one(args):
    x, y, w = args
    logits = model.apply(variables, x, train=False)
    per_image = jax.vmap(lambda l, m: segmentation_loss(l[None], m[None], loss))(logits, y)
    pred = logits_to_masks(logits)
    inter = jnp.sum(pred & y, axis=(1, 2))
    total = jnp.sum(pred, axis=(1, 2)) + jnp.sum(y, axis=(1, 2))
    dice = jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1), 1.0)
    return jnp.sum(per_image * w), jnp.sum(dice * w)

  loss_sum, dice_sum = jax.lax.map(one, (xs, ys, weight))
  return jnp.sum(loss_sum) / n, jnp.sum(dice_sum) / n


def split_sizes(n: int, config: TrainConfig) -> tuple[int, int]:
  """(n_train, n_val) for a set of n images; ValueError when it is too small."""
  n_val = max(1, round(n * config.val_fraction)) if config.val_fraction > 0 else 0
  n_train = n - n_val
  if n_train < config.batch_size:
    raise ValueError(
        f"{n} images leave {n_train} for training after a val_fraction of "
        f"{config.val_fraction}, fewer than batch_size={config.batch_size}")
  return n_train, n_val


def epoch_batches(key, epoch: int, n_train: int, batch_size: int):
  """int[steps, batch_size]: the shuffled batches of one epoch."""
  steps = n_train // batch_size
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), n_train)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def _log(config, text):
  if config.verbose:
    print(text, file=sys.stderr, flush=True)


def _fit_functions(model, config: TrainConfig):
  """(optimizer, jitted step, jitted evaluation) of ``fit``, built once per
  model and optimisation settings, so that a second ``fit`` with the same
  shapes does not compile again."""
  settings = (config.optimizer, config.learning_rate, config.momentum, config.weight_decay,
              config.grad_clip, config.loss)

  def build():
    tx = make_optimizer(config)
    step = compiler.jit(functools.partial(train_batch, model, tx, config.loss),
                        donate_argnums=(0,))
    run_eval = compiler.jit(functools.partial(evaluate, model, config.loss),
                            static_argnums=(3,))
    return tx, step, run_eval

  return _m.cached(model, ("fit",) + settings, build)


def fit(model: nn.Module, images, masks, config: TrainConfig = TrainConfig(),
        variables=None):
  """Trains ``model`` on (images, masks).

  Args:
    model: a linen model, ``apply(variables, x, train=...) -> logits``.
    images: float32[n, H, W, C] (or [n, H, W]) in [0, 1].
    masks: bool[n, H, W].
    config: a :class:`TrainConfig`.
    variables: start from these instead of a fresh initialisation.

  Returns:
    (variables, history): the variables of the epoch with the best validation
    Dice (the last epoch without a validation split), and a dict of per-epoch
    lists ``train_loss``, ``val_loss``, ``val_dice``, ``seconds`` plus
    ``best_epoch`` and ``epochs_run``.
  """
  images, masks = _data.check_images_masks(images, masks)
  n = images.shape[0]
  n_train, n_val = split_sizes(n, config)
  k_init, k_split, k_shuffle = seed_keys(config.seed)
  order = jax.random.permutation(k_split, n)
  train_x, train_y = images[order[:n_train]], masks[order[:n_train]]
  val_x, val_y = images[order[n_train:]], masks[order[n_train:]]

  tx, step_fn, run_eval = _fit_functions(model, config)
  state = init_state(model, tx, k_init, images.shape[1:], variables)

  history = {"train_loss": [], "val_loss": [], "val_dice": [], "seconds": []}
  best, best_dice, best_epoch, since_best = None, -1.0, 0, 0
  for epoch in range(config.epochs):
    start = time.perf_counter()
    batches = epoch_batches(k_shuffle, epoch, n_train, config.batch_size)
    state, train_loss = train_epoch(step_fn, state, train_x, train_y, batches)
    if n_val:
      val_loss, val_dice = run_eval(variables_of(state), val_x, val_y,
                                    min(config.eval_batch_size, n_val))
      val_loss, val_dice = float(val_loss), float(val_dice)
    else:
      val_loss = val_dice = float("nan")
    train_loss = float(train_loss)
    seconds = time.perf_counter() - start
    for name, value in zip(history, (train_loss, val_loss, val_dice, seconds)):
      history[name].append(value)
    if not math.isfinite(train_loss):
      raise FloatingPointError(
          f"training diverged at epoch {epoch + 1}: loss {train_loss}; lower the "
          "learning_rate or set grad_clip")
    _log(config, f"epoch {epoch + 1}/{config.epochs}  train_loss {train_loss:.4f}  "
         f"val_loss {val_loss:.4f}  val_dice {val_dice:.4f}  ({seconds:.1f} s)")
    if n_val and val_dice > best_dice:
      best_dice, best_epoch, since_best = val_dice, epoch + 1, 0
      best = jax.tree_util.tree_map(jnp.copy, variables_of(state))
    else:
      since_best += 1
    if n_val and config.patience is not None and since_best >= config.patience:
      _log(config, f"early stop: no better val_dice for {since_best} epochs; "
           f"keeping epoch {best_epoch}")
      break
  history["epochs_run"] = len(history["train_loss"])
  history["best_epoch"] = best_epoch if n_val else history["epochs_run"]
  return (best if n_val else variables_of(state)), history


def predict(model: nn.Module, variables, images, batch_size: int = 64) -> np.ndarray:
  """bool[n, H, W] foreground predictions in eval mode, in batches."""
  images = _data.check_images_masks(images)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  batch_size = min(batch_size, images.shape[0])
  run = _m.cached(model, ("predict",), lambda: compiler.jit(
      functools.partial(_predict, model), static_argnums=(2,)))
  return np.asarray(run(variables, images, batch_size))


def _predict(model, variables, images, batch_size):
  n = images.shape[0]
  chunks = -(-n // batch_size)
  pad = chunks * batch_size - n
  xs = jnp.pad(images, ((0, pad),) + ((0, 0),) * 3).reshape(
      chunks, batch_size, *images.shape[1:])
  out = jax.lax.map(lambda x: logits_to_masks(model.apply(variables, x, train=False)), xs)
  return out.reshape(chunks * batch_size, *out.shape[2:])[:n]
