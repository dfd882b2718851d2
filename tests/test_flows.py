"""bnjax.flows: inverses, log-determinants against slogdet of jacfwd, a 2-D
flow's density integrated on a grid, the pre-processing against finite
differences, BatchNorm's running statistics against PyTorch's rule written
out, recompute_batch_stats on the flow, bits per dimension, training and
inpainting."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiles
from bnjax import adapt
from bnjax import flows

X64 = jax.enable_x64




def _perturbed(variables, key, scale):
  """``variables`` with N(0, scale^2) added to every parameter and random
  statistics (means ~ N(0, 0.3^2), variances in [0.5, 2]); NumPy draws (each
  jax.random call of a new shape costs a compile)."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
  out = dict(variables)
  out["params"] = jax.tree_util.tree_map(
      lambda l: l + scale * rng.standard_normal(l.shape).astype(l.dtype), variables["params"])
  if "batch_stats" in variables:
    def stats(path, v):
      if path[-1].key == "mean":
        return jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
      return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)
    out["batch_stats"] = jax.tree_util.tree_map_with_path(stats, variables["batch_stats"])
  return out


def _cast(tree, dtype):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _bijectors():
  """(name, module, input shape) of every bijector, with inputs where a
  random perturbation keeps them well inside their domain."""
  return [
      ("logit", flows.Logit(0.05), (3, 4, 4, 2)),
      ("squeeze", flows.Squeeze(), (3, 4, 4, 2)),
      ("coupling_checkerboard", flows.AffineCoupling("checkerboard", 1, 8, 1), (3, 4, 4, 2)),
      ("coupling_channel", flows.AffineCoupling("channel", 0, 8, 1), (3, 4, 4, 2)),
      ("batchnorm", flows.BatchNormBijector(), (3, 4, 4, 2)),
      ("actnorm", flows.ActNorm(), (3, 4, 4, 2)),
      # One statistic per element (a BatchNorm of the flattened example).
      ("batchnorm_per_dimension", flows.BatchNormBijector(axis=(1, 2, 3)), (3, 4, 4, 2)),
      ("actnorm_per_dimension", flows.ActNorm(axis=(1, 2, 3)), (3, 4, 4, 2)),
      ("coupling_unbounded", flows.AffineCoupling("checkerboard", 0, 8, 1, bounded=False),
       (3, 4, 4, 2)),
  ]


def _setup(module, shape, dtype=jnp.float32, scale=0.2):
  x = jax.random.uniform(jax.random.key(0), shape, dtype, 0.05, 0.95)
  v = module.init(jax.random.key(1), x)
  v = _perturbed(v, jax.random.key(2), scale) if v else v
  return _cast(v, dtype), x


@pytest.mark.parametrize("name,module,shape", _bijectors(), ids=[b[0] for b in _bijectors()])
def test_bijector_inverse_and_log_det(name, module, shape):
  # float32: x -> y -> x within 1e-5, the two log-dets opposite
  v, x = _setup(module, shape)
  y, ld = module.apply(v, x)
  back, ld_inv = module.apply(v, y, inverse=True)
  assert y.shape == (x.shape if name != "squeeze" else (3, 2, 2, 8))
  assert float(jnp.max(jnp.abs(back - x))) <= 1e-5, name
  np.testing.assert_allclose(ld_inv, -ld, rtol=1e-5, atol=1e-4)
  with X64(True):
    v64, x64 = _setup(module, shape, jnp.float64)
    y, ld = module.apply(v64, x64)
    back, _ = module.apply(v64, y, inverse=True)
    assert float(jnp.max(jnp.abs(back - x64))) <= 1e-10, name
    # log|det dy/dx| of one example's map against slogdet of its Jacobian
    jac = jax.jit(jax.jacfwd(lambda xi: module.apply(v64, xi.reshape((1,) + shape[1:]))[0].ravel()))
    for i in range(shape[0]):
      sign, want = np.linalg.slogdet(np.asarray(jac(x64[i].ravel())))
      assert sign != 0
      assert float(ld[i]) == pytest.approx(want, rel=1e-9, abs=1e-9), (name, i)


def test_batchnorm_training_log_det_is_the_per_example_jacobian_with_batch_stats_held():
  with X64(True):
    bn = flows.BatchNormBijector(epsilon=1e-3)
    x = jax.random.normal(jax.random.key(0), (5, 2, 2, 3), jnp.float64) * 2 + 1
    v = _cast(_perturbed(bn.init(jax.random.key(1), x), jax.random.key(2), 0.3), jnp.float64)
    (y, ld), _ = bn.apply(v, x, train=True, mutable=["batch_stats"])
    xs = np.asarray(x)
    mu, var = xs.mean(axis=(0, 1, 2)), xs.var(axis=(0, 1, 2))  # NumPy, biased
    g, b = np.exp(np.asarray(v["params"]["log_gamma"])), np.asarray(v["params"]["beta"])

    def held(xi):  # one example's map, the batch statistics constants
      return ((xi.reshape(2, 2, 3) - mu) / jnp.sqrt(var + 1e-3) * g + b).ravel()

    for i in range(5):
      np.testing.assert_allclose(np.asarray(y[i]).ravel(), held(x[i]), rtol=1e-12, atol=1e-12)
      _, want = np.linalg.slogdet(np.asarray(jax.jacfwd(held)(x[i].ravel())))
      assert float(ld[i]) == pytest.approx(want, rel=1e-10)
    # It is not the Jacobian of the batch's map (the statistics depend on x):
    # that one is singular (the batch mean of the output is fixed per channel).
    whole = lambda flat: bn.apply(v, flat.reshape(x.shape), train=True,
                                  mutable=["batch_stats"])[0][0].ravel()
    s = np.linalg.svd(np.asarray(jax.jacfwd(whole)(x.ravel())), compute_uv=False)
    assert s.min() < 1e-8 * s.max()


def test_batchnorm_running_statistics_follow_pytorch():
  bn = flows.BatchNormBijector(momentum=0.9)
  x1 = np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 3, 2)).astype(np.float32)
  x2 = np.random.default_rng(1).normal(-1.0, 0.5, (4, 3, 3, 2)).astype(np.float32)
  v = bn.init(jax.random.key(0), x1, train=True)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)  # init moves nothing
  mean, var = np.zeros(2), np.ones(2)
  for x in (x1, x2):
    _, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    flat = x.reshape(-1, 2).astype(np.float64)
    # PyTorch: running = (1 - 0.1) running + 0.1 batch, the unbiased variance
    mean = 0.9 * mean + 0.1 * flat.mean(0)
    var = 0.9 * var + 0.1 * flat.var(0, ddof=1)
  np.testing.assert_allclose(v["batch_stats"]["mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(v["batch_stats"]["var"], var, rtol=1e-5)


def test_actnorm_initialises_from_data():
  x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4, 4, 3)).astype(np.float32)
  an = flows.ActNorm()
  v = an.init(jax.random.key(0), x)
  y, ld = an.apply(v, x)
  y = np.asarray(y).reshape(-1, 3)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-4)
  # log-det = 16 positions x sum of -log std per channel
  want = 16 * np.sum(-0.5 * np.log(x.reshape(-1, 3).var(0) + 1e-6))
  np.testing.assert_allclose(ld, want, rtol=1e-5)


def test_logit_log_det_against_finite_differences():
  with X64(True):
    lg = flows.Logit(0.05)
    x = np.random.default_rng(0).uniform(0.0, 1.0, (1, 1, 1, 6))
    _, ld = lg.apply({}, jnp.asarray(x))
    h, total = 1e-6, 0.0
    for j in range(6):  # the map is elementwise: the log-det is a sum of log slopes
      up, down = x.copy(), x.copy()
      up[..., j] += h
      down[..., j] -= h
      fy = lambda a: np.asarray(lg.apply({}, jnp.asarray(a))[0])[..., j].item()
      total += math.log((fy(up) - fy(down)) / (2 * h))
    assert float(ld[0]) == pytest.approx(total, rel=1e-7)


def _flow(**kw):
  args = dict(image_shape=(4, 4, 1), features=8, blocks=1, scales=1, couplings=2)
  args.update(kw)
  return flows.RealNVP(**args)


@pytest.mark.parametrize("norm", ["batch", "actnorm", "none"])
def test_flow_inverse_and_log_det(norm):
  model = _flow(norm=norm)
  x = jax.random.uniform(jax.random.key(0), (6, 4, 4, 1), minval=0.02, maxval=0.98)
  v = _perturbed(model.init(jax.random.key(1), x), jax.random.key(2), 0.05)
  z, ld = model.apply(v, x)
  assert z.shape == x.shape and ld.shape == (6,)
  back = model.apply(v, z, method="inverse")
  assert float(jnp.max(jnp.abs(back - x))) <= 1e-5
  lp = np.asarray(model.apply(v, x, method="log_prob"), np.float64)
  z64, ld64 = np.asarray(z, np.float64), np.asarray(ld, np.float64)
  half_sq = 0.5 * np.sum(z64 ** 2, axis=(1, 2, 3))
  # log_prob runs the forward pass again in another program, whose float32
  # sums may round in another order: the longest sums (a coupling's or norm
  # layer's log-det over 16 pixels, added over at most 4 layers, then the 16
  # Gaussian terms) have 64 terms, so at most 64 ulps of the magnitudes
  # summed. A wrong term moves lp by one of those magnitudes.
  bound = 64 * np.finfo(np.float32).eps * (half_sq + 8 * math.log(2 * math.pi) + np.abs(ld64))
  err = np.abs(lp - (-half_sq - 8 * math.log(2 * math.pi) + ld64))
  assert np.all(err <= bound), (err, bound)
  with X64(True):
    v64, x64 = _cast(v, jnp.float64), jnp.asarray(x, jnp.float64)
    z, ld = model.apply(v64, x64)
    assert float(jnp.max(jnp.abs(model.apply(v64, z, method="inverse") - x64))) <= 1e-10
    jac = jax.jit(jax.jacfwd(lambda xi: model.apply(v64, xi.reshape(1, 4, 4, 1))[0].ravel()))
    for i in range(2):
      _, want = np.linalg.slogdet(np.asarray(jac(x64[i].ravel())))
      assert float(ld[i]) == pytest.approx(want, rel=1e-9)


def test_two_dimensional_flow_density_integrates_to_one():
  model = flows.RealNVP(image_shape=(1, 1, 2), features=8, blocks=1, scales=0, couplings=4,
                        final_mask="channel", norm="batch")
  x0 = jnp.full((2, 1, 1, 2), 0.5)
  v = _perturbed(model.init(jax.random.key(3), x0), jax.random.key(4), 0.3)

  def integral(lo, hi, n, preprocessed):
    g = np.linspace(lo, hi, n + 1)
    mid = (g[:-1] + g[1:]) / 2  # midpoint rule
    a, b = np.meshgrid(mid, mid, indexing="ij")
    pts = jnp.asarray(np.stack([a.ravel(), b.ravel()], -1).reshape(-1, 1, 1, 2), jnp.float32)
    lp = jax.jit(lambda p: model.apply(v, p, preprocessed=preprocessed, method="log_prob"))(pts)
    return float(np.sum(np.exp(np.asarray(lp, np.float64)))) * ((hi - lo) / n) ** 2

  # the flow's density of logit-space values over R^2 (a wide box)
  assert integral(-12.0, 12.0, 800, True) == pytest.approx(1.0, abs=0.01)
  # the density of pixels, the pre-processing counted: over the preimage of R^2,
  # x in (-alpha / (1 - 2 alpha), (1 - alpha) / (1 - 2 alpha))
  lo, hi = -0.05 / 0.9, 0.95 / 0.9
  assert integral(lo + 1e-9, hi - 1e-9, 1200, False) == pytest.approx(1.0, abs=0.01)


def test_recomputed_statistics_are_the_whole_sets():
  # After exact recomputation, evaluation mode equals training mode on the whole
  # set (every BatchNorm bijector then normalises with its input's moments).
  model = _flow(norm="batch")
  x = jax.random.uniform(jax.random.key(0), (40, 4, 4, 1), minval=0.02, maxval=0.98)
  v = _perturbed(model.init(jax.random.key(1), x), jax.random.key(2), 0.05)
  adapted = adapt.recompute_batch_stats(model, v, x)
  assert adapt.batch_stats_paths(adapted) == adapt.batch_stats_paths(v)
  jax.tree_util.tree_map(np.testing.assert_array_equal, adapted["params"], v["params"])
  z_eval, ld_eval = model.apply(adapted, x)
  (z_train, ld_train), _ = model.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(z_eval, z_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ld_eval, ld_train, rtol=1e-5)
  # the stored variance of the first bijector is the biased variance of its input
  first = model.bind(v).layers[0]
  y, _ = first.apply({"params": v["params"]["layers_0"]}, model.bind(v).logit(x)[0])
  np.testing.assert_allclose(adapted["batch_stats"]["layers_1"]["var"],
                             np.asarray(y).reshape(-1).var(), rtol=1e-4)


def test_bits_per_dim_and_dequantize():
  # a uniform density on [0, 1]^d (log p = 0) costs log2(levels) bits per dimension
  assert float(flows.bits_per_dim(0.0, 64, 17)) == pytest.approx(math.log2(17))
  assert float(flows.bits_per_dim(-64 * math.log(2), 64, 2)) == pytest.approx(2.0)
  k = np.arange(17, dtype=np.float32).reshape(1, 17, 1, 1) / 16
  x = np.asarray(flows.dequantize(jax.random.key(0), np.repeat(k, 50, 0), 17))
  assert x.min() >= 0 and x.max() < 1
  np.testing.assert_array_equal(np.floor(x * 17), np.repeat(k, 50, 0) * 16)
  with pytest.raises(ValueError, match="levels must be an integer >= 2"):
    flows.dequantize(jax.random.key(0), k, 1)


def test_bad_input_is_refused():
  model = _flow()
  x = jnp.full((2, 4, 4, 1), 0.5)
  v = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"x must have shape \[n, 4, 4, 1\]"):
    model.apply(v, jnp.full((2, 8, 8, 1), 0.5))
  with pytest.raises(ValueError, match=r"x must be pixels in \[0, 1\]"):
    model.apply(v, jnp.full((2, 4, 4, 1), 1.2))
  with pytest.raises(ValueError, match=r"x must be pixels in \[0, 1\]"):
    model.apply(v, jnp.full((2, 4, 4, 1), jnp.nan))
  with pytest.raises(ValueError, match="levels must be an integer >= 2"):
    flows.bits_per_dim(0.0, 64, 1)
  with pytest.raises(ValueError, match="divisible by 2\\*\\*scales"):
    flows.RealNVP((6, 6, 1), scales=2).init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  with pytest.raises(ValueError, match="RealNVP.norm must be one of"):
    _flow(norm="layer").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"RealNVP.alpha must be in \[0, 0.5\)"):
    _flow(alpha=0.5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="FlowConfig.batch_size must be an integer >= 1"):
    flows.FlowConfig(batch_size=0)
  # One rule, one message, for every value it refuses.
  for bad in (0.0, -1e-3, float("nan"), "1e-3", True):
    with pytest.raises(ValueError, match=r"FlowConfig.learning_rate must be a finite number > 0"):
      flows.FlowConfig(learning_rate=bad)
  with pytest.raises(ValueError, match=r"learning_rate must be a finite number > 0, got -1"):
    flows.inpaint(model, v, x, np.ones((4, 4, 1), bool), steps=1, learning_rate=-1)
  with pytest.raises(ValueError, match="images must have shape"):
    flows.fit(jax.random.key(0), model, np.zeros((4, 8, 8, 1), np.float32),
              flows.FlowConfig(steps=1, batch_size=2), verbose=False)
  # Data whose grey levels do not fit FlowConfig.levels (17-level digits with
  # the default 256, 256-level data with 4) are refused, naming the levels.
  seventeen = np.arange(64, dtype=np.float32).reshape(4, 4, 4, 1) % 17 / 16
  with pytest.raises(ValueError, match=r"17-level data \(pixels k / 16\).*levels=17"):
    flows.fit(jax.random.key(0), model, seventeen, flows.FlowConfig(steps=1, batch_size=2),
              verbose=False)
  fine = np.arange(64, dtype=np.float32).reshape(4, 4, 4, 1) / 255
  with pytest.raises(ValueError, match=r"256-level data .* FlowConfig.levels is 4"):
    flows.fit(jax.random.key(0), model, fine, flows.FlowConfig(steps=1, batch_size=2, levels=4),
              verbose=False)
  # The range error names what a flow's user can do (fit has no image_range).
  with pytest.raises(ValueError, match=r"images must lie in .* k / \(levels - 1\)") as e:
    flows.fit(jax.random.key(0), model, np.full((4, 4, 4, 1), 255.0, np.float32),
              flows.FlowConfig(steps=1, batch_size=2), verbose=False)
  assert "image_range" not in str(e.value)


def test_fit_learns_is_seeded_and_guards():
  rng = np.random.default_rng(0)
  images = (rng.integers(0, 4, (64, 4, 4, 1)) / 3.0).astype(np.float32)
  images[:, :2] = 0.0  # structure a flow can learn: the top half is always 0
  model = _flow(norm="batch")
  cfg = flows.FlowConfig(steps=60, batch_size=16, levels=4, learning_rate=3e-3, check_every=25)
  v1, h1 = flows.fit(jax.random.key(0), model, images, cfg, verbose=False)
  assert h1["bits_per_dim"].shape == (60,)
  assert h1["bits_per_dim"][-10:].mean() < h1["bits_per_dim"][:5].mean() - 0.3
  # The float settings are arguments of the compiled step: another value of
  # each traces and lowers nothing, and changes the training (its first 10
  # steps, those of the 60-step run: same batches, same noise).
  with compiles.lowered() as lowered:
    for change in (dict(learning_rate=1e-3), dict(clip=1e-3), dict(weight_decay=0.5)):
      _, h = flows.fit(jax.random.key(0), model, images,
                       dataclasses.replace(cfg, steps=10, **change), verbose=False)
      assert not np.array_equal(h["bits_per_dim"], h1["bits_per_dim"][:10]), change
    v2, _ = flows.fit(jax.random.key(0), model, images, cfg, verbose=False)
    # Continuous data (on no grid of levels) are dequantized at cfg.levels, not refused.
    flows.fit(jax.random.key(0), model, rng.uniform(size=images.shape).astype(np.float32),
              dataclasses.replace(cfg, steps=1), verbose=False)
  assert lowered == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, v1, v2)  # seeded
  with pytest.raises(FloatingPointError, match="flow training diverged at step"):
    flows.fit(jax.random.key(0), model, images,
              flows.FlowConfig(steps=30, batch_size=16, levels=4, learning_rate=1e6,
                               check_every=10), verbose=False)


def test_inpaint_keeps_known_pixels_and_raises_the_density():
  model = _flow(norm="none")
  x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=0.1, maxval=0.9)
  v = _perturbed(model.init(jax.random.key(1), x), jax.random.key(2), 0.05)
  known = np.ones((3, 4, 4, 1), bool)
  known[:, 1:3, 1:3] = False
  filled, lp = flows.inpaint(model, v, x, known, steps=40, learning_rate=0.05)
  with pytest.raises(ValueError, match="known must broadcast to the images' shape"):
    flows.inpaint(model, v, x, known[:, :2], steps=2)
  np.testing.assert_array_equal(np.asarray(filled)[known], np.asarray(x)[known])
  assert not np.allclose(np.asarray(filled)[~known], np.asarray(x)[~known])
  assert lp.shape == (40,) and lp[-1] > lp[0]
  assert float(np.min(filled)) >= 0 and float(np.max(filled)) <= 1
  # The learning rate is an argument of the compiled step: another one traces
  # and lowers nothing, and is used.
  with compiles.lowered() as lowered:
    _, lp2 = flows.inpaint(model, v, x, known, steps=40, learning_rate=0.02)
  assert lowered == []
  assert lp2[0] == lp[0] and lp2[-1] != lp[-1]


def _logit_np(x, alpha=0.05):
  p = alpha + (1 - 2 * alpha) * np.asarray(x, np.float64)
  return np.log(p) - np.log1p(-p), math.log(1 - 2 * alpha) - np.log(p) - np.log1p(-p)


@pytest.mark.parametrize("kw", [dict(norm_axes="dimension"),
                                dict(norm_axes="dimension", bounded_scales=False),
                                dict(norm="actnorm", norm_axes="dimension")],
                         ids=["bn_per_dimension", "unbounded", "actnorm_per_dimension"])
def test_layer_log_dets_add_up_to_the_jacobian(kw):
  """Each layer's share: the logit's and each BatchNorm's in closed form
  (NumPy, from the stored variables), the couplings' together the rest of
  slogdet of the whole flow's Jacobian; all of them sum to forward's."""
  model = _flow(**kw)
  x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=0.02, maxval=0.98)
  v = _perturbed(model.init(jax.random.key(1), x), jax.random.key(2), 0.05)
  with X64(True):
    v64, x64 = _cast(v, jnp.float64), jnp.asarray(x, jnp.float64)
    shares = model.apply(v64, x64, method="layer_log_dets")
    _, ld = model.apply(v64, x64)
    np.testing.assert_allclose(sum(shares.values()), ld, rtol=1e-12)
    jac = jax.jit(jax.jacfwd(lambda xi: model.apply(v64, xi.reshape(1, 4, 4, 1))[0].ravel()))
    names = list(shares)
    assert names[0] == "logit" and names[1] == "0 coupling"
    for i in range(3):
      _, total = np.linalg.slogdet(np.asarray(jac(x64[i].ravel())))
      _, logit_ld = _logit_np(x[i])
      assert float(shares["logit"][i]) == pytest.approx(logit_ld.sum(), rel=1e-10)
      norms = 0.0
      for name in names[1:]:
        idx, kind = name.split()
        p = v["params"].get(f"layers_{idx}")
        if kind == "batchnorm":
          var = np.asarray(v["batch_stats"][f"layers_{idx}"]["var"], np.float64)
          want = np.sum(np.asarray(p["log_gamma"], np.float64) - 0.5 * np.log(var + 1e-5))
        elif kind == "actnorm":
          want = np.sum(np.asarray(p["log_scale"], np.float64))
        else:
          continue
        # per-element statistics: one term per element (no positions factor)
        assert float(shares[name][i]) == pytest.approx(want, rel=1e-9, abs=1e-9), name
        norms += want
      couplings = sum(float(shares[n][i]) for n in names if n.endswith("coupling"))
      assert couplings == pytest.approx(total - logit_ld.sum() - norms, rel=1e-8, abs=1e-8)
      assert abs(couplings) > 1e-3  # the perturbed couplings are not the identity


def test_variance_ratios_against_numpy():
  """At initialisation every coupling is the identity and every BatchNorm
  has gamma 1 and beta 0, so the first BatchNorm's input is logit(x) and the
  second's the first's output: their exact variances in closed form."""
  model = _flow(norm_axes="dimension", scales=0, couplings=2)
  rng = np.random.default_rng(0)
  x = rng.uniform(0.02, 0.98, (50, 4, 4, 1)).astype(np.float32)
  x[:, 0, 0, 0] = 0.5  # a constant pixel: variance 0 over the set
  v = model.init(jax.random.key(1), jnp.asarray(x[:8]), train=True)
  stored = {k: rng.uniform(0.01, 2.0, (4, 4, 1)).astype(np.float32) for k in ("layers_1",
                                                                          "layers_3")}
  v = {"params": v["params"],
       "batch_stats": {k: {"mean": jnp.zeros((4, 4, 1)), "var": jnp.asarray(stored[k])}
                       for k in stored}}
  ratios = flows.variance_ratios(model, v, adapt.recompute_batch_stats(model, v, x))
  logit, _ = _logit_np(x)
  var1 = logit.var(axis=0)
  var2 = var1 / (var1 + 1e-5)  # the exactly normalised first output's variance
  np.testing.assert_allclose(ratios["layers_1"], (stored["layers_1"] + 1e-5) / (var1 + 1e-5),
                             rtol=2e-4)
  np.testing.assert_allclose(ratios["layers_3"], (stored["layers_3"] + 1e-5) / (var2 + 1e-5),
                             rtol=2e-3)
  assert ratios["layers_1"][0, 0, 0] > 1e2  # the constant pixel: stored var / eps
  with pytest.raises(ValueError, match="model.norm must be 'batch'"):
    flows.variance_ratios(_flow(norm="actnorm"), v, v)
  with pytest.raises(ValueError, match="the same BatchNorm layers"):
    flows.variance_ratios(model, v, {"params": v["params"]})


def test_fit_without_dequantization_leaves_a_constant_pixel_a_zero_variance():
  """Per-element BatchNorm on discrete data: a pixel that is 0 in every
  image keeps a running variance that decays to 0 without dequantization,
  and stays at the noise's variance with it."""
  rng = np.random.default_rng(0)
  images = (rng.integers(0, 4, (64, 4, 4, 1)) / 3.0).astype(np.float32)
  images[:, 0, 0] = 0.0
  model = _flow(norm_axes="dimension", scales=0, couplings=1)
  cfg = flows.FlowConfig(steps=150, batch_size=32, levels=4, learning_rate=1e-3,
                         check_every=50)
  runs = {}
  for deq in (True, False):
    v, _ = flows.fit(jax.random.key(0), model, images,
                     dataclasses.replace(cfg, dequantize=deq), verbose=False)
    runs[deq] = float(v["batch_stats"]["layers_1"]["var"][0, 0, 0])
  assert runs[False] < 1e-5 < 1e-2 < runs[True], runs
  with pytest.raises(ValueError, match="FlowConfig.dequantize must be True or False"):
    flows.FlowConfig(dequantize="no")


def test_fit_in_float64():
  images = (np.random.default_rng(0).integers(0, 4, (32, 4, 4, 1)) / 3.0).astype(np.float32)
  cfg = flows.FlowConfig(steps=3, batch_size=16, levels=4, dtype="float64", check_every=3)
  with pytest.raises(ValueError, match="needs 64-bit JAX"):
    flows.fit(jax.random.key(0), _flow(), images, cfg, verbose=False)
  with X64(True):
    v, h = flows.fit(jax.random.key(0), _flow(), images, cfg, verbose=False)
    dtypes = {a.dtype for a in jax.tree_util.tree_leaves(v)}
  assert dtypes == {np.dtype("float64")} and np.all(np.isfinite(h["bits_per_dim"]))
