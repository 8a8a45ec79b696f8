"""The real Flower deployment runtime on loopback: a SuperLink, SuperNodes, `flwr run` — federated ComBat and a
whole study end to end, results written by the ServerApp, equal to their pooled twins; crashed, refusing and
rejoining sites and a coordinator restart (fault tolerance)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pandas as pd

from fedrad.client.audit import AuditLog
from fedrad.common.combat import ComBat, make_request
from fedrad.server.runtime import LoopbackDeployment, SiteNode
from fedrad.local import approve_plan_file_at_sites
from benchmarks.rounds import make_sites as make_rounds_sites
from tests.test_harmonize_flower import _table


def nodes_of(sites):
    """Node configs of loopback SiteNodes (to approve a plan at each site, as its operator would)."""
    return [{"site-name": s.name, **s.node_config} for s in sites]


@pytest.mark.slow
def test_federated_combat_on_real_superlink_and_supernodes(tmp_path):
    df = _table(seed=11)
    df = df[df.site != "hospD"]
    feats = [c for c in df.columns if c.startswith("original_")]
    sites = []
    for name, part in df.groupby("site"):
        d = tmp_path / "hospitals" / name
        d.mkdir(parents=True)
        part.to_parquet(d / "features.parquet", index=False)
        sites.append(SiteNode(name, {"table": str(d / "features.parquet"), "workdir": str(d / "work"),
                                     "min-cell-size": 5}))  # hospB has 9 women: its operator allows k = 5
    plan = {"task": "harmonize", "request": make_request(feats, ["age", "sex"], ["sex"], min_cell_size=10)}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    approve_plan_file_at_sites(tmp_path / "plan.json", nodes_of(sites))
    out = tmp_path / "results"
    with LoopbackDeployment(tmp_path / "flower", sites) as dep:
        run_id = dep.submit({"plan": str(tmp_path / "plan.json"), "out-dir": str(out), "expected-sites": 3,
                             "round-timeout": 120.0})
        status = dep.wait(run_id, timeout=300, done_file=out / "results.json")
    assert status["status"] == "finished:completed"
    results = json.loads((out / "results.json").read_text())
    assert results["round_trips"] == 2
    assert sorted(results["sites"]) == ["hospA", "hospB", "hospC"]
    assert results["reference"]["batch_sizes"] and "features" in results["reference"]
    pooled = ComBat(covariates=["age", "sex"], categorical=["sex"]).fit_transform(
        df[feats], df["site"], df[["age", "sex"]])
    pooled = pd.DataFrame(np.asarray(pooled), columns=feats, index=df.index)
    for site in sites:
        work = tmp_path / "hospitals" / site.name / "work"
        got = pd.read_parquet(work / "harmonized" / "harmonized.parquet")
        want = pooled.loc[df.site == site.name]
        np.testing.assert_allclose(got[feats].to_numpy(), want.to_numpy(), rtol=1e-9)
        assert [e["request"] for e in AuditLog(work / "audit.jsonl").entries()] == ["combat_stats", "combat_apply"]


def _fault_sites(root):
    """Five sites from the study test generator: A, B, C, E with 91/73/112/64 patients and a site D with 8
    patients, fewer than its minimum cell size 10 (it refuses every aggregate)."""
    from tests.test_study import make_sites

    cfg, _, generated = make_sites(root / "generated", survival=False, seed=7)
    tables = dict(zip(["hospA", "hospB", "hospC", "hospE"], generated.values()))
    tables["hospD"] = generated["hosp1"].iloc[:8].assign(case_id=[f"d-{i}" for i in range(8)])
    sites = []
    for name in ["hospA", "hospB", "hospC", "hospD", "hospE"]:
        path = root / "hospitals" / name / "features.parquet"
        path.parent.mkdir(parents=True)
        tables[name].to_parquet(path)
        sites.append(SiteNode(name, {"table": str(path), "workdir": str(path.parent / "work"), "min-cell-size": 10}))
    cfg["model"]["grid"] = [0.1, 1.0]
    cfg["study"]["min_sites"] = 2
    return cfg, sites, tables


def test_study_survives_crashed_and_refusing_sites_coordinator_restart_and_rejoin(tmp_path):
    """The README's end-to-end check, with faults, on real processes over loopback (SuperLink with a database
    file + 5 SuperNodes, `flwr run`): site D refuses (fewer patients than its minimum cell size), site A's
    SuperNode is SIGKILLed while harmonization runs and site B's while the models are fitted. The coordinator
    learns of each crash from Flower's NODE_UNAVAILABLE reply (missed heartbeats, before the round timeout), marks
    A, B, D missing with their reasons and finishes with C and E; their leave-one-site-out metrics equal the
    pooled twin fitted on C and E only (nothing from the aborted rounds is mixed in); every answering site's audit
    log verifies and holds no array with a patient axis. Then the SuperLink is killed and restarted on its
    database: the finished run is still listed and the results are intact; site A's SuperNode is restarted with its
    node config and answers a federated ComBat run (equal to pooled ComBat on A, C, E)."""
    import hashlib
    import re
    import threading
    import time

    from fedrad.client.audit import verify_audit
    from fedrad.server.federation import SITE_DOWN
    from fedrad.server.plans import write_json_atomic
    from fedrad.server.report import write_report
    from fedrad.server.study_pooled import flatten_metrics, pooled_loso

    t_start = time.monotonic()
    cfg, sites, tables = _fault_sites(tmp_path)
    write_json_atomic({"task": "study", "config": cfg}, tmp_path / "plan.json")
    approve_plan_file_at_sites(tmp_path / "plan.json", nodes_of(sites))
    out = tmp_path / "results"
    progress = out / "progress.log"
    events: dict[str, float] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def saboteur(dep):  # watches the coordinator's progress log; crashes A and B at the right moment
        try:
            while not done.is_set():
                text = progress.read_text() if progress.exists() else ""
                if "kill hospA" not in events and "(harmonization): asking" in text:
                    events["kill hospA"] = dep.kill_site("hospA")
                if "kill hospB" not in events and "(models): asking" in text:
                    events["kill hospB"] = dep.kill_site("hospB")
                for failed in re.findall(r"site\(s\) (.+?) failed during", text):
                    for site in failed.split(", "):
                        events.setdefault(f"lost {site}", time.monotonic())
                done.wait(0.1)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    with LoopbackDeployment(tmp_path / "flower", sites, database=True) as dep:
        run_id = dep.submit({"plan": str(tmp_path / "plan.json"), "out-dir": str(out), "expected-sites": 5,
                             "round-timeout": 180.0})
        watcher = threading.Thread(target=saboteur, args=(dep,), daemon=True)
        watcher.start()
        try:
            status = dep.wait(run_id, timeout=1200, done_file=out / "results.json")
        finally:
            done.set()
            watcher.join(10)
        assert not errors, errors
        t_study = time.monotonic()
        assert status["status"] == "finished:completed"
        res = json.loads((out / "results.json").read_text())
        log = progress.read_text()

        # who failed, when, and why
        lost = re.findall(r"site\(s\) (.+?) failed during (\S+);", log)
        assert [(set(s.split(", ")), req) for s, req in lost] == [({"hospA", "hospD"}, "combat_stats"),
                                                                   ({"hospB"}, "fit_round")], lost
        assert sorted(res["missing_sites"]) == ["hospA", "hospB", "hospD"]
        assert res["missing_sites"]["hospA"] == res["missing_sites"]["hospB"] == SITE_DOWN
        # the reply names the rule, never the count; the count is in hospD's local log only
        assert res["missing_sites"]["hospD"].endswith("[min-cell-size]") and "8" not in res["missing_sites"]["hospD"]
        hosp_d = tmp_path / "hospitals" / "hospD" / "work"
        assert "fewer than 10" in (hosp_d / "site.log").read_text()  # its 8 patients: each sex level < k
        detect = {s: events[f"lost {s}"] - events[f"kill {s}"] for s in ("hospA", "hospB")}
        print(f"\nSIGKILL -> SiteError: {', '.join(f'{s} {v:.1f} s' for s, v in detect.items())}")
        assert all(0 < v < 90 for v in detect.values()), detect  # heartbeats: 37.5-60 s (+ polling, load)
        # D refused with one line naming the site and the rule (audited at the site; nothing sent)
        d_entries = AuditLog(tmp_path / "hospitals" / "hospD" / "work" / "audit.jsonl").entries()
        assert [(e["request"], e["status"]) for e in d_entries] == [("study_prepare", "sent"),
                                                                     ("combat_stats", "refused")]
        # A died before answering any harmonization round
        assert [e["request"] for e in AuditLog(tmp_path / "hospitals" / "hospA" / "work" / "audit.jsonl").entries()
                ] == ["study_prepare"]

        # the study finished with C and E only, equal to the pooled twin on C and E
        assert sorted(res["sites"]) == sorted(res["external"]) == ["hospC", "hospE"]
        assert [p["phase"] for p in res["phases"]] == ["prepare", "harmonization", "selection", "models",
                                                       "evaluation"]
        survivors = {s: tables[s] for s in ("hospC", "hospE")}
        for site in survivors:
            twin = pooled_loso(cfg, survivors, site)
            got, want = flatten_metrics(res["external"][site]), flatten_metrics(twin["metrics"])
            assert set(got) == set(want)
            assert max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got) < 1e-6
        for site in survivors:
            audit = tmp_path / "hospitals" / site / "work" / "audit.jsonl"
            assert verify_audit(audit).ok
            entries = AuditLog(audit).entries()
            assert len(entries) == res["round_trips"]  # answered every round of every attempt, once
            for e in entries:
                assert all(len(tables[site]) not in a["shape"] for a in e["arrays"].values())
        assert log.count("sites answered") == res["round_trips"]
        report = write_report(res, out / "report.html").read_text()  # names each missing site with its reason
        assert all(site in report for site in res["missing_sites"])
        assert "stopped sending heartbeats" in report and "minimum cell size [min-cell-size]" in report
        digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "results.json",
                                                                                 out / "report.html")}

        # coordinator crash + restart on the same database: the finished run is still there
        dep.restart_superlink(crash=True)
        listed = {int(r["run-id"]): r["status"] for r in dep.runs()}
        assert listed == {run_id: "finished:completed"}, listed
        assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "results.json",
                                                                                        out / "report.html")}

        # site A rejoins (same node config and Flower home); D leaves; the next run includes A
        dep.stop_site("hospD")
        dep.restart_site("hospA")
        feats = [c for c in tables["hospA"].columns if c.startswith("original_")]
        write_json_atomic({"task": "harmonize", "request": make_request(feats, ["age", "sex"], ["sex"],
                                                                          min_cell_size=10)},
                          tmp_path / "plan2.json")
        approve_plan_file_at_sites(tmp_path / "plan2.json", nodes_of(sites))
        out2 = tmp_path / "results2"
        run2 = dep.submit({"plan": str(tmp_path / "plan2.json"), "out-dir": str(out2), "expected-sites": 3,
                           "round-timeout": 180.0})
        assert dep.wait(run2, timeout=300, done_file=out2 / "results.json")["status"] == "finished:completed"
        listed = {int(r["run-id"]): r["status"] for r in dep.runs()}
        assert listed == {run_id: "finished:completed", run2: "finished:completed"}, listed
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["round_trips"] == 2 and sorted(res2["sites"]) == ["hospA", "hospC", "hospE"]
    assert [e["request"] for e in AuditLog(tmp_path / "hospitals" / "hospA" / "work" / "audit.jsonl").entries()
            ] == ["study_prepare", "combat_stats", "combat_apply"]
    names = ["hospA", "hospC", "hospE"]
    df = pd.concat([tables[s].assign(site=s) for s in names], ignore_index=True)
    pooled = ComBat(covariates=["age", "sex"], categorical=["sex"]).fit_transform(
        df[feats], df["site"], df[["age", "sex"]])
    pooled = pd.DataFrame(np.asarray(pooled), columns=feats, index=df.index)
    for site in names:
        got = pd.read_parquet(tmp_path / "hospitals" / site / "work" / "harmonized" / "harmonized.parquet")
        np.testing.assert_allclose(got[feats].to_numpy(), pooled.loc[df.site == site].to_numpy(), rtol=1e-9)
    print(f"study {t_study - t_start:.0f} s, restart + rejoin run {time.monotonic() - t_study:.0f} s")


@pytest.mark.slow
def test_study_on_flower_simulation_engine(tmp_path):
    """The same ServerApp/ClientApp on Flower's simulation engine (Ray): virtual sites named from their
    partition id, tables named in their own site.toml; same number of round trips as the other runtimes."""
    from benchmarks.rounds import make_sites
    from fedrad.server.plans import write_json_atomic
    from fedrad.server.runtime import SimulationRun

    cfg, nodes = make_sites(tmp_path / "tables", 4, n=60)
    cfg["sites"] = {f"site{i + 1}": {"table": n["table"]} for i, n in enumerate(nodes)}
    write_json_atomic({"task": "study", "config": cfg}, tmp_path / "plan.json")
    from fedrad.local import write_simulation_sites

    write_simulation_sites(cfg, tmp_path / "flower" / "sites")  # each virtual site's site.toml and approval
    out = tmp_path / "results"
    with SimulationRun(tmp_path / "flower", 4) as sim:
        run_id = sim.submit({"plan": str(tmp_path / "plan.json"), "out-dir": str(out), "expected-sites": 4})
        assert sim.wait(run_id, timeout=900, done_file=out / "results.json")["status"] == "finished:completed"
    res = json.loads((out / "results.json").read_text())
    assert res["round_trips"] == 10 and sorted(res["external"]) == ["site1", "site2", "site3", "site4"]
    assert (tmp_path / "flower" / "sites" / "site3" / "audit.jsonl").exists()


def _deployment_study(root, fast: bool) -> tuple[dict, list, str, str]:
    """The rounds benchmark's 3-site response study on a loopback deployment; its results, SuperNode logs, the
    SuperLink's log and the log of the deployment's shared zygote ("" when there is none)."""
    from benchmarks.rounds import run_deployment

    cfg, nodes = make_rounds_sites(root / "sites", 3, n=80)
    run_deployment(cfg, nodes, root, fast=fast)
    logs = sorted((root / "flower" / "sites").glob("*/supernode.log"))
    zygote = root / "flower" / "zygote.log"
    return (json.loads((root / "out" / "results.json").read_text()), [p.read_text() for p in logs],
            (root / "flower" / "superlink" / "superlink.log").read_text(),
            zygote.read_text() if zygote.exists() else "")


def test_fast_site_runtime_gives_the_stock_runtimes_results(tmp_path):
    """The same study on Flower's stock SuperNode and on fedrad's fast site runtime (pre-forked ClientApps, short
    idle pull; fedrad.client.fastpath): identical results and round trips, and the fast one really ran forked
    ClientApps (its log says so for every message) while the stock one never did."""
    from fedrad.server.study_pooled import flatten_metrics

    fast, fast_logs, link_log, zygote = _deployment_study(tmp_path / "fast", fast=True)
    stock, stock_logs, _, no_zygote = _deployment_study(tmp_path / "stock", fast=False)
    assert fast["round_trips"] == stock["round_trips"] >= 8
    for log in fast_logs:
        assert "fedrad fast site runtime: on (Flower 1.42.0)" in log and "shared zygote" in log
    # one zygote for the deployment forked every message's ClientApp, each SuperNode, each node's SuperExec, the
    # SuperLink's SuperExec and the ServerApp; each of the long-lived ones may instead have started as a fresh
    # process, with a notice, when the zygote did not answer (stuck or gone)
    messages = sum(log.count("Sending:") for log in fast_logs)
    assert zygote.count("runs as pre-forked pid") == messages >= 3 * fast["round_trips"]
    fresh = {what: sum(log.count(f"{what} starts as a fresh process") for log in fast_logs + [link_log])
             for what in ("SuperNode", "SuperExec", "ServerApp")}
    assert zygote.count("SuperNode (launcher pid") + fresh["SuperNode"] == len(fast_logs)
    assert zygote.count("SuperExec (shim pid") + fresh["SuperExec"] == len(fast_logs) + 1
    assert zygote.count("ServerApp (launcher pid") + fresh["ServerApp"] == 1
    assert not any("fast site runtime" in log for log in stock_logs) and no_zygote == ""
    want, got = flatten_metrics(stock["pooled"]), flatten_metrics(fast["pooled"])
    assert want and got.keys() == want.keys()
    assert all(got[k] == want[k] for k in want)  # same code, same data: bit-identical, not merely close
    assert fast["selection"] == stock["selection"] and fast["penalties"] == stock["penalties"]
    assert flatten_metrics(fast["sites"]) == flatten_metrics(stock["sites"])


@pytest.mark.slow
def test_continuous_endpoint_study_on_the_deployment_runtime(tmp_path):
    """A continuous-endpoint study (penalized linear regression on the data-driven alpha path) on a real SuperLink
    and 4 SuperNodes with the fast site runtime: the same round trips and bit-identical results as the in-process
    run of the same plan on the same tables."""
    from benchmarks.rounds import run_deployment
    from fedrad.local import run_study_in_process
    from fedrad.server.study_pooled import flatten_metrics
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path / "deployment", survival=False, grid=None, continuous=True)
    rounds, _ = run_deployment(cfg, nodes, tmp_path / "deployment", fast=True)
    dep = json.loads((tmp_path / "deployment" / "out" / "results.json").read_text())
    cfg_local, nodes_local, _ = make_sites(tmp_path / "local", survival=False, grid=None, continuous=True)
    local = run_study_in_process(cfg_local, nodes_local)
    assert rounds == local["round_trips"] == 7
    for part in ("external", "pooled"):
        want, got = flatten_metrics(local[part]), flatten_metrics(dep[part])
        assert want and got.keys() == want.keys() and all(got[k] == want[k] for k in want), part
    assert dep["selection"] == json.loads(json.dumps(local["selection"]))


@pytest.mark.slow
def test_association_study_on_the_deployment_runtime(tmp_path):
    """An association study (features x immune score and EGFR status) on a real SuperLink and 4 SuperNodes:
    4 round trips and the same matrix as the in-process run of the same plan on the same tables."""
    from benchmarks.rounds import run_deployment
    from fedrad.local import run_study_in_process
    from fedrad.server.study_pooled import flatten_metrics
    from tests.test_association import _association_cfg
    from tests.test_study import make_sites

    cfg, nodes, _ = make_sites(tmp_path / "deployment", survival=False)
    rounds, _ = run_deployment(_association_cfg(cfg), nodes, tmp_path / "deployment", fast=True)
    dep = json.loads((tmp_path / "deployment" / "out" / "results.json").read_text())
    cfg_local, nodes_local, _ = make_sites(tmp_path / "local", survival=False)
    local = run_study_in_process(_association_cfg(cfg_local), nodes_local)
    assert rounds == local["round_trips"] == 4
    want, got = flatten_metrics(local["association"]["pairs"]), flatten_metrics(dep["association"]["pairs"])
    assert want and got.keys() == want.keys() and all(got[k] == want[k] for k in want)
    assert dep["association"]["survivors"] == json.loads(json.dumps(local["association"]["survivors"]))
    assert (tmp_path / "deployment" / "out" / "report.html").read_text().count("fig-association") == 2


@pytest.mark.slow
def test_harmonization_variants_study_on_the_deployment_runtime(tmp_path):
    """Shared scanner batches + CovBat + ComBat-GAM with knots from the sites' histograms, on a real SuperLink and 4
    SuperNodes (per-site payloads of the references): the same round trips and bit-identical results as in-process."""
    from benchmarks.rounds import run_deployment
    from fedrad.local import run_study_in_process
    from fedrad.server.study_config import validate
    from fedrad.server.study_pooled import flatten_metrics
    from tests.test_study import make_sites

    def study(path):
        cfg, nodes, _ = make_sites(path, survival=False, scanners=True)
        cfg["harmonization"].update(covariates=["sex"], categorical=["sex"], batch="scanner", shared_batches=True,
                                    covbat=True, smooth={"age": {"knots": 2, "range": [20, 100]}})
        return validate(cfg), nodes

    cfg, nodes = study(tmp_path / "deployment")
    rounds, _ = run_deployment(cfg, nodes, tmp_path / "deployment", fast=True)
    dep = json.loads((tmp_path / "deployment" / "out" / "results.json").read_text())
    local = run_study_in_process(*study(tmp_path / "local"))
    assert rounds == local["round_trips"]
    assert dep["smooth_knots"] == local["smooth_knots"]
    for part in ("external", "pooled"):
        want, got = flatten_metrics(local[part]), flatten_metrics(dep[part])
        assert want and got.keys() == want.keys() and all(got[k] == want[k] for k in want), part
