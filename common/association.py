r"""Radiogenomic association statistics from per-site aggregates: features × molecular markers, site-stratified,
adjusted, exact; per-site Spearman pooled on Fisher's z; Benjamini-Hochberg over the whole matrix; replication;
feature-class enrichment.

Partial effect of feature :math:`f` on marker :math:`m` (a continuous score, or a 0/1 status: the linear
probability model), adjusted for covariates :math:`Z` with one intercept per site (site-stratified): the
coefficient of :math:`f` in the OLS fit :math:`m \sim f + Z + \text{site}`. By Frisch-Waugh-Lovell it only needs the
pooled *within-site* centred cross-products :math:`S = \sum_s\sum_{i\in s}(v_i-\bar v_s)(v_i-\bar v_s)^\top` of
:math:`v = (f, m, Z)`: with :math:`S_{ab\cdot Z} = S_{ab} - S_{aZ}S_{ZZ}^{-1}S_{Zb}`,

* partial correlation :math:`r = S_{fm\cdot Z}/\sqrt{S_{ff\cdot Z}S_{mm\cdot Z}}`,
* coefficient per within-site SD of the feature :math:`b = (S_{fm\cdot Z}/S_{ff\cdot Z})\,\sqrt{S_{ff}/(N-K)}`,
* :math:`t = r\sqrt{d/(1-r^2)}` with :math:`d = N - K - c - 1` residual degrees of freedom (:math:`K` sites,
  :math:`c` covariates): the OLS t-test of :math:`f`; 95% CI of :math:`r` on Fisher's z with SE
  :math:`1/\sqrt{d-1}`.

A site sends, for its complete rows, ``n`` and the blocks of its within-site centred cross-products that these
need: the features' sums of squares (the diagonal only, never the feature × feature block), feature × marker,
feature × covariate, marker × marker, marker × covariate and covariate × covariate; and its Spearman correlation of
every (feature, marker) pair. Small cells (the site's minimum cell size k): a marker whose values differ from their most common value in
fewer than k patients at a site (a 0/1 status with a level under k, or an indicator in disguise) is withheld by
that site with everything involving it, so that marker's pairs use the other sites; such a covariate makes the
site refuse.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats

KIND = "fedrad.association.stats"


class AssociationError(ValueError):
    """Bad input for an association statistic (the message names the column or site)."""


class SmallCellError(AssociationError):
    """The aggregate would describe fewer patients than the site's minimum cell size (the site refuses)."""


def _few_off_the_mode(x: np.ndarray, k: int) -> bool:
    """Fewer than ``k`` patients differ from the column's most common value: a 0/1 status with a level under k, or
    an indicator in disguise (all patients but a few share one value), whose cross-products would describe those
    few patients. (A column of distinct values passes: every cross-product mixes all patients.)"""
    _, counts = np.unique(x, return_counts=True)
    return len(x) - int(counts.max()) < k


def site_association(rows: pd.DataFrame, features: Sequence[str], markers: Sequence[str], adjust: Sequence[str],
                     *, min_cell_size: int, site: Any = None) -> dict:
    """A site's aggregates (see the module docstring); ``rows`` are its (harmonized) complete rows."""
    where = f"site {site}" if site is not None else "pooled rows"
    feats, marks, adj = list(features), list(markers), list(adjust)
    cols = feats + marks + adj
    absent = [c for c in cols if c not in rows.columns]
    if absent:
        raise AssociationError(f"{where}: column(s) {', '.join(absent[:5])} not in the table")
    for c, t in zip(marks + adj, rows[marks + adj].dtypes):
        if not pd.api.types.is_numeric_dtype(t):
            raise AssociationError(f"{where}: column {c!r} is not numeric; code markers and covariates as numbers "
                                   "(0/1 for a status)")
    x = rows[cols].to_numpy(dtype=float)
    bad = ~np.isfinite(x)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        raise AssociationError(f"{where}: column {cols[j]!r} has {int(bad[:, j].sum())} missing value(s) among "
                               "the study's rows")
    n = len(x)
    k = int(min_cell_size)
    if n < k:
        raise SmallCellError(f"{where}: {n} patients, fewer than the minimum cell size {k}")
    p, q = len(feats), len(marks)
    for j, c in enumerate(adj):
        if _few_off_the_mode(x[:, p + q + j], k):
            raise SmallCellError(f"{where}: covariate {c!r} has a level with fewer than {k} patients; the site "
                                   "does not release cross-products of so few patients")
    withheld = [c for j, c in enumerate(marks) if _few_off_the_mode(x[:, p + j], k)]
    keep_m = [j for j, c in enumerate(marks) if c not in withheld]
    xc = x - x.mean(axis=0)
    f, m, z = xc[:, :p], xc[:, p:p + q][:, keep_m], xc[:, p + q:]
    rho = np.full((p, len(keep_m)), np.nan)
    if p and keep_m:
        ranks_f = scipy.stats.rankdata(x[:, :p], axis=0)
        ranks_m = scipy.stats.rankdata(x[:, p:p + q][:, keep_m], axis=0)
        rf, rm = ranks_f - ranks_f.mean(axis=0), ranks_m - ranks_m.mean(axis=0)
        den = np.sqrt(np.outer((rf * rf).sum(axis=0), (rm * rm).sum(axis=0)))
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(den > 0, (rf.T @ rm) / np.where(den > 0, den, 1.0), np.nan)
    return {"kind": KIND, "site": site, "n": int(n), "features": feats, "markers": [marks[j] for j in keep_m],
            "withheld_markers": withheld, "adjust": adj,
            "ff": (f * f).sum(axis=0), "fm": f.T @ m, "fz": f.T @ z, "mm": m.T @ m, "mz": m.T @ z, "zz": z.T @ z,
            "spearman": rho}


def _pieces(aggs: Sequence[Mapping], marker: str, adjust: Sequence[str], n_features: int):
    """The marker's pooled blocks over the sites that released it: (N, K, ff, fm, fz, mm, mz, zz)."""
    c = len(adjust)
    big_n = k = 0
    ff, fm = np.zeros(n_features), np.zeros(n_features)
    fz, mz = np.zeros((n_features, c)), np.zeros(c)
    mm, zz = 0.0, np.zeros((c, c))
    for a in aggs:
        if marker not in a["markers"]:
            continue
        j = a["markers"].index(marker)
        big_n += int(a["n"])
        k += 1
        ff += np.asarray(a["ff"], dtype=float)
        fm += np.asarray(a["fm"], dtype=float).reshape(n_features, -1)[:, j]
        fz += np.asarray(a["fz"], dtype=float).reshape(n_features, c)
        mm += float(np.asarray(a["mm"], dtype=float).reshape(len(a["markers"]), -1)[j, j])
        mz += np.asarray(a["mz"], dtype=float).reshape(len(a["markers"]), c)[j]
        zz += np.asarray(a["zz"], dtype=float).reshape(c, c)
    return big_n, k, ff, fm, fz, mm, mz, zz


def partial_effects(aggs: Sequence[Mapping], marker: str, adjust: Sequence[str], features: Sequence[str],
                    exclude: Sequence[int] = ()) -> pd.DataFrame:
    """Per feature: partial r, coefficient per SD, t, p, its CI and the sites and patients used, for one marker
    adjusted for ``adjust`` (a subset of the covariates the sites sent, by name) with site intercepts.

    ``exclude``: indices of features set to undefined (e.g. the volume column when it is itself adjusted for)."""
    sent = list(aggs[0]["adjust"])
    idx = [sent.index(c) for c in adjust]
    big_n, k, ff, fm, fz, mm, mz, zz = _pieces(aggs, marker, sent, len(features))
    fz, mz, zz = fz[:, idx], mz[idx], zz[np.ix_(idx, idx)]
    c = len(idx)
    d = big_n - k - c - 1
    out = pd.DataFrame(index=pd.Index(list(features), name="feature"),
                       columns=["r", "coef_per_sd", "t", "p", "ci_low", "ci_high", "n", "sites"], dtype=float)
    out["n"], out["sites"] = big_n, k
    if k == 0 or d < 2:
        return out
    if c:
        zinv = np.linalg.pinv(zz)
        sfm = fm - fz @ zinv @ mz
        sff = ff - np.einsum("ij,jk,ik->i", fz, zinv, fz)
        smm = mm - float(mz @ zinv @ mz)
    else:
        sfm, sff, smm = fm, ff, mm
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (sff > 1e-12 * np.maximum(ff, 1e-300)) & (smm > 0)
        r = np.where(ok, sfm / np.sqrt(np.where(ok, sff * smm, 1.0)), np.nan)
        r = np.clip(r, -1.0, 1.0)
        t = r * np.sqrt(d / (1.0 - r * r))
        coef = np.where(ok, sfm / np.where(ok, sff, 1.0), np.nan) * np.sqrt(ff / max(big_n - k, 1))
    p = 2 * scipy.stats.t.sf(np.abs(t), d)
    se = 1.0 / math.sqrt(d - 1)
    zr = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
    out["r"], out["coef_per_sd"], out["t"], out["p"] = r, coef, t, p
    out["ci_low"], out["ci_high"] = np.tanh(zr - 1.959963984540054 * se), np.tanh(zr + 1.959963984540054 * se)
    if len(exclude):
        out.iloc[list(exclude), :6] = np.nan
    return out


def pooled_partial_effects(rows: pd.DataFrame, marker: str, adjust: Sequence[str], features: Sequence[str],
                           site_col: str = "site") -> pd.DataFrame:
    """Oracle of :func:`partial_effects`: the OLS fit of ``marker ~ feature + adjust + site`` per feature (numpy
    least squares on the pooled rows, the same as statsmodels)."""
    dummies = pd.get_dummies(rows[site_col], dtype=float).to_numpy()
    y = rows[marker].to_numpy(dtype=float)
    z = rows[list(adjust)].to_numpy(dtype=float)
    out = {}
    for f in features:
        x = rows[f].to_numpy(dtype=float)
        design = np.column_stack([x, z, dummies])
        beta, *_ = np.linalg.lstsq(design, y, rcond=None)
        res = y - design @ beta
        d = len(y) - design.shape[1]
        cov = (res @ res) / d * np.linalg.inv(design.T @ design)
        t = beta[0] / math.sqrt(cov[0, 0])
        out[f] = {"t": t, "p": 2 * scipy.stats.t.sf(abs(t), d), "r": t / math.sqrt(t * t + d)}
    return pd.DataFrame(out).T


def pool_spearman(aggs: Sequence[Mapping], marker: str, features: Sequence[str]) -> dict:
    """Per feature: every site's Spearman ρ with the marker and n, and their DerSimonian-Laird pooling on
    Fisher's z (SE √(1.06/(n−3)), Fieller et al. 1957) with I²."""
    from fedrad.common.metrics import SPEARMAN_Z_VARIANCE, pool_correlations

    per_site = {}
    for a in aggs:
        if marker in a["markers"]:
            j = a["markers"].index(marker)
            per_site[a["site"]] = (np.asarray(a["spearman"], dtype=float).reshape(len(features), -1)[:, j],
                                   int(a["n"]))
    out = {}
    for i, f in enumerate(features):
        rs = {s: (None if not np.isfinite(v[i]) else float(v[i]), n) for s, (v, n) in per_site.items()}
        entry = {"sites": {s: {"rho": r, "n": n} for s, (r, n) in rs.items()}}
        usable = [(r, n) for r, n in rs.values() if r is not None and abs(r) < 1 and n > 3]
        if len(usable) >= 2:
            pooled = pool_correlations([r for r, _ in usable], [n for _, n in usable], z_var=SPEARMAN_Z_VARIANCE)
            entry.update({k: pooled[k] for k in ("pooled", "ci_low", "ci_high", "i2", "tau2", "q_p", "k")})
        out[f] = entry
    return out


def feature_class(name: str) -> tuple[str, str]:
    """``(image type, feature class)`` of a pyradiomics-style name (``original_glcm_Contrast`` ->
    ``("original", "glcm")``; ``wavelet-LLH_firstorder_Mean`` -> ``("wavelet", "firstorder")``); other names
    give ``("other", "other")``."""
    parts = str(name).split("_")
    classes = {"shape", "shape2D", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"}
    if len(parts) >= 3 and parts[1] in classes:
        return parts[0].split("-")[0], "shape" if parts[1] == "shape2D" else parts[1]
    return "other", "other"


def enrichment(features: Sequence[str], significant: set[str]) -> list[dict]:
    """Which feature families are over-represented among the associated features: for each class (shape, first
    order, each texture matrix) and image type (original, LoG, wavelet, ...), the hypergeometric probability of at
    least that many significant features in the class (``P(X ≥ x)``, population = every tested feature), with BH
    q-values over the families."""
    from fedrad.common.selection import benjamini_hochberg

    feats = list(features)
    total, hits = len(feats), len([f for f in feats if f in significant])
    rows = []
    for what, index in (("class", 1), ("image type", 0)):
        groups: dict[str, list[str]] = {}
        for f in feats:
            groups.setdefault(feature_class(f)[index], []).append(f)
        for name, members in sorted(groups.items()):
            x = len([f for f in members if f in significant])
            p = float(scipy.stats.hypergeom.sf(x - 1, total, len(members), hits)) if hits else 1.0
            rows.append({"family": what, "name": name, "features": len(members), "significant": x,
                         "expected": hits * len(members) / total if total else 0.0, "p": p})
    if rows:
        q = benjamini_hochberg(pd.Series([r["p"] for r in rows]))
        for r, v in zip(rows, q):
            r["q"] = float(v)
    return rows
