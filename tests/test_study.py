"""A whole multi-center validation study through Flower's message layer (in-process Grid, real site ClientApp):
leave-one-site-out metrics equal the same pipeline fitted pooled on the other sites (the pooled twin), rounds do
not depend on the number of folds, and no payload any site sent has a patient dimension."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrad.client.audit import AuditLog, verify_audit
from fedrad.local import run_study_in_process
from fedrad.server.study_config import _merge, validate
from fedrad.server.study_pooled import flatten_metrics, pooled_loso

SIZES = (91, 73, 112, 64)


def make_sites(tmp_path, survival: bool, seed: int = 0, grid: list[float] | None = (0.01, 0.1, 1.0),
               continuous: bool = False, scanners: bool = False):
    """Four synthetic sites; ``grid=None``: the study's default data-driven penalty path. ``continuous``: the
    endpoint is ``immune_score``, a continuous outcome of the same biology (its noise from a separate stream, so
    the other columns do not depend on it)."""
    rng = np.random.default_rng(seed)
    nodes, tables = [], {}
    for k, n in enumerate(SIZES):
        bio = rng.normal(size=(n, 3))
        age, stage = rng.normal(60, 8, n), rng.integers(1, 5, n)
        X = np.column_stack([bio + rng.normal(scale=0.5, size=(n, 3)), rng.normal(size=(n, 6))]) * (1 + 0.2 * k) + k
        lp = 1.2 * bio[:, 0] - 0.8 * bio[:, 1] + 0.3 * (stage - 2.5)
        d = pd.DataFrame(X, columns=[f"original_glcm_F{i}" for i in range(9)])
        d["original_shape_VoxelVolume"] = np.exp(rng.normal(7, 0.5, n) + 0.2 * bio[:, 0])
        d["age"], d["stage"], d["sex"] = age, stage, rng.choice(["F", "M"], n)
        d["response"] = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
        t, c = rng.exponential(1 / np.exp(lp)) * 12, rng.uniform(3, 40, n)
        d["os_time"], d["os_event"] = np.round(np.minimum(t, c), 1) + 0.1, (t <= c).astype(int)
        noise = np.random.default_rng([seed, k, 7]).normal(size=n)
        d["immune_score"] = 50 + 6 * bio[:, 0] - 4 * bio[:, 1] + 1.5 * (stage - 2.5) + 3 * k + 6 * noise
        mutant = np.random.default_rng([seed, k, 8]).random(n) < 1 / (1 + np.exp(-(-0.6 + 1.5 * bio[:, 2])))
        d["egfr_mutant"] = mutant.astype(int)
        d["case_id"] = [f"s{k}-{i}" for i in range(n)]
        if scanners:  # two scanners per hospital (a third, with 4 patients at hosp1, joins hosp1/other), each
            u = np.random.default_rng([seed, k, 9]).random(n)  # with its own offset and scale of the features
            d["scanner"] = np.where(u < 0.55, "GE", "Siemens")
            if k == 1:
                d.loc[d.index[:4], "scanner"] = "Philips"
            feats = [c for c in d.columns if c.startswith("original_glcm_")]
            b = (d["scanner"] == "Siemens").to_numpy()
            d.loc[b, feats] = d.loc[b, feats] * 1.4 + 2.0
        name = f"hosp{k}"
        path = tmp_path / name / "features.parquet"
        path.parent.mkdir(parents=True)
        d.to_parquet(path)
        tables[name] = d
        nodes.append({"site-name": name, "table": str(path), "workdir": str(tmp_path / name / "work"),
                      "min-cell-size": 10})
    endpoint = ({"type": "survival", "time": "os_time", "event": "os_event"} if survival
                else {"type": "continuous", "outcome": "immune_score"} if continuous
                else {"type": "response", "outcome": "response"})
    cfg = validate(_merge({"study": {"name": "t", "min_sites": 3}, "endpoint": endpoint,
                           "harmonization": {"covariates": ["age", "sex"], "categorical": ["sex"]},
                           # the table also holds the other endpoint's columns: never features
                           "selection": {"exclude": ["response", "os_*", "immune_score", "egfr_mutant"]},
                           "model": {"clinical": ["age", "stage"],
                                     **({"grid": list(grid)} if grid is not None else {})}}))
    return cfg, nodes, tables


@pytest.mark.parametrize("survival", [False, True])
def test_loso_equals_pooled_twin_and_payloads_are_aggregates(tmp_path, survival):
    cfg, nodes, tables = make_sites(tmp_path, survival, grid=None)
    res = run_study_in_process(cfg, nodes)
    assert res["round_trips"] <= 14
    assert [p["phase"] for p in res["phases"]] == ["prepare", "harmonization", "selection", "models", "evaluation"]
    key, stat = ("c_index", "c") if survival else ("auc", "auc")
    for site in tables:
        twin = pooled_loso(cfg, tables, site)
        assert twin["signature"] == res["selection"][f"loso:{site}"]["selected"]
        # the data-driven penalty path (default): each model's path from the federated gradient at zero equals
        # the pooled rows' path
        fed_paths = {kind: p["path"] for kind, p in res["penalties"][f"loso:{site}"].items()}
        assert set(fed_paths) == set(twin["paths"]) and all(len(p) == 12 for p in fed_paths.values())
        assert max(abs(a / b - 1) for kind in fed_paths for a, b in zip(fed_paths[kind], twin["paths"][kind])) < 1e-9
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert set(got) == set(want)
        worst = max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got)
        assert worst < 1e-6, worst
        assert 0.6 < res["external"][site]["radiomics"][key][stat] < 0.95
    # the signature finds the two informative features; volume alone is weak
    assert set(res["signature"]) >= {"original_glcm_F0", "original_glcm_F1"}
    assert res["pooled"]["radiomics"]["pooled"] > res["pooled"]["volume"]["pooled"] + 0.1
    # every site's audit log verifies and holds no array with a patient axis
    for node, n in zip(nodes, SIZES):
        log = AuditLog(tmp_path / node["site-name"] / "work" / "audit.jsonl")
        assert verify_audit(log.path).ok
        requests = [e["request"] for e in log.entries()]
        assert requests[:3] == ["study_prepare", "combat_stats", "study_harmonize"]
        assert requests[-1] == "study_evaluate"
        for e in log.entries():
            for name, arr in e["arrays"].items():
                assert n not in arr["shape"], (node["site-name"], e["request"], name, arr["shape"])


def test_continuous_endpoint_loso_equals_pooled_twin(tmp_path):
    """A continuous endpoint (penalized linear regression on the data-driven alpha path): every held-out site's
    metrics (R², RMSE, MAE, calibration, Pearson / Spearman, paired squared-error differences) equal the pooled
    twin's, and the pooled Pearson r is the Fisher-z random-effects pooling of the sites'."""
    from fedrad.common.metrics import pool_correlations

    cfg, nodes, tables = make_sites(tmp_path, survival=False, grid=None, continuous=True)
    assert cfg["model"]["type"] == "linear"
    res = run_study_in_process(cfg, nodes)
    assert res["round_trips"] <= 10, res["round_trips"]
    for site in tables:
        twin = pooled_loso(cfg, tables, site)
        assert twin["signature"] == res["selection"][f"loso:{site}"]["selected"]
        fed_paths = {kind: p["path"] for kind, p in res["penalties"][f"loso:{site}"].items()}
        assert max(abs(a / b - 1) for kind in fed_paths for a, b in zip(fed_paths[kind], twin["paths"][kind])) < 1e-9
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert set(got) == set(want)
        worst = max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got)
        assert worst < 1e-6, worst
        ext = res["external"][site]["radiomics"]
        assert 0.4 < ext["pearson"]["r"] < 0.95 and ext["r2"] is not None and min(ext["calibration_groups"]["n"]) >= 10
    assert set(res["signature"]) >= {"original_glcm_F0", "original_glcm_F1"}
    rs = [res["external"][s]["radiomics"]["pearson"]["r"] for s in tables]
    ns = [res["external"][s]["radiomics"]["pearson"]["n"] for s in tables]
    assert abs(res["pooled"]["radiomics"]["pooled"] - pool_correlations(rs, ns)["pooled"]) < 1e-12
    assert res["pooled"]["radiomics"]["pooled"] > res["pooled"]["volume"]["pooled"] + 0.2
    sse = sum(res["external"][s]["radiomics"]["sse"] for s in tables)
    n = sum(res["external"][s]["radiomics"]["n"] for s in tables)
    assert abs(res["pooled"]["radiomics"]["rmse"] - np.sqrt(sse / n)) < 1e-12


def run_and_read_final(cfg: dict, nodes: list, tmp_path, harmonization_rounds: int):
    """Validate and run the study in process; check the harmonization phase's round trips; the sites' final-fold
    harmonized tables."""
    cfg = validate(cfg)
    res = run_study_in_process(cfg, nodes)
    assert [p["round_trips"] for p in res["phases"] if p["phase"] == "harmonization"] == [harmonization_rounds]
    h = {n["site-name"]: pd.read_parquet(tmp_path / n["site-name"] / "work" / "harmonized" / "h-final.parquet")
         for n in nodes}
    return cfg, res, h


def assert_final_tables_equal(harmonized: dict, tables: dict, raw: pd.DataFrame, feats: list, expected) -> None:
    """The sites' final-fold harmonized tables, stacked in site order, equal ``expected`` (rows of ``raw``) to
    1e-8 of each feature's SD."""
    got = pd.concat([harmonized[s] for s in tables], ignore_index=True)
    assert (got["case_id"].to_numpy() == raw["case_id"].to_numpy()).all()
    scale = raw[feats].to_numpy(dtype=float).std(axis=0)
    assert np.max(np.abs(got[feats].to_numpy(dtype=float) - expected) / scale) < 1e-8


def assert_every_held_out_site_equals_the_pooled_twin(cfg: dict, tables: dict, res: dict) -> None:
    for site in tables:
        twin = pooled_loso(cfg, tables, site)
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert set(got) == set(want)
        assert max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got) < 1e-6


def test_scanner_batches_within_sites_equal_neurocombat_and_the_pooled_twin(tmp_path, monkeypatch):
    """[harmonization] batch = "scanner": every hospital's scanners are its own ComBat batches (hosp1's 4-patient
    third scanner joins its "other" batch, then, still under k, its largest), the final fold's harmonized tables
    equal neuroCombat with batch = site/scanner on the pooled rows (1e-8), and every held-out site's metrics equal
    the pooled twin's (its own scanners on the unseen-site path)."""
    import contextlib
    import io

    from neuroCombat import neuroCombat

    cfg, nodes, tables = make_sites(tmp_path, survival=False, scanners=True)
    for node in nodes:  # neuroCombat casts covariates to float32: make age exactly representable
        t = tables[node["site-name"]]
        t["age"] = t["age"].astype(np.float32).astype(float)
        t.to_parquet(node["table"])
    cfg["harmonization"]["batch"] = "scanner"
    cfg = validate(cfg)
    res = run_study_in_process(cfg, nodes)
    assert res["harmonization"]["final"]["batch_sizes"] is not None
    h = {n["site-name"]: pd.read_parquet(tmp_path / n["site-name"] / "work" / "harmonized" / "h-final.parquet")
         for n in nodes}
    assert set(h["hosp1"]["scanner"]) == {"hosp1/GE", "hosp1/Siemens"}
    feats = [c for c in h["hosp0"].columns if c.startswith("original_")]  # the candidates ComBat harmonizes
    raw = pd.concat([t.assign(site=s) for s, t in tables.items()], ignore_index=True)
    raw["batch"] = raw["site"] + "/" + raw["scanner"].where(raw["scanner"] != "Philips", "GE")
    monkeypatch.setattr(np, "int", int, raising=False)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = neuroCombat(np.ascontiguousarray(raw[feats].to_numpy(dtype=float).T),
                          raw[["batch", "age", "sex"]].copy(), "batch", categorical_cols=["sex"],
                          continuous_cols=["age"])["data"].T
    assert_final_tables_equal(h, tables, raw, feats, ref)
    assert_every_held_out_site_equals_the_pooled_twin(cfg, tables, res)


def test_shared_scanner_batches_with_covbat_equal_the_reference_and_the_pooled_twin(tmp_path, monkeypatch):
    """[harmonization] batch = "scanner", shared_batches, covbat: one ComBat batch per scanner model across the
    hospitals (hosp1's 4-patient Philips joins its other batch, then its largest), CovBat after it. The final
    fold's harmonized tables equal the CovBat R algorithm (neuroCombat with batch = scanner, scikit-learn PCA,
    neuroCombat on the scores) on the pooled rows (1e-8), harmonization still takes 2 round trips, and every
    held-out site (its scanners in the fit: the fit's posterior and score moments) equals the pooled twin."""
    from .test_harmonization_variants import covbat_oracle

    cfg, nodes, tables = make_sites(tmp_path, survival=False, scanners=True)
    for node in nodes:  # neuroCombat casts covariates to float32: make age exactly representable
        t = tables[node["site-name"]]
        t["age"] = t["age"].astype(np.float32).astype(float)
        t.to_parquet(node["table"])
    cfg["harmonization"].update(batch="scanner", shared_batches=True, covbat=True)
    cfg, res, h = run_and_read_final(cfg, nodes, tmp_path, harmonization_rounds=2)
    assert res["harmonization"]["final"]["covbat_n_pc"] >= 1
    assert "CovBat" in res["harmonization_method"] and "across sites" in res["harmonization_method"]
    from fedrad.server.report import harmonization_section

    html = harmonization_section(res)  # the report states the method, the batches and CovBat's components
    assert "one batch per model across the sites that have it" in html
    assert f"the first {res['harmonization']['final']['covbat_n_pc']} principal components" in html
    assert set(h["hosp1"]["scanner"]) == {"GE", "Siemens"}
    feats = [c for c in h["hosp0"].columns if c.startswith("original_")]
    raw = pd.concat([t.assign(site=s) for s, t in tables.items()], ignore_index=True)
    raw["batch"] = raw["scanner"].where(raw["scanner"] != "Philips", "GE")
    monkeypatch.setattr(np, "int", int, raising=False)

    def neurocombat(y, cov, batch_col, categorical=("sex",), continuous=("age",), **opts):
        import contextlib
        import io

        from neuroCombat import neuroCombat
        with contextlib.redirect_stdout(io.StringIO()):
            return neuroCombat(np.ascontiguousarray(y.T), cov.copy(), batch_col, categorical_cols=list(categorical),
                               continuous_cols=list(continuous), **opts)

    ref, npc = covbat_oracle(raw[feats].to_numpy(dtype=float), raw[["batch", "age", "sex"]].copy(), "batch",
                             neurocombat)
    assert npc == res["harmonization"]["final"]["covbat_n_pc"]
    assert_final_tables_equal(h, tables, raw, feats, ref)
    assert_every_held_out_site_equals_the_pooled_twin(cfg, tables, res)


def test_nested_combat_study_equals_sequential_neurocombat_and_the_pooled_twin(tmp_path, monkeypatch):
    """[harmonization] batch = ["scanner", "kernel"], shared_batches: nested ComBat (Horng et al.) inside every fold,
    one statistics round per column (3 harmonization round trips). The final fold's harmonized tables equal
    neuroCombat by scanner, then neuroCombat by kernel, on the pooled rows; every held-out site equals the pooled
    twin."""
    import contextlib
    import io

    from neuroCombat import neuroCombat

    cfg, nodes, tables = make_sites(tmp_path, survival=False, scanners=True)
    for k, node in enumerate(nodes):
        t = tables[node["site-name"]]
        t["age"] = t["age"].astype(np.float32).astype(float)
        kernel = np.random.default_rng([k, 11]).random(len(t)) < 0.5
        t["kernel"] = np.where(kernel, "sharp", "soft")
        feats = [c for c in t.columns if c.startswith("original_glcm_")]
        t.loc[kernel, feats] = t.loc[kernel, feats] * 0.7 - 1.0
        t.to_parquet(node["table"])
    cfg["harmonization"].update(batch=["scanner", "kernel"], shared_batches=True)
    cfg, res, h = run_and_read_final(cfg, nodes, tmp_path, harmonization_rounds=3)
    assert "nested: scanner, then kernel" in res["harmonization_method"]
    feats = [c for c in h["hosp0"].columns if c.startswith("original_")]
    raw = pd.concat([t.assign(site=s) for s, t in tables.items()], ignore_index=True)
    raw["scanner"] = raw["scanner"].where(raw["scanner"] != "Philips", "GE")
    expect = raw[feats].to_numpy(dtype=float)
    monkeypatch.setattr(np, "int", int, raising=False)
    for col in ("scanner", "kernel"):
        with contextlib.redirect_stdout(io.StringIO()):
            expect = neuroCombat(np.ascontiguousarray(expect.T), raw[[col, "age", "sex"]].copy(), col,
                                 categorical_cols=["sex"], continuous_cols=["age"])["data"].T
    assert_final_tables_equal(h, tables, raw, feats, expect)
    assert_every_held_out_site_equals_the_pooled_twin(cfg, tables, res)


def test_combat_gam_study_equals_pooled_combat_gam_and_the_pooled_twin(tmp_path):
    """[harmonization] smooth = {age = [...]}: ComBat-GAM inside every fold (2 round trips). The final fold's
    harmonized tables equal the pooled ComBat-GAM (same knots, each feature's GCV alpha) on the pooled rows, and
    every held-out site's metrics equal the pooled twin's."""
    from fedrad.common.combat import ComBat
    from fedrad.common.smooth import full_knots

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    cfg["harmonization"].update(covariates=["sex"], categorical=["sex"], smooth={"age": [20, 55, 60, 65, 100]})
    cfg, res, h = run_and_read_final(cfg, nodes, tmp_path, harmonization_rounds=2)
    assert "ComBat-GAM" in res["harmonization_method"]
    feats = [c for c in h["hosp0"].columns if c.startswith("original_")]
    raw = pd.concat([t.assign(site=s) for s, t in tables.items()], ignore_index=True)
    pooled = ComBat(["sex"], ["sex"], smooth={"age": list(full_knots([55, 60, 65], 20, 100))})
    want = pooled.fit_transform(raw[feats].to_numpy(dtype=float), "site", raw)
    assert_final_tables_equal(h, tables, raw, feats, want)
    assert_every_held_out_site_equals_the_pooled_twin(cfg, tables, res)


def test_combat_gam_knots_from_the_sites_histograms(tmp_path):
    """smooth = {age = {knots = 3, range = [20, 100]}}: each site releases its age histogram on the plan's 32 bins,
    merged to >= k patients per bin, in the prepare round; the interior knots are the pooled histogram's quartiles
    (within one bin of the pooled ages' own quartiles); the study then equals pooled ComBat-GAM with those knots
    and the pooled twin (which derives the same knots from the rows)."""
    from fedrad.common.combat import ComBat

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    cfg["harmonization"].update(covariates=["sex"], categorical=["sex"],
                                smooth={"age": {"knots": 3, "range": [20, 100]}})
    cfg, res, h = run_and_read_final(cfg, nodes, tmp_path, harmonization_rounds=2)
    knots = res["smooth_knots"]["age"]
    raw = pd.concat([t.assign(site=s) for s, t in tables.items()], ignore_index=True)
    inner = np.array(knots[4:-4])
    assert len(inner) == 3 and np.all(np.abs(inner - np.quantile(raw["age"], [0.25, 0.5, 0.75])) < 80 / 32)
    assert "3 interior knots at the pooled quantiles" in res["harmonization_method"]
    feats = [c for c in h["hosp0"].columns if c.startswith("original_")]
    want = ComBat(["sex"], ["sex"], smooth={"age": knots}).fit_transform(raw[feats].to_numpy(dtype=float), "site",
                                                                          raw)
    assert_final_tables_equal(h, tables, raw, feats, want)
    assert_every_held_out_site_equals_the_pooled_twin(cfg, tables, res)


def test_rounds_do_not_grow_with_sites(tmp_path):
    cfg, nodes, _ = make_sites(tmp_path, survival=False, seed=3)
    three = run_study_in_process(cfg, nodes[:3])["round_trips"]
    four = run_study_in_process(cfg, nodes)["round_trips"]
    assert abs(four - three) <= 1


def test_icc_robustness_filter_inside_the_study(tmp_path):
    """Sites send ICC ANOVA sums of their perturbed features; a non-robust informative feature is kept out of
    the signature, and the held-out metrics still equal the pooled twin's (which pools the perturbed rows)."""
    cfg, nodes, tables = make_sites(tmp_path, survival=False, seed=5, grid=None)
    rng = np.random.default_rng(9)
    robustness = {}
    for node in nodes:
        name, d = node["site-name"], tables[node["site-name"]]
        feats = [c for c in d.columns if c.startswith("original_")]
        parts = []
        for k in range(3):
            noise = rng.normal(size=(len(d), len(feats))) * 0.05
            noise[:, feats.index("original_glcm_F1")] *= 80  # F1 is informative but not robust
            part = d[feats] + noise * d[feats].std().to_numpy()
            parts.append(part.assign(case_id=d["case_id"].to_numpy(), perturbation=k))
        robustness[name] = pd.concat(parts, ignore_index=True)
        path = tmp_path / name / "perturbed.parquet"
        robustness[name].to_parquet(path)
        node["robustness"] = str(path)  # the site's own configuration names its perturbed table
    cfg["selection"]["icc_threshold"] = 0.9
    res = run_study_in_process(cfg, nodes)
    assert "original_glcm_F0" in res["signature"] and "original_glcm_F1" not in res["signature"]
    assert res["selection"]["final"]["n_not_robust"] >= 1
    for site in tables:
        twin = pooled_loso(cfg, tables, site, robustness=robustness)
        assert twin["signature"] == res["selection"][f"loso:{site}"]["selected"]
        # the data-driven penalty path (default): each model's path from the federated gradient at zero equals
        # the pooled rows' path
        fed_paths = {kind: p["path"] for kind, p in res["penalties"][f"loso:{site}"].items()}
        assert set(fed_paths) == set(twin["paths"]) and all(len(p) == 12 for p in fed_paths.values())
        assert max(abs(a / b - 1) for kind in fed_paths for a, b in zip(fed_paths[kind], twin["paths"][kind])) < 1e-9
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got) < 1e-6


def test_a_site_lost_mid_study_is_marked_missing_and_the_rest_continue(tmp_path):
    """A site that fails during selection: the study restarts without it (no mixing of rounds or site sets),
    reports it missing, and the other sites' results equal a study run without that site from the start."""
    from fedrad.client.client_app import app as client_app
    from fedrad.server.federation import Federation, LocalGrid, SiteError
    from fedrad.server.study import Study

    cfg, nodes, _ = make_sites(tmp_path, survival=False, seed=2)

    def flaky(msg, context):
        if context.node_config["site-name"] == "hosp3" and msg.metadata.message_type == "query.study_select":
            raise ConnectionError("site hosp3: the hospital's network went down")
        return client_app(msg, context)

    from fedrad.common.plan import study_plan
    from fedrad.local import approve_at_sites

    approve_at_sites(study_plan(cfg), nodes)
    res = Study(Federation(LocalGrid(flaky, nodes)), cfg).run()
    assert list(res["missing_sites"]) == ["hosp3"] and "network went down" in res["missing_sites"]["hosp3"]
    assert sorted(res["external"]) == ["hosp0", "hosp1", "hosp2"]
    clean = run_study_in_process(cfg, nodes[:3])
    for site in clean["external"]:
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(clean["external"][site])
        assert max(abs(got[k] - want[k]) for k in got) < 1e-12
    cfg["study"]["min_sites"] = 4
    with pytest.raises(SiteError, match="quorum lost"):
        Study(Federation(LocalGrid(flaky, nodes)), cfg).run()


def test_volume_baseline_from_other_extractors_names_even_when_not_a_candidate(tmp_path):
    """pyradiomics 1.x writes original_shape_Volume; a MIRP-style morph_volume is no signature candidate under
    the study's prefixes: the volume baseline is still fitted from it, equal to the pooled twin; without any
    volume column the headline says so."""
    from fedrad.server.report import headline

    cfg, nodes, tables = make_sites(tmp_path, survival=False, seed=4)
    for node in nodes:
        d = pd.read_parquet(node["table"]).rename(columns={"original_shape_VoxelVolume": "morph_volume"})
        d.to_parquet(node["table"])
        tables[node["site-name"]] = d
    res = run_study_in_process(cfg, nodes)
    assert res["volume"] == {"column": "morph_volume", "reason": None}
    assert res["final_models"]["volume"]["features"] == ["morph_volume"]
    for site in tables:
        twin = pooled_loso(cfg, tables, site)
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert set(got) == set(want) and max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got) < 1e-6
    for node in nodes:
        pd.read_parquet(node["table"]).drop(columns=["morph_volume"]).to_parquet(node["table"])
    res = run_study_in_process(cfg, nodes)
    assert "volume" not in res["final_models"]
    assert any(line.startswith("no tumour-volume baseline: no tumour-volume column at hosp0") for line in headline(res))


def test_volume_names_of_common_extractors():
    from fedrad.common.plan import volume_column

    for name in ("original_shape_VoxelVolume", "original_shape_Volume", "morph_volume", "SHAPE_Volume(mL)",
                 "Fmorph.vol", "T1_Volumetric_Volume", "Shape_volume"):
        assert volume_column(pd.DataFrame({"case_id": ["a"], name: [1.0], "original_glcm_X": [2.0]})) == name
    two = pd.DataFrame({"original_shape_MeshVolume": [1.0], "original_shape_VoxelVolume": [1.0]})
    assert volume_column(two) == "original_shape_VoxelVolume"
    assert volume_column(two, "original_shape_MeshVolume") == "original_shape_MeshVolume"
    assert volume_column(pd.DataFrame({"volume": ["big"]})) is None  # not numeric


def test_progress_lines_count_round_trips_in_the_right_number(tmp_path):
    cfg, nodes, _ = make_sites(tmp_path, survival=False, seed=4)
    lines: list[str] = []
    run_study_in_process(cfg, nodes, log=lines.append)
    done = [line for line in lines if " done: " in line]
    assert any(" done: 1 round trip, " in line for line in done), done
    assert not any(" 1 round trips" in line for line in lines), lines
