"""The penalty of a single model chosen as a study chooses it: the data-driven path from the training rows'
gradient at zero, then k-fold inner cross-validation with the study's fold rule and selection criterion.

Shared by ``fedrad fit`` pooled (:func:`pooled_cv_fit`, every row in one place) and federated
(:func:`fedrad.server.fitting.federated_cv_fit`, the same decisions from site aggregates), so that both forms and
the study pick the same value on the same rows:

* path: :func:`fedrad.common.selection.penalty_path` from the largest standardized score at zero over the model's
  features (:func:`~fedrad.common.selection.standardized_scores`), strongest penalty first;
* folds: a row's inner fold is :func:`fedrad.common.folds.inner_folds` of its case id (``seed``, ``k``); a site
  uses an inner fold only when both its training and left-out rows reach the minimum cell size
  (:func:`fedrad.common.plan.inner_fold_usable`);
* criterion: the summed held-out loss over the sites and folds used (the endpoint's
  :meth:`~fedrad.common.endpoints.Endpoint.heldout_loss`: log loss, Verweij-van Houwelingen partial likelihood,
  squared error), smallest wins, a tie goes to the stronger penalty (:func:`fedrad.common.pipeline.choose_penalty`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedrad.common import endpoints
from fedrad.common.folds import row_mask
from fedrad.common.pipeline import choose_penalty, penalty_choice
from fedrad.common.plan import default_path_decades, inner_fold_usable
from fedrad.common.selection import penalty_path, pooled_standardized_scores

#: the study's defaults ([validation] inner_folds and seed, [model] path_size)
DEFAULT_INNER_FOLDS = 3
DEFAULT_SEED = 0
DEFAULT_PATH_SIZE = 12

#: what the summed held-out loss is, times two, per model (the printed criterion)
CRITERION = {"logistic": "CV deviance", "cox": "CV partial-likelihood deviance", "linear": "CV squared error"}


def cv_settings(k: int | None = None, seed: int | None = None, path_size: int | None = None,
                path_decades: float | None = None, penalty: str | None = "l2") -> dict:
    """The inner-CV settings with the study's defaults filled in (``path_decades``: by penalty)."""
    k = DEFAULT_INNER_FOLDS if k is None else int(k)
    size = DEFAULT_PATH_SIZE if path_size is None else int(path_size)
    decades = default_path_decades(penalty or "l2") if path_decades is None else float(path_decades)
    if k < 2:
        raise ValueError(f"--inner-folds {k}: inner cross-validation needs at least 2 folds")
    if size < 2 or not decades > 0:
        raise ValueError(f"a penalty path needs at least 2 values over more than 0 decades (got {size}, {decades})")
    return {"k": k, "seed": DEFAULT_SEED if seed is None else int(seed), "path_size": size, "path_decades": decades}


def path_from_scores(z: dict[str, float], n: int, model: str, features: list[str], penalty: str,
                     l1_ratio: float | None, settings: dict) -> list[float]:
    """The path (strongest first) from the standardized scores at zero of the training rows."""
    return penalty_path(max(z[f] for f in features), n, model, penalty, float(l1_ratio or 0.0),
                        settings["path_size"], settings["path_decades"])


def finish_choice(path: list[float], totals: dict[int, float], settings: dict) -> tuple[int, dict]:
    """``(index, record)``: the path value with the smallest summed held-out loss and what the model file says of
    it (``method``, ``path``, ``cv_scores`` per path value (None: no site could evaluate it), ``folds``, ``seed``,
    the chosen ``value`` and ``index``, and ``edge`` when the choice is an end of the path)."""
    losses = {i: totals.get(i, float("inf")) for i in range(len(path))}
    gi = choose_penalty(losses) if any(np.isfinite(v) for v in losses.values()) else 0
    scores = [totals.get(i) for i in range(len(path))]
    report = penalty_choice(path, gi, scores)
    return gi, {"method": "cv", "path": report["path"], "cv_scores": scores, "folds": int(settings["k"]),
                "seed": int(settings["seed"]), "value": report["value"], "index": report["index"],
                "edge": report["edge"], "path_size": int(settings["path_size"]),
                "path_decades": float(settings["path_decades"])}


def pooled_cv_fit(df: pd.DataFrame, site_col: str, endpoint: dict, features: list[str], penalty: str,
                  l1_ratio: float | None, settings: dict, min_cell_size: int, case_col: str = "case_id"):
    """``(model, choice)`` of the pooled fit whose penalty the inner CV chose, from every row in one place (the
    pooled twin of :func:`fedrad.server.fitting.federated_cv_fit`). ``case_col`` holds each row's case id."""
    ep = endpoints.of(endpoint)
    rows = df
    z, n = pooled_standardized_scores(rows, endpoint, features, strata=site_col)
    path = path_from_scores(z, n, ep.model, features, penalty, l1_ratio, settings)
    k, seed = settings["k"], settings["seed"]
    sites = {s: part for s, part in rows.groupby(site_col, sort=True)}
    totals: dict[int, float] = {}
    for inner in range(k):
        spec = {"k": k, "seed": seed, "fold": inner, "keep": "train"}
        masks = {s: row_mask(list(part[case_col]), spec) for s, part in sites.items()}
        usable = [s for s, m in masks.items() if inner_fold_usable(int(m.sum()), int((~m).sum()), min_cell_size)]
        if not usable:
            continue
        train = pd.concat([sites[s][masks[s]] for s in usable], ignore_index=True)
        for gi, g in enumerate(path):
            model = ep.fit_pooled(train, features, penalty, g, float(l1_ratio or 0.0), strata=site_col)
            for s in usable:
                totals[gi] = totals.get(gi, 0.0) + float(ep.heldout_loss(model, sites[s], masks[s]))
    gi, choice = finish_choice(path, totals, settings)
    return ep.fit_pooled(rows, features, penalty, path[gi], float(l1_ratio or 0.0), strata=site_col), choice
