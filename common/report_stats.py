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


# ----------------------------------------------------------------------------------------------
# moments
# ----------------------------------------------------------------------------------------------
def feature_moments(rows: pd.DataFrame, features: Sequence[str], k: int) -> dict:
    """Per feature: number of non-missing values ``n``, ``mean``, sample variance ``var`` (ddof 1) — a site's
    aggregate for the site-effect statistics. A feature with fewer than ``k`` values is withheld (``n`` 0,
    ``mean`` and ``var`` None)."""
    x = rows[list(features)].to_numpy(dtype=float)
    ok = np.isfinite(x)
    n = ok.sum(axis=0)
    xs = np.where(ok, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xs.sum(axis=0) / np.where(n > 0, n, 1)
        var = (np.where(ok, x - mean, 0.0) ** 2).sum(axis=0) / np.where(n > 1, n - 1, 1)
    keep = n >= max(int(k), 2)
    return {"features": list(features), "n": [int(v) if kp else 0 for v, kp in zip(n, keep)],
            "mean": [float(v) if kp else None for v, kp in zip(mean, keep)],
            "var": [float(v) if kp else None for v, kp in zip(var, keep)]}


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
