r"""Federated feature-selection statistics, each beside its pooled twin (pure numpy/scipy, Flower-free).

Selection always happens inside a training fold
-----------------------------------------------
Every function here must be given the **training rows of the current fold only** (at every site).
Screening, robustness filtering or redundancy filtering on all rows and then cross-validating the
model on the selected features leaks the test rows' outcomes into the model and biases performance
upwards.  The study runtime runs the whole selection pipeline again inside every fold (and inside
every leave-one-site-out split).

Design
------
Each statistic is computed in **one round trip** from per-site aggregates (and the requests can be
batched into a single message with :func:`site_batch`).  For every method there are three pieces:

* ``site_*(rows, request, site=...) -> dict`` runs at a hospital on its own rows and returns a plain
  dict of numbers and numpy arrays whose sizes depend on the number of features only — never an
  array with a patient dimension;
* ``combine_*(list_of_site_dicts) -> result`` runs at the server;
* ``pooled_*(rows, request, ...)`` computes the same result from pooled rows by an independent code
  path and is the test oracle.

Numerical stability: a site centres every feature on **its own mean** and sends centred sums of
squares / cross-products; the server merges them with the parallel (Chan, Golub & LeVeque 1979)
formulas, e.g. for two groups :math:`S = S_a + S_b + \frac{n_a n_b}{n_a+n_b}(\bar x_a - \bar x_b)^2`
written as :math:`\sum_s [S_s + n_s(\bar x_s - \bar x)^2]`.  No uncentred :math:`\sum x^2 - n\bar
x^2` is ever formed, so a feature of 1e5 mm³ with unit spread keeps full precision.  A feature whose
values are all equal at a site is centred to exact zeros (its site mean is set to that value).

Methods and what a site sends (F = number of requested features)
-----------------------------------------------------------------
``icc`` — robustness to perturbations, ICC(1,1) (:func:`site_icc`)
    ``n`` subjects, ``k`` perturbations per subject, per feature: grand ``mean`` (F),
    between-subject ``ssb`` (F) and within-subject ``ssw`` (F) sums of squares.
``correlation`` — Pearson correlation matrix (:func:`site_correlation`)
    ``n``, ``mean`` (F), centred cross-product matrix ``cxx`` (F×F).
``logistic_score`` — univariate logistic score tests (:func:`site_logistic_score`)
    ``n``, ``n_events`` (number of y = 1), per feature ``mean`` (F), ``sxx`` (F) =
    :math:`\sum (x-\bar x_s)^2`, ``sxy`` (F) = :math:`\sum (x-\bar x_s)(y-\bar y_s)`.
``cox_score`` — univariate site-stratified Cox score tests (:func:`site_cox_score`)
    ``n``, ``n_events``, per feature the stratum's score ``u`` (F) and information ``info`` (F)
    at :math:`\beta = 0`.

Spearman correlation is **not** provided: ranks are global (a row's pooled rank depends on every
other site's rows), so neither within-site ranks nor any fixed-size per-site summary reproduces the
pooled Spearman coefficient exactly; use Pearson on a monotone transform (e.g. log) instead.

References
----------
Shrout & Fleiss, Psychol Bull 1979 (ICC); Zwanenburg et al., Sci Rep 2019 (radiomics robustness
by image perturbation); Benjamini & Hochberg, JRSS-B 1995; Efron, JASA 1977 (ties); Friedman,
Hastie & Tibshirani, J Stat Softw 2010 (:math:`\lambda_{max}`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.special
import scipy.stats

__all__ = [
    "SelectionError",
    "ICCResult",
    "CorrelationResult",
    "ScoreTestResult",
    # requests
    "icc_request",
    "correlation_request",
    "logistic_score_request",
    "cox_score_request",
    # ICC
    "site_icc",
    "combine_icc",
    "pooled_icc",
    "icc_from_anova",
    "robust_features",
    # correlation
    "site_correlation",
    "combine_correlation",
    "pooled_correlation",
    "drop_redundant",
    # score tests
    "site_logistic_score",
    "combine_logistic_score",
    "pooled_logistic_score",
    "site_cox_score",
    "combine_cox_score",
    "pooled_cox_score",
    # FDR
    "benjamini_hochberg",
    "screen",
    # penalty path
    "c_min_logistic",
    "lambda_max_logistic",
    "penalty_grid",
    # batching
    "site_batch",
    "combine_batch",
]

_VERSION = 1
_KINDS = {
    "icc": "fedrad.selection.icc",
    "correlation": "fedrad.selection.correlation",
    "logistic_score": "fedrad.selection.logistic_score",
    "cox_score": "fedrad.selection.cox_score",
    "linear_score": "fedrad.selection.linear_score",
}
#: Default smallest number of rows (subjects for ICC) a site agrees to summarize.  With 2 rows the
#: centred cross-products and the mean reveal both rows up to their order, hence 5.
DEFAULT_MIN_CELL_SIZE = 5


def _repeated(names: list) -> list:
    """The names listed more than once, sorted (one pass: a wide table lists a thousand features)."""
    from collections import Counter

    return sorted(n for n, c in Counter(names).items() if c > 1)


class SelectionError(ValueError):
    """Invalid input for a selection statistic; the message names the feature, column and site."""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _where(site: Any) -> str:
    return f"at site {site!r}" if site is not None else "in the pooled data"


def _features(features: Any) -> list[str]:
    if isinstance(features, str):
        features = [features]
    feats = [str(f) for f in features]
    if not feats:
        raise SelectionError("no features requested")
    dup = _repeated(feats)
    if dup:
        raise SelectionError(f"features {dup} listed more than once")
    return feats


def _check_rows(rows: Any, cols: Sequence[str], where: str) -> None:
    if not isinstance(rows, pd.DataFrame):
        raise SelectionError(f"rows {where} must be a pandas DataFrame, got {type(rows).__name__}")
    missing = [c for c in cols if c not in rows.columns]
    if missing:
        raise SelectionError(f"column(s) {missing} not found {where}; columns are {list(rows.columns)[:20]}")


def _numeric(rows: pd.DataFrame, cols: Sequence[str], kind: str, where: str) -> np.ndarray:
    """Float matrix of ``cols``; raises naming the first column with missing/infinite values."""
    try:
        x = rows[list(cols)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SelectionError(f"{kind} columns {list(cols)} {where} must be numeric ({exc})") from None
    bad = (~np.isfinite(x)).sum(axis=0)
    idx = np.flatnonzero(bad)
    if idx.size:
        j = idx[0]
        more = "" if idx.size == 1 else f" (and {idx.size - 1} more {kind}s: {[cols[i] for i in idx[1:4]]})"
        raise SelectionError(f"{kind} {cols[j]!r} has {int(bad[j])} missing or infinite values {where} "
                             f"(of {len(x)} rows){more}; impute them or drop those rows before selection")
    return x


def _check_n(n: int, what: str, request: Mapping, min_cell_size: int | None, where: str) -> None:
    need = max(int(request.get("min_cell_size", DEFAULT_MIN_CELL_SIZE)), int(min_cell_size or 0))
    if n < need:
        raise SelectionError(f"{n} {what} {where}, fewer than the site's minimum cell size (min_cell_size={need}); "
                             f"the site does not send aggregates of so few {what}")


def _check_kind(agg: Mapping, method: str) -> None:
    if agg.get("kind") != _KINDS[method] + ".stats":
        raise SelectionError(f"expected a {method!r} site reply (kind {_KINDS[method]}.stats), "
                             f"got kind {agg.get('kind')!r}")


def _same_features(aggs: Sequence[Mapping], method: str) -> list[str]:
    if not aggs:
        raise SelectionError(f"no site replies to combine for {method!r}")
    for a in aggs:
        _check_kind(a, method)
    feats = list(aggs[0]["features"])
    for a in aggs[1:]:
        if list(a["features"]) != feats:
            raise SelectionError(f"site {a.get('site')!r} answered for different features than site "
                                 f"{aggs[0].get('site')!r}; all sites must answer the same request")
    return feats


def _centre(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, x - mean) along ``axis``; a column whose values are all equal gets exactly that value
    as its mean, so it centres to exact zeros (no rounding residue from the summation)."""
    mean = x.mean(axis=axis)
    first = np.take(x, 0, axis=axis)
    const = np.all(x == np.expand_dims(first, axis), axis=axis)
    mean = np.where(const, first, mean)
    return mean, x - np.expand_dims(mean, axis)


def _series(values: Any, what: str) -> pd.Series:
    if isinstance(values, pd.Series):
        s = values.astype(float)
    elif isinstance(values, Mapping):
        s = pd.Series({str(k): float(v) for k, v in values.items()}, dtype=float)
    else:
        raise SelectionError(f"{what} must be a dict or pandas Series keyed by feature name")
    return s


def _chan_merge(n: np.ndarray, mean: np.ndarray, ss: np.ndarray, weight: float = 1.0
                ) -> tuple[int, np.ndarray, np.ndarray]:
    r"""Pooled (N, mean, centred SS) from per-group ``n`` (G), ``mean`` (G×F), ``ss`` (G×F):
    :math:`SS = \sum_g [SS_g + w\,n_g(\bar x_g - \bar x)^2]` (w = k for the ICC between-subject SS)."""
    big_n = n.sum()
    grand = (n[:, None] * mean).sum(axis=0) / big_n
    d = mean - grand
    return int(big_n), grand, ss.sum(axis=0) + weight * (n[:, None] * d * d).sum(axis=0)


def _all_constant(mean: np.ndarray, ss: np.ndarray) -> np.ndarray:
    """Per feature: every site has zero centred SS and all site means are equal, i.e. the feature
    is constant over the pooled rows (the merged SS is set to exactly 0 instead of rounding noise)."""
    return np.all(ss == 0, axis=0) & np.all(mean == mean[:1], axis=0)


# ----------------------------------------------------------------------------------------------
# Requests (server -> sites)
# ----------------------------------------------------------------------------------------------
def _request(method: str, features: Any, min_cell_size: int, **extra: Any) -> dict:
    if int(min_cell_size) < 2:
        raise SelectionError(f"min_cell_size must be at least 2, got {min_cell_size}")
    return {"kind": _KINDS[method], "version": _VERSION, "features": _features(features),
            "min_cell_size": int(min_cell_size), **extra}


def icc_request(features: Sequence[str], case_col: str = "case_id", *,
                min_cell_size: int = DEFAULT_MIN_CELL_SIZE) -> dict:
    """Request for :func:`site_icc`: the perturbed table has one row per (case, perturbation), the
    case in ``case_col``; every case must have the same number ``k`` of perturbations."""
    feats = _features(features)
    if case_col in feats:
        raise SelectionError(f"case column {case_col!r} is also listed as a feature")
    return _request("icc", feats, min_cell_size, case_col=str(case_col))


def correlation_request(features: Sequence[str], *, min_cell_size: int = DEFAULT_MIN_CELL_SIZE) -> dict:
    """Request for :func:`site_correlation`."""
    return _request("correlation", features, min_cell_size)


def _outcome_request(method: str, features: Sequence[str], outcome: str, min_cell_size: int) -> dict:
    feats = _features(features)
    if outcome in feats:
        raise SelectionError(f"outcome {outcome!r} is also listed as a feature")
    return _request(method, feats, min_cell_size, outcome=str(outcome))


def logistic_score_request(features: Sequence[str], outcome: str, *,
                           min_cell_size: int = DEFAULT_MIN_CELL_SIZE) -> dict:
    """Request for :func:`site_logistic_score`; ``outcome`` is a 0/1 (or boolean) column."""
    return _outcome_request("logistic_score", features, outcome, min_cell_size)


def linear_score_request(features: Sequence[str], outcome: str, *,
                         min_cell_size: int = DEFAULT_MIN_CELL_SIZE) -> dict:
    """Request for :func:`site_linear_score`; ``outcome`` is a continuous column."""
    return _outcome_request("linear_score", features, outcome, min_cell_size)


def cox_score_request(features: Sequence[str], time: str, event: str, *, ties: str = "efron",
                      min_cell_size: int = DEFAULT_MIN_CELL_SIZE) -> dict:
    """Request for :func:`site_cox_score`; ``ties`` is ``"efron"`` (default, as lifelines and R
    ``coxph``) or ``"breslow"`` (the log-rank-type score)."""
    feats = _features(features)
    if ties not in ("efron", "breslow"):
        raise SelectionError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    clash = sorted({time, event} & set(feats))
    if clash:
        raise SelectionError(f"{clash} listed both as features and survival columns")
    return _request("cox_score", feats, min_cell_size, time=str(time), event=str(event), ties=ties)


def _check_request(request: Mapping, method: str) -> list[str]:
    if request.get("kind") != _KINDS[method]:
        raise SelectionError(f"expected a {method!r} request (kind {_KINDS[method]!r}), got {request.get('kind')!r}")
    return list(request["features"])


# ----------------------------------------------------------------------------------------------
# 1. ICC(1,1): robustness to perturbations
# ----------------------------------------------------------------------------------------------
@dataclass
class ICCResult:
    """Pooled one-way random-effects ANOVA per feature and ICC(1,1).

    ``table`` (index = kept features): ``icc``, ``msb``, ``msw``, ``f``, ``p_value`` (F test of
    ICC = 0), ``ci_low``, ``ci_high`` (Shrout & Fleiss 95 % interval).  ``excluded`` maps each
    feature without any variation (MSB = MSW = 0, ICC undefined) to the reason; it is not in
    ``table``.
    """

    table: pd.DataFrame
    n: int
    k: int
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def icc(self) -> pd.Series:
        return self.table["icc"]


def icc_from_anova(ssb: np.ndarray, ssw: np.ndarray, n: int, k: int, features: Sequence[str],
                   alpha: float = 0.05) -> ICCResult:
    r"""ICC(1,1) from the one-way ANOVA sums of squares.

    .. math::
        MSB = \frac{SSB}{n-1},\quad MSW = \frac{SSW}{n(k-1)},\quad
        ICC(1,1) = \frac{MSB - MSW}{MSB + (k-1)MSW},

    :math:`F = MSB/MSW` on :math:`(n-1, n(k-1))` degrees of freedom, and the Shrout & Fleiss
    (1979) interval :math:`F_L = F/F_{1-\alpha/2}(n-1, n(k-1))`, :math:`F_U = F\,F_{1-\alpha/2}(n(k-1),
    n-1)`, :math:`[(F_L-1)/(F_L+k-1),\ (F_U-1)/(F_U+k-1)]`.  Features with
    :math:`SSB = SSW = 0` are excluded.
    """
    ssb, ssw = np.asarray(ssb, dtype=float), np.asarray(ssw, dtype=float)
    df_b, df_w = n - 1, n * (k - 1)
    msb, msw = ssb / df_b, ssw / df_w
    denom = msb + (k - 1) * msw
    dead = denom <= 0
    excluded = {f: f"no variation (all {n}×{k} values equal), ICC undefined"
                for f, d in zip(features, dead) if d}
    keep = ~dead
    msb, msw, denom = msb[keep], msw[keep], denom[keep]
    icc = (msb - msw) / denom
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(msw > 0, msb / np.where(msw > 0, msw, 1.0), np.inf)
        p = np.where(np.isfinite(f), scipy.stats.f.sf(np.where(np.isfinite(f), f, 0.0), df_b, df_w), 0.0)
        fl = f / scipy.stats.f.ppf(1 - alpha / 2, df_b, df_w)
        fu = f * scipy.stats.f.ppf(1 - alpha / 2, df_w, df_b)
        lo = np.where(np.isfinite(fl), (fl - 1) / (fl + k - 1), 1.0)
        hi = np.where(np.isfinite(fu), (fu - 1) / (fu + k - 1), 1.0)
    table = pd.DataFrame({"icc": icc, "msb": msb, "msw": msw, "f": f, "p_value": p, "ci_low": lo,
                          "ci_high": hi}, index=pd.Index([f for f, d in zip(features, dead) if not d],
                                                         name="feature"))
    return ICCResult(table=table, n=int(n), k=int(k), excluded=excluded)


def _icc_cube(rows: pd.DataFrame, request: Mapping, where: str) -> np.ndarray:
    """(n subjects, k perturbations, F) array from the long perturbed table."""
    feats = _check_request(request, "icc")
    case_col = request["case_col"]
    _check_rows(rows, [case_col] + feats, where)
    n_missing = int(rows[case_col].isna().sum())
    if n_missing:
        raise SelectionError(f"case column {case_col!r} has {n_missing} missing values {where}")
    x = _numeric(rows, feats, "feature", where)
    codes, _ = pd.factorize(rows[case_col], sort=True)
    counts = np.bincount(codes)
    ks = np.unique(counts)
    if ks.size != 1:
        detail = ", ".join(f"{int((counts == kk).sum())} cases with k={kk}" for kk in ks)
        raise SelectionError(f"cases have unequal numbers of perturbations {where} ({detail}); ICC(1,1) "
                             f"here needs the same k for every case: drop incomplete cases")
    k = int(ks[0])
    if k < 2:
        raise SelectionError(f"each case has only k=1 value {where}; ICC needs k >= 2 perturbations per case")
    order = np.argsort(codes, kind="stable")
    return x[order].reshape(len(counts), k, len(feats))


def site_icc(rows: pd.DataFrame, request: Mapping, *, site: Any = None, min_cell_size: int | None = None) -> dict:
    r"""Site aggregates for ICC(1,1) (one-way random effects, Shrout & Fleiss 1979 case 1).

    Parameters
    ----------
    rows : DataFrame
        The site's perturbed feature table (training cases of the fold only): one row per
        (case, perturbation), the case id in ``request["case_col"]``.
    request : dict
        From :func:`icc_request`.
    site : str, optional
        The site's name (used in messages and error texts).
    min_cell_size : int, optional
        The site's own minimum number of subjects (the larger of this and the request's applies).

    Returns
    -------
    dict
        ``n`` subjects, ``k`` perturbations, and per feature (arrays of length F): ``mean`` the
        site grand mean :math:`\bar x_s`, ``ssb`` :math:`= k\sum_i (\bar x_i - \bar x_s)^2` and
        ``ssw`` :math:`= \sum_i\sum_r (x_{ir} - \bar x_i)^2` (:math:`\bar x_i` the subject mean).
        The sum of subject means is ``n * mean``.
    """
    where = _where(site)
    cube = _icc_cube(rows, request, where)
    n, k, _ = cube.shape
    _check_n(n, "subjects", request, min_cell_size, where)
    subj_mean, within = _centre(cube, axis=1)
    grand, between = _centre(subj_mean, axis=0)
    return {"kind": _KINDS["icc"] + ".stats", "version": _VERSION, "site": _py(site),
            "features": list(request["features"]), "n": int(n), "k": int(k), "mean": grand,
            "ssb": k * (between ** 2).sum(axis=0), "ssw": (within ** 2).sum(axis=(0, 1))}


def combine_icc(aggregates: Sequence[Mapping], alpha: float = 0.05) -> ICCResult:
    r"""Server: pooled one-way ANOVA and ICC(1,1) from :func:`site_icc` replies.

    With :math:`N = \sum_s n_s`, :math:`\bar x = \sum_s n_s\bar x_s / N`:
    :math:`SSB = \sum_s [SSB_s + k\,n_s(\bar x_s - \bar x)^2]`, :math:`SSW = \sum_s SSW_s`, then
    :func:`icc_from_anova`.  Every site must have the same ``k``.
    """
    feats = _same_features(aggregates, "icc")
    ks = {int(a["k"]) for a in aggregates}
    if len(ks) != 1:
        raise SelectionError(f"sites used different numbers of perturbations k: "
                             f"{ {a.get('site'): int(a['k']) for a in aggregates} }; ICC(1,1) needs one k")
    k = ks.pop()
    n = np.array([a["n"] for a in aggregates], dtype=float)
    mean = np.array([np.asarray(a["mean"], dtype=float) for a in aggregates])
    ssb = np.array([np.asarray(a["ssb"], dtype=float) for a in aggregates])
    ssw = np.array([np.asarray(a["ssw"], dtype=float) for a in aggregates])
    big_n, _, ssb_tot = _chan_merge(n, mean, ssb, weight=k)
    ssw_tot = ssw.sum(axis=0)
    const = _all_constant(mean, ssb + ssw)
    ssb_tot[const] = 0.0
    return icc_from_anova(ssb_tot, ssw_tot, big_n, k, feats, alpha)


def pooled_icc(rows: pd.DataFrame, request: Mapping, alpha: float = 0.05) -> ICCResult:
    """Oracle: ICC(1,1) from the pooled perturbed table (all sites' rows; ``case_col`` values must be
    unique across sites), computed directly on the (subjects × k × features) array."""
    cube = _icc_cube(rows, request, _where(None))
    n, k, _ = cube.shape
    flat = cube.reshape(n * k, -1)
    grand, _ = _centre(flat)                      # exact value for a constant feature
    subj, within = _centre(cube, axis=1)
    ssb = k * ((subj - grand) ** 2).sum(axis=0)
    ssw = (within ** 2).sum(axis=(0, 1))
    return icc_from_anova(ssb, ssw, n, k, list(request["features"]), alpha)


def robust_features(icc: Any, threshold: float = 0.9) -> list[str]:
    """Features whose ICC is at least ``threshold`` (Zwanenburg et al. 2019 use ICC ≥ 0.9 as
    "robust"), in input order.

    ``icc`` is a dict / Series keyed by feature or an :class:`ICCResult` (its ``icc`` column; its
    excluded features are never robust).  Pass ``result.table["ci_low"]`` to threshold the lower
    95 % bound instead.  A NaN raises: exclude undefined features first.
    """
    if isinstance(icc, ICCResult):
        icc = icc.icc
    s = _series(icc, "icc")
    nan = list(s.index[s.isna()])
    if nan:
        raise SelectionError(f"ICC is NaN for {nan}; drop these (no variation) before thresholding")
    return [str(f) for f, v in s.items() if v >= threshold]


# ----------------------------------------------------------------------------------------------
# 2. Pearson correlation and redundancy filter
# ----------------------------------------------------------------------------------------------
@dataclass
class CorrelationResult:
    """Pooled Pearson correlation; ``corr`` covers the kept features, ``excluded`` maps each constant
    feature (zero pooled variance, correlation undefined) to the reason."""

    corr: pd.DataFrame
    n: int
    mean: pd.Series
    excluded: dict[str, str] = field(default_factory=dict)


def _corr_from_cross(cxx: np.ndarray, n: int, mean: np.ndarray, feats: list[str]) -> CorrelationResult:
    diag = np.diag(cxx).copy()
    dead = diag <= 0
    excluded = {f: f"constant over all {n} rows, correlation undefined" for f, d in zip(feats, dead) if d}
    keep = np.flatnonzero(~dead)
    c = cxx[np.ix_(keep, keep)]
    sd = np.sqrt(np.diag(c))
    r = c / np.outer(sd, sd)
    r = np.clip((r + r.T) / 2, -1.0, 1.0)
    np.fill_diagonal(r, 1.0)
    names = [feats[j] for j in keep]
    return CorrelationResult(corr=pd.DataFrame(r, index=names, columns=names), n=int(n),
                             mean=pd.Series(mean, index=feats), excluded=excluded)


def site_correlation(rows: pd.DataFrame, request: Mapping, *, site: Any = None,
                     min_cell_size: int | None = None) -> dict:
    r"""Site aggregates for the pooled Pearson correlation matrix.

    Returns
    -------
    dict
        ``n``, ``mean`` (F) and the centred cross-product matrix
        ``cxx`` (F×F) :math:`= (X - \mathbf 1\bar x_s^\top)^\top (X - \mathbf 1\bar x_s^\top)`.
    """
    where = _where(site)
    feats = _check_request(request, "correlation")
    _check_rows(rows, feats, where)
    x = _numeric(rows, feats, "feature", where)
    _check_n(len(x), "rows", request, min_cell_size, where)
    mean, xc = _centre(x)
    return {"kind": _KINDS["correlation"] + ".stats", "version": _VERSION, "site": _py(site),
            "features": feats, "n": int(len(x)), "mean": mean, "cxx": xc.T @ xc}


def combine_correlation(aggregates: Sequence[Mapping]) -> CorrelationResult:
    r"""Server: :math:`C = \sum_s [C_s + n_s(\bar x_s - \bar x)(\bar x_s - \bar x)^\top]`,
    :math:`r_{jl} = C_{jl}/\sqrt{C_{jj}C_{ll}}`.  Constant features are excluded and reported."""
    feats = _same_features(aggregates, "correlation")
    n = np.array([a["n"] for a in aggregates], dtype=float)
    mean = np.array([np.asarray(a["mean"], dtype=float) for a in aggregates])
    cs = [np.asarray(a["cxx"], dtype=float) for a in aggregates]
    grand = (n[:, None] * mean).sum(axis=0) / n.sum()
    d = mean - grand
    cxx = np.sum(cs, axis=0) + (n[:, None] * d).T @ d
    const = _all_constant(mean, np.array([np.diag(c) for c in cs]))
    cxx[const, :] = 0.0
    cxx[:, const] = 0.0
    return _corr_from_cross(cxx, int(n.sum()), grand, feats)


def pooled_correlation(rows: pd.DataFrame, request: Mapping) -> CorrelationResult:
    """Oracle: ``np.corrcoef`` on the pooled rows (constant features excluded and reported)."""
    feats = _check_request(request, "correlation")
    where = _where(None)
    _check_rows(rows, feats, where)
    x = _numeric(rows, feats, "feature", where)
    const = np.all(x == x[:1], axis=0)
    keep = np.flatnonzero(~const)
    names = [feats[j] for j in keep]
    r = np.atleast_2d(np.corrcoef(x[:, keep], rowvar=False))
    return CorrelationResult(corr=pd.DataFrame(r, index=names, columns=names), n=len(x),
                             mean=pd.Series(x.mean(axis=0), index=feats),
                             excluded={feats[j]: f"constant over all {len(x)} rows, correlation undefined"
                                       for j in np.flatnonzero(const)})


def drop_redundant(corr: Any, association: Any, threshold: float = 0.9
                   ) -> tuple[list[str], list[tuple[str, str, float]]]:
    r"""Greedy redundancy filter: of every pair with :math:`|r| >` ``threshold`` keep the feature more
    associated with the outcome.

    Features are visited in decreasing :math:`|\text{association}|` (ties: the order of ``corr``); a
    feature is kept unless it correlates above the threshold with an already kept feature, in which
    case it is dropped in favour of the kept feature it correlates with most.  Hence the most
    associated feature is always kept, no kept pair exceeds the threshold, and every dropped feature
    has a kept, at least as strongly associated partner.  Deterministic.

    Parameters
    ----------
    corr : DataFrame or CorrelationResult
        Square correlation matrix (no NaN; exclude constant features first).
    association : dict or Series
        Larger = more associated with the outcome, e.g. ``|z|`` of the score test
        (:attr:`ScoreTestResult.association`); the absolute value is used, so a signed ``z`` can be
        passed.  Must cover every feature in ``corr``.
    threshold : float
        Pairs with :math:`|r|` strictly above it are redundant.

    Returns
    -------
    kept : list of str
        In the order of ``corr``.
    dropped : list of (dropped, kept_instead, r)
        In the order they were dropped; ``r`` is the signed correlation.
    """
    if isinstance(corr, CorrelationResult):
        corr = corr.corr
    if not isinstance(corr, pd.DataFrame) or list(corr.index) != list(corr.columns):
        raise SelectionError("corr must be a square DataFrame with the same features as index and columns")
    names = [str(c) for c in corr.columns]
    r = corr.to_numpy(dtype=float)
    if np.isnan(r).any():
        bad = [names[j] for j in np.flatnonzero(np.isnan(r).any(axis=0))]
        raise SelectionError(f"correlation is NaN for {bad[:10]}; exclude constant features first "
                             f"(combine_correlation reports them in .excluded)")
    assoc = _series(association, "association")
    missing = [f for f in names if f not in assoc.index]
    if missing:
        raise SelectionError(f"association missing for {missing[:10]}")
    a = np.abs(assoc.reindex(names).to_numpy(dtype=float))
    if np.isnan(a).any():
        raise SelectionError(f"association is NaN for {[f for f, v in zip(names, a) if np.isnan(v)][:10]}")
    order = sorted(range(len(names)), key=lambda j: (-a[j], j))
    kept_idx: list[int] = []
    dropped = []
    for j in order:
        if kept_idx:
            rk = np.abs(r[j, kept_idx])
            best = int(np.argmax(rk))
            if rk[best] > threshold:
                i = kept_idx[best]
                dropped.append((names[j], names[i], float(r[j, i])))
                continue
        kept_idx.append(j)
    return [names[j] for j in sorted(kept_idx)], dropped


# ----------------------------------------------------------------------------------------------
# 3. Univariate score tests and FDR
# ----------------------------------------------------------------------------------------------
@dataclass
class ScoreTestResult:
    """Univariate score tests, one per feature.

    ``table`` (index = all requested features): ``score`` U, ``variance`` (efficient information),
    ``z`` = U/√variance, ``chi2`` = z², ``p_value`` (χ², 1 df).  A feature without information
    (zero variance: constant, or constant within every stratum when stratified, or no events) has
    z = 0 and p = 1 and is listed with the reason in ``uninformative`` (it stays in the table so
    that FDR control counts it).
    """

    method: str
    table: pd.DataFrame
    n: int
    n_events: int
    stratified: bool
    uninformative: dict[str, str] = field(default_factory=dict)
    ties: str | None = None

    @property
    def pvalues(self) -> pd.Series:
        return self.table["p_value"]

    @property
    def z(self) -> pd.Series:
        return self.table["z"]

    @property
    def association(self) -> pd.Series:
        """|z|, for :func:`drop_redundant`."""
        return self.table["z"].abs()


def _score_table(u: np.ndarray, var: np.ndarray, feats: list[str], reason: str) -> tuple[pd.DataFrame, dict]:
    u = np.asarray(u, dtype=float)
    var = np.asarray(var, dtype=float)
    dead = ~(var > 0)
    safe = np.where(dead, 1.0, var)
    z = np.where(dead, 0.0, u / np.sqrt(safe))
    p = np.where(dead, 1.0, scipy.special.erfc(np.abs(z) / np.sqrt(2.0)))
    table = pd.DataFrame({"score": np.where(dead, 0.0, u), "variance": np.where(dead, 0.0, var), "z": z,
                          "chi2": z * z, "p_value": p}, index=pd.Index(feats, name="feature"))
    return table, {f: reason for f, d in zip(feats, dead) if d}


def _binary(rows: pd.DataFrame, col: str, kind: str, where: str) -> np.ndarray:
    y = _numeric(rows, [col], kind, where)[:, 0]
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise SelectionError(f"{kind} {col!r} {where} must be 0/1; {int(bad.sum())} rows have other values "
                             f"(e.g. {sorted(set(y[bad].tolist()))[:5]})")
    return y


def site_logistic_score(rows: pd.DataFrame, request: Mapping, *, site: Any = None,
                        min_cell_size: int | None = None) -> dict:
    r"""Site aggregates for the univariate logistic score tests.

    Returns
    -------
    dict
        ``n``, ``n_events`` (rows with y = 1) and per feature: ``mean`` :math:`\bar x_s`, ``sxx``
        :math:`= \sum_i (x_i-\bar x_s)^2`, ``sxy`` :math:`= \sum_i (x_i - \bar x_s)(y_i - \bar y_s)`.
        These serve both the global-intercept and the site-stratified null (chosen at the server).
    """
    where = _where(site)
    feats = _check_request(request, "logistic_score")
    _check_rows(rows, feats + [request["outcome"]], where)
    x = _numeric(rows, feats, "feature", where)
    y = _binary(rows, request["outcome"], "outcome", where)
    _check_n(len(x), "rows", request, min_cell_size, where)
    mean, xc = _centre(x)
    ybar = y.mean()
    return {"kind": _KINDS["logistic_score"] + ".stats", "version": _VERSION, "site": _py(site),
            "features": feats, "n": int(len(y)), "n_events": int(y.sum()), "mean": mean,
            "sxx": (xc * xc).sum(axis=0), "sxy": xc.T @ (y - ybar)}


def _logistic_pieces(aggregates: Sequence[Mapping], stratified: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(U, Var, pooled Sxx, N, events) for the global or site-stratified intercept-only null."""
    n = np.array([a["n"] for a in aggregates], dtype=float)
    ev = np.array([a["n_events"] for a in aggregates], dtype=float)
    mean = np.array([np.asarray(a["mean"], dtype=float) for a in aggregates])
    sxx = np.array([np.asarray(a["sxx"], dtype=float) for a in aggregates])
    sxy = np.array([np.asarray(a["sxy"], dtype=float) for a in aggregates])
    big_n, n_ev = n.sum(), ev.sum()
    _, grand, sxx_tot = _chan_merge(n, mean, sxx)
    d = mean - grand
    const = _all_constant(mean, sxx)
    sxx_tot[const] = 0.0
    if stratified:
        ybar_s = ev / n
        u = sxy.sum(axis=0)
        var = ((ybar_s * (1 - ybar_s))[:, None] * sxx).sum(axis=0)
    else:
        ybar = n_ev / big_n
        u = sxy.sum(axis=0) + (n[:, None] * d * (ev / n - ybar)[:, None]).sum(axis=0)
        u[const] = 0.0
        var = ybar * (1 - ybar) * sxx_tot
    return u, var, sxx_tot, int(big_n), int(n_ev)


def combine_logistic_score(aggregates: Sequence[Mapping], stratified: bool = True) -> ScoreTestResult:
    r"""Server: univariate logistic score tests from :func:`site_logistic_score` replies.

    Null model ``stratified=False``: one intercept, :math:`\hat\mu = \bar y`;
    :math:`U_j = \sum_i x_{ij}(y_i - \bar y) = \sum_s[S^{xy}_s + n_s(\bar x_s - \bar x)(\bar y_s - \bar y)]`,
    :math:`V_j = \bar y(1-\bar y)\sum_i(x_{ij}-\bar x_j)^2`.

    ``stratified=True`` (default; site effects are a nuisance): one intercept per site,
    :math:`\hat\mu_i = \bar y_s`; :math:`U_j = \sum_s S^{xy}_{s}`,
    :math:`V_j = \sum_s \bar y_s(1-\bar y_s) S^{xx}_s` — the efficient information after
    projecting out the intercepts, so both are exact score tests.  A site with a single outcome
    class contributes nothing to a stratified test.

    :math:`z = U/\sqrt V`, :math:`p = P(\chi^2_1 > z^2)`.
    """
    feats = _same_features(aggregates, "logistic_score")
    u, var, _, n, n_ev = _logistic_pieces(aggregates, stratified)
    if not stratified and n_ev in (0, n):
        raise SelectionError(f"the outcome has a single class over all {n} rows; no score test possible")
    reason = ("no within-site variation (or every site has a single outcome class)" if stratified
              else "constant over all rows")
    table, dead = _score_table(u, var, feats, reason)
    return ScoreTestResult("logistic", table, n, n_ev, bool(stratified), dead)


def pooled_logistic_score(rows: pd.DataFrame, request: Mapping, strata: str | None = None) -> ScoreTestResult:
    r"""Oracle: score test from pooled rows in matrix form.  With design :math:`Z` (intercept, or one
    indicator per stratum), fitted null means :math:`\hat\mu` (stratum event rates) and
    :math:`W = \mathrm{diag}(\hat\mu(1-\hat\mu))`: :math:`U = x^\top(y-\hat\mu)`,
    :math:`V = x^\top W x - x^\top W Z (Z^\top W Z)^{-1} Z^\top W x` (computed as the weighted
    residual sum of squares of :math:`x` on :math:`Z`)."""
    feats = _check_request(request, "logistic_score")
    where = _where(None)
    cols = feats + [request["outcome"]] + ([strata] if strata else [])
    _check_rows(rows, cols, where)
    x = _numeric(rows, feats, "feature", where)
    y = _binary(rows, request["outcome"], "outcome", where)
    if not strata and y.min() == y.max():
        raise SelectionError(f"the outcome has a single class over all {len(y)} rows; no score test possible")
    labels = rows[strata].to_numpy() if strata else np.zeros(len(y))
    codes, _ = pd.factorize(labels, sort=True)
    z = np.eye(codes.max() + 1)[codes]
    mu = z @ (np.bincount(codes, weights=y) / np.bincount(codes))
    w = mu * (1 - mu)
    u = x.T @ (y - mu)
    sw = np.sqrt(w)[:, None]
    # weighted residuals of x on Z; strata with w = 0 (one outcome class) drop out
    zw = z * sw
    coef, *_ = np.linalg.lstsq(zw, x * sw, rcond=None)
    res = x * sw - zw @ coef
    var = (res * res).sum(axis=0)
    # exact zeros for features constant within every informative stratum (as the federated path)
    informative = w > 0
    for j in range(len(feats)):
        xi, ci = x[informative, j], codes[informative]
        if all(np.all(xi[ci == c] == xi[ci == c][0]) for c in np.unique(ci)):
            var[j] = 0.0
    table, dead = _score_table(u, var, feats, "no variation")
    return ScoreTestResult("logistic", table, len(y), int(y.sum()), strata is not None, dead)


def site_linear_score(rows: pd.DataFrame, request: Mapping, *, site: Any = None,
                      min_cell_size: int | None = None) -> dict:
    r"""Site aggregates for the univariate linear-regression score tests of a continuous outcome: ``n``, ``ysum``
    :math:`\sum y`, ``syy`` :math:`\sum (y-\bar y_s)^2` and per feature ``mean``, ``sxx``, ``sxy`` (as
    :func:`site_logistic_score`)."""
    where = _where(site)
    feats = _check_request(request, "linear_score")
    _check_rows(rows, feats + [request["outcome"]], where)
    x = _numeric(rows, feats, "feature", where)
    y = _numeric(rows, [request["outcome"]], "outcome", where)[:, 0]
    _check_n(len(x), "rows", request, min_cell_size, where)
    mean, xc = _centre(x)
    yc = y - y.mean()
    return {"kind": _KINDS["linear_score"] + ".stats", "version": _VERSION, "site": _py(site),
            "features": feats, "n": int(len(y)), "ysum": float(y.sum()), "syy": float(yc @ yc), "mean": mean,
            "sxx": (xc * xc).sum(axis=0), "sxy": xc.T @ yc}


def _linear_pieces(aggregates: Sequence[Mapping], stratified: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(U, Var, pooled Sxx, N) of the Gaussian score test: U as the logistic one's, Var = σ̂² Sxx with σ̂² the
    maximum-likelihood residual variance of the null model (site intercepts, or one intercept)."""
    as_logistic = [{**a, "n_events": a["ysum"]} for a in aggregates]
    u, _, sxx_tot, n, _ = _logistic_pieces(as_logistic, stratified)
    ns = np.array([a["n"] for a in aggregates], dtype=float)
    syy = np.array([a["syy"] for a in aggregates], dtype=float)
    ybar_s = np.array([a["ysum"] for a in aggregates], dtype=float) / ns
    if stratified:
        sigma2 = syy.sum() / n
        sxx = np.array([np.asarray(a["sxx"], dtype=float) for a in aggregates]).sum(axis=0)
        sxx[_all_constant(np.array([np.asarray(a["mean"], dtype=float) for a in aggregates]),
                          np.array([np.asarray(a["sxx"], dtype=float) for a in aggregates]))] = 0.0
    else:
        ybar = float((ns * ybar_s).sum() / n)
        sigma2 = (syy.sum() + float((ns * (ybar_s - ybar) ** 2).sum())) / n
        sxx = sxx_tot
    return u, sigma2 * sxx, sxx_tot, int(n)


def combine_linear_score(aggregates: Sequence[Mapping], stratified: bool = True) -> ScoreTestResult:
    r"""Server: the Rao score test of each feature in a Gaussian linear model of a continuous outcome
    (:math:`z^2 = N R^2` of the feature against the null residuals), site-stratified by default:
    :math:`U_j = \sum_s S^{xy}_s`, :math:`V_j = \hat\sigma^2 \sum_s S^{xx}_s`, :math:`\hat\sigma^2 =
    \sum_s S^{yy}_s / N`."""
    feats = _same_features(aggregates, "linear_score")
    u, var, _, n = _linear_pieces(aggregates, stratified)
    reason = "no within-site variation" if stratified else "constant over all rows"
    table, dead = _score_table(u, var, feats, reason)
    return ScoreTestResult("linear", table, n, n, bool(stratified), dead)


def pooled_linear_score(rows: pd.DataFrame, request: Mapping, strata: str | None = None) -> ScoreTestResult:
    """Oracle of :func:`combine_linear_score` from pooled rows: x and y residualized on the strata (group means)."""
    feats = _check_request(request, "linear_score")
    where = _where(None)
    cols = feats + [request["outcome"]] + ([strata] if strata else [])
    _check_rows(rows, cols, where)
    x = _numeric(rows, feats, "feature", where)
    y = _numeric(rows, [request["outcome"]], "outcome", where)[:, 0]
    labels = rows[strata].to_numpy() if strata else np.zeros(len(y))
    codes, _ = pd.factorize(labels, sort=True)
    counts = np.bincount(codes).astype(float)
    xr = x - (np.stack([np.bincount(codes, weights=x[:, j]) for j in range(x.shape[1])], axis=1) / counts[:, None])[codes]
    yr = y - (np.bincount(codes, weights=y) / counts)[codes]
    u = xr.T @ yr
    var = (yr @ yr) / len(y) * (xr * xr).sum(axis=0)
    for j in range(len(feats)):  # exact zeros for a feature constant within every stratum (as the federated path)
        if all(np.all(x[codes == c, j] == x[codes == c, j][0]) for c in np.unique(codes)):
            var[j] = 0.0
    table, dead = _score_table(u, var, feats, "no variation")
    return ScoreTestResult("linear", table, len(y), len(y), strata is not None, dead)


def _cox_site_arrays(rows: pd.DataFrame, request: Mapping, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats = _check_request(request, "cox_score")
    _check_rows(rows, feats + [request["time"], request["event"]], where)
    x = _numeric(rows, feats, "feature", where)
    t = _numeric(rows, [request["time"]], "time column", where)[:, 0]
    e = _binary(rows, request["event"], "event column", where)
    return x, t, e


def _cox_score_info(x: np.ndarray, t: np.ndarray, e: np.ndarray, ties: str) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized score and information at β = 0 for one stratum (x already centred)."""
    p = x.shape[1]
    if not e.any():
        return np.zeros(p), np.zeros(p)
    order = np.argsort(t, kind="stable")
    ts, xs, es = t[order], x[order], e[order]
    # suffix sums over the risk set {t_i >= tau}
    s1 = np.cumsum(xs[::-1], axis=0)[::-1]
    s2 = np.cumsum((xs * xs)[::-1], axis=0)[::-1]
    n = len(ts)
    ev_times, inv = np.unique(ts[es == 1], return_inverse=True)
    start = np.searchsorted(ts, ev_times, side="left")     # first index with t >= tau
    r = (n - start).astype(float)                            # risk-set size
    m = len(ev_times)
    d = np.bincount(inv, minlength=m).astype(float)          # events at tau
    xe = xs[es == 1]
    d1 = np.zeros((m, p))
    d2 = np.zeros((m, p))
    np.add.at(d1, inv, xe)
    np.add.at(d2, inv, xe * xe)
    r1, r2 = s1[start], s2[start]
    if ties == "breslow":
        mean = r1 / r[:, None]
        var = r2 / r[:, None] - mean * mean
        u = (d1 - d[:, None] * mean).sum(axis=0)
        info = (d[:, None] * np.maximum(var, 0.0)).sum(axis=0)
        return u, info
    # Efron: the l-th of d tied events (l = 0..d-1) sees the risk set with the tied events
    # down-weighted to 1 - l/d; at beta = 0 its size is r - l.
    rep = np.repeat(np.arange(m), d.astype(int))
    ell = np.arange(len(rep)) - np.repeat(np.cumsum(d) - d, d.astype(int))
    frac = (ell / d[rep])[:, None]
    b = (r[rep] - ell)[:, None]
    a = r1[rep] - frac * d1[rep]
    c = r2[rep] - frac * d2[rep]
    mean = a / b
    var = np.maximum(c / b - mean * mean, 0.0)
    u = d1.sum(axis=0) - mean.sum(axis=0)
    return u, var.sum(axis=0)


def site_cox_score(rows: pd.DataFrame, request: Mapping, *, site: Any = None,
                   min_cell_size: int | None = None) -> dict:
    r"""Site aggregates for univariate Cox score tests, stratified by site, at :math:`\beta = 0`.

    For the site's stratum, with distinct event times :math:`t_m`, :math:`d_m` events (set
    :math:`D_m`) and risk set :math:`R_m = \{i: T_i \ge t_m\}` of size :math:`r_m`:

    * ``ties="breslow"``: :math:`U = \sum_m [\sum_{D_m} x_i - d_m \bar x_{R_m}]`,
      :math:`I = \sum_m d_m\,\mathrm{var}_{R_m}(x)` (population variance over the risk set) —
      the log-rank-type score; without ties it equals the log-rank test for a binary x.
    * ``ties="efron"`` (default; lifelines and R ``coxph``): the :math:`l`-th tied event
      (:math:`l = 0..d_m-1`) sees weights :math:`w_i = 1` on :math:`R_m\setminus D_m` and
      :math:`1 - l/d_m` on :math:`D_m`; with :math:`\mu_{ml}, \sigma^2_{ml}` the weighted mean
      and variance of x, :math:`U = \sum_m[\sum_{D_m} x_i - \sum_l \mu_{ml}]`,
      :math:`I = \sum_m\sum_l \sigma^2_{ml}` — the exact first and second derivatives of Efron's
      partial log-likelihood at :math:`\beta = 0`.  Without ties both coincide.

    The feature is centred on the site mean first (U and I are shift-invariant).

    Returns
    -------
    dict
        ``n``, ``n_events``, ``ties``, per feature ``u`` (F) and ``info`` (F); both additive over
        strata (sites).
    """
    where = _where(site)
    x, t, e = _cox_site_arrays(rows, request, where)
    _check_n(len(x), "rows", request, min_cell_size, where)
    mean, xc = _centre(x)
    u, info = _cox_score_info(xc, t, e, request.get("ties", "efron"))
    # mean and centred sum of squares: the pooled SD that scales the penalty path's start (penalty_path)
    return {"kind": _KINDS["cox_score"] + ".stats", "version": _VERSION, "site": _py(site),
            "features": list(request["features"]), "ties": request.get("ties", "efron"),
            "n": int(len(t)), "n_events": int(e.sum()), "u": u, "info": info,
            "mean": mean, "sxx": (xc * xc).sum(axis=0)}


def combine_cox_score(aggregates: Sequence[Mapping]) -> ScoreTestResult:
    r"""Server: site-stratified Cox score tests, :math:`U = \sum_s U_s`, :math:`I = \sum_s I_s`,
    :math:`z = U/\sqrt I`, :math:`p = P(\chi^2_1 > z^2)`."""
    feats = _same_features(aggregates, "cox_score")
    ties = {a.get("ties") for a in aggregates}
    if len(ties) != 1:
        raise SelectionError(f"sites used different ties handling {sorted(map(str, ties))}")
    u = np.sum([np.asarray(a["u"], dtype=float) for a in aggregates], axis=0)
    info = np.sum([np.asarray(a["info"], dtype=float) for a in aggregates], axis=0)
    n = int(sum(a["n"] for a in aggregates))
    n_ev = int(sum(a["n_events"] for a in aggregates))
    if n_ev == 0:
        raise SelectionError(f"no events at any site (n = {n}); no Cox score test possible")
    table, dead = _score_table(u, info, feats, "no variation within the risk sets of any event")
    return ScoreTestResult("cox", table, n, n_ev, True, dead, ties=ties.pop())


def pooled_cox_score(rows: pd.DataFrame, request: Mapping, strata: str | None = None) -> ScoreTestResult:
    """Oracle: the same score and information from pooled rows, by an explicit loop over the
    distinct event times of each stratum with the risk set's weights (O(n·events))."""
    where = _where(None)
    x, t, e = _cox_site_arrays(rows, request, where)
    ties = request.get("ties", "efron")
    labels = rows[strata].to_numpy() if strata else np.zeros(len(t))
    p = x.shape[1]
    u, info = np.zeros(p), np.zeros(p)
    for lab in pd.unique(labels):
        s = labels == lab
        xs, ts, es = x[s], t[s], e[s]
        for tau in np.unique(ts[es == 1]):
            risk = ts >= tau
            dead = (ts == tau) & (es == 1)
            d = int(dead.sum())
            u += xs[dead].sum(axis=0)
            for ell in range(d if ties == "efron" else 1):
                w = risk.astype(float)
                if ties == "efron":
                    w[dead] = 1.0 - ell / d
                wx = (w[:, None] * xs).sum(axis=0) / w.sum()
                wv = (w[:, None] * (xs - wx) ** 2).sum(axis=0) / w.sum()
                mult = 1 if ties == "efron" else d
                u -= mult * wx
                info += mult * wv
    const = np.array([all(np.all(x[labels == lab, j] == x[labels == lab, j][0]) for lab in pd.unique(labels))
                      for j in range(p)])
    info[const] = 0.0
    table, dead = _score_table(u, info, list(request["features"]), "no variation")
    return ScoreTestResult("cox", table, len(t), int(e.sum()), strata is not None, dead, ties=ties)


def benjamini_hochberg(pvalues: Any) -> Any:
    r"""Benjamini–Hochberg adjusted p-values (q-values).

    With sorted :math:`p_{(1)} \le \dots \le p_{(m)}`:
    :math:`q_{(i)} = \min_{k \ge i} \min(1, m\,p_{(k)}/k)`.  Rejecting :math:`q \le \alpha`
    controls the FDR at :math:`\alpha` for independent or positively dependent tests.  Equals
    ``scipy.stats.false_discovery_control(p, method="bh")``.

    Returns the same container type as given (Series/dict keyed by feature, or an array).
    """
    if isinstance(pvalues, ScoreTestResult):
        pvalues = pvalues.pvalues
    if isinstance(pvalues, (pd.Series, Mapping)):
        s = _series(pvalues, "pvalues")
        q = benjamini_hochberg(s.to_numpy())
        out = pd.Series(q, index=s.index, name="q_value")
        return out if isinstance(pvalues, pd.Series) else out.to_dict()
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise SelectionError(f"pvalues must be one-dimensional, got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise SelectionError(f"pvalues must be in [0, 1] without NaN; got {int(np.isnan(p).sum())} NaN and "
                             f"{int(((p < 0) | (p > 1)).sum())} out of range")
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    q = np.empty(m)
    q[order] = q_sorted
    return q


def screen(pvalues: Any, fdr: float = 0.05) -> list:
    """Features (in input order) with BH q-value ≤ ``fdr``; for an array input, their indices."""
    q = benjamini_hochberg(pvalues)
    if isinstance(q, pd.Series):
        return [str(f) for f, v in q.items() if v <= fdr]
    if isinstance(q, dict):
        return [f for f, v in q.items() if v <= fdr]
    return [int(i) for i in np.flatnonzero(q <= fdr)]


# ----------------------------------------------------------------------------------------------
# 4. Penalty path start for L1 / elastic-net logistic regression
# ----------------------------------------------------------------------------------------------
def _max_score(aggregates: Sequence[Mapping], standardize: bool, stratified: bool) -> tuple[float, int]:
    _same_features(aggregates, "logistic_score")
    u, _, sxx_tot, n, n_ev = _logistic_pieces(aggregates, stratified)
    if n_ev in (0, n):
        raise SelectionError(f"the outcome has a single class over all {n} rows; every penalty gives w = 0")
    if standardize:
        sd = np.sqrt(sxx_tot / n)
        u = np.where(sd > 0, u / np.where(sd > 0, sd, 1.0), 0.0)
    top = float(np.max(np.abs(u)))
    if top <= 0:
        raise SelectionError("every feature has zero score; no penalty path")
    return top, n


def c_min_logistic(aggregates: Sequence[Mapping], *, standardize: bool = True, l1_ratio: float = 1.0,
                   stratified: bool = False) -> float:
    r"""Largest sklearn ``C`` at which the L1 / elastic-net logistic fit is all zeros.

    sklearn minimizes :math:`C\sum_i \ell(y_i, x_i^\top w + b) + \rho\lVert w\rVert_1 +
    \frac{1-\rho}{2}\lVert w\rVert_2^2` (:math:`\rho` = ``l1_ratio``, intercept unpenalized).  At
    :math:`w = 0` the optimal intercept gives :math:`\hat\mu = \bar y` and the loss gradient is
    :math:`-U_j = -\sum_i x_{ij}(y_i - \bar y)`; the L2 term has zero gradient, so by the KKT
    conditions :math:`w = 0` is optimal iff :math:`C\,|U_j| \le \rho` for all j:

    .. math:: C_{min} = \rho / \max_j |U_j|.

    ``standardize=True`` uses the scores of standardized features (what ``StandardScaler`` gives:
    pooled mean, population sd), :math:`U_j/\mathrm{sd}_j`.  ``stratified=True`` uses the
    site-stratified score (for a model with unpenalized site intercepts).  Uses the
    :func:`site_logistic_score` replies (same round).
    """
    if not 0 < l1_ratio <= 1:
        raise SelectionError(f"l1_ratio must be in (0, 1], got {l1_ratio}")
    top, _ = _max_score(aggregates, standardize, stratified)
    return float(l1_ratio) / top


def lambda_max_logistic(aggregates: Sequence[Mapping], *, standardize: bool = True, l1_ratio: float = 1.0,
                        stratified: bool = False) -> float:
    r"""glmnet-style :math:`\lambda_{max}` for :math:`\frac1n\sum_i\ell_i + \lambda[\rho\lVert
    w\rVert_1 + \frac{1-\rho}2\lVert w\rVert_2^2]`: :math:`\lambda_{max} = \max_j|U_j| / (n\rho)
    = 1/(n\,C_{min})` (same conventions as :func:`c_min_logistic`)."""
    if not 0 < l1_ratio <= 1:
        raise SelectionError(f"l1_ratio must be in (0, 1], got {l1_ratio}")
    top, n = _max_score(aggregates, standardize, stratified)
    return top / (n * float(l1_ratio))


def penalty_grid(c_min: float, n: int = 20, ratio: float = 1e3) -> np.ndarray:
    """``n`` log-spaced sklearn ``C`` values from ``c_min`` (all coefficients zero) up to
    ``c_min * ratio`` (weakest penalty), increasing — a warm-start path order."""
    if not (np.isfinite(c_min) and c_min > 0):
        raise SelectionError(f"c_min must be a positive number, got {c_min}")
    if int(n) < 1 or not ratio >= 1:
        raise SelectionError(f"need n >= 1 and ratio >= 1, got n={n}, ratio={ratio}")
    return np.geomspace(c_min, c_min * ratio, int(n))


# ----------------------------------------------------------------------------------------------
# The study's data-driven penalty path (glmnet style, from the gradient at zero)
# ----------------------------------------------------------------------------------------------
#: an L2 (ridge) path has no all-zero point; as glmnet (which uses max(alpha, 1e-3)) it starts where an
#: elastic net with this L1 share would be all zeros
PATH_MIN_L1 = 1e-2


def standardized_scores(aggregates: Sequence[Mapping]) -> tuple[dict[str, float], int]:
    r"""``({feature: |U_j| / sd_j}, N)``: the gradient at zero of each standardized coefficient, from the
    sites' score-test replies of one request (:func:`site_logistic_score` or :func:`site_cox_score`).

    Logistic (the study's model has one intercept): :math:`U_j = \sum_i x_{ij}(y_i-\bar y)` and the
    population SD (ddof 0, as the fit's standardization); Cox (stratified by site, Efron ties): the
    stratified score at :math:`\beta = 0` and the ddof-1 SD (lifelines'). A constant feature scores 0."""
    if not aggregates:
        raise SelectionError("no site answered the score request; no penalty path")
    if all("syy" in a for a in aggregates):
        feats = _same_features(aggregates, "linear_score")
        u, _, sxx_tot, n = _linear_pieces(aggregates, stratified=False)
        sd = np.sqrt(sxx_tot / n)
    elif all("sxy" in a for a in aggregates):
        feats = _same_features(aggregates, "logistic_score")
        u, _, sxx_tot, n, _ = _logistic_pieces(aggregates, stratified=False)
        sd = np.sqrt(sxx_tot / n)
    else:
        feats = _same_features(aggregates, "cox_score")
        u = np.sum([np.asarray(a["u"], dtype=float) for a in aggregates], axis=0)
        ns = np.array([a["n"] for a in aggregates], dtype=float)
        mean = np.array([np.asarray(a["mean"], dtype=float) for a in aggregates])
        sxx = np.array([np.asarray(a["sxx"], dtype=float) for a in aggregates])
        n, _, sxx_tot = _chan_merge(ns, mean, sxx)
        sxx_tot[_all_constant(mean, sxx)] = 0.0
        sd = np.sqrt(sxx_tot / max(n - 1, 1))
    z = np.where(sd > 0, np.abs(u) / np.where(sd > 0, sd, 1.0), 0.0)
    return dict(zip(feats, (float(v) for v in z))), int(n)


def pooled_standardized_scores(rows: pd.DataFrame, endpoint: Mapping, features: Sequence[str],
                               strata: str = "site") -> tuple[dict[str, float], int]:
    """Pooled form of :func:`standardized_scores` from the training rows (``strata``: the site column)."""
    from fedrad.common.endpoints import of

    feats = list(features)
    u, sd = of(endpoint).standardized_score(rows, feats, strata)
    z = np.where(sd > 1e-300, np.abs(u) / np.where(sd > 1e-300, sd, 1.0), 0.0)
    return dict(zip(feats, (float(v) for v in z))), int(len(rows))


def penalty_path(top: float, n: int, model: str, penalty: str, l1_ratio: float, size: int = 12,
                 decades: float = 3.0) -> list[float]:
    r"""The penalty path of one (fold, model), strongest first: ``size`` log-spaced values over ``decades``.

    ``top`` = :math:`\max_j |U_j|/\mathrm{sd}_j` over the model's features (:func:`standardized_scores`),
    ``n`` the training rows, :math:`\rho` the L1 share (1 for L1, ``l1_ratio`` for the elastic net,
    ``max(rho, PATH_MIN_L1)``; L2 uses PATH_MIN_L1). Logistic (scikit-learn's C):
    :math:`C_0 = \rho/\mathrm{top}` (:func:`c_min_logistic`: every coefficient is zero at and below it), then
    growing by :math:`10^{decades/(size-1)}`; Cox (lifelines' penalizer):
    :math:`\lambda_0 = \mathrm{top}/(n\rho)` (glmnet's :math:`\lambda_{max}`), then shrinking."""
    if not (np.isfinite(top) and top > 0):
        raise SelectionError("every feature of the model has a zero score at zero (constant features?); "
                             "no penalty path")
    if int(size) < 2 or not decades > 0:
        raise SelectionError(f"need a path of at least 2 values over > 0 decades, got {size}, {decades}")
    rho = {"l1": 1.0, "elasticnet": float(l1_ratio)}.get(penalty, 0.0)
    rho = max(rho, PATH_MIN_L1)
    expo = [decades * i / (int(size) - 1) for i in range(int(size))]
    from fedrad.common.endpoints import BY_MODEL

    if model not in BY_MODEL:
        raise SelectionError(f"no penalty path for model {model!r} (one of {', '.join(BY_MODEL)})")
    return BY_MODEL[model].path(top, n, rho, expo)


# ----------------------------------------------------------------------------------------------
# Batching: several statistics in one round trip
# ----------------------------------------------------------------------------------------------
_SITE = {"icc": site_icc, "correlation": site_correlation, "logistic_score": site_logistic_score,
         "cox_score": site_cox_score, "linear_score": site_linear_score}
_BY_KIND = {v: k for k, v in _KINDS.items()}


def site_batch(rows: pd.DataFrame, requests: Mapping[str, Mapping], *, site: Any = None,
               perturbed_rows: pd.DataFrame | None = None, min_cell_size: int | None = None) -> dict:
    """Answer several selection requests in one reply: ``{name: site_*(...)}``.  ICC requests use
    ``perturbed_rows`` (the perturbed table), the others ``rows``."""
    from fedrad.common import leakage

    out = {}
    for name, req in requests.items():
        if req.get("kind") == leakage.KIND:  # the leakage screen's concordance counts
            out[name] = leakage.site_concordance(rows, req, site=site, min_cell_size=min_cell_size)
            continue
        method = _BY_KIND.get(req.get("kind"))
        if method is None:
            raise SelectionError(f"request {name!r} has unknown kind {req.get('kind')!r}")
        table = rows
        if method == "icc":
            if perturbed_rows is None:
                raise SelectionError(f"request {name!r} is an ICC request; pass perturbed_rows")
            table = perturbed_rows
        out[name] = _SITE[method](table, req, site=site, min_cell_size=min_cell_size)
    return out


def combine_batch(replies: Sequence[Mapping[str, Mapping]], *, stratified: bool = True) -> dict:
    """Server side of :func:`site_batch`: ``{name: combine_*([reply[name] for reply in replies])}``."""
    if not replies:
        raise SelectionError("no site replies to combine")
    from fedrad.common import leakage

    out = {}
    for name in replies[0]:
        aggs = [r[name] for r in replies]
        method = _BY_KIND.get(str(aggs[0].get("kind", "")).removesuffix(".stats"))
        if aggs[0].get("kind") == leakage.KIND + ".stats":
            out[name] = leakage.combine_concordance(aggs)
        elif method == "icc":
            out[name] = combine_icc(aggs)
        elif method == "correlation":
            out[name] = combine_correlation(aggs)
        elif method == "logistic_score":
            out[name] = combine_logistic_score(aggs, stratified=stratified)
        elif method == "cox_score":
            out[name] = combine_cox_score(aggs)
        elif method == "linear_score":
            out[name] = combine_linear_score(aggs, stratified=stratified)
        else:
            raise SelectionError(f"reply {name!r} has unknown kind {aggs[0].get('kind')!r}")
    return out
