"""Tests for fedrad.common.metrics: site-local validation metrics, binned aggregates, meta-analysis.

References: scikit-learn (``roc_auc_score``, ``roc_curve``, ``brier_score_loss``, unpenalized
``LogisticRegression``), lifelines 0.30 (``concordance_index``, ``CoxPHFitter``, ``logrank_test``,
``KaplanMeierFitter``), statsmodels when installed (``combine_effects``, GLM with offset), direct
O(n²) implementations of the defining formulas, bootstrap estimates of the standard errors, and
two published examples (Hanley & McNeil 1982 CT ratings; the BCG vaccine meta-analysis of
Colditz et al. 1994 as analysed by DerSimonian-Laird in R ``metafor``).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from fedrad.common.metrics import (
    auc_delong,
    brier,
    c_paired,
    calibration,
    delong_paired,
    dersimonian_laird,
    harrell_c,
    km_bins,
    pool_proportion_like,
    pooled_km,
    pooled_roc,
    risk_group_split,
    roc_bins,
    suppress_small_cells,
)

lifelines = pytest.importorskip("lifelines")
from lifelines import CoxPHFitter, KaplanMeierFitter  # noqa: E402
from lifelines.statistics import logrank_test  # noqa: E402
from lifelines.utils import concordance_index  # noqa: E402


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def binary_data(n=300, seed=0, ties=True, effect=1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    a = effect * y + rng.normal(size=n)
    b = 0.6 * effect * y + 0.5 * a + rng.normal(size=n)  # correlated with a
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return y, a, b


def survival_data(n=250, seed=0, integer_times=True):
    rng = np.random.default_rng(seed)
    ra = rng.normal(size=n)
    rb = 0.5 * ra + rng.normal(size=n)
    t_ev = rng.exponential(10 * np.exp(-0.8 * ra))
    t_c = rng.uniform(2, 25, size=n)
    time = np.minimum(t_ev, t_c)
    event = (t_ev <= t_c).astype(int)
    if integer_times:
        time = np.ceil(time)  # many tied times, events and censorings at the same time
    return time, event, ra, np.round(rb, 1)


def fast_auc(y, s):
    r = scipy.stats.rankdata(s)
    m = y.sum()
    return (r[y == 1].sum() - m * (m + 1) / 2) / (m * (len(y) - m))


def naive_delong(y, scores):
    """DeLong 1988 from the definition: psi matrices, structural components, covariance (O(mn))."""
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    S = np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]
    return np.array(aucs), S


# ----------------------------------------------------------------------------------------------
# AUC / DeLong
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,ties", [(0, True), (1, False), (2, True)])
def test_auc_equals_sklearn_and_naive_delong(seed, ties):
    y, a, _ = binary_data(seed=seed, ties=ties)
    res = auc_delong(y, a)
    assert res["auc"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    auc, S = naive_delong(y, [a])
    assert res["se"] == pytest.approx(math.sqrt(S[0, 0]), rel=1e-10)
    z = scipy.stats.norm.isf(0.025)
    assert res["ci_low"] == pytest.approx(res["auc"] - z * res["se"], abs=1e-12)
    assert res["ci_high"] == pytest.approx(res["auc"] + z * res["se"], abs=1e-12)
    assert res["reason"] is None and res["n_pos"] + res["n_neg"] == len(y)


def test_auc_delong_se_vs_bootstrap():
    y, a, _ = binary_data(n=400, seed=3)
    res = auc_delong(y, a)
    rng = np.random.default_rng(123)
    boots = []
    for _ in range(2000):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            boots.append(fast_auc(y[i], a[i]))
    se_boot = np.std(boots, ddof=1)
    assert abs(res["se"] / se_boot - 1) < 0.15, (res["se"], se_boot)


def test_auc_hanley_mcneil_1982_ct_ratings():
    """Hanley & McNeil, Radiology 1982; 143:29, Table 1: 109 CT images rated 1-5.

    Published: area 0.893, SE 0.032 (their exponential approximation).  DeLong's nonparametric SE is a
    different estimator of the same quantity; we only check it is close to the published SE.
    """
    normal = [33, 6, 6, 11, 2]
    abnormal = [3, 2, 2, 11, 33]
    ratings = np.arange(1, 6)
    y = np.r_[np.zeros(sum(normal)), np.ones(sum(abnormal))]
    s = np.r_[np.repeat(ratings, normal), np.repeat(ratings, abnormal)]
    res = auc_delong(y, s)
    assert round(res["auc"], 3) == 0.893
    assert res["se"] == pytest.approx(0.032, abs=0.004)


def test_auc_logit_ci_and_level():
    y, a, _ = binary_data(seed=4)
    lin = auc_delong(y, a)
    lg = auc_delong(y, a, ci_scale="logit", level=0.9)
    A, se = lin["auc"], lin["se"]
    z = scipy.stats.norm.isf(0.05)
    half = z * se / (A * (1 - A))
    assert lg["ci_low"] == pytest.approx(scipy.special.expit(scipy.special.logit(A) - half), abs=1e-12)
    assert lg["ci_high"] == pytest.approx(scipy.special.expit(scipy.special.logit(A) + half), abs=1e-12)
    assert lg["ci_scale"] == "logit" and lin["ci_scale"] == "linear"
    # linear CI is clipped at 1 for a near-perfect score, logit CI stays inside (0, 1)
    rng = np.random.default_rng(0)
    yy = np.r_[np.zeros(15), np.ones(15)].astype(int)
    ss = yy * 3.0 + rng.normal(size=30)
    near = auc_delong(yy, ss)
    assert near["ci_high"] <= 1.0
    assert 0 < auc_delong(yy, ss, ci_scale="logit")["ci_high"] <= 1.0
    # perfect separation: SE 0, degenerate CI
    perfect = auc_delong(yy, yy + 0.1 * np.arange(30))
    assert perfect["auc"] == 1.0 and perfect["se"] == 0.0 and perfect["ci_low"] == perfect["ci_high"] == 1.0


def test_auc_guards():
    one = auc_delong([1, 1, 1], [0.1, 0.5, 0.9])
    assert one["auc"] is None and one["se"] is None and "one class" in one["reason"]
    empty = auc_delong([], [])
    assert empty["auc"] is None and empty["reason"]
    single_pos = auc_delong([1, 0, 0, 0], [0.9, 0.1, 0.5, 0.95])
    assert single_pos["auc"] == pytest.approx(2 / 3) and single_pos["se"] is None and single_pos["reason"]
    with pytest.raises(ValueError, match="different lengths"):
        auc_delong([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc_delong([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        auc_delong([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="ci_scale"):
        auc_delong([0, 1, 1], [0.1, 0.2, 0.3], ci_scale="probit")
    with pytest.raises(ValueError, match="level"):
        auc_delong([0, 1, 1], [0.1, 0.2, 0.3], level=95)
    # booleans are accepted
    assert auc_delong(np.array([True, False, True, False]), [0.9, 0.1, 0.8, 0.3])["auc"] == 1.0


# ----------------------------------------------------------------------------------------------
# paired DeLong
# ----------------------------------------------------------------------------------------------
def test_delong_paired_equals_naive_covariance():
    y, a, b = binary_data(seed=5)
    res = delong_paired(y, a, b)
    aucs, S = naive_delong(y, [a, b])
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert res["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert res["diff"] == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    se = math.sqrt(S[0, 0] + S[1, 1] - 2 * S[0, 1])
    assert res["se"] == pytest.approx(se, rel=1e-10)
    assert res["z"] == pytest.approx(res["diff"] / se, rel=1e-10)
    assert res["p"] == pytest.approx(2 * scipy.stats.norm.sf(abs(res["diff"] / se)), rel=1e-10)
    assert res["corr"] == pytest.approx(S[0, 1] / math.sqrt(S[0, 0] * S[1, 1]), rel=1e-10)
    # single-score results agree with auc_delong
    assert auc_delong(y, a)["se"] == pytest.approx(math.sqrt(S[0, 0]), rel=1e-10)


def test_delong_paired_se_vs_paired_bootstrap():
    y, a, b = binary_data(n=400, seed=6)
    res = delong_paired(y, a, b)
    rng = np.random.default_rng(7)
    diffs = []
    for _ in range(2000):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            diffs.append(fast_auc(y[i], a[i]) - fast_auc(y[i], b[i]))
    se_boot = np.std(diffs, ddof=1)
    assert abs(res["se"] / se_boot - 1) < 0.15, (res["se"], se_boot)


def test_delong_paired_identical_scores_and_guards():
    y, a, _ = binary_data(seed=8)
    same = delong_paired(y, a, a)
    assert same["diff"] == 0 and same["se"] == pytest.approx(0, abs=1e-12) and same["p"] == 1.0
    one = delong_paired([0, 0, 0], [1, 2, 3], [3, 2, 1])
    assert one["auc_a"] is None and one["p"] is None and one["reason"]
    with pytest.raises(ValueError, match="different lengths"):
        delong_paired([0, 1], [1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------------------------
# Brier and calibration
# ----------------------------------------------------------------------------------------------
def calibration_data(n=800, seed=0, a=0.3, b=0.7):
    rng = np.random.default_rng(seed)
    lp = rng.normal(scale=1.5, size=n)
    y = (rng.random(n) < scipy.special.expit(a + b * lp)).astype(int)
    return y, scipy.special.expit(lp)


def test_brier_equals_sklearn():
    y, p = calibration_data()
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-15)
    assert brier([1, 1], [0.5, 1.0]) == pytest.approx(0.125)  # one class is fine
    with pytest.raises(ValueError, match="no observations"):
        brier([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier([0, 1], [0.2, 1.2])


def test_calibration_slope_vs_sklearn_and_intercept_vs_score_equation():
    y, p = calibration_data()
    res = calibration(y, p)
    lp = scipy.special.logit(p)
    ref = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(lp[:, None], y)
    assert res["slope"] == pytest.approx(ref.coef_[0, 0], abs=1e-7)
    assert res["slope_model_intercept"] == pytest.approx(ref.intercept_[0], abs=1e-7)
    # calibration-in-the-large: root of the score equation sum(y - expit(a + lp)) = 0
    a_ref = scipy.optimize.brentq(lambda a: np.sum(y - scipy.special.expit(a + lp)), -10, 10, xtol=1e-14)
    assert res["intercept"] == pytest.approx(a_ref, abs=1e-10)
    mu = scipy.special.expit(a_ref + lp)
    assert res["se_intercept"] == pytest.approx(1 / math.sqrt(np.sum(mu * (1 - mu))), rel=1e-8)
    X = np.column_stack([np.ones_like(lp), lp])
    mu2 = scipy.special.expit(X @ np.r_[ref.intercept_[0], ref.coef_[0, 0]])
    cov = np.linalg.inv((X * (mu2 * (1 - mu2))[:, None]).T @ X)
    assert res["se_slope"] == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-6)
    # generated with slope 0.7 (overfitted model) and a positive intercept shift
    assert 0.55 < res["slope"] < 0.85 and res["intercept"] > 0


def test_calibration_statsmodels_if_installed():
    sm = pytest.importorskip("statsmodels.api")
    y, p = calibration_data(seed=1)
    res = calibration(y, p)
    lp = scipy.special.logit(p)
    citl = sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=lp).fit()
    slope = sm.GLM(y, sm.add_constant(lp), family=sm.families.Binomial()).fit()
    assert res["intercept"] == pytest.approx(citl.params[0], abs=1e-8)
    assert res["slope"] == pytest.approx(slope.params[1], abs=1e-8)
    assert res["se_slope"] == pytest.approx(slope.bse[1], rel=1e-6)


def test_calibration_perfect_model_and_guards():
    y, p = calibration_data(n=20000, seed=2, a=0.0, b=1.0)
    res = calibration(y, p)
    assert abs(res["intercept"]) < 3 * res["se_intercept"] and abs(res["slope"] - 1) < 3 * res["se_slope"]
    one = calibration([1, 1, 1], [0.2, 0.5, 0.7])
    assert one["intercept"] is None and one["slope"] is None and "one class" in one["reason"]
    sep = calibration([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert sep["slope"] is None and "separates" in sep["reason"] and sep["intercept"] is not None
    const = calibration([0, 1, 0, 1], [0.3] * 4)
    assert const["slope"] is None
    assert const["intercept"] == pytest.approx(scipy.special.logit(0.5) - scipy.special.logit(0.3))
    with pytest.raises(ValueError, match="0 < p < 1"):
        calibration([0, 1], [0.0, 0.5])
    with pytest.raises(ValueError, match="different lengths"):
        calibration([0, 1, 1], [0.2, 0.5])


# ----------------------------------------------------------------------------------------------
# binned ROC
# ----------------------------------------------------------------------------------------------
def three_sites_binary(seed=0):
    rng = np.random.default_rng(seed)
    sites = []
    for n, shift in [(150, 0.0), (90, 0.3), (60, -0.2)]:
        y = (rng.random(n) < 0.35).astype(int)
        p = scipy.special.expit(shift + 1.2 * y + rng.normal(size=n))
        sites.append((y, np.round(p, 2)))  # scores on a 0.01 grid
    return sites


def test_pooled_roc_equals_sklearn_when_scores_on_edges():
    sites = three_sites_binary()
    edges = np.round(np.linspace(0, 1, 101), 2)  # every score value is a left bin edge
    tables = [roc_bins(y, s, edges) for y, s in sites]
    y_all = np.concatenate([y for y, _ in sites])
    s_all = np.concatenate([s for _, s in sites])
    fpr, tpr, auc = pooled_roc(tables)
    assert auc == pytest.approx(roc_auc_score(y_all, s_all), abs=1e-12)
    # the binned curve passes through exactly sklearn's ROC points (empty bins repeat a point)
    f_ref, t_ref, _ = roc_curve(y_all, s_all, drop_intermediate=False)
    pts = {(round(f, 12), round(t, 12)) for f, t in zip(fpr, tpr)}
    assert pts == {(round(f, 12), round(t, 12)) for f, t in zip(f_ref, t_ref)}
    # counts add up and ordering: fpr/tpr monotone from (0,0) to (1,1)
    assert sum(t["pos_counts"].sum() + t["neg_counts"].sum() for t in tables) == len(y_all)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    # coarse bins: AUC of the binned scores (within-bin ties), close to the exact AUC
    coarse = pooled_roc([roc_bins(y, s, np.linspace(0, 1, 11)) for y, s in sites])
    assert abs(coarse.auc - auc) < 0.02
    # the same binned AUC as sklearn on the bin indices
    idx = np.clip(np.searchsorted(np.linspace(0, 1, 11), s_all, side="right") - 1, 0, 9)
    assert coarse.auc == pytest.approx(roc_auc_score(y_all, idx), abs=1e-12)


def test_roc_bins_edges_and_out_of_range():
    t = roc_bins([1, 0, 1, 0, 1], [-0.5, 0.0, 0.5, 1.0, 7.0], [0.0, 0.5, 1.0])
    assert t["pos_counts"].tolist() == [1, 2] and t["neg_counts"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="strictly increasing"):
        roc_bins([0, 1], [0.1, 0.2], [0, 0.5, 0.5, 1])
    one_class = roc_bins([1, 1], [0.1, 0.9], [0, 0.5, 1])  # valid for pooling
    assert one_class["pos_counts"].tolist() == [1, 1] and one_class["reason"] is None


@pytest.mark.parametrize("rule", ["total", "cells"])
def test_suppress_small_cells(rule):
    sites = three_sites_binary(seed=1)
    edges = np.linspace(0, 1, 51)
    k = 5
    raw = [roc_bins(y, s, edges) for y, s in sites]
    sup = [suppress_small_cells(t, k, rule=rule) for t in raw]
    for j, (t, r) in enumerate(zip(sup, raw)):
        tot = t["pos_counts"] + t["neg_counts"]
        assert (tot >= k).all()
        if rule == "cells":
            for c in (t["pos_counts"], t["neg_counts"]):
                assert ((c == 0) | (c >= k)).all()
        assert t["pos_counts"].sum() == r["pos_counts"].sum() and t["neg_counts"].sum() == r["neg_counts"].sum()
        assert set(t["edges"]) <= set(edges) and t["edges"][0] == 0 and t["edges"][-1] == 1
        assert len(t["edges"]) == len(t["pos_counts"]) + 1
        # counts are the site's data re-binned on the merged edges
        y, s = sites[j]
        direct = roc_bins(y, s, t["edges"])
        assert (direct["pos_counts"] == t["pos_counts"]).all() and (direct["neg_counts"] == t["neg_counts"]).all()
    # pooling differently-merged tables is exact on the intersection of their edges
    common = sup[0]["edges"]
    for t in sup[1:]:
        common = np.intersect1d(common, t["edges"])
    y_all = np.concatenate([y for y, _ in sites])
    s_all = np.concatenate([s for _, s in sites])
    ref = pooled_roc([roc_bins(y_all, s_all, common)])
    got = pooled_roc(sup)
    assert got.auc == pytest.approx(ref.auc, abs=1e-12)
    np.testing.assert_allclose(got.fpr, ref.fpr, atol=1e-12)


def test_suppress_small_cells_greedy_and_withheld():
    t = {"pos_counts": np.array([1, 0, 2, 3, 0, 1]), "neg_counts": np.array([0, 2, 1, 4, 0, 0]),
         "edges": np.arange(7.0)}
    # totals 1,2 | 3 | 7 | 0,1: the trailing group (1 patient) is merged into its left neighbour
    s = suppress_small_cells(t, 3)
    assert ((s["pos_counts"] + s["neg_counts"]) >= 3).all()
    assert s["edges"].tolist() == [0.0, 2.0, 3.0, 6.0]
    assert s["pos_counts"].tolist() == [1, 2, 4] and s["neg_counts"].tolist() == [2, 1, 4]
    withheld = suppress_small_cells({"pos_counts": [1, 1], "neg_counts": [0, 1], "edges": [0, 1, 2]}, 5)
    assert withheld["pos_counts"] is None and withheld["reason"]
    full = roc_bins([0, 1] * 10, np.linspace(0, 1, 20), np.linspace(0, 1, 5))
    assert pooled_roc([withheld, full]).auc == pytest.approx(pooled_roc([full]).auc)
    with pytest.raises(ValueError, match="k must be"):
        suppress_small_cells(full, 0)


def test_pooled_roc_guards():
    with pytest.raises(ValueError, match="no usable"):
        pooled_roc([])
    with pytest.raises(ValueError, match="positives"):
        pooled_roc([roc_bins([1, 1], [0.1, 0.9], [0, 0.5, 1])])
    with pytest.raises(ValueError, match="outer edges"):
        pooled_roc([roc_bins([0, 1], [0.1, 0.9], [0, 0.5, 1]), roc_bins([0, 1], [0.1, 0.9], [0, 0.5, 2])])
    # tables without edges are summed bin by bin
    a = {"pos_counts": [0, 1, 2], "neg_counts": [2, 1, 0]}
    assert pooled_roc([a, a]).auc == pytest.approx(roc_auc_score([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]))


# ----------------------------------------------------------------------------------------------
# Harrell's C
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,integer_times", [(0, True), (1, False), (2, True), (3, True)])
def test_harrell_c_equals_lifelines(seed, integer_times):
    time, event, ra, rb = survival_data(seed=seed, integer_times=integer_times)
    for r in (ra, rb, np.round(ra)):  # continuous, tied (0.1 grid), heavily tied risks
        res = harrell_c(time, event, r)
        assert res["c"] == pytest.approx(concordance_index(time, -r, event), abs=1e-12)
        assert res["reason"] is None and res["n_events"] == event.sum()


def test_harrell_c_tie_rules_small_example():
    # comparable: event at 2 vs censored at 2 (0,1); (0,2), (0,3), (0,5); (2,5), (3,5).
    # not comparable: two events at 3 (2,3); anything with the censoring at 1 (4, *)
    time = [2, 2, 3, 3, 1, 5]
    event = [1, 0, 1, 1, 0, 0]
    risk = [3, 1, 2, 2, 9, 2]
    res = harrell_c(time, event, risk)
    assert res["n_pairs"] == 6
    assert res["c"] == pytest.approx(5 / 6, abs=1e-15)  # (2,5) and (3,5) tied in risk: 1/2 each
    assert res["c"] == pytest.approx(concordance_index(time, -np.array(risk), event), abs=1e-15)


def weighted_c(time, event, risk, w):
    t, e, r = map(np.asarray, (time, event, risk))
    comp = e[:, None].astype(bool) & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & (e[None, :] == 0)))
    conc = comp * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))
    ww = w[:, None] * w[None, :]
    return (ww * conc).sum() / (ww * comp).sum()


def test_harrell_c_se_is_the_documented_projection():
    """SE² = n/(n-1) Σ_i (∂C/∂w_i)² with case weights w (numerical derivative of the weighted C)."""
    time, event, ra, _ = survival_data(n=40, seed=9)
    r = np.round(ra, 1)
    res = harrell_c(time, event, r)
    n, h = len(time), 1e-6
    grads = []
    for i in range(n):
        wp, wm = np.ones(n), np.ones(n)
        wp[i] += h
        wm[i] -= h
        grads.append((weighted_c(time, event, r, wp) - weighted_c(time, event, r, wm)) / (2 * h))
    se = math.sqrt(n / (n - 1) * np.sum(np.square(grads)))
    assert res["se"] == pytest.approx(se, rel=1e-6)


def test_harrell_c_se_vs_bootstrap():
    time, event, ra, _ = survival_data(n=300, seed=10)
    res = harrell_c(time, event, ra)
    rng = np.random.default_rng(11)
    boots = []
    for _ in range(600):
        i = rng.integers(0, len(time), len(time))
        boots.append(harrell_c(time[i], event[i], ra[i])["c"])
    se_boot = np.std(boots, ddof=1)
    assert abs(res["se"] / se_boot - 1) < 0.15, (res["se"], se_boot)
    lg = harrell_c(time, event, ra, ci_scale="logit")
    assert lg["ci_low"] < res["c"] < lg["ci_high"] and lg["se"] == res["se"]


def test_c_paired_vs_paired_bootstrap():
    time, event, ra, rb = survival_data(n=300, seed=12)
    res = c_paired(time, event, ra, rb)
    assert res["c_a"] == pytest.approx(concordance_index(time, -ra, event), abs=1e-12)
    assert res["c_b"] == pytest.approx(concordance_index(time, -rb, event), abs=1e-12)
    assert res["diff"] == pytest.approx(res["c_a"] - res["c_b"], abs=1e-15)
    assert res["ci"] == (res["ci_low"], res["ci_high"])
    assert res["p"] == pytest.approx(2 * scipy.stats.norm.sf(abs(res["diff"]) / res["se"]))
    rng = np.random.default_rng(13)
    diffs = []
    for _ in range(600):
        i = rng.integers(0, len(time), len(time))
        d = c_paired(time[i], event[i], ra[i], rb[i])
        diffs.append(d["diff"])
    se_boot = np.std(diffs, ddof=1)
    assert abs(res["se"] / se_boot - 1) < 0.15, (res["se"], se_boot)
    same = c_paired(time, event, ra, ra)
    assert same["diff"] == 0 and same["se"] == pytest.approx(0, abs=1e-14) and same["p"] == 1.0


def test_harrell_c_guards():
    none = harrell_c([1, 2, 3], [0, 0, 0], [1, 2, 3])
    assert none["c"] is None and "no events" in none["reason"]
    nopairs = harrell_c([1, 2, 5], [0, 0, 1], [1, 2, 3])  # the only event is the last time
    assert nopairs["c"] is None and "comparable" in nopairs["reason"]
    tied_events = harrell_c([2, 2], [1, 1], [1, 2])
    assert tied_events["c"] is None
    two = harrell_c([1, 2], [1, 1], [2, 1])
    assert two["c"] == 1.0 and two["se"] is None
    assert c_paired([1, 2, 3], [0, 0, 0], [1, 2, 3], [3, 2, 1])["c_a"] is None
    with pytest.raises(ValueError, match="different lengths"):
        harrell_c([1, 2, 3], [1, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        harrell_c([1, np.nan, 3], [1, 0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        harrell_c([1, -2, 3], [1, 0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="0/1"):
        harrell_c([1, 2, 3], [1, 0, 2], [1, 2, 3])


# ----------------------------------------------------------------------------------------------
# risk-group split
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,integer_times", [(0, True), (1, False), (4, True)])
def test_risk_group_split_equals_lifelines(seed, integer_times):
    time, event, ra, _ = survival_data(n=300, seed=seed, integer_times=integer_times)
    cutoff = float(np.median(ra))
    res = risk_group_split(time, event, ra, cutoff)
    high = (ra > cutoff).astype(int)
    df = pd.DataFrame({"T": time, "E": event, "high": high})
    cph = CoxPHFitter().fit(df, "T", "E")
    assert res["beta"] == pytest.approx(cph.params_["high"], abs=1e-6)
    assert res["hr"] == pytest.approx(math.exp(cph.params_["high"]), abs=1e-6)
    assert res["se"] == pytest.approx(cph.standard_errors_["high"], abs=1e-6)
    ci = np.exp(cph.confidence_intervals_.loc["high"].to_numpy())
    assert res["hr_ci"][0] == pytest.approx(ci[0], abs=1e-6) and res["hr_ci"][1] == pytest.approx(ci[1], abs=1e-6)
    lr = logrank_test(time[high == 1], time[high == 0], event[high == 1], event[high == 0])
    assert res["logrank_chi2"] == pytest.approx(lr.test_statistic, abs=1e-6)
    assert res["logrank_p"] == pytest.approx(lr.p_value, abs=1e-6)
    assert res["n_high"] == high.sum() and res["events_high"] == event[high == 1].sum()
    assert res["n_low"] + res["n_high"] == len(time) and res["events_low"] + res["events_high"] == event.sum()


def test_risk_group_split_guards():
    time = np.array([1, 2, 3, 4, 5, 6.0])
    event = np.array([1, 1, 0, 1, 0, 0])
    risk = np.array([5, 4, 3, 2, 1, 0.0])
    empty = risk_group_split(time, event, risk, cutoff=10)
    assert empty["hr"] is None and empty["logrank_p"] is None and "empty" in empty["reason"]
    none = risk_group_split(time, np.zeros(6), risk, cutoff=2.5)
    assert none["hr"] is None and "no events" in none["reason"]
    # all events in the high group while low is at risk: infinite HR, log-rank still reported
    mono = risk_group_split(time, np.array([1, 1, 1, 0, 0, 0]), risk, cutoff=2.5)
    assert mono["hr"] is None and "monotone" in mono["reason"] and 0 < mono["logrank_p"] < 1
    with pytest.raises(ValueError, match="cutoff"):
        risk_group_split(time, event, risk, cutoff=np.nan)


# ----------------------------------------------------------------------------------------------
# binned Kaplan-Meier
# ----------------------------------------------------------------------------------------------
def km_at(kmf, grid):
    sf = kmf.survival_function_.iloc[:, 0]
    ci = kmf.confidence_interval_
    idx = np.searchsorted(sf.index.to_numpy(), grid, side="right") - 1
    return sf.to_numpy()[idx], ci.iloc[:, 0].to_numpy()[idx], ci.iloc[:, 1].to_numpy()[idx]


def km_sites(seed=0, events_on_grid=True):
    rng = np.random.default_rng(seed)
    sites = []
    for n in (120, 80, 50):
        t_ev = rng.exponential(20, size=n)
        if events_on_grid:
            t_ev = np.ceil(t_ev)
        t_c = rng.uniform(0.5, 40, size=n)  # censoring times anywhere (not on the grid)
        sites.append((np.minimum(t_ev, t_c), (t_ev <= t_c).astype(int)))
    return sites


def test_pooled_km_equals_lifelines_when_events_on_grid():
    sites = km_sites()
    grid = np.arange(0, 41.0)
    tabs = [km_bins(t, e, grid) for t, e in sites]
    for tab, (t, e) in zip(tabs, sites):
        ar, ev, ce = tab["at_risk"], tab["events"], tab["censored"]
        np.testing.assert_array_equal(ar[1:], ar[:-1] - ev[:-1] - ce[:-1])
        assert ar[0] == len(t) and ev.sum() == e.sum() and ce.sum() == (1 - e).sum()
    pooled = pooled_km(tabs)
    T = np.concatenate([t for t, _ in sites])
    E = np.concatenate([e for _, e in sites])
    kmf = KaplanMeierFitter().fit(T, E)
    s, lo, hi = km_at(kmf, grid)
    np.testing.assert_allclose(pooled["survival"], s, atol=1e-12)
    ok = pooled["survival"] < 1
    np.testing.assert_allclose(pooled["ci_low"][ok], lo[ok], atol=1e-10)
    np.testing.assert_allclose(pooled["ci_high"][ok], hi[ok], atol=1e-10)
    np.testing.assert_array_equal(pooled["time"], grid)


def test_pooled_km_is_km_of_grouped_data():
    """Events off the grid: the pooled curve is the KM of the rows with event times rounded up and
    censoring times rounded down to the grid (the documented approximation)."""
    sites = km_sites(seed=1, events_on_grid=False)
    grid = np.arange(0, 45.0, 3.0)
    pooled = pooled_km([km_bins(t, e, grid) for t, e in sites])
    T = np.concatenate([t for t, _ in sites])
    E = np.concatenate([e for _, e in sites])
    g_up = grid[np.searchsorted(grid, T, side="left")]
    g_down = grid[np.searchsorted(grid, T, side="right") - 1]
    kmf = KaplanMeierFitter().fit(np.where(E == 1, g_up, g_down), E)
    s, _, _ = km_at(kmf, grid)
    np.testing.assert_allclose(pooled["survival"], s, atol=1e-12)
    exact, _, _ = km_at(KaplanMeierFitter().fit(T, E), grid)
    assert np.max(np.abs(pooled["survival"] - exact)) < 0.05  # close to the exact KM on a 3-unit grid


def test_km_bins_guards():
    with pytest.raises(ValueError, match="strictly increasing"):
        km_bins([1, 2], [1, 0], [0, 2, 1])
    with pytest.raises(ValueError, match="different lengths"):
        km_bins([1, 2], [1], [0, 1, 2])
    a = km_bins([1, 2], [1, 0], [0, 1, 2])
    b = km_bins([1, 2], [1, 0], [0, 1, 3])
    with pytest.raises(ValueError, match="different grids"):
        pooled_km([a, b])


# ----------------------------------------------------------------------------------------------
# meta-analysis
# ----------------------------------------------------------------------------------------------
def manual_dl(y, s):
    y, v = np.asarray(y, float), np.asarray(s, float) ** 2
    w = 1 / v
    fe = (w * y).sum() / w.sum()
    q = (w * (y - fe) ** 2).sum()
    k = len(y)
    tau2 = max(0.0, (q - (k - 1)) / (w.sum() - (w ** 2).sum() / w.sum()))
    ws = 1 / (v + tau2)
    re = (ws * y).sum() / ws.sum()
    return dict(fe=fe, fe_se=w.sum() ** -0.5, q=q, tau2=tau2, re=re, se=ws.sum() ** -0.5,
                i2=max(0.0, (q - (k - 1)) / q))


def test_dersimonian_laird_vs_manual():
    y = [0.8, 0.55, 1.1, 0.2, 0.7]
    s = [0.2, 0.15, 0.3, 0.25, 0.1]
    res = dersimonian_laird(y, s)
    ref = manual_dl(y, s)
    assert res["pooled"] == pytest.approx(ref["re"], abs=1e-14)
    assert res["se"] == pytest.approx(ref["se"], abs=1e-14)
    assert res["tau2"] == pytest.approx(ref["tau2"], abs=1e-14) and res["tau2"] > 0
    assert res["q"] == pytest.approx(ref["q"], abs=1e-12) and res["i2"] == pytest.approx(ref["i2"], abs=1e-14)
    assert res["fe_pooled"] == pytest.approx(ref["fe"], abs=1e-14) and res["fe_se"] == pytest.approx(ref["fe_se"])
    assert res["q_p"] == pytest.approx(scipy.stats.chi2.sf(ref["q"], 4))
    z = scipy.stats.norm.isf(0.025)
    assert res["ci_low"] == pytest.approx(ref["re"] - z * ref["se"])
    assert res["ci_high"] == pytest.approx(ref["re"] + z * ref["se"])
    half = scipy.stats.t.isf(0.025, 3) * math.sqrt(ref["tau2"] + ref["se"] ** 2)
    assert res["pi_low"] == pytest.approx(ref["re"] - half) and res["pi_high"] == pytest.approx(ref["re"] + half)
    assert res["weights"].sum() == pytest.approx(1) and res["k"] == 5


def test_dersimonian_laird_bcg_published():
    """BCG vaccine trials (Colditz et al. 1994), log risk ratios; R metafor ``rma(yi, vi, method="DL")``:
    tau² = 0.3088, estimate −0.7141, SE 0.1787, CI (−1.0644, −0.3638), Q(12) = 152.2330, I² = 92.12%."""
    tpos = np.array([4, 6, 3, 62, 33, 180, 8, 505, 29, 17, 186, 5, 27])
    tneg = np.array([119, 300, 228, 13536, 5036, 1361, 2537, 87886, 7470, 1699, 50448, 2493, 16886])
    cpos = np.array([11, 29, 11, 248, 47, 372, 10, 499, 45, 65, 141, 3, 29])
    cneg = np.array([128, 274, 209, 12619, 5761, 1079, 619, 87892, 7232, 1600, 27197, 2338, 17825])
    yi = np.log(tpos / (tpos + tneg)) - np.log(cpos / (cpos + cneg))
    vi = 1 / tpos - 1 / (tpos + tneg) + 1 / cpos - 1 / (cpos + cneg)
    res = dersimonian_laird(yi, np.sqrt(vi))
    assert round(res["tau2"], 4) == 0.3088
    assert round(res["pooled"], 4) == -0.7141 and round(res["se"], 4) == 0.1787
    assert round(res["ci_low"], 4) == -1.0644 and round(res["ci_high"], 4) == -0.3638
    assert round(res["q"], 4) == 152.2330 and round(100 * res["i2"], 2) == 92.12


def test_dersimonian_laird_statsmodels_if_installed():
    meta = pytest.importorskip("statsmodels.stats.meta_analysis")
    y = np.array([0.8, 0.55, 1.1, 0.2, 0.7])
    s = np.array([0.2, 0.15, 0.3, 0.25, 0.1])
    res = dersimonian_laird(y, s)
    sm = meta.combine_effects(y, s ** 2, method_re="dl")
    assert res["pooled"] == pytest.approx(sm.mean_effect_re, abs=1e-12)
    assert res["se"] == pytest.approx(sm.sd_eff_w_re, abs=1e-12)
    assert res["fe_pooled"] == pytest.approx(sm.mean_effect_fe, abs=1e-12)
    assert res["fe_se"] == pytest.approx(sm.sd_eff_w_fe, abs=1e-12)
    assert res["tau2"] == pytest.approx(sm.tau2, abs=1e-12)  # Q > k-1 here: no truncation difference
    assert res["q"] == pytest.approx(sm.q, abs=1e-12) and res["i2"] == pytest.approx(sm.i2, abs=1e-12)


def test_dersimonian_laird_homogeneous_single_and_guards():
    hom = dersimonian_laird([0.5, 0.51, 0.49], [0.2, 0.2, 0.2])
    assert hom["tau2"] == 0 and hom["i2"] == 0 and hom["pooled"] == pytest.approx(hom["fe_pooled"])
    one = dersimonian_laird([0.3], [0.1])
    assert one["pooled"] == 0.3 and one["tau2"] is None and one["i2"] is None and one["reason"]
    two = dersimonian_laird([0.3, 0.5], [0.1, 0.1])
    assert two["pi_low"] is None and two["tau2"] is not None
    with pytest.raises(ValueError, match="> 0"):
        dersimonian_laird([0.3, 0.4], [0.1, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        dersimonian_laird([0.3, None], [0.1, 0.1])
    with pytest.raises(ValueError, match="different lengths"):
        dersimonian_laird([0.3, 0.4], [0.1])
    with pytest.raises(ValueError, match="no estimates"):
        dersimonian_laird([], [])


def test_pool_proportion_like_logit_scale():
    aucs = [0.78, 0.71, 0.83, None, 0.66]
    ses = [0.04, 0.05, 0.06, None, 0.05]
    res = pool_proportion_like(aucs, ses)
    th = np.array([0.78, 0.71, 0.83, 0.66])
    sd = np.array([0.04, 0.05, 0.06, 0.05])
    ref = manual_dl(scipy.special.logit(th), sd / (th * (1 - th)))
    assert res["pooled"] == pytest.approx(scipy.special.expit(ref["re"]), abs=1e-14)
    z = scipy.stats.norm.isf(0.025)
    assert res["ci_low"] == pytest.approx(scipy.special.expit(ref["re"] - z * ref["se"]), abs=1e-14)
    assert res["ci_high"] == pytest.approx(scipy.special.expit(ref["re"] + z * ref["se"]), abs=1e-14)
    assert res["se"] == pytest.approx(ref["se"] * res["pooled"] * (1 - res["pooled"]))
    assert res["tau2"] == pytest.approx(ref["tau2"], abs=1e-14)
    assert res["included"] == [0, 1, 2, 4] and res["excluded"][0][0] == 3 and res["k"] == 4
    assert res["ci_low"] < res["pooled"] < res["ci_high"]
    # works directly on metric outputs of the site functions
    sites = three_sites_binary(seed=2)
    per_site = [auc_delong(y, s) for y, s in sites]
    pooled = pool_proportion_like([r["auc"] for r in per_site], [r["se"] for r in per_site])
    assert 0.5 < pooled["pooled"] < 1 and pooled["k"] == 3
    with pytest.raises(ValueError, match="exclude_degenerate"):
        pool_proportion_like([0.8, 1.0], [0.05, 0.0])
    deg = pool_proportion_like([0.8, 1.0, 0.7], [0.05, 0.0, 0.04], exclude_degenerate=True)
    assert deg["included"] == [0, 2] and deg["excluded"][0][0] == 1
    with pytest.raises(ValueError, match="no site"):
        pool_proportion_like([None], [None])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pool_proportion_like([1.2], [0.1])


def test_end_to_end_multicenter_survival():
    """Each site computes C and its SE locally; the coordinator pools them; pooled KM from counts only."""
    rng = np.random.default_rng(20)
    per_site, tabs = [], []
    grid = np.arange(0, 31.0)
    for n in (150, 100, 70):
        time, event, ra, _ = survival_data(n=n, seed=int(rng.integers(1 << 30)))
        per_site.append(harrell_c(time, event, ra))
        tabs.append(km_bins(time, event, grid))
    pooled = pool_proportion_like([r["c"] for r in per_site], [r["se"] for r in per_site])
    assert min(r["c"] for r in per_site) <= pooled["pooled"] <= max(r["c"] for r in per_site)
    km = pooled_km(tabs)
    assert (np.diff(km["survival"]) <= 0).all() and 0 <= km["survival"][-1] <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pooled_km(tabs)


def test_pooled_roc_interpolated_equals_exact_with_shared_edges_and_is_close_after_merging():
    from sklearn.metrics import roc_auc_score

    from fedrad.common.metrics import pooled_roc, pooled_roc_interpolated, roc_bins, suppress_small_cells

    rng = np.random.default_rng(5)
    edges = np.linspace(0, 1, 21)
    tables, merged, ys, ps = [], [], [], []
    for n in (80, 60, 120, 50):
        y = rng.integers(0, 2, n)
        p = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
        t = roc_bins(y, p, edges)
        tables.append(t)
        merged.append(suppress_small_cells(t, 10))
        ys.append(y)
        ps.append(p)
    exact = pooled_roc(tables)
    approx = pooled_roc_interpolated(tables)
    assert abs(exact.auc - approx.auc) < 1e-12
    after = pooled_roc_interpolated(merged)
    truth = roc_auc_score(np.concatenate(ys), np.concatenate(ps))
    assert len(after.fpr) > 5 and abs(after.auc - truth) < 0.03, (after.auc, truth)


# ----------------------------------------------------------------------------------------------
# small-cell rule for Kaplan-Meier tables
# ----------------------------------------------------------------------------------------------
def test_merge_km_bins_releases_no_small_count_and_equals_km_of_grouped_rows():
    from lifelines import KaplanMeierFitter

    from fedrad.common.metrics import merge_km_bins

    rng = np.random.default_rng(5)
    t = rng.exponential(20, 300).round(1) + 0.1
    e = (rng.random(300) < 0.6).astype(int)
    grid = np.arange(0, 61, 3.0)
    raw = km_bins(t, e, grid)
    assert (np.asarray(raw["events"])[(raw["events"] > 0)] < 10).any()  # the raw table has small cells
    merged = merge_km_bins(raw, 10)
    for key in ("events", "censored"):
        c = np.asarray(merged[key])
        assert ((c == 0) | (c >= 10)).all()
        assert c.sum() == np.asarray(raw[key]).sum()
    assert merged["at_risk"][0] == raw["at_risk"][0] and len(merged["merged"]) >= 4
    # independent reference: date each row as the merged blocks do, then lifelines' Kaplan-Meier
    ends = merged["merged"]
    starts = [0] + [b + 1 for b in ends[:-1]]
    ev_idx = np.searchsorted(grid, t, side="left")          # event interval (g_{j-1}, g_j]
    ce_idx = np.searchsorted(grid, t, side="right") - 1     # censoring interval [g_j, g_{j+1})
    late = (e == 1) & (ev_idx >= len(grid))  # events after the last grid point: still at risk there
    block_end = {j: b for a, b in zip(starts, ends) for j in range(a, b + 1)}
    block_start = {j: a for a, b in zip(starts, ends) for j in range(a, b + 1)}
    tt = np.where(e == 1, [grid[block_end[min(j, len(grid) - 1)]] for j in ev_idx],
                  [grid[block_start[max(j, 0)]] for j in ce_idx])
    tt, ee = np.where(late, grid[-1] + 1, tt), np.where(late, 0, e)
    assert late.any() and (ce_idx >= 0).all()
    kmf = KaplanMeierFitter().fit(tt, ee)
    ours = pooled_km([merged])
    want = kmf.survival_function_at_times(grid[ends]).to_numpy()
    assert np.allclose(np.asarray(ours["survival"])[ends], want, atol=1e-12)
    # sites' merged tables still add up on the common grid
    other = merge_km_bins(km_bins(t[:50] * 1.3, e[:50], grid), 10)
    assert pooled_km([merged, other])["at_risk"][0] == 300 + other["at_risk"][0]


def test_merge_km_bins_withholds_tables_with_too_few_events():
    from fedrad.common.metrics import merge_km_bins

    t, e = np.arange(1, 31, dtype=float), np.r_[np.ones(6), np.zeros(24)].astype(int)
    assert merge_km_bins(km_bins(t, e, np.arange(0, 31, 5.0)), 10) is None     # 6 events < k
    same = merge_km_bins(km_bins(t, e, np.arange(0, 31, 5.0)), 1)                 # k = 1: nothing to merge
    raw = km_bins(t, e, np.arange(0, 31, 5.0))
    assert all(np.array_equal(same[k], raw[k]) for k in ("events", "censored", "at_risk"))


def test_pooled_net_benefit_equals_the_pooled_rows_at_every_threshold():
    """Decision curves from the sites' released ROC bins: with every bin released the pooled net benefit (and
    treat-all) equals the one computed on the pooled rows at each threshold, exactly; with bins merged until each
    holds k patients it is exact at the thresholds every site kept as an edge and interpolated within merged
    bins elsewhere."""
    from fedrad.common.endpoints import ROC_EDGES
    from fedrad.common.metrics import (DCA_THRESHOLDS, decision_counts, pooled_decision_curve, roc_bins,
                                       suppress_small_cells)

    rng = np.random.default_rng(11)
    sites = []
    for n in (120, 90, 150):
        lp = rng.normal(-0.3, 1.2, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
        sites.append((y, 1 / (1 + np.exp(-(lp + rng.normal(0, 0.5, n))))))

    def counts(k):  # k = None: every bin as it is (no merging)
        tables = [roc_bins(y, p, ROC_EDGES) for y, p in sites]
        return [decision_counts(t if k is None else suppress_small_cells(t, k)) for t in tables]

    pooled = pooled_decision_curve(counts(None))
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    n = len(y_all)
    for j, t in enumerate(DCA_THRESHOLDS):
        treat = p_all >= t
        want = (treat & (y_all == 1)).sum() / n - (treat & (y_all == 0)).sum() / n * t / (1 - t)
        assert pooled["net_benefit"][j] == pytest.approx(want, abs=1e-15) and pooled["exact"][j]
        prev = y_all.mean()
        assert pooled["treat_all"][j] == pytest.approx(prev - (1 - prev) * t / (1 - t), abs=1e-15)
    small = counts(10)
    mixed = pooled_decision_curve(small)
    assert mixed["sites"] == 3
    n_exact = 0
    for j, t in enumerate(DCA_THRESHOLDS):  # exact wherever every site kept the threshold as a bin edge
        if mixed["exact"][j]:
            n_exact += 1
            treat = p_all >= t
            want = (treat & (y_all == 1)).sum() / n - (treat & (y_all == 0)).sum() / n * t / (1 - t)
            assert mixed["net_benefit"][j] == pytest.approx(want, abs=1e-15)
        else:  # interpolated inside a merged bin: close to the rows' value, not equal
            treat = p_all >= t
            want = (treat & (y_all == 1)).sum() / n - (treat & (y_all == 0)).sum() / n * t / (1 - t)
            assert abs(mixed["net_benefit"][j] - want) < 0.05
    assert 1 <= n_exact < len(DCA_THRESHOLDS)
