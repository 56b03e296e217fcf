"""Paired significance tests for per-query (or per-video) scores of two systems on the same items.

Both tests look at the differences d_i = a_i − b_i of n paired items and test H0: E[d] = 0, two-sided.

* Paired randomisation (sign-flip) test: under H0 each d_i is as likely to be +|d_i| as −|d_i|, so
  p = (1 + #{flips s : |mean(s·d)| ≥ |mean(d)|}) / (1 + #flips); all 2^n flips when n ≤ ``EXACT_MAX_N``
  (then p is exact and the observed flip is among them: p = #{...} / 2^n), else ``resamples`` random ones.
* Paired t-test: t = mean(d) / (sd(d) / √n), n − 1 degrees of freedom; scipy's ``ttest_rel`` when scipy is
  installed, else :func:`student_t_sf` below (regularised incomplete beta by continued fraction).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EXACT_MAX_N = 16
"""Up to this many pairs the randomisation test enumerates every sign flip (2^16 = 65,536)."""


def _differences(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    return a - b


def _all_signs(n: int) -> np.ndarray:
    """(2^n, n) matrix of every ±1 sign vector."""
    bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1  # (2^n, n)
    return 1.0 - 2.0 * bits


def randomisation_test(a: Any, b: Any, resamples: int = 20_000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip randomisation test on mean(a − b)."""
    diff = _differences(a, b)
    n = len(diff)
    if n == 0 or not np.any(diff):
        return 1.0
    observed = abs(diff.mean()) * (1 - 1e-12)  # tolerance: a flip equal to the observed mean must count
    if n <= EXACT_MAX_N:
        means = np.abs(_all_signs(n) @ diff) / n  # (2^n,)
        return float((means >= observed).mean())
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, resamples, 4096):  # blocks keep the (R, n) sign matrix small
        signs = rng.choice([-1.0, 1.0], size=(min(4096, resamples - start), n))
        extreme += int((np.abs(signs @ diff) / n >= observed).sum())
    return (1 + extreme) / (1 + resamples)


def paired_t_test(a: Any, b: Any) -> dict[str, float]:
    """``{"t", "p", "df", "source"}`` of the two-sided paired t-test (scipy when installed)."""
    diff = _differences(a, b)
    n = len(diff)
    if n < 2 or not np.any(diff - diff[0]):  # no variance: t is undefined (or infinite)
        p = 1.0 if n < 2 or diff[0] == 0 else 0.0
        return {"t": float("nan"), "p": p, "df": float(max(n - 1, 0)), "source": "degenerate"}
    try:
        from scipy import stats
    except ImportError:
        t = diff.mean() / (diff.std(ddof=1) / math.sqrt(n))
        return {"t": float(t), "p": 2 * student_t_sf(abs(t), n - 1), "df": float(n - 1), "source": "own"}
    result = stats.ttest_rel(np.asarray(a, float), np.asarray(b, float))
    return {"t": float(result.statistic), "p": float(result.pvalue), "df": float(n - 1), "source": "scipy"}


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom, t ≥ 0: ½ · I_{df/(df+t²)}(df/2, ½)."""
    return 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (converges fast for x < (a+1)/(a+b+2); else the symmetry)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, iterations: int = 300, eps: float = 1e-15) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return value


def compare(a: Any, b: Any, seed: int = 0) -> dict[str, float]:
    """Both tests plus the means, for system a against system b on the same items."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = paired_t_test(a, b)
    return {"n": int(len(a)), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "mean_diff": float((a - b).mean()), "p_randomisation": randomisation_test(a, b, seed=seed),
            "p_t": t["p"], "t": t["t"], "t_source": t["source"]}  # fmt: skip
