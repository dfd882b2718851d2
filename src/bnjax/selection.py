"""Label-free scores of a (model, adaptation, unlabelled target set): signals
that might tell, without target masks, whether adapting helps.

:func:`scores` gives, for a segmentation model called as
``model.apply(variables, x, train=False) -> logits[n, H, W, classes]``:

* mean max-softmax confidence before and after adaptation and its change,
  and the mean per-pixel prediction entropy (nats) before and after (means
  over all pixels of all images; Guillory et al. 2021, "Predicting with
  confidence on unseen distributions", use the average confidence);
* ``atc``: average thresholded confidence (:cite:t:`garg2022atc`): the
  threshold ``t`` is fitted on held-out *labelled source* data so that the
  fraction of source pixels whose confidence exceeds it equals the source
  model's pixel accuracy there, ``t`` = the ``1 - accuracy`` quantile of the
  source confidences (linear interpolation, as ``np.quantile``); ``atc`` is
  the fraction of target pixels above ``t`` under the unadapted model (its
  predicted target pixel accuracy), ``atc_after`` the same under the adapted
  model;
* ``doc``: difference of confidences (:cite:t:`guillory2021doc`): source mean
  confidence minus target mean confidence, both of the unadapted model;
* ``agreement``: per-image mean IoU between the unadapted and the adapted
  predicted masks (an image where both are empty counts 1) (Baek et al.,
  NeurIPS 2022, use agreement between models); ``foreground_change``: the
  adapted minus the unadapted predicted foreground fraction;
* ``bn_w2``: the squared W2 between the diagonal Gaussians of the source and
  the adapted BatchNorm statistics, summed over layers
  (:func:`bnjax.distances.diag_w2`; NaN without ``batch_stats``).

Scores that need ``source_inputs`` are NaN without them. For a method that
changes the inputs instead of the variables (histogram matching), pass the
transformed images as ``adapted_inputs``.

:func:`fit_rule` fits, on a grid of pairs whose gains are known, a monotone
(isotonic) map from one score to the gain of adapting; the :class:`Rule`
keeps its steps and its provenance, is saved and loaded as JSON, and
:func:`should_adapt` applies it to the scores of a new target set::

    s = selection.scores(model, v, v_adapted, target_images,
                         source_inputs=(source_images, source_masks))
    decision = selection.should_adapt(selection.Rule.load("rules/adabn.json"), s)
    decision.adapt, decision.score, decision.predicted_gain

``experiments/when_to_adapt.py`` fits such rules on the study's grids and
the shift benchmark, tested held out by shift family and by source domain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _batching
from bnjax import _checks
from bnjax import _modules as _m
from bnjax import compiler
from bnjax import distances, metrics, stacking, stats
from bnjax._io import write_json_atomic
from bnjax.metrics import logits_to_masks

__all__ = ["scores", "scores_stacked", "KEYS", "pixel_maps", "Rule", "Decision", "fit_rule", "should_adapt"]

RULE_FORMAT = "bnjax.selection.Rule/1"

#: The names of the label-free scores :func:`scores` returns.
KEYS = ("confidence_before", "confidence_after", "confidence_change", "entropy_before",
        "entropy_after", "atc", "atc_after", "doc", "agreement", "foreground_change", "bn_w2")


def _maps_of(model, variables, images, batch_size):
  def one(x):
    logits = model.apply(variables, x, train=False).astype(jnp.float32)
    if logits.shape[-1] == 1:
      z = logits[..., 0]
      p = jax.nn.sigmoid(z)
      conf = jnp.maximum(p, 1 - p)
      ent = -p * jax.nn.log_sigmoid(z) - (1 - p) * jax.nn.log_sigmoid(-z)
    else:
      logp = jax.nn.log_softmax(logits, axis=-1)
      conf = jnp.exp(jnp.max(logp, axis=-1))
      ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return conf, ent, logits_to_masks(logits)
  return _batching.padded_map(one, images, batch_size)


def pixel_maps(model, variables, images, batch_size: int = 64):
  """(confidence float32[n, H, W], entropy float32[n, H, W], predicted
  foreground bool[n, H, W]) of ``model`` in eval mode on float images in [0, 1]."""
  return _pixel_maps(model, variables, _checks.images(images),
                     _checks.positive_int("batch_size", batch_size))


def _pixel_maps(model, variables, images, batch_size: int):
  """:func:`pixel_maps` on checked images and batch size."""
  run = _m.cached(model, ("selection_maps",), lambda: compiler.jit(
      lambda v, x, b: _maps_of(model, v, x, b), static_argnums=(2,)))
  return tuple(np.asarray(a) for a in run(variables, images, min(batch_size, images.shape[0])))


def scores(model, variables, adapted_variables, inputs, *, source_inputs=None,
           adapted_inputs=None, batch_size: int = 64) -> dict[str, float]:
  """The label-free scores of the module docstring, as floats keyed by :data:`KEYS`.

  Args:
    model: a segmentation model (``apply(v, x, train=False) -> logits``).
    variables: the source model's variables.
    adapted_variables: the same model after adaptation (any method).
    inputs: the unlabelled target images, float[n, H, W, C] in [0, 1].
    source_inputs: optional (images, masks) of held-out source data, for
      ``atc``, ``atc_after`` and ``doc``.
    adapted_inputs: optional images the adapted model is scored on instead of
      ``inputs`` (same shape; an input-space method's output).
    batch_size: images per forward pass.
  """
  inputs = _checks.images(inputs)
  batch_size = _checks.positive_int("batch_size", batch_size)
  adapted_inputs = _adapted_inputs(adapted_inputs, inputs)
  before = _pixel_maps(model, variables, inputs, batch_size)
  after = _pixel_maps(model, adapted_variables, adapted_inputs, batch_size)
  source = None
  if source_inputs is not None:
    src_x, src_y = _source_inputs(source_inputs)
    source = (_pixel_maps(model, variables, src_x, batch_size), np.asarray(src_y))
  return _from_maps(before, after, source, variables.get("batch_stats"),
                    adapted_variables.get("batch_stats"))


def _adapted_inputs(adapted_inputs, inputs, stacked: bool = False):
  """The checked images the adapted model is scored on (``inputs`` if None)."""
  if adapted_inputs is None:
    return inputs
  adapted_inputs = _checks.images(adapted_inputs, name="adapted_inputs", stacked=stacked)
  if adapted_inputs.shape != inputs.shape:
    raise ValueError(f"adapted_inputs must have the shape of inputs {inputs.shape}, "
                     f"got {adapted_inputs.shape}")
  return adapted_inputs


def _source_inputs(source_inputs, stacked: bool = False):
  if not isinstance(source_inputs, (tuple, list)) or len(source_inputs) != 2:
    raise ValueError("source_inputs must be a tuple (images, masks) of held-out source data")
  return _checks.images(*source_inputs, stacked=stacked)


def _from_maps(before, after, source, bs0, bs1) -> dict[str, float]:
  """The scores from the pixel maps before and after adaptation, the source
  maps and masks (or None) and the two ``batch_stats``."""
  (conf0, ent0, pred0), (conf1, ent1, pred1) = before, after
  out = {"confidence_before": float(conf0.mean()), "confidence_after": float(conf1.mean()),
         "entropy_before": float(ent0.mean()), "entropy_after": float(ent1.mean()),
         "agreement": metrics.iou(pred1, pred0),
         "foreground_change": float(pred1.mean() - pred0.mean())}
  out["confidence_change"] = out["confidence_after"] - out["confidence_before"]
  out["atc"] = out["atc_after"] = out["doc"] = math.nan
  if source is not None:
    (conf_s, _, pred_s), src_y = source
    accuracy = float(np.mean(pred_s == src_y))
    threshold = float(np.quantile(conf_s.astype(np.float64), 1.0 - accuracy))
    out["atc"] = float(np.mean(conf0 > threshold))
    out["atc_after"] = float(np.mean(conf1 > threshold))
    out["doc"] = float(conf_s.mean()) - out["confidence_before"]
  out["bn_w2"] = (float(sum(distances.diag_w2(bs0, bs1).values())) if bs0 and bs1
                  else math.nan)
  return {k: out[k] for k in KEYS}


def scores_stacked(model, variables, adapted_variables, inputs, *, source_inputs=None,
                   adapted_inputs=None, batch_size: int = 64, strategy: str = "auto"):
  """:func:`scores` for P pairs, each forward pass one compiled call over the
  pairs: ``variables`` stacked (leading axis P), ``inputs`` ``[P, n, H, W,
  C]``, ``source_inputs`` ``(images [P, m, ...], masks [P, m, ...])``.

  ``adapted_variables`` is one stack, or a list of stacks (one per method,
  ``adapted_inputs`` then a list of the same length, None where a method
  scores ``inputs``): the unadapted and source maps are computed once and
  shared. Returns ``{key: float64[P]}`` (a list of them for a list);
  entry ``p`` agrees with ``scores`` on pair ``p`` up to float32 rounding of
  the mapped forward passes."""
  many = isinstance(adapted_variables, (list, tuple))
  adapted_list = list(adapted_variables) if many else [adapted_variables]
  if adapted_inputs is None:
    adapted_inputs = [None] * len(adapted_list)
  elif not many:
    adapted_inputs = [adapted_inputs]
  if len(adapted_inputs) != len(adapted_list):
    raise ValueError(f"adapted_inputs must be a list as long as adapted_variables "
                     f"({len(adapted_list)}), got {len(adapted_inputs)}")
  inputs = _checks.images(inputs, stacked=True)
  pairs = inputs.shape[0]
  _checks.model_axis(variables, pairs)
  batch_size = _checks.positive_int("batch_size", batch_size)
  checked = []
  for v, x in zip(adapted_list, adapted_inputs):
    _checks.model_axis(v, pairs)
    checked.append((v, _adapted_inputs(x, inputs, stacked=True)))
  strategy = stacking.resolve(strategy)
  maps = lambda v, x: _stacked_maps(model, v, x, batch_size, strategy)
  before = maps(variables, inputs)
  source = None
  if source_inputs is not None:
    src_x, src_y = _source_inputs(source_inputs, stacked=True)
    source = (maps(variables, src_x), np.asarray(src_y))
  index = lambda t, p: None if t is None else jax.tree_util.tree_map(lambda a: a[p], t)
  # What every method's scores share, pair by pair: the unadapted maps, the
  # source maps and masks, the unadapted statistics.
  shared = [(tuple(a[p] for a in before),
             None if source is None else (tuple(a[p] for a in source[0]), source[1][p]),
             index(variables.get("batch_stats"), p)) for p in range(pairs)]
  out = []
  for v, x in checked:
    after = maps(v, x)
    rows = [_from_maps(before_p, tuple(a[p] for a in after), source_p, stats_p,
                       index(v.get("batch_stats"), p))
            for p, (before_p, source_p, stats_p) in enumerate(shared)]
    out.append({k: np.array([r[k] for r in rows], np.float64) for k in KEYS})
  return out if many else out[0]


def _stacked_maps(model, variables, images, batch_size: int, strategy: str):
  """:func:`pixel_maps` of model p on set p, one compiled call."""
  b = min(batch_size, images.shape[1])
  run = _m.cached(model, ("selection_maps_stacked", strategy), lambda: compiler.jit(
      lambda v, x, b: stacking.stacked(lambda vv, xx: _maps_of(model, vv, xx, b), strategy)(v, x),
      static_argnums=(2,)))
  return tuple(np.asarray(a) for a in run(variables, images, b))


# --------------------------------------------------------------------------
# A decision rule fitted on a grid


@dataclasses.dataclass(frozen=True)
class Rule:
  """Adapt iff the monotone fit of the gain (IoU adapted - IoU unadapted) on
  ``score`` predicts more than ``margin``.

  ``edges``/``gains`` are the isotonic steps (:class:`bnjax.stats.Step`):
  a score gets the gain of the first step whose largest fitted score is >=
  it, the last step's beyond. ``provenance`` says where the fit came from
  (experiment, config, pairs, families, sources, seeds, held-out figures).
  """

  method: str
  score: str
  edges: tuple[float, ...]
  gains: tuple[float, ...]
  increasing: bool
  margin: float = 0.0
  provenance: Mapping = dataclasses.field(default_factory=dict)

  def predicted_gain(self, value: float) -> float:
    return float(stats.Step(self.edges, self.gains)(float(value)))

  def to_json(self) -> dict:
    return {"format": RULE_FORMAT, "method": self.method, "score": self.score,
            "edges": list(self.edges), "gains": list(self.gains),
            "increasing": self.increasing, "margin": self.margin,
            "provenance": dict(self.provenance)}

  @classmethod
  def from_json(cls, d: Mapping) -> "Rule":
    if not isinstance(d, Mapping) or d.get("format") != RULE_FORMAT:
      raise ValueError(f"not a bnjax rule: expected a mapping with format {RULE_FORMAT!r}, "
                       f"got {d.get('format') if isinstance(d, Mapping) else type(d).__name__!r}")
    try:
      rule = cls(method=str(d["method"]), score=str(d["score"]),
                 edges=tuple(float(e) for e in d["edges"]),
                 gains=tuple(float(g) for g in d["gains"]), increasing=bool(d["increasing"]),
                 margin=float(d["margin"]), provenance=dict(d.get("provenance", {})))
    except KeyError as e:
      raise ValueError(f"the rule lacks its field {e.args[0]!r}") from None
    if not rule.edges or len(rule.edges) != len(rule.gains) or np.any(np.diff(rule.edges) < 0):
      raise ValueError("the rule's edges must be non-empty, ascending and as many as its gains")
    return rule

  def save(self, path: str | os.PathLike) -> None:
    """Writes the rule as JSON (atomically)."""
    write_json_atomic(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Rule":
    with open(path) as f:
      return cls.from_json(json.load(f))


class Decision(NamedTuple):
  """What :func:`should_adapt` decided, and from what.

  Attributes:
    adapt: True to adapt (the predicted gain exceeds the rule's margin).
    method: the adaptation the rule is about (e.g. ``"adabn"``).
    score: the name of the label-free score the rule reads (e.g. ``"agreement"``).
    value: that score's value for this target set.
    predicted_gain: the rule's fitted gain (IoU adapted - IoU unadapted) at
      ``value``; ``adapt`` is ``predicted_gain > margin``.
  """

  adapt: bool
  method: str
  score: str
  value: float
  predicted_gain: float


def fit_rule(values, gains, *, score: str, method: str, increasing: bool | None = None,
             margin: float = 0.0, provenance: Mapping | None = None) -> Rule:
  """The :class:`Rule` of ``score`` fitted on pairs with known gains.

  Args:
    values: the score of each pair (finite floats).
    gains: each pair's gain of ``method`` (IoU adapted - IoU unadapted).
    score: the score's name (a key of :func:`scores` or of the caller's table).
    method: the adaptation the gains belong to (e.g. ``"adabn"``).
    increasing: the direction of the monotone fit; None: the sign of the
      Spearman correlation of ``values`` with ``gains``.
    margin: adapt iff the predicted gain exceeds it.
    provenance: stored with the rule.
  """
  values, gains = np.asarray(values, float), np.asarray(gains, float)
  if values.ndim != 1 or values.shape != gains.shape or len(values) < 2:
    raise ValueError(f"values and gains must be 1-D of the same length >= 2, got "
                     f"{values.shape} and {gains.shape}")
  if not (np.isfinite(values).all() and np.isfinite(gains).all()):
    raise ValueError(f"values and gains must be finite ({score!r} has "
                     f"{int(np.sum(~np.isfinite(values)))} non-finite values)")
  margin = _checks.number("margin", margin, minimum=-1.0)
  step = stats.isotonic_fit(values, gains, increasing=increasing)
  return Rule(method=str(method), score=str(score), edges=step.edges, gains=step.values,
              increasing=step.increasing, margin=margin, provenance=dict(provenance or {}))


def should_adapt(rule: Rule, scores_: Mapping[str, float]) -> Decision:
  """Whether to adapt, by ``rule``, given the :func:`scores` of a target set
  (or any mapping holding the rule's score).

  Args:
    rule: a fitted :class:`Rule` (:func:`fit_rule`, or ``Rule.load(path)``).
    scores_: the target set's scores; must hold ``rule.score``, finite.

  Returns:
    A :class:`Decision`: ``adapt`` (True iff the rule's predicted gain at the
    score's value exceeds its margin), the method and score, the score's
    value and the predicted gain. A missing or non-finite score is a
    ValueError.
  """
  if not isinstance(rule, Rule):
    raise ValueError(f"rule must be a bnjax.selection.Rule (Rule.load(path)), got "
                     f"{type(rule).__name__}")
  if rule.score not in scores_:
    raise ValueError(f"the rule uses the score {rule.score!r}, which scores_ lacks "
                     f"(it has {sorted(scores_)})")
  value = float(scores_[rule.score])
  if not math.isfinite(value):
    raise ValueError(f"scores_[{rule.score!r}] is {value}: the rule needs it finite"
                     + (" (pass source_inputs to scores)" if rule.score in ("atc", "atc_after", "doc")
                        else ""))
  gain = rule.predicted_gain(value)
  return Decision(gain > rule.margin, rule.method, rule.score, value, gain)
