r"""Which unsupervised fix works when: a segmentation shift benchmark.

    python experiments/benchmark.py --config=experiments/configs/benchmark.py --workdir=runs/benchmark

For each U-Net variant (a config list of :data:`VARIANTS`), ``config.seeds``
source models are trained on the source domain as one stack (model ``i``
with seed ``config.seed + i`` on its own draw of the data). Every shift of
:mod:`bnjax.shifts` at every configured severity is applied to each seed's
held-out source images (the evaluation split, and a distinct unlabelled
adaptation split), and every method of :data:`METHODS` is scored on the
shifted evaluation images: IoU and Dice (per-image means), severity 0 being
the source itself. Methods that need BatchNorm are skipped for variants
without it.

Methods: ``none`` (the source model), ``adabn`` (BN statistics recomputed
on the target adaptation images, ``"exact"``), ``adabn_prior`` (the same
with the source statistics as ``config.adapt.prior`` prior images, Schneider
et al. 2020), ``tent`` (:func:`bnjax.methods.tent_stacked` on the adaptation
images: every (seed, severity) pair in one compiled call), ``histogram_match``
(each target image matched to the pooled unlabelled source images,
:func:`bnjax.methods.histogram_match_stacked`), ``cyclegan_transpose`` and
``cyclegan_resize_conv`` (the shifted evaluation images translated into the
source style by a CycleGAN trained on that seed's unlabelled source and
shifted adaptation images, :mod:`bnjax.cyclegan`; only at the shifts and
severities of ``config.cyclegan``, the translators shared by every variant),
``oracle`` (models of the variant trained on the shifted training images,
one stack per shift and severity).

Resumable: each variant's stack is a checkpoint, each (variant, shift) a
result file. The workdir (:mod:`bnjax.workdir`) receives ``config.json``,
``checkpoints/``, ``results/<variant>__<shift>.json``, ``benchmark.csv`` and
``benchmark.json`` (every number: one row per variant, shift, severity,
method, seed), ``benchmark.md`` (means with 95 % t-intervals over seeds, the
winner of each cell, every cell where a method lowers IoU below no
adaptation), and per variant ``<variant>_severity.png`` (IoU against severity,
one panel per shift, one line per method), ``<variant>_methods.png`` (method x
shift heatmap of the mean IoU over severities >= 1) and
``<variant>_winners.png`` (the winning method of each shift and severity),
each with its numbers beside it; with the CycleGAN methods also
``translations/``, ``cyclegan.csv``/``.json`` (every translator's measures
and cost) and ``cyclegan_examples.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import (adapt, cyclegan, data, distributed, inference, methods, metrics, plots, shifts,
                   stats, train)
from bnjax import config as cfg
from bnjax.progress import Progress
from bnjax.cli import main
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "benchmark.py")

# name -> (UNet options, loss). "reference" is the study's network.
VARIANTS: dict[str, tuple[dict, str]] = {
    "reference": ({}, "ce+dice"),
    "strided": ({"down": "strided"}, "ce+dice"),
    "resize_conv": ({"up": "resize_conv"}, "ce+dice"),
    "no_skip": ({"skip": False}, "ce+dice"),
    "ce": ({}, "ce"),
    "dice": ({}, "dice"),
    "instance": ({"norm": "instance"}, "ce+dice"),
    "group": ({"norm": "group"}, "ce+dice"),
    "layer": ({"norm": "layer"}, "ce+dice"),
    "no_norm": ({"norm": "none"}, "ce+dice"),
    "standardize": ({"standardize": True}, "ce+dice"),
}
# Pixel-level translation: method -> the generators' upsampling (bnjax.cyclegan.Up).
CYCLEGAN = {"cyclegan_transpose": "transpose", "cyclegan_resize_conv": "resize_conv"}
METHODS = ("none", "adabn", "adabn_prior", "tent", "histogram_match", *CYCLEGAN, "oracle")
BN_METHODS = ("adabn", "adabn_prior", "tent")
FIELDS = ("variant", "shift", "family", "severity", "method", "seed", "iou", "dice")
# The measures of each translator (one row per shift, severity, seed, generator).
CYCLEGAN_FIELDS = ("shift", "severity", "seed", "up", "period2", "checkerboard_ratio",
                   "spectral_l1", "sharpness_ratio", "edge_overlap", "train_seconds",
                   "images_per_second")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config resolved and checked whole (:func:`plan_of`)."""

  variants: list
  shifts: list
  severities: list
  methods: list
  source: data.Domain
  models: dict    # variant -> its UNet
  train: dict     # variant -> its TrainConfig (its loss)
  adapt: dict     # recompute_batch_stats options (batch_size, prior)
  tent: dict      # methods.tent options
  cyclegan: dict  # method -> CycleGANConfig; "shifts", "severities": where they run


def plan_of(config) -> Plan:
  """Every value of ``config`` checked by the code that uses it, before
  anything is written or trained; a :class:`bnjax.config.ConfigError`
  naming the key otherwise."""
  cfg.positive_int(config.seeds, "seeds")
  cfg.positive_int(config.seed, "seed", minimum=0)
  methods_ = cfg.names(config.methods, METHODS, "methods")
  if "none" not in methods_:
    methods_.insert(0, "none")  # the baseline every finding is measured against
  variants = cfg.names(config.variants, VARIANTS, "variants")
  size = cfg.image_size(config.data.size)
  for name in ("n_train", "n_eval", "n_adapt"):
    cfg.positive_int(config.data[name], f"data.{name}")
  cfg.positive_int(config.pair_chunk, "pair_chunk")
  cfg.strategy(config.strategy)
  translators = {"shifts": cfg.names(config.cyclegan.shifts, shifts.SHIFTS, "cyclegan.shifts"),
                 "severities": cfg.ints(config.cyclegan.severities, 1, 5, "cyclegan.severities")}
  for m in methods_:
    if m in CYCLEGAN:
      translators[m] = cfg.cyclegan_config(config.cyclegan.train, image_size=size,
                                           up=CYCLEGAN[m])
  return Plan(variants, cfg.names(config.shifts, shifts.SHIFTS, "shifts"),
              cfg.ints(config.severities, 1, 5, "severities",
                       " (severity 0, the source, is always scored)"), methods_,
              cfg.domain(config.source, "source"),
              {v: cfg.unet(config.model, image_size=size, **VARIANTS[v][0]) for v in variants},
              {v: cfg.train_config(config.train, n_images=config.data.n_train,
                                   loss=VARIANTS[v][1], seed=config.seed) for v in variants},
              cfg.adapt_options(config.adapt), cfg.tent_options(config.tent), translators)


def _source_sets(config, source: data.Domain, split: str, n: int):
  """Stacked (images[S], masks[S]): seed i's own draw of the split."""
  sets = [data.split_dataset(config.seed + i, source, split, n, config.data.size)
          for i in range(config.seeds)]
  return jnp.stack([s[0] for s in sets]), jnp.stack([s[1] for s in sets])


def _shifted(config, shift: str, severity: int, split: str, images, masks):
  """Every seed's set under (shift, severity), stacked."""
  pairs = [shifts.apply(data.named_key(config.seed + i, shift, severity, split), images[i],
                        masks[i], shift, severity) for i in range(images.shape[0])]
  return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


def _scores(model, variables, images, masks, strategy):
  """(iou[P], dice[P]): per-image means of model p on set p."""
  pred = inference.stacked_predict(model, variables, images, strategy=strategy)
  masks = np.asarray(masks)
  iou = [metrics.iou(pred[p], masks[p]) for p in range(len(pred))]
  dice = [metrics.dice(pred[p], masks[p]) for p in range(len(pred))]
  return np.asarray(iou), np.asarray(dice)


def _train_stack(wd, config, plan, variant, name, images, masks):
  """The stack of ``config.seeds`` models trained on ``images[S]``, restored
  from ``checkpoints/<name>`` when it is there."""
  def fit():
    print(f"[{name}] training {images.shape[0]} models on {images.shape[1]} images each",
          flush=True)
    variables, _ = train.train_many(plan.models[variant], images, masks, plan.train[variant],
                                    strategy=config.strategy)
    return variables, {}

  variables, _, restored = wd.train_or_restore(name, fit, seeds=config.seeds)
  if restored:
    print(f"[{name}] restored from {wd.path}/checkpoints/{name}", flush=True)
  return variables


def _translator_severities(plan, shift) -> list[int]:
  """The severities of ``shift`` the CycleGAN methods run at (none if the
  shift is not one of ``config.cyclegan.shifts``)."""
  if shift not in plan.cyclegan["shifts"]:
    return []
  return [v for v in plan.severities if v in plan.cyclegan["severities"]]


def _translations_file(wd, name: str) -> str:
  """Where the translations ``name`` are kept (read by every process)."""
  return os.path.join(wd.path, "translations", f"{name}.npz")


def _translations(wd, config, plan, method, shift, pairs):
  """float[P, n, H, W, C]: the shifted evaluation images of the (severity,
  seed) pairs of ``shift`` at the translators' severities, translated into the
  source style by that pair's target -> source generator. ``pairs``: the
  pairs' (severities, seeds, shifted evaluation images, their masks,
  shifted adaptation images, unlabelled source images, source evaluation
  images), as the cell computed them. The translators of a shift are trained
  together (one stack) and checkpointed; the translations and the
  translators' measures are kept in the workdir and shared by every
  variant."""
  name = f"cyclegan__{CYCLEGAN[method]}__{shift}"
  path = _translations_file(wd, name)
  if wd.read_result(name) is not None and os.path.isfile(path):
    return np.load(path)["images"]
  sevs, seeds, eval_x, eval_y, adapt_x, source_x, source_eval = pairs
  keys = jnp.stack([data.named_key(config.seed + int(seed), "cyclegan", shift, int(sev))
                    for sev, seed in zip(sevs, seeds)])
  cc = plan.cyclegan[method]
  print(f"[{name}] training {len(seeds)} translators ({cc.steps} steps each)", flush=True)
  translators, history = cyclegan.train_translators(
      keys, source_x, adapt_x, cc, strategy=config.strategy,
      workdir=os.path.join(wd.path, "checkpoints", name))
  generator = cc.generator(eval_x.shape[-1])
  out, rows = [], []
  per_translator = history["seconds"] / len(seeds)
  for p, (sev, seed) in enumerate(zip(sevs, seeds)):
    params = jax.tree_util.tree_map(lambda a: a[p], translators["to_source"])
    images = cyclegan.translate(generator, params, eval_x[p])
    board = cyclegan.checkerboard(images, eval_x[p])
    sharp = cyclegan.sharpness(images, source_eval[p])
    rows.append(dict(shift=shift, severity=int(sev), seed=int(seed),
                     up=cc.up, period2=board.period2, checkerboard_ratio=board.ratio,
                     spectral_l1=board.spectral_l1, sharpness_ratio=sharp.ratio,
                     edge_overlap=cyclegan.edge_overlap(images, eval_y[p]),
                     train_seconds=per_translator,
                     images_per_second=history["images_per_second"]))
    out.append(images)
  out = np.stack(out)
  np.savez(wd.file(f"translations/{name}.npz"), images=out)  # process 0's is the workdir's
  wd.write_result(name, {"rows": rows, "steps_run": history["steps_run"]})  # then a barrier
  return out


def _cell_methods(wd, config, plan, variant, sources, shift, severities):
  """Rows of every method on (shift, each severity) for every seed: the P =
  severities x seeds pairs of each method are one stacked call."""
  src_v, src_eval, src_adapt, src_train = sources
  model = plan.models[variant]
  s = config.seeds
  if shift is None:  # the source itself, severity 0
    eval_x, eval_y, adapt_x = src_eval[0], src_eval[1], src_adapt[0]
    severities = [0]
  else:
    parts = [_shifted(config, shift, sev, "eval", *src_eval) for sev in severities]
    eval_x = jnp.concatenate([p[0] for p in parts])
    eval_y = jnp.concatenate([p[1] for p in parts])
    adapt_x = jnp.concatenate([_shifted(config, shift, sev, "adapt", *src_adapt)[0]
                               for sev in severities])
  reps = len(severities)
  seed_of = np.tile(np.arange(s), reps)
  v = jax.tree_util.tree_map(lambda a: a[seed_of], src_v)
  has_bn = "batch_stats" in src_v
  run = [m for m in plan.methods if has_bn or m not in BN_METHODS]
  oracle = None
  if "oracle" in run:  # trained (or restored) first: a stack sharded like any training
    if shift is None:
      oracle = v
    else:
      stacks = []
      for sev in severities:
        tx, ty = _shifted(config, shift, sev, "train", *src_train)
        stacks.append(_train_stack(wd, config, plan, variant,
                                   f"oracle_{variant}_{shift}_{sev}", tx, ty))
      oracle = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *stacks)
  keys = jnp.stack([data.named_key(config.seed + int(seed_of[p]), "tent", shift,
                                   severities[p // s])
                    for p in range(len(seed_of))]) if "tent" in run else None

  def pairs(v, eval_x, eval_y, adapt_x, keys, reference, oracle):
    """Every method on this device's share of the pairs."""
    out = {}
    for method in run:
      if method == "none":
        out[method] = _scores(model, v, eval_x, eval_y, config.strategy)
      elif method in ("adabn", "adabn_prior"):
        prior = plan.adapt["prior"] if method == "adabn_prior" else None
        v_ad = adapt.recompute_batch_stats_stacked(model, v, adapt_x, mode="exact",
                                                   batch_size=plan.adapt["batch_size"],
                                                   prior=prior, strategy=config.strategy)
        out[method] = _scores(model, v_ad, eval_x, eval_y, config.strategy)
      elif method == "tent":
        adapted = methods.tent_stacked(model, v, adapt_x, keys=keys, steps=plan.tent["steps"],
                                       learning_rate=plan.tent["learning_rate"],
                                       batch_size=min(plan.tent["batch_size"], adapt_x.shape[1]),
                                       strategy=config.strategy)
        out[method] = _scores(model, adapted, eval_x, eval_y, config.strategy)
      elif method == "histogram_match":
        matched = methods.histogram_match_stacked(eval_x, reference)
        out[method] = _scores(model, v, matched, eval_y, config.strategy)
      elif method == "oracle":
        out[method] = _scores(model, oracle, eval_x, eval_y, config.strategy)
    return out  # the CycleGAN methods are scored after the split (their translators are
    # trained for a whole shift at once)

  # The pairs split over every process's devices, each computed once.
  out = distributed.map_pairs(pairs, v, eval_x, eval_y, adapt_x, keys, src_adapt[0][seed_of],
                              oracle, chunk=config.pair_chunk,
                              name=f"{variant} {shift or 'source'}")
  pairs_of = {m: range(len(seed_of)) for m in out}
  # Pixel-level translation: the source model on the translated images, at
  # the severities the translators were trained for.
  sevs = _translator_severities(plan, shift)
  translating = [m for m in run if m in CYCLEGAN and sevs]
  if translating:
    idx = np.asarray([p for p in range(len(seed_of)) if severities[p // s] in sevs])
    translated_pairs = ([severities[p // s] for p in idx], seed_of[idx], eval_x[idx],
                        eval_y[idx], adapt_x[idx], src_adapt[0][seed_of[idx]],
                        src_eval[0][seed_of[idx]])
  for method in translating:
    translated = _translations(wd, config, plan, method, shift, translated_pairs)
    iou, dice = _scores(model, jax.tree_util.tree_map(lambda a: a[idx], v), translated,
                        eval_y[idx], config.strategy)
    out[method] = (np.zeros(len(seed_of)), np.zeros(len(seed_of)))
    out[method][0][idx], out[method][1][idx] = iou, dice
    pairs_of[method] = idx
  family = "source" if shift is None else shifts.family_of(shift)
  return [dict(variant=variant, shift=shift or "source", family=family,
               severity=int(severities[p // s]), method=m, seed=int(seed_of[p]),
               iou=float(iou[p]), dice=float(dice[p]))
          for m in run if m in out for iou, dice in [out[m]] for p in pairs_of[m]]


def _run_variant(wd, config, plan, variant, bar, done):
  source = plan.source
  src_train = _source_sets(config, source, "train", config.data.n_train)
  src_v = _train_stack(wd, config, plan, variant, variant, *src_train)
  sources = (src_v, _source_sets(config, source, "eval", config.data.n_eval),
             _source_sets(config, source, "adapt", config.data.n_adapt), src_train)
  rows = []
  for shift in [None] + plan.shifts:
    name = f"{variant}__{shift or 'source'}"
    found = wd.read_result(name)
    if found is not None:
      rows += found["rows"]
      done += 1
      bar.update(done, f"{name} restored", restored=True)
      continue
    cell = _cell_methods(wd, config, plan, variant, sources, shift, plan.severities)
    wd.write_result(name, {"rows": cell})
    rows += cell
    done += 1
    bar.update(done, f"{name} scored")
  return rows, done


# --------------------------------------------------------------------------
# Tables, figures, findings


def _table(rows):
  """{(variant, shift, severity, method): float[seeds] of IoU} and of Dice."""
  iou, dice = {}, {}
  for r in rows:
    k = (r["variant"], r["shift"], r["severity"], r["method"])
    iou.setdefault(k, {})[r["seed"]] = r["iou"]
    dice.setdefault(k, {})[r["seed"]] = r["dice"]
  order = lambda d: {k: np.asarray([v[s] for s in sorted(v)]) for k, v in d.items()}
  return order(iou), order(dice)


def _fmt(values) -> str:
  mean, half = stats.t_interval(values)
  return f"{mean:.3f}" + (f" ± {half:.3f}" if np.isfinite(half) else "")


def _winner(iou, variant, shift, sev, ms) -> tuple[str, float]:
  """The best label-free method of a cell (the oracle is a reference, not a
  candidate) and its margin over the runner-up in mean IoU."""
  free = {m: float(iou[(variant, shift, sev, m)].mean()) for m in ms if m != "oracle"}
  best = max(free, key=free.get)
  return best, free[best] - max([x for m, x in free.items() if m != best], default=np.nan)


def _methods_of(iou, variant, plan):
  """The methods with rows for ``variant`` (the CycleGAN methods run on some
  shifts and severities only)."""
  have = {k[3] for k in iou if k[0] == variant}
  return [m for m in plan.methods if m in have]


def _cyclegan_report(wd, config, plan, iou) -> list[str]:
  """The translators' measures (``cyclegan.csv``/``.json``), a table of
  their means and of translation against AdaBN, and ``cyclegan_examples.png``."""
  ups = [m for m in plan.methods if m in CYCLEGAN]
  rows = [r for m in ups for shift in plan.shifts if _translator_severities(plan, shift)
          for r in (wd.read_result(f"cyclegan__{CYCLEGAN[m]}__{shift}") or {"rows": []})["rows"]]
  if not rows:
    return []
  wd.write_csv("cyclegan.csv", rows, CYCLEGAN_FIELDS, ".6g")
  wd.write_json("cyclegan.json", {"fields": list(CYCLEGAN_FIELDS), "rows": rows})
  cc = plan.cyclegan[ups[0]]
  lines = ["## Pixel-level translation (CycleGAN)", "",
           f"Translators trained per (shift, severity, seed): {cc.steps} steps of "
           f"{cc.batch_size} image(s) per domain, generators of width {cc.features} with "
           f"{cc.n_blocks} residual blocks, λ_cyc {cc.lambda_cycle:g}, λ_id "
           f"{cc.identity_weight:g}. Means over seeds. checkerboard: period-2 energy of the "
           "translations relative to the shifted inputs; spectral L1: of the log azimuthal "
           "spectra, translations vs inputs; sharpness: high-frequency energy of the "
           "translations relative to real source images; edges: share of the strongest "
           "edges on the mask outline (± 1 px); cost: training seconds per translator "
           "and target images seen per second.", "",
           "| shift | severity | generator | checkerboard | spectral L1 | sharpness | edges | "
           "train s | images/s |", "|---|---|---|---|---|---|---|---|---|"]
  groups = {}
  for r in rows:
    groups.setdefault((r["shift"], r["severity"], r["up"]), []).append(r)
  for (shift, sev, up), rs in groups.items():
    mean = lambda f: float(np.mean([r[f] for r in rs]))
    lines.append(f"| {shift} | {sev} | {up} | {mean('checkerboard_ratio'):.2f} | "
                 f"{mean('spectral_l1'):.3f} | {mean('sharpness_ratio'):.2f} | "
                 f"{mean('edge_overlap'):.2f} | {mean('train_seconds'):.1f} | "
                 f"{mean('images_per_second'):.0f} |")
  lines += ["", "Translation against AdaBN and no adaptation (mean IoU over seeds):", ""]
  for variant in plan.variants:
    cells = sorted({(k[1], k[2]) for k in iou if k[0] == variant and k[3] in ups})
    if not cells:
      continue
    lines += [f"- {variant}: " + "; ".join(
        f"{shift} {sev}: " + ", ".join(
            f"{m.removeprefix('cyclegan_')} {iou[(variant, shift, sev, m)].mean():.3f}"
            for m in ups if (variant, shift, sev, m) in iou)
        + (f" vs adabn {iou[(variant, shift, sev, 'adabn')].mean():.3f}"
           if (variant, shift, sev, "adabn") in iou else "")
        + f" (none {iou[(variant, shift, sev, 'none')].mean():.3f})"
        for shift, sev in cells)]
  lines.append("")
  _example_figure(wd, config, plan, ups)
  return lines


def _example_figure(wd, config, plan, ups):
  """Seed 0's first evaluation image at the highest translated severity of
  each translated shift: the source-domain image it was drawn as, the
  shifted (target) image and each generator's translation."""
  shifted = [sh for sh in plan.shifts if _translator_severities(plan, sh)
             and all(os.path.isfile(_translations_file(wd, f"cyclegan__{CYCLEGAN[m]}__{sh}"))
                     for m in ups)]
  if not shifted:
    return
  src_eval = _source_sets(config, plan.source, "eval", config.data.n_eval)
  grid, rows = [], []
  for sh in shifted:
    sevs = _translator_severities(plan, sh)
    sev = sevs[-1]
    x, _ = _shifted(config, sh, sev, "eval", src_eval[0][:1], src_eval[1][:1])
    p = (len(sevs) - 1) * config.seeds  # seed 0 of the highest severity
    row = [np.asarray(src_eval[0][0, 0]), np.asarray(x[0, 0])]
    row += [np.load(_translations_file(wd, f"cyclegan__{CYCLEGAN[m]}__{sh}"))["images"][p, 0]
            for m in ups]
    grid.append(row)
    rows.append(f"{sh} {sev}")
  plots.image_grid(grid, rows, ["source", "target (shifted)"]
                   + [f"{CYCLEGAN[m]} translation" for m in ups],
                   wd.file("cyclegan_examples.png"),
                   "CycleGAN translations of target images into the source style "
                   "(seed 0, first evaluation image)")


def report(wd, config, plan, rows) -> str:
  """Writes the tables and figures of ``rows``; returns the Markdown."""
  iou, dice = _table(rows)
  source = plan.source
  lines = [f"# Shift benchmark ({config.preset}): source {source}, {config.seeds} seeds, "
           f"{config.data.size}x{config.data.size}, width {config.model.features}", "",
           "IoU, mean ± half-width of the 95 % t-interval over seeds (per-image mean IoU on "
           f"{config.data.n_eval} held-out images per seed). Severity 0 is the source.", ""]
  lowered, winners_all = [], {}
  for variant in plan.variants:
    ms = _methods_of(iou, variant, plan)
    if not ms:
      continue
    lines += [f"## {variant}", "", "| shift | severity | " + " | ".join(ms) + " | winner |",
              "|---|---|" + "---|" * (len(ms) + 1)]
    cells = [("source", 0)] + [(s, v) for s in plan.shifts for v in plan.severities]
    curves, winners, margins = {}, [], []
    for shift, sev in cells:
      if (variant, shift, sev, "none") not in iou:
        continue
      here = [m for m in ms if (variant, shift, sev, m) in iou]
      means = {m: float(iou[(variant, shift, sev, m)].mean()) for m in here}
      best, margin = _winner(iou, variant, shift, sev, here)
      lines.append(f"| {shift} | {sev} | " + " | ".join(
          _fmt(iou[(variant, shift, sev, m)]) if m in here else "—" for m in ms)
          + f" | {best} |")
      for m in here:
        if m not in ("none", "oracle") and means[m] < means["none"]:
          diff = iou[(variant, shift, sev, m)] - iou[(variant, shift, sev, "none")]
          mean, half = stats.t_interval(diff)
          lowered.append((variant, shift, sev, m, mean, half))
      if shift != "source":
        winners_all[(variant, shift, sev)] = (best, margin)
    for shift in plan.shifts:
      curves[shift] = {}
      for m in ms:
        sev = [v for v in [0] + plan.severities
               if (variant, "source" if v == 0 else shift, v, m) in iou]
        if not sev:
          continue
        vals = [stats.t_interval(iou[(variant, "source" if v == 0 else shift, v, m)])
                for v in sev]
        curves[shift][m] = (sev, [a for a, _ in vals], [b for _, b in vals])
      cell = [winners_all[(variant, shift, v)] for v in plan.severities]
      winners.append([best for best, _ in cell])
      margins.append([margin for _, margin in cell])
    lines.append("")
    plots.severity_curves(curves, ms, wd.file(f"{variant}_severity.png"),
                          f"{variant} U-Net: IoU against severity (mean over "
                          f"{config.seeds} seeds)")
    # a method's mean over the severities it ran at (blank: none)
    heat = np.array([[np.mean([iou[(variant, s, v, m)].mean() for v in plan.severities
                               if (variant, s, v, m) in iou] or [np.nan])
                      for s in plan.shifts] for m in ms])
    plots.labelled_heatmap(heat, ms, plan.shifts, wd.file(f"{variant}_methods.png"),
                           f"{variant} U-Net: mean IoU over severities "
                           f"{','.join(map(str, plan.severities))}", corner="method \\ shift")
    plots.winner_grid(winners, np.asarray(margins), plan.shifts,
                      [f"severity {v}" for v in plan.severities],
                      [m for m in METHODS if m in ms and m != "oracle"],
                      wd.file(f"{variant}_winners.png"),
                      f"{variant} U-Net: best label-free method\n(+ margin over the runner-up)")
  lines += ["## Where a method lowers IoU below no adaptation", "",
            "Every cell whose mean IoU is below the unadapted model's; the paired "
            "difference (method - none) over seeds with its 95 % half-width "
            "(**bold**: the interval lies below 0).", ""]
  lines += [f"- {variant}, {shift} {sev}, {m}: {stats.difference_text(mean, half)}"
            for variant, shift, sev, m, mean, half in lowered] or ["None."]
  lines.append("")
  counts = {}
  for (variant, _, _), (best, _) in winners_all.items():
    counts.setdefault(variant, {}).setdefault(best, 0)
    counts[variant][best] += 1
  lines += ["## Wins per method (shift x severity cells)", ""]
  lines += [f"- {v}: " + ", ".join(f"{m} {n}" for m, n in sorted(c.items(), key=lambda t: -t[1]))
            for v, c in counts.items()]
  lines += _cyclegan_report(wd, config, plan, iou)
  wd.write_csv("benchmark.csv", rows, FIELDS, ".6f")
  wd.write_json("benchmark.json", {"fields": list(FIELDS), "rows": rows,
                                                "dice_mean": {"|".join(map(str, k)): float(v.mean())
                                                              for k, v in dice.items()}})
  text = "\n".join(lines) + "\n"
  wd.write_text("benchmark.md", text)
  return text


def run(config, workdir: str) -> list[dict]:
  """Runs the benchmark of ``config`` into ``workdir``; returns every row."""
  plan = plan_of(config)
  wd = Workdir.open(workdir, "benchmark", config)
  start = time.perf_counter()
  cells = len(plan.variants) * (1 + len(plan.shifts))
  print(f"benchmark ({config.preset}): {len(plan.variants)} variant(s) x {len(plan.shifts)} "
        f"shifts x severities {plan.severities} x methods {plan.methods} x {config.seeds} "
        f"seeds; devices {jax.devices()}", flush=True)
  bar = Progress(cells, "(variant, shift) cells")
  rows, done = [], 0
  for variant in plan.variants:
    variant_rows, done = _run_variant(wd, config, plan, variant, bar, done)
    rows += variant_rows
  text = report(wd, config, plan, rows)
  print("\n" + text + f"\n({time.perf_counter() - start:.0f} s this run)", flush=True)
  return rows


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "benchmark")
