"""Plans the coordinator runs over a Federation, identical on every runtime (deployment, simulation, in-process).

A plan is a JSON file: ``{"task": "harmonize", ...}``. ``run_plan`` dispatches on the task, runs its phases
(round trips) and writes ``results.json`` atomically into the output directory. Results hold aggregates,
global parameters and per-site summaries only — never a per-patient value.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from fedrad.common.files import atomic_write_bytes
from fedrad.common.messages import to_plain
from fedrad.server.federation import Federation
from fedrad.server.harmonize import run_federated_combat


def write_json_atomic(obj, path: Path) -> None:
    """Strict JSON (numpy values made plain, non-finite numbers as null), written atomically."""
    atomic_write_bytes(path, json.dumps(to_plain(obj), indent=1, allow_nan=False).encode())


def _harmonize(fed: Federation, plan: dict) -> dict:
    from fedrad.common.plan import plan_id, plan_of_document

    fed.plan_id = plan_id(plan_of_document(plan))  # the sites answer only if they approved this plan
    reference, summaries = run_federated_combat(fed, plan["request"], output=plan.get("output", "harmonized"))
    return {"reference": reference.to_dict(), "sites": summaries}


def _study(fed: Federation, plan: dict) -> dict:
    from fedrad.server.study import make_study

    return make_study(fed, plan["config"]).run()


TASKS = {"harmonize": _harmonize, "study": _study}


def preload_task_modules() -> None:
    """Import what the tasks import inside their functions (the study, the report's figures)."""
    import fedrad.server.association  # noqa: F401
    import fedrad.server.report  # noqa: F401
    import fedrad.server.study  # noqa: F401


def run_plan(fed: Federation, plan_path: str, out_dir: str) -> dict:
    plan = json.loads(Path(plan_path).read_text())
    task = plan.get("task")
    if task not in TASKS:
        raise ValueError(f"plan {plan_path}: unknown task {task!r}; known: {', '.join(TASKS)}")
    t0 = time.monotonic()
    result = TASKS[task](fed, plan)
    result.update({"task": task, "round_trips": fed.rounds, "seconds": round(time.monotonic() - t0, 3)})
    if task == "study":  # the coordinator writes the report for every study, whoever submitted it
        from fedrad.server.report import write_report

        try:
            fed.log(f"coordinator: report written to {write_report(result, Path(out_dir) / 'report.html')}")
        except Exception as exc:  # results.json below still lands; `fedrad study report` can retry
            fed.log(f"coordinator: report.html NOT written ({type(exc).__name__}: {exc}); "
                    f"run `fedrad study report {Path(out_dir) / 'results.json'}`")
    write_json_atomic(result, Path(out_dir) / "results.json")
    return result
