"""Tests for fedrad.common.glm: federated standardization == StandardScaler, federated == pooled ==
scikit-learn (1.9 objective ``C·Σ logloss + penalty``, intercept unpenalized) for L2 / L1 / elastic net /
no penalty, round-trip budgets, the result object, every guard, and the UCI heart-disease hospitals.

References: ``LogisticRegression(solver="newton-cholesky", tol=1e-12)`` for L2 and no penalty (an exact
Newton solver), ``solver="saga", tol=1e-12`` for L1 / elastic net (liblinear would also penalize the
intercept), always on ``StandardScaler``-transformed pooled data; the L1 fits are also checked against
their KKT conditions (the truth, independent of any solver).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fedrad.common.glm import (
    CollinearityError,
    GLMConvergenceWarning,
    GLMError,
    LogisticModel,
    LogisticServer,
    MissingValueError,
    OneClassError,
    SeparationError,
    combine_logistic_stats,
    fit_federated,
    fit_pooled,
    make_stats_request,
    site_logistic,
    site_logistic_stats,
)

from .conftest import shared_path

TOL = 1e-6          # required agreement with scikit-learn (coefficients, both scales)
EXACT = 1e-10       # federated vs pooled (same math, different summation order)
L2_BUDGET = 8       # round trips
L1_BUDGET = 15
SIZES = {"A": 250, "B": 120, "C": 60, "D": 400}
FEATURES = ["age", "volume", "tiny", "f3", "f4", "f5"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_sites(seed: int = 0, sizes=SIZES) -> dict:
    """Sites of different size, case mix (intercept shift) and feature distribution (mean shift).

    ``volume`` has a mean of 1e6 (stability of the centred moments), ``tiny`` an SD of 1e-2
    (original-scale coefficients 100x the standardized ones)."""
    rng = np.random.default_rng(seed)
    beta = np.array([0.9, -0.7, 0.5, 0.0, 0.3, -0.15])
    mix = np.eye(6) + 0.15 * rng.normal(size=(6, 6))
    out = {}
    for k, (site, n) in enumerate(sizes.items()):
        z = rng.normal(size=(n, 6)) @ mix + 0.25 * k
        eta = -0.8 + 0.6 * k + z @ beta
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(int)
        x = z.copy()
        x[:, 0] = 60 + 10 * z[:, 0]
        x[:, 1] = 1e6 + 3e3 * z[:, 1]
        x[:, 2] = 1e-2 * z[:, 2]
        out[site] = (pd.DataFrame(x, columns=FEATURES), pd.Series(y, name="event"))
    return out


def pool(site_data: dict):
    X = pd.concat([pd.DataFrame(v[0]) for v in site_data.values()], ignore_index=True)
    y = np.concatenate([np.asarray(v[1]) for v in site_data.values()])
    return X, y


def sklearn_fit(X, y, *, C: float, l1_ratio: float):
    """Reference on StandardScaler-transformed pooled data -> (scaler, coef (std), intercept (std))."""
    scaler = StandardScaler().fit(X)
    z = scaler.transform(X)
    solver = "newton-cholesky" if l1_ratio == 0 else "saga"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=C, l1_ratio=l1_ratio, solver=solver, tol=1e-12, max_iter=100_000,
                                 random_state=0).fit(z, y)
    return scaler, ref.coef_.ravel(), float(ref.intercept_[0])


def compare(model: LogisticModel, X, y, *, C: float, l1_ratio: float) -> dict:
    """Max abs differences to scikit-learn on the standardized and original scales."""
    scaler, coef, icpt = sklearn_fit(X, y, C=C, l1_ratio=l1_ratio)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    coef_orig = coef / scale
    icpt_orig = icpt - np.sum(coef * scaler.mean_ / scale)
    return {"std": max(np.abs(model.coef_std_ - coef).max(), abs(model.intercept_std_ - icpt)),
            "orig": max(np.abs(model.coef_ - coef_orig).max(), abs(model.intercept_ - icpt_orig)),
            "ref_coef": coef}


def kkt_violation(model: LogisticModel, X, y, *, C: float, l1_ratio: float) -> float:
    """Max violation of the optimality conditions of C·Σℓ + (1-ρ)/2‖w‖² + ρ‖w‖₁ (standardized space)."""
    z = StandardScaler().fit_transform(X)
    w, b = model.coef_std_, model.intercept_std_
    p = 1.0 / (1.0 + np.exp(-(b + z @ w)))
    g0 = C * np.sum(p - y)
    g = C * z.T @ (p - y) + (1 - l1_ratio) * w
    nz = w != 0
    v = np.abs(g0)
    if nz.any():
        v = max(v, np.abs(g[nz] + l1_ratio * np.sign(w[nz])).max())
    if (~nz).any():
        v = max(v, (np.abs(g[~nz]) - l1_ratio).max())
    return float(v)


def federated_and_pooled(site_data, **kw):
    fed = fit_federated(site_data, **kw)
    X, y = pool(site_data)
    pooled = fit_pooled(X, y, **kw)
    return fed, pooled, X, y


@pytest.fixture(scope="module")
def sites():
    return make_sites()


# ------------------------------------------------------------------------------------------------
# 1. federated standardization
# ------------------------------------------------------------------------------------------------
def test_standardization_equals_standard_scaler(sites):
    request = make_stats_request(FEATURES)
    replies = [site_logistic_stats(rows, request, site=s) for s, rows in sites.items()]
    st = combine_logistic_stats(replies, FEATURES)
    X, y = pool(sites)
    scaler = StandardScaler().fit(X)
    np.testing.assert_allclose(st["mean"], scaler.mean_, rtol=1e-14)
    np.testing.assert_allclose(st["scale"], scaler.scale_, rtol=1e-11)       # ddof=0
    np.testing.assert_allclose(st["scale"], X.to_numpy().std(axis=0), rtol=1e-11)
    # the global centred cross-product (Chan et al. parallel combination) and counts
    xc = X.to_numpy() - X.to_numpy().mean(axis=0)
    np.testing.assert_allclose(st["cross"], xc.T @ xc, rtol=1e-10, atol=1e-9 * np.abs(xc.T @ xc).max())
    assert st["n"] == len(y) and st["n_pos"] == int(y.sum())
    assert st["n_per_site"] == {s: n for s, n in SIZES.items()}
    # round 1 already gives Σℓ, gradient and Hessian at β0 = (logit ȳ, 0): check against the rows
    z = scaler.transform(X)
    ybar = y.mean()
    a = np.column_stack([np.ones(len(y)), z])
    assert st["beta0"][0] == pytest.approx(np.log(ybar / (1 - ybar)), abs=1e-14)
    np.testing.assert_allclose(st["grad"], a.T @ (ybar - y), atol=1e-9)
    np.testing.assert_allclose(st["hess"], ybar * (1 - ybar) * a.T @ a, rtol=1e-10, atol=1e-9)
    assert st["loss"] == pytest.approx(-np.sum(y * np.log(ybar) + (1 - y) * np.log(1 - ybar)), rel=1e-14)


def test_standardization_is_stable_for_large_offsets():
    """Σx² − n x̄² would lose every digit here; the centred sums keep them."""
    rng = np.random.default_rng(3)
    parts = {f"s{k}": (pd.DataFrame({"big": 1e9 + rng.normal(size=n) + k, "x": rng.normal(size=n)}),
                       rng.integers(0, 2, n)) for k, n in enumerate([30, 70, 55])}
    request = make_stats_request(["big", "x"])
    st = combine_logistic_stats([site_logistic_stats(r, request, site=s) for s, r in parts.items()], ["big", "x"])
    X, _ = pool(parts)
    np.testing.assert_allclose(st["scale"], StandardScaler().fit(X).scale_, rtol=1e-8)


# ------------------------------------------------------------------------------------------------
# 2. federated == pooled == scikit-learn
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [0.01, 0.1, 1.0, 100.0])
def test_l2_matches_sklearn(sites, C):
    fed, pooled, X, y = federated_and_pooled(sites, penalty="l2", C=C)
    assert fed.converged_ and pooled.converged_
    assert fed.n_rounds_ <= L2_BUDGET, fed.history_
    assert fed.n_rounds_ == pooled.n_rounds_
    np.testing.assert_allclose(fed.coef_std_, pooled.coef_std_, atol=EXACT)
    np.testing.assert_allclose(fed.coef_, pooled.coef_, atol=EXACT * 100)
    d = compare(fed, X, y, C=C, l1_ratio=0.0)
    assert d["std"] < TOL and d["orig"] < TOL, d


def test_no_penalty_matches_sklearn_and_textbook_se(sites):
    fed, pooled, X, y = federated_and_pooled(sites, penalty=None)
    assert fed.n_rounds_ <= L2_BUDGET
    np.testing.assert_allclose(fed.coef_std_, pooled.coef_std_, atol=EXACT)
    d = compare(fed, X, y, C=np.inf, l1_ratio=0.0)
    assert d["std"] < TOL and d["orig"] < TOL, d
    # C=np.inf is the scikit-learn >= 1.8 spelling of "no penalty"
    same = fit_federated(sites, penalty="l2", C=np.inf)
    assert same.to_dict()["params"]["penalty"] is None and same.sklearn_params()["C"] == np.inf
    np.testing.assert_allclose(same.coef_, fed.coef_, atol=1e-12)
    # MLE standard errors: inverse Fisher information on the original scale, from the rows.  The
    # model's Hessian is from the last evaluated point, one (tiny, <= 1e-3) Newton step before the
    # returned coefficients, hence agreement to O(step) rather than to rounding.
    x1 = np.column_stack([np.ones(len(y)), X.to_numpy()])
    p = 1 / (1 + np.exp(-(x1 @ np.concatenate([[fed.intercept_], fed.coef_]))))
    cov = np.linalg.inv((x1 * (p * (1 - p))[:, None]).T @ x1)
    summ = fed.summary
    np.testing.assert_allclose(summ["se(coef)"].to_numpy(), np.sqrt(np.diag(cov)), rtol=1e-4)
    np.testing.assert_allclose(summ["z"], summ["coef"] / summ["se(coef)"])
    assert ((summ["p"] > 0) & (summ["p"] <= 1)).all()
    assert (summ["coef lower 95%"] < summ["coef"]).all() and (summ["coef"] < summ["coef upper 95%"]).all()


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_l1_matches_sklearn(sites, C):
    fed, pooled, X, y = federated_and_pooled(sites, penalty="l1", C=C)
    assert fed.converged_ and fed.n_rounds_ <= L1_BUDGET, fed.history_
    np.testing.assert_allclose(fed.coef_std_, pooled.coef_std_, atol=EXACT)
    assert kkt_violation(fed, X, y, C=C, l1_ratio=1.0) < 1e-6
    d = compare(fed, X, y, C=C, l1_ratio=1.0)
    assert d["std"] < TOL and d["orig"] < TOL, d
    # exact zeros, same support as the reference
    assert set(np.flatnonzero(fed.coef_std_)) == set(np.flatnonzero(np.abs(d["ref_coef"]) > 1e-9))
    if C == 0.05:
        assert (fed.coef_std_ == 0).any()


def test_elasticnet_matches_sklearn(sites):
    C, rho = 0.1, 0.5
    fed, pooled, X, y = federated_and_pooled(sites, penalty="elasticnet", C=C, l1_ratio=rho)
    assert fed.converged_ and fed.n_rounds_ <= L1_BUDGET
    np.testing.assert_allclose(fed.coef_std_, pooled.coef_std_, atol=EXACT)
    assert kkt_violation(fed, X, y, C=C, l1_ratio=rho) < 1e-6
    d = compare(fed, X, y, C=C, l1_ratio=rho)
    assert d["std"] < TOL and d["orig"] < TOL, d


def test_strong_l1_stops_after_one_round(sites):
    """So strong that every coefficient is 0: the round-1 sums already prove it."""
    fed = fit_federated(sites, penalty="l1", C=1e-4)
    assert fed.n_rounds_ == 1 and (fed.coef_std_ == 0).all()
    X, y = pool(sites)
    assert fed.intercept_ == pytest.approx(np.log(y.mean() / (1 - y.mean())), abs=1e-12)


def test_rejected_step_is_shortened_without_losing_accuracy():
    """A rare outcome with a Cauchy feature: the full Newton step overshoots once; the server
    retries a shorter step from the kept sums and still lands on scikit-learn's optimum."""
    rng = np.random.default_rng(952)
    n = int(rng.integers(30, 300))
    p = int(rng.integers(1, 4))
    x = rng.standard_t(rng.choice([1.0, 2.0, 30.0]), size=(n, p))
    eta = rng.normal(-2, 2) + x @ rng.normal(0, 3, size=p)
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
    site_data = {"a": (x[:50], y[:50]), "b": (x[50:], y[50:])}
    fed = fit_federated(site_data, penalty=None)
    assert not all(h["accepted"] for h in fed.history_), fed.history_
    objs = [h["objective"] for h in fed.history_ if h["accepted"]]
    assert all(b <= a for a, b in zip(objs, objs[1:]))
    d = compare(fed, x, y, C=np.inf, l1_ratio=0.0)
    assert d["std"] < TOL and d["orig"] < TOL


def test_protocol_messages_are_aggregates_only(sites):
    transcript: list = []
    model = fit_federated(sites, penalty="l2", C=1.0, transcript=transcript)
    assert len(transcript) == model.n_rounds_
    assert transcript[0]["request"]["kind"] == "fedrad.glm.logistic_stats"
    assert all(t["request"]["kind"] == "fedrad.glm.logistic_newton" for t in transcript[1:])
    p = len(FEATURES)
    for t in transcript:
        for site, reply in t["replies"].items():
            sizes = {k: np.size(v) for k, v in reply.items() if isinstance(v, np.ndarray)}
            # the message size depends on the number of features only, never on the site's n
            assert max(sizes.values()) <= (p + 1) ** 2, (site, sizes)
    first = transcript[0]["replies"]["A"]
    assert set(first) == {"kind", "version", "site", "n", "n_pos", "mean", "resid_sum", "cross", "cross_y"}
    assert first["n"] == SIZES["A"]


def test_server_can_be_driven_by_hand(sites):
    """The loop a Flower server app runs; replies as a list work too."""
    server = LogisticServer(FEATURES, penalty="elasticnet", C=0.1, l1_ratio=0.5)
    request = server.start()
    while request is not None:
        request = server.receive([site_logistic(rows, request, site=s) for s, rows in sites.items()])
    model = server.model()
    assert server.done and model.n_rounds_ == server.round_trips
    ref = fit_federated(sites, penalty="elasticnet", C=0.1, l1_ratio=0.5)
    np.testing.assert_allclose(model.coef_, ref.coef_, atol=1e-14)
    with pytest.raises(GLMError, match="outstanding"):
        server.receive([])


# ------------------------------------------------------------------------------------------------
# 3. the result object
# ------------------------------------------------------------------------------------------------
def test_model_predicts_like_sklearn_and_round_trips_through_json(sites):
    model = fit_federated(sites, penalty="l2", C=0.5)
    X, y = pool(sites)
    scaler = StandardScaler().fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=0.5, solver="newton-cholesky", tol=1e-12).fit(scaler.transform(X), y)
    np.testing.assert_allclose(model.predict_proba(X), ref.predict_proba(scaler.transform(X)), atol=1e-9)
    np.testing.assert_allclose(model.decision_function(X), X.to_numpy() @ model.coef_ + model.intercept_, atol=1e-8)
    assert (model.predict(X) == ref.predict(scaler.transform(X))).mean() > 0.99
    # columns are matched by name
    np.testing.assert_allclose(model.predict_proba(X[FEATURES[::-1]]), model.predict_proba(X), atol=0)
    assert model.n_per_site_ == SIZES and sum(model.n_pos_per_site_.values()) == int(y.sum())
    assert model.feature_names_in_ == FEATURES and model.fit_kind_ == "federated"
    np.testing.assert_allclose(model.mean_, scaler.mean_, rtol=1e-14)
    np.testing.assert_allclose(model.scale_, scaler.scale_, rtol=1e-11)
    assert model.sklearn_params() == {"C": 0.5, "l1_ratio": 0.0}
    back = LogisticModel.from_dict(json.loads(json.dumps(model.to_dict(), allow_nan=False)))
    np.testing.assert_array_equal(back.predict_proba(X), model.predict_proba(X))
    pd.testing.assert_frame_equal(back.summary, model.summary)
    assert back.n_rounds_ == model.n_rounds_ and back.converged_ and back.n_per_site_ == SIZES


def test_summary_l2_uses_inverse_penalized_hessian(sites):
    C = 0.5
    model = fit_federated(sites, penalty="l2", C=C)
    X, y = pool(sites)
    z = StandardScaler().fit_transform(X)
    a = np.column_stack([np.ones(len(y)), z])
    p = 1 / (1 + np.exp(-(a @ np.concatenate([[model.intercept_std_], model.coef_std_]))))
    h = (a * (p * (1 - p))[:, None]).T @ a + np.diag([0.0] + [1.0 / C] * len(FEATURES))
    se_std = np.sqrt(np.diag(np.linalg.inv(h)))
    summ = model.summary
    np.testing.assert_allclose(summ["se(coef)"].to_numpy()[1:], se_std[1:] / X.to_numpy().std(axis=0), rtol=1e-4)
    assert list(summ.index) == ["intercept"] + FEATURES
    assert {"coef", "exp(coef)", "se(coef)", "z", "p", "coef lower 95%", "coef upper 95%"} <= set(summ.columns)
    assert "penalized" in summ.attrs["note"]


def test_summary_l1_reports_coefficients_only(sites):
    summ = fit_federated(sites, penalty="l1", C=0.05).summary
    assert list(summ.columns) == ["coef", "exp(coef)", "coef per SD"]
    assert "not meaningful" in summ.attrs["note"]


def test_estimator_api(sites):
    X, y = pool(sites)
    est = LogisticModel(penalty="l1", C=0.05)
    assert est.get_params()["C"] == 0.05
    est.fit_federated(sites)
    assert est.converged_ and est.fit_kind_ == "federated"
    pooled = LogisticModel(penalty="l1", C=0.05).fit(X, y)
    assert pooled.fit_kind_ == "pooled" and pooled.n_per_site_ == {"pooled": len(y)}
    np.testing.assert_allclose(est.coef_, pooled.coef_, atol=1e-10)
    # plain arrays: features named x0, x1, ...
    arr = {s: (v[0].to_numpy(), v[1].to_numpy()) for s, v in sites.items()}
    m = fit_federated(arr, penalty="l1", C=0.05)
    assert m.feature_names_in_ == [f"x{j}" for j in range(len(FEATURES))]
    np.testing.assert_allclose(m.coef_, est.coef_, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 4. guards
# ------------------------------------------------------------------------------------------------
def _copy(site_data):
    return {s: (x.copy(), y.copy()) for s, (x, y) in site_data.items()}


def test_missing_feature_values_name_column_site_and_count(sites):
    data = _copy(sites)
    data["B"][0].loc[[3, 7, 11], "f4"] = np.nan
    with pytest.raises(MissingValueError, match=r"feature 'f4' has 3 missing.* at site 'B'"):
        fit_federated(data)
    X, y = pool(data)
    with pytest.raises(MissingValueError, match=r"'f4' has 3 missing"):
        fit_pooled(X, y)


def test_missing_outcome_names_site_and_count(sites):
    data = _copy(sites)
    yc = data["C"][1].astype(float)
    yc.iloc[[0, 5]] = np.nan
    data["C"] = (data["C"][0], yc)
    with pytest.raises(MissingValueError, match=r"outcome 'event' has 2 missing values at site 'C'"):
        fit_federated(data)


def test_outcome_must_be_binary(sites):
    data = _copy(sites)
    data["A"] = (data["A"][0], data["A"][1] * 2)
    with pytest.raises(GLMError, match=r"at site 'A' must be coded 0/1"):
        fit_federated(data)


def test_single_class_site_is_fine(sites):
    data = _copy(sites)
    data["C"] = (data["C"][0], data["C"][1] * 0)          # site C: no events at all
    fed, pooled, X, y = federated_and_pooled(data, penalty="l2", C=1.0)
    assert fed.n_pos_per_site_["C"] == 0
    np.testing.assert_allclose(fed.coef_std_, pooled.coef_std_, atol=EXACT)
    d = compare(fed, X, y, C=1.0, l1_ratio=0.0)
    assert d["std"] < TOL and d["orig"] < TOL


def test_single_class_federation_is_an_error(sites):
    data = {s: (x, y * 0 + 1) for s, (x, y) in sites.items()}
    with pytest.raises(OneClassError, match=r"outcome is 1 for all 830 rows across 4 site"):
        fit_federated(data)
    X, y = pool(data)
    with pytest.raises(OneClassError):
        fit_pooled(X, y)


def test_constant_feature_is_excluded_and_reported(sites):
    data = {s: (x.assign(scanner_kvp=120.0, per_site=float(k)), y) for k, (s, (x, y)) in enumerate(sites.items())}
    fed, pooled, X, y = federated_and_pooled(data, penalty="l2", C=1.0)
    assert fed.excluded_features_ == ["scanner_kvp"] == pooled.excluded_features_
    j = fed.feature_names_in_.index("scanner_kvp")
    assert fed.coef_[j] == 0 and fed.coef_std_[j] == 0 and fed.scale_[j] == 0
    assert "per_site" not in fed.excluded_features_          # constant within sites, not globally
    np.testing.assert_allclose(fed.coef_std_, pooled.coef_std_, atol=EXACT)
    d = compare(fed, X, y, C=1.0, l1_ratio=0.0)           # sklearn: StandardScaler zero column
    assert d["std"] < TOL and d["orig"] < TOL
    assert "scanner_kvp" not in fed.summary.index and "scanner_kvp" in fed.summary.attrs["note"]
    assert np.isfinite(fed.predict_proba(X)).all()


def _separated(quasi: bool):
    rng = np.random.default_rng(1)
    n = 150
    x = rng.normal(size=(n, 3))
    if quasi:     # every patient with the binary marker is a case; the rest overlap
        b = (rng.random(n) < 0.2).astype(float)
        y = np.where(b == 1, 1, (rng.random(n) < 0.4).astype(int))
        x = np.column_stack([x[:, :2], b])
    else:         # complete separation on x0
        y = (x[:, 0] > 0.1).astype(int)
    return {"S0": (x[:40], y[:40]), "S1": (x[40:90], y[40:90]), "S2": (x[90:], y[90:])}


@pytest.mark.parametrize("quasi", [False, True], ids=["complete", "quasi-complete"])
def test_separation_without_penalty_raises_and_penalty_fixes_it(quasi):
    data = _separated(quasi)
    with pytest.raises(SeparationError, match=r"penalty=None.*separated.*use a penalty"):
        fit_federated(data, penalty=None)
    X, y = pool(data)
    with pytest.raises(SeparationError):
        fit_pooled(X, y, penalty=None)
    fed = fit_federated(data, penalty="l2", C=1.0)
    assert fed.converged_ and fed.n_rounds_ <= L2_BUDGET
    d = compare(fed, X, y, C=1.0, l1_ratio=0.0)
    assert d["std"] < TOL and d["orig"] < TOL
    l1 = fit_federated(data, penalty="l1", C=1.0)
    assert l1.converged_ and kkt_violation(l1, X, y, C=1.0, l1_ratio=1.0) < 1e-6


def test_large_but_finite_effect_is_not_called_separation():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 3))
    y = (rng.random(3000) < 1 / (1 + np.exp(-(6 * x[:, 0] + 0.5 * x[:, 1])))).astype(int)
    fed = fit_federated({"a": (x[:1000], y[:1000]), "b": (x[1000:], y[1000:])}, penalty=None)
    assert fed.converged_ and fed.coef_std_[0] > 5
    d = compare(fed, x, y, C=np.inf, l1_ratio=0.0)
    assert d["std"] < TOL and d["orig"] < TOL


def test_collinear_features_without_penalty(sites):
    data = {s: (x.assign(age_months=x["age"] * 12 + 3), y) for s, (x, y) in sites.items()}
    with pytest.raises(CollinearityError, match=r"\['age', 'age_months'\] are collinear"):
        fit_federated(data, penalty=None)
    assert fit_federated(data, penalty="l2").converged_


@pytest.mark.parametrize("kw, match", [
    ({"penalty": "l3"}, "penalty must be"),
    ({"C": -1.0}, "C must be a positive"),
    ({"C": "big"}, "C must be a positive"),
    ({"penalty": "elasticnet"}, "needs l1_ratio"),
    ({"penalty": "elasticnet", "l1_ratio": 1.5}, r"l1_ratio must be in \[0, 1\]"),
    ({"penalty": "l1", "l1_ratio": 0.5}, "contradicts"),
    ({"max_rounds": 0}, "max_rounds"),
])
def test_bad_parameters(sites, kw, match):
    with pytest.raises(GLMError, match=match):
        fit_federated(sites, **kw)


def test_bad_site_tables(sites):
    data = _copy(sites)
    data["D"] = (data["D"][0].drop(columns=["f5"]), data["D"][1])
    with pytest.raises(GLMError, match=r"\['f5'\] not found at site 'D'"):
        fit_federated(data, feature_names=FEATURES)
    data = _copy(sites)
    data["A"] = (data["A"][0].assign(f3="x"), data["A"][1])
    with pytest.raises(GLMError, match=r"\['f3'\] at site 'A' are not numeric"):
        fit_federated(data, feature_names=FEATURES)
    data = _copy(sites)
    data["B"] = (data["B"][0].iloc[:0], data["B"][1].iloc[:0])
    with pytest.raises(GLMError, match=r"site 'B' has no rows"):
        fit_federated(data)
    data = _copy(sites)
    data["C"] = (data["C"][0], data["C"][1].iloc[:-1])
    with pytest.raises(GLMError, match=r"at site 'C' has 59 values but the features have 60 rows"):
        fit_federated(data)


def test_max_rounds_reached_warns(sites):
    with pytest.warns(GLMConvergenceWarning, match="raise max_rounds"):
        model = fit_federated(sites, penalty="l2", max_rounds=2)
    assert not model.converged_ and model.n_rounds_ == 2


# ------------------------------------------------------------------------------------------------
# 5. real multi-site data: UCI heart disease, one site per hospital
# ------------------------------------------------------------------------------------------------
HEART_COLS = "age sex cp trestbps chol fbs restecg thalach exang oldpeak slope ca thal num".split()
HOSPITALS = ["cleveland", "hungarian", "switzerland", "va"]


def load_heart_sites() -> dict:
    """FLamby's preprocessing per hospital: drop slope/ca/thal, drop incomplete rows, one-hot cp and
    restecg (first level dropped; fixed levels so every hospital has the same 13 columns), label num > 0."""
    root = shared_path("multisite-tabular", "uci-heart-disease")
    out = {}
    for h in HOSPITALS:
        df = pd.read_csv(Path(root) / f"processed.{h}.data", header=None, names=HEART_COLS, na_values="?")
        df = df.drop(columns=["slope", "ca", "thal"]).dropna()
        y = (df.pop("num") > 0).astype(int)
        df["cp"] = pd.Categorical(df["cp"].astype(int), categories=[1, 2, 3, 4])
        df["restecg"] = pd.Categorical(df["restecg"].astype(int), categories=[0, 1, 2])
        out[h] = (pd.get_dummies(df, columns=["cp", "restecg"], drop_first=True, dtype=float), y)
    return out


@pytest.mark.parametrize("C", [0.1, 1.0])
def test_heart_disease_hospitals_l2(C):
    sites_ = load_heart_sites()
    assert {h: len(v[1]) for h, v in sites_.items()} == {"cleveland": 303, "hungarian": 261, "switzerland": 46, "va": 130}
    assert all(v[0].shape[1] == 13 for v in sites_.values())
    fed, pooled, X, y = federated_and_pooled(sites_, penalty="l2", C=C)
    assert fed.converged_ and fed.n_rounds_ <= L2_BUDGET, fed.history_
    assert fed.n_pos_per_site_["switzerland"] == 45          # one control only at Basel: fine
    np.testing.assert_allclose(fed.coef_std_, pooled.coef_std_, atol=EXACT)
    d = compare(fed, X, y, C=C, l1_ratio=0.0)
    assert d["std"] < TOL and d["orig"] < TOL, d


def test_heart_disease_hospitals_l1():
    sites_ = load_heart_sites()
    fed = fit_federated(sites_, penalty="l1", C=0.05)
    X, y = pool(sites_)
    assert fed.converged_ and fed.n_rounds_ <= L1_BUDGET
    assert kkt_violation(fed, X, y, C=0.05, l1_ratio=1.0) < 1e-6
    d = compare(fed, X, y, C=0.05, l1_ratio=1.0)
    assert d["std"] < TOL and d["orig"] < TOL, d
    assert (fed.coef_std_ == 0).sum() >= 2
