"""``study.toml``: the definition of a multi-center validation study, validated before anything runs.

Example (every key shown; defaults in :data:`DEFAULTS`)::

    [study]
    name = "response-demo"
    output = "results/response-demo"    # results.json and report.html (relative to study.toml)
    min_sites = 3                       # quorum: fewer answering sites stops the study

    [endpoint]
    type = "response"                   # "response" (binary column) or "survival" (time + event columns)
    outcome = "response"                # response: 0/1 column
    # time = "os_time"; event = "os_event"   # survival

    [sites.site1]                       # one table per site; paths are resolved AT THE SITE
    manifest = "site1/manifest.csv"     # extract at the site with `params` ...
    params = "ct"
    # table = "site1/features.parquet"  # ... or use a feature table the site already has

    [harmonization]
    enabled = true
    covariates = ["age", "sex"]         # biological covariates ComBat preserves
    categorical = ["sex"]
    parametric = true
    mean_only = false

    [selection]
    feature_prefixes = ["original_", "log-sigma"]
    fdr = 0.05                          # univariate screening, Benjamini-Hochberg
    redundancy = 0.9                    # |r| above which one of a pair is dropped
    max_features = 10
    # icc_threshold = 0.9               # keep features with ICC(1,1) >= this across image perturbations;
                                        # every site then needs robustness = "perturbed.parquet" (fedrad site
                                        # robustness)

    [model]
    type = "logistic"                   # "logistic" (response) or "cox" (survival, stratified by site)
    penalty = "l2"                      # "l2", "l1", "elasticnet"
    l1_ratio = 0.5
    grid = [0.01, 0.1, 1.0]             # C (logistic) or penalizer (cox), chosen by inner CV
    clinical = ["age", "stage"]         # covariates of the clinical baseline and the composite model

    [validation]
    loso = true                         # leave-one-site-out external validation
    inner_folds = 3                     # federated k-fold CV within training sites (penalty choice)
    seed = 0
    km_times = [0, 3, 6, 12, 24, 36, 60]  # time grid (units of the time column) of the pooled KM counts
"""
from __future__ import annotations

import tomllib
from copy import deepcopy
from pathlib import Path

DEFAULTS = {
    "study": {"name": "study", "output": "results", "min_sites": 2},
    "endpoint": {"type": "response", "outcome": "response", "time": "os_time", "event": "os_event"},
    "sites": {},
    "harmonization": {"enabled": True, "covariates": [], "categorical": [], "parametric": True,
                      "mean_only": False},
    "selection": {"feature_prefixes": ["original_", "log-sigma"], "fdr": 0.05, "redundancy": 0.9,
                  "max_features": 10, "icc_threshold": None},
    "model": {"type": None, "penalty": "l2", "l1_ratio": 0.5, "grid": [0.01, 0.1, 1.0], "clinical": []},
    "validation": {"loso": True, "inner_folds": 3, "seed": 0,
                   "km_times": [0, 3, 6, 12, 18, 24, 36, 48, 60, 84, 120]},
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


def validate(cfg: dict) -> dict:
    """Check types and consistency; fill derived defaults (model type from the endpoint)."""
    ep = cfg["endpoint"]
    if ep["type"] not in ("response", "survival"):
        raise StudyConfigError(f"[endpoint] type = {ep['type']!r}: use \"response\" or \"survival\"")
    model = cfg["model"]
    if model["type"] is None:
        model["type"] = "logistic" if ep["type"] == "response" else "cox"
    wanted = "logistic" if ep["type"] == "response" else "cox"
    if model["type"] != wanted:
        raise StudyConfigError(f"[model] type = {model['type']!r} does not fit a {ep['type']} endpoint; "
                               f"use \"{wanted}\"")
    if model["penalty"] not in ("l2", "l1", "elasticnet"):
        raise StudyConfigError(f"[model] penalty = {model['penalty']!r}: use \"l2\", \"l1\" or \"elasticnet\"")
    if not (0.0 <= float(model["l1_ratio"]) <= 1.0):
        raise StudyConfigError("[model] l1_ratio must be between 0 and 1")
    grid = model["grid"]
    if not isinstance(grid, list) or not grid or any(not isinstance(g, (int, float)) or g <= 0 for g in grid):
        raise StudyConfigError("[model] grid must be a non-empty list of positive numbers")
    sel = cfg["selection"]
    if not (0 < float(sel["fdr"]) <= 1):
        raise StudyConfigError("[selection] fdr must be in (0, 1]")
    if not (0 < float(sel["redundancy"]) <= 1):
        raise StudyConfigError("[selection] redundancy must be in (0, 1]")
    if sel["icc_threshold"] is not None and not (0 < float(sel["icc_threshold"]) <= 1):
        raise StudyConfigError("[selection] icc_threshold must be in (0, 1]")
    if int(sel["max_features"]) < 1:
        raise StudyConfigError("[selection] max_features must be at least 1")
    harm = cfg["harmonization"]
    missing = set(harm["categorical"]) - set(harm["covariates"])
    if missing:
        harm["covariates"] = list(harm["covariates"]) + sorted(missing)
    val = cfg["validation"]
    if int(val["inner_folds"]) < 2:
        raise StudyConfigError("[validation] inner_folds must be at least 2")
    study = cfg["study"]
    if int(study["min_sites"]) < 2:
        raise StudyConfigError("[study] min_sites must be at least 2 (a federation needs two sites)")
    for name, site in cfg["sites"].items():
        if not isinstance(site, dict) or ("manifest" in site) == ("table" in site):
            raise StudyConfigError(f"[sites.{name}] needs exactly one of manifest = \"...\" or table = \"...\"")
        unknown = set(site) - {"manifest", "table", "params", "robustness"}
        if unknown:
            raise StudyConfigError(f"[sites.{name}] has unknown key(s) {', '.join(sorted(unknown))}")
    if cfg["sites"] and len(cfg["sites"]) < int(study["min_sites"]):
        raise StudyConfigError(f"[sites] lists {len(cfg['sites'])} sites but [study] min_sites = "
                               f"{study['min_sites']}")
    return cfg


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
