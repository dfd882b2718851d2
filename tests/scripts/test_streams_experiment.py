"""experiments/streams.py in-process at tiny sizes: every row, the files,
one online IoU and one offline reference recomputed by hand from the
checkpoint and a fresh stream, resume without retraining, config errors."""

import csv
import json

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
                         ("episodic:brightness+gamma", "':<shift>' names one shift")):
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
  token = "continual:brightness+gamma/alternate"
  assert experiment.parse_setting(token) == ("continual", ("brightness", "gamma"), "alternate")
  turns = experiment._stream(c, plan, token, 2, pool)
  # brightness, labels, gamma, labels: four blocks, the stream's images split evenly.
  assert turns.shifts == ("brightness", "gamma") and turns.steps * 2 == c.stream_images
  np.testing.assert_array_equal(turns.shift[::turns.steps // 4, 0], [0, -1, 1, -1])
  for bad in ("iid:brightness+gamma", "none:gamma/shift", "continual:brightness+nope"):
    with pytest.raises(bnjax_config.ConfigError, match="names one shift"):
      experiment.parse_setting(bad)
  labels = streams_config.get_config("labels")
  assert experiment.plan_of(labels).settings[0] == "none/shift"


def _fake_nuclei(folder, size=64):
  """A 16-bit TIFF pair in the nuclei image's layout: 8-bit values, one
  integer label per object (written here with Pillow, read back by bnjax)."""
  from PIL import Image
  masks = np.asarray(data.perlin_masks(jax.random.key(5), 1, size))[0]
  rng = np.random.default_rng(0)
  image = np.where(masks, rng.normal(170, 20, masks.shape), rng.normal(60, 15, masks.shape))
  labels = masks * (1 + np.arange(size * size).reshape(size, size) % 7)
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint16)).save(folder / "img2d.tif")
  Image.fromarray(labels.astype(np.uint16)).save(folder / "mask2d.tif")
  return image, masks


def nuclei_config(folder):
  c = tiny()
  c.data.images, c.data.nuclei_folder = "nuclei", str(folder)
  c.settings = "none/sorted,iid:brightness/sorted"
  c.data.n_train, c.data.n_pool, c.data.n_fisher = 24, 12, 4
  return c


def test_nuclei_pools_come_from_the_images_halves(tmp_path):
  image, masks = _fake_nuclei(tmp_path)
  c = nuclei_config(tmp_path)
  plan = experiment.plan_of(c)
  pixels = np.clip(image, 0, 255).astype(np.uint16) / 255.0
  for split, rows in (("train", (0, 32)), ("eval", (32, 64))):
    x, y = experiment._pool(c, plan, split, 6)
    assert x.shape == (6, 16, 16, 1) and y.shape == (6, 16, 16)
    for xi, yi in zip(np.asarray(x)[..., 0], np.asarray(y)):
      # Each tile is a window of its half of the image, found by search.
      found = [(r, col) for r in range(rows[0], rows[1] - 15) for col in range(0, 49)
               if np.allclose(pixels[r:r + 16, col:col + 16], xi)]
      assert found, split
      r, col = found[0]
      np.testing.assert_array_equal(masks[r:r + 16, col:col + 16], yi)
  stream = experiment._stream(c, plan, "none/sorted", 2, experiment._pool(c, plan, "eval", 12))
  frac = np.asarray(stream.masks).reshape(-1, 256).mean(1)
  assert np.all(np.diff(frac) >= 0)  # the tiles' own foreground fractions, in order


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "settings", "none/shift"), "keeps its own masks"),
    (lambda c: setattr(c, "settings", "iid:threshold/sorted"), "draw synthetic masks"),
    (lambda c: setattr(c, "settings", "mixed"), "draw synthetic masks"),  # shifts has res
    (lambda c: c.data.update({"n_pool": 50}), r"n_pool \(50\) exceeds the 21 tiles"),
    (lambda c: c.data.update({"size": 48}), r"data.size 48\): size must be in 1..32"),
    (lambda c: c.data.update({"nuclei_folder": "/nowhere"}), "holds no img2d.tif"),
])
def test_nuclei_config_errors(tmp_path, change, message):
  _fake_nuclei(tmp_path)
  c = nuclei_config(tmp_path)
  c.shifts = "brightness,res"
  change(c)
  with pytest.raises(bnjax_config.ConfigError, match=message):
    experiment.plan_of(c)


def test_nuclei_without_the_package_is_a_config_error(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "stardist" else real(name, *a))
  c = tiny()
  c.data.images = "nuclei"
  c.settings = "none/sorted"
  with pytest.raises(bnjax_config.ConfigError, match=r"pip install 'bnjax\[nuclei\]'"):
    experiment.plan_of(c)


def test_label_shift_summary_against_a_hand_mean(tmp_path):
  """What each method keeps under the class balance alone and gains under
  appearance shifts: the mean over seeds and settings of IoU - source,
  computed here by hand from made-up rows."""
  c = tiny()
  c.settings = "none/shift,none/drift,iid:brightness/drift,continual:brightness+zoom/alternate,iid"
  c.batch_sizes = "2,4"
  c.methods = "source,bn_test,lame"
  plan = experiment.plan_of(c)
  rng = np.random.default_rng(0)
  rows = [dict(setting=s, batch_size=b, method=m, seed=k, iou=float(rng.random()))
          for s in plan.settings for b in plan.batch_sizes for m in plan.methods
          for k in range(c.seeds)]
  iou = {(r["setting"], r["batch_size"], r["method"], r["seed"]): r["iou"] for r in rows}
  wd = workdir.Workdir.open(tmp_path, "streams", c)
  lines = experiment.label_shift_summary(wd, plan, experiment._table(rows), c.seeds)
  record = json.loads((tmp_path / "labels.json").read_text())
  assert record["groups"] == {"label": ["none/shift", "none/drift"],
                              "appearance": ["iid:brightness/drift",
                                             "continual:brightness+zoom/alternate", "iid"]}
  for b in (2, 4):
    for m in ("bn_test", "lame"):
      gain = lambda s: np.mean([iou[(s, b, m, k)] - iou[(s, b, "source", k)] for k in (0, 1)])
      want_label = (gain("none/shift") + gain("none/drift")) / 2
      want_app = np.mean([gain(s) for s in record["groups"]["appearance"]])
      got = record["by_method_and_batch"][f"{m}|{b}"]
      assert got["label_kept"] == pytest.approx(want_label, abs=1e-12)
      assert got["appearance_gain"] == pytest.approx(want_app, abs=1e-12)
      assert f"| {b} | {m} | {want_label:+.3f} | {want_app:+.3f} |" in lines
  assert (tmp_path / "labels.png").stat().st_size > 10_000
  # Without a label-only setting there is nothing to compare: no section, no figure.
  c.settings = "iid,none"
  assert experiment.label_shift_summary(wd, experiment.plan_of(c), experiment._table(rows),
                                        c.seeds) == []
