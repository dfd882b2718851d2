"""Supervised training of segmentation models (any linen model called as
``model.apply(variables, x, train=...)`` that returns logits ``[n, H, W, classes]``).

One loop trains K >= 1 models at once: a stack (every leaf with a leading
model axis) mapped by a strategy of :mod:`bnjax.stacking` and, past one
device, sharded over a mesh. :func:`train_many` is that loop; :func:`fit` is
its K = 1 case. Model i of a stack is what ``fit`` trains on ``images[i]``
with ``seed = config.seed + i``: same initialisation, split and batch order,
its own BatchNorm statistics and early stopping (a stopped model is frozen
with ``where(active, new, old)``).

The training set stays on the device; a step is one jitted function that
gathers its batch by index (no host-to-device copy per step, no recompilation
between epochs or between calls with the same model and settings, the state
buffers donated). The float settings (learning rate, momentum, weight decay,
clipping norm) are arguments of the compiled step, not constants in it: other
values of them compile nothing. The pieces (:func:`init_state`, :func:`train_step`,
:func:`evaluate`) are pure functions of pytrees.
"""

from __future__ import annotations

import dataclasses
import math
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
from bnjax import compiler
from bnjax import distributed
from bnjax import stacking
from bnjax.metrics import logits_to_masks
from bnjax.models import init_variables

__all__ = ["TrainConfig", "fit", "train_many", "make_optimizer", "segmentation_loss",
           "soft_dice", "TrainState", "init_state", "train_step", "evaluate", "Optimizer",
           "OPTIMIZERS", "Loss", "LOSSES"]

#: The optimisers of :class:`TrainConfig`.
Optimizer = Literal["adam", "rmsprop", "sgd"]
#: The values of :data:`Optimizer`.
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
#: The segmentation losses of :class:`TrainConfig`.
Loss = Literal["ce", "dice", "ce+dice"]
#: The values of :data:`Loss`.
LOSSES: tuple[str, ...] = get_args(Loss)


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
  optimizer: Optimizer = "adam"
  momentum: float = 0.9
  weight_decay: float = 0.0
  loss: Loss = "ce+dice"
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

  def split_sizes(self, n: int) -> tuple[int, int]:
    """(n_train, n_val) of a set of ``n`` images; a ValueError when the
    validation split leaves fewer than ``batch_size`` images for training."""
    n_val = max(1, round(n * self.val_fraction)) if self.val_fraction > 0 else 0
    n_train = n - n_val
    if n_train < self.batch_size:
      raise ValueError(
          f"{n} images leave {n_train} for training after a val_fraction of "
          f"{self.val_fraction}, fewer than batch_size={self.batch_size}")
    return n_train, n_val

  @classmethod
  def paper(cls, **overrides: Any) -> "TrainConfig":
    """The original study's settings: RMSprop lr 1e-5, momentum 0.999, weight
    decay 1e-8, batch 1, CE + Dice, gradient-norm clip 1.0, 5 epochs, 10 %
    validation, early stopping."""
    settings = dict(epochs=5, batch_size=1, learning_rate=1e-5, optimizer="rmsprop",
                    momentum=0.999, weight_decay=1e-8, loss="ce+dice", grad_clip=1.0,
                    val_fraction=0.1, patience=2)
    return cls(**{**settings, **overrides})


def _structure(config: TrainConfig) -> tuple:
  """What of the optimiser is compiled into a training program: its name and
  whether clipping, weight decay and (RMSprop's, SGD's) momentum are on. The
  values themselves are :func:`_hyperparameters`, arguments of the program."""
  return (config.optimizer, config.grad_clip is not None, bool(config.weight_decay),
          config.optimizer != "adam" and bool(config.momentum))


def _hyperparameters(config: TrainConfig) -> dict[str, float]:
  """The float settings of the optimiser (runtime arguments of a compiled step,
  so that another value compiles nothing)."""
  return {"learning_rate": config.learning_rate, "momentum": config.momentum,
          "weight_decay": config.weight_decay,
          "grad_clip": 1.0 if config.grad_clip is None else config.grad_clip}


def _chain(structure: tuple, hyper) -> optax.GradientTransformation:
  """The optimiser of a :func:`_structure` with the values ``hyper`` (floats,
  or scalars traced inside a compiled step)."""
  optimizer, clip, decay, momentum = structure
  parts = []
  if clip:
    parts.append(optax.clip_by_global_norm(hyper["grad_clip"]))
  if decay:
    parts.append(optax.add_decayed_weights(hyper["weight_decay"]))
  lr = hyper["learning_rate"]
  beta = hyper["momentum"] if momentum else None
  if optimizer == "adam":
    parts.append(optax.adam(lr))
  elif optimizer == "rmsprop":
    parts.append(optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=beta))
  else:
    parts.append(optax.sgd(lr, momentum=beta))
  return optax.chain(*parts)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """clip -> L2 weight decay -> optimizer, as PyTorch applies them."""
  return _chain(_structure(config), _hyperparameters(config))


# --------------------------------------------------------------------------
# Losses


def soft_dice(probs: jax.Array, onehot: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Soft Dice per image and class, (2 Σ p t + eps) / (Σ p + Σ t + eps), averaged."""
  inter = jnp.sum(probs * onehot, axis=(1, 2))
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  return jnp.mean((2 * inter + eps) / (total + eps))


def segmentation_loss(logits: jax.Array, masks: jax.Array, loss: Loss = "ce+dice"):
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


# --------------------------------------------------------------------------
# Pure training pieces


class TrainState(NamedTuple):
  params: Any
  model_state: Any  # every collection but params, e.g. {"batch_stats": ...}
  opt_state: Any


def _variables_of(state: TrainState) -> dict:
  return {"params": state.params, **state.model_state}


def _seed_keys(seed: int):
  """(init, split, shuffle) keys of a seed."""
  return jax.random.split(jax.random.key(seed), 3)


def init_state(model: nn.Module, tx: optax.GradientTransformation, key,
               image_shape, variables=None) -> TrainState:
  """A fresh :class:`TrainState` (initialised from ``key``, or from ``variables``)."""
  if variables is None:
    variables = init_variables(model, key, tuple(image_shape))
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(params, variables, tx.init(params))


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


def _train_batch(model, tx, loss, state: TrainState, images, masks, idx):
  """``train_step`` on the images at indices ``idx`` (gathered on the device)."""
  return train_step(model, tx, loss, state, images[idx], masks[idx])


def evaluate(model, loss, variables, images, masks, batch_size: int):
  """(mean loss, mean per-image foreground Dice) over a set, in batches."""

  def per_image(batch):
    x, y = batch
    logits = model.apply(variables, x, train=False)
    losses = jax.vmap(lambda l, m: segmentation_loss(l[None], m[None], loss))(logits, y)
    pred = logits_to_masks(logits)
    inter = jnp.sum(pred & y, axis=(1, 2))
    total = jnp.sum(pred, axis=(1, 2)) + jnp.sum(y, axis=(1, 2))
    return losses, jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1), 1.0)

  losses, dice = _batching.padded_map(per_image, (images, masks), batch_size)
  return jnp.mean(losses), jnp.mean(dice)


def _epoch_batches(key, epoch: int, n_train: int, batch_size: int):
  """int[steps, batch_size]: the shuffled batches of one epoch."""
  steps = n_train // batch_size
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), n_train)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def _log(config, text):
  if config.verbose:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The loop: K >= 1 models


@dataclasses.dataclass
class _Loop:
  """The compiled training pieces of one (model, optimiser structure, loss,
  strategy, devices)."""

  init_opt: Any
  step: Any
  batches_of: Any
  seen: set = dataclasses.field(default_factory=set)


def _loop(model, config: TrainConfig, strategy: str, mesh, k_pad: int) -> _Loop:
  """Built once per model (identity or equality) and settings, so that a
  second call with the same shapes compiles nothing. The float settings
  (learning rate, momentum, weight decay, clipping norm) are arguments of the
  compiled functions, not part of the key: another value compiles nothing."""
  structure, loss = _structure(config), config.loss
  devices = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
  per_device = k_pad // (1 if mesh is None else mesh.size)
  freeze = k_pad > 1  # one model stops by leaving the loop

  def build():
    def one_step(state, hyper, x, y, idx, active):
      new, value = _train_batch(model, _chain(structure, hyper), loss, state, x, y, idx)
      if freeze:
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state)
      return new, value

    def one_init(params, hyper):
      return _chain(structure, hyper).init(params)

    step = stacking.sharded_jit(
        stacking.stacked(one_step, strategy), mesh, donate=(0,),
        xla_defaults=compiler.unrolled_stack(strategy, per_device))
    batches_of = jax.jit(jax.vmap(_epoch_batches, in_axes=(0, None, None, None)),
                         static_argnums=(2, 3))
    return _Loop(jax.jit(jax.vmap(one_init)), step, batches_of)

  return _m.cached(model, ("train", structure, loss, strategy, devices, k_pad), build)


def _evaluator(model, loss: str, strategy: str, mesh, k_pad: int, eval_bs: int):
  """The compiled validation pass ``(state, images, masks) -> (loss, Dice)``
  per model, built once per model and settings (apart from the training
  step: the validation split's size does not recompile the step)."""
  devices = None if mesh is None else tuple(d.id for d in mesh.devices.flat)

  def build():
    def one_eval(state, x, y):
      return evaluate(model, loss, _variables_of(state), x, y, eval_bs)

    return stacking.sharded_jit(stacking.stacked(one_eval, strategy), mesh)

  return _m.cached(model, ("train.evaluate", loss, strategy, devices, k_pad, eval_bs), build)


def _train(model, images, masks, config: TrainConfig, strategy: str, devices, variables):
  """The loop on checked stacks ``images[K, n, H, W, C]``, ``masks[K, n, H, W]``."""
  k, n = images.shape[:2]
  n_train, n_val = config.split_sizes(n)
  # Several processes shard one stack: each must hold the same data.
  distributed.check_same("the training images and masks given to train_many",
                         (images, masks))
  mesh = stacking.make_mesh(devices)
  k_pad = stacking.padded_size(k, mesh)
  strategy = stacking.resolve(strategy)
  eval_bs = min(config.eval_batch_size, max(n_val, 1))
  loop = _loop(model, config, strategy, mesh, k_pad)
  run_eval = _evaluator(model, config.loss, strategy, mesh, k_pad, eval_bs) if n_val else None

  keys = [_seed_keys(config.seed + i) for i in range(k)]
  orders = jax.vmap(lambda key: jax.random.permutation(key, n))(jnp.stack([kk[1] for kk in keys]))
  k_shuffle = jnp.stack([kk[2] for kk in keys])
  take = jax.vmap(lambda a, o: a[o])
  train_x, train_y = take(images, orders[:, :n_train]), take(masks, orders[:, :n_train])
  val_x, val_y = take(images, orders[:, n_train:]), take(masks, orders[:, n_train:])
  if variables is None:
    variables = stacking.tree_stack(
        [init_variables(model, kk[0], tuple(images.shape[2:])) for kk in keys])
  variables = dict(variables)
  params = variables.pop("params")
  # The float settings, one per model: arguments of the compiled step.
  hyper = {name: np.full(k, value, np.float32)
           for name, value in _hyperparameters(config).items()}
  state = TrainState(params, variables, loop.init_opt(params, hyper))
  state, hyper, train_x, train_y, val_x, val_y, k_shuffle = stacking.place(
      stacking.pad((state, hyper, train_x, train_y, val_x, val_y, k_shuffle), k_pad), mesh)

  shapes = (train_x.shape, config.batch_size)
  if shapes not in loop.seen:
    loop.seen.add(shapes)
    _log(config, f"compiling the training step ({k} model{'s' * (k > 1)}, batch "
         f"{config.batch_size}, images {'x'.join(map(str, images.shape[2:]))}); the first "
         "epoch includes it")
  active = np.ones(k_pad, bool)
  best = None
  best_dice = np.full(k_pad, -1.0)
  since_best = np.zeros(k_pad, int)
  best_epoch = np.zeros(k_pad, int)
  epochs_run = np.zeros(k_pad, int)
  history = {name: [] for name in ("train_loss", "val_loss", "val_dice", "seconds")}
  for epoch in range(config.epochs):
    start = time.perf_counter()
    batches = loop.batches_of(k_shuffle, epoch, n_train, config.batch_size)
    mask = stacking.place(jnp.asarray(active), mesh)
    losses = []
    for s in range(batches.shape[1]):
      state, loss = loop.step(state, hyper, train_x, train_y, batches[:, s], mask)
      losses.append(loss)
    train_loss = distributed.gather(jnp.mean(jnp.stack(losses), axis=0))
    if n_val:
      val_loss, val_dice = distributed.gather(run_eval(state, val_x, val_y))
    else:
      val_loss = val_dice = np.full(k_pad, np.nan)
    epochs_run += active
    nan = lambda a: np.where(active, a, np.nan)
    for name, value in (("train_loss", nan(train_loss)), ("val_loss", nan(val_loss)),
                        ("val_dice", nan(val_dice))):
      history[name].append(value[:k])
    history["seconds"].append(time.perf_counter() - start)
    if not np.all(np.isfinite(train_loss[active])):
      bad = np.flatnonzero(active & ~np.isfinite(train_loss)).tolist()
      raise FloatingPointError(
          f"training diverged at epoch {epoch + 1}" + (f" for models {bad}" if k > 1 else "")
          + f": loss {train_loss[bad[0]]}; lower the learning_rate or set grad_clip")
    if k == 1:
      _log(config, f"epoch {epoch + 1}/{config.epochs}  train_loss {train_loss[0]:.4f}  "
           f"val_loss {val_loss[0]:.4f}  val_dice {val_dice[0]:.4f}  "
           f"({history['seconds'][-1]:.1f} s)")
    else:
      _log(config, f"epoch {epoch + 1}/{config.epochs}  {int(active[:k].sum())} of {k} models "
           f"training  train_loss {np.nanmean(history['train_loss'][-1]):.4f}  "
           f"val_dice {np.nanmean(history['val_dice'][-1]):.4f} (mean)  "
           f"({history['seconds'][-1]:.1f} s)")
    if n_val:
      improved = active & (val_dice > best_dice)
      best_dice = np.where(improved, val_dice, best_dice)
      best_epoch = np.where(improved, epoch + 1, best_epoch)
      since_best = np.where(improved, 0, since_best + active)
      current = _variables_of(state)
      where = lambda a, b: jnp.where(
          jnp.asarray(improved).reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
      best = (jax.tree_util.tree_map(jnp.copy, current) if best is None
              else jax.tree_util.tree_map(where, current, best))
      if config.patience is not None:
        stopped = active & (since_best >= config.patience)
        if k == 1 and stopped[0]:
          _log(config, f"early stop: no better val_dice for {since_best[0]} epochs; "
               f"keeping epoch {best_epoch[0]}")
        active = active & ~stopped
    if not active.any():
      break
  out = best if n_val else _variables_of(state)
  if jax.process_count() > 1:  # every process gets every model, as host arrays
    out = distributed.gather(out)
  out = jax.tree_util.tree_map(lambda a: a[:k], out)
  hist = {name: np.stack(v) for name, v in history.items() if name != "seconds"}
  hist["seconds"] = np.asarray(history["seconds"])
  hist["epochs_run"] = epochs_run[:k]
  hist["best_epoch"] = best_epoch[:k] if n_val else epochs_run[:k]
  return out, hist


def train_many(model: nn.Module, images, masks, config: TrainConfig = TrainConfig(), *,
               strategy: stacking.Strategy = "auto", devices=None, variables=None,
               image_range=_checks.UNIT_RANGE):
  """Trains K models at once, model i on ``images[i]``, ``masks[i]``.

  Args:
    model: a linen model, ``apply(variables, x, train=...) -> logits``.
    images: float32[K, n, H, W, C] in [0, 1]; masks: bool[K, n, H, W].
    config: shared settings; model i uses ``seed = config.seed + i``.
    strategy: ``"auto"``, ``"vmap"`` or ``"unroll"`` (:mod:`bnjax.stacking`).
    devices: devices to shard the model axis over (default: all visible).
    variables: stacked variables to start from instead of a fresh
      initialisation.
    image_range: the range the images must lie in (None: any float values).

  Returns:
    (variables, history): stacked variables (leading axis K; each model's best
    validation epoch, or its last without a validation split), and a history
    whose per-epoch entries are float[epochs_run, K] arrays (NaN after a model
    stopped early) with ``best_epoch`` and ``epochs_run`` as int[K] and
    ``seconds`` per epoch.
  """
  images, masks = _checks.images(images, masks, image_range=image_range, stacked=True)
  return _train(model, images, masks, config, strategy, devices, variables)


def fit(model: nn.Module, images, masks, config: TrainConfig = TrainConfig(),
        variables=None, *, image_range=_checks.UNIT_RANGE):
  """Trains ``model`` on (images, masks): :func:`train_many` with K = 1.

  Args:
    model: a linen model, ``apply(variables, x, train=...) -> logits``.
    images: float32[n, H, W, C] (or [n, H, W]) in [0, 1].
    masks: bool[n, H, W].
    config: a :class:`TrainConfig`.
    variables: start from these instead of a fresh initialisation.
    image_range: the range the images must lie in (None: any float values;
      integer images are always refused).

  Returns:
    (variables, history): the variables of the epoch with the best validation
    Dice (the last epoch without a validation split), and a dict of per-epoch
    lists ``train_loss``, ``val_loss``, ``val_dice``, ``seconds`` plus
    ``best_epoch`` and ``epochs_run``.
  """
  images, masks = _checks.images(images, masks, image_range=image_range)
  if variables is not None:
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], dict(variables))
  stacked, hist = _train(model, images[None], masks[None], config, "unroll",
                         jax.devices()[:1], variables)
  history = {name: [float(v) for v in hist[name][:, 0]]
             for name in ("train_loss", "val_loss", "val_dice")}
  history["seconds"] = [float(v) for v in hist["seconds"]]
  history["epochs_run"] = int(hist["epochs_run"][0])
  history["best_epoch"] = int(hist["best_epoch"][0])
  return stacking.tree_index(stacked, 0), history
