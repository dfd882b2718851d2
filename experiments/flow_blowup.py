r"""Where do a flow's BatchNorm running statistics blow up, and what repairs it?

    python experiments/flow_blowup.py --config=experiments/configs/flow_blowup.py --workdir=runs/flow_blowup

(the config file gives the expected runtime and result).

A search, one factor at a time, from bnjax's generative study (RealNVP on
8x8 digits, one BatchNorm statistic per channel, tanh-bounded log-scales,
dequantised data) toward the flow of the diary (``flow-batchnorm-diary.md``:
MNIST-like constant borders, a BatchNorm of the flattened example, i.e. one
statistic per pixel, unbounded log-scales, no dequantisation), then the
diary's flow with one repair each. Every setting is trained at every batch
size of ``config.batch_sizes`` (``config.seeds`` seeds) on 1500 digits and
measured on the 297 held out:

* validation bits/dim with the running statistics (mean, median, the worst
  image, how many are not finite), and with the statistics recomputed
  exactly on the training images (:func:`bnjax.adapt.recompute_batch_stats`);
* the running statistics against the exact ones: per BatchNorm layer and
  feature ``(running var + eps) / (exact var + eps)``
  (:func:`bnjax.flows.variance_ratios` against the exact statistics), its
  smallest and largest value and the layer holding the smallest;
* the mechanism: each layer's share of the validation log-determinant
  with running and with exact statistics (:meth:`bnjax.flows.RealNVP.
  layer_log_dets`), and the share of ``0.5 |z|^2`` carried by the pixels
  that are constant over the training images (the padded border).

Outputs (:mod:`bnjax.workdir`; one resumable unit per setting, batch size
and seed): ``flow_blowup.md`` (the tables), ``flow_blowup.csv`` (one row per
flow), ``flow_blowup.json`` (every number), ``blowup.png`` (the worst
validation bits/dim and the smallest variance ratio against the batch size,
one colour per setting, running solid and exact dashed) and ``layers.png``
(the worst flow's per-layer log-determinant, running against exact), each
with its numbers in JSON beside it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import adapt, data, flows
from bnjax import config as cfg
from bnjax.cli import main
from bnjax.progress import Progress
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "flow_blowup.py")
LEVELS = data.DIGITS_LEVELS
FIELDS = ("setting", "batch_size", "seed", "diverged", "train_bpd", "val_bpd_running",
          "val_bpd_running_median", "val_bpd_running_max", "val_non_finite", "val_bpd_exact",
          "val_bpd_exact_max", "ratio_min", "ratio_max", "ratio_min_layer", "border_share",
          "seconds")
_FLOW_KEYS = ("size", "norm", "norm_axes", "bounded", "dequantize", "dtype", "epsilon",
              "momentum", "features", "blocks", "couplings", "steps", "learning_rate")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One flow and its training, resolved from ``base`` and a setting's overrides."""

  name: str
  size: int
  norm: str
  norm_axes: str
  bounded: bool
  dequantize: bool
  dtype: str
  epsilon: float
  momentum: float
  features: int
  blocks: int
  couplings: int
  steps: int
  learning_rate: float

  def model(self) -> flows.RealNVP:
    return flows.RealNVP((self.size, self.size, 1), features=self.features, blocks=self.blocks,
                         couplings=self.couplings, norm=self.norm, momentum=self.momentum,
                         epsilon=self.epsilon, norm_axes=self.norm_axes,
                         bounded_scales=self.bounded)

  def flow_config(self, batch_size: int, seed: int) -> flows.FlowConfig:
    return flows.FlowConfig(steps=self.steps, batch_size=batch_size, levels=LEVELS,
                            learning_rate=self.learning_rate, seed=seed,
                            dequantize=self.dequantize, dtype=self.dtype,
                            check_every=max(1, self.steps // 6))


@dataclasses.dataclass(frozen=True)
class Plan:
  settings: list
  batch_sizes: list


def plan_of(config) -> Plan:
  """Every setting resolved and checked (its model built, its FlowConfig
  made) before anything trains; a ConfigError naming the key otherwise."""
  cfg.positive_int(config.seed, "seed", minimum=0)
  cfg.positive_int(config.seeds, "seeds")
  cfg.positive_int(config.n_val, "n_val", minimum=10)
  batch_sizes = cfg.ints(config.batch_sizes, 2, 1500, "batch_sizes")
  if config.n_val > 1797 - max(batch_sizes):
    raise cfg.ConfigError(f"config.n_val must leave at least max(batch_sizes) = "
                          f"{max(batch_sizes)} of the 1797 digits for training, got "
                          f"{config.n_val}")
  names = [t.strip() for t in str(config.run).split(",") if t.strip()]
  if not names:
    raise cfg.ConfigError("config.run must name at least one setting")
  settings = []
  for name in names:
    if name not in config.settings:
      raise cfg.ConfigError(f"config.run: {name!r} is not one of config.settings "
                            f"{sorted(config.settings)}")
    over = dict(config.settings[name])
    unknown = sorted(set(over) - set(_FLOW_KEYS))
    if unknown:
      raise cfg.ConfigError(f"config.settings.{name}.{unknown[0]} is not a flow setting "
                            f"{_FLOW_KEYS}")
    values = {k: over.get(k, config.base[k]) for k in _FLOW_KEYS}
    if values["size"] not in (8, 16):
      raise cfg.ConfigError(f"config.settings.{name}.size must be 8 (the digits) or 16 "
                            f"(padded), got {values['size']}")
    setting = Setting(name, **values)
    cfg.value(f"settings.{name}", lambda s: s.model().init(
        jax.random.key(0), jnp.full((2, s.size, s.size, 1), 0.5), train=True), setting)
    for b in batch_sizes:
      cfg.value(f"settings.{name}", setting.flow_config, b, config.seed)
    settings.append(setting)
  return Plan(settings, batch_sizes)


# --------------------------------------------------------------------------
# Data and measures


def _digits(config):
  """(train, val) digits, float32[n, 8, 8, 1]: a seeded split."""
  images, _ = data.digits()
  order = np.random.default_rng(config.seed).permutation(len(images))
  return images[order[config.n_val:]], images[order[: config.n_val]]


def _sized(images, size: int):
  """The digits at ``size``: as they are (8), or padded with 4 zero pixels
  on each side (16), a border that is 0 in every image as MNIST's is."""
  pad = (size - images.shape[1]) // 2
  return np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _per_image_bpd(model, variables, x):
  lp = np.asarray(model.apply(variables, x, method="log_prob"), np.float64)
  return np.asarray(flows.bits_per_dim(lp, math.prod(x.shape[1:]), LEVELS), np.float64)


def border_share(z, constant) -> float:
  """The share of ``0.5 |z|^2`` (summed over the images) carried by the
  pixels that are ``constant`` (bool[H, W, C]) over the training images."""
  half_sq = 0.5 * np.square(np.asarray(z, np.float64)).sum(0)
  total = half_sq.sum()
  return float(half_sq[constant].sum() / total) if np.isfinite(total) and total > 0 else float(
      "nan")


def _layer_means(model, variables, x) -> dict:
  shares = model.apply(variables, x, method="layer_log_dets")
  return {k: float(np.mean(np.asarray(v, np.float64))) for k, v in shares.items()}


def measure(setting: Setting, batch_size: int, seed: int, config, train, val) -> dict:
  """Trains one flow and measures it (the row and its per-layer numbers)."""
  model = setting.model()
  fc = setting.flow_config(batch_size, config.seed + seed)
  key = data.named_key(config.seed, "flow_blowup", "dequantize")
  row = {"setting": setting.name, "batch_size": batch_size, "seed": seed, "diverged": ""}
  try:
    variables, history = flows.fit(data.named_key(config.seed + seed, "flow"), model, train,
                                   fc, verbose=False)
  except FloatingPointError as e:  # training itself diverged: recorded, not raised
    row.update({k: float("nan") for k in FIELDS if k not in row})
    row["diverged"], row["ratio_min_layer"] = str(e).split(";")[0], ""
    return {"row": row}
  dtype = jnp.dtype(setting.dtype)
  if setting.dequantize:
    x_val = flows.dequantize(jax.random.fold_in(key, 0), val, LEVELS).astype(dtype)
    x_tr = flows.dequantize(jax.random.fold_in(key, 1), train, LEVELS).astype(dtype)
  else:
    x_val, x_tr = jnp.asarray(val, dtype), jnp.asarray(train, dtype)
  running = _per_image_bpd(model, variables, x_val)
  row.update({"train_bpd": float(np.mean(history["bits_per_dim"][-max(1, fc.steps // 10):])),
              "val_bpd_running": float(np.mean(running)),
              "val_bpd_running_median": float(np.median(running)),
              "val_bpd_running_max": float(np.max(running)),
              "val_non_finite": int(np.sum(~np.isfinite(running))),
              "seconds": float(history["seconds"])})
  out = {"row": row, "layers_running": _layer_means(model, variables, x_val)}
  z, _ = model.apply(variables, x_val)
  row["border_share"] = border_share(z, np.all(train == train[:1], axis=0))
  if setting.norm == "batch":
    exact_vars = adapt.recompute_batch_stats(model, variables, x_tr, image_range=(0.0, 1.0))
    exact = _per_image_bpd(model, exact_vars, x_val)
    ratios = flows.variance_ratios(model, variables, exact_vars)
    lows = {k: float(np.min(v)) for k, v in ratios.items()}
    low = min(lows, key=lows.get)
    row.update({"val_bpd_exact": float(np.mean(exact)), "val_bpd_exact_max": float(np.max(exact)),
                "ratio_min": lows[low],
                "ratio_max": float(max(np.max(v) for v in ratios.values())),
                "ratio_min_layer": low})
    out["layers_exact"] = _layer_means(model, exact_vars, x_val)
    first = sorted(ratios, key=lambda k: int(k.split("_")[-1]))[0]
    out["first_layer_ratio"] = np.asarray(ratios[first], np.float64).tolist()
  else:
    row.update({"val_bpd_exact": float("nan"), "val_bpd_exact_max": float("nan"),
                "ratio_min": float("nan"), "ratio_max": float("nan"), "ratio_min_layer": ""})
  return out


def _unit(setting, b, seed, config, train, val) -> dict:
  """One flow, in 64-bit JAX where its setting asks for it."""
  t0 = time.perf_counter()
  if setting.dtype == "float64":
    with jax.enable_x64(True):
      out = measure(setting, b, seed, config, train, val)
  else:
    out = measure(setting, b, seed, config, train, val)
  out["row"]["seconds_total"] = time.perf_counter() - t0
  return out


# --------------------------------------------------------------------------
# Report


def _fmt(v, digits: int = 3) -> str:
  if isinstance(v, str):
    return v or "-"
  if not np.isfinite(v):
    return "inf" if v == float("inf") else ("-inf" if v == -float("inf") else "nan")
  if abs(v) >= 1e4 or 0 < abs(v) < 1e-3:
    return f"{v:.2e}"
  return f"{v:.{digits}f}"


def _worst(rows):
  """The flow whose worst validation image costs most with the running
  statistics, among those whose costs are finite (one whose costs are all
  NaN or infinite shows no layer's share; then any)."""
  done = [r for r in rows if not r["diverged"]]
  finite = [r for r in done if np.isfinite(r["val_bpd_running_max"])]
  pool = finite or done
  return max(pool, key=lambda r: r["val_bpd_running_max"]) if pool else None


def _layer_order(names):
  """Layers in the order they run: the logit first, then by index."""
  return sorted(names, key=lambda n: -1 if n == "logit" else int(n.split()[0]))


def _figures(wd, plan, rows, units):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
  colour = {s.name: colours[i % 20] for i, s in enumerate(plan.settings)}
  # Left: the search (every setting but the repairs); middle: the repairs,
  # beside the diary's flow they repair; right: the variance ratios.
  repairs = [s for s in plan.settings if s.name.startswith("repair_")]
  search = [s for s in plan.settings if not s.name.startswith("repair_")]
  reference = [s for s in search if s.name == "diary"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
  numbers = {}
  cap = 1e20  # where an infinite, NaN or larger value is drawn (marked ^)
  panels = ((axes[0], search, "The search: one change at a time"),
            (axes[1], reference + repairs, "The diary's flow and its repairs"))
  for ax, chosen, title in panels:
    for s in chosen:
      mine = sorted((r for r in rows if r["setting"] == s.name and not r["diverged"]),
                    key=lambda r: r["batch_size"])
      if not mine:
        continue
      b = [r["batch_size"] for r in mine]
      for key, style, label in (("val_bpd_running_max", "-", s.name),
                                ("val_bpd_exact_max", "--", None)):
        y = np.array([r[key] for r in mine], np.float64)
        if np.all(np.isnan(y)):
          continue
        shown = np.where(np.isfinite(y), np.minimum(y, cap), cap)
        ax.plot(b, shown, style, color=colour[s.name], marker="o", ms=3, label=label)
        over = shown >= cap
        ax.plot(np.array(b)[over], shown[over], "^", color=colour[s.name], ms=8)
        numbers.setdefault(s.name, {})[key] = dict(zip(map(str, b), y.tolist()))
      ratio = np.array([r["ratio_min"] for r in mine], np.float64)
      if ax is axes[0] or s in repairs:
        if np.any(np.isfinite(ratio)):
          axes[2].plot(b, ratio, "-", color=colour[s.name], marker="o", ms=3)
          numbers.setdefault(s.name, {})["ratio_min"] = dict(zip(map(str, b), ratio.tolist()))
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylabel("worst validation image, bits/dim (symlog; ^: not finite)")
    ax.set_title(f"{title}\nrunning statistics (solid), exact recomputation (dashed)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
  axes[2].set_yscale("log")
  axes[2].axhline(1.0, color="0.5", lw=0.8)
  axes[2].set_ylabel("smallest (running var + eps) / (exact var + eps)")
  axes[2].set_title("How far below the truth the running variances fall\n(colours as in "
                    "the other panels)", fontsize=9)
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training batch size")
    ax.grid(alpha=0.3)
  fig.suptitle("RealNVP on digits: where BatchNorm's running statistics blow up the "
               "validation loss", fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  fig.savefig(wd.file("blowup.png"), dpi=110)
  plt.close(fig)
  wd.write_json("blowup.json", numbers)
  worst = _worst(rows)
  if worst is None:
    return None
  unit = units[(worst["setting"], worst["batch_size"], worst["seed"])]
  if "layers_exact" not in unit:
    return worst
  names = _layer_order(unit["layers_running"])
  run_v = np.array([unit["layers_running"][k] for k in names])
  ex_v = np.array([unit["layers_exact"][k] for k in names])
  fig, ax = plt.subplots(figsize=(10, 4.5))
  pos = np.arange(len(names))
  ax.bar(pos - 0.2, run_v, 0.4, label="running statistics", color="tab:red")
  ax.bar(pos + 0.2, ex_v, 0.4, label="exact statistics", color="tab:blue")
  ax.set_yscale("symlog", linthresh=10)
  ax.set_xticks(pos, names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("mean log-determinant over validation images (nats, symlog)")
  ax.set_title(f"Each layer's log-determinant: {worst['setting']}, batch {worst['batch_size']}",
               fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(wd.file("layers.png"), dpi=110)
  plt.close(fig)
  wd.write_json("layers.json", {"setting": worst["setting"], "batch_size": worst["batch_size"],
                                "layers": names, "running": run_v.tolist(),
                                "exact": ex_v.tolist()})
  return worst


def report(wd, config, plan, rows, units) -> str:
  worst = _figures(wd, plan, rows, units)
  lines = [f"# Flow BatchNorm blow-up search ({config.preset}): {len(plan.settings)} settings x "
           f"batch sizes {plan.batch_sizes} x {config.seeds} seed(s)", "",
           "Validation bits/dim of the 297 held-out digits (without dequantisation a density "
           "on the discrete values: bits/dim can be negative); *running*: the running "
           "statistics, *exact*: recomputed on the training images; the worst image in "
           "brackets; ratio: the smallest and largest (running var + eps) / (exact var + eps) "
           "over every BatchNorm layer and feature; border: the share of 0.5 |z|^2 on pixels "
           "constant over the training images.", "",
           "| setting | batch | train | val running [worst] | not finite | val exact [worst] | "
           "ratio min / max (layer) | border |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["diverged"]:
      lines.append(f"| {r['setting']} | {r['batch_size']} | training diverged: {r['diverged']} "
                   "| | | | | |")
      continue
    lines.append(
        f"| {r['setting']} | {r['batch_size']} | {_fmt(r['train_bpd'])} | "
        f"{_fmt(r['val_bpd_running'])} [{_fmt(r['val_bpd_running_max'], 1)}] | "
        f"{r['val_non_finite']} | {_fmt(r['val_bpd_exact'])} [{_fmt(r['val_bpd_exact_max'], 1)}]"
        f" | {_fmt(r['ratio_min'], 4)} / {_fmt(r['ratio_max'], 1)} ({_fmt(r['ratio_min_layer'])})"
        f" | {_fmt(r['border_share'])} |")
  if worst is not None:
    unit = units[(worst["setting"], worst["batch_size"], worst["seed"])]
    lines += ["", f"## The worst flow: {worst['setting']}, batch {worst['batch_size']}", "",
              "Mean log-determinant of each layer over the validation images (nats): "
              "running against exact statistics (`layers.png`).", "",
              "| layer | running | exact |", "|---|---|---|"]
    for k in _layer_order(unit["layers_running"]):
      v = unit["layers_running"][k]
      lines.append(f"| {k} | {_fmt(v, 1)} | {_fmt(unit.get('layers_exact', {}).get(k, float('nan')), 1)} |")
  text = "\n".join(lines) + "\n"
  wd.write_text("flow_blowup.md", text)
  wd.write_csv("flow_blowup.csv", rows, FIELDS, ".6g")
  wd.write_json("flow_blowup.json", {"rows": rows, "units": {
      f"{s}|{b}|{k}": u for (s, b, k), u in units.items()}})
  return text


def run(config, workdir: str) -> list[dict]:
  """Runs the search of ``config`` into ``workdir``; returns every row."""
  plan = plan_of(config)
  wd = Workdir.open(workdir, "flow_blowup", config)
  start = time.perf_counter()
  train, val = _digits(config)
  cells = [(s, b, k) for s in plan.settings for b in plan.batch_sizes for k in range(config.seeds)]
  print(f"flow_blowup: {len(plan.settings)} settings x batch sizes {plan.batch_sizes} x "
        f"{config.seeds} seed(s) = {len(cells)} flows", flush=True)
  bar = Progress(len(cells), "flows")
  rows, units = [], {}
  for i, (s, b, k) in enumerate(cells, start=1):
    name = f"{s.name}__b{b}__s{k}"
    unit = wd.read_result(name)
    restored = unit is not None
    if unit is None:
      unit = _unit(s, b, k, config, _sized(train, s.size), _sized(val, s.size))
      wd.write_result(name, unit)
    rows.append(unit["row"])
    units[(s.name, b, k)] = unit
    bar.update(i, f"{name} {'restored' if restored else 'done'}", restored=restored)
  text = report(wd, config, plan, rows, units)
  print("\n" + text + f"\n({time.perf_counter() - start:.0f} s this run)", flush=True)
  return rows


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "flow_blowup")
