"""Radiogenomic association statistics: the federated partial effects equal statsmodels' OLS with site fixed
effects, the per-site Spearman correlations equal scipy's and their pooling equals statsmodels' DerSimonian-Laird
on Fisher's z, small cells withhold a site's marker, and the enrichment p-values equal the hypergeometric sums."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from fedrad.common.association import (AssociationError, enrichment, feature_class, partial_effects, pool_spearman,
                                       pooled_partial_effects, site_association)

FEATS = ["original_shape_VoxelVolume", "original_firstorder_Mean", "original_glcm_Contrast",
         "original_glcm_Correlation", "log-sigma-2-0-mm-3D_glszm_ZoneEntropy"]
MARKERS = ["immune_score", "egfr_mutant"]
ADJUST = ["age", "stage"]
K = 10


def _sites(seed=0, sizes=(70, 55, 90)):
    rng = np.random.default_rng(seed)
    out = {}
    for s, n in enumerate(sizes):
        a, h = rng.normal(size=n), rng.normal(size=n)
        age, stage = rng.normal(62, 9, n), rng.integers(1, 5, n).astype(float)
        d = pd.DataFrame({
            FEATS[0]: np.exp(7 + 0.3 * a + rng.normal(scale=0.3, size=n)),
            FEATS[1]: 40 + 4 * a + 2 * s + rng.normal(scale=2, size=n),
            FEATS[2]: 10 + 3 * h + rng.normal(scale=1.5, size=n) * (1 + 0.2 * s),
            FEATS[3]: rng.normal(size=n),
            FEATS[4]: 2 + 0.5 * h + 0.01 * age + rng.normal(scale=0.5, size=n)})
        d["immune_score"] = 50 - 5 * h + 3 * a + 0.1 * age + 4 * s + rng.normal(scale=4, size=n)
        d["egfr_mutant"] = (rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 1.2 * a)))).astype(float)
        d["age"], d["stage"], d["site"] = age, stage, f"s{s}"
        out[f"s{s}"] = d
    return out


def _ols_with_site_effects(rows, marker, feature, adjust):
    import statsmodels.formula.api as smf

    data = rows.rename(columns={feature: "x", marker: "y"})
    formula = "y ~ x + C(site)" + "".join(f" + {c}" for c in adjust)
    return smf.ols(formula, data=data).fit()


@pytest.mark.parametrize("adjust", [ADJUST, ["age"], []])
def test_partial_effects_equal_statsmodels_ols_with_site_fixed_effects(adjust):
    sites = _sites()
    aggs = [site_association(d, FEATS, MARKERS, ADJUST, min_cell_size=K, site=s) for s, d in sites.items()]
    pooled = pd.concat(sites.values(), ignore_index=True)
    for marker in MARKERS:
        fed = partial_effects(aggs, marker, adjust, FEATS)
        twin = pooled_partial_effects(pooled, marker, adjust, FEATS)
        for f in FEATS:
            fit = _ols_with_site_effects(pooled, marker, f, adjust)
            assert abs(fed.loc[f, "t"] - fit.tvalues["x"]) < 1e-8 * max(1.0, abs(fit.tvalues["x"]))
            assert abs(fed.loc[f, "p"] - fit.pvalues["x"]) < 1e-10
            sd = math.sqrt(sum(((d[f] - d[f].mean()) ** 2).sum() for d in sites.values()) / (len(pooled) - 3))
            assert abs(fed.loc[f, "coef_per_sd"] - fit.params["x"] * sd) < 1e-8 * max(1.0, abs(fit.params["x"] * sd))
            assert abs(fed.loc[f, "r"] - twin.loc[f, "r"]) < 1e-10
            assert fed.loc[f, "ci_low"] < fed.loc[f, "r"] < fed.loc[f, "ci_high"]
        assert (fed["n"] == len(pooled)).all() and (fed["sites"] == 3).all()
    # the informative pairs are found; the noise feature is not
    fed = partial_effects(aggs, "immune_score", adjust, FEATS)
    assert fed.loc["original_glcm_Contrast", "p"] < 1e-10 and fed.loc["original_glcm_Correlation", "p"] > 1e-3


def test_volume_adjusted_effect_and_excluded_volume_row():
    sites = _sites(seed=1)
    vol = FEATS[0]
    aggs = [site_association(d, FEATS, MARKERS, ADJUST + [vol], min_cell_size=K, site=s) for s, d in sites.items()]
    pooled = pd.concat(sites.values(), ignore_index=True)
    fed = partial_effects(aggs, "egfr_mutant", ADJUST + [vol], FEATS, exclude=[0])
    assert fed.iloc[0][["r", "t", "p"]].isna().all()
    fit = _ols_with_site_effects(pooled, "egfr_mutant", FEATS[1], ADJUST + [vol])
    assert abs(fed.loc[FEATS[1], "t"] - fit.tvalues["x"]) < 1e-8 * max(1.0, abs(fit.tvalues["x"]))


def test_a_rare_binary_marker_level_withholds_that_sites_pairs():
    sites = _sites(seed=2)
    d = sites["s1"]
    d["egfr_mutant"] = 0.0
    d.loc[d.index[:4], "egfr_mutant"] = 1.0  # 4 mutants < k = 10 at s1
    aggs = [site_association(t, FEATS, MARKERS, ADJUST, min_cell_size=K, site=s) for s, t in sites.items()]
    s1 = aggs[1]
    assert s1["withheld_markers"] == ["egfr_mutant"] and s1["markers"] == ["immune_score"]
    assert np.asarray(s1["fm"]).shape == (len(FEATS), 1) and np.asarray(s1["spearman"]).shape == (len(FEATS), 1)
    fed = partial_effects(aggs, "egfr_mutant", ADJUST, FEATS)
    others = pd.concat([sites["s0"], sites["s2"]], ignore_index=True)
    fit = _ols_with_site_effects(others, "egfr_mutant", FEATS[1], ADJUST)
    assert (fed["sites"] == 2).all() and abs(fed.loc[FEATS[1], "t"] - fit.tvalues["x"]) < 1e-8 * abs(fit.tvalues["x"])
    # a binary covariate with a rare level: the site refuses (its cross-products would describe < k patients)
    d["stage"] = 0.0
    d.loc[d.index[:3], "stage"] = 1.0
    with pytest.raises(AssociationError, match="covariate 'stage' has a level with fewer than 10"):
        site_association(d, FEATS, MARKERS, ADJUST, min_cell_size=K, site="s1")
    # an indicator in disguise: every patient but one at 0, that one at 5 (its cross-products would be hers)
    d["stage"] = 0.0
    d.loc[d.index[7], "stage"] = 5.0
    with pytest.raises(AssociationError, match="covariate 'stage' has a level"):
        site_association(d, FEATS, MARKERS, ADJUST, min_cell_size=K, site="s1")
    d["immune_score"] = 50.0
    d.loc[d.index[:3], "immune_score"] = [10.0, 20.0, 30.0]
    d["stage"] = np.arange(len(d)) % 4
    assert site_association(d, FEATS, MARKERS, ADJUST, min_cell_size=K, site="s1")["withheld_markers"] == \
        ["immune_score", "egfr_mutant"]


def test_site_spearman_and_its_fisher_z_pooling_equal_scipy_and_statsmodels():
    from statsmodels.stats.meta_analysis import combine_effects

    sites = _sites(seed=3)
    aggs = [site_association(d, FEATS, MARKERS, ADJUST, min_cell_size=K, site=s) for s, d in sites.items()]
    res = pool_spearman(aggs, "immune_score", FEATS)
    for f in FEATS:
        rhos = [scipy.stats.spearmanr(d[f], d["immune_score"]).statistic for d in sites.values()]
        got = [res[f]["sites"][s]["rho"] for s in sites]
        np.testing.assert_allclose(got, rhos, rtol=1e-12, atol=1e-14)
        ns = np.array([len(d) for d in sites.values()])
        ref = combine_effects(np.arctanh(rhos), 1.06 / (ns - 3), method_re="dl")
        # statsmodels does not truncate tau² at 0: with Q < k - 1 the DL estimate is the fixed-effect one
        want = ref.mean_effect_re if ref.tau2 > 0 else ref.mean_effect_fe
        assert abs(res[f]["pooled"] - np.tanh(want)) < 1e-12
        assert abs(res[f]["i2"] - max(0.0, ref.i2)) < 1e-9


def test_feature_classes_and_enrichment_equal_the_hypergeometric_sum():
    assert feature_class("original_glcm_Contrast") == ("original", "glcm")
    assert feature_class("wavelet-LLH_firstorder_Mean") == ("wavelet", "firstorder")
    assert feature_class("age") == ("other", "other")
    feats = [f"original_glcm_F{i}" for i in range(8)] + [f"original_firstorder_F{i}" for i in range(12)]
    significant = {f"original_glcm_F{i}" for i in range(5)} | {"original_firstorder_F0"}
    rows = {(r["family"], r["name"]): r for r in enrichment(feats, significant)}
    glcm = rows[("class", "glcm")]
    total, members, hits, x = 20, 8, 6, 5
    p = sum(math.comb(members, i) * math.comb(total - members, hits - i) for i in range(x, min(members, hits) + 1))
    p /= math.comb(total, hits)
    assert glcm["significant"] == 5 and abs(glcm["p"] - p) < 1e-12 and glcm["p"] < 0.02
    assert rows[("class", "firstorder")]["p"] > 0.9 and 0 <= glcm["q"] <= 1


# ----------------------------------------------------------------------------------------------
# the whole association study (in-process Flower message layer, real site agents)
# ----------------------------------------------------------------------------------------------
def _association_cfg(cfg, **assoc):
    from fedrad.server.study_config import validate

    cfg = json.loads(json.dumps(cfg))
    cfg["study"]["kind"] = "association"
    cfg["association"].update({"markers": ["immune_score", "egfr_mutant"], **assoc})
    return validate(cfg)


def test_association_study_equals_the_pooled_twin_in_four_round_trips(tmp_path):
    """Prepare, harmonize (ComBat on every site) and one association round: every pair's site-stratified,
    covariate-adjusted effect (and the volume-adjusted one) equals the OLS fit with site fixed effects on the
    pooled harmonized rows to 1e-8, every site's Spearman equals scipy's on its rows, BH runs over the whole
    matrix, and the informative pairs are found."""
    from fedrad.local import run_study_in_process
    from fedrad.server.study_pooled import pooled_association
    from tests.test_study import make_sites

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    cfg = _association_cfg(cfg)
    res = run_study_in_process(cfg, nodes)
    assert res["round_trips"] == 4 and [p["phase"] for p in res["phases"]] == ["prepare", "harmonization",
                                                                              "association"]
    assoc = res["association"]
    twin = pooled_association(cfg, tables)
    assert assoc["features"] == twin["features"] and assoc["adjust"] == ["age", "stage"]
    assert assoc["n_tests"] == 2 * len(assoc["features"])
    for m in assoc["markers"]:
        for f in assoc["features"]:
            got, want = assoc["pairs"][m][f], twin["pairs"][m][f]
            assert abs(got["t"] - want["t"]) < 1e-8 * max(1.0, abs(want["t"]))
            assert abs(got["r"] - want["r"]) < 1e-10
            assert abs(got["p"] - want["p"]) < 1e-10
            if "volume_adjusted" in want:
                assert abs(got["volume_adjusted"]["r"] - want["volume_adjusted"]["r"]) < 1e-10
            for s, rho in want["spearman"].items():
                assert abs(got["spearman"]["sites"][s]["rho"] - rho) < 1e-12
    # BH over the whole matrix
    ps = [assoc["pairs"][m][f]["p"] for m in assoc["markers"] for f in assoc["features"]]
    qs = [assoc["pairs"][m][f]["q"] for m in assoc["markers"] for f in assoc["features"]]
    from statsmodels.stats.multitest import multipletests

    np.testing.assert_allclose(qs, multipletests(ps, method="fdr_bh")[1], rtol=1e-12)
    survivors = {tuple(p) for p in assoc["survivors"]}
    assert ("original_glcm_F0", "immune_score") in survivors and ("original_glcm_F1", "immune_score") in survivors
    assert ("original_glcm_F2", "egfr_mutant") in survivors
    assert not any(f.startswith("original_glcm_F") and int(f[-1]) >= 3 for f, _ in survivors)


def test_association_replication_and_small_marker_cells(tmp_path):
    """Discovery on three sites, replication on the fourth; a site whose mutant count is under k withholds that
    marker (its other marker still counts) and says so in its local log."""
    from fedrad.local import run_study_in_process
    from tests.test_study import make_sites

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    d = pd.read_parquet(nodes[3]["table"])
    d["egfr_mutant"] = 0
    d.loc[d.index[:5], "egfr_mutant"] = 1  # 5 mutants < k = 10 at hosp3
    d.to_parquet(nodes[3]["table"])
    cfg["sites"] = {n["site-name"]: {} for n in nodes}
    cfg = _association_cfg(cfg, discovery=["hosp0", "hosp1", "hosp2"], replication=["hosp3"])
    res = run_study_in_process(cfg, nodes)
    assoc = res["association"]
    assert assoc["withheld"] == {"hosp3": ["egfr_mutant"]}
    pair = assoc["pairs"]["immune_score"]["original_glcm_F0"]
    assert pair["sites"] == 3 and pair["replication"]["sites"] == 1 and pair["replication"]["replicated"]
    assert pair["replication"]["n"] == 64
    assert all("replication" not in assoc["pairs"]["immune_score"][f] or [f, "immune_score"] in assoc["survivors"]
               for f in assoc["features"])
    assert "hosp3" not in assoc["pairs"]["egfr_mutant"]["original_glcm_F2"]["spearman"]["sites"]
    log = (tmp_path / "hosp3" / "work" / "site.log").read_text()
    assert "marker egfr_mutant has a level with fewer than 10 patients" in log


def test_association_requests_are_the_plans_kind_once_per_attempt(tmp_path):
    """The site answers study_associate only under an association plan, once per attempt and on the final table,
    and refuses the prediction requests under it; a prediction plan refuses study_associate."""
    from fedrad.common.plan import plan_id, study_plan
    from fedrad.local import approve_at_sites
    from tests.test_site_guard import ask, refused
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    node = nodes[0]
    pred = plan_id(study_plan(cfg))
    approve_at_sites(study_plan(cfg), [node])
    ask(node, "study_prepare", {"plan": pred})
    feats = [f"original_glcm_F{i}" for i in range(9)]
    refused(node, "study_associate", {"plan": pred, "table": "raw", "features": feats}, "outside-plan")
    acfg = _association_cfg(cfg, volume_adjusted=False)
    pid = plan_id(study_plan(acfg))
    approve_at_sites(study_plan(acfg), [node])
    ask(node, "study_prepare", {"plan": pid})
    refused(node, "study_associate", {"plan": pid, "table": "raw", "features": feats}, "outside-plan")  # not final
    refused(node, "study_select", {"plan": pid, "folds": {}}, "outside-plan")
    refused(node, "study_associate", {"plan": pid, "table": "h-final", "features": feats + ["case_id"]},
            "outside-plan")
    # no harmonized table yet, so make one: the final fold's table is the raw table when harmonization is off
    off = _association_cfg({**cfg, "harmonization": {**cfg["harmonization"], "enabled": False}})
    pid = plan_id(study_plan(off))
    approve_at_sites(study_plan(off), [node])
    ask(node, "study_prepare", {"plan": pid})
    reply = ask(node, "study_associate", {"plan": pid, "table": "raw", "features": feats})
    assert np.asarray(reply["fm"]).shape == (9, 2) and "ff" in reply and "ffx" not in reply
    # the plan's covariates and, as the plan adjusts for volume, the site's own volume column
    assert reply["adjust"] == ["age", "stage", "original_shape_VoxelVolume"]
    refused(node, "study_associate", {"plan": pid, "table": "raw", "features": feats}, "outside-plan")  # twice


def test_a_covariate_level_under_k_makes_the_site_refuse_the_association_request(tmp_path):
    """Through the real site agent: a plan adjusting for a 0/1 covariate that 3 of a site's patients have gets a
    min-cell-size refusal (audited, no value in the reply), not the cross-products of those 3 patients."""
    from fedrad.common.plan import plan_id, study_plan
    from fedrad.local import approve_at_sites
    from tests.test_site_guard import ask, refused
    from tests.test_study import make_sites

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    node = nodes[0]
    d = tables["hosp0"].assign(smoker=0)
    d.loc[d.index[:3], "smoker"] = 1
    d.to_parquet(node["table"])
    cfg = {**cfg, "harmonization": {**cfg["harmonization"], "enabled": False},
           "model": {**cfg["model"], "clinical": ["age", "smoker"]}}
    acfg = _association_cfg(cfg, volume_adjusted=False)
    pid = plan_id(study_plan(acfg))
    approve_at_sites(study_plan(acfg), [node])
    ask(node, "study_prepare", {"plan": pid})
    feats = [f"original_glcm_F{i}" for i in range(9)]
    refused(node, "study_associate", {"plan": pid, "table": "raw", "features": feats}, "min-cell-size")
