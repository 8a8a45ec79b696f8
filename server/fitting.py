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
