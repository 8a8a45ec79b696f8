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


#: the [columns] key that allows each role a plan may give a column
_ROLE_KEY = {"outcome": "outcome", "clinical": "clinical", "covariates": "clinical", "categorical": "categorical",
             "features": "features", "volume": "features"}


def plan_variables(plan: dict) -> list[tuple[str, str]]:
    """Every column a plan names, as ``(role, name)``: outcome (or markers), clinical, covariates (ComBat covariates,
    smooth terms, batch columns), categorical, features (harmonize and fit plans) and the declared volume column.
    Subgroups are the clinical and categorical columns."""
    out = [(role, name) for role, names in plan_columns(plan).items() for name in names]
    if plan.get("task") == "study" and plan["study"]["model"].get("volume"):
        out.append(("volume", plan["study"]["model"]["volume"]))
    return out


def _strings(obj, where: str = ""):
    """Every (place, string) of a plan: its keys and its string values."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{where}.{k}" if where else str(k), str(k)
            yield from _strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v, where)
    elif isinstance(obj, str):
        yield where, obj


def check_plan_columns(plan: dict, allowed: dict | None, warnings: list[str] | None = None) -> dict[str, list[str]]:
    """The plan's named columns, checked against the site's ``[columns]`` allow-list (None: not set).

    Refused (:class:`ApprovalError`, one line naming the column escaped): a string anywhere in the plan with a
    control or bidirectional-formatting character; a column that identifies a patient or a file; an identifier-like
    or non-ASCII column the allow-list does not name exactly under its role's key; with an allow-list, any column
    outside it (harmonize and fit plans' features: outside its ``features`` patterns, by default fedrad's pyradiomics
    names). An identifier-like column the allow-list names is approved with a warning appended to ``warnings``."""
    from fedrad.common.names import identifier_like, quoted, unsafe_character, unsafe_reason
    from fedrad.common.plan import PYRADIOMICS_PATTERNS, _matches

    for where, text in _strings(plan):
        if unsafe_character(text) is not None:
            raise ApprovalError(f"the plan's {quoted(where)} = {quoted(text)} {unsafe_reason(text)}; refused: ask "
                                "the coordinator to rename it")
    cols = plan_columns(plan)
    variables = plan_variables(plan)
    ident = sorted({name for role, name in variables if role != "features" and name in IDENTIFYING_COLUMNS})
    if ident:
        raise ApprovalError(f"the plan uses identifying column(s) {', '.join(map(quoted, ident))} as variables; "
                            "never approved")
    listed = allowed or {}
    for role, name in variables:
        key = _ROLE_KEY[role]
        exact = name in listed.get(key, [])
        reason = unsafe_reason(name)
        if reason is not None and not exact:
            raise ApprovalError(f"column {quoted(name)} ({role}) {reason}; refused unless site.toml [columns] {key} "
                                "names it exactly")
        if identifier_like(name) or name in IDENTIFYING_COLUMNS:
            if not exact:
                raise ApprovalError(f"the plan uses identifier-like column {quoted(name)} as {role}; refused: it may "
                                    f"identify or date a patient (list it in site.toml [columns] {key} to allow it)")
            if warnings is not None:
                warnings.append(f"identifier-like column {quoted(name)} is used as {role}, approved only because "
                                f"site.toml [columns] {key} lists it: its values enter the site's aggregates")
    if allowed is not None:
        problems = []
        for role, key in (("outcome", "outcome"), ("clinical", "clinical"), ("covariates", "clinical"),
                          ("categorical", "categorical")):
            extra = [c for c in cols.get(role, []) if c not in set(allowed.get(key, []))]
            if extra:
                problems.append(f"{role} {', '.join(map(quoted, extra))} (not in [columns] {key})")
        patterns = list(allowed.get("features", PYRADIOMICS_PATTERNS))
        extra = [c for c in cols.get("features", []) if not _matches(c, patterns)]
        if extra:
            problems.append(f"features {', '.join(map(quoted, extra[:5]))}{' ...' if len(extra) > 5 else ''} "
                            "(not matching [columns] features" + ("" if "features" in allowed else
                                                                  ", by default fedrad's pyradiomics names") + ")")
        vol = plan["study"]["model"].get("volume") if plan.get("task") == "study" else None
        if vol and "features" in allowed and not _matches(vol, patterns):
            problems.append(f"volume {quoted(vol)} (not matching [columns] features)")
        if problems:
            raise ApprovalError("the plan uses columns this site does not allow: " + "; ".join(problems)
                                + "; add them to site.toml [columns] or ask the coordinator to change the plan")
    return cols


class Review:
    """What ``fedrad site approve`` checked: the plan's columns, the site's candidate features from its own table
    (None without a table here, with ``note`` saying why) and the warnings to show."""

    def __init__(self, columns: dict, candidates: list[str] | None, warnings: list[str], note: str = "",
                 table: str = "", n_table_columns: int = 0, volume: str | None = None, allowed: dict | None = None):
        self.columns, self.candidates, self.warnings, self.note = columns, candidates, warnings, note
        self.table, self.n_table_columns, self.volume, self.allowed = table, n_table_columns, volume, allowed


def review_plan(plan: dict, allowed: dict | None, rows=None, *, table: str = "", note: str = "") -> Review:
    """:func:`check_plan_columns`, then with the site's own table ``rows`` (a study plan): its candidate features,
    a refusal when a column the plan could use has a control character in its name, and warnings on identifier-like
    values (yyyymmdd dates, near-unique integers) among the plan's columns and the candidates."""
    from fedrad.common.names import quoted, unsafe_character, unsafe_reason, value_flags

    warnings: list[str] = []
    cols = check_plan_columns(plan, allowed, warnings)
    if plan.get("task") != "study" or rows is None:
        return Review(cols, None, warnings, note or ("" if plan.get("task") == "study" else "the plan names its "
                                                     "features"), table, allowed=allowed)
    import numpy as np
    import pandas as pd

    from fedrad.common.plan import feature_screen, named_columns, site_volume

    study = plan["study"]
    named = named_columns(study)
    numeric = [c for c, dtype in zip(rows.columns, rows.dtypes)
               if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)]
    for c in [c for c in rows.columns if c in named] + [c for c in numeric if c not in named]:
        if unsafe_character(c) is not None:
            raise ApprovalError(f"the site's table column {quoted(c)} {unsafe_reason(c)}; refused: rename it in the "
                                "site's table")
    screen = feature_screen(rows, study, allowed)
    for c in numeric:
        if c not in named and unsafe_reason(c) is not None and c not in screen["candidates"]:
            warnings.append(f"table column {quoted(c)} is not a candidate feature: it {unsafe_reason(c)} (name it "
                            "exactly in site.toml [columns] features to use it)")
    for c in screen["dates"]:
        warnings.append(f"table column {quoted(c)} holds yyyymmdd dates only: left out of the candidate features")
    from fedrad.common.plan import PYRADIOMICS_PATTERNS, _matches

    for c in screen["near_unique"]:
        if _matches(c, PYRADIOMICS_PATTERNS):  # a pyradiomics measurement (TotalEnergy, VoxelVolume on 1 mm voxels)
            continue
        warnings.append(f"candidate feature {quoted(c)} holds near-unique integers (a record number?): it stays a "
                        "candidate; exclude it ([selection] exclude, or site.toml [columns] features) if it "
                        "identifies patients")
    used = [c for c in numeric if c in named]
    if used:
        pos = [list(rows.columns).index(c) for c in used]
        dates, near = value_flags(rows.iloc[:, pos].to_numpy(dtype=float, na_value=np.nan))
        for c, d, u in zip(used, dates, near):
            if d:
                warnings.append(f"plan column {quoted(c)} holds yyyymmdd dates at this site: it may date a patient")
            elif u:
                warnings.append(f"plan column {quoted(c)} holds near-unique integers at this site (a record "
                                "number?)")
    return Review(cols, screen["candidates"], warnings, note, table, len(rows.columns),
                  site_volume(rows, study, allowed), allowed)


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


#: name tokens of a batch column that describes image acquisition (anything else may be a clinical variable)
_ACQUISITION = frozenset({"scanner", "manufacturer", "vendor", "model", "kernel", "protocol", "device", "machine",
                          "station", "site", "center", "centre", "hospital", "institution", "kvp", "kv", "slice",
                          "thickness", "field", "strength", "tesla", "sequence", "coil", "recon", "reconstruction",
                          "batch", "acquisition", "modality", "filter", "convolution", "contrast", "spacing", "pixel",
                          "voxel", "resolution", "software", "version", "series", "make"})
#: above this many features per model the screen flags max_features
MANY_FEATURES = 20
#: smooth-term knots closer than this (units of the covariate) are flagged
CLOSE_KNOTS = 3.0
#: candidate features listed one by one up to this many (above: counted by name prefix)
LIST_NAMES = 60
RISK = "! "


def _names(names) -> str:
    from fedrad.common.names import shown

    return ", ".join(shown(n) for n in names) if names else "none"


def _wrapped(head: str, names, limit: int = LIST_NAMES, width: int = 110) -> list[str]:
    """``head`` then the names, wrapped; more than ``limit`` names are counted by prefix (``original_glcm_*``)
    with the first and last few listed."""
    import textwrap

    from fedrad.common.names import shown

    names = [shown(n) for n in names]
    if len(names) <= limit:
        body = ", ".join(names) or "none"
    else:
        groups: dict[str, int] = {}
        for n in names:
            parts = n.split("_")
            key = "_".join(parts[:2]) + "_*" if len(parts) > 2 else "other"
            groups[key] = groups.get(key, 0) + 1
        body = ("by prefix: " + ", ".join(f"{k} {v}" for k, v in groups.items()) + "; first: "
                + ", ".join(names[:5]) + "; last: " + ", ".join(names[-3:]) + " (every name: --list-features)")
    lines = textwrap.wrap(f"{head}{body}", width=width, subsequent_indent="    ", break_on_hyphens=False)
    return lines or [head]


def _knot_gap(spec) -> float:
    """The smallest distance between neighbouring knots of a smooth term (auto knots: the range over the pieces)."""
    if isinstance(spec, dict):
        return (float(spec["range"][1]) - float(spec["range"][0])) / (int(spec["knots"]) + 1)
    values = [float(v) for v in spec]
    return min(b - a for a, b in zip(values, values[1:]))


def describe_plan(plan: dict, columns: dict, review: Review | None = None, *, site: str = "",
                  list_features: bool = False) -> list[str]:
    """Lines an operator reads before approving: task, sites, columns by role, the site's candidate features from
    its own table (``review``), every harmonization, selection, model and validation option, and the request
    budgets. Options whose statistics say more about the patients than usual are flagged ``! `` with what leaves
    the site. Every name is printed escaped (:func:`fedrad.common.names.shown`)."""
    from fedrad.client.guard import MAX_ATTEMPTS, MAX_TASK_ROUNDS
    from fedrad.common.names import name_tokens, quoted, shown

    lines = [f"task: {plan['task']} (protocol {plan['protocol']})"]
    if plan["task"] == "study":
        s = plan["study"]
        lines.append(f"study: {quoted(s['study'].get('name', ''))}, kind {s['study'].get('kind', 'prediction')}, "
                     f"quorum {s['study'].get('min_sites')} sites")
        sites = s.get("sites") or {}
        if sites:
            lines += _wrapped("sites in the plan: ", [f"{n} (source {v['source']})" if v.get("source") else n
                                                      for n, v in sites.items()])
            if site and site not in sites:
                lines.append(f"{RISK}this site ({shown(site)}) is not among the plan's sites")
        else:
            lines.append("sites in the plan: not listed (any site that joins)")
    for role, names in columns.items():
        if names and role != "features":
            lines.append(f"{role} columns: {_names(names)}")
    if plan["task"] == "study":
        lines += _describe_study(plan["study"], review, list_features)
        lines.append(f"budget: at most {MAX_ATTEMPTS} study attempts under this approval (each runs prepare to "
                     f"evaluation; approving again resets the count) and at most {MAX_TASK_ROUNDS} model "
                     "evaluations (coefficient vectors the site computes sums for) per fit task")
    elif plan["task"] == "fit":
        lines += _wrapped(f"features ({len(plan['data']['features'])}): ", plan["data"]["features"],
                          limit=10 ** 6 if list_features else LIST_NAMES)
        lines.append(f"model: {plan['data'].get('model')}; up to {plan['rounds']} evaluation rounds (Newton steps; "
                     f"each sends the site's gradient and Hessian sums at the coordinator's coefficients)"
                     + (f"; {plan['fedavg_rounds']} FedAvg rounds (the site's locally trained coefficients)"
                        if plan.get("fedavg_rounds") else "")
                     + ("; sums masked by secure aggregation" if plan.get("secure") else ""))
    else:
        req = plan["request"]
        lines += _wrapped(f"features ({len(req['features'])}): ", req["features"],
                          limit=10 ** 6 if list_features else LIST_NAMES)
        lines.append(f"ComBat: per batch, each feature's sums, sums of squares and covariate cross-products leave; "
                     f"output table {quoted(plan['output'])} stays at the site")
        if req.get("covbat"):
            f = len(req["features"])
            lines.append(f"{RISK}CovBat: per batch, the F x F cross-products of the ComBat residuals leave "
                         f"({f * (f + 1) // 2} numbers for F = {f}: the features' covariance in each batch)")
        batch = req.get("batch_col")
        if batch and not set(name_tokens(batch)) & _ACQUISITION:
            lines.append(f"{RISK}batch column {quoted(batch)} does not look like an acquisition column: per-batch "
                         "statistics of every feature leave, one set per value of it")
    return _wrap_all(lines)


def _wrap_all(lines: list[str], width: int = 110) -> list[str]:
    """Every line at most ``width`` characters, continuation lines indented under their first."""
    import textwrap

    out = []
    for line in lines:
        lead = " " * (len(line) - len(line.lstrip(" ")))
        out += textwrap.wrap(line, width=width, subsequent_indent=lead + "    ", break_on_hyphens=False,
                             break_long_words=False) or [line]
    return out


def _describe_study(s: dict, review: Review | None, list_features: bool) -> list[str]:
    from fedrad.common.names import name_tokens, quoted, shown
    from fedrad.common.pipeline import CANDIDATES_PER_FEATURE
    from fedrad.common.plan import (MAX_SUBGROUP_LEVELS, batch_columns, dca_horizon,
                                    feature_rule, harmonization_method, is_association, path_shape,
                                    subgroup_columns, uses_loso)

    v, m, sel, harm = s["validation"], s["model"], s["selection"], s["harmonization"]
    lines = []
    rule = feature_rule(s)
    text = ("numeric columns of the site's table not named above, not identifier-like, except "
            + _names(rule["exclude"]))
    if rule["columns"]:
        text += "; only " + _names(rule["columns"])
    if rule["prefixes"]:
        text += "; starting with " + _names(rule["prefixes"])
    lines += _wrapped("feature rule: ", [text])
    if review is not None and review.allowed is not None:
        from fedrad.common.plan import PYRADIOMICS_PATTERNS

        pats = review.allowed.get("features")
        lines += _wrapped("site allow-list ([columns] features): ", [_names(pats) if pats is not None else
                          "not set: fedrad's pyradiomics names " + ", ".join(PYRADIOMICS_PATTERNS)
                          + " and the plan's volume column"])
    if review is not None and review.candidates is not None:
        head = (f"candidate features at this site: {len(review.candidates)} of the {review.n_table_columns} "
                f"columns of {shown(review.table) or 'its table'}: ")
        lines += _wrapped(head, review.candidates, limit=10 ** 6 if list_features else LIST_NAMES)
    else:
        lines.append("candidate features at this site: not listed (" + (review.note if review and review.note else
                     "no site table here: pass --config with the site's site.toml") + ")")
    if review is not None and review.volume:
        lines.append(f"volume column: {quoted(review.volume)} (the volume baseline model)")
    elif m.get("volume"):
        lines.append(f"volume column: {quoted(m['volume'])} (the volume baseline model)")
    if harm.get("enabled", True):
        lines += _wrapped("harmonization: ", [harmonization_method(harm)])
        eb = ("mean only (no variance adjustment)" if harm.get("mean_only") else
              "parametric empirical Bayes" if harm.get("parametric") else "non-parametric empirical Bayes")
        lines.append(f"  ComBat {eb}; covariates preserved: {_names(harm['covariates'])} (categorical "
                     f"{_names(harm['categorical'])}); per batch, each feature's sums, sums of squares and "
                     "covariate cross-products leave (batches under k patients are merged)")
        cols = batch_columns(harm)
        if cols:
            lines.append(f"  batch columns: {_names(cols)} ("
                         + ("labels shared across sites" if harm.get("shared_batches") else "each site's own labels")
                         + ")")
            for col in cols:
                if not set(name_tokens(col)) & _ACQUISITION:
                    lines.append(f"  {RISK}batch column {quoted(col)} does not look like an acquisition column "
                                 "(scanner, kernel, protocol ...): the per-batch statistics then describe the "
                                 f"patients of each value of {quoted(col)}, and ComBat removes its effect from every "
                                 "feature")
        else:
            lines.append("  batch columns: none (each site is one batch)")
        if harm.get("covbat"):
            n_pc, share = harm.get("covbat_n_pc", 0), harm.get("covbat_percent_var", 0.95)
            lines.append(f"  {RISK}CovBat (" + (f"first {n_pc} PCs" if n_pc else f"PCs explaining {share:.0%}")
                         + "): per batch, the F x F cross-products of the ComBat residuals leave (F(F+1)/2 numbers "
                         "for F features: the features' covariance within each batch)")
        for name, spec in (harm.get("smooth") or {}).items():
            gap = _knot_gap(spec)
            knots = (f"{spec['knots']} knots from the sites' histograms over {spec['range'][0]:g}-"
                     f"{spec['range'][1]:g} (the site sends its counts in 32 bins, merged to >= k)"
                     if isinstance(spec, dict) else "knots " + ", ".join(f"{k:g}" for k in spec))
            flag = (f"; {RISK}knots {gap:g} apart: a spline piece that narrow describes few patients' values of "
                    f"{quoted(name)}" if gap < CLOSE_KNOTS else "")
            lines.append(f"  smooth term {quoted(name)}: cubic B-spline, {knots}{flag}")
        if harm.get("smooth"):
            alphas = harm.get("smooth_alphas")
            lines.append("  smooth penalties: " + ("41 values 1 ... 1e7" if alphas is None else
                                                   ", ".join(f"{a:g}" for a in alphas)) + " (GCV per feature)")
        lines.append("  references: the coordinator sends each validation fold's ComBat fit (pooled from its training "
                     "sites); the site applies it to its own rows, which stay here")
    else:
        lines.append("harmonization: none")
    if sel.get("max_missing") is not None:
        lines.append(f"missing values: features missing in more than {sel['max_missing']:.0%} of a site's patients "
                     "are dropped; the rest imputed per validation fold with the training sites' mean (a site "
                     "imputes fewer than k missing cells of a feature with its own mean); each feature's observed "
                     "count and mean leave")
    n_cand = CANDIDATES_PER_FEATURE * int(sel["max_features"])
    lines.append(f"selection: score tests of every candidate (one statistic per feature), Benjamini-Hochberg fdr "
                 f"{sel['fdr']:g}, redundancy |r| > {sel['redundancy']:g}, max_features {sel['max_features']} "
                 f"(correlations among at most {n_cand} candidates)"
                 + (f", ICC(1,1) >= {sel['icc_threshold']:g} from the site's perturbed table (per-feature variance "
                    "components leave)" if sel.get("icc_threshold") is not None else ", no ICC filter"))
    if int(sel["max_features"]) > MANY_FEATURES:
        lines.append(f"  {RISK}max_features = {sel['max_features']}: models of up to {sel['max_features']} "
                     f"coefficients, and correlation matrices among up to {n_cand} features leave the site")
    if float(sel["fdr"]) >= 1.0:
        lines.append(f"  {RISK}fdr = {sel['fdr']:g}: no screening; every candidate goes on to the correlation step")
    if float(sel["redundancy"]) >= 1.0:
        lines.append(f"  {RISK}redundancy = {sel['redundancy']:g}: no correlation filter; nearly identical features "
                     "may enter one model together")
    if is_association(s):
        a = s["association"]
        lines.append(f"association: markers {_names(a['markers'])}, volume-adjusted "
                     f"{'yes' if a['volume_adjusted'] else 'no'}, fdr {a['fdr']:g}, top {a['top']}; discovery "
                     f"{_names(a['discovery']) if a['discovery'] else 'all'}, replication {_names(a['replication'])}; "
                     "per feature and marker, the site's regression sums leave")
    else:
        if m.get("grid") is not None:
            lines.append(f"models: {m['type']} ({m['penalty']}, l1_ratio {m.get('l1_ratio', 0.5):g}), penalty grid "
                         f"{m['grid']}; clinical {_names(m['clinical'])}")
        else:
            size, decades = path_shape(s)
            lines.append(f"models: {m['type']} ({m['penalty']}, l1_ratio {m.get('l1_ratio', 0.5):g}), penalty path of "
                         f"{size} values over {decades:g} decades from the training sites' gradient at zero (one "
                         "path per fold and model; the site pins its first value); clinical "
                         f"{_names(m['clinical'])}")
    lines.append(f"validation: leave-one-site-out {'yes' if uses_loso(s) else 'no'}; inner folds {v['inner_folds']} "
                 f"(seed {v['seed']}; a fold is used only when its training and left-out rows both reach the "
                 "site's minimum cell size)")
    subgroups = subgroup_columns(s)
    lines.append(f"  subgroups: {_names(subgroups)} (metrics per level, for columns of at most "
                 f"{MAX_SUBGROUP_LEVELS} levels at a site, levels of >= k patients)" if subgroups else
                 "  subgroups: none")
    if s.get("endpoint", {}).get("type") == "survival":
        lines.append(f"  Kaplan-Meier counts at times {', '.join(f'{t:g}' for t in v['km_times'])} (at-risk and "
                     "event counts per time)")
    horizon = dca_horizon(s)
    if horizon is not None:
        lines.append(f"  decision curves at horizon {horizon:g}: the site's counts of events by then per risk "
                     "threshold, and its Breslow baseline, leave")
    return lines


def valid_name(name, what: str) -> str:
    """A table / fold / source / output name from a request: ``[A-Za-z0-9_-]`` only (never a path)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ApprovalError(f"{what} name is not of the form [A-Za-z0-9_-]+")
    return name
