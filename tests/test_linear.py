"""Continuous endpoint: federated penalized linear regression equals scikit-learn, the site-stratified linear
score test equals statsmodels' OLS with site fixed effects, and the validation metrics and their pooling equal
scipy / scikit-learn / statsmodels computed on the rows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.linear_model import ElasticNet, Lasso, LinearRegression, Ridge
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.preprocessing import StandardScaler

from fedrad.common import metrics
from fedrad.common.linear import LinearModel, LinearServer, site_linear
from fedrad.common.selection import (combine_linear_score, linear_score_request, penalty_path, pooled_linear_score,
                                     site_linear_score, standardized_scores)

FEATS = [f"x{i}" for i in range(5)]


def _sites(seed=0, sizes=(60, 45, 80)):
    rng = np.random.default_rng(seed)
    out = {}
    for k, n in enumerate(sizes):
        x = rng.normal(size=(n, 5)) * (1 + 0.3 * k) + 2.0 * k
        x[:, 4] = x[:, 3] * 0.7 + rng.normal(scale=0.5, size=n)  # correlated pair
        y = 3.0 + 1.5 * x[:, 0] - 0.8 * x[:, 1] + 0.2 * x[:, 3] + k + rng.normal(scale=1.0, size=n)
        out[f"s{k}"] = pd.DataFrame(x, columns=FEATS).assign(y=y, site=f"s{k}")
    return out


def _federated(sites, penalty, alpha, l1_ratio=None):
    server = LinearServer(FEATS, penalty=penalty, alpha=alpha, l1_ratio=l1_ratio)
    request, rounds = server.start(), 0
    while request is not None:
        replies = {}
        for name, d in sites.items():
            cols = request["features"]
            replies[name] = site_linear((d[cols].to_numpy(), d["y"].to_numpy()), request, site=name)
        request = server.receive(replies)
        rounds += 1
    return server.model(), rounds


@pytest.mark.parametrize("penalty,alpha,l1_ratio", [(None, 0.0, None), ("l2", 0.05, None), ("l1", 0.02, None),
                                                    ("elasticnet", 0.03, 0.5), ("l1", 5.0, None)])
def test_federated_linear_fit_equals_scikit_learn(penalty, alpha, l1_ratio):
    sites = _sites()
    pooled = pd.concat(sites.values(), ignore_index=True)
    model, rounds = _federated(sites, penalty, alpha, l1_ratio)
    assert rounds == 2  # the exact solve, then the check round at the solution
    scaler = StandardScaler().fit(pooled[FEATS])
    z = scaler.transform(pooled[FEATS])
    n = len(pooled)
    ref = {None: LinearRegression(), "l2": Ridge(alpha=n * alpha, tol=1e-12),
           "l1": Lasso(alpha=alpha, tol=1e-14, max_iter=1_000_000),
           "elasticnet": ElasticNet(alpha=alpha, l1_ratio=l1_ratio or 0.5, tol=1e-14, max_iter=1_000_000)}[penalty]
    ref.fit(z, pooled["y"])
    np.testing.assert_allclose(model.coef_std_, ref.coef_, atol=1e-8)
    assert abs(model.intercept_std_ - ref.intercept_) < 1e-8
    np.testing.assert_allclose(model.decision_function(pooled), ref.predict(z), atol=1e-7)
    if penalty == "l1" and alpha == 5.0:
        assert not np.any(model.coef_std_)  # beyond alpha_max every coefficient is zero
    # the pooled twin (LinearModel.fit on the pooled rows) is the same estimator
    twin = LinearModel(penalty=penalty, alpha=alpha, l1_ratio=l1_ratio).fit(pooled[FEATS], pooled["y"])
    np.testing.assert_allclose(twin.coef_, model.coef_, rtol=1e-9, atol=1e-12)
    back = LinearModel.from_dict(model.to_dict())
    np.testing.assert_array_equal(back.decision_function(pooled), model.decision_function(pooled))


def test_ols_covariance_equals_statsmodels():
    import statsmodels.api as sm

    sites = _sites(seed=1)
    pooled = pd.concat(sites.values(), ignore_index=True)
    model, _ = _federated(sites, None, 0.0)
    z = StandardScaler().fit_transform(pooled[FEATS])
    ols = sm.OLS(pooled["y"].to_numpy(), sm.add_constant(z)).fit()
    np.testing.assert_allclose(model.covariance_std(), ols.cov_params(), rtol=1e-8, atol=1e-14)


def test_alpha_max_path_start_zeroes_every_lasso_coefficient():
    sites = _sites(seed=2)
    replies = [site_linear_score(d, linear_score_request(FEATS, "y"), site=s) for s, d in sites.items()]
    z, n = standardized_scores(replies)
    path = penalty_path(max(z.values()), n, "linear", "l1", 1.0, size=6, decades=2)
    assert path == sorted(path, reverse=True)
    at_max, _ = _federated(sites, "l1", path[0] * (1 + 1e-9))
    assert not np.any(at_max.coef_std_)
    below, _ = _federated(sites, "l1", path[0] * 0.98)
    assert np.count_nonzero(below.coef_std_) == 1


@pytest.mark.parametrize("stratified", [True, False])
def test_linear_score_test_equals_statsmodels_lm_test(stratified):
    """The Rao score (LM) test of adding one feature to the null model (site intercepts, or one intercept):
    z² = N·R² of the null residuals on the feature, as statsmodels' compare_lm_test."""
    import statsmodels.api as sm

    sites = _sites(seed=3)
    pooled = pd.concat(sites.values(), ignore_index=True)
    pooled["const_in_site"] = pooled["site"].map({"s0": 1.0, "s1": 2.0, "s2": 3.0})
    feats = FEATS + ["const_in_site"]
    req = linear_score_request(feats, "y")
    fed = combine_linear_score([site_linear_score(d.assign(const_in_site=float(i + 1)), req, site=s)
                                for i, (s, d) in enumerate(sites.items())], stratified=stratified)
    twin = pooled_linear_score(pooled, req, strata="site" if stratified else None)
    np.testing.assert_allclose(fed.table["chi2"], twin.table["chi2"], rtol=1e-10)
    nuisance = (pd.get_dummies(pooled["site"], dtype=float).to_numpy() if stratified
                else np.ones((len(pooled), 1)))
    null = sm.OLS(pooled["y"].to_numpy(), nuisance).fit()
    for f in FEATS:
        full = sm.OLS(pooled["y"].to_numpy(), np.column_stack([nuisance, pooled[f].to_numpy()])).fit()
        lm, p, _ = full.compare_lm_test(null)
        assert abs(fed.table.loc[f, "chi2"] - lm) < 1e-8 * max(1.0, lm)
        assert abs(fed.table.loc[f, "p_value"] - p) < 1e-10
    if stratified:  # constant within every site: no information once the sites' intercepts are in
        assert "const_in_site" in fed.uninformative and fed.table.loc["const_in_site", "p_value"] == 1.0


def test_regression_metrics_equal_scipy_and_sklearn():
    rng = np.random.default_rng(4)
    y = rng.normal(size=80)
    pred = 0.6 * y + rng.normal(scale=0.7, size=80) + 0.3
    m = metrics.regression_metrics(y, pred)
    assert abs(m["r2"] - r2_score(y, pred)) < 1e-12
    assert abs(m["rmse"] - np.sqrt(mean_squared_error(y, pred))) < 1e-12
    assert abs(m["mae"] - mean_absolute_error(y, pred)) < 1e-12
    r = scipy.stats.pearsonr(y, pred)
    ci = r.confidence_interval(0.95)  # Fisher z
    assert abs(m["pearson"]["r"] - r.statistic) < 1e-12
    assert abs(m["pearson"]["ci_low"] - ci.low) < 1e-10 and abs(m["pearson"]["ci_high"] - ci.high) < 1e-10
    assert abs(m["spearman"]["rho"] - scipy.stats.spearmanr(y, pred).statistic) < 1e-12
    fit = scipy.stats.linregress(pred, y)
    assert abs(m["calibration"]["slope"] - fit.slope) < 1e-12 and abs(m["calibration"]["intercept"] - fit.intercept) < 1e-12
    assert abs(m["calibration"]["se_slope"] - fit.stderr) < 1e-12
    assert abs(m["calibration"]["se_intercept"] - fit.intercept_stderr) < 1e-12
    paired = metrics.squared_error_paired(y, pred, np.zeros(80))
    d = y ** 2 - (y - pred) ** 2
    assert abs(paired["diff"] - d.mean()) < 1e-12
    assert abs(paired["se"] - scipy.stats.sem(d)) < 1e-12


def test_pooled_correlation_equals_statsmodels_on_fisher_z():
    from statsmodels.stats.meta_analysis import combine_effects

    rs, ns = [0.42, 0.55, 0.18, 0.61], [50, 80, 35, 120]
    pooled = metrics.pool_correlations(rs, ns)
    z, v = np.arctanh(rs), 1.0 / (np.array(ns) - 3)
    ref = combine_effects(z, v, method_re="dl")
    assert abs(pooled["pooled"] - np.tanh(ref.mean_effect_re)) < 1e-12
    frame = ref.summary_frame(alpha=0.05)
    lo, hi = frame.loc["random effect", "ci_low"], frame.loc["random effect", "ci_upp"]
    assert abs(pooled["ci_low"] - np.tanh(lo)) < 1e-9 and abs(pooled["ci_high"] - np.tanh(hi)) < 1e-9


def test_calibration_groups_release_no_group_under_k():
    rng = np.random.default_rng(5)
    y, pred = rng.normal(size=57), rng.normal(size=57)
    g = metrics.calibration_groups(y, pred, 10)
    assert len(g["n"]) == 5 and min(g["n"]) >= 10 and sum(g["n"]) == 57
    order = np.argsort(pred, kind="stable")
    first = order[: g["n"][0]]
    assert abs(g["mean_obs"][0] - y[first].mean()) < 1e-12
    assert metrics.calibration_groups(y[:9], pred[:9], 10)["n"] is None


def test_a_continuous_outcome_that_is_an_indicator_in_disguise_is_refused():
    """All patients but a few share one outcome value: X'y would describe those few patients, so the site does
    not take the column as a continuous outcome (k = 10)."""
    from fedrad.common.endpoints import Continuous

    ep = Continuous({"outcome": "y"})
    y = np.zeros(40)
    y[:3] = [4.0, 5.0, 6.0]
    with pytest.raises(ValueError, match="site s1: outcome column 'y' differs from its most common value"):
        ep.check_values(pd.DataFrame({"y": y}), "s1", 10)
    y[:12] = np.arange(1.0, 13.0)
    ep.check_values(pd.DataFrame({"y": y}), "s1", 10)
    with pytest.raises(ValueError, match="is constant"):
        ep.check_values(pd.DataFrame({"y": np.ones(20)}), "s1", 10)
