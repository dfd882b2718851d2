import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.stats

from bnjax import distances


def gaussian_sample(rng, n, d, shift=0.0, scale=1.0):
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ a.T) * scale + shift


def scipy_frechet(x, y):
  """The pytorch-fid formula: sqrtm of the product (non-symmetric)."""
  m1, m2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.wheel
def test_frechet_matches_scipy_in_float64():
  rng = np.random.default_rng(0)
  x = gaussian_sample(rng, 400, 6)
  y = gaussian_sample(rng, 300, 6, shift=0.5, scale=1.5)
  got = distances.frechet(x, y, dtype=np.float64)
  assert got == pytest.approx(scipy_frechet(x, y), rel=1e-6)
  assert distances.frechet(x, x) == pytest.approx(0.0, abs=1e-3)
  assert distances.frechet(x, y) == pytest.approx(got, rel=1e-3)


def test_frechet_from_moments_singular_source_and_vmap():
  """The eigh fallback (singular S1, no Cholesky factor) and the device path
  agree with a NumPy eigh computation; the function vmaps."""
  rng = np.random.default_rng(4)
  x = gaussian_sample(rng, 200, 5)
  x[:, 3] = 1.5  # a constant (collapsed) channel: S1 is exactly singular
  y = gaussian_sample(rng, 150, 5, shift=0.3, scale=1.2)
  m1, m2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  w, v = np.linalg.eigh(s1)
  r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(
      np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
  with jax.enable_x64(True):
    got = distances.frechet_from_moments(*map(jnp.asarray, (m1, s1, m2, s2)))
    device = distances._frechet_device(jnp.asarray(x), jnp.asarray(y))
    both = jax.vmap(distances.frechet_from_moments)(*[jnp.stack([a, a]) for a in (m1, s1, m2, s2)])
  assert float(got) == pytest.approx(ref, rel=1e-9)
  assert float(device) == pytest.approx(ref, rel=1e-9)
  np.testing.assert_allclose(np.asarray(both), ref, rtol=1e-9)
  assert distances.frechet(x, y, dtype=np.float64) == pytest.approx(ref, rel=1e-9)


@pytest.mark.slow
def test_frechet_high_dimensional_bias_and_correction():
  x = np.asarray(jax.random.normal(jax.random.key(0), (16000, 1024)))
  y = np.asarray(jax.random.normal(jax.random.key(1), (16000, 1024)))
  raw = distances.frechet(x, y)
  assert 30 < raw < 36
  assert abs(distances.frechet(x, y, bias_correction=True)) < 1.0


def test_source_normalized_frechet_closed_form():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20000, 3)) * [1.0, 2.0, 4.0]
  # y = 2 x + 1: after whitening by x's moments the mean moves by S^-1/2 (mu_x + 1)
  # and the covariance is 4 I, so W2² = (mu_x + 1)ᵀ S⁻¹ (mu_x + 1) + 3 (2 - 1)².
  y = x * 2 + 1
  dm = x.mean(0) + 1
  want = dm @ np.linalg.solve(np.cov(x, rowvar=False), dm) + 3
  got = distances.source_normalized_frechet(x, y, dtype=np.float64)
  assert got == pytest.approx(want, rel=1e-6)
  assert distances.source_normalized_frechet(x, x, dtype=np.float64) == pytest.approx(0, abs=1e-9)


@pytest.mark.wheel
def test_sliced_wasserstein_against_pot():
  import ot

  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 5))
  y = rng.normal(size=(200, 5)) + 1.0
  theta = rng.normal(size=(5, 50))
  theta /= np.linalg.norm(theta, axis=0)
  ours = distances.sliced_wasserstein(x, y, projections=theta, dtype=np.float64)
  pot = ot.sliced_wasserstein_distance(x, y, projections=theta, p=2)
  assert ours == pytest.approx(float(pot), rel=1e-6)
  y2 = y[:300] if len(y) >= 300 else rng.normal(size=(300, 5)) + 1.0
  assert distances.sliced_wasserstein(x, y2, projections=theta, dtype=np.float64) == pytest.approx(
      float(ot.sliced_wasserstein_distance(x, y2, projections=theta, p=2)), rel=1e-6)
  a = distances.sliced_wasserstein(x, y, key=jax.random.key(3))
  assert a == distances.sliced_wasserstein(x, y, key=jax.random.key(3))
  with pytest.raises(ValueError, match="unit-norm"):
    distances.sliced_wasserstein(x, y, projections=theta * 2)


def test_bhattacharyya_against_numeric_integral():
  rng = np.random.default_rng(4)
  x = rng.normal(1.0, 2.0, size=(5000, 1))
  y = rng.normal(3.0, 0.5, size=(4000, 1))
  m1, s1 = x.mean(), x.std(ddof=1)
  m2, s2 = y.mean(), y.std(ddof=1)
  bc, _ = scipy.integrate.quad(
      lambda t: np.sqrt(scipy.stats.norm.pdf(t, m1, s1) * scipy.stats.norm.pdf(t, m2, s2)), -30, 30)
  assert distances.bhattacharyya(x, y, ridge=0, dtype=np.float64) == pytest.approx(-np.log(bc), rel=1e-6)
  assert distances.histogram_bhattacharyya(x, x) == pytest.approx(0.0, abs=1e-12)
  assert distances.histogram_bhattacharyya(x, y) > 0.3


def test_mmd_against_loop():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.5
  h = 1.3
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h * h))
  xx = np.mean([k(x[i], x[j]) for i in range(12) for j in range(12) if i != j])
  yy = np.mean([k(y[i], y[j]) for i in range(9) for j in range(9) if i != j])
  xy = np.mean([k(a, b) for a in x for b in y])
  assert distances.mmd(x, y, h, dtype=np.float64) == pytest.approx(xx + yy - 2 * xy, rel=1e-6)
  # The default bandwidth: the median nonzero distance of the pooled rows,
  # both sides represented however many rows x has.
  big = rng.normal(size=(1200, 3))
  z = np.concatenate([big[:500], y])
  d = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
  h = float(np.median(d))
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2, -1) / (2 * h * h))
  kxx = k(big[:, None], big[None])
  xx = (kxx.sum() - np.trace(kxx)) / (1200 * 1199)
  kyy = k(y[:, None], y[None])
  yy = (kyy.sum() - np.trace(kyy)) / (9 * 8)
  xy = k(big[:, None], y[None]).mean()
  assert distances.mmd(big, y, dtype=np.float64) == pytest.approx(xx + yy - 2 * xy, rel=1e-6)
  # Collapsed features (every row one point): 0, not an error.
  assert distances.mmd(np.ones((6, 2)), np.ones((4, 2))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.wheel
def test_sinkhorn_divergence_of_a_translation():
  """For a translated cloud the debiased divergence with squared cost is |δ|²."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(200, 3)).astype(np.float32)
  delta = np.array([0.5, -1.0, 0.25], np.float32)
  value = distances.sinkhorn(x, x + delta, epsilon=0.1)
  assert value == pytest.approx(float(delta @ delta), rel=2e-2)
  assert abs(distances.sinkhorn(x, x, epsilon=0.1)) < 1e-3
  assert distances.sinkhorn(np.zeros((5, 3)), np.zeros((7, 3))) == 0.0  # collapsed features
  assert distances.sinkhorn(x, x + delta) == pytest.approx(float(delta @ delta), rel=5e-2)


def test_overlap_coefficient_against_quadrature():
  for mu1, s1, mu2, s2 in [(90, 50, 170, 50), (96, 18, 138, 6), (10, 30, 12, 5), (100, 1, 200, 1)]:
    want, _ = scipy.integrate.quad(
        lambda t: min(scipy.stats.norm.pdf(t, mu1, s1), scipy.stats.norm.pdf(t, mu2, s2)),
        -500, 800, points=[mu1, mu2], limit=500)
    assert distances.overlap_coefficient(mu1, s1, mu2, s2) == pytest.approx(want, abs=1e-7)
  assert distances.overlap_coefficient(5, 3, 5, 3) == 1.0
  with pytest.raises(ValueError, match="sigma2"):
    distances.overlap_coefficient(0, 1, 0, -1)


def test_diag_predictors_match_frechet_and_closed_form():
  import jax.numpy as jnp

  rng = np.random.default_rng(7)
  a = {"l": {"bn": {"mean": rng.normal(size=4), "var": rng.uniform(0.5, 2, 4)}}}
  b = {"l": {"bn": {"mean": rng.normal(size=4), "var": rng.uniform(0.5, 2, 4)}}}
  ma, va = a["l"]["bn"]["mean"], a["l"]["bn"]["var"]
  mb, vb = b["l"]["bn"]["mean"], b["l"]["bn"]["var"]
  want = float(distances.frechet_from_moments(jnp.asarray(ma), jnp.diag(va), jnp.asarray(mb), jnp.diag(vb)))
  assert distances.diag_w2(a, b)["l/bn"] == pytest.approx(want, rel=1e-4)
  per_dim = [-np.log(scipy.integrate.quad(lambda t: np.sqrt(
      scipy.stats.norm.pdf(t, ma[i], np.sqrt(va[i])) * scipy.stats.norm.pdf(t, mb[i], np.sqrt(vb[i]))),
      -30, 30)[0]) for i in range(4)]
  assert distances.diag_bhattacharyya(a, b)["l/bn"] == pytest.approx(sum(per_dim), rel=1e-6)


def test_input_errors():
  with pytest.raises(ValueError, match="same d"):
    distances.frechet(np.zeros((5, 2)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match="NaN"):
    distances.mmd(np.full((5, 2), np.nan), np.zeros((5, 2)))
  with pytest.raises(ValueError, match="at least 2"):
    distances.bhattacharyya(np.zeros((1, 2)), np.zeros((5, 2)))
  x = np.random.default_rng(0).normal(size=(20, 3))
  with pytest.raises(ValueError, match="dtype must be float32 or float64"):
    distances.frechet(x, x + 1, dtype=np.int32)
  with pytest.raises(ValueError, match="dtype must be float32 or float64"):
    distances.bhattacharyya(x, x + 1, dtype=np.float16)
  with pytest.raises(ValueError, match="must be a float array"):
    distances.sort_floats(jnp.arange(5))


def test_sort_floats_equals_numpy_sort():
  rng = np.random.default_rng(3)
  a = (rng.standard_normal((6, 500)) * 10.0 ** rng.integers(-30, 30, (6, 500))).astype(np.float32)
  a[0, :4] = [np.inf, -np.inf, 0.0, -1e-40]  # infinities and a subnormal
  np.testing.assert_array_equal(np.asarray(distances.sort_floats(jnp.asarray(a), axis=1)),
                                np.sort(a, axis=1))
  np.testing.assert_array_equal(np.asarray(distances.sort_floats(jnp.asarray(a), axis=0)),
                                np.sort(a, axis=0))
  with jax.enable_x64(True):
    b = a.astype(np.float64) * 1e200
    np.testing.assert_array_equal(np.asarray(distances.sort_floats(jnp.asarray(b))), np.sort(b))


def test_subsample_draws_distinct_rows():
  x = np.arange(40.0).reshape(20, 2)
  assert distances.subsample(x, 20, jax.random.key(0)) is x
  got = distances.subsample(x, 7, jax.random.key(1))
  assert got.shape == (7, 2) and len({tuple(r) for r in got}) == 7
  assert all(tuple(r) in {tuple(s) for s in x} for r in got)
  np.testing.assert_array_equal(got, distances.subsample(x, 7, jax.random.key(1)))
  with pytest.raises(ValueError, match="n must be an integer >= 1"):
    distances.subsample(x, 0, jax.random.key(0))
