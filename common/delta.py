"""Delta (longitudinal) radiomics: per-case change of each feature between two timepoints (pure, site-local).

Given a feature table with one row per (case, timepoint), :func:`delta_features` returns one row per case with
``delta_<feature>`` = value(later) − value(earlier) (``mode="difference"``) or ``rel_<feature>`` =
(later − earlier) / |earlier| (``mode="relative"``), and the case's other (clinical) columns from the earlier
timepoint. Cases without exactly the two timepoints are left out and reported; a feature whose baseline is 0 for
some case has no relative change and is left out (reported) rather than producing inf/NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class DeltaResult:
    table: pd.DataFrame
    skipped_cases: dict          # case_id -> reason
    dropped_features: dict       # feature -> reason
    timepoints: tuple


def delta_features(df: pd.DataFrame, features: list[str], *, id_col: str = "case_id", time_col: str = "timepoint",
                   order: list | None = None, mode: str = "difference") -> DeltaResult:
    """One row per case with the change of every feature between the two timepoints (``order`` or sorted)."""
    if mode not in ("difference", "relative"):
        raise ValueError(f"mode {mode!r}: use 'difference' or 'relative'")
    for col in (id_col, time_col, *features):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in the table")
    present = list(pd.unique(df[time_col].dropna()))
    if order is None:  # numeric timepoints in numeric order, else in text order
        numeric = pd.to_numeric(pd.Series(present), errors="coerce")
        order = [present[i] for i in np.argsort(numeric.to_numpy())] if numeric.notna().all() \
            else sorted(present, key=str)
    if len(order) != 2:
        raise ValueError(f"delta radiomics needs exactly two timepoints; found {order} in column {time_col!r} "
                         "(pass order=[earlier, later])")
    t0, t1 = order
    skipped = {}
    counts = df.groupby(id_col)[time_col].agg(list)
    keep = []
    for case, tps in counts.items():
        if sorted(map(str, tps)) != sorted(map(str, [t0, t1])):
            skipped[case] = f"timepoints {tps}, need exactly one {t0!r} and one {t1!r}"
        else:
            keep.append(case)
    base = df[df[time_col].astype(str) == str(t0)].set_index(id_col).loc[keep]
    later = df[df[time_col].astype(str) == str(t1)].set_index(id_col).loc[keep]
    x0 = base[features].to_numpy(dtype=float)
    x1 = later[features].to_numpy(dtype=float)
    dropped = {}
    if mode == "difference":
        values, prefix, kept = x1 - x0, "delta_", list(features)
    else:
        zero = (x0 == 0).any(axis=0)
        for j in np.flatnonzero(zero):
            dropped[features[j]] = f"baseline value 0 for {int((x0[:, j] == 0).sum())} cases: relative change undefined"
        kept = [f for j, f in enumerate(features) if not zero[j]]
        idx = [j for j in range(len(features)) if not zero[j]]
        values, prefix = (x1[:, idx] - x0[:, idx]) / np.abs(x0[:, idx]), "rel_"
    out = pd.DataFrame(values, columns=[prefix + f for f in kept], index=base.index)
    other = [c for c in df.columns if c not in features and c not in (id_col, time_col)]
    out = pd.concat([out, base[other]], axis=1).reset_index().rename(columns={"index": id_col})
    return DeltaResult(table=out, skipped_cases=skipped, dropped_features=dropped, timepoints=(t0, t1))
