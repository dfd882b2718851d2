import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import adapt, data, inference, metrics, models, plots, train

TINY = models.UNet(features=4, depth=2)
DOMAINS = [data.Domain(60, 30, 200, 30), data.Domain(100, 30, 180, 30), data.Domain(20, 30, 220, 30)]
CONFIG = train.TrainConfig(epochs=4, batch_size=8, learning_rate=1e-2, verbose=False, patience=1)


@pytest.fixture(scope="module")
def stack():
  pairs = [data.make_dataset(jax.random.key(i), d, 48, size=16) for i, d in enumerate(DOMAINS)]
  return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


@pytest.fixture(scope="module")
def trained(stack):
  return train.train_many(TINY, *stack, CONFIG)


def test_train_many_equals_fit(stack, trained):
  x, y = stack
  variables, history = trained
  assert all(a.shape[0] == 3 for a in jax.tree_util.tree_leaves(variables))
  assert history["train_loss"].shape[1] == 3
  for i in range(3):
    v, h = train.fit(TINY, x[i], y[i], dataclasses.replace(CONFIG, seed=CONFIG.seed + i))
    vi = jax.tree_util.tree_map(lambda a: a[i], variables)
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(vi)):
      np.testing.assert_allclose(a, b, atol=1e-5)
    assert h["epochs_run"] == history["epochs_run"][i]
    assert h["best_epoch"] == history["best_epoch"][i]
    np.testing.assert_allclose(h["val_dice"], history["val_dice"][:h["epochs_run"], i], atol=1e-4)
    assert abs(metrics.iou(bnjax.predict(TINY, v, x[i]), y[i])
               - metrics.iou(bnjax.predict(TINY, vi, x[i]), y[i])) < 0.01
  # Early stopping is per model: a stopped model's history is NaN afterwards.
  stopped = history["epochs_run"] < history["train_loss"].shape[0]
  assert stopped.any()
  i = int(np.flatnonzero(stopped)[0])
  assert np.isnan(history["train_loss"][history["epochs_run"][i]:, i]).all()


@pytest.mark.slow
def test_vmap_strategy_matches_unroll(stack):
  x, y = stack
  cfg = dataclasses.replace(CONFIG, epochs=1)
  a, _ = train.train_many(TINY, x[:2], y[:2], cfg, strategy="unroll")
  b, _ = train.train_many(TINY, x[:2], y[:2], cfg, strategy="vmap")
  for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(p, q, atol=1e-4)


def test_evaluate_grid_matches_pairwise_loop(stack, trained):
  x, y = stack
  variables, _ = trained
  out = inference.evaluate_grid(TINY, variables, (x, y), x[:2], (x[:2], y[:2]), mode="train_pass",
                            pair_chunk=3, batch_size=16)
  assert set(out) == {"source_iou", "iou_no_adapt", "iou_adapted"}
  for k in range(3):
    vk = jax.tree_util.tree_map(lambda a: a[k], variables)
    assert out["source_iou"][k, 0] == pytest.approx(
        metrics.iou(bnjax.predict(TINY, vk, x[k]), y[k]), abs=1e-6)
    for m in range(2):
      ad = adapt.recompute_batch_stats(TINY, vk, x[m], mode="train_pass", batch_size=16)
      assert out["iou_no_adapt"][k, m] == pytest.approx(
          metrics.iou(bnjax.predict(TINY, vk, x[m]), y[m]), abs=1e-6)
      assert out["iou_adapted"][k, m] == pytest.approx(
          metrics.iou(bnjax.predict(TINY, ad, x[m]), y[m]), abs=2e-3)
  oracle = jax.tree_util.tree_map(lambda a: a[:2], variables)
  with_oracle = inference.evaluate_grid(TINY, variables, (x, y), x[:2], (x[:2], y[:2]), oracle=oracle)
  np.testing.assert_allclose(with_oracle["iou_oracle"][0], out["source_iou"][:2, 0], atol=1e-6)


def test_input_errors(stack):
  x, y = stack
  with pytest.raises(ValueError, match="masks must have shape"):
    train.train_many(TINY, x, y[:2], CONFIG)
  with pytest.raises(ValueError, match="strategy must be one of"):
    train.train_many(TINY, x, y, CONFIG, strategy="pmap")
  with pytest.raises(ValueError, match="float\\[K, n, H, W, C\\]"):
    train.train_many(TINY, x[0, 0], y[0, 0], CONFIG)


def test_sweep_configs_hold_the_study_grids():
  from experiments.configs import sweep as configs
  from experiments import sweep as experiment
  groups = experiment.groups_of(configs.get_config("brightness,full"))
  assert [g.label for g in groups] == ["k20", "k40", "k80"]
  assert [d.mu1 for d in groups[0].sources] == list(range(10, 171, 20))
  assert all(d.mu2 - d.mu1 == 80 and d.sigma1 == d.sigma2 == 50 for d in groups[2].sources)
  (c,) = experiment.groups_of(configs.get_config("clip_corrected,full"))
  assert c.sources == (data.Domain(96, 18, 138, 18),) and c.layout == "sigma_panels"
  assert all(t.mu2 <= 192 for t in c.targets)
  # 7 mu1 x 7 deltas, filtered by mu2 <= 192, times 5 x 5 sigmas.
  valid = sum(1 for m in range(64, 161, 16) for d in (24, 32, 42, 55, 73, 97, 128) if m + d <= 192)
  assert len(c.targets) == 25 * valid
  assert len(experiment.groups_of(configs.get_config("geometric,full"))[0].sources) == 5
  assert len(experiment.groups_of(configs.get_config("geometric"))[0].sources) == 4
  assert experiment.parse_values("10:170:20", "mu1") == [float(v) for v in range(10, 171, 20)]
  assert experiment.parse_values("1,2.5", "mu1") == [1.0, 2.5]
  with pytest.raises(ValueError, match="config.custom.delta must be a list"):
    experiment.parse_values("1:2:0", "delta")
  custom = configs.get_config("custom")
  custom.custom.mu1, custom.custom.delta, custom.custom.sigma2 = "40,90", "90,200", "20,30"
  (g,) = experiment.groups_of(custom)
  assert set(g.sources) == {data.Domain(m, 50, m + d, s2) for m in (40, 90) for d in (90, 200)
                            for s2 in (20, 30) if m + d <= 255}
  assert len(g.sources) == 6
  with pytest.raises(ValueError, match="'<grid>\\[,full\\]'"):
    configs.get_config("contrast")


def test_plots_write_numbers(tmp_path):
  a = np.array([[0.1, 0.2], [0.3, 0.4]])
  b = np.array([[0.5, 0.6], [0.7, 0.9]])
  plots.heatmaps(a, b, ["s1", "s2"], ["t1", "t2"], tmp_path / "h.png")
  rows = (tmp_path / "h_difference.csv").read_text().splitlines()
  assert rows[0].split(",")[1:] == ["t1", "t2"]
  np.testing.assert_allclose([float(v) for v in rows[2].split(",")[1:]], b[1] - a[1])
  plots.surface(b, ["s1", "s2"], ["t1", "t2"], tmp_path / "s.png")
  targets = [data.Domain(m, 6, m + d, s2) for s2 in (6, 30) for m in (64, 112)
             for d in (24, 128) if m + d <= 192]
  plots.sigma_panels(targets, np.linspace(0, 1, len(targets)), tmp_path / "p.png")
  table = json.loads((tmp_path / "p.json").read_text())
  assert len(table) == len(targets) and all(t["mu2"] <= 192 for t in table)
  plots.histories({"train_loss": np.ones((3, 2)), "val_dice": np.full((3, 2), np.nan)},
                  ["a", "b"], tmp_path / "hist.png")
  for name in ("h.png", "s.png", "p.png", "hist.png"):
    assert (tmp_path / name).stat().st_size > 1000


def test_channel_histograms_drop_constant_channels(tmp_path):
  rng = np.random.default_rng(0)
  src = rng.normal(size=(200, 5))
  tgt = rng.normal(1.0, 2.0, size=(150, 5))
  src[:, 1] = tgt[:, 1] = 0.0  # dead in both: dropped
  src[:, 3] = 2.5  # constant in the source only: kept
  plots.channel_histograms({"source": src, "target": tgt}, tmp_path / "c.png", bins=10)
  record = json.loads((tmp_path / "c.json").read_text())
  assert record["dropped_constant"] == [1]
  assert [h["channel"] for h in record["histograms"]] == [0, 2, 3, 4]
  for h in record["histograms"]:
    assert sum(h["counts"]["source"]) == 200 and sum(h["counts"]["target"]) == 150
    lo, hi = min(src[:, h["channel"]].min(), tgt[:, h["channel"]].min()), max(
        src[:, h["channel"]].max(), tgt[:, h["channel"]].max())
    assert h["edges"][0] == pytest.approx(lo) and h["edges"][-1] == pytest.approx(hi)
  assert (tmp_path / "c.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="same C"):
    plots.channel_histograms({"a": src, "b": tgt[:, :3]}, tmp_path / "d.png")
  with pytest.raises(ValueError, match="NaN"):
    plots.channel_histograms({"a": np.full((4, 2), np.nan)}, tmp_path / "e.png")


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from bnjax import data, models, train
    assert jax.device_count() == 4, jax.devices()
    model = models.UNet(features=2, depth=1)
    doms = [data.Domain(60, 30, 200, 30), data.Domain(100, 30, 180, 30), data.Domain(20, 30, 220, 30)]
    pairs = [data.make_dataset(jax.random.key(i), d, 20, size=8) for i, d in enumerate(doms)]
    x, y = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
    cfg = train.TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, verbose=False)
    for strategy in ("unroll", "vmap"):
      a, ha = train.train_many(model, x, y, cfg, strategy=strategy)
      b, hb = train.train_many(model, x, y, cfg, strategy=strategy, devices=jax.devices()[:1])
      assert all(l.shape[0] == 3 for l in jax.tree_util.tree_leaves(a))
      for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), atol=1e-5)
      np.testing.assert_allclose(ha["val_dice"], hb["val_dice"], atol=1e-5)
    print("SHARDED-OK")
""")


@pytest.mark.slow
def test_four_device_sharding_equals_one_device(root):
  env = {**os.environ, "PYTHONPATH": root,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


SWEEP_CONFIG = ["--config.custom.mu1=40,90,140", "--config.custom.delta=90",
                "--config.custom.sigma1=30", "--config.data.size=16", "--config.data.n_train=24",
                "--config.data.n_eval=8", "--config.data.n_adapt=8", "--config.model.features=2",
                "--config.model.depth=2", "--config.train.epochs=2", "--config.train.batch_size=8",
                "--config.chunk=1", "--config.pair_chunk=4"]


def sweep_cmd(root, out, *extra):
  return [sys.executable, os.path.join(root, "experiments", "sweep.py"),
          f"--config={os.path.join(root, 'experiments', 'configs', 'sweep.py')}:custom",
          f"--workdir={out}", *SWEEP_CONFIG, *extra]


@pytest.mark.slow
def test_sweep_killed_then_resumed(root, tmp_path):
  env = {**os.environ, "PYTHONPATH": root}
  out = tmp_path / "run"
  proc = subprocess.Popen(sweep_cmd(root, out), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  first = out / "checkpoints" / "chunk_0000" / "bnjax.json"
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert first.exists(), "the first chunk was never checkpointed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "summary.md").exists()
  resumed = subprocess.run(sweep_cmd(root, out), env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "models 1-1 of 3 restored" in resumed.stderr
  fresh = subprocess.run(sweep_cmd(root, tmp_path / "fresh"), env=env, capture_output=True,
                         text=True, timeout=600)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  a = json.loads((out / "results" / "custom.json").read_text())
  b = json.loads((tmp_path / "fresh" / "results" / "custom.json").read_text())
  for key in ("source_iou", "iou_no_adapt", "iou_adapted"):
    np.testing.assert_allclose(a[key], b[key], atol=1e-6)
  for name in ("custom_heatmaps.png", "custom_surface.png", "histories.png", "summary.md",
               "custom_heatmaps_adapted.csv"):
    assert (out / name).exists()
  # Everything done is reused; another config into the same workdir is refused.
  again = subprocess.run(sweep_cmd(root, out), env=env, capture_output=True, text=True, timeout=600)
  assert "scores restored" in again.stdout and again.stderr.count("restored") >= 3
  other = subprocess.run(sweep_cmd(root, out, "--config.seed=1"), env=env, capture_output=True,
                         text=True, timeout=600)
  assert other.returncode == 2 and "seed: 0 -> 1" in other.stderr
