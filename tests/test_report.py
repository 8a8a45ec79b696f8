"""The study report: its statistics from aggregates against independent references (scipy, sklearn, pandas on
the pooled rows, the pooled twin), small-cell suppression in the cohort table, the report's content for a study
that lost a site, and the page rendered in a real headless browser (Debian chromium; skipped when absent)."""
from __future__ import annotations

import html as htmlmod
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from fedrad.client.demo_data import simulate_demo_table
from fedrad.common.report_stats import (anova_from_moments, calibration_bins, centroid_pca, cohort_summary,
                                        combine_moments, feature_moments, moment_arrays, pool_calibration_bins,
                                        pooled_anova, project_centroids, suppress_counts)
from fedrad.server.plans import write_json_atomic
from fedrad.server.report import write_report
from fedrad.server.study_config import _merge, validate

K = 10  # the sites' minimum cell size


# ----------------------------------------------------------------------------------------------
# pure math against independent references
# ----------------------------------------------------------------------------------------------
def _groups(seed=0):
    rng = np.random.default_rng(seed)
    sizes = (23, 41, 17, 35)
    parts = [rng.normal(loc=0.3 * i, scale=1 + 0.4 * i, size=(n, 5)) for i, n in enumerate(sizes)]
    parts[2][:, 4] += 2.0  # a strong site effect in the last feature
    return parts


def test_anova_from_moments_equals_scipy_f_oneway_on_the_pooled_rows():
    parts = _groups()
    feats = [f"f{j}" for j in range(5)]
    moments = {f"s{i}": feature_moments(pd.DataFrame(x, columns=feats), feats, K) for i, x in enumerate(parts)}
    _, n, mean, var = moment_arrays(moments, feats)
    fed = anova_from_moments(n, mean, var)
    ref = scipy.stats.f_oneway(*parts, axis=0)
    np.testing.assert_allclose(fed["f"], ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(fed["p"], ref.pvalue, rtol=1e-8, atol=1e-300)
    assert fed["df_between"] == [3] * 5 and fed["df_within"] == [sum(len(x) for x in parts) - 4] * 5
    pooled = pooled_anova(np.vstack(parts), np.repeat(range(4), [len(x) for x in parts]))
    np.testing.assert_allclose(pooled["f"], ref.statistic, rtol=1e-10)
    assert fed["p"][4] < 1e-4 and fed["f"][4] == max(fed["f"])  # the feature with the added site effect


def test_anova_from_moments_names_undefined_cases_instead_of_nan():
    n = np.array([[12, 15], [20, 15], [11, 15]], dtype=float)
    mean = np.array([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]])
    var = np.zeros((3, 2))  # feature 0: one value everywhere; feature 1: constant within sites, different between
    a = anova_from_moments(n, mean, var)
    assert a["f"] == [None, None] and a["p"] == [None, 0.0]
    assert "same value everywhere" in a["reason"][0] and "F infinite" in a["reason"][1]
    one_site = anova_from_moments(np.array([[12.0], [0.0]]), np.array([[1.0], [0.0]]), np.array([[2.0], [0.0]]))
    assert one_site["f"] == [None] and "1 site(s)" in one_site["reason"][0]


def test_combined_moments_equal_the_pooled_rows():
    parts = _groups(1)
    feats = [f"f{j}" for j in range(5)]
    moments = {f"s{i}": feature_moments(pd.DataFrame(x, columns=feats), feats, K) for i, x in enumerate(parts)}
    N, mean, var = combine_moments(*moment_arrays(moments, feats)[1:])
    rows = np.vstack(parts)
    assert list(N) == [len(rows)] * 5
    np.testing.assert_allclose(mean, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, rows.var(axis=0, ddof=1), rtol=1e-12)
    small = feature_moments(pd.DataFrame(parts[0][:K - 1], columns=feats), feats, K)  # under k rows: withheld
    assert small["n"] == [0] * 5 and small["mean"] == [None] * 5


def test_centroid_pca_equals_sklearn_pca_on_the_standardized_site_means():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(2)
    means = rng.normal(size=(6, 8)) * np.arange(1, 9)
    center, scale = means.mean(axis=0) + 0.1, np.linspace(0.5, 2.0, 8)
    mine = centroid_pca(means, center, scale)
    z = (means - center) / scale
    ref = PCA(n_components=2).fit(z)
    scores, want = np.array(mine["scores"]), ref.transform(z)
    signs = np.sign(np.sum(scores * want, axis=0))  # a component's sign is arbitrary
    np.testing.assert_allclose(scores, want * signs, atol=1e-10)
    np.testing.assert_allclose(mine["explained_variance_ratio"], ref.explained_variance_ratio_, rtol=1e-10)
    after = means * 0.3 + center * 0.7  # centroids pulled towards the pooled mean (as by ComBat)
    np.testing.assert_allclose(np.array(project_centroids(mine, after)),
                               ref.transform((after - center) / scale) * signs, atol=1e-10)
    two = centroid_pca(means[:2], center, scale)  # two sites: one non-trivial component, the other 0
    assert np.allclose(np.array(two["scores"])[:, 1], 0) and two["explained_variance_ratio"][1] < 1e-12


def test_small_counts_are_withheld_with_a_complement():
    assert suppress_counts({"F": 87, "M": 4}, K) == {"F": None, "M": None}
    assert suppress_counts({"1": 30, "2": 3, "3": 25, "4": 40}, K) == {"1": 30, "2": None, "3": None, "4": 40}
    assert suppress_counts({"a": 3, "b": 8, "c": 50, "d": 60}, K) == {"a": None, "b": None, "c": 50, "d": 60}
    assert suppress_counts({"a": 10, "b": 12}, K) == {"a": 10, "b": 12}


def test_cohort_summary_equals_pandas_and_withholds_small_cells():
    d = simulate_demo_table(1, 60, seed=4)
    d.loc[d.index[:4], "stage"] = 9  # 4 patients at stage 9: under k
    s = cohort_summary(d, endpoint={"type": "response", "outcome": "response"}, columns=["age", "stage", "sex"],
                       categorical=["sex"], k=K)
    assert s["continuous"]["age"] == {"n": 60, "mean": pytest.approx(d["age"].mean(), rel=1e-12),
                                      "sd": pytest.approx(d["age"].std(ddof=1), rel=1e-12)}
    for col in ("stage", "sex"):
        counts = {str(lv): int(c) for lv, c in d[col].value_counts().items()}
        got = s["counts"][col]
        assert set(got) == set(counts)
        small = sorted(lv for lv, c in counts.items() if c < K)
        assert sorted(s["under_k"].get(col, [])) == small and all(got[lv] is None for lv in small)
        assert all(got[lv] in (None, c) for lv, c in counts.items())  # released cells are the true counts
        withheld = [lv for lv in got if got[lv] is None]
        assert not withheld or sum(counts[lv] for lv in withheld) >= K  # withheld cells cannot be derived
    assert "9" in s["under_k"]["stage"] and sum(v is None for v in s["counts"]["stage"].values()) >= 2
    events = int(d["response"].sum())
    assert s["outcome"] == {"events": events, "non_events": 60 - events}


def test_calibration_bins_and_their_pooling_equal_direct_sums():
    rng = np.random.default_rng(3)
    p = rng.uniform(0.02, 0.98, 300)
    y = (rng.random(300) < p).astype(int)
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    cb = calibration_bins(y, p, edges)
    for j in range(4):
        m = (p >= edges[j]) & (p < edges[j + 1])
        assert cb["n"][j] == m.sum() and cb["events"][j] == y[m].sum()
        assert cb["mean_predicted"][j] == pytest.approx(p[m].mean(), rel=1e-12)
    other = calibration_bins(y[:100], p[:100], [0.0, 0.5, 1.0])
    pooled = pool_calibration_bins([cb, other, {"n": None}], grid=[0.0, 0.5, 1.0])
    low = np.r_[p < 0.5, p[:100] < 0.5]
    yy, pp = np.r_[y, y[:100]], np.r_[p, p[:100]]
    assert pooled["n"] == [low.sum(), (~low).sum()]
    np.testing.assert_allclose(pooled["observed"], [yy[low].mean(), yy[~low].mean()], rtol=1e-12)
    np.testing.assert_allclose(pooled["mean_predicted"], [pp[low].mean(), pp[~low].mean()], rtol=1e-12)


def test_risk_group_counts_are_withheld_when_a_cell_is_under_k():
    from fedrad.common.endpoints import Survival

    surv = Survival({"time": "t", "event": "e"})

    rng = np.random.default_rng(6)
    t = rng.uniform(1, 30, 60)
    lp = np.r_[np.full(30, 1.0), np.full(30, -1.0)] + rng.normal(scale=0.1, size=60)
    e = np.r_[np.ones(20), np.zeros(10), np.ones(3), np.zeros(27)].astype(int)  # 3 events in the low-risk group
    grid = [0, 10, 20, 30]
    split = surv.model_metrics(lp, (t, e), K, grid)["risk_split"]
    assert split["n_high"] is split["n_low"] is split["events_high"] is split["events_low"] is None
    assert split["hr"] is not None and split["logrank_p"] < 1e-3  # the estimates are still released
    e[30:45] = 1  # now 15 events of 30 in the low-risk group: every cell >= k
    split = surv.model_metrics(lp, (t, e), K, grid)["risk_split"]
    assert (split["n_high"], split["events_high"], split["n_low"], split["events_low"]) == (30, 20, 30, 15)


# ----------------------------------------------------------------------------------------------
# whole studies (in-process Flower message layer)
# ----------------------------------------------------------------------------------------------
def demo_sites(tmp: Path, n_sites: int, n: int, seed: int = 0):
    """Demo cohort rows (client.demo_data) with radiomic-like features derived from the latent biology, a scanner
    effect per site (scale and offset), site2 with only 3 patients at stage 4 and site3 with 3 patients lacking
    age (both under k)."""
    table = simulate_demo_table(n_sites, n, seed)
    rng = np.random.default_rng(seed)
    nodes, tables = [], {}
    for k, (name, d) in enumerate(table.groupby("site", sort=True)):
        d = d.reset_index(drop=True).drop(columns=["site"])
        scale, offset = 1.0 + 0.12 * k, 1.5 * k
        noise = lambda sd: rng.normal(scale=sd, size=len(d))  # noqa: E731
        d["original_shape_VoxelVolume"] = np.pi / 6 * d["diameter_mm"] ** 3 * np.exp(noise(0.05))
        d["original_shape_Sphericity"] = 1.0 - d["irregularity"] + noise(0.02)
        d["original_firstorder_Mean"] = d["lesion_mean_hu"] * scale + 4 * offset + noise(1.5)
        d["original_glcm_Contrast"] = d["texture_sd_hu"] * scale + 2 * offset + noise(1.0)
        d["original_glcm_Correlation"] = d["texture_scale_mm"] * scale + 0.3 * offset + noise(0.2)
        d["original_glrlm_RunEntropy"] = noise(1.0) * scale + offset
        d["original_glszm_ZoneEntropy"] = noise(1.0) + 0.5 * offset
        d["original_firstorder_Skewness"] = noise(1.0)
        d = d.drop(columns=["aggressiveness", "heterogeneity", "diameter_mm", "irregularity", "texture_sd_hu",
                            "texture_scale_mm", "lesion_mean_hu", "lp_response", "lp_hazard"])
        if name == "site2":
            d["stage"] = d["stage"].where(d["stage"] < 4, 3)
            d.loc[d.index[:3], "stage"] = 4
        if name == "site3":
            d.loc[d.index[:3], "age"] = np.nan
        path = tmp / name / "features.parquet"
        path.parent.mkdir(parents=True)
        d.to_parquet(path)
        tables[name] = d
        nodes.append({"site-name": name, "table": str(path), "workdir": str(tmp / name / "work"),
                      "min-cell-size": K})
    return nodes, tables


def study_cfg(endpoint: dict, grid: list[float]) -> dict:
    return validate(_merge({"study": {"name": "Report test study", "min_sites": 3}, "endpoint": endpoint,
                            "harmonization": {"covariates": ["age", "sex"], "categorical": ["sex"]},
                            "selection": {"max_features": 4,
                                          "exclude": ["response", "os_*", "immune_score", "egfr_mutant"]},
                            "model": {"clinical": ["age", "stage"], "grid": grid},
                            "validation": {"inner_folds": 2, "km_times": [0, 6, 12, 24, 36, 48, 60, 72]}}))


LOST = "site5"
LOST_REASON = "the hospital's network went down"


@pytest.fixture(scope="module")
def response_study(tmp_path_factory):
    """5 sites; site5 fails during selection, the study restarts with the other 4 (missing site in the report)."""
    from fedrad.client.client_app import app as client_app
    from fedrad.server.federation import Federation, LocalGrid
    from fedrad.server.study import Study

    tmp = tmp_path_factory.mktemp("response")
    nodes, tables = demo_sites(tmp, 5, 60)
    cfg = study_cfg({"type": "response", "outcome": "response"}, [0.1, 1.0])

    def flaky(msg, context):
        if context.node_config["site-name"] == LOST and msg.metadata.message_type == "query.study_select":
            raise ConnectionError(f"site {LOST}: {LOST_REASON}")
        return client_app(msg, context)

    from fedrad.common.plan import study_plan
    from fedrad.local import approve_at_sites

    approve_at_sites(study_plan(cfg), nodes)
    res = Study(Federation(LocalGrid(flaky, nodes)), cfg).run()
    write_json_atomic(res, tmp / "results.json")
    res = json.loads((tmp / "results.json").read_text())  # the report is made from results.json
    return {"cfg": cfg, "tables": tables, "results": res, "report": write_report(res, tmp / "report.html"),
            "tmp": tmp}


def _study_in_process(tmp: Path, n_sites: int, n: int, seed: int, cfg: dict) -> dict:
    """A study on the demo-derived sites, run in-process; its results re-read from results.json (as the report
    is made) and its report."""
    from fedrad.local import run_study_in_process

    nodes, tables = demo_sites(tmp, n_sites, n, seed=seed)
    res = run_study_in_process(cfg, nodes)
    write_json_atomic(res, tmp / "results.json")
    res = json.loads((tmp / "results.json").read_text())
    return {"cfg": cfg, "tables": tables, "results": res, "report": write_report(res, tmp / "report.html"),
            "tmp": tmp}


@pytest.fixture(scope="module")
def survival_study(tmp_path_factory):
    return _study_in_process(tmp_path_factory.mktemp("survival"), 3, 70, 1,
                             study_cfg({"type": "survival", "time": "os_time", "event": "os_event"}, [0.1]))


@pytest.fixture(scope="module")
def continuous_study(tmp_path_factory):
    return _study_in_process(tmp_path_factory.mktemp("continuous"), 4, 60, 2,
                             study_cfg({"type": "continuous", "outcome": "immune_score"}, [0.01, 0.1]))


@pytest.fixture(scope="module")
def association_study(tmp_path_factory):
    """The demo cohort's molecular markers (immune score, EGFR status) against the radiomic features."""
    cfg = validate(_merge({"study": {"name": "Association test study", "min_sites": 3, "kind": "association"},
                           "harmonization": {"covariates": ["age", "sex"], "categorical": ["sex"]},
                           "selection": {"exclude": ["response", "os_*"]},
                           "model": {"clinical": ["age", "stage"]},
                           "association": {"markers": ["immune_score", "egfr_mutant"], "top": 3}}))
    return _study_in_process(tmp_path_factory.mktemp("association"), 4, 60, 3, cfg)


def test_association_report_has_the_matrix_the_survivors_and_the_enrichment(association_study):
    res = association_study["results"]
    assoc = res["association"]
    text, parsed = _parse(association_study["report"])
    plain = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    assert parsed.figures == ["fig-harmonization", "fig-association-heatmap", "fig-association-forest"]
    assert f"{len(assoc['survivors'])} of {assoc['n_tests']} feature × marker pairs associated" in plain
    # the demo's biology: the immune score follows texture heterogeneity, EGFR status aggressiveness
    assert {m for _, m in assoc["survivors"]} == {"immune_score", "egfr_mutant"}
    assert any("glcm" in f for f, m in assoc["survivors"] if m == "immune_score")
    table = next(t for t in parsed.tables if t and t[0][:2] == ["feature", "marker"])
    assert len(table) - 1 == len(assoc["survivors"])
    f, m = assoc["survivors"][0]
    assert table[1][:2] == [f.removeprefix("original_"), m]
    assert table[1][2].startswith(f"{assoc['pairs'][m][f]['r']:+.3f}")
    assert "marker egfr_mutant = 1, n (%)" in plain and "marker immune_score, mean ± SD" in plain
    assert "TRIPOD" not in plain and "leave-one-site-out" not in plain.lower()


def test_continuous_report_says_what_its_numbers_are(continuous_study):
    """A continuous endpoint's report: the headline is the pooled Pearson r, the cohort gives the outcome's mean
    and SD, the validation section has the calibration groups and the R² / RMSE table, and TRIPOD names the
    measures; nothing of a binary or survival endpoint (ROC, Kaplan-Meier, risk groups) appears."""
    res = continuous_study["results"]
    text, parsed = _parse(continuous_study["report"])
    plain = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    p = res["pooled"]["radiomics"]
    assert f"pooled external Pearson r of the radiomic signature: {p['pooled']:.3f}" in plain
    assert "outcome (immune_score), mean ± SD" in plain
    assert "fig-calibration" in parsed.figures and "fig-forest" in parsed.figures
    assert not {"fig-roc", "fig-km"} & set(parsed.figures)
    assert "Prediction error and calibration of the radiomic signature" in plain
    rmse = res["pooled"]["radiomics"]["rmse"]
    assert f"{rmse:.3f}" in plain
    assert "Pearson r of predicted and observed (Fisher-z CI), R², RMSE" in plain
    assert "Kaplan-Meier" not in plain and "hazard" not in plain.lower()
    assert 0.3 < p["pooled"] < 0.95 and res["pooled"]["radiomics"]["pooled"] > res["pooled"]["volume"]["pooled"]


def test_site_effect_from_moments_equals_the_pooled_twin(response_study):
    from fedrad.server.study_pooled import pooled_site_effect

    res = response_study["results"]
    kept = {s: t for s, t in response_study["tables"].items() if s != LOST}
    twin = pooled_site_effect(response_study["cfg"], kept, min_cell_size=K)
    fed = res["site_effect"]
    assert fed["before"]["features"] == twin["before"]["features"] and fed["before"]["sites"] == sorted(kept)
    for when in ("before", "after"):
        np.testing.assert_allclose(fed[when]["f"], twin[when]["f"], rtol=1e-8)
        np.testing.assert_allclose(fed[when]["q"], twin[when]["q"], rtol=1e-8)
        assert fed[when]["n_significant"] == twin[when]["n_significant"]
    for when in ("before", "after"):
        np.testing.assert_allclose(fed["pca"][when], twin["pca"][when], atol=1e-8)
        for test in ("levene", "bartlett"):  # the multiplicative site effect, before and after ComBat
            np.testing.assert_allclose(fed[f"scale_{when}"][test]["stat"],
                                       [r.statistic for r in twin[f"scale_{when}"][test]], rtol=1e-8)
    assert fed["scale_before"]["levene"]["n_significant"] > fed["scale_after"]["levene"]["n_significant"]
    # the scanner effects are there before ComBat and gone after it
    assert fed["before"]["share_significant"] >= 0.75 and fed["after"]["share_significant"] <= 0.25
    assert fed["pca"]["spread_after"] < 0.3 * fed["pca"]["spread_before"]


def test_round_trips_are_unchanged_and_every_round_names_who_answered(response_study):
    res = response_study["results"]
    by_phase = {p["phase"]: p["round_trips"] for p in res["phases"]}
    assert by_phase["prepare"] == 1 and by_phase["harmonization"] == 2 and by_phase["selection"] == 1
    assert by_phase["evaluation"] == 1 and sum(by_phase.values()) <= 14
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, res["round_trips"] + 1))
    failed = [r for r in rounds if r["failed"]]
    assert len(failed) == 1 and failed[0]["request"] == "study_select" and failed[0]["phase"] == "selection"
    assert LOST_REASON in failed[0]["failed"][LOST] and LOST not in failed[0]["answered"]
    after = rounds[rounds.index(failed[0]) + 1:]
    assert after[0]["request"] == "study_prepare"  # the restart
    assert all(LOST not in r["asked"] and len(r["answered"]) == 4 for r in after)
    assert all(r["answered"] == sorted(f"site{i}" for i in range(1, 6)) for r in rounds[:rounds.index(failed[0])])


class _Tables(HTMLParser):
    """Every table of a page as rows of cell texts; figures and their SVG children counted."""

    def __init__(self):
        super().__init__()
        self.tables, self.figures, self.svgs_in_figures, self._fig = [], [], 0, None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "figure":
            self._fig = dict(attrs).get("id")
            self.figures.append(self._fig)
        elif tag == "svg" and self._fig:
            self.svgs_in_figures += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "figure":
            self._fig = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path: Path) -> tuple[str, _Tables]:
    text = path.read_text(encoding="utf-8")
    p = _Tables()
    p.feed(text)
    return text, p


def _cohort(parsed: _Tables) -> tuple[list[str], dict[str, list[str]]]:
    table = next(t for t in parsed.tables if t and t[0] and t[0][0] == "characteristic")
    return table[0], {r[0]: r[1:] for r in table[1:]}


def test_cohort_table_shows_counts_under_k_as_withheld(response_study):
    res = response_study["results"]
    head, rows = _cohort(_parse(response_study["report"])[1])
    assert head[1:6] == ["site1", "site2", "site3", "site4", "all sites"] and head[-1] == f"{LOST} (missing)"
    col = head.index("site2") - 1
    assert rows["4"][col] == "<10"  # 3 patients at stage 4 at site2: never released
    assert res["cohort"]["site2"]["counts"]["stage"]["4"] is None
    tables = response_study["tables"]
    true = {str(lv): int(c) for lv, c in tables["site2"]["stage"].value_counts().items()}
    complement = min((lv for lv in true if lv != "4"), key=lambda lv: true[lv])  # smallest other level
    assert true["4"] == 3 and true["4"] + true[complement] >= K
    withheld = [lv for lv in true if rows[lv][col] == "withheld‡"]
    assert withheld == [complement]  # withheld too, or stage 4 would be n minus the others
    n2 = len(tables["site2"])
    for lv in set(true) - {"4", complement}:
        assert rows[lv][col] == f"{true[lv]} ({100 * true[lv] / n2:.0f}%)"
    # the site's own audit log: the stage-4 count never left site2
    from fedrad.client.audit import AuditLog

    log = AuditLog(response_study["tmp"] / "site2" / "work" / "audit.jsonl")
    prepare = [e for e in log.entries() if e["request"] == "study_prepare"]
    assert prepare and all(e["payload"]["cohort"]["counts"]["stage"]["4"] is None for e in prepare)
    # excluded for missing age at site3: 3 patients, shown as <10
    assert rows["excluded: missing clinical or covariate value, n"][head.index("site3") - 1] == "<10"
    # the means are those of the rows; the all-sites column equals pandas on the pooled rows
    kept = {s: t.dropna(subset=["age", "stage", "response"]) for s, t in tables.items() if s != LOST}
    for s, t in kept.items():
        assert rows["age, mean ± SD"][head.index(s) - 1] == f"{t['age'].mean():.1f} ± {t['age'].std():.1f}"
    pooled = pd.concat(kept.values())
    assert rows["age, mean ± SD"][4] == f"{pooled['age'].mean():.1f} ± {pooled['age'].std():.1f}"
    n_all = rows["patients in the study (complete outcome and clinical data), n"]
    assert n_all[:5] == [str(len(kept[s])) for s in sorted(kept)] + [str(len(pooled))]
    pos = int(pooled["response"].sum())
    assert rows["positive outcome (response = 1), n (%)"][4] == f"{pos} ({100 * pos / len(pooled):.0f}%)"


def test_report_content_response(response_study):
    res, path = response_study["results"], response_study["report"]
    text, parsed = _parse(path)
    # self-contained: nothing fetched, no script
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text) and "<script" not in text
    assert "@import" not in text and "url(http" not in text
    assert parsed.figures == ["fig-harmonization", "fig-feature-moments", "fig-coefficients", "fig-forest",
                              "fig-roc", "fig-decision", "fig-calibration", "fig-paired"]
    assert parsed.svgs_in_figures == len(parsed.figures)
    plain = htmlmod.unescape(re.sub(r"<[^>]+>", " ", text))
    # missing site and reason, in the alert
    assert re.search(rf"marked missing.*{LOST}\s*:\s*{re.escape(LOST_REASON)}", " ".join(plain.split()))
    # harmonization numbers as computed
    b, a = res["site_effect"]["before"], res["site_effect"]["after"]
    assert f"{b['n_significant']} of {b['n_tested']} ({100 * b['share_significant']:.0f}%) before ComBat" in plain
    assert f"{a['n_significant']} of {a['n_tested']} ({100 * a['share_significant']:.0f}%) after" in plain
    # signature table: ICC not available (no ICC filter), coefficients per SD of the final radiomic model
    sig = next(t for t in parsed.tables if t[0][:3] == ["#", "feature", "univariate q-value (BH)"])
    params = res["final_models"]["radiomics"]["params"]
    assert [r[1] for r in sig[1:]] == [f.removeprefix("original_") for f in res["signature"]]
    assert "ICC(1,1) across perturbations" not in sig[0] and "Robustness (ICC) not available" in plain
    for r, f in zip(sig[1:], res["signature"]):
        assert r[3].startswith(f"{params['coef_std'][params['feature_names'].index(f)]:+.3f}")
    # forest plot values and the pooled estimate with I²
    pooled = res["pooled"]["radiomics"]
    assert f"{pooled['pooled']:.3f} ({pooled['ci_low']:.2f}–{pooled['ci_high']:.2f}); I² {100 * pooled['i2']:.0f}%" \
        in plain
    # TRIPOD+AI: every item and part 1 … 27c with a status; heterogeneity (23b) with the pooled I² as computed
    tripod = next(t for t in parsed.tables if t[0] == ["item", "topic", "status", "from this study"])
    items = [r[0] for r in tripod[1:] if r[0]]
    assert items[0] == "1" and items[-1] == "27c" and len(items) == 52  # TRIPOD+AI: 27 items, 52 with parts
    assert {"12d", "14", "18f", "20c", "23b", "27a"} <= set(items)
    assert {r[2] for r in tripod[1:]} <= {"reported here", "partly here", "authors to report", "not applicable"}
    assert any(r[0] == "20a" and LOST in r[3] for r in tripod[1:])
    row = {r[0]: r for r in tripod[1:]}
    assert f"I² {100 * pooled['i2']:.0f}%" in row["23b"][3] and row["23b"][2] == "reported here"
    assert row["14"][2] == "partly here" and "sex, stage" in row["14"][3]  # the plan's subgroup columns
    imbalanced = res["covariate_balance"]["unmodelled_imbalanced"]  # covariates ComBat does not model
    assert ("not modelled by ComBat: " + ", ".join(imbalanced) in row["16"][3]) == bool(imbalanced)
    abstract = next(t for t in parsed.tables if t[0][0] == "abstract item")
    assert [r[0] for r in abstract[1:]] == [str(i) for i in range(1, 14)]
    assert f"{pooled['pooled']:.3f}" in abstract[11][3]
    # METRICS: 30 items with the run's answers; the score printed is the one computed from them
    from fedrad.server.checklists import metrics_summary

    mt = next(t for t in parsed.tables if t[0][0] == "METRICS item")
    answers = {r[0]: r[4] for r in mt[1:]}
    assert list(answers) == [f"#{i}" for i in range(1, 31)]
    assert answers["#4"] == answers["#18"] == answers["#27"] == answers["#22"] == "yes"
    assert answers["#14"] == "no" and answers["#17"] == "not applicable" and answers["#12"] == "authors"
    summary = metrics_summary(res)
    words = " ".join(plain.split())
    assert f"the other items answered “no” as the online tool does: {summary['low']['score']:.1f}% " \
           f"({summary['low']['band']};" in words and f"at most {summary['high']['score']:.1f}%" in words
    yes_weight = sum(float(r[3]) for r in mt[1:] if r[4] == "yes")
    assert abs(summary["low"]["yes_weight"] - yes_weight) < 1e-12
    rqs = next(t for t in parsed.tables if t[0][0] == "RQS item")
    assert ["12. Validation", "−5 … +5", "+5"] == next(r for r in rqs if r[0].startswith("12."))[:3]
    # decision curves (RQS item 14): the pooled net benefit is the sum over the sites that released each threshold
    assert ["14. Potential clinical utility", "+2", "+2"] == next(r for r in rqs if r[0].startswith("14."))[:3]
    from fedrad.common.metrics import net_benefit

    dc = pooled["decision_curve"]
    tabs = [m["radiomics"]["decision"] for m in res["external"].values() if m["radiomics"]["decision"]["n"]]
    assert dc["sites"] == len(tabs) == 4
    n = sum(u["n"] for u in tabs)
    for j, t in enumerate(dc["thresholds"]):
        want = net_benefit(sum(u["tp"][j] for u in tabs), sum(u["fp"][j] for u in tabs), n, t)
        assert abs(dc["net_benefit"][j] - want) < 1e-15
        assert dc["exact"][j] == all(u["exact"][j] for u in tabs)
        # the counts are partial sums of the released ROC bins, interpolated inside a merged bin
        for m in res["external"].values():
            b, d = m["radiomics"]["roc_bins"], m["radiomics"]["decision"]
            edges = np.asarray(b["edges"])
            if d["exact"][j]:
                assert d["tp"][j] == sum(c for c, lo in zip(b["pos_counts"], edges[:-1]) if lo >= t - 1e-12)
    assert sum(sum(m["radiomics"]["decision"]["exact"]) for m in res["external"].values()) >= 8
    # provenance: versions at the coordinator and every site, rounds with the failed one
    soft = next(t for t in parsed.tables if t[0][:2] == ["software", "coordinator"])
    row = next(r for r in soft if r[0] == "pyradiomics")
    assert row[1:] == [version("pyradiomics")] * 5
    assert next(r for r in soft if r[0] == "flwr")[1] == version("flwr")
    rounds = next(t for t in parsed.tables if t[0][0] == "round trip")
    assert len(rounds) - 1 == res["round_trips"]
    bad = [r for r in rounds[1:] if r[4]]
    assert len(bad) == 1 and bad[0][2] == "study_select" and LOST_REASON in bad[0][4]
    assert "none: the sites supplied feature tables" in plain  # no extraction, no parameter hash
    # penalties: a two-value grid has no interior, so every choice is flagged
    n_choices = sum(len(k) for k in res["penalties"].values())
    assert res["penalty_mode"] == "grid" and f"at an end of the grid in {n_choices} of {n_choices}" in \
        " ".join(plain.split())


def test_penalty_section_flags_choices_at_the_ends_of_the_path():
    from fedrad.common.pipeline import penalty_choice
    from fedrad.server.report import _penalty_section

    path = [0.001 * 10 ** (3 * i / 11) for i in range(12)]
    res = {"endpoint": {"type": "response", "outcome": "y"}, "penalty_mode": {"path_size": 12, "path_decades": 3.0},
           "penalties": {"final": {"radiomics": penalty_choice(path, 4, [1.0] * 12),
                                   "volume": penalty_choice(path, 11, [1.0] * 12)},
                         "loso:a": {"radiomics": penalty_choice(path, 0, [1.0] * 12)}}}
    plain = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", _penalty_section(res))).split())
    assert "12 values over 3.0 decades" in plain and "5 of 12" in plain and "12 of 12" in plain
    assert "weakest end: the optimum may be a weaker penalty" in plain and "0.001 – 1" in plain
    assert "at an end of the path in 2 of 3 (fold, model) choices: final tumour volume alone (weakest); loso:a radiomic signature (strongest)" in plain
    assert res["penalties"]["final"]["radiomics"]["edge"] is None
    res["penalties"] = {"final": {"radiomics": penalty_choice(path, 4, [1.0] * 12)}}
    assert "interior to its path" in _penalty_section(res)


def test_report_content_survival(survival_study):
    res, path = survival_study["results"], survival_study["report"]
    text, parsed = _parse(path)
    assert parsed.figures == ["fig-harmonization", "fig-feature-moments", "fig-coefficients", "fig-forest",
                              "fig-km", "fig-paired"]
    plain = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    assert "Calibration plot not available for a site-stratified Cox model" in plain
    head, rows = _cohort(parsed)
    events = [int(res["sites"][s]["n_events"]) for s in sorted(res["sites"])]
    assert [c.split(" ")[0] for c in rows["events (os_event = 1), n (%)"][:4]] == [str(e) for e in events] + \
        [str(sum(events))]
    hr = next(t for t in parsed.tables if t[0][:2] == ["held-out site", "hazard ratio high vs low risk"])
    for r in hr[1:]:
        assert r[1] == f"{res['external'][r[0]]['radiomics']['risk_split']['hr']:.2f}"
    assert "+1" not in next(r for r in next(t for t in parsed.tables if t[0][0] == "RQS item")
                            if r[0].startswith("10."))[2]
    # no absolute risk from a site-stratified Cox model: METRICS calibration "no", TRIPOD+AI 22 only in part
    mt = next(t for t in parsed.tables if t[0][0] == "METRICS item")
    assert next(r for r in mt if r[0] == "#22")[4] == "no"
    tripod = next(t for t in parsed.tables if t[0] == ["item", "topic", "status", "from this study"])
    assert next(r for r in tripod if r[0] == "22")[2] == "partly here"


def test_signature_icc_is_the_robustness_filters_and_reaches_the_report(response_study, tmp_path):
    """With an ICC filter, the candidates' ICC(1,1) kept by the screen are those of the pooled ICC, and the
    report's signature table prints them."""
    from fedrad.common.pipeline import screen_candidates
    from fedrad.common.selection import icc_request, logistic_score_request, pooled_icc, pooled_logistic_score

    d = response_study["tables"]["site1"].dropna(subset=["age"])
    feats = [c for c in d.columns if c.startswith("original_")]
    rng = np.random.default_rng(5)
    sd = d[feats].std().to_numpy()
    perturbed = pd.concat([d[feats] + rng.normal(size=(len(d), len(feats))) * sd * (0.05 + 0.5 * i) for i in range(3)],
                          ignore_index=True)
    perturbed["case_id"] = np.tile(d["case_id"].to_numpy(), 3)
    icc = pooled_icc(perturbed, icc_request(feats))
    score = pooled_logistic_score(d, logistic_score_request(feats, "response"))
    screen = screen_candidates(score, fdr=0.05, max_features=4, icc=icc, icc_threshold=0.5)
    assert screen["icc"] and set(screen["icc"]) == set(screen["candidates"])
    for f, v in screen["icc"].items():
        assert v == pytest.approx(float(icc.table.loc[f, "icc"]), rel=1e-12) and v >= 0.5
    res = json.loads(json.dumps(response_study["results"]))
    res["provenance"]["config"]["selection"]["icc_threshold"] = 0.5
    res["selection"]["final"]["icc"] = {f: 0.5 + 0.1 * i for i, f in enumerate(res["signature"])}
    _, parsed = _parse(write_report(res, tmp_path / "report.html"))
    sig = next(t for t in parsed.tables if t[0][:3] == ["#", "feature", "univariate q-value (BH)"])
    assert sig[0][3] == "ICC(1,1) across perturbations"
    assert [r[3] for r in sig[1:]] == [f"{0.5 + 0.1 * i:.3f}" for i in range(len(res["signature"]))]


# ----------------------------------------------------------------------------------------------
# the page in a real headless browser
# ----------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-dev-shm-usage"]

#: appended to a copy of the report: layout of every figure, load errors, page height — dumped with the DOM
PROBE = """<script>
(function(){
  var errors = window.__errors || [];
  var figs = Array.prototype.map.call(document.querySelectorAll('figure'), function(f){
    var r = f.getBoundingClientRect(), s = f.querySelector('svg'), b = s ? s.getBoundingClientRect() : null;
    return {id: f.id, y: r.top + scrollY, svg_x: b ? b.left + scrollX : 0, svg_y: b ? b.top + scrollY : 0,
            svg_w: b ? b.width : 0, svg_h: b ? b.height : 0, svg_nodes: s ? s.querySelectorAll('*').length : 0};
  });
  var out = {errors: errors, figures: figs, height: document.documentElement.scrollHeight,
             width: document.documentElement.scrollWidth};
  var pre = document.createElement('pre'); pre.id = '__probe__'; pre.style.display = 'none';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
})();
</script>"""
CATCH = ("<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push("
         "String(e.message||e.type)+' '+(e.filename||(e.target&&e.target.outerHTML||'').slice(0,80)))},true);"
         "var ce=console.error;console.error=function(){window.__errors.push([].join.call(arguments,' '));"
         "ce.apply(console,arguments)};</script>")


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; "
                                             "scripts/install.sh tries it)")
@pytest.mark.parametrize("which", ["response_study", "survival_study", "continuous_study", "association_study"])
def test_report_renders_in_headless_chromium(request, which, tmp_path):
    from PIL import Image

    study = request.getfixturevalue(which)
    text = study["report"].read_text(encoding="utf-8")
    page = tmp_path / "page.html"
    page.write_text(text.replace("<head>", "<head>" + CATCH, 1).replace("</body>", PROBE + "</body>", 1),
                    encoding="utf-8")
    width, height = 1100, 16000  # one run: the DOM with the probe's measurements, and the screenshot
    shot = tmp_path / "report.png"
    dom = _chromium([f"--window-size={width},{height}", f"--screenshot={shot}", "--dump-dom", page.as_uri()],
                    tmp_path / "profile")
    m = re.search(r'<pre id="__probe__"[^>]*>(.*?)</pre>', dom.stdout, re.S)
    assert m, f"chromium did not render the page: {dom.stderr[-2000:]}"
    probe = json.loads(htmlmod.unescape(m.group(1)))
    assert probe["errors"] == [], probe["errors"]
    assert probe["width"] <= width, "the page scrolls sideways"
    assert 3000 < probe["height"] <= height, probe["height"]
    expected = _parse(study["report"])[1].figures
    assert [f["id"] for f in probe["figures"]] == expected
    for f in probe["figures"]:  # every figure laid out with its SVG drawn at a readable size
        assert f["svg_w"] >= 400 and f["svg_h"] >= 150 and f["svg_nodes"] > 50, f
    assert shot.is_file(), "no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB"))  # uint8, height x width x 3
    assert img.shape[:2] == (height, width)
    assert (img[int(probe["height"]) + 5:] > 250).all(), "the screenshot is not of the measured page"
    for f in probe["figures"]:
        x0, y0 = int(f["svg_x"]), int(f["svg_y"])
        region = img[y0:y0 + int(f["svg_h"]), x0:x0 + int(f["svg_w"])].astype(np.int16)
        ink = (region < 200).any(axis=2).mean()  # dark pixels: lines, markers, text
        colour = (region.max(axis=2) - region.min(axis=2) > 60).mean()  # saturated pixels: the data in colour
        assert 0.01 < ink < 0.6 and colour > 0.002, (f["id"], ink, colour)
    # the tables were rendered too: the cohort table's text is dark ink on the page above the first figure
    top = img[: int(probe["figures"][0]["y"])]
    assert (top < 120).all(axis=2).mean() > 0.005


def test_levene_and_bartlett_from_moments_equal_scipy_on_the_pooled_rows():
    """The multiplicative site effect (harmonization diagnostics): from each site's n, variance and the mean and
    variance of |x - site mean| (sent with the moments), Levene (mean-centred) and Bartlett equal scipy's on the
    pooled rows; a feature missing at some rows uses its observed values."""
    from fedrad.common.report_stats import feature_moments, scale_effect, scale_effect_rows

    rng = np.random.default_rng(5)
    feats = ["a", "b", "c"]
    tables = {}
    for i, n in enumerate((40, 55, 70)):
        d = pd.DataFrame({"a": rng.normal(0, 1 + 0.6 * i, n), "b": rng.normal(3, 2, n),
                          "c": rng.gamma(2.0, 1 + i, n)})
        d.loc[d.index[:3], "c"] = np.nan
        tables[f"s{i}"] = d
    fed = scale_effect({s: feature_moments(t, feats, 10) for s, t in tables.items()}, feats)
    rows = pd.concat([t.assign(site=s) for s, t in tables.items()], ignore_index=True)
    ref = scale_effect_rows(rows, "site", feats)
    for j in range(len(feats)):
        assert fed["levene"]["stat"][j] == pytest.approx(ref["levene"][j].statistic, rel=1e-10)
        assert fed["levene"]["p"][j] == pytest.approx(ref["levene"][j].pvalue, rel=1e-9, abs=1e-300)
        assert fed["bartlett"]["stat"][j] == pytest.approx(ref["bartlett"][j].statistic, rel=1e-10)
        assert fed["bartlett"]["p"][j] == pytest.approx(ref["bartlett"][j].pvalue, rel=1e-9, abs=1e-300)
    assert fed["levene"]["p"][0] < 1e-4 and fed["bartlett"]["p"][1] > 0.01  # a differs in scale, b does not


def test_covariate_balance_from_the_cohort_equals_the_rows(response_study):
    """The standardized mean differences (site vs the other sites) computed from the released cohort description
    equal the ones computed on the rows; stage is imbalanced by design at site2 (3 patients at stage 4, a
    withheld cell: that site is left out of the stage comparison) and the report names an unmodelled imbalance."""
    res = response_study["results"]
    bal = res["covariate_balance"]
    # the study's rows: complete cases (site3's 3 patients lacking age are excluded)
    kept = {s: t.dropna(subset=["age"]) for s, t in response_study["tables"].items() if s != LOST}
    assert bal["modelled"] == ["age", "sex"] and set(bal["columns"]) >= {"age", "stage", "sex"}
    for s, t in kept.items():
        rest = pd.concat([u for o, u in kept.items() if o != s])
        want = (t["age"].mean() - rest["age"].mean()) / np.sqrt((t["age"].var() + rest["age"].var()) / 2)
        assert abs(bal["columns"]["age"]["smd"][s] - want) < 1e-10
        p_s, p_r = (t["sex"] == "F").mean(), (rest["sex"] == "F").mean()
        want = (p_s - p_r) / np.sqrt((p_s * (1 - p_s) + p_r * (1 - p_r)) / 2)
        assert abs(abs(bal["columns"]["sex"]["smd"][s]) - abs(want)) < 1e-10
    assert bal["columns"]["stage"]["smd"]["site2"] is None
    plain = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", response_study["report"].read_text())).split())
    assert "Covariate balance across sites" in plain
    worst = {c: v["max_abs"] for c, v in bal["columns"].items()}
    assert (("Imbalanced covariate(s) ComBat does not model" in plain)
            == any(w is not None and w > bal["threshold"] and c not in ("age", "sex") for c, w in worst.items()))


def test_subgroup_performance_pooled_over_the_sites_that_released_each_level(response_study):
    """TRIPOD+AI fairness: every held-out site's AUC per level of sex and stage (age, continuous, has no subgroups);
    site2's 3 patients at stage 4 are withheld there; each pooled level is the random-effects pooling of the sites'
    released AUCs (as the whole-site estimate) and the report shows it."""
    from fedrad.common.metrics import pool_proportion_like

    res = response_study["results"]
    sub = res["pooled"]["subgroups"]
    assert set(sub) == {"sex", "stage"} and set(sub["sex"]) == {"F", "M"}
    assert "4" not in res["external"]["site2"]["subgroups"]["stage"]
    for col, levels in sub.items():
        for level, e in levels.items():
            site_aucs = [m["subgroups"][col][level]["radiomics"]["auc"] for m in res["external"].values()
                         if (m["subgroups"].get(col, {}).get(level) or {}).get("n")]
            assert e["sites"] == len(site_aucs)
            if len(site_aucs) >= 2:
                want = pool_proportion_like([a["auc"] for a in site_aucs], [a["se"] for a in site_aucs])["pooled"]
                assert abs(e["radiomics"]["pooled"] - want) < 1e-12
    text, parsed = _parse(response_study["report"])
    table = next(t for t in parsed.tables if t and t[0][:3] == ["subgroup", "sites", "patients"])
    row = next(r for r in table if r[0] == "sex = F")
    assert row[3].startswith(f"{sub['sex']['F']['radiomics']['pooled']:.3f}")


def test_negative_intervals_and_negative_zero_print_clearly(response_study, tmp_path):
    """`fedrad study report` (the real command) on a results.json whose pooled estimate and CI are negative and
    whose cohort holds a mean that rounds to zero from below: "-0.264 (-0.44 to -0.07)", never "-0.44–-0.07",
    and "0.0 ± ...", never "-0.0 ± ..."."""
    import copy

    from fedrad.server.runtime import BIN

    res = copy.deepcopy(response_study["results"])
    res["pooled"]["radiomics"].update({"pooled": -0.264, "ci_low": -0.44, "ci_high": -0.07})

    def first_moments(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("mean"), (int, float)) and isinstance(obj.get("sd"), (int, float)):
                return obj
            for v in obj.values():
                found = first_moments(v)
                if found is not None:
                    return found
        return None

    moments = first_moments(res["cohort"])
    assert moments is not None
    moments["mean"] = -0.001
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    out = subprocess.run([str(BIN / "fedrad"), "study", "report", str(path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    plain = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", (tmp_path / "report.html").read_text())).split())
    assert "-0.264 (-0.44 to -0.07)" in plain and "(95% CI -0.440 to -0.070" in plain
    assert not re.search(r"\d–-\d", plain), re.search(r".{40}\d–-\d.{20}", plain)
    assert not re.search(r"(?<![\d.])-0\.0+ ±", plain), re.search(r".{40}-0\.0+ ±.{20}", plain)
    assert re.search(r"(?<![\d.-])0\.0+ ± ", plain)
