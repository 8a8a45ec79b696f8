"""Issue 11's attacks, each run through the real site agent (``Site.answer``: plan check, policy, step, audit):
a curious coordinator that chooses request parameters must be refused, with no value released, and the refusal
must be in the site's audit log. The honest study's equality with its pooled twin is tests/test_study.py."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedrad.client.approval import ApprovalError, approve_plan
from fedrad.client.audit import AuditLog
from fedrad.client.client_app import _ALL_STEPS
from fedrad.client.site import Site, SiteFailure
from fedrad.common.plan import fit_plan, harmonize_plan, plan_id, study_plan
from fedrad.local import approve_at_sites
from fedrad.server.federation import Federation, LocalGrid
from fedrad.server.study import Study
from tests.test_study import make_sites


def _test_signer():
    """A fixed coordinator key for the tests (the same in every process: subprocess tests import it too)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedrad.common.signing import Signer, _public_of

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    return Signer(key, _public_of(key))


#: the coordinator of the tests' signed plans (``[coordinator] key = TEST_SIGNER.public``)
TEST_SIGNER = _test_signer()


def ask(node: dict, request: str, payload: dict) -> dict:
    """``Site.answer`` as the ClientApp calls it; a request of a plan naming :data:`TEST_SIGNER`'s key is signed
    by it, as the coordinator would (node 1000, a fresh session)."""
    from fedrad.client.approval import ApprovalError, load_approved
    from fedrad.client.signed import plan_key
    from fedrad.client.steps import secure_fit_round

    site = Site.from_node_config(node)
    step = {**_ALL_STEPS, "secure_fit_round": secure_fit_round}[request]
    try:
        key = plan_key(load_approved(site.workdir, payload.get("plan"), site.approved_plans)["plan"])
    except (ApprovalError, OSError, ValueError):
        key = None
    if key != TEST_SIGNER.public:
        return site.answer(request, payload, step)
    from fedrad.common.messages import attach_signature, from_record, payload_digest, request_signature, to_record
    from fedrad.common.signing import new_session, signed_fields

    record, session = to_record(payload), new_session()
    fields = signed_fields(payload["plan"], request, 1000, session, 1, payload_digest(record))
    attach_signature(record, TEST_SIGNER.sign(fields), session, 1)
    return site.answer(request, from_record(record), step, auth=request_signature(record), node=1000)


def last_audit(node: dict) -> dict:
    return AuditLog(Site.from_node_config(node).workdir / "audit.jsonl").entries()[-1]


def refused(node: dict, request: str, payload: dict, code: str, secrets=()) -> str:
    """The request is refused with ``code``; the reply text and the audit record hold none of ``secrets``."""
    with pytest.raises(SiteFailure) as info:
        ask(node, request, payload)
    text = str(info.value)
    assert f"[{code}]" in text, text
    rec = last_audit(node)
    assert rec["request"] == request and rec["status"] == "refused"
    dumped = json.dumps(rec)
    for secret in secrets:
        assert str(secret) not in text and str(secret) not in dumped, secret
    return text


def _fitted_study(tmp_path, **kwargs):
    """An honest response study prepared, harmonized, selected and fitted through the real site agents."""
    cfg, nodes, tables = make_sites(tmp_path, survival=False, **kwargs)
    from fedrad.client.client_app import app

    approve_at_sites(study_plan(cfg), nodes)
    st = Study(Federation(LocalGrid(app, nodes)), cfg)
    st.prepare()
    st.harmonize()
    st.select()
    st.fit_models()
    return cfg, nodes, tables, st


@pytest.fixture
def study(tmp_path):
    """The honest study with the fixed grid of make_sites."""
    return _fitted_study(tmp_path)


def test_a_request_without_an_approved_plan_is_refused_and_audited(tmp_path):
    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    node = nodes[0]
    refused(node, "study_prepare", {}, "plan-not-approved")
    refused(node, "study_prepare", {"plan": "0" * 64}, "plan-not-approved")
    pid = plan_id(study_plan(cfg))
    refused(node, "study_prepare", {"plan": pid}, "plan-not-approved")
    approve_at_sites(study_plan(cfg), [node])
    assert ask(node, "study_prepare", {"plan": pid})["n"] == 91
    # a site that pins its plans answers only those, even when another plan was approved in its workdir
    other = study_plan({**cfg, "validation": {**cfg["validation"], "seed": 7}})
    approve_at_sites(other, [node])
    refused({**node, "approved-plans": pid}, "study_prepare", {"plan": plan_id(other)}, "plan-not-approved")


def test_identifying_columns_and_columns_outside_the_allow_list_are_never_approved(tmp_path):
    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    bad = {**cfg, "harmonization": {**cfg["harmonization"], "categorical": ["case_id"],
                                    "covariates": ["age", "case_id"]}}
    with pytest.raises(ApprovalError, match="identifying column"):
        approve_plan(tmp_path / "w", study_plan(bad))
    with pytest.raises(ApprovalError, match="stage"):
        approve_plan(tmp_path / "w", study_plan(cfg), allowed_columns={"outcome": ["response"],
                                                                       "clinical": ["age", "sex"],
                                                                       "categorical": ["sex"]})


def test_attack2_combat_with_a_patient_level_categorical_is_refused(tmp_path):
    """Attack 2: one indicator level per patient would rebuild every row. A coordinator asking for it under a
    plan that names other covariates gets the plan's request computed; a plan naming such a column is refused at
    the site because a level (or its complement) has fewer than k patients."""
    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    node = nodes[0]
    approve_at_sites(study_plan(cfg), [node])
    pid = plan_id(study_plan(cfg))
    ask(node, "study_prepare", {"plan": pid})
    feats = [f"original_glcm_F{i}" for i in range(9)]
    evil = {"kind": "fedrad.combat.request", "version": 1, "features": feats, "continuous": ["age"],
            "categorical": ["sex", "case_id"], "batch_col": None, "ref_batch": None, "eb": True,
            "parametric": True, "mean_only": False, "min_cell_size": 2, "conv": 1e-4}
    reply = ask(node, "combat_stats", {"plan": pid, "request": evil, "table": "raw"})
    text = json.dumps(reply, default=lambda a: np.asarray(a).tolist())
    assert "s0-" not in text  # no case id among the released levels: the plan's request was computed
    # a plan whose categorical covariate has a level per patient, innocently named (a column the site did not forbid)
    table = tables["hosp0"].assign(biopsy_lot=[f"M{i:04d}" for i in range(91)])
    path = tmp_path / "hosp0" / "features.parquet"
    table.to_parquet(path)
    planned = {**cfg, "harmonization": {**cfg["harmonization"], "categorical": ["biopsy_lot"],
                                        "covariates": ["age", "biopsy_lot"]}}
    approve_at_sites(study_plan(planned), [node])
    pid2 = plan_id(study_plan(planned))
    ask(node, "study_prepare", {"plan": pid2})
    refused(node, "combat_stats", {"plan": pid2, "request": evil, "table": "raw"}, "min-cell-size",
            secrets=["M0001", "M0090"])


def test_combat_options_come_from_the_plan_not_the_request(tmp_path):
    """A coordinator cannot switch on the CovBat residual scatter (feature x feature cross-products) or choose
    ComBat-GAM knots the plan did not name: the site computes the plan's request. Under a plan with CovBat and a
    smooth age term, the scatter is sent, the knots are the plan's, and age is no linear covariate."""
    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    node = nodes[0]
    approve_at_sites(study_plan(cfg), [node])
    pid = plan_id(study_plan(cfg))
    ask(node, "study_prepare", {"plan": pid})
    feats = [f"original_glcm_F{i}" for i in range(9)]
    from fedrad.common.combat import make_request
    from fedrad.common.smooth import full_knots

    greedy = make_request(feats, ["age"], covbat=True, smooth=None)
    reply = ask(node, "combat_stats", {"plan": pid, "request": greedy, "table": "raw"})
    assert "scatter" not in reply["stats"]["batches"][0]
    planned = {**cfg, "harmonization": {**cfg["harmonization"], "covariates": ["sex"], "covbat": True,
                                        "smooth": {"age": [20, 55, 65, 100]}}}
    from fedrad.server.study_config import validate

    planned = validate(planned)
    approve_at_sites(study_plan(planned), [node])
    pid2 = plan_id(study_plan(planned))
    ask(node, "study_prepare", {"plan": pid2})
    sneaky = make_request(feats, ["sex"], ["sex"], smooth={"age": list(full_knots([59.9, 60.0, 60.1], 59, 61))})
    reply = ask(node, "combat_stats", {"plan": pid2, "request": sneaky, "table": "raw"})
    block = reply["stats"]["batches"][0]
    assert np.asarray(block["scatter"]).shape == (9, 9)
    # the plan's knots: 2 interior knots -> 5 basis columns after sex; narrow coordinator knots would give 6
    assert np.asarray(block["R"]).shape[1] == 1 + 5


def test_attack9_harmonization_references_are_fits_of_the_plans_combat(tmp_path):
    """Attack 9: the site harmonizes with the reference the coordinator sends, then sends moments and score tests of
    the harmonized table. A reference naming a patient-level column, carrying ComBat-GAM knots around one
    patient's age, a CovBat step the plan has not, or a zero variance would put that patient's values into those
    sums: each is refused; the honest fit of the plan's ComBat is used."""
    from fedrad.common.combat import combine_combat_stats, make_request
    from fedrad.common.smooth import full_knots

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    plan = study_plan(cfg)
    pid = plan_id(plan)
    approve_at_sites(plan, nodes[:2])
    feats = [f"original_glcm_F{i}" for i in range(9)]
    harm = cfg["harmonization"]
    request = make_request(feats, list(harm["covariates"]), list(harm["categorical"]))
    stats = []
    for node in nodes[:2]:
        ask(node, "study_prepare", {"plan": pid})
        stats.append(ask(node, "combat_stats", {"plan": pid, "request": request, "table": "raw"})["stats"])
    honest = combine_combat_stats(stats, request).to_dict()
    node = nodes[0]

    def harmonize(ref):
        return {"plan": pid, "references": {"final": ref}, "moments": {"fold": "final", "features": feats}}

    ages = tables["hosp0"]["age"].to_numpy()
    narrow = {"age": {"knots": list(full_knots([ages[0] - 0.01, ages[0] + 0.01], ages[0] - 1, ages[0] + 1)),
                      "degree": 3}}
    tampered = {
        "patient-level column": {**honest, "categorical": {**honest["categorical"],
                                                           "case_id": sorted(tables["hosp0"]["case_id"])},
                                 "coef": honest["coef"] + [[1e3] * 9] * 90},
        "knots around one age": {**honest, "smooth": narrow, "smooth_alpha": [1.0] * 9,
                                 "continuous": honest["continuous"] + [f"age_s{i}" for i in range(5)],
                                 "coef": honest["coef"] + [[1e3] * 9] * 5},
        "covariance step": {**honest, "covbat": {"n_pc": 1, "components": [[1.0] + [0.0] * 8]}},
        "zero variance": {**honest, "var_pooled": [0.0] * 9},
    }
    for what, ref in tampered.items():
        refused(node, "study_harmonize", harmonize(ref), "outside-plan")
    log = (Site.from_node_config(node).workdir / "site.log").read_text()
    assert "ComBat reference covariates" in log and "ComBat reference options" in log
    assert "ComBat reference values" in log
    reply = ask(node, "study_harmonize", harmonize(honest))
    assert reply["moments"]["n"][0] == 91


def test_combat_gam_knots_from_histograms_are_the_plans_shape_and_pinned(tmp_path):
    """With smooth = {age = {knots = 3, range = [...]}}, the site releases a histogram of >= k patients per bin, and
    takes only knots with the plan's range and number of interior knots, the same ones for the whole attempt."""
    from fedrad.common.combat import make_request
    from fedrad.common.smooth import full_knots
    from fedrad.server.study_config import validate

    cfg, nodes, _ = make_sites(tmp_path, survival=False)
    cfg = validate({**cfg, "harmonization": {**cfg["harmonization"], "covariates": ["sex"],
                                             "smooth": {"age": {"knots": 3, "range": [20, 100]}}}})
    node = nodes[0]
    approve_at_sites(study_plan(cfg), [node])
    pid = plan_id(study_plan(cfg))
    hist = ask(node, "study_prepare", {"plan": pid})["smooth_histograms"]["age"]
    assert min(hist["counts"]) >= node["min-cell-size"] and sum(hist["counts"]) == 91
    assert hist["edges"][0] == 20 and hist["edges"][-1] == 100
    feats = [f"original_glcm_F{i}" for i in range(9)]

    def stats(knots):
        return {"plan": pid, "table": "raw", "request": make_request(feats, ["sex"], ["sex"], smooth={"age": knots})}
    refused(node, "combat_stats", stats(list(full_knots([50, 60], 20, 100))), "outside-plan")       # 2, not 3
    refused(node, "combat_stats", stats(list(full_knots([50, 60, 70], 10, 100))), "outside-plan")   # other range
    assert ask(node, "combat_stats", stats(list(full_knots([52, 60, 68], 20, 100))))["stats"]["batches"]
    refused(node, "combat_stats", stats(list(full_knots([59.9, 60, 60.1], 20, 100))), "outside-plan")  # a 2nd set
    assert "a second set of ComBat-GAM knots" in (Site.from_node_config(node).workdir / "site.log").read_text()


def test_attack3_differencing_with_coordinator_chosen_folds_is_refused(study):
    """Attack 3: 200 inner folds (all-rows sum minus all-but-one-fold sums) -- folds come from the plan only, and a
    fold whose left-out rows are fewer than k is skipped (code only, no count)."""
    cfg, nodes, tables, st = study
    node = nodes[3]  # 64 patients
    feats = st.model_features["final"]["volume"]
    from fedrad.common.glm import make_stats_request

    def task(rows, tid):
        return {"id": tid, "request": make_stats_request(feats),
                "data": {"model": "logistic", "features": feats, "outcome": "response", "table": "h-final",
                         "rows": rows}, "sites": None}

    refused(node, "fit_round", {"plan": st.plan_id, "tasks": [task({"k": 200, "seed": 0, "fold": 5, "keep": "train"},
                                                                  "final|volume|0|5")]}, "outside-plan")
    refused(node, "fit_round", {"plan": st.plan_id, "tasks": [task({"k": 3, "seed": 1, "fold": 0, "keep": "train"},
                                                                  "final|volume|0|0")]}, "outside-plan")
    refused(node, "fit_round", {"plan": st.plan_id, "tasks": [task({"k": 3, "seed": 0, "fold": 0, "keep": "test"},
                                                                  "final|volume|0|0")]}, "outside-plan")
    # the plan's own folds with a larger minimum cell size: every left-out group of ~21 patients is < 25
    strict = {**node, "min-cell-size": 25}
    reply = ask(strict, "fit_round", {"plan": st.plan_id, "tasks": [
        task({"k": 3, "seed": 0, "fold": j, "keep": "train"}, f"final|volume|0|{j}") for j in range(3)]})
    assert reply["results"] == {} and set(reply["skipped"].values()) == {"min-cell-size"}


def test_the_pooled_twin_and_the_site_share_the_fold_rule():
    from fedrad.common.plan import inner_fold_usable

    assert inner_fold_usable(20, 10, 10) and not inner_fold_usable(21, 9, 10) and not inner_fold_usable(9, 21, 10)


def test_attack4_invented_models_are_not_evaluated(study):
    """Attack 4: step-shaped models invented by the coordinator, or hundreds of variants, are refused; the honest
    models of the fits the site took part in are evaluated, once per study attempt."""
    cfg, nodes, tables, st = study
    node = nodes[1]
    site = "hosp1"
    honest = st.fits[f"loso:{site}|volume|0|all"].to_dict()
    invented = json.loads(json.dumps(honest))
    invented["coef_std"] = [25.0]
    invented["intercept_std"] = -3.0
    base = {"plan": st.plan_id, "endpoint": st.endpoint, "items": [], "km_times": cfg["validation"]["km_times"]}

    def evaluate(models):
        return {**base, "folds": {f"loso:{site}": {"models": {"volume": models}, "table": f"h-loso:{site}",
                                                    "eval_sites": [site]}}}

    refused(node, "study_evaluate", evaluate({"0": invented}), "outside-plan")
    many = {str(i): honest for i in range(652)}
    refused(node, "study_evaluate", evaluate(many), "outside-plan")
    wrong_penalty = {"1": honest}  # the C = 0.01 fit presented as the C = 0.1 variant
    refused(node, "study_evaluate", evaluate(wrong_penalty), "outside-plan")


def test_attack4_evaluation_of_honest_models_once_per_attempt(study):
    cfg, nodes, tables, st = study
    node, site = nodes[1], "hosp1"
    honest = {str(gi): st.fits[f"loso:{site}|volume|{gi}|all"].to_dict() for gi in range(3)}
    payload = {"plan": st.plan_id, "endpoint": st.endpoint, "items": [], "km_times": cfg["validation"]["km_times"],
               "folds": {f"loso:{site}": {"models": {"volume": honest}, "table": f"h-loso:{site}",
                                          "eval_sites": [site]}}}
    reply = ask(node, "study_evaluate", payload)
    assert 0.3 < reply["folds"][f"loso:{site}"]["models"]["volume"]["0"]["auc"]["auc"] < 0.8
    refused(node, "study_evaluate", payload, "outside-plan")  # a second evaluation in the same attempt


def test_attack4_continuous_endpoint_models_and_rounds(tmp_path):
    """The same rule for a continuous endpoint (exact linear fit in 2 rounds): an invented linear model, a model of
    another kind and a third round of one linear fit are refused; the honest models are evaluated, and every
    calibration group the site releases holds at least k patients."""
    cfg, nodes, tables, st = _fitted_study(tmp_path, continuous=True)
    node, site = nodes[1], "hosp1"
    honest = {str(gi): st.fits[f"loso:{site}|radiomics|{gi}|all"].to_dict() for gi in range(3)}
    base = {"plan": st.plan_id, "endpoint": st.endpoint, "items": [], "km_times": cfg["validation"]["km_times"]}

    def evaluate(models, kind="radiomics"):
        return {**base, "folds": {f"loso:{site}": {"models": {kind: models}, "table": f"h-loso:{site}",
                                                    "eval_sites": [site]}}}

    invented = json.loads(json.dumps(honest["0"]))
    invented["coef_std"] = [40.0] + [0.0] * (len(invented["coef_std"]) - 1)
    refused(node, "study_evaluate", evaluate({"0": invented}), "outside-plan")
    logistic = {**json.loads(json.dumps(honest["0"])), "kind": "fedrad.glm.logistic_model"}
    refused(node, "study_evaluate", evaluate({"0": logistic}), "outside-plan")
    assert "another kind" in (Site.from_node_config(node).workdir / "site.log").read_text().splitlines()[-1]
    # a third round of a finished linear fit (a fresh point the coordinator could then have evaluated)
    tid = f"loso:{site}|radiomics|0|all"
    feats = st.model_features[f"loso:{site}"]["radiomics"]
    data = st.kind.data_spec(feats, f"h-loso:{site}", None)
    point = {"kind": "fedrad.linear.newton", "version": 1, "features": feats, "mean": [0.0] * len(feats),
             "scale": [1.0] * len(feats), "beta": [0.0] * (len(feats) + 1)}
    refused(node, "fit_round", {"plan": st.plan_id, "tasks": [{"id": tid, "request": point, "data": data,
                                                               "sites": None}]}, "outside-plan")
    local = (Site.from_node_config(node).workdir / "site.log").read_text()  # the reason stays at the site
    assert "more rounds of one fit" in local.splitlines()[-1]
    reply = ask(node, "study_evaluate", evaluate(honest))
    got = reply["folds"][f"loso:{site}"]["models"]["radiomics"]
    assert set(got) == {"0", "1", "2"} and 0.3 < got["0"]["pearson"]["r"] < 0.95
    for variant in got.values():
        assert min(variant["calibration_groups"]["n"]) >= node["min-cell-size"]


def test_attack5_paths_never_come_from_the_coordinator(tmp_path, study):
    cfg, nodes, tables, st = study
    node = nodes[0]
    secret = tmp_path / "other-project.parquet"
    pd.DataFrame({"original_glcm_F0": np.arange(20.0), "response": [0, 1] * 10}).to_parquet(secret)
    # sources in the request are ignored: the site uses its own table
    reply = ask(node, "study_prepare", {"plan": st.plan_id, "sources": {"hosp0": {"table": str(secret)}},
                                        "source": "../../other-project"})
    assert reply["n"] == 91
    for table in ("../../other-project", "/etc/passwd", "h-../../x"):
        refused(node, "study_select", {"plan": st.plan_id, "folds": {"final": {
            "train_sites": ["hosp0"], "table": table, "requests": {}}}}, "outside-plan")
    # a harmonize plan fixes the output name; a coordinator's output path is ignored
    from fedrad.common.combat import make_request

    req = make_request([f"original_glcm_F{i}" for i in range(9)], ["age"])
    plan = harmonize_plan(req, "harmonized")
    approve_at_sites(plan, [node])
    pid = plan_id(plan)
    stats = ask(node, "combat_stats", {"plan": pid, "request": req})
    from fedrad.common.combat import combine_combat_stats

    others = [ask(n, "combat_stats", {"plan": pid, "request": req}) for n in nodes[1:] if approve_at_sites(plan, [n])]
    ref = combine_combat_stats([stats["stats"]] + [o["stats"] for o in others], req).to_dict()
    target = tmp_path / "evil"
    ask(node, "combat_apply", {"plan": pid, "reference": ref, "output": f"../../../{target}"})
    assert not target.with_suffix(".parquet").exists() and not (tmp_path / "evil.parquet").exists()
    assert (Site.from_node_config(node).workdir / "harmonized" / "harmonized.parquet").is_file()
    with pytest.raises(ValueError):
        harmonize_plan(req, "../x")


def test_attack6_error_replies_carry_no_values(tmp_path):
    """Attack 6: an error computed from data (bad outcome values, too few rows) is answered with a code and a
    generic text; the details are in the site's local log only."""
    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    node = nodes[0]
    t = tables["hosp0"].copy()
    t["response"] = t["response"].astype(float)
    t.loc[:3, "response"] = [35.0, 38.0, 41.5, 2.0]
    t.to_parquet(node["table"])
    approve_at_sites(study_plan(cfg), [node])
    text = refused(node, "study_prepare", {"plan": plan_id(study_plan(cfg))}, "data", secrets=["35.0", "38.0", "41.5"])
    assert "site hosp0" in text
    log = (Site.from_node_config(node).workdir / "site.log").read_text()
    assert "35.0" in log  # the operator sees why
    assert oct((Site.from_node_config(node).workdir / "site.log").stat().st_mode & 0o777) == "0o600"


def test_attack6_secure_aggregation_ranges_come_from_the_protocol(tmp_path):
    """SecAgg+: a coordinator-chosen (too small) range is refused without stating the value."""
    from fedrad.common.glm import make_stats_request  # noqa: F401
    from fedrad.common.privacy import SecureLogisticServer

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    node = nodes[0]
    feats = ["original_glcm_F0", "original_glcm_F1"]
    data = {"model": "logistic", "features": feats, "outcome": "response"}
    plan = fit_plan(data, rounds=200, secure=True)
    approve_at_sites(plan, [node])
    server = SecureLogisticServer(feats, 3, penalty="l2", C=1.0)
    request = server.start()
    total = float(tables["hosp0"][feats[0]].sum())
    small = json.loads(json.dumps(request))
    small["layout"][2]["exp"] = 1  # sum_x within +-2: far below the site's sums
    refused(node, "secure_fit_round", {"plan": plan_id(plan), "request": small, "data": data}, "outside-plan",
            secrets=[f"{total:.6g}"])
    assert ask(node, "secure_fit_round", {"plan": plan_id(plan), "request": request, "data": data})["sums"]


def test_a_fit_plan_fixes_features_outcome_and_rounds(tmp_path):
    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    node = nodes[0]
    from fedrad.common.glm import make_stats_request

    data = {"model": "logistic", "features": ["original_glcm_F0"], "outcome": "response"}
    plan = fit_plan(data, rounds=3)
    approve_at_sites(plan, [node])
    pid = plan_id(plan)
    task = {"id": "fit", "request": make_stats_request(["original_glcm_F0"]), "data": data, "sites": None}
    other = {**task, "data": {**data, "features": ["original_glcm_F0", "age"]},
             "request": make_stats_request(["original_glcm_F0", "age"])}
    refused(node, "fit_round", {"plan": pid, "tasks": [other]}, "outside-plan")
    for _ in range(3):
        ask(node, "fit_round", {"plan": pid, "tasks": [task]})
    refused(node, "fit_round", {"plan": pid, "tasks": [task]}, "outside-plan")  # more rounds than planned


def test_site_toml_sources_columns_and_the_approve_command(tmp_path):
    """A site configured by its file: data source aliases the plan names, the [columns] allow-list that
    `fedrad site approve` checks, and pinned plan ids."""
    from typer.testing import CliRunner

    from fedrad.cli import app
    from fedrad.server.study_config import _merge, validate

    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    other = tmp_path / "hosp0" / "other.parquet"
    tables["hosp0"].iloc[:50].to_parquet(other)
    (tmp_path / "site.toml").write_text(
        '[site]\nname = "hosp0"\ntable = "hosp0/features.parquet"\nworkdir = "w"\n'
        '[sources.first-50]\ntable = "hosp0/other.parquet"\n'
        '[columns]\noutcome = ["response"]\nclinical = ["age", "stage", "sex"]\ncategorical = ["sex"]\n')
    study = tmp_path / "study.toml"
    study.write_text('[study]\nname = "t"\nmin_sites = 2\n[endpoint]\ntype = "response"\noutcome = "response"\n'
                     '[sites.hosp0]\nsource = "first-50"\n[sites.hosp1]\n'
                     '[harmonization]\ncovariates = ["age", "sex"]\ncategorical = ["sex"]\n'
                     '[model]\nclinical = ["age", "stage"]\n')
    runner = CliRunner()
    shown = runner.invoke(app, ["site", "approve", str(study), "--config", str(tmp_path / "site.toml"), "--show"])
    assert shown.exit_code == 0 and "outcome columns: response" in shown.output and "not approved" in shown.output
    res = runner.invoke(app, ["site", "approve", str(study), "--config", str(tmp_path / "site.toml"), "--yes",
                                      "--unsigned"])
    assert res.exit_code == 0, res.output
    from fedrad.server.study_config import load_study

    pid = plan_id(study_plan(load_study(study)))
    assert pid in res.output
    node = {"config": str(tmp_path / "site.toml")}
    assert ask(node, "study_prepare", {"plan": pid})["n"] == 50  # the source the plan names, from the site's file
    # a plan with a column outside [columns] is not approved
    study.write_text(study.read_text().replace('clinical = ["age", "stage"]', 'clinical = ["age", "weight"]'))
    bad = runner.invoke(app, ["site", "approve", str(study), "--config", str(tmp_path / "site.toml"), "--yes",
                                      "--unsigned"])
    assert bad.exit_code != 0 and "weight" in bad.output and "Traceback" not in bad.output
    # pinned plans: another approved plan is refused
    (tmp_path / "site.toml").write_text((tmp_path / "site.toml").read_text().replace(
        "[sources", f'[policy]\napproved-plans = ["{"a" * 64}"]\n[sources', 1))
    refused(node, "study_prepare", {"plan": pid}, "plan-not-approved")
    assert validate(_merge({"sites": {"a": {"source": "x"}, "b": {}}}))["sites"]["a"] == {"source": "x"}


def test_attack7_imputation_values_cannot_single_out_patients(tmp_path):
    """Missing values (issue 12): the coordinator sends each fold's imputation values. A value it chooses for
    fewer than k missing cells would single those patients out in every sum (a huge value makes the score test
    that patient's outcome). The site fills fewer than k missing cells with its own mean — the coordinator's value
    changes nothing — and refuses values for columns outside its candidates, non-finite values, and features it
    observes in fewer than k patients."""
    cfg, nodes, tables = make_sites(tmp_path, survival=False)
    node = nodes[0]
    table = tables["hosp0"].copy()
    table.loc[table.index[:1], "original_glcm_F0"] = np.nan        # 1 patient: < k
    table.loc[table.index[:85], "original_glcm_F5"] = np.nan       # observed in 6 patients: < k
    table.to_parquet(tmp_path / "hosp0" / "features.parquet")
    approve_at_sites(study_plan(cfg), [node])
    pid = plan_id(study_plan(cfg))
    ask(node, "study_prepare", {"plan": pid})
    feats = [f"original_glcm_F{i}" for i in range(5)]
    from fedrad.common.combat import make_request

    request = make_request(feats, ["age", "sex"], ["sex"])

    def stats(value):
        reply = ask(node, "combat_stats", {"plan": pid, "request": request, "table": "raw",
                                           "impute": {"final": {"original_glcm_F0": value}}})
        return json.dumps(reply["stats"]["final"], default=lambda a: np.asarray(a).tolist())

    assert stats(1e9) == stats(-1e9) == stats(0.0)  # the site's own mean filled the single missing cell
    for bad in ({"final": {"age": 1.0}}, {"final": {"response": 1.0}}, {"final/../x": {"original_glcm_F0": 1.0}},
                {"final": {"original_glcm_F0": float("inf")}}):
        refused(node, "combat_stats", {"plan": pid, "request": request, "table": "raw", "impute": bad},
                "outside-plan")
    wide = make_request(feats + ["original_glcm_F5"], ["age", "sex"], ["sex"])
    refused(node, "combat_stats", {"plan": pid, "request": wide, "table": "raw",
                                   "impute": {"final": {"original_glcm_F5": 1.0}}}, "min-cell-size")


@pytest.fixture
def path_study(tmp_path):
    """The honest response study with the default data-driven penalty path, fitted through the site agents."""
    return _fitted_study(tmp_path, grid=None)


def test_attack8_penalty_path_values_and_path_requests_are_the_plans(path_study):
    """Attack 8: with the data-driven path the coordinator computes each (fold, model)'s penalties; a site pins
    the path's first value at the first model it sees and accepts only ``first * step ** index`` with index <
    path_size, so a coordinator gets no more penalties per fold and model than a fixed grid of that size; the
    path's score request may name only the model's volume and clinical columns."""
    from fedrad.common.selection import logistic_score_request

    cfg, nodes, tables, st = path_study
    node, site = nodes[1], "hosp1"
    fold = f"loso:{site}"
    honest = {str(gi): st.fits[f"{fold}|volume|{gi}|all"].to_dict() for gi in range(12)}
    path = st.paths[fold]["volume"]
    assert len(path) == 12 and abs(path[-1] / path[0] / 1e5 - 1) < 1e-9  # strongest C first, 5 decades up (L2)
    assert all(m["params"]["C"] == pytest.approx(c, rel=1e-12) for m, c in zip(honest.values(), path))
    base = {"plan": st.plan_id, "endpoint": st.endpoint, "items": [], "km_times": cfg["validation"]["km_times"]}

    def evaluate(models):
        return {**base, "folds": {fold: {"models": {"volume": models}, "table": f"h-{fold}", "eval_sites": [site]}}}

    refused(node, "study_evaluate", evaluate({"12": honest["11"]}), "outside-plan")  # beyond the path
    moved = json.loads(json.dumps(honest["5"]))
    moved["params"]["C"] *= 1.5  # a sixth penalty value off the path pinned by the first model
    refused(node, "study_evaluate", evaluate({"0": honest["0"], "5": moved}), "outside-plan")
    select = {"plan": st.plan_id, "folds": {"final": {"train_sites": [site], "table": "h-final", "requests": {
        "path": logistic_score_request(["original_glcm_F3"], "response")}}}}
    refused(node, "study_select", select, "outside-plan")  # a path request over a non-model column
    reply = ask(node, "study_evaluate", evaluate(honest))  # the honest path: every variant evaluated
    assert len(reply["folds"][fold]["models"]["volume"]) == 12


def test_combat_level_counts_are_checked_within_every_scanner_batch(tmp_path):
    """With batches within sites, ComBat's level counts go per batch: a sex level with fewer than k patients on
    one scanner of a site is refused there (the whole site has enough of both), and a plan's batch column cannot be
    swapped by the coordinator's request."""
    from fedrad.server.study_config import validate

    cfg, nodes, tables = make_sites(tmp_path, survival=False, scanners=True)
    node = nodes[2]
    d = tables["hosp2"]
    d.loc[d["scanner"] == "Siemens", "sex"] = "F"
    d.loc[d.index[d["scanner"] == "Siemens"][:3], "sex"] = "M"  # 3 men on hosp2's Siemens
    d.to_parquet(node["table"])
    cfg["harmonization"]["batch"] = "scanner"
    cfg = validate(cfg)
    approve_at_sites(study_plan(cfg), [node])
    pid = plan_id(study_plan(cfg))
    ask(node, "study_prepare", {"plan": pid})
    feats = [f"original_glcm_F{i}" for i in range(9)]
    from fedrad.common.combat import make_request

    honest = make_request(feats, ["age", "sex"], ["sex"], batch_col="scanner")
    refused(node, "combat_stats", {"plan": pid, "request": honest, "table": "raw"}, "min-cell-size")
    # the coordinator's batch column is ignored (one batch per patient would be refused): the plan's is used
    clean = nodes[0]
    approve_at_sites(study_plan(cfg), [clean])
    ask(clean, "study_prepare", {"plan": pid})
    swapped = make_request(feats, ["age", "sex"], ["sex"], batch_col="case_id")
    reply = ask(clean, "combat_stats", {"plan": pid, "request": swapped, "table": "raw"})
    assert [b["batch"] for b in reply["stats"]["batches"]] == ["hosp0/GE", "hosp0/Siemens"]


def test_a_sites_tables_are_parsed_once_per_process_and_never_served_stale(tmp_path):
    """``Site.table`` memoizes what it read (a site message used to parse the same parquet files 5-6 times):
    each caller gets its own copy, and a table replaced at the same path (atomically, as ``save_table`` does, or
    rewritten in place) is read again, never served from memory."""
    from fedrad.client import site as site_mod

    calls = []

    def reader(path):
        calls.append(path)
        return pd.read_parquet(path)

    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1.0, 2.0, 3.0]}).to_parquet(path)
    first = site_mod.read_table(path, reader)
    first.loc[0, "a"] = 99.0  # a caller changing its copy changes no one else's
    again = site_mod.read_table(path, reader)
    assert len(calls) == 1 and again["a"].tolist() == [1.0, 2.0, 3.0]
    pd.DataFrame({"a": [4.0, 5.0, 6.0]}).to_parquet(path)  # same size, same path, rewritten in place
    assert site_mod.read_table(path, reader)["a"].tolist() == [4.0, 5.0, 6.0] and len(calls) == 2

    from fedrad.client.policy import SitePolicy

    site = Site("A", table_path=path, workdir=tmp_path / "work", policy=SitePolicy())
    df = pd.DataFrame({"a": [7.0, 8.0]})
    site.save_table("h", df)
    assert site.table("h").equals(df)
    site.save_table("h", df + 1)  # atomic replace: a new file
    assert site.table("h").equals(df + 1)
