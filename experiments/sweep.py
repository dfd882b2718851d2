r"""Run a grid of source/target domains: train every source model as one stack,
score every pair without and with BN adaptation, write the figures.

    python experiments/sweep.py --grid=brightness --out=runs/brightness        # CPU-sized (64x64, width 8), ~11 min on 2 cores
    python experiments/sweep.py --grid=geometric --out=runs/geometric
    python experiments/sweep.py --grid=clip_corrected --out=runs/clip
    python experiments/sweep.py --grid=custom --mu1=10:170:40 --delta=80 --sigma1=50 --out=runs/custom
    python experiments/sweep.py --grid=brightness --scale=full --size=64 --features=16 --out=runs/b64

Expected (``--grid=brightness``, CPU scale): without adaptation a target
brighter than its source scores about the mask fraction (~0.2) and a darker one
about 0; with ``exact`` adaptation the k=80 cells are within 0.1 of their
source's own IoU.

Resumable: models are trained in chunks of --chunk and each chunk is an orbax
checkpoint; each group's scores are written atomically. Run the same command
again after an interruption and it goes on where it stopped. Rerunning into
the same --out with different flags is refused.

Outputs under --out: ``config.json``; ``models/chunk_NNNN`` (checkpoints) and
``models/index.json`` (the domain of each model, in order);
``results/<group>.json``; per group ``<group>_heatmaps.png`` (+ CSV/JSON),
``<group>_surface.png`` (or ``<group>_panels.png`` for one source, many
targets); ``histories.png``; ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time

from absl import app, flags, logging

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import checkpoint, compiler, data, models, plots, sweep, train
from bnjax.adapt import MODES
from bnjax.progress import Progress

FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "brightness", list(sweep.NAMED_GRIDS) + ["custom"],
                  "A named grid of the study, or 'custom' (domains from --mu1/--delta/--sigma1/--sigma2).")
flags.DEFINE_enum("scale", "cpu", ["cpu", "full"], "Named grids: the CPU-sized or the study's full version.")
flags.DEFINE_string("mu1", "10:170:40", "custom: background means, 'a,b,c' or 'start:stop:step'.")
flags.DEFINE_string("delta", "80", "custom: mu2 - mu1 values.")
flags.DEFINE_string("sigma1", "50", "custom: background standard deviations.")
flags.DEFINE_string("sigma2", None, "custom: foreground standard deviations (default: equal to sigma1).")
flags.DEFINE_integer("size", 64, "Image side (the study's 64; at 32 the most clipped brightness pair misses by 0.11).")
flags.DEFINE_integer("n_train", 500, "Training images per domain.")
flags.DEFINE_integer("n_eval", 100, "Evaluation images per domain.")
flags.DEFINE_integer("n_adapt", 100, "Adaptation images per target.")
flags.DEFINE_integer("features", 8, "U-Net base width.")
flags.DEFINE_integer("depth", 4, "U-Net depth.")
flags.DEFINE_integer("epochs", 12, "Training epochs.")
flags.DEFINE_integer("batch_size", 32, "Training batch size.")
flags.DEFINE_float("learning_rate", 3e-3, "Learning rate.")
flags.DEFINE_enum("optimizer", "adam", list(train.OPTIMIZERS), "Optimizer.")
flags.DEFINE_integer("patience", 3, "Early-stopping patience.")
flags.DEFINE_enum("adapt_mode", "exact", list(MODES), "BN adaptation mode.")
flags.DEFINE_integer("adapt_batch_size", None, "Adaptation batch size (mode default if unset).")
flags.DEFINE_bool("transductive", False, "Adapt on the evaluation images (the original protocol).")
flags.DEFINE_bool("oracle", False, "Also train one model per target domain.")
flags.DEFINE_integer("chunk", 4, "Models trained per chunk (one checkpoint each).")
flags.DEFINE_integer("pair_chunk", 8, "Source/target pairs adapted per call.")
flags.DEFINE_enum("strategy", "auto", ["auto", "vmap", "unroll"], "How a stack of models is mapped.")
flags.DEFINE_integer("seed", 0, "Seeds data, initialisation and batch order.")
flags.DEFINE_string("out", None, "Output folder (required).")
flags.mark_flag_as_required("out")

IDENTITY_FLAGS = ("grid", "scale", "mu1", "delta", "sigma1", "sigma2", "size", "n_train",
                  "n_eval", "n_adapt", "features", "depth", "epochs", "batch_size",
                  "learning_rate", "optimizer", "patience", "adapt_mode", "adapt_batch_size",
                  "transductive", "oracle", "chunk", "seed")


def build_grid() -> sweep.Grid:
  if FLAGS.grid != "custom":
    return sweep.named_grid(FLAGS.grid, FLAGS.scale)
  mu1s, deltas = sweep.parse_values(FLAGS.mu1), sweep.parse_values(FLAGS.delta)
  s1s = sweep.parse_values(FLAGS.sigma1)
  s2s = sweep.parse_values(FLAGS.sigma2) if FLAGS.sigma2 else None
  doms = []
  for m, d, s1 in itertools.product(mu1s, deltas, s1s):
    for s2 in (s2s or [s1]):
      if m + d <= 255:
        doms.append(data.Domain(m, s1, m + d, s2))
  if not doms:
    raise app.UsageError("the custom grid is empty: every mu1 + delta exceeds 255")
  return sweep.Grid("custom", (sweep.many_to_many("custom", doms),))


def check_config(out: str) -> dict:
  """Writes config.json, or checks that an earlier run in ``out`` used the same flags."""
  config = {name: FLAGS[name].value for name in IDENTITY_FLAGS}
  path = os.path.join(out, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != config:
      diff = {k: (old.get(k), config.get(k)) for k in set(old) | set(config)
              if old.get(k) != config.get(k)}
      raise app.UsageError(
          f"{out} holds a sweep run with other flags ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in sorted(diff.items()))}); "
          "rerun with the same flags to resume, or choose another --out")
  else:
    os.makedirs(out, exist_ok=True)
    checkpoint.write_json_atomic(path, config)
  return config


def dataset(domains, split, n):
  pairs = [data.make_dataset(data.split_key(FLAGS.seed, d, split), d, n, FLAGS.size)
           for d in domains]
  return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


def train_all(model, domains, config, out, tag):
  """Trains one model per domain in checkpointed chunks; returns stacked
  variables and the stacked history."""
  chunks = [domains[i:i + FLAGS.chunk] for i in range(0, len(domains), FLAGS.chunk)]
  bar = Progress(len(domains), "training")
  done, variables, histories = 0, [], []
  for c, chunk in enumerate(chunks):
    path = os.path.join(out, "models", f"chunk_{c:04d}")
    ident = hashlib.sha256(json.dumps([tag, [str(d) for d in chunk]]).encode()).hexdigest()
    try:
      meta = checkpoint.metadata(path)
      if meta.get("identity") == ident:
        variables.append(checkpoint.restore(path))
        histories.append({k: np.asarray(v, float) for k, v in meta["history"].items()})
        done += len(chunk)
        bar.update(done, f"chunk {c + 1}/{len(chunks)} restored")
        continue
    except (FileNotFoundError, ValueError):
      pass
    x, y = dataset(chunk, "train", FLAGS.n_train)
    seed0 = FLAGS.seed + domains.index(chunk[0])
    v, h = sweep.train_many(model, x, y, dataclasses.replace(config, seed=seed0),
                            strategy=FLAGS.strategy)
    h = {k: np.asarray(val, float) for k, val in h.items() if k != "seconds"}
    checkpoint.save(path, v, identity=ident, domains=[str(d) for d in chunk],
                    history={k: np.where(np.isnan(a), None, a).tolist() for k, a in h.items()})
    variables.append(jax.device_get(v))
    histories.append(h)
    done += len(chunk)
    bar.update(done, f"chunk {c + 1}/{len(chunks)} trained")
  stacked = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *variables)
  epochs = max(h["train_loss"].shape[0] for h in histories)
  pad = lambda a: np.pad(a, ((0, epochs - a.shape[0]), (0, 0)), constant_values=np.nan)
  history = {k: np.concatenate([pad(h[k]) for h in histories], axis=1)
             for k in ("train_loss", "val_loss", "val_dice")}
  return stacked, history


def label(d: data.Domain) -> str:
  return f"({d.mu1:g},{d.sigma1:g},{d.mu2:g},{d.sigma2:g})"


def main(argv):
  del argv
  compiler.enable_persistent_cache()  # a rerun loads its compiled programs from disk
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    grid = build_grid()
  except ValueError as e:
    raise app.UsageError(str(e))
  out = FLAGS.out
  check_config(out)
  start = time.perf_counter()
  model = models.UNet(features=FLAGS.features, depth=FLAGS.depth)
  config = train.TrainConfig(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                             learning_rate=FLAGS.learning_rate, optimizer=FLAGS.optimizer,
                             patience=FLAGS.patience, seed=FLAGS.seed, verbose=False)
  trained = grid.domains() if FLAGS.oracle else grid.sources()
  print(f"grid {grid.name} ({FLAGS.scale}): {len(grid.groups)} group(s), "
        f"{len(trained)} models to train, "
        f"{sum(len(g.sources) * len(g.targets) for g in grid.groups)} pairs; "
        f"{FLAGS.size}x{FLAGS.size}, width {FLAGS.features}, devices {jax.devices()}",
        flush=True)
  variables, history = train_all(model, trained, config, out, [FLAGS[n].value for n in IDENTITY_FLAGS])
  checkpoint.write_json_atomic(os.path.join(out, "models", "index.json"), {
      "domains": [list(dataclasses.astuple(d)) for d in trained], "chunk": FLAGS.chunk,
      "model": {"features": FLAGS.features, "depth": FLAGS.depth}})
  plots.histories(history, [label(d) for d in trained], os.path.join(out, "histories.png"))
  index = {d: i for i, d in enumerate(trained)}
  take = lambda doms: jax.tree_util.tree_map(lambda a: a[np.array([index[d] for d in doms])],
                                             variables)

  os.makedirs(os.path.join(out, "results"), exist_ok=True)
  summary = [f"# {grid.name} ({FLAGS.scale}), adaptation {FLAGS.adapt_mode}"
             f"{', transductive' if FLAGS.transductive else ''}", ""]
  for group in grid.groups:
    path = os.path.join(out, "results", f"{group.label}.json")
    if os.path.exists(path):
      with open(path) as f:
        res = json.load(f)
      print(f"[{group.label}] scores restored from {path}", flush=True)
    else:
      bar = Progress(len(group.sources) * len(group.targets), f"[{group.label}] pairs")
      src_eval = dataset(group.sources, "eval", FLAGS.n_eval)
      tgt_eval = dataset(group.targets, "eval", FLAGS.n_eval)
      tgt_adapt = tgt_eval[0] if FLAGS.transductive else dataset(group.targets, "adapt", FLAGS.n_adapt)[0]
      scores = sweep.evaluate_grid(
          model, take(group.sources), src_eval, tgt_adapt, tgt_eval, mode=FLAGS.adapt_mode,
          oracle=take(group.targets) if FLAGS.oracle else None, strategy=FLAGS.strategy,
          pair_chunk=FLAGS.pair_chunk, batch_size=FLAGS.adapt_batch_size,
          progress=lambda d, t: bar.update(d))
      res = {"sources": [list(dataclasses.astuple(d)) for d in group.sources],
             "targets": [list(dataclasses.astuple(d)) for d in group.targets],
             "mask_fraction": float(tgt_eval[1].mean()),
             **{k: np.asarray(v).tolist() for k, v in scores.items()}}
      checkpoint.write_json_atomic(path, res)
    rows = [label(data.Domain(*d)) for d in res["sources"]]
    cols = [label(data.Domain(*d)) for d in res["targets"]]
    none, adapted = np.asarray(res["iou_no_adapt"]), np.asarray(res["iou_adapted"])
    if group.layout == "sigma_panels":
      targets = [data.Domain(*d) for d in res["targets"]]
      plots.sigma_panels(targets, adapted[0], os.path.join(out, f"{group.label}_panels_adapted.png"),
                         f"{grid.name}: IoU with BN adaptation, source {rows[0]}")
      plots.sigma_panels(targets, none[0], os.path.join(out, f"{group.label}_panels_no_adapt.png"),
                         f"{grid.name}: IoU without adaptation, source {rows[0]}")
    else:
      plots.heatmaps(none, adapted, rows, cols, os.path.join(out, f"{group.label}_heatmaps.png"),
                     f"{grid.name} {group.label}")
      plots.surface(adapted, rows, cols, os.path.join(out, f"{group.label}_surface.png"),
                    "IoU adapted", f"{grid.name} {group.label}: IoU with BN adaptation")
    src_iou = np.asarray(res["source_iou"])[:, 0]
    summary += [f"## {group.label}: {len(rows)} sources x {len(cols)} targets, "
                f"target mask fraction {res['mask_fraction']:.3f}", "",
                f"- mean IoU without adaptation {none.mean():.3f}, with {adapted.mean():.3f}"
                f"{', oracle %.3f' % np.mean(res['iou_oracle']) if 'iou_oracle' in res else ''}",
                f"- source IoU per source: {', '.join(f'{v:.3f}' for v in src_iou)}",
                f"- largest |adapted - source IoU|: {np.abs(adapted - src_iou[:, None]).max():.3f}",
                ""]
  summary.append(f"({time.perf_counter() - start:.0f} s this run)")
  text = "\n".join(summary)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(text + "\n")
  print("\n" + text)


if __name__ == "__main__":
  app.run(main)
