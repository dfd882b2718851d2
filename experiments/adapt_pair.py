r"""Train on a source domain, adapt BatchNorm to target domains, score IoU.

    python experiments/adapt_pair.py --config=experiments/configs/adapt_pair.py --workdir=runs/adapt_pair

The config file gives the expected runtime and result. For each target the
script reports IoU without adaptation, with adaptation (on a target split
distinct from the evaluation split, or on the evaluation split itself with
``adapt.transductive`` as in the original study) and of an oracle trained on
the target. The workdir (:mod:`bnjax.workdir`) receives ``config.json``,
``checkpoints/`` (each trained model, as it finishes), ``results/results.json``,
``results.md``, ``adapt_pair.png`` (samples,
ground truth, predictions) and ``history.png``. Rerun the same command after
an interruption and the trained models are restored.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

import bnjax
from bnjax import config as cfg
from bnjax import data, metrics, models, plots, train
from bnjax.adapt import recompute_batch_stats
from bnjax.progress import Progress
from bnjax.cli import main
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "adapt_pair.py")
COLUMNS = ("image", "ground truth", "no adaptation", "BN adapted", "oracle")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config resolved and checked whole (:func:`plan_of`), before anything
  is written or trained."""

  source: data.Domain
  targets: list
  model: models.UNet
  train: train.TrainConfig
  adapt: dict


def plan_of(config) -> Plan:
  """Every value of ``config`` checked by the code that uses it; a
  :class:`bnjax.config.ConfigError` naming the key otherwise."""
  cfg.positive_int(config.seed, "seed", minimum=0)
  size = cfg.image_size(config.data.size)
  for name in ("n_train", "n_eval", "n_adapt"):
    cfg.positive_int(config.data[name], f"data.{name}")
  cfg.choice(config.data.kind, data.RENDER_KINDS, "data.kind")
  cfg.unit_interval(config.empty_iou, "empty_iou")
  return Plan(cfg.domain(config.source, "source"), cfg.domains(config.targets, "targets"),
              cfg.unet(config.model, image_size=size),
              cfg.train_config(config.train, n_images=config.data.n_train, seed=config.seed),
              cfg.adapt_options(config.adapt))


def _data(config, domain: data.Domain, split: str, n: int):
  """Images and masks of one split of one domain, from the run's seed."""
  return data.split_dataset(config.seed, domain, split, n, config.data.size,
                            kind=config.data.kind, quantize=config.data.quantize)


def _train_or_restore(wd: Workdir, name: str, label: str, model, images, masks,
                      train_config: train.TrainConfig, bar: Progress, index: int):
  """Restores ``checkpoints/<name>`` of this config, or trains and saves it."""
  def fit():
    print(f"[model {index} of {bar.total}] {label}: training on {images.shape[0]} images",
          flush=True)
    variables, history = train.fit(model, images, masks, train_config)
    return variables, {"history": history}

  variables, meta, restored = wd.train_or_restore(name, fit, seed=train_config.seed)
  if restored:
    print(f"[model {index} of {bar.total}] {label}: restored from {wd.path}/checkpoints/{name}",
          flush=True)
  bar.update(index, f"{label} {'restored' if restored else 'trained'}", restored=restored)
  return variables, meta["history"]


def figure(rows, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(rows), len(COLUMNS), squeeze=False,
                           figsize=(2.2 * len(COLUMNS), 2.3 * len(rows) + 0.5))
  for c, name in enumerate(COLUMNS):
    axes[0, c].annotate(name, (0.5, 1.25), xycoords="axes fraction", ha="center",
                        fontsize=9, fontweight="bold")
  for r, row in enumerate(rows):
    for c, name in enumerate(COLUMNS):
      ax = axes[r, c]
      ax.set_xticks([]), ax.set_yticks([])
      if name not in row["panels"]:
        ax.axis("off")
        ax.text(0.5, 0.5, "not applicable\n(the source itself)", ha="center", va="center",
                fontsize=8, color="0.4", transform=ax.transAxes)
        continue
      ax.imshow(row["panels"][name], cmap="gray", vmin=0, vmax=1)
      if name in row["titles"]:
        ax.set_title(row["titles"][name], fontsize=8)
    axes[r, 0].set_ylabel(row["label"], fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.text(0.01, 0.005, plots.DOMAIN_NOTE, fontsize=7, color="0.25")
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(results) -> str:
  adapt = results["settings"]["adapt"]
  lines = [f"source {results['source']['label']}: IoU {results['source']['iou']:.3f} "
           f"(mask fraction {results['source']['mask_fraction']:.3f}); "
           f"adaptation mode {adapt['mode']}{' (transductive)' if adapt['transductive'] else ''}",
           "", "| target | mask fraction | IoU no adaptation | IoU adapted | IoU oracle |",
           "|---|---|---|---|---|"]
  for e in results["targets"]:
    oracle = f"{e['iou_oracle']:.3f}" if "iou_oracle" in e else "-"
    lines.append(f"| {e['label']} | {e['mask_fraction']:.3f} | {e['iou_no_adapt']:.3f} "
                 f"| {e['iou_adapted']:.3f} | {oracle} |")
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  """Runs the study of ``config`` into ``workdir``; returns the results."""
  start = time.perf_counter()
  plan = plan_of(config)
  wd = Workdir.open(workdir, "adapt_pair", config)
  source, targets, model, base = plan.source, plan.targets, plan.model, plan.train
  iou = lambda pred, masks: metrics.iou(pred, masks, empty=config.empty_iou)
  size = config.data.size

  print(f"source {source}, targets {', '.join(map(str, targets))}, {size}x{size}, "
        f"U-Net width {config.model.features} depth {config.model.depth}, "
        f"devices {jax.devices()}", flush=True)
  bar = Progress(1 + len(targets) * bool(config.oracle), "models")
  x_train, y_train = _data(config, source, "train", config.data.n_train)
  x_eval, y_eval = _data(config, source, "eval", config.data.n_eval)
  src_vars, src_hist = _train_or_restore(wd, "source", f"source {source}", model,
                                         x_train, y_train, base, bar, 1)
  histories = {f"source {source}": src_hist}
  src_pred = bnjax.predict(model, src_vars, x_eval)
  results = {"source": {"domain": source.to_json(), "label": str(source),
                        "iou": iou(src_pred, y_eval),
                        "mask_fraction": metrics.foreground_fraction(y_eval)},
             "targets": []}
  rows = [{"label": f"source {source}",
           "panels": {"image": x_eval[0, ..., 0], "ground truth": y_eval[0],
                      "no adaptation": src_pred[0]},
           "titles": {"no adaptation": f"IoU {results['source']['iou']:.3f}"}}]

  for t, target in enumerate(targets, start=1):
    xt_eval, yt_eval = _data(config, target, "eval", config.data.n_eval)
    xt_adapt = (xt_eval if config.adapt.transductive
                else _data(config, target, "adapt", config.data.n_adapt)[0])
    pred_none = bnjax.predict(model, src_vars, xt_eval)
    tic = time.perf_counter()
    adapted = recompute_batch_stats(model, src_vars, xt_adapt, **plan.adapt)
    jax.block_until_ready(adapted)
    adapt_seconds = time.perf_counter() - tic
    pred_adapt = bnjax.predict(model, adapted, xt_eval)
    entry = {"domain": target.to_json(), "label": str(target),
             "mask_fraction": metrics.foreground_fraction(yt_eval),
             "iou_no_adapt": iou(pred_none, yt_eval),
             "iou_adapted": iou(pred_adapt, yt_eval),
             "predicted_fraction_no_adapt": float(pred_none.mean()),
             "adapt_seconds": adapt_seconds}
    panels = {"image": xt_eval[0, ..., 0], "ground truth": yt_eval[0],
              "no adaptation": pred_none[0], "BN adapted": pred_adapt[0]}
    titles = {"no adaptation": f"IoU {entry['iou_no_adapt']:.3f}",
              "BN adapted": f"IoU {entry['iou_adapted']:.3f}"}
    if config.oracle:
      xo, yo = _data(config, target, "train", config.data.n_train)
      o_vars, o_hist = _train_or_restore(
          wd, f"oracle{t}", f"oracle {target}", model, xo, yo,
          dataclasses.replace(base, seed=config.seed + t), bar, 1 + t)
      histories[f"oracle {target}"] = o_hist
      pred_oracle = bnjax.predict(model, o_vars, xt_eval)
      entry["iou_oracle"] = iou(pred_oracle, yt_eval)
      panels["oracle"] = pred_oracle[0]
      titles["oracle"] = f"IoU {entry['iou_oracle']:.3f}"
    results["targets"].append(entry)
    rows.append({"label": f"target {target}", "panels": panels, "titles": titles})

  results["settings"] = wd.config
  results["seconds"] = time.perf_counter() - start
  results["versions"] = {"bnjax": bnjax.__version__, "jax": jax.__version__}
  text = table(results)
  print("\n" + text + "\n")
  wd.write_result("results", results)
  wd.write_text("results.md", text + "\n")
  figure(rows, wd.file("adapt_pair.png"),
         f"U-Net trained on {source}: predictions on one evaluation image per domain")
  epochs = max(len(h["train_loss"]) for h in histories.values())
  padded = {key: np.array([h[key] + [np.nan] * (epochs - len(h[key])) for h in histories.values()]).T
            for key in ("train_loss", "val_loss", "val_dice")}
  plots.histories(padded, list(histories), wd.file("history.png"), "training of each model",
                  note=plots.DOMAIN_NOTE)
  print(f"wrote {wd.path}/results/results.json, results.md, adapt_pair.png, history.png "
        f"({results['seconds']:.0f} s)")
  return results


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "adapt_pair")
