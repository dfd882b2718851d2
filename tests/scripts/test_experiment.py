"""The experiment scripts: each ``run(config, workdir)`` in-process at tiny
sizes; a subprocess only where the test is about the process."""

import csv
import json
import os

import numpy as np
import pytest
import scipy.stats

import tolerance
from bnjax import adapt, cli, data, models, workdir
from experiments import adapt_pair, predict_gain, sweep
from experiments.configs import adapt_pair as adapt_pair_config
from experiments.configs import predict_gain as predict_gain_config
from experiments.configs import sweep as sweep_config


def tiny_adapt_pair():
  c = adapt_pair_config.get_config()
  c.data.size, c.data.n_train, c.data.n_eval, c.data.n_adapt = 16, 48, 8, 8
  c.model.features, c.model.depth = 2, 2
  c.train.epochs, c.train.batch_size = 1, 8
  return c


def test_configs_open_with_their_command_and_expected_result(root):
  folder = os.path.join(root, "experiments", "configs")
  for name in sorted(os.listdir(folder)):
    if name.endswith(".py") and not name.startswith("_"):
      doc = open(os.path.join(folder, name)).read().split('"""')[1]
      assert f"experiments/configs/{name}" in doc and "python experiments/" in doc, name
      assert "Expected" in doc and "min" in doc, name
  paper = adapt_pair_config.get_config("paper")
  assert (paper.data.size, paper.model.features, paper.train.optimizer) == (64, 64, "rmsprop")
  with pytest.raises(ValueError, match="'cpu' or 'paper'"):
    adapt_pair_config.get_config("gpu")


@pytest.mark.e2e
def test_adapt_pair_runs_resumes_and_refuses_another_config(tmp_path, capsys):
  config = tiny_adapt_pair()
  results = adapt_pair.run(config, str(tmp_path))
  assert len(results["targets"]) == 2
  for entry in results["targets"]:
    assert set(entry["domain"]) == {"mu1", "sigma1", "mu2", "sigma2"}
    for k in ("iou_no_adapt", "iou_adapted", "iou_oracle", "mask_fraction"):
      assert 0.0 <= entry[k] <= 1.0
  stored = json.loads((tmp_path / "results" / "results.json").read_text())
  assert stored["targets"][0]["iou_adapted"] == results["targets"][0]["iou_adapted"]
  # Two numbers by hand, from the checkpoints and fresh draws of the data:
  # the first target's IoU after adaptation and of its oracle.
  wd = workdir.Workdir.read(str(tmp_path))
  model = models.UNet(features=2, depth=2)
  target = data.Domain(*config.targets[0])
  draw = lambda split, n: data.make_dataset(data.split_key(config.seed, target, split), target, n,
                                            config.data.size)
  x, y = draw("eval", config.data.n_eval)
  adapted = adapt.recompute_batch_stats(model, wd.load_model("source")[0], draw("adapt", config.data.n_adapt)[0])
  for variables, key in ((adapted, "iou_adapted"), (wd.load_model("oracle1")[0], "iou_oracle")):
    z = np.asarray(model.apply(variables, x, train=False))
    pred, masks = np.argmax(z, -1) == 1, np.asarray(y)
    inter, union = (pred & masks).sum((1, 2)), (pred | masks).sum((1, 2))
    want = np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
    tol = tolerance.iou_tolerance_at(pred, masks, tolerance.near_boundary(z)) + 1e-7
    assert results["targets"][0][key] == pytest.approx(want, abs=tol), key
  assert json.loads((tmp_path / "config.json").read_text())["config"]["train"]["epochs"] == 1
  for name in ("results.md", "adapt_pair.png", "history.png", "history.json"):
    assert (tmp_path / name).stat().st_size > 0
  capsys.readouterr()
  again = adapt_pair.run(config, str(tmp_path))  # same config: resumed, nothing retrained
  out = capsys.readouterr().out
  assert "resuming the run" in out and out.count("restored from") == 3
  for a, b in zip(again["targets"], results["targets"]):
    for k in ("iou_no_adapt", "iou_adapted", "iou_oracle"):
      assert a[k] == b[k]
  other = tiny_adapt_pair()
  other.train.epochs, other.targets = 2, ((150.0, 50.0, 230.0, 50.0),)
  with pytest.raises(workdir.ConfigMismatch, match=r"train\.epochs: 1 -> 2") as e:
    adapt_pair.run(other, str(tmp_path))
  assert "targets:" in str(e.value)


@pytest.mark.e2e
def test_adapt_pair_interrupted_then_resumed(tmp_path, capsys, monkeypatch):
  calls = []
  real_fit = adapt_pair.train.fit

  def fit_then_interrupt(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # Ctrl-C while the first oracle trains
      raise KeyboardInterrupt
    return real_fit(*args, **kwargs)

  monkeypatch.setattr(adapt_pair.train, "fit", fit_then_interrupt)
  config = tiny_adapt_pair()
  with pytest.raises(SystemExit) as e:
    with cli.interruptible(str(tmp_path), "adapt_pair"):
      adapt_pair.run(config, str(tmp_path))
  assert e.value.code == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f"interrupted: {tmp_path} keeps 1 trained model checkpoint and 0 result "
                     "files; run the same command again to resume adapt_pair from there")
  monkeypatch.setattr(adapt_pair.train, "fit", real_fit)
  results = adapt_pair.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "source (90,50,170,50): restored" in out and out.count("restored from") == 1
  assert len(results["targets"]) == 2


@pytest.mark.e2e
def test_sweep_and_predict_gain_in_process(tmp_path):
  config = sweep_config.get_config("custom")
  config.custom.mu1, config.custom.delta, config.custom.sigma1 = "40,140", "90", "30"
  config.data.size, config.data.n_train, config.data.n_eval, config.data.n_adapt = 16, 24, 8, 8
  config.model.features, config.model.depth = 2, 2
  config.train.epochs, config.train.batch_size = 1, 8
  config.chunk, config.pair_chunk = 1, 4
  out = sweep.run(config, str(tmp_path / "sweep"))
  res = out["custom"]
  assert np.asarray(res["iou_adapted"]).shape == (2, 2)
  assert res["sources"][0] == {"mu1": 40.0, "sigma1": 30.0, "mu2": 130.0, "sigma2": 30.0}
  assert (tmp_path / "sweep" / "custom_heatmaps.png").exists()
  assert (tmp_path / "sweep" / "summary.md").exists()

  gain = predict_gain_config.get_config()
  gain.sweep_dir = str(tmp_path / "sweep")
  gain.taps, gain.bootstrap, gain.max_rows, gain.sinkhorn_points = ("bottleneck", "dec0"), 20, 200, 100
  ranking = predict_gain.run(gain, str(tmp_path / "gain"))
  names = {e["predictor"] for e in ranking}
  assert {"bn_diag_w2", "bottleneck/adapted/frechet", "dec0/unadapted/sliced_w2"} <= names
  for name in ("scatter_top6.png", "distances.csv", "ranking.md", "results/ranking.json"):
    assert (tmp_path / "gain" / name).exists()
  # Every Spearman of the ranking recomputed from distances.csv with SciPy
  # (x = log(1 + max(predictor, 0))), and the ranking's order.
  with open(tmp_path / "gain" / "distances.csv") as f:
    table = list(csv.DictReader(f))
  iou_adapted = np.array([float(r["iou_adapted"]) for r in table])
  gain_ = iou_adapted - np.array([float(r["iou_no_adapt"]) for r in table])
  for e in ranking:
    x = np.log1p(np.maximum(np.array([float(r[e["predictor"]]) for r in table]), 0))
    for name, y in (("iou_adapted", iou_adapted), ("gain", gain_)):
      want = scipy.stats.spearmanr(x, y).statistic
      if np.isfinite(want):
        assert e[f"spearman_{name}"] == pytest.approx(want, abs=1e-9), e["predictor"]
      else:  # a constant predictor (e.g. a collapsed tap): no correlation
        assert not np.isfinite(e[f"spearman_{name}"]), e["predictor"]
  order = [abs(np.nan_to_num(e["spearman_iou_adapted"])) for e in ranking]
  assert order == sorted(order, reverse=True)
  with pytest.raises(ValueError, match="holds a run of 'sweep', not"):
    workdir.Workdir.read(str(tmp_path / "sweep"), "adapt_pair")
