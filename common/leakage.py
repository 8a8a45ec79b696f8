"""The leakage screen: a candidate feature that predicts the outcome almost perfectly on its own is withheld.

A real feature table often carries a second endpoint or a follow-up column (overall survival beside a binary
3-year death, a response coded twice). Named ones are left out by :func:`fedrad.common.names.endpoint_like`; this
screen catches the rest from the data, inside each validation fold's training sites, from within-site rank
statistics per feature:

* binary outcome: the Mann-Whitney count of (event, non-event) pairs ordered by the feature, i.e. the AUC of the
  feature on its own, pooled over sites as ``sum U_s / sum n1_s n0_s`` (pairs within a site only);
* survival: Harrell's concordance of the feature with the time (pairs ``t_i < t_j`` with an event at ``t_i``, or
  a censored ``t_j = t_i``; ties in the feature count one half), pooled over sites the same way;
* continuous outcome: the within-site correlation ``r = z / sqrt(n)`` of the univariate linear score test.

A feature with AUC or C at least :data:`EXTREME` or at most ``1 - EXTREME``, or ``|r| >= EXTREME``, is
probable leakage: it is kept out of the signature and named in the log, the results and the report headline,
unless ``[selection] allow`` lists it. Each site sends per feature two sums over all its training rows (the
pairs and the concordant pairs), as the score tests do, never a row.

Pure functions (numpy), each federated form with its pooled twin beside it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

#: a univariate AUC / C at or beyond this (or its mirror), or |r| at or above it, is probable leakage
EXTREME = 0.95
KIND = "fedrad.leakage.concordance"


class LeakageError(ValueError):
    """A concordance request or reply is malformed (the message names what)."""


def concordance_request(features: Sequence[str], *, outcome: str | None = None, time: str | None = None,
                        event: str | None = None, min_cell_size: int = 10) -> dict:
    """Request of the per-feature concordance counts: a binary ``outcome`` (AUC) or ``time`` + ``event`` (C)."""
    feats = [str(f) for f in features]
    if (outcome is None) == (time is None or event is None):
        raise LeakageError("a concordance request names either a binary outcome or a time and an event column")
    clash = sorted(set(feats) & {c for c in (outcome, time, event) if c})
    if clash:
        raise LeakageError(f"{clash} listed both as features and outcome columns")
    spec = {"outcome": str(outcome)} if outcome is not None else {"time": str(time), "event": str(event)}
    return {"kind": KIND, "features": feats, "min_cell_size": int(min_cell_size), **spec}


def _x(rows: pd.DataFrame, feats: list[str], where: str) -> np.ndarray:
    missing = [c for c in feats if c not in rows.columns]
    if missing:
        raise LeakageError(f"feature column(s) {missing[:5]} not found {where}")
    x = rows[feats].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise LeakageError(f"features have missing or infinite values {where}; impute them first")
    return x


def _binary_counts(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Per column: concordant (event above non-event, ties 1/2) pair count and the number of pairs."""
    from scipy.stats import rankdata

    ranks = rankdata(x, axis=0)  # mid-ranks: ties count one half
    n1 = float(y.sum())
    n0 = float(len(y) - n1)
    u = ranks[y == 1].sum(axis=0) - n1 * (n1 + 1) / 2.0
    return u, n1 * n0


def _survival_counts(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, float]:
    """Per column: Harrell's concordant pair count (a longer time with a *larger* feature is concordant, ties in
    the feature 1/2) and the number of comparable pairs: an event at ``t_i`` and ``t_j > t_i``, or ``t_j = t_i``
    censored (it outlived the event; lifelines' convention)."""
    conc = np.zeros(x.shape[1])
    pairs = 0.0
    for i in np.flatnonzero(e == 1):
        later = (t > t[i]) | ((t == t[i]) & (e == 0))
        m = int(later.sum())
        if not m:
            continue
        pairs += m
        xl = x[later]
        conc += (xl > x[i]).sum(axis=0) + 0.5 * (xl == x[i]).sum(axis=0)
    return conc, pairs


def site_concordance(rows: pd.DataFrame, request: Mapping, *, site=None, min_cell_size: int | None = None) -> dict:
    """A site's concordance counts per feature (sums over all its rows; refused under its minimum cell size)."""
    where = f"at site {site!r}" if site is not None else "in the pooled data"
    if request.get("kind") != KIND:
        raise LeakageError(f"not a concordance request (kind {request.get('kind')!r})")
    feats = list(request["features"])
    k = max(int(request.get("min_cell_size", 10)), int(min_cell_size or 0))
    x = _x(rows, feats, where)
    if "outcome" in request:
        y = rows[request["outcome"]].to_numpy(dtype=np.float64)
        if not np.isin(y, (0.0, 1.0)).all():
            raise LeakageError(f"outcome {request['outcome']!r} {where} must be 0/1")
        if min(y.sum(), len(y) - y.sum()) < k:
            raise LeakageError(f"fewer than {k} events or non-events {where}: no concordance counts sent")
        conc, pairs = _binary_counts(x, y)
    else:
        t = rows[request["time"]].to_numpy(dtype=np.float64)
        e = rows[request["event"]].to_numpy(dtype=np.float64)
        if len(t) < k:
            raise LeakageError(f"fewer than {k} rows {where}: no concordance counts sent")
        conc, pairs = _survival_counts(x, t, e)
    return {"kind": KIND + ".stats", "site": site, "features": feats, "n": int(len(x)),
            "concordant": conc, "pairs": float(pairs)}


def combine_concordance(aggregates: Sequence[Mapping]) -> pd.Series:
    """Pooled within-site concordance per feature: ``sum concordant / sum pairs`` (NaN without pairs)."""
    if not aggregates:
        raise LeakageError("no site replies to combine")
    feats = list(aggregates[0]["features"])
    if any(list(a["features"]) != feats for a in aggregates):
        raise LeakageError("sites answered the concordance request for different features")
    conc = np.sum([np.asarray(a["concordant"], dtype=float) for a in aggregates], axis=0)
    pairs = float(sum(float(a["pairs"]) for a in aggregates))
    return pd.Series(conc / pairs if pairs > 0 else np.full(len(feats), np.nan), index=feats, dtype=float)


def pooled_concordance(rows: pd.DataFrame, request: Mapping, strata: str = "site") -> pd.Series:
    """Pooled twin of :func:`combine_concordance`: the same counts from the pooled rows, pairs within ``strata``."""
    parts = [site_concordance(g, request, site=s) for s, g in rows.groupby(strata, sort=True)]
    return combine_concordance(parts)


def flagged(values: Mapping[str, float], *, correlation: bool = False, allow: Sequence[str] = ()) -> dict:
    """``{feature: value}`` of the probable leaks: concordance ``>= EXTREME`` or ``<= 1 - EXTREME`` (or, with
    ``correlation``, ``|r| >= EXTREME``), minus the ``allow``-ed names."""
    out = {}
    for f, v in values.items():
        if v is None or not np.isfinite(v) or f in set(allow):
            continue
        if (abs(v) >= EXTREME) if correlation else (v >= EXTREME or v <= 1.0 - EXTREME):
            out[str(f)] = float(v)
    return out
