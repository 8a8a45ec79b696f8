"""The site checks every request against the plan its operator approved (issue 11: the site trusts no parameter).

:func:`check_request` runs before any site step. It loads the approved copy of the request's plan
(:mod:`fedrad.client.approval`) and, per request kind, either *derives* the parameters from that copy (so the
request's own values are ignored) or *checks* them against it, refusing with a :class:`PlanViolation`:

=================  ================================================================================================
request            what the site derives or checks
=================  ================================================================================================
study_prepare      everything derived from the plan (endpoint, columns, feature prefixes, cohort columns); the data
                   source is the site's own (``[sources.<alias>]`` named by the plan, else its default table)
combat_stats       table ``raw``; covariates, categorical covariates and options equal the plan's; features are
                   the site's own candidate features; every categorical level has >= k patients (ComBat step);
                   imputation values (missing cells) per plan fold, for candidate features only, finite; the
                   site fills fewer than k missing cells of a feature with its own mean (fedrad.common.missing);
                   the plan's ComBat options (batch column, shared batches, CovBat, smooth knots); nested ComBat:
                   the pass index of the plan, each fold's earlier passes checked as study_harmonize's references
study_harmonize    folds are ``final`` / ``loso:<site>`` of the plan; selection requests as study_select; every
                   reference (nested: every pass of its chain) is a fit of the plan's ComBat
                   (:func:`check_reference`: covariates, categorical columns, knots, batch column, options,
                   candidate features, finite positive variances)
study_select       tables ``h-<fold>`` (or ``raw``); score tests on the plan's outcome, features among the site's
                   candidates; ICC only when the plan filters by ICC; correlation requests of at most
                   5 x max_features candidates; never for the site's own held-out fold
fit_round          task ids ``<fold>|<kind>|<penalty index>|<all or inner fold>`` of the plan; model, outcome,
                   features of each kind, table and rows (inner folds from the plan's k and seed) as the plan
                   implies; one signature per fold; at most ``MAX_TASK_ROUNDS`` evaluations per task (2 for a
                   linear fit: its statistics and the check at the exact solution); every
                   coefficient vector sent is recorded in the plan's ledger; a survival plan's
                   ``dca_horizon`` goes into every full-fold Cox task (the site's Breslow baseline)
study_associate    association plans only; once per study attempt; the final fold's table; features among the
                   site's candidates (and volume column); markers, covariates and volume adjustment from the plan
study_evaluate     once per study attempt; only the folds the site validates (``final`` and its own ``loso``);
                   every model (and every inner-CV model) must be one whose fit the site took part in: its task id
                   is in the ledger, its features are the task's, its penalty is the plan's grid value and its
                   coefficients are within ``STEP_TOL`` (standardized) of a coefficient vector the site was sent
                   for that task (a Newton fit ends one step below 1e-3 after the last point it evaluated);
                   km_times, endpoint, subgroup columns and the decision curves' horizon from the plan;
                   a baseline per model variant, finite and positive (survival decision curves)
=================  ================================================================================================

Harmonize and fit plans (``fedrad harmonize/fit --federated``) fix the request, the features and outcome, the
output name and the number of rounds in the same way. The ledger (``<workdir>/ledger/<plan id>.json``) is
reset by each ``study_prepare`` (a study attempt; the study restarts from prepare when a site drops out), at
most ``MAX_ATTEMPTS`` times per approval.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from fedrad.client.approval import ApprovalError, load_approved
from fedrad.common import endpoints
from fedrad.common.files import atomic_write_bytes
from fedrad.common.pipeline import CANDIDATES_PER_FEATURE
from fedrad.common.plan import (FOLD, candidate_features, dca_horizon, endpoint, fixed_grid, is_association, outcome_columns,
                                path_step, penalty_count, prepare_spec, subgroup_columns, uses_loso,
                                site_volume)

MAX_ATTEMPTS = 8          # study attempts (prepare phases) per approval
MAX_TASK_ROUNDS = 64      # evaluations (stats round + Newton points) per fit task
MAX_FOLDS_UNLISTED = 65   # validation folds when the plan does not list its sites
STEP_TOL = 2e-3           # standardized distance between an evaluated model and a point the site was sent


class PlanViolation(PermissionError):
    """A request does not belong to, or goes beyond, the site's approved plan."""


# --- ledger ------------------------------------------------------------------------------------------------------
class Ledger:
    def __init__(self, workdir: Path, pid: str):
        self.path = Path(workdir) / "ledger" / f"{pid}.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {
            "attempts": 0, "tasks": {}, "signatures": {}, "evaluated": False, "folds": []}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self.path, json.dumps(self.data).encode())
        os.chmod(self.path, 0o600)

    def new_attempt(self) -> None:
        if self.data["attempts"] >= MAX_ATTEMPTS:
            raise PlanViolation(f"the plan has run {MAX_ATTEMPTS} times under this approval; the operator must "
                                "approve it again")
        self.data = {"attempts": self.data["attempts"] + 1, "tasks": {}, "signatures": {}, "evaluated": False,
                     "folds": []}


# --- helpers ------------------------------------------------------------------------------------------------------
def _require(cond: bool, what: str) -> None:
    if not cond:
        raise PlanViolation(what)


def plan_folds(study: dict) -> list[str] | None:
    """The plan's validation folds when it lists its sites, else None (checked by pattern and count)."""
    sites = sorted(study.get("sites") or {})
    if not sites:
        return None
    return ["final"] + ([f"loso:{s}" for s in sites] if uses_loso(study) else [])


def check_fold(study: dict, fold, ledger: Ledger | None = None) -> str:
    _require(isinstance(fold, str) and bool(FOLD.match(fold)), "a validation fold outside the plan")
    listed = plan_folds(study)
    if listed is not None:
        _require(fold in listed, "a validation fold outside the plan")
    else:
        _require(fold == "final" or uses_loso(study), "a validation fold outside the plan")
        if ledger is not None and fold not in ledger.data["folds"]:
            _require(len(ledger.data["folds"]) < MAX_FOLDS_UNLISTED, "more validation folds than the plan allows")
            ledger.data["folds"].append(fold)
    return fold


def fold_table(study: dict, fold: str) -> str:
    return f"h-{fold}" if study["harmonization"]["enabled"] else "raw"


def check_table(study: dict, fold: str, table) -> None:
    # without harmonization a fold's table is the raw table, or the fold's imputed table (missing values)
    _require(table == fold_table(study, fold) or table == f"h-{fold}", "a table outside the plan")


def _impute_values(site, study, impute, ledger, cache, *, trains_only: bool) -> dict:
    """Per fold, the imputation value of each feature: folds of the plan, features among the site's candidates
    (and its volume column), finite numbers. ``trains_only``: drop the site's own held-out fold (it sends no
    training statistics for it). The site's own rule (fewer than k missing cells: its own mean) applies later."""
    if not impute:
        return {}
    _require(isinstance(impute, dict), "imputation values outside the plan")
    allowed = list(_site_candidates(site, study, cache)) + ([cache["volume"]] if cache.get("volume") else [])
    out = {}
    for fold, values in impute.items():
        check_fold(study, fold, ledger)
        _require(isinstance(values, dict), "imputation values outside the plan")
        _subset(list(values), allowed, "imputed features")
        _require(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                     for v in values.values()), "imputation values outside the plan")
        if trains_only and fold == f"loso:{site.name}":
            continue
        out[fold] = {str(f): float(v) for f, v in values.items()}
    return out


def penalty_grid(study: dict) -> list[float] | None:
    """The plan's fixed penalty grid in the coordinator's task order (strongest first), None with the path."""
    return fixed_grid(study)


def check_penalty(study: dict, ledger, fold: str, kind: str, gi: int, value) -> None:
    """A model's penalty must be the plan's: the fixed grid's value, or on the plan's path. The path's first
    value comes from the training sites' gradient at zero, which no site can check alone; the site pins it per
    (fold, model) at the first model it sees, so every value is ``first * path_step ** index`` and a coordinator
    gets at most ``path_size`` penalties per fold and model (as many as a fixed grid of that size)."""
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
             and float(value) > 0, "a model whose penalty is not the plan's")
    value = float(value)
    grid = fixed_grid(study)
    if grid is not None:
        _require(abs(value - grid[gi]) <= 1e-12 * max(1.0, abs(value)), "a model whose penalty is not the plan's")
        return
    first = value / path_step(study) ** gi
    pinned = ledger.data.setdefault("paths", {}).setdefault(f"{fold}|{kind}", first)
    _require(abs(first - pinned) <= 1e-9 * pinned, "a model whose penalty is off its path")


def _subset(names, allowed, what: str, max_len: int | None = None) -> list[str]:
    _require(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names), f"{what}: not a list")
    _require(len(set(names)) == len(names), f"{what}: repeated names")
    _require(set(names) <= (allowed if isinstance(allowed, (set, frozenset)) else set(allowed)),
             f"{what}: columns outside the plan")
    if max_len is not None:
        _require(len(names) <= max_len, f"{what}: more columns than the plan allows")
    return list(names)


# --- request kinds: study plan ------------------------------------------------------------------------------------
def _study_prepare(site, record, payload, ledger):
    ledger.new_attempt()
    study = record["plan"]["study"]
    alias = (study.get("sites") or {}).get(site.name, {}).get("source")
    return {**prepare_spec(study), "source": alias, "robustness_needed": study["selection"]["icc_threshold"] is not None}


#: (raw table version, plan's study, [columns]) -> (candidate features, volume column), per process
_CANDIDATES: dict = {}


def _site_candidates(site, study, cache: dict):
    """The site's candidate features of its ``raw`` table under the plan and its own ``[columns]`` allow-list (a
    request can never widen them), and its volume column: computed once per table version and plan in a process
    (every request and task of a study checks against them)."""
    if "candidates" not in cache:
        try:
            key = (site.table_version("raw"), json.dumps(study, sort_keys=True, default=str),
                   json.dumps(site.columns, sort_keys=True, default=str))
        except FileNotFoundError:
            key = None
        if key is None or key not in _CANDIDATES:
            raw = site.table("raw")
            found = (candidate_features(raw, study, site.columns), site_volume(raw, study, site.columns))
            if key is None:
                cache["candidates"], cache["volume"] = found
                return cache["candidates"]
            if len(_CANDIDATES) >= 64:
                _CANDIDATES.clear()
            _CANDIDATES[key] = found
        cands, volume = _CANDIDATES[key]
        cache["candidates"], cache["volume"] = list(cands), volume
    return cache["candidates"]


def _auto_knots(study, request, ledger) -> dict | None:
    """The knots of the plan's smooth terms whose knots come from the sites' histograms: from the request's
    ComBat request (``None``: from the ledger), checked against the plan (range, number of interior knots) and
    pinned for the study attempt (a second set of knots is refused)."""
    from fedrad.common.plan import check_auto_knots, smooth_auto

    auto = smooth_auto(study["harmonization"])
    if not auto:
        return None
    pinned = ledger.data.setdefault("smooth_knots", {})
    out = {}
    for name, (n, lo, hi) in auto.items():
        if request is None:
            _require(name in pinned, "ComBat-GAM knots before the ComBat statistics")
            out[name] = pinned[name]
            continue
        spec = (request.get("smooth") or {}).get(name) or {}
        knots = spec.get("knots") if isinstance(spec, dict) else None
        _require(check_auto_knots(knots, n, lo, hi), "ComBat-GAM knots outside the plan")
        knots = [float(v) for v in knots]
        _require(pinned.setdefault(name, knots) == knots, "a second set of ComBat-GAM knots")
        out[name] = knots
    return out


def _combat_stats(site, record, payload, ledger, cache):
    from fedrad.common.combat import make_request

    study = record["plan"]["study"]
    harm = study["harmonization"]
    _require(harm["enabled"], "harmonization is not in the plan")
    _require(payload.get("table") == "raw", "a table outside the plan")
    req = payload["request"]
    cand = _site_candidates(site, study, cache)
    feats = _subset(req.get("features"), cand, "ComBat features")
    from fedrad.common.plan import combat_passes

    passes = combat_passes(harm, _auto_knots(study, req, ledger))
    step = payload.get("pass", 0)
    _require(isinstance(step, int) and not isinstance(step, bool) and 0 <= step < len(passes),
             "a ComBat pass outside the plan")
    want = make_request(feats, list(harm["covariates"]), list(harm["categorical"]), **passes[step])
    impute = _impute_values(site, study, payload.get("impute"), ledger, cache, trains_only=True)
    out = {"request": want, "table": "raw", **({"impute": impute} if payload.get("impute") else {})}
    if step:  # nested ComBat: each fold's earlier passes, checked against the plan's pass by pass
        previous = payload.get("previous")
        _require(isinstance(previous, dict) and bool(previous), "nested ComBat without its earlier passes")
        out["previous"] = {}
        for fold, chain in previous.items():
            check_fold(study, fold, ledger)
            _require(isinstance(chain, list) and len(chain) == step, "nested ComBat passes outside the plan")
            if fold == f"loso:{site.name}":
                continue  # held out: no training statistics for its own fold
            for j, ref in enumerate(chain):
                check_reference(ref, make_request(cand, list(harm["covariates"]), list(harm["categorical"]),
                                                  **passes[j]), cand)
            out["previous"][fold] = chain
    return out


def _selection_specs(site, study, folds: dict, ledger, cache) -> dict:
    from fedrad.common.selection import correlation_request, icc_request

    ep = endpoints.of(endpoint(study))
    cand = _site_candidates(site, study, cache)
    max_corr = CANDIDATES_PER_FEATURE * int(study["selection"]["max_features"])
    out = {}
    for fold, spec in folds.items():
        check_fold(study, fold, ledger)
        check_table(study, fold, spec.get("table"))
        if fold == f"loso:{site.name}":
            continue  # held out: never sends training statistics for its own fold
        train = spec.get("train_sites")
        if train is not None and site.name not in train:
            continue
        reqs = {}
        for kind, r in (spec.get("requests") or {}).items():
            if kind == "score":
                feats = _subset(r.get("features"), cand, "score-test features")
                reqs[kind] = ep.score_request(feats)
            elif kind == "leak":  # the leakage screen's per-feature concordance counts (binary, survival)
                _require(not ep.leak_is_correlation, "a leakage screen outside the plan's endpoint")
                reqs[kind] = ep.concordance_request(_subset(r.get("features"), cand, "leakage-screen features"))
            elif kind == "icc":
                _require(study["selection"]["icc_threshold"] is not None, "ICC is not in the plan")
                reqs[kind] = icc_request(_subset(r.get("features"), cand, "ICC features"))
            elif kind == "corr":
                reqs[kind] = correlation_request(_subset(r.get("features"), cand, "correlation features", max_corr))
            elif kind == "path":  # the penalty path's gradient at zero of the volume / clinical models
                _require(fixed_grid(study) is None, "a penalty path is not in the plan")
                model_cols = list(study["model"]["clinical"]) + ([cache["volume"]] if cache.get("volume") else [])
                feats = _subset(r.get("features"), model_cols, "penalty-path features")
                reqs[kind] = ep.score_request(feats)
            else:
                raise PlanViolation("a selection request outside the plan")
        out[fold] = {"train_sites": [site.name], "table": spec["table"], "requests": reqs}
    return out


def _study_select(site, record, payload, ledger, cache):
    return {"folds": _selection_specs(site, record["plan"]["study"], payload.get("folds") or {}, ledger, cache)}


def check_reference(ref: dict, request: dict, features) -> None:
    """A ComBat reference the coordinator sends for the site to harmonize with is a fit of the plan's ComBat: the
    plan's covariates, categorical columns, smooth terms (their knots), batch column, CovBat and EB options, features
    among the site's candidates, finite parameters. A reference naming another column (a patient-level one), knots
    around one patient's age or a covariance step the plan has not would make the harmonized table, whose moments
    and score tests the site then sends, carry a patient's values."""
    import numpy as np

    from fedrad.common.combat import CombatError, ComBatReference, _basis_columns

    try:
        r = ComBatReference.from_dict(ref)
    except (CombatError, KeyError, TypeError, ValueError):
        raise PlanViolation("a ComBat reference that is not one") from None
    smooth = dict(request.get("smooth") or {})
    _require(list(r.continuous) == list(request["continuous"]) + _basis_columns(smooth)
             and list(r.categorical) == list(request["categorical"]) and dict(r.smooth or {}) == smooth,
             "ComBat reference covariates")
    _require(r.batch_col == request.get("batch_col") and bool(r.shared_batches) == bool(request.get("shared_batches"))
             and bool(r.covbat) == bool(request.get("covbat")) and r.ref_batch == request.get("ref_batch")
             and (r.mean_only, r.parametric, r.eb) == (bool(request["mean_only"]), bool(request["parametric"]),
                                                      bool(request.get("eb", True))), "ComBat reference options")
    _subset(r.features, features, "ComBat reference features")
    arrays = [r.coef, r.grand_mean, r.var_pooled] + ([r.posterior_gamma, r.posterior_delta]
                                                     if r.posterior_gamma is not None else [])
    _require(all(np.isfinite(np.asarray(a, dtype=float)).all() for a in arrays) and (r.var_pooled > 0).all()
             and (r.posterior_delta is None or (r.posterior_delta > 0).all()), "ComBat reference values")
    if r.covbat:
        _require(r.covbat.get("n_pc_requested") == request["covbat"]["n_pc"]
                 and r.covbat.get("percent_var") == request["covbat"]["percent_var"], "ComBat reference options")


def _study_harmonize(site, record, payload, ledger, cache):
    study = record["plan"]["study"]
    refs = payload.get("references") or {}
    if study["harmonization"]["enabled"]:
        given = [ref for ref in refs.values() if ref is not None]
        if given:
            cand = _site_candidates(site, study, cache)
            _require(bool(cand), "a ComBat reference without candidate features")
            from fedrad.common.combat import make_request
            from fedrad.common.plan import combat_passes

            passes = combat_passes(study["harmonization"], _auto_knots(study, None, ledger))
            harm = study["harmonization"]
            for ref in given:  # one reference, or nested ComBat's chain of one per pass
                chain = ref if isinstance(ref, list) else [ref]
                _require(len(chain) == len(passes), "nested ComBat passes outside the plan")
                for j, r in enumerate(chain):
                    check_reference(r, make_request(cand, list(harm["covariates"]), list(harm["categorical"]),
                                                    **passes[j]), cand)
    impute = _impute_values(site, study, payload.get("impute"), ledger, cache, trains_only=False)
    # without harmonization in the plan the request may only make each fold's imputed table
    _require(study["harmonization"]["enabled"] or (bool(impute) and all(r is None for r in refs.values())),
             "harmonization is not in the plan")
    for fold in refs:
        check_fold(study, fold, ledger)
    _require(not (payload.get("selection") and is_association(study)), "selection is not in the plan")
    out = {"references": refs, "impute": impute,
           "selection": _selection_specs(site, study, payload.get("selection") or {}, ledger, cache)}
    mom = payload.get("moments")
    if mom:
        _require(mom.get("fold") == "final", "moments of a fold outside the plan")
        out["moments"] = {"fold": "final", "features": _subset(mom.get("features"), _site_candidates(site, study, cache),
                                                               "moment features")}
    return out


def _kind_features(study, kind, feats, cand, ledger, fold) -> None:
    clinical = list(study["model"]["clinical"])
    max_f = int(study["selection"]["max_features"])
    sigs = ledger.data["signatures"]
    if kind == "volume":
        _require(len(feats) == 1 and feats[0] == ledger.data.get("volume"), "volume model features")
    elif kind == "clinical":
        _require(list(feats) == clinical and bool(clinical), "clinical model features")
    elif kind in ("radiomics", "combined"):
        sig = list(feats) if kind == "radiomics" else [f for f in feats if f not in clinical]
        if kind == "combined":
            _require(bool(clinical) and list(feats) == sig + [c for c in clinical if c not in sig],
                     "combined model features")
        _subset(sig, cand, "signature", max_f)
        _require(len(sig) >= 1, "signature")
        known = sigs.setdefault(fold, sig)
        _require(known == sig, "a second signature for one fold")
    else:
        raise PlanViolation("a model kind outside the plan")


def _parse_task_id(study, tid):
    _require(isinstance(tid, str) and tid.count("|") == 3, "a fit task outside the plan")
    fold, kind, gi, inner = tid.split("|")
    k = int(study["validation"]["inner_folds"])
    _require(gi.isdigit() and int(gi) < penalty_count(study), "a penalty outside the plan")
    _require(inner == "all" or (inner.isdigit() and int(inner) < k), "an inner fold outside the plan")
    return fold, kind, int(gi), (None if inner == "all" else int(inner))


def _point(request: dict) -> dict | None:
    """The coefficient point of a Newton request, standardized where the request is (logistic), or on the
    original scale (Cox: the ledger standardizes with the model's scale when comparing)."""
    beta = request.get("beta")
    if beta is None:
        return None
    beta = [float(b) for b in np.asarray(beta, dtype=float).ravel()]
    feats = [str(f) for f in request.get("features", [])]
    if str(request.get("kind", "")).startswith("fedrad.cox"):
        _require(len(beta) == len(feats), "a malformed Newton request")
        return dict(zip(feats, beta))
    _require(len(beta) == len(feats) + 1, "a malformed Newton request")
    return {"(intercept)": beta[0], **dict(zip(feats, beta[1:]))}


def _record_task(ledger, tid, data, request, max_rounds: int = MAX_TASK_ROUNDS) -> None:
    entry = ledger.data["tasks"].setdefault(tid, {"n": 0, "features": list(data["features"]), "points": []})
    _require(entry["features"] == list(data["features"]), "a fit task whose features changed")
    _require(entry["n"] < max_rounds, "more rounds of one fit than the plan allows")
    entry["n"] += 1
    pt = _point(request)
    if pt is not None:
        _require(set(pt) - {"(intercept)"} <= set(entry["features"]), "a Newton request outside its task")
        entry["points"].append(pt)


def _fit_round_study(site, record, payload, ledger, cache):
    study = record["plan"]["study"]
    ep = endpoints.of(endpoint(study))
    model = ep.model
    cand = frozenset(_site_candidates(site, study, cache))  # one set for every task's check
    ledger.data["volume"] = cache["volume"]  # the site's own volume column: the only one a volume model may use
    k, seed = int(study["validation"]["inner_folds"]), int(study["validation"]["seed"])
    tasks = []
    for task in payload.get("tasks") or []:
        tid = task.get("id")
        fold, kind, gi, inner = _parse_task_id(study, tid)
        check_fold(study, fold, ledger)
        data = task.get("data") or {}
        _require(data.get("model") == model, "a model outside the plan")
        _require(all(data.get(key) == ep[key] for key in ep.keys()), "an outcome outside the plan")
        check_table(study, fold, data.get("table"))
        want_rows = None if inner is None else {"k": k, "seed": seed, "fold": inner, "keep": "train"}
        _require(data.get("rows") == want_rows, "rows outside the plan's folds")
        feats = data.get("features") or []
        _kind_features(study, kind, feats, cand, ledger, fold)
        request = task.get("request") or {}
        _require(set(request.get("features", [])) <= set(feats), "a fit request outside its task")
        _record_task(ledger, tid, data, request, ep.max_fit_rounds or MAX_TASK_ROUNDS)
        sites = task.get("sites")
        contributes = fold != f"loso:{site.name}" and (sites is None or site.name in sites)
        clean = ep.data_spec(feats, data["table"], want_rows)
        horizon = dca_horizon(study)
        if horizon is not None and inner is None:  # the site's baseline at the plan's horizon, never the request's
            clean["dca_horizon"] = horizon
        tasks.append({"id": tid, "request": request, "data": clean, "sites": [site.name] if contributes else []})
    return {"tasks": tasks, "min_test_rows": True}


def check_model(study, ledger, tid: str, model: dict) -> None:
    """Refuse a model the site did not take part in fitting (see the module docstring)."""
    fold, kind, gi, inner = _parse_task_id(study, tid)
    entry = ledger.data["tasks"].get(tid)
    _require(entry is not None and bool(entry["points"]), "a model whose fit this site never saw")
    _require(isinstance(model, dict), "a malformed model")
    ep = endpoints.of(endpoint(study))
    _require(model.get("kind") == ep.model_kind, "a model of another kind than the plan's")
    check_penalty(study, ledger, fold, kind, gi, ep.model_penalty(model))
    _require_fitted_model(ep, entry, model)


def _require_fitted_model(ep, entry: dict, model: dict) -> None:
    """The model's features are its task's and its coefficients a point the site was sent for that task."""
    try:
        names = ep.model_features(model)
        pt, scale = ep.model_point(model)
        vals = {n: float(v) for n, v in pt.items()}
    except (KeyError, TypeError, ValueError):
        raise PlanViolation("a malformed model") from None
    _require(set(names) <= set(entry["features"]), "a model whose features are not its fit's")
    _require_seen_point(entry, vals, scale)


def _require_seen_point(entry: dict, vals: dict, scale: dict) -> None:
    """The model's coefficients are within ``STEP_TOL`` (standardized) of a point the site was sent for its task."""
    best = np.inf
    for seen in entry["points"]:
        keys = set(vals) | set(seen)
        d = max(abs(vals.get(n, 0.0) - seen.get(n, 0.0)) * float(scale.get(n, 1.0)) for n in keys)
        best = min(best, d)
    _require(best <= STEP_TOL, "a model whose fit this site never saw")


def _study_evaluate(site, record, payload, ledger, cache):
    study = record["plan"]["study"]
    _require(not ledger.data["evaluated"], "a second evaluation in one study attempt")
    ledger.data["evaluated"] = True
    k, seed = int(study["validation"]["inner_folds"]), int(study["validation"]["seed"])
    n_grid = penalty_count(study)
    horizon = dca_horizon(study)  # the plan's, never the request's
    items = []
    for item in payload.get("items") or []:
        tid = item.get("id")
        fold, kind, gi, inner = _parse_task_id(study, tid)
        _require(inner is not None, "an inner-CV loss of a final model")
        check_fold(study, fold, None)
        if fold == f"loso:{site.name}" or site.name not in (item.get("sites") or []):
            continue
        check_table(study, fold, item.get("table"))
        _require(item.get("rows") == {"k": k, "seed": seed, "fold": inner}, "rows outside the plan's folds")
        check_model(study, ledger, tid, item.get("model"))
        items.append({**item, "sites": [site.name]})
    folds = {}
    for fold, spec in (payload.get("folds") or {}).items():
        check_fold(study, fold, None)
        if fold not in ("final", f"loso:{site.name}"):
            continue  # a site validates the final models and its own held-out fold only
        check_table(study, fold, spec.get("table"))
        models = spec.get("models") or {}
        for kind, variants in models.items():
            _require(len(variants) <= n_grid, "more model variants than the plan's penalty grid")
            for gi, m in variants.items():
                check_model(study, ledger, f"{fold}|{kind}|{gi}|all", m)
        folds[fold] = {"models": models, "table": spec["table"], "eval_sites": [site.name]}
        if horizon is not None:
            folds[fold]["baselines"] = _baselines(spec.get("baselines"), models)
    return {"endpoint": endpoint(study), "items": items, "folds": folds,
            "km_times": list(study["validation"]["km_times"]), "subgroups": subgroup_columns(study),
            **({"dca_horizon": horizon} if horizon is not None else {})}


def _baselines(given, models: dict) -> dict:
    """The baseline cumulative hazard at the plan's horizon of each model variant (survival decision curves): one
    finite positive number, or None, per variant the request evaluates. The site cannot check the value (it comes
    from the training sites); whatever it is, the counts it releases describe 0 or at least k patients
    (:func:`fedrad.common.metrics.survival_decision_counts`), and the evaluation is once per study attempt."""
    if given is None:
        return {}
    _require(isinstance(given, dict) and set(given) <= set(models), "baselines of models outside the request")
    out = {}
    for kind, variants in given.items():
        _require(isinstance(variants, dict) and set(variants) <= set(models[kind]),
                 "baselines of models outside the request")
        for gi, value in variants.items():
            _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                       and math.isfinite(float(value)) and float(value) > 0),
                     "a baseline cumulative hazard that is not a finite positive number")
        out[kind] = {gi: (None if v is None else float(v)) for gi, v in variants.items()}
    return out


# --- harmonize and fit plans ------------------------------------------------------------------------------------
def _harmonize_plan(site, record, request, payload, ledger, cache):
    plan = record["plan"]
    if request == "combat_stats":
        _require(payload.get("table") is None, "a table outside the plan")
        ledger.new_attempt()
        return {"request": plan["request"], "table": None}
    if request == "combat_apply":
        _require(payload.get("table") is None, "a table outside the plan")
        check_reference(payload.get("reference") or {}, plan["request"], plan["request"]["features"])
        return {"reference": payload["reference"], "output": plan["output"], "table": None}
    raise PlanViolation("a request outside the plan")


def _cv_task(cv: dict | None, tid) -> tuple[int, int | None] | None:
    """``(path index, inner fold or None)`` of an inner-CV fit task ``<index>|<fold or all>`` of a fit plan with
    ``cv``; None for the plain tasks ``fit`` / ``stats``; anything else is refused."""
    if tid in ("fit", "stats"):
        return None
    _require(cv is not None and isinstance(tid, str) and tid.count("|") == 1, "a fit task outside the plan")
    gi, inner = tid.split("|")
    _require(gi.isdigit() and int(gi) < int(cv["path_size"]), "a penalty outside the plan")
    _require(inner == "all" or (inner.isdigit() and int(inner) < int(cv["k"])), "an inner fold outside the plan")
    return int(gi), (None if inner == "all" else int(inner))


def _check_fit_penalty(cv: dict, ep, ledger, gi: int, value) -> None:
    """A CV model's penalty is on one path of the plan's shape: ``first * step ** index``, the first value pinned
    at the first model the site sees (as a study's, :func:`check_penalty`)."""
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
             and float(value) > 0, "a model whose penalty is not the plan's")
    step = 10.0 ** (float(cv["path_decades"]) / (int(cv["path_size"]) - 1))
    first = float(value) / (step if ep.larger_is_weaker else 1.0 / step) ** gi
    pinned = ledger.data.setdefault("paths", {}).setdefault("fit", first)
    _require(abs(first - pinned) <= 1e-9 * pinned, "a model whose penalty is off its path")


def _fit_plan(site, record, request, payload, ledger, cache):
    plan = record["plan"]
    data = plan["data"]
    cv = plan.get("cv")
    if request == "fit_round":
        tasks = []
        for task in payload.get("tasks") or []:
            tid = task.get("id")
            where = _cv_task(cv, tid)
            want_rows = None if where is None or where[1] is None else {
                "k": int(cv["k"]), "seed": int(cv["seed"]), "fold": where[1], "keep": "train"}
            td = task.get("data") or {}
            _require({k: td.get(k) for k in data} == data and td.get("rows") == want_rows and not td.get("table"),
                     "a fit outside the plan")
            req = task.get("request") or {}
            _require(set(req.get("features", [])) <= set(data["features"]), "a fit request outside the plan")
            if where is None:
                entry = ledger.data["tasks"].setdefault(tid, {"n": 0})
                _require(entry["n"] < int(plan["rounds"]), "more rounds than the plan allows")
                entry["n"] += 1
            else:  # the coefficient points are kept: the held-out losses are of models the site helped fit
                _record_task(ledger, tid, data, req, int(plan["rounds"]))
            tasks.append({"id": tid, "request": req, "data": {**data, **({"rows": want_rows} if want_rows else {})},
                          "sites": None})
        return {"tasks": tasks}
    if request == "study_select":  # the gradient at zero that starts the penalty path (score tests)
        _require(cv is not None, "a request outside the plan")
        ledger.new_attempt()
        ep = endpoints.of_data(data)
        return {"folds": {"fit": {"train_sites": [site.name], "table": None,
                                  "requests": {"score": ep.score_request(list(data["features"]))}}}}
    if request == "study_evaluate":  # the inner-CV held-out losses of models the site helped fit
        _require(cv is not None, "a request outside the plan")
        ep = endpoints.of_data(data)
        items = []
        for item in payload.get("items") or []:
            where = _cv_task(cv, item.get("id"))
            _require(where is not None and where[1] is not None, "an inner-CV loss outside the plan")
            _require(item.get("rows") == {"k": int(cv["k"]), "seed": int(cv["seed"]), "fold": where[1]}
                     and item.get("table") is None, "rows outside the plan's folds")
            entry = ledger.data["tasks"].get(item["id"])
            _require(entry is not None and bool(entry["points"]), "a model whose fit this site never saw")
            model = item.get("model")
            _require(isinstance(model, dict) and model.get("kind") == ep.model_kind, "a model of another kind")
            _check_fit_penalty(cv, ep, ledger, where[0], ep.model_penalty(model))
            _require_fitted_model(ep, entry, model)
            items.append({"id": item["id"], "model": model, "table": None, "rows": item["rows"],
                          "sites": [site.name]})
        return {"endpoint": ep.as_dict(), "items": items, "folds": {}, "km_times": None, "subgroups": []}
    if request == "fedavg":
        cfg = payload["config"]
        _require(list(cfg.get("features", [])) == list(data["features"]) and cfg.get("outcome") == data.get("outcome")
                 and not cfg.get("table"), "a FedAvg round outside the plan")
        entry = ledger.data["tasks"].setdefault("fedavg", {"n": 0})
        _require(entry["n"] < int(plan.get("fedavg_rounds", 0)), "more FedAvg rounds than the plan allows")
        entry["n"] += 1
        return payload
    if request == "secure_fit_round":
        _require(bool(plan.get("secure")), "secure aggregation is not in the plan")
        td = payload["data"]
        _require({k: td.get(k) for k in data} == data and not td.get("rows") and not td.get("table"),
                 "a fit outside the plan")
        _require(list(payload["request"].get("features", [])) == list(data["features"]), "a fit outside the plan")
        entry = ledger.data["tasks"].setdefault("secure", {"n": 0})
        _require(entry["n"] < 4 * int(plan["rounds"]), "more rounds than the plan allows")
        entry["n"] += 1
        return {**payload, "data": dict(data)}
    raise PlanViolation("a request outside the plan")


def _study_associate(site, record, payload, ledger, cache):
    """Association statistics once per attempt, on the final fold's table: features among the site's candidates
    (its volume column too), the plan's markers, the plan's clinical covariates and, when the plan adjusts for
    volume, the site's own volume column."""
    study = record["plan"]["study"]
    _require(not ledger.data.get("associated"), "a second association request in one study attempt")
    ledger.data["associated"] = True
    check_table(study, "final", payload.get("table"))
    cand = list(_site_candidates(site, study, cache))
    allowed = cand + ([cache["volume"]] if cache.get("volume") and cache["volume"] not in cand else [])
    feats = _subset(payload.get("features"), allowed, "association features")
    assoc = study["association"]
    adjust = list(study["model"]["clinical"])
    volume = cache.get("volume") if assoc["volume_adjusted"] else None
    return {"table": payload["table"], "features": feats, "markers": list(assoc["markers"]), "adjust": adjust,
            "volume": volume}


_STUDY = {"study_select": _study_select, "study_harmonize": _study_harmonize, "combat_stats": _combat_stats,
          "fit_round": _fit_round_study, "study_evaluate": _study_evaluate, "study_associate": _study_associate}
#: the requests each kind of study plan allows besides study_prepare
_STUDY_KIND = {"prediction": {"study_select", "study_harmonize", "combat_stats", "fit_round", "study_evaluate"},
               "association": {"study_harmonize", "combat_stats", "study_associate"}}


def check_request(site, request: str, payload: dict) -> tuple[dict, dict]:
    """``(approved plan record, payload the step may use)``; raises :class:`PlanViolation` /
    :class:`~fedrad.client.approval.ApprovalError` for anything outside the site's approved plan."""
    record = load_approved(site.workdir, payload.get("plan"), site.approved_plans)
    ledger = Ledger(site.workdir, record["plan_id"])
    task = record["plan"]["task"]
    cache: dict = {}
    if task == "study":
        if request == "study_prepare":
            clean = _study_prepare(site, record, payload, ledger)
        elif request in _STUDY_KIND["association" if is_association(record["plan"]["study"]) else "prediction"]:
            clean = _STUDY[request](site, record, payload, ledger, cache)
        else:
            raise PlanViolation("a request outside the plan")
    elif task == "harmonize":
        clean = _harmonize_plan(site, record, request, payload, ledger, cache)
    else:
        clean = _fit_plan(site, record, request, payload, ledger, cache)
    ledger.save()
    return record, clean


__all__ = ["ApprovalError", "PlanViolation", "check_request", "check_model", "candidate_features", "penalty_grid",
           "plan_folds", "outcome_columns"]
