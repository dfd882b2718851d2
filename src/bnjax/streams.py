"""Adaptation on a stream: batches that arrive one at a time, small, from a
domain that changes, with a label distribution that drifts.

A :class:`Stream` is built by :func:`make` from a pool of source-domain
images and the shifts of :mod:`bnjax.shifts`, keyed and reproducible, in one
of the :data:`SETTINGS` of the test-time-adaptation benchmarks (the settings
of Döbler et al.'s benchmark, :cite:p:`dobler2023rmt`, with a segmentation
label drift):

``"iid"``
  one shift at one severity, the pool shuffled and cut into batches;
``"episodic"``
  the same batches, every batch adapted from the source model (the method's
  state is reset before each batch);
``"continual"``
  a sequence of shifts (default: every shift of :data:`bnjax.shifts.SHIFTS`)
  at one severity, each a block of batches, no reset between blocks;
``"gradual"``
  per shift, severity 1, 2, 3, 4, 5, 4, 3, 2, 1 over consecutive blocks;
``"mixed"``
  every image draws its shift (and its severity, from those given) at
  random, so one batch mixes domains;
``"correlated"``
  the images of ``"iid"`` ordered by their foreground fraction, so that
  consecutive batches share a label distribution that drifts over time
  (the segmentation counterpart of label-sorted streams): the same stream
  as ``setting="iid", labels="sorted"``.

The class balance is a second axis, ``labels`` (:data:`LABELS`), applied to
the pool's draws before the setting's appearance, so that the two compose
(``setting="mixed", labels="drift"``; ``setting="iid", shifts=(),
labels="shift"``: the source's appearance, a label shift only): ``"iid"``
the pool's masks; ``"shift"`` new masks with more foreground for every image
(the data module's Perlin generator at a lower threshold, the images
re-rendered from the pool's class statistics: :func:`bnjax.shifts.relabel`);
``"drift"`` the same with a severity that rises from 0 to ``label_severity``
and falls back over the stream; ``"sorted"`` each block's images ordered by
their foreground fraction; ``"alternate"`` every block of the setting (its
appearance, the pool's masks) followed by a block of the source's appearance
with new masks at ``label_severity``, so that appearance shifts and label
shifts take turns (``setting="continual", shifts=("brightness",
"rotation"), labels="alternate"``: brightness, labels, rotation, labels).

An online method is one pure step ``(state, inputs) -> (state, logits)``
(:func:`online`): the logits of a batch come from the state *at the time the
batch arrives*, before any update on it (the online protocol: predictions
count as they are made; TENT's own code returns the outputs of the forward
pass it then updates from). :func:`run` drives the step over time
(:func:`bnjax.compiler.driven`: on CPU the step compiled once and called
per batch, elsewhere one ``jax.lax.scan``; compiled once per method, batch
size and shape: the float options (:data:`HYPER`) are arrays in the
method's state, ``state["hyper"]``, so another learning rate, momentum or
threshold runs the same compiled program); :func:`run_many` maps the step
over K models and M streams, all of them advancing together.

Methods (:data:`METHODS`), on any linen model with BatchNorm layers (the
any-model machinery of :mod:`bnjax.adapt`: the layers normalise themselves
with the statistics put into them):

``"source"``
  no adaptation: the stored statistics.
``"bn_test"``
  every BatchNorm layer normalises with the current batch's moments only
  (test-time BN; :cite:t:`nado2020evaluating`, :cite:t:`schneider2020covariate`).
``"bn_alpha"``
  the current batch's moments mixed with the source statistics,
  ``alpha * batch + (1 - alpha) * source`` (``alpha`` weighs the *batch*,
  as in :func:`bnjax.adapt.recompute_batch_stats` and as the BN-α of the
  TTA benchmark of Döbler et al., whose default is 0.1, used here), or with
  ``prior=N`` the source counted as ``N`` examples against the batch's
  ``B``: ``alpha = B / (B + N)`` (Schneider et al. 2020). Note that robusta's
  ``prior`` argument is the *source's* weight, ``1 - alpha`` here.
``"ema_bn"``
  running statistics that start from the source's and follow every batch,
  ``running = (1 - momentum) running + momentum batch``, used to normalise
  that batch (robust BN; RoTTA, :cite:t:`yuan2023rotta`, momentum 0.05, the
  default). Variances are biased, as Flax stores them. The momentum is per
  batch, as in RoTTA; ``per_image=True`` makes it per image (a batch of B
  images moves the statistics by ``1 - (1 - momentum)^B``), so that the
  statistics follow a stream at the same pace in images whatever the batch
  size.
``"augbn"``
  the batch's statistics pooled with its flipped copies (``augment``:
  ``"flips"``, the 4 of horizontal and vertical flips; ``"dihedral"``, the 8
  flips and transposes of square images), then mixed with the source's as
  ``bn_alpha`` does (``alpha``, default 1, or ``prior=N`` against the n
  pooled images): the small-batch remedy of single-image adaptation
  (SITA, :cite:t:`khurana2021sita`; DUA, :cite:t:`mirza2022dua`) without a gradient.
  The inputs must be images ``[B, H, W, C]``; the logits are the original
  images'.
``"balanced"``
  class-balanced statistics (:func:`bnjax.adapt.recompute_balanced_stats`
  online; the idea of TRIBE's balanced BN, :cite:t:`su2024tribe`, made per
  pixel): at every layer each class's running mean and variance of the
  layer's input (starting from the source's, ``class_stats`` of
  :func:`bnjax.adapt.add_class_stats`) move towards the batch's, weighted by
  the masks pooled to the layer, by ``momentum`` per image (a batch of B
  moves them by ``1 - (1 - momentum)^B``; default 0.2, chosen on one source
  model's streams at batch 1 and 4 among 0.1, 0.2, 0.4; a class absent from
  the batch keeps its moments), and the layer normalises
  with them recombined with the source's class proportions. Per batch, two
  passes, from the source model's masks and from test-time BN's; the one
  whose normalised class means are closer to the source's is used and its
  running moments kept (``state["source_masks"]`` counts the batches where
  the source's masks won). A change of class balance then moves no
  statistic; a change of appearance moves every class's.
``"lame"``
  output-only (:cite:t:`boudiaf2022lame`, "Parameter-free online test-time
  adaptation"): no parameter or statistic changes; the source model's
  probabilities are corrected per batch by the Laplacian-regularised
  maximum likelihood of LAME's code (:func:`lame_fixed_point`), the
  affinity a kNN graph (``knn``, default 5 as their kNN affinity) over
  pixels: each pixel's nearest pixels by the L2-normalised features entering
  the model's last module (a U-Net's last decoder map), drawn from the
  (2 ``window`` + 1)^2 square around it (default 2: 5x5) instead of the whole
  batch (which is B H W pixels); ``bound_lambda`` (1) and ``max_steps``
  (100) as their code. The safe fallback under label shift: it keeps the
  source's statistics.
``"gated"``
  bnjax's own, the method it recommends: an ``inner`` method runs on every
  batch, but its prediction is used only where the appearance changed;
  elsewhere the source model's prediction stands. The default
  ``signal="appearance"`` (:data:`GATE_SIGNALS`) measures the change per
  class (:func:`bnjax.adapt.appearance_gap`): under the source model's masks,
  each class's mean and variance of the input pixels (interior pixels only)
  against the source's, a moving average of it (``signal_momentum`` per
  image, default 0.2) against ``threshold`` (default 0.015). A change of
  class balance leaves each class's pixels as they were, so the source's
  prediction is kept where a label shift would move every BatchNorm
  statistic; a change of appearance moves them. Its inner method defaults
  to ``"balanced"``; both need the class statistics of
  :func:`bnjax.adapt.add_class_stats` in the variables. ``signal=
  "agreement"`` is the earlier gate (no class statistics; inner ``"ema_bn"``
  per image, momentum 0.1): the inner prediction is used where its masks'
  IoU with the source's over the batch is below ``threshold`` (default 0.5).
  In both, an inner prediction that collapses (one class over the whole
  batch while the source's has both) is not used, and the inner state starts
  again from the source. ``state["signal"]`` holds the last signal,
  ``state["adapted"]`` counts the batches that used the inner prediction.
``"tent"``
  one entropy-minimisation step on the BatchNorm scale and bias per batch,
  the layers normalising with the batch's moments (:cite:t:`wang2021tent`;
  default Adam, learning rate 1e-3, their CIFAR setting).
``"eta"``, ``"eata"``
  :cite:t:`niu2022eata` ("Efficient test-time model adaptation without
  forgetting"), per pixel: only pixels whose entropy E is below E0 = 0.4 ln C
  count, each weighted by 1 / exp(E - E0), the loss their weighted mean.
  The redundancy filter is per image, on its mean class probabilities over
  its reliable pixels: left out when ``|cosine|`` with the moving average of the
  kept images' (0.9 old + 0.1 new) reaches ``d_margin``. It is off by
  default (``d_margin=None``): with C = 2 the cosine of two probability
  vectors is at least about 0.7, so the paper's 0.05 would keep no image
  after the first batch. ``"eata"`` adds the Fisher anchor
  ``fisher_alpha * sum F (theta - theta0)^2`` (paper: 2000), F the squared
  gradient of the cross-entropy against the model's own per-pixel argmax on
  ``source_images`` (unlabelled), averaged over batches of
  ``fisher_batch_size``. In both, a batch of which no pixel survives the filters
  makes no step (the optimizer's state unchanged too), as in EATA's code.
``"sar"``
  :cite:t:`niu2023sar` ("Towards stable test-time adaptation in dynamic wild
  world"): the reliable pixels' mean entropy, a sharpness-aware step (the
  weights moved by ``rho g / |g|``, paper 0.05), the entropy of the pixels
  reliable in both passes, whose gradient updates the original weights;
  when the moving average of that loss (0.9 old + 0.1 new) falls below
  ``reset_constant`` the model (weights and optimizer state) goes back to
  the source (default 0.2 ln C / ln 1000: the paper's 0.2 nats at 1000
  classes, scaled to C classes); the moving average itself is kept, as in
  SAR's code, so the model is reset again until it climbs back above.

The gradient methods default to Adam, learning rate 1e-3, as TENT here; the
papers' ImageNet setting (SGD, momentum 0.9, 2.5e-4 at batch 64) is
``optimizer=optax.sgd(2.5e-4, momentum=0.9)``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bnjax import _checks
from bnjax import _modules as _m
from bnjax import adapt as _adapt
from bnjax import compiler
from bnjax import methods as _methods
from bnjax import metrics
from bnjax import shifts as _shifts
from bnjax import stacking
from bnjax.metrics import logits_to_masks

__all__ = ["Stream", "StreamResult", "Online", "make", "online", "run", "run_many",
           "pixel_entropy", "lame_fixed_point", "SETTINGS", "LABELS", "METHODS", "GRADUAL",
           "AUGMENTS", "HYPER", "GATE_SIGNALS", "GATE_THRESHOLDS"]

#: The settings of :func:`make`.
SETTINGS: tuple[str, ...] = ("iid", "episodic", "continual", "gradual", "mixed", "correlated")
#: The online methods of :func:`run`.
METHODS: tuple[str, ...] = ("source", "bn_test", "bn_alpha", "ema_bn", "augbn", "balanced",
                             "lame", "tent", "eta", "eata", "sar", "gated")
#: The severities of one shift, block by block, in the ``"gradual"`` setting.
GRADUAL: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)  # severities of a shift, block by block
_ONE_SHIFT = ("iid", "episodic", "correlated")
#: The label axis of :func:`make`, independent of the setting's appearance.
LABELS: tuple[str, ...] = ("iid", "shift", "drift", "sorted", "alternate")
# The mask threshold of label severity s (the "threshold" shift's levels):
# 0.4 (the study's, foreground about 0.20) at 0 to 0.15 (about 0.65) at 5.
_LABEL_THRESHOLD = lambda s: 0.4 - 0.05 * s


# --------------------------------------------------------------------------
# Streams


@dataclasses.dataclass(frozen=True)
class Stream:
  """T batches of B images, in the order they arrive.

  Attributes:
    images: float32[T, B, H, W, C] in [0, 1].
    masks: bool[T, B, H, W] (for scoring; never given to a method).
    shift: int[T, B], each image's shift as an index into ``shifts``.
    severity: int[T, B], each image's severity (0..5).
    block: int[T], the block (one domain segment) each batch belongs to.
    reset: bool[T], whether the method starts again from the source model
      before that batch (every batch in ``"episodic"``).
    shifts: the shift names ``shift`` indexes (empty: no appearance shift,
      ``shift`` is -1).
    setting: the setting it was built in.
    labels: its label axis (:data:`LABELS`).
    label_severity: float[T], each batch's label severity (0: the pool's
      masks; s: new masks at threshold ``0.4 - 0.05 s``).
  """

  images: Any
  masks: Any
  shift: np.ndarray
  severity: np.ndarray
  block: np.ndarray
  reset: np.ndarray
  shifts: tuple
  setting: str
  labels: str = "iid"
  label_severity: Any = None

  @property
  def steps(self) -> int:
    return int(self.images.shape[0])

  @property
  def batch_size(self) -> int:
    return int(self.images.shape[1])


def _severities(value, name: str = "severity") -> tuple[int, ...]:
  values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
  if not values:
    raise ValueError(f"{name} must be an integer in 0..5 or a non-empty sequence of them")
  for v in values:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 5:
      raise ValueError(f"{name} must be an integer in 0..5 (or, for 'mixed', a sequence of "
                       f"them), got {value!r}")
  return tuple(int(v) for v in values)


def _order(key, n: int, count: int) -> jax.Array:
  """``count`` indices into a pool of ``n``: consecutive permutations of it."""
  perms = [jax.random.permutation(jax.random.fold_in(key, r), n) for r in range(-(-count // n))]
  return jnp.concatenate(perms)[:count]


def make(key: jax.Array, images, masks, *, setting: str, batch_size: int,
         shifts: Sequence[str] | str | None = None, severity=5,
         block_steps: int | None = None, labels: str = "iid",
         label_severity: float = 5.0) -> Stream:
  """A stream of batches from a pool of source-domain images (see the module
  docstring for the settings and the label axis).

  Args:
    key: PRNG key; the same key gives the same stream.
    images: the pool, float[N, H, W, C] (or [N, H, W]) in [0, 1].
    masks: bool[N, H, W].
    setting: one of :data:`SETTINGS` (the appearance over time).
    batch_size: images per batch, in 1..N.
    shifts: shift names of :data:`bnjax.shifts.SHIFTS`: one for ``"iid"``,
      ``"episodic"`` and ``"correlated"`` (default ``"brightness"``), the
      sequence for ``"continual"`` and ``"gradual"`` and the choices of
      ``"mixed"`` (default: all of them); ``()`` for ``"iid"`` and
      ``"episodic"``: no appearance shift (the source's appearance).
    severity: 0..5 (0: the source itself); for ``"mixed"`` also a sequence
      to draw from; ``"gradual"`` runs its own sequence :data:`GRADUAL`.
    block_steps: batches per block (default: the pool once, N // B); the
      images of a block are a fresh permutation of the pool (repeated when
      the block needs more than N images).
    labels: one of :data:`LABELS` (the class balance over time, applied
      before the appearance): ``"iid"`` the pool's masks; ``"shift"`` new
      masks at ``label_severity`` for every image; ``"drift"`` new masks
      whose severity drifts from 0 to ``label_severity`` and back over the
      stream; ``"sorted"`` the images of each block ordered by their
      foreground fraction; ``"alternate"`` every block of the setting
      followed by a block of the source's appearance whose masks are new at
      ``label_severity`` (twice the blocks). ``"shift"``, ``"drift"`` and
      ``"alternate"`` need square one-channel images
      (:func:`bnjax.shifts.relabel`).
    label_severity: in [0, 5]: new masks ``|perlin noise| > 0.4 - 0.05 s``
      (the ``"threshold"`` shift's scale: about 0.20 foreground at 0, 0.65
      at 5), images re-rendered from the pool's class statistics.

  Returns:
    A :class:`Stream` of T = blocks x block_steps batches.
  """
  _checks.key(key)
  _checks.choice("setting", setting, SETTINGS)
  _checks.choice("labels", labels, LABELS)
  images, masks = _checks.images(images, masks)
  n = images.shape[0]
  batch_size = _checks.positive_int("batch_size", batch_size)
  if batch_size > n:
    raise ValueError(f"batch_size must be in 1..{n} (the pool's images), got {batch_size}")
  steps = (n // batch_size if block_steps is None
           else _checks.positive_int("block_steps", block_steps))
  if setting == "correlated":  # the iid setting with its images sorted by foreground
    if labels not in ("iid", "sorted"):
      raise ValueError(f"setting 'correlated' is setting='iid', labels='sorted'; for labels="
                       f"{labels!r} pass setting='iid'")
    labels = "sorted"
  label_sev = _check_number("label_severity", label_severity, 0.0, 5.0)
  if labels in ("shift", "drift", "alternate") and (images.shape[-1] != 1
                                       or images.shape[1] != images.shape[2]):
    raise ValueError(f"labels={labels!r} draws new masks and re-renders the images: they must "
                     f"be square and one-channel, got {images.shape[1:]}")
  if shifts is None:
    names = ("brightness",) if setting in _ONE_SHIFT else _shifts.SHIFTS
  else:
    names = (shifts,) if isinstance(shifts, str) else tuple(shifts)
  if not names and setting not in ("iid", "episodic"):
    raise ValueError(f"shifts must name at least one shift for setting {setting!r} (no "
                     "appearance shift, shifts=(), is for 'iid' and 'episodic')")
  for s in names:
    _checks.choice("shifts", s, _shifts.SHIFTS)
  if setting in _ONE_SHIFT and len(names) > 1:
    raise ValueError(f"setting {setting!r} streams one shift; got shifts={names}")
  sevs = _severities(severity)
  if setting != "mixed" and len(sevs) != 1:
    raise ValueError(f"severity must be one integer for setting {setting!r}, got {severity!r}")
  if setting == "gradual":
    blocks = [(s, v) for s in names for v in GRADUAL]
  elif setting == "mixed":
    blocks = [(None, None)]
  elif not names:
    blocks = [(None, 0)]
  else:
    blocks = [(s, sevs[0]) for s in (names if setting == "continual" else names[:1])]
  # "alternate": after each block of the setting, one of the source's
  # appearance (shift None, severity 0) and new masks ("label" marks it).
  label_block = [False] * len(blocks)
  if labels == "alternate":
    blocks = [blk for pair in zip(blocks, [(None, 0)] * len(blocks)) for blk in pair]
    label_block = [b % 2 == 1 for b in range(len(blocks))]

  t = len(blocks) * steps
  # Each batch's label severity: constant, 0 -> label_severity -> 0 over the
  # stream, or label_severity on alternate's label blocks.
  if labels == "shift":
    label_t = np.full(t, label_sev)
  elif labels == "drift":
    label_t = label_sev * np.sin(np.pi * (np.arange(t) + 0.5) / t) ** 2
  elif labels == "alternate":
    label_t = np.repeat(np.where(label_block, label_sev, 0.0), steps)
  else:
    label_t = np.zeros(t)
  count = steps * batch_size
  xs, ys, shift_idx, sev = [], [], [], []
  for b, (s, v) in enumerate(blocks):
    k_order, k_shift, k_draw = jax.random.split(jax.random.fold_in(key, b), 3)
    order = _order(k_order, n, count)
    x, y = images[order], masks[order]
    if labels in ("shift", "drift") or label_block[b]:
      per_image = np.repeat(label_t[b * steps:(b + 1) * steps], batch_size)
      x, y = _shifts.relabel(jax.random.fold_in(k_draw, 1), x, y,
                             _LABEL_THRESHOLD(per_image))
    if label_block[b]:
      si, vi = np.full(count, -1), np.zeros(count, int)
    elif setting == "mixed":
      k_s, k_v = jax.random.split(k_draw)
      si = np.asarray(jax.random.randint(k_s, (count,), 0, len(names)))
      vi = np.asarray(sevs)[np.asarray(jax.random.randint(k_v, (count,), 0, len(sevs)))]
      x, y = np.array(x), np.array(y)
      for g, (a, c) in enumerate(sorted(set(zip(si.tolist(), vi.tolist())))):
        where = np.flatnonzero((si == a) & (vi == c))
        gx, gy = _shifts.apply(jax.random.fold_in(k_shift, g), x[where], y[where], names[a],
                               int(c))
        x[where], y[where] = np.asarray(gx), np.asarray(gy)
    elif s is None:
      si, vi = np.full(count, -1), np.zeros(count, int)
    else:
      x, y = _shifts.apply(k_shift, x, y, s, v)
      si, vi = np.full(count, names.index(s)), np.full(count, v)
    if labels == "sorted":
      # Ascending foreground fraction (stable) within the block: the labels
      # drift, the images are the block's reordered.
      by = np.argsort(np.asarray(jnp.mean(y, axis=(1, 2))), kind="stable")
      x, y, si, vi = jnp.asarray(x)[by], jnp.asarray(y)[by], si[by], vi[by]
    xs.append(jnp.asarray(x))
    ys.append(jnp.asarray(y))
    shift_idx.append(si)
    sev.append(vi)
  x, y = jnp.concatenate(xs), jnp.concatenate(ys)
  si, vi = np.concatenate(shift_idx), np.concatenate(sev)
  shape = (t, batch_size)
  return Stream(images=x.reshape(shape + x.shape[1:]), masks=y.reshape(shape + y.shape[1:]),
                shift=si.reshape(shape), severity=vi.reshape(shape),
                block=np.repeat(np.arange(len(blocks)), steps),
                reset=np.full(t, setting == "episodic"), shifts=names, setting=setting,
                labels=labels, label_severity=label_t)


# --------------------------------------------------------------------------
# Online methods: one pure step


@dataclasses.dataclass(frozen=True)
class Online:
  """An online method: ``init(variables, inputs=None) -> state`` (``inputs``
  a batch, needed by ``eta`` and ``eata`` to size their moving average) and
  the pure step ``step(state, inputs) -> (state, logits)``, ``inputs`` a
  tuple of the batch's arrays ``[B, ...]``; the logits are the state's
  prediction of the batch before any update on it.

  The float options (:data:`HYPER`: momentum, alpha, prior, threshold,
  learning rate, margins, ...) are not constants of the step: ``init`` puts
  them in ``state["hyper"]`` as float32 scalars (as
  ``optax.inject_hyperparams`` carries a learning rate), so that another
  value runs the same compiled step. ``structure`` is what shapes the step,
  the compile key of :func:`run`: ``options`` with each float reduced to
  whether it is used (given, or not None)."""

  name: str
  init: Callable
  step: Callable
  options: tuple = ()  # the checked options, defaults filled in
  structure: tuple = ()  # the options that shape the step (floats: whether used)


_GRADIENT = ("tent", "eta", "eata", "sar")
#: The augmentations of ``augbn``.
AUGMENTS: tuple[str, ...] = ("flips", "dihedral")


def _copies(x, augment: str) -> list:
  """Images ``[B, H, W, C]`` and their flipped (and, ``"dihedral"``,
  transposed) copies."""
  flips = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
  if augment == "flips":
    return flips
  return flips + [jnp.swapaxes(f, 1, 2) for f in flips]
_DEFAULTS = {
    "source": {}, "bn_test": {},
    "bn_alpha": {"alpha": 0.1, "prior": None},
    "ema_bn": {"momentum": 0.05, "per_image": False},
    "augbn": {"augment": "flips", "alpha": 1.0, "prior": None},
    "balanced": {"momentum": 0.2},
    "lame": {"knn": 5, "window": 2, "bound_lambda": 1.0, "max_steps": 100},
    "tent": {"learning_rate": 1e-3, "optimizer": None},
    "eta": {"learning_rate": 1e-3, "optimizer": None, "e_margin": None, "d_margin": None},
    "eata": {"learning_rate": 1e-3, "optimizer": None, "e_margin": None, "d_margin": None,
             "fisher_alpha": 2000.0, "fisher_batch_size": 8},
    "sar": {"learning_rate": 1e-3, "optimizer": None, "e_margin": None, "rho": 0.05,
            "reset_constant": None},
    "gated": {"signal": "appearance", "inner": None, "inner_options": {}, "threshold": None,
              "signal_momentum": 0.2},
}
# gated's inner options when none are given (the statistics follow images, not batches).
_GATED_INNER = {"ema_bn": {"per_image": True, "momentum": 0.1}}
#: What ``gated`` decides by: the per-class appearance change (default) or
#: the agreement of the inner method's masks with the source's.
GATE_SIGNALS: tuple[str, ...] = ("appearance", "agreement")
#: The default threshold of each signal of ``gated``. ``"appearance"``: 0.015,
#: between the signal under label shifts of two development models (at most
#: 0.006 at batch 4, masks at threshold 0.15) and under the mildest
#: appearance shifts (from 0.028: brightness and contrast at severity 1); the
#: streams and when-to-adapt experiments measure it held out.
GATE_THRESHOLDS = types.MappingProxyType({"appearance": 0.015, "agreement": 0.5})
# Options that are arrays, used by ``init`` only (not part of a compile key).
_ARRAY_OPTIONS = {"eata": ("source_images",)}
#: The float options: carried in the state (``state["hyper"]``), never compiled in.
HYPER: tuple[str, ...] = ("alpha", "prior", "momentum", "threshold", "learning_rate",
                          "e_margin", "d_margin", "fisher_alpha", "rho", "reset_constant",
                          "bound_lambda", "signal_momentum")


def _check_number(name, value, lo, hi, closed_lo=True):
  v = _checks.number(name, value, minimum=-np.inf)
  if not (lo <= v if closed_lo else lo < v) or v > hi:
    raise ValueError(f"{name} must be in {'[' if closed_lo else '('}{lo:g}, {hi:g}], got {value!r}")
  return v


def _options(method: str, options: dict) -> tuple:
  """The checked options of ``method`` as a hashable tuple (its defaults
  filled in; array options left out)."""
  allowed = _DEFAULTS[method]
  arrays = _ARRAY_OPTIONS.get(method, ())
  unknown = sorted(set(options) - set(allowed) - set(arrays))
  if unknown:
    raise ValueError(f"method {method!r} takes the options "
                     f"{sorted([*allowed, *arrays]) or 'none'}, got {unknown}")
  out = {**allowed, **{k: v for k, v in options.items() if k not in arrays}}
  if method == "gated":
    _checks.choice("signal", out["signal"], GATE_SIGNALS)
    if out["inner"] is None:
      out["inner"] = "balanced" if out["signal"] == "appearance" else "ema_bn"
    _checks.choice("inner", out["inner"], tuple(m for m in METHODS if m not in ("source",
                                                                                "gated")))
    if "inner_options" not in options:  # the default inner's own default
      out["inner_options"] = _GATED_INNER.get(out["inner"], {})
    given = out["inner_options"]
    given = dict(given.items() if isinstance(given, Mapping) else given)
    # Checked as the inner method's own options (arrays are passed on, not kept).
    out["inner_options"] = _options(out["inner"], given)
    if out["threshold"] is None:
      out["threshold"] = GATE_THRESHOLDS[out["signal"]]
    if out["signal"] == "agreement":
      out["threshold"] = _check_number("threshold", out["threshold"], 0.0, 1.0)
    else:
      out["threshold"] = _checks.number("threshold", out["threshold"], minimum=0.0)
    out["signal_momentum"] = _check_number("signal_momentum", out["signal_momentum"], 0.0, 1.0,
                                           closed_lo=False)
  if method == "augbn":
    _checks.choice("augment", out["augment"], AUGMENTS)
  if method in ("bn_alpha", "augbn"):
    if options.get("prior") is not None:
      if "alpha" in options:
        raise ValueError(f"{method} takes alpha or prior, not both")
      out["prior"] = _checks.number("prior", out["prior"],
                                    what=", the source statistics' weight in examples")
      out["alpha"] = None
    else:
      out["alpha"] = _check_number("alpha", out["alpha"], 0.0, 1.0)
  if method in ("ema_bn", "balanced"):
    out["momentum"] = _check_number("momentum", out["momentum"], 0.0, 1.0, closed_lo=False)
  if method == "ema_bn":
    if not isinstance(out["per_image"], (bool, np.bool_)):
      raise ValueError(f"per_image must be True or False, got {out['per_image']!r}")
    out["per_image"] = bool(out["per_image"])
  if method == "lame":
    out["knn"] = _checks.positive_int("knn", out["knn"])
    out["window"] = _checks.positive_int("window", out["window"])
    out["max_steps"] = _checks.positive_int("max_steps", out["max_steps"])
    if out["knn"] > (2 * out["window"] + 1) ** 2 - 1:
      raise ValueError(f"knn must be at most the {(2 * out['window'] + 1) ** 2 - 1} other pixels "
                       f"of a window of radius {out['window']}, got {out['knn']}")
    out["bound_lambda"] = _checks.number("bound_lambda", out["bound_lambda"])
  if method in _GRADIENT:
    out["learning_rate"] = _checks.number("learning_rate", out["learning_rate"])
    if out["optimizer"] is not None and not isinstance(out["optimizer"],
                                                       optax.GradientTransformation):
      raise ValueError(f"optimizer must be an optax.GradientTransformation or None, got "
                       f"{type(out['optimizer']).__name__}")
    for name in ("e_margin", "d_margin", "reset_constant"):
      if out.get(name) is not None:
        out[name] = _checks.number(name, out[name], minimum=0.0)
    for name in ("fisher_alpha", "rho"):
      if name in out:
        out[name] = _checks.number(name, out[name])
    if "fisher_batch_size" in out:
      out["fisher_batch_size"] = _checks.positive_int("fisher_batch_size",
                                                      out["fisher_batch_size"])
  return tuple(sorted(out.items()))


def _split(method: str, options: tuple) -> tuple[tuple, dict]:
  """(structure, hyper) of checked ``options``: the structure keeps every
  option but the floats of :data:`HYPER`, reduced to whether they are used
  (``learning_rate`` is not where an ``optimizer`` is given); ``hyper`` the
  used floats. The gated method's inner options become the inner structure
  (its floats are in the inner state)."""
  opts = dict(options)
  structure, hyper = {}, {}
  for k, v in opts.items():
    if k in HYPER:
      used = v is not None and not (k == "learning_rate" and opts.get("optimizer") is not None)
      structure[k] = used
      if used:
        hyper[k] = float(v)
    elif k == "inner_options":
      structure[k] = _split(opts["inner"], v)[0]
    else:
      structure[k] = v
  return tuple(sorted(structure.items())), hyper


def _per_image(momentum, batch_size: int):
  """A per-image momentum as the weight of a batch of ``batch_size``: B images
  move a running estimate as B batches of one would, ``1 - (1 - m)^B``."""
  return 1.0 - (1.0 - momentum) ** batch_size


def _hyper_arrays(hyper: dict) -> dict:
  return {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}


def _stats_of(variables) -> dict:
  return _adapt._stats_of(variables["batch_stats"])


def pixel_entropy(logits) -> jax.Array:
  """The prediction entropy (nats) of every position of ``logits[..., C]``:
  softmax entropy, or the binary entropy of a sigmoid when C = 1."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.shape[-1] == 1:
    z = logits[..., 0]
    p = jax.nn.sigmoid(z)
    return -p * jax.nn.log_sigmoid(z) - (1 - p) * jax.nn.log_sigmoid(-z)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _class_probs(logits) -> jax.Array:
  logits = jnp.asarray(logits, jnp.float32)
  if logits.shape[-1] == 1:
    p = jax.nn.sigmoid(logits)
    return jnp.concatenate([1 - p, p], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


def _margin(s, hyper, logits):
  """The reliable-entropy threshold E0: ``e_margin`` (from the state's
  ``hyper``), or 0.4 ln C (Niu et al. 2022 and 2023) for C classes (2 for
  one sigmoid logit, a constant of the logits' shape)."""
  if s.get("e_margin"):
    return hyper["e_margin"]
  return 0.4 * float(np.log(max(int(logits.shape[-1]), 2)))


def _sar_constant(s, hyper, logits):
  """SAR's reset threshold: ``reset_constant``, or 0.2 ln C / ln 1000 (the
  paper's 0.2 nats at ImageNet's 1000 classes, scaled to C classes)."""
  if s.get("reset_constant"):
    return hyper["reset_constant"]
  return 0.2 * float(np.log(max(int(logits.shape[-1]), 2))) / float(np.log(1000.0))


def _reliable_mean(values, keep):
  """Mean of ``values`` where ``keep`` (0 where nothing is kept)."""
  keep = keep.astype(values.dtype)
  return jnp.sum(values * keep) / jnp.maximum(jnp.sum(keep), 1.0)


def _affine_key(path) -> str:
  return "/".join(map(str, path))


class _Affine:
  """The BatchNorm scale and bias of a model's ``params`` as a flat dict
  (what the gradient methods optimise), and back."""

  def __init__(self, variables):
    self.paths = _methods.bn_affine_paths(variables)
    self.flat = traverse_util.flatten_dict(variables["params"])

  def theta(self) -> dict:
    return {_affine_key(p): self.flat[p] for p in self.paths}

  def params(self, theta) -> dict:
    return traverse_util.unflatten_dict(
        {**self.flat, **{p: theta[_affine_key(p)] for p in self.paths}})


def _eta_loss(s, state, logits):
  """ETA's filtered, weighted entropy of a batch (Niu et al. 2022, eq. 8-9),
  per pixel: pixels whose entropy is below E0 are reliable, each weighted by
  1 / exp(E - E0); with ``d_margin`` an image whose mean class probabilities
  (over its reliable pixels) have |cosine| >= d_margin with the moving
  average of the kept images' is redundant and left out. Returns (loss, (the
  new moving average, its flag, whether any pixel survived the filters))."""
  hyper = state["hyper"]
  e0 = _margin(s, hyper, logits)
  ent = pixel_entropy(logits)
  b = ent.shape[0]
  ent_i = ent.reshape(b, -1)
  reliable = ent_i < e0
  has = reliable.any(axis=1)
  probs = _class_probs(logits).reshape(b, -1, 2 if logits.shape[-1] == 1 else logits.shape[-1])
  count = jnp.maximum(reliable.sum(axis=1), 1)[:, None]
  p_img = jnp.sum(probs * reliable[..., None], axis=1) / count
  m, m_set = state["probs"], state["probs_set"]
  if s.get("d_margin"):
    cos = (p_img @ m) / (jnp.linalg.norm(p_img, axis=1) * jnp.linalg.norm(m) + 1e-8)
    keep = has & (~m_set | (jnp.abs(cos) < hyper["d_margin"]))
  else:
    keep = has
  weight = jax.lax.stop_gradient(jnp.exp(e0 - ent_i))
  mask = reliable & keep[:, None]
  loss = jnp.sum(weight * ent_i * mask) / jnp.maximum(jnp.sum(mask), 1)
  sel = jax.lax.stop_gradient(keep.astype(p_img.dtype))
  mean = jnp.sum(jax.lax.stop_gradient(p_img) * sel[:, None], 0) / jnp.maximum(sel.sum(), 1)
  any_sel = sel.sum() > 0
  m_new = jnp.where(any_sel, jnp.where(m_set, 0.9 * m + 0.1 * mean, mean), m)
  return loss, (m_new, m_set | any_sel, jnp.any(mask))


def _build(model, method: str, structure: tuple, kw: _m.Kwargs, is_batch_norm) -> Online:
  """The step of ``method`` from its ``structure`` (:func:`_split`): every
  float it uses is read from ``state["hyper"]``, so the step is the same
  function whatever their values."""
  s = dict(structure)
  apply = lambda v, x, arrays, policy: _adapt._policy_apply(model, v, x, kw.join(arrays), policy,
                                                            is_batch_norm)

  def layers(v):
    return frozenset(_m.stats_paths(v["batch_stats"]))

  def mixing(state, n: int):
    """``bn_alpha`` and ``augbn``'s weight of the batch's n examples: alpha,
    or n / (n + prior)."""
    hyper = state["hyper"]
    return n / (n + hyper["prior"]) if s["prior"] else hyper["alpha"]

  if method == "source":
    def step(state, x):
      return state, model.apply(state["variables"], *x, **kw.join(state["arrays"]))
    return Online(method, None, step)

  if method in ("bn_test", "bn_alpha"):
    def step(state, x):
      v = state["variables"]
      # prior N against the batch's B examples (B static)
      alpha = 1.0 if method == "bn_test" else mixing(state, x[0].shape[0])
      out, _ = apply(v, x, state["arrays"], _adapt._Policy("choose", layers(v), alpha))
      return state, out
    return Online(method, None, step)

  if method == "augbn":
    def step(state, x):
      v = state["variables"]
      if len(x) != 1 or x[0].ndim != 4:
        raise ValueError(f"augbn flips images [B, H, W, C]; got inputs of shapes "
                         f"{[a.shape for a in x]}")
      if s["augment"] == "dihedral" and x[0].shape[1] != x[0].shape[2]:
        raise ValueError(f"augment='dihedral' transposes images, which must be square; got "
                         f"{x[0].shape[1]}x{x[0].shape[2]}")
      pooled = jnp.concatenate(_copies(x[0], s["augment"]))
      out, _ = apply(v, (pooled,), state["arrays"],
                     _adapt._Policy("choose", layers(v), mixing(state, pooled.shape[0])))
      return state, out[:x[0].shape[0]]
    return Online(method, None, step)

  if method == "ema_bn":
    def step(state, x):
      momentum = state["hyper"]["momentum"]
      m = _per_image(momentum, x[0].shape[0]) if s["per_image"] else momentum
      v = state["variables"]
      out, records = apply(v, x, state["arrays"], _adapt._Policy("choose", layers(v), m))
      current = _stats_of(v)
      new = {name: _adapt._mix(records[name][0], records[name][1], *current[name], m, "both")
             for name in current}
      paths = _m.stats_paths(v["batch_stats"])
      v = {**v, "batch_stats": _adapt._nest_stats(v["batch_stats"], paths, new)}
      return {**state, "variables": v}, out
    return Online(method, None, step)

  if method == "balanced":
    def step(state, x):
      v = state["variables"]
      m = _per_image(state["hyper"]["momentum"], x[0].shape[0])
      out, classes, _, first = _adapt._balanced_choice(
          model, v, x, kw.join(state["arrays"]), m, is_batch_norm)
      return ({**state, "variables": {**v, _adapt.CLASS_STATS: classes},
               "source_masks": state["source_masks"] + first}, out)

    def init(v, **_):
      return {"source_masks": jnp.asarray(0)}
    return Online(method, init, step)

  if method == "lame":
    def step(state, x):
      logits, feats = _last_input_apply(model, state["variables"], x, kw.join(state["arrays"]))
      probs = _class_probs(logits)
      y = lame_fixed_point(probs, _knn_window(feats, s["knn"], s["window"]),
                           state["hyper"]["bound_lambda"], s["max_steps"])
      logy = jnp.log(jnp.maximum(y, 1e-30))
      if logits.shape[-1] == 1:  # one sigmoid logit back: log-odds of the foreground
        logy = logy[..., 1:] - logy[..., :1]
      return state, logy.astype(logits.dtype)
    return Online(method, None, step)

  # The entropy methods: the BatchNorm scale and bias, the layers normalising
  # with the batch's moments (as TENT's model in train mode does). The default
  # optimizer is Adam at the state's learning rate (optax.adam of a traced
  # rate: the same arithmetic as of a constant, and the same state).
  def tx_of(state):
    if s["optimizer"] is not None:
      return s["optimizer"]
    return optax.adam(state["hyper"]["learning_rate"])

  def tx_init(theta):
    return (s["optimizer"] if s["optimizer"] is not None else optax.adam(0.0)).init(theta)

  def forward(state, theta, x):
    v = state["variables"]
    return _adapt._batch_normalised_apply(
        model, {**v, "params": _Affine(v).params(theta)}, x, kw.join(state["arrays"]),
        is_batch_norm)

  def finish(state, theta, opt, **extra):
    v = state["variables"]
    return {**state, "variables": {**v, "params": _Affine(v).params(theta)}, "opt": opt,
            **extra}

  if method == "tent":
    def step(state, x):
      theta = _Affine(state["variables"]).theta()

      def loss(theta):
        out = forward(state, theta, x)
        return _methods.mean_entropy(out), out

      (_, out), grads = jax.value_and_grad(loss, has_aux=True)(theta)
      updates, opt = tx_of(state).update(grads, state["opt"], theta)
      return finish(state, optax.apply_updates(theta, updates), opt), out
    return Online(method, lambda v, **_: {"opt": tx_init(_Affine(v).theta())}, step)

  if method in ("eta", "eata"):
    def step(state, x):
      theta = _Affine(state["variables"]).theta()

      def loss(theta):
        out = forward(state, theta, x)
        value, probs = _eta_loss(s, state, out)
        if method == "eata":  # the Fisher anchor (EATA, eq. 10)
          value = value + state["hyper"]["fisher_alpha"] * sum(
              jnp.sum(state["fisher"][k] * (theta[k] - state["theta0"][k]) ** 2) for k in theta)
        return value, (out, probs)

      (_, (out, (m, m_set, survived))), grads = jax.value_and_grad(loss, has_aux=True)(theta)
      updates, opt = tx_of(state).update(grads, state["opt"], theta)
      # As EATA's code (`if x[ids1][ids2].size(0) != 0: loss.backward();
      # optimizer.step()`): no pixel left by the filters, no step, the
      # optimizer's state (Adam's moments and count) unchanged.
      new_theta = optax.apply_updates(theta, updates)
      keep_old = lambda old, new: jax.tree_util.tree_map(
          lambda a, b: jnp.where(survived, b, a), old, new)
      return finish(state, keep_old(theta, new_theta), keep_old(state["opt"], opt), probs=m,
                    probs_set=m_set), out

    def init(v, source_images=None, arrays=()):
      theta = _Affine(v).theta()
      out = {"opt": tx_init(theta), "probs": None, "probs_set": jnp.asarray(False)}
      if method == "eata":
        out["theta0"] = theta
        out["fisher"] = _fisher(model, kw, is_batch_norm, s["fisher_batch_size"])(
            v, source_images, arrays)
      return out
    return Online(method, init, step)

  if method == "sar":
    def step(state, x):
      hyper = state["hyper"]
      theta = _Affine(state["variables"]).theta()

      def loss1(theta):
        out = forward(state, theta, x)
        ent = pixel_entropy(out)
        reliable = ent < _margin(s, hyper, out)
        return _reliable_mean(ent, reliable), (out, reliable)

      (_, (out, reliable)), g1 = jax.value_and_grad(loss1, has_aux=True)(theta)
      norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in g1.values()))
      perturbed = {k: theta[k] + hyper["rho"] * g1[k] / (norm + 1e-12) for k in theta}

      def loss2(theta):
        out2 = forward(state, theta, x)
        ent = pixel_entropy(out2)
        keep = reliable & (ent < _margin(s, hyper, out2))
        return _reliable_mean(ent, keep), keep.any()

      (value2, any2), g2 = jax.value_and_grad(loss2, has_aux=True)(perturbed)
      updates, opt = tx_of(state).update(g2, state["opt"], theta)
      theta = optax.apply_updates(theta, updates)
      # The moving average of the second loss; below the threshold the model
      # has collapsed and goes back to the source (SAR's model recovery). As
      # SAR's code (`if reset_flag: self.reset()`, then `self.ema = ema`), the
      # moving average is kept across the reset.
      ema = jnp.where(any2, jnp.where(state["ema_set"], 0.9 * state["ema"] + 0.1 * value2,
                                      value2), state["ema"])
      ema_set = state["ema_set"] | any2
      reset = ema_set & (ema < _sar_constant(s, hyper, out))
      theta = {k: jnp.where(reset, state["theta0"][k], theta[k]) for k in theta}
      opt = jax.tree_util.tree_map(lambda a, b: jnp.where(reset, a, b), state["opt0"], opt)
      return finish(state, theta, opt, ema=ema, ema_set=ema_set,
                    resets=state["resets"] + reset), out

    def init(v, **_):
      theta = _Affine(v).theta()
      return {"opt": tx_init(theta), "opt0": tx_init(theta), "theta0": theta,
              "ema": jnp.asarray(0.0), "ema_set": jnp.asarray(False),
              "resets": jnp.asarray(0)}
    return Online(method, init, step)

  raise ValueError(f"method must be one of {METHODS}, got {method!r}")  # pragma: no cover


def _last_input_apply(model, variables, inputs, kwargs):
  """(logits, features): the model's output and the input of the last module
  it entered (its head: the decoder's last feature map for a U-Net)."""
  seen = []

  def interceptor(next_fun, args, kw, context):
    if context.method_name == "__call__" and args:
      seen.append(args[0])
    return next_fun(*args, **kw)

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, *inputs, **kwargs)
  feats = next((f for f in reversed(seen) if hasattr(f, "shape") and f.ndim == logits.ndim
                and f.shape[:-1] == logits.shape[:-1]), None)
  if feats is None or logits.ndim != 4:
    raise ValueError(f"method 'lame' needs a segmentation model whose last module takes a "
                     f"feature map [B, H, W, D] of its output's layout; got output "
                     f"{logits.shape}")
  return logits, feats


def _knn_window(feats, knn: int, window: int):
  """(int32[B, H, W, knn, 2] row and column, bool[B, H, W, knn] inside the
  image): each pixel's ``knn`` nearest pixels by the Euclidean distance of
  L2-normalised features, among the other pixels of the (2 window + 1)^2
  square around it (LAME's kNN affinity, its neighbours drawn from a window
  instead of the whole batch)."""
  b, h, w, _ = feats.shape
  f = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  offsets = [(dy, dx) for dy in range(-window, window + 1) for dx in range(-window, window + 1)
             if (dy, dx) != (0, 0)]
  rows = jnp.arange(h)[:, None] + jnp.asarray([o[0] for o in offsets])[None, :]  # [H, M]
  cols = jnp.arange(w)[:, None] + jnp.asarray([o[1] for o in offsets])[None, :]  # [W, M]
  r = rows[:, None, :] + jnp.zeros((1, w, 1), rows.dtype)                     # [H, W, M]
  c = cols[None, :, :] + jnp.zeros((h, 1, 1), cols.dtype)
  inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
  rc, cc = jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)
  neighbours = f[:, rc, cc]                                                   # [B, H, W, M, D]
  dist = jnp.sum(jnp.square(neighbours - f[:, :, :, None, :]), axis=-1)
  dist = jnp.where(inside[None], dist, jnp.inf)
  # Nearest first; ties to the earlier offset (a stable order).
  order = jnp.argsort(dist, axis=-1, stable=True)[..., :knn]
  take = lambda a: jnp.take_along_axis(jnp.broadcast_to(a, dist.shape), order, axis=-1)
  valid = jnp.take_along_axis(jnp.broadcast_to(inside[None], dist.shape), order, axis=-1)
  return jnp.stack([take(rc[None]), take(cc[None])], axis=-1), valid


def lame_fixed_point(probs, neighbours, bound_lambda=1.0, max_steps: int = 100):
  """LAME's bound optimisation (Boudiaf et al. 2022, :cite:t:`boudiaf2022lame`,
  as their code): ``Y <- softmax(log p + lambda W Y)`` from ``Y = p``, ``W``
  the kNN affinity (1 for each of a pixel's neighbours), until the energy
  ``sum(-log p Y - lambda (W Y) Y + Y log Y)`` changes by at most 1e-8 of
  itself (from the third step on) or ``max_steps``. ``probs``
  float[B, H, W, K]; ``neighbours`` ``(indices int[B, H, W, k, 2], valid
  bool[B, H, W, k])`` from the feature map. Returns float[B, H, W, K]."""
  max_steps = _checks.positive_int("max_steps", max_steps)
  if jnp.ndim(probs) != 4 or not (isinstance(neighbours, tuple) and len(neighbours) == 2):
    raise ValueError(f"probs must be float[B, H, W, K] and neighbours (indices [B, H, W, k, 2], "
                     f"valid [B, H, W, k]); got probs of shape {jnp.shape(probs)}")
  index, valid = neighbours
  if jnp.shape(index)[:3] != jnp.shape(probs)[:3] or jnp.shape(index)[-1] != 2 or (
      jnp.shape(valid) != jnp.shape(index)[:-1]):
    raise ValueError(f"neighbours must be indices [B, H, W, k, 2] and valid [B, H, W, k] of "
                     f"probs' B, H, W {jnp.shape(probs)[:3]}; got {jnp.shape(index)} and "
                     f"{jnp.shape(valid)}")
  unary = -jnp.log(probs + 1e-10)
  bidx = jnp.arange(probs.shape[0])[:, None, None, None]

  def pairwise(y):
    gathered = y[bidx, index[..., 0], index[..., 1]]                # [B, H, W, k, K]
    return bound_lambda * jnp.sum(gathered * valid[..., None], axis=-2)

  def energy(y, pw):
    return jnp.sum(unary * y - pw * y + y * jnp.log(jnp.maximum(y, 1e-20)))

  def cond(carry):
    i, _, e, old = carry
    return (i < max_steps) & ~((i > 2) & (jnp.abs(e - old) <= 1e-8 * jnp.abs(old)))

  def body(carry):
    i, y, e, _ = carry
    pw = pairwise(y)
    y = jax.nn.softmax(-unary + pw, axis=-1)
    return i + 1, y, energy(y, pw), e

  y0 = jax.nn.softmax(-unary, axis=-1)
  inf = jnp.asarray(jnp.inf, y0.dtype)
  return jax.lax.while_loop(cond, body, (jnp.asarray(0), y0, inf, inf))[1]


def _fisher(model, kw: _m.Kwargs, is_batch_norm, batch_size: int):
  """EATA's Fisher information of the BatchNorm scale and bias (Niu et al.
  2022, eq. 9): on unlabelled source images in batches of ``batch_size``
  (the last incomplete batch dropped), the squared gradient of the
  cross-entropy of the batch-normalised model against its own per-pixel
  argmax, averaged over the batches."""

  def build():
    def step(total, consts, t):
      variables, batches, arrays = consts
      affine = _Affine(variables)
      batch = jax.lax.dynamic_index_in_dim(batches, t, 0, keepdims=False)

      def ce(theta):
        out = _adapt._batch_normalised_apply(
            model, {**variables, "params": affine.params(theta)}, (batch,), kw.join(arrays),
            is_batch_norm)
        labels = jax.lax.stop_gradient(jnp.argmax(out, axis=-1))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, labels))
      g = jax.grad(ce)(affine.theta())
      return {k: total[k] + v ** 2 for k, v in g.items()}, None

    # One batch at a time (memory bounded by batch_size), driven as every
    # gradient loop is (bnjax.compiler.driven: a Python loop on CPU).
    loop = compiler.driven(step)

    def fisher(variables, images, arrays):
      n = images.shape[0] // batch_size
      batches = images[:n * batch_size].reshape((n, batch_size) + images.shape[1:])
      zeros = jax.tree_util.tree_map(jnp.zeros_like, _Affine(variables).theta())
      total, _ = loop(zeros, (variables, batches, arrays), n)
      return jax.tree_util.tree_map(lambda a: a / n, total)
    return fisher

  return _m.cached(model, ("eata_fisher", kw.key(), is_batch_norm, batch_size), build)


def online(model: nn.Module, method: str, *, apply_kwargs: Mapping | None = None,
           is_batch_norm: Callable | None = None, **options) -> Online:
  """The pure step of ``method`` (:data:`METHODS`, options as the module
  docstring lists them) for ``model``: ``state = online_.init(variables,
  (first_batch,))``, then ``state, logits = online_.step(state, (batch,))``
  per batch.
  ``apply_kwargs`` and ``is_batch_norm`` are as in
  :func:`bnjax.adapt.recompute_batch_stats` (one model input assumed by
  ``init``'s check; several are passed as a longer tuple)."""
  _checks.choice("method", method, METHODS)
  if method == "gated":
    return _gated(model, apply_kwargs, is_batch_norm, options)
  opts = _options(method, dict(options))
  structure, hyper = _split(method, opts)
  kwargs = _m.apply_kwargs(model, apply_kwargs, 1)
  kw, arrays = _m.Kwargs.split(kwargs)
  built = _build(model, method, structure, kw, is_batch_norm)
  source_images = options.get("source_images")
  if method == "eata":
    if source_images is None:
      raise ValueError("method 'eata' needs source_images: unlabelled source-domain images "
                       "for its Fisher anchor")
    source_images = _checks.images(source_images, name="source_images",
                                   image_range=_checks.image_range_of(model, "auto"))
    if source_images.shape[0] < dict(opts)["fisher_batch_size"]:
      raise ValueError(f"source_images must hold at least fisher_batch_size="
                       f"{dict(opts)['fisher_batch_size']} images, got "
                       f"{source_images.shape[0]}")

  def init(variables, inputs=None):
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise ValueError("variables must be a dict {'params': ..., 'batch_stats': ...}")
    if method != "source" and not _m.stats_paths(variables.get("batch_stats")):
      raise ValueError(f"method {method!r} adapts BatchNorm layers, and the model has none "
                       "(variables have no 'batch_stats' mean/var); use method='source'")
    if method in _GRADIENT and not _methods.bn_affine_paths(variables):
      raise ValueError(f"method {method!r} optimises the BatchNorm scale and bias, and no "
                       "BatchNorm layer of this model has either")
    state = {"variables": dict(variables), "arrays": arrays, "hyper": _hyper_arrays(hyper)}
    if method == "balanced":
      classes = _adapt._class_stats_of(variables, "method 'balanced'")
      state["variables"][_adapt.CLASS_STATS] = _adapt._with_running(classes)
    if built.init is None:
      return state
    extra = built.init(variables, source_images=source_images, arrays=arrays)
    if "probs" in extra:  # the moving average of the C class probabilities
      if inputs is None:
        raise ValueError(f"method {method!r} keeps a moving average of the class "
                         "probabilities: pass a batch, init(variables, (batch,)), so that the "
                         "number of classes is known")
      out = jax.eval_shape(lambda: model.apply(variables, *inputs, **kwargs))
      extra["probs"] = jnp.zeros(max(int(out.shape[-1]), 2), jnp.float32)
    return {**state, **extra}

  return Online(method, init, built.step, opts, (method, structure))


def _gated(model, apply_kwargs, is_batch_norm, options) -> Online:
  """``"gated"``: an inner method runs on every batch (its state always
  follows the stream); per batch its prediction is used only where the
  signal says the appearance changed (module docstring); where the inner
  prediction collapses (all background or all foreground over the batch
  while the source's is neither) the source's is used and the inner state
  goes back to its start."""
  opts = _options("gated", {k: v for k, v in options.items() if k != "source_images"})
  o = dict(opts)
  structure, hyper = _split("gated", opts)
  raw = (options["inner_options"] if "inner_options" in options
         else _GATED_INNER.get(o["inner"], {}))
  inner = online(model, o["inner"], apply_kwargs=apply_kwargs, is_batch_norm=is_batch_norm,
                 **dict(raw.items() if isinstance(raw, Mapping) else raw),
                 **({"source_images": options["source_images"]}
                    if "source_images" in options else {}))
  kwargs = _m.apply_kwargs(model, apply_kwargs, 1)
  kw, arrays = _m.Kwargs.split(kwargs)
  appearance = o["signal"] == "appearance"

  def init(variables, inputs=None):
    classes = None
    if appearance:
      classes = _adapt._class_stats_of(variables, "gated's appearance signal")
      if "input_mean" not in classes:
        raise ValueError("gated's appearance signal needs the class statistics of the model's "
                         "input images (add_class_stats measures them for image inputs [n, H, "
                         "W, C] of the output's size); or pass signal='agreement'")
    state = inner.init(variables, inputs)
    source = _adapt._stats_only(dict(variables))
    return {"inner": state, "inner0": state, "source": source, "arrays": arrays,
            "hyper": _hyper_arrays(hyper), "adapted": jnp.asarray(0),
            "resets": jnp.asarray(0), "signal": jnp.asarray(0.0, jnp.float32),
            "signal_set": jnp.asarray(False),
            **({"classes": classes} if appearance else {})}

  def step(state, x):
    inner_state, adapted = inner.step(state["inner"], x)
    src = model.apply(state["source"], *x, **kw.join(state["arrays"]))
    m_src, m_ad = logits_to_masks(src), logits_to_masks(adapted)
    hyper = state["hyper"]
    if appearance:
      value = _adapt.appearance_gap(x[0], src, state["classes"])
      a = _per_image(hyper["signal_momentum"], x[0].shape[0])
      signal = jnp.where(state["signal_set"], (1 - a) * state["signal"] + a * value, value)
      change = signal >= hyper["threshold"]
    else:
      inter, union = jnp.sum(m_src & m_ad), jnp.sum(m_src | m_ad)
      signal = jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)
      change = signal < hyper["threshold"]
    frac_src, frac_ad = jnp.mean(m_src), jnp.mean(m_ad)
    collapsed = ((frac_ad == 0) | (frac_ad == 1)) & (frac_src > 0) & (frac_src < 1)
    use = change & ~collapsed
    inner_state = jax.tree_util.tree_map(lambda a, b: jnp.where(collapsed, a, b),
                                         state["inner0"], inner_state)
    return ({**state, "inner": inner_state, "adapted": state["adapted"] + use,
             "resets": state["resets"] + collapsed, "signal": jnp.asarray(signal, jnp.float32),
             "signal_set": jnp.asarray(True)}, jnp.where(use, adapted, src))

  return Online("gated", init, step, opts, ("gated", structure))


# --------------------------------------------------------------------------
# Running a stream


@dataclasses.dataclass(frozen=True)
class StreamResult:
  """What a method predicted on a stream.

  Attributes:
    masks: bool[T, B, H, W] (:func:`run`) or [K, M, T, B, H, W]
      (:func:`run_many`), each batch's prediction as it arrived.
    logits: the logits, same leading axes, when asked for (else None).
    state: the method's state after the last batch (:func:`run` only).

  Scoring against the true masks (a :class:`Stream`'s ``masks``, or the
  user's own ``[T, B, H, W]``)::

    result = bnjax.streams.run(model, variables, stream, "gated")
    result.iou(stream)              # online IoU: the mean over every image
    result.iou_per_batch(stream)    # float[T], each batch as it arrived

  :func:`bnjax.metrics.iou` takes the stream layout as well:
  ``metrics.iou(result.masks, stream.masks)``.
  """

  masks: np.ndarray
  logits: np.ndarray | None = None
  state: Any = None

  def _truth(self, truth):
    truth = truth.masks if isinstance(truth, Stream) else truth
    if np.shape(truth) != self.masks.shape:
      raise ValueError(f"masks must have the shape of the predictions {self.masks.shape}, got "
                       f"{np.shape(truth)}")
    return truth

  def iou(self, masks, empty: float = 1.0) -> float:
    """Online IoU: per-image foreground IoU (:func:`bnjax.metrics.iou`)
    averaged over every image of the stream (of every model and stream of
    :func:`run_many`). ``masks``: the true masks, same shape, or the
    :class:`Stream`."""
    return metrics.iou(self.masks, self._truth(masks), empty)

  def iou_per_batch(self, masks, empty: float = 1.0) -> np.ndarray:
    """float[..., T]: each batch's mean per-image IoU, in the order the
    batches arrived (leading axes K, M of :func:`run_many`)."""
    per_image = metrics.iou_per_image(self.masks, self._truth(masks), empty)
    return np.asarray(per_image).mean(-1)


def _step_of(online_: Online, tree, fixed: list[bool], with_logits: bool, resets: bool):
  """``step(var, (fix, var0, inputs, reset), t)``: ``online_.step`` on batch
  ``t`` of ``inputs`` (a tuple of [T, B, ...] arrays), its state put
  together (``tree``) from the leaves it changes, ``var``, and those it
  never changes, ``fix`` (``fixed``: per leaf, :func:`_unchanged`), ``var``
  reset to ``var0`` first where ``reset[t]``. Returns the new ``var`` and
  (masks, logits or None). The fixed leaves stay outside the carry, so
  that streams mapped side by side share them (one convolution kernel, not
  one per stream) and a reset never touches them."""

  def step(var, consts, t):
    fix, var0, inputs, reset = consts
    if resets:
      var = [jnp.where(reset[t], a0, a) for a0, a in zip(var0, var)]
    it_var, it_fix = iter(var), iter(fix)
    state = jax.tree_util.tree_unflatten(tree, [next(it_fix) if f else next(it_var)
                                                for f in fixed])
    x = tuple(jax.lax.dynamic_index_in_dim(a, t, 0, keepdims=False) for a in inputs)
    state, logits = online_.step(state, x)
    out = (logits_to_masks(logits), logits if with_logits else None)
    return [a for a, f in zip(jax.tree_util.tree_leaves(state), fixed) if not f], out

  return step


def _stream_inputs(stream, reset, image_range, lead: int):
  """(inputs tuple of [..., T, B, ...] arrays, reset bool[..., T]) of a Stream,
  an array or a tuple of arrays; ``lead`` axes before T (0 or 1).

  One array whose steps look like one image each (``[T, H, W, C]``, at most
  4 channels) is refused: the batch axis is missing. A tuple of arrays is
  taken as the model's inputs as they are (a model of any kind)."""
  if isinstance(stream, Stream):
    arrays, reset = (stream.images,), stream.reset if reset is None else reset
  elif lead and isinstance(stream, (list, tuple)) and stream and all(
      isinstance(s, Stream) for s in stream):
    shapes = {s.images.shape for s in stream}
    if len(shapes) != 1:
      raise ValueError(f"streams must share T, B and the image shape, got {sorted(shapes)}")
    arrays = (jnp.stack([s.images for s in stream]),)
    reset = np.stack([s.reset for s in stream]) if reset is None else reset
  else:
    arrays = tuple(stream) if isinstance(stream, (tuple, list)) else (stream,)
    if not isinstance(stream, (tuple, list)) and _checks.looks_like_images(np.shape(stream),
                                                                           lead + 1):
      t = "M, T" if lead else "T"
      raise ValueError(
          f"stream has shape {np.shape(stream)}, which reads as [{t}, H, W, C]: one image per "
          f"step, without the batch axis. Pass [{t}, B, H, W, C] (stream[{':, ' * lead}:, None] "
          f"for batches of one image); a model of other inputs takes them as a tuple "
          f"(stream,)")
  arrays = tuple(jnp.asarray(a) for a in arrays)
  want = "[M, T, B, ...]" if lead else "[T, B, ...]"
  if any(a.ndim < 3 + lead for a in arrays) or len({a.shape[:2 + lead] for a in arrays}) != 1:
    raise ValueError(f"stream must be a Stream or arrays {want} sharing their leading axes, "
                     f"got shapes {[a.shape for a in arrays]}")
  lead_shape = arrays[0].shape[:2 + lead]
  if 0 in lead_shape:
    raise ValueError(f"stream must hold at least one batch of one image, got {lead_shape}")
  flat = tuple(a.reshape((-1,) + a.shape[2 + lead:]) for a in arrays)
  if _checks.is_range(image_range):
    if len(arrays) != 1:
      raise ValueError(f"the model takes one set of images, got a tuple of {len(arrays)} arrays")
    if flat[0].ndim not in (3, 4):
      raise ValueError(f"stream images must be {want[:-4]}H, W, C] (or without C), got shape "
                       f"{arrays[0].shape}")
    checked = _checks.images(flat[0], name="stream images", image_range=image_range)
    arrays = (checked.reshape(lead_shape + checked.shape[1:]),)
  else:
    _checks.inputs(flat, name="stream inputs", image_range=image_range)
  t_shape = lead_shape[:-1]
  reset = np.zeros(t_shape, bool) if reset is None else np.asarray(reset, bool)
  if reset.shape != t_shape:
    raise ValueError(f"reset must be bool{list(t_shape)} (one flag per batch), got "
                     f"{reset.shape}")
  return arrays, reset


def _unchanged(step, state, x) -> list[bool]:
  """Per leaf of ``state`` (flattened): whether ``step(state, x)`` returns it
  as it came (its output is the input itself in the step's jaxpr)."""
  closed = jax.make_jaxpr(lambda s: jax.tree_util.tree_leaves(step(s, x)[0]))(state)
  ins, outs = closed.jaxpr.invars, closed.jaxpr.outvars
  if len(ins) != len(outs):
    return [False] * len(ins)
  return [o is i for o, i in zip(outs, ins)]


def _runner(model, structure, kw_key, is_batch_norm, with_logits, resets, built, strategy,
            form):
  """``(state0, inputs, reset) -> (masks, logits, final state)`` over time:
  one model's (``strategy`` None: ``inputs`` [T, B, ...]), or K models'
  stacked states, each over M streams side by side (``inputs`` [M, T, B,
  ...], outputs [K, M, T, ...], no final state), driven as
  :func:`bnjax.compiler.driven` (``form``); cached by the method's
  ``structure`` (:attr:`Online.structure`), so that float options, carried
  in the state, never recompile."""
  def build():
    prepared = {}  # per state structure and shapes: (fixed leaves, driven loop)

    def prepare(tree, one_state, x0):
      key = (tree, tuple((a.shape, a.dtype) for a in jax.tree_util.tree_leaves(one_state)),
             tuple((a.shape, a.dtype) for a in x0))
      if key not in prepared:
        fixed = _unchanged(built.step, one_state, x0)
        one = _step_of(built, tree, fixed, with_logits, resets)

        def step_all(var, consts, t):  # K models (strategy), each over its M streams (vmap)
          fix, var0, inputs, reset = consts

          def per_model(v, f, v0):
            return jax.vmap(lambda a, x, r: one(a, (f, v0, x, r), t))(v, inputs, reset)
          return stacking.stacked(per_model, strategy)(var, fix, var0)
        prepared[key] = fixed, compiler.driven(one if strategy is None else step_all, form)
      return prepared[key]

    def run(state0, inputs, reset):
      flat0, tree = jax.tree_util.tree_flatten(state0)
      lead = 0 if strategy is None else 1  # the model axis K
      one_state = jax.tree_util.tree_unflatten(tree, [a[0] if lead else a for a in flat0])
      fixed, loop = prepare(tree, one_state, tuple(a[(0,) * (1 + lead)] for a in inputs))
      var0 = [a for a, f in zip(flat0, fixed) if not f]
      fix = [a for a, f in zip(flat0, fixed) if f]
      if strategy is None:
        var, (masks, logits) = loop(var0, (fix, var0, inputs, reset), reset.shape[0])
        it_var, it_fix = iter(var), iter(fix)
        final = jax.tree_util.tree_unflatten(tree, [next(it_fix) if f else next(it_var)
                                                    for f in fixed])
        return masks, logits, final
      m = reset.shape[0]  # every stream of a model starts from its state
      var = [jnp.broadcast_to(a[:, None], (a.shape[0], m) + a.shape[1:]) for a in var0]
      _, (masks, logits) = loop(var, (fix, var0, inputs, reset), reset.shape[1])
      # [T, K, M, ...] -> [K, M, T, ...]
      move = lambda a: None if a is None else np.moveaxis(np.asarray(a), 0, 2)
      return move(masks), move(logits), None

    return run

  return _m.cached(model, ("streams", structure, kw_key, is_batch_norm, with_logits, resets,
                           strategy, compiler.loop_form(form)), build)


def _prepare(model, method, apply_kwargs, is_batch_norm, image_range, options):
  built = online(model, method, apply_kwargs=apply_kwargs, is_batch_norm=is_batch_norm,
                 **options)
  kw, _ = _m.Kwargs.split(_m.apply_kwargs(model, apply_kwargs, 1))
  return built.structure, built, kw.key(), _checks.image_range_of(model, image_range)


def run(model: nn.Module, variables: Mapping, stream, method: str = "source", *,
        return_logits: bool = False, reset=None, apply_kwargs: Mapping | None = None,
        is_batch_norm: Callable | None = None, image_range="auto", loop: str = "auto",
        **options) -> StreamResult:
  """``method`` over ``stream``, one compiled step per batch.

  Args:
    model: a linen model (BatchNorm layers for every method but ``"source"``).
    variables: its ``{"params": ..., "batch_stats": ...}``.
    stream: a :class:`Stream`, or the user's own batches: an array
      ``[T, B, ...]`` (or a tuple of them for a model of several inputs).
    method: one of :data:`METHODS`; ``options`` its settings (module docstring).
    return_logits: also return the logits ``[T, B, ..., classes]``.
    reset: bool[T], start again from ``variables`` before those batches
      (default: the stream's own, e.g. every batch of ``"episodic"``).
    apply_kwargs, is_batch_norm, image_range: as in
      :func:`bnjax.adapt.recompute_batch_stats`.
    loop: how the steps over time are driven (:data:`bnjax.compiler.LOOP_FORMS`):
      ``"auto"`` calls the compiled step once per batch on CPU and compiles
      one ``lax.scan`` elsewhere (:func:`bnjax.compiler.loop_form`); the
      numbers are the same.

  Returns:
    A :class:`StreamResult` with ``masks`` bool[T, B, H, W].
  """
  _checks.choice("loop", loop, compiler.LOOP_FORMS)
  structure, built, kw_key, image_range = _prepare(model, method, apply_kwargs, is_batch_norm,
                                                   image_range, options)
  inputs, reset = _stream_inputs(stream, reset, image_range, 0)
  with _m.inputs_fit("stream images", [a[0] for a in inputs]):
    state0 = built.init(dict(variables), tuple(a[0] for a in inputs))
    fn = _runner(model, structure, kw_key, is_batch_norm, bool(return_logits),
                 bool(reset.any()), built, None, loop)
    masks, logits, final = fn(state0, inputs, jnp.asarray(reset))
  return StreamResult(np.asarray(masks), None if logits is None else np.asarray(logits), final)


def run_many(model: nn.Module, stacked_variables: Mapping, streams, method: str = "source", *,
             strategy: stacking.Strategy = "auto", return_logits: bool = False, reset=None,
             apply_kwargs: Mapping | None = None, is_batch_norm: Callable | None = None,
             image_range="auto", loop: str = "auto", **options) -> StreamResult:
  """``method`` of K models over M streams, all advancing together: model k
  (``stacked_variables`` with a leading axis K) runs every stream m
  (a sequence of :class:`Stream` s of one shape, or arrays ``[M, T, B,
  ...]``) from its own source state. The streams of a model are mapped with
  ``jax.vmap`` (their batches side by side in each step; the parts of the
  state the method never changes, e.g. the convolution kernels, stay one
  array shared by the M streams, so their convolutions run as one batch),
  the models by ``strategy`` (:mod:`bnjax.stacking`). Each pair's result
  equals :func:`run` on it. ``loop`` as in :func:`run`.

  Returns:
    A :class:`StreamResult` with ``masks`` bool[K, M, T, B, H, W].
  """
  _checks.choice("loop", loop, compiler.LOOP_FORMS)
  structure, built, kw_key, image_range = _prepare(model, method, apply_kwargs, is_batch_norm,
                                                   image_range, options)
  inputs, reset = _stream_inputs(streams, reset, image_range, 1)
  leaves = jax.tree_util.tree_leaves(stacked_variables)
  if not leaves or any(np.ndim(a) == 0 for a in leaves):
    raise ValueError("stacked_variables must carry a leading model axis K on every leaf")
  k = int(np.shape(leaves[0])[0])
  _checks.model_axis(stacked_variables, k, "stacked_variables")
  first = tuple(a[0, 0] for a in inputs)
  with _m.inputs_fit("stream images", first):
    states = stacking.tree_stack([built.init(stacking.tree_index(dict(stacked_variables), i),
                                             first) for i in range(k)])
    fn = _runner(model, structure, kw_key, is_batch_norm, bool(return_logits),
                 bool(reset.any()), built, stacking.resolve(strategy), loop)
    masks, logits, _ = fn(states, inputs, jnp.asarray(reset))
  return StreamResult(np.asarray(masks), None if logits is None else np.asarray(logits))
