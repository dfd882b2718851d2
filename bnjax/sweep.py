"""Grids of source models: K models trained as one stack, K x M pairs adapted
and scored together, the model axis sharded over devices.

Every leaf of a stacked ``variables`` has a leading model axis. Model i of
:func:`train_many` is the model :func:`bnjax.train.fit` trains on
``images[i]`` with ``seed = config.seed + i``: same initialisation, split and
batch order, its own BatchNorm statistics (BatchNorm never pools over the
model axis). How the stack is mapped is a ``strategy``
(:mod:`bnjax.stacking`); with more than one device the model axis is split
over a one-axis ``jax.sharding.Mesh`` named ``"model"`` with ``jax.shard_map``
(K padded to a multiple of the device count, the padding dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnjax import adapt as _adapt
from bnjax import compiler
from bnjax import data as _data
from bnjax import metrics as _metrics
from bnjax import stacking
from bnjax import train as _train
from bnjax.data import Domain

AXIS = "model"


# --------------------------------------------------------------------------
# Devices


def make_mesh(devices=None) -> Mesh | None:
  """A one-axis mesh over ``devices`` (default: all), or None for one device."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) <= 1:
    return None
  return Mesh(np.array(devices), (AXIS,))


def _pad(tree, k_pad):
  """Pads the leading axis to ``k_pad`` by repeating the last entry."""
  def pad(a):
    a = jnp.asarray(a)
    extra = k_pad - a.shape[0]
    return a if not extra else jnp.concatenate([a, jnp.repeat(a[-1:], extra, 0)])
  return jax.tree_util.tree_map(pad, tree)


def _distributed(fn, mesh: Mesh | None, donate=(), xla_defaults: bool = False):
  """jit(fn) with every argument and result sharded along the model axis
  (``xla_defaults``: as in :func:`bnjax.compiler.jit`)."""
  if mesh is not None:
    fn = jax.shard_map(fn, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
  return compiler.jit(fn, donate_argnums=donate, xla_defaults=xla_defaults)


def _place(tree, mesh):
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)


# --------------------------------------------------------------------------
# Training


def train_many(model: nn.Module, images, masks, config: _train.TrainConfig = _train.TrainConfig(),
               *, strategy: str = "auto", devices=None):
  """Trains K models at once, model i on ``images[i]``, ``masks[i]``.

  Args:
    model: a linen model (as for :func:`bnjax.train.fit`).
    images: float32[K, n, H, W, C]; masks: bool[K, n, H, W].
    config: shared settings; model i uses ``seed = config.seed + i``.
    strategy: ``"auto"``, ``"vmap"`` or ``"unroll"`` (:mod:`bnjax.stacking`).
    devices: devices to shard the model axis over (default: all visible).

  Returns:
    (variables, history): stacked variables (leading axis K; each model's best
    validation epoch, as ``fit``), and a history whose per-epoch entries are
    float[epochs_run, K] arrays (NaN after a model stopped early) with
    ``best_epoch`` and ``epochs_run`` as int[K].
  """
  images, masks = _data.check_image_stack(images, masks)
  k, n = images.shape[:2]
  n_train, n_val = _train.split_sizes(n, config)
  mesh = make_mesh(devices)
  k_pad = k if mesh is None else -(-k // mesh.size) * mesh.size

  keys = [_train.seed_keys(config.seed + i) for i in range(k)]
  k_init = [kk[0] for kk in keys]
  k_split = jnp.stack([kk[1] for kk in keys])
  k_shuffle = jnp.stack([kk[2] for kk in keys])
  orders = jax.vmap(lambda key: jax.random.permutation(key, n))(k_split)
  take = jax.vmap(lambda a, o: a[o])
  train_x, train_y = take(images, orders[:, :n_train]), take(masks, orders[:, :n_train])
  val_x, val_y = take(images, orders[:, n_train:]), take(masks, orders[:, n_train:])

  tx = _train.make_optimizer(config)
  params_and_state = stacking.tree_stack(
      [_train.init_variables(model, key, tuple(images.shape[2:])) for key in k_init])
  params_and_state = dict(params_and_state)
  params = params_and_state.pop("params")
  state = _train.TrainState(params, params_and_state, jax.jit(jax.vmap(tx.init))(params))

  def one_step(state, x, y, idx, active):
    new, loss = _train.train_batch(model, tx, config.loss, state, x, y, idx)
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state)
    return new, loss

  eval_bs = min(config.eval_batch_size, max(n_val, 1))

  def one_eval(state, x, y):
    return _train.evaluate(model, config.loss, _train.variables_of(state), x, y, eval_bs)

  per_device = k_pad // (1 if mesh is None else mesh.size)
  step = _distributed(stacking.stacked(one_step, strategy), mesh, donate=(0,),
                      xla_defaults=compiler.unrolled_stack(stacking.resolve(strategy),
                                                           per_device))
  run_eval = _distributed(stacking.stacked(one_eval, strategy), mesh)
  batches_of = jax.jit(jax.vmap(_train.epoch_batches, in_axes=(0, None, None, None)),
                       static_argnums=(2, 3))

  state, train_x, train_y, val_x, val_y, k_shuffle = _place(
      _pad((state, train_x, train_y, val_x, val_y, k_shuffle), k_pad), mesh)
  active = np.ones(k_pad, bool)
  best = None
  best_dice = np.full(k_pad, -1.0)
  since_best = np.zeros(k_pad, int)
  best_epoch = np.zeros(k_pad, int)
  epochs_run = np.zeros(k_pad, int)
  history = {name: [] for name in ("train_loss", "val_loss", "val_dice", "seconds")}
  for epoch in range(config.epochs):
    start = time.perf_counter()
    batches = batches_of(k_shuffle, epoch, n_train, config.batch_size)
    mask = _place(jnp.asarray(active), mesh)
    losses = []
    for s in range(batches.shape[1]):
      state, loss = step(state, train_x, train_y, batches[:, s], mask)
      losses.append(loss)
    train_loss = np.asarray(jnp.mean(jnp.stack(losses), axis=0))
    if n_val:
      val_loss, val_dice = (np.asarray(a) for a in run_eval(state, val_x, val_y))
    else:
      val_loss = val_dice = np.full(k_pad, np.nan)
    epochs_run += active
    nan = lambda a: np.where(active, a, np.nan)
    for name, value in (("train_loss", nan(train_loss)), ("val_loss", nan(val_loss)),
                        ("val_dice", nan(val_dice))):
      history[name].append(value[:k])
    history["seconds"].append(time.perf_counter() - start)
    if not np.all(np.isfinite(train_loss[active])):
      raise FloatingPointError(
          f"training diverged at epoch {epoch + 1} for models "
          f"{np.flatnonzero(active & ~np.isfinite(train_loss)).tolist()}")
    if config.verbose:
      print(f"epoch {epoch + 1}/{config.epochs}  {int(active[:k].sum())} of {k} models "
            f"training  train_loss {np.nanmean(history['train_loss'][-1]):.4f}  "
            f"val_dice {np.nanmean(history['val_dice'][-1]):.4f} (mean)  "
            f"({history['seconds'][-1]:.1f} s)", file=sys.stderr, flush=True)
    if n_val:
      improved = active & (val_dice > best_dice)
      best_dice = np.where(improved, val_dice, best_dice)
      best_epoch = np.where(improved, epoch + 1, best_epoch)
      since_best = np.where(improved, 0, since_best + active)
      current = _train.variables_of(state)
      where = lambda a, b: jnp.where(
          jnp.asarray(improved).reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
      best = (jax.tree_util.tree_map(jnp.copy, current) if best is None
              else jax.tree_util.tree_map(where, current, best))
      if config.patience is not None:
        active = active & (since_best < config.patience)
    if not active.any():
      break
  out = best if n_val else _train.variables_of(state)
  out = jax.tree_util.tree_map(lambda a: a[:k], out)
  hist = {name: np.stack(v) for name, v in history.items() if name != "seconds"}
  hist["seconds"] = np.asarray(history["seconds"])
  hist["epochs_run"] = epochs_run[:k]
  hist["best_epoch"] = best_epoch[:k] if n_val else epochs_run[:k]
  return out, hist


# --------------------------------------------------------------------------
# Evaluation


@functools.lru_cache(maxsize=32)
def _iou_runner(model, strategy, empty):
  def iou(variables, x, y):
    logits = model.apply(variables, x, train=False)
    return jnp.mean(_metrics.iou_per_image(_train.logits_to_masks(logits), y, empty))
  return compiler.jit(stacking.stacked(iou, strategy))


def _stacked_iou(model, variables, images, masks, strategy, empty, batch_size):
  """float[P]: IoU of model i on set i, for stacked variables/images/masks."""
  run = _iou_runner(model, stacking.resolve(strategy), float(empty))
  n = images.shape[1]
  sums = 0.0
  for s in range(0, n, batch_size):
    part = slice(s, min(s + batch_size, n))
    sums = sums + np.asarray(run(variables, images[:, part], masks[:, part])) * (part.stop - part.start)
  return sums / n


def evaluate_grid(model: nn.Module, variables, source_eval, targets_adapt, targets_eval,
                  mode: str = "exact", oracle=None, *, strategy: str = "auto",
                  pair_chunk: int = 8, empty: float = 1.0, eval_batch_size: int = 64,
                  progress=None, **adapt_options) -> dict:
  """Scores K stacked source models on M target sets, without and with BN adaptation.

  Args:
    model: the linen model.
    variables: stacked source variables (leading axis K).
    source_eval: (images float[K, n, H, W, C], masks bool[K, n, H, W]): each
      source model's own held-out data.
    targets_adapt: float[M, n_a, H, W, C]: the unlabelled images each target's
      adaptation uses (pass the evaluation images for the transductive protocol).
    targets_eval: (images float[M, n_e, H, W, C], masks bool[M, n_e, H, W]).
    mode, **adapt_options: as :func:`bnjax.adapt.recompute_batch_stats`.
    oracle: optional stacked variables of M target-trained models.
    pair_chunk: (source, target) pairs adapted per call.
    eval_batch_size: images per forward pass when scoring.
    progress: optional callable(done_pairs, total_pairs).

  Returns:
    float[K, M] arrays ``source_iou`` (model k on its own source, repeated
    along M), ``iou_no_adapt``, ``iou_adapted`` and, with ``oracle``,
    ``iou_oracle`` (oracle m on target m, repeated along K).
  """
  src_x, src_y = _data.check_image_stack(*source_eval)
  tgt_x, tgt_y = _data.check_image_stack(*targets_eval)
  tgt_a = _data.check_image_stack(targets_adapt, name="targets_adapt")
  k, m = src_x.shape[0], tgt_x.shape[0]
  if tgt_a.shape[0] != m:
    raise ValueError(f"targets_adapt must be float[{m}, n, H, W, C], got {tgt_a.shape}")
  if pair_chunk < 1:
    raise ValueError(f"pair_chunk must be >= 1, got {pair_chunk}")
  iou = functools.partial(_stacked_iou, model, strategy=strategy, empty=empty,
                          batch_size=eval_batch_size)
  source_iou = iou(variables, src_x, src_y)
  pairs = [(a, b) for a in range(k) for b in range(m)]
  none, adapted = np.zeros((k, m)), np.zeros((k, m))
  for start in range(0, len(pairs), pair_chunk):
    chunk = pairs[start:start + pair_chunk]
    ks = np.array([a for a, _ in chunk])
    ms = np.array([b for _, b in chunk])
    v = jax.tree_util.tree_map(lambda a: a[ks], variables)
    none[ks, ms] = iou(v, tgt_x[ms], tgt_y[ms])
    v_ad = _adapt.recompute_batch_stats_stacked(model, v, tgt_a[ms], mode=mode,
                                                strategy=strategy, **adapt_options)
    adapted[ks, ms] = iou(v_ad, tgt_x[ms], tgt_y[ms])
    if progress is not None:
      progress(start + len(chunk), len(pairs))
  out = {"source_iou": np.repeat(source_iou[:, None], m, 1),
         "iou_no_adapt": none, "iou_adapted": adapted}
  if oracle is not None:
    out["iou_oracle"] = np.repeat(iou(oracle, tgt_x, tgt_y)[None], k, 0)
  return out


# --------------------------------------------------------------------------
# Named grids


@dataclasses.dataclass(frozen=True)
class Group:
  """One K x M block of a grid: every source against every target."""

  label: str
  sources: tuple[Domain, ...]
  targets: tuple[Domain, ...]
  layout: str = "matrix"  # or "sigma_panels" (one source, many targets)


@dataclasses.dataclass(frozen=True)
class Grid:
  name: str
  groups: tuple[Group, ...]

  def domains(self) -> list[Domain]:
    """Every distinct domain, in first-seen order."""
    seen = {}
    for g in self.groups:
      for d in g.sources + g.targets:
        seen.setdefault(d, None)
    return list(seen)

  def sources(self) -> list[Domain]:
    seen = {}
    for g in self.groups:
      for d in g.sources:
        seen.setdefault(d, None)
    return list(seen)


def brightness_group(k: float, mu1s: Sequence[float], sigma: float = 50.0) -> Group:
  doms = tuple(Domain(m, sigma, m + k, sigma) for m in mu1s if m + k <= 255)
  return Group(f"k{k:g}", doms, doms)


def many_to_many(label: str, domains: Sequence[Domain]) -> Group:
  return Group(label, tuple(domains), tuple(domains))


def sigma_panel_targets(mu1s, deltas, sigmas1, sigmas2, mu2_max=192.0) -> tuple[Domain, ...]:
  return tuple(Domain(m, s1, m + d, s2) for s1 in sigmas1 for s2 in sigmas2
               for m in mu1s for d in deltas if m + d <= mu2_max)


def named_grid(name: str, scale: str = "cpu") -> Grid:
  """The study's grids; ``scale="cpu"`` is a smaller version that runs in minutes."""
  if scale not in ("cpu", "full"):
    raise ValueError(f"scale must be 'cpu' or 'full', got {scale!r}")
  cpu = scale == "cpu"
  if name == "brightness":
    mu1s = [10, 50, 90, 130, 170] if cpu else list(range(10, 171, 20))
    return Grid(name, tuple(brightness_group(k, mu1s) for k in (20, 40, 80)))
  if name == "geometric":
    doms = [Domain(122, 50, 134, 50), Domain(115, 50, 141, 50), Domain(100, 50, 156, 50),
            Domain(68, 50, 188, 50), Domain(1, 50, 255, 50)]
    return Grid(name, (many_to_many("geometric", doms[1:] if cpu else doms),))
  if name == "clip_corrected":
    if cpu:
      targets = sigma_panel_targets([64, 112, 160], [24, 55, 128], [6, 30], [6, 30])
    else:
      targets = sigma_panel_targets([64, 80, 96, 112, 128, 144, 160],
                                    [24, 32, 42, 55, 73, 97, 128],
                                    [6, 12, 18, 24, 30], [6, 12, 18, 24, 30])
    return Grid(name, (Group("clip_corrected", (Domain(96, 18, 138, 18),), targets,
                             "sigma_panels"),))
  raise ValueError(f"unknown grid {name!r}; named grids: {NAMED_GRIDS}")


NAMED_GRIDS = ("brightness", "geometric", "clip_corrected")


def parse_values(text: str) -> list[float]:
  """``"10,30,50"`` or a range ``"10:170:20"`` (inclusive stop) -> floats."""
  text = text.strip()
  try:
    if ":" in text:
      parts = [float(p) for p in text.split(":")]
      if len(parts) != 3 or parts[2] <= 0:
        raise ValueError
      start, stop, step = parts
      count = int(math.floor((stop - start) / step + 1e-9)) + 1
      return [start + i * step for i in range(max(count, 0))]
    return [float(p) for p in text.split(",") if p.strip()]
  except ValueError:
    raise ValueError(
        f"expected a list 'a,b,c' or a range 'start:stop:step' (step > 0), got {text!r}") from None
