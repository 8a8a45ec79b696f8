"""Tests for fedrad.common.cox: Efron stratum vs lifelines, federated == pooled, pooled vs lifelines
``CoxPHFitter(...).fit(df, strata=["site"])``, round-trip counts, guards, and the real TCGA-BRCA
table federated by region, as shipped (12 rows with T = 0 included, as lifelines takes them).

Tolerances (coefficients, original scale):
* federated vs pooled: 1e-8 (same algorithm, different arithmetic; measured <= 1e-14).
* vs lifelines run to convergence (``fit_options=dict(precision=1e-12, r_precision=1e-15)``, the
  same objective): 1e-6 for unpenalized, L2 and elastic net (measured <= 2e-8 synthetic, 1e-9 TCGA).
* vs lifelines with default options: 1e-4.  Its Newton loop stops on a relative log-likelihood
  change < 1e-9 and returns the point *before* its last step: measured 5.5e-6 off (penalizer 0.1,
  synthetic), 2.3e-6 / 6.4e-5 (TCGA, 0.1 / 0.01; one-hots with SD 0.1 amplify x10).  For
  l1_ratio > 0 lifelines' soft-abs sharpness 1.3**iteration is then still finite (13-20
  iterations here): measured <= 2.7e-5 synthetic.  Our elastic-net solution is also checked
  against the exact KKT conditions (1e-8).
* standard errors: relative 1e-6 vs converged lifelines (measured <= 1.3e-9; for l1_ratio > 0 on
  the non-zero coefficients, zero ones get NaN where lifelines reports ~0).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.fitters.coxph_fitter import SemiParametricPHFitter

from fedrad.common.cox import (
    CoxConvergenceError,
    CoxError,
    CoxModel,
    CoxServer,
    CoxWarning,
    _Newton,
    efron_stratum,
    fit_federated,
    fit_pooled,
    make_cox_request,
    site_cox_stratum,
    site_cox_summary,
)

from tests.conftest import shared_path

FEATURES = ["age", "marker", "grade", "size"]
TOL_FED = 1e-8
TOL_LIFELINES = 1e-6
TOL_DEFAULT = 1e-4
#: lifelines run to convergence (same objective, more Newton iterations)
TIGHT = dict(precision=1e-12, r_precision=1e-15)


# ----------------------------------------------------------------------------------------------
# Data and helpers
# ----------------------------------------------------------------------------------------------
def make_sites(seed: int = 7, sizes=(("A", 400, 0.08), ("B", 150, 0.2), ("C", 60, 0.01))) -> dict[str, pd.DataFrame]:
    """Synthetic multi-site survival data: monthly-rounded times (many ties), different sizes and
    baseline hazards; site C has exactly 3 events."""
    rng = np.random.default_rng(seed)
    sites = {}
    for name, n, base in sizes:
        df = pd.DataFrame({
            "age": rng.normal(60, 10, n).round(),
            "marker": rng.normal(0, 1, n),
            "grade": (rng.random(n) < 0.4).astype(float),
            "size": rng.lognormal(1.0, 0.5, n),
        })
        lp = 0.03 * (df.age - 60) + 0.5 * df.marker + 0.7 * df.grade - 0.2 * df["size"]
        t_event = rng.exponential(1.0 / (base * np.exp(lp)))
        t_cens = rng.uniform(2, 40, n)
        df["time"] = np.ceil(np.minimum(t_event, t_cens))
        df["event"] = (t_event <= t_cens).astype(int)
        if name == "C":
            df["event"] = 0
            df.loc[rng.choice(n, 3, replace=False), "event"] = 1
        sites[name] = df
    return sites


def pooled(sites: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([d.assign(site=s) for s, d in sites.items()], ignore_index=True)


def lifelines_fit(df, penalizer=0.0, l1_ratio=0.0, duration="time", event="event", strata="site", **fit_options):
    cph = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph.fit(df, duration, event, strata=[strata], fit_options=fit_options or None)
    return cph


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))


@pytest.fixture(scope="module")
def sites():
    return make_sites()


@pytest.fixture(scope="module")
def df(sites):
    return pooled(sites)


# ----------------------------------------------------------------------------------------------
# Efron stratum
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_efron_stratum_matches_lifelines(seed):
    rng = np.random.default_rng(seed)
    n, p = 250, 4
    x = rng.normal(size=(n, p))
    t = np.ceil(rng.exponential(8, n))          # heavy ties
    e = rng.random(n) < 0.6
    beta = rng.normal(0, 0.4, p)
    frame = pd.DataFrame(x).assign(T=t, E=e).sort_values(["T", "E"])  # lifelines' own sort
    X, T, E = frame[list(range(p))], frame["T"], frame["E"]
    W = pd.Series(np.ones(n), index=frame.index)
    fitter = SemiParametricPHFitter()
    ll, g, h = efron_stratum(x, t, e, beta)
    for fn in (fitter._get_efron_values_single, fitter._get_efron_values_batch):
        h_ref, g_ref, ll_ref = fn(X, T, E, W, None, beta)
        assert abs(ll - ll_ref) <= 1e-10 * abs(ll_ref)
        assert maxdiff(g, g_ref) <= 1e-10 * np.abs(g_ref).max()
        assert maxdiff(h, h_ref) <= 1e-10 * np.abs(h_ref).max()
    # invariant to shifting the covariates; a stratum without events contributes nothing
    ll2, g2, h2 = efron_stratum(x + rng.normal(0, 5, p), t, e, beta)
    assert abs(ll2 - ll) < 1e-9 and maxdiff(g2, g) < 1e-9 and maxdiff(h2, h) < 1e-8
    ll0, g0, h0 = efron_stratum(x, t, np.zeros(n, bool), beta)
    assert ll0 == 0 and not g0.any() and not h0.any()


# ----------------------------------------------------------------------------------------------
# Federated == pooled == lifelines
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalizer", [0.0, 0.01, 0.1])
def test_l2_federated_equals_pooled_equals_lifelines(sites, df, penalizer):
    fed = fit_federated(sites, "time", "event", penalizer=penalizer)
    pool = fit_pooled(df, "time", "event", strata="site", penalizer=penalizer)
    ref = lifelines_fit(df, penalizer, **TIGHT)
    assert fed.feature_names_ == pool.feature_names_ == list(ref.params_.index) == FEATURES
    assert maxdiff(fed.coef_, pool.coef_) < TOL_FED
    assert maxdiff(pool.coef_, ref.params_) < TOL_LIFELINES
    assert maxdiff(fed.coef_, ref.params_) < TOL_LIFELINES
    assert maxdiff(fed.coef_, lifelines_fit(df, penalizer).params_) < TOL_DEFAULT
    assert fed.converged_ and pool.converged_
    # round trips: counted by the driver and the server; the pooled fit takes the same path
    assert fed.n_rounds_ == pool.n_rounds_ <= 6
    assert fed.n_step_halvings_ == 0
    # standardization = lifelines' (pooled mean, ddof-1 SD)
    assert maxdiff(fed.mean_, ref._norm_mean) < 1e-10
    assert maxdiff(fed.scale_ / ref._norm_std, 1.0) < 1e-12
    # standard errors from the inverse penalized Hessian, and the summary table
    se_ref = ref.summary["se(coef)"].to_numpy()
    assert maxdiff(fed.standard_errors_ / se_ref, 1.0) < 1e-6
    ours, theirs = fed.summary, ref.summary
    assert list(ours.columns) == list(theirs.columns)
    for col in ["coef", "exp(coef)", "se(coef)", "coef lower 95%", "coef upper 95%", "z"]:
        np.testing.assert_allclose(ours[col], theirs[col], rtol=1e-5, atol=1e-6, err_msg=col)
    np.testing.assert_allclose(ours["p"], theirs["p"], rtol=1e-4, atol=1e-12)
    # per-site reporting; site C has 3 events
    assert fed.site_n_ == {"A": 400, "B": 150, "C": 60} and fed.site_events_["C"] == 3
    assert fed.n_samples_ == len(df) and fed.n_events_ == int(df.event.sum())
    assert abs(fed.log_likelihood_null_ - ref._ll_null_) < 1e-8
    assert fed.sites_without_events_ == [] and fed.excluded_features_ == {}


def test_prediction_and_serialization(sites, df):
    fed = fit_federated(sites, penalizer=0.01)
    ref = lifelines_fit(df, 0.01)
    X = df[FEATURES]
    lp = fed.predict_log_partial_hazard(X)
    assert isinstance(lp, pd.Series) and lp.index.equals(X.index)
    assert maxdiff(lp, ref.predict_log_partial_hazard(df)) < 1e-5
    np.testing.assert_allclose(fed.predict_partial_hazard(X), ref.predict_partial_hazard(df), rtol=1e-5)
    assert maxdiff(fed.predict_log_partial_hazard(X.to_numpy()), lp) < 1e-12
    assert maxdiff(fed.predict_log_partial_hazard(X[FEATURES[::-1]]), lp) == 0   # columns by name
    text = json.dumps(fed.to_dict(), allow_nan=False)
    back = CoxModel.from_dict(json.loads(text))
    assert back.feature_names_ == fed.feature_names_ and back.n_rounds_ == fed.n_rounds_
    assert maxdiff(back.coef_, fed.coef_) == 0 and maxdiff(back.variance_matrix_, fed.variance_matrix_) == 0
    pd.testing.assert_frame_equal(back.summary, fed.summary)
    assert maxdiff(back.predict_log_partial_hazard(X), lp) == 0
    with pytest.raises(CoxError, match="columns"):
        fed.predict_log_partial_hazard(X.to_numpy()[:, :3])
    with pytest.raises(CoxError, match="not fitted"):
        CoxModel().predict_log_partial_hazard(X)


def test_site_data_as_tuples(sites, df):
    tuples = {s: (d[FEATURES].to_numpy(), d["time"].to_numpy(), d["event"].to_numpy()) for s, d in sites.items()}
    a = fit_federated(tuples, features=FEATURES, penalizer=0.1)
    b = fit_federated({s: (d[FEATURES], d["time"], d["event"]) for s, d in sites.items()}, penalizer=0.1)
    c = fit_pooled(df, penalizer=0.1)
    assert a.feature_names_ == b.feature_names_ == FEATURES
    assert maxdiff(a.coef_, c.coef_) < TOL_FED and maxdiff(b.coef_, c.coef_) < TOL_FED
    unnamed = fit_federated({s: t for s, t in tuples.items()}, penalizer=0.1)
    assert unnamed.feature_names_ == ["x0", "x1", "x2", "x3"]


def _kkt_residual(model: CoxModel, df: pd.DataFrame) -> tuple[float, np.ndarray]:
    """Max violation of the elastic-net KKT conditions at the fitted standardized coefficients,
    divided by N (the gradient of sum_k l_k / N - pen(b))."""
    b = model.coef_ * model.scale_
    z = (df[model.feature_names_].to_numpy() - model.mean_) / model.scale_
    g = np.zeros(b.size)
    for _, idx in df.groupby("site").indices.items():
        g += efron_stratum(z[idx], df["time"].to_numpy()[idx], df["event"].to_numpy()[idx], b)[1]
    n, lam, a = len(df), model.penalizer, model.l1_ratio
    smooth = g / n - lam * (1 - a) * b
    active = b != 0
    viol = np.where(active, np.abs(smooth - lam * a * np.sign(b)), np.maximum(np.abs(smooth) - lam * a, 0))
    return float(viol.max()), active


@pytest.mark.parametrize("penalizer,l1_ratio", [(0.01, 0.5), (0.1, 0.5), (0.05, 1.0), (0.3, 0.5)])
def test_elastic_net_exact_and_close_to_lifelines(sites, df, penalizer, l1_ratio):
    fed = fit_federated(sites, penalizer=penalizer, l1_ratio=l1_ratio)
    pool = fit_pooled(df, penalizer=penalizer, l1_ratio=l1_ratio)
    ref = lifelines_fit(df, penalizer, l1_ratio, **TIGHT)
    assert maxdiff(fed.coef_, pool.coef_) < TOL_FED
    assert fed.n_rounds_ == pool.n_rounds_ <= 8
    viol, active = _kkt_residual(fed, df)
    assert viol < 1e-8                                   # exact elastic-net optimum
    assert maxdiff(fed.coef_, ref.params_) < TOL_LIFELINES   # soft-abs surrogate, sharp at convergence
    assert maxdiff(fed.coef_, lifelines_fit(df, penalizer, l1_ratio).params_) < TOL_DEFAULT
    assert np.all(np.abs(ref.params_.to_numpy()[~active]) < 1e-6)   # lifelines' "zeros"
    se = fed.standard_errors_.to_numpy()
    assert np.all(np.isnan(se[~active])) and np.all(np.isfinite(se[active]))
    np.testing.assert_allclose(se[active], ref.standard_errors_.to_numpy()[active], rtol=1e-6)
    if penalizer >= 0.3:
        assert (~active).any()                           # exact zeros appear


# ----------------------------------------------------------------------------------------------
# Sites without events, constant features
# ----------------------------------------------------------------------------------------------
def test_site_without_events_is_reported_and_not_asked(sites):
    sites = dict(sites)
    extra = make_sites(seed=3, sizes=(("D", 30, 0.1),))["D"].assign(event=0)
    sites["D"] = extra
    df = pooled(sites)
    fed = fit_federated(sites, penalizer=0.01)
    ref = lifelines_fit(df, 0.01, **TIGHT)              # lifelines keeps D (N and mean/SD include it)
    assert fed.sites_without_events_ == ["D"] and fed.site_n_["D"] == 30 and fed.site_events_["D"] == 0
    assert maxdiff(fed.coef_, ref.params_) < TOL_LIFELINES
    assert maxdiff(fed.coef_, fit_pooled(df, penalizer=0.01).coef_) < TOL_FED
    server = CoxServer(make_cox_request(FEATURES, penalizer=0.01))
    server.start({s: site_cox_summary(d, server.request, site=s) for s, d in sites.items()})
    assert server.sites_to_ask == ["A", "B", "C"]


def test_constant_features_excluded_and_reported(sites):
    sites = {s: d.assign(const=2.5, site_level=float(i)) for i, (s, d) in enumerate(sites.items())}
    df = pooled(sites)
    with pytest.warns(CoxWarning, match="excluded"):
        fed = fit_federated(sites, penalizer=0.1)
    with pytest.warns(CoxWarning, match="excluded"):
        pool = fit_pooled(df, penalizer=0.1)
    assert set(fed.excluded_features_) == {"const", "site_level"}
    assert "SD 0" in fed.excluded_features_["const"]
    assert "within every site" in fed.excluded_features_["site_level"]
    assert fed.excluded_features_ == pool.excluded_features_
    assert fed.feature_names_ == FEATURES and maxdiff(fed.coef_, pool.coef_) < TOL_FED
    # lifelines cannot take the SD-0 column; the site-level one is absorbed by the strata (coef 0)
    ref = lifelines_fit(df.drop(columns="const"), 0.1, **TIGHT)
    assert abs(ref.params_["site_level"]) < 1e-6
    assert maxdiff(fed.coef_, ref.params_[FEATURES]) < TOL_LIFELINES
    with pytest.raises(CoxError, match="every feature is constant"):
        fit_federated(sites, features=["const"])


# ----------------------------------------------------------------------------------------------
# Guards
# ----------------------------------------------------------------------------------------------
def _bad(sites, site, fn):
    sites = {s: d.copy() for s, d in sites.items()}
    fn(sites[site])
    return sites


def _set(col, rows, value):
    def fn(d):
        d[col] = d[col].astype(float) if value is np.nan else d[col]
        d.loc[d.index[rows], col] = value
    return fn


@pytest.mark.parametrize("fn,pattern,pooled_pattern", [
    (_set("marker", [1, 5, 9], np.nan), r"site 'B': column 'marker' has 3 missing or non-finite value\(s\)", None),
    (_set("time", [2], np.nan), r"site 'B': column 'time' has 1 missing", None),
    (_set("event", [0, 1], np.nan), r"site 'B': column 'event' has 2 missing", None),
    (_set("age", [3], np.inf), r"site 'B': column 'age' has 1 missing or non-finite", None),
    (_set("time", [0, 4], -0.5), r"site 'B': duration column 'time' has 2 negative value\(s\) \(of 150 rows", None),
    (_set("time", [7], -3.0), r"site 'B': duration column 'time' has 1 negative value\(s\) \(of 150 rows; min -3\)",
     None),
    (_set("event", [7], 2), r"site 'B': event column 'event' has 1 value\(s\) other than 0/1", None),
    (lambda d: d.drop(columns="grade", inplace=True), r"site 'B': column\(s\) \['grade'\] not found",
     r"stratum 'B': column 'grade' has 150 missing"),          # concat fills the absent column with NaN
    (lambda d: d.__setitem__("size", "big"), r"site 'B': column 'size' is not numeric",
     r"the data: column 'size' is not numeric"),
    (lambda d: d.drop(index=d.index, inplace=True), r"site 'B' has no rows", None),
])
def test_guards_name_site_and_column(sites, fn, pattern, pooled_pattern):
    bad = _bad(sites, "B", fn)
    with pytest.raises(CoxError, match=pattern):
        fit_federated(bad, features=FEATURES, penalizer=0.1)
    with pytest.raises(CoxError, match=pattern):
        site_cox_summary(bad["B"], make_cox_request(FEATURES), site="B")
    # the pooled fit reports the same problem for the stratum
    pooled_pattern = pooled_pattern or pattern.replace("site 'B'", "stratum 'B'")
    if len(bad["B"]):
        with pytest.raises(CoxError, match=pooled_pattern):
            fit_pooled(pooled(bad), features=FEATURES, penalizer=0.1)


# ----------------------------------------------------------------------------------------------
# Zero durations: lifelines' CoxPHFitter takes T = 0 as an ordinary time (no positivity check)
# ----------------------------------------------------------------------------------------------
def make_zero_sites() -> dict[str, pd.DataFrame]:
    """make_sites() with rows moved to T = 0: site A 3 events + 2 censored at 0 (Efron ties, the
    censored ones in the risk set at 0), B 2 events at 0 (a tie, nothing censored there), C 2
    censored at 0 (no event at 0: they only change N and the standardization)."""
    sites = {s: d.copy() for s, d in make_sites().items()}
    for name, n_ev, n_cens in (("A", 3, 2), ("B", 2, 0), ("C", 0, 2)):
        d = sites[name]
        ev_rows = d.index[d.event == 1][:n_ev]
        cens_rows = d.index[d.event == 0][:n_cens]
        d.loc[ev_rows.union(cens_rows), "time"] = 0.0
    return sites


def test_efron_stratum_with_zero_durations_matches_lifelines():
    rng = np.random.default_rng(5)
    n, p = 120, 3
    x = rng.normal(size=(n, p))
    t = np.where(rng.random(n) < 0.15, 0.0, np.ceil(rng.exponential(5, n)))   # ~18 rows at 0
    e = rng.random(n) < 0.5
    assert (e & (t == 0)).sum() >= 2 and (~e & (t == 0)).sum() >= 2
    beta = rng.normal(0, 0.5, p)
    frame = pd.DataFrame(x).assign(T=t, E=e).sort_values(["T", "E"])
    X, T, E = frame[list(range(p))], frame["T"], frame["E"]
    W = pd.Series(np.ones(n), index=frame.index)
    ll, g, h = efron_stratum(x, t, e, beta)
    fitter = SemiParametricPHFitter()
    for fn in (fitter._get_efron_values_single, fitter._get_efron_values_batch):
        h_ref, g_ref, ll_ref = fn(X, T, E, W, None, beta)
        assert abs(ll - ll_ref) <= 1e-10 * abs(ll_ref)
        assert maxdiff(g, g_ref) <= 1e-10 * np.abs(g_ref).max()
        assert maxdiff(h, h_ref) <= 1e-10 * np.abs(h_ref).max()
    # the rows at 0 matter: as events at a tiny positive time (still first) nothing changes, as
    # censored at 0 (or dropped) the likelihood differs
    assert abs(efron_stratum(x, np.where(t == 0, 1e-9, t), e, beta)[0] - ll) < 1e-10
    assert abs(efron_stratum(x, t, e & (t > 0), beta)[0] - ll) > 1e-3


@pytest.mark.parametrize("penalizer,l1_ratio", [(0.0, 0.0), (0.1, 0.0), (0.1, 0.5)])
def test_zero_durations_pooled_and_federated_equal_lifelines(penalizer, l1_ratio):
    sites = make_zero_sites()
    df = pooled(sites)
    zero = df[df.time == 0]
    assert len(zero) == 9 and int(zero.event.sum()) == 5
    assert zero.groupby("site").event.agg(["size", "sum"]).to_dict("index") == {
        "A": {"size": 5, "sum": 3}, "B": {"size": 2, "sum": 2}, "C": {"size": 2, "sum": 0}}
    fed = fit_federated(sites, "time", "event", penalizer=penalizer, l1_ratio=l1_ratio)
    pool = fit_pooled(df, "time", "event", strata="site", penalizer=penalizer, l1_ratio=l1_ratio)
    ref = lifelines_fit(df, penalizer, l1_ratio, **TIGHT)
    assert fed.converged_ and pool.converged_ and fed.n_samples_ == pool.n_samples_ == len(df) == 610
    assert fed.site_n_ == {"A": 400, "B": 150, "C": 60} and fed.n_events_ == int(df.event.sum())
    assert maxdiff(fed.coef_, pool.coef_) < TOL_FED
    assert maxdiff(pool.coef_, ref.params_) < TOL_LIFELINES
    assert maxdiff(fed.coef_, ref.params_) < TOL_LIFELINES
    assert maxdiff(fed.mean_, ref._norm_mean) < 1e-10 and maxdiff(fed.scale_ / ref._norm_std, 1.0) < 1e-12
    assert abs(fed.objective_ - ref.log_likelihood_) < 1e-9 * abs(ref.log_likelihood_)  # lifelines': penalized
    assert abs(fed.log_likelihood_null_ - ref._ll_null_) < 1e-8
    if l1_ratio == 0:
        se_ref = ref.summary["se(coef)"].to_numpy()
        assert maxdiff(fed.standard_errors_ / se_ref, 1.0) < 1e-6
    # the zero rows change the fit: dropping them, or taking the events at 0 as censored, is far off
    dropped = lifelines_fit(df[df.time > 0], penalizer, l1_ratio, **TIGHT)
    as_censored = lifelines_fit(df.assign(event=df.event.where(df.time > 0, 0)), penalizer, l1_ratio, **TIGHT)
    assert maxdiff(fed.coef_, dropped.params_) > 1e-3
    assert maxdiff(fed.coef_, as_censored.params_) > 1e-3


def test_no_events_anywhere_is_an_error(sites):
    none = {s: d.assign(event=0) for s, d in sites.items()}
    with pytest.raises(CoxError, match="no events at any site"):
        fit_federated(none, penalizer=0.1)
    with pytest.raises(CoxError, match="no events"):
        fit_pooled(pooled(none), penalizer=0.1)


def test_bad_options():
    with pytest.raises(CoxError, match="penalizer"):
        make_cox_request(FEATURES, penalizer=-1)
    with pytest.raises(CoxError, match="l1_ratio"):
        make_cox_request(FEATURES, l1_ratio=1.5)
    with pytest.raises(CoxError, match="both a feature"):
        make_cox_request(["time", "age"])


def test_unpenalized_collinear_fails_after_first_round(sites):
    coll = {s: d.assign(age_months=d.age * 12 + 3) for s, d in sites.items()}
    request = make_cox_request(FEATURES + ["age_months"])
    server = CoxServer(request)
    with pytest.raises(CoxConvergenceError, match=r"singular.*'age'.*'age_months'.*penalizer"):
        server.start({s: site_cox_summary(d, request, site=s) for s, d in coll.items()})
    with pytest.raises(CoxConvergenceError, match="collinear"):
        fit_pooled(pooled(coll))
    fit = fit_federated(coll, penalizer=0.01)   # a penalizer makes it identifiable
    assert fit.converged_ and fit.n_rounds_ <= 10


def test_monotone_likelihood_fails_quickly(sites):
    rng = np.random.default_rng(11)
    # 'flag' is only ever 1 for censored patients: its coefficient runs to -infinity
    sep = {s: d.assign(flag=((d.event == 0) & (rng.random(len(d)) < 0.3)).astype(float)) for s, d in sites.items()}
    with pytest.raises(CoxConvergenceError, match=r"diverges.*'flag'.*monotone likelihood.*penalizer"):
        fit_federated(sep, max_rounds=6)
    with pytest.raises(CoxConvergenceError, match="diverges"):
        fit_pooled(pooled(sep), max_rounds=6)
    fit = fit_federated(sep, penalizer=0.01)
    assert fit.converged_ and fit.coef_[-1] < -1


def test_not_converged_within_max_rounds(sites, df):
    with pytest.raises(CoxConvergenceError, match=r"did not converge in 2 round trips.*penalizer"):
        fit_federated(sites, max_rounds=2)
    with pytest.warns(CoxWarning, match="did not converge"):
        fit = fit_federated(sites, penalizer=0.1, max_rounds=2)
    assert not fit.converged_ and fit.n_rounds_ == 2


def test_server_rejects_inconsistent_replies(sites):
    request = make_cox_request(FEATURES, penalizer=0.1)
    server = CoxServer(request)
    msg = server.start({s: site_cox_summary(d, request, site=s) for s, d in sites.items()})
    with pytest.raises(CoxError, match=r"no reply from site\(s\) \['C'\]"):
        server.step({s: site_cox_stratum(sites[s], msg, site=s) for s in ["A", "B"]})
    replies = {s: site_cox_stratum(d, msg, site=s) for s, d in sites.items()}
    replies["B"] = site_cox_stratum(sites["B"].iloc[:-1], msg, site="B")
    with pytest.raises(CoxError, match="site 'B': data changed during the fit"):
        server.step(replies)
    with pytest.raises(CoxError, match="not a Cox Newton request"):
        site_cox_stratum(sites["A"], request, site="A")


def test_step_halving_safeguard():
    """A full Newton step on -log cosh(b - 3) from 0 overshoots wildly: the engine halves."""
    engine = _Newton(n_total=1, penalizer=0.0, l1_ratio=0.0, tol=1e-10, max_evals=60, names=["x"])
    b = engine.pending
    while b is not None:
        u = b[0] - 3.0
        b = engine.update(-np.log(np.cosh(u)), np.array([-np.tanh(u)]), np.array([[-1 / np.cosh(u) ** 2]]))
    assert engine.converged and abs(engine.beta[0] - 3.0) < 1e-10 and engine.total_halvings > 0


# ----------------------------------------------------------------------------------------------
# Real data: TCGA-BRCA (FLamby), federated by region
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tcga_all():
    base = shared_path("multisite-tabular", "flamby-tcga-brca")
    data = pd.read_csv(base / "tcga_brca.csv")
    split = pd.read_csv(base / "tcga_brca_train_test_split.csv")
    # SOURCE.md: fold2 = train_k / test_k with k = region 0..5 (8 pids of tcga_brca.csv are unused)
    df = data.merge(split, on="pid")
    df["region"] = df["fold2"].str.split("_").str[1].astype(int)
    return df.drop(columns=["pid", "fold", "fold2"])


@pytest.fixture(scope="module")
def tcga(tcga_all):
    # as shipped: 12 patients (all censored; 9 in region 4, 3 in region 5) have T = 0.  No event is
    # at 0, so they are in no risk set, but (as in lifelines) they count in N and the mean/SD.
    df = tcga_all.reset_index(drop=True)
    sites = {f"region{r}": g.drop(columns="region") for r, g in df.groupby("region")}
    return df, sites


TCGA_REGION_N = {"region0": 311, "region1": 196, "region2": 206, "region3": 162, "region4": 162, "region5": 51}


def test_tcga_brca_as_shipped_has_zero_durations(tcga_all):
    assert len(tcga_all) == 1088 and tcga_all.shape[1] == 39 + 3
    zero = tcga_all[tcga_all["T"] == 0]
    assert len(zero) == 12 and zero["E"].sum() == 0
    assert zero["region"].value_counts().to_dict() == {4: 9, 5: 3}
    assert (tcga_all["T"] >= 0).all()


@pytest.mark.parametrize("penalizer", [0.1, 0.01])
def test_tcga_brca_federated_by_region_matches_lifelines(tcga, penalizer):
    df, sites = tcga
    fed = fit_federated(sites, "T", "E", penalizer=penalizer)
    pool = fit_pooled(df, "T", "E", strata="region", penalizer=penalizer)
    assert len(fed.feature_names_) == 39 and fed.excluded_features_ == {}
    assert maxdiff(fed.coef_, pool.coef_) < TOL_FED
    assert fed.n_rounds_ == pool.n_rounds_ <= 10
    assert fed.site_events_["region5"] == 3 and fed.n_samples_ == 1088
    assert fed.site_n_ == TCGA_REGION_N and fed.sites_without_events_ == []
    tight = lifelines_fit(df, penalizer, duration="T", event="E", strata="region", **TIGHT)
    assert maxdiff(fed.coef_, tight.params_) < TOL_LIFELINES
    assert maxdiff(fed.standard_errors_ / tight.standard_errors_, 1.0) < 1e-6
    default = lifelines_fit(df, penalizer, duration="T", event="E", strata="region")
    assert maxdiff(fed.coef_, default.params_) < TOL_DEFAULT   # lifelines' own early stop (module doc)
    # the 12 zero rows are not inert: without them (old behaviour) N and the standardization change
    dropped = lifelines_fit(df[df["T"] > 0], penalizer, duration="T", event="E", strata="region", **TIGHT)
    assert maxdiff(fed.coef_, dropped.params_) > 1e-3   # measured 3.2e-2 (0.1), 7.5e-3 (0.01)


@pytest.fixture(scope="module")
def tcga_table(tcga_all):
    """TCGA-BRCA as shipped, region as a text column (what `fedrad fit --site-col region` reads)."""
    df = tcga_all.assign(region="region" + tcga_all["region"].astype(str))
    feats = [c for c in df.columns if c not in ("T", "E", "region")]
    ref = lifelines_fit(df, 0.1, duration="T", event="E", strata="region", **TIGHT)
    return df, feats, ref


def test_tcga_brca_fit_table_federated_equals_lifelines(tcga_table):
    from fedrad.local import fit_table

    df, feats, ref = tcga_table
    fitted, info = fit_table(df, "region", "cox", feats, time="T", event="E", C=0.1, federated=True)
    assert info["mode"] == "federated" and fitted.converged_
    assert fitted.site_n_ == TCGA_REGION_N and fitted.n_samples_ == 1088 and fitted.sites_without_events_ == []
    assert fitted.feature_names_ == feats == list(ref.params_.index)
    assert maxdiff(fitted.coef_, ref.params_) < TOL_LIFELINES
    assert maxdiff(fitted.standard_errors_ / ref.standard_errors_, 1.0) < 1e-6
    pooled_fit, _ = fit_table(df, "region", "cox", feats, time="T", event="E", C=0.1)
    assert maxdiff(fitted.coef_, pooled_fit.coef_) < TOL_FED


def test_tcga_brca_cli_fit_cox_federated(tcga_table, tmp_path):
    from typer.testing import CliRunner

    from fedrad.cli import app

    df, feats, ref = tcga_table
    src, out = tmp_path / "tcga.csv", tmp_path / "cox.json"
    df.to_csv(src, index=False, float_format="%.17g")
    # two column names contain commas, so --features cannot list them: select all 39 by prefix
    prefixes = ["age_at_index", "ethnicity_", "race_", "ajcc_", "icd_10_code_", "morphology_", "primary_diagnosis_",
                "prior_malignancy_", "synchronous_malignancy_", "treatment_or_therapy_", "tumor_stage_"]
    r = CliRunner().invoke(app, ["fit", str(src), "--site-col", "region", "--model", "cox", "--time", "T",
                                 "--event", "E", "--C", "0.1", "--feature-prefix", ",".join(prefixes),
                                 "--federated", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1088 rows, 6 sites, federated" in r.output
    doc = json.loads(out.read_text())
    params = doc["params"]
    assert doc["fit"]["mode"] == "federated" and params["converged_"]
    assert params["site_n_"] == TCGA_REGION_N and params["n_samples_"] == 1088
    assert params["sites_without_events_"] == [] and params["feature_names_"] == feats
    assert maxdiff(params["coef_"], ref.params_[feats]) < TOL_LIFELINES


def test_tcga_brca_unpenalized_is_not_identifiable(tcga):
    df, sites = tcga
    with pytest.raises(CoxConvergenceError, match=r"singular in the direction of .*tumor_stage.*penalizer"):
        fit_federated(sites, "T", "E")


def test_tcga_brca_elastic_net(tcga):
    df, sites = tcga
    fed = fit_federated(sites, "T", "E", penalizer=0.1, l1_ratio=0.5)
    ref = lifelines_fit(df, 0.1, 0.5, duration="T", event="E", strata="region", **TIGHT)  # ~100 iterations
    assert fed.n_rounds_ <= 10 and (fed.coef_ == 0).sum() > 20
    assert maxdiff(fed.coef_, ref.params_) < TOL_LIFELINES
