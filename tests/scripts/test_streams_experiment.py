"""experiments/streams.py in-process at tiny sizes: every row, the files,
one online IoU and one offline reference recomputed by hand from the
checkpoint and a fresh stream, resume without retraining, config errors."""

import csv

import jax
import numpy as np
import pytest

import tolerance
from bnjax import adapt, config as bnjax_config, data, models, streams, train, workdir
from experiments import streams as experiment
from experiments.configs import streams as streams_config


def tiny():
  c = streams_config.get_config()
  c.seeds = 2
  c.settings = "iid,continual,correlated"
  c.batch_sizes = "2"
  c.methods = "source,bn_test,ema_bn,gated"
  c.shifts = "brightness,zoom"
  c.stream_images = 16
  c.data.size, c.data.n_train, c.data.n_pool, c.data.n_fisher = 16, 24, 12, 4
  c.model.features, c.model.depth = 2, 2
  c.train.epochs, c.train.batch_size = 1, 8
  return c


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  path = tmp_path_factory.mktemp("streams")
  config = tiny()
  rows = experiment.run(config, str(path))
  return config, path, rows


@pytest.mark.e2e
def test_rows_files_and_one_number_by_hand(result):
  config, path, rows = result
  # 3 settings x 4 methods x 2 seeds online, + 3 settings x 2 offline x 2 seeds.
  assert len(rows) == 3 * 4 * 2 + 3 * 2 * 2
  with open(path / "streams.csv") as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  for name in ("streams.md", "streams.json", "curves_b2.png", "curves_b2.json",
               "methods_b2.png", "methods_b2.csv"):
    assert (path / name).stat().st_size > 0, name
  for r in rows:
    assert 0 <= r["iou"] <= 1 and 0 <= r["collapse"] <= 1
  # Seed 1's bn_test on the continual stream, by hand: the checkpoint, the
  # stream drawn afresh, each batch normalised by its own moments
  # (recompute_batch_stats on the batch alone), per-image IoU by NumPy.
  wd = workdir.Workdir.read(str(path))
  stack, _ = wd.load_model("source_models")
  v = jax.tree_util.tree_map(lambda a: a[1], stack)
  model = models.UNet(features=2, depth=2)
  source = data.Domain(*config.source)
  pool = data.make_dataset(data.split_key(config.seed, source, "eval"), source, 12, 16)
  s = streams.make(data.named_key(config.seed, "stream", "continual", 2), *pool,
                   setting="continual", batch_size=2, shifts=("brightness", "zoom"), severity=5,
                   block_steps=4)
  z = np.concatenate([np.asarray(model.apply(adapt.recompute_batch_stats(model, v, x), x,
                                              train=False)) for x in np.asarray(s.images)])
  masks = np.asarray(s.masks).reshape(-1, 16, 16)
  got = [r["iou"] for r in rows if (r["setting"], r["method"], r["seed"]) == ("continual",
                                                                              "bn_test", 1)]
  assert got == [pytest.approx(*_iou_and_tolerance(z, masks))]
  # The offline exact reference: AdaBN on the whole stream, then every image.
  whole = np.asarray(s.images).reshape(-1, 16, 16, 1)
  z = np.asarray(model.apply(adapt.recompute_batch_stats(model, v, whole), whole, train=False))
  got = [r["iou"] for r in rows if (r["setting"], r["method"], r["seed"]) == ("continual",
                                                                              "offline_exact", 1)]
  assert got == [pytest.approx(*_iou_and_tolerance(z, masks))]


def _iou_and_tolerance(z, masks):
  """Per-image mean IoU of argmax(z) with NumPy, and what the pixels near the
  decision boundary can move it by (tests/tolerance.py) plus 1e-6 for the
  float32 means."""
  pred = np.argmax(z, -1) == 1
  inter, union = (pred & masks).sum((1, 2)), (pred | masks).sum((1, 2))
  iou = np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
  return iou, tolerance.iou_tolerance_at(pred, masks, tolerance.near_boundary(z)) + 1e-6


@pytest.mark.e2e
def test_gate_analysis_replays_the_gate(result):
  """The gate table against the stored per-step numbers, replayed here: at
  the chosen threshold, the mean over steps of the method's IoU where its
  agreement is below it and the source's elsewhere, and no threshold of the
  grid does better on every step together."""
  config, path, rows = result
  import json
  stored = json.loads((path / "streams.json").read_text())
  gate = stored["gate"]["ema_bn|2"]
  a, im, is_ = [], [], []
  for setting in ("iid", "continual", "correlated"):
    c, cs = stored["curves"]["ema_bn|2"][setting], stored["curves"]["source|2"][setting]
    a += np.ravel(c["agreement"]).tolist()
    im += np.ravel(c["per_step_seed"]).tolist()
    is_ += np.ravel(cs["per_step_seed"]).tolist()
  a, im, is_ = map(np.array, (a, im, is_))
  value = lambda t: np.mean(np.where(a < t, im, is_))
  assert value(gate["threshold"]) == pytest.approx(max(value(t) for t in experiment.THRESHOLDS))
  assert gate["source"] == pytest.approx(is_.mean()) and gate["method"] == pytest.approx(im.mean())
  assert gate["best_per_step"] == pytest.approx(np.maximum(im, is_).mean())
  # The source model agrees with itself on every step.
  assert np.all(np.asarray(stored["curves"]["source|2"]["iid"]["agreement"]) == 1.0)
  md = (path / "streams.md").read_text()
  assert "## The gate, replayed on every step" in md and "| 2 | ema_bn |" in md


@pytest.mark.e2e
def test_resume_does_not_retrain(result, monkeypatch):
  config, path, rows = result
  monkeypatch.setattr(train, "train_many", lambda *a, **k: pytest.fail("retrained"))
  monkeypatch.setattr(streams, "run_many", lambda *a, **k: pytest.fail("rescored"))
  assert experiment.run(config, str(path)) == rows


def test_config_errors():
  c = tiny()
  c.stream_images = 18  # continual: 2 blocks x batch 2 = 4 does not divide 18
  with pytest.raises(bnjax_config.ConfigError, match=r"config.stream_images \(18\) must be a "
                                                     r"multiple of 2 blocks x batch size 2"):
    experiment.plan_of(c)
  c = tiny()
  c.methods = "source,magic"
  with pytest.raises(bnjax_config.ConfigError, match="config.methods"):
    experiment.plan_of(c)
  c = tiny()
  with c.method_options.unlocked():
    c.method_options.ema_bn.momentum = 0.0
  c.methods = "source,ema_bn"
  with pytest.raises(bnjax_config.ConfigError, match=r"config.method_options.ema_bn: momentum "
                                                     r"must be in \(0, 1\]"):
    experiment.plan_of(c)
  with pytest.raises(ValueError, match="'cpu' or 'full' or 'labels'"):
    streams_config.get_config("gpu")
  for token, message in (("iid/balanced", "the labels must be one of"),
                         ("nowhere", "the setting must be one of"),
                         ("continual:gamma", "':<shift>' names one shift")):
    c = tiny()
    c.settings = token
    with pytest.raises(bnjax_config.ConfigError, match=message):
      experiment.plan_of(c)


def test_label_settings_build_the_streams_they_name():
  """A setting token is a stream of bnjax.streams.make: the source's
  appearance with a label shift, one shift with a label drift."""
  c = tiny()
  c.settings = "none/shift,iid:gamma/drift"
  plan = experiment.plan_of(c)
  pool = data.make_dataset(jax.random.key(0), plan.source, 12, size=16)
  label = experiment._stream(c, plan, "none/shift", 2, pool)
  assert label.shifts == () and label.labels == "shift"
  assert float(np.mean(label.masks)) > 2 * float(np.mean(pool[1]))
  drift = experiment._stream(c, plan, "iid:gamma/drift", 2, pool)
  assert drift.shifts == ("gamma",) and drift.labels == "drift"
  assert drift.label_severity.max() > 4 and drift.label_severity[0] < 1
  assert experiment.parse_setting("mixed/drift") == ("mixed", None, "drift")
  assert experiment.parse_setting("iid") == ("iid", None, "iid")
  labels = streams_config.get_config("labels")
  assert experiment.plan_of(labels).settings[0] == "none/shift"
