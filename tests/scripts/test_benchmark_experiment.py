"""experiments/benchmark.py in-process at tiny sizes: every row, the files,
resume without retraining, and one number recomputed by hand."""

import csv

import jax
import numpy as np
import pytest
import scipy.stats

import tolerance
from bnjax import data, metrics, models, shifts, train, workdir
from experiments import benchmark
from experiments.configs import benchmark as benchmark_config

# Its slow or e2e tests run for minutes: scheduled first (tests/conftest.py).
RUNS_FOR_MINUTES = True


def tiny():
  c = benchmark_config.get_config()
  c.seeds = 2
  c.variants = "reference,instance"
  c.shifts = "brightness,zoom"
  c.severities = "5"
  c.methods = "none,adabn,adabn_prior,tent,histogram_match,oracle"
  c.cyclegan.train.update(dict(steps=4, batch_size=2, features=4, n_blocks=1, disc_features=4,
                               disc_layers=1, steps_per_call=2, pool_size=3))
  c.data.size, c.data.n_train, c.data.n_eval, c.data.n_adapt = 16, 24, 8, 8
  c.model.features, c.model.depth = 2, 2
  c.train.epochs, c.train.batch_size = 1, 8
  c.tent.steps, c.tent.batch_size = 2, 4
  return c


def _iou_and_tolerance(model, variables, x, y):
  """IoU from argmax(model.apply) here, and how far the benchmark's stacked
  evaluation of the same variables may be from it: the pixels near the
  decision boundary (tests/tolerance.py), plus 1e-7 for the float32 mean."""
  z = np.asarray(model.apply(variables, x, train=False))
  pred = np.argmax(z, -1) == 1
  return (metrics.iou(pred, y),
          tolerance.iou_tolerance_at(pred, y, tolerance.near_boundary(z)) + 1e-7)


@pytest.mark.e2e
def test_benchmark_writes_every_number_and_resumes(tmp_path, monkeypatch, capsys):
  config = tiny()
  rows = benchmark.run(config, str(tmp_path))
  # reference: 6 methods; instance: no BatchNorm, so no adabn/adabn_prior/tent.
  cells = 1 + 2 * 1  # the source, then each shift at each severity
  assert len(rows) == (6 + 3) * cells * 2
  assert {r["method"] for r in rows if r["variant"] == "instance"} == {
      "none", "histogram_match", "oracle"}
  for r in rows:
    assert 0 <= r["iou"] <= 1 and 0 <= r["dice"] <= 1
    assert r["dice"] >= r["iou"] - 1e-9  # Dice >= IoU image by image
  with open(tmp_path / "benchmark.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows) and set(table[0]) == set(benchmark.FIELDS)
  for name in ("benchmark.md", "benchmark.json", "reference_severity.png",
               "reference_methods.png", "reference_methods.csv", "reference_winners.png",
               "instance_severity.json"):
    assert (tmp_path / name).stat().st_size > 0
  # The table's cells and its list of lowered cells, recomputed from the rows
  # with NumPy and SciPy (mean ± t_{0.975, seeds - 1} s / sqrt(seeds)).
  md = (tmp_path / "benchmark.md").read_text()
  reference = md.split("## reference")[1].split("## ")[0]
  header = next(l for l in reference.splitlines() if l.startswith("| shift |"))
  methods_ = [c.strip() for c in header.strip("|").split("|")][2:-1]
  cell = next(l for l in reference.splitlines() if l.startswith("| brightness | 5 |"))
  cells = [c.strip() for c in cell.strip("|").split("|")][2:-1]
  t = scipy.stats.t.ppf(0.975, config.seeds - 1)
  for m, text in zip(methods_, cells):
    v = np.array([r["iou"] for r in rows if (r["variant"], r["shift"], r["method"])
                  == ("reference", "brightness", m)])
    assert text == f"{v.mean():.3f} ± {t * v.std(ddof=1) / np.sqrt(len(v)):.3f}", m
  lowered = md.split("## Where a method lowers IoU below no adaptation")[1].split("## ")[0]
  listed = {tuple(l[2:].split(":")[0].replace(",", "").split()) for l in lowered.splitlines()
            if l.startswith("- ")}
  means = {}
  for r in rows:
    means.setdefault((r["variant"], r["shift"], str(r["severity"]), r["method"]), []).append(
        r["iou"])
  want = {(v, s_, sev, m) for (v, s_, sev, m), x in means.items()
          if m not in ("none", "oracle") and np.mean(x) < np.mean(means[(v, s_, sev, "none")])}
  assert listed == want and want, (listed, want)

  # One number by hand: seed 1's unadapted source IoU, from its checkpoint and
  # a fresh draw of its evaluation split.
  wd = workdir.Workdir.read(str(tmp_path))
  stack, _ = wd.load_model("reference")
  v1 = jax.tree_util.tree_map(lambda a: a[1], stack)
  source = data.Domain.from_json(config.source)
  x, y = data.make_dataset(data.split_key(config.seed + 1, source, "eval"), source,
                           config.data.n_eval, config.data.size)
  model = models.UNet(features=2, depth=2)
  want, tol = _iou_and_tolerance(model, v1, x, y)
  got = [r["iou"] for r in rows if (r["variant"], r["shift"], r["method"], r["seed"])
         == ("reference", "source", "none", 1)]
  assert got == [pytest.approx(want, abs=tol)]
  # One oracle number by hand: seed 0's oracle for brightness 5, from its
  # checkpoint, on that seed's shifted evaluation images drawn afresh.
  oracle, _ = wd.load_model("oracle_reference_brightness_5")
  x0, y0 = data.make_dataset(data.split_key(config.seed, source, "eval"), source,
                             config.data.n_eval, config.data.size)
  xs, ys = shifts.apply(data.named_key(config.seed, "brightness", 5, "eval"), x0, y0,
                        "brightness", 5)
  want, tol = _iou_and_tolerance(model, jax.tree_util.tree_map(lambda a: a[0], oracle), xs, ys)
  got = [r["iou"] for r in rows if (r["variant"], r["shift"], r["method"], r["seed"])
         == ("reference", "brightness", "oracle", 0)]
  assert got == [pytest.approx(want, abs=tol)]

  # Rerun: everything restored, nothing trained, the same numbers.
  capsys.readouterr()
  monkeypatch.setattr(train, "train_many", lambda *a, **k: pytest.fail("retrained"))
  again = benchmark.run(config, str(tmp_path))
  assert again == rows
  assert "restored" in capsys.readouterr().out


def test_benchmark_config_errors():
  for field, value, match in (("variants", "reference,vgg", "config.variants"),
                              ("shifts", "sepia", "config.shifts"),
                              ("severities", "0,3", "integers in 1..5"),
                              ("methods", "tent,magic", "config.methods")):
    c = tiny()
    c[field] = value
    with pytest.raises(ValueError, match=match):
      benchmark.plan_of(c)
  c = tiny()
  c.methods = "none,cyclegan_transpose"
  c.cyclegan.train.steps = 0
  with pytest.raises(ValueError, match=r"config\.cyclegan\.train\.steps must be an integer >= 1"):
    benchmark.plan_of(c)
  c = tiny()
  c.methods = "none,cyclegan_resize_conv"
  c.cyclegan.train.disc_layers = 4  # 16x16 images leave no patch
  with pytest.raises(ValueError, match="config.cyclegan.train: images of 16x16 leave no patch"):
    benchmark.plan_of(c)
  c = tiny()
  c.cyclegan.shifts = "sepia"
  with pytest.raises(ValueError, match="config.cyclegan.shifts"):
    benchmark.plan_of(c)
  plan = benchmark.plan_of(tiny())
  assert plan.methods[0] == "none" and plan.severities == [5]
  assert set(benchmark.VARIANTS) >= {"reference", "strided", "resize_conv", "no_skip", "ce",
                                     "dice", "instance", "group", "layer", "standardize"}
  with pytest.raises(ValueError, match="'cpu' or 'full'"):
    benchmark_config.get_config("gpu")
  full = benchmark_config.get_config("full")
  assert "oracle" in full.methods and full.seeds >= 3


@pytest.mark.e2e
def test_brightness_acceptance_on_the_default_source(tmp_path):
  """The CPU default's models, one seed: the brightness shift to (150,50,230,50)
  breaks the BatchNorm U-Net, AdaBN, TENT and histogram matching repair it,
  and the InstanceNorm U-Net does not need repairing."""
  c = benchmark_config.get_config()
  c.seeds = 1
  c.shifts, c.severities = "brightness", "5"
  c.methods = "none,adabn,tent,histogram_match"
  rows = benchmark.run(c, str(tmp_path))
  iou = {(r["variant"], r["shift"], r["method"]): r["iou"] for r in rows}
  src = iou[("reference", "source", "none")]
  assert src > 0.75
  assert iou[("reference", "brightness", "none")] <= 0.3
  for m in ("adabn", "tent", "histogram_match"):
    assert iou[("reference", "brightness", m)] >= 0.85 * src, m
  assert iou[("instance", "brightness", "none")] >= 0.85 * iou[("instance", "source", "none")]


@pytest.mark.e2e
def test_benchmark_cyclegan_methods(tmp_path, monkeypatch, capsys):
  """Both generators at brightness 5 (not at zoom): their rows, the
  translators' measures, the figure, one IoU and one checkerboard measure
  recomputed by hand, and a rerun that trains nothing."""
  from bnjax import cyclegan

  config = tiny()
  config.methods = "none,adabn,cyclegan_transpose,cyclegan_resize_conv"
  config.cyclegan.shifts, config.cyclegan.severities = "brightness", "5"
  rows = benchmark.run(config, str(tmp_path))
  translated = {(r["variant"], r["shift"], r["method"]) for r in rows
                if r["method"].startswith("cyclegan")}
  assert translated == {(v, "brightness", m) for v in ("reference", "instance")
                        for m in benchmark.CYCLEGAN}
  assert sum(r["method"] == "cyclegan_transpose" for r in rows) == 2 * config.seeds
  with open(tmp_path / "cyclegan.csv") as f:
    measures = list(csv.DictReader(f))
  assert len(measures) == 2 * config.seeds and set(measures[0]) == set(benchmark.CYCLEGAN_FIELDS)
  for name in ("cyclegan_examples.png", "cyclegan_examples.json", "cyclegan.json"):
    assert (tmp_path / name).stat().st_size > 0
  md = (tmp_path / "benchmark.md").read_text()
  assert "## Pixel-level translation (CycleGAN)" in md and "| brightness | 5 | transpose |" in md
  assert "| zoom | 5 |" in md and "— |" in md  # no translator at zoom: a dash in the table

  # By hand: seed 1's translated images (severity 5) scored by its source model
  # against its shifted masks drawn afresh, and their period-2 energy relative
  # to the shifted inputs with NumPy's FFT.
  wd = workdir.Workdir.read(str(tmp_path))
  stack, _ = wd.load_model("reference")
  images = np.load(tmp_path / "translations" / "cyclegan__transpose__brightness.npz")["images"]
  source = data.Domain.from_json(config.source)
  x1, y1 = data.make_dataset(data.split_key(config.seed + 1, source, "eval"), source,
                             config.data.n_eval, config.data.size)
  xs, ys = shifts.apply(data.named_key(config.seed + 1, "brightness", 5, "eval"), x1, y1,
                        "brightness", 5)
  model = models.UNet(features=2, depth=2)
  want, tol = _iou_and_tolerance(model, jax.tree_util.tree_map(lambda a: a[1], stack),
                                 images[1], ys)
  got = [r["iou"] for r in rows if (r["variant"], r["shift"], r["method"], r["seed"])
         == ("reference", "brightness", "cyclegan_transpose", 1)]
  assert got == [pytest.approx(want, abs=tol)]

  def share(a):
    p = np.abs(np.fft.fft2(np.asarray(a, np.float64)[..., 0])) ** 2
    h, w = p.shape[1:]
    return np.mean((p[:, h // 2, 0] + p[:, 0, w // 2] + p[:, h // 2, w // 2])
                   / (p.sum(axis=(1, 2)) - p[:, 0, 0]))

  row = next(r for r in measures if (r["up"], r["seed"]) == ("transpose", "1"))
  assert float(row["checkerboard_ratio"]) == pytest.approx(share(images[1]) / share(xs),
                                                           rel=1e-4)

  # Rerun: the translations restored, no translator trained.
  monkeypatch.setattr(cyclegan, "train_translators",
                      lambda *a, **k: pytest.fail("translators retrained"))
  monkeypatch.setattr(train, "train_many", lambda *a, **k: pytest.fail("retrained"))
  assert benchmark.run(config, str(tmp_path)) == rows
