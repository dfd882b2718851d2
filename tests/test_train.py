import dataclasses

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiles
import tolerance

import bnjax
from bnjax import adapt, data, metrics, models, train

TINY = models.UNet(features=4, depth=2)


@pytest.fixture(scope="module")
def tiny_data():
  return data.make_dataset(jax.random.key(0), data.Domain(60, 30, 200, 30), 72, size=16)


def config(**kw):
  base = dict(epochs=3, batch_size=8, learning_rate=1e-2, verbose=False)
  return train.TrainConfig(**{**base, **kw})




def test_fit_learns_and_is_deterministic(tiny_data):
  x, y = tiny_data
  v1, h1 = train.fit(TINY, x, y, config(epochs=6, patience=None))
  v2, h2 = train.fit(TINY, x, y, config(epochs=6, patience=None))
  # Measured (seeds 0, 1, 2): last training loss 0.38 / 0.35 / 0.15 from about
  # 1.2 untrained (learning_rate 0 or 1e-4 stays at 1.2 / 1.15), validation
  # Dice 0.93 / 0.96 / 0.95, IoU 0.89 / 0.93 / 0.93; trained parameters with
  # the initial BatchNorm statistics score IoU 0.22.
  assert h1["train_loss"][-1] < 0.5
  assert h1["val_dice"][-1] > 0.85
  assert set(h1) >= {"train_loss", "val_loss", "val_dice", "seconds", "best_epoch", "epochs_run"}
  for a, b in zip(jax.tree_util.tree_leaves(v1), jax.tree_util.tree_leaves(v2)):
    np.testing.assert_array_equal(a, b)
  v3, _ = train.fit(TINY, x, y, config(epochs=1, seed=1))
  assert not np.array_equal(v3["params"]["head"]["kernel"], v1["params"]["head"]["kernel"])
  pred = bnjax.predict(TINY, v1, x)
  assert pred.shape == y.shape and pred.dtype == bool
  assert metrics.iou(pred, y) > 0.8


def test_early_stopping_keeps_best(tiny_data):
  x, y = tiny_data
  _, h = train.fit(TINY, x, y, config(epochs=10, learning_rate=0.0, patience=2))
  # With a zero learning rate the validation Dice never improves after epoch 1.
  assert h["epochs_run"] == 3 and h["best_epoch"] == 1


def test_fit_updates_batch_stats_and_split(tiny_data):
  x, y = tiny_data
  v0 = models.init(TINY, train._seed_keys(0)[0], (16, 16, 1))
  # Without a validation split, 65 training images: the training step of the
  # other tests' 72 images less 7 for validation, compiled once.
  v, h = train.fit(TINY, x[:65], y[:65], config(epochs=1, val_fraction=0.0))
  assert h["epochs_run"] == h["best_epoch"] == 1 and np.isnan(h["val_dice"][0])
  assert not np.allclose(v["batch_stats"]["enc0"]["bn0"]["mean"], v0["batch_stats"]["enc0"]["bn0"]["mean"])
  assert config().split_sizes(72) == (65, 7)  # round(7.2) validation images
  with pytest.raises(ValueError, match="fewer than batch_size=80"):
    train.fit(TINY, x, y, config(batch_size=80))


@pytest.mark.parametrize("kw,name", [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
    (dict(learning_rate=float("nan")), "learning_rate"), (dict(optimizer="lbfgs"), "optimizer"),
    (dict(loss="focal"), "loss"), (dict(val_fraction=1.0), "val_fraction"),
    (dict(patience=0), "patience"), (dict(grad_clip=0.0), "grad_clip"),
    (dict(momentum=1.0), "momentum")])
def test_config_validation(kw, name):
  with pytest.raises(ValueError, match=f"TrainConfig.{name}"):
    train.TrainConfig(**kw)


def test_paper_preset():
  c = train.TrainConfig.paper()
  assert (c.optimizer, c.learning_rate, c.momentum, c.batch_size, c.epochs, c.loss,
          c.grad_clip, c.val_fraction) == ("rmsprop", 1e-5, 0.999, 1, 5, "ce+dice", 1.0, 0.1)
  assert c.patience is not None


def test_rmsprop_matches_pytorch_formula():
  """Two steps of clip -> L2 -> RMSprop against PyTorch's documented update."""
  cfg = train.TrainConfig(optimizer="rmsprop", learning_rate=0.1, momentum=0.5,
                          weight_decay=0.01, grad_clip=1.0)
  tx = train.make_optimizer(cfg)
  p = jnp.array([1.0, -2.0, 3.0])
  state = tx.init(p)
  rng = np.random.default_rng(0)
  ref_p, sq, buf = np.array(p, np.float64), np.zeros(3), np.zeros(3)
  for _ in range(2):
    g = rng.normal(size=3) * 3
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
    p = p + updates
    g = g * min(1.0, 1.0 / np.linalg.norm(g))
    g = g + 0.01 * ref_p
    sq = 0.99 * sq + 0.01 * g * g
    buf = 0.5 * buf + g / (np.sqrt(sq) + 1e-8)
    ref_p = ref_p - 0.1 * buf
  np.testing.assert_allclose(p, ref_p, rtol=1e-5)


def test_losses_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
  masks = rng.random((2, 4, 4)) < 0.4
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.mean(np.where(masks, logp[..., 1], logp[..., 0]))
  probs = np.exp(logp)
  onehot = np.stack([~masks, masks], -1).astype(float)
  dice = np.mean((2 * (probs * onehot).sum((1, 2)) + 1e-6)
                 / (probs.sum((1, 2)) + onehot.sum((1, 2)) + 1e-6))
  assert float(train.segmentation_loss(logits, masks, "ce")) == pytest.approx(ce, rel=1e-5)
  assert float(train.segmentation_loss(logits, masks, "ce+dice")) == pytest.approx(
      ce + 1 - dice, rel=1e-5)


def test_predict_errors(tiny_data):
  x, _ = tiny_data
  v = models.init(TINY, jax.random.key(0), (16, 16, 1))
  with pytest.raises(ValueError, match="NaN"):
    bnjax.predict(TINY, v, x.at[0, 0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="batch_size"):
    bnjax.predict(TINY, v, x, batch_size=0)


def test_integer_and_0_255_images_are_refused(tiny_data):
  x, y = tiny_data
  v = models.init(TINY, jax.random.key(0), (16, 16, 1))
  as_uint8 = np.asarray(np.rint(np.asarray(x) * 255), np.uint8)
  for call in (lambda imgs: train.fit(TINY, imgs, y, config(epochs=1)),
               lambda imgs: bnjax.predict(TINY, v, imgs),
               lambda imgs: train.train_many(TINY, imgs[None], y[None], config(epochs=1))):
    with pytest.raises(ValueError, match="convert them to float in \\[0, 1\\]"):
      call(as_uint8)
    with pytest.raises(ValueError, match="got values in \\[0, 255\\]"):
      call(as_uint8.astype(np.float32))
  # Adaptation of the U-Net checks its images as every entry point does
  # (tests/test_inputs.py covers the others).
  with pytest.raises(ValueError, match="convert them to float in \\[0, 1\\]"):
    adapt.recompute_batch_stats(TINY, v, as_uint8)
  # The explicit opt-out for another scale.
  pred = bnjax.predict(TINY, v, as_uint8.astype(np.float32), image_range=None)
  assert pred.shape == y.shape
  _, history = train.fit(TINY, as_uint8.astype(np.float32) / 255 * 2 - 1, y, config(epochs=1),
                         image_range=(-1, 1))
  assert history["epochs_run"] == 1


class _TinySeg(flax_nn.Module):
  """Not hashable (a list attribute); counts its traces (Python side effects
  run only when a function is traced)."""

  widths: list
  traces = [0]

  @flax_nn.compact
  def __call__(self, x, train: bool = False):
    type(self).traces[0] += 1
    for w in self.widths:
      x = flax_nn.Conv(w, (3, 3), use_bias=False)(x)
      x = flax_nn.relu(flax_nn.BatchNorm(use_running_average=not train)(x))
    return flax_nn.Conv(2, (1, 1))(x)


def test_second_fit_and_predict_do_not_compile_again(tiny_data, capsys):
  x, y = tiny_data
  model = _TinySeg(widths=[4, 4])  # used by no other test: not compiled yet
  v1, _ = train.fit(model, x, y, config(epochs=2, verbose=True))
  first = bnjax.predict(model, v1, x)
  before = _TinySeg.traces[0]
  # An equal model, another seed and epoch count: same programs, no new trace.
  v2, _ = train.fit(_TinySeg(widths=[4, 4]), x, y, config(epochs=3, seed=1, verbose=True))
  second = bnjax.predict(model, v2, x)
  assert _TinySeg.traces[0] == before
  assert first.shape == second.shape == y.shape
  assert not np.array_equal(jax.tree_util.tree_leaves(v1["params"])[0],
                            jax.tree_util.tree_leaves(v2["params"])[0])
  # Other values of the float settings are arguments of the same programs:
  # nothing is traced or lowered again, and the values are used.
  with compiles.lowered() as lowered:
    v3, _ = train.fit(model, x, y, config(epochs=2, learning_rate=3e-3, grad_clip=0.5,
                                          verbose=True))
  assert lowered == [] and _TinySeg.traces[0] == before
  assert not np.array_equal(jax.tree_util.tree_leaves(v1["params"])[0],
                            jax.tree_util.tree_leaves(v3["params"])[0])
  # The compilation is announced once, by the first call; every call logs its epochs.
  err = capsys.readouterr().err
  assert err.count("compiling the training step (1 model, batch 8, images 16x16x1)") == 1
  assert err.count("epoch 1/2") == 2 and err.count("epoch 1/3") == 1
  # Another optimiser structure (no clipping) is another program, announced.
  train.fit(model, x, y, config(epochs=1, grad_clip=None, verbose=True))
  assert _TinySeg.traces[0] > before
  assert capsys.readouterr().err.count("compiling the training step") == 1


def _hand_loss(logits, masks):
  """Cross-entropy + (1 - soft Dice), written out here: the mean over pixels
  of -log softmax at the true class, and the mean over images and both
  classes of (2 sum p t + 1e-6) / (sum p + sum t + 1e-6)."""
  logp = jax.nn.log_softmax(logits)
  t = jnp.stack([~masks, masks], -1).astype(logits.dtype)
  ce = -jnp.mean(jnp.sum(t * logp, -1))
  p = jnp.exp(logp)
  dice = (2 * jnp.sum(p * t, (1, 2)) + 1e-6) / (jnp.sum(p, (1, 2)) + jnp.sum(t, (1, 2)) + 1e-6)
  return ce + 1.0 - jnp.mean(dice)


def test_fit_equals_a_hand_written_optax_loop(tiny_data):
  """Two epochs of fit against a loop written here with optax, model.apply
  and the documented seed schedule (a key split in three: initialisation,
  validation split, batch order; epoch e's batches a permutation from
  fold_in(shuffle key, e), the last incomplete batch dropped), validation
  Dice per epoch and the best epoch's variables returned.

  SGD with momentum keeps the two programs' rounding differences linear in
  the gradient's (Adam's first steps would turn a near-zero gradient's
  rounding into a full step): over 2 x 8 steps the parameters agree to 1e-4
  of each leaf's total change (measured: 1.2e-5); another batch order or
  initialisation differs by the change itself.

  fit's program is first compiled for other values of every float setting
  (learning rate, momentum, weight decay, clipping norm): they are arguments
  of the compiled step, so the checked call traces and lowers nothing and
  computes with its own values."""
  x, y = (np.asarray(a) for a in tiny_data)
  cfg = config(epochs=2, optimizer="sgd", momentum=0.9, learning_rate=0.05, grad_clip=1.0,
               weight_decay=1e-3, val_fraction=0.1, patience=None, seed=5)
  train.fit(TINY, x, y, dataclasses.replace(cfg, learning_rate=0.01, momentum=0.5,
                                            weight_decay=1e-2, grad_clip=0.3))
  with compiles.lowered() as lowered:
    got, history = train.fit(TINY, x, y, cfg)
  assert lowered == []

  k_init, k_split, k_shuffle = jax.random.split(jax.random.key(5), 3)
  n = len(x)
  n_val = round(0.1 * n)
  order = np.asarray(jax.random.permutation(k_split, n))
  xt, yt = x[order[:n - n_val]], y[order[:n - n_val]]
  xv, yv = x[order[n - n_val:]], y[order[n - n_val:]]
  # model.init jitted (eagerly, each kernel shape's truncated normal is a
  # program of its own: ~30 s of compilation for this U-Net)
  init = jax.jit(lambda key: TINY.init(key, jnp.zeros((1, 16, 16, 1)), train=False),
                 compiler_options={"xla_backend_optimization_level": 0})
  start = init(k_init)
  params, stats = start["params"], start["batch_stats"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-3),
                   optax.sgd(0.05, momentum=0.9))
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, xb, yb):
    def loss_fn(p):
      logits, new = TINY.apply({"params": p, "batch_stats": stats}, xb, train=True,
                               mutable=["batch_stats"])
      return _hand_loss(logits, yb), new["batch_stats"]
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  evaluate = jax.jit(lambda v, x: TINY.apply(v, x, train=False))
  best, best_dice, losses, dices = None, -1.0, [], []
  for epoch in range(2):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_shuffle, epoch), len(xt)))
    steps = len(xt) // 8
    epoch_losses = []
    for b in perm[:steps * 8].reshape(steps, 8):
      params, stats, opt, loss = step(params, stats, opt, xt[b], yt[b])
      epoch_losses.append(float(loss))
    losses.append(np.mean(epoch_losses))
    logits = evaluate({"params": params, "batch_stats": stats}, xv)
    pred = np.argmax(np.asarray(logits), -1) == 1
    inter = (pred & yv).sum((1, 2))
    total = pred.sum((1, 2)) + yv.sum((1, 2))
    dices.append(np.mean(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)))
    if dices[-1] > best_dice:
      best_dice, best = dices[-1], {"params": params, "batch_stats": stats}

  assert history["best_epoch"] == int(np.argmax(dices)) + 1
  np.testing.assert_allclose(history["train_loss"], losses, rtol=1e-5)
  np.testing.assert_allclose(history["val_dice"], dices, rtol=0,
                             atol=tolerance.dice_tolerance(yv, 1))
  for a, b, p0 in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(best),
                      jax.tree_util.tree_leaves(start)):
    change = np.max(np.abs(np.asarray(b) - np.asarray(p0)))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * change + 1e-7)


def test_predict_is_the_argmax_of_the_logits(tiny_data):
  """predict (jitted, in padded batches) against argmax(model.apply(...)) on
  the whole set: equal except where the two class logits are within float32
  rounding of each other (tests/tolerance.py)."""
  x, y = tiny_data
  v, _ = train.fit(TINY, x, y, config(epochs=4, seed=2, patience=None))
  logits = np.asarray(TINY.apply(v, x, train=False))
  want = np.argmax(logits, -1) == 1
  near = tolerance.near_boundary(logits)
  for batch_size in (64, 5):  # one batch; batches of 5, the last one padded
    got = bnjax.predict(TINY, v, x, batch_size=batch_size)
    assert got.shape == want.shape and got.dtype == bool
    assert not np.any((got != want) & ~near)
  assert 0.05 < want.mean() < 0.5  # a trained model's masks, not all one class
