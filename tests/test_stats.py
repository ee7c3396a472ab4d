import math

import numpy as np
import pytest
from scipy import stats as sps

from inoc_mech.core.stats import mean_ci, spearman


def test_mean_ci_known_values():
    ci = mean_ci([1.0, 2.0, 3.0])
    half = sps.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd = 1
    assert ci.mean == pytest.approx(2.0)
    assert (ci.lo, ci.hi) == pytest.approx((2.0 - half, 2.0 + half))
    assert ci.n == 3


def test_mean_ci_one_value_and_nans():
    one = mean_ci([0.5])
    assert one.mean == 0.5 and math.isnan(one.lo) and math.isnan(one.hi) and one.n == 1
    assert mean_ci([1.0, float("nan"), 3.0]).n == 2
    assert math.isnan(mean_ci([]).mean)


def test_mean_ci_covers_the_truth_about_95_percent():
    # Planted data: 2000 samples of 4 seeds from N(0.3, 1). A t-interval covers 0.3 in ~95% of them;
    # a normal (z) interval would cover only ~86% with n = 4, a t-interval with ddof=0 ~93%.
    rng = np.random.default_rng(0)
    covered = [(c := mean_ci(rng.normal(0.3, 1.0, 4))).lo <= 0.3 <= c.hi for _ in range(2000)]
    assert 0.935 <= np.mean(covered) <= 0.965


def test_spearman_perfect_monotone_is_one():
    x = np.arange(10.0)
    r = spearman(x, x ** 3)  # monotone but not linear: Spearman is exactly 1
    assert r.rho == pytest.approx(1.0)
    assert (r.lo, r.hi) == pytest.approx((1.0, 1.0))
    assert r.p < 1e-6 and r.n == 10
    assert spearman(x, -np.exp(x)).rho == pytest.approx(-1.0)


def test_spearman_matches_scipy_and_is_deterministic():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=20), rng.normal(size=20)
    r = spearman(x, y, n_boot=500, seed=3)
    ref = sps.spearmanr(x, y)
    assert r.rho == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue)
    assert spearman(x, y, n_boot=500, seed=3) == r
    assert spearman(x, y, n_boot=500, seed=4).lo != r.lo  # the seed drives the bootstrap
    # the vectorised bootstrap gives scipy's rho on each resample
    idx = np.random.default_rng(3).integers(0, 20, (500, 20))
    ref_boot = [sps.spearmanr(x[i], y[i]).statistic for i in idx]
    assert (r.lo, r.hi) == pytest.approx(tuple(np.quantile(ref_boot, [0.025, 0.975])), abs=1e-12)


def test_spearman_bootstrap_ci_covers_the_truth():
    # Bivariate normal with correlation 0.6: population Spearman rho = 6/pi * asin(0.6 / 2).
    truth = 6 / math.pi * math.asin(0.3)
    rng = np.random.default_rng(2)
    hits = []
    for _ in range(100):
        x = rng.normal(size=60)
        y = 0.6 * x + math.sqrt(1 - 0.36) * rng.normal(size=60)
        r = spearman(x, y, n_boot=1000, seed=0)
        assert r.lo < r.rho < r.hi
        hits.append(r.lo <= truth <= r.hi)
    assert 0.85 <= np.mean(hits) <= 0.99  # nominal 95%; percentile bootstraps run a little narrow


def test_spearman_undefined_cases_are_nan():
    assert math.isnan(spearman([1, 2], [3, 4]).rho)  # n < 3
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]).rho)  # constant
    r = spearman([1, 2, float("nan"), 4, 5], [2, 4, 1, 8, 10])
    assert r.n == 4 and r.rho == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2, 3], [1, 2])
