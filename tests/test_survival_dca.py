"""Decision-curve analysis for a survival endpoint at a time horizon (issue 15): the Kaplan-Meier and Breslow pieces
against lifelines, the pooled net benefit from the sites' released counts against the same quantity on the pooled
rows, the training sites' federated baseline against its pooled twin, small cells whatever baseline a curious
coordinator sends, and the whole study (no extra round trip, equal to the pooled twin)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedrad.common import metrics
from fedrad.common.cox import (CoxFit, breslow_cumhaz, fit_pooled, pooled_breslow, site_breslow, site_cox)

lifelines = pytest.importorskip("lifelines")


def _cohort(seed: int, sizes=(83, 61, 97), ties: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for k, n in enumerate(sizes):
        x = rng.normal(size=(n, 2)) + 0.3 * k
        lp = 0.8 * x[:, 0] - 0.5 * x[:, 1]
        t = rng.exponential(8.0 / (1 + 0.4 * k), n) / np.exp(lp)
        c = rng.uniform(2, 30, n)
        time = np.minimum(t, c)
        if ties:
            time = np.round(time)  # many ties, and times of 0
        parts.append(pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "time": time, "event": (t <= c).astype(int),
                                   "site": f"s{k}"}))
    return pd.concat(parts, ignore_index=True)


def _lifelines_nb(df: pd.DataFrame, risk: np.ndarray, horizon: float, thresholds) -> list[float]:
    """Vickers et al. 2008 net benefit with each site's own Kaplan-Meier (lifelines), summed over sites."""
    from lifelines import KaplanMeierFitter

    def km(rows):
        if not len(rows):
            return 1.0
        f = KaplanMeierFitter().fit(rows["time"], rows["event"])
        return float(f.survival_function_at_times(horizon).iloc[0])

    n = len(df)
    out = []
    for p in thresholds:
        tp = fp = 0.0
        for _, rows in df.assign(risk=risk).groupby("site"):
            treated = rows[rows["risk"] >= p]
            s = km(treated)
            tp += len(treated) * (1 - s)
            fp += len(treated) * s
        out.append(tp / n - fp / n * p / (1 - p))
    return out


def test_kaplan_meier_at_a_horizon_equals_lifelines():
    from lifelines import KaplanMeierFitter

    df = _cohort(0)
    worst = 0.0
    for h in (0.0, 0.5, 3.0, 7.0, 12.0, 29.5, 1e6):  # at ties, between times, beyond the last time
        for _, rows in [("all", df), *df.groupby("site")]:
            want = float(KaplanMeierFitter().fit(rows["time"], rows["event"]).survival_function_at_times(h).iloc[0])
            worst = max(worst, abs(metrics.km_survival_at(rows["time"], rows["event"], h) - want))
    assert worst < 1e-13, worst


def test_breslow_baseline_of_each_stratum_equals_lifelines():
    """Breslow's cumulative hazard of each site's stratum at lifelines' own coefficients and centring equals
    lifelines' ``baseline_cumulative_hazard_`` (ties included)."""
    from lifelines import CoxPHFitter

    df = _cohort(1)
    cph = CoxPHFitter().fit(df, "time", "event", strata=["site"])
    beta = cph.params_.to_numpy()
    lp = (df[["x0", "x1"]].to_numpy() - cph._norm_mean.to_numpy()) @ beta
    base = cph.baseline_cumulative_hazard_
    worst = 0.0
    for site in ("s0", "s1", "s2"):
        at = (df["site"] == site).to_numpy()
        col = base[site].dropna()
        for h in (2.0, 5.0, 9.5, 20.0):
            want = float(col[col.index <= h].iloc[-1]) if (col.index <= h).any() else 0.0
            got = breslow_cumhaz(lp[at], df["time"].to_numpy()[at], df["event"].to_numpy()[at], h)
            worst = max(worst, abs(got - want) / want)
    assert worst < 1e-12, worst


def _federated_fit(df: pd.DataFrame, horizon: float, k: int, penalizer: float = 0.05):
    """The study's Cox fit over three sites with each site's baseline beside its Newton values (as
    client/steps.fit_round adds it), through strict JSON."""
    fit = CoxFit(["x0", "x1"], duration_col="time", event_col="event", penalizer=penalizer)
    req = fit.start()
    sites = {s: rows.drop(columns="site").reset_index(drop=True) for s, rows in df.groupby("site")}
    asked = list(sites)
    rounds = 0
    while req is not None:
        replies = {}
        for s in asked:
            r = site_cox(sites[s], req, site=s)
            r["baseline"] = site_breslow(sites[s], req, horizon=horizon, min_cell_size=k, site=s)
            replies[s] = json.loads(json.dumps(r, default=lambda o: o.tolist()))
        req = fit.receive(replies)
        rounds += 1
        asked = fit.sites_to_ask or asked
    return fit, rounds


def test_federated_training_baseline_equals_its_pooled_twin():
    """The coordinator's combined baseline (each training site's Breslow at the fit's last evaluated point, moved
    to the pooled centring, weighted by n) equals the pooled twin at the final coefficients (within the fit's
    last sub-tolerance Newton step), site by site; a site under k events by the horizon withholds its own."""
    df = _cohort(2)
    h = 6.0
    fit, rounds = _federated_fit(df, h, k=10)
    model = fit.model()
    twin = fit_pooled(df, "time", "event", strata="site", penalizer=0.05)
    assert np.max(np.abs(model.coef_ - twin.coef_)) < 1e-7
    got = fit.baseline()
    want = pooled_breslow(df, twin, "time", "event", horizon=h, min_cell_size=10)
    assert got["horizon"] == h and set(got["sites"]) == set(want["sites"]) == {"s0", "s1", "s2"}
    rel = max(abs(got["sites"][s] / want["sites"][s] - 1) for s in got["sites"])
    assert rel < 1e-6, rel
    assert abs(got["cumhaz"] / want["cumhaz"] - 1) < 1e-6
    # the rule itself: the n-weighted mean of the sites' Breslow estimates on the pooled rows
    lp = np.asarray(twin.predict_log_partial_hazard(df[["x0", "x1"]]))
    per = {s: breslow_cumhaz(lp[(df["site"] == s).to_numpy()], rows["time"], rows["event"], h)
           for s, rows in df.groupby("site")}
    n = df["site"].value_counts()
    assert abs(want["cumhaz"] - sum(per[s] * n[s] for s in per) / len(df)) < 1e-14
    # a site with fewer than k events by the horizon withholds its baseline; the others' combine
    h = 3.0
    fit, _ = _federated_fit(df, h, k=10)
    ev = {s: int(((rows["event"] == 1) & (rows["time"] <= h)).sum()) for s, rows in df.groupby("site")}
    k = sorted(ev.values())[0] + 1
    fit2, _ = _federated_fit(df, h, k=k)
    b2 = fit2.baseline()
    at_risk = {s: int((rows["time"] >= h).sum()) for s, rows in df.groupby("site")}
    withheld = {s for s in ev if ev[s] < k or at_risk[s] < k}
    assert 0 < len(withheld) < 3
    assert {s for s, v in b2["sites"].items() if v is None} == withheld
    assert all(abs(b2["sites"][s] / fit.baseline()["sites"][s] - 1) < 1e-12 for s in ev if s not in withheld)
    w = {s: n[s] for s in b2["sites"] if s not in withheld}
    assert abs(b2["cumhaz"] - sum(b2["sites"][s] * w[s] for s in w) / sum(w.values())) < 1e-12 * b2["cumhaz"]


def test_a_training_site_withholds_its_baseline_when_a_risk_set_could_be_under_k():
    """At beta = 0 (the first round) the site's Breslow estimate is the Nelson-Aalen estimate (lifelines'); it is
    withheld once fewer than k patients are still at risk at the horizon (a risk set of the sum could then be a
    single patient's exp(lp)), or fewer than k events happened by it."""
    from lifelines import NelsonAalenFitter

    rows = _cohort(5, sizes=(80,), ties=False).drop(columns="site")
    req = CoxFit(["x0", "x1"], duration_col="time", event_col="event").start()
    k = 10
    t = np.sort(rows["time"].to_numpy())
    inside, outside = float(t[-k]), float(t[-(k - 1)])  # k, then k - 1 patients with time >= the horizon
    assert int(((rows["event"] == 1) & (rows["time"] <= inside)).sum()) >= k
    got = site_breslow(rows, req, horizon=inside, min_cell_size=k)["log_cumhaz"]
    naf = NelsonAalenFitter(nelson_aalen_smoothing=False).fit(rows["time"], rows["event"])
    want = float(naf.cumulative_hazard_at_times(inside).iloc[0])
    assert abs(np.exp(got) / want - 1) < 1e-12
    assert site_breslow(rows, req, horizon=outside, min_cell_size=k)["log_cumhaz"] is None
    early = float(np.sort(rows.loc[rows["event"] == 1, "time"])[k - 2])  # k - 1 events by the horizon
    assert site_breslow(rows, req, horizon=early, min_cell_size=k)["log_cumhaz"] is None


@pytest.mark.parametrize("k", [1, 8])
def test_pooled_net_benefit_from_released_counts_equals_the_pooled_rows(k):
    """Per site and pooled over sites: net benefit from the released counts equals the direct computation on the
    rows (lifelines' Kaplan-Meier per site) at every released threshold; a withheld threshold is interpolated."""
    df = _cohort(3, ties=False)
    h = 10.0
    model = fit_pooled(df, "time", "event", strata="site", penalizer=0.02)
    lp = np.asarray(model.predict_log_partial_hazard(df[["x0", "x1"]]))
    h0 = pooled_breslow(df, model, "time", "event", horizon=h, min_cell_size=k)["cumhaz"]
    risk = metrics.predicted_risk(lp, h0)
    tables = {}
    for s, rows in df.groupby("site"):
        at = (df["site"] == s).to_numpy()
        tables[s] = metrics.survival_decision_counts(lp[at], rows["time"], rows["event"], horizon=h, cumhaz=h0, k=k)
        one = metrics.pooled_survival_decision_curve([tables[s]])
        want = _lifelines_nb(rows, risk[at], h, metrics.DCA_THRESHOLDS)
        ex = np.array(tables[s]["exact"])
        assert ex.sum() >= 3
        assert np.max(np.abs(np.array(one["net_benefit"])[ex] - np.array(want)[ex])) < 1e-12
    pooled = metrics.pooled_survival_decision_curve(list(tables.values()))
    rows_nb = metrics.decision_curve_on_rows(lp, df["time"], df["event"], df["site"], h0, h)
    ref = _lifelines_nb(df, risk, h, metrics.DCA_THRESHOLDS)
    ex = np.array(pooled["exact"])
    diff = np.max(np.abs(np.array(pooled["net_benefit"])[ex] - np.array(ref)[ex]))
    assert diff < 1e-12, diff
    assert np.max(np.abs(np.array(rows_nb["net_benefit"]) - np.array(ref))) < 1e-12
    assert np.max(np.abs(np.array(pooled["treat_all"]) - np.array(rows_nb["treat_all"]))) < 1e-12
    if k == 1:
        assert ex.all()
    else:
        assert not ex.all()  # some site withheld a threshold: interpolated between its released neighbours
        inner = [j for j, v in enumerate(pooled["net_benefit"]) if v is not None and not ex[j]]
        assert inner and np.max(np.abs(np.array(pooled["net_benefit"])[inner] - np.array(ref)[inner])) < 0.02
        last = max(max(j for j, e in enumerate(t["exact"]) if e) for t in tables.values())
        assert pooled["net_benefit"][last + 1:] == [None] * (len(ex) - last - 1)  # nothing invented at the top
    # treat-all: 1 - S(h) - S(h) p/(1-p) with S(h) the sites' Kaplan-Meier averaged with weights n_s
    from lifelines import KaplanMeierFitter

    s_bar = sum(len(r) * float(KaplanMeierFitter().fit(r["time"], r["event"]).survival_function_at_times(h).iloc[0])
                for _, r in df.groupby("site")) / len(df)
    want_all = [(1 - s_bar) - s_bar * p / (1 - p) for p in metrics.DCA_THRESHOLDS]
    assert np.max(np.abs(np.array(pooled["treat_all"]) - want_all)) < 1e-12


def test_a_curious_coordinators_baseline_never_releases_a_small_cell():
    """Whatever baseline the coordinator sends (swept over 10 decades, and chosen from the site's own risk scores to
    put thresholds between two patients), every released treated group, its complement and the patients between
    any two released groups number 0 or at least k."""
    df = _cohort(4, sizes=(60,), ties=False)
    k = 10
    lp = 0.9 * df["x0"].to_numpy() - 0.4 * df["x1"].to_numpy()
    n = len(df)
    # crafted: H0 such that threshold p_j falls just above / below patient i's risk (1 - exp(-H0 e^lp_i) = p_j)
    crafted = [-np.log1p(-p) / np.exp(v) * f for p in metrics.DCA_THRESHOLDS[::3] for v in np.sort(lp)[::7]
               for f in (1 - 1e-9, 1 + 1e-9)]
    released = 0
    for h0 in list(np.logspace(-5, 5, 60)) + crafted:
        c = metrics.survival_decision_counts(lp, df["time"], df["event"], horizon=10.0, cumhaz=float(h0), k=k)
        sizes = [n] + [m for m in c["treated"] if m is not None] + [0]
        assert all(a >= b for a, b in zip(sizes, sizes[1:]))
        assert all(a - b == 0 or a - b >= k for a in sizes for b in sizes if a >= b), (h0, sizes)
        released += len(sizes) - 2
        # a withheld threshold releases nothing
        assert all((m is None) == (s is None) for m, s in zip(c["treated"], c["survival"]))
    assert released > 100  # the rule withholds only what it must
    # too few patients at the site: nothing at all
    c = metrics.survival_decision_counts(lp[:9], df["time"][:9], df["event"][:9], horizon=10.0, cumhaz=1.0, k=k)
    assert c["n"] is None and c["survival_all"] is None and all(m is None for m in c["treated"])


def test_bad_input_gets_a_one_line_error():
    with pytest.raises(ValueError, match="finite positive"):
        metrics.predicted_risk([0.0, 1.0], -1.0)
    with pytest.raises(ValueError, match="finite positive"):
        metrics.predicted_risk([0.0, 1.0], float("nan"))
    with pytest.raises(ValueError, match="horizon"):
        metrics.survival_decision_counts([0.0] * 20, [1.0] * 20, [1] * 20, horizon=0.0, cumhaz=1.0, k=5)
    with pytest.raises(ValueError, match="different horizons"):
        a = metrics.survival_decision_counts(np.zeros(20), np.arange(20.0), [1, 0] * 10, horizon=5.0, cumhaz=1.0, k=1)
        b = dict(a, horizon=6.0)
        metrics.pooled_survival_decision_curve([a, b])


def test_survival_study_decision_curves_equal_the_pooled_twin_without_an_extra_round(tmp_path):
    """The whole survival study with ``[validation] dca_horizon``: the training sites' baselines ride on the fit's
    Newton replies, so the round trips are those of the same study without a horizon; every held-out site's
    decision-curve counts (and all its other metrics) equal the pooled twin's; the pooled curve is in the results
    with the baseline rule."""
    from fedrad.local import run_study_in_process
    from fedrad.server.study_config import validate
    from fedrad.server.study_pooled import flatten_metrics, pooled_loso
    from tests.test_study import make_sites

    cfg0, nodes0, _ = make_sites(tmp_path / "plain", survival=True)
    plain = run_study_in_process(cfg0, nodes0)
    cfg, nodes, tables = make_sites(tmp_path / "dca", survival=True)
    cfg = validate({**cfg, "validation": {**cfg["validation"], "dca_horizon": 12}})
    res = run_study_in_process(cfg, nodes)
    assert res["round_trips"] == plain["round_trips"]
    assert [p["round_trips"] for p in res["phases"]] == [p["round_trips"] for p in plain["phases"]]
    assert res["decision_baseline"]["horizon"] == 12.0
    worst, n_exact = 0.0, 0
    for site in tables:
        twin = pooled_loso(cfg, tables, site)
        got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
        assert set(got) == set(want)
        assert any("/decision/survival/" in key for key in got)
        worst = max(worst, max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got))
        n_exact += sum(res["external"][site]["radiomics"]["decision"]["exact"])
        # the held-out site got the training sites' baseline: within the fit's last step of the twin's
        fed = res["decision_baseline"]["folds"][f"loso:{site}"]["radiomics"]["cumhaz"]
        assert abs(fed / twin["baselines"]["radiomics"]["cumhaz"] - 1) < 1e-5
    assert worst < 1e-6, worst
    assert n_exact >= 8
    curve = res["pooled"]["radiomics"]["decision_curve"]
    assert curve["horizon"] == 12.0 and curve["sites"] == 4
    nb = [v for v in curve["net_benefit"] if v is not None]
    assert len(nb) >= 8 and max(nb) > 0.05
    # the apparent (final) fold's models are evaluated at the all-site baseline too
    assert all("decision" in res["apparent"][s]["radiomics"] for s in tables)


def test_the_horizon_is_a_plan_key_left_out_when_absent():
    """Existing plan ids (the sites' approvals) do not change: without ``dca_horizon`` the plan is as before the key
    existed; with it the plan (and its id) carries it, and the sites take it from there."""
    from fedrad.common.plan import dca_horizon, plan_id, study_plan
    from fedrad.server.study_config import _merge, validate

    base = {"study": {"name": "t"}, "endpoint": {"type": "survival"}}
    cfg = validate(_merge(base))
    plan = study_plan(cfg)
    assert "dca_horizon" not in plan["study"]["validation"]
    old = json.loads(json.dumps(cfg))
    del old["validation"]["dca_horizon"]  # a configuration from before the key existed
    assert plan_id(plan) == plan_id(study_plan(old))
    with_h = study_plan(validate(_merge({**base, "validation": {"dca_horizon": 24}})))
    assert with_h["study"]["validation"]["dca_horizon"] == 24 and plan_id(with_h) != plan_id(plan)
    assert dca_horizon(with_h["study"]) == 24.0 and dca_horizon(plan["study"]) is None


def test_attack_a_curious_coordinator_cannot_choose_the_horizon_or_get_small_cells_by_the_baseline(tmp_path):
    """Through the real site agent (plan check, policy, step, audit): the horizon is the plan's whatever the fit and
    evaluation requests say; a baseline that is not a finite positive number is refused; a baseline crafted from
    the held-out site's own risk scores (the coordinator knows the model) still releases only groups of 0 or at
    least k patients, 0 or at least k apart; inner-CV fits carry no baseline."""
    from fedrad.client.client_app import app
    from fedrad.common.plan import study_plan
    from fedrad.local import approve_at_sites
    from fedrad.server.federation import Federation, LocalGrid
    from fedrad.server.study import Study
    from fedrad.server.study_config import validate
    from tests.test_site_guard import ask, refused
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path, survival=True)
    cfg = validate({**cfg, "validation": {**cfg["validation"], "dca_horizon": 12}})
    approve_at_sites(study_plan(cfg), nodes)
    st = Study(Federation(LocalGrid(app, nodes)), cfg)
    for phase in (st.prepare, st.harmonize, st.select):
        phase()
    # a fit round whose data spec names another horizon (and asks an inner-CV fit for a baseline): the site's
    # baselines are at the plan's horizon, for full-fold fits only
    feats = st.signatures["loso:hosp0"]
    node = nodes[1]
    spec = st.kind.data_spec(feats, st.tables["loso:hosp0"], None)
    inner = st.kind.data_spec(feats, st.tables["loso:hosp0"], {"k": 3, "seed": 0, "fold": 0, "keep": "train"})
    fit = st.kind.make_fit(feats, "l2", 0.1, 0.5)
    payload = {"plan": st.plan_id, "tasks": [
        {"id": "loso:hosp0|radiomics|0|all", "request": fit.start(), "data": {**spec, "dca_horizon": 0.01},
         "sites": ["hosp1"]},
        {"id": "loso:hosp0|radiomics|0|0", "request": fit.start(), "data": {**inner, "dca_horizon": 12},
         "sites": ["hosp1"]}]}
    reply = ask(node, "fit_round", payload)
    assert reply["results"]["loso:hosp0|radiomics|0|all"]["baseline"]["horizon"] == 12.0
    assert reply["results"]["loso:hosp0|radiomics|0|all"]["baseline"]["log_cumhaz"] is not None
    assert "baseline" not in reply["results"]["loso:hosp0|radiomics|0|0"]

    st.fit_models()
    site = "hosp1"
    fold = f"loso:{site}"
    honest = {str(gi): st.fits[f"{fold}|radiomics|{gi}|all"].to_dict() for gi in range(3)}
    base = {"plan": st.plan_id, "endpoint": st.endpoint, "items": [], "km_times": cfg["validation"]["km_times"],
            "dca_horizon": 0.5}

    def evaluate(baselines):
        return {**base, "folds": {fold: {"models": {"radiomics": honest}, "baselines": {"radiomics": baselines},
                                         "table": f"h-{fold}", "eval_sites": [site]}}}

    for bad in (-1.0, 0.0, float("nan"), float("inf"), "1.0", True, [1.0]):
        refused(node, "study_evaluate", evaluate({"0": bad}), "outside-plan")
    refused(node, "study_evaluate", evaluate({"7": 1.0}), "outside-plan")  # a variant the request does not evaluate
    # the crafted baseline: threshold 0.5 falls between the two highest-risk patients of the held-out site
    # (worst case: the coordinator knows every patient's features, so their risk scores, but not the outcomes)
    from fedrad.client.site import Site

    model = st.kind.model_from_dict(honest["0"])
    k = 10
    h_rows = Site.from_node_config(node).table(f"h-{fold}")
    lp = np.sort(np.asarray(model.predict_log_partial_hazard(h_rows[list(model.feature_names_)])))
    crafted = float(-np.log(0.5) / np.exp(0.5 * (lp[-1] + lp[-2])))  # risk >= 0.5: the top patient only
    got = ask(node, "study_evaluate", evaluate({"0": crafted, "1": 1e-6, "2": 1e6}))
    released = got["folds"][fold]["models"]["radiomics"]
    for gi, entry in released.items():
        dec = entry["decision"]
        assert dec["horizon"] == 12.0  # the plan's, not the request's 0.5
        sizes = [dec["n"]] + [m for m in dec["treated"] if m is not None] + [0]
        assert all(a - b == 0 or a - b >= k for a in sizes for b in sizes if a >= b), (gi, sizes)
    j = metrics.DCA_THRESHOLDS.index(0.5)
    assert released["0"]["decision"]["treated"][j] is None and released["0"]["decision"]["survival"][j] is None
    assert set(released["1"]["decision"]["treated"]) == {0}  # nobody at risk: empty groups, nothing about anyone
    assert set(released["2"]["decision"]["treated"]) == {len(h_rows)}  # everyone: the whole site


def test_survival_report_has_the_decision_curve_with_its_horizon_and_baseline_rule_and_rqs_14(tmp_path):
    """The survival study's report: the decision-curve figure after the Kaplan-Meier curves, its caption naming the
    horizon and the baseline rule, the pooled curve equal to the sites' released counts summed, RQS 14 at +2."""
    import html as htmlmod
    import re

    from fedrad.common.cox import BASELINE_RULE
    from fedrad.server.study_config import validate
    from tests.test_report import _parse, _study_in_process, study_cfg

    cfg = study_cfg({"type": "survival", "time": "os_time", "event": "os_event"}, [0.1])
    cfg = validate({**cfg, "validation": {**cfg["validation"], "dca_horizon": 24}})
    study = _study_in_process(tmp_path, 3, 70, 1, cfg)
    res = study["results"]
    text, parsed = _parse(study["report"])
    assert parsed.figures == ["fig-harmonization", "fig-feature-moments", "fig-coefficients", "fig-forest",
                              "fig-km", "fig-decision", "fig-paired"]
    plain = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    assert "Decision curves at time 24" in plain and BASELINE_RULE in plain
    assert "risk by time 24" in text  # the figure's own title
    rqs = next(t for t in parsed.tables if t[0][0] == "RQS item")
    row = next(r for r in rqs if r[0].startswith("14."))
    assert row[:3] == ["14. Potential clinical utility", "+2", "+2"] and "by time 24" in row[3]
    for kind in ("radiomics", "volume", "clinical", "combined"):
        tabs = [m[kind]["decision"] for m in res["external"].values()]
        want = metrics.pooled_survival_decision_curve(tabs)
        got = res["pooled"][kind]["decision_curve"]
        assert got["net_benefit"] == want["net_benefit"] and got["treat_all"] == want["treat_all"]
        assert sum(v is not None for v in got["net_benefit"]) >= 4
    # the page renders in headless chromium with ink in every figure, the decision curve's too (test_report's check)
    from tests import test_report

    if test_report.CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium; scripts/install.sh tries it)")

    class _Request:
        def getfixturevalue(self, name):
            return study

    (tmp_path / "chromium").mkdir()
    test_report.test_report_renders_in_headless_chromium(_Request(), "survival_dca_study", tmp_path / "chromium")
