r"""Does a distance between latent distributions predict the gain of BN adaptation?

    python experiments/sweep.py --grid=brightness --out=runs/brightness
    python experiments/predict_gain.py --sweep_dir=runs/brightness --out=runs/brightness/gain

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

Writes ``distances.csv`` (every pair, every predictor), ``ranking.md`` /
``ranking.json``, ``heldout.json``, ``scatter_*.png``, ``collapse.json`` (per source and tap:
the fraction of per-image feature dimensions constant across images) and
``histograms_*.png`` (channels of one tap: source features, target features
unadapted and adapted, for the pair with the largest gain and the pair with
the lowest adapted IoU) under --out.
"""

from __future__ import annotations

import csv
import json
import os
import time

from absl import app, flags, logging

import jax
import numpy as np

from bnjax import adapt, checkpoint, compiler, data, distances, features, models, plots
from bnjax.stats import bootstrap_ci, isotonic_fit, pearson, spearman
from bnjax.progress import Progress

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep_dir", None, "Output folder of experiments/sweep.py (required).")
flags.DEFINE_string("out", None, "Output folder (default: <sweep_dir>/gain).")
flags.DEFINE_list("taps", None, "Taps to use (default: all).")
flags.DEFINE_integer("max_rows", 2000, "Feature rows (positions) kept per set, sampled at random.")
flags.DEFINE_integer("sinkhorn_points", 500, "Points per set for the Sinkhorn divergence.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the 95 % intervals.")
flags.DEFINE_string("hist_tap", "bottleneck", "Tap of the channel-histogram figures.")
flags.DEFINE_integer("seed", 0, "Seeds subsampling, projections, bootstrap and the held-out split.")
flags.mark_flag_as_required("sweep_dir")

FEATURE_DISTANCES = ("frechet", "sliced_w2", "bhattacharyya", "mmd", "sinkhorn")


# --------------------------------------------------------------------------
# Data of the sweep


def load_sweep(sweep_dir):
  with open(os.path.join(sweep_dir, "config.json")) as f:
    config = json.load(f)
  index_path = os.path.join(sweep_dir, "models", "index.json")
  if not os.path.exists(index_path):
    raise app.UsageError(f"{index_path} is missing: rerun experiments/sweep.py with the same flags")
  with open(index_path) as f:
    index = json.load(f)
  domains = [data.Domain(*d) for d in index["domains"]]
  chunks = []
  for c in range(-(-len(domains) // index["chunk"])):
    chunks.append(checkpoint.restore(os.path.join(sweep_dir, "models", f"chunk_{c:04d}")))
  stacked = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *chunks)
  results = {}
  for name in sorted(os.listdir(os.path.join(sweep_dir, "results"))):
    with open(os.path.join(sweep_dir, "results", name)) as f:
      results[name[:-5]] = json.load(f)
  return config, domains, stacked, results


def subsample(x, n, key):
  if x.shape[0] <= n:
    return x
  return x[np.asarray(jax.random.permutation(key, x.shape[0]))[:n]]


def layer_sum(d: dict) -> float:
  return float(sum(d.values()))


def main(argv):
  del argv
  compiler.enable_persistent_cache()  # a rerun loads its compiled programs from disk
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  out = FLAGS.out or os.path.join(FLAGS.sweep_dir, "gain")
  os.makedirs(out, exist_ok=True)
  config, domains, stacked, results = load_sweep(FLAGS.sweep_dir)
  model = models.UNet(features=config["features"], depth=config["depth"])
  size = config["size"]
  position = {d: i for i, d in enumerate(domains)}
  taps = FLAGS.taps or features.available_taps(
      model, jax.tree_util.tree_map(lambda a: a[0], stacked), (size, size, 1))
  key = jax.random.key(FLAGS.seed)

  def dataset(d, split, n):
    return data.make_dataset(data.split_key(config["seed"], d, split), d, n, size)

  pairs = [(g, data.Domain(*res["sources"][k]), data.Domain(*res["targets"][m]), k, m)
           for g, res in results.items()
           for k in range(len(res["sources"])) for m in range(len(res["targets"]))]
  bar = Progress(len(pairs), "pairs")
  rows, source_cache, collapse = [], {}, {}
  adapt_options = {"mode": config["adapt_mode"]}
  if config.get("adapt_batch_size"):
    adapt_options["batch_size"] = config["adapt_batch_size"]

  def pair_models(src, tgt):
    v_src = jax.tree_util.tree_map(lambda a: a[position[src]], stacked)
    x_tgt, _ = dataset(tgt, "eval", config["n_eval"])
    x_adapt = x_tgt if config["transductive"] else dataset(tgt, "adapt", config["n_adapt"])[0]
    return v_src, adapt.recompute_batch_stats(model, v_src, x_adapt, **adapt_options), x_tgt

  for i, (group, src, tgt, k, m) in enumerate(pairs):
    res = results[group]
    v_src, v_ad, x_tgt = pair_models(src, tgt)
    if src not in source_cache:
      x_src, _ = dataset(src, "eval", config["n_eval"])
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
      xs = subsample(fs, FLAGS.max_rows, kt)
      for variant in ("unadapted", "adapted"):
        # Shapes stay fixed per tap (one compile each); collapsed channels are
        # handled by the Bhattacharyya ridge and are harmless to the others.
        a, b = xs, subsample(target_features[variant][t], FLAGS.max_rows, kt)
        prefix = f"{t}/{variant}/"
        row[prefix + "frechet"] = distances.frechet(a, b)
        row[prefix + "sliced_w2"] = distances.sliced_wasserstein(a, b, key=kt, n_proj=100)
        row[prefix + "bhattacharyya"] = distances.bhattacharyya(a, b)
        row[prefix + "mmd"] = distances.mmd(a[:1000], b[:1000])
        row[prefix + "sinkhorn"] = distances.sinkhorn(a, b, max_points=FLAGS.sinkhorn_points, key=kt)
    rows.append(row)
    bar.update(i + 1)

  predictors = [c for c in rows[0] if c not in ("group", "source", "target", "iou_no_adapt",
                                                "iou_adapted", "gain", "source_overlap")]
  with open(os.path.join(out, "distances.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)

  rng = np.random.default_rng(FLAGS.seed)
  gain = np.array([r["gain"] for r in rows])
  iou_ad = np.array([r["iou_adapted"] for r in rows])
  log_x = {p: np.log1p(np.maximum(np.array([r[p] for r in rows], float), 0)) for p in predictors}
  ranking = []
  for p in predictors:
    x = log_x[p]
    entry = {"predictor": p}
    for name, y in (("gain", gain), ("iou_adapted", iou_ad)):
      entry[f"spearman_{name}"] = spearman(x, y)
      entry[f"spearman_{name}_ci"] = bootstrap_ci(spearman, x, y, FLAGS.bootstrap, rng)
      entry[f"pearson_{name}"] = pearson(x, y)
      entry[f"pearson_{name}_ci"] = bootstrap_ci(pearson, x, y, FLAGS.bootstrap, rng)
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
      rho = spearman(x[is_train], iou_ad[is_train])
      fit = isotonic_fit(x[is_train], iou_ad[is_train], increasing=not rho < 0)
      pred = fit(x[~is_train])
      heldout.append({"predictor": e["predictor"],
                      "test_spearman": spearman(x[~is_train], iou_ad[~is_train]),
                      "test_mae": float(np.mean(np.abs(pred - iou_ad[~is_train]))),
                      "baseline_mae": float(np.mean(np.abs(iou_ad[is_train].mean() - iou_ad[~is_train])))})
    heldout.sort(key=lambda h: h["test_mae"])
  checkpoint.write_json_atomic(os.path.join(out, "ranking.json"), ranking)
  checkpoint.write_json_atomic(os.path.join(out, "heldout.json"),
                               {"train_sources": sorted(train_src), "results": heldout})

  # Collapse per tap (fraction of per-image feature dimensions constant across
  # the source's own images), and channel histograms of two telling pairs.
  checkpoint.write_json_atomic(os.path.join(out, "collapse.json"), collapse)
  hist_tap = FLAGS.hist_tap if FLAGS.hist_tap in taps else taps[len(taps) // 2]
  chosen = {"largest_gain": max(rows, key=lambda r: r["gain"]),
            "lowest_iou_adapted": min(rows, key=lambda r: r["iou_adapted"])}
  for label, r in chosen.items():
    src, tgt = (data.Domain.parse(r[c].strip("()")) for c in ("source", "target"))
    v_src, v_ad, x_tgt = pair_models(src, tgt)
    plots.channel_histograms(
        {"source": source_cache[src][hist_tap],
         "target, unadapted": features.extract(model, v_src, x_tgt, hist_tap),
         "target, adapted": features.extract(model, v_ad, x_tgt, hist_tap)},
        os.path.join(out, f"histograms_{label}.png"),
        title=f"{hist_tap}: {r['source']} -> {r['target']} (gain {r['gain']:+.2f})")

  fmt = lambda v, ci: f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
  lines = [f"# Predictors of BN adaptation ({len(rows)} pairs from {FLAGS.sweep_dir})", "",
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
  lines.append(f"\n({time.perf_counter() - start:.0f} s)")
  text = "\n".join(lines)
  with open(os.path.join(out, "ranking.md"), "w") as f:
    f.write(text + "\n")
  scatter(rows, log_x, [e["predictor"] for e in ranking[:6]], os.path.join(out, "scatter_top6.png"))
  print(text)


def scatter(rows, log_x, names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(12, 7), squeeze=False)
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
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
