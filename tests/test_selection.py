"""Federated feature-selection statistics (fedrad.common.selection): federated == pooled oracle for every
statistic, references (Shrout & Fleiss 1979 table, lifelines, sklearn, scipy), no patient dimension in
any aggregate, guards, and a real multi-site table (UCI heart disease by hospital)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from fedrad.common import selection as S

from .conftest import shared_path

#: Site sizes: all distinct from the feature count P and from K, so a patient axis would be visible.
SIZES = {"north": 83, "east": 121, "south": 57, "west": 146}
P = 12
K = 5
FEATS = [f"f{j:02d}" for j in range(P - 1)] + ["volume"]
TOL = 1e-10


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# ------------------------------------------------------------------------------------------------
# synthetic multi-site data
# ------------------------------------------------------------------------------------------------
def make_sites(seed: int = 7) -> dict[str, pd.DataFrame]:
    """Correlated features from 3 latent factors, per-site affine shifts, a 1e5-scale 'volume',
    a near-duplicate pair (f00, f01), a binary response and a survival outcome with tied times."""
    rng = np.random.default_rng(seed)
    load = rng.normal(size=(3, P - 1))
    out = {}
    for i, (site, n) in enumerate(SIZES.items()):
        lat = rng.normal(size=(n, 3))
        x = lat @ load + 0.7 * rng.normal(size=(n, P - 1))
        x[:, 1] = x[:, 0] + 0.15 * rng.normal(size=n)                  # near-duplicate of f00
        x = x * (1 + 0.25 * i) + 3.0 * i                                # site (scanner) effect
        df = pd.DataFrame(x, columns=FEATS[:-1])
        df["volume"] = 1e5 + 2e3 * i + 50.0 * (lat[:, 2] + 0.5 * rng.normal(size=n))
        lin = -0.6 + 0.5 * i + 0.9 * lat[:, 0]
        df["response"] = (rng.random(n) < 1 / (1 + np.exp(-lin))).astype(int)
        t = rng.exponential(12.0 * np.exp(-0.6 * lat[:, 1] - 0.2 * i))
        c = rng.uniform(5, 40, size=n)
        df["os_time"] = np.ceil(np.minimum(t, c))                       # whole months: many ties
        df["os_event"] = (t <= c).astype(int)
        df["site"] = site
        out[site] = df
    return out


def make_perturbed(seed: int = 11) -> dict[str, pd.DataFrame]:
    """Perturbed table: K rows per case; feature j has perturbation noise sd 0.05..2 (ICC ~1 .. ~0.2),
    site shifts, and a 1e5-scale 'volume'."""
    rng = np.random.default_rng(seed)
    noise = np.geomspace(0.05, 2.0, P)
    out = {}
    for i, (site, n) in enumerate(SIZES.items()):
        subj = rng.normal(size=(n, 1, P)) * (1 + 0.2 * i) + 2.0 * i
        vals = subj + noise * rng.normal(size=(n, K, P))
        vals[:, :, -1] = 1e5 + 100.0 * vals[:, :, -1]
        df = pd.DataFrame(vals.reshape(n * K, P), columns=FEATS)
        df.insert(0, "case_id", np.repeat([f"{site}-{c:03d}" for c in range(n)], K))
        df.insert(1, "perturbation", np.tile(np.arange(K), n))
        out[site] = df.sample(frac=1.0, random_state=i).reset_index(drop=True)   # row order irrelevant
    return out


@pytest.fixture(scope="module")
def sites():
    return make_sites()


@pytest.fixture(scope="module")
def pooled(sites):
    return pd.concat(list(sites.values()), ignore_index=True)


@pytest.fixture(scope="module")
def perturbed():
    return make_perturbed()


def no_patient_dimension(agg, n: int) -> None:
    """No array (or list) in the aggregate has an axis of length n (the site's number of rows)."""
    if isinstance(agg, dict):
        for v in agg.values():
            no_patient_dimension(v, n)
    elif isinstance(agg, np.ndarray):
        assert n not in agg.shape, f"array of shape {agg.shape} has the patient dimension {n}"
    elif isinstance(agg, (list, tuple)):
        assert len(agg) != n
        for v in agg:
            no_patient_dimension(v, n)
    else:
        assert isinstance(agg, (int, float, str, bool, np.floating, np.integer, type(None))), type(agg)


# ------------------------------------------------------------------------------------------------
# 1. ICC(1,1)
# ------------------------------------------------------------------------------------------------
#: Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8],
                          [6, 1, 3, 2],
                          [8, 4, 6, 8],
                          [7, 1, 2, 6],
                          [10, 5, 6, 9],
                          [6, 2, 4, 7]], dtype=float)


def textbook_icc1(cube: np.ndarray) -> np.ndarray:
    """Independent reference: one-way ANOVA table from raw sums (correction term (Σx)²/N), as in
    Shrout & Fleiss's Table 3.  cube: (n targets, k, features)."""
    n, k, _ = cube.shape
    total = cube.sum(axis=(0, 1))
    cf = total ** 2 / (n * k)
    ss_total = (cube ** 2).sum(axis=(0, 1)) - cf
    ss_between = (cube.sum(axis=1) ** 2).sum(axis=0) / k - cf
    ss_within = ss_total - ss_between
    bms, wms = ss_between / (n - 1), ss_within / (n * (k - 1))
    return (bms - wms) / (bms + (k - 1) * wms)


def sf_table() -> pd.DataFrame:
    n, k = SHROUT_FLEISS.shape
    return pd.DataFrame({"case_id": np.repeat(np.arange(n), k), "rating": SHROUT_FLEISS.ravel()})


def test_icc_shrout_fleiss_table2():
    """ICC(1,1) = 0.17 with BMS = 11.24, WMS = 6.26 (Shrout & Fleiss 1979, Tables 2-4); pooled,
    federated (targets split over two sites) and the raw-sum textbook formula agree."""
    df = sf_table()
    req = S.icc_request(["rating"], min_cell_size=2)
    res = S.pooled_icc(df, req)
    row = res.table.loc["rating"]
    assert round(row["icc"], 2) == 0.17
    assert round(row["msb"], 2) == 11.24 and round(row["msw"], 2) == 6.26
    assert row["icc"] == pytest.approx(textbook_icc1(SHROUT_FLEISS[:, :, None])[0], rel=1e-12)
    fed = S.combine_icc([S.site_icc(df[df.case_id < 2], req, site="a"),
                         S.site_icc(df[df.case_id >= 2], req, site="b")])
    assert rel_err(fed.table.to_numpy(), res.table.to_numpy()) < TOL
    assert (fed.n, fed.k) == (6, 4)


def test_icc_federated_equals_pooled(perturbed):
    req = S.icc_request(FEATS)
    aggs = [S.site_icc(t, req, site=s) for s, t in perturbed.items()]
    fed = S.combine_icc(aggs)
    pool = S.pooled_icc(pd.concat(list(perturbed.values()), ignore_index=True), req)
    assert list(fed.table.index) == FEATS and not fed.excluded
    assert rel_err(fed.table.to_numpy(), pool.table.to_numpy()) < TOL
    assert fed.n == sum(SIZES.values()) and fed.k == K
    # independent raw-sum formula (on the unit-scale features; the 1e5 one would cancel in it)
    allrows = pd.concat(list(perturbed.values()), ignore_index=True).sort_values(["case_id", "perturbation"])
    cube = allrows[FEATS].to_numpy().reshape(-1, K, P)
    ref = textbook_icc1(cube[:, :, :-1])
    assert np.max(np.abs(fed.icc.to_numpy()[:-1] - ref)) < 1e-9
    # ICC decreases with the perturbation noise and spans the robust threshold
    assert np.all(np.diff(fed.icc.to_numpy()[:-1]) < 0.02)
    robust = S.robust_features(fed, threshold=0.9)
    assert robust[0] == "f00" and "f10" not in robust and 0 < len(robust) < P
    assert S.robust_features(fed.icc.to_dict(), 0.9) == robust
    assert set(S.robust_features(fed.table["ci_low"], 0.9)) <= set(robust)
    for t, agg in zip(perturbed.values(), aggs):
        no_patient_dimension(agg, len(t))
        no_patient_dimension(agg, len(t) // K)


def test_icc_volume_keeps_precision(perturbed):
    """The 1e5-scale feature: site-centred sums give the same ICC as the same feature shifted to 0."""
    req = S.icc_request(["volume"])
    shifted = {s: t.assign(volume=t["volume"] - 1e5) for s, t in perturbed.items()}
    a = S.combine_icc([S.site_icc(t, req, site=s) for s, t in perturbed.items()]).icc["volume"]
    b = S.combine_icc([S.site_icc(t, req, site=s) for s, t in shifted.items()]).icc["volume"]
    assert abs(a - b) < 1e-9


def test_icc_guards(perturbed):
    req = S.icc_request(FEATS)
    t = perturbed["south"].copy()
    t.loc[t.index[:3], "f04"] = np.nan
    with pytest.raises(ValueError, match=r"feature 'f04' has 3 missing or infinite values at site 'south'"):
        S.site_icc(t, req, site="south")
    t = perturbed["south"].iloc[1:]                                     # one case loses a perturbation
    with pytest.raises(ValueError, match=r"unequal numbers of perturbations at site 'south' .*1 cases with k=4"):
        S.site_icc(t, req, site="south")
    a = S.site_icc(perturbed["north"], req, site="north")
    b = S.site_icc(perturbed["east"][perturbed["east"].perturbation < 4], req, site="east")
    with pytest.raises(ValueError, match="different numbers of perturbations"):
        S.combine_icc([a, b])
    with pytest.raises(ValueError, match="min_cell_size=100"):
        S.site_icc(perturbed["north"], req, site="north", min_cell_size=100)
    # a constant feature is excluded and reported, not a silent NaN; an exactly repeatable one has ICC 1
    const = {s: t.assign(f03=7.1, f05=t["case_id"].str[-3:].astype(float)) for s, t in perturbed.items()}
    res = S.combine_icc([S.site_icc(t, req, site=s) for s, t in const.items()])
    assert "f03" in res.excluded and "f03" not in res.table.index
    assert res.icc["f05"] == 1.0 and not res.table.isna().any().any()
    pool = S.pooled_icc(pd.concat(list(const.values())), req)
    assert pool.excluded.keys() == res.excluded.keys()
    with pytest.raises(ValueError, match="NaN"):
        S.robust_features({"a": 0.95, "b": np.nan})


# ------------------------------------------------------------------------------------------------
# 2. correlation and redundancy
# ------------------------------------------------------------------------------------------------
def test_correlation_federated_equals_corrcoef(sites, pooled):
    req = S.correlation_request(FEATS)
    aggs = [S.site_correlation(t, req, site=s) for s, t in sites.items()]
    fed = S.combine_correlation(aggs)
    ref = np.corrcoef(pooled[FEATS].to_numpy(), rowvar=False)
    assert np.max(np.abs(fed.corr.to_numpy() - ref)) < 1e-12
    assert np.max(np.abs(S.pooled_correlation(pooled, req).corr.to_numpy() - ref)) < 1e-12
    assert fed.n == len(pooled) and not fed.excluded
    sd = pooled[FEATS].std().to_numpy()
    assert np.max(np.abs(fed.mean.to_numpy() - pooled[FEATS].mean().to_numpy()) / sd) < 1e-12
    for t, agg in zip(sites.values(), aggs):
        no_patient_dimension(agg, len(t))


def test_correlation_constant_feature_excluded(sites, pooled):
    req = S.correlation_request(FEATS)
    const = {s: t.assign(f03=0.1) for s, t in sites.items()}
    fed = S.combine_correlation([S.site_correlation(t, req, site=s) for s, t in const.items()])
    assert list(fed.excluded) == ["f03"] and "f03" not in fed.corr.index
    assert not fed.corr.isna().any().any()
    keep = [f for f in FEATS if f != "f03"]
    assert np.max(np.abs(fed.corr.to_numpy() - np.corrcoef(pooled[keep].to_numpy(), rowvar=False))) < 1e-12
    # constant within each site but different between sites: varies in the pooled data, kept
    step = {s: t.assign(f03=float(i)) for i, (s, t) in enumerate(sites.items())}
    fed = S.combine_correlation([S.site_correlation(t, req, site=s) for s, t in step.items()])
    ref = np.corrcoef(pd.concat(list(step.values()))[FEATS].to_numpy(), rowvar=False)
    assert not fed.excluded and np.max(np.abs(fed.corr.to_numpy() - ref)) < 1e-12


def test_drop_redundant_rules():
    names = ["a", "b", "c", "d", "e"]
    r = np.eye(5)
    r[0, 1] = r[1, 0] = 0.95            # a ~ b
    r[1, 2] = r[2, 1] = -0.97           # b ~ c (negative)
    r[3, 4] = r[4, 3] = 0.91            # d ~ e, equal association -> first in corr order wins
    corr = pd.DataFrame(r, index=names, columns=names)
    assoc = {"a": 1.0, "b": 3.0, "c": -2.0, "d": 0.5, "e": 0.5}
    kept, dropped = S.drop_redundant(corr, assoc, threshold=0.9)
    # b (most associated) is kept; a and c go in its favour; d beats e on the tie
    assert kept == ["b", "d"]
    assert dropped == [("c", "b", -0.97), ("a", "b", 0.95), ("e", "d", 0.91)]
    kept, dropped = S.drop_redundant(corr, assoc, threshold=0.96)
    assert kept == ["a", "b", "d", "e"] and dropped == [("c", "b", -0.97)]
    with pytest.raises(ValueError, match="association missing"):
        S.drop_redundant(corr, {"a": 1.0}, 0.9)
    bad = corr.copy()
    bad.iloc[0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        S.drop_redundant(bad, assoc, 0.9)


def test_drop_redundant_on_federated_stats(sites):
    corr = S.combine_correlation([S.site_correlation(t, S.correlation_request(FEATS), site=s)
                                  for s, t in sites.items()])
    score = S.combine_logistic_score([S.site_logistic_score(t, S.logistic_score_request(FEATS, "response"), site=s)
                                      for s, t in sites.items()])
    kept, dropped = S.drop_redundant(corr, score.association, threshold=0.9)
    c = corr.corr.loc[kept, kept].to_numpy()
    assert np.all(np.abs(c[~np.eye(len(kept), dtype=bool)]) <= 0.9)
    assert {d for d, _, _ in dropped} | set(kept) == set(FEATS)
    for d, k, r in dropped:
        assert k in kept and abs(r) > 0.9 and score.association[k] >= score.association[d]
    assert any({d, k} == {"f00", "f01"} for d, k, _ in dropped)
    assert S.drop_redundant(corr, score.association, 0.9) == (kept, dropped)     # deterministic


# ------------------------------------------------------------------------------------------------
# 3. univariate score tests
# ------------------------------------------------------------------------------------------------
def direct_logistic_score(sites: dict, feature: str, stratified: bool) -> tuple[float, float]:
    """Independent textbook computation of (U, Var) from the rows."""
    if not stratified:
        df = pd.concat(list(sites.values()))
        x, y = df[feature].to_numpy(), df["response"].to_numpy(float)
        return float(np.sum(x * (y - y.mean()))), float(y.mean() * (1 - y.mean()) * np.sum((x - x.mean()) ** 2))
    u = v = 0.0
    for t in sites.values():
        x, y = t[feature].to_numpy(), t["response"].to_numpy(float)
        u += np.sum((x - x.mean()) * (y - y.mean()))
        v += y.mean() * (1 - y.mean()) * np.sum((x - x.mean()) ** 2)
    return float(u), float(v)


def lr_pvalues(pooled: pd.DataFrame, stratified: bool) -> np.ndarray:
    """Likelihood-ratio test per feature from unpenalized sklearn logistic fits."""
    from sklearn.linear_model import LogisticRegression

    y = pooled["response"].to_numpy()
    dummies = pd.get_dummies(pooled["site"], drop_first=True, dtype=float).to_numpy() if stratified \
        else np.zeros((len(y), 0))

    def loglik(design):
        if design.shape[1] == 0:
            mu = np.full(len(y), y.mean())
        else:
            m = LogisticRegression(C=np.inf, solver="lbfgs", tol=1e-12, max_iter=10000).fit(design, y)
            mu = m.predict_proba(design)[:, 1]
        return float(np.sum(y * np.log(mu) + (1 - y) * np.log1p(-mu)))

    ll0 = loglik(dummies)
    out = []
    for f in FEATS:
        x = pooled[f].to_numpy()
        x = ((x - x.mean()) / x.std())[:, None]
        out.append(scipy.stats.chi2.sf(2 * (loglik(np.hstack([x, dummies])) - ll0), 1))
    return np.array(out)


@pytest.mark.parametrize("stratified", [True, False], ids=["stratified", "global"])
def test_logistic_score_federated_equals_pooled(sites, pooled, stratified):
    req = S.logistic_score_request(FEATS, "response")
    aggs = [S.site_logistic_score(t, req, site=s) for s, t in sites.items()]
    fed = S.combine_logistic_score(aggs, stratified=stratified)
    pool = S.pooled_logistic_score(pooled, req, strata="site" if stratified else None)
    assert rel_err(fed.table.to_numpy(), pool.table.to_numpy()) < TOL
    for f in FEATS:
        u, v = direct_logistic_score(sites, f, stratified)
        assert fed.table.loc[f, "score"] == pytest.approx(u, rel=TOL, abs=TOL)
        assert fed.table.loc[f, "variance"] == pytest.approx(v, rel=TOL)
        assert fed.z[f] == pytest.approx(u / np.sqrt(v), rel=TOL, abs=TOL)
    assert fed.n == len(pooled) and fed.n_events == int(pooled["response"].sum())
    assert fed.stratified is stratified and not fed.uninformative
    # the score and the likelihood-ratio test agree asymptotically
    lr = lr_pvalues(pooled, stratified)
    lp_score, lp_lr = np.log(fed.pvalues.to_numpy()), np.log(lr)
    assert np.corrcoef(lp_score, lp_lr)[0, 1] > 0.99
    weak = lr > 1e-3                    # away from the tail the two tests nearly coincide
    assert weak.sum() >= 3 and np.max(np.abs(np.log10(fed.pvalues.to_numpy()[weak]) - np.log10(lr[weak]))) < 0.1
    for t, agg in zip(sites.values(), aggs):
        no_patient_dimension(agg, len(t))


def test_logistic_score_stratification_matters(sites):
    """A feature equal to the site index separates sites only: significant against a global intercept
    (sites differ in response rate), uninformative (p = 1, reported) against site intercepts."""
    req = S.logistic_score_request(["f00", "siteidx", "const"], "response")
    tabs = {s: t.assign(siteidx=float(i), const=2.5) for i, (s, t) in enumerate(sites.items())}
    aggs = [S.site_logistic_score(t, req, site=s) for s, t in tabs.items()]
    strat = S.combine_logistic_score(aggs, stratified=True)
    glob = S.combine_logistic_score(aggs, stratified=False)
    assert strat.pvalues["siteidx"] == 1.0 and strat.z["siteidx"] == 0.0
    assert set(strat.uninformative) == {"siteidx", "const"}
    assert glob.pvalues["siteidx"] < 1e-6 and set(glob.uninformative) == {"const"}
    assert glob.pvalues["const"] == 1.0 and not glob.table.isna().any().any()
    pool = pd.concat(list(tabs.values()))
    for res, strata in ((strat, "site"), (glob, None)):
        ref = S.pooled_logistic_score(pool, req, strata=strata)
        assert rel_err(res.table.to_numpy(), ref.table.to_numpy()) < TOL
        assert ref.uninformative.keys() == res.uninformative.keys()


def _cox_reqs():
    return {ties: S.cox_score_request(FEATS, "os_time", "os_event", ties=ties) for ties in ("efron", "breslow")}


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_score_federated_equals_pooled(sites, pooled, ties):
    req = _cox_reqs()[ties]
    aggs = [S.site_cox_score(t, req, site=s) for s, t in sites.items()]
    fed = S.combine_cox_score(aggs)
    pool = S.pooled_cox_score(pooled, req, strata="site")
    assert rel_err(fed.table.to_numpy(), pool.table.to_numpy()) < TOL
    assert fed.ties == ties and fed.n_events == int(pooled["os_event"].sum())
    assert pooled.groupby("site")["os_time"].apply(lambda t: t.duplicated().sum()).min() > 10   # real ties
    for t, agg in zip(sites.values(), aggs):
        no_patient_dimension(agg, len(t))


def test_cox_efron_score_equals_lifelines_derivatives(sites):
    """Efron score and information at beta = 0 equal lifelines' own Efron gradient and -Hessian
    (summed over strata), computed one feature at a time."""
    pytest.importorskip("lifelines")
    from lifelines.fitters.coxph_fitter import SemiParametricPHFitter

    fed = S.combine_cox_score([S.site_cox_score(t, _cox_reqs()["efron"], site=s) for s, t in sites.items()])
    fitter = SemiParametricPHFitter()
    grad, info = np.zeros(P), np.zeros(P)
    for t in sites.values():
        t = t.sort_values("os_time", kind="stable").reset_index(drop=True)
        x = t[FEATS] - t[FEATS].mean()
        h, g, _ = fitter._get_efron_values_single(x, t["os_time"], t["os_event"], pd.Series(np.ones(len(t))),
                                                  None, np.zeros(P))
        grad += g
        info += -np.diag(h)
    assert rel_err(fed.table["score"], grad) < TOL
    assert rel_err(fed.table["variance"], info) < TOL


def test_cox_score_close_to_lifelines_wald(sites, pooled):
    """For a continuous x the score z approximately equals the Wald z of the 1-feature
    site-stratified lifelines fit (Efron ties); not equal (different test)."""
    from lifelines import CoxPHFitter

    fed = S.combine_cox_score([S.site_cox_score(t, _cox_reqs()["efron"], site=s) for s, t in sites.items()])
    wald = []
    for f in FEATS:
        d = pooled[[f, "os_time", "os_event", "site"]].copy()
        d[f] = (d[f] - d[f].mean()) / d[f].std()
        wald.append(CoxPHFitter().fit(d, "os_time", "os_event", strata=["site"]).summary.loc[f, "z"])
    wald = np.array(wald)
    z = fed.z.to_numpy()
    assert np.all(np.abs(z - wald) <= 0.03 * np.abs(wald) + 0.02), np.c_[z, wald]
    assert np.abs(z).max() > 3          # a real effect is present (f-features load on the survival factor)


def test_cox_breslow_without_ties_is_logrank(sites):
    """Breslow score test of a binary x, one stratum, untied times == lifelines' log-rank test."""
    from lifelines.statistics import logrank_test

    t = sites["west"].copy()
    rng = np.random.default_rng(3)
    t["os_time"] = t["os_time"] + rng.uniform(0, 0.5, len(t))          # break ties
    t["grp"] = (t["f02"] > t["f02"].median()).astype(float)
    req = S.cox_score_request(["grp"], "os_time", "os_event", ties="breslow")
    res = S.combine_cox_score([S.site_cox_score(t, req, site="west")])
    g = t["grp"] == 1
    lr = logrank_test(t.os_time[g], t.os_time[~g], t.os_event[g], t.os_event[~g])
    assert res.table.loc["grp", "chi2"] == pytest.approx(lr.test_statistic, rel=1e-10)
    assert res.pvalues["grp"] == pytest.approx(lr.p_value, rel=1e-8)
    efron = S.combine_cox_score([S.site_cox_score(t, {**req, "ties": "efron"}, site="west")])
    assert efron.table.loc["grp", "chi2"] == pytest.approx(lr.test_statistic, rel=1e-10)


def test_cox_guards(sites):
    req = _cox_reqs()["efron"]
    t = sites["east"].copy()
    t.loc[t.index[:2], "os_time"] = np.nan
    with pytest.raises(ValueError, match=r"time column 'os_time' has 2 missing .* at site 'east'"):
        S.site_cox_score(t, req, site="east")
    t = sites["east"].assign(os_event=2)
    with pytest.raises(ValueError, match=r"event column 'os_event' at site 'east' must be 0/1"):
        S.site_cox_score(t, req, site="east")
    # a feature constant at one site only still contributes from the others; constant everywhere -> p = 1
    tabs = {s: t.assign(f03=1e5, f04=(0.0 if s == "north" else t["f04"])) for s, t in sites.items()}
    res = S.combine_cox_score([S.site_cox_score(t, req, site=s) for s, t in tabs.items()])
    assert list(res.uninformative) == ["f03"] and res.pvalues["f03"] == 1.0 and res.pvalues["f04"] < 1
    ref = S.pooled_cox_score(pd.concat(list(tabs.values())), req, strata="site")
    assert rel_err(res.table.to_numpy(), ref.table.to_numpy()) < TOL
    none = [S.site_cox_score(t.assign(os_event=0), req, site=s) for s, t in sites.items()]
    with pytest.raises(ValueError, match="no events"):
        S.combine_cox_score(none)


def test_nan_feature_named_with_site_and_count(sites):
    t = sites["west"].copy()
    t.loc[t.index[[3, 9, 27]], "f07"] = np.nan
    for fn, req in ((S.site_logistic_score, S.logistic_score_request(FEATS, "response")),
                    (S.site_correlation, S.correlation_request(FEATS)),
                    (S.site_cox_score, _cox_reqs()["breslow"])):
        with pytest.raises(ValueError,
                           match=r"feature 'f07' has 3 missing or infinite values at site 'west' \(of 146 rows\)"):
            fn(t, req, site="west")
    with pytest.raises(ValueError, match=r"outcome 'response' at site 'west' must be 0/1"):
        S.site_logistic_score(sites["west"].assign(response=t["response"] * 2),
                              S.logistic_score_request(FEATS, "response"), site="west")


# ------------------------------------------------------------------------------------------------
# Benjamini-Hochberg
# ------------------------------------------------------------------------------------------------
def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(5)
    for m in (1, 2, 7, 50, 300):
        p = np.concatenate([rng.uniform(size=m // 2), rng.uniform(0, 1e-3, size=m - m // 2)])
        p[: m // 5] = p[m // 5: 2 * (m // 5)]                             # ties
        if m > 3:
            p[-1] = 1.0
        q = S.benjamini_hochberg(p)
        assert np.array_equal(q, scipy.stats.false_discovery_control(p, method="bh")) or \
            np.max(np.abs(q - scipy.stats.false_discovery_control(p, method="bh"))) < 1e-15
    s = pd.Series([0.01, 0.04, 0.03, 0.2], index=list("abcd"))
    q = S.benjamini_hochberg(s)
    assert isinstance(q, pd.Series) and list(q.index) == list("abcd")
    # sorted a, c, b, d: m p / rank = 0.04, 0.06, 0.0533, 0.2 -> running minimum from the top
    assert q.to_numpy() == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2], rel=1e-14)
    assert S.benjamini_hochberg(s.to_dict()) == q.to_dict()
    assert S.screen(s, fdr=0.05) == ["a"]
    assert S.screen(s, fdr=0.06) == ["a", "b", "c"]
    assert S.screen(s, fdr=0.01) == []
    assert S.screen(s.to_numpy(), fdr=0.06) == [0, 1, 2]
    with pytest.raises(ValueError, match="NaN"):
        S.benjamini_hochberg([0.1, np.nan])


def test_screen_on_federated_score(sites):
    res = S.combine_logistic_score([S.site_logistic_score(t, S.logistic_score_request(FEATS, "response"), site=s)
                                    for s, t in sites.items()])
    sel = S.screen(res, fdr=0.05)
    q = scipy.stats.false_discovery_control(res.pvalues.to_numpy(), method="bh")
    assert sel == [f for f, v in zip(FEATS, q) if v <= 0.05] and len(sel) > 0


# ------------------------------------------------------------------------------------------------
# 4. penalty path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_c_min_matches_sklearn(sites, pooled, l1_ratio):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    aggs = [S.site_logistic_score(t, S.logistic_score_request(FEATS, "response"), site=s) for s, t in sites.items()]
    c_min = S.c_min_logistic(aggs, l1_ratio=l1_ratio)
    x = StandardScaler().fit_transform(pooled[FEATS].to_numpy())
    y = pooled["response"].to_numpy()
    u = x.T @ (y - y.mean())
    assert c_min == pytest.approx(l1_ratio / np.abs(u).max(), rel=1e-10)

    def coef(c):
        return LogisticRegression(C=c, l1_ratio=l1_ratio, solver="saga", tol=1e-10,
                                  max_iter=100000).fit(x, y).coef_.ravel()

    assert np.all(coef(0.99 * c_min) == 0)
    above = coef(1.02 * c_min)
    assert np.count_nonzero(above) >= 1 and np.abs(above).max() > 1e-4
    assert S.lambda_max_logistic(aggs, l1_ratio=l1_ratio) == pytest.approx(1 / (len(y) * c_min), rel=1e-12)
    grid = S.penalty_grid(c_min, n=20, ratio=1e3)
    assert grid.shape == (20,) and grid[0] == pytest.approx(c_min) and grid[-1] == pytest.approx(1e3 * c_min)
    assert np.allclose(np.diff(np.log(grid)), np.log(1e3) / 19)


# ------------------------------------------------------------------------------------------------
# batching: one round trip for several statistics
# ------------------------------------------------------------------------------------------------
def test_batch_one_round(sites, perturbed):
    reqs = {"icc": S.icc_request(FEATS), "corr": S.correlation_request(FEATS),
            "logit": S.logistic_score_request(FEATS, "response"), "cox": _cox_reqs()["efron"]}
    replies = [S.site_batch(sites[s], reqs, site=s, perturbed_rows=perturbed[s]) for s in SIZES]
    out = S.combine_batch(replies)
    assert out["icc"].table.equals(S.combine_icc([r["icc"] for r in replies]).table)
    assert out["corr"].corr.equals(S.combine_correlation([r["corr"] for r in replies]).corr)
    assert out["logit"].stratified and out["cox"].ties == "efron"
    for s, r in zip(SIZES, replies):
        no_patient_dimension(r, SIZES[s])
        no_patient_dimension(r, len(perturbed[s]))
    with pytest.raises(ValueError, match="perturbed_rows"):
        S.site_batch(sites["north"], reqs, site="north")


# ------------------------------------------------------------------------------------------------
# real multi-site table: UCI heart disease by hospital
# ------------------------------------------------------------------------------------------------
HEART_COLS = "age sex cp trestbps chol fbs restecg thalach exang oldpeak slope ca thal num".split()
HOSPITALS = ["cleveland", "hungarian", "switzerland", "va"]
HEART_FEATS = ["age", "trestbps", "chol", "thalach", "oldpeak"]


def load_heart() -> dict[str, pd.DataFrame]:
    root = shared_path("multisite-tabular", "uci-heart-disease")
    out = {}
    for h in HOSPITALS:
        df = pd.read_csv(Path(root) / f"processed.{h}.data", header=None, names=HEART_COLS, na_values="?")
        out[h] = df.assign(disease=(df["num"] > 0).astype(int), hospital=h)
    return out


def test_heart_disease_by_hospital():
    raw = load_heart()
    logit = S.logistic_score_request(HEART_FEATS, "disease")
    with pytest.raises(ValueError, match=r"feature 'trestbps' has 1 missing .* at site 'hungarian' \(of 294 rows\)"):
        S.site_logistic_score(raw["hungarian"], logit, site="hungarian")
    tabs = {h: t.dropna(subset=HEART_FEATS) for h, t in raw.items()}
    pooled = pd.concat(list(tabs.values()), ignore_index=True)
    aggs = [S.site_logistic_score(t, logit, site=h) for h, t in tabs.items()]
    for stratified in (True, False):
        fed = S.combine_logistic_score(aggs, stratified=stratified)
        ref = S.pooled_logistic_score(pooled, logit, strata="hospital" if stratified else None)
        assert rel_err(fed.table.to_numpy(), ref.table.to_numpy()) < TOL
        assert not fed.uninformative
    # Switzerland recorded chol = 0 for everyone: it adds nothing to the stratified chol test
    sw = next(a for a in aggs if a["site"] == "switzerland")
    assert sw["sxx"][HEART_FEATS.index("chol")] == 0.0 and sw["sxy"][HEART_FEATS.index("chol")] == 0.0
    strat = S.combine_logistic_score(aggs, stratified=True)
    assert strat.pvalues["oldpeak"] < 1e-10 and strat.pvalues["thalach"] < 1e-10
    corr = S.combine_correlation([S.site_correlation(t, S.correlation_request(HEART_FEATS), site=h)
                                  for h, t in tabs.items()])
    assert np.max(np.abs(corr.corr.to_numpy() - np.corrcoef(pooled[HEART_FEATS].to_numpy(), rowvar=False))) < 1e-12
    for t, a in zip(tabs.values(), aggs):
        no_patient_dimension(a, len(t))
