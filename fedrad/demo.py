"""``fedrad demo``: the whole product on one machine — synthetic hospitals, real Flower processes, a study
(a prediction study of response or survival, or a radiogenomic association study: ``endpoint="association"``).

Generates the embedded synthetic cohort, starts a SuperLink and one SuperNode per site on loopback, runs the
multi-center validation study (extraction at the sites included), stops every process it started, and writes
results.json and report.html.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from fedrad.server.runtime import LoopbackDeployment, SiteNode

DEMO_STUDY = {
    "study": {"name": "fedrad demo: response to treatment", "min_sites": 3},
    "endpoint": {"type": "response", "outcome": "response"},
    # stage differs between the demo's hospitals: ComBat keeps its effect (a numeric, ordinal covariate)
    "harmonization": {"enabled": True, "covariates": ["age", "sex", "stage"], "categorical": ["sex"]},
    # the sites' tables also hold the survival endpoint's columns and the molecular markers: never features
    "selection": {"fdr": 0.05, "redundancy": 0.9, "max_features": 8,
                  "exclude": ["os_time", "os_event", "immune_score", "egfr_mutant"]},
    "model": {"penalty": "l2", "clinical": ["age", "stage"]},  # the penalty on the default data-driven path
    "validation": {"loso": True, "inner_folds": 3, "seed": 0},
}


def study_config(manifests: dict[str, Path], endpoint: str, params: str, out: Path) -> dict:
    from fedrad.server.study_config import _merge, validate

    user = json.loads(json.dumps(DEMO_STUDY))
    if endpoint != "response":  # the other demos as measured in the README: ComBat on age and sex
        user["harmonization"]["covariates"] = ["age", "sex"]
    if endpoint == "association":
        user["model"]["grid"] = [0.01, 0.1, 1.0]  # not used (no model is fitted); the plan as before
    if endpoint == "survival":
        user["study"]["name"] = "fedrad demo: overall survival"
        user["endpoint"] = {"type": "survival", "time": "os_time", "event": "os_event"}
        user["selection"]["exclude"] = ["response", "immune_score", "egfr_mutant"]
        user["model"]["grid"] = [0.01, 0.1, 1.0]
    elif endpoint == "continuous":  # the immune score predicted from the images (penalized linear regression)
        user["study"]["name"] = "fedrad demo: immune score"
        user["endpoint"] = {"type": "continuous", "outcome": "immune_score"}
        user["selection"]["exclude"] = ["response", "os_time", "os_event", "egfr_mutant"]
        user["model"].pop("grid", None)  # alpha on the data-driven path
    elif endpoint == "association":  # radiogenomics: every feature x marker, adjusted for age and stage
        user["study"].update(name="fedrad demo: radiogenomic associations", kind="association")
        user["association"] = {"markers": ["immune_score", "egfr_mutant"], "volume_adjusted": True}
        user["selection"]["exclude"] = ["response", "os_time", "os_event"]
    user["study"]["output"] = str(out)
    user["sites"] = {name: {} for name in manifests}  # each site's manifest is in its own configuration
    return validate(_merge(user))


def run_demo(out: Path, sites: int = 5, patients: int = 100, seed: int = 0, endpoint: str = "response",
             params: str = "ct-original", log=print) -> dict:
    from fedrad.client.demo_data import write_demo_cohort
    from fedrad.server.plans import write_json_atomic

    t0 = time.monotonic()
    out = Path(out).resolve()
    data = out / "data"
    if not (data / "site1" / "manifest.csv").exists():
        log(f"demo: writing a synthetic cohort of {sites} sites x {patients} patients to {data}")
        write_demo_cohort(data, n_sites=sites, n_patients=patients, seed=seed, progress=False)
    manifests = {f"site{k}": data / f"site{k}" / "manifest.csv" for k in range(1, sites + 1)}
    cfg = study_config(manifests, endpoint, params, out / "results")
    from fedrad.common.signing import ensure_key

    # the coordinator's signing key (the SuperLink's home): the plan names it, the sites answer only its requests
    cfg["coordinator"] = {"key": ensure_key(out / "flower" / "superlink")[0].public}
    plan_path = out / "plan.json"
    write_json_atomic({"task": "study", "config": cfg}, plan_path)
    import os

    jobs = max(1, (os.cpu_count() or 1) // sites)  # every site shares this machine's cores
    nodes = [SiteNode(name, {"workdir": str(out / "sites" / name), "min-cell-size": 10, "extract-jobs": jobs,
                             "manifest": str(m), "params": params})
             for name, m in manifests.items()]
    from fedrad.common.plan import study_plan
    from fedrad.local import approve_at_sites

    # each hospital's operator approves the published plan (`fedrad site approve`); here one person runs them all
    pid = approve_at_sites(study_plan(cfg), [{"site-name": n.name, **n.node_config} for n in nodes])
    log(f"demo: every site approved study plan {pid[:12]}")
    log(f"demo: starting a SuperLink and {sites} SuperNodes on loopback (real Flower processes)")
    (out / "results" / "progress.log").unlink(missing_ok=True)  # an earlier demo's, not to be followed again
    with LoopbackDeployment(out / "flower", nodes) as dep:
        submitted = time.time() - 1.0  # file times can lag the clock by a tick
        run_id = dep.submit({"plan": str(plan_path), "out-dir": str(out / "results"), "expected-sites": sites,
                             "round-timeout": 900.0})
        log(f"demo: study submitted as Flower run {run_id}; following its progress")
        seen = [0]

        def follow(_status):
            lines = _server_log_lines(out / "results")
            for line in lines[seen[0]:]:
                log(f"  {line}")
            seen[0] = len(lines)

        # the ServerApp writes results.json last (after the report): the results are final once it is there
        dep.wait(run_id, timeout=1800, on_poll=follow, done_file=out / "results" / "results.json", finished=False)
        follow(None)
    results = json.loads((out / "results" / "results.json").read_text())
    report = out / "results" / "report.html"
    if not _written_since(report, submitted):  # the coordinator could not write it: say why here
        from fedrad.server.report import write_report

        report = write_report(results, report)
    results["wall_seconds"] = round(time.monotonic() - t0, 1)
    return {"results": results, "report": report, "seconds": results["wall_seconds"]}


def _written_since(path: Path, since: float) -> bool:
    """``path`` exists and was written at or after ``since`` (a report from an earlier demo is not this one's)."""
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _server_log_lines(results_dir: Path) -> list[str]:
    """Progress lines the ServerApp wrote (round trips, phases, sites answered)."""
    path = results_dir / "progress.log"
    if not path.exists():
        return []
    return path.read_text().splitlines()
