import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import processes
import tolerance
from bnjax import adapt, data, inference, metrics, models, train

TINY = models.UNet(features=4, depth=2)
DOMAINS = [data.Domain(60, 30, 200, 30), data.Domain(100, 30, 180, 30), data.Domain(20, 30, 220, 30)]
# SGD with momentum, not Adam: Adam's update g / (|g| + eps) turns the float32
# rounding of a near-zero gradient element into a step of the full learning
# rate, which a stack and a single model take differently (seen: one model
# of three 2e-4 apart after one epoch, its early stopping changed); SGD keeps
# the two within rounding, so their decisions and predictions can be
# compared tightly.
CONFIG = train.TrainConfig(epochs=6, batch_size=8, optimizer="sgd", learning_rate=0.1,
                           momentum=0.9, verbose=False, patience=1)


@pytest.fixture(scope="module")
def stack():
  # Masks of about half the pixels (threshold 0.2): every image has a
  # foreground large enough that a flipped pixel moves its Dice or IoU by
  # little, so that the flip budgets below bound the scores tightly.
  pairs = [data.make_dataset(jax.random.key(i), d, 48, size=16, threshold=0.2)
           for i, d in enumerate(DOMAINS)]
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
  """Six epochs: the same decisions (epochs run, best epoch) and the same
  predictions up to pixels that float32 rounding can flip. Budget: 0.2 % of
  the pixels compared (measured here: 0; a model of another seed disagrees
  on 3-44 %): of the 12 288 pixels of a set for the final predictions, of
  the validation set's pixels for each epoch's validation Dice
  (tolerance.dice_tolerance: one image predicted differently exceeds it)."""
  x, y = stack
  variables, history = trained
  assert all(a.shape[0] == 3 for a in jax.tree_util.tree_leaves(variables))
  assert history["train_loss"].shape[1] == 3
  budget = int(0.002 * y[0].size)
  _, n_val = CONFIG.split_sizes(48)
  for i in range(3):
    v, h = train.fit(TINY, x[i], y[i], dataclasses.replace(CONFIG, seed=CONFIG.seed + i))
    vi = jax.tree_util.tree_map(lambda a: a[i], variables)
    assert h["epochs_run"] == history["epochs_run"][i]
    assert h["best_epoch"] == history["best_epoch"][i]
    pa, pb = bnjax.predict(TINY, v, x[i]), bnjax.predict(TINY, vi, x[i])
    assert tolerance.pixel_disagreement(pa, pb) <= budget
    # The validation set: the last n_val of the split permutation (TrainConfig's doc).
    val_masks = np.asarray(y[i])[np.asarray(jax.random.permutation(
        train._seed_keys(CONFIG.seed + i)[1], 48))[48 - n_val:]]
    tol = tolerance.dice_tolerance(val_masks, max(1, int(0.002 * val_masks.size)))
    assert tol < 0.1  # a bound that one wrong image would break
    np.testing.assert_allclose(h["val_dice"], history["val_dice"][:h["epochs_run"], i],
                               rtol=0, atol=tol)
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


# The loop's model call, compiled once per shape (eagerly, a U-Net's every
# primitive compiles on its own).
_apply = jax.jit(lambda v, x: TINY.apply(v, x, train=False))


def _iou_and_tolerance(variables, x, y):
  """IoU of a model on (x, y) computed from its logits here (argmax of
  model.apply), how far another evaluation of the same variables may be from
  it (the near-boundary pixels, tests/tolerance.py), and the logits."""
  z = np.asarray(_apply(variables, x))
  pred = np.argmax(z, -1) == 1
  # + 1e-7: the mean over images is a float32 sum in either program.
  tol = tolerance.iou_tolerance_at(pred, y, tolerance.near_boundary(z)) + 1e-7
  return metrics.iou(pred, y), tol, z


def test_evaluate_grid_matches_pairwise_loop(stack, trained):
  """The stacked grid against a loop over pairs written here (model.apply
  and argmax, recompute_batch_stats per pair): the two programs agree to
  float32 rounding in every logit, so every predicted pixel agrees except
  where the two class logits are within rounding of each other, and the
  IoUs differ at most by what those pixels can move (often exactly 0)."""
  x, y = stack
  variables, _ = trained
  # The oracles: the source models themselves (oracle m on target m is source
  # model m on its own set here).
  out = inference.evaluate_grid(TINY, variables, (x, y), x, (x, y), mode="train_pass",
                                oracle=variables, pair_chunk=3, batch_size=16,
                                return_masks=True)
  assert set(out) == {"source_iou", "iou_no_adapt", "iou_adapted", "iou_oracle", "masks_source",
                      "masks_no_adapt", "masks_adapted", "masks_oracle"}
  assert out["masks_adapted"].shape == (3, 3, 48, 16, 16) and out["masks_adapted"].dtype == bool

  def check(variables, x, y, iou, masks):
    want, tol, z = _iou_and_tolerance(variables, x, y)
    assert iou == pytest.approx(want, abs=tol)
    differ = masks != (np.argmax(z, -1) == 1)
    assert not np.any(differ & ~tolerance.near_boundary(z))

  for k in range(3):
    vk = jax.tree_util.tree_map(lambda a: a[k], variables)
    check(vk, x[k], y[k], out["source_iou"][k, 0], out["masks_source"][k])
    check(vk, x[k], y[k], out["iou_oracle"][0, k], out["masks_oracle"][k])
    np.testing.assert_array_equal(out["iou_oracle"][:, k], out["iou_oracle"][0, k])
    for m in range(3):
      check(vk, x[m], y[m], out["iou_no_adapt"][k, m], out["masks_no_adapt"][k, m])
      ad = adapt.recompute_batch_stats(TINY, vk, x[m], mode="train_pass", batch_size=16)
      check(ad, x[m], y[m], out["iou_adapted"][k, m], out["masks_adapted"][k, m])


def test_input_errors(stack):
  x, y = stack
  with pytest.raises(ValueError, match="masks must have shape"):
    train.train_many(TINY, x, y[:2], CONFIG)
  with pytest.raises(ValueError, match="strategy must be one of"):
    train.train_many(TINY, x, y, CONFIG, strategy="pmap")
  with pytest.raises(ValueError, match="float\\[K, n, H, W, C\\]"):
    train.train_many(TINY, x[0, 0], y[0, 0], CONFIG)


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
        # the same flip rate on the validation pixels: one image predicted otherwise exceeds it
        tol = tolerance.dice_tolerance(val, max(1, int(0.002 * val.size)))
        assert tol < 0.5, tol
        np.testing.assert_allclose(ha["val_dice"][:, i], hb["val_dice"][:, i], rtol=0, atol=tol)
    # The 3 x 3 grid's pairs split over the 4 devices against one device:
    # every predicted mask pixel by pixel (the flip budget of the whole grid),
    # then the scores within what those flips can move them.
    grid = lambda devices: inference.evaluate_grid(model, a, (x, y), x, (x, y), pair_chunk=2,
                                                   oracle=b, devices=devices, return_masks=True)
    g4, g1 = grid(None), grid(jax.devices()[:1])
    for key in ("masks_source", "masks_no_adapt", "masks_adapted", "masks_oracle"):
      assert g4[key].shape == g1[key].shape and g4[key].shape[-2:] == (8, 8), key
      flips = tolerance.pixel_disagreement(g4[key], g1[key])
      assert flips <= budget, (key, flips)
    tol = max(tolerance.iou_tolerance(y[i], budget) for i in range(3))
    for key in ("source_iou", "iou_no_adapt", "iou_adapted", "iou_oracle"):
      np.testing.assert_allclose(g4[key], g1[key], rtol=0, atol=tol, err_msg=key)
    print("SHARDED-OK")
""")


@pytest.mark.slow
def test_four_device_sharding_equals_one_device(root):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")]),
         "XLA_FLAGS": processes.devices_flag(4), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
