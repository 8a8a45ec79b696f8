r"""Statistics of the study report, computed from aggregates a site may release (pure numpy/scipy, Flower-free).

Every federated form (from per-site aggregates) has its pooled form beside it (from rows in one place, the test
oracle; :mod:`fedrad.server.study_pooled` uses them on a whole study):

=======================================  ==========================================  ===================================
quantity                                 federated (aggregates)                      pooled (rows)
=======================================  ==========================================  ===================================
per-feature moments of a site            :func:`feature_moments` (at the site)       –
pooled mean / variance                   :func:`combine_moments`                     ``numpy`` on the rows
site effect per feature (one-way ANOVA)  :func:`anova_from_moments`                  :func:`pooled_anova`
share of features with a site effect     :func:`site_effect` (BH-FDR)                :func:`site_effect_rows`
PCA of the site centroids                :func:`centroid_pca` on site means          :func:`centroid_pca_rows`
calibration by predicted-risk group      :func:`calibration_bins` (at the site),     –
                                         :func:`pool_calibration_bins`
cohort table with small cells withheld   :func:`cohort_summary` (at the site),       –
                                         :func:`suppress_counts`
=======================================  ==========================================  ===================================

**One-way ANOVA from moments.**  With :math:`K` sites, site :math:`i` holding :math:`n_i` values of a feature with
mean :math:`\bar y_i` and sample variance :math:`s_i^2` (ddof 1), :math:`N = \sum n_i`,
:math:`\bar y = \sum n_i\bar y_i / N`:

.. math:: F = \frac{\sum_i n_i(\bar y_i - \bar y)^2 / (K-1)}{\sum_i (n_i-1)s_i^2 / (N-K)}

on :math:`(K-1, N-K)` degrees of freedom — exactly ``scipy.stats.f_oneway`` on the pooled rows, since the between-
and within-site sums of squares are functions of :math:`(n_i, \bar y_i, s_i^2)` only.

**PCA of site centroids.**  Each site's mean vector is standardized with the pooled mean and the pooled total SD
of every feature (both from the moments, :func:`combine_moments`); the :math:`K` standardized centroids are centred
on their (unweighted) mean and decomposed by SVD — ``sklearn.decomposition.PCA`` on the standardized site means.
Harmonized centroids are projected on the same axes (:func:`project_centroids`), so before/after share one plot.

**Small cells.**  :func:`suppress_counts` withholds every count under the minimum cell size :math:`k` and, so that a
withheld cell cannot be recovered from a released total, keeps withholding the smallest released cell until the
withheld cells of the table add up to at least :math:`k` (complementary suppression).

Undefined values are ``None`` with a reason, never NaN.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats


# ----------------------------------------------------------------------------------------------
# small cells
# ----------------------------------------------------------------------------------------------
def suppress_counts(counts: Mapping[str, int], k: int) -> dict[str, int | None]:
    """Counts of one table (e.g. the levels of one variable, adding up to a released total) with every cell
    under ``k`` withheld (``None``) and, while the withheld cells add up to fewer than ``k``, the smallest
    released cell withheld too (so that no withheld cell can be derived from the total)."""
    out: dict[str, int | None] = {str(key): int(v) for key, v in counts.items()}
    withheld = [key for key, v in out.items() if v < k]
    total = sum(out[key] for key in withheld)
    if not withheld:
        return out
    released = sorted((v, key) for key, v in out.items() if key not in withheld)
    while total < k and released:
        v, key = released.pop(0)
        withheld.append(key)
        total += v
    for key in withheld:
        out[key] = None
    return out


def _level_label(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "missing"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _integer_valued(col: pd.Series) -> bool:
    x = col.dropna().to_numpy(dtype=float)
    return len(x) > 0 and bool(np.all(np.mod(x, 1) == 0))


#: an integer-valued numeric column with at most this many levels also gets level counts (e.g. tumour stage)
MAX_ORDINAL_LEVELS = 10


def cohort_summary(rows: pd.DataFrame, *, endpoint: Mapping, columns: Sequence[str], categorical: Sequence[str],
                   k: int) -> dict:
    """A site's cohort description, released under its minimum cell size ``k`` (runs at the site).

    ``outcome``: ``events`` and ``non_events`` (response: positives / negatives; survival: events / censored),
    withheld together when either is under ``k``. Per clinical column: a numeric column gets ``n``, ``mean`` and
    ``sd`` (ddof 1; withheld when fewer than ``k`` values) and, when it is integer-valued with at most
    :data:`MAX_ORDINAL_LEVELS` levels, level counts as well; a categorical (listed in ``categorical``, or
    non-numeric) column gets level counts (missing values counted as level ``missing``). Counts go through
    :func:`suppress_counts`; ``under_k`` / ``outcome_under_k`` name the cells withheld for being under ``k`` (the
    others withheld are complements), ``k`` is the site's minimum cell size.
    """
    from fedrad.common.endpoints import of

    n = int(len(rows))
    ep = of(endpoint)
    outcome = ep.outcome_counts(rows)
    out: dict = {"n": n, "k": int(k), "outcome": suppress_counts(outcome, k),
                 "outcome_under_k": [key for key, v in outcome.items() if v < k],
                 "continuous": {}, "counts": {}, "under_k": {}}
    out.update(ep.cohort_extra(rows, k))
    for col in dict.fromkeys(columns):
        if col not in rows.columns:
            continue
        values = rows[col]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric and col not in categorical:
            x = values.dropna().to_numpy(dtype=float)
            if len(x) >= k:
                out["continuous"][col] = {"n": int(len(x)), "mean": float(x.mean()), "sd": float(x.std(ddof=1))}
            else:
                out["continuous"][col] = {"n": None, "mean": None, "sd": None}
            if not (_integer_valued(values) and values.nunique() <= MAX_ORDINAL_LEVELS):
                continue
        levels: dict[str, int] = {}
        for v, c in values.value_counts(dropna=False).items():
            label = _level_label(v)
            levels[label] = levels.get(label, 0) + int(c)
        out["counts"][col] = suppress_counts(levels, k)
        small = [key for key, v in levels.items() if v < k]
        if small:
            out["under_k"][col] = small
    return out


#: |standardized mean difference| above which a covariate counts as imbalanced across sites (Stuart 2010: 0.25)
SMD_IMBALANCED = 0.25


def covariate_balance(cohort: Mapping[str, Mapping], modelled: Sequence[str] = (),
                      threshold: float = SMD_IMBALANCED) -> dict:
    r"""Balance of the cohort's covariates across sites from the sites' cohort descriptions: for each covariate and
    site, the standardized mean difference of the site against all the other sites pooled — a numeric column
    :math:`(\bar x_s - \bar x_r)/\sqrt{(s_s^2 + s_r^2)/2}` (the others' mean and SD combined exactly from their
    n, mean, SD), a categorical or ordinal one the largest over its levels of
    :math:`(p_s - p_r)/\sqrt{(p_s(1-p_s) + p_r(1-p_r))/2}` (levels withheld at a site leave that site out).
    ComBat preserves only the covariates it models (``modelled``): an imbalanced covariate it does not model is
    listed in ``unmodelled_imbalanced``, and part of its real between-site difference can be removed as "site"."""
    sites = sorted(s for s, c in cohort.items() if c)
    cols = list(dict.fromkeys(c for s in sites for c in list(cohort[s].get("continuous", {}))
                              + list(cohort[s].get("counts", {}))))
    out: dict = {"threshold": float(threshold), "columns": {}, "unmodelled_imbalanced": [], "modelled": list(modelled)}
    for col in cols:
        smd: dict[str, float | None] = {}
        counted = all(col in cohort[s].get("counts", {}) for s in sites)
        for s in sites:
            others = [o for o in sites if o != s]
            if counted:
                smd[s] = _level_smd(cohort, col, s, others)
            else:
                smd[s] = _mean_smd(cohort, col, s, others)
        vals = [abs(v) for v in smd.values() if v is not None]
        worst = max(vals) if vals else None
        out["columns"][col] = {"smd": smd, "max_abs": worst, "kind": "levels" if counted else "mean",
                               "modelled": col in modelled}
        if worst is not None and worst > threshold and col not in modelled:
            out["unmodelled_imbalanced"].append(col)
    return out


def _mean_smd(cohort, col, s, others) -> float | None:
    me = (cohort[s].get("continuous") or {}).get(col) or {}
    rest = [r for r in ((cohort[o].get("continuous") or {}).get(col) or {} for o in others)
            if r.get("mean") is not None and r.get("sd") is not None]  # a site that withheld it is left out
    if me.get("mean") is None or me.get("sd") is None or not rest:
        return None
    _, m_r, v_r = combine_moments(np.array([[r["n"]] for r in rest]), np.array([[r["mean"]] for r in rest]),
                                  np.array([[r["sd"] ** 2] for r in rest]))
    den = math.sqrt((me["sd"] ** 2 + float(v_r[0])) / 2)
    return (me["mean"] - float(m_r[0])) / den if den > 0 else None


def _level_smd(cohort, col, s, others) -> float | None:
    mine = cohort[s]["counts"][col]
    rest = [r for r in (cohort[o]["counts"][col] for o in others) if all(v is not None for v in r.values())]
    if any(v is None for v in mine.values()) or not rest:  # a site with a withheld level is left out
        return None
    n_s, n_r = sum(mine.values()), sum(sum(r.values()) for r in rest)
    best = None
    for level in set(mine) | {lv for r in rest for lv in r}:
        p_s = mine.get(level, 0) / n_s
        p_r = sum(r.get(level, 0) for r in rest) / n_r
        den = math.sqrt((p_s * (1 - p_s) + p_r * (1 - p_r)) / 2)
        if den > 0:
            d = (p_s - p_r) / den
            best = d if best is None or abs(d) > abs(best) else best
    return best


# ----------------------------------------------------------------------------------------------
# moments
# ----------------------------------------------------------------------------------------------
def feature_moments(rows: pd.DataFrame, features: Sequence[str], k: int) -> dict:
    """Per feature: number of non-missing values ``n``, ``mean``, sample variance ``var`` (ddof 1), and the mean
    and variance of the absolute deviations from the site mean, :math:`|x - \\bar x|` (Levene's test of equal
    variances) — a site's aggregate for the site-effect statistics. A feature with fewer than ``k`` values is
    withheld (``n`` 0, the rest None)."""
    x = rows[list(features)].to_numpy(dtype=float)
    ok = np.isfinite(x)
    n = ok.sum(axis=0)
    xs = np.where(ok, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xs.sum(axis=0) / np.where(n > 0, n, 1)
        dev = np.where(ok, x - mean, 0.0)
        var = (dev ** 2).sum(axis=0) / np.where(n > 1, n - 1, 1)
        absdev = np.abs(dev)
        ad_mean = absdev.sum(axis=0) / np.where(n > 0, n, 1)
        ad_var = (np.where(ok, absdev - ad_mean, 0.0) ** 2).sum(axis=0) / np.where(n > 1, n - 1, 1)
    keep = n >= max(int(k), 2)

    def released(values):
        return [float(v) if kp else None for v, kp in zip(values, keep)]

    return {"features": list(features), "n": [int(v) if kp else 0 for v, kp in zip(n, keep)],
            "mean": released(mean), "var": released(var), "absdev_mean": released(ad_mean),
            "absdev_var": released(ad_var)}


def moment_arrays(by_site: Mapping[str, Mapping], features: Sequence[str]) -> tuple[list[str], np.ndarray,
                                                                                        np.ndarray, np.ndarray]:
    """``(sites, n, mean, var)`` with arrays of shape (sites, features) aligned by feature name; a withheld or
    absent moment is n = 0 (and NaN mean/var internally, never returned to a caller unmasked)."""
    sites = sorted(by_site)
    shape = (len(sites), len(features))
    n, mean, var = np.zeros(shape), np.full(shape, np.nan), np.full(shape, np.nan)
    for i, s in enumerate(sites):
        m = by_site[s]
        pos = {f: j for j, f in enumerate(m["features"])}
        for j, f in enumerate(features):
            if f in pos and m["mean"][pos[f]] is not None and m["var"][pos[f]] is not None:
                n[i, j], mean[i, j], var[i, j] = m["n"][pos[f]], m["mean"][pos[f]], m["var"][pos[f]]
    return sites, n, mean, var


def combine_moments(n: np.ndarray, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled ``(N, mean, variance)`` per feature (columns) from per-site moments (rows); variance ddof 1.

    :math:`\\bar y = \\sum n_i\\bar y_i/N`, :math:`s^2 = [\\sum (n_i-1)s_i^2 + \\sum n_i(\\bar y_i-\\bar y)^2]/(N-1)`
    (equals ``np.var(pooled rows, ddof=1)``).
    """
    n, mean, var = (np.asarray(a, dtype=float) for a in (n, mean, var))
    m0, v0 = np.where(n > 0, mean, 0.0), np.where(n > 0, var, 0.0)
    N = n.sum(axis=0)
    grand = (n * m0).sum(axis=0) / np.where(N > 0, N, 1)
    ss = ((n - 1).clip(min=0) * v0).sum(axis=0) + (n * (m0 - grand) ** 2).sum(axis=0)
    return N, grand, ss / np.where(N > 1, N - 1, 1)


# ----------------------------------------------------------------------------------------------
# site effect: one-way ANOVA per feature
# ----------------------------------------------------------------------------------------------
def anova_from_moments(n: Any, mean: Any, var: Any) -> dict:
    """One-way ANOVA F test of "no site effect" per feature from per-site moments (arrays sites x features).

    Sites with n = 0 for a feature are left out of that feature's test. Returns ``f``, ``p`` (lists, None where
    undefined), ``df_between``, ``df_within`` (lists) and ``reason`` (list; None where defined): undefined when
    fewer than two sites have the feature, or every value is equal (between and within sums of squares 0).
    A feature constant within each site but different between sites has F = inf reported as None with p = 0.
    """
    n, mean, var = (np.atleast_2d(np.asarray(a, dtype=float)) for a in (n, mean, var))
    has = n > 0
    m0, v0 = np.where(has, mean, 0.0), np.where(has, var, 0.0)
    K = has.sum(axis=0)
    N = n.sum(axis=0)
    grand = (n * m0).sum(axis=0) / np.where(N > 0, N, 1)
    ssb = (n * (m0 - grand) ** 2).sum(axis=0)
    ssw = ((n - 1).clip(min=0) * v0).sum(axis=0)
    f_out, p_out, dfb_out, dfw_out, reasons = [], [], [], [], []
    for j in range(n.shape[1]):
        dfb, dfw = int(K[j] - 1), int(N[j] - K[j])
        dfb_out.append(dfb)
        dfw_out.append(dfw)
        if K[j] < 2 or dfw < 1:
            f_out.append(None)
            p_out.append(None)
            reasons.append(f"site effect undefined: {int(K[j])} site(s) released this feature")
            continue
        scale = max(1.0, float(np.max(np.abs(m0[has[:, j], j]))) ** 2)
        if ssw[j] <= 1e-24 * scale * N[j]:
            if ssb[j] <= 1e-24 * scale * N[j]:
                f_out.append(None)
                p_out.append(None)
                reasons.append("site effect undefined: the feature has the same value everywhere")
            else:
                f_out.append(None)
                p_out.append(0.0)
                reasons.append("no within-site variation: F infinite, p = 0")
            continue
        f = (ssb[j] / dfb) / (ssw[j] / dfw)
        f_out.append(float(f))
        p_out.append(float(scipy.stats.f.sf(f, dfb, dfw)))
        reasons.append(None)
    return {"f": f_out, "p": p_out, "df_between": dfb_out, "df_within": dfw_out, "reason": reasons}


def pooled_anova(values: Any, groups: Any) -> dict:
    """Pooled twin of :func:`anova_from_moments`: the same test from the rows (``values``: rows x features,
    ``groups``: each row's site), by the between/within sums of squares."""
    x = np.asarray(values, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    g = np.asarray(groups)
    labels = sorted(set(g.tolist()))
    grand = x.mean(axis=0)
    ssb = np.zeros(x.shape[1])
    ssw = np.zeros(x.shape[1])
    for lab in labels:
        xi = x[g == lab]
        mi = xi.mean(axis=0)
        ssb += len(xi) * (mi - grand) ** 2
        ssw += ((xi - mi) ** 2).sum(axis=0)
    dfb, dfw = len(labels) - 1, len(x) - len(labels)
    f = (ssb / dfb) / (ssw / dfw)
    return {"f": f.tolist(), "p": scipy.stats.f.sf(f, dfb, dfw).tolist(), "df_between": dfb, "df_within": dfw}


def site_effect(by_site: Mapping[str, Mapping], features: Sequence[str], *, fdr: float = 0.05) -> dict:
    """Per-feature site effect from the sites' :func:`feature_moments`: ANOVA F and p, Benjamini-Hochberg q over
    the features where the test is defined, and the share of those with q <= ``fdr``."""
    from fedrad.common.selection import benjamini_hochberg

    sites, n, mean, var = moment_arrays(by_site, features)
    a = anova_from_moments(n, mean, var)
    defined = [j for j, p in enumerate(a["p"]) if p is not None]
    q = [None] * len(features)
    if defined:
        qs = benjamini_hochberg(np.array([a["p"][j] for j in defined]))
        for j, v in zip(defined, qs):
            q[j] = float(v)
    significant = [features[j] for j in defined if q[j] <= fdr]
    return {"features": list(features), "sites": sites, "f": a["f"], "p": a["p"], "q": q,
            "reason": a["reason"], "fdr": float(fdr), "n_tested": len(defined), "n_significant": len(significant),
            "share_significant": (len(significant) / len(defined)) if defined else None,
            "n_untested": len(features) - len(defined)}


def _bh_share(p: list, fdr: float) -> dict:
    from fedrad.common.selection import benjamini_hochberg

    defined = [j for j, v in enumerate(p) if v is not None]
    q = [None] * len(p)
    if defined:
        for j, v in zip(defined, benjamini_hochberg(np.array([p[j] for j in defined]))):
            q[j] = float(v)
    hits = sum(1 for j in defined if q[j] <= fdr)
    return {"p": p, "q": q, "n_tested": len(defined), "n_significant": hits,
            "share_significant": hits / len(defined) if defined else None}


def bartlett_from_moments(n: Any, var: Any) -> dict:
    r"""Bartlett's test of equal variances across sites per feature from per-site ``n`` and variances (ddof 1):
    :math:`T = [(N-K)\ln s_p^2 - \sum(n_i-1)\ln s_i^2] / [1 + (\sum 1/(n_i-1) - 1/(N-K))/(3(K-1))]`,
    :math:`\chi^2_{K-1}` (equals ``scipy.stats.bartlett`` on the rows). Undefined (None) with fewer than two sites
    or a zero variance."""
    import scipy.stats

    n, var = (np.atleast_2d(np.asarray(a, dtype=float)) for a in (n, var))
    stat, p = [], []
    for j in range(n.shape[1]):
        has = n[:, j] > 1
        ni, vi = n[has, j], var[has, j]
        k, big_n = int(has.sum()), float(ni.sum())
        if k < 2 or np.any(~np.isfinite(vi)) or np.any(vi <= 0):
            stat.append(None)
            p.append(None)
            continue
        sp2 = float(((ni - 1) * vi).sum() / (big_n - k))
        num = (big_n - k) * math.log(sp2) - float(((ni - 1) * np.log(vi)).sum())
        den = 1 + (float((1 / (ni - 1)).sum()) - 1 / (big_n - k)) / (3 * (k - 1))
        t = num / den
        stat.append(float(t))
        p.append(float(scipy.stats.chi2.sf(t, k - 1)))
    return {"stat": stat, "p": p}


def scale_effect(by_site: Mapping[str, Mapping], features: Sequence[str], *, fdr: float = 0.05) -> dict | None:
    """The multiplicative site effect per feature (do the sites' variances differ?) from the sites'
    :func:`feature_moments`: Levene's test (mean-centred: the one-way ANOVA of :math:`|x-\\bar x_{site}|`; the
    median-centred Brown-Forsythe variant would need each site's median, one patient's value) and Bartlett's, each
    with BH q-values. None for moments without the absolute deviations (results of an older fedrad)."""
    if not all("absdev_mean" in m for m in by_site.values()):
        return None
    sites, n, _, var = moment_arrays(by_site, features)
    ad_m, ad_v = np.full(n.shape, np.nan), np.full(n.shape, np.nan)
    for i, s in enumerate(sites):
        m = by_site[s]
        pos = {f: j for j, f in enumerate(m["features"])}
        for j, f in enumerate(features):
            if f in pos and m["absdev_mean"][pos[f]] is not None:
                ad_m[i, j], ad_v[i, j] = m["absdev_mean"][pos[f]], m["absdev_var"][pos[f]]
    lev = anova_from_moments(np.where(np.isfinite(ad_m), n, 0), ad_m, ad_v)
    bart = bartlett_from_moments(n, var)
    return {"features": list(features), "fdr": float(fdr),
            "levene": {"stat": lev["f"], **_bh_share(lev["p"], fdr)},
            "bartlett": {"stat": bart["stat"], **_bh_share(bart["p"], fdr)}}


def scale_effect_rows(rows: pd.DataFrame, site_col: str, features: Sequence[str]) -> dict:
    """Pooled twin of :func:`scale_effect`: scipy's Levene (``center="mean"``) and Bartlett on the rows."""
    import scipy.stats

    groups = [g for _, g in rows.groupby(site_col, sort=True)]
    out = {"levene": [], "bartlett": []}
    for f in features:
        parts = [g[f].dropna().to_numpy(dtype=float) for g in groups]
        out["levene"].append(scipy.stats.levene(*parts, center="mean"))
        out["bartlett"].append(scipy.stats.bartlett(*parts))
    return out


def site_effect_rows(rows: pd.DataFrame, site_col: str, features: Sequence[str], *, fdr: float = 0.05) -> dict:
    """Pooled twin of :func:`site_effect` (F and p by :func:`pooled_anova`, same BH step)."""
    from fedrad.common.selection import benjamini_hochberg

    a = pooled_anova(rows[list(features)].to_numpy(dtype=float), rows[site_col].to_numpy())
    q = benjamini_hochberg(np.asarray(a["p"]))
    return {"features": list(features), "f": a["f"], "p": a["p"], "q": q.tolist(),
            "n_significant": int((q <= fdr).sum()), "share_significant": float((q <= fdr).mean())}


# ----------------------------------------------------------------------------------------------
# PCA of site centroids
# ----------------------------------------------------------------------------------------------
def centroid_pca(means: Any, center: Any, scale: Any, n_components: int = 2) -> dict:
    """PCA of site centroids: ``means`` (sites x features) standardized as ``(means - center) / scale``, centred
    on the unweighted mean of the standardized centroids, SVD. Returns ``scores`` (sites x n_components; a
    component beyond the number of sites - 1 is 0), ``components``, ``explained_variance_ratio``, ``mean`` (the
    centring vector, for :func:`project_centroids`), ``center`` and ``scale``. Equals ``sklearn PCA`` on the
    standardized centroids up to the sign of each component (fixed here: largest |loading| positive)."""
    z = (np.asarray(means, dtype=float) - np.asarray(center, dtype=float)) / np.asarray(scale, dtype=float)
    mu = z.mean(axis=0)
    u, s, vt = np.linalg.svd(z - mu, full_matrices=False)
    for i in range(len(vt)):  # deterministic sign
        if vt[i, np.argmax(np.abs(vt[i]))] < 0:
            vt[i], u[:, i] = -vt[i], -u[:, i]
    var = s ** 2
    total = var.sum()
    comps = np.zeros((n_components, z.shape[1]))
    m = min(n_components, len(vt))
    comps[:m] = vt[:m]
    ratio = np.zeros(n_components)
    if total > 0:
        ratio[:m] = var[:m] / total
    return {"scores": ((z - mu) @ comps.T).tolist(), "components": comps.tolist(),
            "explained_variance_ratio": ratio.tolist(), "mean": mu.tolist(),
            "center": np.asarray(center, dtype=float).tolist(), "scale": np.asarray(scale, dtype=float).tolist()}


def project_centroids(pca: Mapping, means: Any) -> list[list[float]]:
    """Scores of other centroids (e.g. after harmonization) on a :func:`centroid_pca`'s axes."""
    z = (np.asarray(means, dtype=float) - np.asarray(pca["center"])) / np.asarray(pca["scale"])
    return ((z - np.asarray(pca["mean"])) @ np.asarray(pca["components"]).T).tolist()


def centroid_spread(means: Any, center: Any, scale: Any) -> float:
    """Root mean square distance of the standardized site centroids from the pooled mean, in pooled-SD units
    per feature (0: every site has the pooled mean in every feature)."""
    z = (np.asarray(means, dtype=float) - np.asarray(center, dtype=float)) / np.asarray(scale, dtype=float)
    return float(np.sqrt(np.mean(z ** 2)))


def centroid_pca_rows(rows: pd.DataFrame, site_col: str, features: Sequence[str], n_components: int = 2) -> dict:
    """Pooled twin of :func:`centroid_pca` with the pooled standardization: site means, pooled mean and SD from
    the rows."""
    x = rows[list(features)].astype(float)
    means = x.groupby(rows[site_col].to_numpy()).mean().sort_index()
    return centroid_pca(means.to_numpy(), x.mean().to_numpy(), x.std(ddof=1).to_numpy(), n_components)


def harmonization_summary(before: Mapping[str, Mapping], after: Mapping[str, Mapping] | None,
                          features: Sequence[str], *, fdr: float = 0.05) -> dict:
    """Site effect before (raw) and after (harmonized) and the PCA of the site centroids on the raw table's axes
    (both standardized with the raw pooled mean and SD), from the sites' :func:`feature_moments`."""
    out: dict = {"fdr": float(fdr), "before": site_effect(before, features, fdr=fdr)}
    out["after"] = site_effect(after, features, fdr=fdr) if after else None
    out["scale_before"] = scale_effect(before, features, fdr=fdr)  # multiplicative: Levene, Bartlett
    out["scale_after"] = scale_effect(after, features, fdr=fdr) if after else None
    sites, n, mean, var = moment_arrays(before, features)
    N, grand, total_var = combine_moments(n, mean, var)
    ok = (n > 0).all(axis=0) & (total_var > 0)
    if after:
        sites_a, n_a, mean_a, var_a = moment_arrays(after, features)
        ok &= (n_a > 0).all(axis=0) if sites_a == sites else False
    use = [f for f, o in zip(features, ok) if o]
    pca: dict = {"sites": sites, "features": use, "n_features": len(use)}
    if len(use) >= 2 and len(sites) >= 2:
        idx = np.flatnonzero(ok)
        sd = np.sqrt(total_var[idx])
        before_pca = centroid_pca(mean[:, idx], grand[idx], sd)
        pca.update(before=before_pca["scores"], explained_variance_ratio=before_pca["explained_variance_ratio"],
                   spread_before=centroid_spread(mean[:, idx], grand[idx], sd))
        if after:
            pca.update(after=project_centroids(before_pca, mean_a[:, idx]),
                       spread_after=centroid_spread(mean_a[:, idx], grand[idx], sd))
    else:
        pca["reason"] = "PCA needs at least 2 sites and 2 features released by every site"
    out["pca"] = pca
    return out


# ----------------------------------------------------------------------------------------------
# calibration by predicted-risk group
# ----------------------------------------------------------------------------------------------
def calibration_bins(y: Any, p: Any, edges: Any) -> dict:
    """Per probability bin ``[e_j, e_j+1)`` (last closed; the bins of a site's released ROC table, each with at
    least k patients): ``n``, observed ``events`` and the ``mean_predicted`` probability (None in an empty bin)."""
    yv, pv, e = np.asarray(y, dtype=float), np.asarray(p, dtype=float), np.asarray(edges, dtype=float)
    idx = np.clip(np.searchsorted(e, pv, side="right") - 1, 0, len(e) - 2)
    n = np.bincount(idx, minlength=len(e) - 1)
    ev = np.bincount(idx, weights=yv, minlength=len(e) - 1)
    ps = np.bincount(idx, weights=pv, minlength=len(e) - 1)
    return {"edges": e.tolist(), "n": n.astype(int).tolist(), "events": ev.round().astype(int).tolist(),
            "mean_predicted": [float(s / c) if c > 0 else None for s, c in zip(ps, n)]}


def pool_calibration_bins(tables: Sequence[Mapping], grid: Sequence[float] = tuple(np.linspace(0, 1, 11))) -> dict:
    """Pooled calibration points: every site bin is assigned to the ``grid`` interval holding its mean predicted
    probability; per interval the summed patients, events and predicted probabilities give the observed
    proportion and the mean predicted probability (exact sums over the grouped site bins)."""
    g = np.asarray(grid, dtype=float)
    n, ev, ps = np.zeros(len(g) - 1), np.zeros(len(g) - 1), np.zeros(len(g) - 1)
    for t in tables:
        if not t or t.get("n") is None:
            continue
        for c, e, m in zip(t["n"], t["events"], t["mean_predicted"]):
            if not c or m is None:
                continue
            j = int(np.clip(np.searchsorted(g, m, side="right") - 1, 0, len(g) - 2))
            n[j] += c
            ev[j] += e
            ps[j] += c * m
    keep = n > 0
    return {"n": n[keep].astype(int).tolist(), "events": ev[keep].astype(int).tolist(),
            "mean_predicted": (ps[keep] / n[keep]).tolist(), "observed": (ev[keep] / n[keep]).tolist()}


def software_versions(packages: Sequence[str]) -> dict:
    """Python's and ``packages``' installed versions (None when absent): provenance of the numbers in the report."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
