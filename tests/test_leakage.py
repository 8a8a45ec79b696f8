"""Leakage caught before it reaches a headline: endpoint-like names, a near-perfect univariate association in
the training sites, implausible external estimates, and the headline's verdict on the signature.

Concordance counts are checked against scikit-learn's ``roc_auc_score`` and lifelines' ``concordance_index``,
the federated screen against its pooled twin, and whole studies run through the real site agents."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrad.common.leakage import (combine_concordance, concordance_request, flagged, pooled_concordance,
                                   site_concordance)
from fedrad.common.names import endpoint_like
from fedrad.local import run_study_in_process
from fedrad.server.report import headline
from fedrad.server.study_pooled import flatten_metrics, pooled_loso
from tests.test_study import make_sites


def test_endpoint_names_match_whole_tokens_only():
    for name in ("T", "E", "y", "os_days", "OS_months", "death", "vital_status", "time_to_event", "FollowUp",
                 "follow_up_months", "pfs_event", "censored", "Recurrence", "progression", "response",
                 "Survival.time", "dfs_status", "event"):
        assert endpoint_like(name), name
    for name in ("T1_ED_Histogram_Bins-10_Bins-10_SeventyFifthPercentile", "original_glcm_Contrast", "age", "stage",
                 "original_shape_VoxelVolume", "wavelet-LLH_glszm_ZoneEntropy", "Elongation", "Tempo", "Eventual"):
        assert not endpoint_like(name), name
    from radiomics import getFeatureClasses

    names = [f"{it}_{cls}_{f}" for cls, c in getFeatureClasses().items() for f in c.getFeatureNames()
             for it in ("original", "wavelet-HLH", "log-sigma-3-0-mm-3D", "squareroot", "lbp-3D-k", "gradient")]
    assert len(names) > 700 and not [n for n in names if endpoint_like(n)]


def test_concordance_counts_equal_sklearn_and_lifelines():
    from lifelines.utils import concordance_index
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    n = 80
    rows = pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 4, n).astype(float)})  # b: many ties
    rows["y"] = (rng.random(n) < 1 / (1 + np.exp(-2 * rows["a"]))).astype(int)
    rows["t"] = np.round(rng.exponential(np.exp(-rows["a"])) * 10, 0) + 1  # ties in time too
    rows["e"] = (rng.random(n) < 0.7).astype(int)
    binary = site_concordance(rows, concordance_request(["a", "b"], outcome="y"), site="s")
    auc = binary["concordant"] / binary["pairs"]
    np.testing.assert_allclose(auc, [roc_auc_score(rows.y, rows.a), roc_auc_score(rows.y, rows.b)], rtol=1e-12)
    surv = site_concordance(rows, concordance_request(["a", "b"], time="t", event="e"), site="s")
    c = surv["concordant"] / surv["pairs"]
    want = [concordance_index(rows.t, rows[f], rows.e) for f in ("a", "b")]
    np.testing.assert_allclose(c, want, rtol=1e-12)
    # federated (two sites' counts) equals the pooled twin (pairs within each site)
    rows["site"] = np.where(np.arange(n) < 45, "s1", "s2")
    req = concordance_request(["a", "b"], outcome="y")
    fed = combine_concordance([site_concordance(g, req, site=s) for s, g in rows.groupby("site")])
    pd.testing.assert_series_equal(fed, pooled_concordance(rows, req))
    # a site under its minimum cell size sends nothing
    with pytest.raises(ValueError, match="fewer than 50 events or non-events"):
        site_concordance(rows, req, site="s", min_cell_size=50)
    assert flagged({"a": 0.97, "b": 0.03, "c": 0.94, "d": float("nan")}) == {"a": 0.97, "b": 0.03}
    assert flagged({"a": -0.96, "b": 0.5}, correlation=True, allow=["x"]) == {"a": -0.96}
    assert flagged({"a": 0.99}, allow=["a"]) == {}


def _rewrite(nodes, add) -> None:
    """Add columns to every site's table (``add(df, rng)`` returns the new columns)."""
    for i, node in enumerate(nodes):
        df = pd.read_parquet(node["table"])
        for name, values in add(df, np.random.default_rng([11, i])).items():
            df[name] = values
        df.to_parquet(node["table"])


def test_follow_up_columns_beside_a_binary_outcome_never_reach_the_signature(tmp_path):
    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    cfg["selection"]["exclude"] = ["immune_score", "egfr_mutant"]  # the study forgets the survival columns
    _rewrite(nodes, lambda d, rng: {"T": d["os_time"], "E": d["os_event"], "death": d["os_event"],
                                    "os_days": d["os_time"] * 30.4, "pfs_event": d["os_event"]})
    res = run_study_in_process(cfg, nodes)
    assert set(res["endpoint_like_excluded"]) >= {"T", "E", "death", "os_days", "os_time", "os_event", "pfs_event"}
    used = {f for sel in res["selection"].values() for f in sel["selected"]}
    assert not used & {"T", "E", "death", "os_days", "os_time", "os_event", "pfs_event"}
    line = next(x for x in headline(res) if x.startswith("left out of the features as endpoint or follow-up"))
    assert "E" in line.split(": ", 1)[1].split(", ") and "T" in line


def test_a_planted_leaky_feature_is_withheld_named_and_the_twin_agrees(tmp_path):
    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    _rewrite(nodes, lambda d, rng: {"original_firstorder_Leak": d["response"] + rng.normal(scale=0.2, size=len(d))})
    tables = {n["site-name"]: pd.read_parquet(n["table"]) for n in nodes}
    res = run_study_in_process(cfg, nodes)
    withheld = res["leakage"]["withheld"]
    assert set(withheld) == {"original_firstorder_Leak"} and withheld["original_firstorder_Leak"] >= 0.95
    assert res["leakage"]["measure"] == "AUC" and len(res["leakage"]["folds"]) == 1 + len(tables)
    assert all("original_firstorder_Leak" not in sel["selected"] for sel in res["selection"].values())
    assert any(x.startswith("probable leakage withheld from the signature: original_firstorder_Leak (training AUC")
               for x in headline(res))
    assert not any(x.startswith("IMPLAUSIBLE") for x in headline(res))
    site = sorted(tables)[0]
    twin = pooled_loso(cfg, tables, site)
    assert twin["signature"] == res["selection"][f"loso:{site}"]["selected"]
    got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
    assert max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got) < 1e-6
    # [selection] allow keeps it: then it is in the signature and the external AUCs are flagged as implausible
    cfg2, nodes2, _ = make_sites(tmp_path / "allowed", survival=False)
    _rewrite(nodes2, lambda d, rng: {"original_firstorder_Leak": d["response"] + rng.normal(scale=0.2,
                                                                                            size=len(d))})
    cfg2["selection"]["allow"] = ["original_firstorder_Leak"]
    res2 = run_study_in_process(cfg2, nodes2)
    assert res2["leakage"]["withheld"] == {} and "original_firstorder_Leak" in res2["signature"]
    assert any(x.startswith("IMPLAUSIBLE: external AUC radiomic signature") for x in headline(res2)), headline(res2)


@pytest.mark.parametrize("endpoint", ["survival", "continuous"])
def test_the_screen_covers_survival_and_continuous_outcomes(tmp_path, endpoint):
    survival = endpoint == "survival"
    cfg, nodes, _ = make_sites(tmp_path, survival=survival, continuous=not survival)
    if survival:
        _rewrite(nodes, lambda d, rng: {"original_firstorder_Leak": -d["os_time"] + rng.normal(scale=0.01,
                                                                                               size=len(d))})
    else:
        _rewrite(nodes, lambda d, rng: {"original_firstorder_Leak": d["immune_score"] + rng.normal(size=len(d))})
    res = run_study_in_process(cfg, nodes)
    leak = res["leakage"]
    assert leak["measure"] == ("C" if survival else "|r|") and set(leak["withheld"]) == {"original_firstorder_Leak"}
    value = leak["withheld"]["original_firstorder_Leak"]
    assert (value <= 0.05) if survival else (value >= 0.95)
    assert all("original_firstorder_Leak" not in sel["selected"] for sel in res["selection"].values())


def _pooled(pairs: dict, k: int = 4) -> dict:
    return {"endpoint": {"type": "response", "outcome": "y"}, "external": {},
            "pooled": {"radiomics": {"pooled": 0.6, "ci_low": 0.5, "ci_high": 0.7, "k": k},
                       "paired": {p: {"pooled": d, "ci_low": lo, "ci_high": hi, "k": k}
                                  for p, (d, lo, hi) in pairs.items()}}}


def test_the_headline_gives_a_verdict_and_warns_on_two_sites():
    lines = headline(_pooled({"radiomics-volume": (-0.003, -0.05, 0.04), "radiomics-clinical": (0.08, 0.02, 0.14)}))
    verdict = next(x for x in lines if x.startswith("verdict"))
    assert verdict == ("verdict (4 held-out sites, paired differences pooled): no evidence that the signature "
                       "discriminates better than tumour volume (ΔAUC -0.003, 95% CI -0.050 to 0.040); the signature "
                       "discriminates better than the clinical covariates (ΔAUC +0.080, 95% CI 0.020–0.140)")
    worse = headline(_pooled({"radiomics-volume": (-0.1, -0.15, -0.05)}))
    assert any("the signature discriminates worse than tumour volume" in x for x in worse)
    assert not any(x.startswith("only 2 held-out sites") for x in lines)
    two = headline(_pooled({"radiomics-volume": (0.01, -0.1, 0.12)}, k=2))
    assert any(x.startswith("only 2 held-out sites, each model trained on the other site alone") for x in two)


def test_the_subgroup_table_says_withheld_not_zero():
    from fedrad.server.report import _subgroup_table

    res = {"endpoint": {"type": "response", "outcome": "y"},
           "pooled": {"radiomics": {"pooled": 0.7}, "subgroups": {
               "stage": {"1": {"sites": 0, "n": 0}, "2": {"sites": 3, "n": 120, "radiomics": {
                   "pooled": 0.71, "ci_low": 0.6, "ci_high": 0.8}}}}}}
    html = _subgroup_table(res)
    assert "<td>stage = 1</td><td>withheld (&lt; k)</td><td>withheld (&lt; k)</td>" in html
    assert "<td>stage = 2</td><td>3</td><td>120</td>" in html


def test_the_site_takes_the_screens_outcome_from_its_plan_and_features_from_its_candidates(tmp_path):
    """A coordinator that names another outcome column, a non-candidate column or the screen under an endpoint
    without it gets the plan's outcome or a refusal, through the real site agent."""
    from fedrad.client.client_app import app
    from fedrad.client.site import Site
    from fedrad.common.plan import study_plan
    from fedrad.local import approve_at_sites
    from fedrad.server.federation import Federation, LocalGrid
    from fedrad.server.study import Study
    from tests.test_site_guard import ask, refused

    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    approve_at_sites(study_plan(cfg), nodes)
    st = Study(Federation(LocalGrid(app, nodes)), cfg)
    st.prepare()
    st.harmonize()
    node, site = nodes[0], nodes[0]["site-name"]

    def select(request):
        return {"plan": st.plan_id, "folds": {"final": {"train_sites": [site], "table": "h-final",
                                                          "requests": {"leak": request}}}}

    chosen = concordance_request(["original_glcm_F0"], outcome="os_event")  # not the plan's outcome
    got = ask(node, "study_select", select(chosen))["folds"]["final"]["leak"]
    rows = Site.from_node_config(node).table("h-final")
    want = site_concordance(rows, concordance_request(["original_glcm_F0"], outcome="response"), site=site)
    np.testing.assert_array_equal(got["concordant"], want["concordant"])
    assert got["pairs"] == want["pairs"]
    refused(node, "study_select", select(concordance_request(["age"], outcome="response")), "outside-plan")
    refused(node, "study_select", select(concordance_request(["case_id"], outcome="response")), "outside-plan")
