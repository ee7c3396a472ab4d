"""Statistics over seeds and prompts: means with t-intervals, Spearman rho and a line fit with bootstrap intervals.

    python -c "from inoc_mech.core.stats import mean_ci, spearman; print(mean_ci([1, 2, 3])); print(spearman([1, 2, 3, 4], [1, 3, 2, 4]))"

Everything here is deterministic: the bootstrap draws from `numpy.random.default_rng(seed)`.
Undefined quantities (an interval from one value, a correlation of a constant) are NaN, never an
exception, so that a partial sweep still yields a summary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class MeanCI:
    """Mean of n values with a two-sided t-distribution confidence interval (NaN bounds when n < 2)."""
    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci(values, level: float = 0.95) -> MeanCI:
    """Mean with a `level` t-interval over independent values (e.g. seeds); NaNs are dropped."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    m = float(x.mean())
    if n < 2:
        return MeanCI(m, math.nan, math.nan, 1)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return MeanCI(m, m - half, m + half, n)


@dataclass(frozen=True)
class Spearman:
    """Spearman rank correlation with a percentile-bootstrap interval and scipy's two-sided p-value."""
    rho: float
    lo: float
    hi: float
    p: float
    n: int
    n_boot: int  # bootstrap resamples that gave a defined rho

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        if not math.isfinite(self.rho):
            return f"rho undefined (n={self.n})"
        return f"rho = {self.rho:.2f} [95% CI {self.lo:.2f}, {self.hi:.2f}], p = {self.p:.2g}, n = {self.n}"


def spearman(x, y, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Spearman:
    """Spearman rho of paired values, bootstrap CI over pairs (resampled with replacement)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Spearman(math.nan, math.nan, math.nan, math.nan, n, 0)
    res = sps.spearmanr(x, y)
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    # Spearman rho = Pearson correlation of the (average) ranks, for all resamples at once
    rx, ry = sps.rankdata(x[idx], axis=1), sps.rankdata(y[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    ok = den > 0  # a resample with constant x or y has no rho
    boots = (rx * ry).sum(1)[ok] / den[ok]
    if len(boots) == 0:
        lo = hi = math.nan
    else:
        lo, hi = (float(v) for v in np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2]))
    return Spearman(float(res.statistic), lo, hi, float(res.pvalue), n, len(boots))


@dataclass(frozen=True)
class LinearFit:
    """y = k x + b by least squares; k's bootstrap CI resamples groups (e.g. conditions, each with its seeds)."""
    k: float
    b: float
    r: float  # Pearson correlation of x and y
    k_lo: float
    k_hi: float
    n: int  # points
    n_groups: int
    residual_sd: float

    def to_dict(self) -> dict:
        return asdict(self)


def linear_fit(x, y, groups=None, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> LinearFit:
    """Least-squares line through (x, y) with a bootstrap CI of the slope over `groups` (one label per point,
    resampled with replacement; default: each point its own group; fewer than 3 groups: no interval, NaN).
    Non-finite points are dropped."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    g = np.arange(len(x)) if groups is None else np.asarray(groups)
    if not x.shape == y.shape == g.shape or x.ndim != 1:
        raise ValueError(f"linear_fit needs 1-d x, y and groups of equal length, got {x.shape}, {y.shape}, {g.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, g = x[keep], y[keep], g[keep]
    labels = list(dict.fromkeys(g.tolist()))
    if len(x) < 3 or np.ptp(x) == 0:
        return LinearFit(math.nan, math.nan, math.nan, math.nan, math.nan, len(x), len(labels), math.nan)
    fit = sps.linregress(x, y)
    k, b = fit.slope, fit.intercept
    r = float(fit.rvalue) if np.ptp(y) > 0 else math.nan
    members = [np.flatnonzero(g == lab) for lab in labels]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(labels) >= 3 else 0):  # fewer groups: every resample is the data (no interval)
        idx = np.concatenate([members[i] for i in rng.integers(0, len(labels), len(labels))])
        if np.ptp(x[idx]) > 0:
            boots.append(sps.linregress(x[idx], y[idx]).slope)
    lo, hi = (float(v) for v in np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])) if boots else (math.nan, math.nan)
    resid = y - (k * x + b)
    return LinearFit(float(k), float(b), r, lo, hi, len(x), len(labels), float(resid.std(ddof=2)) if len(x) > 2 else math.nan)


# ---- summaries as text and JSON ----------------------------------------------------------------
def spread(xs, pct: bool = True) -> str:
    """'mean ± sd (min-max)' over runs (a single value alone); `pct`: values are shares, shown in %."""
    import statistics

    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3g}")
    xs = list(xs)
    if len(xs) == 1:
        return f(xs[0])
    return f"{f(statistics.mean(xs))} ± {f(statistics.stdev(xs))} ({f(min(xs))}-{f(max(xs))})"


def ci_stat(values, lo: float = -math.inf, hi: float = math.inf) -> dict:
    """Per-seed values, mean and 95% t-interval, the interval clipped to the possible range [lo, hi]."""
    ci = mean_ci(values)
    bounds = [min(max(b, lo), hi) if math.isfinite(b) else b for b in (ci.lo, ci.hi)]
    return {"values": [float(v) for v in values], "mean": ci.mean, "ci": bounds, "n": ci.n}


def fmt_ci(s: dict, pct: bool = False, digits: int = 3) -> str:
    """'mean [lo, hi]' of a `ci_stat` dict ('-' when undefined, the mean alone without an interval)."""
    k = 100 if pct else 1
    m, (lo, hi) = s["mean"], s["ci"]
    if not math.isfinite(m):
        return "-"
    f = (lambda v: f"{k * v:.1f}") if pct else (lambda v: f"{v:.{digits}g}")
    return f"{f(m)} [{f(lo)}, {f(hi)}]" if math.isfinite(lo) else f(m)


def json_ready(x, digits: int | None = None):
    """The same structure as strict JSON: NaN and infinities become None, numpy values plain numbers,
    floats rounded to `digits` when given."""
    if isinstance(x, dict):
        return {k: json_ready(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v, digits) for v in x]
    if isinstance(x, np.ndarray):
        return json_ready(x.tolist(), digits)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return None
        return round(float(x), digits) if digits is not None else x
    return x
