"""bnjax.cyclegan: losses, pool and schedules against hand computations; the
measures against NumPy/SciPy; the step-0 losses of a training against NumPy;
K translators against one at a time; the guard; resuming; that the float
settings do not recompile.

A compile of a training program costs XLA:CPU ~20-45 s, so the tests share
programs: their compile key is the structure (networks, batch, pool, call
length, and whether the identity, semantic and noise terms exist), while the
floats and ``steps`` are runtime arrays. TINY runs at K = 2 (the K-translator
test and the guard) and K = 1 (the separate trainings and the resume);
SEMANTIC (identity, semantic loss, noise) at K = 1 (the semantic, no-recompile
and step-0 tests). Keep new training tests on these structures and K values.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

import compiles
import processes
from bnjax import cyclegan as cg
from bnjax import data

# Tiny networks, the identity term off (two generator passes fewer to compile).
TINY = cg.CycleGANConfig(steps=4, batch_size=2, features=4, n_blocks=1, disc_features=4,
                         disc_layers=1, steps_per_call=2, pool_size=3, lambda_identity=0.0,
                         verbose=False)
# Every term of the generator's objective, and noise on the discriminators.
SEMANTIC = dataclasses.replace(TINY, steps=2, lambda_identity=None, lambda_semantic=2.0,
                               noise_sigma=0.1)
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def sets():
  src, _ = data.make_dataset(jax.random.key(1), data.Domain(90, 50, 170, 50), 8, size=16)
  tgt, _ = data.make_dataset(jax.random.key(2), data.Domain(140, 50, 220, 50), 8, size=16)
  stack = jnp.stack([tgt, tgt * 0.5, tgt ** 2])
  return np.asarray(src), np.asarray(stack)


@pytest.fixture(scope="module")
def segmenter():
  """A frozen U-Net (one instance for the module, so that its tests share a
  compiled program) whose output layer is scaled up 30x: logits of about +-3
  that depend on the image (both classes predicted), so that its
  cross-entropy is far from log 2 and from 0."""
  from bnjax import models

  seg = models.UNet(features=2, depth=1)
  variables = models.init_variables(seg, jax.random.key(5), (16, 16, 1))
  variables["params"]["head"]["kernel"] = 30.0 * variables["params"]["head"]["kernel"]
  return seg, variables


# --------------------------------------------------------------------------
# Losses, pool, schedules


def test_losses_against_hand_computation():
  scores = jnp.array([[0.2, 1.5], [1.0, -0.5]])
  # real: ((0.2-1)^2 + 0.5^2 + 0 + 1.5^2) / 4; fake: (0.04 + 2.25 + 1 + 0.25) / 4
  assert float(cg.lsgan_loss(scores, True)) == pytest.approx((0.64 + 0.25 + 0.0 + 2.25) / 4)
  assert float(cg.lsgan_loss(scores, False)) == pytest.approx((0.04 + 2.25 + 1.0 + 0.25) / 4)
  x = jnp.array([0.0, 0.5, 1.0, 0.25])
  rec = jnp.array([0.25, 0.5, 0.5, 1.0])
  # on the [-1, 1] scale: |2a - 2b| = 0.5, 0, 1, 1.5 -> mean 0.75
  assert float(cg.cycle_loss(x, rec)) == pytest.approx(0.75)
  assert float(cg.identity_loss(x, rec)) == pytest.approx(0.75)
  logits_t = np.array([[[[2.0, 0.0], [0.0, 1.0]]]])
  logits_o = np.array([[[[0.0, 3.0], [0.0, 5.0]]]])  # hard labels 1, 1
  lse = lambda v: math.log(sum(math.exp(a) for a in v))
  want = ((lse([2.0, 0.0]) - 0.0) + (lse([0.0, 1.0]) - 1.0)) / 2
  assert float(cg.semantic_loss(jnp.asarray(logits_t), jnp.asarray(logits_o))) == pytest.approx(
      want, rel=1e-6)


def test_schedules_closed_form():
  cfg = cg.CycleGANConfig(steps=100, learning_rate=2e-4, decay_fraction=0.5, noise_sigma=0.1,
                          noise_fraction=0.25)
  lr = cg.learning_rate(cfg)
  for step, want in [(0, 2e-4), (49, 2e-4), (50, 2e-4), (75, 1e-4), (100, 0.0)]:
    assert float(lr(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step  # float32
  for step, want in [(0, 0.1), (5, 0.08), (25, 0.0), (60, 0.0)]:
    assert float(cg.noise_sigma(cfg, step)) == pytest.approx(want, rel=1e-6, abs=1e-7), step
  assert float(cg.learning_rate(cg.CycleGANConfig(decay_fraction=0.0))(10 ** 6)) == float(
      np.float32(2e-4))
  assert cfg.identity_weight == 5.0
  assert cg.CycleGANConfig(lambda_identity=0.0).identity_weight == 0.0


def test_schedule_on_arrays_equals_optax_schedules():
  """The rate training computes from arrays (learning_rate(config)) is, in
  float32, optax's linear schedule built from the config's numbers, with
  Python's rounding of decay_fraction x steps (0.7 x 45 -> 31 in double, 32
  in float32; 0.3 x 95 = 28.5 -> 28, 29 in float32)."""
  for steps, fraction in [(100, 0.5), (45, 0.7), (95, 0.3), (5, 0.3), (7, 1.0), (9, 0.0),
                          (1, 0.5)]:
    cfg = cg.CycleGANConfig(steps=steps, learning_rate=3e-4, decay_fraction=fraction)
    decay = int(round(fraction * steps))
    ref = (optax.constant_schedule(3e-4) if decay == 0 else
           optax.linear_schedule(3e-4, 0.0, decay, transition_begin=steps - decay))
    got = cg.learning_rate(cfg)
    for count in range(steps + 2):
      assert np.float32(got(count)) == np.float32(ref(count)), (steps, fraction, count)


def test_pool_against_a_python_loop():
  size, n = 3, 5
  key = jax.random.key(7)
  pool = jnp.zeros((size, 2, 2, 1))
  count = jnp.zeros((), jnp.int32)
  rounds = []
  for r in range(4):
    images = jnp.arange(n * 4, dtype=jnp.float32).reshape(n, 2, 2, 1) + 100 * r
    k = jax.random.fold_in(key, r)
    rounds.append((np.asarray(images), np.asarray(jax.random.uniform(k, (n, 2)))))
    pool, count, out = cg.pool_query(pool, count, images, k)
    rounds[-1] += (np.asarray(out),)
  # CycleGAN's ImagePool.query, written as a loop over the same draws.
  mine, stored = [], 0
  for images, u, out in rounds:
    got = []
    for image, (coin, slot) in zip(images, u):
      if stored < size:
        mine.append(image)
        stored += 1
        got.append(image)
      elif coin > 0.5:
        j = min(int(slot * size), size - 1)
        got.append(mine[j])
        mine[j] = image
      else:
        got.append(image)
    np.testing.assert_array_equal(out, np.stack(got))
  np.testing.assert_array_equal(np.asarray(pool), np.stack(mine))
  assert int(count) == size
  # size 0: no pool
  p0, c0, out0 = cg.pool_query(jnp.zeros((0, 2, 2, 1)), count, rounds[0][0], key)
  np.testing.assert_array_equal(np.asarray(out0), rounds[0][0])


# --------------------------------------------------------------------------
# Measures


def test_period2_energy_against_fft():
  rng = np.random.default_rng(0)
  x = rng.random((3, 8, 6, 2))
  x[2] = 0.4  # constant image: share 0
  f = np.fft.fft2(x, axes=(1, 2))
  p = np.abs(f) ** 2
  nyq = (p[:, 4, 0] + p[:, 0, 3] + p[:, 4, 3]).sum(-1)
  ac = p.sum(axis=(1, 2, 3)) - p[:, 0, 0].sum(-1)
  got = cg.period2_energy(x)
  np.testing.assert_allclose(got[:2], nyq[:2] / ac[:2], rtol=1e-10)
  assert got[2] == 0.0
  checker = (np.indices((8, 8)).sum(0) % 2)[None, ..., None].astype(float)
  assert cg.period2_energy(checker)[0] == pytest.approx(1.0)


def test_radial_power_and_high_frequency_against_loops():
  rng = np.random.default_rng(1)
  x = rng.random((2, 6, 8, 1))
  power = np.abs(np.fft.fft2(x[..., 0])) ** 2 / 48
  sums, counts = np.zeros((2, 5)), np.zeros(5)
  high, ac = np.zeros(2), np.zeros(2)
  for i in range(6):
    for j in range(8):
      fy = i / 6 if i < 3 else (i - 6) / 6
      fx = j / 8 if j < 4 else (j - 8) / 8
      radius = math.hypot(fy, fx)
      r = int(np.rint(radius * 8))
      if r < 5:
        sums[:, r] += power[:, i, j]
        counts[r] += 1
      if (i, j) != (0, 0):
        ac += power[:, i, j]
        if radius > 0.25:
          high += power[:, i, j]
  np.testing.assert_allclose(cg.radial_power(x), sums / counts, rtol=1e-10)
  np.testing.assert_allclose(cg.high_frequency_energy(x), high / ac, rtol=1e-10)
  blurred = ndimage.uniform_filter(x, size=(1, 3, 3, 1), mode="wrap")
  s = cg.sharpness(blurred, x)
  assert s.ratio < 0.5 and s.high_frequency == pytest.approx(
      float(cg.high_frequency_energy(blurred).mean()))


def test_checkerboard_spectral_distance():
  rng = np.random.default_rng(2)
  x = rng.random((4, 8, 8, 1))
  same = cg.checkerboard(x, x)
  assert same.spectral_l1 == 0.0 and same.ratio == pytest.approx(1.0)
  checker = (np.indices((8, 8)).sum(0) % 2)[None, ..., None] * 0.2
  c = cg.checkerboard(x + checker, x)
  assert c.ratio > 2 and c.period2 > c.reference_period2
  pa = cg.radial_power(x + checker).mean(0)
  pb = cg.radial_power(x).mean(0)
  want = np.mean(np.abs(np.log10(pa / pa.sum()) - np.log10(pb / pb.sum())))
  assert c.spectral_l1 == pytest.approx(want, rel=1e-9)


def test_edge_overlap_against_scipy():
  masks = np.asarray(data.perlin_masks(jax.random.key(3), 4, size=32))
  rng = np.random.default_rng(3)
  textured = rng.random((4, 32, 32)) + 3.0 * masks
  got = cg.edge_overlap(textured, masks, tolerance=1)
  # SciPy: Sobel magnitude, 4-neighbour boundary, 3x3 dilation
  shares = []
  for img, m in zip(textured, masks):
    g = np.hypot(ndimage.sobel(img, axis=1, mode="nearest"),
                 ndimage.sobel(img, axis=0, mode="nearest"))
    inner = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(2, 1),
                                   border_value=1)
    outer = ndimage.binary_dilation(m, structure=ndimage.generate_binary_structure(2, 1))
    boundary = (m & ~inner) | (outer & ~m)
    band = ndimage.binary_dilation(boundary, structure=np.ones((3, 3), bool))
    b = int(boundary.sum())
    top = np.argsort(-g.ravel(), kind="stable")[:b]
    shares.append(band.ravel()[top].mean())
  assert got == pytest.approx(np.mean(shares), rel=1e-12)
  assert got > 0.9  # a step of 3 over noise of 1: the strong edges are the outline
  noise_only = cg.edge_overlap(rng.random((4, 32, 32)), masks)
  assert noise_only < 0.6
  with pytest.raises(ValueError, match="masks must be boolean"):
    cg.edge_overlap(textured, masks.astype(float))  # a probability map is not a mask


# --------------------------------------------------------------------------
# Generators


def test_transposed_generator_puts_period2_energy_where_resize_conv_puts_none():
  """At initialisation, the upsampling path fed a constant feature map: the
  3x3 stride-2 transposed convolutions make a period-2 pattern, nearest
  resizing and a convolution keep the map constant."""
  h = jnp.full((2, 4, 4, 16), 0.7)
  shares = {}
  for up in cg.UPS:
    g = cg.Generator(features=4, n_blocks=1, up=up, channels=1)
    params = {"params": cg.init_params(g, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))}
    out = np.asarray(g.apply(params, h, method=cg.Generator.decode))
    assert out.shape == (2, 16, 16, 1) and 0 <= out.min() and out.max() <= 1
    shares[up] = cg.checkerboard(out, out).period2
  assert shares["transpose"] > 1e-2
  assert shares["resize_conv"] == 0.0


def test_config_and_input_errors(sets):
  src, stack = sets
  for bad in [dict(steps=0), dict(batch_size=1.5), dict(learning_rate=-1.0),
              dict(lambda_identity=-0.1), dict(beta1=1.0), dict(decay_fraction=1.5),
              dict(noise_fraction=0.0), dict(up="bilinear"), dict(pool_size=-1)]:
    with pytest.raises(ValueError, match="CycleGANConfig." + next(iter(bad))):
      cg.CycleGANConfig(**bad)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="share H, W, C"):
    cg.train_translators(key, src[:, :8, :8], stack, TINY)
  with pytest.raises(ValueError, match="multiples of 4"):
    cg.train_translators(key, src[:, :14, :14], stack[:, :, :14, :14], TINY)
  with pytest.raises(ValueError, match="no patch"):
    cg.train_translators(key, src[:, :8, :8], stack[:, :, :8, :8],
                         cg.CycleGANConfig(disc_layers=3, verbose=False))
  with pytest.raises(ValueError, match=r"the K axis is missing.*target_images_stack\[None\]"):
    cg.train_translators(key, src, stack[0], TINY)
  with pytest.raises(ValueError, match="2 sets for 3 target sets"):
    cg.train_translators(key, src[None].repeat(2, 0), stack, TINY)
  with pytest.raises(ValueError, match="3 keys"):
    cg.train_translators(jax.random.split(key, 2), src, stack, TINY)
  with pytest.raises(ValueError, match="segmenter"):
    cg.train_translators(key, src, stack, dataclasses.replace(TINY, lambda_semantic=1.0))
  with pytest.raises(ValueError, match="needs a workdir"):
    cg.train_translators(key, src, stack, TINY, checkpoint_every=2)
  with pytest.raises(ValueError, match="target_images_stack must lie in"):
    cg.train_translators(key, src, stack * 255, TINY)
  gen = TINY.generator(1)
  params = cg.init_params(gen, key, jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match="channels"):
    cg.translate(gen, params, np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="multiples of 4"):
    cg.translate(gen, params, np.zeros((2, 18, 18, 1), np.float32))


# --------------------------------------------------------------------------
# Training


def _leaves_close(a, b, **tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_k_translators_equal_separate_trainings_and_a_resumed_one(sets, tmp_path, monkeypatch):
  src, stack = sets
  keys = jax.random.split(jax.random.key(0), 2)
  sources = np.stack([src, src * 0.8])  # translator i's own source set
  together, hist = cg.train_translators(keys, sources, stack[:2], TINY)
  assert hist["losses"].shape == (4, 2, len(cg.LOSS_NAMES)) and hist["steps_run"] == 4
  losses = dict(zip(cg.LOSS_NAMES, np.moveaxis(hist["losses"], -1, 0)))
  # the generator's objective is the weighted sum of its parts; identity off
  np.testing.assert_allclose(
      losses["generator"], losses["adversarial"] + 10 * losses["cycle"], rtol=1e-5)
  assert np.all(losses["semantic"] == 0) and np.all(losses["identity"] == 0)
  for i in range(2):
    alone, h1 = cg.train_translators(keys[i:i + 1], sources[i], stack[i:i + 1], TINY)
    _leaves_close(jax.tree_util.tree_map(lambda a: a[i], together),
                  jax.tree_util.tree_map(lambda a: a[0], alone), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist["losses"][:, i], h1["losses"][:, 0], rtol=1e-5, atol=1e-6)

  # Interrupted after the first checkpoint (step 2), then resumed.
  calls = []
  real_save = cg._save

  def interrupted(*args, **kwargs):
    real_save(*args, **kwargs)
    calls.append(args[4])
    raise KeyboardInterrupt

  monkeypatch.setattr(cg, "_save", interrupted)
  with pytest.raises(KeyboardInterrupt):
    cg.train_translators(keys[:1], src, stack[:1], TINY, workdir=tmp_path)
  assert calls == [2]
  monkeypatch.setattr(cg, "_save", real_save)
  # another training in the same workdir is refused: other keys, or another
  # value of a runtime setting (not part of the compile key, part of the
  # checkpoint's fingerprint)
  with pytest.raises(ValueError, match="belongs to another training"):
    cg.train_translators(keys[1:2], src, stack[:1], TINY, workdir=tmp_path)
  with pytest.raises(ValueError, match="belongs to another training"):
    cg.train_translators(keys[:1], src, stack[:1], dataclasses.replace(TINY, learning_rate=1e-3),
                         workdir=tmp_path)
  resumed, h2 = cg.train_translators(keys[:1], src, stack[:1], TINY, workdir=tmp_path)
  assert h2["steps_run"] == 2 and h2["losses"].shape[0] == 4
  _leaves_close(jax.tree_util.tree_map(lambda a: a[0], together),
                jax.tree_util.tree_map(lambda a: a[0], resumed), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(h2["losses"][:, 0], hist["losses"][:, 0], rtol=1e-6)

  # translating with the trained target -> source generator
  gen = TINY.generator(1)
  out = cg.translate(gen, jax.tree_util.tree_map(lambda a: a[0], together["to_source"]),
                     stack[0])
  assert out.shape == stack[0].shape and out.min() >= 0 and out.max() <= 1
  direct = gen.apply({"params": jax.tree_util.tree_map(lambda a: a[0], together["to_source"])},
                     jnp.asarray(stack[0]))
  np.testing.assert_allclose(out, np.asarray(direct), rtol=1e-5, atol=1e-6)


def test_guard_names_the_step_and_the_loss(sets):
  src, stack = sets  # K = 2: the program of the K-translator test
  huge = dataclasses.replace(TINY, learning_rate=1e30)
  with pytest.raises(FloatingPointError,
                     match=r"diverged at step \d+ \(translator \d of 2\): the \w+ loss is"):
    cg.train_translators(jax.random.key(0), src, stack[:2], huge)


def test_semantic_consistency_and_discriminator_noise(sets, segmenter):
  """CyCADA's loss with a frozen segmenter, and annealed input noise: the
  generator's objective adds every part with its weight."""
  src, stack = sets
  seg, seg_vars = segmenter
  _, hist = cg.train_translators(jax.random.key(0), src, stack[:1], SEMANTIC,
                                 segmenter=(seg, seg_vars))
  losses = dict(zip(cg.LOSS_NAMES, np.moveaxis(hist["losses"][:, 0], -1, 0)))
  assert np.all(losses["semantic"] > 0) and np.all(losses["identity"] > 0)
  np.testing.assert_allclose(
      losses["generator"], losses["adversarial"] + 10 * losses["cycle"]
      + 5 * losses["identity"] + 2 * losses["semantic"], rtol=1e-5)
  # a segmenter that predicts one class everywhere with certainty: the loss
  # of its own predictions is ~0 whatever the translation
  sure = jax.tree_util.tree_map(jnp.zeros_like, seg_vars)
  sure["params"]["head"]["bias"] = jnp.array([0.0, 30.0])
  _, hist = cg.train_translators(jax.random.key(0), src, stack[:1], SEMANTIC,
                                 segmenter=(seg, sure))
  assert np.all(hist["losses"][:, 0, cg.LOSS_NAMES.index("semantic")] < 1e-10)


def test_float_settings_and_steps_do_not_recompile(sets, segmenter):
  """Another learning rate, beta1, schedule, loss weights, noise level and
  number of steps reuse the compiled program (they are runtime arrays), and
  take effect: the recorded objective is the sum with the new weights."""
  src, stack = sets
  cg.train_translators(jax.random.key(0), src, stack[:1], SEMANTIC, segmenter=segmenter)
  other = dataclasses.replace(SEMANTIC, steps=4, learning_rate=1e-3, beta1=0.7,
                              decay_fraction=0.25, lambda_cycle=3.0, lambda_identity=0.7,
                              lambda_semantic=0.5, noise_sigma=0.05, noise_fraction=1.0)
  with compiles.lowered() as compiled:
    _, hist = cg.train_translators(jax.random.key(1), src, stack[:1], other, segmenter=segmenter)
  assert compiled == [], f"recompiled for runtime settings: {compiled}"
  losses = dict(zip(cg.LOSS_NAMES, np.moveaxis(hist["losses"][:, 0], -1, 0)))
  np.testing.assert_allclose(
      losses["generator"], losses["adversarial"] + 3 * losses["cycle"]
      + 0.7 * losses["identity"] + 0.5 * losses["semantic"], rtol=1e-5)
  # the counter sees a compilation when there is one
  x = jnp.ones(3)

  def fresh(x):
    return x * 3 + 1

  with compiles.lowered() as compiled:
    jax.jit(fresh)(x)
  assert compiled == ["jit(fresh)"]


def _forward(fn, *args):
  return np.asarray(fn(*args), np.float64)


def test_step0_losses_against_numpy(sets, segmenter):
  """The losses recorded at step 0, computed again from the networks'
  outputs with the loss arithmetic written here: least squares, L1 on the
  [-1, 1] scale, and CyCADA's cross-entropy of the segmenter's log-softmax on
  G_to_source(target) against its argmax on the target.

  Why the recorded values are those of known inputs and parameters: with
  learning_rate 0 Adam's update is -0 * m / (sqrt(v) + eps) = 0, so the
  returned parameters are those every step ran with; each set holds copies
  of one image, so whichever images a step draws, its batch is that image
  twice, and the pool (3 slots, filling at step 0) returns the fakes just
  made. noise_sigma 1e-12 keeps SEMANTIC's program (noise drawn) while the
  noise, ~1e-12 on pixels in [0, 1], is below float32's resolution of the
  losses. Step 1 ran with the same parameters and inputs: its losses equal
  step 0's."""
  src, stack = sets
  seg, seg_vars = segmenter
  b = SEMANTIC.batch_size
  s_img, t_img = src[3], stack[0, 5]
  cfg = dataclasses.replace(SEMANTIC, learning_rate=0.0, noise_sigma=1e-12, lambda_cycle=3.0,
                            lambda_identity=0.7, lambda_semantic=2.5)
  params, hist = cg.train_translators(jax.random.key(4), np.repeat(s_img[None], 8, 0),
                                      np.repeat(t_img[None, None], 8, 1), cfg,
                                      segmenter=(seg, seg_vars))
  p = jax.tree_util.tree_map(lambda a: a[0], params)
  gen, disc = cfg.generator(1), cfg.discriminator()
  g = lambda name, x: _forward(gen.apply, {"params": p[name]}, jnp.asarray(x, jnp.float32))
  d = lambda name, x: _forward(disc.apply, {"params": p[name]}, jnp.asarray(x, jnp.float32))
  s = np.repeat(s_img[None], b, 0).astype(np.float64)
  t = np.repeat(t_img[None], b, 0).astype(np.float64)

  fake_s, fake_t = g("to_source", t), g("to_target", s)
  rec_t, rec_s = g("to_target", fake_s), g("to_source", fake_t)
  same_s, same_t = g("to_source", s), g("to_target", t)
  d_fake_s, d_fake_t = d("source_critic", fake_s), d("target_critic", fake_t)
  d_real_s, d_real_t = d("source_critic", s), d("target_critic", t)
  logits = _forward(lambda x: seg.apply(seg_vars, x, train=False), jnp.asarray(fake_s, jnp.float32))
  labels = np.argmax(_forward(lambda x: seg.apply(seg_vars, x, train=False),
                              jnp.asarray(t, jnp.float32)), axis=-1)
  assert 0 < labels.mean() < 1  # both classes: a label-blind loss would not match

  # Each want: (value, magnitude), the magnitude the mean of the absolute
  # values the loss combines, which bounds how far float32 rounding moves it.
  lsq = lambda x, y: (np.mean((x - y) ** 2), np.mean((np.abs(x) + abs(y)) ** 2))
  l1 = lambda x, y: (np.mean(np.abs(2 * x - 2 * y)), np.mean(np.abs(2 * x) + np.abs(2 * y)))
  add = lambda *parts: tuple(map(sum, zip(*parts)))
  scaled = lambda w, part: (w * part[0], w * part[1])
  lse = np.log(np.exp(logits).sum(-1))
  picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  ce = (np.mean(lse - picked), np.mean(np.abs(lse) + np.abs(picked)))
  adversarial = add(lsq(d_fake_s, 1.0), lsq(d_fake_t, 1.0))
  cycle = add(l1(t, rec_t), l1(s, rec_s))
  identity = add(l1(s, same_s), l1(t, same_t))
  want = {"adversarial": adversarial, "cycle": cycle, "identity": identity, "semantic": ce,
          "generator": add(adversarial, scaled(3.0, cycle), scaled(0.7, identity),
                           scaled(2.5, ce)),
          "source_critic": scaled(0.5, add(lsq(d_real_s, 1.0), lsq(d_fake_s, 0.0))),
          "target_critic": scaled(0.5, add(lsq(d_real_t, 1.0), lsq(d_fake_t, 0.0)))}
  # The networks ran in two differently compiled float32 programs (the
  # training scan, and the apply calls here), whose sums may round in another
  # order. The longest sums have 256 terms (a 16x16 instance norm; a 7x7x4
  # convolution has 196), and float32 rounding of a sum of n terms is at most
  # n ulps of the magnitudes summed: 256 ulps of each loss's magnitude. A
  # wrong term, weight or argument moves a loss by a share of its value.
  for step in (0, 1):
    got = dict(zip(cg.LOSS_NAMES, hist["losses"][step, 0].astype(np.float64)))
    for name, (value, magnitude) in want.items():
      assert abs(got[name] - value) <= 256 * EPS32 * magnitude, (
          step, name, got[name], value, magnitude)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from bnjax import cyclegan as cg, data
assert jax.device_count() == 2, jax.devices()
cfg = cg.CycleGANConfig(steps=4, batch_size=2, features=4, n_blocks=1, disc_features=4,
                        disc_layers=1, steps_per_call=2, pool_size=3, verbose=False)
src, _ = data.make_dataset(jax.random.key(1), data.Domain(90, 50, 170, 50), 8, size=16)
tgt, _ = data.make_dataset(jax.random.key(2), data.Domain(140, 50, 220, 50), 8, size=16)
stack = jnp.stack([tgt, tgt * 0.5, tgt ** 2])
keys = jax.random.split(jax.random.key(0), 3)
two, h2 = cg.train_translators(keys, src, stack, cfg)
one, h1 = cg.train_translators(keys, src, stack, cfg, devices=jax.devices()[:1])
for a, b in zip(jax.tree_util.tree_leaves(two), jax.tree_util.tree_leaves(one), strict=True):
  assert a.shape[0] == 3
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(h2["losses"], h1["losses"], rtol=1e-5, atol=1e-6)
print("SHARDED-OK")
"""


@pytest.mark.slow
def test_translators_sharded_over_two_devices_equal_one_device(root):
  """K = 3 translators over 2 devices (padded to 4) against one device."""
  import os
  import subprocess
  import sys

  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": processes.devices_flag(2)}
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
