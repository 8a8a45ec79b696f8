r"""Smooth (penalized B-spline) covariate effects for ComBat-GAM, pooled and federated (pure numpy/scipy).

neuroHarmonize (Pomponio et al., NeuroImage 2020) models a covariate such as age as a smooth term: the
ComBat design ``[batch indicators | linear covariates]`` gets the columns of a cubic B-spline basis of
the covariate, fitted with a second-derivative roughness penalty by statsmodels' ``GLMGam``.  This module
holds the maths of that step in a form that needs only aggregates, so ``common/combat.py`` can run it
federatedly with the same square-root messages as linear ComBat.

Basis (matches statsmodels ``BSplines``)
----------------------------------------
A smooth term is defined by its *full knot vector* ``knots`` (:func:`full_knots`): the lower boundary knot
repeated ``degree + 1`` times, the sorted interior knots, the upper boundary knot repeated ``degree + 1``
times.  :func:`bspline_basis` evaluates the ``len(knots) - degree - 1`` B-splines and **drops the first**
(statsmodels ``include_intercept=False``: the B-splines sum to one, and the batch indicators already span
the constant), so it has ``m = len(knots) - degree - 2`` columns, named ``{name}_s0 .. {name}_s{m-1}`` by
:func:`basis_names` (statsmodels' names).  The same basis in statsmodels is::

    BSplines(x, df=len(knots) - degree - 1, degree=degree, knot_kwds=[{"all_knots": knots}])

(``df`` is then ignored).  statsmodels refuses points outside the boundary knots; here they are
**clipped** to the nearest boundary knot (the fitted smooth is extended as a constant), and
``return_clipped=True`` gives the number clipped so that a site can log it.  That number is a count of
possibly fewer than ``k`` patients: log it locally, never release it.

Penalty (what statsmodels really uses; it is *not* a sum over data points)
--------------------------------------------------------------------------
statsmodels' ``UnivariateBSplines.cov_der2`` (the ``penalty_matrices`` of ``BSplines``) is **not**
:math:`\sum_i B''(x_i)B''(x_i)^\top` (that line is commented out in its source) but the integral
:math:`S = \int B''(t)B''(t)^\top\,dt` over the knot range, computed by Simpson's rule on the unique knots
plus 3 equally spaced points inside each knot interval (``get_covder2``).  With distinct interior knots
the integrand is piecewise quadratic and every Simpson panel lies inside one knot interval, so this *is*
the exact integral.  It depends on the knots only: no data, nothing for a site to send.  :func:`penalty_matrix`
reproduces it (same points, same rule), so the server (or the plan) computes it from the agreed knots.

Scale of ``alpha`` (verified against ``GLMGam(...).fit()``, Gaussian family)
-----------------------------------------------------------------------------
statsmodels' PIRLS solves the augmented least squares ``[X; sqrt(2 alpha S)]`` (``penalized_wls`` doubles
the penalty), i.e. for the Gaussian family it minimizes

.. math:: \lVert y - X\beta\rVert^2 + 2\alpha\,\beta^\top S\beta, \qquad
          \hat\beta(\alpha) = (X^\top X + 2\alpha S)^{-1}X^\top y,

with :math:`S` the :func:`penalty_matrix` placed on the spline columns (zeros elsewhere).  The functions
here use exactly this objective, so an ``alpha`` means the same as statsmodels' ``GLMGam(alpha=...)`` and
neuroHarmonize's selected weight: the coefficients agree to ~1e-14 (tests).  Note that :math:`S` scales as
(unit of the covariate)\ :sup:`-3`, so an ``alpha`` transfers only with the same units and knots.

Smoothing-parameter choice by GCV from sufficient statistics
------------------------------------------------------------
For each ``alpha`` in a grid fixed in advance (plan) and each feature,

.. math:: \mathrm{RSS}(\alpha) = \lVert y - \hat y(\alpha)\rVert^2,\quad
          \mathrm{edf}(\alpha) = \mathrm{tr}\,H(\alpha),\quad
          \mathrm{GCV}(\alpha) = \frac{N\,\mathrm{RSS}(\alpha)}{(N - \mathrm{edf}(\alpha))^2}

(Craven & Wahba 1979; mgcv's GCV score), the chosen ``alpha`` minimizes GCV per feature (first minimum
in grid order).  statsmodels' ``GLMGamResults.gcv`` is ``scale / (1 - edf/N)^2`` with
``scale = RSS / (N - edf)``, i.e. :math:`N^2\,\mathrm{RSS}/(N-\mathrm{edf})^3` = our GCV
:math:`\times N/(N-\mathrm{edf})`; the two can select different alphas.  neuroHarmonize does not use
either: it picks ``alpha`` by random 5-fold CV on ``np.logspace(0, 7, 11)``
(``select_penweight_kfold``), which is not reproducible from aggregates.

Why the federated form is exact.  The batch indicators are unpenalized, so Frisch–Waugh–Lovell still
holds for the penalized fit: the covariate coefficients are those of the penalized *within-batch*
regression :math:`\min_\beta \sum_b \lVert Y^c_b - X^c_b\beta\rVert^2 + 2\alpha\beta^\top S\beta`, the
pooled residuals are the within-batch residuals, and the hat matrix is the batch-mean projection
(trace = number of batches) plus the within-batch penalized hat matrix.  With the sites' square-root
messages (``combat._sqrt_regression``: :math:`X^c_b = Q_bR_b`, :math:`Z_b = Q_b^\top Y^c_b`,
:math:`\rho^2_b`) and :math:`A = \mathrm{vstack}(R_bT_b)`, :math:`Z = \mathrm{vstack}(Z_b)`,
:math:`\rho^2 = \sum_b\rho^2_b`:

.. math:: \hat\beta(\alpha) = (A^\top A + 2\alpha S)^{-1}A^\top Z,\quad
          \mathrm{RSS} = \lVert Z - A\hat\beta\rVert^2 + \rho^2,\quad
          \mathrm{edf} = n_{batches} + \mathrm{tr}\big((A^\top A + 2\alpha S)^{-1}A^\top A\big),

computed from the QR factorization of the augmented matrix :math:`[A;\ \sqrt{2\alpha}L]`
(:math:`S = L^\top L`): with :math:`Q_1` its first ``rows(A)`` rows, :math:`A\hat\beta = Q_1Q_1^\top Z`
and :math:`\mathrm{tr} = \lVert Q_1\rVert_F^2`.  No normal equations are formed.
:func:`penalized_within_fit` is that server step; :func:`pooled_penalized_fit` is the pooled form with
the explicit n×n hat matrix, beside it for the tests.

Knots from aggregates (minimum cell size ``k``, no raw value released)
-----------------------------------------------------------------------
statsmodels places the interior knots at quantiles of the pooled covariate and the boundary knots at
its min and max, all raw values of the pooled rows.  Federated, the knots are instead derived before
the ComBat round and written in the study plan, so every site builds the same basis:

1. every site releases :func:`site_histogram` counts on bin edges fixed by the plan, neighbouring bins
   merged until every released bin holds at least ``k`` patients (values outside the plan edges are
   counted in the outermost bins, as the basis clips them; with ``release_empty=True`` a count is 0 or
   >= ``k``, empty stretches released as zeros);
2. :func:`pooled_quantile_knots` forms the pooled CDF as the sum of the sites' piecewise-linear CDFs
   (patients spread uniformly inside each released bin) and puts the interior knots at its equally
   spaced quantiles ``j/(n_interior + 1)``, the boundary knots at the outermost plan edges (never the
   data's min/max).

These knots are *approximate* quantiles: the pooled CDF is exact at an edge that every site released,
and a knot lies within about one released bin width of the pooled sample quantile (tests).  With the
default rule a site's sparse tail is merged down to the plan's outer edge, so an outer knot can move by
several plan bins (9.1 years in a test with 2.5-year bins and k = 10; 1.5 with ``release_empty``; at
most 0.6 with k <= 5 either way).  Knots only need to follow the data density roughly, and the
result is deterministic: it is agreed and written in the study plan before the ComBat round, so that
every site builds the same basis and the ComBat statistics do not depend on the knots' derivation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.integrate
import scipy.interpolate
import scipy.linalg

__all__ = [
    "SmoothError",
    "SmallCellError",
    "SingularPenalizedDesignError",
    "DEFAULT_ALPHAS",
    "full_knots",
    "basis_names",
    "bspline_basis",
    "bspline_basis_der2",
    "penalty_matrix",
    "embed_penalty",
    "gcv_score",
    "PenalizedFit",
    "penalized_within_fit",
    "pooled_penalized_fit",
    "Histogram",
    "site_histogram",
    "pooled_cdf",
    "pooled_quantile_knots",
    "grid_edges",
]

#: Default alpha grid: 41 points, log-spaced over [1, 1e7], every 4th one is a point of statsmodels' /
#: neuroHarmonize's k-fold grid ``np.logspace(0, 7, 11)``.  Suited to a covariate in units like years
#: (the penalty scales as unit^-3); the grid used by a study belongs in its plan.
DEFAULT_ALPHAS = np.logspace(0.0, 7.0, 41)
#: Column-normalized augmented design: pivots below this (relative to the largest) mean singular.
_SINGULAR_TOL = 1e-10
#: Penalty matrices: eigenvalues below -this * largest mean "not positive semi-definite".
_PSD_TOL = 1e-10


class SmoothError(ValueError):
    """Invalid input to the smooth-term maths."""


class SmallCellError(SmoothError):
    """A site holds fewer than ``k`` patients, so not even one histogram bin can be released."""


class SingularPenalizedDesignError(SmoothError):
    """The penalized design does not determine all coefficients."""


# ----------------------------------------------------------------------------------------------
# Knots and basis
# ----------------------------------------------------------------------------------------------

def _degree(degree: Any) -> int:
    if isinstance(degree, bool) or int(degree) != degree or degree < 1:
        raise SmoothError(f"spline degree must be a positive integer, got {degree!r}")
    return int(degree)


def _check_knots(knots: Any, degree: int) -> np.ndarray:
    """The validated full knot vector (see :func:`full_knots`) as a float array."""
    t = np.asarray(knots, dtype=np.float64)
    if t.ndim != 1 or not np.isfinite(t).all():
        raise SmoothError("knots must be a 1-D array of finite numbers (the full knot vector from full_knots)")
    order = degree + 1
    if t.size < 2 * order + 1:
        raise SmoothError(f"full knot vector has {t.size} entries; a degree-{degree} basis needs at least "
                          f"{2 * order + 1} (boundary knots repeated {order} times each, plus interior knots "
                          f"for at least 2 basis functions): build it with full_knots(interior, lower, upper)")
    if np.any(np.diff(t) < 0):
        raise SmoothError("knots must be sorted (non-decreasing): build them with full_knots(interior, lower, upper)")
    if not t[0] < t[-1]:
        raise SmoothError(f"lower boundary knot {t[0]!r} must be below the upper {t[-1]!r}")
    if not (np.all(t[:order] == t[0]) and np.all(t[-order:] == t[-1])):
        raise SmoothError(f"the boundary knots must each be repeated degree + 1 = {order} times: "
                          f"build the knot vector with full_knots(interior, lower, upper, degree={degree})")
    _, mult = np.unique(t, return_counts=True)
    if mult.max() > order:
        raise SmoothError(f"a knot is repeated more than degree + 1 = {order} times (an interior knot equal to a "
                          f"boundary knot, or tied interior knots): use distinct interior knots strictly "
                          f"inside the boundary")
    return t


def full_knots(interior: Any, lower: float, upper: float, degree: int = 3) -> np.ndarray:
    """Full knot vector ``[lower]*(degree+1) + sorted(interior) + [upper]*(degree+1)``.

    This is the ``all_knots`` of statsmodels (``BSplines(..., knot_kwds=[{"all_knots": knots}])``) and the
    representation every function of this module takes; write it in the study plan.

    Raises
    ------
    SmoothError
        If the bounds are not finite with ``lower < upper``, or an interior knot is not strictly inside.
    """
    degree = _degree(degree)
    inner = np.sort(np.asarray(interior, dtype=np.float64).ravel())
    lo, hi = float(lower), float(upper)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise SmoothError(f"boundary knots must be finite with lower < upper, got {lower!r}, {upper!r}")
    if not np.isfinite(inner).all() or np.any(inner <= lo) or np.any(inner >= hi):
        raise SmoothError(f"interior knots {inner.tolist()} must be finite and strictly between the boundary "
                          f"knots {lo!r} and {hi!r}")
    return _check_knots(np.concatenate([[lo] * (degree + 1), inner, [hi] * (degree + 1)]), degree)


def basis_names(name: str, knots: Any, degree: int = 3) -> list[str]:
    """Column names of :func:`bspline_basis` for covariate ``name``: ``{name}_s0 ...`` (statsmodels' names)."""
    degree = _degree(degree)
    t = _check_knots(knots, degree)
    return [f"{name}_s{i}" for i in range(t.size - degree - 2)]


def _values(x: Any, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if v.ndim != 1:
        raise SmoothError(f"covariate {name!r} must be one column of values, got shape {v.shape}")
    bad = ~np.isfinite(v)
    if bad.any():
        raise SmoothError(f"covariate {name!r} has {int(bad.sum())} missing or non-finite value(s) (first at "
                          f"row {int(np.flatnonzero(bad)[0])}): impute or drop those rows before the smooth term")
    return v


def _eval(x: np.ndarray, t: np.ndarray, degree: int, nu: int) -> np.ndarray:
    n_full = t.size - degree - 1
    spl = scipy.interpolate.BSpline(t, np.eye(n_full), degree, extrapolate=True)
    return np.asarray(spl(x, nu=nu))[:, 1:]          # drop the first B-spline (include_intercept=False)


def _clip(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, int]:
    n_out = int(((x < t[0]) | (x > t[-1])).sum())
    return np.clip(x, t[0], t[-1]), n_out


def bspline_basis(x: Any, knots: Any, degree: int = 3, *, name: str = "x",
                  return_clipped: bool = False) -> np.ndarray | tuple[np.ndarray, int]:
    """B-spline basis of a smooth term, first column dropped (statsmodels ``BSplines``, ``include_intercept=False``).

    Parameters
    ----------
    x : array_like, shape (n,)
        Covariate values.  Values outside ``[knots[0], knots[-1]]`` are clipped to the nearest boundary
        knot (constant extension of the smooth; statsmodels raises instead).
    knots : array_like
        Full knot vector (:func:`full_knots`).
    degree : int, default 3
        Spline degree (3: cubic, as neuroHarmonize).
    name : str
        Covariate name for error messages.
    return_clipped : bool, default False
        Also return the number of clipped values (for the site's own log; may be under ``k``: never
        release it).

    Returns
    -------
    basis : ndarray, shape (n, len(knots) - degree - 2)
    n_clipped : int, only with ``return_clipped``
    """
    degree = _degree(degree)
    t = _check_knots(knots, degree)
    xc, n_out = _clip(_values(x, name), t)
    basis = _eval(xc, t, degree, 0)
    return (basis, n_out) if return_clipped else basis


def bspline_basis_der2(x: Any, knots: Any, degree: int = 3, *, name: str = "x") -> np.ndarray:
    """Second derivative of :func:`bspline_basis` at ``x`` (clipped the same way), shape (n, m)."""
    degree = _degree(degree)
    t = _check_knots(knots, degree)
    xc, _ = _clip(_values(x, name), t)
    return _eval(xc, t, degree, 2)


def penalty_matrix(knots: Any, degree: int = 3, *, k_points: int = 3) -> np.ndarray:
    r"""Roughness penalty :math:`S = \int B''(t) B''(t)^\top dt` of :func:`bspline_basis`, shape (m, m).

    Identical to statsmodels' ``BSplines(...).penalty_matrices[0]`` (``get_covder2``): Simpson's rule on
    the unique knots plus ``k_points`` equally spaced points inside every knot interval; exact for distinct
    interior knots.  A function of the knots only, the same at every site: the server computes it.
    """
    degree = _degree(degree)
    t = _check_knots(knots, degree)
    u = np.unique(t)
    steps = np.arange(k_points + 1) / (k_points + 1)
    pts = np.concatenate([(u[:-1, None] + np.diff(u)[:, None] * steps).ravel(), u[-1:]])
    d2 = _eval(pts, t, degree, 2)
    s = scipy.integrate.simpson(d2[:, :, None] * d2[:, None, :], x=pts, axis=0)
    return (s + s.T) / 2.0


def embed_penalty(s: Any, start: int, n_columns: int) -> np.ndarray:
    """The p×p penalty of a design whose columns ``start .. start+m-1`` are a smooth term with penalty ``s``."""
    s = np.asarray(s, dtype=np.float64)
    m = s.shape[0]
    if s.shape != (m, m) or start < 0 or start + m > n_columns:
        raise SmoothError(f"penalty block of shape {s.shape} does not fit at column {start} of a "
                          f"{n_columns}-column design")
    out = np.zeros((n_columns, n_columns))
    out[start:start + m, start:start + m] = s
    return out


# ----------------------------------------------------------------------------------------------
# Penalized fit and GCV
# ----------------------------------------------------------------------------------------------

def grid_edges(alphas: Sequence[float], names: Sequence[str], grid: Sequence[float]) -> dict[str, list[str]]:
    """The features whose GCV alpha is the grid's largest (``"top"``: the smooth is as stiff as the grid allows,
    so the best fit may be stiffer still, i.e. closer to linear) or smallest value (``"bottom"``: as wiggly as
    it allows); both mean the GCV optimum may lie outside the grid, which is then worth widening."""
    g = np.asarray(grid, dtype=float)
    a = np.asarray(alphas, dtype=float)
    if g.size < 2 or a.size != len(names):
        return {"top": [], "bottom": []}
    hi, lo = float(g.max()), float(g.min())
    near = lambda v, edge: abs(v - edge) <= 1e-9 * max(abs(edge), 1e-300)  # noqa: E731
    return {"top": [n for n, v in zip(names, a) if near(v, hi)],
            "bottom": [n for n, v in zip(names, a) if near(v, lo)]}


def gcv_score(rss: Any, edf: Any, n: int) -> np.ndarray:
    r"""Generalized cross-validation :math:`N\,\mathrm{RSS}/(N - \mathrm{edf})^2` (mgcv's GCV score)."""
    rss, edf = np.asarray(rss, dtype=np.float64), np.asarray(edf, dtype=np.float64)
    if np.any(n - edf <= 0):
        raise SmoothError(f"effective degrees of freedom {float(np.max(edf)):.3g} reach the number of rows {n}: "
                          f"use fewer interior knots or larger alphas")
    return n * rss / (n - edf) ** 2


@dataclass
class PenalizedFit:
    """Result of :func:`penalized_within_fit` / :func:`pooled_penalized_fit`.

    Attributes
    ----------
    beta : ndarray (p, F)
        Covariate coefficients at each feature's chosen alpha (design column order).
    alpha : ndarray (F,) or (F, K)
        Chosen alpha per feature; (F, K) when ``penalty`` was a sequence of K matrices.
    edf : ndarray (F,)
        Effective degrees of freedom (batch indicators included) at the chosen alpha.
    rss : ndarray (F,)
        Residual sum of squares at the chosen alpha (all batches; ComBat's ``var_pooled = rss / N``).
    gcv : ndarray (F,)
        GCV at the chosen alpha.
    alphas : ndarray (G,) or (G, K)
        The grid searched.
    gcv_path : ndarray (G, F)
        GCV for every grid point and feature.
    edf_path : ndarray (G,)
        edf for every grid point (it does not depend on the feature).
    rss_path : ndarray (G, F)
    n_total, n_batches : int
    batch_coef : ndarray (B, F) or None
        Pooled form only: the batch-indicator coefficients at the chosen alpha.
    fitted : ndarray (n, F) or None
        Pooled form only: fitted values (batch + covariate effects) at the chosen alpha.
    """

    beta: np.ndarray
    alpha: np.ndarray
    edf: np.ndarray
    rss: np.ndarray
    gcv: np.ndarray
    alphas: np.ndarray
    gcv_path: np.ndarray
    edf_path: np.ndarray
    rss_path: np.ndarray
    n_total: int
    n_batches: int
    batch_coef: np.ndarray | None = None
    fitted: np.ndarray | None = None


def _penalties(penalty: Any, p: int) -> tuple[list[np.ndarray], bool]:
    """List of validated p×p penalty matrices; ``True`` if the caller gave a sequence."""
    multi = isinstance(penalty, (list, tuple))
    mats = [np.asarray(s, dtype=np.float64) for s in penalty] if multi else [np.asarray(penalty, dtype=np.float64)]
    if not mats:
        raise SmoothError("penalty is an empty sequence; pass one p×p matrix or one per smooth term")
    for i, s in enumerate(mats):
        what = f"penalty[{i}]" if multi else "penalty"
        if s.shape != (p, p):
            raise SmoothError(f"{what} has shape {s.shape}, expected ({p}, {p}) like the design's columns "
                              f"(embed the spline block with embed_penalty)")
        if not np.isfinite(s).all():
            raise SmoothError(f"{what} has non-finite entries")
        if np.abs(s - s.T).max() > 1e-10 * max(np.abs(s).max(), 1e-300):
            raise SmoothError(f"{what} is not symmetric")
        w = np.linalg.eigvalsh(s) if p else np.zeros(0)
        if w.size and w.min() < -_PSD_TOL * max(w.max(), 0.0):
            raise SmoothError(f"{what} is not positive semi-definite (eigenvalue {w.min():.3g})")
    return mats, multi


def _alpha_grid(alphas: Any, k: int) -> np.ndarray:
    """(G, K) grid: a value or a 1-D grid is shared by the K terms; a (G, K) array lists combinations."""
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim <= 1:
        a = np.repeat(a.reshape(-1, 1), k, axis=1)
    if a.ndim != 2 or a.shape[1] != k or a.shape[0] == 0:
        raise SmoothError(f"alphas must be a value, a 1-D grid (shared by the {k} smooth term(s)) or a "
                          f"(grid, {k}) array, got shape {np.shape(alphas)}")
    if not np.isfinite(a).all() or np.any(a < 0):
        raise SmoothError("alphas must be finite and >= 0")
    return a


def _names(names: Sequence[str] | None, p: int) -> list[str]:
    return list(names) if names is not None else [f"column {j}" for j in range(p)]


def _sqrt_penalty(s: np.ndarray) -> np.ndarray:
    """L with Lᵀ L = s (s symmetric PSD), rows for the positive eigenvalues only."""
    w, v = np.linalg.eigh(s)
    keep = w > _PSD_TOL * max(w.max(), 0.0) if w.size else np.zeros(0, bool)
    return np.sqrt(w[keep])[:, None] * v[:, keep].T


def _augmented_qr(a: np.ndarray, s: np.ndarray, names: list[str], alpha_txt: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """QR of [A; sqrt(2) L] (L the square root of ``s`` = sum_k alpha_k S_k) on unit-norm columns.

    Returns ``q1`` (rows of A), ``r``, ``piv``, ``norms`` with ``M[:, piv] / norms[piv] = Q r``."""
    m = np.vstack([a, np.sqrt(2.0) * _sqrt_penalty(s)])
    p = m.shape[1]
    norms = np.linalg.norm(m, axis=0)
    zero = [names[j] for j in range(p) if not norms[j] > 0]
    if zero:
        raise SingularPenalizedDesignError(
            f"singular penalized design at alpha {alpha_txt}: column(s) {zero} are zero in every batch and "
            f"unpenalized (the covariate does not vary within any batch, or no patient falls in a spline "
            f"column's support): drop the covariate or use fewer interior knots")
    mn = m / norms
    q, r, piv = scipy.linalg.qr(mn, mode="economic", pivoting=True)
    if m.shape[0] < p or np.abs(r[p - 1, p - 1]) <= _SINGULAR_TOL * np.abs(r[0, 0]):
        _, sv, vt = np.linalg.svd(mn, full_matrices=True)
        sfull = np.zeros(p)
        sfull[:sv.size] = sv
        null = vt[sfull <= _SINGULAR_TOL * sfull[0]]
        cols = [names[j] for j in range(p) if np.abs(null[:, j]).max() > 1e-3]
        raise SingularPenalizedDesignError(
            f"singular penalized design at alpha {alpha_txt}: column(s) {cols} are collinear within batches "
            f"and not fixed by the penalty: drop or combine covariates, use fewer interior knots, or exclude "
            f"alpha = 0 from the grid")
    return q[:a.shape[0]], r, piv, norms


def _select(gcv_path: np.ndarray) -> np.ndarray:
    if not np.isfinite(gcv_path).all():
        raise SmoothError("GCV is not finite for some alpha/feature (non-finite feature values?)")
    return np.argmin(gcv_path, axis=0)                   # first minimum in grid order


def penalized_within_fit(a: Any, z: Any, rho2: Any, n_total: int, n_batches: int, penalty: Any,
                         alphas: Any = DEFAULT_ALPHAS, *, names: Sequence[str] | None = None) -> PenalizedFit:
    r"""Server step: penalized within-batch regression and GCV choice of alpha from the sites' square-root forms.

    Parameters
    ----------
    a : array_like, shape (r, p)
        Stacked within-batch designs in square-root form, ``vstack(R_b T_b)`` (see ``combat``).
    z : array_like, shape (r, F)
        Stacked ``Z_b``.
    rho2 : array_like, shape (F,)
        :math:`\sum_b \rho^2_b` (residual sums the sites' QR could not explain).
    n_total : int
        Total number of rows :math:`N`.
    n_batches : int
        Number of batches (their indicators' degrees of freedom, added to the edf).
    penalty : array_like (p, p) or sequence of them
        Penalty on the design columns, zero for unpenalized ones (:func:`penalty_matrix` placed with
        :func:`embed_penalty`).  A sequence gives each smooth term its own alpha.
    alphas : float, 1-D grid, or (G, K) array, default :data:`DEFAULT_ALPHAS`
        Grid searched (the statsmodels scale: the objective is
        :math:`\lVert Z - A\beta\rVert^2 + 2\sum_k\alpha_k\beta^\top S_k\beta`).  With K penalties a 1-D
        grid is shared by all terms; pass a (G, K) array for per-term combinations.
    names : sequence of str, optional
        Design column names for error messages.

    Returns
    -------
    PenalizedFit
        ``beta`` (p×F) at each feature's GCV-chosen alpha, ``alpha``, ``edf``, ``rss``, ``gcv`` and the
        paths over the grid.

    Raises
    ------
    SmoothError, SingularPenalizedDesignError
    """
    a = np.asarray(a, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if a.ndim != 2:
        raise SmoothError(f"a must be the (rows, p) stacked square-root design, got shape {a.shape}")
    if z.ndim == 1:
        z = z[:, None]
    p, f = a.shape[1], z.shape[1]
    if z.shape[0] != a.shape[0]:
        raise SmoothError(f"z has {z.shape[0]} rows but a has {a.shape[0]}: stack the batches' R_b T_b and Z_b "
                          f"in the same order")
    rho2 = np.broadcast_to(np.asarray(rho2, dtype=np.float64), (f,)).copy() if np.ndim(rho2) == 0 \
        else np.asarray(rho2, dtype=np.float64)
    if rho2.shape != (f,) or not np.isfinite(rho2).all() or np.any(rho2 < 0):
        raise SmoothError(f"rho2 must be {f} finite non-negative residual sums (one per feature)")
    if not (np.isfinite(a).all() and np.isfinite(z).all()):
        raise SmoothError("a or z has non-finite entries (a site sent NaN?)")
    if int(n_batches) < 1 or int(n_total) <= int(n_batches):
        raise SmoothError(f"need n_total > n_batches >= 1, got n_total={n_total}, n_batches={n_batches}")
    n_total, n_batches = int(n_total), int(n_batches)
    mats, multi = _penalties(penalty, p)
    grid = _alpha_grid(alphas, len(mats))
    cols = _names(names, p)
    g_n = grid.shape[0]
    gcv_path, rss_path, edf_path = np.empty((g_n, f)), np.empty((g_n, f)), np.empty(g_n)
    betas = np.empty((g_n, p, f))
    for g in range(g_n):
        s = sum(al * sm for al, sm in zip(grid[g], mats))
        if p == 0:
            fit_z, beta, tr = np.zeros_like(z), np.zeros((0, f)), 0.0
        else:
            q1, r, piv, norms = _augmented_qr(a, s, cols, _alpha_txt(grid[g]))
            qz = q1.T @ z
            fit_z = q1 @ qz
            beta = np.empty((p, f))
            beta[piv] = scipy.linalg.solve_triangular(r, qz) / norms[piv, None]
            tr = float((q1 ** 2).sum())
        rss_path[g] = ((z - fit_z) ** 2).sum(axis=0) + rho2
        edf_path[g] = n_batches + tr
        betas[g] = beta
        gcv_path[g] = gcv_score(rss_path[g], edf_path[g], n_total)
    pick = _select(gcv_path)
    idx = np.arange(f)
    return PenalizedFit(
        beta=betas[pick, :, idx].T, alpha=grid[pick] if multi else grid[pick, 0],
        edf=edf_path[pick], rss=rss_path[pick, idx], gcv=gcv_path[pick, idx],
        alphas=grid if multi else grid[:, 0], gcv_path=gcv_path, edf_path=edf_path, rss_path=rss_path,
        n_total=n_total, n_batches=n_batches)


def _alpha_txt(al: np.ndarray) -> str:
    return f"{float(al[0]):.6g}" if al.size == 1 else str([float(v) for v in al])


def pooled_penalized_fit(design: Any, y: Any, penalty: Any, alphas: Any, batch_onehot: Any) -> PenalizedFit:
    r"""Pooled reference: the full n-row penalized fit with the explicit hat matrix (same objective and GCV).

    Builds :math:`X = [\text{batch\_onehot} \mid \text{design}]`, pads the penalty with zeros for the batch
    columns, and for every alpha forms :math:`H = X(X^\top X + 2\alpha\tilde S)^{-1}X^\top` (n×n),
    :math:`\mathrm{RSS} = \lVert y - Hy\rVert^2`, :math:`\mathrm{edf} = \mathrm{tr}\,H`, GCV.  Meant for
    tests and small pooled data (O(n²) memory); :func:`penalized_within_fit` is the federated form.

    Parameters
    ----------
    design : array_like (n, p)
        Covariate design columns (linear covariates and spline basis columns), no intercept.
    y : array_like (n,) or (n, F)
    penalty, alphas
        As :func:`penalized_within_fit` (p×p on ``design``'s columns).
    batch_onehot : array_like (n, B)
        Batch indicators, exactly one 1 per row, every batch non-empty.
    """
    x = np.asarray(design, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    d = np.asarray(batch_onehot, dtype=np.float64)
    if x.ndim != 2 or d.ndim != 2 or not (x.shape[0] == d.shape[0] == y.shape[0]):
        raise SmoothError(f"design {x.shape}, y {y.shape} and batch_onehot {d.shape} must have the same rows")
    if not (np.isin(d, (0.0, 1.0)).all() and np.all(d.sum(axis=1) == 1) and np.all(d.sum(axis=0) > 0)):
        raise SmoothError("batch_onehot must have exactly one 1 per row and no empty batch column")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise SmoothError("design or y has non-finite entries")
    n, b = d.shape
    p, f = x.shape[1], y.shape[1]
    mats, multi = _penalties(penalty, p)
    grid = _alpha_grid(alphas, len(mats))
    full = np.hstack([d, x])
    g_n = grid.shape[0]
    gcv_path, rss_path, edf_path = np.empty((g_n, f)), np.empty((g_n, f)), np.empty(g_n)
    coefs, fits = np.empty((g_n, b + p, f)), np.empty((g_n, n, f))
    for g in range(g_n):
        s = np.zeros((b + p, b + p))
        s[b:, b:] = sum(al * sm for al, sm in zip(grid[g], mats))
        lhs = full.T @ full + 2.0 * s
        hat = full @ np.linalg.solve(lhs, full.T)
        coefs[g] = np.linalg.solve(lhs, full.T @ y)
        fits[g] = hat @ y
        rss_path[g] = ((y - fits[g]) ** 2).sum(axis=0)
        edf_path[g] = np.trace(hat)
        gcv_path[g] = gcv_score(rss_path[g], edf_path[g], n)
    pick = _select(gcv_path)
    idx = np.arange(f)
    coef = coefs[pick, :, idx].T
    return PenalizedFit(
        beta=coef[b:], alpha=grid[pick] if multi else grid[pick, 0], edf=edf_path[pick],
        rss=rss_path[pick, idx], gcv=gcv_path[pick, idx], alphas=grid if multi else grid[:, 0],
        gcv_path=gcv_path, edf_path=edf_path, rss_path=rss_path, n_total=n, n_batches=b,
        batch_coef=coef[:b], fitted=fits[pick, :, idx].T)


# ----------------------------------------------------------------------------------------------
# Knots from k-anonymous histograms
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Histogram:
    """A site's released histogram of one covariate (:func:`site_histogram`).

    ``edges`` (a subset of the plan's edges keeping the first and last) and ``counts`` (every one >= k) are
    released (:meth:`message`).  ``n_below`` / ``n_above`` (values outside the plan edges, counted in the
    outermost bins) are for the site's own log only: they can be under ``k``.
    """

    edges: np.ndarray
    counts: np.ndarray
    n_below: int = 0
    n_above: int = 0

    def message(self) -> dict:
        """The part that leaves the site: ``{"edges": [...], "counts": [...]}``."""
        return {"edges": [float(e) for e in self.edges], "counts": [int(c) for c in self.counts]}


def _plan_edges(edges: Any) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.isfinite(e).all() or np.any(np.diff(e) <= 0):
        raise SmoothError("histogram edges must be at least 2 finite, strictly increasing values (from the plan)")
    return e


def site_histogram(values: Any, edges: Any, k: int, *, name: str = "x", release_empty: bool = False) -> Histogram:
    """Counts of a site's covariate on plan-fixed bins, neighbouring bins merged until each has >= ``k``.

    Bins are ``[e_j, e_{j+1})``, the last one closed; values outside ``[edges[0], edges[-1]]`` are counted
    in the outermost bins (as :func:`bspline_basis` clips them) and reported in ``n_below``/``n_above``.
    Merging is the deterministic greedy scan of ``metrics.merge_roc_bins``: close a group as soon as it
    satisfies the rule, merge a remainder that does not into its left neighbour (repeatedly).

    Parameters
    ----------
    values : array_like (n,)
    edges : array_like
        The plan's bin edges (strictly increasing).
    k : int
        Minimum cell size.
    name : str
        Covariate name for messages.
    release_empty : bool, default False
        False: empty bins are merged too, so every released count is >= ``k`` and the first and last
        released bins start at the plan's outer edges (a site's tail patients are then spread down to the
        plan edge, which can move an outer knot by several bin widths, see the tests).  True: a released
        count is 0 or >= ``k`` (the rule of ``metrics.merge_km_bins``): empty stretches are released as
        zeros, which discloses that the site has no patient there, and keeps the knots close to the
        pooled quantiles.

    Raises
    ------
    SmallCellError
        If the site has fewer than ``k`` patients (nothing can be released).
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise SmoothError(f"minimum cell size k must be a positive integer, got {k!r}")
    k = int(k)
    e = _plan_edges(edges)
    v = _values(values, name)
    if v.size < k:
        raise SmallCellError(f"covariate {name!r}: the site has {v.size} patients, fewer than the minimum cell "
                             f"size {k}, so no histogram can be released")
    n_below, n_above = int((v < e[0]).sum()), int((v > e[-1]).sum())
    counts, _ = np.histogram(np.clip(v, e[0], e[-1]), bins=e)

    def ok(c: int) -> bool:
        return c >= k or (release_empty and c == 0)

    groups: list[list[int]] = []          # [first bin, end bin (exclusive), count]
    cur = [0, 0, 0]
    for j, c in enumerate(counts):
        if release_empty and c == 0 and cur[2] == 0 and groups and groups[-1][2] == 0 and cur[1] == cur[0]:
            groups[-1][1] = j + 1         # consecutive empty bins: one released zero
            cur = [j + 1, j + 1, 0]
            continue
        cur[1], cur[2] = j + 1, cur[2] + int(c)
        if ok(cur[2]):
            groups.append(cur)
            cur = [j + 1, j + 1, 0]
    if cur[1] > cur[0]:
        groups.append(cur)
    while len(groups) > 1 and not ok(groups[-1][2]):   # a short remainder joins its left neighbour(s)
        last = groups.pop()
        groups[-1] = [groups[-1][0], last[1], groups[-1][2] + last[2]]
    return Histogram(edges=np.array([e[g[0]] for g in groups] + [e[-1]]),
                     counts=np.array([g[2] for g in groups], dtype=np.int64), n_below=n_below, n_above=n_above)


def _released(histograms: Sequence[Histogram | Mapping]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for i, h in enumerate(histograms):
        e = _plan_edges(h.edges if isinstance(h, Histogram) else h["edges"])
        c = np.asarray(h.counts if isinstance(h, Histogram) else h["counts"], dtype=np.float64)
        if c.shape != (e.size - 1,) or not np.isfinite(c).all() or np.any(c < 0):
            raise SmoothError(f"histogram {i}: counts must be {e.size - 1} non-negative numbers, one per bin")
        out.append((e, c))
    if not out:
        raise SmoothError("no site histograms to pool")
    lo, hi = out[0][0][0], out[0][0][-1]
    for i, (e, _) in enumerate(out):
        if e[0] != lo or e[-1] != hi:
            raise SmoothError(f"histogram {i} spans [{e[0]}, {e[-1]}], histogram 0 [{lo}, {hi}]: all sites must use "
                              f"the plan's bin edges")
    if sum(c.sum() for _, c in out) <= 0:
        raise SmoothError("the site histograms hold no patients")
    return out


def _pooled_counts(hs: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Sum over sites of the piecewise-linear count of values below ``x``."""
    return sum(np.interp(x, e, np.concatenate([[0.0], np.cumsum(c)])) for e, c in hs)


def pooled_cdf(histograms: Sequence[Histogram | Mapping], x: Any) -> np.ndarray:
    """Pooled CDF at ``x``: the sum of the sites' piecewise-linear CDFs (uniform within released bins) / N.

    Exact (the fraction of pooled patients below ``x``) at every edge that all sites released."""
    hs = _released(histograms)
    return _pooled_counts(hs, np.asarray(x, dtype=np.float64)) / sum(c.sum() for _, c in hs)


def pooled_quantile_knots(histograms: Sequence[Histogram | Mapping], n_interior: int, *,
                          degree: int = 3) -> np.ndarray:
    """Full knot vector from the sites' released histograms (:func:`site_histogram`).

    Interior knots: the pooled CDF's (:func:`pooled_cdf`) quantiles at ``j / (n_interior + 1)``,
    ``j = 1..n_interior`` (statsmodels' quantile levels; ``n_interior = df - degree - 1``, 6 for
    neuroHarmonize's ``df=10``); boundary knots: the outermost plan edges.  Approximate sample quantiles
    (within about one released bin width); agree on them and write them in the plan before the ComBat round.

    Returns
    -------
    ndarray
        :func:`full_knots` ``(interior, edges[0], edges[-1], degree)``.
    """
    if isinstance(n_interior, bool) or int(n_interior) != n_interior or n_interior < 0:
        raise SmoothError(f"n_interior must be a non-negative integer, got {n_interior!r}")
    hs = _released(histograms)
    grid = np.unique(np.concatenate([e for e, _ in hs]))
    cum = _pooled_counts(hs, grid)
    n = cum[-1]
    targets = n * np.arange(1, int(n_interior) + 1) / (int(n_interior) + 1)
    # cum is strictly increasing for site_histogram output (every released bin holds >= k >= 1 patients);
    # searchsorted takes the leftmost point of a flat stretch otherwise
    i = np.clip(np.searchsorted(cum, targets, side="left"), 1, grid.size - 1)   # first cum[i] >= target
    interior = grid[i - 1] + (targets - cum[i - 1]) / (cum[i] - cum[i - 1]) * (grid[i] - grid[i - 1])
    return full_knots(interior, grid[0], grid[-1], degree)
