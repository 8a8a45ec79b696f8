r"""Penalized logistic regression fitted from per-site aggregates; equal to scikit-learn on pooled data.

Sites (hospitals) never share patient rows.  Each round trip the server sends a small request and
every site answers with sums over its own rows (counts, sums, centred cross-products, gradients,
Hessians).  Pure numpy/scipy, Flower-free: the Flower handlers call :func:`site_logistic` at the
sites and drive a :class:`LogisticServer` at the coordinator, exactly like the in-process driver
:func:`fit_federated`.  :func:`fit_pooled` is the same estimator on pooled rows (the test oracle).

Model and objective (scikit-learn 1.9 ``LogisticRegression``, binary, ``fit_intercept=True``)
-------------------------------------------------------------------------------------------------
Features are standardized with the *global* mean and population SD (``ddof=0``, as
``sklearn.preprocessing.StandardScaler``): :math:`z_{ij} = (x_{ij} - \mu_j)/s_j`.  With
:math:`\eta_i = b + z_i^\top w`, labels :math:`y_i \in \{0, 1\}` and
:math:`\ell_i = \log(1 + e^{\eta_i}) - y_i\eta_i` (log loss), we minimize

.. math:: F(b, w) = C \sum_i \ell_i + \frac{1-\rho}{2}\lVert w\rVert_2^2 + \rho\lVert w\rVert_1

with the intercept :math:`b` unpenalized: ``penalty="l2"`` is :math:`\rho = 0`, ``"l1"`` is
:math:`\rho = 1`, ``"elasticnet"`` is :math:`\rho` = ``l1_ratio``; ``penalty=None`` minimizes
:math:`\sum_i \ell_i` (maximum likelihood).  This is scikit-learn's objective (user guide
"Logistic regression": :math:`\min_w C\sum_i s_i\ell_i + r(w)`, equivalently
:math:`\frac1S\sum_i s_i\ell_i + r(w)/(SC)`).  scikit-learn ≥ 1.8 deprecates ``penalty`` (removed
in 1.10): the same models are ``LogisticRegression(C=C, l1_ratio=ρ)`` with ``l1_ratio=0`` for L2,
``1`` for L1, and ``C=np.inf`` for no penalty (:meth:`LogisticModel.sklearn_params`).  Solvers
that match it exactly: ``newton-cholesky``/``lbfgs`` (L2, none) and ``saga`` (all); *not*
``liblinear``, which also penalizes the intercept.  Coefficients on the original scale are
:math:`w_j/s_j` and intercept :math:`b - \sum_j w_j\mu_j/s_j`.

Why the aggregates are exact
----------------------------
:math:`\sum_i \ell_i`, its gradient :math:`\sum_i (p_i - y_i)a_i` and Hessian
:math:`\sum_i p_i(1-p_i)a_ia_i^\top` (:math:`a_i = (1, z_i)`, :math:`p_i = \sigma(\eta_i)`) are sums
over rows, so the server adds the sites' sums.  Round 1 needs no β: at
:math:`\beta_0 = (\operatorname{logit}\bar y, 0)` every :math:`p_i = \bar y`, so with
:math:`M = \sum_i (x_i-\mu)(x_i-\mu)^\top` and :math:`u = \sum_i y_i(x_i-\mu)`

.. math:: g_0 = (0,\; -u/s), \qquad H_0 = \bar y(1-\bar y)\begin{pmatrix} N & 0 \\ 0 & M/(ss^\top)\end{pmatrix},
          \qquad \textstyle\sum_i\ell_i = -N_1\log\bar y - N_0\log(1-\bar y).

Sites send centred quantities (numerically stable); the server combines them with the parallel
formulas of Chan, Golub & LeVeque (1979), :math:`M = \sum_k [M_k + n_k(\bar x_k-\mu)(\bar x_k-\mu)^\top]`,
:math:`u = \sum_k [u_k + n_{1k}(\bar x_k - \mu)]`, in a form that is exact for the float64 site
means :math:`\bar x_k` actually sent: each site also sends :math:`c_k = \sum(x-\bar x_k)` (the
rounding of its mean, ≈ 0), and with :math:`d_k = \bar x_k - \mu`,
:math:`\sum(x-\mu)(x-\mu)^\top = \sum_k [M_k + d_kc_k^\top + c_kd_k^\top + n_kd_kd_k^\top]` holds
identically.  (Plain Chan loses ~1e-7 relative in the SD of a feature with mean 1e9 and SD 1,
because :math:`\bar x_k` itself is only known to 1e-7 there; the two-pass pooled SD does not.)
The gradient and Hessian at β₀ are then formed for :math:`z = (x-\mu)/s` with the float μ the
sites will use (:math:`\sum z = \sum_k (n_kd_k + c_k)/s`, ≈ 0).

Federated protocol (patient rows never leave a site)
----------------------------------------------------
1. **stats** (one round trip: standardization *and* the first Newton step).  Request
   ``{"kind": "fedrad.glm.logistic_stats", "features"}``.  Site reply
   (:func:`site_logistic_stats`): ``n``, ``n_pos`` (class-1 count), ``mean`` = x̄_k and
   ``resid_sum`` = :math:`c_k` (together Σx), ``cross`` = :math:`M_k` (p×p, its diagonal is the
   centred sum of squares Σ(x−x̄_k)²), ``cross_y`` = :math:`u_k` = Σ y(x − x̄_k).  Server
   (:func:`combine_logistic_stats`): global mean, SD, class counts, excluded constant features,
   then :math:`g_0, H_0` and the first (proximal) Newton step.
2. **newton** (repeated).  Request ``{"kind": "fedrad.glm.logistic_newton", "features" (kept),
   "mean", "scale", "beta"}`` with β = (b, w) in standardized space.  Site reply
   (:func:`site_logistic_newton`): ``n``, ``loss`` = Σℓ, ``grad`` (p+1), ``hess``
   ((p+1)×(p+1)) at β.  Server (:class:`LogisticServer`): the next step.

Server step.  With :math:`G = Cg + (1-\rho)(0, w)` and :math:`K = CH + (1-\rho)\,\mathrm{diag}(0,1,\dots,1)`
(``C = 1``, ρ = 0 and no L2 term for ``penalty=None``) the direction :math:`d` minimizes the
local model :math:`G^\top d + \frac12 d^\top K d + \rho\lVert w + d_w\rVert_1`: the Newton step
:math:`-K^{-1}G` when ρ = 0, else (proximal Newton; Lee, Sun & Saunders 2014) exact coordinate
descent on the server, polished by solving the model on its active set and checking its KKT
conditions.  Because the objective at a new β is only known one round later, the server sends the
full step and checks it when the sums come back (Armijo: :math:`F_{new} \le F + 10^{-4}t\Delta`,
:math:`\Delta = G^\top d + \rho(\lVert w+d_w\rVert_1 - \lVert w\rVert_1)`); a rejected step is
retried at a shorter step :math:`t` (quadratic interpolation clipped to [0.1, 0.5] of the last
one) from the last accepted point, whose sums the server kept.  The fit stops, returning β + d
without a further round, when the step has max-norm ≤ ``tol`` (standardized coefficients), or
when the observed quadratic contraction of two successive full steps predicts that the error left
after taking d, :math:`\approx\lVert d_k\rVert^3/\lVert d_{k-1}\rVert^2`, is below ``tol``/10
(only for ‖d‖ ≤ 1e-3; this saves the round that would merely confirm convergence).  Round trips
measured (round 1 included): L2 4–6 on synthetic and UCI heart data, L1/elastic net 5–6,
none 5–6; a rejected step costs one extra round.

Guards (:class:`GLMError`, one line naming the site/column)
------------------------------------------------------------
Missing/infinite values (column, site, count); labels other than 0/1; one class in the whole
federation (one class at a single site is fine: its sums are valid); a feature constant across
the federation (global SD 0) is excluded from the model (coefficient 0) and listed in
``excluded_features_``; for ``penalty=None``: collinear features (singular :math:`M`, detected in
round 1) and separation (Newton moving along a ray while the Hessian collapses, a standardized
coefficient above 25, or no convergence; detected after ~8–9 rounds) raise with the advice to use
a penalty.  With a penalty the objective is strictly convex in the L2 case and
bounded below in every case, so separation is harmless.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.special
import scipy.stats

__all__ = [
    "GLMError",
    "MissingValueError",
    "OneClassError",
    "CollinearityError",
    "SeparationError",
    "GLMConvergenceWarning",
    "LogisticModel",
    "LogisticServer",
    "make_stats_request",
    "make_newton_request",
    "site_logistic",
    "site_logistic_stats",
    "site_logistic_newton",
    "combine_logistic_stats",
    "combine_logistic_newton",
    "fit_federated",
    "fit_pooled",
]

_PROTOCOL_VERSION = 1
_STATS_KIND = "fedrad.glm.logistic_stats"
_NEWTON_KIND = "fedrad.glm.logistic_newton"
_MODEL_KIND = "fedrad.glm.logistic_model"

#: A feature is constant (excluded) when its global SD is ≤ this times ``max(|mean|, 1e-300)``
#: (rounding noise of a constant column), or exactly 0.
ZERO_SD_TOL = 1e-12
#: ``penalty=None``: features are collinear when the smallest/largest eigenvalue of their global
#: correlation matrix is below this.
COLLINEAR_TOL = 1e-10
#: ``penalty=None``: separation is declared when the smallest eigenvalue of the Hessian of Σℓ
#: (standardized space) falls below this fraction of its value at the start ...
SEPARATION_HESSIAN_RATIO = 1e-7
#: ... or falls below this fraction while the last two Newton steps were "ray-like" (each at least
#: ``SEPARATION_RAY_RATIO`` times as long as the previous one, in nearly the same direction) ...
SEPARATION_RAY_HESSIAN_RATIO = 1e-3
SEPARATION_RAY_RATIO = 0.5
#: ... or any standardized coefficient exceeds this (an odds ratio of e^25 per SD is divergence).
SEPARATION_MAX_COEF = 25.0
_ARMIJO = 1e-4
#: The quadratic-rate stopping rule is only trusted for steps at most this long.
_QUADRATIC_MAX_STEP = 1e-3


def _repeated(names: list) -> list:
    """The names listed more than once, sorted (one pass: a wide table lists a thousand features)."""
    from collections import Counter

    return sorted(n for n, c in Counter(names).items() if c > 1)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class GLMError(ValueError):
    """Invalid input or unfittable model; the message names the site and/or column."""


class MissingValueError(GLMError):
    """A feature or the outcome has missing (NaN) or infinite values at a site."""


class OneClassError(GLMError):
    """The outcome has a single class across the whole federation (or pooled data)."""


class CollinearityError(GLMError):
    """``penalty=None`` with collinear features: the maximum-likelihood fit is not unique."""


class SeparationError(GLMError):
    """``penalty=None`` and the classes are (quasi-)separated: the MLE does not exist."""


class GLMConvergenceWarning(UserWarning):
    """The penalized fit hit ``max_rounds`` before the step fell below ``tol``."""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _where(site: Any) -> str:
    return f"at site {site!r}" if site is not None else "in the data"


def _penalty_spec(penalty: Any, C: Any, l1_ratio: Any) -> tuple[str | None, float | None, float]:
    """Validate and normalize (penalty, C, l1_ratio); ``C=np.inf`` means no penalty (as sklearn 1.9)."""
    if isinstance(penalty, str) and penalty.lower() == "none":
        penalty = None
    if penalty not in ("l2", "l1", "elasticnet", None):
        raise GLMError(f"penalty must be 'l2', 'l1', 'elasticnet' or None, got {penalty!r}")
    if penalty is not None:
        try:
            C = float(C)
        except (TypeError, ValueError):
            raise GLMError(f"C must be a positive number, got {C!r}") from None
        if math.isinf(C) and C > 0:
            penalty = None
        elif not (C > 0 and math.isfinite(C)):
            raise GLMError(f"C must be a positive number (np.inf for no penalty), got {C!r}")
    if penalty is None:
        return None, None, 0.0
    if penalty == "elasticnet":
        if l1_ratio is None:
            raise GLMError("penalty='elasticnet' needs l1_ratio in [0, 1]")
        rho = float(l1_ratio)
        if not 0.0 <= rho <= 1.0:
            raise GLMError(f"l1_ratio must be in [0, 1], got {l1_ratio!r}")
        return penalty, C, rho
    rho = 0.0 if penalty == "l2" else 1.0
    if l1_ratio is not None and float(l1_ratio) != rho:
        raise GLMError(f"l1_ratio={l1_ratio!r} contradicts penalty={penalty!r} (which means l1_ratio={rho:g}); "
                       f"use penalty='elasticnet' for a mixture")
    return penalty, C, rho


_FEATURE_MEMO: dict | None = None


@contextlib.contextmanager
def cached_features():
    """Inside the block, the feature matrix of one DataFrame and feature list is built once and shared (read-only):
    for predictions of many models on rows that do not change meanwhile (a site's inner-CV losses and validation
    metrics of every penalty variant)."""
    global _FEATURE_MEMO
    outer = _FEATURE_MEMO
    _FEATURE_MEMO = {} if outer is None else outer
    try:
        yield
    finally:
        _FEATURE_MEMO = outer


def _as_features(X: Any, features: Sequence[str] | None, where: str) -> np.ndarray:
    """Feature matrix (n×p float64): DataFrame columns selected by name, or a 2-D array in order."""
    memo = _FEATURE_MEMO
    if memo is None or features is None or not isinstance(X, pd.DataFrame):
        return _feature_matrix(X, features, where)
    key = (id(X), tuple(features))
    hit = memo.get(key)
    if hit is None or hit[0] is not X:  # the frame is kept with its matrix, so its id is not reused meanwhile
        x = _feature_matrix(X, features, where)
        x.setflags(write=False)
        hit = memo[key] = (X, x)
    return hit[1]


def _feature_matrix(X: Any, features: Sequence[str] | None, where: str) -> np.ndarray:
    if isinstance(X, pd.DataFrame):
        if features is not None and X.columns.is_unique and all(type(f) is str and f in X.columns for f in features):
            cols = X[list(features)]  # every name is a column (the common case): no name lookup over the table
        else:
            lookup = {str(c): c for c in X.columns}
            if features is None:
                features = list(lookup)
            missing = [f for f in features if f not in lookup]
            if missing:
                raise GLMError(f"feature column(s) {missing} not found {where}; columns are {list(lookup)[:20]}")
            cols = X[[lookup[f] for f in features]]
        bad = [str(c) for c, t in zip(cols.columns, cols.dtypes)
               if not (pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t))]
        if bad:
            raise GLMError(f"feature column(s) {bad} {where} are not numeric; encode them (e.g. one-hot) first")
        x = cols.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        try:
            x = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError):
            raise GLMError(f"features {where} must be numeric") from None
        if x.ndim != 2:
            raise GLMError(f"features {where} must be 2-D (rows × features), got shape {x.shape}")
        if features is not None and x.shape[1] != len(features):
            raise GLMError(f"features {where} have {x.shape[1]} columns, expected {len(features)} ({list(features)[:10]})")
    if features is None:
        features = [f"x{j}" for j in range(x.shape[1])]
    bad = (~np.isfinite(x)).sum(axis=0)
    idx = np.flatnonzero(bad)
    if idx.size:
        j = idx[0]
        more = "" if idx.size == 1 else f" (and {idx.size - 1} more column(s): {[features[k] for k in idx[1:4]]})"
        raise MissingValueError(f"feature {features[j]!r} has {int(bad[j])} missing/infinite values {where}{more}; "
                                f"impute them or drop those rows")
    return x


def _as_labels(y: Any, n: int, where: str) -> np.ndarray:
    """Outcome vector (n,) float64 with values 0/1."""
    if isinstance(y, pd.DataFrame):
        if y.shape[1] != 1:
            raise GLMError(f"outcome {where} must be one column, got {y.shape[1]}")
        y = y.iloc[:, 0]
    name = repr(str(y.name)) if isinstance(y, pd.Series) and y.name is not None else "y"
    try:
        if isinstance(y, pd.Series):
            v = y.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            v = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        raise GLMError(f"outcome {name} {where} must be coded 0/1 (numeric or boolean)") from None
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if v.ndim != 1:
        raise GLMError(f"outcome {name} {where} must be 1-D, got shape {v.shape}")
    if v.shape[0] != n:
        raise GLMError(f"outcome {name} {where} has {v.shape[0]} values but the features have {n} rows")
    n_bad = int((~np.isfinite(v)).sum())
    if n_bad:
        raise MissingValueError(f"outcome {name} has {n_bad} missing values {where}; drop those rows")
    other = np.unique(v[(v != 0) & (v != 1)])
    if other.size:
        raise GLMError(f"outcome {name} {where} must be coded 0/1, found value(s) {other[:5].tolist()}")
    return v


def _site_rows(rows: Any, features: Sequence[str] | None, site: Any) -> tuple[np.ndarray, np.ndarray]:
    where = _where(site)
    if not (isinstance(rows, (tuple, list)) and len(rows) == 2):
        raise GLMError(f"site rows {where} must be a pair (X, y)")
    x = _as_features(rows[0], features, where)
    if x.shape[0] == 0:
        raise GLMError(f"site {site!r} has no rows" if site is not None else "the data have no rows")
    y = _as_labels(rows[1], x.shape[0], where)
    return x, y


def _logistic_sums(z: np.ndarray, y: np.ndarray, beta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(Σℓ, gradient, Hessian) of the log loss at β = (b, w) for standardized rows ``z``."""
    eta = beta[0] + z @ beta[1:]
    loss = float(np.sum(np.logaddexp(0.0, eta) - y * eta))
    p = scipy.special.expit(eta)
    wts = p * scipy.special.expit(-eta)          # p(1-p) without cancellation
    a = np.column_stack([np.ones(len(z)), z])
    r = p - y
    grad = a.T @ r
    hess = (a * wts[:, None]).T @ a
    return loss, grad, 0.5 * (hess + hess.T)


def _to_wire(obj: Any) -> Any:
    """Pass a payload through the message codec (JSON skeleton + arrays), as over Flower."""
    from .messages import join_payload, split_payload

    skeleton, arrays = split_payload(obj)
    return join_payload(skeleton, {k: np.array(v, copy=True) for k, v in arrays.items()})


# ----------------------------------------------------------------------------------------------
# Requests and site functions
# ----------------------------------------------------------------------------------------------
def make_stats_request(features: Sequence[str]) -> dict:
    """Round-1 request (server → sites): which feature columns to summarize."""
    features = [str(f) for f in features]
    if not features:
        raise GLMError("no features to fit")
    dup = _repeated(features)
    if dup:
        raise GLMError(f"features {dup} listed more than once")
    return {"kind": _STATS_KIND, "version": _PROTOCOL_VERSION, "features": features}


def make_newton_request(features: Sequence[str], mean: Sequence[float], scale: Sequence[float],
                        beta: Sequence[float]) -> dict:
    """Newton-round request (server → sites): standardization of the kept features and β = (b, w)."""
    return {"kind": _NEWTON_KIND, "version": _PROTOCOL_VERSION, "features": [str(f) for f in features],
            "mean": np.asarray(mean, dtype=np.float64), "scale": np.asarray(scale, dtype=np.float64),
            "beta": np.asarray(beta, dtype=np.float64)}


def site_logistic_stats(rows: Any, request: Mapping, *, site: Any = None) -> dict:
    r"""Round-1 reply (site → server): counts and centred moments of the site's rows.

    Parameters
    ----------
    rows : tuple (X, y)
        ``X`` a DataFrame holding the requested feature columns (selected by name) or an n×p
        array in request order; ``y`` the 0/1 outcome.
    request : dict
        From :func:`make_stats_request`.
    site : str, optional
        This site's name (for messages and error texts).

    Returns
    -------
    dict
        ``kind``, ``site``, ``n``, ``n_pos`` = Σy, ``mean`` = :math:`\bar x_k` (p, the site mean
        rounded to float64), ``resid_sum`` = :math:`c_k = \sum(x-\bar x_k)` (p; the rounding of the
        mean, so that Σx = n x̄_k + c_k to extra precision), ``cross`` =
        :math:`M_k = \sum(x-\bar x_k)(x-\bar x_k)^\top` (p×p; its diagonal is the centred sum of
        squares), ``cross_y`` = :math:`u_k = \sum y(x-\bar x_k)` (p).  A site with one class only
        is fine.
    """
    x, y = _site_rows(rows, list(request["features"]), site)
    n = x.shape[0]
    mean = x.mean(axis=0)
    xc = x - mean
    cross = xc.T @ xc
    return {"kind": _STATS_KIND + ".reply", "version": _PROTOCOL_VERSION, "site": site, "n": int(n),
            "n_pos": int(y.sum()), "mean": mean, "resid_sum": xc.sum(axis=0),
            "cross": 0.5 * (cross + cross.T), "cross_y": xc.T @ y}


def site_logistic_newton(rows: Any, request: Mapping, *, site: Any = None) -> dict:
    r"""Newton-round reply (site → server): Σℓ, its gradient and Hessian at the requested β.

    With :math:`z = (x - \mu)/s` for the requested features, :math:`a = (1, z)`,
    :math:`p = \sigma(b + z^\top w)`: ``loss`` = Σ[log(1+e^η) − yη], ``grad`` = Σ(p − y)a,
    ``hess`` = Σ p(1−p) a aᵀ, and ``n``.
    """
    features = list(request["features"])
    mean = np.asarray(request["mean"], dtype=np.float64)
    scale = np.asarray(request["scale"], dtype=np.float64)
    beta = np.asarray(request["beta"], dtype=np.float64)
    if not (mean.shape == scale.shape == (len(features),) and beta.shape == (len(features) + 1,)):
        raise GLMError(f"malformed newton request for site {site!r}: {len(features)} features, mean {mean.shape}, "
                       f"scale {scale.shape}, beta {beta.shape}")
    x, y = _site_rows(rows, features, site)
    loss, grad, hess = _logistic_sums((x - mean) / scale, y, beta)
    return {"kind": _NEWTON_KIND + ".reply", "version": _PROTOCOL_VERSION, "site": site, "n": int(x.shape[0]),
            "loss": loss, "grad": grad, "hess": hess}


def site_logistic(rows: Any, request: Mapping, *, site: Any = None) -> dict:
    """Answer any logistic-regression request (dispatch on ``request["kind"]``); what a Flower handler calls."""
    kind = request.get("kind")
    if kind == _STATS_KIND:
        return site_logistic_stats(rows, request, site=site)
    if kind == _NEWTON_KIND:
        return site_logistic_newton(rows, request, site=site)
    raise GLMError(f"unknown logistic request kind {kind!r}")


# ----------------------------------------------------------------------------------------------
# Server: combining
# ----------------------------------------------------------------------------------------------
def combine_logistic_stats(aggregates: Sequence[Mapping], features: Sequence[str]) -> dict:
    r"""Server, round 1: global standardization, class counts and the sums at β₀.

    Parameters
    ----------
    aggregates : list of dict
        The sites' :func:`site_logistic_stats` replies.
    features : list of str
        The requested features.

    Returns
    -------
    dict
        ``n``, ``n_pos``, ``n_per_site``, ``n_pos_per_site``, ``mean`` (p), ``scale`` (p,
        population SD; 0 for excluded), ``kept`` (indices), ``excluded`` (names), ``cross`` (global
        centred cross-product over all features), ``beta0`` = (logit ȳ, 0), and ``loss``,
        ``grad``, ``hess`` (Σℓ, gradient, Hessian at β₀ over intercept + kept features).

    Raises
    ------
    OneClassError
        If the whole federation has a single class.
    """
    features = [str(f) for f in features]
    p = len(features)
    if not aggregates:
        raise GLMError("no site replied")
    n_k = np.array([int(a["n"]) for a in aggregates], dtype=np.float64)
    n1_k = np.array([int(a["n_pos"]) for a in aggregates], dtype=np.float64)
    sites = [a.get("site") for a in aggregates]
    for a, s in zip(aggregates, sites):
        if (np.shape(a["mean"]) != (p,) or np.shape(a["resid_sum"]) != (p,) or np.shape(a["cross"]) != (p, p)
                or np.shape(a["cross_y"]) != (p,)):
            raise GLMError(f"site {s!r} replied with statistics for a different number of features (expected {p})")
    n, n_pos = float(n_k.sum()), float(n1_k.sum())
    if n_pos == 0 or n_pos == n:
        label = int(n_pos > 0)
        raise OneClassError(f"the outcome is {label} for all {int(n)} rows across {len(aggregates)} site(s) "
                            f"{sites}; logistic regression needs both classes")
    means_k = np.array([np.asarray(a["mean"], dtype=np.float64) for a in aggregates])
    resid_k = np.array([np.asarray(a["resid_sum"], dtype=np.float64) for a in aggregates])
    # global mean, refined once with the residual sums: mu + e with e = Σ(x - mu)/N
    mean = (n_k[:, None] * means_k).sum(axis=0) / n
    mean = mean + ((means_k - mean) * n_k[:, None] + resid_k).sum(axis=0) / n
    dev = means_k - mean                         # exact when site and global means are close (Sterbenz)
    e = (dev * n_k[:, None] + resid_k).sum(axis=0) / n
    # Σ(x-mu)(x-mu)^T = Σ_k [M_k + d_k c_k^T + c_k d_k^T + n_k d_k d_k^T]   (exact expansion)
    s_mu = sum(np.asarray(a["cross"], dtype=np.float64) for a in aggregates) + (dev * n_k[:, None]).T @ dev
    dc = dev.T @ resid_k
    s_mu = s_mu + dc + dc.T
    s_mu = 0.5 * (s_mu + s_mu.T)
    cross = s_mu - n * np.outer(e, e)            # about the exact mean
    # Σ y (x - mu) = Σ_k [u_k + n1_k d_k]
    u_mu = sum(np.asarray(a["cross_y"], dtype=np.float64) for a in aggregates) + (dev * n1_k[:, None]).sum(axis=0)
    var = np.maximum(np.diag(cross), 0.0) / n
    scale = np.sqrt(var)
    const = scale <= ZERO_SD_TOL * np.maximum(np.abs(mean), 1e-300)
    scale = np.where(const, 0.0, scale)
    kept = np.flatnonzero(~const)
    if kept.size == 0:
        raise GLMError(f"every feature is constant across the federation ({features[:10]}); nothing to fit")
    s = scale[kept]
    ybar = n_pos / n
    pq = ybar * (1.0 - ybar)
    k = kept.size
    # sums at beta0 for z = (x - mu)/s exactly as the sites will compute them (Σz = N e/s ≈ 0)
    sum_z = n * e[kept] / s
    hess = np.zeros((k + 1, k + 1))
    hess[0, 0] = pq * n
    hess[0, 1:] = hess[1:, 0] = pq * sum_z
    hess[1:, 1:] = pq * s_mu[np.ix_(kept, kept)] / np.outer(s, s)
    grad = np.concatenate([[n * ybar - n_pos], ybar * sum_z - u_mu[kept] / s])
    loss = -(n_pos * math.log(ybar) + (n - n_pos) * math.log1p(-ybar))
    beta0 = np.zeros(k + 1)
    beta0[0] = math.log(ybar) - math.log1p(-ybar)
    return {"n": int(n), "n_pos": int(n_pos),
            "n_per_site": {str(s_): int(v) for s_, v in zip(sites, n_k)},
            "n_pos_per_site": {str(s_): int(v) for s_, v in zip(sites, n1_k)},
            "mean": mean, "scale": scale, "kept": kept, "excluded": [features[j] for j in np.flatnonzero(const)],
            "cross": cross, "beta0": beta0, "loss": loss, "grad": grad, "hess": hess}


def combine_logistic_newton(aggregates: Sequence[Mapping]) -> dict:
    """Server, Newton round: add the sites' ``n``, ``loss``, ``grad`` and ``hess``."""
    if not aggregates:
        raise GLMError("no site replied")
    return {"n": int(sum(int(a["n"]) for a in aggregates)),
            "loss": float(math.fsum(float(a["loss"]) for a in aggregates)),
            "grad": sum(np.asarray(a["grad"], dtype=np.float64) for a in aggregates),
            "hess": sum(np.asarray(a["hess"], dtype=np.float64) for a in aggregates)}


def _check_collinear(cross: np.ndarray, names: Sequence[str]) -> None:
    """``penalty=None``: raise :class:`CollinearityError` if the kept features are collinear."""
    d = np.sqrt(np.diag(cross))
    corr = cross / np.outer(d, d)
    vals, vecs = np.linalg.eigh(corr)
    small = vals <= COLLINEAR_TOL * max(vals[-1], 1e-300)
    if small.any():
        null = vecs[:, small]
        involved = [names[j] for j in range(len(names)) if np.abs(null[j]).max() > 1e-3]
        raise CollinearityError(f"penalty=None but features {involved} are collinear across the federation, so the "
                                f"maximum-likelihood coefficients are not unique; drop some of them or use a penalty")


# ----------------------------------------------------------------------------------------------
# Server: the (proximal) Newton iteration, fed one evaluation at a time
# ----------------------------------------------------------------------------------------------
def _solve_l1_model(G: np.ndarray, K: np.ndarray, beta: np.ndarray, lam: float,
                    max_sweeps: int = 20_000) -> np.ndarray:
    r"""Exactly minimize :math:`G^\top(v-\beta) + \frac12(v-\beta)^\top K(v-\beta) + \lambda\lVert v_{1:}\rVert_1`.

    Cyclic coordinate descent (coordinate 0, the intercept, unpenalized), then the model is
    solved on the active set with the signs fixed and accepted if its KKT conditions hold, which
    makes the result exact to rounding.  Returns v.
    """
    m = len(beta)
    diag = np.diag(K).copy()
    v = beta.copy()
    r = G.copy()                      # gradient of the smooth model at v: G + K (v - beta)
    pen = np.ones(m, dtype=bool)
    pen[0] = False
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        big = 0.0
        for j in range(m):
            old = v[j]
            zj = old - r[j] / diag[j]
            new = zj if not pen[j] else math.copysign(max(abs(zj) - lam / diag[j], 0.0), zj)
            if new != old:
                r += K[:, j] * (new - old)
                v[j] = new
                big = max(big, abs(new - old))
        if sweeps % 5 == 0 or big <= 1e-14 * (1.0 + np.abs(v).max()):
            polished = _polish_active_set(G, K, beta, lam, v)
            if polished is not None:
                return polished
            if big <= 1e-15 * (1.0 + np.abs(v).max()):
                return v
    return v


def _polish_active_set(G, K, beta, lam, v):
    """Solve the L1 model on the active set of ``v`` with fixed signs; None if KKT fails."""
    m = len(beta)
    active = np.flatnonzero(v != 0)
    active = np.union1d([0], active).astype(int)
    sign = np.sign(v[active])
    sign[active == 0] = 0.0
    inactive = np.setdiff1d(np.arange(m), active)
    rhs = -G[active] - lam * sign + K[np.ix_(active, inactive)] @ beta[inactive]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            d_a = scipy.linalg.solve(K[np.ix_(active, active)], rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, scipy.linalg.LinAlgWarning):
        return None
    out = np.zeros(m)
    out[active] = beta[active] + d_a
    if np.any((np.sign(out[active]) != sign) & (active != 0)):
        return None
    r = G + K @ (out - beta)
    if inactive.size and np.any(np.abs(r[inactive]) > lam * (1 + 1e-9) + 1e-12 * np.abs(G).max()):
        return None
    return out


class _Solver:
    """(Proximal) Newton with a deferred line search, fed one evaluation of (Σℓ, g, H) at a time."""

    def __init__(self, penalty, C, l1_ratio, tol, max_evals, names):
        self.penalty, self.tol, self.max_evals, self.names = penalty, float(tol), int(max_evals), list(names)
        if penalty is None:
            self.c, self.l2, self.l1 = 1.0, 0.0, 0.0
        else:
            self.c, self.l2, self.l1 = float(C), 1.0 - l1_ratio, l1_ratio
        self.n_evals = 0
        self.history: list[dict] = []
        self.beta = self.hess = self.grad = None
        self.obj = None
        self.final = None
        self.converged = False
        self.lam_min0 = None
        self._last_full_step = None
        self._ray_count = 0
        self.d = None

    # objective and model pieces -------------------------------------------------------------
    def objective(self, beta, loss):
        w = beta[1:]
        return self.c * loss + 0.5 * self.l2 * float(w @ w) + self.l1 * float(np.abs(w).sum())

    def _direction(self, beta, grad, hess):
        m = len(beta)
        P = np.ones(m)
        P[0] = 0.0
        G = self.c * grad + self.l2 * P * beta
        K = self.c * hess + self.l2 * np.diag(P)
        if self.l1 == 0.0:
            try:
                d = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K), -G)
            except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
                if self.penalty is None:
                    raise self._separation("the Hessian became singular") from None
                d = np.linalg.lstsq(K, -G, rcond=None)[0]
            delta = float(G @ d)
        else:
            v = _solve_l1_model(G, K, beta, self.l1)
            d = v - beta
            delta = float(G @ d) + self.l1 * (float(np.abs(v[1:]).sum()) - float(np.abs(beta[1:]).sum()))
        return d, min(delta, 0.0)

    def _separation(self, why):
        w = self.beta[1:] if self.beta is not None else np.zeros(0)
        top = [self.names[j] for j in np.argsort(-np.abs(w))[:3]] if w.size else []
        return SeparationError(f"penalty=None: the classes look (quasi-)separated, so the maximum-likelihood fit "
                               f"diverges (after {self.n_evals} rounds {why}; largest standardized coefficients "
                               f"{top}); use a penalty (e.g. penalty='l2') or drop the separating feature(s)")

    # iteration -------------------------------------------------------------------------------
    def feed(self, beta, loss, grad, hess):
        """Sums at ``beta`` (the start, or the last proposal); returns the next β to evaluate or None."""
        beta = np.asarray(beta, dtype=np.float64)
        grad = np.asarray(grad, dtype=np.float64)
        hess = np.asarray(hess, dtype=np.float64)
        self.n_evals += 1
        obj = self.objective(beta, loss)
        if not np.all(np.isfinite(grad)) or not np.all(np.isfinite(hess)) or not math.isfinite(obj):
            raise GLMError("non-finite loss/gradient/Hessian received; check the sites' data")
        entry = {"round": self.n_evals, "objective": obj}
        if self.beta is None:
            accept = True
        else:
            slack = 1e-12 * (1.0 + abs(self.obj))
            accept = obj <= self.obj + _ARMIJO * self.t * self.delta + slack
        entry["accepted"] = bool(accept)
        if not accept:
            # backtrack from the last accepted point: quadratic interpolation, clipped
            t = self.t
            curv = obj - self.obj - t * self.delta
            t_new = -self.delta * t * t / (2.0 * curv) if curv > 0 else 0.5 * t
            self.t = min(max(t_new, 0.1 * t), 0.5 * t)
            self._last_full_step = None
            entry["step"] = self.t
            self.history.append(entry)
            if self.t * np.abs(self.d).max() <= self.tol:
                self.final, self.converged = self.beta.copy(), True
                return None
            return self._propose(self.beta + self.t * self.d)
        self.beta, self.grad, self.hess, self.obj = beta, grad, hess, obj
        d_prev = self.d if self._last_full_step else None
        self.d, self.delta = self._direction(beta, grad, hess)
        if self.penalty is None:
            self._check_divergence(d_prev)
        self.t = 1.0
        step = float(np.abs(self.d).max())
        entry["max_step"] = step
        self.history.append(entry)
        # Stop when the step is below tol, or when the observed quadratic contraction predicts that
        # the error left after taking it, M·‖d‖² with M ≈ ‖d_k‖/‖d_{k-1}‖², is far below tol (this
        # saves the round that would only confirm it; it never fires in a linear-rate regime).
        prev = self._last_full_step
        predicted = step ** 3 / prev ** 2 if prev else math.inf
        self._last_full_step = step
        if step <= self.tol or (step <= _QUADRATIC_MAX_STEP and predicted <= 0.1 * self.tol):
            self.final, self.converged = beta + self.d, True
            return None
        return self._propose(beta + self.d)

    def _propose(self, beta_next):
        if self.n_evals >= self.max_evals:
            if self.penalty is None and self.n_evals > 1:
                raise self._separation(f"no convergence in {self.n_evals} rounds")
            self.final, self.converged = self.beta.copy(), False
            return None
        return beta_next

    def _check_divergence(self, d_prev):
        """``penalty=None``: raise :class:`SeparationError` when the iterates run off along a ray.

        Under (quasi-)separation Newton moves a roughly constant (or growing) distance along a fixed
        direction each round while the Hessian collapses exponentially (the fitted probabilities of
        the separated rows tend to 0/1).  A finite but large MLE shows the same pattern for a few
        rounds, with a Hessian that stays well conditioned (≥ ~1e-2 of its start for standardized
        coefficients up to 8), hence the combined rule below.
        """
        lam = float(np.linalg.eigvalsh(self.hess)[0])
        if self.lam_min0 is None:
            self.lam_min0 = lam
            return
        ratio = lam / self.lam_min0
        ray = False
        if d_prev is not None:
            a, b = np.linalg.norm(d_prev), np.linalg.norm(self.d)
            ray = a > 0 and b >= SEPARATION_RAY_RATIO * a and float(d_prev @ self.d) >= 0.9 * a * b
        self._ray_count = self._ray_count + 1 if ray else 0
        w = np.abs(self.beta[1:])
        if ratio <= SEPARATION_HESSIAN_RATIO:
            raise self._separation(f"the smallest Hessian eigenvalue fell to {ratio:.1e} of its start")
        if self._ray_count >= 2 and ratio <= SEPARATION_RAY_HESSIAN_RATIO:
            raise self._separation(f"the coefficients keep moving along one direction while the smallest Hessian "
                                   f"eigenvalue fell to {ratio:.1e} of its start")
        if w.size and w.max() > SEPARATION_MAX_COEF:
            raise self._separation(f"a standardized coefficient reached {w.max():.1f}")


# ----------------------------------------------------------------------------------------------
# The server state machine
# ----------------------------------------------------------------------------------------------
class LogisticServer:
    """Coordinator side of the federated fit, one round trip at a time (no I/O, no Flower).

    Usage (what :func:`fit_federated` and the Flower server app do)::

        server = LogisticServer(features, penalty="l2", C=1.0)
        request = server.start()
        while request is not None:
            replies = {site: site_logistic(rows_of[site], request, site=site) for site in sites}
            request = server.receive(replies)
        model = server.model()

    Parameters
    ----------
    features : list of str
        Feature columns (sites select them by name from a DataFrame).
    penalty, C, l1_ratio, tol, max_rounds :
        See :class:`LogisticModel`.

    Attributes
    ----------
    round_trips : int
        Round trips completed so far.
    """

    def __init__(self, features: Sequence[str], *, penalty: str | None = "l2", C: float = 1.0,
                 l1_ratio: float | None = None, tol: float = 1e-8, max_rounds: int = 30):
        self.features = [str(f) for f in features]
        self.penalty, self.C, self.l1_ratio = _penalty_spec(penalty, C, l1_ratio)
        self.tol, self.max_rounds = float(tol), int(max_rounds)
        if self.max_rounds < 1:
            raise GLMError(f"max_rounds must be at least 1, got {max_rounds}")
        self.round_trips = 0
        self._request: dict | None = None
        self._stats: dict | None = None
        self._solver: _Solver | None = None
        self._done = False

    def start(self) -> dict:
        """The round-1 request."""
        self._request = make_stats_request(self.features)
        return self._request

    def receive(self, replies: Mapping[Any, Mapping] | Sequence[Mapping]) -> dict | None:
        """Take the sites' replies to the last request; return the next request, or None when done."""
        if self._request is None or self._done:
            raise GLMError("receive() called without an outstanding request")
        aggregates = list(replies.values()) if isinstance(replies, Mapping) else list(replies)
        self.round_trips += 1
        if self._request["kind"] == _STATS_KIND:
            st = combine_logistic_stats(aggregates, self.features)
            self._stats = st
            kept_names = [self.features[j] for j in st["kept"]]
            if self.penalty is None:
                _check_collinear(st["cross"][np.ix_(st["kept"], st["kept"])], kept_names)
            self._solver = _Solver(self.penalty, self.C, self.l1_ratio, self.tol, self.max_rounds, kept_names)
            nxt = self._solver.feed(st["beta0"], st["loss"], st["grad"], st["hess"])
        else:
            tot = combine_logistic_newton(aggregates)
            if tot["n"] != self._stats["n"]:
                raise GLMError(f"the sites replied with {tot['n']} rows in total, but {self._stats['n']} in round 1; "
                               f"site data changed during the fit")
            nxt = self._solver.feed(self._request["beta"], tot["loss"], tot["grad"], tot["hess"])
        if nxt is None:
            self._done = True
            self._request = None
            return None
        kept = self._stats["kept"]
        self._request = make_newton_request([self.features[j] for j in kept], self._stats["mean"][kept],
                                            self._stats["scale"][kept], nxt)
        return self._request

    @property
    def done(self) -> bool:
        return self._done

    def model(self, *, fit: str = "federated") -> "LogisticModel":
        """The fitted :class:`LogisticModel` (after :meth:`receive` returned None)."""
        if not self._done:
            raise GLMError("the fit is not finished")
        m = LogisticModel(penalty=self.penalty, C=self.C if self.penalty is not None else 1.0,
                          l1_ratio=self.l1_ratio if self.penalty == "elasticnet" else None,
                          tol=self.tol, max_rounds=self.max_rounds)
        m._set_fit(self.features, self._stats, self._solver, n_rounds=self.round_trips, fit=fit)
        return m


# ----------------------------------------------------------------------------------------------
# Result / estimator
# ----------------------------------------------------------------------------------------------
_Z975 = float(scipy.stats.norm.ppf(0.975))


class LogisticModel:
    r"""Penalized binary logistic regression on globally standardized features (sklearn objective).

    Minimizes :math:`C\sum_i\ell_i + \frac{1-\rho}{2}\lVert w\rVert^2 + \rho\lVert w\rVert_1` over
    the intercept :math:`b` (unpenalized) and standardized coefficients :math:`w` (see the module
    docstring); ``penalty=None`` minimizes :math:`\sum_i\ell_i`.  Fit on pooled rows with
    :meth:`fit` or across sites with :meth:`fit_federated`; both give the same model.

    Parameters
    ----------
    penalty : {'l2', 'l1', 'elasticnet', None}, default='l2'
        ``C=np.inf`` also means no penalty (scikit-learn 1.9 spelling).
    C : float, default=1.0
        Inverse regularization strength (multiplies the summed log loss, as in scikit-learn).
    l1_ratio : float, optional
        ρ for ``'elasticnet'`` (required there); must be None, or 0 for L2 / 1 for L1, otherwise.
    tol : float, default=1e-8
        Stop when the (proximal) Newton step has max-norm ≤ ``tol`` in standardized coefficients.
    max_rounds : int, default=30
        Maximum round trips (federated) or loss evaluations (pooled), round 1 included.

    Attributes
    ----------
    feature_names_in_ : list of str
    n_features_in_ : int
    classes_ : ndarray, [0, 1]
    coef_ : ndarray (n_features,)
        Original-scale coefficients (log odds ratio per unit); 0 for excluded features.
    intercept_ : float
        Original-scale intercept.
    coef_std_ : ndarray (n_features,)
        Coefficients per global SD (the penalized ones); 0 for excluded features.
    intercept_std_ : float
        Intercept in standardized space (log odds at the global mean).
    mean_, scale_ : ndarray (n_features,)
        Global mean and population SD (``ddof=0``) of each feature (scale 0 if excluded).
    excluded_features_ : list of str
        Features constant across all the data (global SD 0): not in the model.
    n_ , n_pos_ : int
        Rows and class-1 rows in total.
    n_per_site_, n_pos_per_site_ : dict
        Per-site counts (``{"pooled": n}`` for a pooled fit).
    converged_ : bool
    n_rounds_ : int
        Round trips (federated) or loss/gradient/Hessian evaluations (pooled).
    objective_ : float
        :math:`F` at the last evaluated point.
    hessian_std_ : ndarray
        Hessian of Σℓ over (intercept, kept features) in standardized space at the last evaluated
        point, one final (small) Newton step before the returned coefficients: standard errors
        are within O(that step), typically 1e-5 relative, of those at the exact optimum.
    history_ : list of dict
        Per round: objective, whether the point was accepted, step size.
    fit_kind_ : {'federated', 'pooled'}
    """

    def __init__(self, penalty: str | None = "l2", C: float = 1.0, l1_ratio: float | None = None,
                 tol: float = 1e-8, max_rounds: int = 30):
        self.penalty = penalty
        self.C = C
        self.l1_ratio = l1_ratio
        self.tol = tol
        self.max_rounds = max_rounds

    # sklearn-style parameter access -----------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        return {"penalty": self.penalty, "C": self.C, "l1_ratio": self.l1_ratio, "tol": self.tol,
                "max_rounds": self.max_rounds}

    def set_params(self, **params) -> "LogisticModel":
        for k, v in params.items():
            if k not in self.get_params():
                raise GLMError(f"unknown parameter {k!r}")
            setattr(self, k, v)
        return self

    def _effective_params(self) -> dict:
        """Parameters after normalization (``C=np.inf`` -> ``penalty=None``; JSON-friendly)."""
        penalty, C, rho = _penalty_spec(self.penalty, self.C, self.l1_ratio)
        return {"penalty": penalty, "C": C, "l1_ratio": rho if penalty == "elasticnet" else None,
                "tol": float(self.tol), "max_rounds": int(self.max_rounds)}

    def sklearn_params(self) -> dict:
        """Equivalent ``sklearn.linear_model.LogisticRegression`` (≥ 1.8) arguments: ``C`` and ``l1_ratio``."""
        penalty, C, rho = _penalty_spec(self.penalty, self.C, self.l1_ratio)
        return {"C": math.inf if penalty is None else C, "l1_ratio": rho}

    # fitting ---------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, feature_names: Sequence[str] | None = None) -> "LogisticModel":
        """Fit on pooled rows (the oracle for :meth:`fit_federated`); own exact (proximal) Newton solver."""
        penalty, C, rho = _penalty_spec(self.penalty, self.C, self.l1_ratio)
        if feature_names is None and isinstance(X, pd.DataFrame):
            feature_names = [str(c) for c in X.columns]
        x = _as_features(X, feature_names, "in the data")
        if feature_names is None:
            feature_names = [f"x{j}" for j in range(x.shape[1])]
        features = [str(f) for f in feature_names]
        make_stats_request(features)                     # name checks
        if x.shape[0] == 0:
            raise GLMError("the data have no rows")
        yv = _as_labels(y, x.shape[0], "in the data")
        n, n_pos = x.shape[0], int(yv.sum())
        if n_pos in (0, n):
            raise OneClassError(f"the outcome is {int(n_pos > 0)} for all {n} rows; logistic regression needs both classes")
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        const = scale <= ZERO_SD_TOL * np.maximum(np.abs(mean), 1e-300)
        scale = np.where(const, 0.0, scale)
        kept = np.flatnonzero(~const)
        if kept.size == 0:
            raise GLMError(f"every feature is constant ({features[:10]}); nothing to fit")
        z = (x[:, kept] - mean[kept]) / scale[kept]
        names = [features[j] for j in kept]
        if penalty is None:
            _check_collinear(z.T @ z, names)
        solver = _Solver(penalty, C, rho, float(self.tol), int(self.max_rounds), names)
        beta = np.zeros(kept.size + 1)
        beta[0] = math.log(n_pos / n) - math.log1p(-n_pos / n)
        while beta is not None:
            beta = solver.feed(beta, *_logistic_sums(z, yv, beta))
        stats = {"n": n, "n_pos": n_pos, "n_per_site": {"pooled": n}, "n_pos_per_site": {"pooled": n_pos},
                 "mean": mean, "scale": scale, "kept": kept, "excluded": [features[j] for j in np.flatnonzero(const)]}
        self._set_fit(features, stats, solver, n_rounds=solver.n_evals, fit="pooled")
        return self

    def fit_federated(self, site_data: Mapping[str, tuple], feature_names: Sequence[str] | None = None,
                      transcript: list | None = None) -> "LogisticModel":
        """Fit across sites with :func:`fit_federated` (parameters from this object); returns self."""
        m = fit_federated(site_data, feature_names=feature_names, transcript=transcript, **self.get_params())
        self.__dict__.update({k: v for k, v in m.__dict__.items() if k.endswith("_")})
        return self

    def _set_fit(self, features, stats, solver: _Solver, *, n_rounds: int, fit: str) -> None:
        p = len(features)
        kept = np.asarray(stats["kept"], dtype=int)
        beta = solver.final
        coef_std = np.zeros(p)
        coef_std[kept] = beta[1:]
        scale = np.asarray(stats["scale"], dtype=np.float64)
        mean = np.asarray(stats["mean"], dtype=np.float64)
        coef = np.zeros(p)
        coef[kept] = beta[1:] / scale[kept]
        self.feature_names_in_ = list(features)
        self.n_features_in_ = p
        self.classes_ = np.array([0, 1])
        self.coef_std_ = coef_std
        self.intercept_std_ = float(beta[0])
        self.coef_ = coef
        self.intercept_ = float(beta[0] - np.sum(beta[1:] * mean[kept] / scale[kept]))
        self.mean_ = mean.copy()
        self.scale_ = scale.copy()
        self.excluded_features_ = list(stats["excluded"])
        self.n_ = int(stats["n"])
        self.n_pos_ = int(stats["n_pos"])
        self.n_per_site_ = dict(stats["n_per_site"])
        self.n_pos_per_site_ = dict(stats["n_pos_per_site"])
        self.converged_ = bool(solver.converged)
        self.n_rounds_ = int(n_rounds)
        self.objective_ = float(solver.obj)
        self.hessian_std_ = np.asarray(solver.hess, dtype=np.float64).copy()
        self.history_ = [dict(h) for h in solver.history]
        self.fit_kind_ = fit
        if not self.converged_:
            warnings.warn(f"logistic regression ({self.penalty}, C={self.C}) stopped after {n_rounds} rounds "
                          f"without converging to tol={self.tol}; raise max_rounds", GLMConvergenceWarning,
                          stacklevel=3)

    # prediction ------------------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise GLMError("this LogisticModel is not fitted yet")

    def decision_function(self, X: Any) -> np.ndarray:
        """Log odds :math:`b + x^\\top w` (original scale) for each row of ``X``."""
        self._check_fitted()
        x = _as_features(X, self.feature_names_in_, "in the data to predict")
        kept = self.scale_ > 0
        z = (x[:, kept] - self.mean_[kept]) / self.scale_[kept]
        return self.intercept_std_ + z @ self.coef_std_[kept]

    def predict_proba(self, X: Any) -> np.ndarray:
        """(n, 2) class probabilities [P(y=0), P(y=1)], as scikit-learn."""
        eta = self.decision_function(X)
        return np.column_stack([scipy.special.expit(-eta), scipy.special.expit(eta)])

    def predict(self, X: Any) -> np.ndarray:
        """Class 1 where P(y=1) > 0.5."""
        return (self.decision_function(X) > 0).astype(int)

    # inference -------------------------------------------------------------------------------
    def covariance_std(self) -> np.ndarray | None:
        r"""Covariance of (intercept, kept coefficients) in standardized space, or None for L1/elastic net.

        Inverse of the penalized Hessian of :math:`\sum\ell + \frac{1}{2C}\lVert w\rVert^2`:
        :math:`(H + C^{-1}\mathrm{diag}(0,1,\dots,1))^{-1}` for L2 (the Gaussian-prior / ridge
        posterior covariance) and :math:`H^{-1}` for ``penalty=None`` (the usual MLE covariance).
        """
        self._check_fitted()
        penalty, C, _ = _penalty_spec(self.penalty, self.C, self.l1_ratio)
        if penalty not in ("l2", None):
            return None
        h = np.array(self.hessian_std_, dtype=np.float64)
        if penalty == "l2":
            h[1:, 1:] += np.eye(h.shape[0] - 1) / C
        return np.linalg.inv(h)

    @property
    def summary(self) -> pd.DataFrame:
        """Coefficient table on the original scale (like lifelines' ``summary``).

        Columns ``coef``, ``exp(coef)``, ``coef per SD``, ``se(coef)``, ``coef lower 95%``,
        ``coef upper 95%``, ``exp(coef) lower 95%``, ``exp(coef) upper 95%``, ``z``, ``p``; rows
        ``intercept`` and the kept features.  Standard errors (Wald, normal) come from
        :meth:`covariance_std` mapped to the original scale; for L2 they are penalized
        (shrunken) — an approximation, not exact frequentist inference.  For L1/elastic net only
        ``coef``, ``exp(coef)`` and ``coef per SD`` are given (no valid SE for the lasso); the
        reason is in ``summary.attrs["note"]``.
        """
        self._check_fitted()
        kept = np.flatnonzero(self.scale_ > 0)
        index = ["intercept"] + [self.feature_names_in_[j] for j in kept]
        coef = np.concatenate([[self.intercept_], self.coef_[kept]])
        per_sd = np.concatenate([[self.intercept_std_], self.coef_std_[kept]])
        df = pd.DataFrame({"coef": coef, "exp(coef)": np.exp(coef), "coef per SD": per_sd}, index=index)
        df.index.name = "covariate"
        cov = self.covariance_std()
        note = []
        if self.excluded_features_:
            note.append(f"excluded (constant across all data): {self.excluded_features_}")
        if cov is None:
            note.insert(0, f"penalty={self.penalty!r}: coefficients only; standard errors are not meaningful for "
                           f"L1-penalized (lasso/elastic-net) estimates")
            df.attrs["note"] = "; ".join(note)
            return df
        a = np.zeros((kept.size + 1, kept.size + 1))
        a[0, 0] = 1.0
        a[0, 1:] = -self.mean_[kept] / self.scale_[kept]
        a[1:, 1:] = np.diag(1.0 / self.scale_[kept])
        se = np.sqrt(np.maximum(np.diag(a @ cov @ a.T), 0.0))
        z = coef / se
        df["se(coef)"] = se
        df["coef lower 95%"] = coef - _Z975 * se
        df["coef upper 95%"] = coef + _Z975 * se
        df["exp(coef) lower 95%"] = np.exp(df["coef lower 95%"])
        df["exp(coef) upper 95%"] = np.exp(df["coef upper 95%"])
        df["z"] = z
        df["p"] = 2.0 * scipy.stats.norm.sf(np.abs(z))
        if self.penalty == "l2":
            note.insert(0, "L2: SEs from the inverse penalized Hessian (shrunken, approximate)")
        if note:
            df.attrs["note"] = "; ".join(note)
        return df

    # serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-friendly dict (plain lists/floats) for ``model.json``; inverse :meth:`from_dict`."""
        self._check_fitted()
        return {
            "kind": _MODEL_KIND, "version": _PROTOCOL_VERSION,
            "params": self._effective_params(),
            "feature_names": list(self.feature_names_in_),
            "coef": self.coef_.tolist(), "intercept": self.intercept_,
            "coef_std": self.coef_std_.tolist(), "intercept_std": self.intercept_std_,
            "mean": self.mean_.tolist(), "scale": self.scale_.tolist(),
            "excluded_features": list(self.excluded_features_),
            "n": self.n_, "n_pos": self.n_pos_,
            "n_per_site": dict(self.n_per_site_), "n_pos_per_site": dict(self.n_pos_per_site_),
            "converged": self.converged_, "n_rounds": self.n_rounds_, "objective": self.objective_,
            "hessian_std": self.hessian_std_.tolist(), "history": [dict(h) for h in self.history_],
            "fit": self.fit_kind_,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LogisticModel":
        """Rebuild a fitted model from :meth:`to_dict` output."""
        if d.get("kind") != _MODEL_KIND:
            raise GLMError(f"not a logistic model dict (kind={d.get('kind')!r})")
        params = dict(d["params"])
        if params.get("C") is None:
            params["C"] = 1.0
        m = cls(**params)
        m.feature_names_in_ = list(d["feature_names"])
        m.n_features_in_ = len(m.feature_names_in_)
        m.classes_ = np.array([0, 1])
        m.coef_ = np.asarray(d["coef"], dtype=np.float64)
        m.intercept_ = float(d["intercept"])
        m.coef_std_ = np.asarray(d["coef_std"], dtype=np.float64)
        m.intercept_std_ = float(d["intercept_std"])
        m.mean_ = np.asarray(d["mean"], dtype=np.float64)
        m.scale_ = np.asarray(d["scale"], dtype=np.float64)
        m.excluded_features_ = list(d["excluded_features"])
        m.n_, m.n_pos_ = int(d["n"]), int(d["n_pos"])
        m.n_per_site_, m.n_pos_per_site_ = dict(d["n_per_site"]), dict(d["n_pos_per_site"])
        m.converged_, m.n_rounds_ = bool(d["converged"]), int(d["n_rounds"])
        m.objective_ = float("nan") if d.get("objective") is None else float(d["objective"])  # None: FedAvg fit
        m.hessian_std_ = np.asarray(d["hessian_std"], dtype=np.float64)
        m.history_ = [dict(h) for h in d.get("history", [])]
        m.fit_kind_ = d.get("fit", "federated")
        return m

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"LogisticModel({params})"


# ----------------------------------------------------------------------------------------------
# Drivers
# ----------------------------------------------------------------------------------------------
def _infer_features(site_data: Mapping[str, tuple], feature_names: Sequence[str] | None) -> list[str]:
    if feature_names is not None:
        return [str(f) for f in feature_names]
    for site, rows in site_data.items():
        if not (isinstance(rows, (tuple, list)) and len(rows) == 2):
            raise GLMError(f"site rows at site {site!r} must be a pair (X, y)")
        X = rows[0]
        if isinstance(X, pd.DataFrame):
            return [str(c) for c in X.columns]
        p = np.shape(X)[1] if np.ndim(X) == 2 else None
        if p is not None:
            return [f"x{j}" for j in range(p)]
    raise GLMError("cannot infer the feature names; pass feature_names=")


def fit_federated(site_data: Mapping[str, tuple], *, feature_names: Sequence[str] | None = None,
                  penalty: str | None = "l2", C: float = 1.0, l1_ratio: float | None = None,
                  tol: float = 1e-8, max_rounds: int = 30, transcript: list | None = None) -> LogisticModel:
    """Fit across sites in-process, exactly as the Flower handlers will, counting round trips.

    Each site sees only its own rows; every request and reply passes through the message codec
    (:mod:`fedrad.common.messages`: JSON + arrays, bit-exact).

    Parameters
    ----------
    site_data : dict
        Site name -> ``(X, y)`` (``X`` DataFrame with the feature columns, or an array with the
        columns in ``feature_names`` order; ``y`` 0/1).
    feature_names : list of str, optional
        Default: the first site's DataFrame columns, else ``x0, x1, ...``.
    penalty, C, l1_ratio, tol, max_rounds :
        See :class:`LogisticModel`.
    transcript : list, optional
        If given, one dict per round trip is appended: ``{"round", "request", "replies"}``.

    Returns
    -------
    LogisticModel
        With ``n_rounds_`` = round trips used.
    """
    if not site_data:
        raise GLMError("no sites")
    features = _infer_features(site_data, feature_names)
    server = LogisticServer(features, penalty=penalty, C=C, l1_ratio=l1_ratio, tol=tol, max_rounds=max_rounds)
    request = server.start()
    while request is not None:
        down = _to_wire(request)
        replies = {site: _to_wire(site_logistic(rows, down, site=site)) for site, rows in site_data.items()}
        if transcript is not None:
            transcript.append({"round": server.round_trips + 1, "request": down, "replies": replies})
        request = server.receive(replies)
    return server.model(fit="federated")


def fit_pooled(X: Any, y: Any, *, feature_names: Sequence[str] | None = None, penalty: str | None = "l2",
               C: float = 1.0, l1_ratio: float | None = None, tol: float = 1e-8,
               max_rounds: int = 30) -> LogisticModel:
    """Fit on pooled rows (same API and outputs as :func:`fit_federated`; the test oracle)."""
    return LogisticModel(penalty=penalty, C=C, l1_ratio=l1_ratio, tol=tol, max_rounds=max_rounds).fit(
        X, y, feature_names=feature_names)
