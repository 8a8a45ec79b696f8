"""The study pipeline's decisions and site-local evaluations, shared by the federated study and its pooled twin.

Everything here is pure (no Flower, no files): which features a model uses, how a radiomic signature is picked
from the combined selection statistics, which penalty wins the inner cross-validation, the held-out loss a site
reports for an inner fold, and the metrics a held-out site computes on its own rows. The federated study
(:mod:`fedrad.server.study`) and the pooled oracle (:mod:`fedrad.server.study_pooled`) call the same functions,
so any difference between them comes from the aggregation, which is what the tests check.

Models validated side by side (TRIPOD; "a signature that is tumour volume in disguise" must show):

* ``radiomics``: the selected radiomic signature,
* ``volume``: tumour volume alone (``[model] volume``, else the first known volume column of
  :data:`fedrad.common.plan.VOLUME_NAMES`; available to the baseline even when it is no signature candidate),
* ``clinical``: the study's clinical covariates alone (when it has any),
* ``combined``: signature + clinical covariates (composite model).

Signature selection runs in two steps so that only a small correlation matrix ever leaves a site:
:func:`screen_candidates` (score tests, BH-FDR, the most associated survivors) and :func:`finish_signature`
(redundancy filter on the candidates' correlations, size cap).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedrad.common import endpoints
from fedrad.common.plan import outcome_columns  # noqa: F401  (re-exported: study, pooled twin)

MODEL_KINDS = ("radiomics", "volume", "clinical", "combined")


def common_volume(per_site: dict[str, str | None]) -> tuple[str | None, str | None]:
    """``(column, reason)`` of the volume baseline from each site's volume column (``common.plan.volume_column``):
    the column every site has, else None with the reason (for the report's headline)."""
    names = set(per_site.values())
    if len(names) == 1 and None not in names:
        return names.pop(), None
    lacking = sorted(s for s, v in per_site.items() if v is None)
    if lacking:
        return None, (f"no tumour-volume column at {', '.join(lacking)}; set [model] volume = \"COLUMN\" in "
                      "study.toml (known names: fedrad.common.plan.VOLUME_NAMES)")
    return None, ("the sites' volume columns differ (" + ", ".join(f"{s}: {v}" for s, v in sorted(per_site.items()))
                  + "); set [model] volume = \"COLUMN\" in study.toml")


def model_features(kind: str, signature: list[str], clinical: list[str], volume: str | None) -> list[str] | None:
    """Features of one model kind, or None when the study cannot have it (no clinical covariates, no volume)."""
    if kind == "radiomics":
        return list(signature) or None
    if kind == "volume":
        return [volume] if volume else None
    if kind == "clinical":
        return list(clinical) or None
    if kind == "combined":
        return (list(signature) + [c for c in clinical if c not in signature]) if clinical and signature else None
    raise ValueError(f"unknown model kind {kind!r}")


#: the redundancy filter looks at this many of the most associated FDR survivors per signature feature
CANDIDATES_PER_FEATURE = 5


def withhold_leaks(score, strength, *, correlation: bool, allow=()) -> tuple:
    """``(score without the probable leaks, {feature: strength})``: features whose univariate strength in the
    training sites is extreme (:func:`fedrad.common.leakage.flagged`) are taken out of the score tests before
    screening, so no signature holds them; ``allow`` (``[selection] allow``) keeps a feature in."""
    from dataclasses import replace

    from fedrad.common.leakage import flagged

    leaks = flagged(dict(strength.items()), correlation=correlation, allow=allow) if strength is not None else {}
    if not leaks:
        return score, {}
    keep = [f for f in score.table.index if f not in leaks]
    return replace(score, table=score.table.loc[keep],
                   uninformative={f: r for f, r in score.uninformative.items() if f not in leaks}), leaks


def screen_candidates(score, *, fdr: float, max_features: int, icc=None, icc_threshold: float | None = None) -> dict:
    """Step 1 of the signature: Benjamini-Hochberg at ``fdr`` on the univariate score tests, most associated
    first (|z|), the top ``CANDIDATES_PER_FEATURE * max_features`` kept for the redundancy step.

    With ``icc`` (an ICC result over the perturbed features) and ``icc_threshold``, features with ICC(1,1)
    below the threshold are dropped first (Zwanenburg et al. 2019). If no feature passes the FDR, the single
    most associated feature is kept and ``fallback`` is set, so the
    study still reports how a (weak) signature validates instead of stopping.
    """
    from fedrad.common.selection import benjamini_hochberg, robust_features

    pvalues = score.pvalues
    not_robust: list[str] = []
    if icc is not None and icc_threshold is not None:  # robustness first: FDR over the robust features only
        robust = set(robust_features(icc, threshold=icc_threshold))
        not_robust = [f for f in pvalues.index if f not in robust]
        pvalues = pvalues.drop(not_robust)
    q = benjamini_hochberg(pvalues)
    assoc = score.association.drop(not_robust)
    passed = [f for f in q.index if q[f] <= fdr and f not in score.uninformative]
    fallback = not passed
    if fallback:
        informative = assoc.drop(list(score.uninformative), errors="ignore")
        passed = [informative.idxmax()] if len(informative) else []
    ordered = sorted(passed, key=lambda f: (-float(assoc[f]), f))
    candidates = ordered[: CANDIDATES_PER_FEATURE * max_features]
    icc_values = None
    if icc is not None:  # ICC(1,1) of the candidates (robustness), for the report
        table = icc.table["icc"]
        icc_values = {f: (float(table[f]) if f in table.index else None) for f in candidates}
    return {"candidates": candidates, "association": {f: float(assoc[f]) for f in candidates}, "icc": icc_values,
            "n_not_robust": len(not_robust), "n_candidates": int(len(q)), "n_passed_fdr": 0 if fallback else len(passed),
            "fallback": bool(fallback), "q_values": {f: float(q[f]) for f in candidates}}


def finish_signature(screen: dict, corr, *, redundancy: float, max_features: int) -> dict:
    """Step 2: among the screened candidates (most associated first), drop one of each pair with
    |r| > ``redundancy`` (the less associated; ``corr`` from the same training rows), keep ``max_features``."""
    from fedrad.common.selection import drop_redundant

    assoc = pd.Series(screen["association"], dtype=float)
    usable = [f for f in screen["candidates"] if f in corr.corr.index]
    if len(usable) > 1:
        kept, dropped = drop_redundant(corr.corr.loc[usable, usable], assoc[usable], threshold=redundancy)
        kept = sorted(kept, key=lambda f: (-float(assoc[f]), f))
    else:
        kept, dropped = usable, []
    out = {k: v for k, v in screen.items() if k != "association"}
    out.update({"selected": kept[:max_features],
                "dropped_redundant": [[str(a), str(b), float(r)] for a, b, r in dropped]})
    return out


def choose_penalty(losses: dict) -> float:
    """Smallest total inner-CV loss; a tie goes to the stronger penalty (smaller C / larger penalizer is
    decided by the caller's ordering of the grid from strongest to weakest)."""
    best = min(losses.values())
    for value, loss in losses.items():
        if loss <= best + 1e-12 * max(1.0, abs(best)):
            return value
    raise ValueError("no losses")


def penalty_choice(path: list[float], index: int, losses: list[float | None]) -> dict:
    """What the report says of one (fold, model) penalty choice: the value, its index on the path (strongest
    first), the inner-CV loss of every value, and ``edge`` = "strongest" / "weakest" when the choice is an end
    of the path (the optimum may lie beyond it), else None."""
    edge = None
    if len(path) > 1 and index == 0:
        edge = "strongest"
    elif len(path) > 1 and index == len(path) - 1:
        edge = "weakest"
    return {"value": float(path[index]), "index": int(index), "path": [float(v) for v in path],
            "cv_loss": {str(float(v)): loss for v, loss in zip(path, losses)}, "edge": edge}


PAIRS = (("radiomics", "volume"), ("radiomics", "clinical"), ("combined", "clinical"))


def _header(ep, rows: pd.DataFrame, outcome: tuple, min_cell_size: int) -> dict:
    events = ep.n_events(outcome)  # None: no event count (continuous outcome)
    released = events is not None and events >= min_cell_size  # a small count: withheld
    return {"n": int(len(rows)), "n_events": events if released else None}


def subgroup_levels(rows: pd.DataFrame, columns, min_cell_size: int) -> dict[str, dict[str, np.ndarray]]:
    """``{column: {level: row mask}}`` of the subgroups a site reports (:func:`fedrad.common.plan.subgroup_columns`):
    a column with at most ``MAX_SUBGROUP_LEVELS`` levels at the site; a level whose patients, or the site's other
    patients, number fewer than ``min_cell_size`` is left out (its metric, differenced with the site's, would
    describe those few)."""
    from fedrad.common.plan import MAX_SUBGROUP_LEVELS

    out: dict[str, dict[str, np.ndarray]] = {}
    n = len(rows)
    for col in columns or ():
        if col not in rows.columns:
            continue
        values = rows[col]
        levels = values.dropna().unique()
        if len(levels) > MAX_SUBGROUP_LEVELS or len(levels) < 2:
            continue
        out[col] = {}
        for level in sorted(levels, key=str):
            mask = (values == level).to_numpy()
            if mask.sum() >= min_cell_size and n - mask.sum() >= min_cell_size:
                label = str(int(level)) if isinstance(level, (float, np.floating)) and float(level).is_integer() \
                    else str(level)
                out[col][label] = mask
    return out


def _subgroups(ep, lps: dict, outcome: tuple, groups: dict, min_cell_size: int, variants: bool) -> dict:
    """Headline statistic per subgroup level and model (and penalty variant); a level whose outcome counts are under
    the minimum cell size keeps only ``{"n": None}``."""
    out: dict = {}
    for col, levels in groups.items():
        out[col] = {}
        for level, mask in levels.items():
            sub = tuple(o[mask] for o in outcome)
            if not ep.subgroup_ok(sub, min_cell_size):
                out[col][level] = {"n": None}
                continue
            entry: dict = {"n": int(mask.sum())}
            for kind, lp in lps.items():
                entry[kind] = ({v: ep.headline_metric(x[mask], sub) for v, x in lp.items()} if variants
                               else ep.headline_metric(lp[mask], sub))
            out[col][level] = entry
    return out


def _decision(ep, lp, outcome, min_cell_size: int, decision: dict | None, baseline) -> dict | None:
    """The survival decision-curve counts of one model (``decision``: ``{"horizon"}``; ``baseline``: its
    training baseline at the horizon, None: none), else None."""
    if decision is None or baseline is None:
        return None
    return ep.decision_metrics(lp, outcome, min_cell_size, float(decision["horizon"]), float(baseline))


def evaluate_site(endpoint: dict, models: dict, rows: pd.DataFrame, *, min_cell_size: int,
                  km_grid: list[float] | None = None, subgroups=(), decision: dict | None = None) -> dict:
    """Metrics of every model on one site's own rows (the site computes this locally and sends the numbers):
    the endpoint kind's metrics (:meth:`fedrad.common.endpoints.Endpoint.model_metrics`: response AUC with DeLong
    CI, Brier, calibration, binned ROC and calibration counts; survival Harrell's C, the risk split, Kaplan-Meier
    counts per risk group on ``km_grid``) and paired differences (radiomics − volume, radiomics − clinical,
    combined − clinical; DeLong / paired C-index). ``decision`` (survival): ``{"horizon", "baselines": {kind:
    baseline cumulative hazard}}`` adds each model's decision-curve counts at the horizon."""
    ep = endpoints.of(endpoint)
    outcome = ep.outcomes(rows)
    out = _header(ep, rows, outcome, min_cell_size)
    grid = ep.curve_grid(outcome, km_grid)
    lps = {kind: ep.linear_predictor(m, rows) for kind, m in models.items()}
    for kind, lp in lps.items():
        out[kind] = ep.model_metrics(lp, outcome, min_cell_size, grid)
        dca = _decision(ep, lp, outcome, min_cell_size, decision, ((decision or {}).get("baselines") or {}).get(kind))
        if dca is not None:
            out[kind]["decision"] = dca
    out["paired"] = {f"{a}-{b}": ep.paired(lps[a], lps[b], outcome) for a, b in PAIRS if a in lps and b in lps}
    out["subgroups"] = _subgroups(ep, lps, outcome, subgroup_levels(rows, subgroups, min_cell_size), min_cell_size,
                                  variants=False)
    return out


def evaluate_variants(endpoint: dict, variants: dict, rows: pd.DataFrame, *, min_cell_size: int,
                      km_grid: list[float] | None = None, subgroups=(), decision: dict | None = None) -> dict:
    """:func:`evaluate_site` for every penalty variant of every model (``{kind: {variant: model}}``), with paired
    differences for every combination of variants, so that the penalty can be chosen *after* the evaluation
    round (from the training sites' inner-CV losses, sent in the same round) without another round trip.
    :func:`pick_variants` turns the result into :func:`evaluate_site`'s output for the chosen variants.
    """
    ep = endpoints.of(endpoint)
    outcome = ep.outcomes(rows)
    out = _header(ep, rows, outcome, min_cell_size)
    grid = ep.curve_grid(outcome, km_grid)
    lps = {kind: {v: ep.linear_predictor(m, rows) for v, m in vs.items()} for kind, vs in variants.items()}
    out["models"] = {kind: {v: ep.model_metrics(lp, outcome, min_cell_size, grid) for v, lp in vs.items()}
                     for kind, vs in lps.items()}
    for kind, vs in lps.items():  # survival decision curves: each variant at its own training baseline
        for v, lp in vs.items():
            base = ((decision or {}).get("baselines") or {}).get(kind, {}).get(str(v))
            dca = _decision(ep, lp, outcome, min_cell_size, decision, base)
            if dca is not None:
                out["models"][kind][v]["decision"] = dca
    out["paired"] = {f"{a}:{va}-{b}:{vb}": ep.paired(lps[a][va], lps[b][vb], outcome)
                     for a, b in PAIRS if a in lps and b in lps for va in lps[a] for vb in lps[b]}
    out["subgroups"] = _subgroups(ep, lps, outcome, subgroup_levels(rows, subgroups, min_cell_size), min_cell_size,
                                  variants=True)
    return out


def pick_variants(evaluated: dict, chosen: dict) -> dict:
    """The :func:`evaluate_site`-shaped metrics of the chosen variant of each model (``{kind: variant}``)."""
    out = {"n": evaluated["n"], "n_events": evaluated["n_events"]}
    for kind, v in chosen.items():
        out[kind] = evaluated["models"][kind][str(v)]
    out["paired"] = {f"{a}-{b}": evaluated["paired"][f"{a}:{chosen[a]}-{b}:{chosen[b]}"] for a, b in PAIRS
                     if a in chosen and b in chosen}
    out["subgroups"] = {col: {level: {"n": e["n"], **{kind: e[kind][str(v)] for kind, v in chosen.items()
                                                      if kind in e}}
                              for level, e in levels.items()}
                        for col, levels in (evaluated.get("subgroups") or {}).items()}
    return out




def exclusion_reasons(rows: pd.DataFrame, endpoint: dict, clinical: list[str],
                      covariates: list[str] = ()) -> tuple[np.ndarray, dict[str, int]]:
    """The complete-case rule (TRIPOD item 9): ``(keep mask, {reason: rows excluded})``. A row is excluded, for the
    first reason that applies, when an outcome value (response; survival time or event) is missing or not
    finite, the survival time is negative, or a clinical column or ComBat covariate is missing. A zero time is
    kept (as lifelines and R's coxph do)."""
    keep = np.ones(len(rows), dtype=bool)
    reasons: dict[str, int] = {}

    def drop(bad: np.ndarray, reason: str) -> None:
        nonlocal keep
        hit = bad & keep
        if hit.any():
            reasons[reason] = reasons.get(reason, 0) + int(hit.sum())
        keep &= ~bad

    for col in outcome_columns(endpoint):
        values = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
        drop(~np.isfinite(values), f"missing {col}")
    for bad, reason in endpoints.of(endpoint).exclusions(rows):
        drop(bad, reason)
    named = list(dict.fromkeys(list(clinical) + list(covariates)))
    if named:
        drop(rows[named].isna().any(axis=1).to_numpy(), "missing clinical or covariate value")
    return keep, reasons


def complete_rows(rows: pd.DataFrame, endpoint: dict, clinical: list[str], site: str,
                  covariates: list[str] = ()) -> pd.DataFrame:
    """The rows a study uses (:func:`exclusion_reasons`); a ``case_id`` column (made if absent)."""
    keep, _ = exclusion_reasons(rows, endpoint, clinical, covariates)
    complete = rows[keep]
    if "case_id" not in complete.columns:
        complete = complete.assign(case_id=[f"{site}-{i}" for i in range(len(complete))])
    return complete.reset_index(drop=True)
