"""Reporting checklists filled from a study's results: TRIPOD+AI and the METRICS score.

* **TRIPOD+AI** (Collins GS et al., BMJ 2024;385:e078378; it replaces TRIPOD 2015): the 27 items of the main
  checklist with their parts (1 … 27c), and the 13 items of "TRIPOD+AI for Abstracts". The topics below are
  short paraphrases of the items (the statement's own wording is at www.tripod-statement.org). Each item gets a
  status from the run — reported here, partly here, authors to report, not applicable — and what the run shows.
* **METRICS** (METhodological RadiomICs Score; Kocak B et al., Insights Imaging 2024;15:8, Table 1 and Fig. 3;
  explanations in the METRICS-E3 project, radiomic.github.io/METRICS-E3): 30 yes/no items in 9 categories with
  the Delphi panel's weights (they add up to 1), 5 conditions that make items inapplicable, and the score: the
  weights of the items answered "yes" over the weights of the applicable items, as a percentage ("the exclusion
  of this item from scoring will not affect the final score on the percentage scale"), with the paper's quality
  bands (very low < 20 %, low < 40 %, moderate < 60 %, good < 80 %, excellent). The online tool answers "No" to
  every item and condition by default; the report scores the items the run cannot decide that way (a lower
  bound) and, beside it, as if the authors could answer every one of them "yes" (an upper bound).

Everything here is pure: a function of results.json, with no figure and no HTML.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from fedrad.common import endpoints

REPORTED, PARTLY, AUTHORS, NOT_APPLICABLE = "reported here", "partly here", "authors to report", "not applicable"
STATUSES = (REPORTED, PARTLY, AUTHORS, NOT_APPLICABLE)
NA = "–"

# ----------------------------------------------------------------------------------------------
# TRIPOD+AI
# ----------------------------------------------------------------------------------------------
#: (item, section, topic) of the TRIPOD+AI checklist, in its order (Collins et al. 2024, Table 1)
TRIPOD_AI_ITEMS: tuple[tuple[str, str, str], ...] = (
    ("1", "Title", "Title: a prediction model developed or evaluated, its population and outcome"),
    ("2", "Abstract", "Abstract (TRIPOD+AI for Abstracts)"),
    ("3a", "Introduction", "Background: healthcare context and rationale, existing models"),
    ("3b", "Introduction", "Target population, intended purpose in the care pathway, intended users"),
    ("3c", "Introduction", "Known health inequalities between sociodemographic groups"),
    ("4", "Introduction", "Objectives: development, evaluation or both"),
    ("5a", "Methods", "Data sources for development and evaluation, rationale, representativeness"),
    ("5b", "Methods", "Dates of accrual and end of follow-up"),
    ("6a", "Methods", "Setting, number and location of centres"),
    ("6b", "Methods", "Eligibility criteria"),
    ("6c", "Methods", "Treatments received and how they were handled"),
    ("7", "Methods", "Data preparation: pre-processing and quality checks, across groups"),
    ("8a", "Methods", "Outcome and time horizon: definition, how and when assessed"),
    ("8b", "Methods", "Outcome assessors' qualifications, if assessment is subjective"),
    ("8c", "Methods", "Blinding of outcome assessment"),
    ("9a", "Methods", "Choice of initial predictors and any pre-selection"),
    ("9b", "Methods", "Definition and measurement of every predictor"),
    ("9c", "Methods", "Predictor assessors' qualifications, if measurement is subjective"),
    ("10", "Methods", "Sample size: how it was arrived at and why it suffices"),
    ("11", "Methods", "Missing data: how handled, reasons for omitting data"),
    ("12a", "Methods", "How the data were used for development and evaluation (partitioning)"),
    ("12b", "Methods", "Handling of predictors (functional form, rescaling, standardisation)"),
    ("12c", "Methods", "Model type, rationale, building steps, hyperparameter tuning, internal validation"),
    ("12d", "Methods", "Heterogeneity of estimates and performance across clusters (centres)"),
    ("12e", "Methods", "Performance measures and plots, and model comparisons"),
    ("12f", "Methods", "Model updating (e.g. recalibration)"),
    ("12g", "Methods", "How predictions were calculated in the evaluation"),
    ("13", "Methods", "Class imbalance methods, if used"),
    ("14", "Methods", "Approaches to model fairness"),
    ("15", "Methods", "Model output (probabilities, classes) and any thresholds"),
    ("16", "Methods", "Differences between development and evaluation data"),
    ("17", "Methods", "Ethical approval and consent"),
    ("18a", "Open science", "Funding"),
    ("18b", "Open science", "Conflicts of interest"),
    ("18c", "Open science", "Protocol"),
    ("18d", "Open science", "Registration"),
    ("18e", "Open science", "Data sharing"),
    ("18f", "Open science", "Code sharing"),
    ("19", "Patient and public involvement", "Patient and public involvement"),
    ("20a", "Results", "Participant flow, with and without the outcome, follow-up"),
    ("20b", "Results", "Characteristics overall and per data source or setting"),
    ("20c", "Results", "Evaluation data compared with development data"),
    ("21", "Results", "Participants and outcome events in each analysis"),
    ("22", "Results", "Full model specification, for predictions in new individuals"),
    ("23a", "Results", "Model performance with confidence intervals, also in key subgroups"),
    ("23b", "Results", "Heterogeneity of performance across clusters"),
    ("24", "Results", "Model updating results"),
    ("25", "Discussion", "Interpretation, including fairness"),
    ("26", "Discussion", "Limitations"),
    ("27a", "Discussion", "Handling poor-quality or unavailable input data in use"),
    ("27b", "Discussion", "User interaction and expertise required"),
    ("27c", "Discussion", "Next steps: applicability and generalisability"),
)

#: (item, topic) of the 13 items of TRIPOD+AI for Abstracts (Collins et al. 2024), topics paraphrased
TRIPOD_AI_ABSTRACT: tuple[tuple[str, str], ...] = (
    ("1", "Title"),
    ("2", "Background"),
    ("3", "Objectives"),
    ("4", "Methods: data sources"),
    ("5", "Methods: participants and setting"),
    ("6", "Methods: outcome and time horizon"),
    ("7", "Methods: model type, building steps, internal validation"),
    ("8", "Methods: performance measures"),
    ("9", "Results: participants and outcome events"),
    ("10", "Results: predictors in the final model"),
    ("11", "Results: model performance with confidence intervals"),
    ("12", "Discussion: interpretation"),
    ("13", "Registration"),
)


def _cfg(results: Mapping) -> dict:
    return dict((results.get("provenance") or {}).get("config") or {})


def _pct(x) -> str:
    return f"{100 * float(x):.0f}%"


@dataclass(frozen=True)
class _Facts:
    """What the checklists ask of a run, read once from results.json."""

    kind: endpoints.Endpoint
    n: int
    n_sites: int
    sites: tuple[str, ...]
    events: str
    n_candidates: object
    signature: tuple[str, ...]
    clinical: tuple[str, ...]
    loso: bool
    n_external: int
    missing_sites: dict
    harmonization: str
    covariates: tuple[str, ...]
    inner_folds: object
    penalty: str
    icc: object
    redundancy: object
    extracted: bool
    params_hash: str | None
    params_file: str | None
    fedrad_version: str | None
    subgroups: tuple[str, ...]
    i2: float | None
    pi: tuple[float, float] | None
    imbalanced: tuple[str, ...]
    dca: bool
    calibration: bool
    any_excluded: bool
    min_events_per_feature: float | None


def facts(results: Mapping) -> _Facts:
    cfg = _cfg(results)
    info = results.get("sites") or {}
    kind = endpoints.of(results["endpoint"])
    events = [v.get("n_events") for v in info.values()]
    ev_txt = str(sum(events)) if all(e is not None for e in events) else "≥ " + str(sum(e for e in events if e))
    model = cfg.get("model") or {}
    harm = cfg.get("harmonization") or {}
    sel = cfg.get("selection") or {}
    val = cfg.get("validation") or {}
    prov = results.get("provenance") or {}
    head = ((results.get("pooled") or {}).get("radiomics") or {})
    i2 = head.get("i2")
    pi = (head.get("pi_low"), head.get("pi_high"))
    subgroups = tuple(((results.get("pooled") or {}).get("subgroups") or {}).keys())
    external = results.get("external") or {}
    calibration = kind.calibrated and any(
        ((m.get("radiomics") or {}).get("calibration") or {}).get("slope") is not None for m in external.values())
    dca = any(v is not None for v in ((head.get("decision_curve") or {}).get("net_benefit") or []))
    signature = tuple(results.get("signature") or ())
    # events per selected feature: the smaller outcome class of a response, the events of a survival outcome,
    # the patients of a continuous one (the usual "10 per variable" reading of the final model's size)
    epf = None
    if signature:
        if kind.type == "response":
            pos = [v.get("n_events") for v in info.values()]
            neg = [v.get("n_nonevents") for v in info.values()]
            if all(x is not None for x in pos + neg):
                epf = min(sum(pos), sum(neg)) / len(signature)
        elif kind.type == "survival":
            if all(e is not None for e in events):
                epf = sum(events) / len(signature)
        else:
            epf = sum(int(v.get("n") or 0) for v in info.values()) / len(signature)
    return _Facts(
        kind=kind, n=sum(int(v.get("n") or 0) for v in info.values()), n_sites=len(info), sites=tuple(sorted(info)),
        events=ev_txt, n_candidates=results.get("n_candidate_features", NA), signature=signature,
        clinical=tuple(model.get("clinical") or ()), loso=bool(external), n_external=len(external),
        missing_sites=dict(results.get("missing_sites") or {}),
        harmonization=(results.get("harmonization_method") or "ComBat") if harm.get("enabled", True) else "",
        covariates=tuple(harm.get("covariates") or ()), inner_folds=val.get("inner_folds", NA),
        penalty=str(model.get("penalty", "l2")), icc=sel.get("icc_threshold"), redundancy=sel.get("redundancy"),
        extracted=any((v or {}).get("extraction") for v in info.values()) or bool(prov.get("params_hash")),
        params_hash=prov.get("params_hash"), params_file=(prov.get("params") or {}).get("file"),
        fedrad_version=(prov.get("coordinator") or {}).get("fedrad"),
        subgroups=subgroups, i2=None if i2 is None else float(i2),
        pi=None if None in pi else (float(pi[0]), float(pi[1])),
        imbalanced=tuple((results.get("covariate_balance") or {}).get("unmodelled_imbalanced") or ()),
        dca=dca, calibration=calibration,
        any_excluded=any(v.get("n_dropped_incomplete") != 0 for v in info.values()),
        min_events_per_feature=epf)


def _range(lo: float, hi: float) -> str:
    """"lo–hi", or "lo to hi" when a bound is negative (an en dash between negative numbers reads as a minus)."""
    a, b = f"{lo:.2f}", f"{hi:.2f}"
    return f"{a} to {b}" if a.startswith("-") or b.startswith("-") else f"{a}–{b}"


def _heterogeneity_words(f: _Facts) -> str:
    if f.i2 is None:
        return "random-effects pooling over the held-out sites (too few sites for I²)"
    pi = f" (95% prediction interval {_range(f.pi[0], f.pi[1])})" if f.pi else ""
    return (f"signature's {f.kind.metric_label} pooled by random effects over {f.n_external} held-out sites: "
            f"I² {_pct(f.i2)}{pi}; per-site forest plot in Validation")


def tripod_ai_items(results: Mapping, missing_data: str = "") -> list[tuple[str, str, str, str]]:
    """``(item, topic, status, from this study)`` for every part of the TRIPOD+AI checklist, in its order.

    ``missing_data`` is the report's own sentence for item 11 (the complete-case and feature rules with counts)."""
    f = facts(results)
    k = f.kind
    outcome = k.describe()
    epw = (f"; {f.events} {k.events_word}" if k.events_word else "")
    harm = (f"harmonization by {f.harmonization} (covariates {', '.join(f.covariates) or 'none'}), fitted inside "
            "every validation fold" if f.harmonization else "no harmonization")
    sub = (f"{k.metric_label} per level of {', '.join(f.subgroups)} at every held-out site, pooled (Validation); "
           "levels under the sites' minimum cell size withheld" if f.subgroups else "")
    site_list = ", ".join(f.sites)
    lost = "; ".join(f"{s} ({r})" for s, r in f.missing_sites.items())
    n_sig = len(f.signature)
    status = {
        "1": (AUTHORS, "identify a radiomic prediction model developed and externally validated across "
                       f"{f.n_sites} centres, its population and {outcome}"),
        "2": (AUTHORS, "see the TRIPOD+AI for Abstracts table below; the headline gives the pooled estimates"),
        "3a": (AUTHORS, ""),
        "3b": (PARTLY, f"patients of the {f.n_sites} participating centres; intended use and users: authors"),
        "3c": (AUTHORS, ""),
        "4": (REPORTED if f.loso else PARTLY,
              f"develop a radiomic model of {outcome} and evaluate it at every centre left out "
              "(leave-one-site-out)" if f.loso else f"develop a radiomic model of {outcome}"),
        "5a": (PARTLY, f"{f.n_sites} centres, each keeping its data (federated analysis: aggregates only); "
                       "representativeness: authors"),
        "5b": (AUTHORS, "accrual and follow-up dates"),
        "6a": (PARTLY, f"{f.n_sites} centres: {site_list} (see Cohort); care setting: authors"),
        "6b": (PARTLY, "complete outcome, clinical and covariate data (Cohort); other criteria: authors"),
        "6c": (AUTHORS, ""),
        "7": (REPORTED, (f"features extracted at each site with pyradiomics, parameter file "
                         f"{f.params_file or 'hash ' + f.params_hash[:12] + '…'} (Provenance); "
                         if f.params_hash else
                         "feature tables supplied by the sites (extraction settings: authors); ")
              + f"{harm}; site effect before and after per feature (Harmonization)"),
        "8a": (REPORTED, outcome),
        "8b": (AUTHORS, ""),
        "8c": (AUTHORS, ""),
        "9a": (REPORTED, f"{f.n_candidates} candidate radiomic features"
                         + (f", of which those with ICC < {f.icc} under perturbation removed" if f.icc is not None
                            else "")
                         + f"; clinical: {', '.join(f.clinical) or 'none'}; tumour volume as a baseline"),
        "9b": (REPORTED if f.extracted else PARTLY,
               "pyradiomics feature definitions (IBSI-aligned) and the study's parameter file (Provenance)"
               if f.extracted else "feature names from the sites' tables; their extraction: authors"),
        "9c": (AUTHORS, "who segmented the lesions, blinded to the outcome?"),
        "10": (PARTLY, f"{f.n} patients{epw}, {f.n_candidates} candidate features, {n_sig} selected; "
                       "justification: authors"),
        "11": (REPORTED, missing_data or ("patients with missing data excluded (complete case, Cohort)"
                                          if f.any_excluded else "no patient excluded for missing data")),
        "12a": (REPORTED, "leave-one-site-out: each centre in turn held out, harmonization, selection and model "
                          f"fitted on the others; penalty by {f.inner_folds}-fold inner cross-validation within "
                          "the training sites" if f.loso else
                "all sites used for development; no held-out evaluation"),
        "12b": (REPORTED, f"{harm}; features standardized with the training sites' pooled mean and SD"),
        "12c": (REPORTED, f"{k.model_words} ({f.penalty}); selection by score test + BH-FDR, redundancy filter"
                          + (f" (|r| > {f.redundancy})" if f.redundancy is not None else "")
                          + f"; penalty by {f.inner_folds}-fold federated inner cross-validation"),
        "12d": (REPORTED if f.loso else NOT_APPLICABLE,
                "random-effects (DerSimonian-Laird) pooling of the held-out sites' estimates with I², τ² and "
                "prediction intervals; site-stratified fitting" if f.loso else "single development set"),
        "12e": (REPORTED, k.performance_words + ("; decision curves (net benefit against treat-all / treat-none)"
                                                 if f.dca else "")
                + "; paired comparison with tumour volume and clinical models"),
        "12f": (NOT_APPLICABLE, "no recalibration or updating"),
        "12g": (REPORTED if f.loso else NOT_APPLICABLE,
                "the held-out site harmonized against its fold's ComBat reference (unseen-site ComBat), then "
                "the fold's model coefficients applied at the site" if f.loso else ""),
        "13": (NOT_APPLICABLE, "no resampling or reweighting of outcome classes"),
        "14": (PARTLY if f.subgroups else AUTHORS,
               (sub + "; no fairness constraint in the fit") if f.subgroups else
               "no subgroup columns in the plan ([validation] subgroups)"),
        "15": (REPORTED, {"response": "predicted probability of the outcome; no classification threshold",
                          "survival": "linear predictor (relative risk); risk groups at the pre-specified training "
                                      "mean",
                          "continuous": "predicted value of the outcome"}.get(k.type, "")),
        "16": (REPORTED if f.loso else NOT_APPLICABLE,
               "each held-out site differs in centre and scanner; covariate balance across sites (standardized "
               "mean differences)" + (f", imbalanced and not modelled by ComBat: {', '.join(f.imbalanced)}"
                                      if f.imbalanced else "") if f.loso else ""),
        "17": (AUTHORS, ""),
        "18a": (AUTHORS, ""),
        "18b": (AUTHORS, ""),
        "18c": (AUTHORS, "the approved study plan (plan id in Provenance) can serve as the analysis protocol"),
        "18d": (AUTHORS, ""),
        "18e": (AUTHORS, "patient data stay at the sites; the aggregates are in results.json"),
        "18f": (PARTLY, f"fedrad {f.fedrad_version or ''} (open source, Apache-2.0) with the study configuration "
                        "in Provenance; where it is deposited: authors"),
        "19": (AUTHORS, ""),
        "20a": (PARTLY, f"{f.n_sites} sites analysed, {f.n} patients{epw}"
                        + (f"; missing: {lost}" if lost else "; no site lost") + "; exclusions per site in Cohort"),
        "20b": (REPORTED, "Cohort table, per site and overall"),
        "20c": (REPORTED if f.loso else NOT_APPLICABLE,
                "per-site columns of the Cohort table, covariate balance and site effects (Harmonization)"
                if f.loso else ""),
        "21": (REPORTED, "per site in the Cohort and Validation tables, per fold in results.json"),
        "22": (REPORTED if k.calibrated else PARTLY,
               "coefficients and intercept (Signature section) and the ComBat reference in results.json"
               if k.calibrated else "coefficients; baseline hazards are site-specific (stratified Cox)"),
        "23a": (REPORTED, "per site and pooled, with 95% CIs" + (f"; subgroups: {', '.join(f.subgroups)}"
                                                                   if f.subgroups else "")),
        "23b": (REPORTED if f.loso else NOT_APPLICABLE, _heterogeneity_words(f) if f.loso else ""),
        "24": (NOT_APPLICABLE, ""),
        "25": (PARTLY, "paired comparison with the volume and clinical baselines"
                       + ("; subgroup table for fairness" if f.subgroups else "") + "; interpretation: authors"),
        "26": (AUTHORS, "; ".join(x for x in (
            f"covariates imbalanced across sites: {', '.join(f.imbalanced)}" if f.imbalanced else "",
            f"sites lost: {lost}" if lost else "",
            "no absolute-risk calibration (site-stratified baselines)" if not k.calibrated else "") if x)),
        "27a": (PARTLY, "the site agent refuses unreadable or inconsistent cases one by one (fedrad site check); "
                        "missing feature values: the rule of item 11"),
        "27b": (AUTHORS, ""),
        "27c": (AUTHORS, ""),
    }
    out = []
    for item, _section, topic in TRIPOD_AI_ITEMS:
        st, what = status[item]
        out.append((item, topic, st, what))
    if f.missing_sites:
        out.append(("", "(missing sites)", REPORTED, lost))
    return out


def tripod_ai_abstract_items(results: Mapping, headline: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    """``(item, topic, status, from this study)`` for TRIPOD+AI for Abstracts."""
    f = facts(results)
    k = f.kind
    first = (headline or [""])[0]
    status = {
        "1": (AUTHORS, ""),
        "2": (AUTHORS, ""),
        "3": (PARTLY, "development and leave-one-site-out external validation" if f.loso else "development"),
        "4": (REPORTED, f"{f.n_sites} centres, federated (no patient row left a site)"),
        "5": (PARTLY, f"{f.n} patients at {', '.join(f.sites)}; eligibility: authors"),
        "6": (REPORTED, k.describe()),
        "7": (REPORTED, f"{k.model_words}, penalty by {f.inner_folds}-fold inner cross-validation"),
        "8": (REPORTED, k.performance_words),
        "9": (REPORTED, f"{f.n} patients" + (f", {f.events} {k.events_word}" if k.events_word else "")),
        "10": (REPORTED, f"{len(f.signature)} radiomic features: {', '.join(f.signature)}" if f.signature else ""),
        "11": (REPORTED, first),
        "12": (AUTHORS, ""),
        "13": (AUTHORS, ""),
    }
    return [(item, topic, *status[item]) for item, topic in TRIPOD_AI_ABSTRACT]


# ----------------------------------------------------------------------------------------------
# METRICS
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricsItem:
    number: int
    category: str
    title: str
    weight: float
    #: the condition(s) that make the item applicable (all must be "yes"; ``not5`` = condition 5 answered "no")
    conditions: tuple[str, ...] = ()


#: METRICS v1.0: items, categories and weights (Kocak et al. 2024, Table 1; the weights of the 30 items add to 1)
METRICS_ITEMS: tuple[MetricsItem, ...] = (
    MetricsItem(1, "Study design", "Adherence to radiomics and/or machine learning-specific checklists or "
                                   "guidelines", 0.0368),
    MetricsItem(2, "Study design", "Eligibility criteria that describe a representative study population", 0.0735),
    MetricsItem(3, "Study design", "High-quality reference standard with a clear definition", 0.0919),
    MetricsItem(4, "Imaging data", "Multi-center", 0.0438),
    MetricsItem(5, "Imaging data", "Clinical translatability of the imaging data source for radiomics analysis",
                0.0292),
    MetricsItem(6, "Imaging data", "Imaging protocol with acquisition parameters", 0.0438),
    MetricsItem(7, "Imaging data", "The interval between imaging used and reference standard", 0.0292),
    MetricsItem(8, "Segmentation", "Transparent description of segmentation methodology", 0.0337, ("c1",)),
    MetricsItem(9, "Segmentation", "Formal evaluation of fully automated segmentation", 0.0225, ("c1", "c2")),
    MetricsItem(10, "Segmentation", "Test set segmentation masks produced by a single reader or automated tool",
                0.0112, ("c1",)),
    MetricsItem(11, "Image processing and feature extraction", "Appropriate use of image preprocessing techniques "
                                                              "with transparent description", 0.0622),
    MetricsItem(12, "Image processing and feature extraction", "Use of standardized feature extraction software",
                0.0311, ("c3",)),
    MetricsItem(13, "Image processing and feature extraction", "Transparent reporting of feature extraction "
                                                              "parameters, otherwise a default configuration "
                                                              "statement", 0.0415),
    MetricsItem(14, "Feature processing", "Removal of non-robust features", 0.0200, ("c4",)),
    MetricsItem(15, "Feature processing", "Removal of redundant features", 0.0200, ("c4",)),
    MetricsItem(16, "Feature processing", "Appropriateness of dimensionality compared to data size", 0.0300, ("c4",)),
    MetricsItem(17, "Feature processing", "Robustness assessment of end-to-end deep learning pipelines", 0.0200,
                ("c5",)),
    MetricsItem(18, "Preparation for modeling", "Proper data partitioning process", 0.0599),
    MetricsItem(19, "Preparation for modeling", "Handling of confounding factors", 0.0300),
    MetricsItem(20, "Metrics and comparison", "Use of appropriate performance evaluation metrics for task", 0.0352),
    MetricsItem(21, "Metrics and comparison", "Consideration of uncertainty", 0.0234),
    MetricsItem(22, "Metrics and comparison", "Calibration assessment", 0.0176),
    MetricsItem(23, "Metrics and comparison", "Use of uni-parametric imaging or proof of its inferiority", 0.0117),
    MetricsItem(24, "Metrics and comparison", "Comparison with a non-radiomic approach or proof of added clinical "
                                              "value", 0.0293),
    MetricsItem(25, "Metrics and comparison", "Comparison with simple or classical statistical models", 0.0176),
    MetricsItem(26, "Testing", "Internal testing", 0.0375),
    MetricsItem(27, "Testing", "External testing", 0.0749),
    MetricsItem(28, "Open science", "Data availability", 0.0075),
    MetricsItem(29, "Open science", "Code availability", 0.0075),
    MetricsItem(30, "Open science", "Model availability", 0.0075),
)

#: the METRICS conditions (Kocak et al. 2024, Table 1 footnotes)
METRICS_CONDITIONS: dict[str, str] = {
    "c1": "Does the study include segmentation?",
    "c2": "Does the study include fully automated segmentation?",
    "c3": "Does the study include hand-crafted feature extraction?",
    "c4": "Does the study include tabular data?",
    "c5": "Does the study include end-to-end deep learning?",
}

#: the METRICS quality bands: (lower bound in %, label)
METRICS_BANDS: tuple[tuple[float, str], ...] = ((80.0, "excellent"), (60.0, "good"), (40.0, "moderate"),
                                                (20.0, "low"), (0.0, "very low"))


def metrics_band(score: float) -> str:
    for low, label in METRICS_BANDS:
        if score >= low:
            return label
    raise ValueError(f"a METRICS score is a percentage, got {score!r}")


def metrics_applicable(item: MetricsItem, conditions: Mapping[str, bool]) -> bool:
    return all(bool(conditions.get(c, False)) for c in item.conditions)


def metrics_score(answers: Mapping[int, bool], conditions: Mapping[str, bool]) -> dict:
    """The METRICS score: the weights of the applicable items answered "yes" over the weights of all applicable
    items, in percent. An item missing from ``answers`` is "no" and a condition missing from ``conditions`` is
    "no", as in the online tool. ``{"score", "band", "yes_weight", "applicable_weight", "applicable"}``."""
    unknown = sorted(set(answers) - {i.number for i in METRICS_ITEMS})
    if unknown:
        raise ValueError(f"METRICS has items 1-30; got item(s) {unknown}")
    bad = sorted(set(conditions) - set(METRICS_CONDITIONS))
    if bad:
        raise ValueError(f"METRICS conditions are {', '.join(METRICS_CONDITIONS)}; got {bad}")
    applicable = [i for i in METRICS_ITEMS if metrics_applicable(i, conditions)]
    total = sum(i.weight for i in applicable)
    yes = sum(i.weight for i in applicable if answers.get(i.number, False))
    score = 100.0 * yes / total
    return {"score": score, "band": metrics_band(score), "yes_weight": yes, "applicable_weight": total,
            "applicable": [i.number for i in applicable]}


YES, NO, AUTHORS_DECIDE, INAPPLICABLE = "yes", "no", "authors", "not applicable"


def metrics_conditions(results: Mapping) -> dict[str, bool | None]:
    """The conditions as the run knows them; ``None``: the authors decide (the tool's default is "no")."""
    return {"c1": True,       # a mask per case (or the sites' feature tables of segmented lesions)
            "c2": None,       # how the masks were drawn is not known to fedrad
            "c3": True,       # pyradiomics (or another extractor's) hand-crafted features
            "c4": True,       # a feature table at every site
            "c5": False}      # no end-to-end deep learning


def metrics_items(results: Mapping) -> list[tuple[MetricsItem, str, str]]:
    """``(item, answer, how)`` for the 30 METRICS items; ``answer`` is yes / no / authors / not applicable. The run
    answers only what it shows by itself; the rest is for the authors."""
    f = facts(results)
    k = f.kind
    cond = metrics_conditions(results)
    epf = f.min_events_per_feature
    basis = {"response": "outcome events in the smaller class", "survival": "events",
             "continuous": "patients"}.get(k.type, "patients")
    decided: dict[int, tuple[str, str]] = {
        4: (YES, f"{f.n_sites} centres") if f.n_sites > 1 else (NO, "a single centre"),
        11: ((YES, f"resampling, re-segmentation, discretization and normalization settings of {f.params_file} "
                   "(Provenance)") if f.params_file else
             (AUTHORS_DECIDE, "a site parameter file of the study's own (hash in Provenance): publish it")
             if f.params_hash else (AUTHORS_DECIDE, "feature tables supplied by the sites")),
        12: ((YES, "pyradiomics (IBSI-aligned; checked against the IBSI phantoms)") if f.extracted else
             (AUTHORS_DECIDE, "feature tables supplied by the sites")),
        13: ((YES, f"every setting of {f.params_file} in Provenance, hash checked identical at every site")
             if f.params_file else
             (AUTHORS_DECIDE, "a site parameter file of the study's own (hash in Provenance): publish it")
             if f.params_hash else (AUTHORS_DECIDE, "feature tables supplied by the sites")),
        14: ((YES, f"ICC(1,1) under image and mask perturbations, features under {f.icc} removed")
             if f.icc is not None else (NO, "no robustness filter in this study ([selection] icc_threshold)")),
        15: ((YES, f"greedy filter of feature pairs with |r| > {f.redundancy} inside every fold")
             if f.redundancy is not None else (NO, "no redundancy filter")),
        16: ((YES, f"{epf:.0f} {basis} per selected feature (≥ 10), selection inside every fold")
             if epf is not None and epf >= 10 else
             (AUTHORS_DECIDE, f"{epf:.1f} {basis} per selected feature (< 10)" if epf is not None else
              "events per feature not known (withheld counts)")),
        18: ((YES, "leave-one-site-out; harmonization, imputation, selection and penalty fitted inside every fold "
                   "(no leakage)") if f.loso else (NO, "no held-out data")),
        19: (YES, ("site (batch) effects removed by ComBat inside every fold" if f.harmonization else
                   "no harmonization")
             + "; tumour volume as a baseline model; covariate balance across sites checked"
             + (f" (imbalanced, not modelled: {', '.join(f.imbalanced)})" if f.imbalanced else "")),
        20: (YES, k.performance_words),
        21: (YES, "95% confidence intervals, random-effects pooling with prediction intervals"),
        22: ((YES, "calibration intercept and slope at the held-out sites") if f.calibration else
             (NO, "no calibration: site-stratified Cox gives relative risks only" if not k.calibrated else
              "no calibration statistics")),
        23: ((YES, "one image per case (site manifest)") if f.extracted else
             (AUTHORS_DECIDE, "feature tables supplied by the sites")),
        24: ((YES, ("paired comparison with the clinical model (" + ", ".join(f.clinical) + ")" if f.clinical else
                    "decision-curve analysis") + ("; decision curves" if f.clinical and f.dca else ""))
             if (f.clinical or f.dca) else (NO, "no clinical model and no decision curve")),
        25: (YES, f"the signature is a {k.model_words}, compared with tumour volume alone"
                  + (" and the clinical covariates" if f.clinical else "") + " (paired tests)"),
        26: (NO, "every evaluation is at a held-out centre (external); no internal test set"),
        27: ((YES, f"{f.n_external} centres each held out in turn") if f.loso else (NO, "no external testing")),
        29: (AUTHORS_DECIDE, f"fedrad {f.fedrad_version or ''} is open source; the study configuration is in "
                             "Provenance; deposit: authors"),
        30: (AUTHORS_DECIDE, "the final model and ComBat reference are in results.json; sharing: authors"),
    }
    out = []
    for item in METRICS_ITEMS:
        unknown_cond = [c for c in item.conditions if cond.get(c) is None]
        if any(cond.get(c) is False for c in item.conditions):
            out.append((item, INAPPLICABLE, "; ".join(METRICS_CONDITIONS[c] + " No" for c in item.conditions
                                                        if cond.get(c) is False)))
        elif unknown_cond:
            out.append((item, AUTHORS_DECIDE, "applies if: " + "; ".join(METRICS_CONDITIONS[c] for c in unknown_cond)
                        + " (the tool's default: No, not applicable)"))
        else:
            out.append((item, *decided.get(item.number, (AUTHORS_DECIDE, ""))))
    return out


def metrics_summary(results: Mapping, items: list | None = None) -> dict:
    """The METRICS score of the run with the authors' items answered "no" (the online tool's default; a lower
    bound) and "yes" (an upper bound), the undecided conditions "no" as in the tool. ``items``: the run's
    :func:`metrics_items`, when the caller has them already."""
    items = metrics_items(results) if items is None else items
    cond = {c: bool(v) for c, v in metrics_conditions(results).items()}
    yes = {i.number: True for i, a, _ in items if a == YES}
    low = metrics_score(yes, cond)
    high = metrics_score({**yes, **{i.number: True for i, a, _ in items if a == AUTHORS_DECIDE}}, cond)
    return {"low": low, "high": high, "n_yes": len(yes), "n_no": sum(a == NO for _, a, _ in items),
            "n_authors": sum(a == AUTHORS_DECIDE for _, a, _ in items), "conditions": cond}
