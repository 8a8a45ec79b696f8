"""What a site computes for each request type: thin glue between the site's rows and ``fedrad.common`` math."""
from __future__ import annotations

import json

import pandas as pd

from fedrad.client.policy import PolicyRefusal
from fedrad.client.site import Site
from fedrad.common import endpoints
from fedrad.common.files import atomic_write_bytes
from fedrad.common.combat import ComBatReference, apply_combat, site_combat_stats


def check_levels(rows, categorical, k: int) -> None:
    """Every level of every categorical covariate, and its complement within the site, covers >= k patients
    (a level of one patient would let the regression sums describe that patient: one indicator per patient
    rebuilds every row)."""
    n = len(rows)
    for col in categorical:
        if col not in rows.columns:
            continue  # reported by the ComBat step as a missing column
        counts = rows[col].value_counts(dropna=True)
        small = [lvl for lvl, c in counts.items() if c < k or 0 < n - c < k]  # a level of everyone: constant
        if small:
            raise PolicyRefusal(f"categorical covariate {col!r}: {len(small)} level(s) with fewer than {k} patients "
                                f"(or fewer than {k} outside the level) at this site", code="min-cell-size")


def combat_stats(site: Site, payload: dict) -> dict:
    """ComBat round 1: the site's regression statistics (aggregates only)."""
    request = payload["request"]
    rows = site.table(payload.get("table"))
    batch_col = request.get("batch_col")
    # the level counts go per batch: every level, within every batch of the site, covers >= k patients
    for part in ([rows] if not batch_col or batch_col not in rows.columns
                 else [g for _, g in rows.groupby(batch_col, sort=True)]):
        check_levels(part, list(request.get("categorical", [])), site.policy.min_cell_size)
    if payload.get("impute") or payload.get("previous"):
        # statistics of each fold's own table: imputed with the fold's values (missing values), and harmonized by
        # the fold's earlier passes (nested ComBat)
        from fedrad.client.study_steps import apply_chain, impute_fold

        impute, previous = payload.get("impute") or {}, payload.get("previous")
        return {"stats": {fold: site_combat_stats(
            apply_chain(site, impute_fold(site, rows, impute.get(fold)), previous[fold] if previous else []),
            request, site=site.name, min_cell_size=site.policy.min_cell_size, min_level_size=site.policy.min_events)
            for fold in (previous if previous else impute)}}
    return {"stats": site_combat_stats(rows, request, site=site.name, min_cell_size=site.policy.min_cell_size,
                                       min_level_size=site.policy.min_events)}


def harmonize_locally(site: Site, rows, reference: dict, output: str) -> dict:
    """Harmonize the site's rows against a fitted reference (in the fit or not) and keep them at the site."""
    harmonized, adjustments = apply_combat(rows, ComBatReference.from_dict(reference), site=site.name,
                                           min_cell_size=site.policy.min_cell_size)
    site.save_table(output, harmonized)
    atomic_write_bytes(site.workdir / "harmonized" / f"{output}.batch-parameters.json",
                       json.dumps({str(b): a.to_dict() for b, a in adjustments.items()}).encode())
    return {"n_rows": int(len(harmonized)), "batches": [str(b) for b in adjustments],
            "excluded_locally": {str(b): list(a.excluded_features) for b, a in adjustments.items()}}


def combat_apply(site: Site, payload: dict) -> dict:
    """ComBat round 2: harmonize locally against the global fit; keep the result at the site."""
    return harmonize_locally(site, site.table(payload.get("table")), payload["reference"],
                             str(payload.get("output", "harmonized")))


class TooFewRows(ValueError):
    """The rows a task would use are fewer than the site's minimum cell size."""


def _model_rows(site: Site, data: dict, request: dict, cache: dict):
    """The rows a fit task uses at this site, in the form the model's site function takes.

    ``cache`` (one per message) keeps tables, row subsets and column arrays: a study round carries hundreds of
    fits over a handful of (table, row subset, feature list) combinations.
    """
    from fedrad.common.folds import row_mask
    from fedrad.common.plan import inner_fold_usable

    name = data.get("table")
    spec = data.get("rows")
    flat = isinstance(spec, dict) and all(isinstance(v, (str, int, float, bool)) for v in spec.values())
    spec_key = (name, tuple(sorted(spec.items())) if flat else json.dumps(spec, sort_keys=True))
    k_min = site.policy.min_cell_size
    if spec_key not in cache:
        if name not in cache:
            cache[name] = narrow(site.table(name), (cache.get(COLUMNS) or {}).get(name))
        rows = cache[name]
        if data.get("rows"):
            ids = rows["case_id"] if "case_id" in rows.columns else rows.index.astype(str)
            mask = row_mask(list(ids), data["rows"])
            if not inner_fold_usable(int(mask.sum()), int((~mask).sum()), k_min):
                cache[spec_key] = TooFewRows(f"an inner fold with {int(mask.sum())} training and {int((~mask).sum())} "
                                             f"left-out patients (both must reach the minimum cell size {k_min})")
            else:
                cache[spec_key] = rows[mask]
        else:
            cache[spec_key] = rows
    rows = cache[spec_key]
    if isinstance(rows, TooFewRows):
        raise rows
    n = len(rows)
    if n < k_min:
        raise TooFewRows(f"{n} patients, fewer than the site's minimum cell size {k_min}")
    features = list(request["features"])
    key = (spec_key, tuple(features), data["model"])
    if key not in cache:
        absent = [c for c in features + endpoints.of_data(data).columns() if c not in rows.columns]
        if absent:
            raise ValueError(f"column(s) {', '.join(absent[:5])} not in the site's table")
        if (spec_key, "dtypes") not in cache:  # one dtype lookup per row subset, not a column selection per task
            cache[spec_key, "dtypes"] = dict(zip(rows.columns, rows.dtypes)) if rows.columns.is_unique else None
        dtypes = cache[spec_key, "dtypes"]
        text = [c for c, t in zip(features, rows[features].dtypes if dtypes is None else [dtypes[c] for c in features])
                if not pd.api.types.is_numeric_dtype(t)]
        if text:
            raise ValueError(f"feature column {text[0]!r} is not numeric; encode it (e.g. one-hot) first")
        if site.policy.min_events:
            _check_events(site, rows, data)
        cache[key] = endpoints.of_data(data).fit_rows(rows, features)  # logistic: arrays in the request's order
    return cache[key]


def _check_events(site: Site, rows, data: dict) -> None:
    """The site's opt-in ``min-events`` rule (fedrad.client.policy): events (survival) or the smaller outcome
    class (response) among the rows a fit would sum over."""
    site.policy.check_events(*endpoints.of_data(data).policy_events(rows))


#: key of a message cache (:func:`_model_rows`) holding, per table, the columns the message's tasks use
COLUMNS = "__columns__"


def narrow(rows: pd.DataFrame, columns) -> pd.DataFrame:
    """``rows`` restricted to ``columns`` (and ``case_id``), in the table's order (``columns`` None: all of them).
    Selecting rows and columns of a wide table costs pandas per column of the table, and a round's tasks use a
    few of its columns only; a column a task names that the table lacks is still reported as missing."""
    if columns is None:
        return rows
    keep = set(columns) | {"case_id"}
    return rows[[c for c in rows.columns if c in keep]]


def fit_round(site: Site, payload: dict) -> dict:
    """One step of every fit task that involves this site: its sums, gradients and Hessians."""
    results, skipped, cache = {}, {}, {COLUMNS: {}}
    for task in payload["tasks"]:  # the columns each table's tasks use
        if task.get("sites") is None or site.name in task["sites"]:
            data = task["data"]
            cache[COLUMNS].setdefault(data.get("table"), set()).update(
                list(task["request"]["features"]) + endpoints.of_data(data).columns())
    for task in payload["tasks"]:
        if task.get("sites") is not None and site.name not in task["sites"]:
            continue
        data = task["data"]
        try:
            rows = _model_rows(site, data, task["request"], cache)
        except (TooFewRows, PolicyRefusal) as exc:
            if not data.get("rows"):
                raise  # the site's whole table is below its minimum: it refuses to take part
            # an inner CV subset: left out consistently in every round; the reason is a code, never a count
            skipped[task["id"]] = getattr(exc, "code", "min-cell-size")
            continue
        results[task["id"]] = endpoints.of_data(data).site_function()(rows, task["request"], site=site.name)
        if data.get("dca_horizon") is not None and data.get("model") == "cox":
            # survival decision curves: the site's Breslow baseline at the plan's horizon, at the same coefficients
            from fedrad.common.cox import site_breslow

            results[task["id"]]["baseline"] = site_breslow(rows, task["request"], horizon=float(data["dca_horizon"]),
                                                           min_cell_size=site.policy.min_cell_size, site=site.name)
    return {"results": results, "skipped": skipped}


def fedavg_update(site: Site, payload: dict) -> dict:
    """FedAvg / FedProx local update on the site's rows (approximate option; see fedrad.common.fedavg)."""
    import numpy as np

    from fedrad.common.fedavg import local_update

    cfg = payload["config"]
    rows = site.table(cfg.get("table") or None)
    n = len(rows)
    if n < site.policy.min_cell_size:
        raise ValueError(f"{n} patients, fewer than the site's minimum cell size {site.policy.min_cell_size}")
    features = list(cfg["features"])
    x = rows[features].to_numpy(dtype=float)
    if not np.isfinite(x).all():
        raise ValueError("missing or non-finite feature values; impute or drop them")
    z = (x - np.asarray(cfg["mean"], float)) / np.asarray(cfg["scale"], float)
    w = local_update(z, rows[cfg["outcome"]].to_numpy(dtype=float), payload["weights"], C=float(cfg["C"]),
                     epochs=int(cfg["epochs"]), lr=float(cfg["lr"]), mu=float(cfg.get("proximal-mu", 0.0)))
    if cfg.get("clipping_norm") is not None:  # central DP (fedrad fit --dp-noise): clip here, so the audit
        return _clipped_update(w, payload["weights"], float(cfg["clipping_norm"]), n)  # log holds what is sent
    return {"weights": w, "n": n}


def _clipped_update(w, reference, clipping_norm: float, n: int) -> dict:
    """The update clipped to L2 norm ``clipping_norm`` with Flower's FlatClip arithmetic, iterated to a fixed
    point: Flower's ``fixedclipping_mod`` (client_app) then leaves these exact values unchanged on the wire."""
    import numpy as np

    from fedrad.common.privacy import clip_update

    sent, norm = clip_update(w, reference, clipping_norm)
    for _ in range(8):
        again, _ = clip_update(sent, reference, clipping_norm)
        if np.array_equal(again, sent):
            break
        sent = again
    return {"weights": sent, "n": n,
            "dp": {"clipping_norm": clipping_norm, "update_norm": norm, "clipped": bool(norm > clipping_norm),
                   "note": "update clipped at the site; the coordinator adds Gaussian noise to the average "
                           "of all sites' clipped updates (central DP, Flower DifferentialPrivacyClientSide"
                           "FixedClipping)"}}


def secure_fit_round(site: Site, payload: dict) -> dict:
    """One round of the exact logistic fit under SecAgg+ (``fedrad fit --secure-aggregation``): this site's sums,
    checked against the coordinator's agreed ranges. They leave masked (client_app: ``secaggplus_mod``); the
    audit log records them in the clear with that note."""
    from fedrad.common.privacy import encode_digits, layout_size, site_secure_logistic

    request, data = payload["request"], payload["data"]
    if data.get("model") != "logistic":
        raise ValueError(f"secure aggregation is available for logistic fits only, not {data.get('model')!r}")
    rows = _model_rows(site, data, {"features": list(request["features"])}, {})
    from fedrad.common.messages import to_plain

    if json.dumps(to_plain(request["layout"]), sort_keys=True) != json.dumps(
            to_plain(_secure_layout(request, len(rows[1]))), sort_keys=True):
        raise PolicyRefusal("the request's secure-aggregation ranges are not the protocol's", code="outside-plan")
    sums = site_secure_logistic(rows, request, site=site.name)
    try:  # refuse here (audited, generic reply: never the value) if out of range
        encode_digits(sums, request["layout"], request["bits"])
    except Exception as exc:
        raise PolicyRefusal(f"secure aggregation: {exc}", code="policy") from None
    return {"sums": sums,
            "secure_aggregation": {
                "protocol": "SecAgg+ (Flower secaggplus_mod)", "stage": request["stage"],
                "note": f"left masked by SecAgg+: the coordinator can only unmask the sum over all "
                        f"{request['n_sites']} sites, never this site's values; sent as "
                        f"{layout_size(request['layout'])} exact integer digits of {request['bits']} bits "
                        "(fedrad.common.privacy.encode_digits of these sums with this layout)",
                "layout": request["layout"], "bits": request["bits"]}}


def _secure_layout(request: dict, n_site: int) -> list:
    """The layout the protocol prescribes for this stage, derived at the site (fedrad.common.privacy): counts and
    centred stages from the number of features; Newton from the coefficients and the total row count, which
    cannot be below this site's own."""
    import numpy as np

    from fedrad.common.privacy import centred_layout, counts_layout, newton_layout

    p = len(request["features"])
    stage = request["stage"]
    if stage == "counts":
        return counts_layout(p)
    if stage == "centred":
        return centred_layout(p)
    n_total = int(request.get("n_total", 0))
    if n_total < n_site:
        raise PolicyRefusal("the request's total row count is below this site's", code="outside-plan")
    beta = np.asarray(request["inner"]["beta"], dtype=float)
    return newton_layout(len(beta), n_total, beta)


#: request name -> site step
STEPS = {"combat_stats": combat_stats, "combat_apply": combat_apply, "fit_round": fit_round}
