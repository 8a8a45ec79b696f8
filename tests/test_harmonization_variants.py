"""ComBat beyond one batch per site: scanner batches shared across sites, and CovBat.

References: neuroCombat 0.2.12 with the same (global) batch column; for CovBat, the CovBat R package's algorithm
(Chen et al., Hum Brain Mapp 2022) composed from independent pieces: neuroCombat, scikit-learn's PCA on the
standardized ComBat residuals, neuroCombat without EB on the scores.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from fedrad.common.combat import (
    ComBat,
    CombatError,
    apply_combat,
    combine_combat_stats,
    covbat_adjust,
    fit_federated,
    make_request,
    site_combat_stats,
)

from .test_combat import CAT, CONT, make_cohort, scaled_err, site_tables

TOL = 1e-8
SCANNERS = {"A": ["GE", "Siemens"], "B": ["GE", "Philips"], "C": ["Siemens", "Philips"], "D": ["GE", "Siemens"]}


def scanner_cohort(seed: int = 3, n_features: int = 12):
    """Sites A-D with two scanner models each (3 models, each at 2-3 sites); the batch effect follows the scanner
    model, not the site."""
    cov, y, names = make_cohort(seed, n_features=n_features, shift_sd=0.5)
    rng = np.random.default_rng(seed + 100)
    cov["scanner"] = [SCANNERS[s][int(rng.random() < 0.5)] for s in cov["site"]]
    models = sorted({m for v in SCANNERS.values() for m in v})
    shift = rng.normal(0, 4, (len(models), y.shape[1]))
    scale = rng.uniform(0.6, 1.8, (len(models), y.shape[1]))
    k = cov["scanner"].map({m: i for i, m in enumerate(models)}).to_numpy()
    centre = y.mean(axis=0)
    y = centre + (y - centre) * scale[k] + shift[k]
    return cov, y, names


@pytest.fixture(scope="module")
def scanners():
    return scanner_cohort()


@pytest.fixture
def neurocombat(monkeypatch):
    monkeypatch.setattr(np, "int", int, raising=False)
    from neuroCombat import neuroCombat

    def run(y, cov, batch_col, categorical=CAT, continuous=CONT, **opts):
        with contextlib.redirect_stdout(io.StringIO()):
            return neuroCombat(np.ascontiguousarray(y.T), cov.copy(), batch_col, categorical_cols=list(categorical),
                               continuous_cols=list(continuous), **opts)
    return run


def stacked(harmonized: dict, tables: dict, names: list, cov: pd.DataFrame) -> np.ndarray:
    """The sites' harmonized rows back in the cohort's row order."""
    out = np.empty((len(cov), len(names)))
    for s, t in harmonized.items():
        out[np.flatnonzero(cov["site"].to_numpy() == s)] = t[names].to_numpy()
    return out


# ------------------------------------------------------------------------------------------------
# scanner batches spanning sites
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"parametric": False}, {"mean_only": True}, {"eb": False},
                                  {"ref_batch": "Philips"}],
                         ids=["parametric", "nonparametric", "mean_only", "no-eb", "ref"])
def test_shared_scanner_batches_equal_neurocombat(scanners, neurocombat, opts):
    cov, y, names = scanners
    ref = neurocombat(y, cov, "scanner", **opts)["data"].T
    assert scaled_err(ref, y) > 0.1  # the harmonization did something
    pooled = ComBat(CONT, CAT, **opts).fit_transform(y, "scanner", cov)
    assert scaled_err(pooled, ref) < TOL
    tables = site_tables(cov, y, names)
    fed = fit_federated(tables, names, CONT, CAT, batch_col="scanner", shared_batches=True, **opts)
    assert fed.round_trips == 2
    assert fed.reference.batches == ["GE", "Philips", "Siemens"]
    assert scaled_err(stacked(fed.harmonized, tables, names, cov), ref) < TOL
    # the server's posterior of each batch (from the sites' sums) is the pooled one
    assert np.max(np.abs(fed.reference.posterior_gamma - pooled_gamma(cov, y, opts))) < TOL


def pooled_gamma(cov, y, opts):
    return ComBat(CONT, CAT, **opts).fit(y, "scanner", cov).gamma_star_


def test_site_local_labels_refuse_a_shared_batch_unless_asked(scanners):
    cov, y, names = scanners
    with pytest.raises(CombatError, match="reported by sites 'A' and 'B'.*shared_batches"):
        fit_federated(site_tables(cov, y, names), names, CONT, CAT, batch_col="scanner")
    with pytest.raises(CombatError, match="shared_batches needs a batch column"):
        make_request(names, shared_batches=True)


def test_unseen_site_uses_the_fit_posterior_of_a_shared_scanner(scanners):
    """A held-out site whose scanner model was in the fit takes that batch's fitted posterior (the pooled
    ``ComBat.transform`` of its rows); a model not in the fit is estimated from the site's own rows."""
    cov, y, names = scanners
    train = cov["site"] != "D"
    tables = site_tables(cov, y, names)
    held = tables.pop("D")
    fed = fit_federated(tables, names, CONT, CAT, batch_col="scanner", shared_batches=True)
    pooled = ComBat(CONT, CAT).fit(y[train.to_numpy()], "scanner", cov[train])
    out, adj = apply_combat(held, fed.reference, site="D")
    expect = pooled.transform(held[names].to_numpy(), "scanner", held)
    assert scaled_err(out[names].to_numpy(), expect) < TOL
    assert np.isnan(adj["GE"].gamma_bar)  # not estimated locally: the fit's posterior
    # relabel one of D's scanners as a model never seen: estimated from D's own rows as for any unseen batch
    renamed = held.assign(scanner=held["scanner"].replace({"Siemens": "Canon"}))
    out2, adj2 = apply_combat(renamed, fed.reference, site="D")
    canon = (renamed["scanner"] == "Canon").to_numpy()
    np.testing.assert_allclose(out2[names].to_numpy()[~canon], out[names].to_numpy()[~canon], rtol=0, atol=1e-9)
    assert not np.isnan(adj2["Canon"].gamma_bar)
    own, _ = apply_combat(renamed[canon].reset_index(drop=True), fed.reference, site="D")
    np.testing.assert_allclose(out2[names].to_numpy()[canon], own[names].to_numpy(), rtol=0, atol=1e-9)


def test_shared_batch_blocks_under_k_are_refused(scanners):
    cov, y, names = scanners
    tables = site_tables(cov, y, names)
    request = make_request(names, CONT, CAT, batch_col="scanner", shared_batches=True, min_cell_size=2)
    smallest = min(int((t["scanner"] == m).sum()) for t in tables.values() for m in t["scanner"].unique())
    with pytest.raises(CombatError, match="fewer than"):
        site_combat_stats(tables["A"], request, site="A", min_cell_size=smallest + 100)


# ------------------------------------------------------------------------------------------------
# CovBat
# ------------------------------------------------------------------------------------------------
def covbat_oracle(y, cov, batch_col, neurocombat, percent_var=0.95, n_pc=None, std_var=True):
    """CovBat as the R package computes it, from independent pieces: neuroCombat (EB) → ComBat residuals
    w = data − stand.mean → scikit-learn PCA of w centred (and scaled to unit SD) → neuroCombat without EB and
    covariates on the first PCs' scores → back-projection + stand.mean."""
    from sklearn.decomposition import PCA

    out = neurocombat(y, cov, batch_col)
    est = out["estimates"]
    stand_mean = (est["stand.mean"] + est["mod.mean"]).T  # grand mean + covariate effects, per row
    w = out["data"].T - stand_mean
    centre, scale = w.mean(axis=0), (w.std(axis=0, ddof=1) if std_var else np.ones(w.shape[1]))
    u = (w - centre) / scale
    pca = PCA().fit(u)
    npc = n_pc or int(np.flatnonzero(np.cumsum(pca.explained_variance_ratio_) > percent_var)[0]) + 1
    scores = pca.transform(u)
    fake = pd.DataFrame({batch_col: cov[batch_col].to_numpy()})
    adj = neurocombat(scores[:, :npc], fake, batch_col, categorical=[], continuous=[], eb=False)["data"].T
    scores[:, :npc] = adj
    u_new = scores @ pca.components_ + pca.mean_
    return (u_new * scale + centre) + stand_mean, npc


def site_covariance_cohort(seed: int = 5, n_features: int = 10):
    """Sites whose features' correlation differs (a shared factor loaded differently per site), on top of the
    usual location/scale batch effects: what CovBat is for."""
    cov, y, names = make_cohort(seed, n_features=n_features)
    rng = np.random.default_rng(seed + 7)
    for k, s in enumerate(["A", "B", "C", "D"]):
        i = np.flatnonzero(cov["site"] == s)
        load = rng.normal(0, 1.0 + 1.5 * k, n_features)
        y[i] += np.outer(rng.normal(0, 2.0, len(i)), load)
    return cov, y, names


@pytest.fixture(scope="module")
def covcohort():
    return site_covariance_cohort()


@pytest.mark.parametrize("opts", [{}, {"n_pc": 3}, {"std_var": False, "percent_var": 0.8}],
                         ids=["defaults", "n_pc", "covariance-pca"])
def test_covbat_pooled_and_federated_equal_the_reference_algorithm(covcohort, neurocombat, opts):
    cov, y, names = covcohort
    expect, npc = covbat_oracle(y, cov, "site", neurocombat, **opts)
    pooled = ComBat(CONT, CAT, covbat=opts or True)
    got = pooled.fit_transform(y, "site", cov)
    assert pooled.reference_.covbat["n_pc"] == npc
    assert scaled_err(got, expect) < TOL
    combat_only = ComBat(CONT, CAT).fit_transform(y, "site", cov)
    assert scaled_err(got, combat_only) > 0.05  # the PCA step changed the data
    tables = site_tables(cov, y, names)
    fed = fit_federated(tables, names, CONT, CAT, covbat=opts or True)
    assert fed.round_trips == 2
    assert fed.reference.covbat["n_pc"] == npc
    assert scaled_err(stacked(fed.harmonized, tables, names, cov), expect) < TOL


def test_covbat_with_shared_scanner_batches(scanners, neurocombat):
    cov, y, names = scanners
    expect, _ = covbat_oracle(y, cov, "scanner", neurocombat)
    tables = site_tables(cov, y, names)
    fed = fit_federated(tables, names, CONT, CAT, batch_col="scanner", shared_batches=True, covbat=True)
    assert scaled_err(stacked(fed.harmonized, tables, names, cov), expect) < TOL


def site_correlation_spread(values: np.ndarray, sites: np.ndarray) -> float:
    """Mean Frobenius distance of each site's feature correlation matrix from the pooled one."""
    pooled = np.corrcoef(values, rowvar=False)
    return float(np.mean([np.linalg.norm(np.corrcoef(values[sites == s], rowvar=False) - pooled)
                          for s in np.unique(sites)]))


def test_covbat_reduces_the_site_differences_in_feature_correlation(covcohort):
    cov, y, names = covcohort
    sites = cov["site"].to_numpy()
    raw = site_correlation_spread(y, sites)
    after_combat = site_correlation_spread(ComBat(CONT, CAT).fit_transform(y, "site", cov), sites)
    after_covbat = site_correlation_spread(ComBat(CONT, CAT, covbat=True).fit_transform(y, "site", cov), sites)
    assert after_covbat < 0.8 * after_combat, (raw, after_combat, after_covbat)


def test_covbat_unseen_site_moves_its_scores_to_the_pooled_location_and_scale(covcohort):
    cov, y, names = covcohort
    tables = site_tables(cov, y, names)
    held = tables.pop("D")
    fed = fit_federated(tables, names, CONT, CAT, covbat=True)
    ref = fed.reference
    out, adj = apply_combat(held, ref, site="D")
    assert not np.isnan(adj["D"].gamma_bar)  # its own ComBat posterior
    kept = ref.kept_features
    d = ref.encode(out)
    z = (out[kept].to_numpy() - ref.grand_mean - d @ ref.coef) / np.sqrt(ref.var_pooled)
    cb = ref.covbat
    t = ((z - np.asarray(cb["center"])) / np.asarray(cb["unit"])) @ np.asarray(cb["components"]).T
    np.testing.assert_allclose(t.mean(axis=0), cb["grand_mean"], atol=1e-9)
    np.testing.assert_allclose(t.var(axis=0, ddof=1), cb["var_pooled"], rtol=1e-9)
    # a batch in the fit takes the fit's score moments: re-applying to a training site reproduces its rows
    again, _ = apply_combat(tables["B"], ref, site="B")
    np.testing.assert_allclose(again[names].to_numpy(), fed.harmonized["B"][names].to_numpy(), atol=1e-9)
    # and covbat_adjust of its fitted batch index is what the site used
    assert ref.batches.index("B") == 1 and callable(covbat_adjust)


def test_covbat_messages_and_refusals(covcohort):
    cov, y, names = covcohort
    tables = site_tables(cov, y, names)
    plain = site_combat_stats(tables["A"], make_request(names, CONT, CAT), site="A")
    assert "scatter" not in plain["batches"][0]  # only a CovBat request gets the residual scatter
    request = make_request(names, CONT, CAT, covbat={"percent_var": 0.9})
    assert request["covbat"] == {"percent_var": 0.9, "n_pc": 0, "std_var": True}
    stats = site_combat_stats(tables["A"], request, site="A")
    assert np.asarray(stats["batches"][0]["scatter"]).shape == (len(names), len(names))
    with pytest.raises(CombatError, match="sent no residual scatter"):
        combine_combat_stats([plain] + [site_combat_stats(tables[s], request, site=s) for s in "BCD"], request)
    with pytest.raises(CombatError, match="reference batch is not defined"):
        make_request(names, covbat=True, ref_batch="A")
    with pytest.raises(CombatError, match="percent_var must be in"):
        make_request(names, covbat={"percent_var": 1.5})
    with pytest.raises(CombatError, match="only 10 harmonized features"):
        fit_federated(tables, names, CONT, CAT, covbat={"n_pc": 11})


# ------------------------------------------------------------------------------------------------
# ComBat-GAM (smooth covariate effects)
# ------------------------------------------------------------------------------------------------
def gam_cohort(seed: int = 11):
    """The scanner cohort with ages spread over 30-80 at every site (so that every spline piece covers several
    patients of every site and scanner) and a nonlinear (sine-shaped) age effect on every feature."""
    cov, y, names = scanner_cohort(seed)
    rng = np.random.default_rng(seed + 1)
    cov["age"] = np.round(rng.uniform(30, 80, len(cov)), 1)
    amp = rng.normal(0, 4, y.shape[1])
    y = y + np.outer(np.sin((cov["age"].to_numpy() - 45) / 8.0), amp)
    return cov, y, names


def age_knots(age: np.ndarray) -> list[float]:
    from fedrad.common.smooth import full_knots

    return list(full_knots([45.0, 55.0, 65.0], np.floor(age.min()) - 1, np.ceil(age.max()) + 1))


def test_combat_gam_unpenalized_equals_neurocombat_with_the_basis_as_covariates(neurocombat):
    """alpha = 0: ComBat-GAM is ComBat with the B-spline basis (computed here by statsmodels) as linear
    covariates (fedrad's linear ComBat, equal to neuroCombat elsewhere; and neuroCombat itself)."""
    from statsmodels.gam.api import BSplines

    cov, y, names = gam_cohort()
    knots = age_knots(cov["age"].to_numpy())
    bs = BSplines(cov[["age"]].to_numpy(), df=[len(knots) - 4], degree=[3], knot_kwds=[{"all_knots": knots}])
    basis = pd.DataFrame(bs.basis, columns=[f"b{j}" for j in range(bs.basis.shape[1])])
    wide = pd.concat([cov.reset_index(drop=True), basis], axis=1)
    expect = ComBat(list(basis.columns), CAT).fit_transform(y, "site", wide)
    got = ComBat([], CAT, smooth={"age": knots}, smooth_alphas=[0.0]).fit_transform(y, "site", cov)
    assert scaled_err(got, expect) < TOL
    # neuroCombat itself casts the covariates (here the basis values) to float32: equal to that precision
    assert scaled_err(got, neurocombat(y, wide, "site", continuous=list(basis.columns))["data"].T) < 1e-6
    tables = site_tables(cov, y, names)
    fed = fit_federated(tables, names, [], CAT, smooth={"age": knots}, smooth_alphas=[0.0])
    assert scaled_err(stacked(fed.harmonized, tables, names, cov), expect) < TOL


@pytest.mark.parametrize("opts", [{}, {"batch_col": "scanner", "shared_batches": True},
                                  {"batch_col": "scanner", "shared_batches": True, "covbat": True}],
                         ids=["site", "shared-scanners", "shared-scanners-covbat"])
def test_combat_gam_federated_equals_pooled(opts):
    cov, y, names = gam_cohort()
    knots = age_knots(cov["age"].to_numpy())
    batch = opts.get("batch_col", "site")
    pooled = ComBat([], CAT, smooth={"age": knots}, covbat=opts.get("covbat"))
    expect = pooled.fit_transform(y, batch, cov)
    tables = site_tables(cov, y, names)
    fed = fit_federated(tables, names, [], CAT, smooth={"age": knots}, **opts)
    assert fed.round_trips == 2
    assert fed.reference.smooth_alpha == pooled.reference_.smooth_alpha  # the same GCV choice per feature
    assert len(set(fed.reference.smooth_alpha)) > 1                      # chosen per feature
    assert scaled_err(stacked(fed.harmonized, tables, names, cov), expect) < TOL
    linear = ComBat(CONT, CAT, covbat=opts.get("covbat")).fit_transform(y, batch, cov)
    assert scaled_err(expect, linear) > 0.01  # the smooth age effect is not the linear one


def test_combat_gam_leaves_a_nonlinear_age_effect_alone_where_linear_combat_removes_it():
    """Three sites of different age ranges, a sine-shaped age effect and no site effect at all: the ideal
    harmonization changes nothing. Linear ComBat takes the part of the curve its straight line misses for a site
    effect and removes it; ComBat-GAM changes the data far less."""
    from fedrad.common.smooth import full_knots

    rng = np.random.default_rng(21)
    ages = np.concatenate([rng.uniform(lo, lo + 30, 60) for lo in (20, 35, 50)])
    cov = pd.DataFrame({"site": np.repeat(["A", "B", "C"], 60), "age": ages})
    y = 100 + np.outer(5 * np.sin((ages - 50) / 6.0), rng.uniform(0.5, 1.5, 6)) + rng.normal(0, 1, (180, 6))
    knots = list(full_knots([35.0, 42.5, 50.0, 57.5, 65.0], 19.0, 81.0))
    linear = ComBat(["age"]).fit_transform(y, "site", cov)
    gam = ComBat([], smooth={"age": knots}).fit_transform(y, "site", cov)
    change_linear, change_gam = scaled_err(linear, y), scaled_err(gam, y)
    assert change_gam < 0.5 * change_linear, (change_linear, change_gam)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_combat_gam_equals_neuroharmonize_at_its_alpha(monkeypatch):
    """neuroHarmonize 2.5.2 ``harmonizationLearn(smooth_terms=["age"])`` with its own knots (statsmodels' quantile
    knots, df 10) and alpha pinned: ComBat-GAM gives the same harmonized data (1e-8 of a feature's SD). With its
    random 5-fold CV choosing alpha and ours GCV, they differ by less than 0.02 SD."""
    nh = pytest.importorskip("neuroHarmonize")
    from statsmodels.gam import generalized_additive_model as gam_module

    from .test_smooth import make_data, quantile_knots

    age, sex, batch, _, y = make_data(seed=9, n=180, n_batches=3, features=6)
    covars = pd.DataFrame({"SITE": [f"site{b}" for b in batch], "age": age, "sex": sex})
    knots = list(quantile_knots(age, df=10, degree=3))
    sd = y.std(axis=0)
    with contextlib.redirect_stdout(io.StringIO()):
        _, free = nh.harmonizationLearn(y, covars, smooth_terms=["age"], seed=0)
    original = gam_module.GLMGam.select_penweight_kfold
    monkeypatch.setattr(gam_module.GLMGam, "select_penweight_kfold",
                        lambda self, *a, **k: (np.array([20.0]),) + tuple(original(self, *a, **k)[1:]))
    with contextlib.redirect_stdout(io.StringIO()):
        _, pinned = nh.harmonizationLearn(y, covars, smooth_terms=["age"], seed=0)
    ours = ComBat(["sex"], smooth={"age": knots}, smooth_alphas=[20.0]).fit_transform(y, covars["SITE"], covars)
    assert np.max(np.abs(ours - pinned) / sd) < TOL
    gcv = ComBat(["sex"], smooth={"age": knots}).fit_transform(y, covars["SITE"], covars)
    assert np.max(np.abs(gcv - free) / sd) < 0.02


def test_combat_gam_guards():
    cov, y, names = gam_cohort()
    knots = age_knots(cov["age"].to_numpy())
    with pytest.raises(CombatError, match="both as smooth terms and as features or linear"):
        make_request(names, ["age"], smooth={"age": knots})
    with pytest.raises(CombatError, match="smooth term 'age'"):
        make_request(names, smooth={"age": [1.0, 2.0]})
    tables = site_tables(cov, y, names)
    request = make_request(names, [], CAT, smooth={"age": knots})
    with pytest.raises(CombatError, match="smooth covariate"):
        site_combat_stats(tables["A"].drop(columns="age"), request, site="A")
    # a value outside the plan's boundary knots is clipped to them (the smooth is constant beyond)
    narrow = list(np.r_[[40.0] * 4, [50.0], [60.0] * 4])
    far = tables["A"].assign(age=tables["A"]["age"].where(tables["A"]["age"] < 60, 200.0))
    clipped = tables["A"].assign(age=tables["A"]["age"].clip(upper=60.0))
    req = make_request(names, [], CAT, smooth={"age": narrow})
    assert site_combat_stats(far, req, site="A") == site_combat_stats(clipped, req, site="A")


def test_a_site_receives_only_its_own_batches_estimates(scanners):
    """With shared batches and CovBat the server computes every batch's posterior and score moments; each site is
    sent those of the batches it holds only (another site's batch-level estimates are not its business)."""
    cov, y, names = scanners
    tables = site_tables(cov, y, names)
    fed = fit_federated(tables, names, CONT, CAT, batch_col="scanner", shared_batches=True, covbat=True)
    mine = fed.reference.for_site({"GE", "Philips"})  # site B's scanners
    assert mine["posterior_batches"] == ["GE", "Philips"] and len(mine["posterior_gamma"]) == 2
    assert mine["covbat"]["batches"] == ["GE", "Philips"] and len(mine["covbat"]["batch_mean"]) == 2
    full = fed.reference.to_dict()
    assert mine["posterior_gamma"][1] == full["posterior_gamma"][1]  # Philips is the 2nd of GE, Philips, Siemens
    out, _ = apply_combat(tables["B"], mine, site="B")
    np.testing.assert_allclose(out[names].to_numpy(), fed.harmonized["B"][names].to_numpy(), atol=1e-12)


def test_a_spline_piece_over_fewer_than_k_patients_is_refused_at_the_site():
    """A knot placed so that the last B-spline piece covers only a site's 3 oldest patients would make the regression
    sums describe them (like a categorical level of 3 patients): the site refuses under k = 5 and answers under
    k = 3; a piece covering nobody there (an all-zero column) is fine."""
    from fedrad.common.combat import SmallBatchError
    from fedrad.common.smooth import full_knots

    cov, y, names = gam_cohort()
    table = site_tables(cov, y, names)["A"]
    ages = np.sort(table["age"].to_numpy())
    knot = (ages[-3] + ages[-4]) / 2
    knots = list(full_knots([ages[len(ages) // 2], knot], ages[0] - 1, ages[-1] + 1))
    request = make_request(names, [], CAT, smooth={"age": knots})
    with pytest.raises(SmallBatchError, match="smooth term 'age': the spline piece .* covers fewer than 5 patients"):
        site_combat_stats(table, request, site="A", min_cell_size=5)
    assert site_combat_stats(table, request, site="A", min_cell_size=3)["batches"][0]["n"] == len(table)
    far = list(full_knots([ages[len(ages) // 2], ages[-1] + 10, ages[-1] + 20], ages[0] - 1, ages[-1] + 30))
    stats = site_combat_stats(table, make_request(names, [], CAT, smooth={"age": far}), site="A", min_cell_size=5)
    assert stats["batches"][0]["n"] == len(table)  # the pieces beyond the oldest patient cover nobody
