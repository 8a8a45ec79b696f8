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
import scipy.special

from fedrad.common import metrics
from fedrad.common.plan import outcome_columns  # noqa: F401  (re-exported: study, pooled twin)
from fedrad.common.report_stats import calibration_bins

MODEL_KINDS = ("radiomics", "volume", "clinical", "combined")
ROC_EDGES = np.linspace(0.0, 1.0, 21)  # probability bins for the pooled ROC curve


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


def make_fit(endpoint: dict, features: list[str], penalty: str, value: float, l1_ratio: float):
    """The server state machine for one fit (logistic: ``value`` is C; Cox: ``value`` is the penalizer)."""
    if endpoint["type"] == "response":
        from fedrad.common.glm import LogisticServer

        return LogisticServer(features, penalty=penalty, C=value,
                              l1_ratio=l1_ratio if penalty == "elasticnet" else None)
    from fedrad.common.cox import CoxFit

    l1 = {"l2": 0.0, "l1": 1.0}.get(penalty, l1_ratio)
    return CoxFit(features, duration_col=endpoint["time"], event_col=endpoint["event"], penalizer=value,
                  l1_ratio=l1)


def fit_pooled(endpoint: dict, rows: pd.DataFrame, features: list[str], penalty: str, value: float,
               l1_ratio: float, strata: str = "site"):
    """Pooled twin of :func:`make_fit` (the oracle)."""
    if endpoint["type"] == "response":
        from fedrad.common.glm import LogisticModel

        model = LogisticModel(penalty=penalty, C=value, l1_ratio=l1_ratio if penalty == "elasticnet" else None)
        return model.fit(rows[features], rows[endpoint["outcome"]].to_numpy())
    from fedrad.common.cox import fit_pooled as cox_pooled

    l1 = {"l2": 0.0, "l1": 1.0}.get(penalty, l1_ratio)
    return cox_pooled(rows, endpoint["time"], endpoint["event"], strata=strata, features=features,
                      penalizer=value, l1_ratio=l1)


def model_from_dict(endpoint: dict, d: dict):
    if endpoint["type"] == "response":
        from fedrad.common.glm import LogisticModel

        return LogisticModel.from_dict(d)
    from fedrad.common.cox import CoxModel

    return CoxModel.from_dict(d)


def linear_predictor(endpoint: dict, model, rows: pd.DataFrame) -> np.ndarray:
    """Logistic: log odds; Cox: log partial hazard (centred on the training mean)."""
    if endpoint["type"] == "response":
        return np.asarray(model.decision_function(rows), dtype=float)
    return np.asarray(model.predict_log_partial_hazard(rows[list(model.feature_names_)]), dtype=float)


def heldout_loss(endpoint: dict, model, rows: pd.DataFrame, train: np.ndarray) -> float:
    """A site's contribution to the inner-CV loss of a model fit without the rows ``~train``.

    Logistic: summed log loss on the held-out rows. Cox: minus the cross-validated partial likelihood
    contribution of the site's stratum (Verweij & van Houwelingen 1993): −[ℓ(β; all rows) − ℓ(β; training rows)].
    """
    lp = linear_predictor(endpoint, model, rows)
    if endpoint["type"] == "response":
        y = rows[endpoint["outcome"]].to_numpy(dtype=float)
        test = ~train
        return float(np.sum(np.logaddexp(0.0, lp[test]) - y[test] * lp[test]))
    from fedrad.common.cox import efron_stratum

    t = rows[endpoint["time"]].to_numpy(dtype=float)
    e = rows[endpoint["event"]].to_numpy(dtype=float)
    x = lp[:, None]
    one = np.ones(1)
    ll_all = efron_stratum(x, t, e, one)[0] if e.sum() > 0 else 0.0
    ll_train = efron_stratum(x[train], t[train], e[train], one)[0] if e[train].sum() > 0 else 0.0
    return float(-(ll_all - ll_train))


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


def _outcomes(endpoint: dict, rows: pd.DataFrame):
    if endpoint["type"] == "response":
        return (rows[endpoint["outcome"]].to_numpy(dtype=int),)
    return rows[endpoint["time"]].to_numpy(dtype=float), rows[endpoint["event"]].to_numpy(dtype=int)


def _model_metrics(endpoint: dict, lp: np.ndarray, outcome: tuple, min_cell_size: int, grid) -> dict:
    if endpoint["type"] == "response":
        (y,) = outcome
        p = scipy.special.expit(lp)
        bins = metrics.suppress_small_cells(metrics.roc_bins(y, p, ROC_EDGES), min_cell_size)
        return {"auc": metrics.auc_delong(y, lp), "brier": float(metrics.brier(y, p)),
                "calibration": metrics.calibration(y, np.clip(p, 1e-12, 1 - 1e-12)),
                "roc_bins": bins,
                # observed vs mean predicted in the released ROC bins (each >= min_cell_size patients)
                "calibration_bins": (calibration_bins(y, p, bins["edges"]) if bins.get("edges") is not None
                                     else {"n": None, "reason": bins.get("reason")})}
    t, e = outcome
    high = lp > 0.0
    split = metrics.risk_group_split(t, e, lp, 0.0)
    cells = (split["events_high"], split["n_high"] - split["events_high"], split["events_low"],
             split["n_low"] - split["events_low"])
    if min(cells) < min_cell_size:  # a 2 x 2 table (risk group x event) with a small cell: no count released
        split.update(n_high=None, n_low=None, events_high=None, events_low=None)
    return {"c_index": metrics.harrell_c(t, e, lp), "risk_split": split,
            # Kaplan-Meier counts per risk group, intervals merged until no released count is under k
            "km": {g: (metrics.merge_km_bins(metrics.km_bins(t[m], e[m], grid), min_cell_size)
                       if m.sum() >= min_cell_size else None)
                   for g, m in (("high", high), ("low", ~high))}}


def _paired(endpoint: dict, lp_a: np.ndarray, lp_b: np.ndarray, outcome: tuple) -> dict:
    if endpoint["type"] == "response":
        return metrics.delong_paired(outcome[0], lp_a, lp_b)
    return metrics.c_paired(outcome[0], outcome[1], lp_a, lp_b)


def _header(endpoint: dict, rows: pd.DataFrame, outcome: tuple, min_cell_size: int, km_grid):
    events = int(outcome[0].sum()) if endpoint["type"] == "response" else int(outcome[1].sum())
    grid = None
    if endpoint["type"] == "survival":
        grid = np.asarray(km_grid if km_grid is not None else np.quantile(outcome[0], np.linspace(0, 1, 11)),
                          dtype=float)
    # a small count cell is suppressed
    return {"n": int(len(rows)), "n_events": events if events >= min_cell_size else None}, grid


def evaluate_site(endpoint: dict, models: dict, rows: pd.DataFrame, *, min_cell_size: int,
                  km_grid: list[float] | None = None) -> dict:
    """Metrics of every model on one site's own rows (the site computes this locally and sends the numbers).

    Response: AUC with DeLong 95% CI, Brier score, calibration intercept and slope, probability-binned
    positive/negative counts for the pooled ROC (neighbouring bins merged until each holds ≥ ``min_cell_size``
    patients) and, in the same bins, patients, events and mean predicted probability (calibration plot), and
    paired DeLong differences (radiomics − volume, radiomics − clinical, combined − clinical).
    Survival: Harrell's C with CI, hazard ratio and log-rank p of the high- vs low-risk split at the training
    mean risk (linear predictor > 0; its group and event counts withheld when a cell of the risk group x event
    table is under ``min_cell_size``), Kaplan-Meier counts per risk group on ``km_grid``, and paired C-index
    differences.
    """
    outcome = _outcomes(endpoint, rows)
    out, grid = _header(endpoint, rows, outcome, min_cell_size, km_grid)
    lps = {kind: linear_predictor(endpoint, m, rows) for kind, m in models.items()}
    for kind, lp in lps.items():
        out[kind] = _model_metrics(endpoint, lp, outcome, min_cell_size, grid)
    out["paired"] = {f"{a}-{b}": _paired(endpoint, lps[a], lps[b], outcome) for a, b in PAIRS
                     if a in lps and b in lps}
    return out


def evaluate_variants(endpoint: dict, variants: dict, rows: pd.DataFrame, *, min_cell_size: int,
                      km_grid: list[float] | None = None) -> dict:
    """:func:`evaluate_site` for every penalty variant of every model (``{kind: {variant: model}}``), with paired
    differences for every combination of variants, so that the penalty can be chosen *after* the evaluation
    round (from the training sites' inner-CV losses, sent in the same round) without another round trip.
    :func:`pick_variants` turns the result into :func:`evaluate_site`'s output for the chosen variants.
    """
    outcome = _outcomes(endpoint, rows)
    out, grid = _header(endpoint, rows, outcome, min_cell_size, km_grid)
    lps = {kind: {v: linear_predictor(endpoint, m, rows) for v, m in vs.items()} for kind, vs in variants.items()}
    out["models"] = {kind: {v: _model_metrics(endpoint, lp, outcome, min_cell_size, grid) for v, lp in vs.items()}
                     for kind, vs in lps.items()}
    out["paired"] = {f"{a}:{va}-{b}:{vb}": _paired(endpoint, lps[a][va], lps[b][vb], outcome)
                     for a, b in PAIRS if a in lps and b in lps for va in lps[a] for vb in lps[b]}
    return out


def pick_variants(evaluated: dict, chosen: dict) -> dict:
    """The :func:`evaluate_site`-shaped metrics of the chosen variant of each model (``{kind: variant}``)."""
    out = {"n": evaluated["n"], "n_events": evaluated["n_events"]}
    for kind, v in chosen.items():
        out[kind] = evaluated["models"][kind][str(v)]
    out["paired"] = {f"{a}-{b}": evaluated["paired"][f"{a}:{chosen[a]}-{b}:{chosen[b]}"] for a, b in PAIRS
                     if a in chosen and b in chosen}
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
    if endpoint["type"] == "survival":
        t = pd.to_numeric(rows[endpoint["time"]], errors="coerce").to_numpy(dtype=float)
        drop(np.isfinite(t) & (t < 0), f"negative {endpoint['time']}")
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
