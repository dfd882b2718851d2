"""experiments/generative.py: config errors before anything runs, the chi_d
KS statistic against SciPy; slow: a tiny end-to-end run (files, one number
recomputed from a checkpoint, a rerun that trains nothing)."""

import json

import jax
import numpy as np
import pytest
from scipy import stats as sps

from bnjax import adapt, config as bnjax_config, data, flows, workdir
from experiments import generative as experiment
from experiments.configs import generative as generative_config

pytest.importorskip("sklearn")

# Its slow or e2e tests run for minutes: scheduled first (tests/conftest.py).
RUNS_FOR_MINUTES = True


def tiny():
  c = generative_config.get_config()
  c.flow.batch_sizes = "8,16"
  c.flow.latent_batch = 8
  c.flow.seeds = 1
  c.flow.steps = 6
  c.flow.features, c.flow.couplings = 4, 1
  c.inpaint.images, c.inpaint.steps = 8, 3
  c.vae.steps, c.vae.classifier_steps, c.vae.features = 4, 4, 4
  c.shift.shifts, c.shift.severities = "brightness,blur", "1,5"
  c.shift.n_eval = c.shift.n_adapt = 16
  c.shift.flow_steps, c.shift.flow_batch_size = 4, 8
  c.data.size, c.data.n_train = 16, 24
  c.model.features, c.model.depth = 2, 2
  c.train.epochs, c.train.batch_size = 1, 8
  c.bootstrap = 20
  return c


@pytest.mark.parametrize("field,value,message", [
    ("flow.latent_batch", 64, "config.flow.latent_batch must be one of flow.batch_sizes"),
    ("flow.norms", "actnorm", "config.flow.norms must include 'batch'"),
    ("shift.shifts", "brightness,nope", "config.shift.shifts must be a comma-separated list"),
    ("flow.learning_rate", 0.0, "config.flow.learning_rate must be a finite number > 0"),
    ("vae.wrong_label_rate", 1.5, "config.vae.wrong_label_rate must"),
    ("flow.temperature", -1.0, "config.flow.temperature must be a finite number > 0"),
    ("shift.downsample", 3, "config.shift.downsample"),
    ("shift.flow_batch_size", 64, r"config.shift.flow_batch_size must be <= data.n_train \(24\)"),
])
def test_config_errors_name_their_key(tmp_path, field, value, message):
  c = tiny()
  group, name = field.split(".")
  c[group][name] = value
  with pytest.raises(bnjax_config.ConfigError, match=message):
    experiment.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # refused before the workdir is made


def test_ks_against_chi_matches_scipy():
  rng = np.random.default_rng(0)
  for d, scale in ((64, 1.0), (16, 1.3)):
    radii = np.linalg.norm(rng.standard_normal((300, d)) * scale, axis=1)
    want = sps.kstest(radii, sps.chi(d).cdf).statistic
    assert experiment.ks_against_chi(radii, d) == pytest.approx(want, abs=2e-6)


@pytest.mark.e2e
def test_tiny_run_files_one_number_and_resume(tmp_path):
  c = tiny()
  path = tmp_path / "gen"
  first = experiment.run(c, str(path))
  for name in ("generative.md", "generative.json", "flows.csv", "vae.csv", "shifts.csv",
               "flow_bpd.png", "flow_bpd.json", "latent_radius.png", "latent_radius.json",
               "samples.png", "inpainting.png", "vae_labels_lambda.png",
               "vae_labels_lambda0.png", "shift_scatter.png", "shift_scatter.json"):
    assert (path / name).stat().st_size > 0, name
  assert len(first["flows"]) == 2 * 2  # batch sizes x norms x 1 seed
  assert len(first["shifts"]["rows"]) == 2 * 2
  assert len(first["vae"]) == 3
  # The exact-statistics validation bits/dim of one flow, from its checkpoint:
  # the statistics recomputed as the train-mode moments of the whole training
  # set, then the validation log-density, by hand from the saved radii's twin.
  wd = workdir.Workdir.read(str(path))
  variables, _ = wd.load_model("flow_batch_b16_s0")
  # The experiment's split (its config: the first n_val digits of a
  # permutation drawn with NumPy's default_rng(seed) are held out) and flow.
  images, _ = data.digits()
  order = np.random.default_rng(c.seed).permutation(len(images))
  x_val, x_tr = images[order[:c.n_val]], images[order[c.n_val:]]
  model = flows.RealNVP(x_tr.shape[1:], features=c.flow.features, blocks=c.flow.blocks,
                        couplings=c.flow.couplings, norm="batch", momentum=c.flow.momentum)
  key = data.named_key(c.seed, "generative", "dequantize")
  val = flows.dequantize(jax.random.fold_in(key, 0), x_val, 17)
  train_deq = flows.dequantize(jax.random.fold_in(key, 1), x_tr, 17)
  exact = adapt.recompute_batch_stats(model, variables, train_deq)
  lp = np.asarray(model.apply(exact, val, method="log_prob"), np.float64)
  want = np.mean((-lp / 64 + np.log(17)) / np.log(2))
  row = next(r for r in first["flows"] if r["norm"] == "batch" and r["batch_size"] == 16)
  assert row["val_bpd_exact"] == pytest.approx(want, rel=1e-6)
  # the KS statistic of the figure's radii against SciPy's chi_64
  with open(path / "latent_radius.json") as f:
    radii = json.load(f)["radii"]
  for label, r in radii.items():
    assert first["latents"][label]["ks_chi"] == pytest.approx(
        sps.kstest(r, sps.chi(64).cdf).statistic, abs=2e-6)
  # A rerun restores every model and reproduces every number.
  again = experiment.run(c, str(path))
  for key_ in ("flows", "latents", "inpainting", "vae", "shifts"):
    assert json.dumps(again[key_], sort_keys=True) == json.dumps(first[key_], sort_keys=True)
