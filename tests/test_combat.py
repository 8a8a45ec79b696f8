"""Tests for fedrad.common.combat: pooled ComBat against neuroCombat 0.2.12, federated == pooled,
the unseen-site path, the guards, and a real multi-site table (UCI heart disease by hospital).

Errors are measured *relative to each feature's spread*: ``max_ij |a_ij - b_ij| / sd_j(b)``, which
is stricter than elementwise relative error for large-valued features (1e5 + small variations).
neuroCombat casts continuous covariates to float32, so the synthetic covariates are
float32-representable; it takes features x samples, hence the transposes.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrad.common.combat import (
    ComBat,
    ComBatReference,
    CombatError,
    MissingValueError,
    SingularDesignError,
    SmallBatchError,
    UnknownLevelError,
    apply_combat,
    combine_combat_stats,
    fit_federated,
    make_request,
    site_combat_stats,
)

from .conftest import shared_path

SITES = {"A": 40, "B": 55, "C": 30, "D": 45}
CONT, CAT = ["age"], ["sex", "grade"]
TOL = 1e-8

# (id, options) for every neuroCombat mode
OPTIONS = [
    ("parametric", {}),
    ("nonparametric", {"parametric": False}),
    ("mean_only", {"mean_only": True}),
    ("mean_only-nonparametric", {"mean_only": True, "parametric": False}),
    ("no-eb", {"eb": False}),
    ("no-eb-mean_only", {"eb": False, "mean_only": True}),
    ("ref", {"ref_batch": "B"}),
    ("ref-nonparametric", {"ref_batch": "C", "parametric": False}),
    ("ref-mean_only", {"ref_batch": "B", "mean_only": True}),
    ("ref-no-eb", {"ref_batch": "D", "eb": False}),
]
OPT_IDS = [o[0] for o in OPTIONS]
OPT_VALUES = [o[1] for o in OPTIONS]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def scaled_err(a, b, scale=None) -> float:
    """max_j max_i |a_ij - b_ij| / sd_j(scale) (default scale = b) over features with spread."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    sd = np.asarray(b if scale is None else scale, dtype=float).std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return float(np.max(np.abs(a - b) / sd))


def rel_err(a, b, floor: float = 1e-12) -> float:
    """max |a - b| / max(|b|, floor) elementwise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor)))


def make_cohort(seed: int = 0, sizes: dict = SITES, n_features: int = 12, offset: float = 100.0,
                noise: float = 3.0, shift_sd: float = 3.0):
    """Synthetic multi-site cohort with real batch effects (site shifts and scales) and covariates
    correlated with site (age mean, sex ratio).  'grade' level 3 is absent at C and the global
    baseline level 1 absent at D (exercises the federated level mapping)."""
    rng = np.random.default_rng(seed)
    parts = []
    for k, (site, n) in enumerate(sizes.items()):
        age = rng.normal(45 + 5 * k, 10, n).astype(np.float32).astype(float)
        p_f = 0.25 + 0.5 * k / max(1, len(sizes) - 1)
        sex = rng.choice(["F", "M"], n, p=[p_f, 1 - p_f])
        grades = [1, 2] if site == "C" else [2, 3] if site == "D" else [1, 2, 3]
        grade = rng.choice(grades, n)
        parts.append(pd.DataFrame({"site": site, "age": age, "sex": sex, "grade": grade}))
    cov = pd.concat(parts, ignore_index=True)
    k_of = {s: i for i, s in enumerate(sizes)}
    b = cov["site"].map(k_of).to_numpy()
    f = n_features
    base = offset + rng.normal(0, 20, f)
    eff_age, eff_sex, eff_grade = rng.normal(0, 0.3, f), rng.normal(0, 3, f), rng.normal(0, 2, f)
    shift = rng.normal(0, shift_sd, (len(sizes), f))
    scale = rng.uniform(0.6, 1.6, (len(sizes), f))
    y = (base + np.outer(cov["age"], eff_age) + np.outer(cov["sex"] == "M", eff_sex)
         + np.outer(cov["grade"], eff_grade) + shift[b] + scale[b] * rng.normal(0, noise, (len(cov), f)))
    return cov, y, [f"f{j}" for j in range(f)]


def site_tables(cov: pd.DataFrame, y: np.ndarray, names: list, col: str = "site") -> dict:
    full = pd.concat([cov.reset_index(drop=True), pd.DataFrame(y, columns=names)], axis=1)
    return {s: full[full[col] == s].reset_index(drop=True) for s in pd.unique(full[col])}


def stack_sites(harmonized: dict, names: list, order) -> np.ndarray:
    return np.vstack([harmonized[s][names].to_numpy() for s in order])


@pytest.fixture
def neurocombat(monkeypatch):
    """neuroCombat with numpy-2 shim (its ref_batch path uses the removed ``np.int``), quiet."""
    monkeypatch.setattr(np, "int", int, raising=False)
    from neuroCombat import neuroCombat

    def run(y, cov, batch_col="site", categorical=CAT, continuous=CONT, **opts):
        with contextlib.redirect_stdout(io.StringIO()):
            return neuroCombat(np.ascontiguousarray(y.T), cov.copy(), batch_col, categorical_cols=list(categorical),
                               continuous_cols=list(continuous), **opts)
    return run


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(0)


# ------------------------------------------------------------------------------------------------
# 1. pooled ComBat == neuroCombat
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", OPT_VALUES, ids=OPT_IDS)
def test_pooled_matches_neurocombat(cohort, neurocombat, opts):
    cov, y, names = cohort
    nc = neurocombat(y, cov, **opts)
    est = nc["estimates"]
    model = ComBat(CONT, CAT, **opts)
    out = model.fit_transform(pd.DataFrame(y, columns=names), "site", cov)
    assert list(out.columns) == names and not model.excluded_features_
    assert model.batches_ == list(est["batches"]) or model.batches_ == sorted(SITES)
    assert scaled_err(out.to_numpy(), nc["data"].T) < TOL
    assert rel_err(out.to_numpy(), nc["data"].T) < TOL
    # standardization pieces
    assert rel_err(model.var_pooled_, est["var.pooled"][:, 0]) < TOL
    assert rel_err(model.grand_mean_, est["stand.mean"][:, 0]) < TOL
    d = model.reference_.encode(cov)
    assert scaled_err(d @ model.coef_, est["mod.mean"].T) < TOL
    # per-batch estimates and priors
    ref = opts.get("ref_batch")
    for k, b in enumerate(model.batches_):
        if b == ref:   # neuroCombat's ref-batch gamma_hat is the (~1e-16) mean of its residuals
            assert np.abs(model.gamma_hat_[k] - est["gamma_hat"][k]).max() < 1e-10
            assert (model.gamma_star_[k] == 0).all() and (model.delta_star_[k] == 1).all()
            continue
        assert rel_err(model.gamma_hat_[k], est["gamma_hat"][k]) < TOL
        assert rel_err(model.delta_hat_[k], np.asarray(est["delta_hat"][k], dtype=float)) < TOL
        assert rel_err(model.gamma_bar_[k], est["gamma_bar"][k]) < TOL
        assert rel_err(model.t2_[k], est["t2"][k]) < TOL
        if not opts.get("mean_only"):
            assert rel_err(model.a_prior_[k], est["a_prior"][k]) < TOL
            assert rel_err(model.b_prior_[k], est["b_prior"][k]) < TOL
        assert rel_err(model.gamma_star_[k], est["gamma.star"][k]) < TOL
        assert rel_err(model.delta_star_[k], est["delta.star"][k]) < TOL
    if ref is not None:   # reference batch unchanged
        i = (cov["site"] == ref).to_numpy()
        assert np.array_equal(out.to_numpy()[i], y[i])


def test_pooled_ndarray_and_transform(cohort):
    cov, y, names = cohort
    model = ComBat(CONT, CAT).fit(y, cov["site"].to_numpy(), cov)
    out = model.transform(y, cov["site"].to_numpy(), cov)
    assert isinstance(out, np.ndarray) and out.shape == y.shape
    # transform on a subset of seen batches uses the fitted posteriors
    i = (cov["site"] == "C").to_numpy()
    sub = model.transform(y[i], cov["site"].to_numpy()[i], cov[i])
    assert scaled_err(sub, out[i]) < 1e-12
    with pytest.raises(UnknownLevelError, match="batch 'Z' was not in the fit"):
        model.transform(y[:3], ["Z"] * 3, cov.iloc[:3])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonparametric_no_underflow_where_neurocombat_gives_nan(neurocombat):
    """neuroCombat's int_eprior computes exp(-sum2/2d) directly and underflows to 0/0 = NaN when
    batch effects are large; the log-domain version stays finite and agrees everywhere else."""
    cov, y, names = make_cohort(0, shift_sd=8.0)
    nc = neurocombat(y, cov, ref_batch="C", parametric=False)["data"].T
    assert np.isnan(nc).any()
    out = ComBat(CONT, CAT, ref_batch="C", parametric=False).fit_transform(y, "site", cov)
    assert np.isfinite(out).all()
    ok = np.isfinite(nc).all(axis=0)
    assert ok.sum() >= len(names) - 2
    assert scaled_err(out[:, ok], nc[:, ok]) < TOL


# ------------------------------------------------------------------------------------------------
# 2. federated == pooled
# ------------------------------------------------------------------------------------------------
def _assert_fed_equals_pooled(fed, model, out_pooled, cov, names, order, tol=TOL):
    """Reference (fitted means grand + x.beta, pooled variance) to 1e-10, outputs to ``tol``."""
    ref = fed.reference
    assert ref.batches == model.batches_ and ref.batch_sizes == model.batch_sizes_
    assert ref.excluded_features == model.excluded_features_
    out_pooled = np.asarray(out_pooled)
    d = model.reference_.encode(cov)
    np.testing.assert_array_equal(ref.encode(cov), d)
    # beta and the grand mean are only jointly determined when a covariate is large-valued
    assert scaled_err(ref.grand_mean + d @ ref.coef, model.grand_mean_ + d @ model.coef_, scale=out_pooled) < 1e-10
    assert rel_err(ref.var_pooled, model.var_pooled_) < 1e-10
    fed_out = stack_sites(fed.harmonized, names, order)
    idx = np.concatenate([np.flatnonzero((cov["site"] == s).to_numpy()) for s in order])
    err = scaled_err(fed_out, out_pooled[idx])
    assert err < tol, err
    return err


@pytest.mark.parametrize("opts", OPT_VALUES, ids=OPT_IDS)
def test_federated_equals_pooled(cohort, opts):
    cov, y, names = cohort
    model = ComBat(CONT, CAT, **opts)
    out = model.fit_transform(y, "site", cov)
    fed = fit_federated(site_tables(cov, y, names), names, CONT + CAT, CAT, **opts)
    assert fed.round_trips <= 2
    _assert_fed_equals_pooled(fed, model, out, cov, names, list(SITES))
    for site, adj in fed.adjustments.items():   # site-local EB == pooled per-batch EB
        a, p = adj[site], model.adjustments_[site]
        assert a.n_iter == p.n_iter
        assert scaled_err(a.gamma_star, p.gamma_star) < TOL and rel_err(a.delta_star, p.delta_star) < TOL


@pytest.mark.parametrize("opts", [{}, {"parametric": False}, {"ref_batch": "A"}, {"mean_only": True}],
                         ids=["parametric", "nonparametric", "ref", "mean_only"])
def test_federated_large_valued_features(opts):
    """Features such as volumes (1e5 mm3 + variations of ~1): federated == pooled, and ComBat is
    shift-equivariant, ComBat(Y + c) = ComBat(Y) + c, to 1e-8 of the features' spread."""
    cov, y, names = make_cohort(3, n_features=10, offset=0.0, noise=1.0, shift_sd=1.0)
    big = y + 1e5
    model = ComBat(CONT, CAT, **opts)
    out_big = model.fit_transform(big, "site", cov)
    out_small = ComBat(CONT, CAT, **opts).fit_transform(y, "site", cov)
    assert scaled_err(out_big - 1e5, out_small) < TOL
    fed = fit_federated(site_tables(cov, big, names), names, CONT, CAT, **opts)
    _assert_fed_equals_pooled(fed, model, out_big, cov, names, list(SITES))
    fed_small = fit_federated(site_tables(cov, y, names), names, CONT, CAT, **opts)
    assert scaled_err(stack_sites(fed.harmonized, names, SITES) - 1e5,
                      stack_sites(fed_small.harmonized, names, SITES)) < TOL


def test_large_valued_covariate_and_many_sites():
    """Six sites, a continuous covariate in the 1e5 range (e.g. a volume), federated == pooled."""
    sizes = {f"H{i}": n for i, n in enumerate([25, 31, 18, 40, 22, 35])}
    cov, y, names = make_cohort(5, sizes=sizes, n_features=8)
    cov["grade"] = np.random.default_rng(1).choice([1, 2, 3], len(cov))
    cov["vol"] = (1e5 + np.random.default_rng(2).normal(0, 50, len(cov))).astype(np.float32).astype(float)
    y = y + 0.05 * (cov["vol"].to_numpy() - 1e5)[:, None]
    model = ComBat(["age", "vol"], CAT)
    out = model.fit_transform(y, "site", cov)
    fed = fit_federated(site_tables(cov, y, names), names, ["age", "vol"], CAT)
    _assert_fed_equals_pooled(fed, model, out, cov, names, list(sizes))


def test_site_with_two_batches(cohort):
    """A hospital with two scanners: batch_col names the batch; each batch is harmonized at its site."""
    cov, y, names = cohort
    cov = cov.copy()
    rng = np.random.default_rng(7)
    cov["scanner"] = cov["site"] + np.where((cov["site"] == "B") & (rng.random(len(cov)) < 0.5), "2", "1")
    y = y + np.where(cov["scanner"] == "B2", 4.0, 0.0)[:, None]
    cov["hospital"] = cov["site"]
    model = ComBat(CONT, CAT)
    out = model.fit_transform(y, "scanner", cov)
    tables = site_tables(cov, y, names, col="hospital")
    fed = fit_federated(tables, names, CONT, CAT, batch_col="scanner")
    assert fed.reference.batches == ["A1", "B1", "B2", "C1", "D1"]
    fed_out = stack_sites(fed.harmonized, names, list(SITES))
    idx = np.concatenate([np.flatnonzero((cov["hospital"] == s).to_numpy()) for s in SITES])
    assert scaled_err(fed_out, out[idx]) < TOL
    assert set(fed.adjustments["B"]) == {"B1", "B2"}


def test_protocol_messages_are_aggregates(cohort):
    """Two round trips; every message is strict JSON; a site's upload has no per-patient values:
    its array sizes do not depend on n and it is invariant to the order of the rows."""
    cov, y, names = cohort
    tables = site_tables(cov, y, names)
    fed = fit_federated(tables, names, CONT, CAT)
    assert fed.round_trips == 2
    request = make_request(names, CONT, CAT)
    for site, up in fed.uploads.items():
        json.dumps(up, allow_nan=False)
        (entry,) = up["batches"]
        p_local = sum(len(v) - 1 for v in entry["levels"].values()) + len(CONT)
        assert len(entry["R"]) <= p_local and all(len(r) == p_local for r in entry["R"])
        assert len(entry["Z"]) == len(entry["R"]) and all(len(z) == len(names) for z in entry["Z"])
        assert len(entry["rss"]) == len(entry["mean"]) == len(names)
        shuffled = tables[site].sample(frac=1.0, random_state=3).reset_index(drop=True)
        again = site_combat_stats(shuffled, request, site=site)["batches"][0]
        for key in ("mean", "cont_mean", "R", "Z", "rss"):
            np.testing.assert_allclose(np.asarray(again[key]), np.asarray(entry[key]), rtol=1e-10, atol=1e-10)
        assert again["level_counts"] == entry["level_counts"]
    for summary in fed.summaries.values():
        json.dumps(summary, allow_nan=False)
    # the reference message is plain JSON and round-trips exactly
    d = json.loads(json.dumps(fed.reference.to_dict(), allow_nan=False))
    back = ComBatReference.from_dict(d)
    assert back.to_dict() == fed.reference.to_dict()
    assert back.categorical == {"sex": ["F", "M"], "grade": [1, 2, 3]}
    assert back.design_columns == ["sex=M", "grade=2", "grade=3", "age"]


def test_server_combines_messages_directly(cohort):
    """combine_combat_stats is a pure function of the JSON messages (order of sites irrelevant)."""
    cov, y, names = cohort
    tables = site_tables(cov, y, names)
    req = make_request(names, CONT, CAT, ref_batch="D")
    ups = [json.loads(json.dumps(site_combat_stats(t, req, site=s))) for s, t in tables.items()]
    r1 = combine_combat_stats(ups, req)
    r2 = combine_combat_stats(ups[::-1], req)
    assert r1.batches == r2.batches == ["A", "B", "C", "D"]
    assert rel_err(r1.var_pooled, r2.var_pooled) < 1e-13 and rel_err(r1.grand_mean, r2.grand_mean) < 1e-13


# ------------------------------------------------------------------------------------------------
# 3. unseen site
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", OPT_VALUES, ids=OPT_IDS)
def test_unseen_site_path_reproduces_fit_for_fitted_batch(cohort, opts):
    """EB priors are per batch, so harmonizing a fitted batch's own rows with only the reference
    (the path an unseen site takes) reproduces the pooled fit's values for that batch."""
    cov, y, names = cohort
    model = ComBat(CONT, CAT, **opts)
    out = model.fit_transform(pd.DataFrame(y, columns=names), "site", cov)
    tables = site_tables(cov, y, names)
    msg = json.loads(json.dumps(model.reference_.to_dict()))
    for site in SITES:
        mine, adj = apply_combat(tables[site], msg, site=site)
        i = (cov["site"] == site).to_numpy()
        assert scaled_err(mine[names].to_numpy(), out.to_numpy()[i]) < 1e-10
        assert rel_err(adj[site].delta_star, model.adjustments_[site].delta_star) < 1e-10
        pd.testing.assert_frame_equal(mine[cov.columns], tables[site][cov.columns])


def test_held_out_site(cohort):
    """A site not in the fit harmonizes from the reference and its own rows only; its result does
    not depend on any other held-out data."""
    cov, y, names = cohort
    tables = site_tables(cov, y, names)
    fitted = {s: tables[s] for s in ("A", "B", "C")}
    fed = fit_federated(fitted, names, CONT, CAT, batch_col="site")
    ref = ComBatReference.from_dict(json.loads(json.dumps(fed.reference.to_dict())))
    assert "D" not in ref.batches
    d_alone, adj = apply_combat(tables["D"], ref, site="D")
    assert np.isfinite(d_alone[names].to_numpy()).all() and adj["D"].n == SITES["D"]
    # a second held-out site E in the same table, then with E's values changed: D unchanged
    e = make_cohort(9, sizes={"E": 33})
    e_tab = site_tables(e[0], e[1] * 1.7 + 5, names)["E"]
    both, adj2 = apply_combat(pd.concat([tables["D"], e_tab], ignore_index=True), ref, site="DE")
    assert set(adj2) == {"D", "E"}
    np.testing.assert_array_equal(both[both["site"] == "D"][names].to_numpy(), d_alone[names].to_numpy())
    e_tab2 = e_tab.copy()
    e_tab2[names] = e_tab2[names] * 3 - 40
    both2, _ = apply_combat(pd.concat([tables["D"], e_tab2], ignore_index=True), ref, site="DE")
    np.testing.assert_array_equal(both2[both2["site"] == "D"][names].to_numpy(), d_alone[names].to_numpy())
    # D's covariate-adjusted location effect (gamma_hat, in pooled-sd units) is removed up to EB
    # shrinkage, and its scale is brought to the pooled one
    x = ref.encode(tables["D"])
    before = (tables["D"][names].to_numpy() - ref.grand_mean - x @ ref.coef) / np.sqrt(ref.var_pooled)
    after = (d_alone[names].to_numpy() - ref.grand_mean - x @ ref.coef) / np.sqrt(ref.var_pooled)
    assert np.abs(before.mean(axis=0)).mean() > 0.5
    assert np.abs(after.mean(axis=0)).max() < 0.1 * np.abs(before.mean(axis=0)).mean()
    assert np.abs(np.log(after.var(axis=0, ddof=1))).mean() < 0.5 * np.abs(np.log(before.var(axis=0, ddof=1))).mean()


def test_held_out_categorical_level_and_ref_batch(cohort):
    cov, y, names = cohort
    tables = site_tables(cov, y, names)
    fed = fit_federated({s: tables[s] for s in ("A", "B", "C")}, names, CONT, CAT, ref_batch="A")
    out_a, _ = apply_combat(tables["A"], fed.reference, site="A")      # reference batch: unchanged
    np.testing.assert_array_equal(out_a[names].to_numpy(), tables["A"][names].to_numpy())
    bad = tables["D"].copy()
    bad.loc[:2, "grade"] = 4
    with pytest.raises(UnknownLevelError, match=r"covariate 'grade' has level\(s\) 4 at site 'D'"):
        apply_combat(bad, fed.reference, site="D")


# ------------------------------------------------------------------------------------------------
# 4. guards
# ------------------------------------------------------------------------------------------------
def test_guard_small_batch(cohort):
    cov, y, names = cohort
    cov2 = cov.copy()
    cov2.loc[0, "site"] = "E"
    with pytest.raises(SmallBatchError, match=r"batch 'E' has 1 samples, fewer than min_cell_size=2"):
        ComBat(CONT, CAT).fit(y, "site", cov2)
    with pytest.raises(SmallBatchError, match=r"batch 'C' has 30 samples.*min_cell_size=35"):
        ComBat(CONT, CAT, min_cell_size=35).fit(y, "site", cov)
    tables = site_tables(cov, y, names)
    with pytest.raises(SmallBatchError, match=r"batch 'A' has 40 samples at site 'A', fewer than min_cell_size=50"):
        fit_federated(tables, names, CONT, CAT, site_min_cell_size={"A": 50})
    with pytest.raises(SmallBatchError, match=r"batch 'C' has 30 samples at site 'C'.*min_cell_size=31"):
        fit_federated({s: tables[s] for s in "CD"}, names, CONT, CAT, min_cell_size=31)
    # opt-in stricter rule (a site's min-events): a categorical covariate level smaller than it is refused
    smallest = min((int(n), c, lvl) for c in CAT for lvl, n in tables["A"][c].value_counts().items())
    n, c, lvl = smallest
    request = make_request(names, CONT, CAT)
    with pytest.raises(SmallBatchError, match=rf"covariate '{c}' level {lvl!r} has {n} patients at site 'A', "
                                              rf"fewer than the site's min-events {n + 1}: merge rare levels"):
        site_combat_stats(tables["A"], request, site="A", min_level_size=n + 1)
    assert site_combat_stats(tables["A"], request, site="A", min_level_size=n)["batches"][0]["n"] == 40
    tiny = tables["D"].iloc[:1]
    fed = fit_federated({s: tables[s] for s in "ABC"}, names, CONT, CAT)
    with pytest.raises(SmallBatchError, match="batch 'D' has 1 samples at site 'D'"):
        apply_combat(tiny, fed.reference, site="D")
    with pytest.raises(CombatError, match="min_cell_size must be at least 2"):
        make_request(names, min_cell_size=1)


@pytest.mark.parametrize("kind", ["collinear", "constant", "confounded", "single-level"])
def test_guard_singular_design(cohort, kind):
    cov, y, names = cohort
    cov = cov.copy()
    cont, cat = list(CONT), list(CAT)
    if kind == "collinear":
        cov["age_months"] = 12 * cov["age"] + 6
        cont.append("age_months")
        pattern = r"singular design: covariate\(s\) \['age', 'age_months'\].*collinear"
    elif kind == "constant":
        cov["kvp"] = 120.0
        cont.append("kvp")
        pattern = r"singular design: covariate\(s\) \['kvp'\].*do not vary within any batch"
    elif kind == "confounded":
        cov["vendor"] = cov["site"].map({"A": "GE", "B": "GE", "C": "Siemens", "D": "Philips"})
        cat.append("vendor")
        pattern = r"singular design: covariate\(s\) \['vendor'\].*confounded with batch"
    else:
        cov["contrast"] = "yes"
        cat.append("contrast")
        pattern = r"categorical covariate 'contrast' has the single level 'yes'"
    with pytest.raises(SingularDesignError, match=pattern):
        ComBat(cont, cat).fit(y, "site", cov)
    with pytest.raises(SingularDesignError, match=pattern):
        fit_federated(site_tables(cov, y, names), names, cont, cat)


def test_guard_zero_variance_features_excluded(cohort):
    """Zero pooled variance (constant feature), and zero variance within one batch: excluded with
    the reason, passed through unchanged, the other features harmonized as if it were absent."""
    cov, y, names = cohort
    data = pd.DataFrame(y, columns=names)
    data["const"] = 7.25
    data["flatB"] = np.random.default_rng(4).normal(10, 2, len(data))
    data.loc[(cov["site"] == "B").to_numpy(), "flatB"] = 3.0
    allf = names + ["const", "flatB"]
    # without covariates a within-batch constant feature has zero batch variance
    model = ComBat()
    out = model.fit_transform(data[allf], cov["site"].to_numpy())
    assert set(model.excluded_features_) == {"const", "flatB"}
    assert "zero pooled residual variance" in model.excluded_features_["const"]
    assert "zero variance in batch 'B'" in model.excluded_features_["flatB"]
    np.testing.assert_array_equal(out[["const", "flatB"]].to_numpy(), data[["const", "flatB"]].to_numpy())
    base = ComBat().fit_transform(data[names], cov["site"].to_numpy())
    assert scaled_err(out[names].to_numpy(), base.to_numpy()) < 1e-12
    tabs = site_tables(cov, data.to_numpy(), allf)
    fed = fit_federated(tabs, allf)
    assert fed.reference.excluded_features == model.excluded_features_
    assert fed.reference.kept_features == names
    fed_out = stack_sites(fed.harmonized, allf, SITES)
    idx = np.concatenate([np.flatnonzero((cov["site"] == s).to_numpy()) for s in SITES])
    assert scaled_err(fed_out[:, :len(names)], out[names].to_numpy()[idx]) < TOL
    np.testing.assert_array_equal(fed_out[:, len(names):], data[["const", "flatB"]].to_numpy()[idx])
    # mean_only needs no batch variance: only the constant feature is excluded
    assert set(ComBat(mean_only=True).fit(data[allf], cov["site"].to_numpy()).excluded_features_) == {"const"}
    # with covariates and large values: a constant 1e5 feature is still detected
    data["const"] = 123456.789
    m2 = ComBat(CONT, CAT).fit(data[names + ["const"]], "site", cov)
    assert list(m2.excluded_features_) == ["const"]


def test_guard_zero_variance_at_unseen_site(cohort):
    cov, y, names = cohort
    tables = site_tables(cov, y, names)
    fed = fit_federated({s: tables[s] for s in "ABC"}, names)
    d = tables["D"].copy()
    d["f5"] = 1.5
    out, adj = apply_combat(d, fed.reference, site="D")
    assert list(adj["D"].excluded_features) == ["f5"]
    assert "zero variance in batch 'D' (the feature is constant there)" in adj["D"].excluded_features["f5"]
    assert (out["f5"] == 1.5).all() and np.isfinite(out[names].to_numpy()).all()


def test_guard_missing_values(cohort):
    cov, y, names = cohort
    y2 = y.copy()
    c_rows = np.flatnonzero((cov["site"] == "C").to_numpy())
    y2[c_rows[:3], 4] = np.nan
    msg = r"feature 'f4' has 3 missing values {} 'C'; impute or drop it"
    with pytest.raises(MissingValueError, match=msg.format("in batch")):
        ComBat(CONT, CAT).fit(pd.DataFrame(y2, columns=names), "site", cov)
    with pytest.raises(MissingValueError, match=msg.format("at site")):
        fit_federated(site_tables(cov, y2, names), names, CONT, CAT)
    cov2 = cov.copy()
    cov2.loc[c_rows[:2], "age"] = np.nan
    with pytest.raises(MissingValueError, match=r"covariate 'age' has 2 missing values at site 'C'"):
        fit_federated(site_tables(cov2, y, names), names, CONT, CAT)
    cov2 = cov.copy()
    cov2.loc[c_rows[:1], "sex"] = None
    with pytest.raises(MissingValueError, match=r"covariate 'sex' has 1 missing values in batch 'C'"):
        ComBat(CONT, CAT).fit(y, "site", cov2)


def test_guard_misc(cohort):
    cov, y, names = cohort
    with pytest.raises(UnknownLevelError, match="ref_batch 'Q' is not one of the batches"):
        ComBat(CONT, CAT, ref_batch="Q").fit(y, "site", cov)
    with pytest.raises(UnknownLevelError, match="ref_batch 'Q' is not one of the batches"):
        fit_federated(site_tables(cov, y, names), names, CONT, CAT, ref_batch="Q")
    with pytest.raises(CombatError, match="empirical Bayes needs at least 2 harmonizable features"):
        ComBat().fit(y[:, :1], "site", cov)
    assert ComBat(eb=False).fit(y[:, :1], "site", cov).var_pooled_.shape == (1,)
    tables = site_tables(cov, y, names)
    tables["A"]["scanner"], tables["B"]["scanner"] = "X", "X"
    tables["C"]["scanner"], tables["D"]["scanner"] = "C", "D"
    with pytest.raises(CombatError, match="batch 'X' reported by sites 'A' and 'B'"):
        fit_federated(tables, names, batch_col="scanner")
    with pytest.raises(CombatError, match=r"feature\(s\) \['nope'\] not found at site 'A'"):
        fit_federated(site_tables(cov, y, names), names + ["nope"])


# ------------------------------------------------------------------------------------------------
# 5. real multi-site table: UCI heart disease by hospital
# ------------------------------------------------------------------------------------------------
HEART_COLS = "age sex cp trestbps chol fbs restecg thalach exang oldpeak slope ca thal num".split()
HOSPITALS = ["cleveland", "hungarian", "switzerland", "va"]


def load_heart() -> pd.DataFrame:
    root = shared_path("multisite-tabular", "uci-heart-disease")
    parts = [pd.read_csv(Path(root) / f"processed.{h}.data", header=None, names=HEART_COLS, na_values="?")
             .assign(hospital=h) for h in HOSPITALS]
    df = pd.concat(parts, ignore_index=True)
    df["sex"] = df["sex"].astype(int)
    return df


@pytest.mark.parametrize("opts", [{}, {"parametric": False}, {"ref_batch": "cleveland"}],
                         ids=["parametric", "nonparametric", "ref"])
def test_heart_disease_matches_neurocombat(neurocombat, opts):
    """trestbps, chol, thalach harmonized across Cleveland, Hungary and VA (complete cases; chol = 0
    means 'not measured'), preserving age and sex: pooled == neuroCombat == federated."""
    df = load_heart()
    feats = ["trestbps", "chol", "thalach"]
    df = df[df["hospital"] != "switzerland"].dropna(subset=feats)
    df = df[df["chol"] > 0].reset_index(drop=True)
    cov = df[["hospital", "age", "sex"]]
    y = df[feats].to_numpy(dtype=float)
    nc = neurocombat(y, cov, batch_col="hospital", categorical=["sex"], continuous=["age"], **opts)["data"].T
    model = ComBat(["age"], ["sex"], **opts)
    out = model.fit_transform(df[feats], "hospital", cov)
    assert scaled_err(out.to_numpy(), nc) < TOL
    fed = fit_federated({h: t for h, t in df.groupby("hospital")}, feats, ["age"], ["sex"], batch_col="hospital", **opts)
    for h, t in fed.harmonized.items():
        i = (df["hospital"] == h).to_numpy()
        assert scaled_err(t[feats].to_numpy(), out.to_numpy()[i]) < TOL


def test_heart_disease_switzerland_cholesterol_excluded(neurocombat):
    """Switzerland recorded chol = 0 for every patient: zero variance in that batch, so chol is
    excluded (named, with the batch) and passed through; the other features equal neuroCombat run
    on them alone."""
    df = load_heart()
    feats = ["trestbps", "chol", "thalach"]
    df = df.dropna(subset=feats).reset_index(drop=True)
    cov = df[["hospital", "age", "sex"]]
    model = ComBat(["age"], ["sex"])
    out = model.fit_transform(df[feats], "hospital", cov)
    assert list(model.excluded_features_) == ["chol"]
    assert "batch 'switzerland'" in model.excluded_features_["chol"]
    np.testing.assert_array_equal(out["chol"].to_numpy(), df["chol"].to_numpy())
    keep = ["trestbps", "thalach"]
    nc = neurocombat(df[keep].to_numpy(dtype=float), cov, batch_col="hospital", categorical=["sex"],
                     continuous=["age"])["data"].T
    assert scaled_err(out[keep].to_numpy(), nc) < TOL
    fed = fit_federated({h: t for h, t in df.groupby("hospital")}, feats, ["age"], ["sex"], batch_col="hospital")
    assert fed.reference.excluded_features == model.excluded_features_
    for h, t in fed.harmonized.items():
        i = (df["hospital"] == h).to_numpy()
        assert scaled_err(t[feats].to_numpy(), out.to_numpy()[i]) < TOL
