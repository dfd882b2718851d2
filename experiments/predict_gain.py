r"""Does a distance between latent distributions predict the gain of BN adaptation?

    python experiments/predict_gain.py --config=experiments/configs/predict_gain.py --config.sweep_dir=runs/brightness --workdir=runs/brightness/gain

(after a sweep into ``runs/brightness``; the config file gives the expected
runtime and result).

For every (source, target) pair a sweep scored, this computes distances
between the source model's features on source data and, at every tap, the
target features of the unadapted and of the adapted model (Fréchet, sliced
W2, Gaussian Bhattacharyya, MMD, Sinkhorn), plus feature-free predictors from
BatchNorm statistics (source vs adapted: diagonal W2 and Bhattacharyya, summed
over layers) and the intensity overlap of the target domain. It relates each
to the gain (IoU adapted - IoU unadapted) and to IoU adapted: Pearson and
Spearman with bootstrap 95 % intervals, a ranking table, scatter figures
(x = log(1 + distance), y = IoU adapted, colour = target overlap), and a
held-out test: an isotonic (monotone) fit of IoU adapted on log(1 + distance)
over a random half of the sources, scored (Spearman, mean absolute error) on
the pairs of the other sources.

Writes ``distances.csv`` (every pair, every predictor), ``ranking.md``,
``results/ranking.json``, ``results/heldout.json``, ``scatter_*.png``,
``results/collapse.json`` (per source and tap:
the fraction of per-image feature dimensions constant across images) and
``histograms_*.png`` (channels of one tap: source features, target features
unadapted and adapted, for the pair with the largest gain and the pair with
the lowest adapted IoU) into the workdir (:mod:`bnjax.workdir`).
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import numpy as np

from bnjax import adapt, data, distances, features, models, plots
from bnjax import config as cfg
from bnjax.progress import Progress
from bnjax.stats import bootstrap_ci, isotonic_fit, pearson, spearman
from bnjax.cli import main
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "predict_gain.py")

FEATURE_DISTANCES = ("frechet", "sliced_w2", "bhattacharyya", "mmd", "sinkhorn")


# --------------------------------------------------------------------------
# Data of the sweep


def load_sweep(sweep_dir):
  """(config, domains, stacked variables, {group: results}) of a sweep workdir,
  as its ``results/models.json`` lists them."""
  wd = Workdir.read(sweep_dir, "sweep")
  index = wd.read_result("models")
  if index is None:
    raise ValueError(f"{wd.path}/results/models.json is missing: the sweep did not finish "
                     "training; rerun it with the same config")
  chunks = []
  for name in index["checkpoints"]:
    found = wd.load_model(name)
    if found is None:
      raise ValueError(f"{wd.path}/checkpoints/{name} is missing or incomplete")
    chunks.append(found[0])
  stacked = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *chunks)
  results = {}
  for name in index["groups"]:
    results[name] = wd.read_result(name)
    if results[name] is None:
      raise ValueError(f"{wd.path}/results/{name}.json is missing: the sweep did not finish "
                       "scoring; rerun it with the same config")
  return wd.config, [data.Domain.from_json(d) for d in index["domains"]], stacked, results


class Plan(NamedTuple):
  """What ``config`` and the sweep it reads resolve to, checked once."""
  sweep_dir: str
  seed: int                  # the sweep's data seed
  size: int                  # image side
  n_eval: int
  n_adapt: int
  transductive: bool         # adapt on the evaluation images
  adapt_options: dict        # bnjax.adapt.recompute_batch_stats options of the sweep
  model: models.UNet
  taps: tuple


def plan_of(config) -> Plan:
  """The :class:`Plan` of ``config``, every value checked before anything is
  read at length or written; a :class:`bnjax.config.ConfigError` naming the
  key otherwise."""
  if not config.sweep_dir:
    raise cfg.ConfigError("config.sweep_dir must name the workdir of experiments/sweep.py")
  sweep = cfg.value("sweep_dir", Workdir.read, config.sweep_dir, "sweep").config
  for name in ("max_rows", "sinkhorn_points", "bootstrap"):
    cfg.positive_int(config[name], name)
  cfg.positive_int(config.seed, "seed", minimum=0)
  size = sweep["data"]["size"]
  model = models.UNet(**sweep["model"])
  taps = cfg.taps(config.taps, model, size)
  if config.hist_tap not in taps:
    raise cfg.ConfigError(f"config.hist_tap must be one of the taps used, {tuple(taps)}, got "
                          f"{config.hist_tap!r}")
  return Plan(config.sweep_dir, sweep["seed"], size, sweep["data"]["n_eval"],
              sweep["data"]["n_adapt"], sweep["adapt"]["transductive"],
              {"mode": sweep["adapt"]["mode"], "batch_size": sweep["adapt"]["batch_size"]},
              model, tuple(taps))


def layer_sum(d: dict) -> float:
  return float(sum(d.values()))


def run(config, workdir: str) -> list[dict]:
  """Relates every predictor to the gains of the sweep in ``config.sweep_dir``;
  writes into ``workdir``; returns the ranking."""
  start = time.perf_counter()
  plan = plan_of(config)
  _, domains, stacked, results = load_sweep(plan.sweep_dir)
  wd = Workdir.open(workdir, "predict_gain", config)
  pairs = Pairs(plan, domains, stacked)
  rows, row_domains, collapse = measure(config, plan, pairs, results)
  wd.write_csv("distances.csv", rows, list(rows[0]), float_format=None)
  analysis = analyse(config, rows)
  wd.write_result("ranking", analysis["ranking"])
  wd.write_result("heldout", {"train_sources": analysis["train_sources"],
                              "results": analysis["heldout"]})
  wd.write_result("collapse", collapse)
  text = report(wd, config, plan, pairs, rows, row_domains, collapse, analysis,
                time.perf_counter() - start)
  print(text)
  return analysis["ranking"]


class Pairs:
  """The sweep's source models and the images of a (source, target) pair."""

  def __init__(self, plan: Plan, domains, stacked):
    self.plan, self.stacked = plan, stacked
    self.position = {d: i for i, d in enumerate(domains)}
    self.source_features = {}  # source domain -> {tap: features of its evaluation images}

  def dataset(self, d, split, n):
    return data.split_dataset(self.plan.seed, d, split, n, self.plan.size)

  def models(self, src, tgt):
    """(source variables, adapted variables, target evaluation images)."""
    p = self.plan
    v_src = jax.tree_util.tree_map(lambda a: a[self.position[src]], self.stacked)
    x_tgt, _ = self.dataset(tgt, "eval", p.n_eval)
    x_adapt = x_tgt if p.transductive else self.dataset(tgt, "adapt", p.n_adapt)[0]
    return v_src, adapt.recompute_batch_stats(p.model, v_src, x_adapt, **p.adapt_options), x_tgt


def measure(config, plan: Plan, pairs: Pairs, results):
  """(rows, their (source, target) domains, collapse): every predictor of
  every pair the sweep scored."""
  model, taps = plan.model, list(plan.taps)
  key = jax.random.key(config.seed)
  todo = [(g, data.Domain.from_json(res["sources"][k]), data.Domain.from_json(res["targets"][m]),
           k, m)
          for g, res in results.items()
          for k in range(len(res["sources"])) for m in range(len(res["targets"]))]
  bar = Progress(len(todo), "pairs")
  rows, row_domains, collapse = [], [], {}
  source_cache = pairs.source_features
  for i, (group, src, tgt, k, m) in enumerate(todo):
    res = results[group]
    v_src, v_ad, x_tgt = pairs.models(src, tgt)
    if src not in source_cache:
      x_src, _ = pairs.dataset(src, "eval", plan.n_eval)
      source_cache[src] = features.extract_all(model, v_src, x_src, taps)
      # Rows are (image, position): [n h w, C] reshaped is the per-image [n, h w C].
      collapse[str(src)] = {t: features.collapse_fraction(f.reshape(len(x_src), -1))
                            for t, f in source_cache[src].items()}
    target_features = {variant: features.extract_all(model, v, x_tgt, taps)
                       for variant, v in (("unadapted", v_src), ("adapted", v_ad))}
    row = {"group": group, "source": str(src), "target": str(tgt),
           "iou_no_adapt": res["iou_no_adapt"][k][m], "iou_adapted": res["iou_adapted"][k][m],
           "overlap": distances.overlap_coefficient(tgt.mu1, tgt.sigma1, tgt.mu2, tgt.sigma2),
           "source_overlap": distances.overlap_coefficient(src.mu1, src.sigma1, src.mu2, src.sigma2),
           "bn_diag_w2": layer_sum(distances.diag_w2(v_src["batch_stats"], v_ad["batch_stats"])),
           "bn_diag_bhattacharyya": layer_sum(distances.diag_bhattacharyya(
               v_src["batch_stats"], v_ad["batch_stats"]))}
    row["gain"] = row["iou_adapted"] - row["iou_no_adapt"]
    for t in taps:
      fs = source_cache[src][t]
      kt = jax.random.fold_in(key, i * 100 + taps.index(t))
      xs = distances.subsample(fs, config.max_rows, kt)
      for variant in ("unadapted", "adapted"):
        # Shapes stay fixed per tap (one compile each); collapsed channels are
        # handled by the Bhattacharyya ridge and are harmless to the others.
        a, b = xs, distances.subsample(target_features[variant][t], config.max_rows, kt)
        prefix = f"{t}/{variant}/"
        row[prefix + "frechet"] = distances.frechet(a, b)
        row[prefix + "sliced_w2"] = distances.sliced_wasserstein(a, b, key=kt, n_proj=100)
        row[prefix + "bhattacharyya"] = distances.bhattacharyya(a, b)
        row[prefix + "mmd"] = distances.mmd(a[:1000], b[:1000])
        row[prefix + "sinkhorn"] = distances.sinkhorn(a, b, max_points=config.sinkhorn_points, key=kt)
    rows.append(row)
    row_domains.append((src, tgt))
    bar.update(i + 1)
  return rows, row_domains, collapse


def analyse(config, rows) -> dict:
  """Every predictor against the gain and the adapted IoU (Spearman, Pearson,
  bootstrap intervals), ranked; and the held-out isotonic fits."""
  predictors = [c for c in rows[0] if c not in ("group", "source", "target", "iou_no_adapt",
                                                "iou_adapted", "gain", "source_overlap")]
  rng = np.random.default_rng(config.seed)
  gain = np.array([r["gain"] for r in rows])
  iou_ad = np.array([r["iou_adapted"] for r in rows])
  log_x = {p: np.log1p(np.maximum(np.array([r[p] for r in rows], float), 0)) for p in predictors}
  ranking = []
  for p in predictors:
    x = log_x[p]
    entry = {"predictor": p}
    for name, y in (("gain", gain), ("iou_adapted", iou_ad)):
      entry[f"spearman_{name}"] = spearman(x, y)
      entry[f"spearman_{name}_ci"] = bootstrap_ci(spearman, x, y, config.bootstrap, rng)
      entry[f"pearson_{name}"] = pearson(x, y)
      entry[f"pearson_{name}_ci"] = bootstrap_ci(pearson, x, y, config.bootstrap, rng)
    ranking.append(entry)
  ranking.sort(key=lambda e: -abs(np.nan_to_num(e["spearman_iou_adapted"])))

  # Held out: fit on the pairs of a random half of the sources, test on the rest.
  sources = sorted({r["source"] for r in rows})
  perm = rng.permutation(len(sources))
  train_src = {sources[j] for j in perm[:max(1, len(sources) // 2)]}
  is_train = np.array([r["source"] in train_src for r in rows])
  heldout = []
  if is_train.any() and (~is_train).any():
    for e in ranking:
      x = log_x[e["predictor"]]
      fit = isotonic_fit(x[is_train], iou_ad[is_train], increasing=None)
      pred = fit(x[~is_train])
      heldout.append({"predictor": e["predictor"],
                      "test_spearman": spearman(x[~is_train], iou_ad[~is_train]),
                      "test_mae": float(np.mean(np.abs(pred - iou_ad[~is_train]))),
                      "baseline_mae": float(np.mean(np.abs(iou_ad[is_train].mean() - iou_ad[~is_train])))})
    heldout.sort(key=lambda h: h["test_mae"])
  return {"predictors": predictors, "log_x": log_x, "ranking": ranking, "heldout": heldout,
          "train_sources": sorted(train_src)}


def report(wd, config, plan: Plan, pairs: Pairs, rows, row_domains, collapse, analysis,
           seconds: float) -> str:
  """ranking.md, the channel histograms of two telling pairs and the scatter
  of the six best-ranked predictors; returns the Markdown."""
  model, taps = plan.model, list(plan.taps)
  ranking, heldout, log_x = analysis["ranking"], analysis["heldout"], analysis["log_x"]
  train_src, source_cache = analysis["train_sources"], pairs.source_features
  hist_tap = config.hist_tap
  chosen = {"largest_gain": max(range(len(rows)), key=lambda i: rows[i]["gain"]),
            "lowest_iou_adapted": min(range(len(rows)), key=lambda i: rows[i]["iou_adapted"])}
  for label, i in chosen.items():
    r, (src, tgt) = rows[i], row_domains[i]
    v_src, v_ad, x_tgt = pairs.models(src, tgt)
    plots.channel_histograms(
        {"source": source_cache[src][hist_tap],
         "target, unadapted": features.extract(model, v_src, x_tgt, hist_tap),
         "target, adapted": features.extract(model, v_ad, x_tgt, hist_tap)},
        wd.file(f"histograms_{label}.png"),
        title=f"{hist_tap}: {r['source']} -> {r['target']} (gain {r['gain']:+.2f})",
        note=plots.DOMAIN_NOTE)

  fmt = lambda v, ci: f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
  lines = [f"# Predictors of BN adaptation ({len(rows)} pairs from {config.sweep_dir})", "",
           "x = log(1 + predictor); Spearman (Pearson) with bootstrap 95 % intervals.", "",
           "| predictor | Spearman vs IoU adapted | Spearman vs gain | Pearson vs IoU adapted |",
           "|---|---|---|---|"]
  for e in ranking:
    lines.append(f"| {e['predictor']} | {fmt(e['spearman_iou_adapted'], e['spearman_iou_adapted_ci'])} "
                 f"| {fmt(e['spearman_gain'], e['spearman_gain_ci'])} "
                 f"| {fmt(e['pearson_iou_adapted'], e['pearson_iou_adapted_ci'])} |")
  if heldout:
    lines += ["", f"## Held out (isotonic fit on sources {sorted(train_src)}, tested on the others)", "",
              "| predictor | test Spearman | test MAE | MAE of the training mean |", "|---|---|---|---|"]
    for h in heldout[:10]:
      lines.append(f"| {h['predictor']} | {h['test_spearman']:+.2f} | {h['test_mae']:.3f} "
                   f"| {h['baseline_mae']:.3f} |")
  lines += ["", "## Collapse: fraction of per-image feature dimensions constant across "
            "the source's own images (mean over sources, max)", "",
            "| tap | mean | max |", "|---|---|---|"]
  for t in taps:
    vals = [c[t] for c in collapse.values()]
    lines.append(f"| {t} | {np.mean(vals):.3f} | {np.max(vals):.3f} |")
  lines.append(f"\n({seconds:.0f} s)")
  text = "\n".join(lines)
  wd.write_text("ranking.md", text + "\n")
  scatter(rows, log_x, [e["predictor"] for e in ranking[:6]], wd, "scatter_top6")
  return text


def scatter(rows, log_x, names, wd, stem):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # constrained layout keeps each row's titles clear of the x labels above
  fig, axes = plt.subplots(2, 3, figsize=(12, 7.5), squeeze=False, layout="constrained")
  colour = np.array([r["overlap"] for r in rows])
  iou_ad = np.array([r["iou_adapted"] for r in rows])
  for ax, name in zip(axes.flat, names):
    x = log_x[name]
    sc = ax.scatter(x, iou_ad, c=colour, cmap="viridis", vmin=0, vmax=1, s=14)
    ax.set_xlabel(f"log(1 + {name})", fontsize=7)
    ax.set_ylabel("IoU adapted", fontsize=7)
    ax.set_title(f"Spearman {spearman(x, iou_ad):+.2f}", fontsize=8)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.colorbar(sc, ax=axes, fraction=0.02, label="target class overlap")
  fig.suptitle("IoU with BN adaptation against the six best-ranked predictors "
               "(one point per source/target pair)", fontsize=10)
  fig.savefig(wd.file(f"{stem}.png"), dpi=110)
  plt.close(fig)
  wd.write_json(f"{stem}.json", {
      "iou_adapted": iou_ad.tolist(), "target_overlap": colour.tolist(),
      "log1p_predictors": {n: np.asarray(log_x[n]).tolist() for n in names}})


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "predict_gain")
