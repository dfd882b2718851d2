import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from bnjax import stats


def test_rank_correlations_match_scipy():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 6, 40).astype(float)  # many ties
  y = x + rng.normal(size=40)
  np.testing.assert_allclose(stats.ranks(x), scipy.stats.rankdata(x) - 1)
  assert stats.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
  assert stats.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
  rows = rng.normal(size=(3, 40))
  np.testing.assert_allclose(stats.spearman(rows, y[None].repeat(3, 0)),
                             [scipy.stats.spearmanr(r, y)[0] for r in rows], atol=1e-12)
  assert np.isnan(stats.pearson(np.ones(5), np.arange(5.0)))


def test_bootstrap_is_the_loop_over_resamples():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=30), rng.normal(size=30)
  ci = stats.bootstrap_ci(stats.spearman, x, y, 200, np.random.default_rng(7))
  idx = np.random.default_rng(7).integers(0, 30, (200, 30))
  loop = [scipy.stats.spearmanr(x[i], y[i])[0] for i in idx]
  np.testing.assert_allclose(ci, np.percentile(loop, [2.5, 97.5]), atol=1e-12)
  with pytest.raises(ValueError, match="n must be"):
    stats.bootstrap_ci(stats.pearson, x, y, 0, rng)
  with pytest.raises(ValueError, match="same length"):
    stats.bootstrap_ci(stats.pearson, x, y[:-1], 10, rng)


@pytest.mark.parametrize("increasing", [True, False])
def test_isotonic_fit_matches_scipy(increasing):
  rng = np.random.default_rng(2)
  x = rng.permutation(25).astype(float)
  y = (x if increasing else -x) / 10 + rng.normal(size=25)
  fit = stats.isotonic_fit(x, y, increasing)
  order = np.argsort(x)
  ref = scipy.optimize.isotonic_regression(y[order], increasing=increasing).x
  np.testing.assert_allclose(fit(x[order]), ref, atol=1e-12)


def test_t_interval_matches_scipy():
  from scipy import stats as sps
  rng = np.random.default_rng(0)
  for n in (2, 3, 5, 12, 40):
    x = rng.normal(size=(4, n))
    mean, half = stats.t_interval(x)
    lo, hi = sps.t.interval(0.95, n - 1, loc=x.mean(-1), scale=sps.sem(x, axis=-1))
    np.testing.assert_allclose(mean, x.mean(-1))
    np.testing.assert_allclose(half, (hi - lo) / 2, rtol=1e-3)
  assert np.isnan(stats.t_interval(np.ones((2, 1)))[1]).all()
