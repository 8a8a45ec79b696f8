"""``study.toml``: the definition of a multi-center validation study, validated before anything runs.

Example (every key shown; defaults in :data:`DEFAULTS`)::

    [study]
    name = "response-demo"
    output = "results/response-demo"    # results.json and report.html (relative to study.toml)
    min_sites = 3                       # quorum: fewer answering sites stops the study
    kind = "prediction"                 # "prediction" (a model, validated leave-one-site-out) or "association"
                                        # (radiogenomics: features x molecular markers, see [association])

    [endpoint]
    type = "response"                   # "response" (binary column), "survival" (time + event columns) or
                                        # "continuous" (a numeric outcome, e.g. an immune score)
    outcome = "response"                # response: 0/1 column; continuous: the numeric column
    # time = "os_time"; event = "os_event"   # survival

    [coordinator]                       # the coordinator's public signing key (`fedrad coordinator keys`):
                                        # sites answer only requests signed by it; `fedrad site approve` shows
                                        # its fingerprint and refuses a study plan without one
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG15/jNjWY0G2Mt+XkddyMdJkjFLPE9kLBU9ZDN4pv4M"

    [sites.site1]                       # the sites taking part (folds: final + one held out per site)
    source = "ct-cohort"                # a data source the SITE configured ([sources.ct-cohort] in its
                                        # site.toml); omit to use the site's default table or manifest.
                                        # No path ever goes to a site: each site's data comes from its own
                                        # configuration (fedrad.client.site).
    [sites.site2]
    [sites.site3]
    # For single-machine rehearsals (`study run --runtime local|simulation`) an entry may also give the
    # site's data on this machine: table = "site3/features.parquet", or manifest = "..." with params =
    # "ct", and robustness = "perturbed.parquet". They configure the rehearsal's sites, are not part of the
    # plan the sites approve, and a deployment ignores them.

    [harmonization]
    enabled = true
    covariates = ["age", "sex"]         # biological covariates ComBat preserves
    categorical = ["sex"]
    parametric = true
    mean_only = false
    # batch = "scanner"                 # batches within sites (a site column: scanner, kernel, protocol); each
                                        # site's batch labels are its own ("site1/GE"); a batch with fewer than
                                        # k patients at a site joins the site's "other" batch (then its largest)
    # batch = ["manufacturer", "kernel"]  # nested ComBat (Horng et al. 2022): one pass per column, in order, each on
                                        # the previous output (one more round trip per extra column)
    # shared_batches = true             # with batch: a value is one batch across sites (the same scanner model
                                        # at several hospitals); the sites must write the same labels
    # covbat = true                     # CovBat after ComBat: site effects in the features' covariance (PCA of
    # covbat_percent_var = 0.95         # the ComBat residuals; the first PCs explaining this share, or
    # covbat_n_pc = 0                   # covbat_n_pc of them when > 0, get their location/scale harmonized)
    # smooth = { age = [18, 45, 55, 65, 95] }   # ComBat-GAM: a covariate's effect as a cubic B-spline (not also in
                                        # covariates): lower boundary, interior knots, upper boundary (values
                                        # outside are clipped to the boundary); the penalty is chosen per feature
                                        # by GCV over smooth_alphas (default 41 values 1 ... 1e7)
    # smooth = { age = { knots = 3, range = [18, 95] } }  # or: interior knots at the pooled quantiles of the sites'
                                        # age histograms (32 plan bins over the range, merged to >= k per bin)

    [selection]
    # features: by default every numeric column that is not case_id / a file column, the outcome, time or
    # event, a clinical column or a ComBat covariate, a site label or a pyradiomics diagnostics_* column, an
    # identifier-like name (MRN, dob, zip, ...) or an endpoint-like name (T, E, os_*, pfs_*, death, status,
    # follow-up, response, ...: whole name tokens, fedrad.common.names.endpoint_like).
    # These narrow it (glob patterns; case-sensitive):
    exclude = ["pfs_*", "response"]     # e.g. the other endpoints' columns kept in the same table
    allow = []                          # endpoint-like names that ARE features here, and features the
                                        # leakage screen would withhold (a near-perfect univariate
                                        # association with the outcome in the training sites)
    feature_columns = []                # only these (e.g. ["original_*"]); [] = all
    feature_prefixes = []               # only names starting with one of these; [] = all
    max_missing = 0.2                   # features missing in more than this share of a site's patients are
                                        # dropped; the others are imputed per validation fold with the
                                        # training sites' mean (ComBat runs on the imputed table)
    fdr = 0.05                          # univariate screening, Benjamini-Hochberg
    redundancy = 0.9                    # |r| above which one of a pair is dropped
    max_features = 10
    # icc_threshold = 0.9               # keep features with ICC(1,1) >= this across image perturbations;
                                        # every site then needs robustness = "perturbed.parquet" (fedrad site
                                        # robustness)

    [model]
    type = "logistic"                   # "logistic" (response), "cox" (survival, stratified by site) or
                                        # "linear" (continuous); default: the endpoint's
    penalty = "l2"                      # "l2", "l1", "elasticnet"
    l1_ratio = 0.5
    path_size = 12                      # penalty path (default): path_size values, log-spaced over
    path_decades = 3                    # path_decades decades from lambda_max (all coefficients zero, from the
                                        # federated gradient at zero, glmnet style), chosen by inner CV
                                        # (default 3 for l1/elasticnet, 5 for l2)
    # grid = [0.01, 0.1, 1.0]           # instead a fixed grid: C (logistic), penalizer (cox) or alpha (linear,
                                        # scikit-learn's ElasticNet; Ridge's alpha is n times it)
    clinical = ["age", "stage"]         # covariates of the clinical baseline and the composite model
    # volume = "original_shape_Volume" # the volume baseline's column (default: detected from the usual
                                        # names of pyradiomics 1.x-3.x, MIRP, LIFEx, ...: common.plan.VOLUME_NAMES)

    [validation]
    loso = true                         # leave-one-site-out external validation
    inner_folds = 3                     # federated k-fold CV within training sites (penalty choice)
    seed = 0
    km_times = [0, 3, 6, 12, 24, 36, 60]  # time grid (units of the time column) of the pooled KM counts
    # dca_horizon = 24                  # survival: decision curves of the risk of an event by this time (units of
                                        # the time column); absent: none. The held-out site's baseline is the
                                        # training sites' Breslow baseline (fedrad.common.cox.BASELINE_RULE)

    [association]                       # [study] kind = "association" ([endpoint] and the model keys other
                                        # than clinical and volume are not used)
    markers = ["immune_score", "egfr_mutant"]  # molecular markers: a continuous score or a 0/1 status each
    volume_adjusted = true              # also each effect adjusted for tumour volume ("is it just volume?")
    discovery = []                      # sites whose pooled associations are screened (default: all) ...
    replication = []                    # ... and the sites that test the survivors (default: none)
    fdr = 0.05                          # Benjamini-Hochberg over the whole feature x marker matrix
    top = 6                             # pairs with a forest plot across sites in the report
    # each pair's effect is adjusted for [model] clinical (numeric columns) with one intercept per site
"""
from __future__ import annotations

import json
import math
import numbers
import tomllib
from copy import deepcopy
from pathlib import Path

import numpy as np

from fedrad.common import endpoints
from fedrad.common.plan import default_path_decades

DEFAULTS = {
    "study": {"name": "study", "output": "results", "min_sites": 2, "kind": "prediction"},
    "endpoint": {"type": "response", "outcome": "response", "time": "os_time", "event": "os_event"},
    "sites": {},
    "harmonization": {"enabled": True, "covariates": [], "categorical": [], "parametric": True,
                      "mean_only": False, "batch": None, "shared_batches": False, "covbat": False,
                      "covbat_percent_var": 0.95, "covbat_n_pc": 0, "smooth": {}, "smooth_alphas": None},
    "selection": {"feature_prefixes": [], "feature_columns": [], "exclude": [], "allow": [], "max_missing": 0.2,
                  "fdr": 0.05, "redundancy": 0.9, "max_features": 10, "icc_threshold": None},
    "model": {"type": None, "penalty": "l2", "l1_ratio": 0.5, "grid": None, "path_size": 12,
              "path_decades": None, "clinical": [], "volume": None},
    "validation": {"loso": True, "inner_folds": 3, "seed": 0,
                   "km_times": [0, 3, 6, 12, 18, 24, 36, 48, 60, 84, 120], "dca_horizon": None},
    "association": {"markers": [], "volume_adjusted": True, "discovery": [], "replication": [], "fdr": 0.05,
                    "top": 6},
    "coordinator": {"key": None},
}
ALLOWED = {section: set(values) for section, values in DEFAULTS.items() if section != "sites"}


class StudyConfigError(ValueError):
    """study.toml is invalid; the message names the key and what to do."""


def _merge(user: dict) -> dict:
    cfg = deepcopy(DEFAULTS)
    for section, values in user.items():
        if section not in DEFAULTS:
            raise StudyConfigError(f"unknown section [{section}]; known: {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise StudyConfigError(f"[{section}] must be a table")
        if section == "sites":
            cfg["sites"] = deepcopy(values)
            continue
        unknown = set(values) - ALLOWED[section]
        if unknown:
            raise StudyConfigError(f"[{section}] has unknown key(s) {', '.join(sorted(unknown))}; "
                                   f"known: {', '.join(sorted(ALLOWED[section]))}")
        cfg[section].update(values)
    return cfg


def _toml(value) -> str:
    """``value`` as it would be written in TOML (for error messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))


def _example(section: str, key: str):
    default = DEFAULTS[section][key]
    return default if default is not None else 0.9


def _bad(section: str, key: str, value, what: str) -> StudyConfigError:
    return StudyConfigError(f"[{section}] {key} = {_toml(value)}: {what}, e.g. {key} = "
                            f"{_toml(_example(section, key))}")


def _boolean(cfg: dict, section: str, key: str) -> None:
    value = cfg[section][key]
    if not isinstance(value, bool):
        raise StudyConfigError(f"[{section}] {key} = {_toml(value)}: write {key} = true or {key} = false "
                               "(a TOML boolean, no quotes)")


def _integer(cfg: dict, section: str, key: str, minimum: int | None, why: str = "") -> None:
    value = cfg[section][key]
    if not _is_int(value):
        raise _bad(section, key, value, "write a whole number without quotes or decimals")
    if minimum is not None and value < minimum:
        raise _bad(section, key, value, f"must be at least {minimum}" + (f" ({why})" if why else ""))


def _number(cfg: dict, section: str, key: str, low: float, high: float, shown: str, low_open: bool = True) -> None:
    value = cfg[section][key]
    if not _is_number(value):
        raise _bad(section, key, value, f"write a finite number in {shown} without quotes")
    if not ((low < value if low_open else low <= value) and value <= high):
        raise _bad(section, key, value, f"must be in {shown}")


def _text(cfg: dict, section: str, key: str) -> None:
    value = cfg[section][key]
    if not isinstance(value, str) or not value.strip():
        raise _bad(section, key, value, "write a non-empty string in double quotes")


def _choice(cfg: dict, section: str, key: str, choices: tuple[str, ...]) -> None:
    value = cfg[section][key]
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(json.dumps(c) for c in choices[:-1]) + f" or {json.dumps(choices[-1])}"
        raise StudyConfigError(f"[{section}] {key} = {_toml(value)}: use {options}")


def _strings(cfg: dict, section: str, key: str, non_empty: bool = False) -> None:
    value = cfg[section][key]
    if not isinstance(value, list) or any(not isinstance(v, str) or not v.strip() for v in value):
        raise _bad(section, key, value, "write a list of non-empty strings in double quotes")
    if non_empty and not value:
        raise _bad(section, key, value, "list at least one")


def _numbers(cfg: dict, section: str, key: str, positive: bool) -> None:
    value = cfg[section][key]
    sign = "positive" if positive else "non-negative"
    if (not isinstance(value, list) or not value or any(not _is_number(v) for v in value)
            or any((v <= 0) if positive else (v < 0) for v in value)):
        raise _bad(section, key, value, f"write a non-empty list of {sign} numbers")


def _smooth(cfg: dict) -> None:
    harm = cfg["harmonization"]
    smooth = harm["smooth"]
    example = "smooth = { age = [18, 45, 55, 65, 95] }"
    if not isinstance(smooth, dict):
        raise StudyConfigError(f"[harmonization] smooth = {_toml(smooth)}: write a table of covariate = knots, "
                               f"e.g. {example}")
    for name, knots in smooth.items():
        if isinstance(knots, dict):  # knots from the sites' histograms: {knots = 3, range = [18, 95]}
            rng = knots.get("range")
            if (set(knots) != {"knots", "range"} or not _is_int(knots.get("knots")) or knots["knots"] < 1
                    or not isinstance(rng, list) or len(rng) != 2 or not all(_is_number(v) for v in rng)
                    or rng[0] >= rng[1]):
                raise StudyConfigError(f"[harmonization] smooth.{name} = {_toml(knots)}: write the knots, or "
                                       f"{{ knots = 3, range = [18, 95] }} (interior knots at the pooled quantiles "
                                       "of the sites' histograms over the range)")
        elif (not isinstance(knots, list) or len(knots) < 2 or any(not _is_number(k) for k in knots)
                or any(b <= a for a, b in zip(knots, knots[1:]))):
            raise StudyConfigError(f"[harmonization] smooth.{name} = {_toml(knots)}: write increasing numbers: the "
                                   f"lower boundary, the interior knots, the upper boundary, e.g. {example}")
        batches = harm.get("batch") if isinstance(harm.get("batch"), list) else [harm.get("batch")]
        if name in harm["covariates"] or name in harm["categorical"] or name in batches:
            raise StudyConfigError(f"[harmonization] smooth.{name}: {name!r} is also a covariate or the batch; a "
                                   "smooth term replaces its linear effect, so list it in smooth only")
    alphas = harm["smooth_alphas"]
    if alphas is not None:
        _numbers(cfg, "harmonization", "smooth_alphas", positive=False)


def validate(cfg: dict) -> dict:
    """Check types and consistency; fill derived defaults (model type from the endpoint).

    Every key of :data:`DEFAULTS` outside ``[sites]`` is checked strictly: booleans must be TOML booleans,
    integers TOML integers (``true`` is not 1, ``2.9`` is not 2), numbers finite and in range, lists lists of
    strings (or numbers). Each error is one line naming the key and what to write.
    """
    study = cfg["study"]
    _text(cfg, "study", "name")
    _text(cfg, "study", "output")
    _integer(cfg, "study", "min_sites", 2, "a federation needs two sites")
    _choice(cfg, "study", "kind", ("prediction", "association"))
    ep = cfg["endpoint"]
    _choice(cfg, "endpoint", "type", tuple(endpoints.KINDS))
    for key in ("outcome", "time", "event"):
        _text(cfg, "endpoint", key)
    if "time" in endpoints.KINDS[ep["type"]].keys() and ep["time"] == ep["event"]:
        raise StudyConfigError(f"[endpoint] time and event are both {ep['time']!r}: name the time column and the "
                               "event column")
    harm = cfg["harmonization"]
    for key in ("enabled", "parametric", "mean_only", "shared_batches", "covbat"):
        _boolean(cfg, "harmonization", key)
    _number(cfg, "harmonization", "covbat_percent_var", 0.0, 1.0, "(0, 1]")
    _integer(cfg, "harmonization", "covbat_n_pc", 0, "0 means: as many as covbat_percent_var needs")
    _smooth(cfg)
    if harm["shared_batches"] and harm.get("batch") is None:
        raise StudyConfigError("[harmonization] shared_batches = true needs batch = \"<column>\" (the scanner "
                               "labels the sites share); without it each site is one batch")
    for key in ("covariates", "categorical"):
        _strings(cfg, "harmonization", key)
    batch = harm.get("batch")
    if isinstance(batch, list):  # nested ComBat: one pass per column
        _strings(cfg, "harmonization", "batch")
        if len(batch) < 2 or len(set(batch)) != len(batch):
            raise _bad("harmonization", "batch", batch, "write one column, or two or more distinct columns for nested "
                       "ComBat (one pass per column, in order)")
    elif batch is not None:
        _text(cfg, "harmonization", "batch")
    for col in ([batch] if isinstance(batch, str) else batch or []):
        if col in harm["covariates"] or col in cfg["model"]["clinical"]:
            raise StudyConfigError(f"[harmonization] batch = {_toml(batch)}: {col!r} is also a covariate or clinical "
                                   "column; the batch is what ComBat removes, a covariate what it preserves")
    sel = cfg["selection"]
    for key in ("feature_prefixes", "feature_columns", "exclude", "allow"):
        _strings(cfg, "selection", key)
    _number(cfg, "selection", "max_missing", 0.0, 1.0, "[0, 1)", low_open=False)
    if sel["max_missing"] >= 1.0:
        raise _bad("selection", "max_missing", sel["max_missing"], "must be below 1 (the share of a site's "
                   "patients a feature may miss)")
    _number(cfg, "selection", "fdr", 0.0, 1.0, "(0, 1]")
    _number(cfg, "selection", "redundancy", 0.0, 1.0, "(0, 1]")
    _integer(cfg, "selection", "max_features", 1)
    if sel["icc_threshold"] is not None:
        _number(cfg, "selection", "icc_threshold", 0.0, 1.0, "(0, 1]")
    model = cfg["model"]
    if model["type"] is not None:
        _choice(cfg, "model", "type", tuple(endpoints.BY_MODEL))
    wanted = endpoints.KINDS[ep["type"]].model
    if model["type"] is None:
        model["type"] = wanted
    if model["type"] != wanted:
        raise StudyConfigError(f"[model] type = {model['type']!r} does not fit a {ep['type']} endpoint; "
                               f"use \"{wanted}\"")
    _choice(cfg, "model", "penalty", ("l2", "l1", "elasticnet"))
    _number(cfg, "model", "l1_ratio", 0.0, 1.0, "[0, 1]", low_open=False)
    if model["grid"] is not None:
        _numbers(cfg, "model", "grid", positive=True)
    _integer(cfg, "model", "path_size", 3, "the inner CV needs interior points to choose")
    if model["path_size"] > 50:
        raise _bad("model", "path_size", model["path_size"], "must be at most 50 (each value is a fit per fold, "
                   "model and inner fold)")
    if model["path_decades"] is None:
        model["path_decades"] = default_path_decades(model["penalty"])
    _number(cfg, "model", "path_decades", 0.0, 6.0, "(0, 6]")
    _strings(cfg, "model", "clinical")
    vol = model.get("volume")
    if vol is not None and not (isinstance(vol, str) and vol.strip()):
        raise StudyConfigError(f"[model] volume = {vol!r}: write the tumour-volume column's name, e.g. "
                               "volume = \"original_shape_VoxelVolume\" (omit it to detect the usual names)")
    val = cfg["validation"]
    _boolean(cfg, "validation", "loso")
    _integer(cfg, "validation", "inner_folds", 2)
    _integer(cfg, "validation", "seed", None)
    _numbers(cfg, "validation", "km_times", positive=False)
    times = val["km_times"]
    if any(b <= a for a, b in zip(times, times[1:])):
        raise StudyConfigError(f"[validation] km_times = {_toml(times)} is not increasing: list the times in "
                               "increasing order, each once, e.g. km_times = [0, 6, 12, 24]")
    if val.get("dca_horizon") is not None:
        horizon = val["dca_horizon"]
        if not _is_number(horizon) or horizon <= 0:
            raise _bad("validation", "dca_horizon", horizon, "write a positive time (units of the time column), "
                       "e.g. dca_horizon = 24")
        if cfg["endpoint"]["type"] != "survival":
            raise _bad("validation", "dca_horizon", horizon, "is for a survival endpoint (a binary response's "
                       "decision curves need no horizon); remove it")
    missing = set(harm["categorical"]) - set(harm["covariates"])
    if missing:
        harm["covariates"] = list(harm["covariates"]) + sorted(missing)
    _association(cfg)
    _coordinator(cfg)
    from fedrad.common.plan import NAME

    for name, site in cfg["sites"].items():
        if not NAME.match(str(name)):
            raise StudyConfigError(f"[sites.{name}]: a site name is letters, digits, '_' and '-' only")
        if not isinstance(site, dict) or ("manifest" in site and "table" in site):
            raise StudyConfigError(f"[sites.{name}] takes at most one of manifest = \"...\" or table = \"...\"")
        unknown = set(site) - {"source", "manifest", "table", "params", "robustness"}
        if unknown:
            raise StudyConfigError(f"[sites.{name}] has unknown key(s) {', '.join(sorted(unknown))}; known: source "
                                   "(a data source the site configured), and for rehearsals on one machine "
                                   "manifest, table, params, robustness")
        if "source" in site and not (isinstance(site["source"], str) and NAME.match(site["source"])):
            raise StudyConfigError(f"[sites.{name}] source = {site['source']!r}: the name of a data source the "
                                   "site configured ([sources.NAME] in its site.toml), letters, digits, '_', '-'")
        for key in ("manifest", "table", "params", "robustness"):
            if key in site and not isinstance(site[key], str):
                raise StudyConfigError(f"[sites.{name}] {key} must be a string")
    if cfg["sites"] and len(cfg["sites"]) < int(study["min_sites"]):
        raise StudyConfigError(f"[sites] lists {len(cfg['sites'])} sites but [study] min_sites = "
                               f"{study['min_sites']}")
    return cfg


def _coordinator(cfg: dict) -> None:
    key = cfg["coordinator"]["key"]
    if key is None:
        return
    from fedrad.common.signing import SigningError, public_line

    try:
        cfg["coordinator"]["key"] = public_line(key)
    except SigningError as exc:
        raise StudyConfigError(f"[coordinator] key = {_toml(key)[:60]}: {exc}") from None


def _association(cfg: dict) -> None:
    """``[association]``: markers (required for ``[study] kind = "association"``), never also clinical covariates;
    discovery / replication site lists disjoint and among ``[sites]`` when those are listed."""
    assoc = cfg["association"]
    for key in ("markers", "discovery", "replication"):
        _strings(cfg, "association", key)
    _boolean(cfg, "association", "volume_adjusted")
    _number(cfg, "association", "fdr", 0.0, 1.0, "(0, 1]")
    _integer(cfg, "association", "top", 1)
    if cfg["study"]["kind"] != "association":
        return
    markers = assoc["markers"]
    if not markers:
        raise StudyConfigError("[study] kind = \"association\" needs [association] markers = [...]: the molecular "
                               "marker columns (a continuous score or a 0/1 status each), e.g. markers = "
                               "[\"cd8_score\", \"egfr_mutant\"]")
    if len(set(markers)) != len(markers):
        raise StudyConfigError(f"[association] markers = {_toml(markers)} lists a column twice")
    both = sorted(set(markers) & set(cfg["model"]["clinical"]))
    if both:
        raise StudyConfigError(f"[association] markers and [model] clinical (the covariates the associations are "
                               f"adjusted for) both name {', '.join(both)}; a column is one or the other")
    overlap = sorted(set(assoc["discovery"]) & set(assoc["replication"]))
    if overlap:
        raise StudyConfigError(f"[association] discovery and replication both list {', '.join(overlap)}; a site "
                               "discovers or replicates, not both")
    if assoc["replication"] and not assoc["discovery"]:
        raise StudyConfigError("[association] replication needs discovery = [...] too (the sites whose pooled "
                               "associations are tested for replication)")
    listed = set(cfg["sites"])
    unknown = sorted((set(assoc["discovery"]) | set(assoc["replication"])) - listed) if listed else []
    if unknown:
        raise StudyConfigError(f"[association] names site(s) {', '.join(unknown)} that [sites] does not list")


def load_study(path: str | Path) -> dict:
    """Read and validate ``study.toml``; output paths are resolved relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"study file {path} not found")
    try:
        user = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{path} is not valid TOML: {exc}") from exc
    cfg = validate(_merge(user))
    out = Path(cfg["study"]["output"])
    cfg["study"]["output"] = str(out if out.is_absolute() else (path.parent / out).resolve())
    cfg["study"]["file"] = str(path.resolve())
    return cfg
