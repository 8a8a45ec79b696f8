"""The study's data-driven penalty path (common.selection.penalty_path): its start from the federated gradient
at zero equals the pooled rows', and it is the exact all-zero point of an L1 fit (scikit-learn for logistic,
the lifelines-equal exact-L1 Cox model for Cox)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fedrad.common.cox import fit_pooled as cox_fit
from fedrad.common.selection import (cox_score_request, logistic_score_request, penalty_path,
                                     pooled_standardized_scores, site_cox_score, site_logistic_score,
                                     standardized_scores)

FEATS = ["a", "b", "c", "d"]


def sites(seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, n in enumerate([60, 45, 80]):
        x = rng.normal(size=(n, 4)) * [1, 3, 0.2, 50] + [0, k, 5, 100 * k]
        lp = 0.8 * x[:, 0] - 0.1 * x[:, 1] + 0.5 * k
        d = pd.DataFrame(x, columns=FEATS)
        d["y"] = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
        t = rng.exponential(np.exp(-lp)) * 10
        d["t"], d["e"] = np.round(np.minimum(t, 8.0), 1), (t <= 8.0).astype(int)
        d.loc[d.index[:3], "t"] = 0.0  # zero durations kept, as lifelines does
        d["site"] = f"s{k}"
        out[f"s{k}"] = d
    return out


@pytest.mark.parametrize("survival", [False, True])
def test_federated_gradient_at_zero_equals_pooled(survival):
    tables = sites()
    pooled = pd.concat(tables.values(), ignore_index=True)
    if survival:
        req = cox_score_request(FEATS, "t", "e")
        aggs = [site_cox_score(t, req, min_cell_size=10) for t in tables.values()]
        ep = {"type": "survival", "time": "t", "event": "e"}
    else:
        req = logistic_score_request(FEATS, "y")
        aggs = [site_logistic_score(t, req, min_cell_size=10) for t in tables.values()]
        ep = {"type": "response", "outcome": "y"}
    fed, n = standardized_scores(aggs)
    want, n_pooled = pooled_standardized_scores(pooled, ep, FEATS)
    assert n == n_pooled == len(pooled)
    for f in FEATS:
        assert abs(fed[f] / want[f] - 1) < 1e-10, f
    if not survival:  # the independent form: |X_std' (y - ybar)| with scikit-learn's scaler
        z = StandardScaler().fit_transform(pooled[FEATS])
        ref = np.abs(z.T @ (pooled["y"] - pooled["y"].mean()))
        np.testing.assert_allclose([fed[f] for f in FEATS], ref, rtol=1e-10)


def test_logistic_path_starts_where_scikit_learns_l1_fit_is_all_zero():
    pooled = pd.concat(sites(1).values(), ignore_index=True)
    aggs = [site_logistic_score(t, logistic_score_request(FEATS, "y"), min_cell_size=10) for t in sites(1).values()]
    z, n = standardized_scores(aggs)
    path = penalty_path(max(z.values()), n, "logistic", "l1", 1.0, size=12, decades=3)
    assert len(path) == 12 and path == sorted(path) and abs(path[-1] / path[0] - 1e3) < 1e-9
    x = StandardScaler().fit_transform(pooled[FEATS])

    def coef(c):
        m = LogisticRegression(l1_ratio=1.0, C=c, solver="saga", tol=1e-10, max_iter=100000).fit(x, pooled["y"])
        return np.abs(m.coef_).max()

    assert coef(path[0] * 0.999) < 1e-8
    assert coef(path[0] * 1.05) > 1e-4
    assert coef(path[1]) > coef(path[0] * 1.05)
    # L2 has no all-zero point: the path starts where an elastic net with L1 share 0.01 would be all zero
    ridge = penalty_path(max(z.values()), n, "logistic", "l2", 0.5, size=12, decades=3)
    assert abs(ridge[0] / path[0] - 0.01) < 1e-12


def test_cox_path_starts_where_the_exact_l1_cox_fit_is_all_zero():
    tables = sites(2)
    pooled = pd.concat(tables.values(), ignore_index=True)
    aggs = [site_cox_score(t, cox_score_request(FEATS, "t", "e"), min_cell_size=10) for t in tables.values()]
    z, n = standardized_scores(aggs)
    path = penalty_path(max(z.values()), n, "cox", "l1", 1.0, size=10, decades=2)
    assert path == sorted(path, reverse=True) and abs(path[0] / path[-1] - 100) < 1e-9

    def coef(lam):
        return np.abs(cox_fit(pooled, "t", "e", strata="site", features=FEATS, penalizer=lam, l1_ratio=1.0,
                              tol=1e-10, max_rounds=200).coef_).max()

    assert coef(path[0] * 1.001) < 1e-8
    assert coef(path[0] * 0.95) > 1e-4


def test_a_model_of_constant_features_has_no_path():
    from fedrad.common.selection import SelectionError

    with pytest.raises(SelectionError, match="zero score"):
        penalty_path(0.0, 100, "logistic", "l2", 0.5)
