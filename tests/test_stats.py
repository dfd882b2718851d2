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


def test_kendall_matches_scipy_with_ties():
  rng = np.random.default_rng(3)
  x = rng.integers(0, 5, 60).astype(float)  # ties in x
  y = np.round(x + rng.normal(size=60))      # and in y
  assert stats.kendall(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)
  rows = rng.normal(size=(4, 60))
  np.testing.assert_allclose(stats.kendall(rows, y[None].repeat(4, 0)),
                             [scipy.stats.kendalltau(r, y).statistic for r in rows], atol=1e-12)
  assert np.isnan(stats.kendall(np.ones(6), np.arange(6.0)))
  # A NaN has no sign: refused, not counted as a tie.
  with pytest.raises(ValueError, match="finite"):
    stats.kendall([0.0, np.nan, 1.0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="finite"):
    stats.bootstrap_ci(stats.kendall, np.array([0.0, np.nan, 1.0]), np.arange(3.0), 10,
                       np.random.default_rng(0))


def test_kendall_bootstrap_is_the_loop_over_resamples():
  # The bootstrap of tau-b runs on resample counts; it must equal scipy on
  # each resample with its duplicates.
  rng = np.random.default_rng(4)
  x = rng.integers(0, 8, 35).astype(float)
  y = x + rng.normal(size=35)
  ci = stats.bootstrap_ci(stats.kendall, x, y, 150, np.random.default_rng(9))
  idx = np.random.default_rng(9).integers(0, 35, (150, 35))
  loop = [scipy.stats.kendalltau(x[i], y[i]).statistic for i in idx]
  np.testing.assert_allclose(ci, np.percentile(loop, [2.5, 97.5]), atol=1e-12)


def test_group_folds_hold_each_group_out_once():
  groups = ["b", "a", "c", "a", "b", "b", "c"]
  folds = stats.group_folds(groups)
  assert [g for g, _, _ in folds] == ["a", "b", "c"]
  tested = np.concatenate([test for _, _, test in folds])
  assert sorted(tested.tolist()) == list(range(len(groups)))
  for g, tr, te in folds:
    assert {groups[i] for i in te} == {g} and g not in {groups[i] for i in tr}
    assert len(tr) + len(te) == len(groups)
  with pytest.raises(ValueError, match="at least 2 distinct"):
    stats.group_folds(["a", "a"])


@pytest.mark.parametrize("increasing", [True, False])
def test_isotonic_fit_matches_scipy(increasing):
  rng = np.random.default_rng(2)
  x = rng.permutation(25).astype(float)
  y = (x if increasing else -x) / 10 + rng.normal(size=25)
  fit = stats.isotonic_fit(x, y, increasing)
  order = np.argsort(x)
  ref = scipy.optimize.isotonic_regression(y[order], increasing=increasing).x
  np.testing.assert_allclose(fit(x[order]), ref, atol=1e-12)
  # The fitted steps are plain data: rebuilt from its fields it predicts the same.
  again = stats.Step(tuple(fit.edges), tuple(fit.values))
  t = rng.uniform(-3, 28, 50)
  np.testing.assert_array_equal(again(t), fit(t))
  assert np.all(np.diff(fit.values) >= 0 if increasing else np.diff(fit.values) <= 0)
  with pytest.raises(ValueError, match="finite"):
    stats.isotonic_fit([0.0, np.nan], [1.0, 2.0])
  # Without a direction it takes the data's (the sign of the Spearman correlation).
  auto = stats.isotonic_fit(x, y, increasing=None)
  assert auto.increasing == (scipy.stats.spearmanr(x, y)[0] >= 0) == increasing
  np.testing.assert_array_equal(auto(t), fit(t))


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


def test_difference_text_bold_only_for_an_interval_below_zero():
  assert stats.difference_text(-0.018, 0.012) == "**-0.018 ± 0.012**"   # [-0.030, -0.006]
  assert stats.difference_text(-0.013, 0.015) == "-0.013 ± 0.015"       # crosses 0
  assert stats.difference_text(0.020, 0.010) == "+0.020 ± 0.010"
  assert stats.difference_text(-0.5, float("nan")) == "-0.500"           # one seed: no interval
