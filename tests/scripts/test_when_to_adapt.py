"""experiments/when_to_adapt.py in-process at tiny sizes: the rows, one truth
recomputed by hand, the held-out evaluation against an independent
leave-one-family-out written here, the saved rule, resume, and errors."""

import csv
import json

import jax
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from bnjax import adapt, data, distances, inference, metrics, models, selection, train, workdir
from experiments import when_to_adapt as w2a
from experiments.configs import when_to_adapt as w2a_config

A, B = [100.0, 50.0, 156.0, 50.0], [68.0, 50.0, 188.0, 50.0]


def tiny():
  c = w2a_config.get_config()
  c.seeds = 2
  c.grids = "geometric"
  c.grid_groups = {"geometric": [dict(label="geometric", sources=[A, B], targets=[A, B],
                                      layout="matrix")]}
  c.benchmark_source = tuple(A)
  c.shifts, c.severities = "brightness,zoom", "5"
  c.data.size, c.data.n_train, c.data.n_eval, c.data.n_adapt = 16, 24, 8, 8
  c.model.features, c.model.depth = 2, 2
  c.train.epochs, c.train.batch_size = 1, 8
  c.tent.steps, c.tent.batch_size = 2, 4
  c.bootstrap = 50
  c.chunk = 1  # one model per stack: the stacks are put back together per seed
  return c


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  path = tmp_path_factory.mktemp("w2a")
  config = tiny()
  analysis = w2a.run(config, str(path))
  return config, path, analysis


def _rows(path):
  """Every row at full precision (the per-source result files, in the
  order of pairs.csv, which holds them to 6 significant digits)."""
  names = sorted(f for f in (path / "results").iterdir() if f.name.startswith("source_"))
  return [r for f in names for r in json.loads(f.read_text())["rows"]]


@pytest.mark.e2e
def test_rows_and_files(result):
  config, path, analysis = result
  rows = _rows(path)
  # 4 grid pairs + 2 shifts at one severity, x 2 seeds x 3 methods.
  assert len(rows) == 6 * 2 * 3 and set(rows[0]) == set(w2a.FIELDS)
  with open(path / "pairs.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows) and list(table[0]) == list(w2a.FIELDS)
  for r, t in zip(rows, table):
    assert t["target"] == r["target"] and int(t["seed"]) == r["seed"]
    for k in w2a.TRUTH + w2a.PREDICTORS:
      assert float(t[k]) == pytest.approx(r[k], rel=1e-5, abs=1e-12, nan_ok=True), k
  assert {r["family"] for r in rows} == {"geometric", "intensity", "geometry"}
  for r in rows:
    assert 0 <= r["iou_no_adapt"] <= 1 and 0 <= r["iou_adapted"] <= 1
  for name in ("when_to_adapt.md", "when_to_adapt.json", "scatter_adabn.png",
               "scatter_tent.json", "rules/adabn.json", "rules/histogram_match.json"):
    assert (path / name).stat().st_size > 0, name
  md = (path / "when_to_adapt.md").read_text()
  assert "overlap †" in md and "*always adapt*" in md and "## tent" in md
  # Baselines from the rows with NumPy.
  ad = [r for r in rows if r["method"] == "adabn"]
  b = analysis["adabn"]["baselines"]
  i0 = np.array([r["iou_no_adapt"] for r in ad])
  i1 = np.array([r["iou_adapted"] for r in ad])
  assert b["never"] == pytest.approx(i0.mean(), abs=1e-5)
  assert b["always"] == pytest.approx(i1.mean(), abs=1e-5)
  assert b["best"] == pytest.approx(np.maximum(i0, i1).mean(), abs=1e-5)


@pytest.mark.e2e
def test_one_row_by_hand(result):
  config, path, _ = result
  rows = _rows(path)
  wd = workdir.Workdir.read(str(path))
  stack, meta = wd.load_model("seed1_chunk01")  # source B, the plan's second source
  assert meta["sources"] == [str(data.Domain(*B))]
  v = jax.tree_util.tree_map(lambda a: a[0], stack)
  src, tgt = data.Domain(*B), data.Domain(*A)
  x, y = data.make_dataset(data.split_key(config.seed + 1, tgt, "eval"), tgt, 8, 16)
  xa, _ = data.make_dataset(data.split_key(config.seed + 1, tgt, "adapt"), tgt, 8, 16)
  model = models.UNet(features=2, depth=2)
  v_ad = adapt.recompute_batch_stats(model, v, xa)
  got = next(r for r in rows if (r["source"], r["target"], r["seed"], r["method"])
             == (str(src), str(tgt), 1, "adabn"))
  assert got["iou_no_adapt"] == pytest.approx(metrics.iou(inference.predict(model, v, x), y),
                                              abs=1e-5)
  want_adapted = metrics.iou(inference.predict(model, v_ad, x), y)
  assert got["iou_adapted"] == pytest.approx(want_adapted, abs=1e-5)
  assert got["gain"] == pytest.approx(
      want_adapted - metrics.iou(inference.predict(model, v, x), y), abs=1e-5)
  sx = data.make_dataset(data.split_key(config.seed + 1, src, "eval"), src, 8, 16)
  want = selection.scores(model, v, v_ad, xa, source_inputs=sx)
  for k in ("atc", "agreement", "entropy_after", "bn_w2"):
    assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
  # The appearance change: the source model's class statistics on its own
  # unlabelled source images, the target's under its masks.
  sa, _ = data.make_dataset(data.split_key(config.seed + 1, src, "adapt"), src, 8, 16)
  classes = adapt.add_class_stats(model, v, sa)["class_stats"]
  masks = inference.predict(model, v, xa)
  logits = np.stack([~masks, masks], axis=-1).astype(np.float32)
  assert got["appearance"] == pytest.approx(
      float(adapt.appearance_gap(xa, logits, classes)), rel=1e-4, abs=1e-6)


def _first_at_or_above(train_x, fitted, t):
  """An isotonic prediction written independently: the fitted value of the
  first training point (sorted) whose x is >= t, the last one's beyond."""
  order = np.argsort(train_x, kind="stable")
  xs, ys = train_x[order], fitted
  i = np.searchsorted(xs, t, side="left")
  return ys[np.minimum(i, len(xs) - 1)]


def _isotonic(x, y):
  """scipy's isotonic regression of y on x (sorted stably, ties in x kept
  in their order, as the code keeps them), in the direction of scipy's
  Spearman (average ranks for ties, as the code's): (fitted values in x's
  sorted order, increasing)."""
  rho = scipy.stats.spearmanr(x, y).statistic
  inc = not (np.isfinite(rho) and rho < 0)
  order = np.argsort(x, kind="stable")
  return scipy.optimize.isotonic_regression(y[order], increasing=inc).x, inc


@pytest.mark.parametrize("method,predictor", [("adabn", "atc"), ("tent", "entropy_after"),
                                              ("histogram_match", "bn_w2")])
@pytest.mark.e2e
def test_leave_one_family_out_against_an_independent_loop(result, method, predictor):
  """On every row, ties included (the tiny run's gains have 7-9 distinct
  values of 12): scipy's Spearman and isotonic regression per fold."""
  _, path, analysis = result
  rows = [r for r in _rows(path) if r["method"] == method]
  x = np.array([r[predictor] for r in rows])
  gain = np.array([r["gain"] for r in rows])
  i0 = np.array([r["iou_no_adapt"] for r in rows])
  i1 = np.array([r["iou_adapted"] for r in rows])
  fam = np.array([r["family"] for r in rows])
  assert len(set(gain)) < len(gain)  # the data this test is about have ties
  pred = np.empty(len(rows))
  for f in sorted(set(fam)):
    tr, te = fam != f, fam == f
    assert not set(fam[tr]) & set(fam[te])  # never train and test on one family
    fitted, _ = _isotonic(x[tr], gain[tr])
    pred[te] = _first_at_or_above(x[tr], fitted, x[te])
  e = analysis[method]["predictors"][predictor]["family"]
  decide = pred > 0
  assert e["mae_gain"] == pytest.approx(np.mean(np.abs(pred - gain)), abs=1e-5)
  assert e["accuracy"] == pytest.approx(np.mean(decide == (gain > 0)))
  assert e["mean_iou"] == pytest.approx(np.mean(np.where(decide, i1, i0)), abs=1e-5)
  assert [fold["held_out"] for fold in e["folds"]] == sorted(set(fam))
  for fold in e["folds"]:
    assert fold["n_test"] == np.sum(fam == fold["held_out"])
    assert fold["n_train"] == len(rows) - fold["n_test"]
  src = analysis[method]["predictors"][predictor]["source"]["folds"]
  assert sorted(f["held_out"] for f in src) == sorted({r["source"] for r in rows})


@pytest.mark.e2e
def test_saved_rule_is_the_isotonic_fit_of_every_row(result):
  """The rule file against scipy: its steps are the isotonic regression of
  the gain on the chosen score over every row of the method, and a row's
  decision read off the JSON by hand (the first step whose edge is >= the
  score) is should_adapt's."""
  _, path, analysis = result
  rule = selection.Rule.load(path / "rules" / "adabn.json")
  assert rule.score == analysis["adabn"]["chosen"] and rule.score in w2a.LABEL_FREE
  assert rule.provenance["experiment"] == "when_to_adapt"
  assert set(rule.provenance["families"]) == {"geometric", "intensity", "geometry"}
  rows = [r for r in _rows(path) if r["method"] == "adabn"]
  x = np.array([r[rule.score] for r in rows])
  gain = np.array([r["gain"] for r in rows])
  fitted, inc = _isotonic(x, gain)
  stored = json.loads((path / "rules" / "adabn.json").read_text())
  assert stored["increasing"] == inc
  for t in x:
    assert _first_at_or_above(x, fitted, t) == pytest.approx(
        stored["gains"][np.searchsorted(stored["edges"], t, side="left")], abs=1e-6)
  for row in rows:
    d = selection.should_adapt(rule, row)
    i = min(np.searchsorted(stored["edges"], row[rule.score], side="left"),
            len(stored["gains"]) - 1)
    assert d.predicted_gain == pytest.approx(stored["gains"][i], abs=1e-9)
    assert d.adapt == (stored["gains"][i] > stored["margin"])


@pytest.mark.e2e
def test_resume_does_not_retrain(result, monkeypatch):
  config, path, analysis = result
  monkeypatch.setattr(train, "train_many", lambda *a, **k: pytest.fail("retrained"))
  again = w2a.run(config, str(path))
  assert again["adabn"]["baselines"] == analysis["adabn"]["baselines"]


def test_class_overlap_matches_the_gaussian_closed_form():
  rng = np.random.default_rng(0)
  masks = rng.random((40, 32, 32)) < 0.3
  x = np.where(masks, rng.normal(0.6, 0.08, masks.shape), rng.normal(0.45, 0.08, masks.shape))
  want = distances.overlap_coefficient(0.45 * 255, 0.08 * 255, 0.6 * 255, 0.08 * 255)
  assert w2a.class_overlap(x[..., None], masks, bins=64) == pytest.approx(want, abs=0.02)
  assert np.isnan(w2a.class_overlap(x[..., None], np.zeros_like(masks)))


def test_plan_errors():
  c = tiny()
  c.shifts = ""
  with pytest.raises(ValueError, match="one family"):
    w2a.plan_of(c)
  c = tiny()  # two families, one source domain: no source to hold out
  c.grids = ""
  with pytest.raises(ValueError, match="one source domain"):
    w2a.plan_of(c)
  c = tiny()
  c.methods = "adabn,oracle"
  with pytest.raises(ValueError, match="config.methods"):
    w2a.plan_of(c)
  c = tiny()
  c.grids = "geometric,brightness"
  with pytest.raises(ValueError, match="no groups for the grid 'brightness'"):
    w2a.plan_of(c)
  c = tiny()
  c.grids, c.shifts = "", ""
  with pytest.raises(ValueError, match="no pair"):
    w2a.plan_of(c)
  with pytest.raises(ValueError, match="'cpu' or 'full'"):
    w2a_config.get_config("gpu")


def test_gate_decisions_by_hand():
  """The streams' gate on made-up rows: adapt iff appearance > 0.015; its
  accuracy, near-best share and mean IoU per family written out here."""
  rows = [dict(family=f, gain=g, iou_no_adapt=0.5, iou_adapted=0.5 + g, appearance=a)
          for f, g, a in (("shape", -0.2, 0.001), ("shape", 0.005, 0.002),
                          ("intensity", 0.3, 0.5), ("intensity", -0.05, 0.02),
                          ("geometry", 0.03, 0.0))]
  rule = np.array([True, True, True, False, True])
  out = w2a.gate_decisions(rows, rule)
  assert out["threshold"] == 0.015
  gate = out["decisions"]["gate"]
  # shape: not adapting is right for -0.2, wrong for +0.005 (within 0.01 of the best).
  assert gate["shape"] == {"accuracy": 0.5, "near_best": 1.0, "mean_iou": 0.5}
  assert gate["intensity"]["accuracy"] == 0.5 and gate["intensity"]["near_best"] == 0.5
  assert gate["intensity"]["mean_iou"] == pytest.approx((0.8 + 0.45) / 2)
  assert gate["geometry"] == {"accuracy": 0.0, "near_best": 0.0, "mean_iou": 0.5}
  both = out["decisions"]["gate_and_rule"]["intensity"]  # the rule says no to the second
  assert both["accuracy"] == 1.0 and both["mean_iou"] == pytest.approx(0.65)
  assert out["decisions"]["rule"]["all"]["accuracy"] == pytest.approx(4 / 5)  # wrong on -0.2
  assert out["decisions"]["never"]["shape"]["mean_iou"] == 0.5
