r"""Run a grid of source/target domains: train every source model in stacks,
score every pair without and with BN adaptation, write the figures.

    python experiments/sweep.py --config=experiments/configs/sweep.py:brightness --workdir=runs/brightness

The config file lists the grids, their commands, runtimes and expected
results. Resumable: models are trained in stacks of ``config.chunk``, each
stack a checkpoint; each group's scores are written atomically. Run the same
command again after an interruption and it goes on where it stopped; a workdir
made with another config is refused, naming the difference.

The workdir (:mod:`bnjax.workdir`) receives ``config.json``;
``checkpoints/chunk_NNNN``; ``results/models.json`` (the domain of each
trained model in stack order, its checkpoints and the groups),
``results/<group>.json``; per group
``<group>_heatmaps.png`` (+ CSV/JSON), ``<group>_surface.png`` (or
``<group>_panels_*.png`` for one source and many targets); ``histories.png``;
``summary.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import config as cfg
from bnjax import data, inference, models, plots, train
from bnjax.progress import Progress
from bnjax.cli import main
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "sweep.py") + ":brightness"


@dataclasses.dataclass(frozen=True)
class Group:
  """One K x M block of a grid: every source against every target."""

  label: str
  sources: tuple[data.Domain, ...]
  targets: tuple[data.Domain, ...]
  layout: str = "matrix"  # or "sigma_panels" (one source, many targets)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config resolved and checked whole (:func:`plan_of`)."""

  groups: list
  model: models.UNet
  train: train.TrainConfig
  adapt: dict


def plan_of(config) -> Plan:
  """Every value of ``config`` checked by the code that uses it, before
  anything is written or trained; a :class:`bnjax.config.ConfigError`
  naming the key otherwise."""
  cfg.positive_int(config.seed, "seed", minimum=0)
  groups = groups_of(config)
  size = cfg.image_size(config.data.size)
  for name in ("n_train", "n_eval", "n_adapt"):
    cfg.positive_int(config.data[name], f"data.{name}")
  for name in ("chunk", "pair_chunk"):
    cfg.positive_int(config[name], name)
  cfg.strategy(config.strategy)
  return Plan(groups, cfg.unet(config.model, image_size=size),
              cfg.train_config(config.train, n_images=config.data.n_train, seed=config.seed),
              cfg.adapt_options(config.adapt))


def parse_values(text: str, name: str) -> list[float]:
  """``"10,30,50"`` or a range ``"10:170:20"`` (inclusive stop) -> floats."""
  text = str(text).strip()
  try:
    if ":" in text:
      parts = [float(p) for p in text.split(":")]
      if len(parts) != 3 or parts[2] <= 0:
        raise ValueError
      start, stop, step = parts
      count = int(math.floor((stop - start) / step + 1e-9)) + 1
      return [start + i * step for i in range(max(count, 0))]
    return [float(p) for p in text.split(",") if p.strip()]
  except ValueError:
    raise cfg.ConfigError(f"config.custom.{name} must be a list 'a,b,c' or a range "
                          f"'start:stop:step' (step > 0), got {text!r}") from None


def groups_of(config) -> list[Group]:
  """The groups of the config (named grids list them; ``custom`` builds one)."""
  if config.grid == "custom":
    c = config.custom
    mu1s, deltas = parse_values(c.mu1, "mu1"), parse_values(c.delta, "delta")
    s1s = parse_values(c.sigma1, "sigma1")
    s2s = parse_values(c.sigma2, "sigma2") if c.sigma2 else None
    doms = [cfg.value("custom", data.Domain, m, s1, m + d, s2)
            for m, d, s1 in itertools.product(mu1s, deltas, s1s) for s2 in (s2s or [s1])
            if m + d <= 255]
    if not doms:
      raise cfg.ConfigError("config.custom: the grid is empty (every mu1 + delta exceeds 255)")
    return [Group("custom", tuple(doms), tuple(doms))]
  if not config.groups:
    raise cfg.ConfigError(f"config.groups is empty for grid {config.grid!r}")
  return [Group(g["label"], tuple(cfg.domains(g["sources"], f"groups[{i}].sources")),
                tuple(cfg.domains(g["targets"], f"groups[{i}].targets")),
                cfg.choice(g.get("layout", "matrix"), ("matrix", "sigma_panels"),
                           f"groups[{i}].layout"))
          for i, g in enumerate(config.groups)]


def _unique(domains) -> list[data.Domain]:
  return list(dict.fromkeys(domains))


def _dataset(config, domains, split, n):
  pairs = [data.split_dataset(config.seed, d, split, n, config.data.size) for d in domains]
  return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


def _train_all(wd: Workdir, config, model, domains, train_config):
  """Trains one model per domain in checkpointed stacks; returns the stacked
  variables and the stacked history."""
  chunks = [domains[i:i + config.chunk] for i in range(0, len(domains), config.chunk)]
  bar = Progress(len(domains), "models")
  done, variables, histories = 0, [], []
  for c, chunk in enumerate(chunks):
    name = f"chunk_{c:04d}"
    domains_json = [d.to_json() for d in chunk]
    first, last = done + 1, done + len(chunk)

    def fit():
      print(f"[models {first}-{last} of {len(domains)}] training a stack of {len(chunk)}",
            flush=True)
      x, y = _dataset(config, chunk, "train", config.data.n_train)
      seed0 = config.seed + domains.index(chunk[0])
      v, h = train.train_many(model, x, y, dataclasses.replace(train_config, seed=seed0),
                              strategy=config.strategy)
      h = {k: np.asarray(val, float) for k, val in h.items() if k != "seconds"}
      return v, {"history": {k: np.where(np.isnan(a), None, a).tolist() for k, a in h.items()}}

    v, meta, restored = wd.train_or_restore(name, fit, domains=domains_json)
    variables.append(v)
    histories.append({k: np.asarray(a, float) for k, a in meta["history"].items()})
    done += len(chunk)
    bar.update(done, f"models {first}-{last} of {len(domains)} "
                     f"{'restored' if restored else 'trained'}", restored=restored)
  stacked = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *variables)
  epochs = max(h["train_loss"].shape[0] for h in histories)
  pad = lambda a: np.pad(a, ((0, epochs - a.shape[0]), (0, 0)), constant_values=np.nan)
  history = {k: np.concatenate([pad(h[k]) for h in histories], axis=1)
             for k in ("train_loss", "val_loss", "val_dice")}
  return stacked, history


def label(d: data.Domain) -> str:
  return f"({d.mu1:g},{d.sigma1:g},{d.mu2:g},{d.sigma2:g})"


def _score_group(wd, config, plan, group, take) -> dict:
  res = wd.read_result(group.label)
  if res is not None:
    print(f"[{group.label}] scores restored from {wd.path}/results/{group.label}.json",
          flush=True)
    return res
  bar = Progress(len(group.sources) * len(group.targets), f"[{group.label}] pairs")
  src_eval = _dataset(config, group.sources, "eval", config.data.n_eval)
  tgt_eval = _dataset(config, group.targets, "eval", config.data.n_eval)
  tgt_adapt = (tgt_eval[0] if config.adapt.transductive
               else _dataset(config, group.targets, "adapt", config.data.n_adapt)[0])
  scores = inference.evaluate_grid(
      plan.model, take(group.sources), src_eval, tgt_adapt, tgt_eval,
      oracle=take(group.targets) if config.oracle else None, strategy=config.strategy,
      pair_chunk=config.pair_chunk, progress=lambda d, t: bar.update(d), name=group.label,
      **plan.adapt)
  res = {"sources": [d.to_json() for d in group.sources],
         "targets": [d.to_json() for d in group.targets],
         "mask_fraction": float(tgt_eval[1].mean()),
         **{k: np.asarray(v).tolist() for k, v in scores.items()}}
  wd.write_result(group.label, res)
  return res


def _figures(wd, group, res, grid_name):
  sources = [data.Domain.from_json(d) for d in res["sources"]]
  targets = [data.Domain.from_json(d) for d in res["targets"]]
  rows, cols = [label(d) for d in sources], [label(d) for d in targets]
  none, adapted = np.asarray(res["iou_no_adapt"]), np.asarray(res["iou_adapted"])
  name = grid_name if group.label == grid_name else f"{grid_name} {group.label}"
  if group.layout == "sigma_panels":
    plots.sigma_panels(targets, adapted[0], wd.file(f"{group.label}_panels_adapted.png"),
                       f"{grid_name}: IoU with BN adaptation, source {rows[0]}")
    plots.sigma_panels(targets, none[0], wd.file(f"{group.label}_panels_no_adapt.png"),
                       f"{grid_name}: IoU without adaptation, source {rows[0]}")
  else:
    plots.heatmaps(none, adapted, rows, cols, wd.file(f"{group.label}_heatmaps.png"),
                   f"{name}: IoU of each source model on each target", note=plots.DOMAIN_NOTE)
    plots.surface(adapted, rows, cols, wd.file(f"{group.label}_surface.png"),
                  "IoU adapted", f"{name}: IoU with BN adaptation", note=plots.DOMAIN_NOTE)
  src_iou = np.asarray(res["source_iou"])[:, 0]
  return [f"## {group.label}: {len(rows)} sources x {len(cols)} targets, "
          f"target mask fraction {res['mask_fraction']:.3f}", "",
          f"- mean IoU without adaptation {none.mean():.3f}, with {adapted.mean():.3f}"
          f"{', oracle %.3f' % np.mean(res['iou_oracle']) if 'iou_oracle' in res else ''}",
          f"- source IoU per source: {', '.join(f'{v:.3f}' for v in src_iou)}",
          f"- largest |adapted - source IoU|: {np.abs(adapted - src_iou[:, None]).max():.3f}",
          ""]


def run(config, workdir: str) -> dict:
  """Runs the grid of ``config`` into ``workdir``; returns ``{group: results}``."""
  plan = plan_of(config)
  groups, model, train_config = plan.groups, plan.model, plan.train
  wd = Workdir.open(workdir, "sweep", config)
  start = time.perf_counter()
  sources = _unique(d for g in groups for d in g.sources)
  trained = _unique(sources + [d for g in groups for d in g.targets]) if config.oracle else sources
  pairs = sum(len(g.sources) * len(g.targets) for g in groups)
  print(f"grid {config.grid} ({config.scale}): {len(groups)} group(s), {len(trained)} models "
        f"to train, {pairs} pairs; {config.data.size}x{config.data.size}, width "
        f"{config.model.features}, devices {jax.devices()}", flush=True)
  variables, history = _train_all(wd, config, model, trained, train_config)
  # What another experiment (predict_gain) reads back: no folder layout to guess.
  wd.write_result("models", {
      "domains": [d.to_json() for d in trained],
      "checkpoints": [f"chunk_{c:04d}" for c in range(-(-len(trained) // config.chunk))],
      "groups": [g.label for g in groups],
      "model": {"features": config.model.features, "depth": config.model.depth}})
  plots.histories(history, [label(d) for d in trained], wd.file("histories.png"),
                  f"{config.grid}: training of the {len(trained)} models",
                  note=plots.DOMAIN_NOTE)
  index = {d: i for i, d in enumerate(trained)}
  take = lambda doms: jax.tree_util.tree_map(lambda a: a[np.array([index[d] for d in doms])],
                                             variables)
  summary = [f"# {config.grid} ({config.scale}), adaptation {config.adapt.mode}"
             f"{', transductive' if config.adapt.transductive else ''}", ""]
  out = {}
  for group in groups:
    out[group.label] = res = _score_group(wd, config, plan, group, take)
    summary += _figures(wd, group, res, config.grid)
  summary.append(f"({time.perf_counter() - start:.0f} s this run)")
  text = "\n".join(summary)
  wd.write_text("summary.md", text + "\n")
  print("\n" + text)
  return out


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "sweep")
