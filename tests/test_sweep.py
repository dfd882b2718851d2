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
import tolerance
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


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_one_step_of_a_stack_equals_one_step_alone(stack):
  """Model i of a stack starts where fit with seed + i starts and takes the
  same first batch: one SGD step (an update lr * g, no normalisation that
  would amplify a tiny gradient's rounding into a full step, as Adam's
  first step g / |g| does) differs only by the float32 rounding of g. Each
  kernel-gradient element sums N <= 40 * 16 * 16 = 10 240 products, so its
  rounding is at most about N * eps = 6e-4 of the sum of their magnitudes:
  bounded here by 1e-3 of the leaf's largest update (measured: 1.2e-4 at
  most); another initialisation or batch differs by the update itself."""
  x, y = stack
  cfg = dataclasses.replace(CONFIG, epochs=1, batch_size=40, learning_rate=0.1, optimizer="sgd",
                            momentum=0.0, grad_clip=None, patience=None)
  assert cfg.split_sizes(48) == (43, 5)  # one step per epoch
  stacked, _ = train.train_many(TINY, x, y, cfg)
  for i in range(3):
    alone, _ = train.fit(TINY, x[i], y[i], dataclasses.replace(cfg, seed=CONFIG.seed + i))
    start = models.init_variables(TINY, train._seed_keys(CONFIG.seed + i)[0], (16, 16, 1))
    for a, b, p0 in zip(_leaves(jax.tree_util.tree_map(lambda t: t[i], stacked)), _leaves(alone),
                        _leaves(start)):
      update = np.max(np.abs(b - p0))
      assert update > 0
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * update + 1e-7 * np.max(np.abs(p0)))


def test_train_many_equals_fit(stack, trained):
  """Four epochs: the same decisions (epochs run, best epoch) and the same
  predictions up to pixels that float32 rounding can flip. Budget: 0.2 % of
  the 12 288 pixels of a set (measured here: 0; a model of another seed
  disagrees on 3-44 %); the validation Dice within the flips of that budget
  (tolerance.dice_tolerance)."""
  x, y = stack
  variables, history = trained
  assert all(a.shape[0] == 3 for a in jax.tree_util.tree_leaves(variables))
  assert history["train_loss"].shape[1] == 3
  budget = int(0.002 * y[0].size)
  for i in range(3):
    v, h = train.fit(TINY, x[i], y[i], dataclasses.replace(CONFIG, seed=CONFIG.seed + i))
    vi = jax.tree_util.tree_map(lambda a: a[i], variables)
    assert h["epochs_run"] == history["epochs_run"][i]
    assert h["best_epoch"] == history["best_epoch"][i]
    pa, pb = bnjax.predict(TINY, v, x[i]), bnjax.predict(TINY, vi, x[i])
    assert tolerance.pixel_disagreement(pa, pb) <= budget
    _, n_val = CONFIG.split_sizes(48)
    val_masks = np.asarray(y[i])[np.asarray(jax.random.permutation(
        train._seed_keys(CONFIG.seed + i)[1], 48))[48 - n_val:]]
    np.testing.assert_allclose(h["val_dice"], history["val_dice"][:h["epochs_run"], i],
                               rtol=0, atol=tolerance.dice_tolerance(val_masks, budget))
  # Early stopping is per model: a stopped model's history is NaN afterwards.
  stopped = history["epochs_run"] < history["train_loss"].shape[0]
  assert stopped.any()
  i = int(np.flatnonzero(stopped)[0])
  assert np.isnan(history["train_loss"][history["epochs_run"][i]:, i]).all()


@pytest.mark.slow
def test_vmap_strategy_matches_unroll(stack):
  """The two mappings of a stack: the same predictions after an epoch, up to
  the flip budget of test_train_many_equals_fit."""
  x, y = stack
  cfg = dataclasses.replace(CONFIG, epochs=1)
  a, _ = train.train_many(TINY, x[:2], y[:2], cfg, strategy="unroll")
  b, _ = train.train_many(TINY, x[:2], y[:2], cfg, strategy="vmap")
  pa = inference.stacked_predict(TINY, a, x[:2], strategy="unroll")
  pb = inference.stacked_predict(TINY, b, x[:2], strategy="unroll")
  assert tolerance.pixel_disagreement(pa, pb) <= int(0.002 * y[:2].size)


def _iou_and_tolerance(variables, x, y):
  """IoU of a model on (x, y) computed from its logits here (argmax of
  model.apply), and how far another evaluation of the same variables may be
  from it (the near-boundary pixels, tests/tolerance.py)."""
  z = np.asarray(TINY.apply(variables, x, train=False))
  pred = np.argmax(z, -1) == 1
  # + 1e-7: the mean over images is a float32 sum in either program.
  return metrics.iou(pred, y), tolerance.iou_tolerance_at(pred, y, tolerance.near_boundary(z)) + 1e-7


def test_evaluate_grid_matches_pairwise_loop(stack, trained):
  """The stacked grid against a loop over pairs written here (model.apply
  and argmax, recompute_batch_stats per pair): the two programs agree to
  float32 rounding in every logit, so their IoUs differ at most by what the
  pixels near the decision boundary can move (often exactly 0)."""
  x, y = stack
  variables, _ = trained
  out = inference.evaluate_grid(TINY, variables, (x, y), x[:2], (x[:2], y[:2]), mode="train_pass",
                            pair_chunk=3, batch_size=16)
  assert set(out) == {"source_iou", "iou_no_adapt", "iou_adapted"}
  for k in range(3):
    vk = jax.tree_util.tree_map(lambda a: a[k], variables)
    want, tol = _iou_and_tolerance(vk, x[k], y[k])
    assert out["source_iou"][k, 0] == pytest.approx(want, abs=tol)
    for m in range(2):
      want, tol = _iou_and_tolerance(vk, x[m], y[m])
      assert out["iou_no_adapt"][k, m] == pytest.approx(want, abs=tol)
      ad = adapt.recompute_batch_stats(TINY, vk, x[m], mode="train_pass", batch_size=16)
      want, tol = _iou_and_tolerance(ad, x[m], y[m])
      assert out["iou_adapted"][k, m] == pytest.approx(want, abs=tol)
  oracle = jax.tree_util.tree_map(lambda a: a[:2], variables)
  with_oracle = inference.evaluate_grid(TINY, variables, (x, y), x[:2], (x[:2], y[:2]), oracle=oracle)
  for m in range(2):  # oracle m on target m is source model m on its own set here
    want, tol = _iou_and_tolerance(jax.tree_util.tree_map(lambda a: a[m], variables), x[m], y[m])
    assert with_oracle["iou_oracle"][0, m] == pytest.approx(want, abs=tol)


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
    import tolerance
    from bnjax import data, inference, models, train
    assert jax.device_count() == 4, jax.devices()
    model = models.UNet(features=2, depth=1)
    doms = [data.Domain(60, 30, 200, 30), data.Domain(100, 30, 180, 30), data.Domain(20, 30, 220, 30)]
    pairs = [data.make_dataset(jax.random.key(i), d, 20, size=8) for i, d in enumerate(doms)]
    x, y = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
    cfg = train.TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, verbose=False)
    budget = int(0.002 * y.size) + 1  # as tests/test_sweep.py's budget: rounding flips only
    n_train, n_val = cfg.split_sizes(20)
    for strategy in ("unroll", "vmap"):
      a, ha = train.train_many(model, x, y, cfg, strategy=strategy)
      b, hb = train.train_many(model, x, y, cfg, strategy=strategy, devices=jax.devices()[:1])
      assert all(l.shape[0] == 3 for l in jax.tree_util.tree_leaves(a))
      pa = inference.stacked_predict(model, a, x, strategy=strategy)
      pb = inference.stacked_predict(model, b, x, strategy=strategy)
      assert tolerance.pixel_disagreement(pa, pb) <= budget, tolerance.pixel_disagreement(pa, pb)
      for i in range(3):
        val = np.asarray(y[i])[np.asarray(jax.random.permutation(train._seed_keys(i)[1], 20))[n_train:]]
        np.testing.assert_allclose(ha["val_dice"][:, i], hb["val_dice"][:, i], rtol=0,
                                   atol=tolerance.dice_tolerance(val, budget))
    # The 3 x 3 grid's pairs split over the 4 devices against one device.
    grid = lambda devices: inference.evaluate_grid(model, a, (x, y), x, (x, y), pair_chunk=2,
                                                   oracle=b, devices=devices)
    g4, g1 = grid(None), grid(jax.devices()[:1])
    tol = max(tolerance.iou_tolerance(y[i], budget) for i in range(3))
    for key in ("source_iou", "iou_no_adapt", "iou_adapted", "iou_oracle"):
      np.testing.assert_allclose(g4[key], g1[key], rtol=0, atol=tol, err_msg=key)
    print("SHARDED-OK")
""")


@pytest.mark.slow
def test_four_device_sharding_equals_one_device(root):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")]),
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
    # The same programs on the same machine (the restored chunk is the saved
    # one bit for bit): the same numbers, exactly.
    np.testing.assert_array_equal(a[key], b[key])
  for name in ("custom_heatmaps.png", "custom_surface.png", "histories.png", "summary.md",
               "custom_heatmaps_adapted.csv"):
    assert (out / name).exists()
  # Everything done is reused; another config into the same workdir is refused.
  again = subprocess.run(sweep_cmd(root, out), env=env, capture_output=True, text=True, timeout=600)
  assert "scores restored" in again.stdout and again.stderr.count("restored") >= 3
  other = subprocess.run(sweep_cmd(root, out, "--config.seed=1"), env=env, capture_output=True,
                         text=True, timeout=600)
  assert other.returncode == 2 and "seed: 0 -> 1" in other.stderr
