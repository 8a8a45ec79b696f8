"""Plans the coordinator runs over a Federation, identical on every runtime (deployment, simulation, in-process).

A plan is a JSON file: ``{"task": "harmonize", ...}``. ``run_plan`` dispatches on the task, runs its phases
(round trips) and writes ``results.json`` atomically into the output directory. Results hold aggregates,
global parameters and per-site summaries only — never a per-patient value.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from fedrad.server.federation import Federation
from fedrad.server.harmonize import run_federated_combat


def _jsonable(obj):
    """numpy scalars/arrays -> Python; non-finite floats -> None (results.json is strict JSON)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _harmonize(fed: Federation, plan: dict) -> dict:
    reference, summaries = run_federated_combat(fed, plan["request"], output=plan.get("output", "harmonized"))
    return {"reference": reference.to_dict(), "sites": summaries}


def _study(fed: Federation, plan: dict) -> dict:
    from fedrad.server.study import Study

    return Study(fed, plan["config"]).run()


TASKS = {"harmonize": _harmonize, "study": _study}


def run_plan(fed: Federation, plan_path: str, out_dir: str) -> dict:
    plan = json.loads(Path(plan_path).read_text())
    task = plan.get("task")
    if task not in TASKS:
        raise ValueError(f"plan {plan_path}: unknown task {task!r}; known: {', '.join(TASKS)}")
    t0 = time.monotonic()
    result = TASKS[task](fed, plan)
    result.update({"task": task, "round_trips": fed.rounds, "seconds": round(time.monotonic() - t0, 3)})
    write_json_atomic(result, Path(out_dir) / "results.json")
    return result
