r"""Adaptation on streams: which online method works at which batch size, in
which setting, and where each one ends below no adaptation.

    python experiments/streams.py --config=experiments/configs/streams.py --workdir=runs/streams

``config.seeds`` source U-Nets are trained on the source domain (model ``i``
on its own draw of the data, one stack). Streams are drawn from one pool of
held-out source images (shared by the seeds) with :func:`bnjax.streams.make`
in every setting and batch size, every stream ``config.stream_images`` long,
so that every setting of a batch size has the same number of steps. Each
online method runs every (seed, setting) pair of a batch size in one
compiled call (:func:`bnjax.streams.run_many`); its predictions are scored
as they are made: online IoU (per-image mean) over the stream, per block
(domain segment) and over time, and a collapse measure (the last quarter's
IoU minus the first's, and the fraction of images with foreground predicted
all background or all foreground). Beside them, on the smallest batch
size's streams, the original study's protocol (one pass at batch 1, a
PyTorch EMA with momentum 0.1, then the whole stream predicted) and exact
AdaBN on the same images (both offline: they see the stream before
predicting it).

Resumable: the source models are a checkpoint, each (method, batch size) a
result file. The workdir (:mod:`bnjax.workdir`) receives ``streams.csv`` and
``streams.json`` (every number; per-step IoU in the JSON), ``streams.md``
(means with 95 % t-intervals over seeds, the winner of each cell, every cell
where a method ends below ``source``, the collapse table),
``curves_b<B>.png`` (IoU over the stream, one panel per setting, one colour
per method, the blocks shaded) and ``methods_b<B>.png`` (setting x method
heatmap), each with its numbers beside it.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import (adapt, data, inference, metrics, models, plots, shifts, stacking, stats,
                   streams, train)
from bnjax import config as cfg
from bnjax.progress import Progress
from bnjax.cli import main
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "streams.py")
FIELDS = ("setting", "batch_size", "method", "seed", "iou", "iou_first_quarter",
          "iou_last_quarter", "collapse")
OFFLINE = ("offline_ema_b1", "offline_exact")  # the study's protocol and exact AdaBN


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config resolved and checked whole (:func:`plan_of`)."""

  settings: list
  batch_sizes: list
  methods: list
  source: data.Domain
  model: models.UNet
  train: train.TrainConfig
  options: dict           # method -> its options
  shifts: tuple
  gradual_shifts: tuple
  mixed_severities: tuple


def parse_setting(token: str) -> tuple[str, tuple | None, str]:
  """A setting of the config: ``<setting>[:<shift>[+<shift>...]][/<labels>]``
  -> (setting of :data:`bnjax.streams.SETTINGS` or ``"none"`` (the source's
  appearance), the shifts it streams (one for iid / episodic / correlated;
  any number, joined by ``+``, for continual, gradual and mixed; None: the
  config's ``one_shift``, ``shifts`` or ``gradual_shifts``), the label axis
  of :data:`bnjax.streams.LABELS`). ``"none/shift"`` is a pure label shift,
  ``"iid:gradient/drift"`` a gradient-texture shift with a label drift,
  ``"mixed/drift"`` mixed domains with a label drift,
  ``"continual:brightness+rotation/alternate"`` brightness, a label shift,
  rotation, a label shift."""
  rest, _, labels = token.partition("/")
  setting, _, shift = rest.partition(":")
  labels = labels or "iid"
  if setting not in (*streams.SETTINGS, "none"):
    raise cfg.ConfigError(f"config.settings: {token!r}: the setting must be one of "
                          f"{(*streams.SETTINGS, 'none')}")
  if labels not in streams.LABELS:
    raise cfg.ConfigError(f"config.settings: {token!r}: the labels must be one of "
                          f"{streams.LABELS}")
  names = tuple(shift.split("+")) if shift else None
  one = setting in ("iid", "episodic", "correlated")
  if names is not None and (setting == "none" or (one and len(names) > 1)
                            or any(n not in shifts.SHIFTS for n in names)):
    raise cfg.ConfigError(f"config.settings: {token!r}: ':<shift>' names one shift of "
                          f"{shifts.SHIFTS} for iid, episodic or correlated, and "
                          "'+'-joined shifts for continual, gradual or mixed")
  return setting, names, labels


def _shifts_of(plan, config, setting: str) -> tuple:
  """The shifts a setting token streams (its own, or the config's)."""
  kind, names, _ = parse_setting(setting)
  if names is not None:
    return names
  return {"continual": plan.shifts, "mixed": plan.shifts, "none": (),
          "gradual": plan.gradual_shifts}.get(kind, (config.one_shift,))


def _blocks(plan, config, setting: str) -> int:
  kind, _, labels = parse_setting(setting)
  names = _shifts_of(plan, config, setting)
  n = {"continual": len(names), "gradual": 9 * len(names)}.get(kind, 1)
  return 2 * n if labels == "alternate" else n


def plan_of(config) -> Plan:
  """Every value of ``config`` checked by the code that uses it, before
  anything is written or trained; a :class:`bnjax.config.ConfigError`
  naming the key otherwise."""
  cfg.positive_int(config.seeds, "seeds")
  cfg.positive_int(config.seed, "seed", minimum=0)
  settings = [t.strip() for t in str(config.settings).split(",") if t.strip()]
  if not settings:
    raise cfg.ConfigError("config.settings must name at least one setting")
  for token in settings:
    parse_setting(token)
  batch_sizes = cfg.ints(config.batch_sizes, 1, 4096, "batch_sizes")
  methods = cfg.names(config.methods, streams.METHODS, "methods")
  # The baseline every finding is measured against, first (the others'
  # agreement with it is recorded).
  methods = ["source"] + [m for m in methods if m != "source"]
  size = cfg.image_size(config.data.size)
  for name in ("n_train", "n_pool", "n_fisher"):
    cfg.positive_int(config.data[name], f"data.{name}")
  cfg.choice(config.one_shift, shifts.SHIFTS, "one_shift")
  cfg.choice(config.data.images, ("synthetic", "nuclei"), "data.images")
  cfg.value("severity", streams._severities, config.severity)
  plan = Plan(settings, batch_sizes, methods, cfg.domain(config.source, "source"),
              cfg.unet(config.model, image_size=size),
              cfg.train_config(config.train, n_images=config.data.n_train, seed=config.seed),
              {}, tuple(cfg.names(config.shifts, shifts.SHIFTS, "shifts")),
              tuple(cfg.names(config.gradual_shifts, shifts.SHIFTS, "gradual_shifts")),
              tuple(cfg.ints(config.mixed_severities, 1, 5, "mixed_severities")))
  if config.data.images == "nuclei":
    _check_nuclei(config, plan, size)
  n = cfg.positive_int(config.stream_images, "stream_images")
  for b in batch_sizes:
    if b > config.data.n_pool:
      raise cfg.ConfigError(f"config.batch_sizes: {b} exceeds config.data.n_pool "
                            f"({config.data.n_pool})")
    for s in settings:
      if n % (_blocks(plan, config, s) * b):
        raise cfg.ConfigError(
            f"config.stream_images ({n}) must be a multiple of {_blocks(plan, config, s)} "
            f"blocks x batch size {b} (setting {s!r})")
  given = config.method_options.to_dict() if hasattr(config.method_options, "to_dict") else dict(
      config.method_options)
  unknown = sorted(set(given) - set(streams.METHODS))
  if unknown:
    raise cfg.ConfigError(f"config.method_options.{unknown[0]} is not a method of "
                          f"{streams.METHODS}")
  for m in methods:
    opts = dict(given.get(m, {}))
    if m == "eata":
      opts.setdefault("fisher_batch_size", min(8, config.data.n_fisher))
      extra = {"source_images": np.zeros((opts["fisher_batch_size"], size, size, 1), np.float32)}
    else:
      extra = {}
    cfg.value(f"method_options.{m}", streams.online, plan.model, m, **opts, **extra)
    plan.options[m] = opts
  return plan


def _check_nuclei(config, plan, size: int):
  """The real image set is installed, holds the tiles asked for, and keeps
  its own masks and pixels (no label axis or shift that draws new masks)."""
  for name, split in (("n_train", "train"), ("n_pool", "eval"), ("n_fisher", "adapt")):
    try:
      have = len(_nuclei_tiles(config, split)[0])
    except (ImportError, ValueError) as e:  # not installed, unreadable, tiles too large
      raise cfg.ConfigError(f"config.data.images='nuclei' (data.size {size}): {e}") from None
    if config.data[name] > have:
      raise cfg.ConfigError(f"config.data.{name} ({config.data[name]}) exceeds the {have} tiles "
                            f"of {size} pixels the nuclei image's {split} rows give")
  for token in plan.settings:
    labels = parse_setting(token)[2]
    if labels not in ("iid", "sorted"):
      raise cfg.ConfigError(f"config.settings: {token!r}: the nuclei image keeps its own masks "
                            f"(labels 'iid' or 'sorted'); labels {labels!r} draw synthetic ones")
    drawn = sorted(set(_shifts_of(plan, config, token)) & set(shifts.FAMILIES["shape"]))
    if drawn:
      raise cfg.ConfigError(f"config.settings: {token!r} streams {drawn}, which draw synthetic "
                            "masks and images: leave the shape family out of config.shifts, "
                            "one_shift and gradual_shifts with data.images='nuclei'")


# --------------------------------------------------------------------------
# Data, models, streams


def _nuclei_tiles(config, split: str):
  """The tiles of ``split``: training tiles (and the unlabelled source
  images, ``"adapt"``) from the nuclei image's top half, the streams' pool
  from its bottom half (no pixel shared); training tiles overlap more
  (stride size/4, the others size/2)."""
  size = config.data.size
  image, mask = data.nuclei(config.data.nuclei_folder or None)
  half = image.shape[0] // 2
  rows = (half, image.shape[0]) if split == "eval" else (0, half)
  stride = size // 4 if split == "train" else size // 2
  return data.tiles(image, mask, size, max(stride, 1), rows=rows)[:2]


def _pool(config, plan, split: str, n: int, seed: int = 0):
  """``n`` labelled source images of ``split`` for seed ``seed``: the
  synthetic source domain's, or ``n`` tiles of the nuclei image's rows of
  that split drawn without replacement."""
  if config.data.images == "synthetic":
    return data.split_dataset(config.seed + seed, plan.source, split, n, config.data.size)
  x, y = _nuclei_tiles(config, split)
  key = data.named_key(config.seed + seed, "nuclei", split)
  pick = np.asarray(jax.random.permutation(key, len(x)))[:n]
  return jnp.asarray(x[pick]), jnp.asarray(y[pick])


def _train_models(wd, config, plan):
  def fit():
    sets = [_pool(config, plan, "train", config.data.n_train, i) for i in range(config.seeds)]
    print(f"[source_models] training {config.seeds} models on {config.data.n_train} images "
          "each", flush=True)
    v, _ = train.train_many(plan.model, jnp.stack([s[0] for s in sets]),
                            jnp.stack([s[1] for s in sets]), plan.train,
                            strategy=config.strategy)
    return v, {}

  v, _, restored = wd.train_or_restore("source_models", fit, seeds=config.seeds)
  if restored:
    print(f"[source_models] restored from {wd.path}/checkpoints/source_models", flush=True)
  return v


def _stream(config, plan, setting: str, b: int, pool) -> streams.Stream:
  """The stream of ``setting`` (a :func:`parse_setting` token) at batch size
  ``b``, from the shared pool."""
  n = config.stream_images
  kind, _, labels = parse_setting(setting)
  severity = plan.mixed_severities if kind == "mixed" else (
      5 if kind == "gradual" else config.severity)
  return streams.make(data.named_key(config.seed, "stream", setting, b), *pool,
                      setting="iid" if kind == "none" else kind, batch_size=b,
                      shifts=_shifts_of(plan, config, setting), severity=severity,
                      labels=labels, block_steps=n // (_blocks(plan, config, setting) * b))


# --------------------------------------------------------------------------
# Scores


def score(pred, stream: streams.Stream) -> dict:
  """Online scores of predictions ``pred`` bool[K, T, B, H, W] (K seeds) on
  ``stream``: per seed the IoU over the stream, per block and per step, the
  first and last quarter's IoU and the collapse fraction (images whose mask
  is not empty predicted all background or all foreground)."""
  pred = np.asarray(pred, bool)
  truth = np.asarray(stream.masks, bool)
  k, t, b = pred.shape[:3]
  flat = pred.reshape((-1,) + pred.shape[3:])
  per_image = np.asarray(metrics.iou_per_image(flat, np.broadcast_to(
      truth, pred.shape).reshape(flat.shape))).reshape(k, t, b)
  per_step = per_image.mean(2)
  q = max(1, t // 4)
  fg = pred.mean((3, 4))
  nonempty = truth.any((2, 3))[None]
  degenerate = ((fg == 0) | (fg == 1)) & nonempty
  blocks = np.unique(stream.block)
  return {"iou": per_image.mean((1, 2)), "per_step": per_step,
          "per_block": np.stack([per_step[:, stream.block == i].mean(1) for i in blocks], 1),
          "iou_first_quarter": per_step[:, :q].mean(1),
          "iou_last_quarter": per_step[:, -q:].mean(1),
          "collapse": degenerate.sum((1, 2)) / max(int(nonempty.sum()), 1)}


def _rows(setting, b, method, s) -> list[dict]:
  return [dict(setting=setting, batch_size=b, method=method, seed=i, iou=float(s["iou"][i]),
               iou_first_quarter=float(s["iou_first_quarter"][i]),
               iou_last_quarter=float(s["iou_last_quarter"][i]),
               collapse=float(s["collapse"][i])) for i in range(len(s["iou"]))]


def _step_families(stream: streams.Stream) -> list[str]:
  """The shift family of each step's batch ("mixed" where its images differ)."""
  if not stream.shifts:  # the source's appearance
    return ["none"] * stream.steps
  names = np.asarray(stream.shifts)[stream.shift]
  fam = np.vectorize(shifts.family_of)(names)
  return [f[0] if (f == f[0]).all() else "mixed" for f in fam]


def _block_labels(stream: streams.Stream) -> list[str]:
  """Each block's shift and severity (where its images differ: how many
shifts, at which severities)."""
  out = []
  for i in np.unique(stream.block):
    steps = stream.block == i
    s, v = np.unique(stream.shift[steps]), np.unique(stream.severity[steps])
    if len(s) == 1 and s[0] < 0:
      out.append("source appearance")
    elif len(s) == 1 and len(v) == 1:
      out.append(f"{stream.shifts[s[0]]} {v[0]}")
    else:
      levels = f"{v[0]}" if len(v) == 1 else f"{v[0]}-{v[-1]}"
      out.append(f"each image one of {len(s)} shifts, severity {levels}")
  return out


def agreement(a, b) -> np.ndarray:
  """float[K, T]: per step the IoU of two mask sets [K, T, B, H, W] over the
  batch's pixels (1 where both are empty): what ``gated`` compares."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  inter, union = (a & b).sum((2, 3, 4)), (a | b).sum((2, 3, 4))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _cell(config, plan, variables, pool, fisher_images, method, b, source_masks):
  """Rows and curves of ``method`` at batch size ``b``: every (seed, setting)
  stream in one compiled call; per step and seed its IoU and its agreement
  with the source model's masks (``source_masks()``: [K, settings, T, B, H,
  W], the same streams), for the gate analysis. Returns (rows, curves,
  masks)."""
  stream_list = [_stream(config, plan, s, b, pool) for s in plan.settings]
  opts = dict(plan.options[method])
  if method == "eata":
    opts["source_images"] = fisher_images
  out = streams.run_many(plan.model, variables, stream_list, method, strategy=config.strategy,
                         **opts)
  src = out.masks if method == "source" else source_masks()
  rows, curves = [], {}
  for m, (setting, stream) in enumerate(zip(plan.settings, stream_list)):
    s = score(out.masks[:, m], stream)
    rows += _rows(setting, b, method, s)
    curves[setting] = {"per_step": s["per_step"].mean(0).tolist(),
                       "per_step_seed": s["per_step"].tolist(),
                       "agreement": agreement(out.masks[:, m], src[:, m]).tolist(),
                       "per_block": s["per_block"].mean(0).tolist(),
                       "block": stream.block.tolist(), "family": _step_families(stream),
                       "block_labels": _block_labels(stream)}
  return rows, curves, out.masks


def _offline(config, plan, variables, pool):
  """The study's protocol (batch 1, EMA momentum 0.1) and exact AdaBN, each
  on the whole stream of the smallest batch size before predicting it."""
  b = min(plan.batch_sizes)
  rows = []
  for setting in plan.settings:
    stream = _stream(config, plan, setting, b, pool)
    images = jnp.asarray(stream.images).reshape((-1,) + stream.images.shape[2:])
    k = config.seeds
    stacked_images = jnp.broadcast_to(images, (k,) + images.shape)
    for name, options in (("offline_ema_b1", dict(mode="ema", batch_size=1, momentum=0.1)),
                          ("offline_exact", dict(mode="exact"))):
      v = adapt.recompute_batch_stats_stacked(plan.model, variables, stacked_images,
                                              strategy=config.strategy, **options)
      pred = inference.stacked_predict(plan.model, v, stacked_images, strategy=config.strategy)
      rows += _rows(setting, b, name, score(pred.reshape((k,) + stream.masks.shape), stream))
  return rows


# --------------------------------------------------------------------------
# The gate: which threshold, chosen on held-out shift families

THRESHOLDS = tuple(float(t) for t in np.round(np.linspace(0.0, 1.0, 21), 2))


def gate_analysis(plan, curves) -> dict:
  """For every adapting method and batch size, the gate ``gated`` applies
  to it, replayed on every step of every setting and seed: the method's
  prediction where its agreement with the source's is below a threshold,
  the source's elsewhere. The threshold is chosen on the steps of all
  shift families but one and scored on the held-out family's (leave one
  family out; a tie goes to the lower threshold, i.e. to the source);
  ``threshold`` is the choice on every step. Mean online IoU over steps of
  the held-out gate, of the source, of the method, and of the better of the
  two on every step (a bound no label-free gate reaches)."""
  out = {}
  for b in plan.batch_sizes:
    for m in plan.methods:
      if m in ("source", "gated"):
        continue
      agree, iou_m, iou_s, fam = [], [], [], []
      for setting in plan.settings:
        c, cs = curves[(m, b)][setting], curves[("source", b)][setting]
        a = np.asarray(c["agreement"], float)
        agree.append(a.ravel())
        iou_m.append(np.asarray(c["per_step_seed"], float).ravel())
        iou_s.append(np.asarray(cs["per_step_seed"], float).ravel())
        fam.append(np.broadcast_to(np.asarray(c["family"]), a.shape).ravel())
      agree, iou_m, iou_s, fam = (np.concatenate(x) for x in (agree, iou_m, iou_s, fam))
      gate = np.where(agree[None] < np.asarray(THRESHOLDS)[:, None], iou_m[None], iou_s[None])
      best = lambda keep: THRESHOLDS[int(np.argmax(gate[:, keep].mean(1)))]
      held = np.empty_like(iou_s)
      per_family = {}
      for f in sorted(set(fam)):
        test = fam == f
        t = best(~test) if (~test).any() else best(test)
        per_family[f] = t
        held[test] = gate[THRESHOLDS.index(t), test]
      out[(m, b)] = {"threshold": best(np.ones_like(fam, bool)), "per_family": per_family,
                     "heldout_iou": float(held.mean()), "source": float(iou_s.mean()),
                     "method": float(iou_m.mean()),
                     "best_per_step": float(np.maximum(iou_m, iou_s).mean()),
                     "steps": int(len(fam))}
  return out


# --------------------------------------------------------------------------
# Report


def _table(rows):
  out = {}
  for r in rows:
    out.setdefault((r["setting"], r["batch_size"], r["method"]), {})[r["seed"]] = r
  return out


def _values(cell, key="iou"):
  return np.array([cell[s][key] for s in sorted(cell)])


def _fmt(values) -> str:
  mean, half = stats.t_interval(values)
  return f"{mean:.3f}" + (f" ± {half:.3f}" if np.isfinite(half) else "")


def _label_groups(plan) -> dict:
  """The settings by what changes: ``label``, the class balance alone (the
  source's appearance, a label axis other than iid); ``appearance``, an
  appearance shift (with or without a label change)."""
  out = {"label": [], "appearance": []}
  for token in plan.settings:
    kind, _, labels = parse_setting(token)
    if kind == "none" and labels != "iid":
      out["label"].append(token)
    elif kind != "none":
      out["appearance"].append(token)
  return out


def label_shift_summary(wd, plan, table, seeds: int) -> list[str]:
  """What each method keeps of the source's IoU where only the class balance
  changes, and what it gains where the appearance changes (IoU - source,
  mean over seeds and over the settings of each group): a table for the
  report, ``labels.png`` (one panel per batch size, one colour per method)
  and ``labels.json``. Nothing when the settings lack either group."""
  groups = _label_groups(plan)
  if not groups["label"] or not groups["appearance"]:
    return []
  methods = [m for m in plan.methods if m != "source"]
  diff = lambda setting, b, m: float((_values(table[(setting, b, m)])
                                      - _values(table[(setting, b, "source")])).mean())
  numbers = {}
  for b in plan.batch_sizes:
    for m in methods:
      numbers[f"{m}|{b}"] = {
          "label_kept": float(np.mean([diff(s, b, m) for s in groups["label"]])),
          "appearance_gain": float(np.mean([diff(s, b, m) for s in groups["appearance"]])),
          "per_setting": {s: diff(s, b, m) for s in plan.settings}}
  lines = ["", "## Label shift: kept and gained", "",
           f"IoU - source, mean over {seeds} seeds and the settings of each group: where the "
           f"class balance alone changes ({', '.join(groups['label'])}; 0 keeps all of the "
           f"source's IoU) and where the appearance changes "
           f"({', '.join(groups['appearance'])}). `labels.png` draws it.", "",
           "| batch | method | label shift alone | appearance shift |", "|---|---|---|---|"]
  for b in plan.batch_sizes:
    for m in methods:
      n = numbers[f"{m}|{b}"]
      lines.append(f"| {b} | {m} | {n['label_kept']:+.3f} | {n['appearance_gain']:+.3f} |")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  colour = {m: colours[plan.methods.index(m) % len(colours)] for m in methods}
  marker = {m: "osD^vPX*<>"[i % 10] for i, m in enumerate(methods)}  # coincident points stay seen
  k = len(plan.batch_sizes)
  fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.9), squeeze=False, sharex=True,
                           sharey=True)
  for ax, b in zip(axes[0], plan.batch_sizes):
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    for m in methods:
      n = numbers[f"{m}|{b}"]
      ax.scatter(n["label_kept"], n["appearance_gain"], color=colour[m], marker=marker[m], s=44,
                 alpha=0.8, label=m, zorder=3)
    ax.set_title(f"batch size {b}", fontsize=9)
    ax.set_xlabel("IoU − source, class balance alone\n(0: keeps the source)", fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("IoU − source, appearance shift", fontsize=8)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
  fig.suptitle(f"Label shift against appearance shift: what each method keeps and gains "
               f"(mean over {seeds} seeds; up and right is better)", fontsize=9)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(wd.file("labels.png"), dpi=110)
  plt.close(fig)
  wd.write_json("labels.json", {"groups": groups, "by_method_and_batch": numbers})
  return lines


def report(wd, config, plan, rows, curves) -> str:
  table = _table(rows)
  methods = plan.methods
  source = (f"source {plan.source}" if config.data.images == "synthetic" else
            "source: tiles of the nuclei image (training: its top half, streams: its bottom "
            "half)")
  lines = [f"# Streams ({config.preset}): {source}, {config.seeds} seeds, "
           f"{config.data.size}x{config.data.size}, width {config.model.features}, "
           f"{config.stream_images} images per stream", "",
           "Online IoU (per-image mean over the stream, each batch predicted as it arrives), "
           "mean ± half-width of the 95 % t-interval over seeds. Offline references (they see "
           "the whole stream first), on the smallest batch size's streams: the study's protocol "
           "(batch 1, EMA momentum 0.1) and exact AdaBN.", ""]
  below, collapse = [], []
  for b in plan.batch_sizes:
    cols = methods + (list(OFFLINE) if b == min(plan.batch_sizes) else [])
    lines += [f"## Batch size {b}", "", "| setting | " + " | ".join(cols) + " | best online |",
              "|---|" + "---|" * (len(cols) + 1)]
    heat = []
    for setting in plan.settings:
      means = {m: float(_values(table[(setting, b, m)]).mean()) for m in methods}
      best = max(means, key=means.get)
      lines.append(f"| {setting} | " + " | ".join(
          _fmt(_values(table[(setting, b, m)])) for m in cols) + f" | {best} |")
      heat.append([means[m] for m in methods])
      for m in methods[1:]:
        diff = _values(table[(setting, b, m)]) - _values(table[(setting, b, "source")])
        if diff.mean() < 0:
          mean, half = stats.t_interval(diff)
          below.append((b, setting, m, mean, half))
      for m in methods:
        cell = table[(setting, b, m)]
        drift = _values(cell, "iou_last_quarter") - _values(cell, "iou_first_quarter")
        collapse.append((b, setting, m, float(_values(cell, "collapse").mean()),
                         float(drift.mean())))
    lines.append("")
    plots.labelled_heatmap(np.array(heat).T, methods, plan.settings,
                           wd.file(f"methods_b{b}.png"),
                           f"Online IoU at batch size {b} (mean over {config.seeds} seeds)",
                           corner="method \\ setting")
    panels = {s: {m: np.asarray(curves[(m, b)][s]["per_step"]) for m in methods}
              for s in plan.settings}
    blocks = {s: np.asarray(curves[(methods[0], b)][s]["block"]) for s in plan.settings}
    plots.stream_curves(panels, methods, blocks, b, wd.file(f"curves_b{b}.png"),
                        f"Online IoU over the stream at batch size {b} (mean over "
                        f"{config.seeds} seeds; a moving average)",
                        labels={s: curves[(methods[0], b)][s].get("block_labels")
                                for s in plan.settings})
  lines += ["## Where a method ends below `source`", "",
            "Every (batch size, setting, method) whose mean online IoU is below no adaptation's; "
            "the paired difference over seeds with its 95 % half-width (**bold**: the "
            "interval lies below 0).", ""]
  lines += [f"- batch {b}, {setting}, {m}: {stats.difference_text(mean, half)}"
            for b, setting, m, mean, half in below] or ["None."]
  gates = gate_analysis(plan, curves)
  lines += ["", "## The gate, replayed on every step", "",
            "For each adapting method: use its prediction where its agreement with the source's "
            "(IoU of the two masks over the batch) is below a threshold, the source's elsewhere "
            "(what `gated` does with `inner` = the method). Threshold chosen on all shift families "
            "but one, scored on the held-out one; mean online IoU over every step, setting and "
            "seed. *best per step*: the better of the two on every step (no label-free gate "
            "reaches it).", "",
            "| batch | method | threshold (all) | held-out gate | source | method | best per step |",
            "|---|---|---|---|---|---|---|"]
  for (m, b), g in gates.items():
    lines.append(f"| {b} | {m} | {g['threshold']:.2f} | {g['heldout_iou']:.3f} | "
                 f"{g['source']:.3f} | {g['method']:.3f} | {g['best_per_step']:.3f} |")
  if "gated" in methods:
    gate = dict(streams.online(plan.model, "gated", **plan.options["gated"]).options)
    lines += ["", f"The goal for `gated` (signal {gate['signal']}, threshold "
              f"{gate['threshold']:g}, inner {gate['inner']}): never more than 0.02 below "
              "`source`, and within 0.02 of the best method in `iid` and `continual`.", "",
              "| batch | setting | gated - source | gated - best | best | met |", "|---|---|---|---|---|---|"]
    for b in plan.batch_sizes:
      for setting in plan.settings:
        means = {m: float(_values(table[(setting, b, m)]).mean()) for m in methods}
        best_m = max((m for m in methods if m != "gated"), key=means.get)
        d_src, d_best = means["gated"] - means["source"], means["gated"] - means[best_m]
        met = d_src >= -0.02 and (setting not in ("iid", "continual") or d_best >= -0.02)
        lines.append(f"| {b} | {setting} | {d_src:+.3f} | {d_best:+.3f} | {best_m} | "
                     f"{'yes' if met else '**no**'} |")
  lines += label_shift_summary(wd, plan, table, config.seeds)
  lines += ["", "## Collapse", "", "Fraction of images with foreground predicted all "
            "background or all foreground, and the last quarter's IoU minus the first "
            "quarter's (mean over seeds).", "",
            "| batch | setting | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
  by = {(b, s, m): (c, d) for b, s, m, c, d in collapse}
  for b in plan.batch_sizes:
    for s in plan.settings:
      lines.append(f"| {b} | {s} | " + " | ".join(
          f"{by[(b, s, m)][0]:.2f} / {by[(b, s, m)][1]:+.2f}" for m in methods) + " |")
  text = "\n".join(lines) + "\n"
  wd.write_text("streams.md", text)
  wd.write_csv("streams.csv", rows, FIELDS, ".6f")
  wd.write_json("streams.json", {
      "fields": list(FIELDS), "rows": rows,
      "curves": {f"{m}|{b}": c for (m, b), c in curves.items()},
      "gate": {f"{m}|{b}": g for (m, b), g in gates.items()}})
  return text


def run(config, workdir: str) -> list[dict]:
  """Runs the experiment of ``config`` into ``workdir``; returns every row."""
  plan = plan_of(config)
  wd = Workdir.open(workdir, "streams", config)
  start = time.perf_counter()
  print(f"streams ({config.preset}): settings {plan.settings} x batch sizes "
        f"{plan.batch_sizes} x methods {plan.methods} x {config.seeds} seeds; "
        f"devices {jax.devices()}", flush=True)
  variables = _train_models(wd, config, plan)
  pool = _pool(config, plan, "eval", config.data.n_pool)  # held-out source images
  fisher_images = _pool(config, plan, "adapt", config.data.n_fisher)[0]  # unlabelled, EATA
  # The class statistics every model keeps beside its variables (balanced, gated),
  # measured on the same unlabelled source images.
  variables = stacking.tree_stack([
      adapt.add_class_stats(plan.model, stacking.tree_index(variables, i), fisher_images)
      for i in range(config.seeds)])
  cells = [(m, b) for b in plan.batch_sizes for m in plan.methods]  # source first per size
  bar = Progress(len(cells) + 1, "(method, batch size) cells")
  rows, curves, source_masks = [], {}, {}

  def masks_of_source(b):
    if b not in source_masks:  # after a restore: the source model's masks again (no adaptation)
      source_masks[b] = _cell(config, plan, variables, pool, None, "source", b, None)[2]
    return source_masks[b]

  for i, (method, b) in enumerate(cells, start=1):
    name = f"{method}__b{b}"
    found = wd.read_result(name)
    if found is None:
      cell_rows, cell_curves, masks = _cell(config, plan, variables, pool, fisher_images, method,
                                            b, lambda b=b: masks_of_source(b))
      if method == "source":
        source_masks[b] = masks
      wd.write_result(name, {"rows": cell_rows, "curves": cell_curves})
      bar.update(i, f"{name} scored")
    else:
      cell_rows, cell_curves = found["rows"], found["curves"]
      bar.update(i, f"{name} restored", restored=True)
    rows += cell_rows
    curves[(method, b)] = cell_curves
  found = wd.read_result("offline")
  if found is None:
    found = {"rows": _offline(config, plan, variables, pool)}
    wd.write_result("offline", found)
  rows += found["rows"]
  bar.update(len(cells) + 1, "offline references")
  text = report(wd, config, plan, rows, curves)
  print("\n" + text + f"\n({time.perf_counter() - start:.0f} s this run)", flush=True)
  return rows


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "streams")
