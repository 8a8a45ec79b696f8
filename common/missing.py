"""Missing feature values in a federated study, handled inside each validation fold (TRIPOD item 9).

The rule, the same for the federated study (:mod:`fedrad.server.study`) and its pooled twin
(:mod:`fedrad.server.study_pooled`):

1. **Drop** a feature (or the volume column) when, at any site, more than ``[selection] max_missing`` of the
   site's patients miss it, or fewer than ``max(k, 2)`` patients have it (its moments are withheld then).
   The decision uses only the per-feature counts every site already sends with its raw-table moments.
2. **Impute** the others per validation fold with the *training sites'* mean of the observed values
   (:math:`\\sum_s n_s \\bar x_s / \\sum_s n_s` over the fold's training sites, from the same moments), so a
   held-out site never informs the value its own cells get; the held-out site fills its cells with the fold's
   value too. ComBat, selection and the models then run on the imputed tables.
3. **At a site, fewer than k missing cells** of a feature are filled with that site's own observed mean, not the
   coordinator's value: a value chosen by the coordinator for fewer than k patients would single them out in
   every sum the site sends (the minimum-cell rule). A site refuses to impute a feature it observes in fewer
   than k patients.

Rows with a missing outcome, a negative survival time, or a missing clinical column or ComBat covariate are
excluded before (complete-case rule, :func:`fedrad.common.pipeline.exclusion_reasons`), per site and counted.
Everything here is pure (no Flower, no files).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd


class ImputationRefused(ValueError):
    """A site would impute a feature it observes in fewer than k patients."""


def _observed(moments: Mapping, feature: str, pos: Mapping | None = None) -> tuple[int, float | None]:
    """(observed count, mean) of a feature in a site's moments; ``pos``: :func:`_index` of them, when the caller
    asks for many features."""
    pos = _index(moments) if pos is None else pos
    if feature not in pos:
        return 0, None
    j = pos[feature]
    n, mean = moments["n"][j], moments["mean"][j]
    return (int(n), float(mean)) if mean is not None else (0, None)


def _index(moments: Mapping) -> dict:
    return {f: j for j, f in enumerate(moments["features"])}


def missing_plan(moments: Mapping[str, Mapping], n_rows: Mapping[str, int], features: Sequence[str],
                 max_missing: float) -> dict:
    """Which features are dropped and which imputed, from each site's raw-table moments (``n`` = observed
    values, 0 when withheld) and row count.

    Returns ``{"dropped": {feature: reason}, "impute": [features with a missing cell at some site],
    "cells": {site: missing cells among the kept features}, "max_missing": ..., "silent": [sites that withheld
    every moment]}``. A silent site (fewer patients than its minimum cell size) does not inform the rule.
    """
    dropped: dict[str, str] = {}
    impute: list[str] = []
    cells = {s: 0 for s in moments}
    # a site that withheld every moment (fewer patients than its minimum cell size) says nothing about one
    # feature: it will refuse the study's sums anyway, so it must not drop every feature for the others
    silent = sorted(s for s in moments if not any(m is not None for m in moments[s].get("mean", [])))
    informing = [s for s in sorted(moments) if s not in silent]
    index = {s: _index(moments[s]) for s in informing}
    for f in features:
        worst, why, any_missing = -1.0, "", False
        for s in informing:
            n_obs, mean = _observed(moments[s], f, index[s])
            n = int(n_rows[s])
            share = 1.0 - n_obs / n if n else 1.0
            if n_obs < 2 or mean is None:
                share, reason = 1.0, f"fewer than the minimum cell size observed at {s}"
            else:
                reason = f"missing in {share:.0%} of {s}'s patients"
            any_missing |= n_obs < n
            if share > worst:
                worst, why = share, reason
        if worst > max_missing:
            dropped[f] = why
        elif any_missing:
            impute.append(f)
    for s in informing:
        for f in impute:
            cells[s] += int(n_rows[s]) - _observed(moments[s], f, index[s])[0]
    return {"dropped": dropped, "impute": impute, "cells": cells, "max_missing": float(max_missing),
            "silent": silent}


def fold_values(moments: Mapping[str, Mapping], train_sites: Sequence[str], features: Sequence[str]) -> dict:
    """The imputation value of each feature in one fold: the training sites' pooled observed mean."""
    out = {}
    index = {s: _index(moments[s]) for s in train_sites}
    for f in features:
        num = den = 0.0
        for s in train_sites:
            n_obs, mean = _observed(moments[s], f, index[s])
            if mean is not None and n_obs > 0:
                num += n_obs * mean
                den += n_obs
        if den <= 0:
            raise ValueError(f"feature {f!r}: no training site observed it; it should have been dropped")
        out[f] = num / den
    return out


def impute(rows: pd.DataFrame, values: Mapping[str, float], k: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """The site's rows with each feature's missing cells filled: ``values[f]`` (the fold's training-site mean)
    when at least ``k`` cells are missing, else the site's own observed mean (rule 3). Returns the table and
    ``{feature: "fold" | "site"}`` for the features that had missing cells."""
    from fedrad.common.combat import _with_columns

    feats = [f for f in values if f in rows.columns]
    if not feats or not rows.columns.is_unique:
        return _impute_by_column(rows, values, k)
    numeric = [pd.api.types.is_numeric_dtype(t) for t in rows[feats].dtypes]
    if not all(numeric):
        return _impute_by_column(rows, values, k)
    block = rows[feats].to_numpy(dtype=float, na_value=np.nan, copy=True)  # every feature's values at once
    miss = ~np.isfinite(block)
    counts = miss.sum(axis=0)
    used: dict[str, str] = {}
    changed = []
    for j, f in enumerate(feats):
        m = int(counts[j])
        if m == 0:
            continue
        fill, used[f] = _fill_value(f, values[f], pd.Series(block[:, j]), miss[:, j], m, k)
        block[miss[:, j], j] = fill
        changed.append(j)
    if not changed:
        return rows.copy(), used
    return _with_columns(rows, [feats[j] for j in changed], block[:, changed]), used


def _fill_value(f: str, v, x: pd.Series, miss: np.ndarray, m: int, k: int) -> tuple[float, str]:
    """The value a feature's ``m`` missing cells get, and from where (rule 3); refuses under k observed."""
    n_obs = len(x) - m
    if n_obs < max(int(k), 2):
        raise ImputationRefused(f"feature {f!r} is observed in {n_obs} patients, fewer than the minimum cell "
                                f"size {k}: not imputed")
    if m < int(k):
        return float(x[~miss].mean()), "site"
    if not (isinstance(v, (int, float)) and math.isfinite(float(v))):
        raise ValueError(f"imputation value of {f!r} is not a finite number")
    return float(v), "fold"


def _impute_by_column(rows: pd.DataFrame, values: Mapping[str, float], k: int) -> tuple[pd.DataFrame, dict]:
    """:func:`impute` one column at a time (tables with text feature columns or repeated column names)."""
    out = rows.copy()
    used: dict[str, str] = {}
    for f, v in values.items():
        if f not in out.columns:
            continue
        x = pd.to_numeric(out[f], errors="coerce").astype(float)
        miss = ~np.isfinite(x.to_numpy())
        m = int(miss.sum())
        if m == 0:
            continue
        fill, used[f] = _fill_value(f, v, x, miss, m, k)
        x[miss] = fill
        out[f] = x
    return out, used


# --- pooled twin (rows in one place: tests only) ----------------------------------------------------------------
def moments_of_rows(rows: pd.DataFrame, features: Sequence[str], k: int) -> dict:
    """What a site sends (:func:`fedrad.common.report_stats.feature_moments`), from its rows."""
    from fedrad.common.report_stats import feature_moments

    return feature_moments(rows, [f for f in features if f in rows.columns], k)


def missing_plan_rows(tables: Mapping[str, pd.DataFrame], features: Sequence[str], max_missing: float,
                      k: int) -> dict:
    return missing_plan({s: moments_of_rows(t, features, k) for s, t in tables.items()},
                        {s: len(t) for s, t in tables.items()}, features, max_missing)


def fold_values_rows(tables: Mapping[str, pd.DataFrame], train_sites: Sequence[str], features: Sequence[str]) -> dict:
    """Pooled form of :func:`fold_values`: the mean of the observed values over the training sites' rows."""
    pooled = pd.concat([tables[s] for s in train_sites], ignore_index=True)
    out = {}
    for f in features:
        x = pd.to_numeric(pooled[f], errors="coerce").to_numpy(dtype=float)
        out[f] = float(x[np.isfinite(x)].mean())
    return out
