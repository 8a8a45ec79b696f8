"""What a site computes for each request type: thin glue between the site's rows and ``fedrad.common`` math."""
from __future__ import annotations

import json
import os
import tempfile

from fedrad.client.site import Site
from fedrad.common.combat import ComBatReference, apply_combat, site_combat_stats


def combat_stats(site: Site, payload: dict) -> dict:
    """ComBat round 1: the site's regression statistics (aggregates only)."""
    request = payload["request"]
    return {"stats": site_combat_stats(site.rows(), request, site=site.name,
                                       min_cell_size=site.policy.min_cell_size)}


def combat_apply(site: Site, payload: dict) -> dict:
    """ComBat round 2: harmonize locally against the global fit; keep the result at the site."""
    reference = ComBatReference.from_dict(payload["reference"])
    rows = site.rows()
    harmonized, adjustments = apply_combat(rows, reference, site=site.name,
                                           min_cell_size=site.policy.min_cell_size)
    name = str(payload.get("output", "harmonized"))
    out_dir = site.workdir / "harmonized"
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_parquet(harmonized, out_dir / f"{name}.parquet")
    _atomic_text(json.dumps({str(b): a.to_dict() for b, a in adjustments.items()}),
                 out_dir / f"{name}.batch-parameters.json")
    return {"n_rows": int(len(harmonized)), "batches": [str(b) for b in adjustments],
            "excluded_locally": {str(b): list(a.excluded_features) for b, a in adjustments.items()}}


def _atomic_parquet(df, path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_text(text: str, path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _model_rows(site: Site, data: dict):
    """The rows a fit task uses at this site, in the form the model's site function takes."""
    rows = site.rows()
    n = len(rows)
    if n < site.policy.min_cell_size:
        raise ValueError(f"{n} patients, fewer than the site's minimum cell size {site.policy.min_cell_size}")
    features = list(data["features"])
    absent = [c for c in features + _outcome_columns(data) if c not in rows.columns]
    if absent:
        raise ValueError(f"column(s) {', '.join(absent[:5])} not in the site's table")
    if data["model"] == "logistic":
        return rows[features], rows[data["outcome"]].to_numpy()
    return rows[features + [data["time"], data["event"]]]


def _outcome_columns(data: dict) -> list[str]:
    return [data["outcome"]] if data["model"] == "logistic" else [data["time"], data["event"]]


def _site_function(model: str):
    if model == "logistic":
        from fedrad.common.glm import site_logistic

        return site_logistic
    if model == "cox":
        from fedrad.common.cox import site_cox

        return site_cox
    raise ValueError(f"unknown model {model!r}")


def fit_round(site: Site, payload: dict) -> dict:
    """One step of every fit task that involves this site: its sums, gradients and Hessians."""
    results = {}
    for task in payload["tasks"]:
        if task.get("sites") is not None and site.name not in task["sites"]:
            continue
        data = task["data"]
        results[task["id"]] = _site_function(data["model"])(_model_rows(site, data), task["request"],
                                                            site=site.name)
    return {"results": results}


#: request name -> site step
STEPS = {"combat_stats": combat_stats, "combat_apply": combat_apply, "fit_round": fit_round}
