"""Plans a site's operator approved (``fedrad site approve PLAN``), kept in the site's work directory.

``<workdir>/plans/<plan id>.json`` holds the whole plan as the operator approved it, the columns it may use at
this site and when it was approved (files 0600). The site answers a request only when its plan id names such a
file (and, when the site's configuration pins ``approved-plans``, is listed there); every parameter the site
checks comes from this copy. Approving again resets the plan's request ledger (:mod:`fedrad.client.guard`), which
is how an operator lets a finished study run once more.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from fedrad.common.files import atomic_write_bytes
from fedrad.common.plan import IDENTIFYING_COLUMNS, NAME, PROTOCOL, PlanError, plan_columns, plan_id


class ApprovalError(PermissionError):
    """A plan cannot be approved, or a request's plan is not approved (message names the plan and why)."""


def _plans_dir(workdir: Path) -> Path:
    return Path(workdir) / "plans"


def check_plan_columns(plan: dict, allowed: dict | None) -> dict[str, list[str]]:
    """The plan's named columns, checked against the site's ``[columns]`` allow-list (None: not set)."""
    cols = plan_columns(plan)
    used = {c for role, names in cols.items() if role != "features" for c in names}
    ident = sorted(used & IDENTIFYING_COLUMNS)
    if ident:
        raise ApprovalError(f"the plan uses identifying column(s) {', '.join(ident)} as variables; never approved")
    if allowed is not None:
        problems = []
        for role, key in (("outcome", "outcome"), ("clinical", "clinical"), ("covariates", "clinical"),
                          ("categorical", "categorical")):
            extra = [c for c in cols.get(role, []) if c not in set(allowed.get(key, []))]
            if extra:
                problems.append(f"{role} {', '.join(extra)} (not in [columns] {key})")
        if problems:
            raise ApprovalError("the plan uses columns this site does not allow: " + "; ".join(problems))
    return cols


def approve_plan(workdir: Path, plan: dict, *, allowed_columns: dict | None = None) -> str:
    """Store ``plan`` as approved at the site; returns its id. Raises :class:`ApprovalError` when it uses columns
    outside the site's allow-list or identifying columns."""
    if not isinstance(plan, dict) or plan.get("protocol") != PROTOCOL:
        raise ApprovalError(f"not a fedrad plan of protocol {PROTOCOL} (protocol={plan.get('protocol')!r})"
                            if isinstance(plan, dict) else "not a fedrad plan")
    if plan.get("task") not in ("study", "harmonize", "fit"):
        raise ApprovalError(f"unknown plan task {plan.get('task')!r}")
    try:
        cols = check_plan_columns(plan, allowed_columns)
    except PlanError as exc:
        raise ApprovalError(str(exc)) from None
    pid = plan_id(plan)
    record = {"plan_id": pid, "plan": plan, "columns": cols,
              "approved_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    d = _plans_dir(workdir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{pid}.json"
    atomic_write_bytes(path, json.dumps(record, indent=1, sort_keys=True).encode())
    os.chmod(path, 0o600)
    ledger = Path(workdir) / "ledger" / f"{pid}.json"
    if ledger.exists():
        ledger.unlink()
    return pid


def load_approved(workdir: Path, pid, pinned: frozenset[str] | None = None) -> dict:
    """The approved record of plan ``pid`` (raises :class:`ApprovalError` when absent, not pinned or altered)."""
    if not isinstance(pid, str) or not pid:
        raise ApprovalError("the request names no study plan; the site answers only requests of plans its "
                            "operator approved (fedrad site approve PLAN)")
    if len(pid) != 64 or any(c not in "0123456789abcdef" for c in pid):
        raise ApprovalError("the request's plan id is malformed")
    if pinned is not None and pid not in pinned:
        raise ApprovalError(f"plan {pid[:12]} is not in the site's approved-plans")
    path = _plans_dir(workdir) / f"{pid}.json"
    if not path.is_file():
        raise ApprovalError(f"plan {pid[:12]} is not approved at this site (fedrad site approve PLAN)")
    record = json.loads(path.read_text())
    if plan_id(record["plan"]) != pid:
        raise ApprovalError(f"the stored copy of plan {pid[:12]} does not match its id; approve it again")
    return record


def read_plan_file(path: Path) -> dict:
    """A plan from a file: a plan JSON (``{"protocol": ...}``), a coordinator plan file (``{"task": "study",
    "config": ...}``) or a ``study.toml``."""
    path = Path(path)
    if not path.is_file():
        raise ApprovalError(f"plan file {path} not found")
    if path.suffix.lower() == ".toml":
        from fedrad.common.plan import study_plan
        from fedrad.server.study_config import StudyConfigError, load_study

        try:
            return study_plan(load_study(path))
        except StudyConfigError as exc:
            raise ApprovalError(str(exc)) from None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApprovalError(f"{path} is neither study.toml nor plan JSON: {exc}") from None
    if isinstance(doc, dict):
        from fedrad.common.plan import plan_of_document

        try:
            return plan_of_document(doc)
        except (PlanError, KeyError):
            pass
    raise ApprovalError(f"{path} is not a fedrad plan")


def describe_plan(plan: dict, columns: dict) -> list[str]:
    """Lines an operator reads before approving: task, columns by role, folds, grid and request budget."""
    lines = [f"task: {plan['task']} (protocol {plan['protocol']})"]
    for role, names in columns.items():
        if names and role != "features":
            lines.append(f"{role} columns: {', '.join(names)}")
    if plan["task"] == "study":
        s = plan["study"]
        v, m = s["validation"], s["model"]
        from fedrad.common.plan import feature_rule

        rule = feature_rule(s)
        text = "every numeric column not named above, except " + ", ".join(rule["exclude"])
        if rule["columns"]:
            text += "; only " + ", ".join(rule["columns"])
        if rule["prefixes"]:
            text += "; starting with " + ", ".join(rule["prefixes"])
        lines.append(f"features: {text}")
        if s["selection"].get("max_missing") is not None:
            lines.append(f"missing values: features missing in more than {s['selection']['max_missing']:.0%} of a "
                         "site's patients are dropped; the rest imputed per validation fold with the training "
                         "sites' mean (a site imputes fewer than k missing cells of a feature with its own mean)")
        lines.append(f"validation: leave-one-site-out {'yes' if v['loso'] else 'no'}; inner folds {v['inner_folds']} "
                     f"(seed {v['seed']}; a fold is used only when its training and left-out rows both reach the "
                     "site's minimum cell size)")
        if m.get("grid") is not None:
            lines.append(f"models: {m['type']} ({m['penalty']}), penalty grid {m['grid']}")
        else:
            from fedrad.common.plan import path_shape
            size, decades = path_shape(s)
            lines.append(f"models: {m['type']} ({m['penalty']}), penalty path of {size} values "
                         f"over {decades:g} decades from the training sites' gradient at zero "
                         "(one path per fold and model; the site pins its first value)")
    elif plan["task"] == "fit":
        lines.append(f"features: {', '.join(plan['data']['features'])}; up to {plan['rounds']} rounds")
    else:
        lines.append(f"features: {len(plan['request']['features'])}; output table {plan['output']!r}")
    return lines


def valid_name(name, what: str) -> str:
    """A table / fold / source / output name from a request: ``[A-Za-z0-9_-]`` only (never a path)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ApprovalError(f"{what} name is not of the form [A-Za-z0-9_-]+")
    return name
