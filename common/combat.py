r"""ComBat harmonization of radiomic features, pooled and federated (pure numpy, Flower-free).

ComBat (Johnson, Li & Rabinovic 2007; Fortin et al. 2017/2018 ``neuroCombat``; Orlhac et al.,
J Nucl Med 2022) removes additive and multiplicative batch (site/scanner) effects from features
while preserving the effect of biological covariates.  This module reproduces ``neuroCombat``
0.2.12 numerically (parametric and non-parametric empirical Bayes, ``mean_only``, ``eb=False``,
``ref_batch``) and computes the *same numbers* from per-site aggregates.

Model
-----
For sample :math:`i` of batch :math:`b` and feature :math:`g`

.. math:: y_{ig} = \alpha_g + x_i^\top\beta_g + \gamma_{bg} + \delta_{bg}^{1/2}\varepsilon_{ig}.

The design is ``[batch indicators | categorical one-hots (drop-first) | continuous]``; with a
reference batch its indicator column is all ones (an intercept), as in neuroCombat.  Pooled OLS
gives batch coefficients :math:`B_b` and covariate effects :math:`\beta`; then

* grand mean :math:`\hat\alpha = \sum_b (n_b/N) B_b` (or :math:`B_{ref}` with ``ref_batch``),
* pooled variance :math:`\hat\sigma^2 = \frac1N\sum_i (y_i - \hat y_i)^2` (only the reference
  batch's residuals with ``ref_batch``),
* standardized data :math:`s_i = (y_i - \hat\alpha - x_i^\top\beta)/\hat\sigma`,
* per batch: :math:`\hat\gamma_b = \bar s_b`, :math:`\hat\delta_b = \mathrm{var}(s_b)` (ddof 1),
  priors across features :math:`\bar\gamma_b, \tau^2_b` (mean, ddof-1 variance of
  :math:`\hat\gamma_b`), :math:`a_b = (2 s^2 + m^2)/s^2`, :math:`b_b = (m s^2 + m^3)/s^2`
  (:math:`m, s^2` mean and ddof-1 variance of :math:`\hat\delta_b`),
* posterior :math:`\gamma^*, \delta^*` by the iterative parametric solution (relative change
  < ``conv`` = 1e-4, as neuroCombat) or the non-parametric leave-one-feature-out integral,
* harmonized :math:`y^*_i = \hat\sigma (s_i - \gamma^*_b)/\sqrt{\delta^*_b} + \hat\alpha + x_i^\top\beta`
  (reference batch rows unchanged).

Why the federated version is exact (Frisch–Waugh–Lovell)
---------------------------------------------------------
Because every batch has its own indicator column, the OLS covariate effects equal the
*within-batch* regression: :math:`\beta = \arg\min \sum_b \lVert Y_b^c - X_b^c\beta\rVert^2` with
:math:`X_b^c, Y_b^c` centred on the batch's own means, and :math:`B_b = \bar y_b - \bar x_b^\top\beta`.
The pooled residuals are the within-batch residuals.  Everything after :math:`\hat\alpha, \beta,
\hat\sigma^2` (standardization, :math:`\hat\gamma, \hat\delta`, priors, posterior, adjustment) uses
only the batch's own rows, so it runs at the site when the batch lives at one site.

A batch at several sites (one scanner model at several hospitals, ``shared_batches``): the within-batch sums are
the within-block sums plus each block's offset from the batch mean, :math:`\sum_e n_e(\bar x_e-\bar x_b)
(\bar y_e-\bar y_b)^\top`, so the server adds the rows :math:`\sqrt{n_e}(\bar x_e-\bar x_b)`,
:math:`\sqrt{n_e}(\bar y_e-\bar y_b)` to the stacked least squares below.  The batch's standardized mean and
centred sum of squares follow from the blocks' means and residual sums (:class:`BatchSums`), which is all the EB
step needs (parametric iteration: :math:`\sum_i(s_i-\gamma)^2 = css + n(\bar s-\gamma)^2`; non-parametric:
the same sums), so the server computes every batch's posterior and sends it with the reference.

Extensions, all exact and in the same 2 round trips:

* **CovBat** (``covbat``; Chen et al., Hum Brain Mapp 2022, the R package's defaults): sites also send the full
  residual cross-product :math:`E^\top E` of each batch (only the diagonal otherwise), so the server has every
  block's centred cross-product of the ComBat residuals :math:`(Z-R\beta)^\top(Z-R\beta)+E^\top E`; with the
  posteriors it forms the scatter of :math:`z=(s-\gamma^*)/\sqrt{\delta^*}`, does the PCA (of the correlation,
  ``std_var``) and the per-batch location/scale of the first components' scores (ComBat without covariates or
  EB); sites apply :func:`covbat_adjust`.
* **ComBat-GAM** (``smooth``; neuroHarmonize): a smooth covariate enters as its B-spline basis on knots from the
  plan (:mod:`fedrad.common.smooth`), the server solves the penalized within-batch regression, each feature's
  alpha by GCV from the same sums.  A site refuses a spline piece covering 1 to k-1 of a batch's patients.
* **Nested ComBat** over several batch columns is a sequence of fits (``fedrad.local.harmonize_nested``; in the
  study one statistics round per column).
* Batch-level estimates go to the site holding the batch only (:meth:`ComBatReference.for_site`).

Numerical stability.  A site sends its regression in square-root (QR) form: with the pivoted,
rank-truncated Householder factorization :math:`X_b^c = Q_b R_b` it sends :math:`R_b`,
:math:`Z_b = Q_b^\top Y_b^c` and :math:`\rho^2_b = \lVert Y_b^c - Q_b Z_b\rVert^2` (per feature).
Then :math:`\lVert Y_b^c - X_b^c\beta\rVert^2 = \lVert Z_b - R_b\beta\rVert^2 + \rho_b^2` exactly, so
the server gets :math:`\beta` from a small stacked least-squares problem and every residual sum of
squares as a sum of non-negative terms: no :math:`Y^\top Y - \beta^\top X^\top X \beta`
cancellation, and features of 1e5 mm³ lose nothing because everything is centred on the batch
mean (the "shift").  Information-wise :math:`(R_b, Z_b, \rho_b^2)` is equivalent to the centred
:math:`X^\top X`, :math:`X^\top Y` and :math:`\mathrm{diag}(Y^\top Y)`: its size does not depend on
:math:`n_b` and it is invariant to the order of the rows.  Columns that are (numerically) linearly
dependent at a site are dropped from :math:`Q_b` so no arbitrary data direction is ever sent.

Federated protocol (2 round trips; patient rows never leave a site)
-------------------------------------------------------------------
1. server → sites, **request** (:func:`make_request`): features, covariates (continuous,
   categorical), ``batch_col`` (or one batch per site), ``ref_batch``, EB options,
   ``min_cell_size``.
2. site → server, **stats** (:func:`site_combat_stats`): per batch at the site: ``n``, feature
   means, continuous covariate means, categorical level counts, ``R`` (r×p, r ≤ p),
   ``Z`` (r×F), ``rss`` = :math:`\rho^2` (F).  The site refuses if a batch has fewer than
   ``max(request min_cell_size, site min_cell_size)`` rows, or any NaN.
   Server (:func:`combine_combat_stats`): union of categorical levels (sorted, first dropped);
   maps each site's local encoding onto it; checks the design rank (names collinear / constant /
   batch-confounded covariates); :math:`\beta`; per-batch RSS; :math:`\hat\sigma^2`;
   :math:`\hat\alpha`; zero-variance exclusions → :class:`ComBatReference`.
3. server → sites, **reference** (``ComBatReference.to_dict()``): :math:`\beta`,
   :math:`\hat\alpha`, :math:`\hat\sigma^2`, encoding, options, exclusions, batch sizes.
4. site → server, **summary** (from :func:`apply_combat`): rows harmonized, local exclusions.
   The site standardizes, estimates its own :math:`\hat\gamma, \hat\delta`, EB priors and
   posterior, and harmonizes locally.  A site that was not in the fit runs exactly the same
   step (3→4), like neuroHarmonize's ``applyModelOne``.

:func:`fit_federated` runs this protocol in-process (messages pass through JSON) and is used by
the tests and the CLI; the Flower handlers call the same ``site_*``/``combine_*``/``apply_*``.

Deviations from neuroCombat 0.2.12 (all outside the matched cases)
-------------------------------------------------------------------
* neuroCombat casts a DataFrame ``dat`` and continuous covariates to float32; we keep float64
  (the tests pass float64 arrays and float32-representable covariates).
* A feature with zero pooled residual variance, or (unless ``mean_only``) constant or with zero
  residual variance within a batch, is excluded and passed through unchanged, with the reason
  (neuroCombat silently replaces a zero variance by ``median(var != 0)`` or a zero ``delta_hat``
  by 1; a feature constant within a batch but not after the covariate fit, e.g. a hospital that
  recorded 0 for every patient, would get its covariate noise blown up).  The EB priors are then
  computed across the kept features.
* The non-parametric integral is computed in the log domain (neuroCombat underflows to NaN for
  batches of more than ~300 samples).
* Guards: small batches, singular designs, missing values, unknown ``ref_batch`` raise
  :class:`CombatError` (neuroCombat crashes, returns NaN or ignores ``ref_batch``).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.linalg

__all__ = [
    "CombatError",
    "SmallBatchError",
    "SingularDesignError",
    "MissingValueError",
    "UnknownLevelError",
    "BatchAdjustment",
    "ComBatReference",
    "ComBat",
    "FederatedComBat",
    "BatchSums",
    "location_scale",
    "eb_priors",
    "parametric_posterior",
    "nonparametric_posterior",
    "fit_batch_adjustment",
    "covbat_options",
    "covbat_adjust",
    "make_request",
    "site_combat_stats",
    "combine_combat_stats",
    "apply_combat",
    "fit_federated",
]

#: A residual sum of squares ``ss`` over ``n`` rows counts as zero when
#: ``ss / n <= (ZERO_VARIANCE_TOL * |feature mean|) ** 2`` (rounding noise of a constant).
ZERO_VARIANCE_TOL = 1e-12
#: Site QR: columns (scaled to unit norm) with pivot below this are linearly dependent.
_RANK_TOL = 1e-10
#: Server/pooled design check: smallest/largest singular value of the column-normalized
#: within-batch covariate design below this means the design is singular.
_SINGULAR_TOL = 1e-9
_PROTOCOL_VERSION = 1


def _repeated(names: list) -> list:
    """The names listed more than once, sorted (one pass: a wide table lists a thousand features)."""
    from collections import Counter

    return sorted(n for n, c in Counter(names).items() if c > 1)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class CombatError(ValueError):
    """Invalid input or model for ComBat; the message names the batch/feature/covariate."""


class SmallBatchError(CombatError):
    """A batch has fewer samples than ``min_cell_size``."""


class SingularDesignError(CombatError):
    """The covariate design is singular (collinear, constant or batch-confounded covariates)."""


class MissingValueError(CombatError):
    """A feature or covariate has missing (NaN) or infinite values."""


class UnknownLevelError(CombatError):
    """A categorical covariate level, batch or feature was not part of the fit."""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _py(v: Any) -> Any:
    """numpy scalar -> plain Python scalar (JSON-able); other values unchanged."""
    return v.item() if isinstance(v, np.generic) else v


def _names(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return list(x)


def _split_covariates(covariates: Any, categorical: Any) -> tuple[list[str], list[str]]:
    """(continuous, categorical): ``covariates`` lists all covariates, ``categorical`` the ones to
    one-hot encode (those not already in ``covariates`` are added)."""
    cov = _names(covariates)
    cat = _names(categorical)
    for label, lst in (("covariates", cov), ("categorical", cat)):
        dup = sorted({c for c in lst if lst.count(c) > 1})
        if dup:
            raise CombatError(f"{label} lists {dup} more than once; list each covariate once")
    continuous = [c for c in cov if c not in cat]
    return continuous, cat


def _where(site: Any = None, batch: Any = None) -> str:
    if site is not None and batch is not None and site != batch:
        return f"at site {site!r} (batch {batch!r})"
    if site is not None:
        return f"at site {site!r}"
    if batch is not None:
        return f"in batch {batch!r}"
    return "in the data"


def _sorted_levels(values: Any, what: str) -> list:
    levels = {_py(v) for v in values}
    try:
        return sorted(levels)
    except TypeError:
        raise CombatError(f"{what} mixes value types {sorted(repr(v) for v in levels)}; "
                          f"cast it to one type (e.g. str)") from None


def _check_columns(rows: pd.DataFrame, cols: Sequence[str], kind: str, where: str) -> None:
    missing = [c for c in cols if c not in rows.columns]
    if missing:
        raise CombatError(f"{kind} {missing} not found {where}; columns are {list(rows.columns)[:20]}")


def _check_finite(values: np.ndarray, names: Sequence[str], kind: str, where: str, fix: str) -> None:
    bad = (~np.isfinite(values)).sum(axis=0)
    idx = np.flatnonzero(bad)
    if idx.size:
        first = idx[0]
        more = "" if idx.size == 1 else f" (and {idx.size - 1} more {kind}s: {[names[j] for j in idx[1:4]]})"
        raise MissingValueError(f"{kind} {names[first]!r} has {int(bad[first])} missing values {where}{more}; {fix}")


def _feature_values(rows: pd.DataFrame, features: Sequence[str], where: str) -> np.ndarray:
    _check_columns(rows, features, "feature(s)", where)
    try:
        y = rows[list(features)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CombatError(f"features {where} must be numeric ({exc})") from None
    _check_finite(y, list(features), "feature", where, "impute or drop it")
    return y


def _check_covariates(rows: pd.DataFrame, continuous: Sequence[str], categorical: Sequence[str],
                      where: str) -> None:
    _check_columns(rows, list(categorical) + list(continuous), "covariate(s)", where)
    for c in categorical:
        n_bad = int(rows[c].isna().sum())
        if n_bad:
            raise MissingValueError(f"covariate {c!r} has {n_bad} missing values {where}; "
                                    f"impute them or drop those rows")
    if continuous:
        try:
            x = rows[list(continuous)].to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise CombatError(f"continuous covariates {list(continuous)} {where} must be numeric; "
                              f"list non-numeric ones in categorical") from None
        _check_finite(x, list(continuous), "covariate", where, "impute them or drop those rows")


def _check_min_cell(n: int, batch: Any, min_cell_size: int, where: str) -> None:
    if n < min_cell_size:
        where = f" {where}" if where else ""
        raise SmallBatchError(f"batch {batch!r} has {n} samples{where}, fewer than min_cell_size="
                              f"{min_cell_size}; merge it with another batch or leave it out")


def _design_names(continuous: Sequence[str], levels: Mapping[str, Sequence]) -> list[str]:
    return [f"{c}={lvl}" for c in levels for lvl in list(levels[c])[1:]] + list(continuous)


def _design_owner(continuous: Sequence[str], levels: Mapping[str, Sequence]) -> list[str]:
    return [c for c in levels for _ in list(levels[c])[1:]] + list(continuous)


def _encode(rows: pd.DataFrame, continuous: Sequence[str], levels: Mapping[str, Sequence],
            where: str) -> np.ndarray:
    """Covariate block of the design: one-hot (drop first level) per categorical, then continuous."""
    cols = []
    for c, lv in levels.items():
        col = rows[c]
        unknown = sorted({repr(_py(v)) for v in col[~col.isin(list(lv))]})
        if unknown:
            raise UnknownLevelError(f"covariate {c!r} has level(s) {', '.join(unknown)} {where} that "
                                    f"were not in the fit (levels {list(lv)}); recode or drop those rows")
        for lvl in list(lv)[1:]:
            cols.append((col == lvl).to_numpy(dtype=np.float64))
    for c in continuous:
        cols.append(rows[c].to_numpy(dtype=np.float64))
    if not cols:
        return np.zeros((len(rows), 0))
    return np.column_stack(cols)


def smooth_options(smooth: Any, alphas: Any = None) -> tuple[dict, list[float] | None]:
    """Normalized ComBat-GAM smooth terms ``{covariate: {"knots": full knot vector, "degree": 3}}`` (knots agreed
    in the plan: :func:`fedrad.common.smooth.full_knots`) and the alpha grid searched by GCV (statsmodels' scale;
    default :data:`fedrad.common.smooth.DEFAULT_ALPHAS`)."""
    from fedrad.common import smooth as sm

    if not smooth:
        return {}, None
    out = {}
    for name, spec in dict(smooth).items():
        spec = dict(spec) if isinstance(spec, Mapping) else {"knots": spec}
        degree = int(spec.get("degree", 3))
        try:
            knots = sm._check_knots(spec.get("knots"), degree)
        except (sm.SmoothError, TypeError, ValueError) as exc:
            raise CombatError(f"smooth term {name!r}: {exc}") from None
        out[str(name)] = {"knots": [float(k) for k in knots], "degree": degree}
    grid = np.atleast_1d(np.asarray(sm.DEFAULT_ALPHAS if alphas is None else alphas, dtype=float))
    if grid.ndim != 1 or not grid.size or not np.isfinite(grid).all() or (grid < 0).any():
        raise CombatError(f"smooth alphas must be non-negative numbers, got {alphas!r}")
    return out, [float(a) for a in grid]


def _basis_columns(smooth: Mapping) -> list[str]:
    from fedrad.common.smooth import basis_names

    return [c for name, spec in smooth.items() for c in basis_names(name, spec["knots"], spec["degree"])]


def _with_basis(rows: pd.DataFrame, smooth: Mapping, where: str) -> pd.DataFrame:
    """``rows`` with the B-spline basis columns of every smooth term (``age_s0`` ...; values outside the plan's
    boundary knots clipped to them)."""
    if not smooth:
        return rows
    from fedrad.common.smooth import SmoothError, basis_names, bspline_basis

    _check_columns(rows, list(smooth), "smooth covariate(s)", where)
    extra = {}
    for name, spec in smooth.items():
        try:
            basis = bspline_basis(rows[name].to_numpy(dtype=np.float64), spec["knots"], spec["degree"], name=name)
        except (SmoothError, TypeError, ValueError) as exc:
            raise CombatError(f"{exc} {where}") from None
        extra.update(dict(zip(basis_names(name, spec["knots"], spec["degree"]), basis.T)))
    return rows.assign(**extra)


def _check_basis_support(rows: pd.DataFrame, smooth: Mapping, min_cell_size: int, where: str) -> None:
    """Every B-spline piece of every smooth term, the dropped first one included (it is 1 minus the others, so in
    the span of the batch intercept), is non-zero for none or at least ``min_cell_size`` of the batch's patients: a
    piece covering one patient's age would make the regression sums describe that patient, like a categorical level
    of one patient (a piece covering nobody is an all-zero column, which the site's QR drops)."""
    import scipy.interpolate

    for name, spec in smooth.items():
        t, degree = np.asarray(spec["knots"], dtype=float), int(spec["degree"])
        x = np.clip(rows[name].to_numpy(dtype=np.float64), t[0], t[-1])
        full = scipy.interpolate.BSpline(t, np.eye(t.size - degree - 1), degree, extrapolate=True)(x)
        covered = (np.abs(full) > 1e-12).sum(axis=0)
        thin = [j for j, c in enumerate(covered) if 0 < c < min_cell_size]  # none covered: an all-zero column
        if thin:
            j = thin[0]
            raise SmallBatchError(f"smooth term {name!r}: the spline piece over {name} {t[j]:g}-{t[j + degree + 1]:g} "
                                  f"covers fewer than {min_cell_size} patients {where}; widen the knots of the plan "
                                  f"(fewer interior knots, or boundaries closer to where the patients are)")


def _smooth_penalty(smooth: Mapping, names: Sequence[str]) -> np.ndarray:
    """The roughness penalty on the design columns ``names`` (zero on the unpenalized ones)."""
    from fedrad.common.smooth import basis_names, penalty_matrix

    pen = np.zeros((len(names), len(names)))
    for name, spec in smooth.items():
        cols = [list(names).index(c) for c in basis_names(name, spec["knots"], spec["degree"])]
        pen[np.ix_(cols, cols)] += penalty_matrix(spec["knots"], spec["degree"])
    return pen


def _centre_within(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre the columns of ``x`` on their mean; columns constant to rounding become exactly 0."""
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    xc = x - mean
    if x.shape[1] and len(x):
        const = np.ptp(x, axis=0) <= ZERO_VARIANCE_TOL * np.abs(x).max(axis=0)
        xc[:, const] = 0.0
    return xc, mean


def _check_rank(a: np.ndarray, names: Sequence[str], owner: Sequence[str]) -> None:
    """Raise :class:`SingularDesignError` naming the covariates if the within-batch design ``a``
    (rows: centred samples or stacked R factors; columns: covariate design columns) is singular."""
    p = a.shape[1]
    if p == 0:
        return
    norms = np.linalg.norm(a, axis=0)
    zero = [names[j] for j in range(p) if not norms[j] > 0]
    if zero:
        owners = list(dict.fromkeys(owner[j] for j in range(p) if not norms[j] > 0))
        raise SingularDesignError(
            f"singular design: covariate(s) {owners} (column(s) {zero}) do not vary within any batch "
            f"(constant in the federation or completely confounded with batch); drop them from the covariates")
    an = a / norms
    _, s, vt = np.linalg.svd(an, full_matrices=True)
    s_full = np.zeros(p)
    s_full[: s.size] = s
    small = s_full <= _SINGULAR_TOL * s_full[0]
    if small.any():
        null = vt[small]
        involved = [j for j in range(p) if np.abs(null[:, j]).max() > 1e-3]
        cols = [names[j] for j in involved]
        owners = list(dict.fromkeys(owner[j] for j in involved))
        raise SingularDesignError(
            f"singular design: covariate(s) {owners} (column(s) {cols}) are collinear within batches; "
            f"drop or combine them")


def _zero_var(ss: np.ndarray, n: int, scale: np.ndarray) -> np.ndarray:
    """Boolean mask: residual sum of squares ``ss`` over ``n`` rows is zero up to rounding."""
    return ss / max(n, 1) <= (ZERO_VARIANCE_TOL * np.abs(scale)) ** 2


_CONSTANT_REASON = ("zero variance in batch {!r} (the feature is constant there), so its ComBat scale is "
                    "undefined; passed through unchanged")
_ZERO_RESID_REASON = ("zero variance in batch {!r} (constant after removing covariate effects), so its ComBat "
                      "scale is undefined; passed through unchanged")


def _exclusions(features: Sequence[str], batches: Sequence, sizes: Sequence[int], rss: np.ndarray,
                tss: np.ndarray, means: np.ndarray, ref_batch: Any, mean_only: bool) -> dict[str, str]:
    """Features ComBat cannot harmonize, each with its reason.

    * zero pooled residual variance (zero reference-batch residual variance with ``ref_batch``):
      standardization divides by it;
    * unless ``mean_only``: a batch where the feature is constant (zero within-batch sum of
      squares ``tss``), or has zero residual variance (``rss``).  Then ``delta_hat`` is zero, or
      only reflects the covariate fit (e.g. a site that recorded 0 for every patient), and the
      scale adjustment would be undefined or would blow up covariate noise.

    ``rss``, ``tss``, ``means``: (n_batches, n_features) per-batch residual and total (centred)
    sums of squares and means."""
    scale = np.abs(means).max(axis=0)
    if ref_batch is not None:
        r = list(batches).index(ref_batch)
        pooled_zero = _zero_var(rss[r], sizes[r], scale)
        pooled_reason = f"zero residual variance in reference batch {ref_batch!r}"
    else:
        pooled_zero = _zero_var(rss.sum(axis=0), int(sum(sizes)), scale)
        pooled_reason = "zero pooled residual variance (constant after removing covariate effects)"
    out: dict[str, str] = {}
    for j, name in enumerate(features):
        if pooled_zero[j]:
            out[name] = pooled_reason + "; passed through unchanged"
            continue
        if mean_only:
            continue
        for k, b in enumerate(batches):
            if _zero_var(tss[k, j:j + 1], sizes[k], means[k, j:j + 1])[0]:
                out[name] = _CONSTANT_REASON.format(b)
                break
            if _zero_var(rss[k, j:j + 1], sizes[k], means[k, j:j + 1])[0]:
                out[name] = _ZERO_RESID_REASON.format(b)
                break
    return out


def _wire(obj: Any) -> Any:
    """Round-trip a message through strict JSON (proves it is a plain, NaN-free dict of lists)."""
    return json.loads(json.dumps(obj, allow_nan=False))


# ----------------------------------------------------------------------------------------------
# Empirical Bayes: per batch, site-local
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSums:
    r"""A batch's standardized data summarized by its sufficient statistics: ``n`` rows, per-feature
    ``mean`` :math:`\bar s_g` and centred sum of squares ``css`` :math:`\sum_i (s_{ig}-\bar s_g)^2`.

    Everything ComBat's empirical Bayes step needs of a batch (location/scale, priors, the parametric
    iteration's :math:`\sum_i (s_i-\gamma)^2 = css + n(\bar s-\gamma)^2`, the non-parametric integral), so
    the server can compute a batch's posterior when the batch's rows are at several sites
    (:func:`combine_combat_stats` with ``shared_batches``)."""

    n: int
    mean: np.ndarray
    css: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.n), int(len(self.mean))

    @classmethod
    def of(cls, s: np.ndarray) -> "BatchSums":
        m = s.mean(axis=0)
        return cls(int(s.shape[0]), m, ((s - m) ** 2).sum(axis=0))

    def sum2(self, g: np.ndarray) -> np.ndarray:
        return self.css + self.n * (self.mean - g) ** 2


def location_scale(s: np.ndarray | BatchSums, mean_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    r"""Per-feature location and scale of one batch's standardized data.

    Parameters
    ----------
    s : ndarray, shape (n_samples, n_features), or :class:`BatchSums`
        Standardized data :math:`s_{ig}` of one batch (or its sufficient statistics).
    mean_only : bool
        If True, :math:`\hat\delta = 1`.

    Returns
    -------
    gamma_hat : ndarray (n_features,)
        :math:`\hat\gamma_g = \frac1n\sum_i s_{ig}`.
    delta_hat : ndarray (n_features,)
        :math:`\hat\delta_g = \frac1{n-1}\sum_i (s_{ig}-\hat\gamma_g)^2` (zeros replaced by 1, as
        neuroCombat's ``convert_zeroes``).
    """
    if isinstance(s, BatchSums):
        gamma_hat = np.asarray(s.mean, dtype=float).copy()
        delta_hat = np.ones(len(gamma_hat)) if mean_only else np.asarray(s.css, dtype=float) / (s.n - 1)
    else:
        gamma_hat = s.mean(axis=0)
        delta_hat = np.ones(s.shape[1]) if mean_only else s.var(axis=0, ddof=1)
    if not mean_only:
        delta_hat[delta_hat == 0] = 1.0
    return gamma_hat, delta_hat


def eb_priors(gamma_hat: np.ndarray, delta_hat: np.ndarray, mean_only: bool = False
              ) -> tuple[float, float, float, float]:
    r"""Empirical-Bayes hyper-parameters of one batch, across features.

    Returns
    -------
    gamma_bar, t2 : float
        Mean and ddof-1 variance of :math:`\hat\gamma` (normal prior on :math:`\gamma`).
    a_prior, b_prior : float
        Inverse-gamma prior on :math:`\delta` by moments: with :math:`m, s^2` the mean and ddof-1
        variance of :math:`\hat\delta`, :math:`a = (2s^2+m^2)/s^2`, :math:`b = (ms^2+m^3)/s^2`.
        NaN when ``mean_only``.
    """
    gamma_bar = float(np.mean(gamma_hat))
    if gamma_hat.size < 2:        # priors need >= 2 features (only reachable with eb=False)
        return gamma_bar, math.nan, math.nan, math.nan
    t2 = float(np.var(gamma_hat, ddof=1))
    if mean_only:
        return gamma_bar, t2, math.nan, math.nan
    m = float(np.mean(delta_hat))
    s2 = float(np.var(delta_hat, ddof=1))
    return gamma_bar, t2, (2 * s2 + m ** 2) / s2, (m * s2 + m ** 3) / s2


def _postmean(g_hat, g_bar, n, d_star, t2):
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _postvar(sum2, n, a, b):
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def parametric_posterior(s: np.ndarray, gamma_hat: np.ndarray, delta_hat: np.ndarray, gamma_bar: float,
                         t2: float, a_prior: float, b_prior: float, conv: float = 1e-4,
                         max_iter: int = 10000) -> tuple[np.ndarray, np.ndarray, int]:
    r"""Parametric EB posterior of one batch (neuroCombat ``it_sol``).

    Iterates, from :math:`\gamma^{(0)}=\hat\gamma, \delta^{(0)}=\hat\delta`,

    .. math::
        \gamma^{(t+1)} = \frac{\tau^2 n\hat\gamma + \delta^{(t)}\bar\gamma}{\tau^2 n + \delta^{(t)}},\qquad
        \delta^{(t+1)} = \frac{\tfrac12\sum_i (s_i-\gamma^{(t+1)})^2 + b}{n/2 + a - 1}

    until :math:`\max(\max|\Delta\gamma|/|\gamma^{(t)}|,\ \max|\Delta\delta|/\delta^{(t)}) \le` ``conv``
    (same criterion and evaluation order as neuroCombat, so the same iteration count).

    Returns
    -------
    gamma_star, delta_star : ndarray (n_features,)
    n_iter : int
    """
    n = s.shape[0]
    sum2_at = s.sum2 if isinstance(s, BatchSums) else (lambda g: ((s - g) ** 2).sum(axis=0))
    g_old = gamma_hat.copy()
    d_old = delta_hat.copy()
    change = 1.0
    count = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        while change > conv:
            g_new = _postmean(gamma_hat, gamma_bar, n, d_old, t2)
            sum2 = sum2_at(g_new)
            d_new = _postvar(sum2, n, a_prior, b_prior)
            change = max((abs(g_new - g_old) / g_old).max(), (abs(d_new - d_old) / d_old).max())
            g_old, d_old = g_new, d_new
            count += 1
            if count >= max_iter:
                warnings.warn(f"parametric ComBat did not converge in {max_iter} iterations "
                              f"(relative change {change:.3g})", RuntimeWarning, stacklevel=2)
                break
    return g_new, d_new, count


def nonparametric_posterior(s: np.ndarray, gamma_hat: np.ndarray, delta_hat: np.ndarray,
                            chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    r"""Non-parametric EB posterior of one batch (neuroCombat ``int_eprior``).

    For feature :math:`g`, the other features :math:`j \ne g` are an empirical prior:

    .. math::
        w_{gj} \propto (2\pi\hat\delta_j)^{-n/2}\exp\Big(-\frac{\sum_i (s_{ig}-\hat\gamma_j)^2}{2\hat\delta_j}\Big),\quad
        \gamma^*_g = \frac{\sum_j w_{gj}\hat\gamma_j}{\sum_j w_{gj}},\quad
        \delta^*_g = \frac{\sum_j w_{gj}\hat\delta_j}{\sum_j w_{gj}}.

    Computed in the log domain with :math:`\sum_i (s_{ig}-\hat\gamma_j)^2 = \sum_i (s_{ig}-\bar s_g)^2
    + n(\bar s_g-\hat\gamma_j)^2`, so large batches do not underflow.
    """
    sums = s if isinstance(s, BatchSums) else BatchSums.of(s)
    n, f = sums.shape
    m, ss = sums.mean, sums.css
    log_norm = -0.5 * n * np.log(2 * np.pi * delta_hat)
    gamma_star = np.empty(f)
    delta_star = np.empty(f)
    for lo in range(0, f, chunk):
        hi = min(f, lo + chunk)
        sum2 = ss[lo:hi, None] + n * (m[lo:hi, None] - gamma_hat[None, :]) ** 2
        log_lh = log_norm[None, :] - sum2 / (2 * delta_hat[None, :])
        log_lh[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        w = np.exp(log_lh - log_lh.max(axis=1, keepdims=True))
        tot = w.sum(axis=1)
        gamma_star[lo:hi] = (w @ gamma_hat) / tot
        delta_star[lo:hi] = (w @ delta_hat) / tot
    return gamma_star, delta_star


@dataclass
class BatchAdjustment:
    """ComBat location/scale estimates of one batch (computed where the batch's rows are).

    Attributes
    ----------
    batch : label
    n : int
        Samples in the batch.
    features : list of str
        Features the arrays refer to.
    gamma_hat, delta_hat : ndarray
        Per-feature location/scale of the standardized data (see :func:`location_scale`).
    gamma_bar, t2, a_prior, b_prior : float
        EB priors (see :func:`eb_priors`; a/b NaN when ``mean_only``).
    gamma_star, delta_star : ndarray
        Adjustment applied (EB posterior, or hat values when ``eb=False``; 0/1 for the
        reference batch).
    n_iter : int
        Parametric iterations (0 otherwise).
    excluded_features : dict
        Features excluded for this batch only (zero variance at an unseen site).
    """

    batch: Any
    n: int
    features: list
    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    gamma_bar: float
    t2: float
    a_prior: float
    b_prior: float
    gamma_star: np.ndarray
    delta_star: np.ndarray
    n_iter: int = 0
    excluded_features: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain dict of lists (NaN priors as None)."""
        def num(v):
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        return {"batch": _py(self.batch), "n": int(self.n), "features": list(self.features),
                "gamma_hat": self.gamma_hat.tolist(), "delta_hat": self.delta_hat.tolist(),
                "gamma_bar": num(self.gamma_bar), "t2": num(self.t2), "a_prior": num(self.a_prior),
                "b_prior": num(self.b_prior), "gamma_star": self.gamma_star.tolist(),
                "delta_star": self.delta_star.tolist(), "n_iter": int(self.n_iter),
                "excluded_features": dict(self.excluded_features)}


def fit_batch_adjustment(s: np.ndarray | BatchSums, *, batch: Any = None, features: Sequence[str] | None = None,
                         eb: bool = True, parametric: bool = True, mean_only: bool = False,
                         is_reference: bool = False, conv: float = 1e-4,
                         max_iter: int = 10000) -> BatchAdjustment:
    """Location/scale, priors and posterior of one batch from its standardized rows ``s``
    (n_samples, n_features), exactly as neuroCombat does per batch, or from their
    :class:`BatchSums` (the same numbers to rounding).

    ``is_reference``: the batch is ``ref_batch``; estimates are reported but the adjustment is
    ``gamma_star = 0``, ``delta_star = 1`` (data left unchanged).
    """
    n, f = s.shape
    features = list(features) if features is not None else [f"feature_{j}" for j in range(f)]
    gamma_hat, delta_hat = location_scale(s, mean_only)
    if f == 0:
        nan = math.nan
        return BatchAdjustment(batch, n, features, gamma_hat, delta_hat, nan, nan, nan, nan,
                               np.zeros(0), np.ones(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma_bar, t2, a_prior, b_prior = eb_priors(gamma_hat, delta_hat, mean_only)
    n_iter = 0
    if is_reference:
        gamma_star, delta_star = np.zeros(f), np.ones(f)
    elif not eb:
        gamma_star, delta_star = gamma_hat.copy(), delta_hat.copy()
    elif parametric:
        if mean_only:
            gamma_star = _postmean(gamma_hat, gamma_bar, 1, 1, t2)
            delta_star = np.ones(f)
        else:
            gamma_star, delta_star, n_iter = parametric_posterior(
                s, gamma_hat, delta_hat, gamma_bar, t2, a_prior, b_prior, conv, max_iter)
    else:
        gamma_star, delta_star = nonparametric_posterior(s, gamma_hat, delta_hat)
    return BatchAdjustment(batch, n, features, gamma_hat, delta_hat, gamma_bar, t2, a_prior, b_prior,
                           np.asarray(gamma_star, dtype=float), np.asarray(delta_star, dtype=float), n_iter)


def _check_eb_features(n_kept: int, eb: bool) -> None:
    if eb and n_kept == 1:
        raise CombatError("empirical Bayes needs at least 2 harmonizable features (its priors are "
                          "estimated across features); pass eb=False or add features")


def _standardize(y, d, grand, coef, var):
    return (y - grand - d @ coef) / np.sqrt(var)


def _from_z(z, d, grand, coef, var):
    return z * np.sqrt(var) + grand + d @ coef


def _destandardize(s, gamma_star, delta_star, d, grand, coef, var):
    return (s - gamma_star) / np.sqrt(delta_star) * np.sqrt(var) + grand + d @ coef


# ----------------------------------------------------------------------------------------------
# CovBat (Chen et al., Hum Brain Mapp 2022): site effects in the features' covariance
# ----------------------------------------------------------------------------------------------
def covbat_options(covbat: Any) -> dict | None:
    """Normalized CovBat options (the R package's defaults): ``percent_var`` 0.95 (adjust the first principal
    components explaining more than this share), ``n_pc`` (overrides it when > 0), ``std_var`` True (PCA of the
    correlation, not the covariance, of the ComBat residuals).  ``covbat`` is None/False (off), True or a dict."""
    if not covbat:
        return None
    opts = dict(covbat) if isinstance(covbat, Mapping) else {}
    pct, n_pc = float(opts.get("percent_var", 0.95)), int(opts.get("n_pc") or 0)
    if not 0.0 < pct <= 1.0:
        raise CombatError(f"CovBat percent_var must be in (0, 1], got {pct}")
    if n_pc < 0:
        raise CombatError(f"CovBat n_pc must be a positive number of components (or 0: by percent_var), got {n_pc}")
    return {"percent_var": pct, "n_pc": n_pc, "std_var": bool(opts.get("std_var", True))}


def _covbat_n_pc(eigenvalues: np.ndarray, opts: Mapping) -> int:
    ratio = np.cumsum(eigenvalues) / eigenvalues.sum()
    if opts["n_pc"]:
        if opts["n_pc"] > len(eigenvalues):
            raise CombatError(f"CovBat n_pc = {opts['n_pc']} but there are only {len(eigenvalues)} harmonized "
                              f"features; lower n_pc")
        return int(opts["n_pc"])
    above = np.flatnonzero(ratio > opts["percent_var"])
    return int(above[0]) + 1 if above.size else len(eigenvalues)   # R: which(cumsum(var) > percent.var)[1]


def _covbat_model(center, unit, vals, vecs, opts, batch_mean_u, batch_scatter_u, sizes) -> dict:
    """The CovBat message from the PCA of u = (z − centre)/unit: components, and per batch the score mean and
    variance (ComBat without covariates and without EB on the scores, as the R package's default)."""
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    npc = _covbat_n_pc(vals, opts)
    comps = vecs[:, :npc]
    comps = comps * np.where(comps[np.abs(comps).argmax(axis=0), range(npc)] < 0, -1.0, 1.0)  # sign: largest > 0
    sizes = np.asarray(sizes, dtype=float)
    m = np.vstack([mu @ comps for mu in batch_mean_u])
    v = np.vstack([np.einsum("fk,fg,gk->k", comps, w, comps) / (n - 1) for w, n in zip(batch_scatter_u, sizes)])
    var_pooled = ((sizes - 1)[:, None] * v).sum(axis=0) / sizes.sum()
    v[v == 0] = 1.0
    return {"percent_var": opts["percent_var"], "n_pc_requested": opts["n_pc"], "std_var": opts["std_var"],
            "n_pc": npc, "explained": (vals[:npc] / vals.sum()).tolist(), "center": np.asarray(center).tolist(),
            "unit": np.asarray(unit).tolist(), "components": comps.T.tolist(), "batch_mean": m.tolist(),
            "batch_var": v.tolist(), "var_pooled": var_pooled.tolist(),
            "grand_mean": ((sizes[:, None] * m).sum(axis=0) / sizes.sum()).tolist()}


def _covbat_from_sums(blocks, sizes, sd, gamma_star, delta_star, covbat) -> dict:
    r"""The CovBat model from the sites' sums (federated form of :func:`_covbat_from_rows`).

    ``blocks``: (batch index, n, C, d) per (site, batch) block with ``C`` the block's centred cross-product of the
    ComBat residuals :math:`y - \hatlpha - x^	opeta` (feature units) and ``d`` their block mean.  With
    :math:`z = (s - \gamma^*_b)/\sqrt{\delta^*_b}`, :math:`s = r/\hat\sigma`, a block's centred z scatter is
    :math:`E\,C\,E` (:math:`E = \mathrm{diag}(1/(\hat\sigma\sqrt{\delta^*}))`) and its mean :math:`(d/\hat\sigma -
    \gamma^*)/\sqrt{\delta^*}`; batches and the pool add block scatters plus their offsets from the joint mean."""
    opts = covbat_options(covbat)
    k, f = len(sizes), len(sd)
    n_b = np.asarray(sizes, dtype=float)
    zbar, scat = np.zeros((k, f)), np.zeros((k, f, f))
    parts: list[list] = [[] for _ in range(k)]
    for b, n, c, d in blocks:
        e = 1.0 / (sd * np.sqrt(delta_star[b]))
        zb = (d / sd - gamma_star[b]) / np.sqrt(delta_star[b])
        parts[b].append((n, zb))
        scat[b] += c * np.outer(e, e)
        zbar[b] += n * zb / n_b[b]
    for b in range(k):
        for n, zb in parts[b]:
            scat[b] += n * np.outer(zb - zbar[b], zb - zbar[b])
    center = (n_b[:, None] * zbar).sum(axis=0) / n_b.sum()
    total = scat.sum(axis=0) + sum(n * np.outer(zb - center, zb - center) for n, zb in zip(n_b, zbar))
    unit = np.sqrt(np.diag(total) / (n_b.sum() - 1)) if opts["std_var"] else 1.0 / sd
    unit = np.where(unit > 0, unit, 1.0)
    vals, vecs = np.linalg.eigh(total / np.outer(unit, unit) / (n_b.sum() - 1))
    return _covbat_model(center, unit, vals, vecs, opts, [(zb - center) / unit for zb in zbar],
                         [w / np.outer(unit, unit) for w in scat], sizes)


def _covbat_from_rows(z: np.ndarray, idx: Sequence[np.ndarray], sd: np.ndarray, covbat) -> dict:
    """The CovBat model of pooled rows ``z`` (ComBat-adjusted standardized data, every batch), by SVD."""
    opts = covbat_options(covbat)
    center = z.mean(axis=0)
    unit = z.std(axis=0, ddof=1) if opts["std_var"] else 1.0 / sd
    unit = np.where(unit > 0, unit, 1.0)
    u = (z - center) / unit
    _, sv, vt = np.linalg.svd(u, full_matrices=False)
    return _covbat_model(center, unit, sv ** 2 / (len(z) - 1), vt.T, opts, [u[i].mean(axis=0) for i in idx],
                         [(u[i] - u[i].mean(axis=0)).T @ (u[i] - u[i].mean(axis=0)) for i in idx],
                         [len(i) for i in idx])


def covbat_adjust(z: np.ndarray, covbat: Mapping, batch_index: int | None = None) -> np.ndarray:
    r"""CovBat's PCA step on one batch's ComBat-adjusted standardized rows ``z``.

    With :math:`u = (z - c)/\mathrm{unit}` and scores :math:`t = uV` of the first ``n_pc`` components, each score
    is moved to the pooled location/scale (ComBat without covariates or EB):
    :math:`t' = (t - m_b)\sqrt{v_p/v_b} + ar m`, then :math:`z' = c + (u + (t'-t)V^	op)\,\mathrm{unit}`
    (the other components are left as they are).  ``batch_index``: the batch's row of the model's per-batch
    moments; None (a batch not in the fit) estimates them from ``z`` itself."""
    comps = np.asarray(covbat["components"], dtype=float).T
    center, unit = np.asarray(covbat["center"], dtype=float), np.asarray(covbat["unit"], dtype=float)
    u = (z - center) / unit
    t = u @ comps
    if batch_index is None:
        if len(z) < 2:
            raise CombatError("CovBat needs at least 2 rows in a batch to estimate its score variance")
        m, v = t.mean(axis=0), t.var(axis=0, ddof=1)
        v[v == 0] = 1.0
    else:
        m = np.asarray(covbat["batch_mean"][batch_index], dtype=float)
        v = np.asarray(covbat["batch_var"][batch_index], dtype=float)
    t_new = (t - m) * np.sqrt(np.asarray(covbat["var_pooled"], dtype=float) / v) \
        + np.asarray(covbat["grand_mean"], dtype=float)
    return center + (u + (t_new - t) @ comps.T) * unit


# ----------------------------------------------------------------------------------------------
# Fitted model (the message of step 3)
# ----------------------------------------------------------------------------------------------
@dataclass
class ComBatReference:
    r"""A fitted ComBat reference: everything needed to harmonize a batch from its own rows.

    No per-patient values: arrays are per feature (or design column × feature).

    Attributes
    ----------
    features : list of str
        All features, in order (excluded ones included).
    continuous : list of str
        Continuous covariates (design columns after the categorical ones).
    categorical : dict
        Categorical covariate -> sorted levels; the first level is the dropped baseline.
    coef : ndarray, shape (n_design_columns, n_kept_features)
        Covariate effects :math:`\beta` for the kept features.
    grand_mean : ndarray (n_kept_features,)
        :math:`\hat\alpha` (neuroCombat ``stand.mean``).
    var_pooled : ndarray (n_kept_features,)
        :math:`\hat\sigma^2`.
    batches, batch_sizes : list
        Batches of the fit and their sample counts.
    ref_batch : label or None
        Reference batch (left unchanged), or None.
    batch_col : str or None
        Column holding the batch label in site tables (None: one batch per site, named by site;
        :func:`apply_combat` then needs ``site=`` or ``batch=``).
    eb, parametric, mean_only, conv, min_cell_size :
        Options the sites use for their local step.
    excluded_features : dict
        Feature -> reason; these columns pass through unchanged.
    shared_batches : bool
        Batch labels are global (one scanner model at several sites is one batch).
    posterior_gamma, posterior_delta : ndarray (n_batches, n_kept_features) or None
        The server's EB posterior :math:`\gamma^*, \delta^*` of every batch of the fit, from the batches' sums
        (:class:`BatchSums`); set with ``shared_batches`` or CovBat, and then used by the sites instead of their
        own estimate. None: each site estimates its batches' posterior from its rows (equal to rounding).
    covbat : dict or None
        The CovBat step (:func:`covbat_adjust`): PCA centre, unit and components of the ComBat-adjusted
        standardized data, and the per-batch score location/scale.
    smooth, smooth_alpha : dict, list
        ComBat-GAM smooth terms (:func:`smooth_options`; their basis columns are the last ``continuous``
        design columns) and each kept feature's GCV-chosen smoothing alpha.
    """

    features: list
    continuous: list
    categorical: dict
    coef: np.ndarray
    grand_mean: np.ndarray
    var_pooled: np.ndarray
    batches: list
    batch_sizes: list
    ref_batch: Any = None
    batch_col: str | None = None
    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    conv: float = 1e-4
    min_cell_size: int = 2
    excluded_features: dict = field(default_factory=dict)
    shared_batches: bool = False
    posterior_gamma: np.ndarray | None = None
    posterior_delta: np.ndarray | None = None
    covbat: dict | None = None
    smooth: dict = field(default_factory=dict)
    smooth_alpha: list | None = None
    posterior_batches: list | None = None

    @property
    def kept_features(self) -> list:
        """Features that are harmonized (``features`` minus ``excluded_features``)."""
        return [f for f in self.features if f not in self.excluded_features]

    @property
    def design_columns(self) -> list:
        """Names of the covariate design columns (rows of ``coef``)."""
        return _design_names(self.continuous, self.categorical)

    @property
    def n_samples(self) -> int:
        return int(sum(self.batch_sizes))

    def encode(self, rows: pd.DataFrame, where: str = "in the data") -> np.ndarray:
        """Covariate design block of ``rows`` in this reference's encoding (smooth terms: their basis columns)."""
        rows = _with_basis(rows, self.smooth, where)
        _check_covariates(rows, self.continuous, list(self.categorical), where)
        return _encode(rows, self.continuous, self.categorical, where)

    def to_dict(self) -> dict:
        """Plain dict of lists/str/numbers (JSON-able, NaN-free)."""
        return {
            "kind": "fedrad.combat.reference", "version": _PROTOCOL_VERSION,
            "features": [str(f) for f in self.features], "continuous": list(self.continuous),
            "categorical": {c: [_py(v) for v in lv] for c, lv in self.categorical.items()},
            "coef": np.asarray(self.coef, dtype=float).tolist(),
            "grand_mean": np.asarray(self.grand_mean, dtype=float).tolist(),
            "var_pooled": np.asarray(self.var_pooled, dtype=float).tolist(),
            "batches": [_py(b) for b in self.batches], "batch_sizes": [int(n) for n in self.batch_sizes],
            "ref_batch": _py(self.ref_batch), "batch_col": self.batch_col, "eb": bool(self.eb),
            "parametric": bool(self.parametric), "mean_only": bool(self.mean_only),
            "conv": float(self.conv), "min_cell_size": int(self.min_cell_size),
            "excluded_features": dict(self.excluded_features),
            **({"shared_batches": True} if self.shared_batches else {}),
            **({"posterior_gamma": np.asarray(self.posterior_gamma, dtype=float).tolist(),
                "posterior_delta": np.asarray(self.posterior_delta, dtype=float).tolist()}
               if self.posterior_gamma is not None else {}),
            **({"posterior_batches": [_py(b) for b in self.posterior_batches]}
               if self.posterior_batches is not None else {}),
            **({"covbat": _wire(self.covbat)} if self.covbat else {}),
            **({"smooth": _wire(self.smooth), "smooth_alpha": [float(a) for a in self.smooth_alpha]}
               if self.smooth else {}),
        }

    def posterior(self, batch: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """The server's (γ*, δ*) of ``batch``, or None when the site estimates it (not set, or a batch not in
        the fit)."""
        held = self.batches if self.posterior_batches is None else self.posterior_batches
        if self.posterior_gamma is None or batch not in held:
            return None
        i = list(held).index(batch)
        return np.asarray(self.posterior_gamma[i], dtype=float), np.asarray(self.posterior_delta[i], dtype=float)

    def covbat_index(self, batch: Any) -> int | None:
        """Row of ``batch`` in the CovBat per-batch score moments (None: not in the fit, the site estimates them)."""
        held = list(self.covbat.get("batches", self.batches)) if self.covbat else []
        return held.index(batch) if batch in held else None

    def for_site(self, labels: Sequence) -> dict:
        """:meth:`to_dict` for one site: the per-batch posteriors and CovBat score moments of the batches the site
        holds (``labels``) only, so no site receives another site's batch-level estimates."""
        d = self.to_dict()
        if self.posterior_gamma is not None:
            held = list(self.batches if self.posterior_batches is None else self.posterior_batches)
            rows = [i for i, b in enumerate(held) if b in set(labels)]
            d["posterior_gamma"] = [d["posterior_gamma"][i] for i in rows]
            d["posterior_delta"] = [d["posterior_delta"][i] for i in rows]
            d["posterior_batches"] = [d.get("posterior_batches", d["batches"])[i] for i in rows]
        if self.covbat:
            held = list(self.covbat.get("batches", self.batches))
            rows = [i for i, b in enumerate(held) if b in set(labels)]
            d["covbat"] = {**d["covbat"], "batch_mean": [d["covbat"]["batch_mean"][i] for i in rows],
                           "batch_var": [d["covbat"]["batch_var"][i] for i in rows],
                           "batches": [_py(held[i]) for i in rows]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ComBatReference":
        """Inverse of :meth:`to_dict`."""
        if d.get("kind", "fedrad.combat.reference") != "fedrad.combat.reference":
            raise CombatError(f"not a ComBat reference message (kind {d.get('kind')!r})")
        features = list(d["features"])
        excluded = dict(d.get("excluded_features", {}))
        n_kept = len([f for f in features if f not in excluded])
        categorical = {c: list(lv) for c, lv in d["categorical"].items()}
        p = len(_design_names(d["continuous"], categorical))
        coef = np.asarray(d["coef"], dtype=float).reshape(p, n_kept)
        return cls(features=features, continuous=list(d["continuous"]), categorical=categorical, coef=coef,
                   grand_mean=np.asarray(d["grand_mean"], dtype=float),
                   var_pooled=np.asarray(d["var_pooled"], dtype=float), batches=list(d["batches"]),
                   batch_sizes=[int(n) for n in d["batch_sizes"]], ref_batch=d.get("ref_batch"),
                   batch_col=d.get("batch_col"), eb=bool(d.get("eb", True)),
                   parametric=bool(d.get("parametric", True)), mean_only=bool(d.get("mean_only", False)),
                   conv=float(d.get("conv", 1e-4)), min_cell_size=int(d.get("min_cell_size", 2)),
                   excluded_features=excluded, shared_batches=bool(d.get("shared_batches", False)),
                   posterior_gamma=(np.asarray(d["posterior_gamma"], dtype=float).reshape(-1, n_kept)
                                    if d.get("posterior_gamma") is not None else None),
                   posterior_delta=(np.asarray(d["posterior_delta"], dtype=float).reshape(-1, n_kept)
                                    if d.get("posterior_delta") is not None else None),
                   covbat=dict(d["covbat"]) if d.get("covbat") else None,
                   smooth=dict(d.get("smooth") or {}), smooth_alpha=d.get("smooth_alpha"),
                   posterior_batches=list(d["posterior_batches"]) if d.get("posterior_batches") is not None else None)


# ----------------------------------------------------------------------------------------------
# Pooled ComBat (the oracle)
# ----------------------------------------------------------------------------------------------
class ComBat:
    r"""Pooled ComBat (neuroCombat-equivalent) on (n_samples, n_features) data.

    Parameters
    ----------
    covariates : list of str
        Covariates to preserve (columns of ``covars``); those also in ``categorical`` are
        one-hot encoded (sorted levels, first dropped), the others are continuous.
    categorical : list of str
        Categorical covariates (added to ``covariates`` if missing there).
    eb : bool, default True
        Empirical-Bayes shrinkage of :math:`\hat\gamma, \hat\delta`.
    parametric : bool, default True
        Parametric (iterative) or non-parametric EB.
    mean_only : bool, default False
        Adjust location only (:math:`\delta = 1`).
    ref_batch : label or None
        Reference batch: its data are left unchanged, grand mean and pooled variance are its own.
    min_cell_size : int, default 2
        Smallest allowed batch.
    conv : float, default 1e-4
        Convergence threshold of the parametric iteration.
    max_iter : int, default 10000
        Safety cap on the parametric iteration.
    covbat : bool or dict, optional
        Follow ComBat by CovBat's PCA step (:func:`covbat_options`: ``percent_var``, ``n_pc``, ``std_var``),
        as the CovBat R package's ``covbat`` with its defaults (score ComBat without EB).
    smooth : dict, optional
        ComBat-GAM (neuroHarmonize's ``smooth_terms``): covariate → full B-spline knot vector (or
        ``{"knots", "degree"}``); the covariate (a column of ``covars``, not in ``covariates``) enters as its
        basis with a roughness penalty, each feature's alpha chosen by GCV over ``smooth_alphas``.

    Attributes
    ----------
    reference_ : ComBatReference
        Fitted reference (what a federated fit broadcasts).
    feature_names_in_ : ndarray of str
    batches_ : list
        Sorted batch labels.
    batch_sizes_ : list of int
    coef_ : ndarray (n_design_columns, n_kept)
        Covariate effects :math:`\beta`.
    batch_coef_ : ndarray (n_batches, n_kept)
        Batch coefficients of the OLS (with ``ref_batch``: row of ref = intercept, others offsets).
    grand_mean_, var_pooled_ : ndarray (n_kept,)
    gamma_hat_, delta_hat_, gamma_star_, delta_star_ : ndarray (n_batches, n_kept)
    gamma_bar_, t2_, a_prior_, b_prior_ : ndarray (n_batches,)
    n_iter_ : ndarray (n_batches,)
    adjustments_ : dict
        Batch -> :class:`BatchAdjustment`.
    excluded_features_ : dict
        Feature -> reason (passed through unchanged).
    """

    def __init__(self, covariates: Sequence[str] = (), categorical: Sequence[str] = (), *, eb: bool = True,
                 parametric: bool = True, mean_only: bool = False, ref_batch: Any = None,
                 min_cell_size: int = 2, conv: float = 1e-4, max_iter: int = 10000, covbat: Any = None,
                 smooth: Any = None, smooth_alphas: Any = None):
        self.covariates = covariates
        self.covbat = covbat
        self.smooth = smooth
        self.smooth_alphas = smooth_alphas
        self.categorical = categorical
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only
        self.ref_batch = ref_batch
        self.min_cell_size = min_cell_size
        self.conv = conv
        self.max_iter = max_iter

    # -- input handling --------------------------------------------------------------------------
    def _inputs(self, X, batch, covars, names=None):
        if isinstance(X, pd.DataFrame):
            fnames = [str(c) for c in X.columns]
            y = X.to_numpy(dtype=np.float64)
        else:
            y = np.asarray(X, dtype=np.float64)
            if y.ndim != 2:
                raise CombatError(f"X must be 2-D (n_samples, n_features), got shape {y.shape}")
            fnames = list(names) if names is not None else [f"feature_{j}" for j in range(y.shape[1])]
        if names is not None and list(fnames) != list(names):
            raise CombatError(f"X has features {fnames[:5]}..., the fit had {list(names)[:5]}...")
        if covars is not None and not isinstance(covars, pd.DataFrame):
            covars = pd.DataFrame(covars)
        if isinstance(batch, str):
            if covars is None or batch not in covars.columns:
                raise CombatError(f"batch column {batch!r} not found in covars")
            labels = covars[batch].to_numpy()
        else:
            labels = np.asarray(batch)
        if covars is None:
            covars = pd.DataFrame(index=range(len(y)))
        covars = covars.reset_index(drop=True)
        if len(labels) != len(y) or len(covars) != len(y):
            raise CombatError(f"X has {len(y)} samples but batch has {len(labels)} and covars {len(covars)}")
        if pd.isna(pd.Series(labels)).any():
            raise MissingValueError(f"batch has {int(pd.isna(pd.Series(labels)).sum())} missing labels; "
                                    f"assign a batch to every sample")
        return y, fnames, labels, covars

    def _output(self, X, values):
        if isinstance(X, pd.DataFrame):
            return pd.DataFrame(values, index=X.index, columns=X.columns)
        return values

    # -- fit -------------------------------------------------------------------------------------
    def fit(self, X, batch, covars=None) -> "ComBat":
        """Fit ComBat on ``X`` (n_samples, n_features) with batch labels ``batch`` (array-like, or a
        column name of ``covars``) and covariates ``covars`` (DataFrame)."""
        if self.min_cell_size < 2:
            raise CombatError(f"min_cell_size must be at least 2 (a batch variance needs 2 samples), "
                              f"got {self.min_cell_size}")
        continuous, categorical = _split_covariates(self.covariates, self.categorical)
        terms, grid = smooth_options(self.smooth, self.smooth_alphas)
        y, fnames, labels, covars = self._inputs(X, batch, covars)
        if terms:
            covars = _with_basis(covars, terms, "")
            continuous = continuous + _basis_columns(terms)
        batches = _sorted_levels(labels, "batch")
        idx = [np.flatnonzero(labels == b) for b in batches]
        sizes = [len(i) for i in idx]
        for b, n in zip(batches, sizes):
            _check_min_cell(n, b, self.min_cell_size, "")
        ref = self.ref_batch
        if ref is not None and ref not in batches:
            raise UnknownLevelError(f"ref_batch {ref!r} is not one of the batches {batches}")
        for b, i in zip(batches, idx):
            _check_finite(y[i], fnames, "feature", _where(batch=b), "impute or drop it")
            _check_covariates(covars.iloc[i], continuous, categorical, _where(batch=b))
        levels = {c: _sorted_levels(covars[c], f"covariate {c!r}") for c in categorical}
        for c, lv in levels.items():
            if len(lv) < 2:
                raise SingularDesignError(f"singular design: categorical covariate {c!r} has the single level "
                                          f"{lv[0]!r} in all batches; drop it from the covariates")
        d = _encode(covars, continuous, levels, "")
        dnames, downer = _design_names(continuous, levels), _design_owner(continuous, levels)
        if not terms:
            _check_rank(np.vstack([_centre_within(d[i])[0] for i in idx]), dnames, downer)

        # pooled OLS on the full design (batch one-hot, ref column = intercept), Y shifted by its
        # overall mean (exact: the batch columns span the constant) for precision with large values
        k = len(batches)
        r = batches.index(ref) if ref is not None else None
        onehot = np.zeros((len(y), k))
        for j, i in enumerate(idx):
            onehot[i, j] = 1.0
        if r is not None:
            onehot[:, r] = 1.0
        # covariates centred on their overall mean: also exact (batch coefficients absorb it) and
        # keeps large-valued covariates from being nearly collinear with the batch indicators
        dmean = d.mean(axis=0) if d.shape[1] else np.zeros(0)
        design = np.hstack([onehot, d - dmean])
        shift = y.mean(axis=0)
        alpha = None
        if terms:  # ComBat-GAM: the penalized within-batch regression (batch intercepts unpenalized)
            coef, alpha = _penalized_beta(np.vstack([_centre_within(d[i])[0] for i in idx]),
                                          np.vstack([y[i] - y[i].mean(axis=0) for i in idx]), np.zeros(y.shape[1]),
                                          len(y), k, terms, {"smooth_alphas": grid}, dnames, downer)
            bcoef = np.vstack([y[i].mean(axis=0) - d[i].mean(axis=0) @ coef for i in idx])
            row_batch = np.empty(len(y), dtype=int)
            for j, i in enumerate(idx):
                row_batch[i] = j
            resid = y - bcoef[row_batch] - d @ coef
        else:
            coef_all = np.linalg.lstsq(design, y - shift, rcond=None)[0]
            resid = (y - shift) - design @ coef_all
            if r is not None:
                coef_all[r] += shift - dmean @ coef_all[k:]
            else:
                coef_all[:k] += shift - dmean @ coef_all[k:]
            bcoef, coef = coef_all[:k], coef_all[k:]
        n_tot = len(y)
        grand = bcoef[r].copy() if r is not None else (np.asarray(sizes) / float(n_tot)) @ bcoef
        rss = np.vstack([(resid[i] ** 2).sum(axis=0) for i in idx])
        var = rss[r] / sizes[r] if r is not None else (resid ** 2).sum(axis=0) / n_tot
        means = np.vstack([y[i].mean(axis=0) for i in idx])
        tss = np.vstack([((y[i] - m) ** 2).sum(axis=0) for i, m in zip(idx, means)])
        excluded = _exclusions(fnames, batches, sizes, rss, tss, means, ref, self.mean_only)
        kept = np.array([f not in excluded for f in fnames], dtype=bool)
        _check_eb_features(int(kept.sum()), self.eb)

        self.feature_names_in_ = np.array(fnames, dtype=object)
        self.n_features_in_ = len(fnames)
        self.batches_ = batches
        self.batch_sizes_ = sizes
        self.excluded_features_ = excluded
        self._kept = kept
        self.coef_ = coef[:, kept]
        self.batch_coef_ = bcoef[:, kept]
        self.grand_mean_ = grand[kept]
        self.var_pooled_ = var[kept]
        self.reference_ = ComBatReference(
            features=fnames, continuous=continuous, categorical=levels, coef=self.coef_,
            grand_mean=self.grand_mean_, var_pooled=self.var_pooled_, batches=list(batches),
            batch_sizes=list(sizes), ref_batch=ref, batch_col=batch if isinstance(batch, str) else None,
            eb=self.eb, parametric=self.parametric,
            mean_only=self.mean_only, conv=self.conv, min_cell_size=self.min_cell_size,
            excluded_features=dict(excluded), smooth=terms,
            smooth_alpha=[float(x) for x in alpha[kept]] if terms else None)

        kept_names = [f for f, kk in zip(fnames, kept) if kk]
        s = _standardize(y[:, kept], d, self.grand_mean_, self.coef_, self.var_pooled_)
        self.adjustments_ = {}
        for b, i in zip(batches, idx):
            self.adjustments_[b] = fit_batch_adjustment(
                s[i], batch=b, features=kept_names, eb=self.eb, parametric=self.parametric,
                mean_only=self.mean_only, is_reference=(b == ref and ref is not None), conv=self.conv,
                max_iter=self.max_iter)
        adj = [self.adjustments_[b] for b in batches]
        self.gamma_hat_ = np.array([a.gamma_hat for a in adj])
        self.delta_hat_ = np.array([a.delta_hat for a in adj])
        self.gamma_star_ = np.array([a.gamma_star for a in adj])
        self.delta_star_ = np.array([a.delta_star for a in adj])
        self.gamma_bar_ = np.array([a.gamma_bar for a in adj])
        self.t2_ = np.array([a.t2 for a in adj])
        self.a_prior_ = np.array([a.a_prior for a in adj])
        self.b_prior_ = np.array([a.b_prior for a in adj])
        self.n_iter_ = np.array([a.n_iter for a in adj])
        if covbat_options(self.covbat):
            if ref is not None:
                raise CombatError("CovBat with a reference batch is not defined (CovBat's PCA step adjusts every "
                                  "batch); leave ref_batch out or turn CovBat off")
            z = np.empty_like(s)
            for b, i in zip(batches, idx):
                z[i] = (s[i] - self.adjustments_[b].gamma_star) / np.sqrt(self.adjustments_[b].delta_star)
            self.reference_.posterior_gamma, self.reference_.posterior_delta = self.gamma_star_, self.delta_star_
            self.reference_.covbat = _covbat_from_rows(z, idx, np.sqrt(self.var_pooled_), self.covbat)
        return self

    def transform(self, X, batch, covars=None):
        """Harmonize ``X`` whose batches were all in the fit, with the fitted posteriors
        (:math:`\\gamma^*, \\delta^*` of each batch).  For a batch that was not in the fit use
        :func:`apply_combat` with :attr:`reference_` (it estimates the batch's own effects)."""
        if not hasattr(self, "reference_"):
            raise CombatError("ComBat is not fitted; call fit first")
        ref = self.reference_
        y, fnames, labels, covars = self._inputs(X, batch, covars, names=list(self.feature_names_in_))
        out = y.copy()
        d = ref.encode(covars, "")
        kept = self._kept
        for b in _sorted_levels(labels, "batch"):
            if b not in self.batches_:
                raise UnknownLevelError(f"batch {b!r} was not in the fit (batches {self.batches_}); "
                                        f"use apply_combat(rows, model.reference_) for a new batch")
            i = np.flatnonzero(labels == b)
            _check_finite(y[i], fnames, "feature", _where(batch=b), "impute or drop it")
            if ref.ref_batch is not None and b == ref.ref_batch:
                continue
            a = self.adjustments_[b]
            s = _standardize(y[np.ix_(i, kept)], d[i], ref.grand_mean, ref.coef, ref.var_pooled)
            z = (s - a.gamma_star) / np.sqrt(a.delta_star)
            if ref.covbat:
                z = covbat_adjust(z, ref.covbat, self.batches_.index(b))
            out[np.ix_(i, kept)] = _from_z(z, d[i], ref.grand_mean, ref.coef, ref.var_pooled)
        return self._output(X, out)

    def fit_transform(self, X, batch, covars=None):
        """Fit, then harmonize the training data (identical to neuroCombat's ``data``, transposed)."""
        return self.fit(X, batch, covars).transform(X, batch, covars)


# ----------------------------------------------------------------------------------------------
# Federated pieces
# ----------------------------------------------------------------------------------------------
def make_request(features: Sequence[str], covariates: Sequence[str] = (), categorical: Sequence[str] = (), *,
                 batch_col: str | None = None, ref_batch: Any = None, eb: bool = True, parametric: bool = True,
                 mean_only: bool = False, min_cell_size: int = 2, conv: float = 1e-4, shared_batches: bool = False,
                 covbat: Any = None, smooth: Any = None, smooth_alphas: Any = None) -> dict:
    """Message 1 (server → sites): what to compute.  ``covariates``/``categorical`` as in
    :class:`ComBat`.  ``batch_col=None`` means each site is one batch named by the site.
    ``shared_batches``: a ``batch_col`` label is global, so one scanner model at several sites is one batch (the
    server then computes every batch's posterior from its sums).  ``covbat``: add CovBat's PCA step
    (:func:`covbat_options`); the sites then also send their residual scatter (F×F per batch).  ``smooth``:
    ComBat-GAM smooth terms (:func:`smooth_options`: covariate → full knot vector agreed in the plan); a smooth
    covariate is not also a linear one.  ``smooth_alphas``: the GCV grid."""
    features = [str(f) for f in _names(features)]
    if not features:
        raise CombatError("no features to harmonize")
    dup = _repeated(features)
    if dup:
        raise CombatError(f"features {dup} listed more than once")
    continuous, cat = _split_covariates(covariates, categorical)
    clash = sorted(set(features) & set(continuous + cat))
    if clash:
        raise CombatError(f"{clash} listed both as features and covariates")
    if int(min_cell_size) < 2:
        raise CombatError(f"min_cell_size must be at least 2, got {min_cell_size}")
    if shared_batches and batch_col is None:
        raise CombatError("shared_batches needs a batch column (the scanner labels shared across sites)")
    opts = covbat_options(covbat)
    if opts and ref_batch is not None:
        raise CombatError("CovBat with a reference batch is not defined (CovBat's PCA step adjusts every batch); "
                          "leave ref_batch out or turn CovBat off")
    terms, grid = smooth_options(smooth, smooth_alphas)
    clash = sorted(set(terms) & set(continuous + cat + features))
    if clash:
        raise CombatError(f"{clash} listed both as smooth terms and as features or linear/categorical covariates; "
                          "a smooth term replaces the linear effect")
    return {"kind": "fedrad.combat.request", "version": _PROTOCOL_VERSION, "features": features,
            **({"smooth": terms, "smooth_alphas": grid} if terms else {}),
            "continuous": continuous, "categorical": cat, "batch_col": batch_col,
            "ref_batch": _py(ref_batch), "eb": bool(eb), "parametric": bool(parametric),
            "mean_only": bool(mean_only), "min_cell_size": int(min_cell_size), "conv": float(conv),
            **({"shared_batches": True} if shared_batches else {}), **({"covbat": opts} if opts else {})}


def _site_batches(rows: pd.DataFrame, batch_col: str | None, site: Any, batch: Any) -> tuple[list, np.ndarray]:
    if batch_col is not None:
        where = _where(site=site)
        _check_columns(rows, [batch_col], "batch column", where)
        labels = rows[batch_col].to_numpy()
        n_bad = int(pd.isna(rows[batch_col]).sum())
        if n_bad:
            raise MissingValueError(f"batch column {batch_col!r} has {n_bad} missing values {where}; "
                                    f"assign a batch to every row")
        return _sorted_levels(labels, f"batch column {batch_col!r}"), labels
    label = batch if batch is not None else site
    if label is None:
        raise CombatError("the request has no batch_col, so pass site= (or batch=) to name this site's batch")
    return [_py(label)], np.full(len(rows), 0, dtype=object)


def _local_columns(levels: Mapping[str, Sequence], continuous: Sequence[str]) -> list[tuple[str, Any]]:
    """Local design columns at a site: (categorical, level) for present levels but the first, then
    (continuous, None)."""
    return [(c, lvl) for c, lv in levels.items() for lvl in list(lv)[1:]] + [(c, None) for c in continuous]


def _sqrt_regression(xc: np.ndarray, yc: np.ndarray, scatter: bool = False) -> tuple:
    """Square-root form of the within-batch regression of ``yc`` on ``xc`` (both centred).

    Returns ``R`` (r×p), ``Z`` (r×F), ``rss`` (F) with ``xc = Q R`` (``Q`` n×r orthonormal, r the
    numerical rank), ``Z = Qᵀ yc``, ``rss = ‖yc − Q Z‖²``; so ``‖yc − xc β‖² = ‖Z − R β‖² + rss``
    for every β.  Pivoted Householder QR on unit-norm columns; rows sign-normalized (diagonal > 0)
    so the message is a function of the data distribution, not of the row order.  ``scatter``: also return
    the full cross-product ``P = Eᵀ E`` of ``E = yc − Q Z`` (F×F; ``rss`` is its diagonal), so that the
    residual cross-product at any β is ``(Z − Rβ)ᵀ(Z − Rβ) + P`` (CovBat's PCA needs it)."""
    n, p = xc.shape
    norms = np.linalg.norm(xc, axis=0)
    nz = np.flatnonzero(norms > 0)
    if nz.size == 0:
        out = np.zeros((0, p)), np.zeros((0, yc.shape[1])), (yc ** 2).sum(axis=0)
        return out + (yc.T @ yc,) if scatter else out
    q, r, piv = scipy.linalg.qr(xc[:, nz] / norms[nz], mode="economic", pivoting=True)
    rank = int((np.abs(np.diag(r)) > _RANK_TOL).sum())
    q, r = q[:, :rank], r[:rank]
    sign = np.where(np.diag(r) < 0, -1.0, 1.0)
    q, r = q * sign, r * sign[:, None]
    big_r = np.zeros((rank, p))
    cols = nz[piv]
    big_r[:, cols] = r * norms[cols]
    z = q.T @ yc
    e = yc - q @ z
    rss = (e ** 2).sum(axis=0)
    return (big_r, z, rss, e.T @ e) if scatter else (big_r, z, rss)


def site_combat_stats(rows: pd.DataFrame, request: Mapping, *, site: Any = None, batch: Any = None,
                      min_cell_size: int | None = None, min_level_size: int = 0) -> dict:
    r"""Message 2 (site → server): the site's sufficient statistics, per batch at the site.

    Parameters
    ----------
    rows : DataFrame
        The site's table: feature columns, covariate columns (and ``batch_col`` if requested).
    request : dict
        From :func:`make_request`.
    site : str
        This site's name (its batch label when the request has no ``batch_col``).
    batch : label, optional
        Batch label overriding ``site``.
    min_cell_size : int, optional
        The site's own privacy policy; the effective minimum is the larger of this and the
        request's.
    min_level_size : int, default 0
        The site's opt-in stricter rule (its policy's ``min-events``): refuse when a categorical
        covariate level has fewer patients than this at a batch. By default (0) the statistics
        are sums over the batch's >= ``min_cell_size`` patients and are answered whatever the
        level sizes, as model sums are answered whatever the event count.

    Returns
    -------
    dict
        ``{"kind", "version", "site", "features", "batches": [{"batch", "n", "mean", "cont_mean",
        "levels", "level_counts", "R", "Z", "rss"}, ...]}`` with, for the batch-centred covariates
        :math:`X^c = QR` and features :math:`Y^c`: ``R`` (r×p, r ≤ p), ``Z`` = :math:`Q^\top Y^c`
        (r×F), ``rss`` = :math:`\lVert Y^c - QZ\rVert^2` per feature.  Local design columns: for
        each categorical, one-hot of the levels present at the batch except its first, then the
        continuous covariates.
    """
    features, continuous, categorical = list(request["features"]), list(request["continuous"]), list(request["categorical"])
    min_n = max(int(request.get("min_cell_size", 2)), int(min_cell_size or 0))
    where_site = _where(site=site)
    if not isinstance(rows, pd.DataFrame):
        raise CombatError(f"site rows {where_site} must be a pandas DataFrame")
    labels_sorted, labels = _site_batches(rows, request.get("batch_col"), site, batch)
    smooth = dict(request.get("smooth") or {})
    continuous = continuous + _basis_columns(smooth)
    rows = _with_basis(rows, smooth, where_site)
    out = []
    for label in labels_sorted:
        sub = rows[labels == label] if request.get("batch_col") is not None else rows
        where = _where(site=site, batch=label if request.get("batch_col") is not None else None)
        _check_min_cell(len(sub), label, min_n, where)
        y = _feature_values(sub, features, where)
        _check_covariates(sub, continuous, categorical, where)
        _check_basis_support(sub, smooth, min_n, where)
        levels = {c: _sorted_levels(sub[c], f"covariate {c!r}") for c in categorical}
        counts = {c: [int((sub[c] == lvl).sum()) for lvl in levels[c]] for c in categorical}
        for c in categorical:  # opt-in: a small level's share of the sums is refused (the site's min-events)
            for lvl, cnt in zip(levels[c], counts[c]):
                if cnt < min_level_size:
                    raise SmallBatchError(f"categorical covariate {c!r} level {_py(lvl)!r} has {cnt} patients {where}, "
                                          f"fewer than the site's min-events {min_level_size}: merge rare levels or "
                                          f"leave the covariate out")
        local = _local_columns(levels, continuous)
        x = np.column_stack([(sub[c] == lvl).to_numpy(dtype=np.float64) if lvl is not None
                             else sub[c].to_numpy(dtype=np.float64) for c, lvl in local]) \
            if local else np.zeros((len(sub), 0))
        xc, _ = _centre_within(x)
        ymean = y.mean(axis=0)
        big_r, z, rss, *scatter = _sqrt_regression(xc, y - ymean, scatter=bool(request.get("covbat")))
        out.append({
            "batch": _py(label), "n": int(len(sub)), "mean": ymean.tolist(),
            "cont_mean": [float(sub[c].to_numpy(dtype=np.float64).mean()) for c in continuous],
            "levels": {c: levels[c] for c in categorical}, "level_counts": counts,
            "R": big_r.tolist(), "Z": z.tolist(), "rss": rss.tolist(),
            **({"scatter": scatter[0].tolist()} if scatter else {}),
        })
    return {"kind": "fedrad.combat.stats", "version": _PROTOCOL_VERSION, "site": _py(site),
            "features": features, "batches": out}


def _local_to_global(levels_local: Mapping[str, Sequence], levels_global: Mapping[str, Sequence],
                     continuous: Sequence[str]) -> np.ndarray:
    """Matrix T with (centred local design) @ T = (centred global design) for one batch."""
    local = _local_columns(levels_local, continuous)
    pos = {key: i for i, key in enumerate(local)}
    glob = _local_columns(levels_global, continuous)
    t = np.zeros((len(local), len(glob)))
    for gj, (c, lvl) in enumerate(glob):
        if lvl is None:
            t[pos[(c, None)], gj] = 1.0
            continue
        present = list(levels_local[c])
        if lvl not in present:
            continue                          # absent level: column is 0 in this batch
        if lvl != present[0]:
            t[pos[(c, lvl)], gj] = 1.0
        else:                                 # local baseline: centred column = -sum(other centred)
            for other in present[1:]:
                t[pos[(c, other)], gj] = -1.0
    return t


def _penalized_beta(a, z, rho2, n_total, n_batches, smooth, request, dnames, downer):
    """β of the penalized (ComBat-GAM) within-batch regression and each feature's alpha."""
    from fedrad.common.smooth import SmoothError, penalized_within_fit

    basis = set(_basis_columns(smooth))
    plain = [j for j, c in enumerate(dnames) if c not in basis]  # the spline columns: the penalty makes them full rank
    _check_rank(a[:, plain], [dnames[j] for j in plain], [downer[j] for j in plain])
    try:
        fit = penalized_within_fit(a, z, rho2, n_total, n_batches, _smooth_penalty(smooth, dnames),
                                   request.get("smooth_alphas"), names=dnames)
    except SmoothError as exc:
        raise SingularDesignError(f"ComBat-GAM: {exc}") from None
    return fit.beta, np.asarray(fit.alpha, dtype=float)


def combine_combat_stats(aggregates: Sequence[Mapping], request: Mapping, *,
                         min_cell_size: int | None = None) -> ComBatReference:
    r"""Server step after message 2: the global reference from the sites' statistics.

    With :math:`T_b` mapping batch b's local encoding to the global one (sorted union of levels,
    first dropped) and :math:`\tilde R_b = R_b T_b`:

    .. math::
        \beta = \arg\min_\beta \sum_b \lVert Z_b - \tilde R_b\beta\rVert^2,\quad
        \mathrm{RSS}_b = \lVert Z_b - \tilde R_b\beta\rVert^2 + \rho_b^2,\quad
        \hat\sigma^2 = \sum_b \mathrm{RSS}_b / N \ (\text{or } \mathrm{RSS}_{ref}/n_{ref}),

    :math:`\hat\alpha = \sum_b (n_b/N)(\bar y_b - \bar x_b^\top\beta)` (or
    :math:`\bar y_{ref} - \bar x_{ref}^\top\beta`).

    Raises
    ------
    SmallBatchError, SingularDesignError, UnknownLevelError, CombatError
    """
    features, continuous, categorical = list(request["features"]), list(request["continuous"]), list(request["categorical"])
    min_n = max(int(request.get("min_cell_size", 2)), int(min_cell_size or 0))
    smooth = dict(request.get("smooth") or {})
    continuous = continuous + _basis_columns(smooth)
    ref = request.get("ref_batch")
    shared = bool(request.get("shared_batches", False))
    covbat = request.get("covbat")
    if covbat and ref is not None:
        raise CombatError("CovBat with a reference batch is not defined (CovBat's PCA step adjusts every batch); "
                          "leave ref_batch out or turn CovBat off")
    entries, owners = [], {}
    for agg in aggregates:
        if agg.get("kind") != "fedrad.combat.stats":
            raise CombatError(f"not a ComBat stats message (kind {agg.get('kind')!r})")
        if list(agg["features"]) != features:
            raise CombatError(f"site {agg.get('site')!r} sent features {list(agg['features'])[:5]}..., "
                              f"expected {features[:5]}...")
        for e in agg["batches"]:
            b = e["batch"]
            key = (b, agg.get("site")) if shared else b
            if key in owners:
                raise CombatError(f"batch {b!r} reported twice by site {agg.get('site')!r}" if shared else
                                  f"batch {b!r} reported by sites {owners[key]!r} and {agg.get('site')!r}; "
                                  f"a batch must be held by one site (use distinct batch labels, or shared_batches "
                                  f"for a scanner model at several sites)")
            owners[key] = agg.get("site")
            _check_min_cell(int(e["n"]), b, min_n, _where(site=agg.get("site")))
            if covbat and e.get("scatter") is None:
                raise CombatError(f"site {agg.get('site')!r} sent no residual scatter for batch {b!r}, which CovBat "
                                  f"needs; the site must answer the CovBat request")
            entries.append(e)
    if not entries:
        raise CombatError("no site statistics to combine")
    try:
        batches = sorted({e["batch"] for e in entries})
    except TypeError:
        raise CombatError(f"batch labels mix types {[e['batch'] for e in entries]}; use strings") from None
    of_batch = [batches.index(e["batch"]) for e in entries]   # block -> its batch
    n_block = np.array([int(e["n"]) for e in entries])
    sizes = [int(n_block[[j for j, k in enumerate(of_batch) if k == b]].sum()) for b in range(len(batches))]
    if ref is not None and ref not in batches:
        raise UnknownLevelError(f"ref_batch {ref!r} is not one of the batches {batches}")
    levels = {}
    for c in categorical:
        lv = _sorted_levels([v for e in entries for v in e["levels"][c]], f"covariate {c!r}")
        if len(lv) < 2:
            raise SingularDesignError(f"singular design: categorical covariate {c!r} has the single level "
                                      f"{lv[0]!r} in all batches; drop it from the covariates")
        levels[c] = lv
    dnames, downer = _design_names(continuous, levels), _design_owner(continuous, levels)
    p, f = len(dnames), len(features)

    r_glob, xbar = [], []
    for e in entries:
        lloc = {c: list(e["levels"][c]) for c in categorical}
        t = _local_to_global(lloc, levels, continuous)
        r_loc = np.asarray(e["R"], dtype=float).reshape(len(e["R"]), t.shape[0])
        r_glob.append(r_loc @ t)
        n = int(e["n"])
        xb = [dict(zip(e["levels"][c], e["level_counts"][c])).get(lvl, 0) / n
              for c in levels for lvl in levels[c][1:]]
        xbar.append(np.array(xb + list(e["cont_mean"]), dtype=float))
    xbar = np.vstack(xbar) if p else np.zeros((len(entries), 0))
    zs = [np.asarray(e["Z"], dtype=float).reshape(len(e["Z"]), f) for e in entries]
    block_means = np.vstack([np.asarray(e["mean"], dtype=float) for e in entries])
    # a batch of several blocks (one scanner model at several sites): the within-batch regression adds each block's
    # offset from its batch's mean, weighted by sqrt(n) (exact: within-batch = within-block + between-block sums)
    w = n_block / np.asarray(sizes, dtype=float)[of_batch]
    onehot = np.zeros((len(entries), len(batches)))
    onehot[np.arange(len(entries)), of_batch] = 1.0
    xbar_b, ybar_b = onehot.T @ (w[:, None] * xbar), onehot.T @ (w[:, None] * block_means)
    multi = [j for j, k in enumerate(of_batch) if (onehot[:, k].sum() > 1)]
    root = np.sqrt(n_block[multi])[:, None]
    between_x = root * (xbar[multi] - xbar_b[np.asarray(of_batch)[multi]]) if multi else np.zeros((0, p))
    between_y = root * (block_means[multi] - ybar_b[np.asarray(of_batch)[multi]]) if multi else np.zeros((0, f))
    a = np.vstack(r_glob + [between_x]) if r_glob else np.zeros((0, p))
    alpha = None
    if smooth:  # ComBat-GAM: penalized within-batch regression, each feature's alpha by GCV from the sums
        beta, alpha = _penalized_beta(a, np.vstack(zs + [between_y]), sum(np.asarray(e["rss"], dtype=float)
                                      for e in entries), int(n_block.sum()), len(batches), smooth, request,
                                      dnames, downer)
    else:
        _check_rank(a, dnames, downer)
        beta = np.linalg.lstsq(a, np.vstack(zs + [between_y]), rcond=None)[0] if p else np.zeros((0, f))
    block_resid = [z - rg @ beta for z, rg in zip(zs, r_glob)]
    block_rss = np.vstack([(r ** 2).sum(axis=0) + np.asarray(e["rss"], dtype=float)
                           for r, e in zip(block_resid, entries)])
    block_tss = np.vstack([(z ** 2).sum(axis=0) + np.asarray(e["rss"], dtype=float) for z, e in zip(zs, entries)])
    block_ic = block_means - xbar @ beta if p else block_means
    intercepts = onehot.T @ (w[:, None] * block_ic)
    ic_off, y_off = block_ic - intercepts[of_batch], block_means - ybar_b[of_batch]
    rss = onehot.T @ (block_rss + n_block[:, None] * ic_off ** 2)
    tss = onehot.T @ (block_tss + n_block[:, None] * y_off ** 2)
    means = ybar_b
    n_tot = int(sum(sizes))
    if ref is not None:
        k = batches.index(ref)
        grand, var = intercepts[k], rss[k] / sizes[k]
    else:
        grand = (np.asarray(sizes) / float(n_tot)) @ intercepts
        var = rss.sum(axis=0) / n_tot
    excluded = _exclusions(features, batches, sizes, rss, tss, means, ref, bool(request.get("mean_only", False)))
    kept = np.array([x not in excluded for x in features], dtype=bool)
    _check_eb_features(int(kept.sum()), bool(request.get("eb", True)))
    reference = ComBatReference(
        features=features, continuous=continuous, categorical=levels, coef=beta[:, kept],
        grand_mean=grand[kept], var_pooled=var[kept], batches=batches, batch_sizes=sizes, ref_batch=ref,
        batch_col=request.get("batch_col"), eb=bool(request.get("eb", True)),
        parametric=bool(request.get("parametric", True)), mean_only=bool(request.get("mean_only", False)),
        conv=float(request.get("conv", 1e-4)), min_cell_size=int(request.get("min_cell_size", 2)),
        excluded_features=excluded, shared_batches=shared, smooth=smooth,
        smooth_alpha=[float(x) for x in alpha[kept]] if smooth else None)
    if not (shared or covbat):
        return reference   # every batch at one site: each site computes its own posterior from its rows
    # the posterior of every batch from its sums: mean (intercept − α)/σ, centred sum of squares RSS/σ²
    kept_names = [x for x, kk in zip(features, kept) if kk]
    sd = np.sqrt(var[kept])
    adjustments = [fit_batch_adjustment(
        BatchSums(sizes[b], (intercepts[b, kept] - grand[kept]) / sd, rss[b, kept] / var[kept]), batch=batches[b],
        features=kept_names, eb=reference.eb, parametric=reference.parametric, mean_only=reference.mean_only,
        is_reference=(ref is not None and batches[b] == ref), conv=reference.conv) for b in range(len(batches))]
    reference.posterior_gamma = np.array([adj.gamma_star for adj in adjustments])
    reference.posterior_delta = np.array([adj.delta_star for adj in adjustments])
    if covbat:
        blocks = []
        for j, e in enumerate(entries):
            scatter = np.asarray(e["scatter"], dtype=float).reshape(f, f)[np.ix_(kept, kept)]
            resid = block_resid[j][:, kept]
            blocks.append((of_batch[j], int(e["n"]), resid.T @ resid + scatter, block_ic[j, kept] - grand[kept]))
        reference.covbat = _covbat_from_sums(blocks, sizes, sd, reference.posterior_gamma,
                                             reference.posterior_delta, covbat)
    return reference


def apply_combat(rows: pd.DataFrame, reference: ComBatReference | Mapping, *, site: Any = None,
                 batch: Any = None, min_cell_size: int | None = None,
                 max_iter: int = 10000) -> tuple[pd.DataFrame, dict]:
    r"""Site step after message 3: harmonize the site's own rows against a fitted reference.

    Works for a site that was in the fit and for an unseen site alike: per batch b in ``rows``,
    :math:`s = (y - \hat\alpha - x^\top\beta)/\hat\sigma`, then :func:`fit_batch_adjustment` on
    the batch's own :math:`s` (location/scale, EB priors and posterior), then
    :math:`y^* = \hat\sigma(s-\gamma^*_b)/\sqrt{\delta^*_b} + \hat\alpha + x^\top\beta`.  Rows of
    ``ref_batch`` and ``excluded_features`` pass through unchanged.  A feature that is constant, or
    has zero residual variance, in a batch but was not excluded by the reference (possible only
    for an unseen site) is passed through for that batch and listed in its ``excluded_features``;
    the batch's EB priors are then computed across its remaining features.

    Returns
    -------
    harmonized : DataFrame
        Copy of ``rows`` with harmonized feature columns.
    adjustments : dict
        Batch -> :class:`BatchAdjustment` (stays at the site; aggregates only).
    """
    ref = reference if isinstance(reference, ComBatReference) else ComBatReference.from_dict(reference)
    kept = ref.kept_features
    min_n = max(int(ref.min_cell_size), int(min_cell_size or 0))
    if not isinstance(rows, pd.DataFrame):
        raise CombatError(f"site rows {_where(site=site)} must be a pandas DataFrame")
    labels_sorted, labels = _site_batches(rows, ref.batch_col, site, batch)
    present = [f for f in kept if f in rows.columns]
    block = rows[present].to_numpy(dtype=np.float64, copy=True)  # the harmonized feature columns, written below
    column = {f: j for j, f in enumerate(present)}

    def put(mask, names, values) -> None:
        block[np.ix_(np.flatnonzero(mask), [column[n] for n in names])] = values

    adjustments = {}
    for label in labels_sorted:
        mask = labels == label if ref.batch_col is not None else np.ones(len(rows), dtype=bool)
        sub = rows[mask]
        where = _where(site=site, batch=label if ref.batch_col is not None else None)
        _check_min_cell(len(sub), label, min_n, where)
        y_all = _feature_values(sub, ref.features, where)
        y = y_all[:, [ref.features.index(k) for k in kept]]
        d = ref.encode(sub, where)
        s = _standardize(y, d, ref.grand_mean, ref.coef, ref.var_pooled)
        is_ref = ref.ref_batch is not None and label == ref.ref_batch
        local_excl: dict[str, str] = {}
        use = np.ones(len(kept), dtype=bool)
        given = ref.posterior(label)
        if given is not None:  # the server's posterior of the whole batch (at several sites, or CovBat)
            gamma_hat, delta_hat = location_scale(s, ref.mean_only)
            nan = math.nan
            adjustments[label] = BatchAdjustment(label, len(sub), list(kept), gamma_hat, delta_hat, nan, nan, nan, nan,
                                                 given[0], given[1])
            z = (s - given[0]) / np.sqrt(given[1])
            if ref.covbat:
                z = covbat_adjust(z, ref.covbat, ref.covbat_index(label))
            put(mask, kept, _from_z(z, d, ref.grand_mean, ref.coef, ref.var_pooled))
            continue
        if not is_ref and not ref.mean_only:
            ymean = y.mean(axis=0)
            const = _zero_var(((y - ymean) ** 2).sum(axis=0), len(sub), ymean)
            flat = _zero_var(((s - s.mean(axis=0)) ** 2).sum(axis=0) * ref.var_pooled, len(sub), ymean)
            for j in np.flatnonzero(const | flat):
                use[j] = False
                local_excl[kept[j]] = (_CONSTANT_REASON if const[j] else _ZERO_RESID_REASON).format(label)
        if use.sum() == 1:
            _check_eb_features(1, ref.eb)
        names = [k for k, u in zip(kept, use) if u]
        a = fit_batch_adjustment(s[:, use], batch=label, features=names, eb=ref.eb, parametric=ref.parametric,
                                 mean_only=ref.mean_only, is_reference=is_ref, conv=ref.conv, max_iter=max_iter)
        a.excluded_features = local_excl
        adjustments[label] = a
        if is_ref or not use.any():
            continue
        if ref.covbat:  # a batch not in the fit: its own posterior, then its own score location/scale
            if not use.all():
                raise CombatError(f"feature(s) {', '.join(k for k, u in zip(kept, use) if not u)} are constant "
                                  f"{where}, and CovBat's PCA step needs every harmonized feature; leave them out")
            z = covbat_adjust((s - a.gamma_star) / np.sqrt(a.delta_star), ref.covbat)
            put(mask, kept, _from_z(z, d, ref.grand_mean, ref.coef, ref.var_pooled))
            continue
        harmonized = _destandardize(s[:, use], a.gamma_star, a.delta_star, d, ref.grand_mean[use],
                                    ref.coef[:, use], ref.var_pooled[use])
        put(mask, names, harmonized)
    return _with_columns(rows, present, block), adjustments


def _with_columns(rows: pd.DataFrame, names: list, block: np.ndarray) -> pd.DataFrame:
    """A copy of ``rows`` whose columns ``names`` hold ``block`` (float64), in the original column order: one block
    instead of a column-by-column assignment, which costs pandas a dtype scan of the whole frame per column."""
    if not (rows.columns.is_unique and rows.index.is_unique):
        out = rows.copy()
        for j, f in enumerate(names):
            out[f] = block[:, j]
        return out
    new = pd.DataFrame(block, columns=pd.Index(names, dtype=rows.columns.dtype), index=rows.index)
    taken = set(names)
    rest = rows[[c for c in rows.columns if c not in taken]].copy()
    return pd.concat([rest, new], axis=1)[list(rows.columns)]


# ----------------------------------------------------------------------------------------------
# In-process federated driver
# ----------------------------------------------------------------------------------------------
@dataclass
class FederatedComBat:
    """Result of :func:`fit_federated`.

    Attributes
    ----------
    harmonized : dict
        Site -> harmonized copy of its table (stays at the site in a real deployment).
    reference : ComBatReference
        The global model (message 3).
    round_trips : int
        Server↔site round trips used (2).
    uploads : dict
        Site -> its message 2 (statistics), as received by the server.
    summaries : dict
        Site -> its message 4 (summary).
    adjustments : dict
        Site -> {batch: BatchAdjustment} (site-local).
    """

    harmonized: dict
    reference: ComBatReference
    round_trips: int
    uploads: dict
    summaries: dict
    adjustments: dict


def fit_federated(site_tables: Mapping[str, pd.DataFrame], features: Sequence[str],
                  covariates: Sequence[str] = (), categorical: Sequence[str] = (), *,
                  batch_col: str | None = None, ref_batch: Any = None, eb: bool = True, parametric: bool = True,
                  mean_only: bool = False, min_cell_size: int = 2, conv: float = 1e-4,
                  site_min_cell_size: Mapping[str, int] | None = None, shared_batches: bool = False,
                  covbat: Any = None, smooth: Any = None, smooth_alphas: Any = None) -> FederatedComBat:
    """Run federated ComBat in-process, exactly as the Flower handlers will.

    Each site function sees only its own table; every message passes through strict JSON.
    Round trip 1: request → :func:`site_combat_stats` → :func:`combine_combat_stats`.
    Round trip 2: reference → :func:`apply_combat` → summary.

    Parameters
    ----------
    site_tables : dict
        Site name -> its table (features + covariates [+ ``batch_col``]).
    features, covariates, categorical, batch_col, ref_batch, eb, parametric, mean_only, min_cell_size, conv :
        See :func:`make_request` and :class:`ComBat`.
    site_min_cell_size : dict, optional
        Site name -> that site's own privacy minimum.

    Returns
    -------
    FederatedComBat
    """
    request = make_request(features, covariates, categorical, batch_col=batch_col, ref_batch=ref_batch, eb=eb,
                           parametric=parametric, mean_only=mean_only, min_cell_size=min_cell_size, conv=conv,
                           shared_batches=shared_batches, covbat=covbat, smooth=smooth, smooth_alphas=smooth_alphas)
    policy = dict(site_min_cell_size or {})
    round_trips = 0
    # round trip 1: request down, statistics up
    down = _wire(request)
    uploads = {site: _wire(site_combat_stats(table, down, site=site, min_cell_size=policy.get(site)))
               for site, table in site_tables.items()}
    round_trips += 1
    reference = combine_combat_stats(list(uploads.values()), request)
    # round trip 2: reference down, sites harmonize locally, summary up
    harmonized, adjustments, summaries = {}, {}, {}
    for site, table in site_tables.items():  # batch-level estimates only for the site's own batches
        down = _wire(reference.for_site({e["batch"] for e in uploads[site]["batches"]}))
        out, adj = apply_combat(table, ComBatReference.from_dict(down), site=site,
                                min_cell_size=policy.get(site))
        harmonized[site], adjustments[site] = out, adj
        summaries[site] = _wire({"kind": "fedrad.combat.summary", "site": site, "n_rows": int(len(table)),
                                 "batches": [_py(b) for b in adj],
                                 "excluded_locally": {str(b): a.excluded_features for b, a in adj.items()}})
    round_trips += 1
    return FederatedComBat(harmonized=harmonized, reference=reference, round_trips=round_trips,
                           uploads=uploads, summaries=summaries, adjustments=adjustments)
