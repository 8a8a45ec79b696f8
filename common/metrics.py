r"""Validation metrics for multi-center radiomics studies: site-local metrics, binned aggregates, meta-analysis.

Pure numpy/scipy, Flower-free.  Three layers:

* **Site-local metrics** (run at each hospital on its own rows; only the returned numbers leave the
  site): :func:`auc_delong`, :func:`delong_paired`, :func:`brier`, :func:`calibration` for a binary
  outcome (response); :func:`harrell_c`, :func:`c_paired`, :func:`risk_group_split` for a
  time-to-event outcome (OS/PFS).
* **Binned aggregates** (small count tables on a grid fixed by the coordinator) and their pooling:
  :func:`roc_bins` / :func:`suppress_small_cells` / :func:`pooled_roc` and :func:`km_bins` /
  :func:`pooled_km`.
* **Meta-analysis** at the coordinator: :func:`dersimonian_laird` (random effects, with the
  fixed-effect result) and :func:`pool_proportion_like` (AUC/C-index pooled on the logit scale).

Conventions
-----------
* Every metric function validates its inputs: arrays of different lengths, NaN/inf, labels or event
  indicators other than 0/1, probabilities outside [0, 1] raise :class:`ValueError` with a message
  naming the argument.  These are *programming/data errors*.
* A metric that is **undefined on the site's data** (one class only, no events, no comparable pairs,
  too few observations for a standard error, an infinite MLE) does *not* raise and does not return NaN:
  the dict has the same keys with ``None`` for the undefined values and a human-readable ``reason``.
  A single site's evaluation must not abort a multi-center study, and ``None`` survives the JSON
  payload codec (:mod:`fedrad.common.messages`) unambiguously, whereas NaN does not.  Every result
  dict carries ``reason`` (``None`` when everything is defined).
* Scalars are Python ``float``/``int``; count tables are numpy integer arrays.
* ``level`` is the two-sided confidence level (default 0.95); Wald intervals use
  :math:`z = \Phi^{-1}(1 - (1-\text{level})/2)`.

Binary outcome
--------------
**AUC and its DeLong variance.**  With :math:`m` positives (scores :math:`X_i`) and :math:`n`
negatives (:math:`Y_j`), :math:`\hat A = \frac{1}{mn}\sum_{i,j}\psi(X_i, Y_j)`,
:math:`\psi(x, y) = 1[x > y] + \tfrac12 1[x = y]` (the Mann-Whitney statistic; equals
``sklearn.metrics.roc_auc_score``).  DeLong, DeLong & Clarke-Pearson (Biometrics 1988; 44:837)
structural components :math:`V_{10}(X_i) = \frac1n\sum_j\psi(X_i, Y_j)`,
:math:`V_{01}(Y_j) = \frac1m\sum_i\psi(X_i, Y_j)` give

.. math:: \widehat{\mathrm{Var}}(\hat A) = \frac{S_{10}}{m} + \frac{S_{01}}{n},

:math:`S_{10}, S_{01}` the sample variances (ddof 1) of the components.  They are computed in
:math:`O(N\log N)` with midranks (Sun & Xu, IEEE Signal Process Lett 2014; 21:1389):
:math:`V_{10}(X_i) = (T_Z(X_i) - T_X(X_i))/n`, :math:`V_{01}(Y_j) = 1 - (T_Z(Y_j) - T_Y(Y_j))/m`,
with :math:`T_X, T_Y, T_Z` the midranks within positives, within negatives and in the combined
sample.  For two scores on the same patients (:func:`delong_paired`) the components give the
covariance matrix :math:`S = S_{10}/m + S_{01}/n` and
:math:`\mathrm{Var}(\hat A_a - \hat A_b) = S_{aa} + S_{bb} - 2S_{ab}`; the test is
:math:`z = (\hat A_a - \hat A_b)/\mathrm{SE}` (DeLong 1988).

The default CI (``ci_scale="linear"``) is the Wald interval :math:`\hat A \pm z\,\mathrm{SE}` on the
AUC scale clipped to [0, 1] (as R ``pROC::ci.auc(method="delong")``).  ``ci_scale="logit"`` gives
:math:`\mathrm{expit}(\mathrm{logit}\hat A \pm z\,\mathrm{SE}/(\hat A(1-\hat A)))` (delta method;
never leaves (0, 1), better coverage near 1 for small sites).  When :math:`\hat A \in \{0, 1\}`
the standard error is 0 and both intervals degenerate to :math:`[\hat A, \hat A]`.

**Brier score** :math:`\frac1N\sum_i (p_i - y_i)^2` (Brier 1950).

**Calibration** (Cox 1958; Van Calster et al., J Clin Epidemiol 2016; 74:167 and BMC Med 2019; 17:230)
with the linear predictor :math:`\mathrm{lp}_i = \mathrm{logit}(p_i)`:

* calibration slope :math:`b` from the logistic regression :math:`\mathrm{logit}\,P(y=1) = a + b\,\mathrm{lp}`;
* calibration-in-the-large (calibration intercept) :math:`a` from
  :math:`\mathrm{logit}\,P(y=1) = a + \mathrm{lp}` (``lp`` an offset, slope fixed at 1).

Both are maximum-likelihood fits by a damped Newton solver (2-D and 1-D), with model-based standard
errors from the inverse observed information.  Perfect calibration is :math:`a = 0, b = 1`.

**Binned ROC.**  The coordinator fixes score bin edges :math:`e_0 < \dots < e_K`; a site releases
the number of positives and negatives per bin (:func:`roc_bins`; bins :math:`[e_k, e_{k+1})`, the
last one closed; scores outside :math:`[e_0, e_K]` are counted in the first/last bin).  Summing the
tables over sites and sweeping the threshold down the bins gives the pooled empirical ROC curve
of the *binned* scores and its trapezoidal AUC (:func:`pooled_roc`), which is the Mann-Whitney AUC
with all scores in one bin treated as ties.  It equals the pooled-data AUC exactly when no bin holds
two different score values (e.g. scores on a grid and every score value a left bin edge), and is
within the within-bin tie mass otherwise.  :func:`suppress_small_cells` coarsens a table before
release (small-cell disclosure control); :func:`pooled_roc` re-bins tables with different
(merged) edges onto their common coarsening, which is exact.

Survival outcome
----------------
**Harrell's C** (Harrell et al., JAMA 1982; Stat Med 1996) for a risk score (higher risk = shorter
survival).  A pair :math:`(i, j)` is comparable when the shorter time is an event:
:math:`\delta_i = 1` and :math:`t_i < t_j`, or :math:`t_i = t_j` with :math:`\delta_i = 1,
\delta_j = 0` (an event and a censoring at the same time; two events at the same time are not
comparable).  Its concordance weight is :math:`1[r_i > r_j] + \frac12 1[r_i = r_j]`.  With
:math:`N_c` the summed weights and :math:`N_p` the number of comparable pairs,
:math:`C = N_c/N_p` -- exactly ``lifelines.utils.concordance_index(time, -risk, event)``.

Standard error: :math:`N_c/\binom n2` and :math:`N_p/\binom n2` are U-statistics, so :math:`C` is a
ratio of U-statistics; the Hoeffding projection and the delta method (the approach of Pencina &
D'Agostino, Stat Med 2004; 23:2109, extended to ties in the risk counted 1/2) give

.. math:: \widehat{\mathrm{Var}}(C) = \frac{n}{n-1}\sum_{i=1}^n \Big(\frac{a_i - C\,b_i}{N_p}\Big)^2,

where :math:`a_i` is the summed concordance weight and :math:`b_i` the number of comparable pairs
subject :math:`i` takes part in (:math:`\sum_i a_i = 2N_c`, :math:`\sum_i b_i = 2N_p`).  Without the
factor :math:`n/(n-1)` this is the infinitesimal-jackknife variance (the derivative of :math:`C`
with respect to a case weight is :math:`(a_i - C b_i)/N_p`); the factor is the usual ddof-1
correction of the projection's sample variance, as in DeLong's :math:`S_{10}, S_{01}`.  For two risk
scores on the same patients the comparable pairs are the same, and :func:`c_paired` uses the same
projection of the difference, :math:`\frac{n}{n-1}\sum_i (\mathrm{IF}^a_i - \mathrm{IF}^b_i)^2`.
Cost: :math:`O(n_{\text{events}}\cdot n)` time, in blocks of bounded memory.

**Risk-group split.**  ``high = risk > cutoff`` (a risk equal to the cutoff is *low*).  The hazard
ratio high vs low is :math:`e^{\hat\beta}` from the Cox partial likelihood of the group indicator
with Efron's tie correction (Efron 1977), fitted by a 1-D damped Newton; Wald CI
:math:`e^{\hat\beta \pm z\,\mathrm{SE}}` with SE from the observed information.  This is
``lifelines.CoxPHFitter`` on the single indicator.  When the MLE is infinite (monotone likelihood:
e.g. all events in one group) ``hr`` is ``None`` with a reason.  The log-rank test (Mantel 1966;
Peto & Peto 1972) uses :math:`O - E` of the high group and the hypergeometric variance
:math:`\sum_t d_t \frac{n_{1t}}{n_t}(1 - \frac{n_{1t}}{n_t})\frac{n_t - d_t}{n_t - 1}`, the
:math:`\chi^2_1` p-value -- as ``lifelines.statistics.logrank_test``.

**Binned Kaplan-Meier.**  With a time grid :math:`g_0 < \dots < g_K` fixed by the coordinator, a
site releases per grid point :math:`g_k` (:func:`km_bins`):

* ``events[k]``: events with :math:`g_{k-1} < t \le g_k` (:math:`g_{-1} = -\infty`),
* ``censored[k]``: censorings with :math:`g_k \le t < g_{k+1}` (:math:`g_{K+1} = +\infty`),
* ``at_risk[k]``: events with :math:`t > g_{k-1}` plus censorings with :math:`t \ge g_k`,

so that ``at_risk[k+1] = at_risk[k] - events[k] - censored[k]``.  This is exactly the risk-set
bookkeeping of the data with every **event time rounded up** and every **censoring time rounded
down** to the grid.  :func:`pooled_km` sums the tables over sites and applies the product-limit
estimator :math:`\hat S(g_k) = \prod_{l\le k}(1 - d_l/n_l)` with Greenwood's variance and the
log(-log) interval used by lifelines.  So the pooled curve is the Kaplan-Meier estimator of the
grouped data: it equals the Kaplan-Meier estimator of the pooled rows at the grid points whenever
all *event* times lie on grid points (censoring times arbitrary); otherwise each event is
dated up to the next grid point and censorings inside an interval leave the risk set at its start
(slightly conservative: risk sets are too small by the censorings that precede an event within
its interval).  A fine grid (e.g. monthly) makes the difference negligible.

Meta-analysis
-------------
Fixed effect: weights :math:`w_i = 1/s_i^2`, :math:`\hat\theta_F = \sum w_i\hat\theta_i/\sum w_i`,
:math:`\mathrm{SE} = (\sum w_i)^{-1/2}`, Cochran's :math:`Q = \sum w_i(\hat\theta_i - \hat\theta_F)^2`
(:math:`\chi^2_{k-1}` p-value).  DerSimonian & Laird (Control Clin Trials 1986; 7:177):
:math:`\hat\tau^2 = \max\{0, (Q - (k-1))/(\sum w_i - \sum w_i^2/\sum w_i)\}`, random-effects
weights :math:`1/(s_i^2 + \hat\tau^2)`.  :math:`I^2 = \max\{0, (Q - (k-1))/Q\}` (Higgins &
Thompson, Stat Med 2002; 21:1539); the 95% prediction interval uses :math:`t_{k-2}` (Higgins,
Thompson & Spiegelhalter, JRSS A 2009) for :math:`k \ge 3`.  :func:`pool_proportion_like` pools
an AUC or C-index on the logit scale, :math:`\mathrm{SE}_{\mathrm{logit}} = \mathrm{SE}/(\theta(1-\theta))`
(delta method), and back-transforms the pooled value and its interval with the expit.

Privacy note: the site-local metric values, their SEs and the count tables are aggregates, but small
sites can still leak information through them (e.g. a bin with one patient).  Use
:func:`suppress_small_cells` on ROC tables; Kaplan-Meier tables on a fine grid have the same issue
(choose a coarser grid for small sites) -- this module does not enforce a policy.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import scipy.special
import scipy.stats

__all__ = [
    "auc_delong",
    "delong_paired",
    "brier",
    "calibration",
    "roc_bins",
    "suppress_small_cells",
    "pooled_roc",
    "PooledROC",
    "harrell_c",
    "c_paired",
    "risk_group_split",
    "km_bins",
    "merge_km_bins",
    "pooled_km",
    "dersimonian_laird",
    "pool_proportion_like",
    "regression_metrics",
    "squared_error_paired",
    "pool_correlations",
    "calibration_groups",
]

_CI_SCALES = ("linear", "logit")
#: Pair-matrix elements per block in the C-index computation (bounded memory, ~32 MB per array).
_C_BLOCK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------
# input checks and small helpers
# ----------------------------------------------------------------------------------------------
def _vector(x: Any, name: str) -> np.ndarray:
    """1-D finite float array or ValueError naming the argument."""
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers: {exc}") from None
    if a.ndim == 2 and 1 in a.shape:
        a = a.ravel()
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/infinite value(s) (first at index "
                         f"{int(np.flatnonzero(bad)[0])}); drop or impute them before computing metrics")
    return a


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("inputs have different lengths: " + ", ".join(f"{k}={n}" for k, n in lengths.items()))


def _binary(x: Any, name: str) -> np.ndarray:
    a = _vector(x, name)
    bad = (a != 0) & (a != 1)
    if bad.any():
        raise ValueError(f"{name} must contain only 0/1 (or booleans); found {np.unique(a[bad])[:5].tolist()}")
    return a.astype(np.int8)


def _probabilities(x: Any, name: str) -> np.ndarray:
    a = _vector(x, name)
    if ((a < 0) | (a > 1)).any():
        raise ValueError(f"{name} must be probabilities in [0, 1]; found values in "
                         f"[{a.min():.6g}, {a.max():.6g}]")
    return a


def _check_level(level: float) -> float:
    level = float(level)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return level


def _z(level: float) -> float:
    return float(scipy.stats.norm.isf((1 - _check_level(level)) / 2))


def _check_scale(ci_scale: str) -> str:
    if ci_scale not in _CI_SCALES:
        raise ValueError(f"ci_scale must be one of {_CI_SCALES}, got {ci_scale!r}")
    return ci_scale


def _ci_unit(est: float, se: float, level: float, ci_scale: str) -> tuple[float, float]:
    """Wald CI of a quantity in [0, 1]: linear (clipped) or logit; degenerate at the bounds."""
    z = _z(level)
    if ci_scale == "linear":
        return max(0.0, est - z * se), min(1.0, est + z * se)
    if est <= 0.0 or est >= 1.0 or se == 0.0:
        return est, est
    lo = math.log(est / (1 - est))
    half = z * se / (est * (1 - est))
    return float(scipy.special.expit(lo - half)), float(scipy.special.expit(lo + half))


def _p_two_sided(diff: float, se: float) -> float:
    if se > 0:
        return float(2 * scipy.stats.norm.sf(abs(diff) / se))
    return 1.0 if diff == 0 else 0.0


# ----------------------------------------------------------------------------------------------
# AUC (DeLong, fast midrank algorithm)
# ----------------------------------------------------------------------------------------------
def _midranks(a: np.ndarray) -> np.ndarray:
    """``scipy.stats.rankdata(a, axis=1)`` (average ranks of ties) of a finite 2-D array, row by row: the same exact
    values (a tie group over sorted positions i..j gets (i + j) / 2, 1-based), without scipy's per-call overhead
    (a study ranks thousands of short score vectors)."""
    a = np.asarray(a, dtype=float)
    if a.ndim != 2 or not np.isfinite(a).all():
        return scipy.stats.rankdata(a, axis=1)
    out = np.empty(a.shape, dtype=float)
    for i, row in enumerate(a):
        order = np.argsort(row, kind="mergesort")
        s = row[order]
        edges = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1], [True])))
        out[i, order] = np.repeat((edges[:-1] + 1 + edges[1:]) / 2.0, np.diff(edges))
    return out


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and structural components for scores of shape (k, N) (Sun & Xu 2014).

    Returns ``auc`` (k,), ``v10`` (k, m) and ``v01`` (k, n).
    """
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    x, yy = scores[:, pos], scores[:, ~pos]
    tx = _midranks(x)
    ty = _midranks(yy)
    tz = _midranks(np.concatenate([x, yy], axis=1))
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return auc, v10, v01


_COMPONENTS: dict = {}


def _delong_rows(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_delong_components` of ``np.vstack(scores)``, each score's row computed once: the ranks of one row do
    not depend on the others, and a study compares every penalty variant of a model with every other's."""
    parts = []
    for score in scores:
        key = (y.tobytes(), np.ascontiguousarray(score, dtype=float).tobytes())
        if key not in _COMPONENTS:
            if len(_COMPONENTS) >= 512:
                _COMPONENTS.clear()
            _COMPONENTS[key] = _delong_components(y, np.asarray(score, dtype=float)[None, :])
        parts.append(_COMPONENTS[key])
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _delong_cov(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return s10 / m + s01 / n


def _class_guard(y: np.ndarray, need: int = 1) -> str | None:
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if m == 0 or n == 0:
        return (f"AUC undefined: only one class at this site ({m} positive, {n} negative)"
                if m + n else "AUC undefined: no observations")
    if need > 1 and (m < need or n < need):
        return (f"DeLong standard error needs at least {need} positives and {need} negatives "
                f"(have {m} and {n})")
    return None


def auc_delong(y: Any, score: Any, *, level: float = 0.95, ci_scale: str = "linear") -> dict:
    r"""AUC (ROC area) with the DeLong standard error and a Wald confidence interval.

    Parameters
    ----------
    y : array-like of {0, 1}
        Observed binary outcome (1 = positive, e.g. responder).
    score : array-like of float
        Predicted score; higher means more likely positive (probabilities or any monotone score).
    level : float, default 0.95
        Confidence level.
    ci_scale : {"linear", "logit"}, default "linear"
        ``"linear"``: :math:`\hat A \pm z\,SE` clipped to [0, 1] (the default, as pROC's DeLong
        interval); ``"logit"``: the interval on the logit scale (delta method) back-transformed.

    Returns
    -------
    dict
        ``auc``, ``se``, ``ci_low``, ``ci_high``, ``n_pos``, ``n_neg``, ``level``, ``ci_scale``,
        ``reason``.  With only one class at the site ``auc`` (and everything derived) is ``None`` and
        ``reason`` says why; with a single positive or single negative the AUC is returned but
        ``se`` and the interval are ``None`` (the DeLong variance needs two of each).

    Notes
    -----
    :math:`\hat A` is the Mann-Whitney statistic (ties count 1/2); variance
    :math:`S_{10}/m + S_{01}/n` (DeLong et al. 1988) by the midrank algorithm of Sun & Xu (2014).
    See the module docstring.

    Raises
    ------
    ValueError
        Different lengths, NaN/inf, labels other than 0/1, bad ``level`` or ``ci_scale``.
    """
    yv, s = _binary(y, "y"), _vector(score, "score")
    _same_length(y=yv, score=s)
    _check_level(level)
    _check_scale(ci_scale)
    m, n = int((yv == 1).sum()), int((yv == 0).sum())
    out = {"auc": None, "se": None, "ci_low": None, "ci_high": None, "n_pos": m, "n_neg": n,
           "level": level, "ci_scale": ci_scale, "reason": _class_guard(yv)}
    if out["reason"]:
        return out
    auc, v10, v01 = _delong_rows(yv, [s])
    out["auc"] = float(auc[0])
    reason = _class_guard(yv, need=2)
    if reason:
        out["reason"] = reason
        return out
    se = math.sqrt(max(float(_delong_cov(v10, v01)[0, 0]), 0.0))
    out["se"] = se
    out["ci_low"], out["ci_high"] = _ci_unit(out["auc"], se, level, ci_scale)
    return out


def delong_paired(y: Any, score_a: Any, score_b: Any, *, level: float = 0.95) -> dict:
    r"""Compare two correlated AUCs on the same patients (DeLong et al. 1988).

    Parameters
    ----------
    y : array-like of {0, 1}
    score_a, score_b : array-like of float
        Two scores for the same patients (e.g. radiomics model vs clinical model).
    level : float, default 0.95

    Returns
    -------
    dict
        ``auc_a``, ``auc_b``, ``diff`` (= auc_a − auc_b), ``se`` (of the difference), ``ci_low``,
        ``ci_high`` (Wald, clipped to [−1, 1]), ``z``, ``p`` (two-sided), ``corr`` (correlation of
        the two AUC estimates), ``n_pos``, ``n_neg``, ``level``, ``reason``.  One class: AUCs
        ``None``; fewer than two of a class: AUCs given, the rest ``None``.  Identical scores give
        ``se = 0``, ``p = 1``.

    Notes
    -----
    :math:`\mathrm{Var}(\hat A_a - \hat A_b) = S_{aa} + S_{bb} - 2S_{ab}` with
    :math:`S = S_{10}/m + S_{01}/n` the covariance matrix of the structural components
    (computed by midranks, Sun & Xu 2014); :math:`z = \text{diff}/SE`.
    """
    yv, a, b = _binary(y, "y"), _vector(score_a, "score_a"), _vector(score_b, "score_b")
    _same_length(y=yv, score_a=a, score_b=b)
    _check_level(level)
    m, n = int((yv == 1).sum()), int((yv == 0).sum())
    out = {"auc_a": None, "auc_b": None, "diff": None, "se": None, "ci_low": None, "ci_high": None,
           "z": None, "p": None, "corr": None, "n_pos": m, "n_neg": n, "level": level,
           "reason": _class_guard(yv)}
    if out["reason"]:
        return out
    auc, v10, v01 = _delong_rows(yv, [a, b])
    out["auc_a"], out["auc_b"] = float(auc[0]), float(auc[1])
    out["diff"] = diff = float(auc[0] - auc[1])
    reason = _class_guard(yv, need=2)
    if reason:
        out["reason"] = reason
        return out
    S = _delong_cov(v10, v01)
    var = float(S[0, 0] + S[1, 1] - 2 * S[0, 1])
    se = math.sqrt(max(var, 0.0))
    z = _z(level)
    out.update(se=se, ci_low=max(-1.0, diff - z * se), ci_high=min(1.0, diff + z * se),
               z=(diff / se if se > 0 else (0.0 if diff == 0 else None)), p=_p_two_sided(diff, se))
    denom = math.sqrt(S[0, 0] * S[1, 1])
    out["corr"] = float(S[0, 1] / denom) if denom > 0 else None
    return out


# ----------------------------------------------------------------------------------------------
# Brier score and calibration
# ----------------------------------------------------------------------------------------------
def brier(y: Any, p: Any) -> float:
    r"""Brier score :math:`\frac1N\sum_i (p_i - y_i)^2` (Brier 1950); lower is better.

    Defined for any non-empty data (also with one class).  Equals
    ``sklearn.metrics.brier_score_loss(y, p)``.

    Raises
    ------
    ValueError
        Empty input, different lengths, NaN/inf, labels other than 0/1, ``p`` outside [0, 1].
    """
    yv, pv = _binary(y, "y"), _probabilities(p, "p")
    _same_length(y=yv, p=pv)
    if len(yv) == 0:
        raise ValueError("brier: no observations")
    return float(np.mean((pv - yv) ** 2))


def _loglik_logistic(eta: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def _newton_logistic(X: np.ndarray, y: np.ndarray, offset: np.ndarray, beta0: np.ndarray,
                     tol: float = 1e-11, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, bool]:
    """Maximum-likelihood logistic regression with an offset by damped Newton (step halving).

    Returns ``beta``, the inverse observed information (covariance) and a convergence flag.
    """
    beta = beta0.astype(float).copy()
    eta = offset + X @ beta
    ll = _loglik_logistic(eta, y)
    for _ in range(max_iter):
        mu = scipy.special.expit(eta)
        grad = X.T @ (y - mu)
        H = (X * (mu * (1 - mu))[:, None]).T @ X
        try:
            step = np.linalg.solve(H, grad)
        except np.linalg.LinAlgError:
            return beta, np.full_like(H, np.nan), False
        t = 1.0
        while True:
            cand = beta + t * step
            eta_c = offset + X @ cand
            ll_c = _loglik_logistic(eta_c, y)
            if ll_c >= ll - 1e-12 * abs(ll) or t < 1e-10:
                break
            t /= 2
        beta, eta, ll = cand, eta_c, ll_c
        if np.max(np.abs(t * step)) < tol * (1 + np.max(np.abs(beta))):
            mu = scipy.special.expit(eta)
            H = (X * (mu * (1 - mu))[:, None]).T @ X
            return beta, np.linalg.inv(H), True
    return beta, np.full((len(beta), len(beta)), np.nan), False


def calibration(y: Any, p: Any) -> dict:
    r"""Calibration slope and calibration-in-the-large of predicted probabilities.

    Parameters
    ----------
    y : array-like of {0, 1}
    p : array-like of float in (0, 1)
        Predicted probabilities of the model being validated (0 and 1 are rejected: their logit is
        infinite -- clip them, e.g. to [1e-8, 1 − 1e-8], if the model outputs hard 0/1).

    Returns
    -------
    dict
        ``intercept`` (calibration-in-the-large :math:`a` of
        :math:`\mathrm{logit}\,P(y=1) = a + \mathrm{offset}(\mathrm{lp})`), ``se_intercept``,
        ``slope`` (:math:`b` of :math:`\mathrm{logit}\,P(y=1) = a' + b\,\mathrm{lp}`), ``se_slope``,
        ``slope_model_intercept`` (:math:`a'`), ``n``, ``n_events``, ``reason``;
        ``lp = logit(p)``.  Perfect calibration: intercept 0, slope 1.  One class: all ``None``.
        Separation of the classes by ``lp`` (infinite slope) or constant ``p`` (slope not
        identifiable): slope ``None`` (the intercept is still given).

    Notes
    -----
    The standard definitions (Cox 1958; Van Calster et al. 2016, 2019; Steyerberg, *Clinical
    Prediction Models*).  Maximum likelihood by damped Newton; SEs from the inverse observed
    information (Wald).
    """
    yv, pv = _binary(y, "y"), _probabilities(p, "p")
    _same_length(y=yv, p=pv)
    if ((pv == 0) | (pv == 1)).any():
        raise ValueError("calibration needs 0 < p < 1 (logit(p) is infinite at 0 and 1); clip the "
                         "predictions, e.g. np.clip(p, 1e-8, 1 - 1e-8)")
    n, ev = len(yv), int(yv.sum())
    out = {"intercept": None, "se_intercept": None, "slope": None, "se_slope": None,
           "slope_model_intercept": None, "n": n, "n_events": ev, "reason": None}
    if ev == 0 or ev == n:
        out["reason"] = (f"calibration undefined: only one class at this site ({ev} events of {n})"
                         if n else "calibration undefined: no observations")
        return out
    yf = yv.astype(float)
    lp = scipy.special.logit(pv)
    # calibration-in-the-large: intercept with offset lp
    a, cov, ok = _newton_logistic(np.ones((n, 1)), yf, lp, np.zeros(1))
    if not ok:  # cannot happen with both classes present (strictly concave, finite MLE)
        out["reason"] = "calibration intercept: Newton did not converge"
        return out
    out["intercept"], out["se_intercept"] = float(a[0]), float(math.sqrt(cov[0, 0]))
    # calibration slope
    if np.ptp(lp) == 0:
        out["reason"] = "calibration slope undefined: all predicted probabilities are equal"
        return out
    lp1, lp0 = lp[yv == 1], lp[yv == 0]
    if lp1.min() >= lp0.max() or lp1.max() <= lp0.min():
        out["reason"] = ("calibration slope undefined: logit(p) separates the two classes "
                         "(the maximum-likelihood slope is infinite)")
        return out
    ybar = ev / n
    start = np.array([math.log(ybar / (1 - ybar)), 0.0])
    beta, cov, ok = _newton_logistic(np.column_stack([np.ones(n), lp]), yf, np.zeros(n), start)
    if not ok:
        out["reason"] = "calibration slope: Newton did not converge"
        return out
    out.update(slope=float(beta[1]), se_slope=float(math.sqrt(cov[1, 1])),
               slope_model_intercept=float(beta[0]))
    return out


# ----------------------------------------------------------------------------------------------
# binned ROC
# ----------------------------------------------------------------------------------------------
def _edges(edges: Any, name: str = "edges") -> np.ndarray:
    e = np.asarray(edges, dtype=float)
    if e.ndim != 1 or len(e) < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 bin edges")
    if np.isnan(e).any():
        raise ValueError(f"{name} contains NaN")
    if not (np.diff(e) > 0).all():
        raise ValueError(f"{name} must be strictly increasing")
    return e


def roc_bins(y: Any, score: Any, edges: Any) -> dict:
    r"""Counts of positives and negatives per score bin (site-local aggregate for a pooled ROC).

    Parameters
    ----------
    y : array-like of {0, 1}
    score : array-like of float
    edges : array-like, strictly increasing, length K + 1
        Bin edges fixed by the coordinator (the same for every site), e.g.
        ``np.linspace(0, 1, 101)`` for probabilities.  Bins are :math:`[e_k, e_{k+1})` for
        :math:`k < K-1` and :math:`[e_{K-1}, e_K]`; scores below :math:`e_0` / above :math:`e_K`
        are counted in the first / last bin (so the table always sums to the site's N and the
        ordering of scores is preserved).

    Returns
    -------
    dict
        ``pos_counts``, ``neg_counts`` (int64 arrays of length K), ``edges`` (float array, K + 1),
        ``reason`` (``None``).  Defined for one class too (its counts are still valid for pooling).
    """
    yv, s = _binary(y, "y"), _vector(score, "score")
    _same_length(y=yv, score=s)
    e = _edges(edges)
    K = len(e) - 1
    idx = np.clip(np.searchsorted(e, s, side="right") - 1, 0, K - 1)
    pos = np.bincount(idx[yv == 1], minlength=K).astype(np.int64)
    neg = np.bincount(idx[yv == 0], minlength=K).astype(np.int64)
    return {"pos_counts": pos, "neg_counts": neg, "edges": e, "reason": None}


def _counts(tab: Mapping, key: str) -> np.ndarray:
    c = np.asarray(tab[key])
    if c.ndim != 1 or (c < 0).any() or not np.all(np.mod(c, 1) == 0):
        raise ValueError(f"{key} must be a 1-D array of non-negative integer counts")
    return c.astype(np.int64)


def suppress_small_cells(counts: Mapping, k: int, *, rule: str = "total") -> dict:
    r"""Merge neighbouring score bins until every released bin has at least ``k`` patients.

    Small-cell disclosure control for a :func:`roc_bins` table before it leaves the site.

    Parameters
    ----------
    counts : dict
        A :func:`roc_bins` result (``pos_counts``, ``neg_counts``, ``edges``).
    k : int, ≥ 1
        Minimum cell size.
    rule : {"total", "cells"}, default "total"
        ``"total"``: every merged bin has ``pos + neg >= k``.  ``"cells"``: additionally each of
        ``pos`` and ``neg`` in a merged bin is either 0 or ``>= k`` (stricter; note that a 0 next to
        a non-zero count still discloses that all patients of the bin share the outcome).

    Returns
    -------
    dict
        ``pos_counts``, ``neg_counts``, ``edges`` (a subset of the input edges that keeps the first
        and the last), ``reason``.  If the whole table cannot satisfy the rule (the site has fewer
        than ``k`` patients, or under ``"cells"`` fewer than ``k`` of a present class) nothing is
        released: the three arrays are ``None`` and ``reason`` says why (:func:`pooled_roc` skips
        such tables).

    Notes
    -----
    Deterministic greedy algorithm: scan the bins from low to high scores, close a group as soon as
    it satisfies the rule, and merge a trailing group that does not into its left neighbour
    (repeatedly).  For ``"total"`` the left-to-right greedy yields the maximum possible number of
    bins (an exchange argument: closing a group as early as possible never hurts later groups).
    Merging only removes edges, so sites coarsened differently can still be pooled exactly on the
    intersection of their edges (:func:`pooled_roc`).
    """
    if rule not in ("total", "cells"):
        raise ValueError(f"rule must be 'total' or 'cells', got {rule!r}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    k = int(k)
    pos, neg = _counts(counts, "pos_counts"), _counts(counts, "neg_counts")
    e = _edges(counts["edges"])
    if not (len(pos) == len(neg) == len(e) - 1):
        raise ValueError("pos_counts and neg_counts must have len(edges) - 1 entries")

    def ok(p: int, q: int) -> bool:
        if p + q < k:
            return False
        return rule == "total" or ((p == 0 or p >= k) and (q == 0 or q >= k))

    groups: list[list[int]] = []  # [start bin, end bin (exclusive), pos, neg]
    cur = [0, 0, 0, 0]
    for b in range(len(pos)):
        cur[1], cur[2], cur[3] = b + 1, cur[2] + int(pos[b]), cur[3] + int(neg[b])
        if ok(cur[2], cur[3]):
            groups.append(cur)
            cur = [b + 1, b + 1, 0, 0]
    if cur[1] > cur[0]:
        groups.append(cur)
    while len(groups) > 1 and not ok(groups[-1][2], groups[-1][3]):
        last = groups.pop()
        groups[-1] = [groups[-1][0], last[1], groups[-1][2] + last[2], groups[-1][3] + last[3]]
    if not groups or not ok(groups[-1][2], groups[-1][3]):
        return {"pos_counts": None, "neg_counts": None, "edges": None,
                "reason": f"table withheld: cannot reach cells >= {k} (rule {rule!r}) even with one bin "
                          f"({int(pos.sum())} positive, {int(neg.sum())} negative)"}
    new_edges = np.array([e[g[0]] for g in groups] + [e[-1]])
    return {"pos_counts": np.array([g[2] for g in groups], dtype=np.int64),
            "neg_counts": np.array([g[3] for g in groups], dtype=np.int64),
            "edges": new_edges, "reason": None}


class PooledROC(NamedTuple):
    """Pooled empirical ROC curve of binned scores (unpacks as ``fpr, tpr, auc``)."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def _rebin(counts: np.ndarray, edges: np.ndarray, common: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(common, edges[:-1], side="right") - 1
    return np.bincount(idx, weights=counts, minlength=len(common) - 1).astype(np.int64)


def pooled_roc(bin_counts: Sequence[Mapping]) -> PooledROC:
    r"""Pooled ROC curve and AUC from per-site :func:`roc_bins` tables (aggregated counts only).

    Parameters
    ----------
    bin_counts : sequence of dict
        One table per site with ``pos_counts``, ``neg_counts`` and (optionally) ``edges``.  Tables
        whose counts are ``None`` (withheld by :func:`suppress_small_cells`) are skipped.  When
        the tables carry ``edges`` and these differ (sites merged different bins), every table is
        re-binned onto the intersection of all edge sets -- exact, because merging only removes
        edges; the outer edges must agree.  Without ``edges`` all tables must have the same length.

    Returns
    -------
    PooledROC
        ``(fpr, tpr, auc)``: the ROC points obtained by lowering the threshold bin by bin from the
        highest score bin (starting at (0, 0), ending at (1, 1); one point per bin, so empty bins
        repeat a point) and the trapezoidal AUC, which equals the Mann-Whitney AUC of the pooled
        binned scores (scores in the same bin are ties).

    Raises
    ------
    ValueError
        No usable table, inconsistent bins, or no positives / no negatives in the pooled counts.
    """
    tabs = [t for t in bin_counts if t.get("pos_counts") is not None and t.get("neg_counts") is not None]
    if not tabs:
        raise ValueError("pooled_roc: no usable count tables")
    pos_l = [_counts(t, "pos_counts") for t in tabs]
    neg_l = [_counts(t, "neg_counts") for t in tabs]
    for p, q in zip(pos_l, neg_l):
        if len(p) != len(q):
            raise ValueError("pos_counts and neg_counts of a table have different lengths")
    has_edges = [t.get("edges") is not None for t in tabs]
    if any(has_edges) and not all(has_edges):
        raise ValueError("either all tables carry edges or none does")
    if all(has_edges):
        edges = [_edges(t["edges"]) for t in tabs]
        for e, p in zip(edges, pos_l):
            if len(e) != len(p) + 1:
                raise ValueError("a table's edges do not match its number of bins")
        if any(e[0] != edges[0][0] or e[-1] != edges[0][-1] for e in edges):
            raise ValueError("tables have different outer edges; they were not binned on the same grid")
        common = edges[0]
        for e in edges[1:]:
            common = np.intersect1d(common, e)
        pos = sum(_rebin(p, e, common) for p, e in zip(pos_l, edges))
        neg = sum(_rebin(q, e, common) for q, e in zip(neg_l, edges))
    else:
        if len({len(p) for p in pos_l}) > 1:
            raise ValueError("tables have different numbers of bins and no edges to reconcile them")
        pos, neg = sum(pos_l), sum(neg_l)
    P, N = int(pos.sum()), int(neg.sum())
    if P == 0 or N == 0:
        raise ValueError(f"pooled_roc: pooled counts have {P} positives and {N} negatives; ROC undefined")
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / P])
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / N])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return PooledROC(fpr, tpr, auc)


# ----------------------------------------------------------------------------------------------
# Harrell's C
# ----------------------------------------------------------------------------------------------
def _survival_inputs(time: Any, event: Any, **risks: Any) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    t, e = _vector(time, "time"), _binary(event, "event")
    rs = [_vector(v, k) for k, v in risks.items()]
    _same_length(time=t, event=e, **dict(zip(risks, rs)))
    if (t < 0).any():
        raise ValueError("time must be non-negative")
    return t, e, rs


def _c_components(time: np.ndarray, event: np.ndarray, risks: Sequence[np.ndarray]):
    """Per-subject concordance weights a_i (one array per risk) and comparable-pair counts b_i."""
    n = len(time)
    a = [np.zeros(n) for _ in risks]
    b = np.zeros(n)
    ev_idx = np.flatnonzero(event == 1)
    cens = event == 0
    block = max(1, _C_BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, len(ev_idx), block):
        I = ev_idx[start:start + block]
        ti = time[I][:, None]
        comp = (ti < time[None, :]) | ((ti == time[None, :]) & cens[None, :])
        compf = comp.astype(float)
        b[I] += compf.sum(axis=1)
        b += compf.sum(axis=0)
        for r, ar in zip(risks, a):
            ri = r[I][:, None]
            w = compf * ((ri > r[None, :]) + 0.5 * (ri == r[None, :]))
            ar[I] += w.sum(axis=1)
            ar += w.sum(axis=0)
    return a, b


def _c_guard(event: np.ndarray, n_pairs: float) -> str | None:
    if len(event) == 0:
        return "C-index undefined: no observations"
    if event.sum() == 0:
        return "C-index undefined: no events at this site"
    if n_pairs == 0:
        return "C-index undefined: no comparable pairs (no event precedes another follow-up time)"
    return None


def harrell_c(time: Any, event: Any, risk: Any, *, level: float = 0.95, ci_scale: str = "linear") -> dict:
    r"""Harrell's concordance index of a risk score for censored survival data, with a U-statistic SE.

    Parameters
    ----------
    time : array-like of float ≥ 0
        Follow-up time (OS/PFS).
    event : array-like of {0, 1}
        1 = event observed, 0 = censored.
    risk : array-like of float
        Risk score; higher = shorter expected survival (e.g. a Cox linear predictor).
    level : float, default 0.95
    ci_scale : {"linear", "logit"}, default "linear"
        Wald interval on the C scale clipped to [0, 1], or on the logit scale back-transformed.

    Returns
    -------
    dict
        ``c``, ``se``, ``ci_low``, ``ci_high``, ``n``, ``n_events``, ``n_pairs`` (comparable pairs),
        ``level``, ``ci_scale``, ``reason``.  No events or no comparable pairs: ``c`` etc. ``None``
        with a reason; ``n < 3``: ``c`` given, SE ``None``.

    Notes
    -----
    Comparable pairs and ties exactly as ``lifelines.utils.concordance_index(time, -risk, event)``
    (equal to it to rounding); variance
    :math:`\frac{n}{n-1}\sum_i ((a_i - C b_i)/N_p)^2` (Hoeffding projection of the ratio of
    U-statistics and the delta method, after Pencina & D'Agostino 2004).  See the module docstring.
    """
    t, e, (r,) = _survival_inputs(time, event, risk=risk)
    _check_level(level)
    _check_scale(ci_scale)
    n = len(t)
    out = {"c": None, "se": None, "ci_low": None, "ci_high": None, "n": n, "n_events": int(e.sum()),
           "n_pairs": 0, "level": level, "ci_scale": ci_scale, "reason": None}
    (a,), b = _c_components(t, e, [r])
    Np = b.sum() / 2
    out["n_pairs"] = int(round(Np))
    out["reason"] = _c_guard(e, Np)
    if out["reason"]:
        return out
    c = float(a.sum() / 2 / Np)
    out["c"] = c
    if n < 3:
        out["reason"] = "standard error needs at least 3 patients"
        return out
    infl = (a - c * b) / Np
    se = math.sqrt(n / (n - 1) * float(np.sum(infl ** 2)))
    out["se"] = se
    out["ci_low"], out["ci_high"] = _ci_unit(c, se, level, ci_scale)
    return out


def c_paired(time: Any, event: Any, risk_a: Any, risk_b: Any, *, level: float = 0.95) -> dict:
    r"""Difference of two Harrell C-indices on the same patients with a paired U-statistic SE.

    Parameters
    ----------
    time, event : array-like
        As in :func:`harrell_c`.
    risk_a, risk_b : array-like of float
        Two risk scores for the same patients.
    level : float, default 0.95

    Returns
    -------
    dict
        ``c_a``, ``c_b``, ``diff`` (= c_a − c_b), ``se`` (of the difference), ``ci`` (tuple),
        ``ci_low``, ``ci_high`` (Wald, clipped to [−1, 1]), ``z``, ``p`` (two-sided), ``n``,
        ``n_events``, ``n_pairs``, ``level``, ``reason``.

    Notes
    -----
    The comparable pairs do not depend on the risk score, so both C-indices share :math:`N_p` and
    :math:`b_i`; with :math:`\mathrm{IF}^x_i = (a^x_i - C_x b_i)/N_p`,
    :math:`\widehat{\mathrm{Var}}(C_a - C_b) = \frac{n}{n-1}\sum_i(\mathrm{IF}^a_i - \mathrm{IF}^b_i)^2`
    (the joint Hoeffding projection; the analogue of DeLong's paired test for censored data).
    Deterministic (no bootstrap).
    """
    t, e, (ra, rb) = _survival_inputs(time, event, risk_a=risk_a, risk_b=risk_b)
    _check_level(level)
    n = len(t)
    out = {"c_a": None, "c_b": None, "diff": None, "se": None, "ci": None, "ci_low": None,
           "ci_high": None, "z": None, "p": None, "n": n, "n_events": int(e.sum()), "n_pairs": 0,
           "level": level, "reason": None}
    (aa, ab), b = _c_components(t, e, [ra, rb])
    Np = b.sum() / 2
    out["n_pairs"] = int(round(Np))
    out["reason"] = _c_guard(e, Np)
    if out["reason"]:
        return out
    ca, cb = float(aa.sum() / 2 / Np), float(ab.sum() / 2 / Np)
    diff = ca - cb
    out.update(c_a=ca, c_b=cb, diff=diff)
    if n < 3:
        out["reason"] = "standard error needs at least 3 patients"
        return out
    d = ((aa - ca * b) - (ab - cb * b)) / Np
    se = math.sqrt(n / (n - 1) * float(np.sum(d ** 2)))
    z = _z(level)
    lo, hi = max(-1.0, diff - z * se), min(1.0, diff + z * se)
    out.update(se=se, ci=(lo, hi), ci_low=lo, ci_high=hi,
               z=(diff / se if se > 0 else (0.0 if diff == 0 else None)), p=_p_two_sided(diff, se))
    return out


# ----------------------------------------------------------------------------------------------
# risk-group split: Cox (Efron) on a binary indicator + log-rank
# ----------------------------------------------------------------------------------------------
def _event_time_tables(t: np.ndarray, e: np.ndarray, x: np.ndarray):
    """Per distinct event time: events d, events in group 1 d1, at risk n, at risk in group 1 n1."""
    times = np.unique(t[e == 1])
    order = np.argsort(t, kind="stable")
    ts, xs = t[order], x[order]
    first = np.searchsorted(ts, times, side="left")
    n_at = len(t) - first
    n1_at = np.concatenate([np.cumsum(xs[::-1])[::-1], [0]])[first]
    ev_t, ev_x = t[e == 1], x[e == 1]
    pos = np.searchsorted(times, ev_t)
    d = np.bincount(pos, minlength=len(times))
    d1 = np.bincount(pos, weights=ev_x, minlength=len(times))
    return d.astype(float), d1, n_at.astype(float), n1_at.astype(float)


def _efron_binary(beta: float, d, d1, n, n1) -> tuple[float, float, float]:
    """Efron log partial likelihood, score and information of a single 0/1 covariate."""
    eb = math.exp(beta)
    ll = beta * d1.sum()
    score = d1.sum()
    info = 0.0
    s0 = (n - n1) + n1 * eb  # risk-set sums
    s1 = n1 * eb             # = s2 for a 0/1 covariate
    t0 = (d - d1) + d1 * eb  # tied-event sums
    t1 = d1 * eb
    dmax = int(d.max()) if len(d) else 0
    for l in range(dmax):
        act = d > l
        frac = l / d[act]
        phi0 = s0[act] - frac * t0[act]
        phi1 = s1[act] - frac * t1[act]
        ll -= float(np.sum(np.log(phi0)))
        score -= float(np.sum(phi1 / phi0))
        q = phi1 / phi0
        info += float(np.sum(q - q * q))
    return ll, score, info


def risk_group_split(time: Any, event: Any, risk: Any, cutoff: float, *, level: float = 0.95) -> dict:
    r"""Hazard ratio (high vs low risk group) and log-rank test for a fixed risk cutoff.

    Parameters
    ----------
    time, event, risk : array-like
        As in :func:`harrell_c`.
    cutoff : float
        Pre-specified cutoff (e.g. the development-cohort median); ``high = risk > cutoff``.
    level : float, default 0.95

    Returns
    -------
    dict
        ``hr``, ``hr_ci`` (tuple), ``beta`` (log HR), ``se`` (of ``beta``), ``logrank_chi2``,
        ``logrank_p``, ``n_high``, ``n_low``, ``events_high``, ``events_low``, ``level``, ``reason``.
        Empty group or no events: ``hr`` and the test ``None``; infinite MLE (monotone likelihood,
        e.g. every event in one group): ``hr`` ``None`` but the log-rank test reported.

    Notes
    -----
    Cox partial likelihood with Efron ties for the indicator, 1-D Newton with step halving from
    :math:`\beta = 0` (stops at :math:`|\Delta\beta| < 10^{-12}`); Wald CI :math:`e^{\hat\beta \pm z SE}`.
    Log-rank: :math:`(O_1 - E_1)^2/V` with hypergeometric :math:`V`, :math:`\chi^2_1`.  Equals
    ``lifelines.CoxPHFitter`` on the indicator and ``lifelines.statistics.logrank_test``.
    """
    t, e, (r,) = _survival_inputs(time, event, risk=risk)
    _check_level(level)
    c = float(cutoff)
    if not math.isfinite(c):
        raise ValueError("cutoff must be finite")
    x = (r > c).astype(float)
    out = {"hr": None, "hr_ci": None, "beta": None, "se": None, "logrank_chi2": None, "logrank_p": None,
           "n_high": int(x.sum()), "n_low": int(len(x) - x.sum()),
           "events_high": int(e[x == 1].sum()), "events_low": int(e[x == 0].sum()),
           "level": level, "reason": None}
    if out["n_high"] == 0 or out["n_low"] == 0:
        out["reason"] = (f"one risk group is empty (high {out['n_high']}, low {out['n_low']}) "
                         f"at cutoff {c:g}")
        return out
    if e.sum() == 0:
        out["reason"] = "no events at this site"
        return out
    d, d1, n, n1 = _event_time_tables(t, e, x)
    # log-rank
    E1 = float(np.sum(d * n1 / n))
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(n > 1, d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1), 0.0)
    V = float(v.sum())
    if V > 0:
        chi2 = (float(d1.sum()) - E1) ** 2 / V
        out["logrank_chi2"], out["logrank_p"] = chi2, float(scipy.stats.chi2.sf(chi2, 1))
    # monotone likelihood: all score contributions have one sign in the limit
    high_at, low_at = n1 > 0, (n - n1) > 0
    lim_pos = d1 - d * high_at    # limit of each time's score as beta -> +inf (each <= 0)
    lim_neg = d1 - d * ~low_at    # as beta -> -inf (each >= 0)
    if np.all(lim_pos == 0) or np.all(lim_neg == 0):
        out["reason"] = ("hazard ratio not estimable: monotone partial likelihood (events occur in only "
                         "one group while the other is at risk); the MLE is infinite")
        return out
    beta = 0.0
    ll, score, info = _efron_binary(beta, d, d1, n, n1)
    for _ in range(100):
        step = score / info
        s = 1.0
        while True:
            cand = beta + s * step
            ll_c, score_c, info_c = _efron_binary(cand, d, d1, n, n1)
            if ll_c >= ll - 1e-12 * abs(ll) or s < 1e-10:
                break
            s /= 2
        beta, ll, score, info = cand, ll_c, score_c, info_c
        if abs(s * step) < 1e-12:
            break
    else:
        out["reason"] = "Cox Newton iteration did not converge"
        return out
    se = 1 / math.sqrt(info)
    z = _z(level)
    out.update(hr=math.exp(beta), hr_ci=(math.exp(beta - z * se), math.exp(beta + z * se)), beta=beta, se=se)
    return out


# ----------------------------------------------------------------------------------------------
# binned Kaplan-Meier
# ----------------------------------------------------------------------------------------------
def km_bins(time: Any, event: Any, grid: Any) -> dict:
    r"""Per-grid-point counts for a pooled Kaplan-Meier curve (site-local aggregate).

    Parameters
    ----------
    time : array-like of float ≥ 0
    event : array-like of {0, 1}
    grid : array-like, strictly increasing
        Time points :math:`g_0 < \dots < g_K` fixed by the coordinator (same for all sites), e.g.
        ``np.arange(0, 61)`` months.  Usually :math:`g_0 = 0`.

    Returns
    -------
    dict
        ``at_risk``, ``events``, ``censored`` (int64 arrays of length K + 1), ``grid``, ``reason``:

        * ``events[k]`` = events with :math:`g_{k-1} < t \le g_k` (``events[0]``: :math:`t \le g_0`);
          events after :math:`g_K` are not counted,
        * ``censored[k]`` = censorings with :math:`g_k \le t < g_{k+1}` (last: :math:`t \ge g_K`),
        * ``at_risk[k]`` = events with :math:`t > g_{k-1}` + censorings with :math:`t \ge g_k`,

        so ``at_risk[k+1] = at_risk[k] - events[k] - censored[k]`` (event times rounded up, censoring
        times rounded down to the grid).  Censorings before :math:`g_0` appear nowhere.
    """
    t, e, _ = _survival_inputs(time, event)
    g = _edges(grid, "grid")
    K1 = len(g)
    ev, ce = t[e == 1], t[e == 0]
    # events: index k with g_{k-1} < t <= g_k  -> searchsorted left; drop t > g_K
    ke = np.searchsorted(g, ev, side="left")
    events = np.bincount(ke[ke < K1], minlength=K1).astype(np.int64)
    # censorings: index k with g_k <= t < g_{k+1}; drop t < g_0
    kc = np.searchsorted(g, ce, side="right") - 1
    censored = np.bincount(kc[kc >= 0], minlength=K1).astype(np.int64)
    ev_sorted, ce_sorted = np.sort(ev), np.sort(ce)
    prev = np.concatenate([[-np.inf], g[:-1]])
    ev_after = len(ev_sorted) - np.searchsorted(ev_sorted, prev, side="right")   # events with t > g_{k-1}
    ce_from = len(ce_sorted) - np.searchsorted(ce_sorted, g, side="left")       # censorings with t >= g_k
    at_risk = (ev_after + ce_from).astype(np.int64)
    return {"at_risk": at_risk, "events": events, "censored": censored, "grid": g, "reason": None}


def merge_km_bins(bins: Mapping, k: int) -> dict | None:
    r"""Small-cell rule for :func:`km_bins`: merge neighbouring intervals until no released count is under ``k``.

    A released block's ``events`` and ``censored`` counts are each either 0 or at least ``k``. A block of grid
    indices :math:`a..b` is treated as one interval with :func:`km_bins`' convention: its events (times in
    :math:`(g_{a-1}, g_b]`) are dated up to :math:`g_b`, its censorings (times in :math:`[g_a, g_{b+1})`)
    down to :math:`g_a`, zeros in between. The table stays on the coordinator's grid, so sites' tables still
    add up (:func:`pooled_km`), and the curve is the Kaplan-Meier estimator of the data grouped that way
    (conservative as the grid itself: censorings leave the risk set at the start of their block). Blocks are
    closed greedily from the start; a remainder that cannot satisfy the rule joins the last block.

    Returns ``None`` (nothing released) when the table as a whole has fewer than ``k`` events or fewer than
    ``k`` patients; the ``merged`` key lists the kept grid points' indices.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ev, ce = _counts(bins, "events"), _counts(bins, "censored")
    at_risk = _counts(bins, "at_risk")
    K1 = len(ev)
    if ev.sum() < k or at_risk[0] < k:
        return None
    ok = lambda c: c == 0 or c >= k  # noqa: E731
    # interval j of the table = (g_{j-1}, g_j] for events and [g_j, g_{j+1}) for censorings; a merged block
    # [a, b] gets its events at b and its censorings at a.
    blocks, start, e_acc, c_acc = [], 0, 0, 0
    for j in range(K1):
        e_acc += int(ev[j])
        c_acc += int(ce[j])
        if ok(e_acc) and ok(c_acc):
            blocks.append([start, j, e_acc, c_acc])
            start, e_acc, c_acc = j + 1, 0, 0
    if start < K1:  # a remainder that cannot stand alone joins the last block
        if blocks:
            blocks[-1][1] = K1 - 1
            blocks[-1][2] += e_acc
            blocks[-1][3] += c_acc
        else:
            return None
    events, censored = np.zeros(K1, np.int64), np.zeros(K1, np.int64)
    for a, b, e_sum, c_sum in blocks:
        events[b] += e_sum   # events of (g_{a-1}, g_b] rounded up to g_b
        censored[a] += c_sum  # censorings of [g_a, g_{b+1}) rounded down to g_a
    risk = np.empty(K1, np.int64)
    risk[0] = at_risk[0]
    for j in range(K1 - 1):
        risk[j + 1] = risk[j] - events[j] - censored[j]
    out = dict(bins)
    out.update(at_risk=risk, events=events, censored=censored, merged=[int(b[1]) for b in blocks],
               reason=f"intervals merged so that every released count is 0 or >= {k}")
    return out


def pooled_km(bin_counts: Sequence[Mapping], *, level: float = 0.95) -> dict:
    r"""Pooled survival curve by the product-limit estimator over summed :func:`km_bins` tables.

    Parameters
    ----------
    bin_counts : sequence of dict
        Per-site :func:`km_bins` results on the same grid (``at_risk``, ``events``; ``grid``
        checked when present).
    level : float, default 0.95

    Returns
    -------
    dict
        ``time`` (the grid), ``survival`` :math:`\hat S(g_k) = \prod_{l \le k}(1 - d_l/n_l)`
        (a factor 1 where :math:`n_l = 0`), ``se`` (Greenwood:
        :math:`\hat S\sqrt{\sum_{l\le k} d_l/(n_l(n_l-d_l))}`), ``ci_low``, ``ci_high``
        (log(−log) interval, as lifelines' ``KaplanMeierFitter``), and the summed ``at_risk``,
        ``events``, ``censored``.  Where :math:`\hat S = 0` or 1 the SE/CI follow the limits
        (SE NaN once a risk set is exhausted, CI ``[S, S]`` before the first event).

    Notes
    -----
    Kaplan-Meier estimator of the grouped data (event times rounded up, censorings rounded down to
    the grid); equal to the Kaplan-Meier estimator of the pooled rows at the grid points when all
    event times are grid points.  See the module docstring.
    """
    _check_level(level)
    tabs = list(bin_counts)
    if not tabs:
        raise ValueError("pooled_km: no tables")
    grids = [np.asarray(t["grid"], dtype=float) for t in tabs if t.get("grid") is not None]
    if grids and any(len(g) != len(grids[0]) or not np.array_equal(g, grids[0]) for g in grids):
        raise ValueError("pooled_km: tables were computed on different grids")
    lens = {len(np.asarray(t["events"])) for t in tabs} | {len(np.asarray(t["at_risk"])) for t in tabs}
    if len(lens) != 1:
        raise ValueError("pooled_km: tables have different lengths")
    n = sum(_counts(t, "at_risk") for t in tabs).astype(float)
    d = sum(_counts(t, "events") for t in tabs).astype(float)
    cen = sum(_counts(t, "censored") for t in tabs) if all("censored" in t for t in tabs) else None
    if (d > n).any():
        raise ValueError("pooled_km: more events than patients at risk in some interval")
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(n > 0, 1 - d / n, 1.0)
        S = np.cumprod(factor)
        gw = np.cumsum(np.where((n > 0) & (d > 0), d / (n * (n - d)), 0.0))
        se = S * np.sqrt(gw)
        z = _z(level)
        logS = np.log(S)
        half = z * np.sqrt(gw) / logS
        lo = np.exp(-np.exp(np.log(-logS) - half))
        hi = np.exp(-np.exp(np.log(-logS) + half))
    ci_low = np.where(S >= 1, S, lo)
    ci_high = np.where(S >= 1, S, hi)
    out = {"time": grids[0] if grids else np.arange(len(S), dtype=float), "survival": S, "se": se,
           "ci_low": ci_low, "ci_high": ci_high, "at_risk": n.astype(np.int64), "events": d.astype(np.int64),
           "censored": cen, "reason": None}
    return out


# ----------------------------------------------------------------------------------------------
# meta-analysis (coordinator)
# ----------------------------------------------------------------------------------------------
def dersimonian_laird(estimates: Any, ses: Any, *, level: float = 0.95) -> dict:
    r"""Random-effects meta-analysis (DerSimonian & Laird 1986) with the fixed-effect result.

    Parameters
    ----------
    estimates : array-like of float
        Per-site estimates :math:`\hat\theta_i` (on the scale to pool: log HR, logit AUC, ...).
    ses : array-like of float > 0
        Their standard errors.
    level : float, default 0.95

    Returns
    -------
    dict
        Random effects: ``pooled``, ``se``, ``ci_low``, ``ci_high``, ``z``, ``p`` (H0: θ = 0),
        ``tau2``, ``tau``, ``pi_low``, ``pi_high`` (prediction interval, :math:`t_{k-2}`; ``None``
        for k < 3), ``weights`` (relative RE weights).  Heterogeneity: ``q``, ``q_df``, ``q_p``,
        ``i2`` (in [0, 1]), ``h2``.  Fixed effect: ``fe_pooled``, ``fe_se``, ``fe_ci_low``,
        ``fe_ci_high``, ``fe_weights``.  ``k``, ``level``, ``reason``.  For k = 1 the pooled value
        is the single estimate; ``tau2``, ``i2``, ``q_p`` are ``None``.

    Notes
    -----
    :math:`\hat\tau^2 = \max(0, (Q - (k-1))/(\sum w - \sum w^2/\sum w))`,
    :math:`I^2 = \max(0, (Q - (k-1))/Q)`.  Statsmodels' ``combine_effects(method_re="dl")`` does
    not truncate :math:`\tau^2` and :math:`I^2` at 0; the results agree whenever :math:`Q \ge k-1`.

    Raises
    ------
    ValueError
        Empty input, different lengths, NaN/inf/None, ``ses <= 0``.
    """
    _check_level(level)
    y, s = _vector(estimates, "estimates"), _vector(ses, "ses")
    _same_length(estimates=y, ses=s)
    k = len(y)
    if k == 0:
        raise ValueError("dersimonian_laird: no estimates")
    if (s <= 0).any():
        raise ValueError("ses must be > 0 (a zero standard error would get infinite weight)")
    z = _z(level)
    w = 1 / s ** 2
    W = w.sum()
    fe = float(np.sum(w * y) / W)
    fe_se = float(math.sqrt(1 / W))
    q = float(np.sum(w * (y - fe) ** 2))
    df = k - 1
    out: dict[str, Any] = {"k": k, "level": level, "q": q, "q_df": df, "reason": None}
    out.update(fe_pooled=fe, fe_se=fe_se, fe_ci_low=fe - z * fe_se, fe_ci_high=fe + z * fe_se,
               fe_weights=w / W)
    if k == 1:
        out.update(pooled=fe, se=fe_se, ci_low=fe - z * fe_se, ci_high=fe + z * fe_se,
                   z=fe / fe_se, p=float(2 * scipy.stats.norm.sf(abs(fe / fe_se))), tau2=None, tau=None,
                   pi_low=None, pi_high=None, weights=np.ones(1), q_p=None, i2=None, h2=None,
                   reason="a single estimate: nothing to pool, heterogeneity not estimable")
        return out
    c = W - np.sum(w ** 2) / W
    tau2 = max(0.0, (q - df) / c)
    wr = 1 / (s ** 2 + tau2)
    Wr = wr.sum()
    re = float(np.sum(wr * y) / Wr)
    se = float(math.sqrt(1 / Wr))
    if k >= 3:
        tq = float(scipy.stats.t.isf((1 - level) / 2, k - 2))
        half = tq * math.sqrt(tau2 + se ** 2)
        pi_low, pi_high = re - half, re + half
    else:
        pi_low = pi_high = None
    out.update(pooled=re, se=se, ci_low=re - z * se, ci_high=re + z * se, z=re / se,
               p=float(2 * scipy.stats.norm.sf(abs(re / se))), tau2=float(tau2), tau=math.sqrt(tau2),
               pi_low=pi_low, pi_high=pi_high, weights=wr / Wr, q_p=float(scipy.stats.chi2.sf(q, df)),
               i2=(max(0.0, (q - df) / q) if q > 0 else 0.0), h2=(q / df))
    return out


def pool_proportion_like(values: Sequence[Any], ses: Sequence[Any], *, level: float = 0.95,
                         exclude_degenerate: bool = False) -> dict:
    r"""Pool AUCs / C-indices (quantities in (0, 1)) across sites on the logit scale (DerSimonian-Laird).

    Parameters
    ----------
    values : sequence of float or None
        Per-site AUC / C (a ``None`` -- a site whose metric was undefined -- is excluded and listed).
    ses : sequence of float or None
        Their standard errors on the original scale (``None`` excluded likewise).
    level : float, default 0.95
    exclude_degenerate : bool, default False
        A value of exactly 0 or 1 or a zero SE has no finite logit-scale weight.  ``False``: raise
        ``ValueError`` (the coordinator decides); ``True``: exclude such sites and list them.

    Returns
    -------
    dict
        ``pooled``, ``ci_low``, ``ci_high``, ``pi_low``, ``pi_high`` (back-transformed from the logit
        scale with the expit), ``se`` (delta method: :math:`SE_{logit}\,\hat\theta(1-\hat\theta)`),
        ``fe_pooled``, ``fe_ci_low``, ``fe_ci_high`` (fixed effect, back-transformed), ``tau2`` (logit
        scale), ``i2``, ``q``, ``q_p``, ``k``, ``included`` (indices), ``excluded`` (list of
        ``(index, reason)``), ``logit`` (the full :func:`dersimonian_laird` result on the logit
        scale), ``level``, ``reason``.

    Notes
    -----
    :math:`\mathrm{logit}\,\hat\theta_i` with :math:`SE_i/(\hat\theta_i(1-\hat\theta_i))` (delta method),
    DerSimonian-Laird on that scale, back-transformation of the estimate and interval endpoints.
    """
    if len(values) != len(ses):
        raise ValueError(f"values and ses have different lengths: {len(values)} and {len(ses)}")
    keep, excluded, th, sd = [], [], [], []
    for i, (v, s) in enumerate(zip(values, ses)):
        if v is None or s is None:
            excluded.append((i, "metric undefined at this site (None)"))
            continue
        v, s = float(v), float(s)
        if not (math.isfinite(v) and math.isfinite(s)):
            raise ValueError(f"site {i}: value/SE must be finite, got {v}, {s}")
        if not 0 <= v <= 1 or s < 0:
            raise ValueError(f"site {i}: value must be in [0, 1] and SE >= 0, got {v}, {s}")
        if v in (0.0, 1.0) or s == 0:
            msg = f"value {v} / SE {s} has no finite logit-scale variance"
            if not exclude_degenerate:
                raise ValueError(f"site {i}: {msg}; pass exclude_degenerate=True to exclude such sites")
            excluded.append((i, msg))
            continue
        keep.append(i)
        th.append(v)
        sd.append(s)
    if not keep:
        raise ValueError("pool_proportion_like: no site with a usable value")
    th_a, sd_a = np.array(th), np.array(sd)
    dl = dersimonian_laird(scipy.special.logit(th_a), sd_a / (th_a * (1 - th_a)), level=level)
    ex = scipy.special.expit
    pooled = float(ex(dl["pooled"]))
    return {"pooled": pooled, "ci_low": float(ex(dl["ci_low"])), "ci_high": float(ex(dl["ci_high"])),
            "pi_low": None if dl["pi_low"] is None else float(ex(dl["pi_low"])),
            "pi_high": None if dl["pi_high"] is None else float(ex(dl["pi_high"])),
            "se": dl["se"] * pooled * (1 - pooled),
            "fe_pooled": float(ex(dl["fe_pooled"])), "fe_ci_low": float(ex(dl["fe_ci_low"])),
            "fe_ci_high": float(ex(dl["fe_ci_high"])), "tau2": dl["tau2"], "i2": dl["i2"], "q": dl["q"],
            "q_p": dl["q_p"], "k": dl["k"], "included": keep, "excluded": excluded, "logit": dl,
            "level": level, "reason": dl["reason"]}


def pooled_roc_interpolated(bin_counts: Sequence[Mapping]) -> PooledROC:
    r"""Pooled ROC from per-site binned counts whose bins were merged differently (approximate).

    :func:`pooled_roc` is exact but can only use the edges every site kept, which after small-cell merging
    may leave almost none. Here each site's number of positives (negatives) scoring at or above a threshold
    :math:`t` is interpolated linearly within its merged bins (scores assumed uniform inside a bin), on the
    union of all sites' edges; the sums over sites give TPR and FPR at every threshold, and the trapezoidal
    AUC. With identical edges at every site it equals :func:`pooled_roc`.
    """
    tabs = [t for t in bin_counts if t.get("pos_counts") is not None and t.get("neg_counts") is not None
            and t.get("edges") is not None]
    if not tabs:
        raise ValueError("pooled_roc_interpolated: no usable count tables with edges")
    thresholds = np.unique(np.concatenate([_edges(t["edges"]) for t in tabs]))[::-1]
    above_pos = np.zeros(len(thresholds))
    above_neg = np.zeros(len(thresholds))
    for t in tabs:
        e = _edges(t["edges"])
        for key, acc in (("pos_counts", above_pos), ("neg_counts", above_neg)):
            c = _counts(t, key).astype(float)
            at_or_above = np.concatenate([np.cumsum(c[::-1])[::-1], [0.0]])  # count >= each edge
            acc += np.interp(thresholds, e, at_or_above)
    if above_pos[-1] <= 0 or above_neg[-1] <= 0:
        raise ValueError("pooled_roc_interpolated: no positives or no negatives in the pooled counts")
    tpr = above_pos / above_pos[-1]
    fpr = above_neg / above_neg[-1]
    tpr = np.concatenate([[0.0], tpr]) if tpr[0] > 0 else tpr
    fpr = np.concatenate([[0.0], fpr]) if len(fpr) < len(tpr) else fpr
    return PooledROC(fpr=fpr, tpr=tpr, auc=float(np.trapezoid(tpr, fpr)))


# ----------------------------------------------------------------------------------------------
# Continuous outcomes: prediction error, calibration, correlation (per site) and their pooling
# ----------------------------------------------------------------------------------------------
#: Fieller, Hartley & Pearson (1957): var(atanh(Spearman rho)) ≈ 1.06 / (n - 3)
SPEARMAN_Z_VARIANCE = 1.06


def _correlation_entry(r: float, n: int, z_var: float, level: float, key: str) -> dict:
    out = {key: None, "se": None, "ci_low": None, "ci_high": None, "z": None, "z_se": None, "n": int(n),
           "reason": None}
    if n <= 3:
        out["reason"] = f"{n} patients: a correlation's interval needs at least 4"
        return out
    if not math.isfinite(r):
        out["reason"] = "correlation undefined (constant predictions or outcomes)"
        return out
    r = float(np.clip(r, -1.0, 1.0))
    z_se = math.sqrt(z_var / (n - 3))
    out[key] = r
    if abs(r) < 1.0:
        zz, q = math.atanh(r), _z(level)
        out.update(se=(1 - r * r) * z_se, ci_low=math.tanh(zz - q * z_se), ci_high=math.tanh(zz + q * z_se),
                   z=zz, z_se=z_se)
    else:
        out["reason"] = "|r| = 1: no finite Fisher-z interval"
    return out


def regression_metrics(y: Any, pred: Any, *, level: float = 0.95) -> dict:
    r"""Validation metrics of a continuous prediction ``pred`` of ``y`` on one site's rows.

    ``r2`` :math:`= 1 - \sum(y-\hat y)^2/\sum(y-\bar y)^2` (out-of-sample: about the site's own mean, so it can
    be negative), ``rmse``, ``mae``, ``sse`` and ``sst`` (for pooling), ``calibration``: intercept and slope of
    the OLS line :math:`y = a + b\hat y` (perfect: 0 and 1) with their SEs, and calibration-in-the-large
    :math:`\bar y - \bar{\hat y}`; ``pearson`` / ``spearman``: the correlation with its Fisher-z 95% interval
    (SE of z :math:`1/\sqrt{n-3}`; Spearman :math:`\sqrt{1.06/(n-3)}`, Fieller et al. 1957) and the delta-method SE
    on the r scale.
    """
    _check_level(level)
    yv, pv = _vector(y, "y"), _vector(pred, "pred")
    _same_length(y=yv, pred=pv)
    n = len(yv)
    if n < 2:
        raise ValueError(f"regression_metrics: {n} observation(s); need at least 2")
    res = yv - pv
    sse = float(res @ res)
    yc = yv - yv.mean()
    sst = float(yc @ yc)
    pc = pv - pv.mean()
    spp = float(pc @ pc)
    cal = {"intercept": None, "slope": None, "se_intercept": None, "se_slope": None,
           "in_the_large": float(yv.mean() - pv.mean()), "reason": None}
    if spp > 0 and n > 2:
        slope = float(pc @ yc) / spp
        a = float(yv.mean() - slope * pv.mean())
        s2 = float(np.sum((yv - a - slope * pv) ** 2)) / (n - 2)
        cal.update(intercept=a, slope=slope, se_slope=math.sqrt(s2 / spp),
                   se_intercept=math.sqrt(s2 * (1.0 / n + pv.mean() ** 2 / spp)))
    else:
        cal["reason"] = "constant predictions: no calibration slope"
    defined = spp > 0 and sst > 0
    pearson = float(pc @ yc) / math.sqrt(spp * sst) if defined else float("nan")
    spearman = float(scipy.stats.spearmanr(yv, pv)[0]) if defined else float("nan")
    return {"n": n, "r2": (1.0 - sse / sst) if sst > 0 else None, "rmse": math.sqrt(sse / n),
            "mae": float(np.abs(res).mean()), "sse": sse, "sst": sst, "calibration": cal,
            "pearson": _correlation_entry(pearson, n, 1.0, level, "r"),
            "spearman": _correlation_entry(spearman, n, SPEARMAN_Z_VARIANCE, level, "rho")}


def squared_error_paired(y: Any, pred_a: Any, pred_b: Any, *, level: float = 0.95) -> dict:
    r"""Paired comparison of two predictions of a continuous outcome on the same rows: ``diff``, the mean of
    :math:`d_i = (y_i-\hat y_{b,i})^2 - (y_i-\hat y_{a,i})^2` (positive: model a has the smaller squared error),
    its SE :math:`s_d/\sqrt n`, interval and two-sided p (normal)."""
    _check_level(level)
    yv, a, b = _vector(y, "y"), _vector(pred_a, "pred_a"), _vector(pred_b, "pred_b")
    _same_length(y=yv, pred_a=a, pred_b=b)
    n = len(yv)
    d = (yv - b) ** 2 - (yv - a) ** 2
    out = {"n": n, "diff": float(d.mean()), "se": None, "ci_low": None, "ci_high": None, "p": None,
           "reason": None}
    if n < 2:
        out["reason"] = "fewer than 2 patients"
        return out
    se = float(d.std(ddof=1)) / math.sqrt(n)
    q = _z(level)
    out.update(se=se, ci_low=out["diff"] - q * se, ci_high=out["diff"] + q * se,
               p=float(2 * scipy.stats.norm.sf(abs(out["diff"]) / se)) if se > 0 else None)
    return out


def pool_correlations(values: Sequence[Any], ns: Sequence[Any], *, z_var: float = 1.0, level: float = 0.95) -> dict:
    r"""Pool per-site correlations by DerSimonian-Laird on Fisher's z (:math:`\operatorname{atanh} r`, SE
    :math:`\sqrt{z_{var}/(n-3)}`), back-transformed with tanh (``z_var`` 1 for Pearson, 1.06 for Spearman).
    Sites with a missing r, n <= 3 or |r| = 1 are excluded and listed."""
    keep, excluded, zs, ses = [], [], [], []
    for i, (r, n) in enumerate(zip(values, ns)):
        if r is None or n is None or int(n) <= 3 or not abs(float(r)) < 1:
            excluded.append((i, "correlation undefined, |r| = 1 or n <= 3"))
            continue
        keep.append(i)
        zs.append(math.atanh(float(r)))
        ses.append(math.sqrt(z_var / (int(n) - 3)))
    if not keep:
        raise ValueError("pool_correlations: no site with a usable correlation")
    dl = dersimonian_laird(zs, ses, level=level)
    th = math.tanh
    pooled = th(dl["pooled"])
    return {"pooled": pooled, "ci_low": th(dl["ci_low"]), "ci_high": th(dl["ci_high"]),
            "pi_low": None if dl["pi_low"] is None else th(dl["pi_low"]),
            "pi_high": None if dl["pi_high"] is None else th(dl["pi_high"]),
            "se": dl["se"] * (1 - pooled * pooled), "fe_pooled": th(dl["fe_pooled"]),
            "tau2": dl["tau2"], "i2": dl["i2"], "q": dl["q"], "q_p": dl["q_p"], "k": dl["k"], "included": keep,
            "excluded": excluded, "fisher_z": dl, "level": level, "reason": dl["reason"]}


def calibration_groups(y: Any, pred: Any, min_cell_size: int, groups: int = 10) -> dict:
    """Observed against predicted for a calibration plot of a continuous outcome: the rows sorted by prediction and
    cut into ``min(groups, n // min_cell_size)`` groups of (nearly) equal size, each of at least ``min_cell_size``
    patients; per group ``n``, mean prediction and mean outcome (no cut point, which would be one patient's
    prediction, is released). Fewer than ``min_cell_size`` rows: nothing."""
    yv, pv = _vector(y, "y"), _vector(pred, "pred")
    _same_length(y=yv, pred=pv)
    g = min(int(groups), len(yv) // int(min_cell_size)) if min_cell_size > 0 else int(groups)
    if g < 1:
        return {"n": None, "mean_pred": None, "mean_obs": None,
                "reason": f"fewer than {min_cell_size} patients: no calibration groups"}
    order = np.argsort(pv, kind="stable")
    parts = np.array_split(order, g)
    return {"n": [int(len(ix)) for ix in parts], "mean_pred": [float(pv[ix].mean()) for ix in parts],
            "mean_obs": [float(yv[ix].mean()) for ix in parts], "reason": None}


# ----------------------------------------------------------------------------------------------
# Decision-curve analysis (Vickers & Elkin 2006) from released counts
# ----------------------------------------------------------------------------------------------
#: the threshold probabilities of the decision curves (fixed in the code: not a request parameter)
DCA_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 17))  # 0.05 .. 0.80


def decision_counts(bins: Mapping, thresholds: Sequence[float] = DCA_THRESHOLDS) -> dict:
    r"""A site's counts for the decision curve, from its released probability-binned ROC table (the bins of
    :func:`roc_bins` after :func:`suppress_small_cells`: each holds at least k patients; nothing beyond them is
    released). At a threshold :math:`t` that is an edge of the table, the true and false positives of "treat when
    :math:`p \ge t`" are the sums of the bins at or above it (``exact``); inside a merged bin they are interpolated
    linearly, as :func:`pooled_roc_interpolated` does (scores taken as uniform within the bin). ``n`` and
    ``positives``: the table's totals; everything None when the site withheld its table."""
    k_t = len(thresholds)
    edges = bins.get("edges")
    if edges is None or bins.get("pos_counts") is None:
        return {"thresholds": [float(t) for t in thresholds], "tp": [None] * k_t, "fp": [None] * k_t,
                "exact": [False] * k_t, "n": None, "positives": None}
    e = _edges(edges)
    pos, neg = _counts(bins, "pos_counts").astype(float), _counts(bins, "neg_counts").astype(float)
    tp, fp, exact = [], [], []
    for t in thresholds:
        j = int(np.clip(np.searchsorted(e, t + 1e-12, side="right") - 1, 0, len(pos) - 1))  # edges are linspace
        hit = abs(e[j] - t) <= 1e-12
        frac = 1.0 if hit else float(np.clip((e[j + 1] - t) / (e[j + 1] - e[j]), 0.0, 1.0))
        tp.append(float(pos[j + 1:].sum() + frac * pos[j]))
        fp.append(float(neg[j + 1:].sum() + frac * neg[j]))
        exact.append(bool(hit))
    return {"thresholds": [float(t) for t in thresholds], "tp": tp, "fp": fp, "exact": exact,
            "n": int(pos.sum() + neg.sum()), "positives": int(pos.sum())}


def net_benefit(tp: float, fp: float, n: float, t: float) -> float:
    r"""Net benefit of treating the predicted positives at threshold probability :math:`t`:
    :math:`TP/n - FP/n \cdot t/(1-t)`."""
    return tp / n - fp / n * t / (1.0 - t)


def pooled_decision_curve(tables: Sequence[Mapping]) -> dict:
    """Pooled net benefit at each threshold from the sites' :func:`decision_counts` (sums over every site that
    released its table), with treat-all over the same sites; ``exact`` where every site had the threshold as a bin
    edge (there the value equals the pooled rows'), else within merged bins interpolated."""
    tabs = [t for t in tables if t and t.get("n")]
    if not tabs:
        return {"thresholds": list(DCA_THRESHOLDS), "net_benefit": [None] * len(DCA_THRESHOLDS),
                "treat_all": [None] * len(DCA_THRESHOLDS), "exact": [False] * len(DCA_THRESHOLDS), "sites": 0,
                "reason": "no site released its probability-binned counts"}
    thresholds = list(tabs[0]["thresholds"])
    n = sum(x["n"] for x in tabs)
    pos = sum(x["positives"] for x in tabs)
    nb = [net_benefit(sum(x["tp"][j] for x in tabs), sum(x["fp"][j] for x in tabs), n, t)
          for j, t in enumerate(thresholds)]
    return {"thresholds": thresholds, "net_benefit": nb,
            "treat_all": [net_benefit(pos, n - pos, n, t) for t in thresholds],
            "exact": [all(x["exact"][j] for x in tabs) for j in range(len(thresholds))], "sites": len(tabs),
            "reason": None}


# ----------------------------------------------------------------------------------------------
# Decision-curve analysis for a survival endpoint at a time horizon (Vickers, Cronin, Elkin & Gonen,
# BMC Med Inform Decis Mak 2008; 8:53) from released counts
# ----------------------------------------------------------------------------------------------
def km_survival_at(time: Any, event: Any, horizon: float) -> float:
    r"""Kaplan-Meier survival at ``horizon``: :math:`\prod_{t_j \le h}(1 - d_j / n_j)` over the distinct event
    times (ties: all events at a time before its censorings, as lifelines' ``KaplanMeierFitter``); 1.0 for no
    patient. Beyond the last observed time it is the last value (lifelines' convention)."""
    t, e, _ = _survival_inputs(time, event)
    if not len(t):
        return 1.0
    ev = np.sort(t[(e == 1) & (t <= horizon)])
    if not len(ev):
        return 1.0
    times, d = np.unique(ev, return_counts=True)
    ts = np.sort(t)
    n_at = len(ts) - np.searchsorted(ts, times, side="left")  # at risk: time >= t_j
    return float(np.prod(1.0 - d / n_at))


def predicted_risk(lp: Any, cumhaz: float) -> np.ndarray:
    r"""Absolute risk of an event by the horizon, :math:`r_i = 1 - \exp(-H_0(h)\,e^{\mathrm{lp}_i})`, from the
    linear predictor (log partial hazard, centred as the model's) and a baseline cumulative hazard
    :math:`H_0(h) > 0` on the same centring."""
    lp = _vector(lp, "lp")
    if not (isinstance(cumhaz, (int, float, np.floating)) and math.isfinite(float(cumhaz)) and cumhaz > 0):
        raise ValueError(f"the baseline cumulative hazard must be a finite positive number, got {cumhaz!r}")
    return -np.expm1(-float(cumhaz) * np.exp(lp))


def _released_sizes(sizes: Sequence[int], n: int, k: int) -> list[bool]:
    """Which thresholds' treated groups (nested, non-increasing ``sizes`` out of ``n``) may be released: a
    greedy scan from the lowest threshold keeps a group when it and its difference from the last kept group (the
    whole site before the first) are each 0 or at least ``k`` (so every complement, and the patients between any
    two released groups, are 0 or at least ``k`` too)."""
    ok = lambda c: c == 0 or c >= k  # noqa: E731
    keep, last = [], n
    for m in sizes:
        good = ok(m) and ok(last - m)
        keep.append(good)
        if good:
            last = m
    return keep


def survival_decision_counts(lp: Any, time: Any, event: Any, *, horizon: float, cumhaz: float, k: int,
                             thresholds: Sequence[float] = DCA_THRESHOLDS) -> dict:
    r"""A held-out site's counts for the survival decision curve at ``horizon``.

    With the predicted risk :math:`r_i` of :func:`predicted_risk` (``cumhaz``: the baseline the coordinator sent,
    from the *training* sites), the site "treats" at threshold :math:`p` the patients with :math:`r_i \ge p` and
    releases their number :math:`m_p` and their Kaplan-Meier survival at the horizon :math:`\hat S_p(h)`
    (:func:`km_survival_at`), so that :math:`TP_p = m_p(1-\hat S_p)` and :math:`FP_p = m_p \hat S_p` (Vickers et
    al. 2008), and for treat-all its size ``n`` and :math:`\hat S(h)`.

    Small cells (the site's minimum cell size ``k``): the treated groups are nested; a threshold is withheld
    (``None``) unless its group and the patients between it and the previous released group (the whole site
    before the first) are each 0 or at least ``k`` (:func:`_released_sizes`), so whatever ``cumhaz`` is, every
    released number describes 0 or at least ``k`` patients and so does any difference of two of them. Nothing is
    released when the site has fewer than ``k`` patients. ``exact``: the threshold was released.
    """
    t, e, (lp,) = _survival_inputs(time, event, lp=lp)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not (isinstance(horizon, (int, float, np.floating)) and math.isfinite(float(horizon)) and horizon > 0):
        raise ValueError(f"the horizon must be a finite positive time, got {horizon!r}")
    n, kt = len(t), len(thresholds)
    out = {"thresholds": [float(p) for p in thresholds], "horizon": float(horizon), "n": None,
           "survival_all": None, "treated": [None] * kt, "survival": [None] * kt, "exact": [False] * kt}
    if n < k:
        out["reason"] = f"fewer than {int(k)} patients"
        return out
    risk = predicted_risk(lp, cumhaz)
    masks = [risk >= p for p in thresholds]
    keep = _released_sizes([int(m.sum()) for m in masks], n, int(k))
    out.update(n=int(n), survival_all=km_survival_at(t, e, horizon), reason=None)
    for j, (m, good) in enumerate(zip(masks, keep)):
        if good:
            out["treated"][j] = int(m.sum())
            out["survival"][j] = km_survival_at(t[m], e[m], horizon) if m.any() else 1.0
            out["exact"][j] = True
    return out


def _interpolate_withheld(p: np.ndarray, values: list, end0: float) -> np.ndarray:
    """A site's TP (or FP) at every threshold: the released ones as they are, a withheld one linear in the threshold
    between the neighbouring released ones (treat-all at threshold 0 below the first); NaN above the last released
    one (the few patients left there are unknown: no value)."""
    xs = np.concatenate([[0.0], p[[v is not None for v in values]]])
    ys = np.concatenate([[end0], [v for v in values if v is not None]])
    return np.array([v if v is not None else float(np.interp(q, xs, ys)) if q <= xs[-1] else np.nan
                     for q, v in zip(p, values)], dtype=float)


def pooled_survival_decision_curve(tables: Sequence[Mapping]) -> dict:
    r"""Pooled net benefit at each threshold from the held-out sites' :func:`survival_decision_counts`, stratified
    by site: :math:`TP_p = \sum_s m_{s,p}(1 - \hat S_{s,p}(h))`, :math:`FP_p = \sum_s m_{s,p}\hat S_{s,p}(h)`,
    :math:`NB_p = TP_p/N - FP_p/N \cdot p/(1-p)`, treat-all from :math:`\sum_s n_s(1-\hat S_s(h))` (each site's
    own Kaplan-Meier: censoring differs between hospitals). A threshold a site withheld is interpolated linearly in
    the threshold between its released neighbours (``exact`` False there; None above a site's last released
    threshold). Equal to :func:`decision_curve_on_rows` on the pooled rows wherever every site released the
    threshold."""
    tabs = [t for t in tables if t and t.get("n")]
    k_t = len(DCA_THRESHOLDS)
    if not tabs:
        return {"thresholds": list(DCA_THRESHOLDS), "net_benefit": [None] * k_t, "treat_all": [None] * k_t,
                "exact": [False] * k_t, "sites": 0, "horizon": None,
                "reason": "no held-out site released its decision-curve counts"}
    p = np.asarray(tabs[0]["thresholds"], dtype=float)
    horizons = {float(t["horizon"]) for t in tabs}
    if len(horizons) != 1 or any(list(t["thresholds"]) != list(tabs[0]["thresholds"]) for t in tabs):
        raise ValueError("pooled_survival_decision_curve: the sites used different horizons or thresholds")
    n = sum(t["n"] for t in tabs)
    tp, fp, events_all = np.zeros(len(p)), np.zeros(len(p)), 0.0
    for t in tabs:
        s_all = float(t["survival_all"])
        tp_s = [None if m is None else m * (1.0 - s) for m, s in zip(t["treated"], t["survival"])]
        fp_s = [None if m is None else m * s for m, s in zip(t["treated"], t["survival"])]
        tp += _interpolate_withheld(p, tp_s, t["n"] * (1.0 - s_all))
        fp += _interpolate_withheld(p, fp_s, t["n"] * s_all)
        events_all += t["n"] * (1.0 - s_all)
    return {"thresholds": [float(q) for q in p], "horizon": horizons.pop(), "sites": len(tabs), "reason": None,
            "net_benefit": [None if np.isnan(a) else net_benefit(a, b, n, q) for a, b, q in zip(tp, fp, p)],
            "treat_all": [net_benefit(events_all, n - events_all, n, q) for q in p],
            "exact": [all(t["exact"][j] for t in tabs) for j in range(len(p))]}


def decision_curve_on_rows(lp: Any, time: Any, event: Any, site: Any, cumhaz: float, horizon: float,
                           thresholds: Sequence[float] = DCA_THRESHOLDS) -> dict:
    r"""The centralized twin of :func:`pooled_survival_decision_curve`: the same site-stratified net benefit
    computed directly on the pooled rows (``site``: each row's site; no cell is withheld)."""
    t, e, (lp,) = _survival_inputs(time, event, lp=lp)
    site = np.asarray(site)
    risk = predicted_risk(lp, cumhaz)
    n = len(t)
    tp, fp, ev_all = np.zeros(len(thresholds)), np.zeros(len(thresholds)), 0.0
    for s in np.unique(site):
        at = site == s
        ev_all += at.sum() * (1.0 - km_survival_at(t[at], e[at], horizon))
        for j, p in enumerate(thresholds):
            m = at & (risk >= p)
            s_m = km_survival_at(t[m], e[m], horizon)
            tp[j] += m.sum() * (1.0 - s_m)
            fp[j] += m.sum() * s_m
    return {"thresholds": [float(p) for p in thresholds],
            "net_benefit": [net_benefit(a, b, n, p) for a, b, p in zip(tp, fp, thresholds)],
            "treat_all": [net_benefit(ev_all, n - ev_all, n, p) for p in thresholds]}
