"""experiments/benchmark.py in-process at tiny sizes: every row, the files,
resume without retraining, and one number recomputed by hand."""

import csv

import jax
import pytest

from bnjax import data, inference, metrics, models, train, workdir
from experiments import benchmark
from experiments.configs import benchmark as benchmark_config


def tiny():
  c = benchmark_config.get_config()
  c.seeds = 2
  c.variants = "reference,instance"
  c.shifts = "brightness,zoom"
  c.severities = "5"
  c.methods = "none,adabn,adabn_prior,tent,histogram_match,oracle"
  c.data.size, c.data.n_train, c.data.n_eval, c.data.n_adapt = 16, 24, 8, 8
  c.model.features, c.model.depth = 2, 2
  c.train.epochs, c.train.batch_size = 1, 8
  c.tent.steps, c.tent.batch_size = 2, 4
  return c


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
  md = (tmp_path / "benchmark.md").read_text()
  assert "| brightness | 5 |" in md and "lowers IoU below no adaptation" in md

  # One number by hand: seed 1's unadapted source IoU, from its checkpoint and
  # a fresh draw of its evaluation split.
  wd = workdir.Workdir.read(str(tmp_path))
  stack, _ = wd.load_model("reference")
  v1 = jax.tree_util.tree_map(lambda a: a[1], stack)
  source = data.Domain.from_json(config.source)
  x, y = data.make_dataset(data.split_key(config.seed + 1, source, "eval"), source,
                           config.data.n_eval, config.data.size)
  model = models.UNet(features=2, depth=2)
  want = metrics.iou(inference.predict(model, v1, x), y)
  got = [r["iou"] for r in rows if (r["variant"], r["shift"], r["method"], r["seed"])
         == ("reference", "source", "none", 1)]
  assert got == [pytest.approx(want, abs=1e-6)]
  # The oracle at severity 0 is the source model itself.
  pick = lambda m: sorted(r["iou"] for r in rows if r["shift"] == "source" and r["method"] == m
                          and r["variant"] == "reference")
  assert pick("oracle") == pick("none")

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
  plan = benchmark.plan_of(tiny())
  assert plan.methods[0] == "none" and plan.severities == [5]
  assert set(benchmark.VARIANTS) >= {"reference", "strided", "resize_conv", "no_skip", "ce",
                                     "dice", "instance", "group", "layer", "standardize"}
  with pytest.raises(ValueError, match="'cpu' or 'full'"):
    benchmark_config.get_config("gpu")
  full = benchmark_config.get_config("full")
  assert "oracle" in full.methods and full.seeds >= 3


@pytest.mark.slow
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
