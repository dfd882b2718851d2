"""experiments/flow_blowup.py: config errors before anything trains, the
border share against a hand sum, the padding, and a tiny run (files, a row
recomputed by hand from the same flow, a rerun that trains nothing)."""

import json
import math

import jax
import numpy as np
import pytest

from bnjax import adapt, config as bnjax_config, data, flows
from experiments import flow_blowup as experiment
from experiments.configs import flow_blowup as flow_config

pytest.importorskip("sklearn")


def tiny():
  c = flow_config.get_config()
  c.run = "bnjax,diary,repair_actnorm"
  c.batch_sizes = "8"
  c.base.steps, c.base.features, c.base.couplings = 4, 4, 1
  return c


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "run", "bnjax,nowhere"), "'nowhere' is not one of config.settings"),
    (lambda c: c.settings.diary.update({"colour": "red"}), "settings.diary.colour is not a flow"),
    (lambda c: c.settings.diary.update({"size": 12}), "size must be 8"),
    (lambda c: c.settings.diary.update({"norm_axes": "pixel"}), "settings.diary.*norm_axes"),
    (lambda c: c.settings.diary.update({"dtype": "float16"}), "settings.diary.*dtype"),
    (lambda c: setattr(c, "batch_sizes", "8,1600"), "batch_sizes"),
])
def test_config_errors(change, message):
  c = tiny()
  change(c)
  with pytest.raises(bnjax_config.ConfigError, match=message):
    experiment.plan_of(c)


def test_the_default_plan():
  plan = experiment.plan_of(flow_config.get_config())
  assert [s.name for s in plan.settings][:2] == ["bnjax", "padded"]


def test_border_share_and_padding():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((5, 4, 4, 1))
  constant = np.zeros((4, 4, 1), bool)
  constant[0] = True
  want = (0.5 * z[:, 0] ** 2).sum() / (0.5 * z ** 2).sum()
  assert experiment.border_share(z, constant) == pytest.approx(want, rel=1e-12)
  assert math.isnan(experiment.border_share(np.full((2, 4, 4, 1), np.inf), constant))
  x = rng.random((3, 8, 8, 1)).astype(np.float32)
  padded = experiment._sized(x, 16)
  assert padded.shape == (3, 16, 16, 1)
  np.testing.assert_array_equal(padded[:, 4:12, 4:12], x)
  assert padded[:, :4].max() == 0 and padded[:, :, 12:].max() == 0


@pytest.mark.e2e
def test_tiny_run(tmp_path):
  c = tiny()
  rows = experiment.run(c, str(tmp_path))
  assert [r["setting"] for r in rows] == ["bnjax", "diary", "repair_actnorm"]
  for name in ("flow_blowup.md", "flow_blowup.csv", "flow_blowup.json", "blowup.png",
               "blowup.json"):
    assert (tmp_path / name).exists(), name
  # The diary's row by hand: the same flow trained again, its running and
  # exact bits/dim and its smallest variance ratio.
  plan = experiment.plan_of(c)
  setting = plan.settings[1]
  train, val = experiment._digits(c)
  train, val = experiment._sized(train, 16), experiment._sized(val, 16)
  model = setting.model()
  v, _ = flows.fit(data.named_key(c.seed, "flow"), model, train, setting.flow_config(8, c.seed),
                   verbose=False)
  lp = np.asarray(model.apply(v, val, method="log_prob"), np.float64)
  bpd = (-lp / 256 + math.log(17)) / math.log(2)
  row = rows[1]
  assert row["val_bpd_running"] == pytest.approx(bpd.mean(), rel=1e-5)
  assert row["val_bpd_running_max"] == pytest.approx(bpd.max(), rel=1e-5)
  exact = adapt.recompute_batch_stats(model, v, train)
  lp = np.asarray(model.apply(exact, val, method="log_prob"), np.float64)
  assert row["val_bpd_exact"] == pytest.approx(((-lp / 256 + math.log(17)) / math.log(2)).mean(),
                                               rel=1e-5)
  eps = setting.epsilon
  low = min(float(np.min((np.asarray(v["batch_stats"][k]["var"]) + eps)
                         / (np.asarray(exact["batch_stats"][k]["var"]) + eps)))
            for k in v["batch_stats"])
  assert row["ratio_min"] == pytest.approx(low, rel=1e-5)
  units = json.loads((tmp_path / "flow_blowup.json").read_text())["units"]
  assert set(units["diary|8|0"]["layers_running"]) >= {"logit", "0 coupling", "1 batchnorm"}
  # A rerun restores every unit.
  again = experiment.run(c, str(tmp_path))
  assert json.dumps(again, sort_keys=True) == json.dumps(rows, sort_keys=True)
