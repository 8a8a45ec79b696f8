"""Real feature tables are not the demo (issue 12): other extractors' column names, other endpoints' columns in
the same table, missing cells, zero and negative survival times. `fedrad study run --runtime local` runs end to
end on such tables, keeps the tumour-volume baseline, and equals its pooled twin; the missing-value rule
(:mod:`fedrad.common.missing`) is exact between the sites' moments and the pooled rows."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedrad.common.missing import fold_values, fold_values_rows, impute, missing_plan, missing_plan_rows
from fedrad.common.pipeline import exclusion_reasons
from fedrad.common.plan import candidate_features, study_plan
from fedrad.server.study_config import load_study
from fedrad.server.study_pooled import flatten_metrics, pooled_loso

SIZES = (96, 81, 104, 77)
K = 10
#: the same radiomic quantities (volume, then five texture / intensity features) as three extractors name them
NAMING = {
    "pyradiomics-1.x": ["original_shape_Volume", "original_glcm_Contrast", "original_glcm_Correlation",
                        "original_firstorder_Mean", "original_glrlm_RunEntropy", "original_glszm_ZoneEntropy"],
    "mirp": ["morph_volume", "cm_contrast_d1_3d_avg", "cm_corr_d1_3d_avg", "stat_mean", "rlm_rl_entr_3d_avg",
             "szm_zs_entr_3d"],
    "generic": ["tumour_volume", "contrast", "correlation", "mean_intensity", "run_entropy", "zone_entropy"],
}
GENERIC = NAMING["generic"]
SITES = ("hospA", "hospB", "hospC", "hospD")


def _site_table(rng, k: int, n: int, survival: bool) -> pd.DataFrame:
    bio = rng.normal(size=(n, 2))
    age, stage = rng.normal(62, 9, n), rng.integers(1, 5, n)
    vol = np.exp(rng.normal(8, 0.6, n) + 0.35 * bio[:, 0])
    x = np.column_stack([bio[:, 0] + rng.normal(scale=0.6, size=n), bio[:, 1] + rng.normal(scale=0.6, size=n),
                         rng.normal(size=(n, 3))]) * (1 + 0.25 * k) + 2 * k
    d = pd.DataFrame(np.column_stack([vol, x]), columns=GENERIC)
    d["age"], d["stage"], d["sex"] = age, stage, rng.choice(["F", "M"], n)
    lp = 1.1 * bio[:, 0] - 0.9 * bio[:, 1] + 0.25 * (stage - 2.5)
    d["response"] = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    t, c = rng.exponential(1 / np.exp(lp)) * 24, rng.uniform(6, 60, n)
    d["pfs_months"], d["pfs_event"] = np.round(np.minimum(t, c), 0), (t <= c).astype(int)  # zeros after rounding
    d["patient_id"] = [f"P{k}{i:03d}" for i in range(n)]
    d["scanner_kvp"] = rng.choice([100.0, 120.0], n)  # an acquisition column the study excludes
    return d


def make_tables(tmp_path, survival: bool, naming: str = "generic", seed: int = 4) -> dict[str, pd.DataFrame]:
    """Four sites' tables in one extractor's naming, written to ``<tmp_path>/<site>/features.csv``."""
    rng = np.random.default_rng(seed)
    tables = {}
    for k, (site, n) in enumerate(zip(SITES, SIZES)):
        d = _site_table(rng, k, n, survival)
        # missing cells: >= k at one site (the fold's value), < k at another (the site's own mean), and one
        # feature missing in 40% of a site's patients (dropped)
        if site == "hospA":
            d.loc[d.index[:14], "run_entropy"] = np.nan
        if site == "hospB":
            d.loc[d.index[:3], "correlation"] = np.nan
            d.loc[d.index[5:8], "run_entropy"] = np.nan
        if site == "hospC":
            d.loc[d.index[: int(0.4 * n)], "zone_entropy"] = np.nan
        if survival and site == "hospC":  # a negative and a missing time: excluded, counted, the site stays in
            d.loc[d.index[-2], "pfs_months"] = -3.0
            d.loc[d.index[-1], "pfs_months"] = np.nan
        d = d.rename(columns=dict(zip(GENERIC, NAMING[naming])))
        path = tmp_path / site / "features.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        d.to_csv(path, index=False)
        tables[site] = pd.read_csv(path, float_precision="round_trip")  # what the site reads
    return tables


def write_study(tmp_path, survival: bool) -> str:
    ep = ('type = "survival"\ntime = "pfs_months"\nevent = "pfs_event"' if survival
          else 'type = "response"\noutcome = "response"')
    other = '["response"]' if survival else '["pfs_*"]'
    sites = "".join(f'[sites.{s}]\ntable = "{tmp_path / s / "features.csv"}"\n' for s in SITES)
    text = f"""[study]
name = "real tables"
output = "out"
min_sites = 3
[endpoint]
{ep}
{sites}
[harmonization]
covariates = ["age", "sex"]
categorical = ["sex"]
[selection]
exclude = {other[:-1]}, "scanner_*"]
max_features = 3
[model]
clinical = ["age", "stage"]
grid = [0.01, 0.1, 1.0]
[validation]
inner_folds = 3
"""
    path = tmp_path / "study.toml"
    path.write_text(text)
    return str(path)


def test_feature_columns_by_default_are_the_unnamed_numeric_columns(tmp_path):
    tables = make_tables(tmp_path, survival=False, naming="mirp")
    cfg = load_study(write_study(tmp_path, survival=False))
    study = study_plan(cfg)["study"]
    # not age/stage (clinical), sex (text), response (outcome), pfs_* and scanner_* (excluded), patient_id
    assert candidate_features(tables["hospB"], study) == NAMING["mirp"]
    study["selection"]["feature_columns"] = ["*_3d*"]
    assert candidate_features(tables["hospB"], study) == ["cm_contrast_d1_3d_avg", "cm_corr_d1_3d_avg",
                                                          "rlm_rl_entr_3d_avg", "szm_zs_entr_3d"]


def test_missing_value_rule_from_moments_equals_rows():
    rng = np.random.default_rng(0)
    tables = {}
    for s, (n, miss) in {"a": (40, 12), "b": (30, 3), "c": (25, 0)}.items():
        t = pd.DataFrame({"f": rng.normal(size=n) + len(s), "g": rng.normal(size=n), "h": rng.normal(size=n)})
        t.loc[t.index[:miss], "f"] = np.nan
        t.loc[t.index[: n // 2], "h"] = np.nan
        tables[s] = t
    plan = missing_plan_rows(tables, ["f", "g", "h"], 0.35, K)
    assert set(plan["dropped"]) == {"h"} and "50%" in plan["dropped"]["h"]
    assert plan["impute"] == ["f"] and plan["cells"] == {"a": 12, "b": 3, "c": 0}
    from fedrad.common.missing import moments_of_rows

    moments = {s: moments_of_rows(t, ["f", "g", "h"], K) for s, t in tables.items()}
    assert missing_plan(moments, {s: len(t) for s, t in tables.items()}, ["f", "g", "h"], 0.35) == plan
    fed = fold_values(moments, ["a", "b"], ["f"])["f"]
    pooled = fold_values_rows(tables, ["a", "b"], ["f"])["f"]
    assert abs(fed - pooled) < 1e-12
    assert abs(pooled - np.nanmean(np.r_[tables["a"]["f"], tables["b"]["f"]])) < 1e-12
    # >= k missing cells get the fold's value; < k the site's own observed mean
    a, used_a = impute(tables["a"], {"f": fed}, K)
    b, used_b = impute(tables["b"], {"f": fed}, K)
    assert used_a == {"f": "fold"} and used_b == {"f": "site"}
    assert np.allclose(a["f"][:12], fed) and np.allclose(b["f"][:3], tables["b"]["f"][3:].mean())
    # a site smaller than k withholds every moment: it must not drop every feature for the others
    tables["d"] = tables["c"].iloc[: K - 2].copy()
    small = missing_plan_rows(tables, ["f", "g", "h"], 0.35, K)
    assert small["silent"] == ["d"] and set(small["dropped"]) == {"h"} and small["impute"] == ["f"]


def test_exclusions_keep_zero_times_and_count_negative_and_missing():
    d = pd.DataFrame({"t": [0.0, 0.0, 5.0, -1.0, np.nan, 3.0], "e": [1, 0, 1, 1, 0, 1],
                      "age": [50, 60, np.nan, 70, 80, 55]})
    keep, reasons = exclusion_reasons(d, {"type": "survival", "time": "t", "event": "e"}, ["age"])
    assert keep.tolist() == [True, True, False, False, False, True]
    assert reasons == {"missing t": 1, "negative t": 1, "missing clinical or covariate value": 1}


def _run(study: str):
    return subprocess.run([sys.executable, "-m", "fedrad.cli", "study", "run", study, "--runtime", "local"],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(("naming", "survival"), [("pyradiomics-1.x", False), ("mirp", True)])
def test_study_run_local_on_other_extractors_tables_equals_pooled_twin(tmp_path, naming, survival):
    tables = make_tables(tmp_path, survival, naming)
    study = write_study(tmp_path, survival)
    run = _run(study)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    names = dict(zip(GENERIC, NAMING[naming]))
    assert res["volume"]["column"] == names["tumour_volume"]  # detected, not declared
    share = int(0.4 * SIZES[2]) / res["sites"]["hospC"]["n"]
    assert res["missing"]["dropped"] == {names["zone_entropy"]: f"missing in {share:.0%} of hospC's patients"}
    assert res["missing"]["imputed"] == [names["correlation"], names["run_entropy"]]
    assert res["missing"]["cells"] == {"hospA": 14, "hospB": 6, "hospC": 0, "hospD": 0}
    if survival:
        assert res["sites"]["hospC"]["exclusions"] == {"missing pfs_months": None, "negative pfs_months": None}
        assert res["sites"]["hospC"]["n"] == SIZES[2] - 2  # under k: withheld, the site stays in
        assert (tables["hospA"]["pfs_months"] == 0).sum() > 0 and res["sites"]["hospA"]["n"] == SIZES[0]
    cfg = load_study(study)
    key, stat = ("c_index", "c") if survival else ("auc", "auc")
    for site in SITES:
        twin = pooled_loso(cfg, tables, site, min_cell_size=K)
        assert twin["signature"] == res["selection"][f"loso:{site}"]["selected"]
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert set(got) == set(want)
        worst = max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got)
        assert worst < 1e-6, (site, worst)
        assert res["external"][site]["volume"][key][stat] is not None
    report = (tmp_path / "out" / "report.html").read_text()
    assert "imputed" in report and names["zone_entropy"] in report


def test_sites_with_different_extractors_get_a_one_line_error(tmp_path):
    make_tables(tmp_path, survival=False)
    for site, naming in (("hospA", "pyradiomics-1.x"), ("hospB", "mirp")):
        path = tmp_path / site / "features.csv"
        pd.read_csv(path).rename(columns=dict(zip(GENERIC, NAMING[naming]))).to_csv(path, index=False)
    run = _run(write_study(tmp_path, survival=False))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fedrad: error: the sites share no feature column"), last
    assert "hospA: 6 candidate(s)" in last and "feature_columns" in last


def test_missing_values_without_harmonization_equal_pooled_twin(tmp_path):
    """Harmonization off: one imputation round makes each fold's imputed table (score tests in the same round)."""
    from fedrad.local import rehearsal_nodes, run_study_in_process

    tables = make_tables(tmp_path, survival=False)
    cfg = load_study(write_study(tmp_path, survival=False))
    cfg["harmonization"]["enabled"] = False
    res = run_study_in_process(cfg, rehearsal_nodes(cfg, tmp_path / "work"))
    assert [p["phase"] for p in res["phases"]] == ["prepare", "imputation", "selection", "models", "evaluation"]
    assert res["missing"]["imputed"] == ["correlation", "run_entropy"]
    for site in SITES:
        twin = pooled_loso(cfg, tables, site, min_cell_size=K)
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert set(got) == set(want)
        assert max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got) < 1e-6


def test_outcome_like_candidates_are_named_in_the_headline():
    from fedrad.server.report import headline
    from fedrad.server.study import outcome_like

    feats = ["original_glcm_Contrast", "os_time", "PFS_event", "vital_status", "original_shape_Sphericity"]
    assert outcome_like(feats) == ["os_time", "PFS_event", "vital_status"]
    lines = headline({"endpoint": {"type": "response", "outcome": "y"}, "outcome_like_features": ["os_time"],
                      "pooled": {}, "external": {}})
    assert any(line.startswith("check the features: os_time") for line in lines), lines
