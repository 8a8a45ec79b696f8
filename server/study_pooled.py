"""Pooled twin of a study's leave-one-site-out fold: the test oracle for :mod:`fedrad.server.study`.

For a held-out site it runs the same pipeline on the *pooled* rows of the other sites with the pooled
estimators (``ComBat.fit``, pooled score tests and correlations, pooled logistic / stratified Cox fits, pooled
inner-CV losses), then harmonizes the held-out site with the unseen-site path and evaluates it. Decisions come
from :mod:`fedrad.common.pipeline`, exactly as in the federated study, so equal metrics mean the federated
aggregation is exact. :func:`pooled_site_effect` is the twin of the report's site-effect statistics (ANOVA per
feature and PCA of the site centroids from rows, before and after ComBat). It needs every site's rows in one
place: a test tool, never part of a real study.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedrad.common.combat import ComBat, apply_combat
from fedrad.common.folds import row_mask
from fedrad.common.plan import (batch_columns, candidate_features, combat_passes, dca_horizon, smooth_auto, smooth_edges, inner_fold_usable, path_shape, site_batch_labels,
                                smooth_columns, study_plan,
                                subgroup_columns)
from fedrad.common import endpoints
from fedrad.common.pipeline import (MODEL_KINDS, choose_penalty, complete_rows, evaluate_site, finish_signature,
                                    model_features, screen_candidates, withhold_leaks)
from fedrad.common.report_stats import centroid_pca_rows, project_centroids, scale_effect_rows, site_effect_rows
from fedrad.common.selection import (correlation_request, icc_request, penalty_path, pooled_correlation, pooled_icc,
                                     pooled_standardized_scores)
from fedrad.server.study import endpoint_of, grid_strong_to_weak


def _study_tables(cfg: dict, site_tables: dict[str, pd.DataFrame], min_cell_size: int = 10
                  ) -> tuple[dict[str, pd.DataFrame], list[str], dict]:
    """Each site's complete rows, the candidate features every site has (as the study's prepare phase) and the
    missing-value plan (:func:`fedrad.common.missing.missing_plan` from the rows): dropped features are no
    candidates, and a dropped volume column is ``plan["volume"] = None``."""
    from fedrad.common.missing import missing_plan_rows
    from fedrad.common.pipeline import common_volume
    from fedrad.common.plan import volume_column

    endpoint = endpoint_of(cfg)
    clinical = list(cfg["model"]["clinical"])
    harm = cfg["harmonization"]
    covariates = [c for c in (list(harm["covariates"]) + smooth_columns(harm) if harm["enabled"] else [])
                  if c not in clinical]
    batches = batch_columns(harm)
    covariates = [c for c in covariates if c not in batches]
    tables = {s: complete_rows(t, endpoint, clinical, s, covariates) for s, t in site_tables.items()}
    for batch in batches:  # the site's own batch labels, small batches merged (common.plan.site_batch_labels)
        shared = bool(harm.get("shared_batches"))
        tables = {s: t.assign(**{batch: site_batch_labels(t[batch], s, min_cell_size, shared)})
                  for s, t in tables.items()}
    study = study_plan(cfg)["study"]
    sites = sorted(tables)
    first = candidate_features(tables[sites[0]], study)
    common = set.intersection(*(set(candidate_features(t, study)) for t in tables.values()))
    candidates = [f for f in first if f in common]
    volume = common_volume({s: volume_column(tables[s], cfg["model"].get("volume")) for s in sites})[0]
    feats = candidates + ([volume] if volume and volume not in candidates else [])
    plan = missing_plan_rows(tables, feats, float(cfg["selection"].get("max_missing", 0.2)), min_cell_size)
    plan["volume"] = None if volume in plan["dropped"] else volume
    return tables, [f for f in candidates if f not in plan["dropped"]], plan


def _imputed(tables: dict[str, pd.DataFrame], plan: dict, train_sites: list[str], min_cell_size: int
             ) -> dict[str, pd.DataFrame]:
    """Every site's rows imputed with one fold's values (the training sites' pooled observed mean)."""
    from fedrad.common.missing import fold_values_rows, impute

    if not plan["impute"]:
        return tables
    values = fold_values_rows(tables, train_sites, plan["impute"])
    return {s: impute(t, values, min_cell_size)[0] for s, t in tables.items()}


def _harmonize_pooled(cfg: dict, tables: dict[str, pd.DataFrame], train_sites: list[str], candidates: list[str],
                      min_cell_size: int) -> tuple[set, dict[str, pd.DataFrame]]:
    """ComBat fit on the pooled rows of ``train_sites``; every site harmonized against it (unseen-site path for
    the others). Returns the excluded features and the harmonized tables (the raw tables when disabled)."""
    harm = cfg["harmonization"]
    if not harm["enabled"]:
        return set(), tables
    knots = None
    if smooth_auto(harm):  # ComBat-GAM knots from every site's histogram, as the study's prepare phase
        from fedrad.common.smooth import pooled_quantile_knots, site_histogram

        knots = {name: [float(v) for v in pooled_quantile_knots(
            [site_histogram(tables[s][name].to_numpy(dtype=float), smooth_edges(lo, hi), min_cell_size)
             for s in sorted(tables)], n)] for name, (n, lo, hi) in smooth_auto(harm).items()}
    for opts in combat_passes(harm, knots):  # nested ComBat: each pass on the previous pass's harmonized tables
        pooled = pd.concat([tables[s].assign(site=s) for s in train_sites], ignore_index=True)
        combat = ComBat(covariates=list(harm["covariates"]), categorical=list(harm["categorical"]),
                        parametric=opts["parametric"], mean_only=opts["mean_only"], covbat=opts["covbat"],
                        smooth=opts["smooth"], smooth_alphas=opts["smooth_alphas"])
        batch = opts["batch_col"] or "site"  # batches within sites: the site's own labels (the tables hold them)
        covs = list(harm["covariates"]) + smooth_columns(harm)
        combat.fit(pooled[candidates], pooled[batch], pooled[covs] if covs else None)
        ref = combat.reference_
        if opts["batch_col"]:
            ref.batch_col = opts["batch_col"]
        if opts["shared_batches"]:  # a held-out site's scanner model in the fit takes the fit's posterior
            ref.shared_batches = True
            ref.posterior_gamma, ref.posterior_delta = combat.gamma_star_, combat.delta_star_
        tables = {s: apply_combat(tables[s], ref, site=s, min_cell_size=min_cell_size)[0] for s in tables}
    return set(ref.excluded_features or {}), tables


def pooled_site_effect(cfg: dict, site_tables: dict[str, pd.DataFrame], min_cell_size: int = 10) -> dict:
    """Pooled twin of the study's ``results["site_effect"]``: one-way ANOVA per feature on the pooled rows of
    the raw tables and of the final fold's harmonized tables (ComBat fit on every site's pooled rows), Levene and
    Bartlett (scipy) on the same rows, and the PCA of the site centroids (raw axes; harmonized centroids projected
    on them), all from rows."""
    tables, candidates, plan = _study_tables(cfg, site_tables, min_cell_size)
    sites = sorted(tables)
    _, harmonized = _harmonize_pooled(cfg, _imputed(tables, plan, sites, min_cell_size), sites, candidates,
                                      min_cell_size)
    raw = pd.concat([tables[s].assign(__site__=s) for s in sites], ignore_index=True)
    out = {"before": site_effect_rows(raw, "__site__", candidates),
           "scale_before": scale_effect_rows(raw, "__site__", candidates)}
    pca = centroid_pca_rows(raw, "__site__", candidates)
    out["pca"] = {"sites": sites, "before": pca["scores"],
                  "explained_variance_ratio": pca["explained_variance_ratio"]}
    if cfg["harmonization"]["enabled"]:
        after = pd.concat([harmonized[s].assign(__site__=s) for s in sites], ignore_index=True)
        out["after"] = site_effect_rows(after, "__site__", candidates)
        out["scale_after"] = scale_effect_rows(after, "__site__", candidates)
        means = after[candidates].astype(float).groupby(after["__site__"].to_numpy()).mean().sort_index()
        out["pca"]["after"] = project_centroids(pca, means.to_numpy())
    return out


def pooled_loso(cfg: dict, site_tables: dict[str, pd.DataFrame], held_out: str, min_cell_size: int = 10,
                robustness: dict[str, pd.DataFrame] | None = None) -> dict:
    """Metrics of the held-out site when everything is fit on the pooled rows of the other sites
    (``robustness``: each site's perturbed feature table, when the study filters by ICC)."""
    endpoint = endpoint_of(cfg)
    tables, candidates, plan = _study_tables(cfg, site_tables, min_cell_size)
    sites = sorted(tables)
    train_sites = [s for s in sites if s != held_out]
    excluded, harmonized = _harmonize_pooled(cfg, _imputed(tables, plan, train_sites, min_cell_size), train_sites,
                                             candidates, min_cell_size)
    clinical = list(cfg["model"]["clinical"])
    feats = [f for f in candidates if f not in excluded]
    train = pd.concat([harmonized[s].assign(site=s) for s in train_sites], ignore_index=True)
    sel = cfg["selection"]
    kind_of = endpoints.of(endpoint)
    score = kind_of.pooled_score(train, feats, strata="site")
    score, leaks = withhold_leaks(score, kind_of.pooled_leak_strength(train, feats, score, strata="site"),
                                  correlation=kind_of.leak_is_correlation, allow=sel.get("allow") or [])
    icc = None
    if sel["icc_threshold"] is not None:
        perturbed = pd.concat([robustness[s] for s in train_sites], ignore_index=True)
        icc = pooled_icc(perturbed, icc_request(feats))
    screen = screen_candidates(score, fdr=float(sel["fdr"]), max_features=int(sel["max_features"]), icc=icc,
                               icc_threshold=sel["icc_threshold"])
    corr = pooled_correlation(train, correlation_request(screen["candidates"]))
    signature = finish_signature(screen, corr, redundancy=float(sel["redundancy"]),
                                 max_features=int(sel["max_features"]))["selected"]
    mcfg, vcfg = cfg["model"], cfg["validation"]
    k, seed = int(vcfg["inner_folds"]), int(vcfg["seed"])
    volume = plan["volume"]
    chosen, paths = {}, {}
    for kind in MODEL_KINDS:
        mf = model_features(kind, signature, clinical, volume)
        if not mf:
            continue
        grid = paths[kind] = pooled_path(cfg, train, mf)
        losses = {}
        for gi, g in enumerate(grid):
            total = 0.0
            for inner in range(k):
                spec = {"k": k, "seed": seed, "fold": inner, "keep": "train"}
                parts, usable = [], {}
                for s in train_sites:  # the fold rule: a site uses an inner fold only when its training and
                    mask = row_mask(list(harmonized[s]["case_id"]), spec)  # left-out rows both reach k
                    usable[s] = inner_fold_usable(int(mask.sum()), int((~mask).sum()), min_cell_size)
                    if usable[s]:
                        parts.append(harmonized[s][mask].assign(site=s))
                if not parts:
                    continue
                model = kind_of.fit_pooled(pd.concat(parts, ignore_index=True), mf, mcfg["penalty"], g,
                                           float(mcfg["l1_ratio"]))
                for s in train_sites:
                    if usable[s]:
                        rows = harmonized[s]
                        total += kind_of.heldout_loss(model, rows, row_mask(list(rows["case_id"]), spec))
            losses[gi] = total
        gi = choose_penalty(losses)
        chosen[kind] = kind_of.fit_pooled(train, mf, mcfg["penalty"], grid[gi], float(mcfg["l1_ratio"]))
    decision, baselines = None, {}
    horizon = dca_horizon(cfg)
    if horizon is not None:  # survival decision curves: the training sites' Breslow baselines, combined
        from fedrad.common.cox import pooled_breslow

        baselines = {kind: pooled_breslow(train, m, endpoint["time"], endpoint["event"], horizon=horizon,
                                          min_cell_size=min_cell_size) for kind, m in chosen.items()}
        decision = {"horizon": horizon, "baselines": {kind: b["cumhaz"] for kind, b in baselines.items()}}
    return {"signature": signature,
            "metrics": evaluate_site(endpoint, chosen, harmonized[held_out], min_cell_size=min_cell_size,
                                     km_grid=vcfg["km_times"],
                                     subgroups=subgroup_columns(study_plan(cfg)["study"]), decision=decision),
            "models": {kind: m.to_dict() for kind, m in chosen.items()}, "paths": paths, "baselines": baselines}


def pooled_path(cfg: dict, train: pd.DataFrame, features: list[str]) -> list[float]:
    """Pooled twin of the study's penalty values for one (fold, model): the fixed grid, or the path from the
    pooled training rows' gradient at zero (:func:`fedrad.common.selection.penalty_path`)."""
    endpoint, mcfg = endpoint_of(cfg), cfg["model"]
    if mcfg.get("grid") is not None:
        return grid_strong_to_weak(endpoint, [float(g) for g in mcfg["grid"]])
    z, n = pooled_standardized_scores(train, endpoint, features, strata="site")
    return penalty_path(max(z.values()), n, endpoints.of(endpoint).model, mcfg["penalty"], float(mcfg["l1_ratio"]),
                        *path_shape(cfg))


def flatten_metrics(d, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics dict as ``{"a/b/c": value}`` (for comparing two runs)."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten_metrics(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(d, (list, tuple, np.ndarray)):
        for i, v in enumerate(list(d)):
            out.update(flatten_metrics(v, f"{prefix}/{i}"))
    elif isinstance(d, (int, float, np.integer, np.floating)) and not isinstance(d, bool):
        out[prefix] = float(d)
    return out


def pooled_association(cfg: dict, site_tables: dict[str, pd.DataFrame], min_cell_size: int = 10) -> dict:
    """Pooled twin of an association study (``results["association"]["pairs"]``): ComBat fit on every site's pooled
    rows, then per marker and feature the OLS of ``marker ~ feature + clinical + site`` on the pooled harmonized
    rows (and with the volume column added), and every site's Spearman correlation from its rows (scipy)."""
    import scipy.stats

    from fedrad.common.association import pooled_partial_effects

    tables, candidates, plan = _study_tables(cfg, site_tables, min_cell_size)
    sites = sorted(tables)
    _, harmonized = _harmonize_pooled(cfg, _imputed(tables, plan, sites, min_cell_size), sites, candidates,
                                      min_cell_size)
    volume = plan["volume"]
    feats = candidates + ([volume] if volume and volume not in candidates else [])
    rows = pd.concat([harmonized[s].assign(site=s) for s in sites], ignore_index=True)
    clinical = list(cfg["model"]["clinical"])
    out: dict = {"features": feats, "pairs": {}}
    for m in cfg["association"]["markers"]:
        eff = pooled_partial_effects(rows, m, clinical, feats)
        vol = (pooled_partial_effects(rows, m, clinical + [volume], [f for f in feats if f != volume])
               if volume and cfg["association"]["volume_adjusted"] else None)
        out["pairs"][m] = {}
        for f in feats:
            entry = {k: float(eff.loc[f, k]) for k in ("r", "t", "p")}
            if vol is not None and f != volume:
                entry["volume_adjusted"] = {k: float(vol.loc[f, k]) for k in ("r", "p")}
            entry["spearman"] = {s: float(scipy.stats.spearmanr(harmonized[s][f], harmonized[s][m]).statistic)
                                 for s in sites}
            out["pairs"][m][f] = entry
    return out
