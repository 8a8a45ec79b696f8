"""Site steps of a multi-center validation study (see :mod:`fedrad.server.study` for the protocol).

Every step works on the site's own tables and returns aggregates or metric values only. Derived tables (the
study's raw table, one harmonized table per validation fold) stay in the site's work directory.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedrad.client.site import Site
from fedrad.client.steps import harmonize_locally
from fedrad.common import endpoints
from fedrad.common.glm import cached_features
from fedrad.common.messages import to_plain

#: software whose versions a site reports with its numbers (provenance in the report)
SITE_SOFTWARE = ("fedrad", "pyradiomics", "flwr", "numpy", "SimpleITK")


def read_feature_file(path: Path, site: str) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"feature table {path} not found at site {site}")
    if path.suffix.lower() == ".parquet":
        rows = pd.read_parquet(path)
    else:
        rows = pd.read_csv(path, float_precision="round_trip")
    rows.attrs = {}  # table metadata (pandas copies it into every column it hands out) never slows a request
    return rows


def study_prepare(site: Site, payload: dict) -> dict:
    """Make the study's raw table at the site: extract its manifest, or take its feature table; check columns.

    Replies with the table's size, outcome counts (withheld together when either is below the minimum cell
    size), the candidate feature names, the extraction parameters' hash (to check every site used the same
    settings), the cohort description of the report (clinical columns: mean and SD, level counts with small
    cells withheld), per-feature moments of the raw table (site effect before harmonization) and the site's
    software versions.
    """
    source = site.source(payload.get("source"))  # the site's own configuration, never a path from the request
    params_hash = None
    if "manifest" in source:
        from fedrad.client.extract import extract_manifest, read_provenance

        out = site.workdir / "features.parquet"
        result = extract_manifest(Path(source["manifest"]), params=source.get("params"), out=out,
                                  jobs=site.extract_jobs, cache_dir=site.workdir / "cache")
        rows = read_feature_file(out, site.name)
        params_hash = read_provenance(out).get("params_hash")
        extraction = {"cases": result.n_cases, "extracted": result.n_ok, "failed": result.n_failed}
    else:
        rows = read_feature_file(Path(source["table"]), site.name)
        extraction = None
    endpoint = payload["endpoint"]
    required = list(dict.fromkeys(payload.get("required_columns", [])))
    missing = [c for c in required if c not in rows.columns]
    if missing:
        raise ValueError(f"the feature table lacks column(s) {', '.join(missing)} the study needs")
    from fedrad.common.pipeline import complete_rows, exclusion_reasons, outcome_columns

    for col in outcome_columns(endpoint):
        values = rows[col].dropna()
        if len(values) and not pd.api.types.is_numeric_dtype(values):
            raise ValueError(f"site {site.name}: outcome column {col!r} is not numeric (e.g. {values.iloc[0]!r}); "
                             "write numbers (0/1 for outcomes and events)")
    kind = endpoints.of(endpoint)
    k = site.policy.min_cell_size
    clinical = list(payload.get("clinical", []))
    batch = payload.get("batch")  # [harmonization] batch: a missing value is its own batch, never an exclusion
    batches = [] if not batch else [batch] if isinstance(batch, str) else list(batch)
    covariates = [c for c in required if c not in outcome_columns(endpoint) and c not in clinical and c not in batches]
    _, reasons = exclusion_reasons(rows, endpoint, clinical, covariates)
    for reason, count in reasons.items():  # the exact counts stay in the site's own log
        site.log_local("data", f"site {site.name}: {count} row(s) excluded ({reason}; complete-case rule)",
                       "study_prepare")
    complete = complete_rows(rows, endpoint, clinical, site.name, covariates)
    dropped = len(rows) - len(complete)
    for batch in batches:
        from fedrad.common.plan import site_batch_labels

        shared = bool(payload["_plan"]["study"]["harmonization"].get("shared_batches"))
        labels = site_batch_labels(complete[batch], site.name, k, shared)
        merged = sum(a != b for a, b in zip(site_batch_labels(complete[batch], site.name, 0, shared), labels))
        if merged:  # the exact counts stay in the site's own log
            site.log_local("data", f"site {site.name}: {merged} patient(s) of batches under {k} patients joined "
                           f"another batch ({batch}; the site's batches: {', '.join(sorted(set(labels)))})",
                           "study_prepare")
        complete = complete.assign(**{batch: labels})
    site.save_table("raw", complete)
    if source.get("robustness") and payload.get("robustness_needed"):  # perturbed features for ICC, kept here
        site.save_table("robustness", read_feature_file(Path(source["robustness"]), site.name))
    kind.check_values(complete, site.name, k)
    from fedrad.common.report_stats import cohort_summary, feature_moments, software_versions

    from fedrad.common.plan import feature_screen, site_volume, unmatched_numeric

    study = payload["_plan"]["study"]
    screen = feature_screen(complete, study, site.columns)
    features = screen["candidates"]  # within the site's [columns] allow-list
    volume = site_volume(complete, study, site.columns)
    spec = payload.get("cohort") or {}
    cohort = cohort_summary(complete, endpoint=endpoint, columns=list(spec.get("columns", payload.get("clinical", []))),
                            categorical=list(spec.get("categorical", [])), k=k)
    outcome = cohort["outcome"]  # events and non-events, withheld together when either is under k
    histograms = {}
    for name, edges in (payload.get("smooth_histograms") or {}).items():  # ComBat-GAM knots from aggregates
        from fedrad.common.smooth import site_histogram

        hist = site_histogram(complete[name].to_numpy(dtype=float), edges, k, name=name)
        histograms[name] = hist.message()
        if hist.n_below or hist.n_above:  # the exact counts stay in the site's own log
            site.log_local("data", f"site {site.name}: {hist.n_below + hist.n_above} value(s) of {name} outside the "
                           "plan's range count in its outermost bins", "study_prepare")
    return {"n": int(len(complete)), "n_dropped_incomplete": _small_or_zero(dropped, k),
            **({"smooth_histograms": histograms} if histograms else {}),
            "exclusions": {reason: _small_or_zero(count, k) for reason, count in reasons.items()},
            "n_events": outcome.get("events"), "n_nonevents": outcome.get("non_events"),
            "features": features, "columns": unmatched_numeric(complete, study, allowed=site.columns), "volume": volume,
            "endpoint_like": screen["endpoint_like"],  # column names left out as endpoint or follow-up columns
            "params_hash": params_hash, "extraction": extraction,
            "has_robustness": bool(source.get("robustness")), "cohort": cohort,
            # per-feature moments of the raw table (site effect; observed counts and means: the missing-value rule)
            "moments": feature_moments(complete, features + ([volume] if volume and volume not in features else []),
                                       k),
            "versions": software_versions(SITE_SOFTWARE)}


def _small_or_zero(count: int, k: int):
    """A count of excluded patients: released when 0 or at least k."""
    return int(count) if count == 0 or count >= k else None


def impute_fold(site: Site, rows: pd.DataFrame, values: dict | None) -> pd.DataFrame:
    """The site's rows with one fold's imputation values (:func:`fedrad.common.missing.impute`; fewer than k
    missing cells of a feature get the site's own mean). A feature observed in fewer than k patients is refused."""
    if not values:
        return rows
    from fedrad.client.policy import PolicyRefusal
    from fedrad.common.missing import ImputationRefused, impute

    try:
        return impute(rows, values, site.policy.min_cell_size)[0]
    except ImputationRefused as exc:
        raise PolicyRefusal(str(exc), code="min-cell-size") from None


def apply_chain(site: Site, rows, chain: list):
    """``rows`` harmonized by each reference of ``chain`` in turn (the earlier passes of nested ComBat)."""
    from fedrad.common.combat import ComBatReference, apply_combat

    for ref in chain:
        rows = apply_combat(rows, ComBatReference.from_dict(ref), site=site.name,
                            min_cell_size=site.policy.min_cell_size)[0]
    return rows


def study_harmonize(site: Site, payload: dict) -> dict:
    """Harmonize the raw table once per validation fold (in the fit, or as the unseen held-out site), then
    answer the selection's score-test requests on the folds this site trains in, and send per-feature moments
    of the fold's harmonized table named in ``payload["moments"]`` (the report's site effect after ComBat)."""
    rows = site.table("raw")
    impute = payload.get("impute") or {}
    folds = {}
    for fold, ref in payload["references"].items():
        table = impute_fold(site, rows, impute.get(fold))
        if ref is None:  # harmonization disabled: the fold's imputed table only
            site.save_table(f"h-{fold}", table)
            folds[fold] = {"n_rows": int(len(table))}
        else:  # nested ComBat: the fold's chain of references, one per pass, in order
            chain = ref if isinstance(ref, list) else [ref]
            table = apply_chain(site, table, chain[:-1])
            folds[fold] = harmonize_locally(site, table, chain[-1], f"h-{fold}")
    selection = study_select(site, {"folds": payload["selection"]})["folds"] if payload.get("selection") else {}
    out = {"folds": folds, "selection": selection}
    spec = payload.get("moments")
    if spec and spec["fold"] in folds:  # per-feature moments of one harmonized table (site effect after ComBat)
        from fedrad.common.report_stats import feature_moments

        out["moments"] = feature_moments(site.table(f"h-{spec['fold']}"), spec["features"],
                                         site.policy.min_cell_size)
    return out


def study_select(site: Site, payload: dict) -> dict:
    """Selection statistics for every fold this site trains in (score tests, correlations)."""
    from fedrad.common.selection import site_batch

    out = {}
    perturbed = None
    for fold, spec in payload["folds"].items():
        if site.name not in spec["train_sites"]:
            continue
        if "icc" in spec["requests"] and perturbed is None:
            perturbed = site.table("robustness")
        out[fold] = site_batch(site.table(spec["table"]), spec["requests"], site=site.name,
                               perturbed_rows=perturbed, min_cell_size=site.policy.min_cell_size)
    return {"folds": out}


def _narrow_to(rows: pd.DataFrame, columns: list) -> pd.DataFrame:
    """``rows`` restricted to the columns an evaluation uses (:func:`fedrad.client.steps.narrow`), or all of them
    when one of those names is not a column (a model term built from columns: nothing is narrowed then)."""
    from fedrad.client.steps import narrow

    return narrow(rows, columns) if set(columns) <= set(rows.columns) else rows


def _cv_losses(site: Site, endpoint: dict, items: list) -> dict:
    """Held-out loss of each inner-CV fit on this site's held-out inner fold (None when it has < k rows)."""
    from fedrad.common.folds import row_mask
    from fedrad.common.plan import inner_fold_usable

    kind = endpoints.of(endpoint)
    tables: dict[str, pd.DataFrame] = {}
    losses = {}
    used: dict[str, list] = {}  # per table, the columns its items' models and the outcome use
    for item in items:
        if site.name in item["sites"]:
            used.setdefault(item["table"], kind.columns()).extend(kind.model_features(item["model"]))
    for item in items:
        if site.name not in item["sites"]:
            continue
        name = item["table"]
        if name not in tables:
            tables[name] = _narrow_to(site.table(name), used[name])
        rows = tables[name]
        train = row_mask(list(rows["case_id"]), {**item["rows"], "keep": "train"})
        if not inner_fold_usable(int(train.sum()), int((~train).sum()), site.policy.min_cell_size):
            losses[item["id"]] = None
            continue
        losses[item["id"]] = kind.heldout_loss(kind.model_from_dict(item["model"]), rows, train)
    return losses


def study_evaluate(site: Site, payload: dict) -> dict:
    """Inner-CV losses for the folds this site trains in, and metrics of every penalty variant of every model
    of the folds it evaluates, computed on its own rows."""
    from fedrad.common.pipeline import evaluate_variants

    endpoint = payload["endpoint"]
    kind = endpoints.of(endpoint)
    out = {}
    for fold, spec in payload["folds"].items():
        if site.name not in spec["eval_sites"]:
            continue
        used = kind.columns() + list(payload.get("subgroups") or ()) + [
            f for vs in spec["models"].values() for d in vs.values() for f in kind.model_features(d)]
        rows = _narrow_to(site.table(spec["table"]), used)
        variants = {m: {v: kind.model_from_dict(d) for v, d in vs.items()} for m, vs in spec["models"].items()}
        decision = ({"horizon": float(payload["dca_horizon"]), "baselines": spec.get("baselines") or {}}
                    if payload.get("dca_horizon") is not None else None)
        with cached_features():  # every penalty variant of a model predicts from the same feature matrix
            out[fold] = evaluate_variants(endpoint, variants, rows, min_cell_size=site.policy.min_cell_size,
                                          km_grid=payload.get("km_times"), subgroups=payload.get("subgroups") or (),
                                          decision=decision)
    with cached_features():  # the inner folds' and penalties' models share their feature matrices
        losses = _cv_losses(site, endpoint, payload.get("items", []))
    return {"losses": losses, "folds": to_plain(out, keep_arrays=True)}


def study_associate(site: Site, payload: dict) -> dict:
    """Association aggregates of the final fold's table (:func:`fedrad.common.association.site_association`):
    feature x marker cross-products adjusted for the plan's covariates (and the site's volume column), and the
    site's Spearman correlations. A refusal (a covariate level under k) is the site's policy."""
    from fedrad.client.policy import PolicyRefusal
    from fedrad.common.association import SmallCellError, site_association

    rows = site.table(payload["table"])
    adjust = list(payload["adjust"]) + ([payload["volume"]] if payload.get("volume") else [])
    try:
        out = site_association(rows, payload["features"], payload["markers"], adjust,
                               min_cell_size=site.policy.min_cell_size, site=site.name)
    except SmallCellError as exc:
        raise PolicyRefusal(str(exc), code="min-cell-size") from None
    for marker in out["withheld_markers"]:
        site.log_local("policy", f"site {site.name}: marker {marker} has a level with fewer than "
                       f"{site.policy.min_cell_size} patients; its associations are withheld", "study_associate")
    return to_plain(out, keep_arrays=True)


STUDY_STEPS = {"study_prepare": study_prepare, "study_harmonize": study_harmonize, "study_select": study_select,
               "study_evaluate": study_evaluate, "study_associate": study_associate}
