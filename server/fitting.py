"""Coordinator side of federated model fitting: many fits driven together, one round trip per step.

Each fit is a server state machine from ``fedrad.common`` (:class:`~fedrad.common.glm.LogisticServer`,
:class:`~fedrad.common.cox.CoxServer`) with ``start() -> request``, ``receive(replies) -> next request | None``
and ``model()``. :func:`run_fits` advances every unfinished fit in the same round trip: one ``fit_round``
message per site carries the current request of every fit (all validation folds, penalties, baselines), so
the number of round trips is that of the slowest fit, not the sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fedrad.server.federation import Federation


@dataclass
class FitTask:
    """One model fit: its server state machine and what rows each site uses.

    ``data``: the site-side data spec — ``model`` ("logistic"/"cox"), ``features``, outcome columns
    (``outcome`` or ``time``/``event``), optional ``table`` (which of the site's tables) and ``rows``
    (a row filter such as an inner CV fold). ``sites``: the sites that contribute (None = all).
    """

    server: object
    data: dict
    sites: list[str] | None = None
    request: dict | None = field(default=None, init=False)


def run_fits(fed: Federation, tasks: dict[str, FitTask], phase: str = "model") -> dict[str, object]:
    """Drive all fits to completion; returns ``{task id: fitted model}``."""
    for task in tasks.values():
        task.request = task.server.start()
    models: dict[str, object] = {}
    while any(t.request is not None for t in tasks.values()):
        active = {tid: t for tid, t in tasks.items() if t.request is not None}
        payload = {"tasks": [{"id": tid, "request": t.request, "data": t.data, "sites": t.sites}
                             for tid, t in active.items()]}
        replies = fed.ask("fit_round", payload, phase=phase)
        for tid, task in active.items():
            aggregates = {site: r["results"][tid] for site, r in replies.items() if tid in r.get("results", {})}
            if not aggregates:
                raise RuntimeError(f"fit {tid}: no site contributed data")
            task.request = task.server.receive(aggregates)
            asked = getattr(task.server, "sites_to_ask", None)
            if asked is not None:  # e.g. Cox: sites without events are not asked again
                task.sites = [s for s in asked if task.sites is None or s in task.sites]
            if task.request is None:
                models[tid] = task.server.model()
    return models


def cv_task_id(gi: int, inner: int | None) -> str:
    """A CV fit's task id in a ``fedrad fit`` plan: ``<path index>|<inner fold or all>``."""
    return f"{gi}|{'all' if inner is None else inner}"


def federated_cv_fit(fed: Federation, data: dict, penalty: str, l1_ratio: float | None, settings: dict,
                     phase: str = "model") -> tuple[object, dict]:
    """``(model, choice)``: the fit whose penalty federated inner CV chose, with the study's path, fold rule and
    criterion (:mod:`fedrad.common.penalty_cv`, whose :func:`~fedrad.common.penalty_cv.pooled_cv_fit` is the
    pooled twin). Round trips: one for the gradient at zero (the sites' score tests), the Newton steps of every
    (path value x inner fold) fit and of every full-data fit together (:func:`run_fits`), one for the held-out
    losses; the model is the full-data fit at the chosen value, so no refit is needed."""
    from fedrad.common import endpoints
    from fedrad.common.penalty_cv import finish_choice, path_from_scores
    from fedrad.common.selection import standardized_scores

    ep = endpoints.of_data(data)
    features = list(data["features"])
    replies = fed.ask("study_select", {"folds": {"fit": {"train_sites": None, "table": None,
                                                          "requests": {"score": ep.score_request(features)}}}},
                      phase="penalty path")
    z, n = standardized_scores([r["folds"]["fit"]["score"] for r in replies.values()])
    path = path_from_scores(z, n, ep.model, features, penalty, l1_ratio, settings)
    k, seed = settings["k"], settings["seed"]
    tasks = {}
    for gi, g in enumerate(path):
        for inner in [None, *range(k)]:
            rows = None if inner is None else {"k": k, "seed": seed, "fold": inner, "keep": "train"}
            tasks[cv_task_id(gi, inner)] = FitTask(ep.make_fit(features, penalty, g, float(l1_ratio or 0.0)),
                                                   {**data, **({"rows": rows} if rows else {})})
    fits = run_fits(fed, tasks, phase=phase)
    items = [{"id": tid, "model": m.to_dict(), "table": None, "rows": {"k": k, "seed": seed, "fold": int(inner)},
              "sites": None} for tid, m in fits.items() for inner in [tid.split("|")[1]] if inner != "all"]
    replies = fed.ask("study_evaluate", {"endpoint": ep.as_dict(), "items": items, "folds": {}}, phase="inner CV")
    totals: dict[int, float] = {}
    for r in replies.values():
        for tid, loss in r["losses"].items():
            if loss is not None:
                gi = int(tid.split("|")[0])
                totals[gi] = totals.get(gi, 0.0) + float(loss)
    gi, choice = finish_choice(path, totals, settings)
    return fits[cv_task_id(gi, None)], choice
