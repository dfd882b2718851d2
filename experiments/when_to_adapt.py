r"""When to adapt, without labels: does a label-free score of the target set
predict the gain of AdaBN, TENT or histogram matching, held out?

    python experiments/when_to_adapt.py --config=experiments/configs/when_to_adapt.py --workdir=runs/when_to_adapt

(the config file gives the expected runtime and result).

Pairs: every (source, target) of the study grids named in ``config.grids``
(the sweep config's groups, each source against each target), and every
shift x severity of :mod:`bnjax.shifts` applied to the benchmark source's
held-out images. Each source domain gets ``config.seeds`` models, model ``j``
trained on seed ``j``'s own draw of the data (one stack per seed, a
checkpoint per ``config.chunk`` models). For every pair, seed and method:

* the truth, on the labelled target evaluation images: IoU without
  adaptation, IoU with the method, the gain (their difference);
* the label-free scores of :func:`bnjax.selection.scores` on the unlabelled
  target adaptation images (ATC's threshold fitted on the source's labelled
  held-out images), with ``bn_w2`` the source-to-target BatchNorm-statistics
  distance (AdaBN's recomputed statistics, the same for every method: a
  shift measure), two feature distances at ``config.tap`` between the
  source images' and the target images' features of the unadapted model
  (Fréchet, sliced W2), and ``appearance``, how far each class's pixels
  moved under the source model's masks (:func:`bnjax.adapt.appearance_gap`:
  a change of class balance alone leaves it near 0);
* ``overlap``, the class overlap of the target (the overlap coefficient of
  the two classes' intensity histograms): it needs the target masks (or the
  domain's parameters), so it is a reference, never a candidate.

Held out: for every predictor and method, two leave-one-group-out splits,
by **family** (the grids and the benchmark's shift families) and by
**source** domain; on each training fold an isotonic fit of the gain (and of
the adapted IoU) on the predictor, in the direction of its training
Spearman; the held-out pairs get the fitted values. Reported: Spearman and
Kendall with the gain and the adapted IoU over all pairs (95 % bootstrap
intervals over pairs), the held-out MAE of both (with the MAE of the
training mean beside it), and the decision "adapt iff the predicted gain >
0": its accuracy and the mean IoU it obtains, against never-adapt,
always-adapt and the best choice of each pair. Per seed the same, to see
whether the conclusion survives retraining. The label-free predictor with
the best held-out (by family) mean IoU is fitted on every pair and saved as
a :class:`bnjax.selection.Rule` with its provenance.

The workdir (:mod:`bnjax.workdir`) receives ``checkpoints/seed<j>_chunk<c>``,
``results/source_<i>.json`` (resumable units), ``pairs.csv`` (every row),
``when_to_adapt.json`` (every figure), ``when_to_adapt.md`` (the tables),
``scatter_<method>.png`` (+ JSON: gain against each predictor, colour =
family, the fit on every pair as a line, the held-out predictions as
crosses) and ``rules/<method>.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax import (adapt, data, distances, distributed, features, inference, methods, metrics,
                   models, plots, selection, shifts, stats, streams, train)
from bnjax import config as cfg
from bnjax.progress import Progress
from bnjax.cli import main
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "when_to_adapt.py")

GRIDS = ("brightness", "geometric", "clip_corrected")
METHODS = ("adabn", "tent", "histogram_match")
LABEL_FREE = tuple(k for k in selection.KEYS) + ("frechet", "sliced_w2", "appearance")
NEEDS_LABELS = ("overlap",)
PREDICTORS = LABEL_FREE + NEEDS_LABELS
ID_FIELDS = ("kind", "family", "group", "source", "target", "severity", "seed", "method")
TRUTH = ("iou_no_adapt", "iou_adapted", "gain")
FIELDS = ID_FIELDS + TRUTH + PREDICTORS
SPLITS = ("family", "source")


@dataclasses.dataclass(frozen=True)
class Pair:
  """One (source, target) pair: a grid's target domain, or a shift of the
  source's own images."""

  kind: str                    # "grid" | "benchmark"
  family: str                  # the grid, or the shift's family
  group: str                   # the grid's group, or the shift
  source: data.Domain
  target: data.Domain | None = None
  shift: str | None = None
  severity: int = 0

  @property
  def target_name(self) -> str:
    return str(self.target) if self.target is not None else f"{self.shift} {self.severity}"


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config resolved and checked whole (:func:`plan_of`)."""

  pairs: list
  sources: list
  methods: list
  model: models.UNet
  train: train.TrainConfig   # its seed is set per stack
  tent: dict                 # methods.tent options


def plan_of(config) -> Plan:
  """Every value of ``config`` checked by the code that uses it (the pairs,
  source domains, methods, model, training, TENT, tap), before anything is
  written or trained; a :class:`bnjax.config.ConfigError` naming the key
  otherwise."""
  cfg.positive_int(config.seeds, "seeds")
  cfg.positive_int(config.seed, "seed", minimum=0)
  pairs = []
  for grid in (cfg.names(config.grids, GRIDS, "grids") if config.grids else []):
    if grid not in config.grid_groups:
      raise cfg.ConfigError(f"config.grid_groups has no groups for the grid {grid!r} (it has "
                            f"{sorted(config.grid_groups)})")
    for i, g in enumerate(config.grid_groups[grid]):
      where = f"grid_groups.{grid}[{i}]"
      pairs += [Pair("grid", grid, g["label"], s, t)
                for s in cfg.domains(g["sources"], f"{where}.sources")
                for t in cfg.domains(g["targets"], f"{where}.targets")]
  if config.shifts:
    source = cfg.domain(config.benchmark_source, "benchmark_source")
    severities = cfg.ints(config.severities, 1, 5, "severities")
    pairs += [Pair("benchmark", shifts.family_of(s), s, source, shift=s, severity=v)
              for s in cfg.names(config.shifts, shifts.SHIFTS, "shifts") for v in severities]
  if not pairs:
    raise cfg.ConfigError("config.grids and config.shifts are both empty: there is no pair to "
                          "score")
  if len({p.family for p in pairs}) < 2:
    raise cfg.ConfigError(f"config.grids, config.shifts: the pairs come from one family "
                          f"({pairs[0].family}); holding a family out needs at least two (add "
                          "grids or shifts)")
  if len({p.source for p in pairs}) < 2:
    raise cfg.ConfigError(f"config.grids, config.shifts: the pairs come from one source domain "
                          f"({pairs[0].source}); holding a source out needs at least two (add "
                          "grids)")
  size = cfg.image_size(config.data.size)
  for name in ("n_train", "n_eval", "n_adapt"):
    cfg.positive_int(config.data[name], f"data.{name}")
  for name in ("max_rows", "bootstrap", "chunk", "pair_chunk"):
    cfg.positive_int(config[name], name)
  cfg.strategy(config.strategy)
  model = cfg.unet(config.model, image_size=size)
  cfg.taps(config.tap, model, size, "tap")
  return Plan(pairs, list(dict.fromkeys(p.source for p in pairs)),
              cfg.names(config.methods, METHODS, "methods"), model,
              cfg.train_config(config.train, n_images=config.data.n_train, seed=config.seed),
              cfg.tent_options(config.tent))


def class_overlap(images, masks, bins: int = 64) -> float:
  """The overlap coefficient sum_b min(p0_b, p1_b) of the background's and the
  foreground's intensity histograms (``bins`` bins on [0, 1]); NaN when a
  class is absent. Needs the masks: a reference, not a label-free score."""
  x, m = np.asarray(images, float)[..., 0].ravel(), np.asarray(masks, bool).ravel()
  if m.all() or not m.any():
    return float("nan")
  edges = np.linspace(0.0, 1.0, bins + 1)
  h0 = np.histogram(x[~m], edges)[0] / np.sum(~m)
  h1 = np.histogram(x[m], edges)[0] / np.sum(m)
  return float(np.minimum(h0, h1).sum())


# --------------------------------------------------------------------------
# Models and rows


def _train_seeds(wd, config, plan, model):
  """[seed] -> the stack of every source's model, trained ``config.chunk``
  models at a time (a checkpoint ``seed<j>_chunk<c>`` each)."""
  stacks = []
  for j in range(config.seeds):
    chunks = []
    for c in range(0, len(plan.sources), config.chunk):
      name = f"seed{j}_chunk{c // config.chunk:02d}"
      sources = plan.sources[c:c + config.chunk]
      meta = {"sources": [str(s) for s in sources]}

      def fit(j=j, c=c, sources=sources, name=name):
        sets = [data.split_dataset(config.seed + j, s, "train", config.data.n_train,
                                   config.data.size) for s in sources]
        print(f"[{name}] training {len(sets)} source models on {config.data.n_train} images "
              "each", flush=True)
        tc = dataclasses.replace(plan.train, seed=config.seed + 1000 * j + c)
        v, _ = train.train_many(model, jnp.stack([s[0] for s in sets]),
                                jnp.stack([s[1] for s in sets]), tc, strategy=config.strategy)
        return v, {}

      v, _, restored = wd.train_or_restore(name, fit, **meta)
      if restored:
        print(f"[{name}] restored from {wd.path}/checkpoints/{name}", flush=True)
      chunks.append(v)
    stacks.append(jax.tree_util.tree_map(lambda *a: np.concatenate(a), *chunks))
  return stacks


def _target_sets(config, pair: Pair, seed: int, src_eval, src_adapt):
  """(eval images, eval masks, adaptation images) of the pair's target."""
  if pair.kind == "grid":
    x, y = data.split_dataset(config.seed + seed, pair.target, "eval", config.data.n_eval,
                              config.data.size)
    xa, _ = data.split_dataset(config.seed + seed, pair.target, "adapt", config.data.n_adapt,
                               config.data.size)
    return x, y, xa
  k = lambda split: data.named_key(config.seed + seed, pair.shift, pair.severity, split)
  x, y = shifts.apply(k("eval"), *src_eval, pair.shift, pair.severity)
  xa, _ = shifts.apply(k("adapt"), *src_adapt, pair.shift, pair.severity)
  return x, y, xa


def _seed_rows(config, plan, model, v, pairs, seed, src):
  """Rows of every method on every pair of one source model (one seed). The
  pairs are split over every process's devices (each pair computed once,
  :func:`bnjax.distributed.map_pairs`); on each device the adaptations,
  predictions and scores of its pairs are one compiled call each
  (:func:`bnjax.methods.tent_stacked`, ``histogram_match_stacked``,
  :func:`bnjax.selection.scores_stacked`, the unadapted and source maps
  shared by every method), feature distances pair by pair."""
  sets = [_target_sets(config, pair, seed, *src[:2]) for _, pair in pairs]
  x, y, xa = (jnp.stack([t[i] for t in sets]) for i in range(3))
  keys = jnp.stack([data.named_key(config.seed + seed, "pair", index) for index, _ in pairs])
  got = distributed.map_pairs(functools.partial(_pair_measures, config, plan, model),
                              x, y, xa, keys, v, src, in_axes=(0, 0, 0, 0, None, None),
                              chunk=config.pair_chunk, name=f"{pairs[0][1].source} seed {seed}")
  rows = []
  for p, (index, pair) in enumerate(pairs):
    shared = {k: float(a[p]) for k, a in got["shared"].items()}
    iou0 = float(got["iou0"][p])
    for method in plan.methods:
      iou1 = float(got["iou1"][method][p])
      s = {k: float(got["scores"][method][k][p]) for k in selection.KEYS}
      rows.append({"kind": pair.kind, "family": pair.family, "group": pair.group,
                   "source": str(pair.source), "target": pair.target_name,
                   "severity": pair.severity, "seed": seed, "method": method,
                   "iou_no_adapt": iou0, "iou_adapted": iou1, "gain": iou1 - iou0,
                   **s, **shared})
  return rows


def _pair_measures(config, plan, model, x, y, xa, keys, v, src):
  """The IoUs, label-free scores and distances of a share of one source
  model's pairs (evaluation images, masks and adaptation images [p, ...])."""
  src_eval, src_adapt, src_features, classes = src
  n_pairs = x.shape[0]
  tile = lambda t: jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n_pairs, *a.shape)), t)
  vs = tile(v)
  v_adabn = adapt.recompute_batch_stats_stacked(model, vs, xa, mode="exact",
                                                strategy=config.strategy)
  adapted = {}
  for method in plan.methods:
    if method == "adabn":
      adapted[method] = (v_adabn, x, None)
    elif method == "tent":
      adapted[method] = (methods.tent_stacked(
          model, vs, xa, keys=jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys),
          steps=plan.tent["steps"], learning_rate=plan.tent["learning_rate"],
          batch_size=min(plan.tent["batch_size"], xa.shape[1]), strategy=config.strategy),
          x, None)
    else:  # histogram matching to the pooled unlabelled source images
      reference = tile(src_adapt[0])
      adapted[method] = (vs, methods.histogram_match_stacked(x, reference),
                         methods.histogram_match_stacked(xa, reference))
  pred0 = inference.stacked_predict(model, vs, x, strategy=config.strategy)
  pred1 = {m: inference.stacked_predict(model, v_m, eval_x, strategy=config.strategy)
           for m, (v_m, eval_x, _) in adapted.items()}
  scored = selection.scores_stacked(
      model, vs, [v_m for v_m, _, _ in adapted.values()], xa,
      source_inputs=tuple(tile(a) for a in src_eval),
      adapted_inputs=[score_x for _, _, score_x in adapted.values()], strategy=config.strategy)
  x, y = np.asarray(x), np.asarray(y)
  shared = {k: [] for k in ("bn_w2", "frechet", "sliced_w2", "appearance", "overlap")}
  for p in range(n_pairs):
    kf = jax.random.fold_in(keys[p], 1)
    fs = distances.subsample(src_features, config.max_rows, kf)
    ft = distances.subsample(features.extract(model, v, xa[p], config.tap), config.max_rows, kf)
    v_ad_p = jax.tree_util.tree_map(lambda a: a[p], v_adabn)
    shared["bn_w2"].append(float(sum(distances.diag_w2(v["batch_stats"],
                                                       v_ad_p["batch_stats"]).values())))
    shared["frechet"].append(distances.frechet(fs, ft))
    shared["sliced_w2"].append(distances.sliced_wasserstein(fs, ft, key=kf, n_proj=100))
    masks = jnp.asarray(bnjax.predict(model, v, xa[p]))
    shared["appearance"].append(float(adapt.appearance_gap(
        xa[p], jnp.stack([~masks, masks], axis=-1).astype(jnp.float32), classes)))
    shared["overlap"].append(class_overlap(x[p], y[p]))
  return {"iou0": np.array([metrics.iou(pred0[p], y[p]) for p in range(n_pairs)]),
          "iou1": {m: np.array([metrics.iou(pred1[m][p], y[p]) for p in range(n_pairs)])
                   for m in adapted},
          "scores": {m: {k: np.asarray(scored_m[k]) for k in selection.KEYS}
                     for m, scored_m in zip(adapted, scored)},
          "shared": {k: np.asarray(a, float) for k, a in shared.items()}}


def _score_source(wd, config, plan, model, stacks, i, source, bar, done):
  name = f"source_{i:03d}"
  pairs = [(k, p) for k, p in enumerate(plan.pairs) if p.source == source]
  found = wd.read_result(name)
  if found is not None:
    bar.update(done + len(pairs) * config.seeds, f"{source} restored", restored=True)
    return found["rows"], done + len(pairs) * config.seeds
  rows = []
  for j in range(config.seeds):
    v = jax.tree_util.tree_map(lambda a: a[i], stacks[j])
    src_eval = data.split_dataset(config.seed + j, source, "eval", config.data.n_eval,
                                  config.data.size)
    src_adapt = data.split_dataset(config.seed + j, source, "adapt", config.data.n_adapt,
                                   config.data.size)
    # The per-class appearance change (bnjax.adapt.appearance_gap) needs the
    # source model's class statistics on its unlabelled source images: once
    # per source model, not per pair.
    src = (src_eval, src_adapt, features.extract(model, v, src_eval[0], config.tap),
           adapt.add_class_stats(model, v, src_adapt[0])["class_stats"])
    rows += _seed_rows(config, plan, model, v, pairs, j, src)
    done += len(pairs)
    bar.update(done, f"{source} seed {j}")
  wd.write_result(name, {"source": str(source), "rows": rows})
  return rows, done


# --------------------------------------------------------------------------
# Held-out evaluation


def heldout(x, gain, iou0, iou1, groups) -> dict:
  """Leave one group out: per fold, isotonic fits of the gain and of the
  adapted IoU on ``x`` over the training groups (in the direction of their
  training Spearman), evaluated on the held-out group; the decision adapts
  iff the predicted gain is > 0."""
  x, gain, iou0, iou1 = (np.asarray(a, float) for a in (x, gain, iou0, iou1))
  pred_gain, pred_iou = np.empty_like(x), np.empty_like(x)
  mean_gain, mean_iou = np.empty_like(x), np.empty_like(x)
  folds = []
  for g, tr, te in stats.group_folds(groups):
    pred_gain[te] = stats.isotonic_fit(x[tr], gain[tr], increasing=None)(x[te])
    pred_iou[te] = stats.isotonic_fit(x[tr], iou1[tr], increasing=None)(x[te])
    mean_gain[te], mean_iou[te] = gain[tr].mean(), iou1[tr].mean()
    folds.append({"held_out": g, "n_train": int(len(tr)), "n_test": int(len(te))})
  decide = pred_gain > 0
  return {"mae_gain": float(np.mean(np.abs(pred_gain - gain))),
          "mae_gain_of_mean": float(np.mean(np.abs(mean_gain - gain))),
          "mae_iou": float(np.mean(np.abs(pred_iou - iou1))),
          "mae_iou_of_mean": float(np.mean(np.abs(mean_iou - iou1))),
          **_decisions(decide, gain, iou0, iou1),
          "adapt_rate": float(np.mean(decide)), "folds": folds,
          "predicted_gain": pred_gain.tolist()}


def _column(rows, name):
  return np.array([r[name] for r in rows], float)


def _baselines(gain, iou0, iou1) -> dict:
  """Row count, the fraction where adapting helps (= always-adapt's accuracy)
  and the mean IoU of never / always adapting and of the best choice."""
  return {"n": int(len(gain)), "helped": float(np.mean(gain > 0)),
          "never": float(iou0.mean()), "always": float(iou1.mean()),
          "best": float(np.maximum(iou0, iou1).mean())}


def _decisions(decide, gain, iou0, iou1) -> dict:
  """Accuracy (adapt where the gain is > 0) and mean IoU obtained by ``decide``."""
  return {"accuracy": float(np.mean(decide == (gain > 0))),
          "mean_iou": float(np.mean(np.where(decide, iou1, iou0)))}


def _evaluate(rows, predictors, bootstrap: int, rng, intervals: bool = True) -> dict:
  gain, iou0, iou1 = (_column(rows, k) for k in ("gain", "iou_no_adapt", "iou_adapted"))
  groups = {s: np.array([r[s] for r in rows]) for s in SPLITS}
  out = {"baselines": _baselines(gain, iou0, iou1), "predictors": {}}
  for p in predictors:
    x = _column(rows, p)
    ok = np.isfinite(x)
    e = {"needs_labels": p in NEEDS_LABELS, "n": int(ok.sum())}
    if ok.sum() < 3 or len(set(groups["family"][ok])) < 2:
      out["predictors"][p] = e
      continue
    for name, y in (("gain", gain), ("iou_adapted", iou1)):
      for corr in (stats.spearman, stats.kendall):
        k = f"{corr.__name__}_{name}"
        e[k] = float(corr(x[ok], y[ok]))
        if intervals:
          e[k + "_ci"] = stats.bootstrap_ci(corr, x[ok], y[ok], bootstrap, rng)
    for split in SPLITS:
      if len(set(groups[split][ok])) >= 2:
        e[split] = heldout(x[ok], gain[ok], iou0[ok], iou1[ok], groups[split][ok])
    out["predictors"][p] = e
  return out


def _rank_key(e) -> tuple:
  """Held out (by family): mean IoU, then accuracy, then gain MAE (mean IoU
  and accuracy compared to 3 decimals: closer than that is a tie)."""
  f = e["family"]
  return round(f["mean_iou"], 3), round(f["accuracy"], 3), -f["mae_gain"]


def _choose(evaluation) -> str:
  """The label-free predictor that ranks first by :func:`_rank_key`."""
  return max((_rank_key(e), p) for p, e in evaluation["predictors"].items()
             if not e["needs_labels"] and "family" in e)[1]


def analyse(rows, config, plan) -> dict:
  """Every figure of the held-out evaluation, per method (pooled over seeds
  and per seed), the chosen predictor and the per-family failure table."""
  rng = np.random.default_rng(config.seed)
  out = {}
  for method in plan.methods:
    mrows = [r for r in rows if r["method"] == method]
    ev = _evaluate(mrows, PREDICTORS, config.bootstrap, rng)
    chosen = _choose(ev)
    ev["chosen"] = chosen
    ev["per_seed"] = {}
    for j in sorted({r["seed"] for r in mrows}):
      sev = _evaluate([r for r in mrows if r["seed"] == j], LABEL_FREE, 0, rng, intervals=False)
      order = sorted((p for p in LABEL_FREE if "family" in sev["predictors"][p]),
                     key=lambda p: _rank_key(sev["predictors"][p]), reverse=True)
      ev["per_seed"][str(j)] = {
          "chosen": _choose(sev), "rank_of_pooled_choice": order.index(chosen) + 1,
          "baselines": sev["baselines"],
          "predictors": {p: {"spearman_gain": e.get("spearman_gain", float("nan")),
                             "mean_iou": e.get("family", {}).get("mean_iou", float("nan")),
                             "accuracy": e.get("family", {}).get("accuracy", float("nan"))}
                         for p, e in sev["predictors"].items()}}
    x, gain = _column(mrows, chosen), _column(mrows, "gain")
    iou0, iou1 = _column(mrows, "iou_no_adapt"), _column(mrows, "iou_adapted")
    pred = np.asarray(ev["predictors"][chosen]["family"]["predicted_gain"])
    fam = np.array([r["family"] for r in mrows])
    ev["families"] = {}
    for f in dict.fromkeys(fam):
      m = fam == f
      ev["families"][f] = {**_baselines(gain[m], iou0[m], iou1[m]),
                           "spearman_gain": float(stats.spearman(x[m], gain[m])),
                           **_decisions(pred[m] > 0, gain[m], iou0[m], iou1[m])}
    ev["gate"] = gate_decisions(mrows, pred > 0)
    out[method] = ev
  return out


#: A decision "near the best" costs at most this much IoU against the better
#: of adapting and not (a gain or loss smaller than it is noise at 64 images).
NEAR_BEST = 0.01


def gate_decisions(rows, rule) -> dict:
  """The decisions of the streams' gate on these pairs, per family: adapt
  iff the per-class appearance change exceeds ``bnjax.streams.
  GATE_THRESHOLDS["appearance"]`` (fixed beforehand on other models and
  streams: nothing here is fitted), against the held-out ``rule`` (bool per
  row) and the two combined (adapt iff both say so). For each: the accuracy,
  the fraction of rows within :data:`NEAR_BEST` of the best choice, and the
  mean IoU, per family and over all rows."""
  gain, iou0, iou1 = (_column(rows, k) for k in ("gain", "iou_no_adapt", "iou_adapted"))
  appearance = _column(rows, "appearance")
  gate = appearance > streams.GATE_THRESHOLDS["appearance"]
  fam = np.array([r["family"] for r in rows])
  best = np.maximum(iou0, iou1)
  out = {"threshold": float(streams.GATE_THRESHOLDS["appearance"]), "decisions": {}}
  for name, decide in (("rule", np.asarray(rule, bool)), ("gate", gate),
                       ("gate_and_rule", gate & np.asarray(rule, bool)),
                       ("always", np.ones_like(gate)), ("never", np.zeros_like(gate))):
    got = np.where(decide, iou1, iou0)
    per = {}
    for f in [*dict.fromkeys(fam), "all"]:
      m = np.ones_like(gate) if f == "all" else fam == f
      per[f] = {"accuracy": float(np.mean(decide[m] == (gain[m] > 0))),
                "near_best": float(np.mean(best[m] - got[m] <= NEAR_BEST)),
                "mean_iou": float(np.mean(got[m]))}
    out["decisions"][name] = per
  return out


def _rule(config, rows, method, evaluation) -> selection.Rule:
  mrows = [r for r in rows if r["method"] == method]
  chosen = evaluation["chosen"]
  held = {s: {k: evaluation["predictors"][chosen][s][k]
              for k in ("accuracy", "mean_iou", "mae_gain")} for s in SPLITS}
  provenance = {
      "experiment": "when_to_adapt", "bnjax": bnjax.__version__, "preset": config.preset,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "pairs": len(mrows), "seeds": config.seeds,
      "families": sorted({r["family"] for r in mrows}),
      "sources": sorted({r["source"] for r in mrows}),
      "image_size": config.data.size, "model": dict(config.model),
      "scores_on": f"{config.data.n_adapt} unlabelled target images; ATC fitted on "
                   f"{config.data.n_eval} labelled source images",
      "selected_by": "best held-out (leave one family out) mean IoU among label-free scores",
      "heldout": held, "baselines": evaluation["baselines"]}
  return selection.fit_rule(_column(mrows, chosen), _column(mrows, "gain"), score=chosen,
                            method=method, provenance=provenance)


# --------------------------------------------------------------------------
# Report


def _num(v) -> str:
  return f"{v:+.2f}" if np.isfinite(v) else "-"


def _ci(e, k) -> str:
  if k not in e:
    return "-"
  lo, hi = e.get(k + "_ci", [np.nan, np.nan])
  return f"{e[k]:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else "")


def report(wd, config, plan, rows, analysis) -> str:
  fams = list(dict.fromkeys(r["family"] for r in rows))
  lines = [f"# When to adapt ({config.preset}): {len(plan.pairs)} pairs x {config.seeds} seeds, "
           f"{config.data.size}x{config.data.size}, width {config.model.features}", "",
           f"Families: {', '.join(fams)}; {len(plan.sources)} source domains. Scores on "
           f"{config.data.n_adapt} unlabelled target images, truth on {config.data.n_eval} "
           "labelled ones. Correlations over every (pair, seed) with 95 % bootstrap intervals "
           "(pairs resampled); held out: leave one family out (fam) / one source domain out "
           "(src), isotonic fits on the training folds; the rule adapts iff the predicted gain "
           "is > 0. † needs the target masks or the domain's parameters (a reference, not a "
           "candidate).", ""]
  for method, ev in analysis.items():
    b = ev["baselines"]
    lines += [f"## {method}", "",
              f"{b['n']} (pair, seed) rows; adapting helps in {100 * b['helped']:.0f} %. Mean IoU: "
              f"never adapt {b['never']:.3f}, always adapt {b['always']:.3f}, best choice per "
              f"pair {b['best']:.3f}.", "",
              "| predictor | Spearman gain | Kendall gain | Spearman IoU adapted | Kendall IoU "
              "adapted | MAE gain fam / src (mean) | MAE IoU fam / src (mean) | accuracy fam / "
              "src | rule mean IoU fam / src |", "|---|---|---|---|---|---|---|---|---|"]
    order = sorted((p for p in ev["predictors"] if "family" in ev["predictors"][p]),
                   key=lambda p: _rank_key(ev["predictors"][p]), reverse=True)
    for p in order:
      e = ev["predictors"][p]
      if "family" not in e:
        continue
      f, s = e["family"], e.get("source", e["family"])
      name = p + (" †" if e["needs_labels"] else "") + (" **(rule)**" if p == ev["chosen"] else "")
      lines.append(
          f"| {name} | {_ci(e, 'spearman_gain')} | {_ci(e, 'kendall_gain')} "
          f"| {_ci(e, 'spearman_iou_adapted')} | {_ci(e, 'kendall_iou_adapted')} "
          f"| {f['mae_gain']:.3f} / {s['mae_gain']:.3f} ({f['mae_gain_of_mean']:.3f}) "
          f"| {f['mae_iou']:.3f} / {s['mae_iou']:.3f} ({f['mae_iou_of_mean']:.3f}) "
          f"| {f['accuracy']:.2f} / {s['accuracy']:.2f} | {f['mean_iou']:.3f} / "
          f"{s['mean_iou']:.3f} |")
    lines.append(f"| *always adapt* | | | | | | | {b['helped']:.2f} | {b['always']:.3f} |")
    lines.append(f"| *never adapt* | | | | | | | {1 - b['helped']:.2f} | "
                 f"{b['never']:.3f} |")
    lines.append(f"| *best per pair* | | | | | | | 1.00 | {b['best']:.3f} |")
    lines += ["", f"Per family, the rule's score `{ev['chosen']}` held out (leave one family out):",
              "", "| family | rows | helps | Spearman gain | accuracy | rule | always | never | "
              "best |", "|---|---|---|---|---|---|---|---|---|"]
    for f, e in ev["families"].items():
      lines.append(f"| {f} | {e['n']} | {100 * e['helped']:.0f} % | {_num(e['spearman_gain'])} "
                   f"| {e['accuracy']:.2f} | {e['mean_iou']:.3f} | {e['always']:.3f} "
                   f"| {e['never']:.3f} | {e['best']:.3f} |")
    g = ev["gate"]
    names = {"rule": f"rule ({ev['chosen']})", "gate": "gate", "gate_and_rule": "gate and rule",
             "always": "always", "never": "never"}
    lines += ["", f"The streams' gate (adapt iff the per-class appearance change exceeds "
              f"{g['threshold']:g}, `bnjax.streams.GATE_THRESHOLDS`: fixed beforehand, nothing "
              "fitted here), the rule held out, and both: accuracy / rows within "
              f"{NEAR_BEST:g} of the best choice / mean IoU, per family:", "",
              "| family | " + " | ".join(names.values()) + " |",
              "|---|" + "---|" * len(names)]
    for f in g["decisions"]["gate"]:
      lines.append(f"| {f} | " + " | ".join(
          "{accuracy:.2f} / {near_best:.2f} / {mean_iou:.3f}".format(**g["decisions"][k][f])
          for k in names) + " |")
    seeds = sorted(ev["per_seed"], key=int)
    lines += ["", "Spearman with the gain, each retraining alone (seed):", "",
              "| predictor | " + " | ".join(f"seed {j}" for j in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for p in LABEL_FREE:
      lines.append(f"| {p} | " + " | ".join(
          _num(ev["per_seed"][j]["predictors"][p]["spearman_gain"]) for j in seeds) + " |")
    lines += ["", "Per seed (each retraining alone): the best label-free score held out, the "
              f"rank of `{ev['chosen']}` among {len(LABEL_FREE)}, and its Spearman with the gain:",
              "", "| seed | best score | rank of the rule's | its Spearman gain | its mean IoU | "
              "always | best |", "|---|---|---|---|---|---|---|"]
    for j in seeds:
      e = ev["per_seed"][j]
      c = e["predictors"][ev["chosen"]]
      lines.append(f"| {j} | {e['chosen']} | {e['rank_of_pooled_choice']} | "
                   f"{c['spearman_gain']:+.2f} | {c['mean_iou']:.3f} | "
                   f"{e['baselines']['always']:.3f} | {e['baselines']['best']:.3f} |")
    lines.append("")
  text = "\n".join(lines) + "\n"
  wd.write_text("when_to_adapt.md", text)
  wd.write_csv("pairs.csv", rows, FIELDS)
  wd.write_json("when_to_adapt.json", analysis)
  for method, ev in analysis.items():
    mrows = [r for r in rows if r["method"] == method]
    panels = {}
    for p in PREDICTORS:
      e = ev["predictors"][p]
      if "family" not in e:
        continue
      x = _column(mrows, p)
      ok = np.isfinite(x)
      fit = stats.isotonic_fit(x[ok], _column(mrows, "gain")[ok], increasing=None)
      panels[p + (" †" if e["needs_labels"] else "")] = {
          "x": x[ok].tolist(), "y": _column(mrows, "gain")[ok].tolist(),
          "group": [r["family"] for r, k in zip(mrows, ok) if k],
          "heldout": e["family"]["predicted_gain"], "fit": [list(fit.edges), list(fit.values)],
          "note": f"Spearman {e['spearman_gain']:+.2f}, held-out acc. {e['family']['accuracy']:.2f}",
          "xscale": "symlog" if p in ("bn_w2", "frechet", "sliced_w2", "appearance")
          else "linear"}
    plots.predictor_scatter(panels, fams, wd.file(f"scatter_{method}.png"),
                            f"{method}: gain (IoU adapted - unadapted) against each predictor "
                            "(one point per pair and seed)", ylabel="gain",
                            note="crosses: each row's gain predicted by the isotonic fit on the "
                                 "other families (leave one family out); line: the fit on every "
                                 "row; † needs the target masks (a reference, not a label-free "
                                 "score)")
  return text


def run(config, workdir: str) -> dict:
  """Runs the experiment of ``config`` into ``workdir``; returns the analysis."""
  plan = plan_of(config)
  wd = Workdir.open(workdir, "when_to_adapt", config)
  start = time.perf_counter()
  model = plan.model
  print(f"when_to_adapt ({config.preset}): {len(plan.pairs)} pairs from {len(plan.sources)} "
        f"source domains x {config.seeds} seeds x methods {plan.methods}; devices "
        f"{jax.devices()}", flush=True)
  stacks = _train_seeds(wd, config, plan, model)
  bar = Progress(len(plan.pairs) * config.seeds, "(pair, seed)s")
  rows, done = [], 0
  for i, source in enumerate(plan.sources):
    source_rows, done = _score_source(wd, config, plan, model, stacks, i, source, bar, done)
    rows += source_rows
  analysis = analyse(rows, config, plan)
  for method, ev in analysis.items():
    _rule(config, rows, method, ev).save(wd.file(os.path.join("rules", f"{method}.json")))
  text = report(wd, config, plan, rows, analysis)
  print("\n" + text + f"\n({time.perf_counter() - start:.0f} s this run)", flush=True)
  return analysis


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "when_to_adapt")
