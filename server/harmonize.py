"""Coordinator side of federated ComBat: two round trips over a :class:`~fedrad.server.federation.Federation`."""
from __future__ import annotations

from fedrad.common.combat import ComBatReference, combine_combat_stats
from fedrad.server.federation import Federation


def run_federated_combat(fed: Federation, request: dict, output: str = "harmonized"
                         ) -> tuple[ComBatReference, dict[str, dict]]:
    """Fit ComBat from the sites' aggregates and have every site harmonize itself.

    Round trip 1 (``combat_stats``): each site's regression statistics -> global reference.
    Round trip 2 (``combat_apply``): the reference goes out; each site harmonizes locally, keeps the
    harmonized table in its work directory under ``output`` and replies with a summary.
    Returns the reference (global parameters and per-site counts; no per-patient value) and the summaries.
    """
    replies = fed.ask("combat_stats", {"request": request}, phase="harmonization")
    reference = combine_combat_stats([r["stats"] for r in replies.values()], request)
    if reference.posterior_gamma is not None:  # batch-level estimates go only to the site holding the batch
        summaries = fed.ask("combat_apply", per_site={
            s: {"reference": reference.for_site({e["batch"] for e in r["stats"]["batches"]}), "output": output}
            for s, r in replies.items()}, phase="harmonization")
    else:
        summaries = fed.ask("combat_apply", {"reference": reference.to_dict(), "output": output},
                            phase="harmonization")
    return reference, summaries
