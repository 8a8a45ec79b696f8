"""A multi-center validation study, run by the coordinator over a :class:`Federation` (any Flower runtime).

Validation folds: ``final`` (every site trains) and, with leave-one-site-out, ``loso:<site>`` for each site
(the other sites train; the site is held out and validates). Every phase serves all folds in the same round
trips, so the number of round trips does not grow with the number of sites:

==========================  ==========================================================================  ======
phase                       what happens                                                                rounds
==========================  ==========================================================================  ======
prepare                     each site extracts its manifest (or takes its table), checks columns;       1
                            sends its cohort description and per-feature moments of the raw table
harmonization               ComBat statistics once per site; the server fits one reference per fold     2
                            from its training sites; each site harmonizes itself against every fold's
                            reference (a held-out site uses the unseen-site path), keeps the tables and
                            sends per-feature moments of the final fold's harmonized table
selection                   per fold, training sites send score-test and correlation aggregates; the    1
                            server applies BH-FDR, the redundancy filter and the size cap
models                      radiomics, volume, clinical and combined models, for every fold, penalty    ~5-8
                            and inner CV fold, fitted together (Newton / proximal Newton); survival
                            with [validation] dca_horizon: beside each full-fold Newton reply, the
                            site's Breslow baseline at the horizon (decision curves; no extra round)
evaluation                  training sites send each inner fit's loss on their held-out inner fold;     1
                            held-out sites compute metrics of every penalty variant of their fold's
                            models on their own rows (every site: the final models' apparent
                            performance; survival: decision-curve counts at the training sites'
                            combined baseline); the server picks each (fold, model)'s penalty from the
                            inner-CV losses and keeps that variant's metrics
==========================  ==========================================================================  ======

Harmonization and selection are fit inside each fold (no information from a held-out site reaches its
models). Inner CV for the penalty reuses the fold's selected features (a documented simplification: the
penalty choice, not the external validation, sees the selection's optimism). Pooled estimates: random-effects
meta-analysis (DerSimonian-Laird) of the held-out sites' AUC / C-index on the logit scale, and pooled ROC /
Kaplan-Meier curves from binned counts.

For the report (:mod:`fedrad.server.report`) the results also hold, from aggregates only and without extra round
trips: each site's cohort description (small cells withheld), the per-feature site effect before / after ComBat
and the PCA of the site centroids (:mod:`fedrad.common.report_stats`), the sites' and coordinator's software
versions, and every round trip with the sites that answered or failed (``results["rounds"]``).
"""
from __future__ import annotations

import time

from fedrad.common import endpoints
from fedrad.common.combat import combine_combat_stats, make_request
from fedrad.common.messages import to_plain
from fedrad.common.plan import (combat_passes, grid_strong_to_weak, smooth_auto, harmonization_method, path_shape, smooth_columns,
                               uses_loso)
from fedrad.common.pipeline import (MODEL_KINDS, choose_penalty, finish_signature, model_features, withhold_leaks,
                                    common_volume, penalty_choice, pick_variants,
                                    screen_candidates)
from fedrad.common.report_stats import covariate_balance, harmonization_summary, software_versions
from fedrad.common.selection import (combine_batch, correlation_request, icc_request, penalty_path,
                                     standardized_scores)
from fedrad.common.text import plural, verb
from fedrad.server.federation import Federation, SiteError
from fedrad.server.fitting import FitTask, run_fits


class StudyError(RuntimeError):
    """The study cannot go on for a reason its coordinator can fix (the message names it and what to set)."""


def no_features_message(replies: dict) -> str:
    """One line naming each site's feature count, a few of its numeric columns left out and what to set."""
    parts = []
    for s in sorted(replies):
        r = replies[s]
        cols = r.get("columns") or {}
        left = ", ".join(cols.get("left_out") or []) or "none"
        feats = r.get("features") or []
        parts.append(f"{s}: {len(feats)} candidate(s)" + (f" such as {', '.join(feats[:2])}" if feats else "")
                     + f" of {cols.get('n_numeric', '?')} numeric column(s) (left out e.g. {left})")
    return ("the sites share no feature column (" + "; ".join(parts) + "); check [selection] feature_columns, "
            "feature_prefixes and exclude in study.toml (default: every numeric column the study does not name)")


def outcome_like(features: list[str]) -> list[str]:
    """The features whose names look like an endpoint or follow-up column (whole name tokens,
    :func:`fedrad.common.names.endpoint_like`): only those a study allows as features can remain."""
    from fedrad.common.names import endpoint_like

    return [f for f in features if endpoint_like(f)]


def fold_plan(sites: list[str], loso: bool) -> dict[str, dict]:
    """``{fold: {"train": [...], "test": [...]}}``."""
    folds = {"final": {"train": list(sites), "test": list(sites)}}
    if loso:
        for s in sites:
            folds[f"loso:{s}"] = {"train": [t for t in sites if t != s], "test": [s]}
    return folds


def site_batch_labels_of(stats: dict, per_fold: bool) -> set:
    """The batch labels a site reported in its ComBat statistics (one message, or one per fold)."""
    messages = list(stats.values()) if per_fold else [stats]
    return {e["batch"] for m in messages for e in m["batches"]}


def endpoint_of(cfg: dict) -> dict:
    """The endpoint of a study configuration (the same function the sites apply to their copy of the plan)."""
    from fedrad.common.plan import endpoint

    return endpoint(cfg)


class Study:
    """Runs the phases; every decision comes from :mod:`fedrad.common.pipeline` (shared with the pooled twin)."""

    def __init__(self, fed: Federation, cfg: dict, log=None):
        from fedrad.common.plan import plan_id, study_plan

        self.fed, self.cfg = fed, cfg
        self.endpoint = endpoint_of(cfg)
        self.kind = endpoints.of(self.endpoint)
        self.log = log or fed.log
        #: the study id: hash of the plan the sites approved; every request carries it
        self.plan_id = fed.plan_id = plan_id(study_plan(cfg))
        key = (cfg.get("coordinator") or {}).get("key")
        signer = getattr(fed, "signer", None)
        if key and (signer is None or signer.public != key):
            from fedrad.common.signing import fingerprint

            held = f"holds key {fingerprint(signer.public)}" if signer is not None else "has no signing key"
            raise StudyError(f"the plan names coordinator key {fingerprint(key)}, but this coordinator {held}: the "
                             "sites would refuse every request; run the study from the coordinator home whose "
                             "`fedrad coordinator keys` printed that key")
        from fedrad.common.plan import dca_horizon

        #: the survival decision curves' horizon (None: none); the sites take it from their approved plan
        self.horizon = dca_horizon(cfg)
        self.results: dict = {"study": cfg["study"]["name"], "endpoint": self.endpoint, "phases": [],
                              "plan_id": self.plan_id}

    # -- phases ------------------------------------------------------------------------------------------
    def _phase(self, name: str, t0: float, rounds0: int) -> None:
        self.results["phases"].append({"phase": name, "round_trips": self.fed.rounds - rounds0,
                                       "seconds": round(time.monotonic() - t0, 2)})
        self.log(f"phase {name} done: {plural(self.fed.rounds - rounds0, 'round trip')}, "
                 f"{time.monotonic() - t0:.1f} s")

    def prepare(self) -> None:
        t0, r0 = time.monotonic(), self.fed.rounds
        cfg = self.cfg
        # the sites derive what to prepare (columns, feature prefixes, their data source) from their approved copy
        # of the plan (fedrad.client.guard); the request carries only the plan id
        payload: dict = {}
        replies = self.fed.ask("study_prepare", payload, phase="prepare")
        min_sites = int(cfg["study"]["min_sites"])
        if len(replies) < min_sites:
            raise StudyError(f"only {len(replies)} sites answered; the study needs {min_sites}")
        self.sites = sorted(replies)
        hashes = {r["params_hash"] for r in replies.values() if r.get("params_hash")}
        if len(hashes) > 1:
            raise StudyError("sites extracted features with different parameter files; use one params file")
        common = set.intersection(*(set(r["features"]) for r in replies.values()))
        self.candidates = [f for f in replies[self.sites[0]]["features"] if f in common]
        if not self.candidates:
            raise StudyError(no_features_message(replies))
        left = sorted({str(c) for r in replies.values() for c in (r.get("endpoint_like") or [])})
        if left:
            self.log(f"note: column(s) {', '.join(left[:8])}{' ...' if len(left) > 8 else ''} left out of the "
                     "features as endpoint or follow-up columns (list a real feature in [selection] allow)")
        self.results["endpoint_like_excluded"] = left
        suspicious = outcome_like(self.candidates)
        if suspicious:
            self.log(f"warning: candidate feature(s) {', '.join(suspicious[:5])} look like outcome or follow-up "
                     "columns ([selection] allow lists them); if they are, remove them from allow")
        self.results["outcome_like_features"] = suspicious
        self.volume, reason = common_volume({s: replies[s].get("volume") for s in self.sites})
        self.results["volume"] = {"column": self.volume, "reason": reason}
        self.folds = fold_plan(self.sites, uses_loso(cfg))
        self.results["sites"] = {s: {k: replies[s].get(k) for k in ("n", "n_events", "n_nonevents",
                                                                     "n_dropped_incomplete", "exclusions",
                                                                     "extraction")}
                                 for s in self.sites}
        for s in self.sites:
            for reason, count in (replies[s].get("exclusions") or {}).items():
                self.log(f"site {s}: {count if count is not None else 'fewer than k'} row(s) excluded ({reason}; "
                         "complete-case rule, counted in the cohort table)")
        self.results["n_candidate_features"] = len(self.candidates)
        self.results["cohort"] = {s: replies[s].get("cohort") for s in self.sites}
        harm = cfg["harmonization"]
        auto = smooth_auto(harm) if harm["enabled"] else {}
        if auto:  # ComBat-GAM knots: pooled quantiles of the sites' histograms (bins of >= k patients each)
            from fedrad.common.smooth import pooled_quantile_knots

            self.smooth_knots = {name: [float(v) for v in pooled_quantile_knots(
                [replies[s]["smooth_histograms"][name] for s in self.sites], n)] for name, (n, _, _) in auto.items()}
            self.results["smooth_knots"] = self.smooth_knots
            self.log("ComBat-GAM knots from the sites' histograms: " + "; ".join(
                f"{name} {', '.join(f'{v:.4g}' for v in sorted(set(k)))}" for name, k in self.smooth_knots.items()))
        harm = cfg["harmonization"]
        self.results["covariate_balance"] = covariate_balance(
            self.results["cohort"], modelled=list(harm["covariates"]) + smooth_columns(harm) if harm["enabled"] else [])
        unmodelled = self.results["covariate_balance"]["unmodelled_imbalanced"]
        if unmodelled and harm["enabled"]:  # without harmonization there is no ComBat to add them to
            one = len(unmodelled) == 1
            self.log(f"warning: {', '.join(unmodelled)} {verb(len(unmodelled), 'differs', 'differ')} between sites "
                     f"(|SMD| > {self.results['covariate_balance']['threshold']}) and ComBat does not model "
                     f"{'it' if one else 'them'}; add {'it' if one else 'them'} to [harmonization] covariates")
        self.raw_moments = {s: replies[s]["moments"] for s in self.sites}
        self._missing_values({s: int(replies[s]["n"]) for s in self.sites})
        self.results["provenance"] = {"params_hash": next(iter(hashes)) if hashes else None,
                                      "sites": {s: replies[s].get("versions") for s in self.sites}}
        if hashes:  # one of fedrad's own parameter files: its settings go into the report (METRICS 11, 13)
            try:
                from fedrad.client.extract import shipped_params
            except ImportError:  # a coordinator without pyradiomics: the hash alone
                shipped_params = None  # noqa: N806
            if shipped_params is not None:
                self.results["provenance"]["params"] = shipped_params(next(iter(hashes)))
        if cfg["selection"]["icc_threshold"] is not None:
            lacking = [s for s in self.sites if not replies[s].get("has_robustness")]
            if lacking:
                raise StudyError(f"[selection] icc_threshold needs a robustness table at every site; missing at "
                                   f"{', '.join(lacking)} (run `fedrad site robustness` and set robustness = ...)")
        self.results["folds"] = {f: dict(v) for f, v in self.folds.items()}
        self._phase("prepare", t0, r0)

    def _missing_values(self, n_rows: dict[str, int]) -> None:
        """Missing feature values (:mod:`fedrad.common.missing`): drop the features missing in more than
        ``[selection] max_missing`` of a site's patients; impute the others per fold with the training sites'
        mean (values from the raw-table moments, no extra round trip)."""
        from fedrad.common.missing import fold_values, missing_plan

        share = float(self.cfg["selection"].get("max_missing", 0.2))
        volume = self.volume
        feats = self.candidates + ([volume] if volume and volume not in self.candidates else [])
        plan = missing_plan(self.raw_moments, n_rows, feats, share)
        if plan["silent"]:
            self.log(f"missing values: {', '.join(plan['silent'])} withheld every feature moment (fewer patients "
                     "than the site's minimum cell size); the missing-value rule uses the other sites")
        dropped = plan["dropped"]
        self.candidates = [f for f in self.candidates if f not in dropped]
        if volume in dropped:
            self.volume = None
            self.results["volume"] = {"column": None, "reason": f"the volume column {volume} was dropped: "
                                                                f"{dropped[volume]} (above [selection] max_missing)"}
        if dropped:
            self.log(f"missing values: {len(dropped)} feature(s) dropped (missing in more than {share:.0%} of a "
                     f"site's patients), e.g. {', '.join(list(dropped)[:3])}")
        if not self.candidates:
            raise StudyError(f"every candidate feature is missing in more than {share:.0%} of some site's patients "
                             f"(e.g. {'; '.join(f'{f}: {w}' for f, w in list(dropped.items())[:3])}); raise "
                             "[selection] max_missing or fix the sites' tables")
        self.impute = {fold: fold_values(self.raw_moments, spec["train"], plan["impute"])
                       for fold, spec in self.folds.items()} if plan["impute"] else {}
        if plan["impute"]:
            self.log(f"missing values: {sum(plan['cells'].values())} cell(s) of {len(plan['impute'])} feature(s) "
                     "imputed per fold with the training sites' mean")
        self.results["missing"] = {"max_missing": share, "dropped": dropped, "imputed": plan["impute"],
                                   "cells": plan["cells"], "n_cells": int(sum(plan["cells"].values())),
                                   "n_features": len(feats)}
        self.results["n_candidate_features"] = len(self.candidates)

    def harmonize(self) -> None:
        harm = self.cfg["harmonization"]
        impute = getattr(self, "impute", {})
        if not harm["enabled"] and not impute:
            self.tables = {f: "raw" for f in self.folds}
            self._site_effect(None, "harmonization is disabled in study.toml: no harmonized table")
            return
        t0, r0 = time.monotonic(), self.fed.rounds
        self.tables = {f: f"h-{f}" for f in self.folds}
        if not harm["enabled"]:  # imputation only: one round makes each fold's imputed table (and the score tests)
            replies = self.fed.ask("study_harmonize", {"references": {f: None for f in self.folds},
                                                       "impute": impute, "selection": self._score_specs()},
                                   phase="imputation")
            self.scores = {s: r["selection"] for s, r in replies.items()}
            self._site_effect(None, "harmonization is disabled in study.toml: no harmonized table")
            self._phase("imputation", t0, r0)
            return
        passes = combat_passes(harm, getattr(self, "smooth_knots", None))
        chains: dict[str, list] = {f: [] for f in self.folds}   # per fold, the fitted reference of each pass
        stats: dict = {}
        held: dict[str, set] = {}  # per site, the batch labels it reported (in any pass)

        def down(ref, s):  # batch-level estimates (shared batches, CovBat) only for the site holding the batch
            return ref.for_site(held[s]) if ref.posterior_gamma is not None else ref.to_dict()
        for step, opts in enumerate(passes):  # nested ComBat: one statistics round per batch column
            request = make_request(self.candidates, list(harm["covariates"]), list(harm["categorical"]), **opts)
            ask = {"request": request, "table": "raw", **({"pass": step} if step else {})}
            if impute:  # ComBat runs on each fold's imputed table: statistics per fold the site trains in
                ask["impute"] = impute
            per_fold = bool(impute) or step > 0
            if step:
                per_site = {s: {**ask, "previous": {f: [down(r, s) for r in c] for f, c in chains.items()}}
                            for s in stats}
                stats = self.fed.ask("combat_stats", per_site=per_site, phase="harmonization")
            else:
                stats = self.fed.ask("combat_stats", ask, phase="harmonization")
            for s, st in stats.items():
                held.setdefault(s, set()).update(site_batch_labels_of(st["stats"], per_fold))
            for fold, spec in self.folds.items():
                chains[fold].append(combine_combat_stats(
                    [stats[s]["stats"][fold] if per_fold else stats[s]["stats"] for s in spec["train"]], request))
        fitted = {f: c[-1] for f, c in chains.items()}
        refs = {f: r.to_dict() for f, r in fitted.items()}
        self.excluded = {f: set((refs[f].get("excluded_features") or {})) for f in refs}
        # the sites compute the selection's score tests on the tables they just harmonized (same round trip)
        ask = {"references": refs, "selection": self._score_specs(),
               "moments": {"fold": "final", "features": self.candidates}}
        if impute:
            ask["impute"] = impute
        nested = len(passes) > 1
        if nested or any(r.posterior_gamma is not None for r in fitted.values()):
            # batch-level estimates go only to the site holding the batch; nested ComBat sends each fold's chain
            per_site = {s: {**ask, "references": {f: ([down(r, s) for r in chains[f]] if nested else down(fitted[f], s))
                                                  for f in fitted}} for s in stats}
            replies = self.fed.ask("study_harmonize", per_site=per_site, phase="harmonization")
        else:
            replies = self.fed.ask("study_harmonize", ask, phase="harmonization")
        self.scores = {s: r["selection"] for s, r in replies.items()}
        self._site_effect({s: r["moments"] for s, r in replies.items()}, None)
        self.results["harmonization"] = {f: {"excluded_features": refs[f].get("excluded_features") or {},
                                             "batch_sizes": refs[f].get("batch_sizes"),
                                             **({"covbat_n_pc": refs[f]["covbat"]["n_pc"],
                                                 "covbat_explained": float(sum(refs[f]["covbat"]["explained"]))}
                                                if refs[f].get("covbat") else {})} for f in refs}
        self.results["harmonization_method"] = harmonization_method(harm)
        self._phase("harmonization", t0, r0)

    def _site_effect(self, after: dict | None, reason: str | None) -> None:
        """Site effect per feature before / after ComBat (final fold: every site) from the sites' moments."""
        self.harmonized_moments = after
        summary = harmonization_summary(self.raw_moments, after, self.candidates, fdr=0.05)
        summary["after_reason"] = reason
        self.results["site_effect"] = summary

    def _keep_feature_moments(self, n_top: int = 6) -> None:
        """Per-site moments (n, mean, SD) of the final signature and the ``n_top`` features with the largest site
        effect before harmonization, for the report's per-site plots (aggregates only)."""
        eff = self.results["site_effect"]["before"]
        ranked = [f for f, v in sorted(((f, v) for f, v in zip(eff["features"], eff["f"]) if v is not None),
                                       key=lambda fv: -fv[1])]
        feats = list(dict.fromkeys(list(self.signatures["final"]) + ranked[:n_top]))

        def subset(moments: dict | None) -> dict | None:
            if moments is None:
                return None
            out = {}
            for s, m in moments.items():
                pos = {f: j for j, f in enumerate(m["features"])}
                out[s] = {"n": [m["n"][pos[f]] if f in pos else 0 for f in feats],
                          "mean": [m["mean"][pos[f]] if f in pos else None for f in feats],
                          "sd": [(m["var"][pos[f]] ** 0.5 if f in pos and m["var"][pos[f]] is not None else None)
                                 for f in feats]}
            return out

        self.results["feature_moments"] = {"features": feats, "signature": list(self.signatures["final"]),
                                           "largest_site_effect": ranked[:n_top],
                                           "before": subset(self.raw_moments),
                                           "after": subset(getattr(self, "harmonized_moments", None))}

    def _score_request(self, feats: list[str]) -> dict:
        return self.kind.score_request(feats)

    def _fold_score_features(self, fold: str) -> list[str]:
        excluded = getattr(self, "excluded", {})
        return [f for f in self.candidates if f not in excluded.get(fold, set())]

    def _path_features(self, fold: str) -> list[str]:
        """Model features (volume, clinical) the fold's candidate score tests do not cover, when the study uses
        the data-driven penalty path."""
        if self.cfg["model"].get("grid") is not None:
            return []
        scored = set(self._fold_score_features(fold))
        wanted = ([self.volume] if self.volume else []) + list(self.cfg["model"]["clinical"])
        return [f for f in dict.fromkeys(wanted) if f not in scored]

    def _penalty_paths(self) -> dict[str, dict[str, list[float]]]:
        """Per fold and model kind: the penalty values in task order (strongest first) — the plan's fixed grid,
        or the data-driven path from the training sites' gradient at zero (:func:`penalty_path`)."""
        mcfg = self.cfg["model"]
        if mcfg.get("grid") is not None:
            grid = grid_strong_to_weak(self.endpoint, [float(g) for g in mcfg["grid"]])
            return {fold: {kind: list(grid) for kind in kinds} for fold, kinds in self.model_features.items()}
        size, decades = path_shape(self.cfg)
        paths: dict[str, dict[str, list[float]]] = {}
        for fold, kinds in self.model_features.items():
            train = self.folds[fold]["train"]
            z, n = standardized_scores([self.scores[s][fold]["score"] for s in train])
            if fold in getattr(self, "path_scores", {}):
                z.update(standardized_scores(self.path_scores[fold])[0])
            paths[fold] = {}
            for kind, feats in kinds.items():
                top = max(z[f] for f in feats)
                paths[fold][kind] = penalty_path(top, n, self.kind.model, mcfg["penalty"], float(mcfg["l1_ratio"]), size,
                                                 decades)
        return paths

    def _score_specs(self) -> dict:
        """Per fold: the univariate score-test request over the fold's candidate features."""
        specs = {}
        for fold, spec in self.folds.items():
            feats = self._fold_score_features(fold)
            requests = {"score": self._score_request(feats)}
            leak = self.kind.concordance_request(feats)
            if leak is not None:  # the leakage screen's concordance counts ride with the score tests
                requests["leak"] = leak
            if self.cfg["selection"]["icc_threshold"] is not None:
                requests["icc"] = icc_request(feats)
            specs[fold] = {"train_sites": spec["train"], "table": self.tables[fold], "requests": requests}
        return specs

    def select(self) -> None:
        """Score tests (already collected with harmonization, else one round) -> FDR screen per fold ->
        correlations among each fold's candidates only (one round) -> redundancy filter and size cap."""
        t0, r0 = time.monotonic(), self.fed.rounds
        sel = self.cfg["selection"]
        if not hasattr(self, "scores"):
            replies = self.fed.ask("study_select", {"folds": self._score_specs()}, phase="selection")
            self.scores = {s: r["folds"] for s, r in replies.items()}
        screens, specs, leaks = {}, {}, {}
        for fold, spec in self.folds.items():
            combined = combine_batch([self.scores[s][fold] for s in spec["train"]], stratified=True)
            score, leaks[fold] = withhold_leaks(combined["score"], self.kind.leak_strength(combined,
                                                                                           combined["score"]),
                                                correlation=self.kind.leak_is_correlation,
                                                allow=sel.get("allow") or [])
            screens[fold] = screen_candidates(score, fdr=float(sel["fdr"]),
                                              max_features=int(sel["max_features"]), icc=combined.get("icc"),
                                              icc_threshold=sel["icc_threshold"])
            specs[fold] = {"train_sites": spec["train"], "table": self.tables[fold],
                           "requests": {"corr": correlation_request(screens[fold]["candidates"])}}
            extra = self._path_features(fold)
            if extra:  # the penalty path's gradient at zero of the volume and clinical models (same round)
                specs[fold]["requests"]["path"] = self._score_request(extra)
        replies = self.fed.ask("study_select", {"folds": specs}, phase="selection")
        self.signatures, report = {}, {}
        self.path_scores = {fold: [replies[s]["folds"][fold]["path"] for s in spec["train"]]
                            for fold, spec in self.folds.items() if "path" in specs[fold]["requests"]}
        for fold, spec in self.folds.items():
            corr = combine_batch([{"corr": replies[s]["folds"][fold]["corr"]} for s in spec["train"]])["corr"]
            chosen = finish_signature(screens[fold], corr, redundancy=float(sel["redundancy"]),
                                      max_features=int(sel["max_features"]))
            self.signatures[fold] = chosen["selected"]
            report[fold] = chosen
        self.results["selection"] = report
        self._report_leaks(leaks)
        self._keep_feature_moments()
        self._phase("selection", t0, r0)

    def _report_leaks(self, leaks: dict) -> None:
        """Name every feature the leakage screen withheld, with its most extreme strength over the folds."""
        worst: dict[str, float] = {}
        for values in leaks.values():
            for f, v in values.items():
                if f not in worst or abs(v - 0.5) > abs(worst[f] - 0.5):
                    worst[f] = v
        measure = self.kind.leak_measure
        self.results["leakage"] = {"measure": measure, "withheld": dict(sorted(worst.items())),
                                   "folds": {f: v for f, v in leaks.items() if v}}
        if worst:
            shown = ", ".join(f"{f} ({measure} {v:.3f})" for f, v in list(sorted(worst.items()))[:6])
            self.log(f"warning: probable leakage: {shown} predict the outcome almost perfectly on their own in the "
                     "training sites; withheld from the signatures (check the table; [selection] allow keeps one)")

    def fit_models(self) -> None:
        t0, r0 = time.monotonic(), self.fed.rounds
        mcfg, vcfg = self.cfg["model"], self.cfg["validation"]
        clinical = list(mcfg["clinical"])
        k, seed = int(vcfg["inner_folds"]), int(vcfg["seed"])
        volume = self.volume
        tasks: dict[str, FitTask] = {}
        self.model_features: dict[str, dict[str, list[str]]] = {}
        for fold in self.folds:
            self.model_features[fold] = {}
            for kind in MODEL_KINDS:
                feats = model_features(kind, self.signatures[fold], clinical, volume)
                if feats:
                    self.model_features[fold][kind] = feats
        self.paths = self._penalty_paths()
        for fold, spec in self.folds.items():
            for kind, feats in self.model_features[fold].items():
                for gi, g in enumerate(self.paths[fold][kind]):
                    for inner in [None, *range(k)]:
                        rows = None if inner is None else {"k": k, "seed": seed, "fold": inner, "keep": "train"}
                        tid = f"{fold}|{kind}|{gi}|{'all' if inner is None else inner}"
                        data = self.kind.data_spec(feats, self.tables[fold], rows)
                        if inner is None and self.horizon is not None:  # the training sites' baselines ride here
                            data["dca_horizon"] = self.horizon
                        tasks[tid] = FitTask(self.kind.make_fit(feats, mcfg["penalty"], g, float(mcfg["l1_ratio"])),
                                             data, sites=list(spec["train"]))
        self.log(f"models: {len(tasks)} fits (folds x models x penalties x inner folds) in shared round trips")
        self.fits = run_fits(self.fed, tasks, phase="models")
        self.fit_tasks = tasks
        self._phase("models", t0, r0)

    def evaluate(self) -> None:
        """One round: training sites send each inner fit's held-out loss (penalty choice) while held-out sites
        evaluate every penalty variant of their fold's models; the server then picks, per fold and model, the
        penalty with the smallest inner-CV loss and keeps that variant's metrics."""
        t0, r0 = time.monotonic(), self.fed.rounds
        k, seed = int(self.cfg["validation"]["inner_folds"]), int(self.cfg["validation"]["seed"])
        items, folds, baselines = [], {}, {}
        for tid, model in self.fits.items():
            fold, kind, gi, inner = tid.split("|")
            if inner == "all":
                folds.setdefault(fold, {"models": {}, "table": self.tables[fold],
                                        "eval_sites": self.folds[fold]["test"]})
                folds[fold]["models"].setdefault(kind, {})[gi] = model.to_dict()
                if self.horizon is not None:  # the training sites' combined baseline at the horizon
                    base = self.fit_tasks[tid].server.baseline()
                    folds[fold].setdefault("baselines", {}).setdefault(kind, {})[gi] = base and base["cumhaz"]
                    baselines.setdefault(fold, {}).setdefault(kind, {})[gi] = base and {
                        key: v for key, v in base.items() if key != "rule"}  # the rule: once, below
                continue
            items.append({"id": tid, "model": model.to_dict(), "table": self.tables[fold],
                          "rows": {"k": k, "seed": seed, "fold": int(inner)}, "sites": self.folds[fold]["train"]})
        replies = self.fed.ask("study_evaluate", {"endpoint": self.endpoint, "items": items, "folds": folds,
                                                  "km_times": self.cfg["validation"]["km_times"],
                                                  **({"dca_horizon": self.horizon} if self.horizon is not None
                                                     else {})},
                               phase="evaluation")
        totals: dict[tuple, dict] = {}
        for r in replies.values():
            for tid, loss in r["losses"].items():
                if loss is None:
                    continue
                fold, kind, gi, _ = tid.split("|")
                totals.setdefault((fold, kind), {}).setdefault(int(gi), 0.0)
                totals[(fold, kind)][int(gi)] += float(loss)
        self.chosen, self.chosen_index, penalties = {}, {}, {}
        for fold, kinds in self.model_features.items():
            self.chosen[fold], self.chosen_index[fold] = {}, {}
            for kind in kinds:
                grid = self.paths[fold][kind]
                losses = totals.get((fold, kind)) or {0: 0.0}
                gi = choose_penalty({i: losses.get(i, float("inf")) for i in range(len(grid))})
                self.chosen[fold][kind] = self.fits[f"{fold}|{kind}|{gi}|all"]
                self.chosen_index[fold][kind] = gi
                penalties.setdefault(fold, {})[kind] = penalty_choice(grid, gi, [losses.get(i) for i in
                                                                                 range(len(grid))])
        self.results["penalties"] = penalties
        self.results["penalty_mode"] = ("grid" if self.cfg["model"].get("grid") is not None else
                                        dict(zip(("path_size", "path_decades"), path_shape(self.cfg))))
        edges = [f"{fold} {kind} ({p['edge']})" for fold, kinds in penalties.items() for kind, p in kinds.items()
                 if p["edge"]]
        if edges:
            self.log(f"penalty: the inner CV chose an end of the {'grid' if self.results['penalty_mode'] == 'grid' else 'path'} "
                     f"in {len(edges)} of {sum(len(k) for k in penalties.values())} fold/model pairs "
                     f"(e.g. {', '.join(edges[:3])}); widen [model] grid or path_decades")
        external, apparent = {}, {}
        for s in self.sites:
            got = replies[s]["folds"]
            if f"loso:{s}" in got:
                external[s] = pick_variants(got[f"loso:{s}"], self.chosen_index[f"loso:{s}"])
            apparent[s] = pick_variants(got["final"], self.chosen_index["final"])
        self.results["external"] = external
        self.results["apparent"] = apparent
        self.results["pooled"] = pool_metrics(self.endpoint, external) if external else {}
        if self.horizon is not None:  # what the survival decision curves rest on (report)
            from fedrad.common.cox import BASELINE_RULE

            self.results["decision_baseline"] = {
                "horizon": self.horizon, "rule": BASELINE_RULE,
                "folds": {fold: {kind: baselines.get(fold, {}).get(kind, {}).get(str(gi))
                                 for kind, gi in idx.items()} for fold, idx in self.chosen_index.items()}}
        self.results["final_models"] = {kind: {"features": self.model_features["final"][kind],
                                               "params": m.to_dict()} for kind, m in self.chosen["final"].items()}
        self.results["signature"] = self.signatures["final"]
        self._phase("evaluation", t0, r0)

    def phases(self) -> list:
        """The phases in order (an association study has its own)."""
        return [self.prepare, self.harmonize, self.select, self.fit_models, self.evaluate]

    def run(self) -> dict:
        """All phases. A site that fails or stops answering is marked missing and the study restarts from the
        first phase without it (aggregates of different rounds or site sets are never mixed), as long as at least
        ``[study] min_sites`` sites remain; otherwise it stops with the reason."""
        t0 = time.monotonic()
        missing: dict[str, str] = {}
        min_sites = int(self.cfg["study"]["min_sites"])
        while True:
            try:
                for phase in self.phases():
                    phase()
                break
            except SiteError as exc:
                missing.update(exc.failures)
                self.fed.excluded |= set(exc.failures)
                known = getattr(self, "sites", None)
                n_left = (len([s for s in known if s not in missing]) if known is not None
                          else len(self.fed.node_ids()) - len(missing))
                if n_left < min_sites:
                    raise SiteError(exc.request, {**missing, "study": f"quorum lost: {n_left} sites left, "
                                                                       f"[study] min_sites = {min_sites}"}) from exc
                for site, reason in exc.failures.items():
                    self.log(f"site {site} lost: {reason}")
                self.log(f"site(s) {', '.join(exc.failures)} failed during {exc.request}; restarting the study "
                         f"with the {n_left} remaining sites")
                for attr in ("scores", "excluded", "sites", "impute"):
                    self.__dict__.pop(attr, None)
                self.results = {"study": self.results["study"], "endpoint": self.endpoint, "phases": [],
                                "plan_id": self.plan_id}
        self.results["missing_sites"] = missing
        self.results["round_trips"] = self.fed.rounds
        self.results["seconds"] = round(time.monotonic() - t0, 2)
        self.results["rounds"] = [dict(r) for r in self.fed.history]  # which sites answered each round trip
        self.results.setdefault("provenance", {}).update(coordinator_provenance(self.cfg))
        return self.results


def make_study(fed: Federation, cfg: dict, log=None) -> "Study":
    """The study a configuration describes: a prediction study, or an association study
    (:class:`fedrad.server.association.AssociationStudy`)."""
    from fedrad.common.plan import is_association

    if is_association(cfg):
        from fedrad.server.association import AssociationStudy

        return AssociationStudy(fed, cfg, log=log)
    return Study(fed, cfg, log=log)


def coordinator_provenance(cfg: dict) -> dict:
    """The coordinator's software versions, the study configuration and the finishing time (UTC)."""
    import datetime

    return {"coordinator": software_versions(("fedrad", "flwr", "pyradiomics", "numpy", "scipy")),
            "config": to_plain(cfg),
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def pool_metrics(endpoint: dict, per_site: dict[str, dict]) -> dict:
    """Random-effects meta-analysis of the sites' metrics and pooled curves from their binned counts."""
    pooled: dict = {}
    ep = endpoints.of(endpoint)
    kinds = [k for k in MODEL_KINDS if all(k in m for m in per_site.values())]
    for kind in kinds:
        vals, ses = zip(*(ep.headline(m[kind]) for m in per_site.values()))
        entry = ep.pool_headline(list(vals), list(ses), list(per_site.values()), kind)
        entry.update(ep.pool_curves(kind, list(per_site.values())))
        pooled[kind] = to_plain(entry)
    pooled["subgroups"] = to_plain(pool_subgroups(ep, per_site, kinds))
    pooled["paired"] = to_plain(pool_paired(per_site))
    return pooled


def pool_paired(per_site: dict[str, dict]) -> dict:
    """Per model pair (``radiomics-volume``, ...): the held-out sites' paired differences pooled by random effects
    (DerSimonian-Laird on the difference scale), from the sites where the difference has a standard error."""
    from fedrad.common.metrics import dersimonian_laird
    from fedrad.common.pipeline import PAIRS

    out = {}
    for a, b in PAIRS:
        pair = f"{a}-{b}"
        have = [(m["paired"][pair]["diff"], m["paired"][pair]["se"]) for m in per_site.values()
                if (m.get("paired") or {}).get(pair, {}).get("se") not in (None, 0)
                and m["paired"][pair].get("diff") is not None]
        if have:
            diffs, ses = zip(*have)
            out[pair] = dersimonian_laird(list(diffs), list(ses))
    return out


def pool_subgroups(ep, per_site: dict[str, dict], kinds: list[str]) -> dict:
    """Per subgroup column and level: the held-out sites that released it and each model's headline statistic
    pooled over them (random effects, as the whole-site estimate)."""
    out: dict = {}
    cols = list(dict.fromkeys(c for m in per_site.values() for c in (m.get("subgroups") or {})))
    for col in cols:
        levels = list(dict.fromkeys(lv for m in per_site.values() for lv in (m.get("subgroups") or {}).get(col, {})))
        out[col] = {}
        for level in levels:
            entries = [m["subgroups"][col][level] for m in per_site.values()
                       if (m.get("subgroups") or {}).get(col, {}).get(level, {}).get("n")]
            entry = {"sites": len(entries), "n": sum(e["n"] for e in entries)}
            for kind in kinds:
                have = [e for e in entries if kind in e]
                if have:
                    vals, ses = zip(*(ep.headline(e[kind]) for e in have))
                    entry[kind] = ep.pool_headline(list(vals), list(ses), have, kind)
            out[col][level] = entry
    return out
