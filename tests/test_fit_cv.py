"""`fedrad fit` chooses its penalty as a study does (data-driven path, federated k-fold inner CV by case id, the
sites' minimum-cell rule for inner folds, smallest summed held-out loss): pooled and federated agree, the choice
equals a study's on the same rows, the model file records it, ``--C`` fixes it, and on FLamby's TCGA-BRCA split
the default federated Cox fit reaches FedAdam's published pooled-test C-index."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.common.folds import row_mask
from fedrad.common.selection import penalty_path
from fedrad.local import fit_table

from .test_fit_cli import _survival_table, _table

RUNNER = CliRunner()


def _cli(tmp_path, df, name, *args):
    src = tmp_path / f"{name}.csv"
    df.to_csv(src, index=False, float_format="%.17g")
    r = RUNNER.invoke(app, ["fit", str(src), "--site-col", "site", "--out", str(tmp_path / f"{name}.json"), *args])
    assert r.exit_code == 0, r.output
    return r.output, json.loads((tmp_path / f"{name}.json").read_text())


def _independent_cv(df, model, feats, path, k=3, seed=0, min_cell=10):
    """The inner-CV losses from scratch with the reference estimators (lifelines / scikit-learn), for the
    reference implementations' own penalty conventions: per inner fold, fit on the usable sites' training rows,
    sum each usable site's held-out loss (logistic: log loss; Cox: Verweij-van Houwelingen)."""
    from lifelines import CoxPHFitter
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from fedrad.common.cox import efron_stratum

    totals = np.zeros(len(path))
    for inner in range(k):
        spec = {"k": k, "seed": seed, "fold": inner, "keep": "train"}
        masks = {s: row_mask(list(d["case_id"]), spec) for s, d in df.groupby("site")}
        usable = [s for s, m in masks.items() if m.sum() >= min_cell and (~m).sum() >= min_cell]
        train = pd.concat([df[df.site == s][masks[s]] for s in usable])
        for gi, g in enumerate(path):
            if model == "logistic":
                sc = StandardScaler().fit(train[feats])
                ref = LogisticRegression(C=g, tol=1e-12, max_iter=10000).fit(sc.transform(train[feats]),
                                                                            train["response"])
            else:
                ref = CoxPHFitter(penalizer=g).fit(train[feats + ["os_time", "os_event", "site"]], "os_time",
                                                   "os_event", strata=["site"],
                                                   fit_options={"precision": 1e-12, "r_precision": 1e-15})
            for s in usable:
                rows, m = df[df.site == s], masks[s]
                if model == "logistic":
                    lp = ref.decision_function(sc.transform(rows[feats]))
                    y = rows["response"].to_numpy()
                    totals[gi] += np.sum(np.logaddexp(0, lp[~m]) - y[~m] * lp[~m])
                else:
                    lp = (rows[feats].to_numpy() @ ref.params_[feats].to_numpy())[:, None]
                    t, e = rows["os_time"].to_numpy(), rows["os_event"].to_numpy().astype(float)
                    ll_all = efron_stratum(lp, t, e, np.ones(1))[0]
                    ll_tr = efron_stratum(lp[m], t[m], e[m], np.ones(1))[0] if e[m].sum() else 0.0
                    totals[gi] -= ll_all - ll_tr
    return totals


@pytest.mark.parametrize("model", ["logistic", "cox"])
def test_fit_defaults_to_cv_pooled_equals_federated_equals_references(tmp_path, model):
    df = _table() if model == "logistic" else _survival_table()
    args = (["--model", "logistic", "--outcome", "response"] if model == "logistic"
            else ["--model", "cox", "--time", "os_time", "--event", "os_event"])
    out_p, pooled = _cli(tmp_path, df, "pooled", *args)
    out_f, fed = _cli(tmp_path, df, "fed", *args, "--federated")
    cp, cf = pooled["penalty_choice"], fed["penalty_choice"]
    assert cp["method"] == cf["method"] == "cv" and cp["folds"] == 3 and cp["seed"] == 0 and len(cp["path"]) == 12
    assert cp["index"] == cf["index"]
    np.testing.assert_allclose(cf["path"], cp["path"], rtol=1e-12)
    np.testing.assert_allclose(cf["cv_scores"], cp["cv_scores"], rtol=1e-9)
    key = "coef" if model == "logistic" else "coef_"
    np.testing.assert_allclose(fed["params"][key], pooled["params"][key], atol=1e-8)
    # the federated fit batches every (path value x inner fold) fit: score round + Newton steps + loss round
    assert fed["fit"]["round_trips"] <= 10, fed["fit"]["round_trips"]
    name = "C" if model == "logistic" else "penalizer"
    line = (f"penalty chosen by 3-fold federated CV over a path of 12 values: {name} = {cf['value']:.4g} "
            f"({'CV deviance' if model == 'logistic' else 'CV partial-likelihood deviance'} "
            f"{2 * cf['cv_scores'][cf['index']]:.4g})")
    assert line in out_f, out_f
    # the CV losses and the choice, recomputed with scikit-learn / lifelines on the same folds
    feats = pooled["features"]
    want = _independent_cv(df.assign(case_id=df["case_id"]), model, feats, cp["path"])
    np.testing.assert_allclose(cp["cv_scores"], want, rtol=1e-5)
    assert cp["index"] == int(np.argmin(want)) and 0 < cp["index"] < 11
    # the path: the study's rule from the gradient at zero (penalty_path of the largest standardized score)
    assert cp["path"][0] > cp["path"][-1] if model == "cox" else cp["path"][0] < cp["path"][-1]
    # --C fixes the penalty and says so
    out_c, fixed = _cli(tmp_path, df, "fixed", *args, "--federated", "--C", "0.05")
    assert fixed["penalty_choice"] == {"method": "fixed", "value": 0.05}
    assert f"penalty fixed: {name} = 0.05" in out_c


def test_cv_path_is_the_studys_rule():
    """The path starts where the study's starts: penalty_path of the largest standardized score at zero."""
    from fedrad.common.selection import pooled_standardized_scores

    df = _table()
    feats = [f"original_glcm_f{i}" for i in range(4)]
    _, info = fit_table(df, "site", "logistic", feats, outcome="response")
    z, n = pooled_standardized_scores(df, {"type": "response", "outcome": "response"}, feats, strata="site")
    want = penalty_path(max(z.values()), n, "logistic", "l2", 0.0, 12, 5.0)
    np.testing.assert_allclose(info["penalty_choice"]["path"], want, rtol=1e-12)


@pytest.mark.parametrize("survival", [False, True])
def test_fit_equals_the_studys_choice_on_its_final_fold(tmp_path, survival):
    """A study (no harmonization, no LOSO: its final fold trains on every site's rows) and `fedrad fit` on the same
    rows and the study's final signature choose the same penalty on the same path and give the same model."""
    from fedrad.local import run_study_in_process
    from fedrad.server.study_config import _merge, validate

    from .test_study import make_sites

    cfg, nodes, tables = make_sites(tmp_path, survival, grid=None)
    cfg = validate(_merge({**cfg, "harmonization": {"enabled": False}, "validation": {**cfg["validation"],
                                                                                     "loso": False}}))
    res = run_study_in_process(cfg, nodes)
    df = pd.concat([t.assign(site=s) for s, t in tables.items()], ignore_index=True)
    outcome = {"time": "os_time", "event": "os_event"} if survival else {"outcome": "response"}
    model = "cox" if survival else "logistic"
    for kind in ("radiomics", "combined"):
        feats = res["final_models"][kind]["features"]
        study_pen = res["penalties"]["final"][kind]
        fitted, info = fit_table(df, "site", model, feats, federated=True, **outcome)
        choice = info["penalty_choice"]
        np.testing.assert_allclose(choice["path"], study_pen["path"], rtol=1e-9)
        assert choice["index"] == study_pen["index"], (kind, choice["cv_scores"], study_pen["cv_loss"])
        np.testing.assert_allclose(choice["cv_scores"], [study_pen["cv_loss"][str(v)] for v in study_pen["path"]],
                                   rtol=1e-9)
        params = res["final_models"][kind]["params"]
        key = "coef_" if survival else "coef"
        np.testing.assert_allclose(fitted.to_dict()[key], params[key], atol=1e-8)
        pooled, pinfo = fit_table(df, "site", model, feats, **outcome)
        assert pinfo["penalty_choice"]["index"] == study_pen["index"]
        np.testing.assert_allclose(pooled.to_dict()[key], params[key], atol=1e-8)


def test_tcga_brca_default_federated_cox_reaches_fedadam(tmp_path):
    """FLamby's TCGA-BRCA train/test split, `fedrad fit --model cox --federated` with every default (the CLI's table
    has no case ids: rows are numbered within their region): the test C-index over the union of the regions'
    test sets reaches FedAdam's published 0.842 (mean of FLamby's 5 seeds); the mean over the regions' test sets
    is recorded beside FedAdam's 0.815."""
    from .conftest import shared_path

    shared_path("multisite-tabular", "flamby-tcga-brca", "tcga_brca.csv")
    from benchmarks.published import published, tcga_default_fit

    got = tcga_default_fit(tmp_path)
    fedadam = published("tcga").loc["FedAdam"]
    assert got["penalty_choice"]["method"] == "cv"
    assert got["union"] >= round(float(fedadam["union of test sets"]), 3), got
    assert abs(got["mean"] - float(fedadam["mean of centres"])) < 0.002, got


def test_a_coordinator_cannot_choose_the_cv_penalty_rows_or_models_of_a_fit(tmp_path):
    """Through the real site agent, after an honest federated CV fit: a penalty index off the plan's path, inner
    folds of another seed or fold, and a model of another kind are refused, audited and release nothing."""
    from fedrad.common.plan import fit_plan, plan_id
    from fedrad.common.penalty_cv import cv_settings
    from tests.test_site_guard import refused

    df = _table()
    feats = [c for c in df.columns if c.startswith("original_")]
    work = tmp_path / "w"
    fit_table(df, "site", "logistic", feats, outcome="response", federated=True, workdir=work)
    site = sorted(df["site"].unique())[0]
    node = {"site-name": site, "table": str(next(work.glob(f"{site}/**/table.parquet"))),
            "workdir": str(work / site), "min-cell-size": 10}
    data = {"model": "logistic", "features": feats, "outcome": "response"}
    pid = plan_id(fit_plan(data, rounds=200, cv=cv_settings(penalty="l2")))
    rows = {"k": 3, "seed": 0, "fold": 1}
    item = {"id": "2|1", "rows": rows, "table": None, "model": {"kind": "logistic"}}
    refused(node, "study_evaluate", {"plan": pid, "items": [{**item, "id": "99|1"}]}, "outside-plan")
    refused(node, "study_evaluate", {"plan": pid, "items": [{**item, "rows": {**rows, "seed": 7}}]}, "outside-plan")
    refused(node, "study_evaluate", {"plan": pid, "items": [{**item, "rows": {**rows, "fold": 2}}]}, "outside-plan")
    refused(node, "study_evaluate", {"plan": pid, "items": [{**item, "model": {"kind": "cox"}}]}, "outside-plan")
    task = {"id": "2|1", "request": {"features": feats}, "data": {**data, "rows": {**rows, "keep": "test"}}}
    refused(node, "fit_round", {"plan": pid, "tasks": [task]}, "outside-plan")
