r"""BatchNorm in generative models.

    python experiments/generative.py --config=experiments/configs/generative.py --workdir=runs/generative

(the config file gives the expected runtime and result).

Studies, each a resumable unit of the workdir (:mod:`bnjax.workdir`):

* **flows**: RealNVP flows (:mod:`bnjax.flows`) on scikit-learn's digits
  (1 500 training, 297 validation images, 17 grey levels, dequantised),
  with BatchNorm bijectors or ActNorm, trained at each batch size of
  ``flow.batch_sizes`` for ``flow.steps`` steps, ``flow.seeds`` seeds. Each
  BatchNorm flow's validation bits/dim with its running statistics
  (PyTorch's momentum rule), and after :func:`bnjax.adapt.recompute_batch_stats`
  on the training images (exact population statistics); ActNorm's beside.
* **latents**: ``||z||`` of the validation images against chi_d (the
  radius of a standard normal), a one-sample Kolmogorov-Smirnov statistic
  and the mean radius; samples at temperature 1 and ``flow.temperature``.
* **inpainting**: the bottom half of ``inpaint.images`` validation digits
  replaced by noise and filled by Adam steps on ``logit(x)``
  (:func:`bnjax.flows.inpaint`); MSE of the unknown pixels against the truth,
  before and after.
* **vae**: a classifier, an independent second classifier (another seed),
  and three VAEs (:mod:`bnjax.vae`): conditional with ``vae.lambda_label``,
  conditional with lambda 0, unconditional. The losses on the validation
  images; the rate at which a reconstruction under a wrong given label is
  classified as the given label, by the training classifier and by the
  independent one; figures of reconstructions under every label.
* **shifts**: a U-Net (width ``model.features``) and a BatchNorm flow trained
  on Perlin images of ``shift.source`` (the flow on images downsampled by
  ``shift.downsample``); for every shift and severity, the IoU gain of AdaBN
  and the flow's bits/dim before and after recomputing its statistics on
  the shifted images; Spearman (95 % bootstrap intervals) of the flow's
  change and of its bits/dim before adaptation against the gain.

Outputs: ``generative.md`` (every table), ``generative.json``, CSVs
(``flows.csv``, ``vae.csv``, ``shifts.csv``), figures ``flow_bpd.png``,
``latent_radius.png``, ``samples.png``, ``inpainting.png``,
``vae_labels_<model>.png``, ``shift_scatter.png`` (each with its numbers in
JSON beside it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax import adapt, data, flows, inference, metrics, plots, shifts, stats, train, vae
from bnjax import config as cfg
from bnjax.cli import main
from bnjax.progress import Progress
from bnjax._io import write_json_atomic
from bnjax.workdir import Workdir

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "generative.py")
LEVELS = data.DIGITS_LEVELS
FLOW_FIELDS = ("norm", "batch_size", "seed", "train_bpd", "val_bpd_running",
               "val_bpd_running_median", "val_bpd_running_max", "val_bpd_exact",
               "val_bpd_exact_max", "seconds")
VAE_FIELDS = ("model", "lambda_label", "total", "reconstruction", "kl", "label",
              "label_ce", "given_label_rate_wrong", "given_label_rate_wrong_independent",
              "given_label_rate_true", "input_spread", "seconds")
SHIFT_FIELDS = ("shift", "severity", "iou_no_adapt", "iou_adabn", "gain", "bpd_source_stats",
                "bpd_adapted", "bpd_change")


@dataclasses.dataclass(frozen=True)
class Plan:
  batch_sizes: list
  norms: list
  shifts: list
  severities: list
  unet: bnjax.UNet
  unet_train: train.TrainConfig


def plan_of(config) -> Plan:
  """Every value checked before anything runs (a ConfigError naming its key)."""
  cfg.positive_int(config.seed, "seed", minimum=0)
  batch_sizes = cfg.ints(config.flow.batch_sizes, 2, 1500, "flow.batch_sizes")
  norms = cfg.names(config.flow.norms, ("batch", "actnorm"), "flow.norms")
  for key in ("seeds", "features", "blocks", "couplings", "steps", "latent_batch"):
    cfg.positive_int(config.flow[key], f"flow.{key}")
  if "batch" not in norms:
    raise cfg.ConfigError("config.flow.norms must include 'batch' (the study's subject), "
                          f"got {config.flow.norms!r}")
  if config.flow.latent_batch not in batch_sizes:
    raise cfg.ConfigError(f"config.flow.latent_batch must be one of flow.batch_sizes "
                          f"{batch_sizes}, got {config.flow.latent_batch}")
  cfg.value("flow", flows.FlowConfig, learning_rate=config.flow.learning_rate,
            prefix="FlowConfig.")
  cfg.unit_interval(config.flow.momentum, "flow.momentum")
  cfg.positive_number(config.flow.temperature, "flow.temperature")
  cfg.positive_int(config.n_val, "n_val", minimum=10)
  if config.n_val > 1797 - max(batch_sizes):
    raise cfg.ConfigError(f"config.n_val must leave at least max(flow.batch_sizes) = "
                          f"{max(batch_sizes)} of the 1797 digits for training, got {config.n_val}")
  cfg.positive_int(config.inpaint.images, "inpaint.images")
  cfg.positive_int(config.inpaint.steps, "inpaint.steps")
  cfg.value("vae", vae.VAEConfig, steps=config.vae.steps, batch_size=config.vae.batch_size,
            learning_rate=config.vae.learning_rate, lambda_label=config.vae.lambda_label,
            wrong_label_rate=config.vae.wrong_label_rate, prefix="VAEConfig.")
  cfg.positive_int(config.vae.classifier_steps, "vae.classifier_steps")
  cfg.positive_int(config.vae.latent, "vae.latent")
  size = cfg.image_size(config.data.size)
  shift_names = cfg.names(config.shift.shifts, shifts.SHIFTS, "shift.shifts")
  severities = cfg.ints(config.shift.severities, 1, 5, "shift.severities")
  factor = cfg.positive_int(config.shift.downsample, "shift.downsample")
  if (size // factor) % 2:
    raise cfg.ConfigError(f"config.shift.downsample must leave an even image side, got "
                          f"{size} / {factor}")
  cfg.positive_int(config.shift.flow_steps, "shift.flow_steps")
  b = cfg.positive_int(config.shift.flow_batch_size, "shift.flow_batch_size")
  if b > config.data.n_train:
    raise cfg.ConfigError(f"config.shift.flow_batch_size must be <= data.n_train "
                          f"({config.data.n_train}), got {b}")
  cfg.positive_int(config.bootstrap, "bootstrap")
  return Plan(batch_sizes, norms, shift_names, severities,
              cfg.unet(config.model, image_size=size),
              cfg.train_config(config.train, n_images=config.data.n_train, seed=config.seed))


class _Models:
  """Progress over the models of the run, trained or restored."""

  def __init__(self, total: int):
    self.bar, self.done = Progress(total, "models"), 0

  def tick(self, name: str, restored: bool) -> None:
    self.done += 1
    self.bar.update(self.done, f"{name} {'restored' if restored else 'trained'}",
                    restored=restored)


# --------------------------------------------------------------------------
# Data


def _digits(config):
  """(train images, train labels, val images, val labels): a seeded split."""
  images, labels = data.digits()
  order = np.random.default_rng(config.seed).permutation(len(images))
  val, tr = order[: config.n_val], order[config.n_val:]
  return images[tr], labels[tr], images[val], labels[val]


def _per_image_bpd(model, variables, x, levels):
  lp = np.asarray(model.apply(variables, x, method="log_prob"), np.float64)
  return np.asarray(flows.bits_per_dim(lp, math.prod(x.shape[1:]), levels), np.float64)


def _flow_model(config, shape, norm):
  return flows.RealNVP(shape, features=config.flow.features, blocks=config.flow.blocks,
                       couplings=config.flow.couplings, norm=norm,
                       momentum=config.flow.momentum)


def _summary(values) -> dict:
  v = np.asarray(values, np.float64)
  finite = v[np.isfinite(v)]
  return {"mean": float(np.mean(v)) if np.all(np.isfinite(v)) else float("inf"),
          "median": float(np.median(v)), "max": float(np.max(v)),
          "non_finite": int(v.size - finite.size)}


# --------------------------------------------------------------------------
# The flow study


def flow_study(wd, config, plan, digits, bar):
  """Trains (or restores) every flow; the rows of flows.csv and the models."""
  x_tr, _, x_val, _ = digits
  key = data.named_key(config.seed, "generative", "dequantize")
  val = flows.dequantize(jax.random.fold_in(key, 0), x_val, LEVELS)
  train_deq = flows.dequantize(jax.random.fold_in(key, 1), x_tr, LEVELS)
  rows, models = [], {}
  for seed in range(config.flow.seeds):
    for b in plan.batch_sizes:
      for norm in plan.norms:
        name = f"flow_{norm}_b{b}_s{seed}"
        model = _flow_model(config, x_tr.shape[1:], norm)
        fc = flows.FlowConfig(steps=config.flow.steps, batch_size=b, levels=LEVELS,
                              learning_rate=config.flow.learning_rate, seed=config.seed + seed)

        def fit(model=model, fc=fc, seed=seed, name=name):
          print(f"{name}: training", flush=True)
          variables, history = flows.fit(data.named_key(config.seed + seed, "flow"), model,
                                         x_tr, fc)
          return variables, {"bits_per_dim": history["bits_per_dim"].tolist(),
                             "seconds": history["seconds"]}

        variables, meta, restored = wd.train_or_restore(name, fit, steps=fc.steps)
        bar.tick(name, restored)
        running = _summary(_per_image_bpd(model, variables, val, LEVELS))
        row = {"norm": norm, "batch_size": b, "seed": seed,
               "train_bpd": float(np.mean(meta["bits_per_dim"][-50:])),
               "val_bpd_running": running["mean"],
               "val_bpd_running_median": running["median"],
               "val_bpd_running_max": running["max"],
               "val_bpd_exact": float("nan"), "val_bpd_exact_max": float("nan"),
               "seconds": float(meta["seconds"])}
        exact_vars = variables
        if norm == "batch":
          exact_vars = adapt.recompute_batch_stats(model, variables, train_deq)
          exact = _summary(_per_image_bpd(model, exact_vars, val, LEVELS))
          row["val_bpd_exact"], row["val_bpd_exact_max"] = exact["mean"], exact["max"]
        rows.append(row)
        models[(norm, b, seed)] = (model, variables, exact_vars)
  return rows, models, val


def _chi_cdf(r, d):
  """The CDF of chi_d: the regularised lower incomplete gamma P(d/2, r^2/2),
  in float64 (locally; never a global setting)."""
  with jax.enable_x64(True):
    r = jnp.asarray(np.asarray(r, np.float64))
    return np.asarray(jax.scipy.special.gammainc(d / 2.0, r ** 2 / 2.0), np.float64)


def _chi_pdf(r, d):
  r = np.asarray(r, np.float64)
  return np.exp((d - 1) * np.log(np.maximum(r, 1e-300)) - r ** 2 / 2
                - (d / 2 - 1) * math.log(2) - math.lgamma(d / 2))


def ks_against_chi(radii, d: int) -> float:
  """One-sample Kolmogorov-Smirnov statistic of the radii against chi_d."""
  r = np.sort(np.asarray(radii, np.float64))
  n = len(r)
  cdf = _chi_cdf(r, d)
  return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def latent_study(wd, config, models, val):
  """||z|| against chi_d for the flows at flow.latent_batch, seed 0; samples."""
  b, d = config.flow.latent_batch, math.prod(val.shape[1:])
  variants = {"BatchNorm, running statistics": ("batch", 1),
              "BatchNorm, recomputed (exact)": ("batch", 2),
              "ActNorm": ("actnorm", 1)}
  out, radii = {}, {}
  for label, (norm, which) in variants.items():
    if (norm, b, 0) not in models:
      continue
    model, *vs = models[(norm, b, 0)]
    z, _ = model.apply(vs[which - 1], val)
    r = np.linalg.norm(np.asarray(z, np.float64).reshape(len(z), -1), axis=1)
    radii[label] = r
    out[label] = {"mean_radius": float(np.mean(r)), "std_radius": float(np.std(r)),
                  "ks_chi": ks_against_chi(r, d)}
  expected = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
  out["chi_d"] = {"d": d, "mean_radius": expected,
                  "std_radius": math.sqrt(max(d - expected ** 2, 0.0))}
  _radius_figure(wd.file("latent_radius.png"), radii, d, b)
  # samples at temperature 1 and the configured one
  rows, images = [], []
  key = data.named_key(config.seed, "generative", "samples")
  for label, (norm, which) in variants.items():
    if which == 1 and norm == "batch" or (norm, b, 0) not in models:
      continue
    model, *vs = models[(norm, b, 0)]
    for t in (1.0, float(config.flow.temperature)):
      s = np.asarray(model.apply(vs[which - 1], key, 8, t, method="sample"))
      rows.append(f"{label}\nT = {t:g}")
      images.append(list(np.clip(s, 0, 1)))
  plots.image_grid(images, rows, [f"sample {i + 1}" for i in range(8)], wd.file("samples.png"),
                   title=f"Flow samples (batch size {b}, seed 0)")
  return out


def _radius_figure(path, radii, d, b):
  plt = plots._plt()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  colours = plots._fixed_colours(list(radii))
  hi = max(float(np.percentile(r, 99)) for r in radii.values()) if radii else 2 * math.sqrt(d)
  lo = min(float(np.percentile(r, 1)) for r in radii.values()) if radii else 0.0
  grid = np.linspace(max(0.0, min(lo, math.sqrt(d)) - 1.0), max(hi, 1.4 * math.sqrt(d)), 400)
  for label, r in radii.items():
    ax.hist(np.clip(r, grid[0], grid[-1]), bins=40, range=(grid[0], grid[-1]), density=True,
            alpha=0.45,
            color=colours[label], label=f"{label} (mean {np.mean(r):.1f})")
  ax.plot(grid, _chi_pdf(grid, d), color="black", lw=1.5, label=f"chi_{d} (a standard normal)")
  ax.set_xlabel("||z|| of a validation digit")
  ax.set_ylabel("density")
  ax.set_title(f"Latent radius against chi_{d} (flows at batch size {b}, seed 0)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  write_json_atomic(path[:-4] + ".json", {
      "d": d, "radii": {k: np.asarray(v).tolist() for k, v in radii.items()}})


def inpaint_study(wd, config, models, val, x_val):
  b, n = config.flow.latent_batch, min(config.inpaint.images, len(x_val))
  truth = np.asarray(x_val[:n], np.float32)
  known = np.ones_like(truth, bool)
  known[:, truth.shape[1] // 2:] = False
  rng = np.random.default_rng(config.seed)
  corrupted = np.where(known, truth, rng.uniform(0, 1, truth.shape)).astype(np.float32)
  mse = lambda a: float(np.mean((np.asarray(a)[~known] - truth[~known]) ** 2))
  out = {"corrupted_mse": mse(corrupted), "unknown": "bottom half", "images": n}
  panels, rows = [list(corrupted[:8])], ["corrupted"]
  for label, (norm, which) in {"BatchNorm (recomputed)": ("batch", 2),
                               "ActNorm": ("actnorm", 1)}.items():
    if (norm, b, 0) not in models:
      continue
    model, *vs = models[(norm, b, 0)]
    filled, lp = flows.inpaint(model, vs[which - 1], corrupted, known,
                               steps=config.inpaint.steps,
                               learning_rate=config.inpaint.learning_rate)
    out[label] = {"mse": mse(filled), "log_prob_first": float(lp[0]),
                  "log_prob_last": float(lp[-1])}
    panels.append(list(np.asarray(filled)[:8]))
    rows.append(f"inpainted\n{label}")
  panels.append(list(truth[:8]))
  rows.append("truth")
  plots.image_grid(panels, rows, [f"digit {i + 1}" for i in range(8)], wd.file("inpainting.png"),
                   title="Inpainting the bottom half by Adam steps on logit(x)")
  return out


# --------------------------------------------------------------------------
# The VAE study


def input_spread(model, variables, images) -> float:
  """How much a reconstruction still depends on its input once the label is
  fixed: the per-pixel standard deviation across ``images`` of their
  reconstructions (posterior mean) under one given label, averaged over
  pixels and over the 10 labels. 0: every image is redrawn as one template
  of the given class."""
  spreads = []
  for c in range(10):
    logits, _, _ = model.apply(variables, images, jnp.full((len(images),), c, jnp.int32))
    spreads.append(float(np.mean(np.std(np.asarray(jax.nn.sigmoid(logits)), axis=0))))
  return float(np.mean(spreads))


def vae_study(wd, config, digits, bar):
  x_tr, y_tr, x_val, y_val = digits
  shape = x_tr.shape[1:]
  vc = lambda **kw: vae.VAEConfig(**{**dict(
      steps=config.vae.steps, batch_size=config.vae.batch_size,
      learning_rate=config.vae.learning_rate, lambda_label=config.vae.lambda_label,
      wrong_label_rate=config.vae.wrong_label_rate, seed=config.seed), **kw})
  clf = vae.Classifier(10, config.vae.features)
  classifiers = {}
  for name, seed in (("classifier", 0), ("classifier_independent", 1)):
    def fit(seed=seed):
      v, h = vae.fit_classifier(data.named_key(config.seed + seed, "classifier"), clf, x_tr, y_tr,
                                vc(steps=config.vae.classifier_steps, seed=config.seed + seed))
      return v, {"seconds": h["seconds"]}
    v, _, restored = wd.train_or_restore(name, fit, steps=config.vae.classifier_steps)
    classifiers[name] = (clf, v)
    bar.tick(name, restored)
  accuracy = {k: float(np.mean(vae.classify(c, x_val) == y_val)) for k, c in classifiers.items()}
  lam = float(config.vae.lambda_label)
  variants = {f"conditional, lambda {lam:g}": (True, lam), "conditional, lambda 0": (True, 0.0),
              "unconditional": (False, 0.0)}
  rows = []
  wrong, _ = vae.corrupt_labels(data.named_key(config.seed, "wrong labels"), y_val, 1.0, 10)
  for i, (label, (conditional, lam_i)) in enumerate(variants.items()):
    model = vae.ConditionalVAE(shape, latent=config.vae.latent, num_classes=10,
                               features=config.vae.features, conditional=conditional)

    def fit(model=model, lam_i=lam_i, i=i):
      v, h = vae.fit(data.named_key(config.seed, "vae", i), model, x_tr, y_tr,
                     classifiers["classifier"], vc(lambda_label=lam_i))
      return v, {"seconds": h["seconds"], "last": h["losses"][-50:].mean(0).tolist()}

    v, meta, restored = wd.train_or_restore(f"vae{i}", fit, steps=config.vae.steps,
                                            lambda_label=lam_i)
    bar.tick(f"VAE {label}", restored)
    losses = vae.losses(model, v, x_val, y_val, classifiers["classifier"], lambda_label=lam)
    own = vae.losses(model, v, x_val, y_val, classifiers["classifier"], lambda_label=lam_i) if (
        lam_i > 0) else {"label": 0.0, "total": losses["reconstruction"] + losses["kl"]}
    rows.append({
        "model": label, "lambda_label": lam_i, "total": own["total"],
        "reconstruction": losses["reconstruction"], "kl": losses["kl"], "label": own["label"],
        "label_ce": losses["label"] / lam,
        "given_label_rate_wrong": vae.given_label_rate(model, v, classifiers["classifier"],
                                                       x_val, wrong),
        "given_label_rate_wrong_independent": vae.given_label_rate(
            model, v, classifiers["classifier_independent"], x_val, wrong),
        "given_label_rate_true": vae.given_label_rate(model, v, classifiers["classifier"],
                                                      x_val, y_val),
        "input_spread": input_spread(model, v, x_val),
        "seconds": float(meta["seconds"])})
    if conditional:
      grid = [list(x_val[:8])]
      for c in range(10):
        logits, _, _ = model.apply(v, x_val[:8], jnp.full((8,), c, jnp.int32))
        grid.append(list(np.asarray(jax.nn.sigmoid(logits))))
      slug = "lambda0" if lam_i == 0 else "lambda"
      plots.image_grid(grid, ["input"] + [f"given {c}" for c in range(10)],
                       [f"true {int(t)}" for t in y_val[:8]], wd.file(f"vae_labels_{slug}.png"),
                       title=f"VAE ({label}): reconstructions under every given label")
  return rows, {**accuracy, "data_spread": float(np.mean(np.std(x_val, axis=0)))}


# --------------------------------------------------------------------------
# The shift study


def shift_study(wd, config, plan, bar):
  source = cfg.domain(config.shift.source, "shift.source")
  size, factor = config.data.size, config.shift.downsample
  split = lambda s, n: data.split_dataset(config.seed, source, s, n, size)
  x_tr, y_tr = split("train", config.data.n_train)
  x_ev, y_ev = split("eval", config.shift.n_eval)
  x_ad, y_ad = split("adapt", config.shift.n_adapt)

  def fit_unet():
    v, h = train.fit(plan.unet, x_tr, y_tr, plan.unet_train)
    return v, {"history": h}
  u_vars, _, restored = wd.train_or_restore("unet", fit_unet, seed=config.seed)
  bar.tick("U-Net", restored)
  small = lambda x: data.downsample(np.asarray(x), factor)
  fmodel = flows.RealNVP(tuple(small(x_tr[:1]).shape[1:]), features=config.flow.features,
                         blocks=config.flow.blocks, couplings=config.flow.couplings,
                         norm="batch", momentum=config.flow.momentum)
  fc = flows.FlowConfig(steps=config.shift.flow_steps, batch_size=config.shift.flow_batch_size,
                        levels=256, learning_rate=config.flow.learning_rate, seed=config.seed)

  def fit_flow():
    v, h = flows.fit(data.named_key(config.seed, "shift flow"), fmodel, small(x_tr), fc)
    return v, {"seconds": h["seconds"]}
  f_vars, _, restored = wd.train_or_restore("shift_flow", fit_flow, steps=fc.steps)
  bar.tick("shift flow", restored)
  key = data.named_key(config.seed, "generative", "shift dequantize")
  deq = lambda x, i: flows.dequantize(jax.random.fold_in(key, i), small(x), 256)
  f_vars = adapt.recompute_batch_stats(fmodel, f_vars, deq(x_tr, 0))  # exact source statistics
  bpd = lambda v, x: float(np.mean(_per_image_bpd(fmodel, v, x, 256)))
  iou = lambda v, x, y: metrics.iou(inference.predict(plan.unet, v, x), y)
  reference = {"iou_source": iou(u_vars, x_ev, y_ev), "bpd_source": bpd(f_vars, deq(x_ev, 1))}
  rows = []
  for s in plan.shifts:
    for sev in plan.severities:
      k = data.named_key(config.seed, "shift", s, sev)
      xe, ye = shifts.apply(jax.random.fold_in(k, 0), x_ev, y_ev, s, sev)
      xa, _ = shifts.apply(jax.random.fold_in(k, 1), x_ad, y_ad, s, sev)
      adapted = adapt.recompute_batch_stats(plan.unet, u_vars, xa)
      none, ada = iou(u_vars, xe, ye), iou(adapted, xe, ye)
      fe = deq(xe, 2)
      f_adapted = adapt.recompute_batch_stats(fmodel, f_vars, deq(xa, 3))
      before, after = bpd(f_vars, fe), bpd(f_adapted, fe)
      rows.append({"shift": s, "severity": sev, "iou_no_adapt": none, "iou_adabn": ada,
                   "gain": ada - none, "bpd_source_stats": before, "bpd_adapted": after,
                   "bpd_change": before - after})
  rng = np.random.default_rng(config.seed)
  gain = np.array([r["gain"] for r in rows])
  corr = {}
  for name in ("bpd_change", "bpd_source_stats"):
    x = np.array([r[name] for r in rows])
    corr[name] = {"spearman": float(stats.spearman(x, gain)),
                  "ci95": stats.bootstrap_ci(stats.spearman, x, gain, config.bootstrap, rng)}
  _shift_figure(wd.file("shift_scatter.png"), rows, corr)
  return rows, corr, reference


def _shift_figure(path, rows, corr):
  plt = plots._plt()
  names = sorted({r["shift"] for r in rows})
  colours = plots._fixed_colours(names)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, key, xlabel in ((axes[0], "bpd_change", "flow bits/dim: source statistics - adapted"),
                          (axes[1], "bpd_source_stats", "flow bits/dim with source statistics")):
    for s in names:
      pts = [r for r in rows if r["shift"] == s]
      ax.scatter([r[key] for r in pts], [r["gain"] for r in pts], color=colours[s], label=s,
                 s=[12 + 10 * r["severity"] for r in pts])
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("IoU gain of AdaBN", fontsize=8)
    c = corr[key]
    ax.set_title(f"Spearman {c['spearman']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]",
                 fontsize=9)
    if key == "bpd_source_stats":
      ax.set_xscale("log")
    else:
      ax.set_xscale("symlog", linthresh=1.0)
  axes[0].legend(fontsize=7, title="shift (size = severity)", title_fontsize=7)
  fig.suptitle("Does the BatchNorm flow's bits/dim rank AdaBN's segmentation gain?", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  write_json_atomic(path[:-4] + ".json", {"rows": rows, "spearman": corr})


# --------------------------------------------------------------------------
# Report


def _flow_figure(path, rows, plan):
  plt = plots._plt()
  series = {"BatchNorm, running statistics": ("batch", "val_bpd_running"),
            "BatchNorm, recomputed (exact)": ("batch", "val_bpd_exact"),
            "ActNorm": ("actnorm", "val_bpd_running")}
  colours = plots._fixed_colours(list(series))
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for label, (norm, key) in series.items():
    pts = [(r["batch_size"], r[key]) for r in rows if r["norm"] == norm]
    if not pts:
      continue
    bs = sorted({b for b, _ in pts})
    mean = [np.mean([v for b2, v in pts if b2 == b]) for b in bs]
    ax.plot(bs, mean, "o-", color=colours[label], label=label)
    ax.scatter([b for b, _ in pts], [v for _, v in pts], color=colours[label], s=10, alpha=0.5)
  ax.set_xscale("log")
  ax.set_xticks(plan.batch_sizes, [str(b) for b in plan.batch_sizes])
  ax.set_xlabel("training batch size")
  ax.set_ylabel("validation bits/dim (lower is better)")
  ax.set_title("RealNVP on digits: BatchNorm's running statistics vs exact vs ActNorm", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  write_json_atomic(path[:-4] + ".json", {"rows": rows})


def _fmt(v, digits=3):
  return "inf" if not np.isfinite(v) and v > 0 else ("-" if not np.isfinite(v) else
                                                      f"{v:.{digits}f}")


def report(wd, config, plan, results) -> str:
  rows = results["flows"]
  lines = ["# BatchNorm in generative models", "",
           f"## Flows: validation bits/dim (digits, {config.flow.steps} steps, mean over "
           f"{config.flow.seeds} seeds; per-image max in brackets)", "",
           "| batch size | BN running stats | BN recomputed (exact) | ActNorm | "
           "BN train-mode loss (last 50 steps) |", "|---|---|---|---|---|"]
  for b in plan.batch_sizes:
    sel = lambda norm: [r for r in rows if r["norm"] == norm and r["batch_size"] == b]
    bn, an = sel("batch"), sel("actnorm")
    m = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else float("nan")
    mx = lambda rs, k: float(np.max([r[k] for r in rs])) if rs else float("nan")
    lines.append(f"| {b} | {_fmt(m(bn, 'val_bpd_running'))} [{_fmt(mx(bn, 'val_bpd_running_max'), 1)}]"
                 f" | {_fmt(m(bn, 'val_bpd_exact'))} [{_fmt(mx(bn, 'val_bpd_exact_max'), 1)}]"
                 f" | {_fmt(m(an, 'val_bpd_running'))} | {_fmt(m(bn, 'train_bpd'))} |")
  lat = results["latents"]
  lines += ["", f"## Latent radius ||z|| (validation digits, batch size {config.flow.latent_batch})",
            "", "| flow | mean ||z|| | std | KS against chi_d |", "|---|---|---|---|"]
  for k, v in lat.items():
    if k != "chi_d":
      lines.append(f"| {k} | {v['mean_radius']:.2f} | {v['std_radius']:.2f} | {v['ks_chi']:.3f} |")
  lines.append(f"| chi_{lat['chi_d']['d']} (standard normal) | {lat['chi_d']['mean_radius']:.2f} "
               f"| {lat['chi_d']['std_radius']:.2f} | 0 |")
  inp = results["inpainting"]
  lines += ["", f"## Inpainting ({inp['images']} digits, {inp['unknown']} unknown): MSE of the "
            "unknown pixels", "", "| image | MSE | mean log p of logit(x): first step -> last |",
            "|---|---|---|", f"| corrupted (uniform noise) | {inp['corrupted_mse']:.4f} | |"]
  for k, v in inp.items():
    if isinstance(v, dict):
      lines.append(f"| inpainted, {k} | {v['mse']:.4f} | {v['log_prob_first']:.1f} -> "
                   f"{v['log_prob_last']:.1f} |")
  lines += ["", "## VAE (validation digits; nats per image; label = lambda x cross-entropy "
            "under the true label)", "",
            f"classifier accuracy: {results['classifier_accuracy']['classifier']:.3f} "
            f"(independent: {results['classifier_accuracy']['classifier_independent']:.3f})", "",
            "| model | total | reconstruction | KL | lambda x label | given-label rate, wrong "
            "labels (training classifier / independent) | given-label rate, true labels | "
            f"spread across inputs, one given label (the data's: "
            f"{results['classifier_accuracy']['data_spread']:.3f}) |",
            "|---|---|---|---|---|---|---|---|"]
  for r in results["vae"]:
    lines.append(f"| {r['model']} | {r['total']:.1f} | {r['reconstruction']:.1f} | {r['kl']:.1f} "
                 f"| {r['label']:.2f} | {r['given_label_rate_wrong']:.3f} / "
                 f"{r['given_label_rate_wrong_independent']:.3f} | "
                 f"{r['given_label_rate_true']:.3f} | {r['input_spread']:.3f} |")
  sh = results["shifts"]
  ref = sh["reference"]
  lines += ["", f"## Flow bits/dim under shift against AdaBN's gain (source IoU "
            f"{ref['iou_source']:.3f}, source bits/dim {ref['bpd_source']:.3f})", "",
            "| shift | severity | IoU none | IoU AdaBN | gain | bits/dim source stats | "
            "bits/dim adapted | change |", "|---|---|---|---|---|---|---|---|"]
  for r in sh["rows"]:
    lines.append(f"| {r['shift']} | {r['severity']} | {r['iou_no_adapt']:.3f} | "
                 f"{r['iou_adabn']:.3f} | {r['gain']:+.3f} | {_fmt(r['bpd_source_stats'])} | "
                 f"{_fmt(r['bpd_adapted'])} | {_fmt(r['bpd_change'])} |")
  for k, c in sh["spearman"].items():
    lines.append(f"\nSpearman({k}, gain) = {c['spearman']:.3f} "
                 f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]")
  text = "\n".join(lines) + "\n"
  wd.write_text("generative.md", text)
  return text


def run(config, workdir: str) -> dict:
  """Runs every study of ``config`` into ``workdir``; returns the results."""
  start = time.perf_counter()
  plan = plan_of(config)
  digits = _digits(config)  # before the workdir: a missing scikit-learn stops here
  wd = Workdir.open(workdir, "generative", config)
  n_models = config.flow.seeds * len(plan.batch_sizes) * len(plan.norms) + 2 + 3 + 2
  bar = _Models(n_models)
  print(f"generative ({config.preset}): flows at batch sizes {plan.batch_sizes} x "
        f"{plan.norms} x {config.flow.seeds} seeds, VAEs, shifts {plan.shifts} at "
        f"{plan.severities}; devices {jax.devices()}", flush=True)
  flow_rows, models, val = flow_study(wd, config, plan, digits, bar)
  results = {"flows": flow_rows}
  results["latents"] = latent_study(wd, config, models, val)
  results["inpainting"] = inpaint_study(wd, config, models, val, digits[2])
  results["vae"], results["classifier_accuracy"] = vae_study(wd, config, digits, bar)
  shift_rows, corr, reference = shift_study(wd, config, plan, bar)
  results["shifts"] = {"rows": shift_rows, "spearman": corr, "reference": reference}
  _flow_figure(wd.file("flow_bpd.png"), flow_rows, plan)
  wd.write_csv("flows.csv", flow_rows, FLOW_FIELDS)
  wd.write_csv("vae.csv", results["vae"], VAE_FIELDS)
  wd.write_csv("shifts.csv", shift_rows, SHIFT_FIELDS)
  results["seconds"] = time.perf_counter() - start
  wd.write_json("generative.json", results)
  text = report(wd, config, plan, results)
  print("\n" + text + f"\n({results['seconds']:.0f} s this run)", flush=True)
  return results


if __name__ == "__main__":
  main(run, DEFAULT_CONFIG, "generative")
