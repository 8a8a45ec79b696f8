r"""Penalized linear regression fitted from per-site aggregates; equal to scikit-learn on pooled rows.

Model and objective (scikit-learn 1.9, ``fit_intercept=True``)
---------------------------------------------------------------
Features are standardized with the *global* mean and population SD (``ddof=0``, as ``StandardScaler``):
:math:`z_{ij} = (x_{ij}-\mu_j)/s_j`. With :math:`\eta_i = b + z_i^\top w` we minimize

.. math:: F(b, w) = \frac{1}{2N}\sum_i (y_i-\eta_i)^2 + \alpha\Big[\rho\lVert w\rVert_1 + \frac{1-\rho}{2}\lVert w\rVert_2^2\Big]

with the intercept unpenalized: ``penalty="elasticnet"`` is ``ElasticNet(alpha=α, l1_ratio=ρ)``, ``"l1"`` is
``Lasso(alpha=α)`` (ρ = 1), ``"l2"`` is ``Ridge(alpha=N·α)`` (ρ = 0) and ``None`` is ``LinearRegression``. α is
lifelines-like (per-row loss), so a larger value is a stronger penalty, and the penalty path starts at glmnet's
:math:`\alpha_{max} = \max_j |z_j^\top(y-\bar y)|/(N\rho)`.

Why the aggregates are exact, and the protocol
----------------------------------------------
The objective is quadratic: with :math:`\tilde z = z-\bar z`, :math:`\tilde y = y-\bar y`, the intercept is
:math:`b = \bar y - \bar z^\top w` and :math:`w` minimizes
:math:`\frac12 w^\top G w - r^\top w + \text{penalty}` with :math:`G = \tilde Z^\top\tilde Z/N`,
:math:`r = \tilde Z^\top\tilde y/N`. Both are the pooled centred cross-products, which the server forms from each
site's ``n``, means, centred cross-products :math:`M_k = \sum(x-\bar x_k)(x-\bar x_k)^\top`,
:math:`\sum(x-\bar x_k)(y-\bar y_k)` and :math:`\sum(y-\bar y_k)^2` by the parallel formulas of Chan, Golub &
LeVeque (1979), the same combination the logistic fit uses (:func:`fedrad.common.glm.combine_logistic_stats`).

1. **stats** (one round trip): request ``{"kind": "fedrad.linear.stats", "features"}``; the server solves the
   problem exactly (Cholesky for L2 / none; coordinate descent polished on the active set for L1 / elastic net,
   :func:`fedrad.common.glm._solve_l1_model`).
2. **check** (one round trip, shared with the other fits' Newton rounds in a study): request
   ``{"kind": "fedrad.linear.newton", "features", "mean", "scale", "beta"}`` at the solution; each site returns
   ``n``, the residual sum of squares and the gradient at β. The server checks the solution's optimality against
   them and takes the residual variance. This is also the point the site's guard records, so a coordinator can
   only ask a site to evaluate a model the site has been sent (:mod:`fedrad.client.guard`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.linalg

from fedrad.common.glm import GLMError, _solve_l1_model

_STATS_KIND = "fedrad.linear.stats"
_NEWTON_KIND = "fedrad.linear.newton"
_MODEL_KIND = "fedrad.linear.model"
_VERSION = 1
_PENALTIES = (None, "l2", "l1", "elasticnet")


def _penalty(penalty, alpha, l1_ratio) -> tuple[str | None, float, float]:
    if penalty not in _PENALTIES:
        raise GLMError(f"penalty must be one of {_PENALTIES}, got {penalty!r}")
    if penalty is None:
        return None, 0.0, 0.0
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise GLMError(f"alpha must be a positive finite number, got {alpha!r}")
    rho = {"l2": 0.0, "l1": 1.0}.get(penalty)
    if rho is None:
        rho = float(l1_ratio)
        if not 0.0 <= rho <= 1.0:
            raise GLMError(f"l1_ratio must be in [0, 1], got {l1_ratio!r}")
    return penalty, alpha, rho


def _arrays(rows: Any, features: Sequence[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = rows
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(features) or y.shape != (x.shape[0],):
        raise GLMError(f"{where}: expected {len(features)} feature columns and one outcome per row")
    bad = ~np.isfinite(x)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        raise GLMError(f"{where}: feature {features[j]!r} has {int(bad[:, j].sum())} missing or infinite value(s)")
    if not np.all(np.isfinite(y)):
        raise GLMError(f"{where}: the outcome has {int((~np.isfinite(y)).sum())} missing or infinite value(s)")
    if len(y) == 0:
        raise GLMError(f"{where}: no rows")
    return x, y


def make_stats_request(features: Sequence[str]) -> dict:
    return {"kind": _STATS_KIND, "version": _VERSION, "features": [str(f) for f in features]}


def site_linear(rows: Any, request: Mapping, *, site: Any = None) -> dict:
    """A site's answer to a stats or check request (``rows`` = ``(X, y)`` in the request's feature order)."""
    where = f"site {site!r}" if site is not None else "pooled data"
    feats = list(request["features"])
    x, y = _arrays(rows, feats, where)
    if request["kind"] == _STATS_KIND:
        mean = x.mean(axis=0)
        xc = x - mean
        ybar = float(y.mean())
        yc = y - ybar
        return {"kind": _STATS_KIND, "n": int(len(y)), "mean": mean.tolist(), "resid_sum": xc.sum(axis=0).tolist(),
                "cross": (xc.T @ xc).tolist(), "ymean": ybar, "yresid_sum": float(yc.sum()),
                "cross_y": (xc.T @ yc).tolist(), "syy": float(yc @ yc)}
    if request["kind"] == _NEWTON_KIND:
        z = (x - np.asarray(request["mean"], dtype=float)) / np.asarray(request["scale"], dtype=float)
        beta = np.asarray(request["beta"], dtype=float)
        res = y - (beta[0] + z @ beta[1:])
        return {"kind": _NEWTON_KIND, "n": int(len(y)), "rss": float(res @ res),
                "grad": [float(-res.sum()), *(-(z.T @ res)).tolist()]}
    raise GLMError(f"{where}: unknown linear request kind {request.get('kind')!r}")


def combine_stats(aggregates: Sequence[Mapping], features: Sequence[str]) -> dict:
    """Global N, mean, SD and the pooled centred cross-products (exact for the float site means sent)."""
    if not aggregates:
        raise GLMError("no site replied")
    n = np.array([a["n"] for a in aggregates], dtype=float)
    big_n = float(n.sum())
    means = np.array([a["mean"] for a in aggregates], dtype=float).reshape(len(aggregates), len(features))
    c = np.array([a["resid_sum"] for a in aggregates], dtype=float).reshape(means.shape)
    mu = (n[:, None] * means + c).sum(axis=0) / big_n
    ym = np.array([a["ymean"] for a in aggregates], dtype=float)
    cy = np.array([a["yresid_sum"] for a in aggregates], dtype=float)
    ybar = float((n * ym + cy).sum() / big_n)
    p = len(features)
    sxx = np.zeros((p, p))
    sxy = np.zeros(p)
    syy = 0.0
    for k, a in enumerate(aggregates):
        d, dy = means[k] - mu, ym[k] - ybar
        m_k = np.asarray(a["cross"], dtype=float).reshape(p, p)
        sxx += m_k + np.outer(d, c[k]) + np.outer(c[k], d) + n[k] * np.outer(d, d)
        sxy += np.asarray(a["cross_y"], dtype=float) + d * cy[k] + c[k] * dy + n[k] * d * dy
        syy += float(a["syy"]) + 2 * dy * cy[k] + n[k] * dy * dy
    sxx = (sxx + sxx.T) / 2
    scale = np.sqrt(np.clip(np.diag(sxx), 0.0, None) / big_n)
    constant = scale <= 1e-12 * np.maximum(1.0, np.abs(mu))
    return {"n": int(big_n), "n_per_site": [int(v) for v in n], "mean": mu, "scale": np.where(constant, 1.0, scale),
            "kept": np.flatnonzero(~constant), "ybar": ybar, "sxx": sxx, "sxy": sxy, "syy": float(syy)}


def solve(st: Mapping, penalty: str | None, alpha: float, rho: float, names: Sequence[str]) -> np.ndarray:
    """The exact minimizer ``(b, w)`` on the standardized scale over the kept (non-constant) features."""
    kept = st["kept"]
    s = st["scale"][kept]
    n = st["n"]
    g = st["sxx"][np.ix_(kept, kept)] / np.outer(s, s) / n
    r = st["sxy"][kept] / s / n
    p = len(kept)
    # the intercept on the standardized scale: z-bar is the float rounding of the global mean (~0)
    if penalty is None or rho == 0.0:
        k_mat = g + alpha * np.eye(p)
        try:
            w = scipy.linalg.cho_solve(scipy.linalg.cho_factor(k_mat), r) if p else np.zeros(0)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            involved = [names[j] for j in range(p)]
            raise GLMError(f"penalty=None but the features {involved} are collinear across the federation; drop "
                           "some of them or use a penalty") from None
    else:
        k_full = np.zeros((p + 1, p + 1))
        k_full[0, 0] = 1.0
        k_full[1:, 1:] = g + alpha * (1 - rho) * np.eye(p)
        grad0 = np.concatenate([[0.0], -r])
        w = _solve_l1_model(grad0, k_full, np.zeros(p + 1), alpha * rho)[1:]
    return np.concatenate([[st["ybar"]], w])


class LinearServer:
    """Coordinator side of the federated fit (the study's fit state machine: ``start``, ``receive``, ``model``)."""

    def __init__(self, features: Sequence[str], *, penalty: str | None = "l2", alpha: float = 1.0,
                 l1_ratio: float | None = None):
        self.features = [str(f) for f in features]
        self.penalty, self.alpha, self.rho = _penalty(penalty, alpha, l1_ratio if l1_ratio is not None else 0.5)
        self.l1_ratio = l1_ratio
        self._request: dict | None = None
        self._stats: dict | None = None
        self._beta = None
        self._check: dict | None = None
        self.round_trips = 0

    def start(self) -> dict:
        self._request = make_stats_request(self.features)
        return self._request

    def receive(self, replies: Mapping[Any, Mapping] | Sequence[Mapping]) -> dict | None:
        if self._request is None:
            raise GLMError("receive() called without an outstanding request")
        aggregates = list(replies.values()) if isinstance(replies, Mapping) else list(replies)
        self.round_trips += 1
        if self._request["kind"] == _STATS_KIND:
            self._stats = combine_stats(aggregates, self.features)
            kept = self._stats["kept"]
            self._beta = solve(self._stats, self.penalty, self.alpha, self.rho, [self.features[j] for j in kept])
            self._request = {"kind": _NEWTON_KIND, "version": _VERSION,
                             "features": [self.features[j] for j in kept],
                             "mean": self._stats["mean"][kept].tolist(), "scale": self._stats["scale"][kept].tolist(),
                             "beta": self._beta.tolist()}
            return self._request
        n = sum(int(a["n"]) for a in aggregates)
        if n != self._stats["n"]:
            raise GLMError(f"the sites replied with {n} rows in total, but {self._stats['n']} in round 1; site data "
                           "changed during the fit")
        grad = np.sum([np.asarray(a["grad"], dtype=float) for a in aggregates], axis=0) / n
        self._check = {"rss": float(sum(float(a["rss"]) for a in aggregates)), "grad": grad}
        self._request = None
        return None

    def model(self) -> "LinearModel":
        if self._check is None:
            raise GLMError("the fit is not finished")
        return LinearModel(penalty=self.penalty, alpha=self.alpha, l1_ratio=self.l1_ratio)._set(
            self.features, self._stats, self._beta, self._check["rss"])


class LinearModel:
    """A fitted linear model (federated or pooled); ``decision_function`` is the prediction."""

    def __init__(self, penalty: str | None = "l2", alpha: float = 1.0, l1_ratio: float | None = None):
        self.penalty, self.alpha, self.l1_ratio = penalty, alpha, l1_ratio

    def _set(self, features, st, beta, rss) -> "LinearModel":
        kept = st["kept"]
        p = len(features)
        self.feature_names_ = list(features)
        self.mean_, self.scale_ = np.asarray(st["mean"], float), np.asarray(st["scale"], float).copy()
        self.scale_[np.setdiff1d(np.arange(p), kept)] = 0.0  # a constant feature: coefficient 0, scale 0
        self.coef_std_ = np.zeros(p)
        self.coef_std_[kept] = beta[1:]
        self.intercept_std_ = float(beta[0])
        safe = np.where(self.scale_ > 0, self.scale_, 1.0)
        self.coef_ = np.where(self.scale_ > 0, self.coef_std_ / safe, 0.0)
        self.intercept_ = float(self.intercept_std_ - np.sum(self.coef_ * self.mean_))
        self.n_ = int(st["n"])
        self.rss_ = float(rss)
        df = self.n_ - 1 - int(np.count_nonzero(self.coef_std_))
        self.sigma2_ = self.rss_ / df if df > 0 else float("nan")
        g = st["sxx"][np.ix_(kept, kept)] / np.outer(st["scale"][kept], st["scale"][kept])
        _, alpha, rho = _penalty(self.penalty, self.alpha, self.l1_ratio if self.l1_ratio is not None else 0.5)
        self.gram_std_ = g
        self.kept_ = [int(j) for j in kept]
        self._rho = rho
        return self

    @property
    def feature_names_in_(self):
        return self.feature_names_

    def fit(self, X: pd.DataFrame, y) -> "LinearModel":
        """Pooled fit (the oracle), the same solver on the pooled rows' aggregates."""
        feats = [str(c) for c in X.columns]
        rows = (X.to_numpy(dtype=float), np.asarray(y, dtype=float))
        server = LinearServer(feats, penalty=self.penalty, alpha=self.alpha, l1_ratio=self.l1_ratio)
        request = server.start()
        while request is not None:
            sub = rows if request["kind"] == _STATS_KIND else (rows[0][:, [feats.index(f) for f in request["features"]]],
                                                              rows[1])
            request = server.receive([site_linear(sub, request)])
        fitted = server.model()
        self.__dict__.update(fitted.__dict__)
        return self

    def decision_function(self, X: pd.DataFrame) -> np.ndarray:
        x = X[self.feature_names_].to_numpy(dtype=float)
        return self.intercept_ + x @ self.coef_

    predict = decision_function

    def covariance_std(self) -> np.ndarray | None:
        """Approximate covariance of (b, w) on the standardized scale: σ²(A'A + Nα(1-ρ)P)^-1 (exact OLS for no
        penalty; shrunken for L2); None for an L1 / elastic-net penalty."""
        if self.penalty in ("l1", "elasticnet") or not math.isfinite(self.sigma2_):
            return None
        p = len(self.kept_)
        k_mat = np.zeros((p + 1, p + 1))
        k_mat[0, 0] = self.n_
        k_mat[1:, 1:] = self.gram_std_ + (self.n_ * self.alpha if self.penalty else 0.0) * np.eye(p)
        return self.sigma2_ * np.linalg.inv(k_mat)

    @property
    def summary(self) -> pd.DataFrame:
        """Per feature: coefficient on the original scale, per SD (standardized), and that one's approximate SE
        (:meth:`covariance_std`; NaN for an L1 / elastic-net fit)."""
        cov = self.covariance_std()
        se = np.full(len(self.coef_std_), np.nan)
        if cov is not None:
            for i, j in enumerate(self.kept_):
                se[j] = math.sqrt(max(cov[i + 1, i + 1], 0.0))
        return pd.DataFrame({"coef": self.coef_, "coef_per_sd": self.coef_std_, "se_per_sd": se},
                            index=pd.Index(self.feature_names_, name="feature"))

    def to_dict(self) -> dict:
        return {"kind": _MODEL_KIND, "version": _VERSION,
                "params": {"penalty": self.penalty, "alpha": float(self.alpha), "l1_ratio": self.l1_ratio},
                "feature_names": list(self.feature_names_), "coef": self.coef_.tolist(), "intercept": self.intercept_,
                "coef_std": self.coef_std_.tolist(), "intercept_std": self.intercept_std_,
                "mean": self.mean_.tolist(), "scale": self.scale_.tolist(), "n": self.n_, "rss": self.rss_,
                "sigma2": None if not math.isfinite(self.sigma2_) else self.sigma2_,
                "gram_std": np.asarray(self.gram_std_).tolist(), "kept": list(self.kept_)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LinearModel":
        if d.get("kind") != _MODEL_KIND:
            raise GLMError(f"not a linear model dict (kind={d.get('kind')!r})")
        m = cls(**d["params"])
        m.feature_names_ = list(d["feature_names"])
        m.coef_, m.intercept_ = np.asarray(d["coef"], float), float(d["intercept"])
        m.coef_std_, m.intercept_std_ = np.asarray(d["coef_std"], float), float(d["intercept_std"])
        m.mean_, m.scale_ = np.asarray(d["mean"], float), np.asarray(d["scale"], float)
        m.n_, m.rss_ = int(d["n"]), float(d["rss"])
        m.sigma2_ = float("nan") if d.get("sigma2") is None else float(d["sigma2"])
        m.gram_std_ = np.asarray(d["gram_std"], float)
        m.kept_ = [int(j) for j in d["kept"]]
        return m
