r"""Train on a source domain, adapt BatchNorm to target domains, score IoU.

    python experiments/adapt_pair.py --out=runs/adapt_pair          # CPU default, ~3 min on 2 cores
    python experiments/adapt_pair.py --preset=paper --out=runs/paper  # the study's 64x64, 31 M-parameter setting

Expected with the default (a pure brightness shift of the source
(90,50,170,50) to (150,50,230,50) and (30,50,110,50), 32x32, width 8): source
IoU about 0.86; without adaptation the brighter target scores about the mask
fraction (~0.2, everything predicted foreground) and the darker one about 0;
with ``exact`` BN adaptation both are back near the source IoU.

For each target the script reports IoU without adaptation, with adaptation
(adapting on a target split distinct from the evaluation split, or on the
evaluation split itself with --transductive as in the original study) and of
an oracle trained on the target. It writes ``results.json``, ``results.md``,
``adapt_pair.png`` (samples, ground truth, predictions), ``history.png`` and
the model checkpoints under --out. Trained models are checkpointed as they
finish: a rerun with the same flags restores them instead of training again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from absl import app, flags, logging

import jax
import numpy as np

import bnjax
from bnjax import checkpoint, compiler, data, metrics, models, train
from bnjax.adapt import MODES, recompute_batch_stats

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", ["cpu", "paper"],
                  "cpu: 32x32, width 8, Adam; paper: the study's 64x64 U-Net "
                  "(width 64) with its RMSprop settings and 5000 images.")
flags.DEFINE_string("source", "90,50,170,50", "Source domain mu1,sigma1,mu2,sigma2 (0-255).")
flags.DEFINE_multi_string("target", ["150,50,230,50", "30,50,110,50"],
                          "Target domain(s) mu1,sigma1,mu2,sigma2; repeat the flag.")
flags.DEFINE_enum("kind", "white_noise", list(data.RENDER_KINDS), "Renderer.")
flags.DEFINE_bool("quantize", False, "Truncate pixels to integers (the original uint8 storage).")
flags.DEFINE_integer("size", None, "Image side (default: 32 cpu, 64 paper).")
flags.DEFINE_integer("n_train", None, "Training images per domain (default: 1000 cpu, 5000 paper).")
flags.DEFINE_integer("n_eval", 200, "Evaluation images per domain.")
flags.DEFINE_integer("n_adapt", 200, "Target images used for adaptation.")
flags.DEFINE_integer("features", None, "U-Net base width (default: 8 cpu, 64 paper).")
flags.DEFINE_integer("depth", 4, "U-Net depth.")
flags.DEFINE_integer("epochs", None, "Training epochs (default: 10 cpu, 5 paper).")
flags.DEFINE_integer("batch_size", None, "Training batch size (default: 32 cpu, 1 paper).")
flags.DEFINE_float("learning_rate", None, "Learning rate (default: 3e-3 cpu, 1e-5 paper).")
flags.DEFINE_enum("optimizer", None, list(train.OPTIMIZERS), "Optimizer (default: adam cpu, rmsprop paper).")
flags.DEFINE_integer("patience", None, "Early-stopping patience in epochs (default 4 cpu, 2 paper).")
flags.DEFINE_enum("adapt_mode", "exact", list(MODES), "BN adaptation mode.")
flags.DEFINE_integer("adapt_batch_size", None, "Batch size of the adaptation pass (mode default if unset).")
flags.DEFINE_bool("transductive", False, "Adapt on the evaluation images themselves (the original protocol).")
flags.DEFINE_bool("oracle", True, "Also train a model on each target domain.")
flags.DEFINE_float("empty_iou", 1.0, "IoU of an image whose prediction and mask are both empty (the original used 0).")
flags.DEFINE_integer("seed", 0, "Seeds data, initialisation and batch order.")
flags.DEFINE_string("out", "runs/adapt_pair", "Output folder.")

PRESETS = {
    "cpu": dict(size=32, n_train=1000, features=8, epochs=10, batch_size=32,
                learning_rate=3e-3, optimizer="adam", patience=4),
    "paper": dict(size=64, n_train=5000, features=64, epochs=5, batch_size=1,
                  learning_rate=1e-5, optimizer="rmsprop", patience=2),
}


def settings() -> dict:
  """The preset, overridden by the flags given."""
  out = dict(PRESETS[FLAGS.preset])
  for name in out:
    if getattr(FLAGS, name) is not None:
      out[name] = getattr(FLAGS, name)
  for name in ("n_train", "n_eval", "n_adapt", "size"):
    value = out.get(name, getattr(FLAGS, name))
    if value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {value}")
  return out


def train_config(s: dict, seed: int) -> train.TrainConfig:
  base = train.TrainConfig.paper() if FLAGS.preset == "paper" else train.TrainConfig()
  return dataclasses.replace(
      base, epochs=s["epochs"], batch_size=s["batch_size"],
      learning_rate=s["learning_rate"], optimizer=s["optimizer"],
      patience=s["patience"], seed=seed)


def domain_data(domain: data.Domain, split: str, n: int, size: int):
  """Images and masks of one split of one domain, from the run's seed."""
  return data.make_dataset(data.split_key(FLAGS.seed, domain, split), domain, n, size,
                           kind=FLAGS.kind, quantize=FLAGS.quantize)


def trained_model(name: str, model, images, masks, config, identity: dict, out: str):
  """Trains, or restores the checkpoint of an identical earlier run."""
  path = os.path.join(out, "checkpoints", name)
  tag = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
  try:
    meta = checkpoint.metadata(path)
    if meta.get("identity") == tag:
      print(f"[{name}] restored from {path}", flush=True)
      return checkpoint.restore(path), meta["history"]
  except (FileNotFoundError, ValueError):
    pass
  print(f"[{name}] training on {images.shape[0]} images", flush=True)
  variables, history = train.fit(model, images, masks, config)
  checkpoint.save(path, variables, identity=tag, history=history, config=identity)
  return variables, history


def figure(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = ["image", "ground truth", "no adaptation", "BN adapted", "oracle"]
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.2 * len(cols), 2.3 * len(rows)),
                           squeeze=False)
  for r, row in enumerate(rows):
    for c, name in enumerate(cols):
      ax = axes[r, c]
      ax.set_xticks([]), ax.set_yticks([])
      if name not in row["panels"]:
        ax.axis("off")
        continue
      ax.imshow(row["panels"][name], cmap="gray", vmin=0, vmax=1)
      ax.set_title(row["titles"].get(name, name), fontsize=8)
    axes[r, 0].set_ylabel(row["label"], fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def history_figure(histories: dict, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  for name, h in histories.items():
    epochs = np.arange(1, len(h["train_loss"]) + 1)
    axes[0].plot(epochs, h["train_loss"], label=f"{name} train")
    axes[0].plot(epochs, h["val_loss"], "--", label=f"{name} val")
    axes[1].plot(epochs, h["val_dice"], label=name)
  axes[0].set(xlabel="epoch", ylabel="loss")
  axes[1].set(xlabel="epoch", ylabel="validation Dice")
  axes[0].legend(fontsize=6)
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  compiler.enable_persistent_cache()  # a rerun loads its compiled programs from disk
  if not FLAGS["verbosity"].present:  # keep orbax's per-save INFO lines out of the log
    logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  try:
    source = data.Domain.parse(FLAGS.source)
    targets = [data.Domain.parse(t) for t in FLAGS.target]
  except ValueError as e:
    raise app.UsageError(str(e))
  s = settings()
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  size = s["size"]
  model = models.UNet(features=s["features"], depth=FLAGS.depth)
  iou = lambda pred, masks: metrics.iou(pred, masks, empty=FLAGS.empty_iou)
  common = dict(s, kind=FLAGS.kind, quantize=FLAGS.quantize, depth=FLAGS.depth,
                seed=FLAGS.seed, preset=FLAGS.preset)

  print(f"source {source}, targets {', '.join(map(str, targets))}, {size}x{size}, "
        f"U-Net width {s['features']} depth {FLAGS.depth}, devices {jax.devices()}",
        flush=True)
  x_train, y_train = domain_data(source, "train", s["n_train"], size)
  x_eval, y_eval = domain_data(source, "eval", FLAGS.n_eval, size)
  src_vars, src_hist = trained_model(
      "source", model, x_train, y_train, train_config(s, FLAGS.seed),
      dict(common, domain=str(source)), out)
  histories = {"source": src_hist}
  src_pred = bnjax.predict(model, src_vars, x_eval)
  results = {"source": {"domain": list(dataclasses.astuple(source)),
                        "iou": iou(src_pred, y_eval),
                        "mask_fraction": metrics.foreground_fraction(y_eval)},
             "targets": []}
  rows = [{"label": f"source {source}",
           "panels": {"image": x_eval[0, ..., 0], "ground truth": y_eval[0],
                      "no adaptation": src_pred[0]},
           "titles": {"no adaptation": f"prediction, IoU {results['source']['iou']:.3f}"}}]

  for t, target in enumerate(targets, start=1):
    xt_eval, yt_eval = domain_data(target, "eval", FLAGS.n_eval, size)
    xt_adapt = (xt_eval if FLAGS.transductive
                else domain_data(target, "adapt", FLAGS.n_adapt, size)[0])
    pred_none = bnjax.predict(model, src_vars, xt_eval)
    tic = time.perf_counter()
    adapted = recompute_batch_stats(model, src_vars, xt_adapt, mode=FLAGS.adapt_mode,
                                    batch_size=FLAGS.adapt_batch_size)
    jax.block_until_ready(adapted)
    adapt_seconds = time.perf_counter() - tic
    pred_adapt = bnjax.predict(model, adapted, xt_eval)
    entry = {"domain": list(dataclasses.astuple(target)),
             "mask_fraction": metrics.foreground_fraction(yt_eval),
             "iou_no_adapt": iou(pred_none, yt_eval),
             "iou_adapted": iou(pred_adapt, yt_eval),
             "predicted_fraction_no_adapt": float(pred_none.mean()),
             "adapt_seconds": adapt_seconds}
    panels = {"image": xt_eval[0, ..., 0], "ground truth": yt_eval[0],
              "no adaptation": pred_none[0], "BN adapted": pred_adapt[0]}
    titles = {"no adaptation": f"IoU {entry['iou_no_adapt']:.3f}",
              "BN adapted": f"IoU {entry['iou_adapted']:.3f}"}
    if FLAGS.oracle:
      xo, yo = domain_data(target, "train", s["n_train"], size)
      o_vars, o_hist = trained_model(
          f"oracle{t}", model, xo, yo, train_config(s, FLAGS.seed + t),
          dict(common, domain=str(target)), out)
      histories[f"oracle {target}"] = o_hist
      pred_oracle = bnjax.predict(model, o_vars, xt_eval)
      entry["iou_oracle"] = iou(pred_oracle, yt_eval)
      panels["oracle"] = pred_oracle[0]
      titles["oracle"] = f"IoU {entry['iou_oracle']:.3f}"
    results["targets"].append(entry)
    rows.append({"label": f"target {target}", "panels": panels, "titles": titles})

  results["settings"] = dict(common, adapt_mode=FLAGS.adapt_mode,
                             transductive=FLAGS.transductive, n_eval=FLAGS.n_eval,
                             n_adapt=FLAGS.n_adapt, empty_iou=FLAGS.empty_iou,
                             source=str(source))
  results["seconds"] = time.perf_counter() - start
  results["versions"] = {"bnjax": bnjax.__version__, "jax": jax.__version__}

  header = "| target | mask fraction | IoU no adaptation | IoU adapted | IoU oracle |"
  lines = [f"source {source}: IoU {results['source']['iou']:.3f} "
           f"(mask fraction {results['source']['mask_fraction']:.3f}); "
           f"adaptation mode {FLAGS.adapt_mode}"
           f"{' (transductive)' if FLAGS.transductive else ''}", "",
           header, "|---|---|---|---|---|"]
  for e in results["targets"]:
    oracle = f"{e['iou_oracle']:.3f}" if "iou_oracle" in e else "-"
    lines.append(f"| ({','.join(f'{v:g}' for v in e['domain'])}) | {e['mask_fraction']:.3f} "
                 f"| {e['iou_no_adapt']:.3f} | {e['iou_adapted']:.3f} | {oracle} |")
  table = "\n".join(lines)
  print("\n" + table + "\n")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
  checkpoint.write_json_atomic(os.path.join(out, "results.json"), results)
  figure(rows, os.path.join(out, "adapt_pair.png"))
  history_figure(histories, os.path.join(out, "history.png"))
  print(f"wrote {out}/results.json, results.md, adapt_pair.png, history.png "
        f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
